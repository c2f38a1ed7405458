package dlq

import (
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/telemetry"
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
	*producer.Producer
}

// NewWriter returns a Writer to cfg.DLQ.Topic; librdkafka's logs go to logs,
// its producer's restarts to m (nil: none).
func NewWriter(brokers string, cfg *config.Config, log *slog.Logger, logs chan kafka.LogEvent, m *telemetry.Metrics) (*Writer, error) {
	p, err := producer.New(brokers, "orderly-dlq", cfg.Kafka.Properties, nil, log, logs, m)
	if err != nil {
		return nil, fmt.Errorf("dlq: unable to create the DLQ producer: %w", err)
	}
	return &Writer{topic: cfg.DLQ.Topic, Producer: p}, nil
}

// Topic is the DLQ topic.
func (w *Writer) Topic() string { return w.topic }
