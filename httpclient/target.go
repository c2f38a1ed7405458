package httpclient

import (
	"net"
	"net/http/httptrace"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sony/gobreaker/v2"

	"github.com/orderly-dispatch/orderly/telemetry"
)

// Breaker window: counts roll over 10 s in 1 s buckets, so the failure ratio
// is that of the last ~10 s and an old healthy period cannot mask a fresh
// outage (gobreaker's Interval 0 would never forget).
const (
	breakerInterval = 10 * time.Second
	breakerBucket   = time.Second
)

// A target with no attempt under way for targetIdle is forgotten, with its
// metric series, by the next sweep; sweeps run when a target is created, at
// most every sweepEvery. So the targets kept are those used lately, however
// many hosts the messages name over time.
const (
	targetIdle = 5 * time.Minute
	sweepEvery = time.Minute
)

// monoEpoch is the origin of the monotonic times a target records.
var monoEpoch = time.Now()

// mono is t in nanoseconds since monoEpoch, on the monotonic clock.
func mono(t time.Time) int64 { return int64(t.Sub(monoEpoch)) }

// target is the state kept per host:port: its breaker, its health record,
// its Retry-After pause and metric handles. A target lives while it is used
// (see targetIdle); a Call that finds its target forgotten moves to the
// host's new one.
//
// Lock order: the breaker's internal mutex, then target.mu or target.hmu
// (OnStateChange runs under the former and takes the latter); nothing calls
// into the breaker while holding target.mu or target.hmu. Sender.mu is only
// held to create and forget targets.
type target struct {
	host      string
	breaker   *gobreaker.TwoStepCircuitBreaker[struct{}] // nil when breakers are disabled
	duration  prometheus.Observer
	retries   prometheus.Counter
	uncounted prometheus.Counter
	errors    prometheus.Counter
	pauses    prometheus.Counter
	requests  *prometheus.CounterVec // orderly_http_requests_total
	// statuses caches orderly_http_requests_total by status code (100..599),
	// resolved on first sight of a code: no lock per attempt.
	statuses [600]atomic.Pointer[prometheus.Counter]

	mu      sync.Mutex    // protects changed
	changed chan struct{} // closed and replaced on every breaker state change

	// The health record: which calls failed in a retryable way since the
	// target's last success (see "Outages are not poison" in the package
	// doc). Only failures take hmu; a success takes it only when failures
	// are on record (dirty).
	hmu   sync.Mutex
	epoch uint64      // successes that ended a run of failures
	first uint64      // id of the first call that failed since the last success, 0: none
	many  bool        // another call failed since the last success too
	dirty atomic.Bool // first != 0
	// lastFailure describes the newest retryable failure, for the log line
	// of a breaker that opens; failingSince is when the current run of
	// failures began; waiting holds the calls that failed on the target and
	// have not ended, with when each was last seen (unix nanoseconds), for
	// the summary of a target that keeps failing (all protected by hmu).
	// failingLogged is when the target's failures were last logged (unix
	// nanoseconds).
	lastFailure   string
	failingSince  time.Time
	waiting       map[uint64]int64
	failingLogged atomic.Int64

	// Mirrors of the breaker, written by OnStateChange under its lock.
	state atomic.Int32 // the gobreaker.State
	// soloTrip is the id of the call whose failures alone last opened the
	// breaker (it was the only call that failed since the last success), 0
	// when several calls (or none known) had failed.
	soloTrip atomic.Uint64

	// pausedUntil is when the last Retry-After pause ends (mono), 0 if
	// there was none; pauseLogged is when a pause was last logged (unix
	// nanoseconds).
	pausedUntil atomic.Int64
	pauseLogged atomic.Int64

	// refs counts the attempts under way, -1 once the target is forgotten;
	// lastUsed is when one last began or ended (Sender.now, unix
	// nanoseconds).
	refs     atomic.Int64
	lastUsed atomic.Int64
}

