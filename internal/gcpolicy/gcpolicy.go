// Package gcpolicy sizes the Go garbage collector's headroom for a process
// that holds a bounded, long-lived working set: Orderly's messages in
// flight (up to dispatch.max_in_flight per partition, 16 MB with 8
// partitions of the default 2,000 1 KB messages).
//
// Go's collector lets the heap grow by GOGC percent (100 by default) of the
// live heap before it collects again. For messages held until they are
// delivered that headroom buys nothing: they are not garbage, and they are
// mostly pointer-free bytes that a collection marks cheaply. So while it
// runs, Run sets GOGC such that the headroom is what GOGC=100 would give the
// rest, as if the held messages were not there, but never less than a
// quarter of the heap (nor MinHeadroom). Go's pacer applies GOGC to the
// live heap plus the scannable goroutine stacks and globals (roots), so:
//
//	headroom = max(MinHeadroom, (live + roots) / 4, live - held + roots)
//	GOGC     = 100 * headroom / (live + roots)   (25 to 400)
//
// where live is the heap the last collection found live and held is what
// the caller reports. The quarter keeps a heap of gigabytes held from
// collecting almost continuously (a fixed floor meant GOGC 2 with 550 MB
// held: 240 collections for a run that GOGC=100 does in 19). MinHeadroom
// (32 MiB) gives a small heap more than GOGC=100 would, as a memory
// ballast does: a dispatcher whose live heap is 10-15 MB allocates a few
// KB per message (mostly net/http's), so GOGC=100 collected every few
// hundred milliseconds at full speed and the collector took a tenth of the
// CPU. With nothing held and a heap above MinHeadroom this is plain
// GOGC=100; with many goroutines (thousands of connections) their stacks
// keep it near 100.
//
// After a burst, Run returns the freed memory to the operating system at
// once (debug.FreeOSMemory) rather than leaving it to the background
// scavenger, which, without allocations to start another collection, keeps
// the memory of the burst for minutes: once held has fallen below an eighth
// of a peak above 32 MiB (at most every 10 s), then each time the tail of
// the burst drains held below an eighth of what it was at the last release
// (at most every second), until nothing is held. And whenever the process
// goes quiet (no collection for IdleAfter after one Run did not make), it
// releases once: the garbage and free pages of its last work, which the
// collector's default headroom would otherwise keep until Go's periodic
// collection two minutes later. A process busy enough to collect more often
// than that never goes quiet; an idle one costs a collection every two
// minutes, after Go's own.
//
// An operator's own settings win: with GOGC or GOMEMLIMIT in the
// environment Run leaves the collector to the runtime. A memory limit sized
// to the work bounds the heap as well as the policy does for 13-16% less CPU
// per message (docs/DESIGN.md, Decisions); the policy is for the default
// settings, where nothing else bounds the headroom. Only one Run per
// process adjusts the collector; a second one returns at once.
package gcpolicy

import (
	"context"
	"log/slog"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"
	"time"
)

// Options configures Run.
type Options struct {
	// Held returns the bytes the process holds on purpose (required).
	Held func() int64
	// MinHeadroom is the least headroom; 0 means 32 MiB.
	MinHeadroom int64
	// Interval is how often Run looks at the collector; 0 means 100ms.
	Interval time.Duration
	// IdleAfter is how long without a collection makes the process quiet;
	// 0 means 5s.
	IdleAfter time.Duration
	Logger    *slog.Logger // nil discards
}

// running is set while a Run adjusts the collector.
var running atomic.Bool

const (
	defaultMinHeadroom = 32 << 20
	defaultInterval    = 100 * time.Millisecond
	defaultIdleAfter   = 5 * time.Second
	// releaseAbove is the held peak below which a fall is not worth an
	// immediate release; releaseEvery spaces out the releases of bursts,
	// tailEvery those of their tails.
	releaseAbove = 32 << 20
	releaseEvery = 10 * time.Second
	tailEvery    = time.Second
)

