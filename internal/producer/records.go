package producer

import (
	"context"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// RecordTimeout is librdkafka's message.timeout.ms for the records of topic
// requests: a record it could not write within it is reported failed, and
// written again after a backoff, so that an unreachable broker shows in
// Orderly's logs within a minute rather than librdkafka's default five.
const RecordTimeout = 60 * time.Second

// HeaderIdempotencyKey is the header of a topic request's record that
// carries its idempotency key (<topic>-<partition>-<offset>-<index> of the
// message), the same for every write of it.
const HeaderIdempotencyKey = "orderly.idempotency_key"

// NewRecords returns the producer of topic requests' records to topics. Its
// partitioner is the Java client's (murmur2 of the key), so that a key
// lands where other Kafka producers put it; it creates no topic. Its batches are kept within the
// smallest max.message.bytes of topics, as far as the brokers tell it
// within timeout: a broker refuses a batch over the limit whole, and
// librdkafka does not split it, so one oversized record would otherwise
// fail the records batched with it.
func NewRecords(brokers string, topics []string, props map[string]string, timeout time.Duration, log *slog.Logger, logs chan kafka.LogEvent, m *telemetry.Metrics) (*Producer, error) {
	extra := kafka.ConfigMap{
		"partitioner":        "murmur2_random",
		"message.timeout.ms": int(RecordTimeout / time.Millisecond),
		// A topic that does not exist is a configuration error the
		// records are dead-lettered for, not something to create with the
		// brokers' defaults; librdkafka gives up on it after this wait.
		"allow.auto.create.topics":          false,
		"topic.metadata.propagation.max.ms": 10000,
		// A key's next record waits for this one's acknowledgement, so
		// the linger is on each key's critical path: 1 ms rather than
		// New's 5 still batches the records of the keys meanwhile.
		"linger.ms": 1,
	}
	if limit, err := maxMessageBytes(brokers, topics, props, timeout); err != nil {
		log.Warn("unable to read the max.message.bytes of the routes' topics: batches may be refused whole for one large record",
			"topics", topics, "error", err)
	} else if limit > 0 {
		extra["batch.size"] = limit
	}
	return New(brokers, "orderly-records", props, extra, log, logs, m)
}

// maxMessageBytes returns the smallest max.message.bytes of topics (0 when
// none is known).
func maxMessageBytes(brokers string, topics []string, props map[string]string, timeout time.Duration) (int, error) {
	cm := kafka.ConfigMap{"bootstrap.servers": brokers, "log_level": 3}
	CopyClientProperties(cm, props)
	a, err := kafka.NewAdminClient(&cm)
	if err != nil {
		return 0, err
	}
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	rs := make([]kafka.ConfigResource, len(topics))
	for i, t := range topics {
		rs[i] = kafka.ConfigResource{Type: kafka.ResourceTopic, Name: t}
	}
	res, err := a.DescribeConfigs(ctx, rs)
	if err != nil {
		return 0, err
	}
	limit := 0
	for _, r := range res {
		if r.Error.Code() != kafka.ErrNoError {
			continue // a missing topic: its records are refused anyway
		}
		if n, err := strconv.Atoi(r.Config["max.message.bytes"].Value); err == nil && n > 0 && (limit == 0 || n < limit) {
			limit = n
		}
	}
	return limit, nil
}

// Record returns the record of rq, a topic request (rq.Topic set): its key,
// value and headers (sorted by name), orderly.idempotency_key, and the
// trace context of ctx.
func Record(ctx context.Context, t *telemetry.Tracing, rq *filters.Request, idempotencyKey string) *kafka.Message {
	hs := make(telemetry.HeaderCarrier, 0, len(rq.Header)+2)
	for _, k := range slices.Sorted(maps.Keys(rq.Header)) {
		for _, v := range rq.Header[k] {
			hs = append(hs, filters.Header{Key: k, Value: []byte(v)})
		}
	}
	hs = append(hs, filters.Header{Key: HeaderIdempotencyKey, Value: []byte(idempotencyKey)})
	t.InjectInto(ctx, &hs)
	kh := make([]kafka.Header, len(hs))
	for i, h := range hs {
		kh[i] = kafka.Header{Key: h.Key, Value: h.Value}
	}
	topic := rq.Topic
	return &kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny},
		Key: rq.Key, Value: rq.Body, Headers: kh}
}

// Permanent reports whether writing the same record again cannot succeed:
// too large for the topic, a topic that does not exist, a record the topic
// refuses (a compacted topic's record without key, a policy). Anything else
// (brokers unreachable, authorization, a timeout) may pass later.
func Permanent(err error) bool {
	if TooLarge(err) || UnknownTopic(err) {
		return true
	}
	switch code(err) {
	case kafka.ErrInvalidRecord, kafka.ErrPolicyViolation, kafka.ErrTopicException, kafka.ErrInvalidMsg:
		return true
	}
	return false
}
