package httpclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Tests of "Outages are not poison": which failed attempts count toward
// max_attempts.

// logBuffer keeps what a text slog handler writes; it is safe for the
// handler's concurrent writes and the test's reads.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// lines returns the lines written so far that contain every one of substr.
func (b *logBuffer) lines(substr ...string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
next:
	for _, l := range strings.Split(b.b.String(), "\n") {
		if l == "" {
			continue
		}
		for _, s := range substr {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

// reasons counts the uncounted attempts logged, by reason.
func (b *logBuffer) reasons() map[string]int {
	n := make(map[string]int)
	for _, l := range b.lines(" reason=") {
		_, v, _ := strings.Cut(l, " reason=")
		v, _, _ = strings.Cut(v, " ")
		n[v]++
	}
	return n
}

// newLoggedSender is newTestSender with every log line, debug included,
// kept in a logBuffer: the reasons of uncounted attempts among them.
func newLoggedSender(t testing.TB, h config.HTTP) (*Sender, *telemetry.Metrics, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	s, m := newSenderWith(t, Options{HTTP: h,
		Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	return s, m, logs
}

// driver makes the attempts of one Call in a goroutine and waits out the
// backoffs, as the dispatcher does. It publishes the attempts made and
// counted after every attempt.
type driver struct {
	attempts, counted atomic.Int64
	ended             atomic.Bool
	done              chan Step
}

// driven numbers the calls drive makes.
var driven atomic.Int64

func drive(t testing.TB, s *Sender, r *filters.Request) *driver {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &driver{done: make(chan Step, 1)}
	exited := make(chan struct{})
	t.Cleanup(func() { cancel(); <-exited })
	go func() {
		defer close(exited)
		var c Call
		c.Reset(r, "k"+strconv.FormatInt(driven.Add(1), 10)) // each driven call is a message of its own
		timer := time.NewTimer(time.Hour)
		defer timer.Stop()
		for {
			st := s.Attempt(ctx, &c)
			d.attempts.Store(int64(c.Attempts()))
			d.counted.Store(int64(c.Counted()))
			if st.Outcome != Retry {
				d.ended.Store(true)
				d.done <- st
				return
			}
			timer.Reset(st.After)
			select {
			case <-ctx.Done():
				d.done <- Step{Outcome: Canceled, Err: ctx.Err()}
				return
			case <-timer.C:
			}
		}
	}()
	return d
}

// made reports whether d's call made n attempts; it fails the test if the
// call ended.
func (d *driver) made(t testing.TB, name string, n int64) bool {
	t.Helper()
	if d.ended.Load() {
		d.running(t, name)
	}
	return d.attempts.Load() >= n
}

// running fails the test if d's call has ended.
func (d *driver) running(t testing.TB, name string) {
	t.Helper()
	select {
	case st := <-d.done:
		t.Fatalf("call %s ended during the outage: outcome %d, %v (%d attempts, %d counted)",
			name, st.Outcome, st.Err, d.attempts.Load(), d.counted.Load())
	default:
	}
}

// delivered waits for d's call to end and fails the test unless it was
// delivered.
func (d *driver) delivered(t testing.TB, name string) {
	t.Helper()
	select {
	case st := <-d.done:
		if st.Outcome != Delivered {
			t.Fatalf("call %s: outcome %d, %v; want Delivered", name, st.Outcome, st.Err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("call %s not delivered after the target recovered", name)
	}
}

func uncounted(t testing.TB, m *telemetry.Metrics, host string) float64 {
	return metricValue(t, m, "orderly_http_attempts_uncounted_total", map[string]string{"host": host})
}

// TestOutageOfTwoCallsSpendsNoAttempts: the target refuses connections, then
// answers 503, then recovers. Two calls with max_attempts 3 go on attempting
// far beyond 3 attempts (through breaker probes and open periods) and are
// both delivered once the target recovers.
func TestOutageOfTwoCallsSpendsNoAttempts(t *testing.T) {
	for _, breaker := range []bool{true, false} {
		t.Run(map[bool]string{true: "breaker", false: "no breaker"}[breaker], func(t *testing.T) {
			addr, serve := closedAddr(t)
			h := baseHTTP()
			if breaker {
				h = breakerHTTP(20 * time.Millisecond)
			}
			h.Retry.MaxAttempts = 3
			s, m, logs := newLoggedSender(t, h)

			a := drive(t, s, post("http://"+addr+"/a", []byte("a")))
			b := drive(t, s, post("http://"+addr+"/b", []byte("b")))
			waitFor(t, 20*time.Second, "10 refused attempts each", func() bool {
				return a.made(t, "a", 10) && b.made(t, "b", 10)
			})
			a.running(t, "a")
			b.running(t, "b")

			var up atomic.Bool
			var hits atomic.Int64
			serve(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				hits.Add(1)
				if !up.Load() {
					w.WriteHeader(http.StatusServiceUnavailable)
				}
			}))
			waitFor(t, 20*time.Second, "10 answers 503 and 20 attempts each", func() bool {
				return a.made(t, "a", 20) && b.made(t, "b", 20) && hits.Load() >= 10
			})
			a.running(t, "a")
			b.running(t, "b")
			if ca, cb := a.counted.Load(), b.counted.Load(); ca >= 3 || cb >= 3 {
				t.Fatalf("counted attempts a=%d b=%d during the outage, want < 3", ca, cb)
			}

			up.Store(true)
			a.delivered(t, "a")
			b.delivered(t, "b")
			if got := uncounted(t, m, addr); got < 30 {
				t.Fatalf("uncounted attempts %v, want >= 30", got)
			}
			why := logs.reasons()
			if why[uncountedConnection]+why[uncountedTargetFailing] == 0 {
				t.Fatalf("uncounted reasons logged: %v", why)
			}
			if breaker && why[uncountedProbe] == 0 {
				t.Fatalf("no probe among the uncounted reasons: %v", why)
			}
		})
	}
}

// TestHalfOpenProbesDoNotCount: two calls fail and open the breaker; one of
// them then probes the target period after period, always failing: its
// probes spend no attempt. After a probe of another call succeeded, the
// next failed probe is still not counted (it is a probe after an open
// period several calls caused); once the breaker reopened on that call's
// failure alone, its probes count.
func TestHalfOpenProbesDoNotCount(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		if r.URL.Path != "/good" {
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
	h := breakerHTTP(10 * time.Millisecond)
	h.Breaker.MinRequests = 1000 // the ratio rule out of reach
	h.Breaker.ConsecutiveFailures = 2
	h.Breaker.HalfOpenRequests = 2
	h.Retry.MaxAttempts = 2
	s, m, logs := newLoggedSender(t, h)
	ctx := context.Background()

	var a, b Call
	a.Reset(post(rec.URL+"/a", nil), "a")
	b.Reset(post(rec.URL+"/b", nil), "b")
	if st := s.Attempt(ctx, &a); st.Outcome != Retry || a.Counted() != 1 {
		t.Fatalf("a's first failure: outcome %d, counted %d; want Retry, 1 (nothing shows an outage yet)", st.Outcome, a.Counted())
	}
	if st := s.Attempt(ctx, &b); st.Outcome != Retry || b.Counted() != 0 {
		t.Fatalf("b's failure after a's: outcome %d, counted %d; want Retry, 0", st.Outcome, b.Counted())
	}
	if st := breakerState(t, m, rec.host()); st != telemetry.BreakerOpen {
		t.Fatalf("breaker state %v after 2 consecutive failures, want open", st)
	}
	for i := range 10 {
		st := s.Attempt(ctx, &a) // waits for the half-open period: a probe
		if st.Outcome != Retry {
			t.Fatalf("probe %d of a: outcome %d, %v; want Retry", i, st.Outcome, st.Err)
		}
	}
	if a.Attempts() != 11 || a.Counted() != 1 {
		t.Fatalf("a: %d attempts, %d counted; want 11 attempts, 1 counted", a.Attempts(), a.Counted())
	}
	if why := logs.reasons(); why[uncountedProbe] < 10 {
		t.Fatalf("uncounted reasons %v, want 10 probes", why)
	}

	// A probe of another call succeeds (the target answers it); a's probe
	// in the same half-open period fails: still a probe after an open
	// period a alone did not cause.
	var g Call
	g.Reset(post(rec.URL+"/good", nil), "g")
	if st := s.Attempt(ctx, &g); st.Outcome != Delivered {
		t.Fatalf("good probe: outcome %d, %v", st.Outcome, st.Err)
	}
	if st := s.Attempt(ctx, &a); st.Outcome != Retry || a.Counted() != 1 {
		t.Fatalf("a's probe after a good one: outcome %d, counted %d; want Retry, 1", st.Outcome, a.Counted())
	}
	// The breaker reopened on a's failure alone (the only one since the
	// good answer): from now on a's probes test a, and count.
	g.Reset(post(rec.URL+"/good", nil), "g")
	if st := s.Attempt(ctx, &g); st.Outcome != Delivered {
		t.Fatalf("good probe: outcome %d, %v", st.Outcome, st.Err)
	}
	st := s.Attempt(ctx, &a)
	if st.Outcome != Failed || !errors.Is(st.Err, ErrRetriesExhausted) || a.Counted() != 2 {
		t.Fatalf("a's probe after it alone reopened the breaker: outcome %d, %v, counted %d; want Failed (exhausted), 2",
			st.Outcome, st.Err, a.Counted())
	}
	if e := asError(t, st.Err); e.Attempts != 13 || e.Counted != 2 || !strings.Contains(e.Error(), "13 attempts, 2 counted") {
		t.Fatalf("error %q: attempts %d, counted %d; want 13, 2", e.Error(), e.Attempts, e.Counted)
	}
}

// TestLoneCallOutageSpendsNoAttempts: one call, nothing else going on, to a
// target that refuses connections (no request reaches it) or answers 503,
// 429, 502 or 504 ("cannot serve anyone now"): no attempt counts, with or
// without a breaker (which that call opens on its own), and the call is
// delivered once the target is up. A 500 in the same place counts
// (TestPoisonOnHealthyTargetIsFailed).
func TestLoneCallOutageSpendsNoAttempts(t *testing.T) {
	for _, tc := range []struct {
		name      string
		attempts  int64  // made during the outage, none counted
		reason    string // logged for at least minLogged of them
		minLogged int
		target    func(t *testing.T) (url, host string, up func()) // failing until up
	}{
		{"refused", 10, uncountedConnection, 10, func(t *testing.T) (string, string, func()) {
			addr, serve := closedAddr(t)
			return "http://" + addr, addr, func() { serve(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})) }
		}},
		{"unavailable", 12, uncountedUnavailable, 1, func(t *testing.T) (string, string, func()) {
			var up atomic.Bool
			rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
				if !up.Load() {
					w.WriteHeader([]int{503, 429, 502, 504}[n%4])
				}
			})
			return rec.URL, rec.host(), func() { up.Store(true) }
		}},
	} {
		for _, breaker := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/breaker=%t", tc.name, breaker), func(t *testing.T) {
				url, host, up := tc.target(t)
				h := baseHTTP()
				if breaker {
					h = breakerHTTP(10 * time.Millisecond)
					h.Breaker.ConsecutiveFailures = 2
				}
				h.Retry.MaxAttempts = 3
				s, m, logs := newLoggedSender(t, h)
				x := drive(t, s, post(url+"/x", []byte("x")))
				waitFor(t, 20*time.Second, fmt.Sprint(tc.attempts, " failed attempts"), func() bool { return x.made(t, "x", tc.attempts) })
				x.running(t, "x")
				if got := x.counted.Load(); got != 0 {
					t.Fatalf("%d failed attempts counted, want none", got)
				}
				up()
				x.delivered(t, "x")
				if got := uncounted(t, m, host); got < float64(tc.attempts) {
					t.Fatalf("uncounted attempts %v, want >= %d", got, tc.attempts)
				}
				if why := logs.reasons(); why[tc.reason] < tc.minLogged {
					t.Fatalf("uncounted reasons %v, want >= %d %s", why, tc.minLogged, tc.reason)
				}
			})
		}
	}
}

