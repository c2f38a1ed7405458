package httpclient

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// --- helpers ---------------------------------------------------------------

func d(v time.Duration) config.Duration { return config.Duration{Duration: v} }

// baseHTTP is a fast configuration: tiny backoffs, no breaker.
func baseHTTP() config.HTTP {
	return config.HTTP{
		Timeout:         d(5 * time.Second),
		MaxConnsPerHost: 16,
		IdleConnTimeout: d(time.Minute),
		Retry: config.Retry{MaxAttempts: 5, InitialBackoff: d(time.Millisecond), MaxBackoff: d(5 * time.Millisecond),
			RetryStatuses: []int{408, 425, 429, 500, 502, 503, 504}},
	}
}

func breakerHTTP(openTimeout time.Duration) config.HTTP {
	h := baseHTTP()
	h.Breaker = config.Breaker{Enabled: true, FailureRatio: 0.5, MinRequests: 5,
		OpenTimeout: d(openTimeout), HalfOpenRequests: 1}
	return h
}

// newSenderWith is New(o) with Version 9.9.9 and fresh metrics unless o
// has some, closed when the test ends.
func newSenderWith(t testing.TB, o Options) (*Sender, *telemetry.Metrics) {
	t.Helper()
	o.Version = "9.9.9"
	if o.Metrics == nil {
		o.Metrics = telemetry.NewMetrics()
	}
	s := New(o)
	t.Cleanup(s.Close)
	return s, o.Metrics
}

func newTestSender(t testing.TB, h config.HTTP, propagate func(context.Context, http.Header)) (*Sender, *telemetry.Metrics) {
	t.Helper()
	return newSenderWith(t, Options{HTTP: h, Propagate: propagate})
}

// hit is one request as the recorder saw it.
type hit struct {
	at     time.Time
	header http.Header
	body   []byte
}

// recorder is an httptest server that records requests and answers through
// respond (nil: 200).
type recorder struct {
	*httptest.Server
	mu      sync.Mutex
	hits    []hit
	respond func(w http.ResponseWriter, r *http.Request, n int) // n counts from 0
}

func newRecorder(t testing.TB, respond func(w http.ResponseWriter, r *http.Request, n int)) *recorder {
	t.Helper()
	rec := &recorder{respond: respond}
	rec.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		rec.mu.Lock()
		n := len(rec.hits)
		rec.hits = append(rec.hits, hit{at: time.Now(), header: r.Header.Clone(), body: b})
		rec.mu.Unlock()
		if rec.respond != nil {
			rec.respond(w, r, n)
		}
	}))
	t.Cleanup(rec.Close)
	return rec
}

// statuses answers script[n], then 200.
func statuses(script ...int) func(http.ResponseWriter, *http.Request, int) {
	return func(w http.ResponseWriter, _ *http.Request, n int) {
		if n < len(script) {
			w.WriteHeader(script[n])
		}
	}
}

func (r *recorder) n() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.hits)
}

func (r *recorder) get(i int) hit {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.hits[i]
}

func (r *recorder) host() string { return r.Listener.Addr().String() }

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

func post(url string, body []byte) *filters.Request {
	return &filters.Request{Method: http.MethodPost, URL: url, Body: body,
		Header: http.Header{"Content-Type": {"application/json"}, "X-Tenant": {"acme"}}}
}

// sent is what a Send started by sendAsync returned.
type sent struct {
	res Result
	err error
}

// sendAsync runs s.Send(ctx, r, key) in a goroutine and hands what it
// returned on the channel.
func sendAsync(ctx context.Context, s *Sender, r *filters.Request, key string) <-chan sent {
	ch := make(chan sent, 1)
	go func() {
		res, err := s.Send(ctx, r, key)
		ch <- sent{res, err}
	}()
	return ch
}

// await returns what the Send of ch returned, failing the test when it has
// not returned within timeout.
func await(t testing.TB, ch <-chan sent, timeout time.Duration, what string) sent {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(timeout):
		t.Fatalf("%s: no return from Send within %s", what, timeout)
		return sent{}
	}
}

// waitFor polls cond every 5ms until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// metricValue sums the series of the named metric whose labels include all
// of want (counter and gauge values; histogram sample counts).
func metricValue(t testing.TB, m *telemetry.Metrics, name string, want map[string]string) float64 {
	t.Helper()
	return m.SumWhere(name, want)
}

func breakerState(t testing.TB, m *telemetry.Metrics, host string) float64 {
	return metricValue(t, m, "orderly_breaker_state", map[string]string{"host": host})
}

func transitions(t testing.TB, m *telemetry.Metrics, host, to string) float64 {
	return metricValue(t, m, "orderly_breaker_transitions_total", map[string]string{"host": host, "to": to})
}

func asError(t testing.TB, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *httpclient.Error", err, err)
	}
	return e
}

// --- headers and bodies ----------------------------------------------------

