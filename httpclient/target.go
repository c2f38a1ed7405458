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

// target is the state kept per host:port: its breaker, its health record
// and metric handles. Targets live as long as the Sender (one per distinct
// host:port a route sends to, a small set).
//
// Lock order: the breaker's internal mutex, then target.mu or target.hmu
// (OnStateChange runs under the former and takes the latter); nothing calls
// into the breaker while holding target.mu or target.hmu. Sender.mu is only
// held to create targets.
type target struct {
	host      string
	breaker   *gobreaker.TwoStepCircuitBreaker[struct{}] // nil when breakers are disabled
	duration  prometheus.Observer
	retries   prometheus.Counter
	uncounted prometheus.Counter
	errors    prometheus.Counter
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
	// lastFailure describes the newest retryable failure (protected by
	// hmu), for the log line of a breaker that opens; failingLogged is
	// when the target's last run of failures was logged (unix nanoseconds).
	lastFailure   string
	failingLogged atomic.Int64

	// Mirrors of the breaker, written by OnStateChange under its lock.
	state atomic.Int32 // the gobreaker.State
	// soloTrip is the id of the call whose failures alone last opened the
	// breaker (it was the only call that failed since the last success), 0
	// when several calls (or none known) had failed.
	soloTrip atomic.Uint64
}

// target returns the state of host, creating it on first use.
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
	m := s.metrics
	t = &target{
		host:      host,
		duration:  m.HTTPDuration.WithLabelValues(host),
		retries:   m.HTTPRetries.WithLabelValues(host),
		uncounted: m.HTTPUncounted.WithLabelValues(host),
		errors:    m.HTTPRequests.WithLabelValues(host, "error"),
		requests:  m.HTTPRequests,
		changed:   make(chan struct{}),
	}
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
	if !c.failing {
		c.failing, c.runEpoch = true, t.epoch
	}
	switch t.first {
	case 0:
		t.first, t.many = c.id, false
		t.dirty.Store(true)
		starts = true
	case c.id:
	default:
		t.many = true
	}
	return t.many, t.epoch != c.runEpoch, starts
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
