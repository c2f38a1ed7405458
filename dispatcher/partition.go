package dispatcher

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/trace"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/offsets"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// item is one message on its way through a key lane.
type item struct {
	msg  filters.Message
	plan filters.Plan
	// fail, if set, is why the message cannot be sent: it goes to the DLQ
	// (or stalls its key) when its turn in the lane comes.
	fail *failure
	// ctx carries the message's span (span); both nil for replayed items.
	ctx  context.Context
	span trace.Span
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

// lane delivers the messages of one key in order, one at a time.
type lane struct {
	key laneKey
	// q, idle and retired are protected by partition.mu.
	q       []*item
	idle    bool // waiting for work: may be retired by the worker at the lane cap
	retired bool // removed from the map while idle: exit at once
	wake    chan struct{}
}

func (l *lane) poke() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
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

	// ctx ends the partition's work: cancelled after the drain on revoke
	// or shutdown, so in-flight sends and DLQ writes give up.
	ctx    context.Context
	cancel context.CancelFunc
	// stopWorker tells the worker to stop taking messages.
	stopWorker chan struct{}
	workerDone chan struct{}
	lanesWG    sync.WaitGroup // one per lane goroutine

	mu       sync.Mutex // protects lanes, draining, waiting and every lane's q/idle/retired
	lanes    map[laneKey]*lane
	draining bool       // lanes exit as soon as their queue is empty
	waiting  bool       // the worker waits for a lane to become idle (lane cap)
	laneFree *sync.Cond // signalled when a lane goes idle or exits while waiting

	// Owned by the poll loop.
	paused    bool
	committed int64 // last committed offset, -1 if none yet

	labels         prometheus.Labels
	inFlightGauge  prometheus.Gauge
	pausedGauge    prometheus.Gauge
	committedGauge prometheus.Gauge
	lagGauge       prometheus.Gauge
}

func newPartition(d *Dispatcher, tp kafka.TopicPartition) *partition {
	ctx, cancel := context.WithCancel(d.ctx)
	labels := prometheus.Labels{"topic": *tp.Topic, "partition": strconv.Itoa(int(tp.Partition))}
	p := &partition{
		labels:         labels,
		d:              d,
		tp:             kafka.TopicPartition{Topic: tp.Topic, Partition: tp.Partition},
		topic:          *tp.Topic,
		id:             tp.Partition,
		tracker:        offsets.New(-1),
		in:             make(chan *kafka.Message, d.cfg.Dispatch.MaxInFlight+1),
		ctx:            ctx,
		cancel:         cancel,
		stopWorker:     make(chan struct{}),
		workerDone:     make(chan struct{}),
		lanes:          make(map[laneKey]*lane),
		committed:      -1,
		inFlightGauge:  d.metrics.InFlight.With(labels),
		pausedGauge:    d.metrics.Paused.With(labels),
		committedGauge: d.metrics.Committed.With(labels),
		lagGauge:       d.metrics.Lag.With(labels),
	}
	p.laneFree = sync.NewCond(&p.mu)
	go p.work()
	return p
}

// work is the partition's worker goroutine: it plans each message and hands
// it to the lane of its key, in arrival order.
func (p *partition) work() {
	defer close(p.workerDone)
	for {
		select {
		case <-p.stopWorker:
			return
		case m := <-p.in:
			if !p.dispatch(m) {
				return
			}
		}
	}
}

// dispatch plans one message and enqueues it on its lane. It returns false
// when the partition is stopping.
func (p *partition) dispatch(km *kafka.Message) bool {
	it := &item{msg: toMessage(km)}
	it.ctx, it.span = p.d.tracing.StartMessage(p.ctx, it.msg.Topic, it.msg.Partition, it.msg.Offset, it.msg.Key, it.msg.Headers)
	plan, err := p.d.router.Plan(&it.msg)
	switch {
	case err == nil:
		it.plan = plan
		telemetry.MessageRouted(it.span, plan.Route)
	case errors.Is(err, filters.ErrNoRoute):
		if p.d.cfg.Dispatch.Unmatched == config.UnmatchedSkip {
			telemetry.MessageOutcome(it.span, telemetry.OutcomeSkipped)
			it.span.End()
			p.finish(it.msg.Offset, telemetry.OutcomeSkipped)
			return true
		}
		it.fail = &failure{reason: "no route matched the message", requestIndex: -1}
	default:
		it.fail = &failure{reason: err.Error(), requestIndex: -1}
		if bad := badMessage(err); bad != nil {
			it.fail.route, it.fail.requestIndex = bad.Route, bad.Index
		}
		p.d.log.Warn("bad message", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
			"route", it.fail.route, "error", err)
	}
	if !p.enqueue(p.laneKeyOf(&it.msg), it) {
		it.span.End() // the partition stops: abandoned, redelivered later
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

// enqueue appends it to the lane of k, creating the lane if needed. At the
// lane cap it retires an idle lane or waits for one to become idle. It
// returns false when the partition stops meanwhile.
func (p *partition) enqueue(k laneKey, it *item) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if p.draining {
			return false
		}
		if l := p.lanes[k]; l != nil {
			l.q = append(l.q, it)
			l.idle = false
			l.poke()
			return true
		}
		if len(p.lanes) < p.d.cfg.Dispatch.MaxLanes {
			l := &lane{key: k, q: []*item{it}, wake: make(chan struct{}, 1)}
			p.lanes[k] = l
			p.lanesWG.Add(1)
			p.d.metrics.ActiveLanes.Inc()
			go p.runLane(l)
			return true
		}
		if p.retireIdleLocked() {
			continue
		}
		p.waiting = true
		p.laneFree.Wait()
		p.waiting = false
	}
}