// TestConnectionFailuresCountOnceTheTargetAnswered: a call whose connections
// are refused while the target answered another call since its first
// failure counts its attempts, even when that other traffic stops. (The
// two requests share the target through filters.Request.Target but not the
// address: the test's way to refuse one and answer the other.)
func TestConnectionFailuresCountOnceTheTargetAnswered(t *testing.T) {
	rec := newRecorder(t, nil)
	addr, _ := closedAddr(t)
	h := baseHTTP()
	h.Retry.MaxAttempts = 3
	s, m := newTestSender(t, h, nil)
	ctx := context.Background()
	xr := post("http://"+addr+"/x", nil)
	xr.Target = rec.host()

	var x, g Call
	x.Reset(xr, "x")
	if st := s.Attempt(ctx, &x); st.Outcome != Retry || x.Counted() != 0 {
		t.Fatalf("first refused attempt: outcome %d, counted %d; want Retry, 0", st.Outcome, x.Counted())
	}
	g.Reset(post(rec.URL, nil), "g")
	if st := s.Attempt(ctx, &g); st.Outcome != Delivered {
		t.Fatalf("other call: outcome %d, %v", st.Outcome, st.Err)
	}
	var st Step
	for i := range 3 {
		if st = s.Attempt(ctx, &x); x.Counted() != i+1 {
			t.Fatalf("refused attempt after the target answered: counted %d, want %d", x.Counted(), i+1)
		}
	}
	if st.Outcome != Failed || !errors.Is(st.Err, ErrRetriesExhausted) || x.Attempts() != 4 {
		t.Fatalf("outcome %d, %v after %d attempts; want Failed (exhausted) after 4", st.Outcome, st.Err, x.Attempts())
	}
	if got := uncounted(t, m, rec.host()); got != 1 {
		t.Fatalf("uncounted attempts %v, want 1", got)
	}
}

