package dispatcher

import (
	"fmt"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit/metrictest"
	"github.com/orderly-dispatch/orderly/internal/testkit/testclock"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// TestIdlePoolsAreRemoved: 10,000 targets used over time leave only the
// pools (and gauge series) of the last few minutes; a pool with a sender
// alive or a lane queued stays whatever its age. (httpclient's
// TestIdleTargetsAreForgotten does the same for its targets.)
func TestIdlePoolsAreRemoved(t *testing.T) {
	m := telemetry.NewMetrics()
	e := newSenders(4, false, m)
	clock := testclock.New(time.Unix(1_000_000, 0))
	e.now = clock.Now
	pools := func() int { return len(*e.pools.Load()) }

	busy := e.pool("busy:80")
	busy.mu.Lock()
	busy.n = 1 // a sender alive
	busy.mu.Unlock()
	queued := e.pool("queued:80")
	queued.mu.Lock()
	queued.q.push(&lane{})
	queued.mu.Unlock()

	most := 0
	for i := range 10_000 {
		if i%100 == 0 {
			clock.Add(poolIdle + poolSweepEvery)
		}
		e.pool(fmt.Sprintf("h%d:80", i))
		most = max(most, pools())
	}
	// Each round of 100 finds the previous round idle for longer than
	// poolIdle: at most two rounds and the two busy pools at once.
	if most > 202 {
		t.Fatalf("%d pools at once for 10,000 targets used 100 at a time", most)
	}
	if n := metrictest.SeriesCount(t, m.Registry, "orderly_http_senders"); n > 202 {
		t.Fatalf("%d orderly_http_senders series", n)
	}
	if e.pool("busy:80") != busy || e.pool("queued:80") != queued {
		t.Fatal("a pool with a sender or a queued lane was removed")
	}
	if !hasNoPool(e, "h0:80") {
		t.Fatal("the first pool is still there after 10,000 targets")
	}
	busy.mu.Lock()
	busy.n = 0
	busy.mu.Unlock()
	queued.mu.Lock()
	queued.q.pop()
	queued.mu.Unlock()
}

// hasNoPool reports whether target has no pool in e's map.
func hasNoPool(e *senders, target string) bool {
	_, ok := (*e.pools.Load())[target]
	return !ok
}