func TestSendSetsHeadersOnEveryAttempt(t *testing.T) {
	rec := newRecorder(t, statuses(503, 200))
	var calls atomic.Int32
	propagate := func(ctx context.Context, h http.Header) {
		if _, ok := ctx.Deadline(); !ok {
			t.Error("Propagate got a context without the per-attempt deadline")
		}
		h.Set("Traceparent", fmt.Sprintf("00-trace-%d-01", calls.Add(1)))
	}
	s, _ := newTestSender(t, baseHTTP(), propagate)
	r := post(rec.URL+"/orders/7", []byte(`{}`))
	r.Header.Set("User-Agent", "spoofed")    // ours wins
	r.Header.Set("Idempotency-Key", "stale") // ours wins
	// Propagate runs for attempts whose context carries a trace (here one
	// passed through from a message, as the dispatcher does).
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: trace.TraceID{1}, SpanID: trace.SpanID{2},
		TraceFlags: trace.FlagsSampled, Remote: true})
	res, err := s.Send(trace.ContextWithRemoteSpanContext(context.Background(), sc), r, "orders-3-42-0")
	if err != nil {
		t.Fatal(err)
	}
	if res.Attempts != 2 || res.Status != 200 {
		t.Fatalf("result %+v, want 2 attempts ending in 200", res)
	}
	for i := range 2 {
		h := rec.get(i).header
		if got := h.Values("Idempotency-Key"); len(got) != 1 || got[0] != "orders-3-42-0" {
			t.Errorf("attempt %d Idempotency-Key %q", i, got)
		}
		if got := h.Values("User-Agent"); len(got) != 1 || got[0] != "orderly/9.9.9" {
			t.Errorf("attempt %d User-Agent %q", i, got)
		}
		if h.Get("Content-Type") != "application/json" || h.Get("X-Tenant") != "acme" {
			t.Errorf("attempt %d lost configured headers: %v", i, h)
		}
		if want := fmt.Sprintf("00-trace-%d-01", i+1); h.Get("Traceparent") != want {
			t.Errorf("attempt %d traceparent %q, want %q (Propagate runs per attempt)", i, h.Get("Traceparent"), want)
		}
	}
	// The caller's request is untouched.
	if r.Header.Get("Traceparent") != "" || r.Header.Get("User-Agent") != "spoofed" || r.Header.Get("Idempotency-Key") != "stale" {
		t.Fatalf("Send modified the caller's headers: %v", r.Header)
	}
}

func TestSendReplaysBodyIdentically(t *testing.T) {
	rec := newRecorder(t, statuses(500, 502, 503, 200))
	s, _ := newTestSender(t, baseHTTP(), nil)
	body := bytes.Repeat([]byte("0123456789abcdef"), 8<<10) // 128 KiB
	orig := bytes.Clone(body)
	res, err := s.Send(context.Background(), post(rec.URL, body), "k")
	if err != nil || res.Attempts != 4 {
		t.Fatalf("result %+v, err %v; want success on attempt 4", res, err)
	}
	for i := range 4 {
		if h := rec.get(i); !bytes.Equal(h.body, orig) {
			t.Fatalf("attempt %d got %d bytes, want the %d original bytes", i, len(h.body), len(orig))
		}
	}
	if !bytes.Equal(body, orig) {
		t.Fatal("Send modified the caller's body slice")
	}
}

func TestSendWithoutBody(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, _ int) {
		if r.ContentLength > 0 || len(r.TransferEncoding) > 0 {
			w.WriteHeader(400)
		}
	})
	s, _ := newTestSender(t, baseHTTP(), nil)
	for _, method := range []string{"GET", "POST", "DELETE"} {
		if _, err := s.Send(context.Background(), &filters.Request{Method: method, URL: rec.URL}, "k"); err != nil {
			t.Fatalf("%s without body: %v", method, err)
		}
	}
}

// --- statuses and attempts -------------------------------------------------

func TestSendOutcomes(t *testing.T) {
	for _, tc := range []struct {
		name         string
		script       []int
		maxAttempts  int
		wantAttempts int
		wantStatus   int
		wantErr      error // nil: success
	}{
		{"503 then success", []int{503}, 5, 2, 200, nil},
		{"retry statuses then success", []int{408, 425, 429, 500, 502, 504}, 10, 7, 200, nil},
		{"201 is success", []int{201}, 5, 1, 201, nil},
		{"400 is permanent", []int{400}, 5, 1, 400, ErrStatus},
		{"404 is permanent", []int{404}, 5, 1, 404, ErrStatus},
		{"422 is permanent", []int{422}, 5, 1, 422, ErrStatus},
		{"501 is permanent", []int{501}, 5, 1, 501, ErrStatus},
		{"302 is not followed", []int{302}, 5, 1, 302, ErrStatus},
		{"exhausted", []int{500, 500, 500, 500}, 3, 3, 500, ErrRetriesExhausted},
		{"single attempt", []int{500}, 1, 1, 500, ErrRetriesExhausted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, n int) {
				if n < len(tc.script) {
					if tc.script[n] == 302 {
						w.Header().Set("Location", "/elsewhere")
					}
					w.WriteHeader(tc.script[n])
				}
			})
			h := baseHTTP()
			h.Retry.MaxAttempts = tc.maxAttempts
			s, _ := newTestSender(t, h, nil)
			res, err := s.Send(context.Background(), post(rec.URL, []byte("x")), "k")
			if rec.n() != tc.wantAttempts {
				t.Errorf("server saw %d requests, want %d", rec.n(), tc.wantAttempts)
			}
			if tc.wantErr == nil {
				if err != nil || res.Attempts != tc.wantAttempts || res.Status != tc.wantStatus {
					t.Fatalf("result %+v, err %v; want %d attempts, status %d", res, err, tc.wantAttempts, tc.wantStatus)
				}
				return
			}
			e := asError(t, err)
			if !e.Permanent || !IsPermanent(err) || e.Attempts != tc.wantAttempts || e.Status != tc.wantStatus || !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %#v (%v); want permanent, %d attempts, status %d, wrapping %v",
					e, err, tc.wantAttempts, tc.wantStatus, tc.wantErr)
			}
			if res.Attempts != e.Attempts {
				t.Errorf("Result.Attempts %d != Error.Attempts %d", res.Attempts, e.Attempts)
			}
		})
	}
}

