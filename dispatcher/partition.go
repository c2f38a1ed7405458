package dispatcher

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/offsets"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// item is one message on its way through a key lane. Up to max_in_flight
// of them are held per partition, so it stays small: its route is chosen on
// arrival, but its requests are rendered only when its turn in the lane
// comes, into the lane, with the rest of what only the message being
// delivered needs.
type item struct {
	msg   filters.Message
	route *filters.Route // the route that took it; nil when fail is set on arrival
	// fail, if set, is why the message cannot be sent: it goes to the DLQ
	// (or stalls its key) when its turn in the lane comes.
	fail *dlq.Failure
	// trace is the message's span and the context carrying it; nil (no
	// span, the partition's context) when tracing is off and the message
	// brought no trace context.
	trace *msgTrace
}

type msgTrace struct {
	ctx  context.Context
	span trace.Span
}

// context returns the context the message's requests are sent with.
func (it *item) context(p *partition) context.Context {
	if it.trace != nil {
		return it.trace.ctx
	}
	return p.ctx
}

// span returns the message's span (a no-op one without tracing).
func (it *item) span() trace.Span {
	if it.trace != nil {
		return it.trace.span
	}
	return noop.Span{}
}

// laneKey names a lane. Keyed messages share the lane of their key; unkeyed
// ones share the partition's lane (dispatch.unkeyed = "partition") or get a
// lane of their own (dispatch.unkeyed = "parallel", keyed by offset).
type laneKey struct {
	kind   uint8 // laneKeyed, laneUnkeyed or laneSingle
	key    string
	offset int64
}

const (
	laneKeyed uint8 = iota
	laneUnkeyed
	laneSingle
)

// delivery is the state of a lane's head message while it is delivered,
// used by the goroutine holding the lane: its plan (rendered into reqs when
// rendered is set), next the index of its request being sent and call that
// request's attempts (zero when not started); dlqBackoff is the wait before
// its next DLQ write after a failed one, and dlqKeep, when dlqCut is set, how
// much of the value the next DLQ write keeps (the DLQ refused it for size);
// recordBackoff and recordTries are the same for the record of a topic
// request.
// A lane takes one from deliveries when it starts on a message (advance) and
// gives it back when the message finished (popLocked) or the lane goes idle:
// lanes waiting for a sender hold none. An abandoned lane keeps its own,
// since a goroutine may still hold it.
type delivery struct {
	plan       filters.Plan
	rendered   bool
	reqs       [2]filters.Request
	next       int
	call       httpclient.Call
	dlqBackoff time.Duration
	dlqCut     bool
	dlqKeep    int

	recordBackoff time.Duration
	recordTries   int

	// responses are the answers of the requests done, kept when the
	// route's templates or replies read them; reply is the reply_topic or
	// error_topic record being written, replied and reported whether it
	// was (responses.go).
	responses []filters.Response
	reply     *filters.Request
	replied   bool
	reported  bool
}

var deliveries = sync.Pool{New: func() any { return new(delivery) }}

// lane delivers the messages of one key in order, one at a time. A lane is
// not a goroutine: while it has work it is in exactly one place at a time —
// a sender pool's queue, a goroutine that moves it on (a sender, the
// partition worker, its retry timer, the DLQ writer's acknowledgement), or
// parked — which its state says (lanestate.go), and only the goroutine
// holding it touches its head message.
type lane struct {
	p   *partition
	key laneKey
	// The delivery of the head message (see delivery), set while the lane
	// is busy: an idle lane is small, so many keys cost little.
	*delivery
	// Protected by p.mu.
	q         []*item     // in order; q[0] is being delivered
	state     laneState   // moved only by moveLocked
	retry     *time.Timer // the backoff timer, reused
	idleSince time.Time   // when it last ran out of work
	// While idle and in its partition's map, the lane is on the
	// partition's list of idle lanes, oldest first (idleList).
	idlePrev, idleNext *lane
}

// renderedLocked reports whether l's head message has been rendered (a lane
// queued unrendered has no delivery yet).
func (l *lane) renderedLocked() bool { return l.delivery != nil && l.rendered }

// idleList is a partition's idle lanes in the order they went idle, so that
// the lane cap and the sweep retire the oldest without looking at the busy
// ones (with every held message on a lane of its own, a scan of the map per
// new key cost more than the message).
type idleList struct{ head, tail *lane }

