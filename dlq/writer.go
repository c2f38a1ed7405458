package dlq

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
	"github.com/orderly-dispatch/orderly/filters"
)

// DLQ record headers, as documented in the README.
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

// Failure describes why a message is dead-lettered.
type Failure struct {
	Reason       string
	Status       int    // last HTTP status, 0 if none
	Route        string // "" when no route took the message
	RequestIndex int    // 0-based index of the failed request, -1 if none was sent
	Attempts     int
	// QuarantinedBy, if set, is the message whose failure quarantined this
	// message's key: this one was not attempted.
	QuarantinedBy *Cause
}

// TooLarge reports whether a DLQ write failed for the record's size.
func TooLarge(err error) bool {
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

// Build returns the DLQ record of m: its key, value and headers plus the
// orderly.* headers. keep >= 0 cuts the value to that many bytes and says
// so in orderly.value_truncated.
func Build(topic string, m *filters.Message, f *Failure, now time.Time, keep int) *kafka.Message {
	hs := make([]kafka.Header, 0, len(m.Headers)+13)
	for _, h := range m.Headers {
		hs = append(hs, kafka.Header{Key: h.Key, Value: h.Value})
	}
	add := func(k, v string) { hs = append(hs, kafka.Header{Key: k, Value: []byte(v)}) }
	add(HeaderError, f.Reason)
	add(HeaderStatus, strconv.Itoa(f.Status))
	add(HeaderRoute, f.Route)
	add(HeaderRequestIndex, strconv.Itoa(max(f.RequestIndex, 0)))
	add(HeaderAttempts, strconv.Itoa(f.Attempts))
	add(HeaderOriginalTopic, m.Topic)
	add(HeaderOriginalPartition, strconv.Itoa(int(m.Partition)))
	add(HeaderOriginalOffset, strconv.FormatInt(m.Offset, 10))
	add(HeaderOriginalTimestamp, m.Timestamp.UTC().Format(time.RFC3339Nano))
	add(HeaderFailedAt, now.UTC().Format(time.RFC3339Nano))
	if f.QuarantinedBy != nil {
		add(HeaderQuarantined, "true")
		add(HeaderQuarantinedBy, f.QuarantinedBy.String())
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

// Writer produces to the DLQ with an idempotent producer (acks=all) and
// reports each record's delivery.
type Writer struct {
	topic string
	p     *kafka.Producer
	log   *slog.Logger
	acks  chan kafka.Event // delivery reports of produce
	wg    sync.WaitGroup   // the event and acknowledgement pumps
}

// NewWriter returns a Writer to cfg.DLQ.Topic; librdkafka's logs go to logs.
func NewWriter(brokers string, cfg *config.Config, log *slog.Logger, logs chan kafka.LogEvent) (*Writer, error) {
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
		return nil, fmt.Errorf("dlq: unable to create the DLQ producer: %w", err)
	}
	w := &Writer{topic: cfg.DLQ.Topic, p: p, log: log, acks: make(chan kafka.Event, 1024)}
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

// Topic is the DLQ topic.
func (w *Writer) Topic() string { return w.topic }

// Produce writes rec without waiting; done is called once with the outcome,
// from the writer's acknowledgement pump (or at once if librdkafka refuses
// the record).
func (w *Writer) Produce(rec *kafka.Message, done func(error)) {
	rec.Opaque = done
	if err := w.p.Produce(rec, w.acks); err != nil {
		done(fmt.Errorf("unable to produce to %s: %w", w.topic, err))
	}
}

// Write produces rec and waits for its delivery report or ctx.
func (w *Writer) Write(ctx context.Context, rec *kafka.Message) error {
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

// Close flushes outstanding records (briefly) and stops the producer and
// the pumps. Nothing may produce meanwhile.
func (w *Writer) Close() {
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
