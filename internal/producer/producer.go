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
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/orderly-dispatch/orderly/telemetry"
)

// Producer writes records and reports each one's delivery. A fatal error of
// its librdkafka producer (an idempotent producer's broken sequence, a
// fenced producer id), after which that producer writes nothing more, makes
// it start a new one in its place: the records it held are reported failed
// (their callers write them again), and the next ones go to the new one.
type Producer struct {
	cm       kafka.ConfigMap // of every librdkafka producer started
	log      *slog.Logger
	msg      string             // the log message of client errors
	restarts prometheus.Counter // orderly_producer_restarts_total{producer}, nil without metrics
	acks     chan kafka.Event   // delivery reports of Produce, from every producer started

	// mu protects p and closed, and is held for reading while p is used:
	// a producer replaced is closed only once nobody uses it.
	mu      sync.RWMutex
	p       *kafka.Producer
	closed  bool
	stop    chan struct{}  // closed by Close: a restart waiting gives up
	retired sync.WaitGroup // producers replaced after a fatal error, until closed
	wg      sync.WaitGroup // the event and acknowledgement pumps
}

// restartBackoff spaces the attempts to start a new producer after a fatal
// error when starting one fails; flushMs is how long a producer being
// closed (Close, or one replaced, for its purged records' reports) is
// served its outstanding reports at a time.
const (
	restartBackoff = time.Second
	flushMs        = 5000
)

// New returns a Producer to brokers named clientID in the brokers' logs.
// The connection and security settings among props (kafka.properties, see
// CopyClientProperties) apply; extra sets or overrides librdkafka properties.
// librdkafka's logs go to logs, client errors to log; its restarts after a
// fatal error are counted in m (nil: not counted).
func New(brokers, clientID string, props map[string]string, extra kafka.ConfigMap, log *slog.Logger, logs chan kafka.LogEvent, m *telemetry.Metrics) (*Producer, error) {
	cm := kafka.ConfigMap{
		"bootstrap.servers":      brokers,
		"client.id":              clientID,
		"enable.idempotence":     true,
		"acks":                   "all",
		"linger.ms":              5,
		"enable.metrics.push":    false,
		"go.logs.channel.enable": true,
		"go.logs.channel":        logs,
		// confluent-kafka-go's defaults buffer a million events and a
		// million records on channels allocated up front (24 MB of heap
		// per producer, scanned by every GC). Delivery reports go to
		// Produce's own channel and ProduceChannel is not used: Events()
		// carries only client errors (and statistics, if configured).
		"go.events.channel.size":  1024,
		"go.produce.channel.size": 1,
	}
	for k, v := range extra {
		cm[k] = v
	}
	CopyClientProperties(cm, props)
	p, err := kafka.NewProducer(&cm)
	if err != nil {
		return nil, err
	}
	// "dlq producer error", "records producer error": what the producer is
	// for, as operators search the logs for it.
	name := strings.TrimPrefix(clientID, "orderly-")
	pr := &Producer{cm: cm, log: log, msg: name + " producer error",
		p: p, acks: make(chan kafka.Event, 1024), stop: make(chan struct{})}
	if m != nil {
		pr.restarts = m.ProducerRestarts.WithLabelValues(name)
	}
	pr.wg.Go(func() { pr.events(p) })
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

// events logs p's client errors until p is closed, and replaces p after a
// fatal one.
func (pr *Producer) events(p *kafka.Producer) {
	for ev := range p.Events() {
		e, ok := ev.(kafka.Error)
		if !ok {
			continue
		}
		if !e.IsFatal() {
			pr.log.Warn(pr.msg, "error", e)
			continue
		}
		pr.log.Error(pr.msg+": fatal, starting a new producer; the records it held are written again", "error", e)
		pr.replace(p)
	}
}

// replace starts a producer in place of old, which had a fatal error, and
// retires old: its records are purged (reported failed) and it is closed.
// Starting one that fails is tried again every restartBackoff until one
// starts or pr is closed.
func (pr *Producer) replace(old *kafka.Producer) {
	for {
		pr.mu.Lock()
		if pr.closed || pr.p != old {
			pr.mu.Unlock()
			return
		}
		p, err := kafka.NewProducer(&pr.cm)
		if err == nil {
			pr.p = p
			if pr.restarts != nil {
				pr.restarts.Inc()
			}
			pr.wg.Go(func() { pr.events(p) })
			pr.retired.Go(func() {
				// Not on this goroutine: Close waits for old's events to
				// be read, which this goroutine does. The purged records'
				// reports come out only as old is polled, so Flush serves
				// them (to pr.acks) before Close, which would drop them.
				_ = old.Purge(kafka.PurgeQueue | kafka.PurgeInFlight)
				for old.Flush(flushMs) > 0 {
					select {
					case <-pr.stop:
						pr.log.Error(pr.msg+": closing with records of the replaced producer unreported", "records", old.Len())
						old.Close()
						return
					default:
					}
					pr.log.Warn(pr.msg+": the replaced producer still holds records after a purge", "records", old.Len())
				}
				old.Close()
			})
			pr.mu.Unlock()
			return
		}
		pr.mu.Unlock()
		pr.log.Error(pr.msg+": unable to start a new producer after a fatal error, retrying", "error", err, "retry_in", restartBackoff.String())
		select {
		case <-pr.stop:
			return
		case <-time.After(restartBackoff):
		}
	}
}

// Produce writes rec without waiting; done is called once with the outcome,
// from the acknowledgement pump (or at once if librdkafka refuses the
// record). rec.Opaque is the Producer's.
func (pr *Producer) Produce(rec *kafka.Message, done func(error)) {
	rec.Opaque = done
	pr.mu.RLock()
	err := pr.p.Produce(rec, pr.acks)
	pr.mu.RUnlock()
	if err != nil {
		done(fmt.Errorf("unable to produce to %s: %w", topicOf(rec), err))
	}
}

// Write produces rec and waits for its delivery report or ctx; it returns
// where the record landed.
func (pr *Producer) Write(ctx context.Context, rec *kafka.Message) (kafka.TopicPartition, error) {
	ch := make(chan kafka.Event, 1)
	pr.mu.RLock()
	err := pr.p.Produce(rec, ch)
	pr.mu.RUnlock()
	if err != nil {
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
	pr.mu.RLock()
	md, err := pr.p.GetMetadata(nil, true, timeoutMs)
	pr.mu.RUnlock()
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
	pr.mu.Lock()
	pr.closed = true
	p := pr.p
	pr.mu.Unlock()
	close(pr.stop)
	pr.retired.Wait()
	p.Flush(flushMs)
	p.Close()
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

// CopyClientProperties copies into cm the kafka.properties that also apply
// to Orderly's other clients (producers, readers of its own topics):
// connection, security and client identity settings do; consumer tuning
// does not.
func CopyClientProperties(cm kafka.ConfigMap, props map[string]string) {
	for k, v := range props {
		for _, prefix := range []string{"security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "api.version", "metadata.", "reconnect.", "debug", "log_level", "topic.metadata", "allow.auto.create.topics"} {
			if strings.HasPrefix(k, prefix) {
				cm[k] = v
				break
			}
		}
	}
}