// push appends l (not on the list).
func (il *idleList) push(l *lane) {
	l.idlePrev, l.idleNext = il.tail, nil
	if il.tail != nil {
		il.tail.idleNext = l
	} else {
		il.head = l
	}
	il.tail = l
}

// remove takes l off the list, if it is on it.
func (il *idleList) remove(l *lane) {
	if l.idlePrev == nil && il.head != l {
		return
	}
	if l.idlePrev != nil {
		l.idlePrev.idleNext = l.idleNext
	} else {
		il.head = l.idleNext
	}
	if l.idleNext != nil {
		l.idleNext.idlePrev = l.idlePrev
	} else {
		il.tail = l.idlePrev
	}
	l.idlePrev, l.idleNext = nil, nil
}

// partition is the state of one assigned partition: its completion tracker,
// its worker goroutine (planning messages and handing them to lanes) and its
// lanes. The poll loop owns the partition: it creates it on assignment,
// feeds it messages, and stops it on revoke or shutdown.
type partition struct {
	d     *Dispatcher
	tp    kafka.TopicPartition
	topic string
	id    int32

	tracker *offsets.Tracker
	in      chan *kafka.Message // poll loop -> worker; never holds more than max_in_flight
	held    atomic.Int64        // this partition's share of Dispatcher.held
	// finished counts the messages finished here; the committer skips a
	// partition where it did not change.
	finished atomic.Int64

	// ctx ends the partition's work: cancelled after the drain on revoke
	// or shutdown, so in-flight attempts and breaker waits give up.
	ctx    context.Context
	cancel context.CancelFunc
	// stopWorker tells the worker to stop taking messages.
	stopWorker chan struct{}
	workerDone chan struct{}
	// hurryCh, closed by hurry, cuts a drain short.
	hurryCh   chan struct{}
	hurryOnce sync.Once

	mu       sync.Mutex        // protects the fields below and every lane's fields
	keyed    map[string]*lane  // the lanes of keyed messages
	lanes    map[laneKey]*lane // the others (unkeyed, one per message with unkeyed = "parallel")
	idle     idleList          // the idle lanes of keyed and lanes, oldest first
	busy     int               // lanes with work
	stalled  int               // of those, lanes a drain does not wait for: parked on a failure with no DLQ, or on a failed DLQ write
	handing  int               // goroutines handing a lane's message to the DLQ writer right now
	idleCh   chan struct{}     // closed once quietLocked (set by waitIdle)
	draining bool              // the worker takes no more messages
	dead     bool              // stopped: lanes are abandoned wherever they are
	waiting  bool              // the worker waits for a lane to become idle (lane cap)
	laneFree *sync.Cond        // signalled when a lane goes idle while waiting
	// Hot keys (see hotkeys.go): offsets deferred since the last pass
	// started, in order; the keys they belong to; the current pass's
	// deferred offsets (passAt the next one expected) and its end.
	deferred     []int64
	deferKeys    map[string]struct{}
	deferUnkeyed bool
	pass         []int64
	passAt       int
	passEnd      int64
	passSeq      int64 // the current pass's number
	passKeys     int   // the keys the current pass serves
	passCapped   int   // of those, the keys at their cap again

	// holding counts the messages handed to the worker and not yet
	// finished, deferred or dropped: what max_in_flight bounds.
	holding atomic.Int64
	// rewind asks the poll loop for a pass (a key with deferred messages
	// has room again).
	rewind atomic.Bool
	// cutPass, when set, tells the poll loop the worker cut that pass short.
	cutPass atomic.Int64

	// Owned by the poll loop.
	paused     bool
	spanPaused bool  // paused because the span reached max_span
	committed  int64 // last committed offset, -1 if none yet
	next       int64 // the offset after the last message read: where a resume seeks (0: none read yet)
	rereadEnd  int64 // offsets below it are read again by a pass
	passes     int64 // passes started (the last one's number)
	// committedMeta is the progress record sent with the last commit;
	// budget bounds the next one (dispatch.commit_metadata_max_bytes,
	// halved each time a broker refuses one as too large).
	committedMeta string
	// committedFinished is finished as of the last successful commit.
	committedFinished int64
	// recordAt is when a commit last carried a changed progress record
	// without a new offset (spaced by recordEvery).
	recordAt time.Time
	budget   int
	revoking bool // revoked and draining: its messages are dropped
	lost     bool // lost while draining: nothing more is committed

	labels         prometheus.Labels
	inFlightGauge  prometheus.Gauge
	pausedGauge    prometheus.Gauge
	committedGauge prometheus.Gauge
	lagGauge       prometheus.Gauge
	spanGauge      prometheus.Gauge
	oldestGauge    prometheus.Gauge
}