func TestSendUnlimitedAttempts(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
		if n < 15 {
			w.WriteHeader([]int{502, 503}[n%2])
		}
	})
	h := baseHTTP()
	h.Retry.MaxAttempts = 0
	s, m := newTestSender(t, h, nil)
	res, err := s.Send(context.Background(), post(rec.URL, nil), "k")
	if err != nil || res.Attempts != 16 || res.Status != 200 {
		t.Fatalf("result %+v, err %v; want success on attempt 16", res, err)
	}
	if got := metricValue(t, m, "orderly_http_retries_total", map[string]string{"host": rec.host()}); got != 15 {
		t.Fatalf("retries metric %v, want 15", got)
	}
}

func TestSendInvalidRequestIsPermanent(t *testing.T) {
	s, _ := newTestSender(t, baseHTTP(), nil)
	for _, u := range []string{"http://[::1", "ftp://127.0.0.1:1/x"} {
		_, err := s.Send(context.Background(), post(u, nil), "k")
		if !IsPermanent(err) {
			t.Fatalf("%s: error %v, want permanent", u, err)
		}
		if e := asError(t, err); e.Attempts > 1 {
			t.Fatalf("%s: %d attempts, want at most 1", u, e.Attempts)
		}
	}
	bad := post("http://127.0.0.1:1/x", nil)
	bad.Method = "GE T"
	_, err := s.Send(context.Background(), bad, "k")
	if !IsPermanent(err) || !strings.Contains(err.Error(), `invalid method "GE T"`) {
		t.Fatalf("method %q: error %v, want a permanent invalid method", bad.Method, err)
	}
	if e := asError(t, err); e.Attempts != 0 {
		t.Fatalf("method %q: %d attempts, want none", bad.Method, e.Attempts)
	}
}

func TestSendMetrics(t *testing.T) {
	rec := newRecorder(t, statuses(503, 503, 200))
	s, m := newTestSender(t, baseHTTP(), nil)
	if _, err := s.Send(context.Background(), post(rec.URL, nil), "k"); err != nil {
		t.Fatal(err)
	}
	host := rec.host()
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"orderly_http_requests_total", map[string]string{"host": host, "status": "503"}, 2},
		{"orderly_http_requests_total", map[string]string{"host": host, "status": "200"}, 1},
		{"orderly_http_retries_total", map[string]string{"host": host}, 2},
		{"orderly_http_request_duration_seconds", map[string]string{"host": host}, 3},
	} {
		if got := metricValue(t, m, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

// --- Retry-After -----------------------------------------------------------

func TestSendRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		name   string
		status int
		value  func() string
	}{
		{"429 seconds", 429, func() string { return "1" }},
		// HTTP-date has a resolution of one second: now+2s waits 1-2s.
		{"503 HTTP-date", 503, func() string { return time.Now().Add(2 * time.Second).UTC().Format(http.TimeFormat) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
				if n == 0 {
					w.Header().Set("Retry-After", tc.value())
					w.WriteHeader(tc.status)
				}
			})
			h := baseHTTP()
			h.Retry.MaxBackoff = d(10 * time.Second)
			s, _ := newTestSender(t, h, nil)
			if _, err := s.Send(context.Background(), post(rec.URL, nil), "k"); err != nil {
				t.Fatal(err)
			}
			if gap := rec.get(1).at.Sub(rec.get(0).at); gap < 950*time.Millisecond {
				t.Fatalf("second attempt came %s after the first, want >= 1s (Retry-After)", gap)
			}
		})
	}
}

func TestSendRetryAfterIsCapped(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
		if n == 0 {
			w.Header().Set("Retry-After", "3600")
			w.WriteHeader(429)
		}
	})
	h := baseHTTP()
	h.Retry.MaxRetryAfter = d(50 * time.Millisecond)
	s, _ := newTestSender(t, h, nil)
	done := sendAsync(context.Background(), s, post(rec.URL, nil), "k")
	if o := await(t, done, 20*time.Second, "Retry-After 3600 with max_retry_after 50ms"); o.err != nil {
		t.Fatal(o.err)
	}
}

