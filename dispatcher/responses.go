package dispatcher

import (
	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/filters"
)

// Requests that read earlier answers, and reply records: a lane keeps the
// answers of its head message's requests (delivery.responses) when its
// route needs them (filters.Route.Captures), renders a request that reads
// them on its turn (renderPending), and writes the route's reply_topic
// record after the last request succeeded, or its error_topic record before
// the dead letter (replyLocked), through the records producer
// (records.go): the message is done only once that record is acknowledged.

// renderPending renders the request of l's head message it that reads
// earlier answers (the caller holds l, not p.mu). A template that cannot
// render it makes the message a bad message; a schema registry that did not
// answer parks l for a while, and renderPending reports true (l is its
// timer's now).
func (p *partition) renderPending(l *lane, it *item) (wait bool) {
	err := it.route.RenderRequest(&it.msg, l.next, l.responses, &l.plan.Requests[l.next])
	if err == nil {
		return false
	}
	if ue := registryDown(err); ue != nil {
		p.park(l, ue.RetryAfter)
		return true
	}
	p.mu.Lock()
	it.fail = &dlq.Failure{Reason: err.Error(), Route: it.route.Name(), RequestIndex: l.next}
	p.mu.Unlock()
	p.d.log.Warn("bad message", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
		"route", it.route.Name(), "error", err)
	return false
}

// replyLocked starts the write of the reply record of l's head message it
// (failed: its error_topic record) and reports true, with p.mu released
// and l parked until the acknowledgement (recordAcked); it reports false,
// p.mu still held, when the route has no such record.
func (p *partition) replyLocked(l *lane, it *item, failed bool) bool {
	if l.reply == nil {
		switch {
		case failed:
			var resp *filters.Response
			if i := it.fail.RequestIndex; i >= 0 && i < len(l.responses) {
				resp = &l.responses[i]
			}
			l.reply = it.route.ReplyError(&it.msg, resp, it.fail.Reason)
		default:
			var resp *filters.Response
			if n := len(l.responses); n > 0 {
				resp = &l.responses[n-1]
			}
			l.reply = it.route.Reply(&it.msg, resp)
		}
		if l.reply == nil {
			if failed {
				l.reported = true
			} else {
				l.replied = true
			}
			return false
		}
	}
	rq := l.reply
	p.parkLocked(l, parkRecord)
	p.handOffLocked(func() { p.d.produce(p, l, it, rq, len(l.plan.Requests)) })
	return true
}