// newPartition starts the worker of a newly assigned partition whose
// completion tracker starts where the group left off.
func newPartition(d *Dispatcher, tp kafka.TopicPartition, tracker *offsets.Tracker) *partition {
	ctx, cancel := context.WithCancel(d.ctx)
	labels := prometheus.Labels{"topic": *tp.Topic, "partition": strconv.Itoa(int(tp.Partition))}
	p := &partition{
		labels:         labels,
		d:              d,
		tp:             kafka.TopicPartition{Topic: tp.Topic, Partition: tp.Partition},
		topic:          *tp.Topic,
		id:             tp.Partition,
		tracker:        tracker,
		hurryCh:        make(chan struct{}),
		in:             make(chan *kafka.Message, d.cfg.Dispatch.MaxInFlight+2), // + a pass marker
		ctx:            ctx,
		cancel:         cancel,
		stopWorker:     make(chan struct{}),
		workerDone:     make(chan struct{}),
		keyed:          make(map[string]*lane),
		deferKeys:      make(map[string]struct{}),
		lanes:          make(map[laneKey]*lane),
		committed:      -1,
		budget:         d.cfg.Dispatch.CommitMetadataMaxBytes,
		inFlightGauge:  d.metrics.InFlight.With(labels),
		pausedGauge:    d.metrics.Paused.With(labels),
		committedGauge: d.metrics.Committed.With(labels),
		lagGauge:       d.metrics.Lag.With(labels),
		spanGauge:      d.metrics.Span.With(labels),
		oldestGauge:    d.metrics.OldestUnfinished.With(labels),
	}
	p.laneFree = sync.NewCond(&p.mu)
	go p.work()
	return p
}

// work is the partition's worker goroutine: it plans each message and hands
// it to the lane of its key, in arrival order, and retires lanes idle for
// dispatch.lane_idle (looking every second, or every lane_idle if shorter).
func (p *partition) work() {
	defer close(p.workerDone)
	sweep := time.NewTicker(min(p.d.cfg.Dispatch.LaneIdle.D(), time.Second))
	defer sweep.Stop()
	for {
		select {
		case <-p.stopWorker:
			return
		case m := <-p.in:
			if ps, ok := m.Opaque.(passStart); ok {
				p.startPass(ps.end, ps.seq)
				continue
			}
			if !p.dispatch(m) {
				return
			}
		case now := <-sweep.C:
			p.retireIdle(now)
		}
	}
}

// dispatch plans one message and enqueues it on its lane. It returns false
// when the partition is stopping.
func (p *partition) dispatch(km *kafka.Message) bool {
	if off := int64(km.TopicPartition.Offset); off < p.passEnd {
		if !p.reread(off) {
			// Read again by a pass but not deferred: held or finished already.
			p.unhold(heldSize(len(km.Key), len(km.Value), len(km.Headers)))
			return true
		}
	} else if p.passAt < len(p.pass) {
		p.reread(off) // the pass's members not met are gone from the log
	}
	it := &item{}
	toMessage(km, &it.msg)
	ctx, span := p.d.tracing.StartMessage(p.ctx, it.msg.Topic, it.msg.Partition, it.msg.Offset, it.msg.Key, it.msg.Headers)
	if ctx != p.ctx || span.SpanContext().IsValid() {
		it.trace = &msgTrace{ctx: ctx, span: span}
	}
	rt, err := p.d.router.Match(&it.msg)
	switch {
	case err == nil:
		it.route = rt
		telemetry.MessageRouted(span, rt.Name())
	case errors.Is(err, filters.ErrNoRoute):
		// A `when` that could not judge the message wraps ErrNoRoute: such a
		// message is bad, dead-lettered with the reason, never skipped.
		if err == filters.ErrNoRoute && p.d.cfg.Dispatch.Unmatched == config.UnmatchedSkip {
			telemetry.MessageOutcome(span, telemetry.OutcomeSkipped)
			span.End()
			p.finish(&it.msg, telemetry.OutcomeSkipped)
			return true
		}
		it.fail = &dlq.Failure{Reason: err.Error(), RequestIndex: -1}
	default:
		it.fail = &dlq.Failure{Reason: err.Error(), RequestIndex: -1}
		if bad := badMessage(err); bad != nil {
			it.fail.Route, it.fail.RequestIndex = bad.Route, bad.Index
		}
		p.d.log.Warn("bad message", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
			"route", it.fail.Route, "error", err)
	}
	if !p.enqueue(it) {
		span.End() // the partition stops: abandoned, redelivered later
		return false
	}
	return true
}

