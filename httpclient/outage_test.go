package httpclient

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
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

// reasons is a slog handler that records the reason of every uncounted
// attempt logged.
type reasons struct {
	mu   sync.Mutex
	seen map[string]int
}

func (r *reasons) Enabled(context.Context, slog.Level) bool { return true }
func (r *reasons) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *reasons) WithGroup(string) slog.Handler            { return r }
func (r *reasons) Handle(_ context.Context, rec slog.Record) error {
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == "reason" {
			r.mu.Lock()
			if r.seen == nil {
				r.seen = make(map[string]int)
			}
			r.seen[a.Value.String()]++
			r.mu.Unlock()
		}
		return true
	})
	return nil
}

func (r *reasons) count(reason string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen[reason]
}

func (r *reasons) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return fmt.Sprint(r.seen)
}

// newOutageSender is newTestSender with a logger that records the reasons
// of uncounted attempts.
func newOutageSender(t testing.TB, h config.HTTP) (*Sender, *telemetry.Metrics, *reasons) {
	t.Helper()
	m := telemetry.NewMetrics()
	r := &reasons{}
	s := New(Options{HTTP: h, Version: "9.9.9", Metrics: m, Logger: slog.New(r)})
	t.Cleanup(s.Close)
	return s, m, r
}

// driver makes the attempts of one Call in a goroutine and waits out the
// backoffs, as the dispatcher does. It publishes the attempts made and
// counted after every attempt.
type driver struct {
	attempts, counted atomic.Int64
	ended             atomic.Bool
	done              chan Step
}

