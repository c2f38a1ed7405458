package httpclient

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/testkit/metrictest"
	"github.com/orderly-dispatch/orderly/internal/testkit/testclock"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// --- pauses ----------------------------------------------------------------

// TestRetryAfterPausesOnlyItsTarget: target A answers four concurrent calls
// 429 with Retry-After: 2. No request reaches A before the pause ends,
// target B's calls complete meanwhile, and A's calls are then delivered
// without having spent an attempt (max_attempts is 1) or opened its breaker
// (it opens on one failure).
func TestRetryAfterPausesOnlyItsTarget(t *testing.T) {
	const calls = 4
	var (
		mu       sync.Mutex
		arrived  int
		released time.Time // when A answered the four 429s
		barrier  = make(chan struct{})
	)
	a := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
		if n >= calls {
			return // 200
		}
		mu.Lock()
		if arrived++; arrived == calls {
			released = time.Now()
			close(barrier)
		}
		mu.Unlock()
		select {
		case <-barrier:
		case <-time.After(10 * time.Second):
		}
		w.Header().Set("Retry-After", "2")
		w.WriteHeader(http.StatusTooManyRequests)
	})
	b := newRecorder(t, nil)
	h := breakerHTTP(time.Minute)
	h.Breaker.ConsecutiveFailures = 1
	h.Retry.MaxAttempts = 1
	h.Retry.MaxRetryAfter = d(time.Minute)
	s, m := newTestSender(t, h, nil)

	var as []*driver
	for range calls {
		as = append(as, drive(t, s, post(a.URL, nil)))
	}
	waitFor(t, 10*time.Second, "target A paused", func() bool {
		return metricValue(t, m, "orderly_http_retry_after_pauses_total", map[string]string{"host": a.host()}) == 1
	})
	// A new call to A returns at once with the rest of the pause, sending
	// nothing and spending nothing.
	var c Call
	c.Reset(post(a.URL, nil), "k")
	if st := s.Attempt(context.Background(), &c); st.Outcome != Retry || st.After <= 0 || st.After > 2*time.Second || c.Attempts() != 0 {
		t.Fatalf("attempt during the pause: outcome %v after %s, %d attempts; want Retry within 2s, 0 attempts", st.Outcome, st.After, c.Attempts())
	}

	var bs []*driver
	for range 20 {
		bs = append(bs, drive(t, s, post(b.URL, nil)))
	}
	for i, d := range bs {
		d.delivered(t, fmt.Sprintf("B%d", i))
	}
	bDone := time.Now()
	for i, d := range as {
		d.delivered(t, fmt.Sprintf("A%d", i))
		if d.attempts.Load() != 2 || d.counted.Load() != 1 {
			t.Errorf("call A%d: %d attempts, %d counted; want 2 and 1 (the 429 spends nothing)", i, d.attempts.Load(), d.counted.Load())
		}
	}
	mu.Lock()
	pauseEnd := released.Add(2 * time.Second)
	mu.Unlock()
	if a.n() != 2*calls {
		t.Fatalf("target A saw %d requests, want %d", a.n(), 2*calls)
	}
	for i := calls; i < a.n(); i++ {
		at := a.get(i).at
		if at.Before(pauseEnd) {
			t.Errorf("request %d reached A %s before its pause ended", i, pauseEnd.Sub(at))
		}
		if !at.After(bDone) {
			t.Errorf("request %d reached A before B's calls were all delivered", i)
		}
	}
	if st := breakerState(t, m, a.host()); st != telemetry.BreakerClosed {
		t.Errorf("A's breaker state %v after 429s, want closed", st)
	}
	if got := metricValue(t, m, "orderly_http_retry_after_pauses_total", map[string]string{"host": b.host()}); got != 0 {
		t.Errorf("B paused %v times", got)
	}
}

// --- targets over time -----------------------------------------------------

func (s *Sender) targetCount() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.targets)
}

func (s *Sender) targetOf(host string) *target {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.targets[host]
}