// retireIdleLocked removes one idle lane from the map and tells it to exit.
func (p *partition) retireIdleLocked() bool {
	for k, l := range p.lanes {
		if l.idle && len(l.q) == 0 {
			delete(p.lanes, k)
			l.retired = true
			l.poke()
			return true
		}
	}
	return false
}

// runLane is a lane's goroutine: it delivers the lane's messages in order and
// exits when idle for dispatch.lane_idle, when retired, when the partition
// drains and its queue is empty, or when the partition's context ends.
func (p *partition) runLane(l *lane) {
	defer p.lanesWG.Done()
	defer p.d.metrics.ActiveLanes.Dec()
	idle := time.NewTimer(p.d.cfg.Dispatch.LaneIdle.D())
	defer idle.Stop()
	single := l.key.kind == laneSingle
	for {
		p.mu.Lock()
		if len(l.q) == 0 {
			if l.retired {
				p.mu.Unlock()
				return
			}
			if p.draining || single {
				p.removeLaneLocked(l)
				p.mu.Unlock()
				return
			}
			l.idle = true
			if p.waiting {
				p.laneFree.Signal()
			}
			p.mu.Unlock()
			idle.Reset(p.d.cfg.Dispatch.LaneIdle.D())
			select {
			case <-l.wake:
				continue
			case <-p.ctx.Done():
			case <-idle.C:
			}
			p.mu.Lock()
			if len(l.q) == 0 && !l.retired {
				p.removeLaneLocked(l)
				p.mu.Unlock()
				return
			}
			p.mu.Unlock()
			continue
		}
		it := l.q[0]
		l.q[0] = nil
		l.q = l.q[1:]
		p.mu.Unlock()
		if !p.d.deliver(p, it) {
			// The partition's context ended: abandon this message and the
			// rest of the lane; they are not committed, so whoever owns
			// the partition next receives them again.
			p.mu.Lock()
			p.removeLaneLocked(l)
			p.mu.Unlock()
			return
		}
	}
}

func (p *partition) removeLaneLocked(l *lane) {
	if p.lanes[l.key] == l {
		delete(p.lanes, l.key)
	}
	l.q = nil
	if p.waiting {
		p.laneFree.Signal()
	}
}

// finish marks offset done with the given outcome.
func (p *partition) finish(offset int64, outcome string) {
	if err := p.tracker.Done(offset); err != nil {
		p.d.log.Error("offset tracking", "topic", p.topic, "partition", p.id, "error", err)
	}
	p.d.outcome(outcome).Inc()
}

// stop ends the partition: the worker stops taking messages, the lanes finish
// what they hold within timeout, then everything left is abandoned. It
// returns once every goroutine of the partition has exited; whether the lanes
// drained in time is reported.
func (p *partition) stop(timeout time.Duration) (drained bool) {
	close(p.stopWorker)
	p.mu.Lock()
	p.draining = true // also releases a worker waiting at the lane cap
	for _, l := range p.lanes {
		l.poke()
	}
	p.laneFree.Broadcast()
	p.mu.Unlock()
	<-p.workerDone

	done := make(chan struct{})
	go func() { p.lanesWG.Wait(); close(done) }()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		drained = true
	case <-t.C:
	}
	p.cancel()
	<-done
	p.inFlightGauge.Set(0)
	return drained
}

// toMessage converts a librdkafka message into the filters' view of it.
func toMessage(km *kafka.Message) filters.Message {
	m := filters.Message{
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
	return m
}

// forgetMetrics drops the partition's series: another member reports them now.
func (p *partition) forgetMetrics() {
	m := p.d.metrics
	m.InFlight.Delete(p.labels)
	m.Paused.Delete(p.labels)
	m.Committed.Delete(p.labels)
	m.Lag.Delete(p.labels)
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