// TestRetryAfterBeyondMaxBackoff: a Retry-After longer than max_backoff is
// honoured up to max_retry_after, not cut to max_backoff, in seconds or as
// an HTTP-date.
func TestRetryAfterBeyondMaxBackoff(t *testing.T) {
	for _, tc := range []struct {
		value    string
		maxAfter time.Duration
		want     time.Duration
	}{
		{"120", 10 * time.Minute, 120 * time.Second},
		{"120", time.Second, time.Second},
		{"3600", 10 * time.Minute, 10 * time.Minute},
		{time.Now().Add(time.Hour).UTC().Format(http.TimeFormat), time.Second, time.Second},
	} {
		rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
			w.Header().Set("Retry-After", tc.value)
			w.WriteHeader(http.StatusServiceUnavailable)
		})
		h := baseHTTP() // max_backoff 5ms
		h.Retry.MaxAttempts = 1
		h.Retry.MaxRetryAfter = d(tc.maxAfter)
		s, _ := newTestSender(t, h, nil)
		var c Call
		c.Reset(post(rec.URL, nil), "k")
		if st := s.Attempt(context.Background(), &c); st.Outcome != Retry || st.After != tc.want || c.Counted() != 0 {
			t.Errorf("Retry-After %s, max %s: outcome %v after %s, %d counted; want Retry after %s, 0 counted",
				tc.value, tc.maxAfter, st.Outcome, st.After, c.Counted(), tc.want)
		}
		// The same call, and any other, waits without a request.
		if st := s.Attempt(context.Background(), &c); st.Outcome != Retry || st.After > tc.want || rec.n() != 1 {
			t.Errorf("Retry-After %s: second attempt %v after %s, %d requests; want Retry, 1 request", tc.value, st.Outcome, st.After, rec.n())
		}
	}
}

func TestBackoffBounds(t *testing.T) {
	lo, hi := 100*time.Millisecond, 2*time.Second
	for attempt := range 200 {
		ceiling := min(lo<<min(attempt, 30), hi)
		for range 20 {
			w := backoff(lo, hi, attempt)
			if w < lo || w > hi || w < ceiling/2 || w > ceiling {
				t.Fatalf("attempt %d: wait %s outside [max(%s, %s/2), %s]", attempt, w, lo, ceiling, ceiling)
			}
		}
	}
}

func TestRetryAfterParsing(t *testing.T) {
	hi := 2 * time.Second
	for _, tc := range []struct {
		status int
		value  string
		want   time.Duration
	}{
		{429, "7", hi},
		{429, "1", time.Second},
		{503, "1", time.Second},
		{500, "1", 0}, // Retry-After only counts on 429 and 503
		{503, "soon", 0},
		{503, "0", 0},
		{503, "-3", 0},
		{429, "", 0},
		{429, "Fri, 31 Dec 1999 23:59:59 GMT", 0}, // in the past
		// Seconds that overflow a Duration once multiplied still mean
		// "long": capped, never wrapped around to a short wait.
		{503, "9223372037", hi},
		{503, "18446744074", hi},
		{503, "9223372036854775807", hi},
		{429, "Fri, 31 Dec 9999 23:59:59 GMT", hi},
	} {
		resp := &http.Response{StatusCode: tc.status, Header: http.Header{}}
		if tc.value != "" {
			resp.Header.Set("Retry-After", tc.value)
		}
		if got := retryAfter(resp, hi); got != tc.want {
			t.Errorf("%d with Retry-After %q: wait %s, want %s", tc.status, tc.value, got, tc.want)
		}
	}
	// An HTTP-date a few seconds ahead (one-second resolution).
	resp := &http.Response{StatusCode: 429, Header: http.Header{"Retry-After": {time.Now().Add(5 * time.Second).UTC().Format(http.TimeFormat)}}}
	if got := retryAfter(resp, time.Minute); got < 3*time.Second || got > 5*time.Second {
		t.Errorf("HTTP-date 5s ahead: wait %s", got)
	}
}

// --- transport failures ----------------------------------------------------

func TestSendRetriesConnectionRefused(t *testing.T) {
	addr, serve := closedAddr(t)
	h := baseHTTP()
	h.Retry.MaxAttempts = 0
	s, m := newTestSender(t, h, nil)
	done := sendAsync(context.Background(), s, post("http://"+addr+"/x", []byte("b")), "k")
	waitFor(t, 10*time.Second, "refused attempts", func() bool {
		return metricValue(t, m, "orderly_http_requests_total", map[string]string{"host": addr, "status": "error"}) >= 3
	})
	serve(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	if o := await(t, done, 20*time.Second, "after the server came up"); o.err != nil || o.res.Attempts < 4 {
		t.Fatalf("result %+v, err %v; want success after >= 3 refused attempts", o.res, o.err)
	}
}

func TestSendRetriesDroppedConnection(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, n int) {
		if n == 0 { // hang up without answering: the client sees EOF
			c, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				c.Close()
			}
		}
	})
	s, m := newTestSender(t, baseHTTP(), nil)
	res, err := s.Send(context.Background(), post(rec.URL, []byte("b")), "k")
	if err != nil || res.Attempts != 2 {
		t.Fatalf("result %+v, err %v; want success on attempt 2", res, err)
	}
	if got := metricValue(t, m, "orderly_http_requests_total", map[string]string{"status": "error"}); got != 1 {
		t.Fatalf("error attempts %v, want 1", got)
	}
}

