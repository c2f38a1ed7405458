package dispatcher

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// DLQ record headers, as documented in DESIGN.md.
const (
	HeaderError             = "orderly.error"
	HeaderStatus            = "orderly.status"
	HeaderRoute             = "orderly.route"
	HeaderRequestIndex      = "orderly.request_index"
	HeaderAttempts          = "orderly.attempts"
	HeaderOriginalTopic     = "orderly.original_topic"
	HeaderOriginalPartition = "orderly.original_partition"
	HeaderOriginalOffset    = "orderly.original_offset"
	HeaderOriginalTimestamp = "orderly.original_timestamp"
	HeaderFailedAt          = "orderly.failed_at"
)

// failure describes why a message is dead-lettered.
type failure struct {
	reason       string
	status       int    // last HTTP status, 0 if none
	route        string // "" when no route took the message
	requestIndex int    // 0-based index of the failed request, -1 if none was sent
	attempts     int
}

// stall records that a message failed permanently with no DLQ configured:
// its lane stays parked (parkStalled) until the partition stops, and the
// message is redelivered to the partition's next owner.
func (d *Dispatcher) stall(p *partition, it *item) {
	telemetry.MessageDeadLettered(it.span(), it.fail.reason)
	d.outcome(telemetry.OutcomeStalled).Inc()
	d.log.Error("message cannot be delivered and dlq.topic is empty: its key stalls until restart",
		"topic", p.topic, "partition", p.id, "offset", it.msg.Offset, "key", string(it.msg.Key), "reason", it.fail.reason)
}

// deadLetter writes l's head message it to the DLQ; l is parked (parkDLQ)
// until the DLQ acknowledges it. Then the message is done and l moves on; a
// failed write is retried after a backoff, the key waiting meanwhile.
func (d *Dispatcher) deadLetter(p *partition, l *lane, it *item) {
	if l.dlqBackoff == 0 {
		telemetry.MessageDeadLettered(it.span(), it.fail.reason)
	}
	d.dlq.produce(dlqRecord(d.dlq.topic, it, it.fail, time.Now()), func(err error) { d.dlqAcked(p, l, it, err) })
}

// dlqAcked handles the DLQ's answer for l's head message it.
func (d *Dispatcher) dlqAcked(p *partition, l *lane, it *item, err error) {
	p.mu.Lock()
	if l.abandoned || l.parked != parkDLQ || len(l.q) == 0 || l.q[0] != it {
		p.mu.Unlock()
		return
	}
	if err != nil {
		// Only the goroutine holding l touches dlqBackoff: here, the
		// acknowledgement of the write it started.
		l.dlqBackoff = min(max(2*l.dlqBackoff, d.cfg.HTTP.Retry.InitialBackoff.D()), d.cfg.HTTP.Retry.MaxBackoff.D())
		wait := l.dlqBackoff
		p.backoffLocked(l, wait)
		p.mu.Unlock()
		d.metrics.DLQErrors.Inc()
		d.log.Error("dlq write failed, retrying: the key waits", "topic", p.topic, "partition", p.id,
			"offset", it.msg.Offset, "dlq", d.dlq.topic, "error", err, "retry_in", wait.String())
		return
	}
	l.parked, l.running = parkNone, true
	l.popLocked()
	p.mu.Unlock()
	d.metrics.DLQProduced.Inc()
	it.span().End()
	p.finish(&it.msg, telemetry.OutcomeDeadLettered)
	d.log.Info("message dead-lettered", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
		"dlq", d.dlq.topic, "reason", it.fail.reason)
	p.moveOn(l)
}

// dlqRecord builds the DLQ record: the original key, value and headers
// plus the orderly.* headers.
func dlqRecord(topic string, it *item, f *failure, now time.Time) *kafka.Message {
	m := &it.msg
	hs := make([]kafka.Header, 0, len(m.Headers)+10)
	for _, h := range m.Headers {
		hs = append(hs, kafka.Header{Key: h.Key, Value: h.Value})
	}
	add := func(k, v string) { hs = append(hs, kafka.Header{Key: k, Value: []byte(v)}) }
	add(HeaderError, f.reason)
	add(HeaderStatus, strconv.Itoa(f.status))
	add(HeaderRoute, f.route)
	add(HeaderRequestIndex, strconv.Itoa(max(f.requestIndex, 0)))
	add(HeaderAttempts, strconv.Itoa(f.attempts))
	add(HeaderOriginalTopic, m.Topic)
	add(HeaderOriginalPartition, strconv.Itoa(int(m.Partition)))
	add(HeaderOriginalOffset, strconv.FormatInt(m.Offset, 10))
	add(HeaderOriginalTimestamp, m.Timestamp.UTC().Format(time.RFC3339Nano))
	add(HeaderFailedAt, now.UTC().Format(time.RFC3339Nano))
	return &kafka.Message{
		TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny},
		Key:            m.Key,
		Value:          m.Value,
		Headers:        hs,
	}
}