func (p *partition) laneKeyOf(m *filters.Message) laneKey {
	if len(m.Key) > 0 {
		return laneKey{kind: laneKeyed, key: string(m.Key)}
	}
	if p.d.cfg.Dispatch.Unkeyed == config.UnkeyedParallel {
		return laneKey{kind: laneSingle, offset: m.Offset}
	}
	return laneKey{kind: laneUnkeyed}
}

// laneOfLocked returns the lane of m's key, nil if there is none, without
// allocating (the key is not copied to look it up).
func (p *partition) laneOfLocked(m *filters.Message) *lane {
	if len(m.Key) > 0 {
		return p.keyed[string(m.Key)]
	}
	return p.lanes[p.laneKeyOf(m)]
}

func (p *partition) lanesLocked() int { return len(p.keyed) + len(p.lanes) }

// eachLaneLocked calls fn for every lane; fn may remove the lane.
func (p *partition) eachLaneLocked(fn func(*lane)) {
	for _, l := range p.keyed {
		fn(l)
	}
	for _, l := range p.lanes {
		fn(l)
	}
}

// enqueue appends it to the lane of its key, creating the lane if needed,
// and sets an idle lane going. At the lane cap it retires an idle lane or
// waits for one to become idle. It returns false when the partition stops
// meanwhile.
func (p *partition) enqueue(it *item) bool {
	p.mu.Lock()
	for {
		if p.draining {
			p.mu.Unlock()
			return false
		}
		l := p.laneOfLocked(&it.msg)
		if p.deferLocked(l, &it.msg) {
			p.mu.Unlock()
			p.deferredOut(it)
			return true
		}
		if l != nil {
			l.q = append(l.q, it)
			if l.state.busy() {
				p.mu.Unlock()
				return true
			}
			l.moveLocked(laneHeld)
			p.mu.Unlock()
			p.moveOn(l)
			return true
		}
		if p.lanesLocked() < p.d.cfg.Dispatch.MaxLanes {
			l := &lane{p: p, key: p.laneKeyOf(&it.msg)}
			if l.key.kind == laneKeyed {
				p.keyed[l.key.key] = l
			} else {
				p.lanes[l.key] = l
			}
			p.d.metrics.ActiveLanes.Inc()
			continue
		}
		if p.retireOneLocked() {
			continue
		}
		p.waiting = true
		p.laneFree.Wait()
		p.waiting = false
	}
}

// retireOneLocked removes one idle lane.
func (p *partition) retireOneLocked() bool {
	l := p.idle.head
	if l == nil {
		return false
	}
	p.removeLocked(l)
	return true
}

// retireIdle removes the lanes idle for dispatch.lane_idle.
func (p *partition) retireIdle(now time.Time) {
	limit := p.d.cfg.Dispatch.LaneIdle.D()
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := p.idle.head; l != nil && now.Sub(l.idleSince) >= limit; l = p.idle.head {
		p.removeLocked(l)
	}
}

// removeLocked forgets l, if it is still the lane of its key.
func (p *partition) removeLocked(l *lane) {
	p.idle.remove(l)
	if l.key.kind == laneKeyed {
		if p.keyed[l.key.key] != l {
			return
		}
		delete(p.keyed, l.key.key)
	} else {
		if p.lanes[l.key] != l {
			return
		}
		delete(p.lanes, l.key)
	}
	p.d.metrics.ActiveLanes.Dec()
}