func TestSendRetriesPerAttemptTimeout(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, n int) {
		if n == 0 {
			<-r.Context().Done() // hang until the client gives up on this attempt
		}
	})
	h := baseHTTP()
	h.Timeout = d(100 * time.Millisecond)
	s, _ := newTestSender(t, h, nil)
	start := time.Now()
	res, err := s.Send(context.Background(), post(rec.URL, nil), "k")
	if err != nil || res.Attempts != 2 {
		t.Fatalf("result %+v, err %v; want success on attempt 2", res, err)
	}
	if el := time.Since(start); el < 100*time.Millisecond {
		t.Fatalf("finished in %s, before the per-attempt timeout", el)
	}
}

// --- cancellation ----------------------------------------------------------

func TestSendCancel(t *testing.T) {
	for _, tc := range []struct {
		name    string
		respond func(http.ResponseWriter, *http.Request, int)
	}{
		{"during backoff", func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(503) }},
		{"during an attempt", func(_ http.ResponseWriter, r *http.Request, _ int) { <-r.Context().Done() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder(t, tc.respond)
			h := baseHTTP()
			h.Timeout = d(time.Minute)
			h.Retry.MaxAttempts = 0
			h.Retry.InitialBackoff, h.Retry.MaxBackoff = d(time.Minute), d(time.Minute)
			s, _ := newTestSender(t, h, nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := sendAsync(ctx, s, post(rec.URL, nil), "k")
			waitFor(t, 5*time.Second, "the first attempt", func() bool { return rec.n() >= 1 })
			cancel()
			err := await(t, done, 2*time.Second, "after the cancel").err
			if IsPermanent(err) || !errors.Is(err, context.Canceled) {
				t.Fatalf("error %v: want a non-permanent error wrapping context.Canceled", err)
			}
			if e := asError(t, err); e.Attempts != 1 {
				t.Fatalf("attempts %d, want 1", e.Attempts)
			}
		})
	}
}

// --- circuit breaker -------------------------------------------------------

// tripBreaker makes one failing attempt each of new calls until the breaker
// of rec's host is open. (Sequential Sends would not do: from the second
// call on the target fails for several calls, the failures spend no attempt
// and each Send keeps retrying.)
func tripBreaker(t *testing.T, s *Sender, m *telemetry.Metrics, rec *recorder) {
	t.Helper()
	for i := 0; breakerState(t, m, rec.host()) != telemetry.BreakerOpen; i++ {
		if i == 20 {
			t.Fatal("breaker did not open after 20 failures")
		}
		var c Call
		c.Reset(post(rec.URL, nil), "k")
		if st := s.Attempt(context.Background(), &c); st.Outcome != Failed && st.Outcome != Retry {
			t.Fatalf("failing attempt: outcome %v (%v), want Failed or Retry", st.Outcome, st.Err)
		}
	}
}

func TestBreakerOpenWaitsWithoutAttempts(t *testing.T) {
	rec := newRecorder(t, statuses(503, 503, 503, 503, 503, 503, 503, 503, 503, 503))
	h := breakerHTTP(time.Minute)
	h.Retry.MaxAttempts = 1
	s, m := newTestSender(t, h, nil)
	tripBreaker(t, s, m, rec)
	if n := rec.n(); n != 5 {
		t.Fatalf("breaker opened after %d failures, want min_requests = 5", n)
	}
	if got := transitions(t, m, rec.host(), "open"); got != 1 {
		t.Fatalf("transitions to open %v, want 1", got)
	}
	// While open, a Send waits: no request reaches the target, no attempt is
	// spent, and when ctx ends the error is not permanent.
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	defer cancel()
	_, err := s.Send(ctx, post(rec.URL, nil), "k")
	if IsPermanent(err) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want non-permanent deadline exceeded", err)
	}
	if e := asError(t, err); e.Attempts != 0 {
		t.Fatalf("%d attempts spent while the breaker was open", e.Attempts)
	}
	if rec.n() != 5 {
		t.Fatalf("%d requests reached the target; the open breaker let some through", rec.n()-5)
	}
}

