package dispatcher

import (
	"fmt"
	"strings"
	"time"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// stall records that a message failed permanently with no DLQ configured:
// its lane stays parked (parkStalled) until the partition stops, and the
// message is redelivered to the partition's next owner.
func (d *Dispatcher) stall(p *partition, it *item) {
	telemetry.MessageDeadLettered(it.span(), it.fail.Reason)
	d.outcome(telemetry.OutcomeStalled).Inc()
	d.log.Error("message cannot be delivered and dlq.topic is empty: its key stalls until restart",
		"topic", p.topic, "partition", p.id, "offset", it.msg.Offset, "key", string(it.msg.Key), "reason", it.fail.Reason)
}

// deadLetter writes l's head message it to the DLQ; l is parked (parkDLQ)
// until the DLQ acknowledges it. Then the message is done and l moves on; a
// failed write is retried (see dlqAcked), the key waiting meanwhile.
func (d *Dispatcher) deadLetter(p *partition, l *lane, it *item) {
	if l.dlqBackoff == 0 && !l.dlqCut {
		telemetry.MessageDeadLettered(it.span(), it.fail.Reason)
	}
	keep := -1
	if l.dlqCut {
		keep = l.dlqKeep
	}
	d.dlqWriting.Add(1)
	d.dlq.Produce(dlq.Build(d.dlq.Topic(), &it.msg, it.fail, time.Now(), keep), func(err error) {
		d.dlqAcked(p, l, it, err)
		d.dlqWriting.Add(-1)
	})
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
	if l.state != parkDLQ || len(l.q) == 0 || l.q[0] != it {
		p.mu.Unlock()
		return
	}
	// Only the goroutine holding l touches its dlq* fields: here, the
	// acknowledgement of the write it started.
	if err != nil && producer.TooLarge(err) {
		size := len(it.msg.Value)
		if l.dlqCut {
			size = l.dlqKeep
		}
		if size > 0 {
			l.dlqCut, l.dlqKeep = true, size/2
			p.handOffLocked(func() {
				d.log.Warn("the DLQ refused a record for its size: writing it with its value cut",
					"topic", p.topic, "partition", p.id, "offset", it.msg.Offset, "dlq", d.dlq.Topic(),
					"value_bytes", len(it.msg.Value), "keep_bytes", l.dlqKeep, "error", err)
				d.deadLetter(p, l, it)
			})
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
			"offset", it.msg.Offset, "key", string(it.msg.Key), "dlq", d.dlq.Topic(), "error", err, "retry_in", wait.String())
		return
	}
	if cause, ok := d.quarantineCause(p, it); ok {
		// Its key is quarantined before the message counts as done: were
		// the process to die in between, the message comes again and
		// quarantines the key then.
		q := d.quarantine
		p.handing++
		p.mu.Unlock()
		go func() {
			err := q.Quarantine(p.ctx, p.topic, it.msg.Key, cause)
			p.mu.Lock()
			p.handing--
			p.checkQuietLocked()
			if err != nil || l.state != parkDLQ || len(l.q) == 0 || l.q[0] != it {
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

// quarantineCause reports whether dead-lettering it (acknowledged) must
// quarantine its key, and with which cause: a message that failed
// quarantines its key as the cause; one dead-lettered because its key was
// quarantined does so again, with the same cause, when the key was freed
// while it was being written (a replay on another instance held and
// released the key before this instance saw the hold, and may have missed
// this record: the key's next messages must not go ahead of it).
func (d *Dispatcher) quarantineCause(p *partition, it *item) (dlq.Cause, bool) {
	q := d.quarantine
	if q == nil || len(it.msg.Key) == 0 {
		return dlq.Cause{}, false
	}
	if it.fail.QuarantinedBy == nil {
		return dlq.Cause{Topic: p.topic, Partition: p.id, Offset: it.msg.Offset}, true
	}
	if st, _ := q.State(p.topic, it.msg.Key); st == dlq.KeyFree {
		return *it.fail.QuarantinedBy, true
	}
	return dlq.Cause{}, false
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
	if it.fail.QuarantinedBy != nil {
		d.metrics.QuarantinedMessages.Inc()
	}
	it.span().End()
	p.finish(&it.msg, telemetry.OutcomeDeadLettered)
	d.commitNow.Store(true)
	d.log.Info("message dead-lettered", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
		"dlq", d.dlq.Topic(), "reason", it.fail.Reason, "value_truncated", cut)
	p.moveOn(l)
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
// is ready: failing DLQ writes, and topics the routes write to that did not
// exist at start-up. Safe for concurrent use.
func (d *Dispatcher) Problems() []string {
	var ps []string
	if pr := d.dlqErr.Load(); pr != nil {
		ps = append(ps, fmt.Sprintf("dead-letter writes to %s failing (last at %s): %v; the keys concerned wait",
			d.cfg.DLQ.Topic, pr.since.UTC().Format(time.RFC3339), pr.err))
	}
	if m := d.missingTopics.Load(); m != nil {
		ps = append(ps, fmt.Sprintf("routes write to topics that did not exist at start-up: %s; their records are dead-lettered",
			strings.Join(*m, ", ")))
	}
	return ps
}