// attempt makes the next attempt of l's head message (the caller, a sender
// of pool pl making its attempts in sl, holds l) and returns the pool l
// waits in next, or nil when l went elsewhere (idle, parked, dropped), and
// the target's latency when it answered (0 otherwise).
func (p *partition) attempt(l *lane, pl *pool, sl *httpclient.Slot) (*pool, time.Duration) {
	p.mu.Lock()
	if l.state == laneAbandoned {
		p.mu.Unlock()
		return nil, 0
	}
	if p.dead {
		p.abandonLocked(l)
		p.mu.Unlock()
		return nil, 0
	}
	l.moveLocked(laneHeld) // from the pool's queue
	if l.delivery == nil {
		// Queued before its head message was rendered (advance): render
		// it now, and send unless it goes elsewhere first.
		l.delivery = deliveries.Get().(*delivery)
		p.mu.Unlock()
		if next := p.advance(l); next != pl {
			return next, 0
		}
		return p.attempt(l, pl, sl)
	}
	it := l.q[0]
	p.mu.Unlock()

	var st httpclient.Step
	if sl != nil {
		st = sl.Attempt(it.context(p), &l.call)
	} else {
		st = p.d.sender.Attempt(it.context(p), &l.call)
	}
	latency := st.Latency
	switch st.Outcome {
	case httpclient.Delivered:
		if it.route.Captures() {
			l.responses = append(l.responses, l.call.Response())
		}
		l.next++
	case httpclient.Retry:
		p.park(l, st.After)
		return nil, 0
	case httpclient.Failed:
		if it.route.Captures() {
			l.responses = append(l.responses, l.call.Response()) // for the error_topic record
		}
		it.fail = p.d.failed(p, it, l.next, st.Err)
	case httpclient.Canceled:
		// The partition's context ended: abandon this message and the rest
		// of the lane; they are not committed, so whoever owns the
		// partition next receives them again.
		p.mu.Lock()
		p.abandonLocked(l)
		p.mu.Unlock()
		return nil, 0
	}
	return p.advance(l), latency
}

// advance moves l (held by the caller) on from its head message: past
// messages that are finished, to the DLQ writer or to stalling for a failed
// one, or to the pool of the target of the next request to send, which it
// returns (the caller pushes l there). It returns nil when l went idle,
// parked or was dropped.
func (p *partition) advance(l *lane) *pool {
	p.mu.Lock()
	for {
		if p.dead {
			if len(l.q) > 0 && l.q[0].fail == nil && l.renderedLocked() && l.next >= len(l.plan.Requests) &&
				(l.replied || !l.q[0].route.Replies()) {
				// Its last request just succeeded: record it before the
				// rest of the lane is dropped, or its next owner sends it
				// again. One whose reply record is still owed is dropped
				// with the rest: finished, its reply would be lost.
				it := l.q[0]
				l.popLocked()
				p.mu.Unlock()
				p.delivered(it)
				p.mu.Lock()
			}
			p.abandonLocked(l)
			p.mu.Unlock()
			return nil
		}
		if len(l.q) == 0 {
			p.idleLocked(l)
			p.mu.Unlock()
			return nil
		}
		it := l.q[0]
		if it.fail == nil && !l.renderedLocked() && p.d.quarantine != nil && len(it.msg.Key) > 0 {
			switch st, cause := p.d.quarantine.State(p.topic, it.msg.Key); st {
			case dlq.KeyQuarantined:
				it.fail = &dlq.Failure{Reason: "key quarantined: " + cause.String() + " was dead-lettered",
					Route: it.route.Name(), RequestIndex: -1, QuarantinedBy: &cause}
				continue
			case dlq.KeyReplaying:
				// Behind the replay of its dead letters.
				p.parkLocked(l, parkReplaying)
				p.mu.Unlock()
				p.d.quarantine.Wait(p.topic, it.msg.Key, dlq.KeyReplaying, func() { p.unpark(l, parkReplaying) })
				return nil
			}
		}
		if l.delivery == nil {
			if t := it.route.FirstTarget(); t != "" && it.fail == nil {
				// Queued unrendered: the sender that takes it renders it
				// (attempt), so that lanes waiting for a sender hold their
				// message and no rendered requests (with a lane per key and
				// thousands of keys waiting, those were most of the memory).
				l.moveLocked(laneQueued)
				p.mu.Unlock()
				return p.d.senders.pool(t)
			}
			l.delivery = deliveries.Get().(*delivery)
		}
		if it.fail == nil && !l.rendered {
			p.mu.Unlock()
			if !p.render(l, it) {
				return nil // parked until the schema registry answers
			}
			p.mu.Lock()
			continue
		}
		switch {
		case it.fail != nil && !l.reported && it.route != nil && p.replyLocked(l, it, true):
			return nil // the error_topic record first (responses.go)
		case it.fail != nil:
			if p.d.dlq == nil {
				p.parkLocked(l, parkStalled)
				p.mu.Unlock()
				p.d.stall(p, it)
				return nil
			}
			p.parkLocked(l, parkDLQ) // before the write: its acknowledgement may come at once
			// The lane is the DLQ writer's now.
			p.handOffLocked(func() { p.d.deadLetter(p, l, it) })
			return nil
		case l.next < len(l.plan.Requests) && l.plan.Requests[l.next].Pending:
			p.mu.Unlock()
			wait := p.renderPending(l, it) // responses.go
			p.mu.Lock()
			if wait {
				p.mu.Unlock()
				return nil
			}
			continue
		case l.next < len(l.plan.Requests):
			rq := &l.plan.Requests[l.next]
			if rq.Topic != "" {
				// A record: no sender, the lane waits for its acknowledgement.
				p.parkLocked(l, parkRecord)
				p.handOffLocked(func() { p.d.produce(p, l, it, rq, l.next) })
				return nil
			}
			if l.call.Request() != rq {
				l.call.Reset(rq, it.msg.IdempotencyKey(l.next))
				if it.route.Captures() {
					l.call.Capture()
				}
			}
			l.moveLocked(laneQueued) // the caller pushes it
			p.mu.Unlock()
			return p.d.senders.pool(rq.Target)
		}
		// Every request succeeded.
		if !l.replied && p.replyLocked(l, it, false) {
			return nil // the reply_topic record first (responses.go)
		}
		l.popLocked()
		p.mu.Unlock()
		p.delivered(it)
		p.mu.Lock()
	}
}

