package gcpolicy

import (
	"context"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	const mb = 1 << 20
	for _, tt := range []struct {
		live, roots, held, min int64
		want                   int
	}{
		{live: 100 * mb, held: 0, min: 16 * mb, want: 100},                     // nothing held: GOGC=100
		{live: 100 * mb, held: 90 * mb, min: 16 * mb, want: 25},                // 10 MB of the rest < a quarter of the heap
		{live: 100 * mb, held: 50 * mb, min: 16 * mb, want: 50},                // headroom = the rest
		{live: 10 * mb, held: 9 * mb, min: 16 * mb, want: 160},                 // the floor exceeds the heap: above 100
		{live: 2 * mb, held: 0, min: 32 * mb, want: 400},                       // a tiny heap: at most 400
		{live: 16 * mb, held: 2 * mb, min: 32 * mb, want: 200},                 // a dispatcher at 0 ms: the floor, not GOGC=100
		{live: 400 * mb, held: 400 * mb, min: 1 * mb, want: 25},                // never below a quarter
		{live: 100 * mb, held: 200 * mb, min: 16 * mb, want: 25},               // an overestimate of held
		{live: 40 * mb, roots: 20 * mb, held: 28 * mb, min: 16 * mb, want: 53}, // stacks count as the rest
		{live: 4096 * mb, held: 4000 * mb, min: 16 * mb, want: 25},             // gigabytes held: a quarter, not 16 MB (GOGC 2)
		{live: 40 * mb, held: 36 * mb, min: 16 * mb, want: 40},                 // a small heap: the fixed floor
	} {
		if got := percent(tt.live, tt.roots, tt.held, tt.min); got != tt.want {
			t.Errorf("percent(live %d MB, roots %d MB, held %d MB, min %d MB) = %d, want %d",
				tt.live/mb, tt.roots/mb, tt.held/mb, tt.min/mb, got, tt.want)
		}
	}
}

// gcPercent reads the current GOGC.
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

func forcedCycles() uint64 {
	s := []metrics.Sample{{Name: "/gc/cycles/forced:gc-cycles"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// sink keeps an allocation alive where the compiler cannot see it die.
var sink []byte

// TestGovernor: with 64 MB held on purpose the governor lowers GOGC so that
// the headroom is the floor (the rest of this test's heap is small), and
// once the held memory is let go it releases the heap (a forced collection)
// and GOGC goes back up to 100 or more (the floor, on this test's small
// heap). When Run returns, the GOGC it found is back.
func TestGovernor(t *testing.T) {
	skipIfEnvironment(t)
	before := debug.SetGCPercent(80)
	defer debug.SetGCPercent(before)

	var held atomic.Int64
	sink = make([]byte, 64<<20)
	for i := 0; i < len(sink); i += 4096 {
		sink[i] = 1
	}
	held.Store(int64(len(sink)))

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { Run(ctx, Options{Held: held.Load, Interval: 5 * time.Millisecond}) })
	defer func() { cancel(); wg.Wait() }()

	waitFor(t, "GOGC lowered for the held memory", func() bool {
		runtime.GC() // a collection to measure the live heap
		return gcPercent() < 50
	})
	forced := forcedCycles()
	sink = nil
	held.Store(0)
	waitFor(t, "the heap released after the burst", func() bool { return forcedCycles() > forced })
	waitFor(t, "GOGC back to 100 or more", func() bool {
		runtime.GC()
		return gcPercent() >= 100
	})
	cancel()
	wg.Wait()
	if got := gcPercent(); got != 80 {
		t.Fatalf("GOGC after Run = %d, want the 80 it found", got)
	}
}

// TestIdleRelease: once no collection has run for IdleAfter after one the
// governor did not make, it collects and releases, once; its own releases
// do not count. Quietness is made explicit by moving the governor's clock
// of the last collection back, not by waiting: with a short IdleAfter
// (it was 50 ms) a busy machine could let it pass between two steps.
func TestIdleRelease(t *testing.T) {
	skipIfEnvironment(t)
	var held atomic.Int64
	g := newGovernor(Options{Held: held.Load, IdleAfter: time.Hour})
	defer debug.SetGCPercent(g.initial)
	quiet := func() { g.lastCycle = time.Now().Add(-2 * time.Hour) }

	held.Store(64 << 20)
	runtime.GC()
	g.tick() // sees the held peak
	held.Store(0)
	f := forcedCycles()
	g.tick()
	if forcedCycles() == f {
		t.Fatalf("no release when held fell from 64 MiB to 0")
	}
	if g.idlePending {
		t.Fatal("the governor's own release counted as work to release after")
	}

	runtime.GC() // a collection of somebody else's: the process worked
	f = forcedCycles()
	g.tick()
	if forcedCycles() != f {
		t.Fatal("released at once, before the process was quiet")
	}
	// Quiet for IdleAfter: released. A collection that ran meanwhile (the
	// runtime's own) resets the clock, so move it back until it is seen.
	waitFor(t, "the release once quiet", func() bool {
		quiet()
		g.tick()
		return forcedCycles() > f
	})
	f = forcedCycles()
	quiet() // quiet for long, nothing collected since the release
	g.tick()
	if forcedCycles() != f {
		t.Fatal("released again with no collection since the last release")
	}
}

// skipIfEnvironment skips a test of the governor when the environment
// turns it off.
func skipIfEnvironment(t *testing.T) {
	for _, env := range []string{"GOGC", "GOMEMLIMIT"} {
		if _, ok := os.LookupEnv(env); ok {
			t.Skipf("%s is set: the governor leaves the collector alone", env)
		}
	}
}

// TestEnvironmentWins: with GOGC or GOMEMLIMIT in the environment Run
// returns at once and changes nothing.
func TestEnvironmentWins(t *testing.T) {
	for _, env := range [][2]string{{"GOGC", "150"}, {"GOMEMLIMIT", "900MiB"}} {
		t.Run(env[0], func(t *testing.T) {
			t.Setenv(env[0], env[1])
			before := debug.SetGCPercent(70)
			defer debug.SetGCPercent(before)
			done := make(chan struct{})
			go func() {
				defer close(done)
				Run(context.Background(), Options{Held: func() int64 { return 1 << 40 }})
			}()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatalf("Run did not return with %s set", env[0])
			}
			if got := gcPercent(); got != 70 {
				t.Fatalf("GOGC = %d after Run with %s in the environment, want 70 untouched", got, env[0])
			}
		})
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