// TestPoisonOnHealthyTargetIsFailed: a call answered 500 while other calls
// to the target get 200s exhausts max_attempts with every attempt counted;
// so does a lone call answered 500 by an otherwise idle target, with no
// breaker, and with a breaker it trips on its own.
func TestPoisonOnHealthyTargetIsFailed(t *testing.T) {
	respond := func(w http.ResponseWriter, r *http.Request, _ int) {
		if r.URL.Path == "/poison" {
			w.WriteHeader(http.StatusInternalServerError)
		}
	}
	for _, tc := range []struct {
		name  string
		h     func() config.HTTP
		good  int // good calls before each attempt of the poison call
		alone bool
	}{
		{"interleaved, no breaker", baseHTTP, 1, false},
		// Failure ratio 0.5 over >= 5 requests: the poison call's third
		// failure trips the breaker, which it alone made fail.
		{"interleaved, breaker", func() config.HTTP { return breakerHTTP(10 * time.Millisecond) }, 1, false},
		{"interleaved, breaker, several good", func() config.HTTP { return breakerHTTP(10 * time.Millisecond) }, 3, false},
		{"alone, no breaker", baseHTTP, 0, true},
		{"alone, breaker tripped by it", func() config.HTTP {
			h := breakerHTTP(10 * time.Millisecond)
			h.Breaker.ConsecutiveFailures = 2
			return h
		}, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder(t, respond)
			h := tc.h()
			h.Retry.MaxAttempts = 3
			s, m, logs := newLoggedSender(t, h)
			ctx := context.Background()
			var p Call
			p.Reset(post(rec.URL+"/poison", nil), "p")
			var st Step
			for i := 0; i < 3; i++ {
				for range tc.good {
					var g Call
					g.Reset(post(rec.URL+"/ok", nil), "g")
					if gs := s.Attempt(ctx, &g); gs.Outcome != Delivered {
						t.Fatalf("good call: outcome %d, %v", gs.Outcome, gs.Err)
					}
				}
				st = s.Attempt(ctx, &p)
				if i < 2 && st.Outcome != Retry {
					t.Fatalf("attempt %d: outcome %d, %v; want Retry", i+1, st.Outcome, st.Err)
				}
			}
			if st.Outcome != Failed || !errors.Is(st.Err, ErrRetriesExhausted) {
				t.Fatalf("outcome %d, %v; want Failed, retries exhausted", st.Outcome, st.Err)
			}
			if e := asError(t, st.Err); e.Attempts != 3 || e.Counted != 3 || e.Status != 500 || !e.Permanent {
				t.Fatalf("error %+v; want permanent, 3 attempts, 3 counted, status 500", e)
			}
			if got := uncounted(t, m, rec.host()); got != 0 {
				t.Fatalf("uncounted attempts %v (%v), want none", got, logs.reasons())
			}
		})
	}
}

