package testkit

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// deliver feeds the sink one request per seq of key, one after the other.
func deliver(t *testing.T, s *Sink, key string, seqs ...int64) {
	t.Helper()
	for _, q := range seqs {
		r := httptest.NewRequest(http.MethodPost, "/people/"+key, strings.NewReader(string(EventJSON(key, q))))
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		if w.Code != http.StatusOK {
			t.Fatalf("sink answered %d to %s/%d", w.Code, key, q)
		}
	}
}

func TestCheck(t *testing.T) {
	want := map[string][]int64{"a": {0, 1, 2, 3}, "b": {0, 1}}
	for _, tt := range []struct {
		name                            string
		a, b                            []int64 // deliveries in arrival order
		ok                              bool
		missing, duplicates, violations int
		first                           string // part of Report.First
	}{
		{name: "in order", a: []int64{0, 1, 2, 3}, b: []int64{0, 1}, ok: true},
		{name: "redelivered suffix", a: []int64{0, 1, 2, 1, 2, 3}, b: []int64{0, 1, 0, 1}, ok: true, duplicates: 4},
		{name: "overtaken", a: []int64{0, 2, 1, 3}, b: []int64{0, 1}, violations: 3, first: `key "a": seq 2 arrived after 0`},
		{name: "first skipped", a: []int64{1, 0, 2, 3}, b: []int64{0, 1}, violations: 3, first: `key "a": seq 1 arrived after nothing`},
		{name: "missing", a: []int64{0, 1, 3}, b: []int64{0}, missing: 2, violations: 1},
		{name: "missing tail", a: []int64{0, 1, 2}, b: []int64{0, 1}, missing: 1},
		{name: "nothing delivered", missing: 6},
		{name: "duplicate in place", a: []int64{0, 1, 1, 2, 3}, b: []int64{0, 1}, ok: true, duplicates: 1},
		{name: "redelivery skipping ahead", a: []int64{0, 1, 2, 0, 2, 3}, b: []int64{0, 1}, duplicates: 2, violations: 1,
			first: `key "a": redelivered seq 2 after seq index 0`},
		{name: "never produced seq", a: []int64{0, 1, 2, 3, 9}, b: []int64{0, 1}, violations: 1, first: "seq 9 was never produced"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := NewSink()
			deliver(t, s, "a", tt.a...)
			deliver(t, s, "b", tt.b...)
			r := s.Check(want)
			if r.OK() != tt.ok || r.Missing != tt.missing || r.Duplicates != tt.duplicates || r.Violations != tt.violations {
				t.Fatalf("%s: got ok %v, want ok %v, missing %d, duplicates %d, violations %d", r, r.OK(), tt.ok,
					tt.missing, tt.duplicates, tt.violations)
			}
			if r.Expected != 6 || r.Delivered != len(tt.a)+len(tt.b) {
				t.Fatalf("%s: want expected 6, delivered %d", r, len(tt.a)+len(tt.b))
			}
			if !strings.Contains(r.First, tt.first) {
				t.Fatalf("first violation %q, want it to contain %q", r.First, tt.first)
			}
		})
	}
}

// TestCheckUnknownKey: deliveries of a key that was never produced are
// violations.
func TestCheckUnknownKey(t *testing.T) {
	s := NewSink()
	deliver(t, s, "a", 0)
	deliver(t, s, "ghost", 0, 1)
	r := s.Check(map[string][]int64{"a": {0}})
	if r.OK() || r.Violations != 2 || r.Delivered != 3 || !strings.Contains(r.First, `"ghost" was never produced`) {
		t.Fatalf("%s: want 2 violations for the unknown key", r)
	}
}

// TestCheckRejectedIsNotDelivered: a request answered non-2xx is counted
// as a request, not as a delivery.
func TestCheckRejectedIsNotDelivered(t *testing.T) {
	s := NewSink()
	s.Status = func(d *Delivery) int {
		if d.Seq == 1 {
			return http.StatusServiceUnavailable
		}
		return 0
	}
	for _, q := range []int64{0, 1} {
		r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(string(EventJSON("a", q))))
		s.ServeHTTP(httptest.NewRecorder(), r)
	}
	r := s.Check(map[string][]int64{"a": {0, 1}})
	if r.Missing != 1 || s.Requests() != 2 || s.Delivered() != 1 {
		t.Fatalf("%s, %d requests, %d delivered: want seq 1 missing", r, s.Requests(), s.Delivered())
	}
}

