package httpclient

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Flow control of a named target (targets[].rate, burst, max_concurrency,
// adaptive_concurrency), checked by Attempt before anything is sent:
//
//   - Rate: a token bucket (golang.org/x/time/rate) of rate*share tokens per
//     second holding at most burst*share (at least 1), share being this
//     instance's share of the group's partitions (Sender.SetShare). An
//     attempt without a token reserves the next free one and returns Retry
//     until it is due, spending no attempt; the caller parks (no goroutine
//     waits) and its next Attempt sends on the reserved token. Reserving
//     keeps the waiting calls in line instead of waking all of them for
//     every token; a call is not let reserve further ahead than
//     reserveHorizon, so a call abandoned while it waits (its partition
//     revoked) wastes at most that much of the rate. Each wait is counted in
//     orderly_target_rate_limited_total{target}.
//   - Concurrency: at most a limit of attempts to the target under way on
//     this instance. An attempt over it returns Retry after 5 to 20 ms,
//     spending no attempt. The limit is max_concurrency, or with
//     adaptive_concurrency one that starts at that ceiling (max_conns_per_host
//     when 0) and moves AIMD-style, in the spirit of Netflix's
//     concurrency-limits: down by 10% on a 429, a 503, an attempt that timed
//     out or an answer slower than twice the target's smoothed minimum
//     latency (and at least latencySlack above it), at most once per round
//     (attempts that started before the last decrease do not decrease it
//     again), never below 1; up by 1/limit on every 2xx answered while at
//     least half of the limit was in use, never above the ceiling. It is
//     exported as orderly_target_concurrency_limit{target}.
//
// A paused target (Retry-After) is checked first, so a pause takes no token.

const (
	// latencySlack is how far above its smoothed minimum an answer's latency
	// must be, besides twice it, to count as overload: on a fast network a
	// millisecond of jitter is not congestion.
	latencySlack = 5 * time.Millisecond
	// minLatencyDrift: a sample above the smoothed minimum moves it up by
	// 1/minLatencyDrift of the difference, so a target that became slower
	// for good stops counting as overloaded after a few hundred answers.
	minLatencyDrift = 128
	// decrease is the factor of the adaptive limit on overload.
	decrease = 0.9
	// minReserveHorizon is the least of how far ahead a call may reserve a
	// token (two token intervals when longer).
	minReserveHorizon = time.Second
)

// flowConfig is what a named target configures of its flow control.
type flowConfig struct {
	rate           float64 // requests per second for the group, 0 = unlimited
	burst          int     // config.Target.BurstOrDefault
	maxConcurrency int     // 0 = max_conns_per_host
	adaptive       bool
}

func newFlowConfig(t *config.Target) flowConfig {
	return flowConfig{rate: t.Rate, burst: t.BurstOrDefault(), maxConcurrency: t.MaxConcurrency, adaptive: t.AdaptiveConcurrency}
}

// flow is a named target's flow control as one Sender applies it. It is
// safe for concurrent use.
type flow struct {
	cfg         flowConfig
	bucket      *rate.Limiter // nil: no rate
	horizon     atomic.Int64  // how far ahead a call may reserve a token (a time.Duration)
	rateLimited prometheus.Counter
	conc        *concurrency // nil: only the connection limit applies
}

// newFlow returns the flow control of target name, nil when it has none.
// maxConns is http.max_conns_per_host (0 = unlimited).
func newFlow(name string, cfg flowConfig, maxConns int, m *telemetry.Metrics) *flow {
	if cfg.rate <= 0 && cfg.maxConcurrency <= 0 && !cfg.adaptive {
		return nil
	}
	f := &flow{cfg: cfg}
	if cfg.rate > 0 {
		f.bucket = rate.NewLimiter(rate.Limit(cfg.rate), max(cfg.burst, 1))
		f.setHorizon(cfg.rate)
		f.rateLimited = m.TargetRateLimited.WithLabelValues(name)
	}
	if cfg.maxConcurrency > 0 || cfg.adaptive {
		// Validation asks for a ceiling; a hand-built Options gets the last one.
		ceiling := positiveOr(cfg.maxConcurrency, positiveOr(maxConns, unlimitedIdlePerHost))
		f.conc = &concurrency{max: ceiling, adaptive: cfg.adaptive, limit: float64(ceiling),
			gauge: m.TargetConcurrencyLimit.WithLabelValues(name)}
		f.conc.gauge.Set(float64(ceiling))
	}
	return f
}

func (f *flow) setHorizon(perSecond float64) {
	f.horizon.Store(int64(max(minReserveHorizon, time.Duration(2*float64(time.Second)/perSecond))))
}

// setShare makes the bucket's rate and burst f of the configured ones.
func (f *flow) setShare(now time.Time, share float64) {
	if f.bucket == nil {
		return
	}
	r := f.cfg.rate * share
	f.setHorizon(r)
	f.bucket.SetLimitAt(now, rate.Limit(r))
	f.bucket.SetBurstAt(now, max(1, int(float64(f.cfg.burst)*share)))
}

// The dispatcher finds SetShare through this interface.
var _ interface{ SetShare(float64) } = (*Sender)(nil)

// SetShare makes every named target's rate and burst f of the configured
// ones (burst at least 1): f is this instance's share of the consumer
// group's partitions, 0 < f <= 1 (the dispatcher calls it after every
// rebalance). Other values of f are ignored. Tokens reserved before keep
// their time. It is safe for concurrent use.
func (s *Sender) SetShare(f float64) {
	if !(f > 0 && f <= 1) {
		return
	}
	now := time.Now()
	for _, bt := range s.named {
		if bt.flow != nil {
			bt.flow.setShare(now, f)
		}
	}
}

// takeToken gives c's next attempt a token of the bucket, or returns how
// long c must wait for it (> 0). A call that has to wait reserves the next
// token unless it is due beyond the horizon; then it asks again later.
func (f *flow) takeToken(c *Call, now time.Time) time.Duration {
	if f.bucket == nil {
		return 0
	}
	n := mono(now)
	if c.named.reserved {
		if wait := time.Duration(c.named.tokenAt - n); wait > 0 {
			return wait // woken early: the token is not due yet
		}
		c.named.reserved = false
		return 0
	}
	r := f.bucket.ReserveN(now, 1)
	if !r.OK() {
		return time.Duration(f.horizon.Load()) // burst < 1: cannot happen, burst is at least 1
	}
	wait := r.DelayFrom(now)
	if wait <= 0 {
		return 0
	}
	f.rateLimited.Inc()
	if h := time.Duration(f.horizon.Load()); wait > h {
		r.CancelAt(now)
		return h/2 + rand.N(h/2+1)
	}
	c.named.reserved, c.named.tokenAt = true, n+int64(wait)
	return wait
}

// concurrencyWait is how long an attempt refused for the concurrency limit
// waits before it asks again: 5 to 20 ms, spread so that the refused calls
// do not come back together.
func concurrencyWait() time.Duration {
	return 5*time.Millisecond + rand.N(15*time.Millisecond+1)
}

// concurrency limits the attempts under way to a named target. It is safe
// for concurrent use.
type concurrency struct {
	max      int // the fixed limit, or the adaptive limit's ceiling
	adaptive bool
	gauge    prometheus.Gauge

	mu       sync.Mutex // protects the fields below
	limit    float64    // adaptive: the current limit, in [1, max]
	inflight int
	// minLatency is the smoothed minimum latency of the target's answers
	// (0 until the first); lastCut is when the limit last went down (mono).
	minLatency time.Duration
	lastCut    int64
}

// slot is one attempt under way, counted by its concurrency (nil: none).
type slot struct {
	c     *concurrency
	start int64 // mono
	inUse bool  // at least half of the limit was in use when it began
}

// acquire takes a slot, or reports false when the limit is reached.
func (l *concurrency) acquire(now time.Time) (slot, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	limit := l.max
	if l.adaptive {
		limit = int(l.limit)
	}
	if l.inflight >= limit {
		return slot{}, false
	}
	l.inflight++
	return slot{c: l, start: mono(now), inUse: 2*l.inflight >= limit}, true
}

// signal is what an attempt says about the target's load.
type signal uint8

const (
	signalNone     signal = iota // nothing (canceled, a transport error)
	signalAnswered               // an answer: its latency is a sample
	signalOK                     // a 2xx: a sample, and room to grow
	signalOverload               // 429, 503, timed out
)

// loadSignal classifies an attempt for the adaptive limit.
func loadSignal(ctx context.Context, resp *http.Response, err error) signal {
	switch {
	case ctx.Err() != nil:
		return signalNone
	case err != nil:
		if errors.Is(err, context.DeadlineExceeded) {
			return signalOverload // http.timeout
		}
		return signalNone
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable:
		return signalOverload
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return signalOK
	}
	return signalAnswered
}

// end gives the slot back with what its attempt said (latency: from send
// to drained answer) and moves the adaptive limit.
func (sl *slot) end(sig signal, latency time.Duration) {
	l := sl.c
	if l == nil {
		return
	}
	sl.c = nil
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight--
	if !l.adaptive {
		return
	}
	if sig == signalAnswered || sig == signalOK {
		m := l.minLatency
		if m > 0 && latency > max(2*m, m+latencySlack) {
			sig = signalOverload
		}
		if m == 0 || latency < m {
			l.minLatency = latency
		} else {
			l.minLatency += (latency - m) / minLatencyDrift
		}
	}
	switch {
	case sig == signalOverload && sl.start > l.lastCut:
		l.limit = max(1, l.limit*decrease)
		l.lastCut = mono(time.Now())
	case sig == signalOK && sl.inUse && l.limit < float64(l.max):
		l.limit = min(float64(l.max), l.limit+1/l.limit)
	default:
		return
	}
	l.gauge.Set(math.Floor(l.limit))
}

// current returns the limit now (tests).
func (l *concurrency) current() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.adaptive {
		return int(l.limit)
	}
	return l.max
}
