package dispatcher

import (
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// senderIdle is how long a sender goroutine waits for work before it exits.
const senderIdle = 5 * time.Second

// A pool without senders and queued lanes for poolIdle is removed, with its
// metric series, by the next sweep; sweeps run when a pool is created, at
// most every poolSweepEvery. So the pools kept are those of the targets
// used lately, however many hosts the messages name over time.
const (
	poolIdle       = 5 * time.Minute
	poolSweepEvery = time.Minute
)

// senders is the sending machinery: one pool of sender goroutines per
// target host:port, each pool at most http.max_conns_per_host strong (no
// bound when it is 0). A key lane with a request to send waits in the pool
// of that request's target until a sender takes it; the sender makes one
// attempt and moves the lane on (to the same pool's tail for its next
// request, to another pool, to a backoff timer, to the DLQ writer, or back
// to idle). So the goroutines that send are bounded by the connections a
// target may have, each sender uses one connection at a time, a lane in
// backoff holds no goroutine, and a slow or failing target holds only its
// own senders (DESIGN guarantee 3).
//
// The dispatcher owns the senders: Run creates them and close, after every
// partition stopped, ends the idle ones and waits for all of them.
type senders struct {
	max      int  // senders per pool
	adaptive bool // the limit adapts below max (senderlimit.go)
	metrics  *telemetry.Metrics
	now      func() time.Time // the clock of pool idleness (tests replace it)

	mu        sync.Mutex // protects writes of pools, closed and lastSweep
	closed    bool
	lastSweep time.Time
	// pools is copied on write, so that the per-attempt lookup takes no lock.
	pools atomic.Pointer[map[string]*pool]
	wg    sync.WaitGroup // one per sender goroutine
}

func newSenders(maxConnsPerHost int, adaptive bool, m *telemetry.Metrics) *senders {
	e := &senders{max: maxConnsPerHost, adaptive: adaptive, metrics: m, now: time.Now}
	if e.max <= 0 {
		e.max = math.MaxInt
	}
	return e
}

// pool returns the pool of target, creating it on first use.
func (e *senders) pool(target string) *pool {
	if m := e.pools.Load(); m != nil {
		if pl := (*m)[target]; pl != nil {
			return pl
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	var old map[string]*pool
	if m := e.pools.Load(); m != nil {
		old = *m
	}
	if pl := old[target]; pl != nil {
		return pl
	}
	now := e.now()
	sweep := now.Sub(e.lastSweep) >= poolSweepEvery
	m := make(map[string]*pool, len(old)+1)
	for k, v := range old {
		if !sweep || !v.removeIfIdle(now) {
			m[k] = v
		}
	}
	if sweep {
		e.lastSweep = now
	}
	pl := &pool{e: e, target: target, closed: e.closed, idleSince: now, limit: newSenderLimit(e.max, e.adaptive, time.Now()),
		sendersGauge: e.metrics.Senders.WithLabelValues(target), queuedGauge: e.metrics.QueuedLanes.WithLabelValues(target),
		limitGauge: e.metrics.SenderLimit.WithLabelValues(target)}
	pl.limitGauge.Set(float64(pl.limit.limit))
	m[target] = pl
	e.pools.Store(&m)
	return pl
}

// removeIfIdle marks pl removed and deletes its metric series when it has
// had no sender and no queued lane for poolIdle, and reports whether it did.
// The caller holds e.mu and drops pl from the map.
func (pl *pool) removeIfIdle(now time.Time) bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.n > 0 || pl.q.len() > 0 || pl.closed || now.Sub(pl.idleSince) < poolIdle {
		return false
	}
	pl.removed = true
	pl.e.metrics.Senders.DeleteLabelValues(pl.target)
	pl.e.metrics.QueuedLanes.DeleteLabelValues(pl.target)
	pl.e.metrics.SenderLimit.DeleteLabelValues(pl.target)
	return true
}

// close ends every sender once it has nothing left to do and waits for them.
func (e *senders) close() {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	if m := e.pools.Load(); m != nil {
		for _, pl := range *m {
			pl.close()
		}
	}
	e.wg.Wait()
}

// pool is the senders of one target and the lanes waiting for them.
type pool struct {
	e      *senders
	target string

	sendersGauge prometheus.Gauge // orderly_http_senders
	queuedGauge  prometheus.Gauge // orderly_http_queued_lanes
	limitGauge   prometheus.Gauge // orderly_http_sender_limit

	mu     sync.Mutex   // protects the fields below
	limit  *senderLimit // how many senders may run
	q      laneRing     // lanes waiting for a sender, in arrival order
	idle   []*sender    // senders waiting for a lane
	n      int          // sender goroutines alive
	peak   int          // the most senders alive at once (tests)
	closed bool
	// idleSince is when n last fell to 0 (or the pool was created);
	// removed is set once a sweep dropped the pool: a lane pushed to it
	// goes to the target's current pool instead.
	idleSince time.Time
	removed   bool
}

// sender is one sender goroutine's mailbox while it is idle.
type sender struct {
	wake chan *lane // a lane handed to this idle sender; nil: exit
}

// push hands l to an idle sender, starts a sender if the pool may grow, or
// queues l.
func (pl *pool) push(l *lane) {
	pl.mu.Lock()
	if pl.removed {
		pl.mu.Unlock()
		pl.e.pool(pl.target).push(l)
		return
	}
	if n := len(pl.idle); n > 0 {
		s := pl.idle[n-1]
		pl.idle[n-1] = nil
		pl.idle = pl.idle[:n-1]
		pl.mu.Unlock()
		s.wake <- l // buffered: never blocks
		return
	}
	if pl.n < pl.limit.limit && !pl.closed {
		pl.startLocked()
		pl.mu.Unlock()
		go pl.run(l)
		return
	}
	pl.q.push(l)
	pl.queuedGauge.Set(float64(pl.q.len()))
	pl.mu.Unlock()
}

// startLocked counts in a sender goroutine the caller starts; the caller
// holds pl.mu.
func (pl *pool) startLocked() {
	pl.n++
	pl.peak = max(pl.peak, pl.n)
	pl.e.wg.Add(1)
	pl.sendersGauge.Inc()
}

// run is a sender goroutine: it serves lanes until it has been idle for
// senderIdle or the pool closes.
func (pl *pool) run(l *lane) {
	defer pl.e.wg.Done()
	defer pl.sendersGauge.Dec()
	s := &sender{wake: make(chan *lane, 1)}
	idle := time.NewTimer(senderIdle)
	defer idle.Stop()
	// One context for this sender's attempts (httpclient.Slot), from the
	// dispatcher's Sender (every lane names the same one).
	var sl *httpclient.Slot
	if ss, ok := l.p.d.sender.(slotSender); ok {
		sl = ss.NewSlot()
		defer sl.Close()
	}
	for {
		for l != nil {
			var exit bool
			if l, exit = pl.serve(l, sl); exit {
				return
			}
		}
		if l = pl.wait(s, idle); l == nil {
			return
		}
	}
}

// serve makes one attempt for l, moves l on, and returns the lane this
// sender serves next: the head of the pool's queue, which is l again when l
// has more to send here and nobody else waits, or nil when none waits. It
// reports exit, having counted the sender out, when the pool runs more
// senders than its limit.
func (pl *pool) serve(l *lane, sl *httpclient.Slot) (h *lane, exit bool) {
	next, latency := l.p.attempt(l, pl, sl)
	var start []*lane // senders to start: the limit grew
	pl.mu.Lock()
	if latency > 0 && pl.limit.sample(time.Now(), latency, pl.q.len() > 0) {
		pl.limitGauge.Set(float64(pl.limit.limit))
		for !pl.closed && pl.n < pl.limit.limit && pl.q.len() > 0 {
			pl.startLocked()
			start = append(start, pl.q.pop())
		}
	}
	if exit = pl.n > pl.limit.limit; exit {
		// l goes through push below: an idle sender may be waiting, and a
		// lane left in the queue would wait for a busy one.
		pl.exitLocked()
	} else {
		if next == pl {
			pl.q.push(l) // to the tail: the keys waiting here take turns
		}
		h = pl.q.pop()
	}
	pl.queuedGauge.Set(float64(pl.q.len()))
	pl.mu.Unlock()
	for _, s := range start {
		go pl.run(s)
	}
	if next != nil && (next != pl || exit) {
		next.push(l)
	}
	return h, exit
}

// wait parks the sender until a lane is handed to it (returned), or returns
// nil when the sender should exit: idle too long, or the pool closed.
func (pl *pool) wait(s *sender, idle *time.Timer) *lane {
	pl.mu.Lock()
	if l := pl.q.pop(); l != nil {
		pl.queuedGauge.Set(float64(pl.q.len()))
		pl.mu.Unlock()
		return l
	}
	if pl.closed {
		pl.exitLocked()
		pl.mu.Unlock()
		return nil
	}
	pl.idle = append(pl.idle, s)
	pl.mu.Unlock()
	idle.Reset(senderIdle)
	select {
	case l := <-s.wake:
		idle.Stop()
		return l
	case <-idle.C:
	}
	pl.mu.Lock()
	if i := slices.Index(pl.idle, s); i >= 0 {
		pl.idle = slices.Delete(pl.idle, i, i+1)
		pl.exitLocked()
		pl.mu.Unlock()
		return nil
	}
	pl.mu.Unlock()
	// A push took this sender off the idle list as the timer fired: the
	// lane (or nil, on close) is on its way.
	return <-s.wake
}

// close tells idle senders to exit and the others to exit once idle.
func (pl *pool) close() {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	pl.closed = true
	for _, s := range pl.idle {
		pl.exitLocked()
		s.wake <- nil
	}
	pl.idle = nil
}

// exitLocked counts a sender out; the caller holds pl.mu.
func (pl *pool) exitLocked() {
	pl.n--
	if pl.n == 0 {
		pl.idleSince = pl.e.now()
	}
}

// laneRing is a FIFO of lanes that reuses its buffer.
type laneRing struct {
	buf  []*lane
	head int
	n    int
}

func (r *laneRing) push(l *lane) {
	if r.n == len(r.buf) {
		nb := make([]*lane, max(2*len(r.buf), 16))
		for i := range r.n {
			nb[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = nb, 0
	}
	r.buf[(r.head+r.n)%len(r.buf)] = l
	r.n++
}

// pop returns the oldest lane, or nil when empty.
func (r *laneRing) pop() *lane {
	if r.n == 0 {
		return nil
	}
	l := r.buf[r.head]
	r.buf[r.head] = nil
	r.head = (r.head + 1) % len(r.buf)
	r.n--
	return l
}

func (r *laneRing) len() int { return r.n }