// delivered finishes a message whose requests all succeeded.
func (p *partition) delivered(it *item) {
	telemetry.MessageOutcome(it.span(), telemetry.OutcomeDelivered)
	it.span().End()
	p.finish(&it.msg, telemetry.OutcomeDelivered)
}

// render renders the requests of l's head message it (the caller holds l)
// into l; a message that cannot be rendered is a bad message (DLQ).
//
// A key or value the schema registry could not decode because it did not
// answer is no bad message: render parks l on its retry timer for the
// error's RetryAfter, to render it again then, and returns false (l is the
// timer's now). A route Match could not choose for that reason (Pending)
// is chosen here: a message that no route takes then is skipped or
// dead-lettered as dispatch.unmatched says (a skip sends nothing and counts
// as delivered).
func (p *partition) render(l *lane, it *item) bool {
	plan, err := it.route.Render(&it.msg, l.reqs[:0])
	if err != nil {
		if ue := registryDown(err); ue != nil {
			p.d.log.Debug("schema registry unavailable: the key waits", "topic", p.topic, "partition", p.id,
				"offset", it.msg.Offset, "retry_in", ue.RetryAfter, "error", err)
			p.park(l, ue.RetryAfter)
			return false
		}
		if err == filters.ErrNoRoute && p.d.cfg.Dispatch.Unmatched == config.UnmatchedSkip {
			l.plan, l.rendered = filters.Plan{}, true
			return true
		}
		it.fail = &dlq.Failure{Reason: err.Error(), Route: it.route.Name(), RequestIndex: -1}
		if bad := badMessage(err); bad != nil {
			it.fail.RequestIndex = bad.Index
		}
		p.d.log.Warn("bad message", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
			"route", it.fail.Route, "error", err)
		return true
	}
	if it.route.Pending() {
		if rt := p.d.router.Route(plan.Route); rt != nil {
			it.route = rt
		}
	}
	l.plan, l.rendered = plan, true
	return true
}

// registryDown returns the *filters.UnavailableError of err, nil if it has
// none (off the hot path, as badMessage).
func registryDown(err error) *filters.UnavailableError {
	var ue *filters.UnavailableError
	if errors.As(err, &ue) {
		return ue
	}
	return nil
}

// popLocked removes the finished head message and forgets its delivery
// (and, clearing the rendered requests, the value they alias). The delivery
// goes back to deliveries: the next message is queued unrendered, so that a
// key waiting for its turn holds no rendered requests (advance).
func (l *lane) popLocked() {
	l.q[0] = nil
	l.q = l.q[1:]
	if len(l.p.deferKeys) > 0 || l.p.deferUnkeyed {
		l.p.roomLocked(l)
	}
	l.plan, l.rendered, l.next, l.dlqBackoff, l.dlqCut, l.dlqKeep = filters.Plan{}, false, 0, 0, false, 0
	l.recordBackoff, l.recordTries = 0, 0
	clear(l.responses)
	l.responses, l.reply, l.replied, l.reported = l.responses[:0], nil, false, false
	l.call.Reset(nil, "")
	clear(l.reqs[:])
	deliveries.Put(l.delivery)
	l.delivery = nil
}