// dlqWriter produces to the DLQ with an idempotent producer (acks=all) and
// reports each record's delivery.
type dlqWriter struct {
	topic string
	p     *kafka.Producer
	log   *slog.Logger
	acks  chan kafka.Event // delivery reports of produce
	wg    sync.WaitGroup   // the event and acknowledgement pumps
}

func newDLQWriter(brokers string, cfg *config.Config, log *slog.Logger, logs chan kafka.LogEvent) (*dlqWriter, error) {
	cm := kafka.ConfigMap{
		"bootstrap.servers":      brokers,
		"client.id":              "orderly-dlq",
		"enable.idempotence":     true,
		"acks":                   "all",
		"linger.ms":              5,
		"enable.metrics.push":    false,
		"go.logs.channel.enable": true,
		"go.logs.channel":        logs,
	}
	for k, v := range cfg.Kafka.Properties {
		if producerProperty(k) {
			cm[k] = v
		}
	}
	p, err := kafka.NewProducer(&cm)
	if err != nil {
		return nil, fmt.Errorf("dispatcher: unable to create the DLQ producer: %w", err)
	}
	w := &dlqWriter{topic: cfg.DLQ.Topic, p: p, log: log, acks: make(chan kafka.Event, 1024)}
	w.wg.Go(func() {
		for ev := range p.Events() {
			if e, ok := ev.(kafka.Error); ok {
				log.Warn("dlq producer error", "error", e)
			}
		}
	})
	w.wg.Go(func() {
		for ev := range w.acks {
			m, ok := ev.(*kafka.Message)
			if !ok {
				continue
			}
			done, ok := m.Opaque.(func(error))
			if !ok {
				continue
			}
			if m.TopicPartition.Error != nil {
				done(fmt.Errorf("unable to write to %s: %w", w.topic, m.TopicPartition.Error))
			} else {
				done(nil)
			}
		}
	})
	return w, nil
}

// produce writes rec without waiting; done is called once with the outcome,
// from the writer's acknowledgement pump (or at once if librdkafka refuses
// the record).
func (w *dlqWriter) produce(rec *kafka.Message, done func(error)) {
	rec.Opaque = done
	if err := w.p.Produce(rec, w.acks); err != nil {
		done(fmt.Errorf("unable to produce to %s: %w", w.topic, err))
	}
}

// write produces rec and waits for its delivery report or ctx.
func (w *dlqWriter) write(ctx context.Context, rec *kafka.Message) error {
	ch := make(chan kafka.Event, 1)
	if err := w.p.Produce(rec, ch); err != nil {
		return fmt.Errorf("unable to produce to %s: %w", w.topic, err)
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case ev := <-ch:
		m, ok := ev.(*kafka.Message)
		if !ok {
			return fmt.Errorf("unexpected delivery event %v", ev)
		}
		if m.TopicPartition.Error != nil {
			return fmt.Errorf("unable to write to %s: %w", w.topic, m.TopicPartition.Error)
		}
		return nil
	}
}

// close flushes outstanding records (briefly) and stops the producer and
// the pumps. Nothing may produce meanwhile.
func (w *dlqWriter) close() {
	w.p.Flush(5000)
	w.p.Close()
	close(w.acks)
	w.wg.Wait()
}

// producerProperty reports whether a kafka.properties key also applies to
// the DLQ producer: connection, security and client identity settings do;
// consumer tuning does not.
func producerProperty(k string) bool {
	for _, prefix := range []string{"security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "api.version", "metadata.", "reconnect.", "debug", "log_level", "topic.metadata", "allow.auto.create.topics"} {
		if len(k) >= len(prefix) && k[:len(prefix)] == prefix {
			return true
		}
	}
	return false
}
