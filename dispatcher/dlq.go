package dispatcher

import (
	"context"
	"errors"
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
	// HeaderValueTruncated is set, to the original value's size in bytes,
	// on a record whose value was cut because the DLQ refused it whole.
	HeaderValueTruncated = "orderly.value_truncated"
)

// failure describes why a message is dead-lettered.
type failure struct {
	reason       string
	status       int    // last HTTP status, 0 if none
	route        string // "" when no route took the message
	requestIndex int    // 0-based index of the failed request, -1 if none was sent
	attempts     int
	// quarantinedBy, if set, is the message whose failure quarantined this
	// message's key: this one was not attempted.
	quarantinedBy *Cause
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
// failed write is retried (see dlqAcked), the key waiting meanwhile.
func (d *Dispatcher) deadLetter(p *partition, l *lane, it *item) {
	if l.dlqBackoff == 0 && !l.dlqCut {
		telemetry.MessageDeadLettered(it.span(), it.fail.reason)
	}
	keep := -1
	if l.dlqCut {
		keep = l.dlqKeep
	}
	d.dlq.produce(dlqRecord(d.dlq.topic, it, it.fail, time.Now(), keep), func(err error) { d.dlqAcked(p, l, it, err) })
}

// dlqAcked handles the DLQ's answer for l's head message it:
//   - acknowledged: the message is done, l moves on;
//   - refused for its size (the DLQ topic's max.message.bytes, or the
//     producer's message.max.bytes, is below the source topic's): it is
//     written again at once with half as much of its value (and
//     orderly.value_truncated), until it fits;
//   - any other failure (authorization, unknown topic, broker down): it
//     is written again after a backoff, reported at error level, in
//     orderly_dlq_failing and on /readyz; the key waits, nothing is
//     skipped, and a drain does not wait for it (it is redelivered).
func (d *Dispatcher) dlqAcked(p *partition, l *lane, it *item, err error) {
	p.mu.Lock()
	if l.abandoned || l.parked != parkDLQ || len(l.q) == 0 || l.q[0] != it {
		p.mu.Unlock()
		return
	}
	// Only the goroutine holding l touches its dlq* fields: here, the
	// acknowledgement of the write it started.
	if err != nil && tooLarge(err) {
		size := len(it.msg.Value)
		if l.dlqCut {
			size = l.dlqKeep
		}
		if size > 0 {
			l.dlqCut, l.dlqKeep = true, size/2
			p.handing++ // as in advance: stop waits while this goroutine produces
			p.mu.Unlock()
			d.log.Warn("the DLQ refused a record for its size: writing it with its value cut",
				"topic", p.topic, "partition", p.id, "offset", it.msg.Offset, "dlq", d.dlq.topic,
				"value_bytes", len(it.msg.Value), "keep_bytes", l.dlqKeep, "error", err)
			d.deadLetter(p, l, it)
			p.mu.Lock()
			p.handing--
			p.checkQuietLocked()
			p.mu.Unlock()
			return
		}
	}
	if err != nil {
		l.dlqBackoff = min(max(2*l.dlqBackoff, d.cfg.HTTP.Retry.InitialBackoff.D()), d.cfg.HTTP.Retry.MaxBackoff.D())
		wait := l.dlqBackoff
		p.backoffLocked(l, wait, parkDLQRetry)
		p.mu.Unlock()
		d.metrics.DLQErrors.Inc()
		d.dlqFailing(err)
		d.log.Error("dlq write failed, retrying: the key waits", "topic", p.topic, "partition", p.id,
			"offset", it.msg.Offset, "key", string(it.msg.Key), "dlq", d.dlq.topic, "error", err, "retry_in", wait.String())
		return
	}
	if q := d.quarantine; q != nil && len(it.msg.Key) > 0 && it.fail.quarantinedBy == nil {
		// Its key is quarantined before the message counts as done: were
		// the process to die in between, the message comes again and
		// quarantines the key then.
		p.handing++
		p.mu.Unlock()
		go func() {
			err := q.Quarantine(p.ctx, p.topic, it.msg.Key, Cause{Topic: p.topic, Partition: p.id, Offset: it.msg.Offset})
			p.mu.Lock()
			p.handing--
			p.checkQuietLocked()
			if err != nil || l.abandoned || l.parked != parkDLQ || len(l.q) == 0 || l.q[0] != it {
				p.mu.Unlock()
				return // the partition stopped: the message comes again to its next owner
			}
			d.log.Warn("key quarantined: its later messages go to the DLQ until it is replayed or released",
				"topic", p.topic, "partition", p.id, "offset", it.msg.Offset, "key", string(it.msg.Key))
			d.deadLettered(p, l, it)
		}()
		return
	}
	d.deadLettered(p, l, it)
}

// deadLettered finishes l's head message it, acknowledged by the DLQ, and
// moves l on. The caller holds p.mu; deadLettered releases it.
func (d *Dispatcher) deadLettered(p *partition, l *lane, it *item) {
	cut := l.dlqCut
	p.unparkedLocked(l)
	l.popLocked()
	p.mu.Unlock()
	d.dlqFailing(nil)
	d.metrics.DLQProduced.Inc()
	if cut {
		d.metrics.DLQTruncated.Inc()
	}
	if it.fail.quarantinedBy != nil {
		d.metrics.QuarantinedMessages.Inc()
	}
	it.span().End()
	p.finish(&it.msg, telemetry.OutcomeDeadLettered)
	d.commitSoon.Store(true)
	d.log.Info("message dead-lettered", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
		"dlq", d.dlq.topic, "reason", it.fail.reason, "value_truncated", cut)
	p.moveOn(l)
}

// tooLarge reports whether a DLQ write failed for the record's size.
func tooLarge(err error) bool {
	var ke kafka.Error
	if !errors.As(err, &ke) {
		return false
	}
	switch ke.Code() {
	case kafka.ErrMsgSizeTooLarge, kafka.ErrRecordListTooLarge:
		return true
	}
	return false
}

// dlqFailing records the outcome of the latest DLQ write: nil clears the
// failure, anything else is kept for /readyz and orderly_dlq_failing.
func (d *Dispatcher) dlqFailing(err error) {
	if err == nil {
		if d.dlqErr.Load() != nil {
			d.dlqErr.Store(nil)
			d.metrics.DLQFailing.Set(0)
			d.log.Info("dlq writes succeed again", "dlq", d.cfg.DLQ.Topic)
		}
		return
	}
	d.dlqErr.Store(&dlqProblem{err: err, since: time.Now()})
	d.metrics.DLQFailing.Set(1)
}

type dlqProblem struct {
	err   error
	since time.Time
}

// Problems lists what keeps the dispatcher from working fully although it
// is ready: today, failing DLQ writes. Safe for concurrent use.
func (d *Dispatcher) Problems() []string {
	if pr := d.dlqErr.Load(); pr != nil {
		return []string{fmt.Sprintf("dead-letter writes to %s failing (last at %s): %v; the keys concerned wait",
			d.cfg.DLQ.Topic, pr.since.UTC().Format(time.RFC3339), pr.err)}
	}
	return nil
}

// dlqRecord builds the DLQ record: the original key, value and headers
// plus the orderly.* headers. keep >= 0 cuts the value to that many bytes
// and says so in orderly.value_truncated.
func dlqRecord(topic string, it *item, f *failure, now time.Time, keep int) *kafka.Message {
	m := &it.msg
	hs := make([]kafka.Header, 0, len(m.Headers)+13)
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
	if f.quarantinedBy != nil {
		add(HeaderQuarantined, "true")
		add(HeaderQuarantinedBy, f.quarantinedBy.String())
	}
	value := m.Value
	if keep >= 0 && keep < len(value) {
		value = value[:keep]
		add(HeaderValueTruncated, strconv.Itoa(len(m.Value)))
	}
	return &kafka.Message{
		TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny},
		Key:            m.Key,
		Value:          value,
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