// post sends one event to srv with ctx.
func post(ctx context.Context, srv *httptest.Server, key string, seq int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/people/"+key, strings.NewReader(string(EventJSON(key, seq))))
	if err != nil {
		return err
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// TestCheckConcurrentRequests: a request that arrives while another request
// of its key is in flight is reported, even when both are delivered in
// order; requests of different keys may overlap.
func TestCheckConcurrentRequests(t *testing.T) {
	for _, tt := range []struct {
		name       string
		second     string // key of the request sent while the first (key "a", seq 0) is held
		concurrent int
	}{
		{name: "same key", second: "a", concurrent: 1},
		{name: "other key", second: "b", concurrent: 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := NewSink()
			// a/0 is answered once the second request arrived, and the
			// second once a/0 is recorded: both overlap, in order.
			s.Observe = func(d *Delivery, r *http.Request) {
				if d.Key == "a" && d.Seq == 0 {
					await(t, "the second request", func() bool {
						s.mu.Lock()
						defer s.mu.Unlock()
						return len(s.active["a"])+len(s.active["b"]) == 2
					})
					return
				}
				await(t, "the first request recorded", func() bool { return s.Delivered() == 1 })
			}
			srv := httptest.NewServer(s)
			defer srv.Close()
			var wg sync.WaitGroup
			wg.Go(func() {
				if err := post(context.Background(), srv, "a", 0); err != nil {
					t.Error(err)
				}
			})
			WaitFor(t, 10*time.Second, "the first request in flight", func() bool { return s.InFlight() == 1 })
			seq := int64(0)
			if tt.second == "a" {
				seq = 1
			}
			if err := post(context.Background(), srv, tt.second, seq); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			r := s.Check(map[string][]int64{"a": {0, 1}, "b": {0}})
			if r.Violations != 0 || r.Concurrent != tt.concurrent || s.Concurrent() != tt.concurrent {
				t.Fatalf("%s: want %d concurrent, no order violation", r, tt.concurrent)
			}
			if tt.concurrent > 0 {
				if r.OK() || !strings.Contains(r.FirstConcurrent, `key "a": seq 1 arrived while seq 0 was in flight`) {
					t.Fatalf("%s: want the concurrent request reported and the report not OK", r)
				}
			}
		})
	}
}

// await is WaitFor for a handler's goroutine: it reports a timeout with
// t.Error (t.Fatal must not be called there).
func await(t *testing.T, what string, cond func() bool) {
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("timed out waiting for %s", what)
			return
		}
	}
}

// TestCheckAbandonedRequestIsNotConcurrent: once a client gives up on a
// request (timeout, lost partition, killed process), the key's next request
// may come, even before the server noticed.
func TestCheckAbandonedRequestIsNotConcurrent(t *testing.T) {
	s := NewSink()
	s.Delay = func(d *Delivery) time.Duration {
		if d.Seq == 0 {
			return time.Minute
		}
		return 0
	}
	srv := httptest.NewServer(s)
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- post(ctx, srv, "a", 0) }()
	WaitFor(t, 10*time.Second, "the first request in flight", func() bool { return s.InFlight() == 1 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned request: %v", err)
	}
	if err := post(context.Background(), srv, "a", 1); err != nil {
		t.Fatal(err)
	}
	WaitFor(t, 10*time.Second, "the abandoned request ended", func() bool { return s.InFlight() == 0 })
	if r := s.Check(map[string][]int64{"a": {1}}); r.Concurrent != 0 || !r.OK() {
		t.Fatalf("%s: want no concurrent request after the first was abandoned", r)
	}
}

// TestJitter: every request takes a random time below Jitter, the same
// sequence for the same seed.
func TestJitter(t *testing.T) {
	draw := func(seed uint64) []time.Duration {
		s := &Sink{Jitter: time.Millisecond, JitterSeed: seed}
		out := make([]time.Duration, 50)
		for i := range out {
			out[i] = s.jitter()
			if out[i] < 0 || out[i] >= time.Millisecond {
				t.Fatalf("jitter %s outside [0, 1ms)", out[i])
			}
		}
		return out
	}
	a, b, c := draw(1), draw(1), draw(2)
	distinct := map[time.Duration]bool{}
	for i := range a {
		if a[i] != b[i] {
			t.Fatal("the same seed gave different latencies")
		}
		distinct[a[i]] = true
	}
	if len(distinct) < 10 || slicesEqual(a, c) {
		t.Fatalf("jitter does not vary: %d distinct values of 50", len(distinct))
	}
	if (&Sink{}).jitter() != 0 {
		t.Fatal("jitter without Jitter")
	}
}

func slicesEqual(a, b []time.Duration) bool {
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return len(a) == len(b)
}
