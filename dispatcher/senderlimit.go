package dispatcher

import (
	"math"
	"slices"
	"time"
)

// senderLimit is how many senders a pool runs when http.adaptive_conns_per_host
// is on: the fewest that keep the target's latency near its unloaded level,
// at most max_conns_per_host. More requests under way than a target (or
// this machine's CPU) serves at once only queue: latency grows with them,
// throughput does not, and every extra connection and goroutine costs CPU
// on both sides. On loopback with a 0 ms target a plain client is fastest
// with a few dozen connections, not 256; on a remote target with stable
// latency the limit climbs to the ceiling.
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
// Latency alone does not find the knee of a target (or of this machine)
// that slows gradually as requests are added, such as a sink on loopback
// that shares the CPU with Orderly: each sender more adds a little latency
// and a little throughput, and the rules above hold anywhere from 1.5 times
// the concurrency at which base was measured to several times it (their
// slack of 1-2 ms is loose where base is below a millisecond). So the limit
// is also capped by Little's law, as TCP BBR caps its window by the
// bandwidth-delay product (with BBR's gain, senderGain): at most senderGain
// times the highest rate the pool served in its latest windows with lanes
// waiting, times base. Where adding senders adds throughput in proportion
// (a remote target with room) the cap grows with the limit; where
// throughput stopped growing it holds the limit within senderGain of the
// concurrency that reached it.
//
// base expires after baseTTL without a window near it: the next two
// windows then run at a quarter of the limit, but not below senderStart
// (or at the limit itself where that is lower: a probe, as TCP BBR probes
// its minimum RTT), and the second one's mean becomes the new base (the
// first lets the requests sent at the old limit drain), so that a target
// that became slower for good is not held to its old latency. The probe stays at senderStart or above because on a target
// whose latency grows with every request (no flat region) a base taken at a
// few senders would ratchet the cap down with every probe. It is not safe
// for concurrent use: the pool's mutex guards it.
type senderLimit struct {
	max      int // the ceiling: max_conns_per_host, math.MaxInt when unlimited
	limit    int
	adaptive bool
	// saved is the limit to return to after a probe (0: no probe); the
	// probe's first window lets the requests sent at the old limit drain,
	// its second (settled set) measures the base.
	saved     int
	settled   bool
	slowStart bool

	base   time.Duration // 0 until the first window
	baseAt time.Time

	// rates are the answers per second of the latest windows that ran
	// with lanes waiting (a ring; 0: none yet).
	rates [senderRates]float64
	rate  int // the next slot of rates

	start     time.Time // of the window
	first     time.Time // the window's first sample
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
	senderRates      = 8 // windows whose highest rate the cap uses
	senderGain       = 2.0
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
	if s.n == 0 {
		s.first = now
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
	if saturated && now.After(s.first) {
		// Over the samples' own span: an idle gap before the window says
		// nothing of the target.
		s.rates[s.rate] = float64(s.n-1) / now.Sub(s.first).Seconds()
		s.rate = (s.rate + 1) % senderRates
	}
	s.start, s.n, s.sum, s.saturated = now, 0, 0, 0
	old := s.limit
	switch {
	case s.saved > 0 && !s.settled:
		s.settled = true
		return false
	case s.saved > 0: // the probe's second window: its mean is the new base
		s.settled = false
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
		s.limit = s.floored(int(float64(s.limit) * senderShrink))
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
	if c := s.cap(); s.limit > c {
		s.slowStart = false
		s.limit = c
	}
	if now.Sub(s.baseAt) > senderBaseTTL {
		s.saved = s.limit
		s.limit = max(s.limit/4, min(s.limit, senderStart))
	}
	return s.limit != old
}

// cap is the most senders Little's law gives at the highest recent rate and
// the base latency (math.MaxInt before any window with lanes waiting), not
// below the floor.
func (s *senderLimit) cap() int {
	rate := slices.Max(s.rates[:])
	if rate == 0 {
		return math.MaxInt
	}
	c := math.Ceil(senderGain * rate * s.base.Seconds())
	if c >= float64(s.max) {
		return s.max
	}
	return s.floored(int(c))
}

// floored is n, but not below senderFloor (nor the ceiling, where that is
// lower).
func (s *senderLimit) floored(n int) int { return max(min(senderFloor, s.max), n) }

// satAdd is a+b, at most math.MaxInt (a, b >= 0).
func satAdd(a, b int) int {
	if a > math.MaxInt-b {
		return math.MaxInt
	}
	return a + b
}
