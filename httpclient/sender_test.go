package httpclient

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

func testConfig() config.HTTP {
	c := config.Defaults().HTTP
	c.Timeout.Duration = 2 * time.Second
	c.Retry.InitialBackoff.Duration = time.Millisecond
	c.Retry.MaxBackoff.Duration = 20 * time.Millisecond
	c.Breaker.Enabled = false
	return c
}

func newSender(t *testing.T, c config.HTTP) (*Sender, *telemetry.Metrics) {
	t.Helper()
	m := telemetry.NewMetrics()
	s := New(Options{HTTP: c, Version: "1.2.3", Metrics: m})
	t.Cleanup(s.Close)
	return s, m
}

// server answers with the statuses of script in turn (200 once it runs
// out) and records every request.
type server struct {
	mu     sync.Mutex
	script []int
	header []http.Header
	bodies []string
	times  []time.Time
	hook   func(w http.ResponseWriter, n int) bool // return true when it answered
	*httptest.Server
}

func newServer(t *testing.T, script ...int) *server {
	s := &server{script: script}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		n := len(s.times)
		s.header = append(s.header, r.Header.Clone())
		s.bodies = append(s.bodies, string(b))
		s.times = append(s.times, time.Now())
		st := 200
		if n < len(s.script) {
			st = s.script[n]
		}
		hook := s.hook
		s.mu.Unlock()
		if hook != nil && hook(w, n) {
			return
		}
		w.WriteHeader(st)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.times)
}

func req(url string) *filters.Request {
	return &filters.Request{Method: "POST", URL: url, Header: http.Header{"Content-Type": {"application/json"}}, Body: []byte(`{"a":1}`)}
}

func TestHeadersAndBodyReplayed(t *testing.T) {
	srv := newServer(t, 503, 500, 200)
	s, m := newSender(t, testConfig())
	res, err := s.Send(context.Background(), req(srv.URL+"/x"), "orders-1-42-0")
	if err != nil {
		t.Fatal(err)
	}
	if res.Attempts != 3 || res.Status != 200 {
		t.Fatalf("result %+v, want 3 attempts ending in 200", res)
	}
	for i, h := range srv.header {
		if h.Get("Idempotency-Key") != "orders-1-42-0" || h.Get("User-Agent") != "orderly/1.2.3" || h.Get("Content-Type") != "application/json" {
			t.Fatalf("attempt %d headers: %v", i, h)
		}
		if srv.bodies[i] != `{"a":1}` {
			t.Fatalf("attempt %d body %q: not replayed", i, srv.bodies[i])
		}
	}
	if got := m.Sum("orderly_http_retries_total"); got != 2 {
		t.Fatalf("retries counted %v, want 2", got)
	}
	if got := m.Sum("orderly_http_requests_total"); got != 3 {
		t.Fatalf("requests counted %v, want 3", got)
	}
}

func TestNonRetryableIsPermanentAtOnce(t *testing.T) {
	for _, st := range []int{400, 404, 422, 501} {
		srv := newServer(t, st)
		s, _ := newSender(t, testConfig())
		_, err := s.Send(context.Background(), req(srv.URL), "k")
		var e *Error
		if !errors.As(err, &e) || !e.Permanent || e.Status != st || e.Attempts != 1 {
			t.Fatalf("status %d: error %#v, want permanent after 1 attempt", st, err)
		}
		if srv.count() != 1 {
			t.Fatalf("status %d retried: %d requests", st, srv.count())
		}
	}
}

func TestAttemptsExhausted(t *testing.T) {
	srv := newServer(t, 500, 500, 500, 500, 500, 500)
	c := testConfig()
	c.Retry.MaxAttempts = 4
	s, _ := newSender(t, c)
	_, err := s.Send(context.Background(), req(srv.URL), "k")
	var e *Error
	if !errors.As(err, &e) || !e.Permanent || e.Attempts != 4 || e.Status != 500 {
		t.Fatalf("error %#v, want permanent after 4 attempts with status 500", err)
	}
	if srv.count() != 4 {
		t.Fatalf("%d requests, want 4", srv.count())
	}
}