// target returns the state of host, creating it on first use (and then
// sweeping idle targets, at most every sweepEvery).
func (s *Sender) target(host string) *target {
	s.mu.RLock()
	t := s.targets[host]
	s.mu.RUnlock()
	if t != nil {
		return t
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t = s.targets[host]; t != nil {
		return t
	}
	now := s.now()
	if now.Sub(s.lastSweep) >= sweepEvery {
		s.sweepLocked(now)
	}
	m := s.metrics
	t = &target{
		host:      host,
		duration:  m.HTTPDuration.WithLabelValues(host),
		retries:   m.HTTPRetries.WithLabelValues(host),
		uncounted: m.HTTPUncounted.WithLabelValues(host),
		errors:    m.HTTPRequests.WithLabelValues(host, "error"),
		pauses:    m.HTTPPauses.WithLabelValues(host),
		requests:  m.HTTPRequests,
		changed:   make(chan struct{}),
	}
	t.lastUsed.Store(now.UnixNano())
	if b := s.breaker; b.Enabled {
		t.breaker = gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
			Name:         host,
			MaxRequests:  uint32(max(b.HalfOpenRequests, 1)),
			Interval:     breakerInterval,
			BucketPeriod: breakerBucket,
			Timeout:      b.OpenTimeout.D(),
			ReadyToTrip: func(c gobreaker.Counts) bool {
				if b.ConsecutiveFailures > 0 && int64(c.ConsecutiveFailures) >= int64(b.ConsecutiveFailures) {
					return true
				}
				// Completed attempts only: in-flight and excluded ones say nothing yet.
				completed := int64(c.TotalSuccesses) + int64(c.TotalFailures)
				return b.FailureRatio > 0 && completed > 0 && completed >= int64(b.MinRequests) &&
					float64(c.TotalFailures)/float64(completed) >= b.FailureRatio
			},
			IsExcluded: func(err error) bool { return err == errExcluded },
			// Called with the breaker's own lock held: no call back into it.
			OnStateChange: func(_ string, from, to gobreaker.State) { s.breakerChanged(t, from, to) },
		})
		m.BreakerState.WithLabelValues(host).Set(telemetry.BreakerClosed)
	}
	s.targets[host] = t
	return t
}

// sweepLocked forgets the targets with no attempt under way and none for
// targetIdle, unless paused, and deletes their metric series. The caller
// holds s.mu for writing.
func (s *Sender) sweepLocked(now time.Time) {
	s.lastSweep = now
	idleSince := now.Add(-targetIdle).UnixNano()
	for host, t := range s.targets {
		if t.lastUsed.Load() > idleSince || t.paused(time.Now()) > 0 || !t.refs.CompareAndSwap(0, -1) {
			continue
		}
		// An attempt may have begun and ended since lastUsed was read.
		if t.lastUsed.Load() > idleSince {
			t.refs.Store(0)
			continue
		}
		delete(s.targets, host)
		m, l := s.metrics, prometheus.Labels{"host": host}
		m.HTTPRequests.DeletePartialMatch(l)
		m.HTTPDuration.DeleteLabelValues(host)
		m.HTTPRetries.DeleteLabelValues(host)
		m.HTTPUncounted.DeleteLabelValues(host)
		m.HTTPPauses.DeleteLabelValues(host)
		m.BreakerState.DeleteLabelValues(host)
		m.BreakerChanges.DeletePartialMatch(l)
	}
}

// acquire takes c's target for one attempt. A call whose target was
// forgotten meanwhile moves to the host's current one, where its run of
// failures starts afresh.
func (s *Sender) acquire(c *Call) *target {
	for {
		t := c.tg
		n := t.refs.Load()
		if n >= 0 {
			if t.refs.CompareAndSwap(n, n+1) {
				return t
			}
			continue
		}
		c.tg, c.failing = s.target(t.host), false
	}
}