func TestBreakerHalfOpensAndCloses(t *testing.T) {
	var down atomic.Bool
	down.Store(true)
	rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, _ int) {
		if down.Load() {
			w.WriteHeader(503)
		}
	})
	const openTimeout = 200 * time.Millisecond
	h := breakerHTTP(openTimeout)
	h.Retry.MaxAttempts = 0
	s, m := newTestSender(t, h, nil)
	host := rec.host()

	// One sender against a dead target: 5 failures open the breaker, then
	// each half-open period lets exactly one probe through.
	ctx, cancel := context.WithCancel(context.Background())
	first := sendAsync(ctx, s, post(rec.URL, nil), "a")
	waitFor(t, 10*time.Second, "breaker open", func() bool { return breakerState(t, m, host) == telemetry.BreakerOpen })
	waitFor(t, 10*time.Second, "two half-open probes", func() bool { return transitions(t, m, host, "half-open") >= 2 })
	hits := rec.n()
	if probes := transitions(t, m, host, "half-open"); float64(hits) > 5+probes {
		t.Fatalf("%d requests reached the dead target with %v half-open periods; want <= 5 + one probe each", hits, probes)
	}
	cancel()
	if err := await(t, first, 10*time.Second, "after the cancel").err; IsPermanent(err) || !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled sender: %v, want non-permanent context.Canceled", err)
	}

	// The target recovers while the breaker is open (or half-open, if the
	// cancelled sender's probe was cut short: an excluded probe frees its
	// slot). Requests started now wait for the probe instead of spending
	// attempts, and all succeed with one attempt once the breaker closed.
	down.Store(false)
	h1 := rec.n()
	const waiters = 8
	var results []<-chan sent
	for range waiters {
		results = append(results, sendAsync(context.Background(), s, post(rec.URL, nil), "b"))
	}
	for _, ch := range results {
		if o := await(t, ch, 10*time.Second, "after the recovery"); o.err != nil || o.res.Attempts != 1 {
			t.Fatalf("request started while the breaker was open: result %+v, err %v; want one attempt", o.res, o.err)
		}
	}
	if got := rec.n() - h1; got != waiters {
		t.Fatalf("%d requests reached the target, want %d (one each)", got, waiters)
	}
	waitFor(t, 5*time.Second, "breaker closed", func() bool { return breakerState(t, m, host) == telemetry.BreakerClosed })
	if transitions(t, m, host, "closed") < 1 {
		t.Fatal("no transition to closed counted")
	}
}

// TestBreakerClassification: with a breaker that opens on 3 consecutive
// failures, or on half of at least 5 requests failing, which answers open
// it. Transport errors, timeouts and the 5xx but 501 open it after exactly
// 3 attempts; 429, 408, 425, the other 4xx, 501 and a 3xx never do, and
// move it nowhere.
func TestBreakerClassification(t *testing.T) {
	refused, _ := closedAddr(t)
	for _, tc := range []struct {
		name   string
		status int    // the answer, 0: see url
		url    string // "" : the recorder's
		opens  bool
	}{
		{"429", 429, "", false},
		{"408", 408, "", false},
		{"425", 425, "", false},
		{"400", 400, "", false},
		{"404", 404, "", false},
		{"409", 409, "", false},
		{"501", 501, "", false},
		{"302", 302, "", false},
		{"500", 500, "", true},
		{"502", 502, "", true},
		{"503", 503, "", true},
		{"504", 504, "", true},
		{"505", 505, "", true},
		{"refused", 0, "http://" + refused + "/x", true},
		{"timeout", 0, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := newRecorder(t, func(w http.ResponseWriter, r *http.Request, _ int) {
				if tc.status == 0 {
					<-r.Context().Done() // past http.timeout
					return
				}
				w.WriteHeader(tc.status)
			})
			h := breakerHTTP(time.Minute) // ratio 0.5 over >= 5 requests
			h.Breaker.ConsecutiveFailures = 3
			h.Retry.MaxAttempts = 1
			h.Timeout = d(50 * time.Millisecond)
			s, m := newTestSender(t, h, nil)
			u, host := rec.URL, rec.host()
			if tc.url != "" {
				u, host = tc.url, refused
			}
			made := 0
			for ; made < 6; made++ {
				if breakerState(t, m, host) == telemetry.BreakerOpen {
					break // the next attempt would wait for it
				}
				var c Call
				c.Reset(post(u, nil), "k")
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				st := s.Attempt(ctx, &c)
				cancel()
				if st.Outcome == Delivered || st.Outcome == Canceled {
					t.Fatalf("outcome %v (%v)", st.Outcome, st.Err)
				}
			}
			if opened := breakerState(t, m, host) == telemetry.BreakerOpen; opened != tc.opens {
				t.Fatalf("breaker open = %v after %d attempts, want %v", opened, made, tc.opens)
			}
			if tc.opens && made != 3 {
				t.Fatalf("opened after %d failures, want 3 consecutive", made)
			}
			if tc.url == "" && rec.n() != made {
				t.Fatalf("%d of %d attempts reached the target", rec.n(), made)
			}
			if got := metricValue(t, m, "orderly_breaker_transitions_total", nil); !tc.opens && got != 0 {
				t.Fatalf("%v breaker transitions", got)
			}
		})
	}
}

