// Package producer is the idempotent Kafka producer (acks=all) that
// dead letters and the records of topic requests are written with: each
// record's delivery is reported to a callback, so that no goroutine waits
// for it. records.go builds the records of topic requests.
package producer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
)

// Producer writes records and reports each one's delivery.
type Producer struct {
	p    *kafka.Producer
	acks chan kafka.Event // delivery reports of Produce
	wg   sync.WaitGroup   // the event and acknowledgement pumps
}

// New returns a Producer to brokers named clientID in the brokers' logs.
// The connection and security settings among props (kafka.properties, see
// ClientProperty) apply; extra sets or overrides librdkafka properties.
// librdkafka's logs go to logs, client errors to log.
func New(brokers, clientID string, props map[string]string, extra kafka.ConfigMap, log *slog.Logger, logs chan kafka.LogEvent) (*Producer, error) {
	cm := kafka.ConfigMap{
		"bootstrap.servers":      brokers,
		"client.id":              clientID,
		"enable.idempotence":     true,
		"acks":                   "all",
		"linger.ms":              5,
		"enable.metrics.push":    false,
		"go.logs.channel.enable": true,
		"go.logs.channel":        logs,
	}
	for k, v := range extra {
		cm[k] = v
	}
	for k, v := range props {
		if ClientProperty(k) {
			cm[k] = v
		}
	}
	p, err := kafka.NewProducer(&cm)
	if err != nil {
		return nil, err
	}
	pr := &Producer{p: p, acks: make(chan kafka.Event, 1024)}
	// "dlq producer error", "records producer error": what the producer is
	// for, as operators search the logs for it.
	msg := strings.TrimPrefix(clientID, "orderly-") + " producer error"
	pr.wg.Go(func() {
		for ev := range p.Events() {
			if e, ok := ev.(kafka.Error); ok {
				log.Warn(msg, "error", e)
			}
		}
	})
	pr.wg.Go(func() {
		for ev := range pr.acks {
			m, ok := ev.(*kafka.Message)
			if !ok {
				continue
			}
			if done, ok := m.Opaque.(func(error)); ok {
				done(deliveryError(m))
			}
		}
	})
	return pr, nil
}

// Produce writes rec without waiting; done is called once with the outcome,
// from the acknowledgement pump (or at once if librdkafka refuses the
// record). rec.Opaque is the Producer's.
func (pr *Producer) Produce(rec *kafka.Message, done func(error)) {
	rec.Opaque = done
	if err := pr.p.Produce(rec, pr.acks); err != nil {
		done(fmt.Errorf("unable to produce to %s: %w", topicOf(rec), err))
	}
}

// Write produces rec and waits for its delivery report or ctx; it returns
// where the record landed.
func (pr *Producer) Write(ctx context.Context, rec *kafka.Message) (kafka.TopicPartition, error) {
	ch := make(chan kafka.Event, 1)
	if err := pr.p.Produce(rec, ch); err != nil {
		return kafka.TopicPartition{}, fmt.Errorf("unable to produce to %s: %w", topicOf(rec), err)
	}
	select {
	case <-ctx.Done():
		return kafka.TopicPartition{}, ctx.Err()
	case ev := <-ch:
		m, ok := ev.(*kafka.Message)
		if !ok {
			return kafka.TopicPartition{}, fmt.Errorf("unexpected delivery event %v", ev)
		}
		return m.TopicPartition, deliveryError(m)
	}
}

// Missing returns those of topics the brokers do not know, asking them for
// at most timeoutMs.
func (pr *Producer) Missing(topics []string, timeoutMs int) ([]string, error) {
	md, err := pr.p.GetMetadata(nil, true, timeoutMs)
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, t := range topics {
		if tm, ok := md.Topics[t]; !ok || tm.Error.Code() == kafka.ErrUnknownTopicOrPart || tm.Error.Code() == kafka.ErrUnknownTopic {
			missing = append(missing, t)
		}
	}
	return missing, nil
}

// Close flushes outstanding records (for up to 5 s) and stops the producer
// and its pumps. Nothing may produce meanwhile.
func (pr *Producer) Close() {
	pr.p.Flush(5000)
	pr.p.Close()
	close(pr.acks)
	pr.wg.Wait()
}

func deliveryError(m *kafka.Message) error {
	if m.TopicPartition.Error != nil {
		return fmt.Errorf("unable to write to %s: %w", topicOf(m), m.TopicPartition.Error)
	}
	return nil
}

func topicOf(m *kafka.Message) string {
	if m.TopicPartition.Topic == nil {
		return ""
	}
	return *m.TopicPartition.Topic
}

// TooLarge reports whether a write failed for the record's size.
func TooLarge(err error) bool {
	return code(err) == kafka.ErrMsgSizeTooLarge || code(err) == kafka.ErrRecordListTooLarge
}

// UnknownTopic reports whether a write failed because its topic does not
// exist.
func UnknownTopic(err error) bool {
	return code(err) == kafka.ErrUnknownTopicOrPart || code(err) == kafka.ErrUnknownTopic
}

func code(err error) kafka.ErrorCode {
	var ke kafka.Error
	if !errors.As(err, &ke) {
		return kafka.ErrNoError
	}
	return ke.Code()
}

// ClientProperty reports whether a kafka.properties key also applies to
// Orderly's other clients (producers, readers of its own topics):
// connection, security and client identity settings do; consumer tuning
// does not.
func ClientProperty(k string) bool {
	for _, prefix := range []string{"security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "api.version", "metadata.", "reconnect.", "debug", "log_level", "topic.metadata", "allow.auto.create.topics"} {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}