// TestSendFollowsTheRule: Send counts attempts as Attempt does. Two Sends
// through a 503 outage both succeed, far beyond max_attempts; a Send
// answered 500 while other requests succeed fails after max_attempts.
func TestSendFollowsTheRule(t *testing.T) {
	var up atomic.Bool
	var hitsA, hitsB atomic.Int64
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		switch r.URL.Path {
		case "/a":
			hitsA.Add(1)
		case "/b":
			hitsB.Add(1)
		}
		switch {
		case r.URL.Path == "/poison":
			w.WriteHeader(http.StatusInternalServerError)
		case !up.Load():
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	h := baseHTTP()
	h.Retry.MaxAttempts = 2
	s, m := newTestSender(t, h, nil)
	var results []<-chan sent
	for _, k := range []string{"a", "b"} {
		results = append(results, sendAsync(context.Background(), s, post(rec.URL+"/"+k, nil), k))
	}
	waitFor(t, 20*time.Second, "10 answers 503 each", func() bool { return hitsA.Load() >= 10 && hitsB.Load() >= 10 })
	for _, ch := range results {
		select {
		case o := <-ch:
			t.Fatalf("a Send ended during the outage: %+v, %v", o.res, o.err)
		default:
		}
	}
	up.Store(true)
	for _, ch := range results {
		if o := await(t, ch, 20*time.Second, "after the target recovered"); o.err != nil || o.res.Attempts <= 2 || o.res.Counted > 2 {
			t.Fatalf("result %+v, err %v; want success after more than 2 attempts, at most 2 counted", o.res, o.err)
		}
	}
	if got := uncounted(t, m, rec.host()); got == 0 {
		t.Fatal("no uncounted attempts during the outage")
	}

	// Poison while the target answers other requests.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := s.Send(context.Background(), post(rec.URL+"/ok", nil), "g"); err != nil {
				t.Errorf("good request: %v", err)
				return
			}
		}
	})
	res, err := s.Send(context.Background(), post(rec.URL+"/poison", nil), "p")
	close(stop)
	wg.Wait()
	if !IsPermanent(err) || !errors.Is(err, ErrRetriesExhausted) || res.Attempts != 2 || res.Counted != 2 {
		t.Fatalf("poison: result %+v, err %v; want permanent, retries exhausted, 2 attempts counted", res, err)
	}
}