func TestBreakerIgnoresCancellation(t *testing.T) {
	rec := newRecorder(t, func(_ http.ResponseWriter, r *http.Request, _ int) { <-r.Context().Done() })
	h := breakerHTTP(time.Minute)
	h.Breaker.ConsecutiveFailures = 1
	s, m := newTestSender(t, h, nil)
	for i := range 5 {
		ctx, cancel := context.WithCancel(context.Background())
		go func() { // cancel once the attempt is in flight (or after 5s)
			for deadline := time.Now().Add(5 * time.Second); rec.n() <= i && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			cancel()
		}()
		if _, err := s.Send(ctx, post(rec.URL, nil), "k"); IsPermanent(err) || !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled send: %v", err)
		}
		cancel()
	}
	if st := breakerState(t, m, rec.host()); st != telemetry.BreakerClosed {
		t.Fatalf("cancelled attempts opened the breaker (state %v)", st)
	}
}

func TestBreakerDisabled(t *testing.T) {
	rec := newRecorder(t, func(w http.ResponseWriter, _ *http.Request, _ int) { w.WriteHeader(503) })
	h := baseHTTP() // breaker disabled
	h.Retry.MaxAttempts = 2
	s, m := newTestSender(t, h, nil)
	// Two attempts each of 20 calls (the calls after the first fail while
	// the target fails for others too, so they would not end on their own).
	for range 20 {
		var c Call
		c.Reset(post(rec.URL, nil), "k")
		for range 2 {
			if st := s.Attempt(context.Background(), &c); st.Outcome != Retry && st.Outcome != Failed {
				t.Fatalf("503: outcome %v (%v), want Retry or Failed", st.Outcome, st.Err)
			}
		}
	}
	if rec.n() != 40 {
		t.Fatalf("%d requests reached the target, want all 40", rec.n())
	}
	if got := metricValue(t, m, "orderly_breaker_state", nil) + metricValue(t, m, "orderly_breaker_transitions_total", nil); got != 0 {
		t.Fatalf("breaker metrics moved with breakers disabled: %v", got)
	}
}

// --- connections -----------------------------------------------------------

// countingServer starts an httptest server (TLS if tls) that counts the
// connections it accepted.
func countingServer(t testing.TB, tls bool, handler http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(handler)
	srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			conns.Add(1)
		}
	}
	if tls {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return srv, &conns
}

// trustServer makes s trust srv's test certificate.
func trustServer(s *Sender, srv *httptest.Server) {
	if srv.TLS != nil {
		s.transport.TLSClientConfig = srv.Client().Transport.(*http.Transport).TLSClientConfig.Clone()
	}
}

func TestConnAgeRetiresConnections(t *testing.T) {
	for _, tc := range []struct {
		age  time.Duration
		tls  bool
		many bool
	}{{200 * time.Millisecond, false, true}, {200 * time.Millisecond, true, true}, {0, false, false}} {
		t.Run(fmt.Sprintf("max_conn_age=%s/tls=%t", tc.age, tc.tls), func(t *testing.T) {
			// A 10 KiB answer: only drained bodies keep a connection reusable.
			payload := strings.Repeat("z", 10<<10)
			srv, conns := countingServer(t, tc.tls, func(w http.ResponseWriter, r *http.Request) {
				_, _ = io.Copy(io.Discard, r.Body)
				_, _ = io.WriteString(w, payload)
			})
			h := baseHTTP()
			h.MaxConnAge = d(tc.age)
			s, m := newTestSender(t, h, nil)
			trustServer(s, srv)
			for end := time.Now().Add(time.Second); time.Now().Before(end); {
				res, err := s.Send(context.Background(), post(srv.URL, []byte(`{"n":1}`)), "k")
				if err != nil || res.Attempts != 1 {
					// Retiring a connection must be invisible to Send.
					t.Fatalf("result %+v, err %v; want one clean attempt", res, err)
				}
				time.Sleep(20 * time.Millisecond) // pacing, not an assertion
			}
			got := conns.Load()
			if tc.many && got < 2 || !tc.many && got != 1 {
				t.Fatalf("%d connections over 1s of sequential requests", got)
			}
			if e := metricValue(t, m, "orderly_http_requests_total", map[string]string{"status": "error"}); e != 0 {
				t.Fatalf("%v attempts failed", e)
			}
		})
	}
}