func drive(t testing.TB, s *Sender, r *filters.Request) *driver {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &driver{done: make(chan Step, 1)}
	exited := make(chan struct{})
	t.Cleanup(func() { cancel(); <-exited })
	go func() {
		defer close(exited)
		var c Call
		c.Reset(r, "k")
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

// closedAddr returns a local address nothing listens on (connections are
// refused) and a function that starts serving h there.
func closedAddr(t *testing.T) (string, func(h http.Handler)) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr, func(h http.Handler) {
		t.Helper()
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Skipf("port %s was taken meanwhile: %v", addr, err)
		}
		srv := &http.Server{Handler: h}
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { _ = srv.Close() })
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
			s, m, why := newOutageSender(t, h)

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
			if why.count(uncountedConnection)+why.count(uncountedTargetFailing) == 0 {
				t.Fatalf("uncounted reasons logged: %v", why)
			}
			if breaker && why.count(uncountedProbe) == 0 {
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
	s, m, why := newOutageSender(t, h)
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
	if why.count(uncountedProbe) < 10 {
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

// TestRefusedLoneCallKeepsRetrying: one call to a target that refuses
// connections, nothing else going on: no request reaches the target, so no
// attempt counts, with or without a breaker (which that call opens on its
// own); once the target is up it is delivered.
func TestRefusedLoneCallKeepsRetrying(t *testing.T) {
	for _, breaker := range []bool{false, true} {
		t.Run(map[bool]string{true: "breaker", false: "no breaker"}[breaker], func(t *testing.T) {
			addr, serve := closedAddr(t)
			h := baseHTTP()
			if breaker {
				h = breakerHTTP(10 * time.Millisecond)
				h.Breaker.ConsecutiveFailures = 2
			}
			h.Retry.MaxAttempts = 3
			s, m, why := newOutageSender(t, h)
			x := drive(t, s, post("http://"+addr+"/x", []byte("x")))
			waitFor(t, 20*time.Second, "10 refused attempts", func() bool { return x.made(t, "x", 10) })
			x.running(t, "x")
			if got := x.counted.Load(); got != 0 {
				t.Fatalf("%d refused attempts counted, want none", got)
			}
			serve(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
			x.delivered(t, "x")
			if got := uncounted(t, m, addr); got < 10 {
				t.Fatalf("uncounted attempts %v, want >= 10", got)
			}
			if why.count(uncountedConnection) < 10 {
				t.Fatalf("uncounted reasons %v, want >= 10 connection", why)
			}
		})
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
	s, m, _ := newOutageSender(t, h)
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
			s, m, why := newOutageSender(t, h)
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
				t.Fatalf("uncounted attempts %v (%v), want none", got, why)
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
	s, m, _ := newOutageSender(t, h)
	type out struct {
		res Result
		err error
	}
	results := make(chan out, 2)
	for _, k := range []string{"a", "b"} {
		go func() {
			res, err := s.Send(context.Background(), post(rec.URL+"/"+k, nil), k)
			results <- out{res, err}
		}()
	}
	waitFor(t, 20*time.Second, "10 answers 503 each", func() bool { return hitsA.Load() >= 10 && hitsB.Load() >= 10 })
	select {
	case o := <-results:
		t.Fatalf("a Send ended during the outage: %+v, %v", o.res, o.err)
	default:
	}
	up.Store(true)
	for range 2 {
		select {
		case o := <-results:
			if o.err != nil || o.res.Attempts <= 2 || o.res.Counted > 2 {
				t.Fatalf("result %+v, err %v; want success after more than 2 attempts, at most 2 counted", o.res, o.err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("Sends not done after the target recovered")
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

// TestUnavailableLoneCallKeepsRetrying: a lone call on an otherwise idle
// target answered 503 (or 429, 502, 504: "cannot serve anyone now") spends
// no attempt, with or without a breaker, and is delivered once the target
// recovers; a 500 in the same place counts (TestPoisonOnHealthyTargetIsFailed).
func TestUnavailableLoneCallKeepsRetrying(t *testing.T) {
	for _, breaker := range []bool{false, true} {
		t.Run(map[bool]string{true: "breaker", false: "no breaker"}[breaker], func(t *testing.T) {
			var up atomic.Bool
			rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
				if !up.Load() {
					w.WriteHeader([]int{503, 429, 502, 504}[n%4])
				}
			})
			h := baseHTTP()
			if breaker {
				h = breakerHTTP(10 * time.Millisecond)
				h.Breaker.ConsecutiveFailures = 2
			}
			h.Retry.MaxAttempts = 3
			s, m, why := newOutageSender(t, h)
			x := drive(t, s, post(rec.URL+"/x", []byte("x")))
			waitFor(t, 20*time.Second, "12 unavailable answers", func() bool { return x.made(t, "x", 12) })
			x.running(t, "x")
			if got := x.counted.Load(); got != 0 {
				t.Fatalf("%d unavailable answers counted, want none", got)
			}
			up.Store(true)
			x.delivered(t, "x")
			if got := uncounted(t, m, rec.host()); got < 12 {
				t.Fatalf("uncounted attempts %v, want >= 12", got)
			}
			if why.count(uncountedUnavailable) == 0 {
				t.Fatalf("uncounted reasons %v, want some unavailable", why)
			}
		})
	}
}

// lines is a slog handler that keeps every record at warn or above as
// "message key=value ...".
type lines struct {
	mu  sync.Mutex
	got []string
}

func (l *lines) Enabled(_ context.Context, lv slog.Level) bool { return lv >= slog.LevelWarn }
func (l *lines) WithAttrs([]slog.Attr) slog.Handler            { return l }
func (l *lines) WithGroup(string) slog.Handler                 { return l }
func (l *lines) Handle(_ context.Context, rec slog.Record) error {
	s := rec.Message
	rec.Attrs(func(a slog.Attr) bool { s += " " + a.Key + "=" + a.Value.String(); return true })
	l.mu.Lock()
	l.got = append(l.got, s)
	l.mu.Unlock()
	return nil
}

func (l *lines) with(substr ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
next:
	for _, s := range l.got {
		for _, sub := range substr {
			if !strings.Contains(s, sub) {
				continue next
			}
		}
		out = append(out, s)
	}
	return out
}

// TestRefusedConnectionsAreExplained: a target that refuses connections
// is logged once per run of failures, with the URL and the cause, and the
// breaker's opening names the last failure.
func TestRefusedConnectionsAreExplained(t *testing.T) {
	addr, _ := closedAddr(t)
	h := breakerHTTP(10 * time.Millisecond)
	h.Breaker.ConsecutiveFailures = 2
	h.Retry.MaxAttempts = 0
	l := &lines{}
	s := New(Options{HTTP: h, Version: "9.9.9", Metrics: telemetry.NewMetrics(), Logger: slog.New(l)})
	t.Cleanup(s.Close)
	x := drive(t, s, post("http://"+addr+"/orders", []byte("x")))
	waitFor(t, 20*time.Second, "8 refused attempts", func() bool { return x.made(t, "x", 8) })
	failing := l.with("target failing", "host="+addr, "http://"+addr+"/orders", "connection refused")
	if len(failing) != 1 {
		t.Fatalf("%d 'target failing' lines naming the URL and the cause, want 1 (rate-limited):\n%s",
			len(failing), strings.Join(l.with("target failing"), "\n"))
	}
	if opened := l.with("circuit breaker opened", "host="+addr, "last_failure=", "connection refused"); len(opened) == 0 {
		t.Fatalf("no breaker-open line names the last failure; lines:\n%s", strings.Join(l.with(""), "\n"))
	}
}