// Run adjusts the collector until ctx ends, then restores the GOGC it found.
// It returns at once when the environment sets GOGC, or when another Run is
// active.
func Run(ctx context.Context, o Options) {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	for _, env := range []string{"GOGC", "GOMEMLIMIT"} {
		if v, ok := os.LookupEnv(env); ok {
			log.Info("garbage collector left to the environment", env, v)
			return
		}
	}
	if !running.CompareAndSwap(false, true) {
		return
	}
	defer running.Store(false)
	g := newGovernor(o)
	defer debug.SetGCPercent(g.initial)
	t := time.NewTicker(g.interval)
	defer t.Stop()
	for {
		g.tick()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// governor is Run's state; tick is called from one goroutine.
type governor struct {
	held        func() int64
	minHeadroom int64
	interval    time.Duration
	idleAfter   time.Duration
	initial     int // the GOGC found at start

	samples     []metrics.Sample
	cycles      uint64 // collections seen
	gogc        int    // the GOGC set last
	peakHeld    int64  // the most held since the last release
	tailFrom    int64  // held at the last release while a burst drains, else 0
	lastRelease time.Time
	seen        uint64    // collections seen by the release logic
	lastCycle   time.Time // when one was last seen
	idlePending bool      // one Run did not make was seen: release once quiet
}

func newGovernor(o Options) *governor {
	g := &governor{held: o.Held, minHeadroom: o.MinHeadroom, interval: o.Interval, idleAfter: o.IdleAfter,
		samples: []metrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}, {Name: "/gc/heap/live:bytes"},
			{Name: "/gc/scan/stack:bytes"}, {Name: "/gc/scan/globals:bytes"}}}
	if g.minHeadroom <= 0 {
		g.minHeadroom = defaultMinHeadroom
	}
	if g.interval <= 0 {
		g.interval = defaultInterval
	}
	if g.idleAfter <= 0 {
		g.idleAfter = defaultIdleAfter
	}
	g.lastCycle = time.Now()
	g.initial = debug.SetGCPercent(100)
	g.gogc = 100
	return g
}

// tick sets GOGC after each collection and releases memory after a burst.
func (g *governor) tick() {
	held := max(g.held(), 0)
	g.peakHeld = max(g.peakHeld, held)
	metrics.Read(g.samples)
	now := time.Now()
	if c := g.samples[0].Value.Uint64(); c != g.seen {
		g.seen, g.lastCycle, g.idlePending = c, now, true
	}
	since := now.Sub(g.lastRelease)
	burstOver := g.peakHeld > releaseAbove && held < g.peakHeld/8 && since >= releaseEvery
	tail := g.tailFrom > 0 && held < g.tailFrom/8 && since >= tailEvery
	quiet := g.idlePending && now.Sub(g.lastCycle) >= g.idleAfter
	if burstOver || tail || quiet {
		debug.FreeOSMemory()
		g.peakHeld, g.tailFrom, g.lastRelease = held, held, time.Now()
		metrics.Read(g.samples)
		g.seen, g.lastCycle, g.idlePending = g.samples[0].Value.Uint64(), g.lastRelease, false
	}
	cycles, live := g.samples[0].Value.Uint64(), int64(g.samples[1].Value.Uint64())
	roots := int64(g.samples[2].Value.Uint64() + g.samples[3].Value.Uint64())
	if cycles == g.cycles || live <= 0 {
		return
	}
	g.cycles = cycles
	if gogc := percent(live, roots, held, g.minHeadroom); gogc != g.gogc {
		debug.SetGCPercent(gogc)
		g.gogc = gogc
	}
}

// percent is the GOGC that gives a heap of live bytes, held of them held on
// purpose, with roots bytes of stacks and globals to scan, the headroom
// max(minHeadroom, base/4, base-held), base = live+roots: between 25 and
// 400.
func percent(live, roots, held, minHeadroom int64) int {
	base := live + roots
	headroom := max(minHeadroom, base/4, base-min(held, live))
	return int(min(maxPercent, max(minPercent, 100*headroom/base)))
}

// minPercent is the least GOGC percent sets: the quarter of the heap.
// maxPercent is the most: a heap of a few MB (an idle process) grows to
// five times itself, not to MinHeadroom, between collections.
const (
	minPercent = 25
	maxPercent = 400
)