// TestConnAgeServerIgnoresClose: a server that answers without closing
// although the request said Connection: close (what net/http's own server
// never does) keeps the connection open; the aged connection then refuses
// the next request before writing it, net/http replays it on a new
// connection, and nothing is visible: one attempt each, no error, every
// request received exactly once, connections recycled.
func TestConnAgeServerIgnoresClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var conns, requests, closes atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					requests.Add(1)
					if req.Header.Get("Connection") == "close" {
						closes.Add(1)
					}
					// No Connection: close in the answer, and the connection stays.
					if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"); err != nil {
						return
					}
				}
			}()
		}
	}()
	h := baseHTTP()
	h.MaxConnAge = d(20 * time.Millisecond)
	s, m := newTestSender(t, h, nil)
	const n = 60
	for i := range n {
		res, err := s.Send(context.Background(), post("http://"+ln.Addr().String()+"/x", []byte(`{}`)), fmt.Sprintf("k-%d", i))
		if err != nil || res.Attempts != 1 {
			t.Fatalf("request %d: result %+v, err %v; want one clean attempt", i, res, err)
		}
		time.Sleep(2 * time.Millisecond) // pacing, not an assertion
	}
	if got := requests.Load(); got != n {
		t.Fatalf("server saw %d requests, want exactly %d", got, n)
	}
	if conns.Load() < 2 || closes.Load() < 1 {
		t.Fatalf("%d connections, %d requests asking for the close: none was retired", conns.Load(), closes.Load())
	}
	if e := metricValue(t, m, "orderly_http_requests_total", map[string]string{"status": "error"}); e != 0 {
		t.Fatalf("%v attempts failed", e)
	}
}

func TestConnAgeUnderConcurrency(t *testing.T) {
	var requests atomic.Int64
	srv, conns := countingServer(t, false, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		requests.Add(1)
	})
	h := baseHTTP()
	h.MaxConnAge = d(30 * time.Millisecond)
	s, m := newTestSender(t, h, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			for i := range 40 {
				res, err := s.Send(context.Background(), post(srv.URL, []byte("body-"+strconv.Itoa(g))), "k")
				if err == nil && res.Attempts != 1 {
					err = fmt.Errorf("%d attempts", res.Attempts)
				}
				if err != nil {
					errs <- fmt.Errorf("goroutine %d request %d: %w", g, i, err)
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := requests.Load(); got != 320 {
		t.Fatalf("server saw %d requests, want exactly 320 (retiring must not duplicate)", got)
	}
	if got := conns.Load(); got <= 8 {
		t.Fatalf("%d connections for 8 senders over >= 40ms each: none was retired", got)
	}
	if e := metricValue(t, m, "orderly_http_requests_total", map[string]string{"status": "error"}); e != 0 {
		t.Fatalf("%v attempts failed", e)
	}
}

// countingConn counts the Write calls on a connection.
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// TestOneWritePerRequest: a request with a small body leaves in one write
// (one syscall): net/http flushes the headers on their own unless it knows
// the body is in memory.
func TestOneWritePerRequest(t *testing.T) {
	rec := newRecorder(t, nil)
	s, _ := newTestSender(t, baseHTTP(), nil)
	var writes atomic.Int64
	dial := s.h1.dial
	s.h1.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return countingConn{Conn: c, writes: &writes}, nil
	}
	const n = 20
	for i := range n {
		if _, err := s.Send(context.Background(), post(rec.URL+"/orders", []byte(`{"id":42}`)), fmt.Sprintf("orders-0-%d-0", i)); err != nil {
			t.Fatal(err)
		}
	}
	if got := writes.Load(); got != n {
		t.Fatalf("%d writes for %d requests, want one each", got, n)
	}
}

// TestAnswerBodiesAreDrainedForReuse: answers with a body (up to the drain
// limit) are read to the end, so their connection serves the next request;
// a larger one costs its connection but not the request.
func TestAnswerBodiesAreDrainedForReuse(t *testing.T) {
	for _, tc := range []struct {
		size      int
		wantDials int64
	}{{0, 1}, {10 << 10, 1}, {3 * drainLimit, 5}} {
		body := strings.Repeat("x", tc.size)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			_, _ = io.WriteString(w, body)
		}))
		s, _ := newTestSender(t, baseHTTP(), nil)
		var dials atomic.Int64
		dial := s.h1.dial
		s.h1.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return dial(ctx, network, addr)
		}
		for i := range 5 {
			if _, err := s.Send(context.Background(), post(srv.URL+"/x", []byte(`{}`)), fmt.Sprintf("k-%d", i)); err != nil {
				t.Fatalf("answer of %d bytes: %v", tc.size, err)
			}
		}
		if got := dials.Load(); got != tc.wantDials {
			t.Errorf("answers of %d bytes: %d connections for 5 sequential requests, want %d", tc.size, got, tc.wantDials)
		}
		srv.Close()
	}
}

// --- benchmark -------------------------------------------------------------

func BenchmarkSend(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer srv.Close()
	for _, bc := range []struct {
		name string
		h    func() config.HTTP
	}{
		{"plain", baseHTTP},
		{"breaker+conn_age", func() config.HTTP {
			h := breakerHTTP(time.Minute)
			h.MaxConnAge = d(time.Minute)
			return h
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s, _ := newTestSender(b, bc.h(), nil)
			r := post(srv.URL+"/orders", []byte(`{"id":42,"type":"order.created"}`))
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Send(ctx, r, "orders-0-1-0"); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(bc.name+"/parallel", func(b *testing.B) {
			s, _ := newTestSender(b, bc.h(), nil)
			r := post(srv.URL+"/orders", []byte(`{"id":42,"type":"order.created"}`))
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.Send(context.Background(), r, "orders-0-1-0"); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