// moveOn advances l (held by the caller) and hands it to the pool of its
// next request, if it has one.
func (p *partition) moveOn(l *lane) {
	if pl := p.advance(l); pl != nil {
		pl.push(l)
	}
}

// park puts l (held by the caller) on its retry timer for d; when it fires,
// l moves on from where it was.
func (p *partition) park(l *lane, d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.dead {
		p.abandonLocked(l)
		return
	}
	p.backoffLocked(l, d, parkBackoff)
}

// backoffLocked parks l on its retry timer for d; kind is parkBackoff or
// parkDLQRetry.
func (p *partition) backoffLocked(l *lane, d time.Duration, kind laneState) {
	p.parkLocked(l, kind)
	if l.retry == nil {
		l.retry = time.AfterFunc(d, func() { p.unpark(l, parkBackoff, parkDLQRetry) })
	} else {
		l.retry.Reset(d)
	}
}

// parkLocked parks l, held by the caller (or parked by it a moment ago), as
// kind.
func (p *partition) parkLocked(l *lane, kind laneState) { l.moveLocked(kind) }

// unparkedLocked takes l back from where it was parked: the caller holds it.
func (p *partition) unparkedLocked(l *lane) { l.moveLocked(laneHeld) }

// unpark takes l back from its retry timer or its key's replay (one of
// kinds) and moves it on. A lane abandoned or parked elsewhere by now is
// left alone.
func (p *partition) unpark(l *lane, kinds ...laneState) {
	p.mu.Lock()
	if !slices.Contains(kinds, l.state) {
		p.mu.Unlock()
		return
	}
	p.unparkedLocked(l)
	p.mu.Unlock()
	p.moveOn(l)
}

// idleLocked records that l ran out of work.
func (p *partition) idleLocked(l *lane) {
	l.moveLocked(laneIdle)
	if l.delivery != nil {
		deliveries.Put(l.delivery)
		l.delivery = nil
	}
	if cap(l.q) > 1 {
		l.q = l.q[:0] // a key with traffic keeps its queue
	} else {
		l.q = nil
	}
	l.idleSince = time.Now()
	if l.key.kind == laneSingle {
		p.removeLocked(l)
	} else {
		p.idle.push(l)
	}
	if p.waiting {
		p.laneFree.Signal()
	}
}

// abandonLocked drops l and what it holds, wherever it is: the messages are
// not committed and will be redelivered to the partition's next owner. A
// goroutine that holds or later finds l sees it abandoned and lets it go.
func (p *partition) abandonLocked(l *lane) {
	if l.state == laneAbandoned {
		return
	}
	l.moveLocked(laneAbandoned)
	if l.retry != nil {
		l.retry.Stop()
	}
	for _, it := range l.q {
		it.span().End()
	}
	l.q = nil
	p.removeLocked(l)
}

// quietLocked reports whether the partition has nothing left that could
// finish: every lane with work is stalled (waiting for the stop) and no
// goroutine is handing a message to the DLQ writer.
func (p *partition) quietLocked() bool { return p.busy == p.stalled && p.handing == 0 }

// checkQuietLocked wakes waitIdle once the partition is quiet.
func (p *partition) checkQuietLocked() {
	if p.idleCh != nil && p.quietLocked() {
		close(p.idleCh)
		p.idleCh = nil
	}
}

// handOffLocked runs produce (a write to the DLQ or a route's topic) with
// p.mu released and returns with it released. The lane is the writer's
// now, but stop must not return (and the writer close) while this
// goroutine is producing: p.handing counts it.
func (p *partition) handOffLocked(produce func()) {
	p.handing++
	p.mu.Unlock()
	produce()
	p.mu.Lock()
	p.handing--
	p.checkQuietLocked()
	p.mu.Unlock()
}

// finish marks m done with the given outcome.
func (p *partition) finish(m *filters.Message, outcome string) {
	if err := p.tracker.Done(m.Offset); err != nil {
		p.d.log.Error("offset tracking", "topic", p.topic, "partition", p.id, "error", err)
	}
	p.finished.Add(1)
	p.unhold(heldSize(len(m.Key), len(m.Value), len(m.Headers)))
	p.d.outcome(outcome).Inc()
}

