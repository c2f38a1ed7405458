package dispatcher

import (
	"log/slog"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// newRecords returns the producer of the routes' topic requests, nil when
// no route has one. Topics the brokers do not know are reported at error
// level: their records will be dead-lettered.
func (d *Dispatcher) newRecords(logs chan kafka.LogEvent) (*producer.Producer, error) {
	topics := d.router.RecordTopics()
	if len(topics) == 0 {
		return nil, nil
	}
	pr, err := producer.NewRecords(d.brokers, topics, d.cfg.Kafka.Properties, 5*time.Second, d.log, logs, d.metrics)
	if err != nil {
		return nil, err
	}
	if missing, err := pr.Missing(topics, 5000); err != nil {
		d.log.Warn("unable to check that the routes' topics exist", "topics", topics, "error", err)
	} else if len(missing) > 0 {
		d.log.Error("routes write to topics that do not exist: their records are dead-lettered until the topics are created",
			"topics", missing)
		d.missingTopics.Store(&missing)
	}
	return pr, nil
}

// produce writes rq, the request of l's head message it, as a record; l is
// parked (parkRecord) until the broker acknowledges it (recordAcked).
func (d *Dispatcher) produce(p *partition, l *lane, it *item, rq *filters.Request, index int) {
	ctx, span := d.tracing.StartPublish(it.context(p), rq.Topic)
	rec := producer.Record(ctx, d.tracing, rq, it.msg.IdempotencyKey(index))
	d.records.Produce(rec, func(err error) {
		telemetry.EndPublish(span, err)
		d.recordAcked(p, l, it, rq, err)
	})
}

// recordAcked handles the broker's answer for the record of l's head
// message it: a topic request's, or its reply_topic or error_topic record
// (l.reply, responses.go):
//   - acknowledged: l goes on to the next request (or past the reply);
//   - refused for its size, for a topic that does not exist or as invalid:
//     the message is dead-lettered (a refused error record is logged and
//     the dead letter still written);
//   - any other failure (broker unreachable, authorization, timeout) is an
//     outage: the record is written again after a backoff, the key waiting
//     meanwhile, and it never counts toward http.retry.max_attempts.
func (d *Dispatcher) recordAcked(p *partition, l *lane, it *item, rq *filters.Request, err error) {
	p.mu.Lock()
	if l.state != parkRecord || len(l.q) == 0 || l.q[0] != it {
		p.mu.Unlock()
		return
	}
	index, reply := l.next, rq == l.reply
	if !reply {
		l.recordTries++
	}
	switch {
	case err == nil:
		p.unparkedLocked(l)
		switch {
		case reply:
			l.reply = nil
			if it.fail == nil {
				l.replied = true
			} else {
				l.reported = true
			}
		default:
			if it.route.Captures() {
				l.responses = append(l.responses, filters.Response{})
			}
			l.next++
			l.recordTries = 0
		}
		l.recordBackoff = 0
		p.mu.Unlock()
		d.recordResult(rq.Topic, "produced").Inc()
		p.moveOn(l)
	case producer.Permanent(err):
		p.unparkedLocked(l)
		switch {
		case reply && it.fail != nil:
			l.reply, l.reported = nil, true // the dead letter still goes
		case reply:
			l.reply, l.replied = nil, true
			it.fail = &dlq.Failure{Reason: "the reply record was refused: " + err.Error(), Route: it.route.Name(),
				RequestIndex: len(l.plan.Requests), Attempts: 1}
		default:
			it.fail = &dlq.Failure{Reason: err.Error(), Route: it.route.Name(), RequestIndex: index, Attempts: l.recordTries}
		}
		p.mu.Unlock()
		d.recordResult(rq.Topic, "failed").Inc()
		d.log.Warn("record refused for good", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
			"route", it.route.Name(), "request", index, "to", rq.Topic, "error", err)
		p.moveOn(l)
	case p.dead:
		// The partition is stopping: the drain does not wait out a backoff,
		// the message's next owner writes the record.
		p.abandonLocked(l)
		p.mu.Unlock()
	default:
		l.recordBackoff = min(max(2*l.recordBackoff, d.cfg.HTTP.Retry.InitialBackoff.D()), d.cfg.HTTP.Retry.MaxBackoff.D())
		wait := l.recordBackoff
		p.backoffLocked(l, wait, parkBackoff)
		p.mu.Unlock()
		d.recordResult(rq.Topic, "retried").Inc()
		lvl := slog.LevelWarn
		if wait > d.cfg.HTTP.Retry.InitialBackoff.D() {
			lvl = slog.LevelError // not the first failure in a row
		}
		d.log.Log(p.ctx, lvl, "record write failed, retrying: the key waits", "topic", p.topic, "partition", p.id,
			"offset", it.msg.Offset, "key", string(it.msg.Key), "to", rq.Topic, "error", err, "retry_in", wait.String())
	}
}

// recordResult returns the orderly_records_total counter of topic and result.
func (d *Dispatcher) recordResult(topic, result string) prometheus.Counter {
	return d.metrics.Records.WithLabelValues(topic, result)
}