// release ends an attempt that acquire began.
func (s *Sender) release(t *target) {
	t.lastUsed.Store(s.now().UnixNano())
	t.refs.Add(-1)
}

// paused returns how much of the target's Retry-After pause is left at
// now, 0 when it is not paused.
func (t *target) paused(now time.Time) time.Duration {
	until := t.pausedUntil.Load()
	if until == 0 {
		return 0
	}
	return max(time.Duration(until-mono(now)), 0)
}

// pausedNow is paused at the current time, which it reads only when the
// target is paused.
func (t *target) pausedNow() time.Duration {
	if t.pausedUntil.Load() == 0 {
		return 0
	}
	return t.paused(time.Now())
}

// pause makes the target's pause last at least until now+d, and reports
// whether this starts a pause (the target was not paused at now).
func (t *target) pause(now time.Time, d time.Duration) bool {
	n, until := mono(now), mono(now.Add(d))
	for {
		old := t.pausedUntil.Load()
		if old >= until {
			return false
		}
		if t.pausedUntil.CompareAndSwap(old, until) {
			return old <= n
		}
	}
}

func (s *Sender) breakerChanged(t *target, from, to gobreaker.State) {
	if to == gobreaker.StateOpen {
		t.hmu.Lock()
		last := t.lastFailure
		t.hmu.Unlock()
		s.log.Warn("circuit breaker opened: requests to this target wait until it answers again",
			"host", t.host, "from", from.String(), "last_failure", last, "open_for", s.breaker.OpenTimeout.D().String())
	} else {
		s.log.Warn("circuit breaker state changed", "host", t.host, "from", from.String(), "to", to.String())
	}
	s.metrics.BreakerChanges.WithLabelValues(t.host, to.String()).Inc()
	s.metrics.BreakerState.WithLabelValues(t.host).Set(breakerGauge(to))
	if to == gobreaker.StateOpen {
		// The failure that trips the breaker is already on the health
		// record (Attempt records it before reporting it to the breaker).
		t.hmu.Lock()
		solo := t.first
		if t.many {
			solo = 0
		}
		t.hmu.Unlock()
		t.soloTrip.Store(solo)
	}
	t.state.Store(int32(to))
	t.mu.Lock()
	close(t.changed)
	t.changed = make(chan struct{})
	t.mu.Unlock()
}

// succeeded records an answer the breaker counts as a success: it ends the
// target's run of failures.
func (t *target) succeeded() {
	if !t.dirty.Load() {
		return
	}
	t.hmu.Lock()
	if t.first != 0 {
		t.first, t.many = 0, false
		t.epoch++
		t.dirty.Store(false)
	}
	t.hmu.Unlock()
}

// failed records a retryable failure of c (whose id is set), described by
// why, and reports whether another call failed since the target's last
// success, whether another call succeeded since c's current run of
// failures began, and whether this failure starts a run for the target.
func (t *target) failed(c *Call, why string) (othersFailed, otherSucceeded, starts bool) {
	t.hmu.Lock()
	defer t.hmu.Unlock()
	t.lastFailure = why
	if t.waiting == nil {
		t.waiting = make(map[uint64]int64)
	}
	t.waiting[c.id] = time.Now().UnixNano()
	if !c.failing {
		c.failing, c.runEpoch = true, t.epoch
	}
	switch t.first {
	case 0:
		t.first, t.many = c.id, false
		t.failingSince = time.Now()
		t.dirty.Store(true)
		starts = true
	case c.id:
	default:
		t.many = true
	}
	return t.many, t.epoch != c.runEpoch, starts
}

// waitingFor is how long a call that failed stays among a target's waiting
// calls without being seen again: one abandoned without an ending attempt
// (its partition revoked while it waited out a backoff) leaves then.
const waitingFor = targetIdle

