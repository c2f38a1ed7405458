package httpclient

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// flowSender is a Sender with the one named target "t" (base_url: srv) and
// its metrics.
func flowSender(t testing.TB, h config.HTTP, target config.Target) (*Sender, *telemetry.Metrics) {
	t.Helper()
	target.Name = "t"
	if target.BaseURL == "" {
		target.BaseURL = "http://127.0.0.1"
	}
	ts, err := LoadTargets([]config.Target{target})
	if err != nil {
		t.Fatal(err)
	}
	return newSenderWith(t, Options{HTTP: h, Targets: ts})
}

// countingHandler counts requests and the most under way at once; each
// waits for delay.
type countingHandler struct {
	delay                time.Duration
	hits, now, maxAtOnce atomic.Int64
	status               atomic.Int64 // 0: 200
}

func (h *countingHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	h.hits.Add(1)
	n := h.now.Add(1)
	defer h.now.Add(-1)
	for {
		m := h.maxAtOnce.Load()
		if n <= m || h.maxAtOnce.CompareAndSwap(m, n) {
			break
		}
	}
	if h.delay > 0 {
		time.Sleep(h.delay)
	}
	if st := h.status.Load(); st != 0 {
		w.WriteHeader(int(st))
	}
}

func flowServer(t testing.TB, h *countingHandler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv.URL
}

// driveStats is what drive saw.
type driveStats struct {
	delivered, retries, attempts atomic.Int64
	// uncountedRetry: a Retry whose call made no attempt for it and
	// counted none (the waits of flow control).
	uncountedRetry atomic.Int64
}

// driveFor runs callers goroutines that deliver requests to target "t" at
// url until ctx ends, waiting out every Retry as the dispatcher's parked
// lane would (here on a timer in the caller's goroutine).
func driveFor(ctx context.Context, s *Sender, url string, callers int) *driveStats {
	st := &driveStats{}
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			var c Call
			c.Reset(to("t", url+"/x", []byte(`{}`)), "k")
			for ctx.Err() == nil {
				before, counted := c.Attempts(), c.Counted()
				// Attempts run to their end: the server's count and ours agree.
				step := s.Attempt(context.Background(), &c)
				st.attempts.Add(int64(c.Attempts() - before))
				switch step.Outcome {
				case Delivered:
					st.delivered.Add(1)
					c.Reset(to("t", url+"/x", []byte(`{}`)), "k")
				case Retry:
					st.retries.Add(1)
					if c.Attempts() == before && c.Counted() == counted {
						st.uncountedRetry.Add(1)
					}
					t := time.NewTimer(step.After)
					select {
					case <-ctx.Done():
					case <-t.C:
					}
					t.Stop()
				default:
					c.Reset(to("t", url+"/x", []byte(`{}`)), "k")
				}
			}
		})
	}
	wg.Wait()
	return st
}

// TestRateLimit: a target with rate 50 and burst 5 driven by 8 callers for
// 2 s sees at most the burst plus the rate (with a generous margin), and
// the waits for tokens were Retry steps that made and counted no attempt.
func TestRateLimit(t *testing.T) {
	srv := &countingHandler{}
	url := flowServer(t, srv)
	start := time.Now()
	s, m := flowSender(t, baseHTTP(), config.Target{Rate: 50, Burst: 5})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st := driveFor(ctx, s, url, 8)
	elapsed := time.Since(start).Seconds()
	hits := srv.hits.Load()
	if limit := 5 + 50*elapsed*1.2 + 2; float64(hits) > limit {
		t.Fatalf("the server saw %d requests in %.2fs at rate 50 burst 5, want at most %.0f", hits, elapsed, limit)
	}
	if hits < 20 || st.delivered.Load() != hits || st.attempts.Load() != hits {
		t.Fatalf("the server saw %d requests; %d delivered in %d attempts", hits, st.delivered.Load(), st.attempts.Load())
	}
	if st.retries.Load() == 0 || st.uncountedRetry.Load() != st.retries.Load() {
		t.Fatalf("%d Retry steps, %d of them without an attempt: want every wait for a token to spend none", st.retries.Load(), st.uncountedRetry.Load())
	}
	if got := metricValue(t, m, "orderly_target_rate_limited_total", map[string]string{"target": "t"}); got != float64(st.retries.Load()) {
		t.Fatalf("orderly_target_rate_limited_total = %v, want %d (every Retry)", got, st.retries.Load())
	}
	t.Logf("%d requests in %.2fs (%.1f/s), %d waits", hits, elapsed, float64(hits)/elapsed, st.retries.Load())
}