// TestIdleTargetsAreForgotten: requests to 10,000 distinct targets, 100 at a
// time with minutes between, leave only the targets (and metric series) of
// the last minutes. (The dispatcher's TestIdlePoolsAreRemoved does the same
// for its sender pools.)
func TestIdleTargetsAreForgotten(t *testing.T) {
	rec := newRecorder(t, nil)
	s, m := newTestSender(t, breakerHTTP(time.Minute), nil)
	clock := testclock.New(time.Unix(1_000_000, 0))
	s.now = clock.Now
	most, mostSeries := 0, 0
	for round := range 100 {
		clock.Add(targetIdle + sweepEvery)
		var wg sync.WaitGroup
		errs := make(chan error, 100)
		for w := range 4 {
			wg.Go(func() {
				for i := w; i < 100; i += 4 {
					r := &filters.Request{Method: http.MethodPost, URL: rec.URL, Target: fmt.Sprintf("h%d:80", round*100+i)}
					if _, err := s.Send(context.Background(), r, "k"); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		most = max(most, s.targetCount())
		mostSeries = max(mostSeries, metrictest.SeriesCount(t, m.Registry, "orderly_http_requests_total"))
	}
	if rec.n() != 10_000 {
		t.Fatalf("%d requests sent, want 10,000", rec.n())
	}
	// A round finds the previous one idle for longer than targetIdle.
	if most > 200 {
		t.Fatalf("%d targets kept at once for 10,000 used 100 at a time", most)
	}
	if mostSeries > 400 { // "200" and "error" per target
		t.Fatalf("%d orderly_http_requests_total series at once", mostSeries)
	}
	if n := metrictest.SeriesCount(t, m.Registry, "orderly_breaker_state"); n > 200 {
		t.Fatalf("%d orderly_breaker_state series", n)
	}
	if s.targetOf("h0:80") != nil {
		t.Fatal("the first target is still kept")
	}
}

// TestTargetsKeptWhileUsed: a target with an attempt under way, or paused,
// is kept however old; a call whose target was forgotten between attempts
// moves to the host's new target.
func TestTargetsKeptWhileUsed(t *testing.T) {
	hold := make(chan struct{})
	busy := newRecorder(t, func(_ http.ResponseWriter, _ *http.Request, _ int) { <-hold })
	paused := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusTooManyRequests)
	})
	moving := newRecorder(t, statuses(503))
	other := newRecorder(t, nil)
	s, _ := newTestSender(t, breakerHTTP(time.Minute), nil)
	clock := testclock.New(time.Unix(1_000_000, 0))
	s.now = clock.Now

	busySent := sendAsync(context.Background(), s, post(busy.URL, nil), "k")
	waitFor(t, 10*time.Second, "the busy target's request", func() bool { return busy.n() == 1 })
	var p Call
	p.Reset(post(paused.URL, nil), "k")
	if st := s.Attempt(context.Background(), &p); st.Outcome != Retry {
		t.Fatalf("429: %v", st.Outcome)
	}
	var c Call
	c.Reset(post(moving.URL, nil), "k")
	if st := s.Attempt(context.Background(), &c); st.Outcome != Retry {
		t.Fatalf("503: %v", st.Outcome)
	}
	busyT, pausedT, old := s.targetOf(busy.host()), s.targetOf(paused.host()), c.tg

	clock.Add(targetIdle + sweepEvery)
	if _, err := s.Send(context.Background(), post(other.URL, nil), "k"); err != nil { // sweeps
		t.Fatal(err)
	}
	if s.targetOf(busy.host()) != busyT || s.targetOf(paused.host()) != pausedT {
		t.Fatal("a busy or paused target was forgotten")
	}
	if s.targetOf(moving.host()) != nil || old.refs.Load() != -1 {
		t.Fatal("an idle target was kept")
	}
	if st := s.Attempt(context.Background(), &c); st.Outcome != Delivered {
		t.Fatalf("the call whose target was forgotten: %v (%v)", st.Outcome, st.Err)
	}
	if c.tg == old || s.targetOf(moving.host()) != c.tg {
		t.Fatal("the call did not move to the host's new target")
	}
	close(hold)
	if o := await(t, busySent, 10*time.Second, "after the busy target's request was released"); o.err != nil {
		t.Fatal(o.err)
	}
}