// seen notes that the call with id (0: none), which failed on the target,
// still waits for it.
func (t *target) seen(id uint64) {
	if id == 0 {
		return
	}
	t.hmu.Lock()
	if _, ok := t.waiting[id]; ok {
		t.waiting[id] = time.Now().UnixNano()
	}
	t.hmu.Unlock()
}

// ended removes the call with id (0: none) from the target's waiting
// calls: it was delivered, failed for good or canceled.
func (t *target) ended(id uint64) {
	if id == 0 {
		return
	}
	t.hmu.Lock()
	delete(t.waiting, id)
	t.hmu.Unlock()
}

// failingSummary returns what the summary of a failing target reports: the
// newest failure, when the run of failures began (zero if it ended) and
// how many calls that failed wait for the target, forgetting those not
// seen for waitingFor.
func (t *target) failingSummary(now time.Time) (last string, since time.Time, waiting int) {
	t.hmu.Lock()
	defer t.hmu.Unlock()
	old := now.Add(-waitingFor).UnixNano()
	for id, seen := range t.waiting {
		if seen < old {
			delete(t.waiting, id)
		}
	}
	if t.first != 0 {
		since = t.failingSince
	}
	return t.lastFailure, since, len(t.waiting)
}

// stateChanged returns a channel closed at the next breaker state change.
func (t *target) stateChanged() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.changed
}

func (t *target) statusCounter(status int) prometheus.Counter {
	if status < 0 || status >= len(t.statuses) {
		return t.requests.WithLabelValues(t.host, strconv.Itoa(status))
	}
	if c := t.statuses[status].Load(); c != nil {
		return *c
	}
	// Two first sights may race: both resolve the same series.
	c := t.requests.WithLabelValues(t.host, strconv.Itoa(status))
	t.statuses[status].Store(&c)
	return c
}

func breakerGauge(st gobreaker.State) float64 {
	switch st {
	case gobreaker.StateOpen:
		return telemetry.BreakerOpen
	case gobreaker.StateHalfOpen:
		return telemetry.BreakerHalfOpen
	}
	return telemetry.BreakerClosed
}

// agedConn is a dialed connection that knows its age (max_conn_age > 0).
// Once it has carried the request that asked the server to close it
// (last) and read its answer, a further write (the next request, should
// the server have kept the connection open) fails before a byte is
// written, which makes net/http drop it and replay that request on another
// connection (see the package doc).
type agedConn struct {
	net.Conn
	born   time.Time
	maxAge time.Duration
	// last is set when a request asking for the close was handed this
	// connection; answered once a read returned data after that.
	last, answered atomic.Bool
}

func (c *agedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && c.last.Load() {
		c.answered.Store(true)
	}
	return n, err
}

// errConnRetired is what a retired connection's Write returns; nothing has
// been written when it does.
var errConnRetired = &net.OpError{Op: "write", Net: "tcp", Err: errRetired{}}

type errRetired struct{}

func (errRetired) Error() string { return "connection retired after max_conn_age" }

func (c *agedConn) Write(p []byte) (int, error) {
	if c.answered.Load() {
		return 0, errConnRetired
	}
	return c.Conn.Write(p)
}

// gotConn is the httptrace hook run when the pool hands a connection to an
// attempt of c, before anything is written on it (in the goroutine of the
// round trip). It notes that the attempt got a connection. A reused
// connection older than max_conn_age makes this attempt its last
// (Connection: close). Fresh connections are never retired.
func (c *Call) gotConn(info httptrace.GotConnInfo) {
	c.connected = true
	if !info.Reused {
		return
	}
	conn := info.Conn
	if nc, ok := conn.(interface{ NetConn() net.Conn }); ok { // *tls.Conn
		conn = nc.NetConn()
	}
	if ac, ok := conn.(*agedConn); ok && time.Since(ac.born) >= ac.maxAge && !ac.last.Load() {
		c.sending.Set("Connection", "close")
		ac.last.Store(true)
	}
}
