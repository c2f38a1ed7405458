package dispatcher

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"
)

// limitRun feeds a senderLimit windows of samples whose latency is
// latency(limit) (the same for every sample of a window: the mean is what
// counts), answered at the rate Little's law gives (limit / latency), for d
// of simulated time, with lanes waiting throughout, and returns the limit at
// the end and the least and most it took after the first second.
func limitRun(t *testing.T, s *senderLimit, d time.Duration, latency func(limit int) time.Duration) (last, lo, hi int) {
	t.Helper()
	now := time.Unix(1000, 0)
	end := now.Add(d)
	settled := now.Add(time.Second)
	lo, hi = math.MaxInt, 0
	for now.Before(end) {
		lat := latency(s.limit)
		step := max(lat/time.Duration(s.limit), time.Microsecond)
		// One window's worth of samples at that rate.
		n := max(senderWindowMin, 2*s.limit, int(senderWindow/step)+1)
		for range n {
			now = now.Add(step)
			s.sample(now, lat, true)
		}
		if s.limit < 1 || s.limit > s.max {
			t.Fatalf("limit %d outside [1, %d]", s.limit, s.max)
		}
		if now.After(settled) {
			lo, hi = min(lo, s.limit), max(hi, s.limit)
		}
	}
	return s.limit, lo, hi
}

// A target (or a machine) whose latency grows with every request under
// way, with no flat region: each sender more adds a little throughput and
// more latency. The limit stays near where it started, and a probe of the
// base never ratchets it down.
func TestSenderLimitShrinksWhereLatencyOnlyQueues(t *testing.T) {
	const rate = 30000.0 // requests per second the queue drains at
	queueing := func(limit int) time.Duration {
		return 100*time.Microsecond + time.Duration(float64(limit)/rate*float64(time.Second))
	}
	s := newSenderLimit(256, true, time.Unix(1000, 0))
	if s.limit != senderStart {
		t.Fatalf("starts at %d, want %d", s.limit, senderStart)
	}
	// 40 s: base probes at 10 s intervals.
	_, lo, hi := limitRun(t, s, 40*time.Second, queueing)
	// base ~0.63 ms at 16 senders and ~27k/s: Little's cap 2 x 27k x
	// 0.63 ms, about 34.
	if lo < senderStart || hi > 40 {
		t.Fatalf("the limit ranged over [%d, %d], want within [%d, 40]", lo, hi, senderStart)
	}
}

// A target that serves at most 20 requests at once in 0.5 ms each: beyond
// 20 senders the rate stays at 40,000/s and latency grows. Little's law
// holds the limit within senderGain of the knee, where the latency rules
// alone (room below base + 1 ms, overload above base + 2 ms) let it climb
// to 60-100.
func TestSenderLimitStopsWhereThroughputStops(t *testing.T) {
	const knee, service = 20, 500 * time.Microsecond
	saturating := func(limit int) time.Duration {
		return service * time.Duration(max(limit, knee)) / knee
	}
	s := newSenderLimit(256, true, time.Unix(1000, 0))
	last, lo, hi := limitRun(t, s, 30*time.Second, saturating)
	if lo < senderStart || hi > knee*senderGain+1 {
		t.Fatalf("the limit ranged over [%d, %d] (last %d), want within [%d, %d]", lo, hi, last, senderStart, int(knee*senderGain+1))
	}
}

// A remote target whose latency does not depend on the load but varies
// from request to request (uniform in [0, 10 ms)): the limit climbs to the
// ceiling and stays there.
func TestSenderLimitClimbsOnStableLatency(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	s := newSenderLimit(256, true, time.Unix(1000, 0))
	now := time.Unix(1000, 0)
	var lo int = math.MaxInt
	for i := range 400_000 {
		now = now.Add(20 * time.Microsecond)
		s.sample(now, time.Duration(rng.Int64N(int64(10*time.Millisecond))), true)
		if i > 100_000 {
			lo = min(lo, s.limit)
		}
	}
	if s.limit != 256 || lo < 200 {
		t.Fatalf("limit %d (least %d after the start), want 256 and never below 200", s.limit, lo)
	}
}

// A target that became ten times slower for good: the limit first falls,
// and once the old base has expired it climbs back to the ceiling.
func TestSenderLimitForgetsAnOldBase(t *testing.T) {
	s := newSenderLimit(64, true, time.Unix(1000, 0))
	limitRun(t, s, 2*time.Second, func(int) time.Duration { return 5 * time.Millisecond })
	if s.limit != 64 {
		t.Fatalf("limit %d at 5 ms, want 64", s.limit)
	}
	last, lo, _ := limitRun(t, s, 30*time.Second, func(int) time.Duration { return 50 * time.Millisecond })
	if lo > 32 {
		t.Fatalf("the limit never went below %d when latency grew tenfold", lo)
	}
	if last != 64 {
		t.Fatalf("limit %d 30 s after the slowdown, want back at 64", last)
	}
}

// Without lanes waiting for a sender the limit does not grow: more senders
// would have nothing to do.
func TestSenderLimitGrowsOnlyWhenSaturated(t *testing.T) {
	s := newSenderLimit(256, true, time.Unix(1000, 0))
	now := time.Unix(1000, 0)
	for range 10_000 {
		now = now.Add(100 * time.Microsecond)
		s.sample(now, time.Millisecond, false)
	}
	if s.limit != senderStart {
		t.Fatalf("limit %d without lanes waiting, want %d", s.limit, senderStart)
	}
}

// With http.adaptive_conns_per_host off the limit is max_conns_per_host.
func TestSenderLimitFixed(t *testing.T) {
	s := newSenderLimit(256, false, time.Unix(1000, 0))
	last, lo, hi := limitRun(t, s, 3*time.Second, func(l int) time.Duration { return time.Duration(l) * time.Millisecond })
	if last != 256 || lo != 256 || hi != 256 {
		t.Fatalf("fixed limit moved: %d (%d..%d)", last, lo, hi)
	}
}