// unhold lets go of a message of n bytes (heldSize) the partition held.
func (p *partition) unhold(n int64) {
	p.held.Add(-n)
	p.d.held.Add(-n)
	p.holding.Add(-1)
}

// stop ends the partition: the worker stops taking messages, the lanes finish
// within timeout what they hold (whole) or only the attempt or DLQ write
// they are making (!whole: the rest is left to the partition's next owner,
// which skips what finished), then everything left is abandoned. A lane
// stalled on a failure with no DLQ, or waiting to retry a failed DLQ write,
// is not waited for. It returns once no goroutine sends or dead-letters for
// the partition any more (a retry timer or a late DLQ acknowledgement that
// fires afterwards finds its lane abandoned and lets it go); whether the
// lanes drained in time is reported.
func (p *partition) stop(timeout time.Duration, whole bool) (drained bool) {
	close(p.stopWorker)
	p.mu.Lock()
	p.draining = true // also releases a worker waiting at the lane cap
	p.laneFree.Broadcast()
	p.mu.Unlock()
	<-p.workerDone

	if !whole {
		// Lanes stop after what they are doing now (advance and attempt
		// see dead); the queued and parked ones have nothing under way.
		p.mu.Lock()
		p.dead = true
		p.eachLaneLocked(func(l *lane) {
			if l.state == laneQueued || l.state.parked() && l.state != parkDLQ && l.state != parkRecord {
				p.abandonLocked(l)
			}
		})
		p.mu.Unlock()
	}
	drained = p.waitIdle(timeout)
	p.mu.Lock()
	drained = drained && p.stalled == 0
	p.dead = true
	p.cancel() // in-flight attempts and breaker waits end now
	p.eachLaneLocked(func(l *lane) {
		if l.state == laneQueued || l.state.parked() {
			p.abandonLocked(l) // queued, parked or stalled: nobody to wait for
		}
	})
	p.mu.Unlock()
	p.waitIdle(-1) // the lanes held by senders, which see the cancelled context
	p.mu.Lock()
	p.eachLaneLocked(p.removeLocked)
	p.mu.Unlock()
	// What was abandoned (and what never left the channel) is let go.
	for len(p.in) > 0 {
		<-p.in
	}
	p.d.held.Add(-p.held.Swap(0))
	p.inFlightGauge.Set(0)
	return drained
}

// waitIdle waits until the partition is quiet (quietLocked: every lane that
// could finish did), for at most timeout (negative: without limit), and
// reports whether that happened.
func (p *partition) waitIdle(timeout time.Duration) bool {
	p.mu.Lock()
	if p.quietLocked() {
		p.mu.Unlock()
		return true
	}
	if timeout == 0 {
		p.mu.Unlock()
		return false
	}
	ch := make(chan struct{})
	p.idleCh = ch
	p.mu.Unlock()
	if timeout < 0 {
		<-ch
		return true
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	case <-p.hurryCh:
		return false
	}
}

// hurry ends a drain in progress (and any later one) at once: the
// partition was lost, another member may own it already.
func (p *partition) hurry() { p.hurryOnce.Do(func() { close(p.hurryCh) }) }

// toMessage fills m with the filters' view of a librdkafka message.
func toMessage(km *kafka.Message, m *filters.Message) {
	*m = filters.Message{
		Topic:     *km.TopicPartition.Topic,
		Partition: km.TopicPartition.Partition,
		Offset:    int64(km.TopicPartition.Offset),
		Key:       km.Key,
		Value:     km.Value,
		Timestamp: km.Timestamp,
	}
	if len(km.Headers) > 0 {
		m.Headers = make([]filters.Header, len(km.Headers))
		for i, h := range km.Headers {
			m.Headers[i] = filters.Header{Key: h.Key, Value: h.Value}
		}
	}
}

// forgetMetrics drops the partition's series: another member reports them now.
func (p *partition) forgetMetrics() {
	m := p.d.metrics
	m.InFlight.Delete(p.labels)
	m.Paused.Delete(p.labels)
	m.Committed.Delete(p.labels)
	m.Lag.Delete(p.labels)
	m.Span.Delete(p.labels)
	m.OldestUnfinished.Delete(p.labels)
}

// badMessage keeps errors.As's target off the hot path: declared in
// dispatch, it escaped to the heap for every message.
func badMessage(err error) *filters.BadMessageError {
	var bad *filters.BadMessageError
	if errors.As(err, &bad) {
		return bad
	}
	return nil
}