// TestRateLimitHoldsNoGoroutine: an attempt without a token returns Retry
// at once, with the wait for its token, which it reserves: asking again
// early waits for the rest without another wait counted, and the attempt
// after the wait sends.
func TestRateLimitHoldsNoGoroutine(t *testing.T) {
	srv := &countingHandler{}
	url := flowServer(t, srv)
	s, m := flowSender(t, baseHTTP(), config.Target{Rate: 2, Burst: 1})
	if st, _ := attemptOnce(s, to("t", url, nil)); st.Outcome != Delivered {
		t.Fatalf("first attempt: %+v", st)
	}
	var c Call
	c.Reset(to("t", url, nil), "k")
	t0 := time.Now()
	st := s.Attempt(context.Background(), &c)
	if took := time.Since(t0); st.Outcome != Retry || st.After <= 0 || st.After > 500*time.Millisecond || took > 100*time.Millisecond {
		t.Fatalf("attempt without a token: %+v after %v; want Retry at once with a wait up to 500ms", st, took)
	}
	if c.Attempts() != 0 || c.Counted() != 0 || srv.hits.Load() != 1 {
		t.Fatalf("the wait made %d attempts (%d counted), the server saw %d", c.Attempts(), c.Counted(), srv.hits.Load())
	}
	again := s.Attempt(context.Background(), &c)
	if again.Outcome != Retry || again.After > st.After {
		t.Fatalf("asking again early: %+v, want Retry within %v", again, st.After)
	}
	time.Sleep(again.After) // the caller's wait, as a parked lane's timer
	if st := s.Attempt(context.Background(), &c); st.Outcome != Delivered || c.Attempts() != 1 {
		t.Fatalf("attempt on the reserved token: %+v after %d attempts", st, c.Attempts())
	}
	if got := metricValue(t, m, "orderly_target_rate_limited_total", map[string]string{"target": "t"}); got != 1 {
		t.Fatalf("orderly_target_rate_limited_total = %v, want 1", got)
	}
}

// TestSetShareHalvesRate: with half of the partitions, an instance takes
// half of the rate (and of the burst).
func TestSetShareHalvesRate(t *testing.T) {
	srv := &countingHandler{}
	url := flowServer(t, srv)
	start := time.Now()
	s, _ := flowSender(t, baseHTTP(), config.Target{Rate: 50, Burst: 5})
	s.SetShare(0.5)
	s.SetShare(0)   // ignored
	s.SetShare(1.5) // ignored
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st := driveFor(ctx, s, url, 8)
	elapsed := time.Since(start).Seconds()
	hits := srv.hits.Load()
	// 5 tokens were in the bucket when the share cut it to 2.
	if limit := 5 + 25*elapsed*1.2 + 2; float64(hits) > limit || hits < 10 {
		t.Fatalf("the server saw %d requests in %.2fs at share 0.5 of rate 50, want 10 to %.0f", hits, elapsed, limit)
	}
	t.Logf("%d requests in %.2fs (%.1f/s), %d waits", hits, elapsed, float64(hits)/elapsed, st.retries.Load())
}

// TestMaxConcurrency: with max_concurrency 2 a slow server never has more
// than 2 requests of the target at once, and every request is delivered in
// one attempt.
func TestMaxConcurrency(t *testing.T) {
	srv := &countingHandler{delay: 30 * time.Millisecond}
	url := flowServer(t, srv)
	s, m := flowSender(t, baseHTTP(), config.Target{MaxConcurrency: 2})
	var wg sync.WaitGroup
	var delivered atomic.Int64
	for range 6 {
		wg.Go(func() {
			for range 5 {
				res, err := s.Send(context.Background(), to("t", url, nil), "k")
				if err != nil || res.Attempts != 1 {
					t.Errorf("send: %+v, %v", res, err)
				}
				delivered.Add(1)
			}
		})
	}
	wg.Wait()
	if got := srv.maxAtOnce.Load(); got > 2 || got < 1 || delivered.Load() != 30 {
		t.Fatalf("at most %d requests at once (want <= 2), %d delivered", got, delivered.Load())
	}
	if got := metricValue(t, m, "orderly_target_concurrency_limit", map[string]string{"target": "t"}); got != 2 {
		t.Fatalf("orderly_target_concurrency_limit = %v, want 2", got)
	}
}

