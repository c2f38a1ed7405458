package dispatcher

import (
	"math"
	"time"
)

// senderLimit is how many senders a pool runs when http.adaptive_conns_per_host
// is on: the fewest that keep the target's latency near its unloaded level,
// at most max_conns_per_host. More requests under way than a target (or
// this machine's CPU) serves at once only queue: latency grows with them,
// throughput does not, and every extra connection and goroutine costs CPU
// on both sides. On loopback with a 0 ms target the best plain client runs
// 64 connections, not 256; on a remote target with stable latency the limit
// climbs to the ceiling.
//
// The limit moves once per window of samples (the latency, send to drained
// answer, of attempts the target served; retried answers are left out), on
// the window's mean latency R against base, the least window mean seen
// lately (a per-sample minimum would mistake a target whose latency merely
// varies for an overloaded one):
//
//   - R above max(2*base, base+overloadSlack): overloaded, the limit
//     shrinks by a tenth (not below senderFloor);
//   - R below base + max(base/2, roomSlack), with lanes waiting for a
//     sender through the window: room, the limit grows, doubling until the
//     first window without room (slow start), then by an eighth;
//   - otherwise it holds.
//
// base expires after baseTTL without a window near it: the next window then
// runs at a quarter of the limit (a probe, as TCP BBR probes its minimum
// RTT) and its mean becomes the new base, so that a target that became
// slower for good is not held to its old latency. It is not safe for
// concurrent use: the pool's mutex guards it.
type senderLimit struct {
	max      int // the ceiling: max_conns_per_host, math.MaxInt when unlimited
	limit    int
	adaptive bool
	// saved is the limit to return to after a probe window (0: no probe).
	saved     int
	slowStart bool

	base   time.Duration // 0 until the first window
	baseAt time.Time

	start     time.Time // of the window
	n         int       // samples in the window
	sum       time.Duration
	saturated int // samples taken while lanes waited for a sender
}

const (
	senderFloor      = 4  // the least the adaptive limit goes to
	senderStart      = 16 // the limit a pool starts with
	senderWindow     = 30 * time.Millisecond
	senderWindowMin  = 32 // samples, besides twice the limit
	senderBaseTTL    = 10 * time.Second
	senderShrink     = 0.9
	overloadSlack    = 2 * time.Millisecond // a queue shorter than this is not overload
	roomSlack        = time.Millisecond
	senderGrowthRate = 8 // after slow start the limit grows by 1/senderGrowthRate
)

// newSenderLimit returns the limit of a pool of at most max senders;
// adaptive false fixes it at max.
func newSenderLimit(maxSenders int, adaptive bool, now time.Time) *senderLimit {
	s := &senderLimit{max: maxSenders, limit: maxSenders, start: now}
	if adaptive {
		s.limit, s.slowStart, s.adaptive = min(maxSenders, senderStart), true, true
	}
	return s
}

// sample adds an answered attempt's latency, taken with lanes waiting for a
// sender or not, and reports whether the limit changed.
func (s *senderLimit) sample(now time.Time, latency time.Duration, waiting bool) bool {
	if !s.adaptive {
		return false
	}
	s.n++
	s.sum += latency
	if waiting {
		s.saturated++
	}
	if s.n < max(senderWindowMin, 2*s.limit) || now.Sub(s.start) < senderWindow {
		return false
	}
	mean := s.sum / time.Duration(s.n)
	saturated := 2*s.saturated >= s.n
	s.start, s.n, s.sum, s.saturated = now, 0, 0, 0
	old := s.limit
	switch {
	case s.saved > 0: // the probe window: its mean is the new base
		s.base, s.baseAt = mean, now
		s.limit, s.saved = s.saved, 0
		return s.limit != old
	case s.base == 0 || mean <= s.base:
		s.base, s.baseAt = mean, now
	case mean <= s.base+s.base/8:
		s.baseAt = now // near the base: it still holds
	}
	switch {
	case mean > max(2*s.base, s.base+overloadSlack):
		s.slowStart = false
		s.limit = max(min(senderFloor, s.max), int(float64(s.limit)*senderShrink))
	case mean < s.base+max(s.base/2, roomSlack) && saturated:
		step := max(1, s.limit/senderGrowthRate)
		if s.slowStart {
			step = s.limit
		}
		s.limit = min(s.max, satAdd(s.limit, step))
	default:
		if saturated {
			s.slowStart = false
		}
	}
	if now.Sub(s.baseAt) > senderBaseTTL {
		s.saved = s.limit
		s.limit = max(min(senderFloor, s.max), s.limit/4)
	}
	return s.limit != old
}

// satAdd is a+b, at most math.MaxInt (a, b >= 0).
func satAdd(a, b int) int {
	if a > math.MaxInt-b {
		return math.MaxInt
	}
	return a + b
}