// TestFailingTargetIsExplained: while a target refuses connections (a
// listener that was closed), its first failure is logged at warn with the
// URL and the cause, the breaker's opening names the last failure, and the
// failures are then summarized at warn, at most once per interval (the
// first line's included): host, the last error, how many calls wait for it
// and for how long it has been failing. Once it answers, the calls
// delivered leave its waiting calls.
func TestFailingTargetIsExplained(t *testing.T) {
	addr, serve := closedAddr(t)
	h := breakerHTTP(20 * time.Millisecond)
	h.Breaker.ConsecutiveFailures = 2
	h.Retry.MaxAttempts = 0
	s, _, logs := newLoggedSender(t, h)
	const every = 300 * time.Millisecond
	s.failingEvery = every // before the first attempt

	start := time.Now()
	x := drive(t, s, post("http://"+addr+"/orders", []byte("x")))
	y := drive(t, s, post("http://"+addr+"/orders", []byte("y")))
	summary := []string{"level=WARN", `msg="target still failing`, "host=" + addr,
		"connection refused", "waiting_calls=2", "failing_for="}
	waitFor(t, 20*time.Second, "a summary naming the host, the error and 2 waiting calls", func() bool {
		x.running(t, "x")
		y.running(t, "y")
		return len(logs.lines(summary...)) >= 2
	})
	elapsed := time.Since(start)
	t.Logf("summary: %s", logs.lines(summary...)[0])
	if l := logs.lines(summary...)[1]; strings.Contains(l, "failing_for=0s") {
		t.Fatalf("the second summary says failing_for=0s: %s", l)
	}
	first := logs.lines("level=WARN", "target failing", "host="+addr, "http://"+addr+"/orders", "connection refused")
	if len(first) != 1 {
		t.Fatalf("%d 'target failing' lines naming the URL and the cause, want 1:\n%s",
			len(first), strings.Join(logs.lines("level=WARN"), "\n"))
	}
	if opened := logs.lines("level=WARN", "circuit breaker opened", "host="+addr, "last_failure=", "connection refused"); len(opened) == 0 {
		t.Fatalf("no breaker-open line names the last failure; lines:\n%s", strings.Join(logs.lines("level=WARN"), "\n"))
	}
	// The first line and the summaries share one interval per target.
	logged := len(first) + len(logs.lines("target still failing"))
	if most := int(elapsed/every) + 1; logged > most {
		t.Fatalf("%d lines about the failing target in %s, want at most %d (one per %s):\n%s",
			logged, elapsed, most, every, strings.Join(logs.lines("level=WARN"), "\n"))
	}

	serve(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	x.delivered(t, "x")
	y.delivered(t, "y")
	if _, since, waiting := s.targetOf(addr).failingSummary(time.Now()); waiting != 0 || !since.IsZero() {
		t.Fatalf("after delivery: %d waiting calls, failing since %v; want none, not failing", waiting, since)
	}
}

// TestPoisonSentAgainAfterARevokeIsFailed: a poison message's call is
// abandoned mid-backoff (its partition revoked, the call never ended), and
// the message comes back in a new call with the same Idempotency-Key. Its
// failures are still one call's: they count, and the message fails after
// max_attempts. Before, the abandoned call stayed the target's first
// failing call, the new one looked like a second failing call (the target
// down), and nothing counted on an otherwise idle target: retried for ever.
func TestPoisonSentAgainAfterARevokeIsFailed(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(http.StatusInternalServerError) })
	h := baseHTTP()
	h.Retry.MaxAttempts = 3
	s, m, logs := newLoggedSender(t, h)
	ctx := context.Background()
	var first Call
	first.Reset(post(rec.URL+"/poison", nil), "orders-0-7-0")
	if st := s.Attempt(ctx, &first); st.Outcome != Retry {
		t.Fatalf("first call: %v %v, want Retry", st.Outcome, st.Err)
	}
	// first is abandoned here: no further attempt, never ended.
	var again Call
	again.Reset(post(rec.URL+"/poison", nil), "orders-0-7-0")
	var st Step
	for i := range 10 {
		if st = s.Attempt(ctx, &again); st.Outcome != Retry {
			break
		}
		if i == 9 {
			t.Fatalf("still retried after 10 attempts (%v uncounted: %v)", uncounted(t, m, rec.host()), logs.reasons())
		}
	}
	if st.Outcome != Failed || !errors.Is(st.Err, ErrRetriesExhausted) {
		t.Fatalf("outcome %d, %v; want Failed, retries exhausted", st.Outcome, st.Err)
	}
}