// TestAdaptiveConcurrency: 429s bring the limit down, successes take it
// back up to max_concurrency, never above.
func TestAdaptiveConcurrency(t *testing.T) {
	srv := &countingHandler{delay: 10 * time.Millisecond}
	srv.status.Store(http.StatusTooManyRequests)
	url := flowServer(t, srv)
	h := baseHTTP()
	h.Retry.MaxAttempts = 0
	s, m := flowSender(t, h, config.Target{MaxConcurrency: 8, AdaptiveConcurrency: true})
	limit := func() float64 {
		return metricValue(t, m, "orderly_target_concurrency_limit", map[string]string{"target": "t"})
	}
	if got := limit(); got != 8 {
		t.Fatalf("limit %v at start, want the ceiling, 8", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); driveFor(ctx, s, url, 12) }()
	defer func() { cancel(); <-done }()
	highest := 0.0
	sample := func() float64 {
		l := limit()
		highest = max(highest, l)
		return l
	}
	waitFor(t, 20*time.Second, "the limit to go down on 429s", func() bool { return sample() <= 3 })
	srv.status.Store(0)
	waitFor(t, 30*time.Second, "the limit to climb back to 8", func() bool { return sample() == 8 })
	if got := highest; got > 8 {
		t.Fatalf("the limit reached %v, above max_concurrency 8", got)
	}
	if got := srv.maxAtOnce.Load(); got > 8 {
		t.Fatalf("the server saw %d requests at once, above max_concurrency 8", got)
	}
}

// TestAdaptiveLimitLatency: an answer much slower than the target's usual
// lowers the limit once per round; 2xx answers with the limit in use raise
// it by 1/limit, up to the ceiling.
func TestAdaptiveLimitLatency(t *testing.T) {
	l := &concurrency{max: 10, adaptive: true, limit: 10, gauge: telemetry.NewMetrics().TargetConcurrencyLimit.WithLabelValues("t")}
	run := func(sig signal, latency time.Duration) {
		t.Helper()
		sl, ok := l.acquire(time.Now())
		if !ok {
			t.Fatalf("no slot at limit %d", l.current())
		}
		sl.end(sig, latency)
	}
	for range 20 {
		run(signalOK, 10*time.Millisecond)
	}
	if got := l.current(); got != 10 {
		t.Fatalf("limit %d after fast answers, want 10", got)
	}
	run(signalOK, 12*time.Millisecond) // within 2x and the slack: not slow
	if got := l.current(); got != 10 {
		t.Fatalf("limit %d after a slightly slower answer, want 10", got)
	}
	run(signalOK, 50*time.Millisecond)
	if got := l.current(); got != 9 {
		t.Fatalf("limit %d after a slow answer, want 9", got)
	}
	// Two attempts under way when the limit is cut: the second's 429 is the
	// same congestion.
	a, _ := l.acquire(time.Now())
	b, _ := l.acquire(time.Now())
	time.Sleep(time.Millisecond)
	a.end(signalOverload, 0)
	b.end(signalOverload, 0)
	if got := l.current(); got != 8 {
		t.Fatalf("limit %d after two 429s of one round, want 8 (9*0.9)", got)
	}
	// One attempt at a time is not the limit in use: no growth.
	before := l.limit
	run(signalOK, 10*time.Millisecond)
	if l.limit != before {
		t.Fatalf("limit %v after a success with 1 of 8 in use, want %v unchanged", l.limit, before)
	}
	for range 100 {
		var held []slot
		for range 5 {
			sl, _ := l.acquire(time.Now())
			held = append(held, sl)
		}
		for i := range held {
			held[i].end(signalOK, 10*time.Millisecond)
		}
	}
	if l.limit != 10 {
		t.Fatalf("limit %v after many successes in use, want the ceiling 10", l.limit)
	}
	for range 100 {
		time.Sleep(10 * time.Microsecond)
		run(signalOverload, 0)
	}
	if l.limit != 1 {
		t.Fatalf("limit %v after many rounds of 429s, want the floor 1", l.limit)
	}
}

// BenchmarkRateAccuracy reports the rate a target with rate 200 (burst 1)
// achieves under 8 callers against a fast local server: achieved/s and its
// ratio to the configured rate.
func BenchmarkRateAccuracy(b *testing.B) {
	const configured = 200.0
	srv := &countingHandler{}
	url := flowServer(b, srv)
	s, _ := flowSender(b, baseHTTP(), config.Target{Rate: configured, Burst: 1})
	var left atomic.Int64
	left.Store(int64(b.N))
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				var c Call
				c.Reset(to("t", url, nil), "k")
				for {
					st := s.Attempt(context.Background(), &c)
					if st.Outcome != Retry {
						break
					}
					time.Sleep(st.After)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	b.StopTimer()
	if b.N > 1 {
		achieved := float64(b.N-1) / elapsed // the first goes on the initial token
		b.ReportMetric(achieved, "req/s")
		b.ReportMetric(achieved/configured, "achieved/configured")
	}
}