func TestZeroMaxAttemptsRetriesUntilSuccess(t *testing.T) {
	script := make([]int, 15)
	for i := range script {
		script[i] = 502
	}
	srv := newServer(t, script...)
	c := testConfig()
	c.Retry.MaxAttempts = 0
	s, _ := newSender(t, c)
	res, err := s.Send(context.Background(), req(srv.URL), "k")
	if err != nil || res.Attempts != 16 {
		t.Fatalf("result %+v, err %v; want success on attempt 16", res, err)
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	srv := newServer(t)
	srv.hook = func(w http.ResponseWriter, n int) bool {
		if n == 0 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			return true
		}
		return false
	}
	c := testConfig()
	c.Retry.MaxBackoff.Duration = 5 * time.Second
	s, _ := newSender(t, c)
	if _, err := s.Send(context.Background(), req(srv.URL), "k"); err != nil {
		t.Fatal(err)
	}
	if gap := srv.times[1].Sub(srv.times[0]); gap < 950*time.Millisecond {
		t.Fatalf("second attempt %s after a 429 with Retry-After: 1", gap)
	}
}

func TestRetryAfterDateIsCapped(t *testing.T) {
	srv := newServer(t)
	srv.hook = func(w http.ResponseWriter, n int) bool {
		if n == 0 {
			w.Header().Set("Retry-After", time.Now().Add(time.Hour).UTC().Format(http.TimeFormat))
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	c := testConfig()
	c.Retry.MaxRetryAfter.Duration = 300 * time.Millisecond
	s, _ := newSender(t, c)
	if _, err := s.Send(context.Background(), req(srv.URL), "k"); err != nil {
		t.Fatal(err)
	}
	gap := srv.times[1].Sub(srv.times[0])
	if gap < 250*time.Millisecond {
		t.Fatalf("HTTP-date Retry-After ignored: retried after %s", gap)
	}
	if gap > 30*time.Second {
		t.Fatalf("Retry-After not capped at max_retry_after: %s", gap)
	}
}

func TestConnectionRefusedIsRetried(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // refused until the server below starts
	c := testConfig()
	c.Retry.MaxAttempts = 0
	s, _ := newSender(t, c)
	done := make(chan error, 1)
	go func() {
		_, err := s.Send(context.Background(), req("http://"+addr+"/"), "k")
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // let it fail a few times (not an assertion)
	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port %s taken meanwhile: %v", addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {})}
	go srv.Serve(ln2)
	defer srv.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no success after the server came up")
	}
}

func TestPerAttemptTimeoutIsRetried(t *testing.T) {
	srv := newServer(t)
	srv.hook = func(w http.ResponseWriter, n int) bool {
		if n == 0 {
			time.Sleep(500 * time.Millisecond)
		}
		return false
	}
	c := testConfig()
	c.Timeout.Duration = 100 * time.Millisecond
	s, _ := newSender(t, c)
	res, err := s.Send(context.Background(), req(srv.URL), "k")
	if err != nil || res.Attempts < 2 {
		t.Fatalf("result %+v, err %v; want a retry after the timeout", res, err)
	}
}

func TestCancelIsPromptAndNotPermanent(t *testing.T) {
	srv := newServer(t)
	srv.hook = func(w http.ResponseWriter, n int) bool {
		w.WriteHeader(503)
		return true
	}
	c := testConfig()
	c.Retry.MaxAttempts = 0
	c.Retry.InitialBackoff.Duration = time.Second
	c.Retry.MaxBackoff.Duration = 10 * time.Second
	s, _ := newSender(t, c)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := s.Send(ctx, req(srv.URL), "k")
		done <- err
	}()
	for srv.count() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		if err == nil || IsPermanent(err) || !errors.Is(err, context.Canceled) {
			t.Fatalf("error %v: want a non-permanent context.Canceled", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Send did not return promptly after cancel")
	}
}

// TestBreaker: a failing target opens the breaker; requests then wait
// without reaching the target or spending attempts; after open_timeout it
// half-opens and closes once the target recovers; 4xx never opens it.
func TestBreaker(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	srv := newServer(t)
	srv.hook = func(w http.ResponseWriter, n int) bool {
		if down.Load() {
			w.WriteHeader(503)
			return true
		}
		return false
	}
	c := testConfig()
	c.Breaker = config.Breaker{Enabled: true, FailureRatio: 0.5, MinRequests: 5, ConsecutiveFailures: 0,
		OpenTimeout: config.Duration{Duration: 2 * time.Second}, HalfOpenRequests: 1} // 2 s: the 50 ms look below must fall inside it on a busy machine
	c.Retry.MaxAttempts = 3
	s, m := newSender(t, c)
	host := srv.Listener.Addr().String()
	// One attempt each of 5 calls (sequential Sends would not end: from the
	// second call on the target fails for several calls, which spends no
	// attempt).
	for i := 0; i < 5; i++ {
		var call Call
		call.Reset(req(srv.URL), "k")
		_ = s.Attempt(context.Background(), &call)
	}
	if st := gauge(t, m, host); st != telemetry.BreakerOpen {
		t.Fatalf("breaker state %v after a failing run, want open", st)
	}
	// While open, a request waits: it reaches the target only once the
	// breaker half-opens, and it never fails for the breaker's sake.
	before := srv.count()
	done := make(chan error, 1)
	go func() {
		_, err := s.Send(context.Background(), req(srv.URL), "k")
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // not an assertion: the breaker is open for 2 s
	if srv.count() != before {
		t.Fatalf("a request reached the target while the breaker was open")
	}
	down.Store(false)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("request during an open breaker failed: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("request never went through after recovery")
	}
	waitState(t, m, host, telemetry.BreakerClosed)

	// 400s are answers, not failures: the breaker stays closed.
	bad := newServer(t)
	bad.hook = func(w http.ResponseWriter, n int) bool { w.WriteHeader(400); return true }
	for i := 0; i < 20; i++ {
		_, _ = s.Send(context.Background(), req(bad.URL), "k")
	}
	if st := gauge(t, m, bad.Listener.Addr().String()); st != telemetry.BreakerClosed {
		t.Fatalf("400s opened the breaker (state %v)", st)
	}
}

func waitState(t *testing.T, m *telemetry.Metrics, host string, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for gauge(t, m, host) != want {
		if time.Now().After(deadline) {
			t.Fatalf("breaker state %v, want %v", gauge(t, m, host), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func gauge(t *testing.T, m *telemetry.Metrics, host string) float64 {
	t.Helper()
	g, err := m.BreakerState.GetMetricWithLabelValues(host)
	if err != nil {
		t.Fatal(err)
	}
	return readGauge(g)
}

// TestMaxConnAgeRecycles: with max_conn_age, a steady sequence of requests
// uses several connections; without it, one.
func TestMaxConnAgeRecycles(t *testing.T) {
	for _, tc := range []struct {
		age      time.Duration
		wantMany bool
	}{{200 * time.Millisecond, true}, {0, false}} {
		var conns atomic.Int64
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
		srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				conns.Add(1)
			}
		}
		srv.Start()
		c := testConfig()
		c.MaxConnAge.Duration = tc.age
		s, _ := newSender(t, c)
		end := time.Now().Add(time.Second)
		for time.Now().Before(end) {
			if _, err := s.Send(context.Background(), req(srv.URL), "k"); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		srv.Close()
		if got := conns.Load(); tc.wantMany && got < 3 || !tc.wantMany && got != 1 {
			t.Fatalf("max_conn_age %s: %d connections over 1s", tc.age, got)
		}
	}
}
