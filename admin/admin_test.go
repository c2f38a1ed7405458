package admin

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// fakeDLQ records what the /dlq/ endpoints ask for and answers as told.
type fakeDLQ struct {
	mu        sync.Mutex
	filter    dlq.Filter
	req       dlq.ReplayRequest
	startErr  error
	calls     int
	notLoaded bool // the jobs topic is not loaded yet
}

func (f *fakeDLQ) List(_ context.Context, fl dlq.Filter) (dlq.Page, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.filter = fl
	return dlq.Page{Records: []dlq.Record{{Partition: 0, Offset: 7, Key: "k"}}, Next: &dlq.Position{Partition: 1, From: 3}}, nil
}

func (f *fakeDLQ) StartReplay(r dlq.ReplayRequest) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.req = r
	return "job-1", f.startErr
}

func (f *fakeDLQ) StartRelease(r dlq.ReplayRequest) (string, error) { return f.StartReplay(r) }

func (f *fakeDLQ) Job(id string) (dlq.ReplayJob, bool) {
	return dlq.ReplayJob{ID: id, Kind: dlq.JobReplay, State: dlq.JobRunning}, id == "job-1"
}

func (f *fakeDLQ) Jobs() []dlq.ReplayJob { return []dlq.ReplayJob{{ID: "job-1"}} }

func (f *fakeDLQ) JobsLoaded() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return !f.notLoaded
}

func (f *fakeDLQ) Cancel(id string) (dlq.ReplayJob, error) {
	switch id {
	case "job-1":
		return dlq.ReplayJob{ID: id, State: dlq.JobCancelling}, nil
	case "old":
		return dlq.ReplayJob{ID: id, State: dlq.JobDone}, dlq.ErrJobFinished
	}
	return dlq.ReplayJob{}, dlq.ErrNoJob
}

// serve starts the admin handler with o (Metrics set if nil).
func serve(t *testing.T, o Options) *httptest.Server {
	t.Helper()
	if o.Metrics == nil {
		o.Metrics = telemetry.NewMetrics()
	}
	srv := httptest.NewServer((&Server{o: o}).Handler())
	t.Cleanup(srv.Close)
	return srv
}

// call makes one request and returns the status, headers and body.
func call(t *testing.T, method, url, token, body string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

// jsonOf decodes a JSON object body, failing the test if it is not one.
func jsonOf(t *testing.T, body string) map[string]any {
	t.Helper()
	var v map[string]any
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		t.Fatalf("body is not a JSON object: %v: %q", err, body)
	}
	return v
}

func TestHealthz(t *testing.T) {
	srv := serve(t, Options{Ready: func() bool { return false }})
	st, hdr, body := call(t, "GET", srv.URL+"/healthz", "", "")
	if st != 200 || jsonOf(t, body)["status"] != "ok" || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("/healthz: %d %q %q, want 200 {\"status\":\"ok\"} even when not ready", st, hdr.Get("Content-Type"), body)
	}
}

// TestReadyz: 503 until ready, 200 while ready, 503 again when draining;
// problems are listed without changing the status.
func TestReadyz(t *testing.T) {
	var ready atomic.Bool
	var problems atomic.Pointer[[]string]
	srv := serve(t, Options{Ready: ready.Load, Problems: func() []string {
		if p := problems.Load(); p != nil {
			return *p
		}
		return nil
	}})
	check := func(wantStatus int, wantText string, wantProblems []string) {
		t.Helper()
		st, _, body := call(t, "GET", srv.URL+"/readyz", "", "")
		v := jsonOf(t, body)
		if st != wantStatus || v["status"] != wantText {
			t.Fatalf("/readyz: %d %s, want %d with status %q", st, body, wantStatus, wantText)
		}
		got, _ := v["problems"].([]any)
		if len(got) != len(wantProblems) {
			t.Fatalf("/readyz problems %v, want %v", v["problems"], wantProblems)
		}
		for i := range got {
			if got[i] != wantProblems[i] {
				t.Fatalf("/readyz problems %v, want %v", got, wantProblems)
			}
		}
	}
	check(503, "not ready", nil)
	ready.Store(true)
	check(200, "ready", nil)
	ps := []string{"dead-letter writes to orderly.dlq failing since 10:00: TOPIC_AUTHORIZATION_FAILED"}
	problems.Store(&ps)
	check(200, "ready", ps)
	ready.Store(false)
	check(503, "not ready", ps)

	// Without a Ready function the server is never ready.
	srv2 := serve(t, Options{})
	if st, _, _ := call(t, "GET", srv2.URL+"/readyz", "", ""); st != 503 {
		t.Fatalf("/readyz without Ready: %d, want 503", st)
	}
}

func TestMetrics(t *testing.T) {
	m := telemetry.NewMetrics()
	m.Messages.WithLabelValues("delivered").Add(3)
	m.DLQProduced.Inc()
	srv := serve(t, Options{Metrics: m})
	st, hdr, body := call(t, "GET", srv.URL+"/metrics", "", "")
	if st != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain") {
		t.Fatalf("/metrics: %d %q", st, hdr.Get("Content-Type"))
	}
	for _, want := range []string{`orderly_messages_total{outcome="delivered"} 3`, "orderly_dlq_produced_total 1", "# TYPE orderly_messages_total counter"} {
		if !strings.Contains(body, want) {
			t.Fatalf("/metrics lacks %q:\n%s", want, body)
		}
	}
}

// TestUnknownEndpoint: anything else is a JSON 404.
func TestUnknownEndpoint(t *testing.T) {
	srv := serve(t, Options{})
	st, _, body := call(t, "GET", srv.URL+"/nope", "", "")
	if st != 404 || !strings.Contains(jsonOf(t, body)["error"].(string), "/nope") {
		t.Fatalf("GET /nope: %d %s, want a JSON 404 naming the path", st, body)
	}
	if st, _, _ := call(t, "POST", srv.URL+"/healthz", "", ""); st != 404 && st != 405 {
		t.Fatalf("POST /healthz: %d", st)
	}
}

// TestDLQAuth: the /dlq/ endpoints need the bearer token; every refusal is
// a JSON error, and nothing reaches the DLQ without the right token.
func TestDLQAuth(t *testing.T) {
	f := &fakeDLQ{}
	srv := serve(t, Options{Token: "s3cret", DLQ: f})
	for _, tt := range []struct {
		name, method, path, token, body string
	}{
		{"no token", "GET", "/dlq/messages", "", ""},
		{"wrong token", "GET", "/dlq/messages", "s3cre", ""},
		{"token as prefix", "GET", "/dlq/messages", "s3cretX", ""},
		{"replay without token", "POST", "/dlq/replay", "", `{"key":"k"}`},
		{"release with a wrong token", "POST", "/dlq/release", "nope", `{"key":"k"}`},
		{"job status without token", "GET", "/dlq/replay/job-1", "", ""},
		{"cancel without token", "DELETE", "/dlq/replay/job-1", "", ""},
		{"unknown dlq path without token", "GET", "/dlq/whatever", "", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st, hdr, body := call(t, tt.method, srv.URL+tt.path, tt.token, tt.body)
			if st != 401 || hdr.Get("WWW-Authenticate") == "" || hdr.Get("Content-Type") != "application/json" {
				t.Fatalf("%s %s: %d %q, want a JSON 401 with WWW-Authenticate", tt.method, tt.path, st, body)
			}
			if msg, _ := jsonOf(t, body)["error"].(string); msg == "" {
				t.Fatalf("401 body %s has no error", body)
			}
		})
	}
	// A header that is not "Bearer <token>" is refused too.
	req, _ := http.NewRequest("GET", srv.URL+"/dlq/messages", nil)
	req.Header.Set("Authorization", "Basic s3cret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("Basic auth: %d, want 401", resp.StatusCode)
	}
	if f.calls != 0 {
		t.Fatalf("the DLQ was called %d times without the right token", f.calls)
	}

	st, _, body := call(t, "GET", srv.URL+"/dlq/messages?partition=2&from=5&limit=10&key=k", "s3cret", "")
	v := jsonOf(t, body)
	if st != 200 || v["count"] != float64(1) || v["next_page"] == nil {
		t.Fatalf("GET /dlq/messages with the token: %d %s", st, body)
	}
	if f.filter.Partition != 2 || f.filter.From != 5 || f.filter.Limit != 10 || f.filter.Key != "k" {
		t.Fatalf("filter passed on: %+v", f.filter)
	}
}

// TestDLQErrors: every error of the /dlq/ endpoints is JSON, with the
// documented status.
func TestDLQErrors(t *testing.T) {
	f := &fakeDLQ{}
	srv := serve(t, Options{Token: "t", DLQ: f})
	for _, tt := range []struct {
		name, method, path, body string
		startErr                 error
		notLoaded                bool
		status                   int
		allow                    string
	}{
		{name: "bad limit", method: "GET", path: "/dlq/messages?limit=0", status: 400},
		{name: "bad partition", method: "GET", path: "/dlq/messages?partition=-1", status: 400},
		{name: "bad cursor", method: "GET", path: "/dlq/messages?cursor=x", status: 400},
		{name: "unknown field", method: "POST", path: "/dlq/replay", body: `{"keys":"k"}`, status: 400},
		{name: "two values", method: "POST", path: "/dlq/replay", body: `{} {}`, status: 400},
		{name: "rejected request", method: "POST", path: "/dlq/replay", body: `{}`, startErr: dlq.ErrBadRequest, status: 400},
		{name: "job running", method: "POST", path: "/dlq/replay", body: `{}`, startErr: dlq.ErrReplayRunning, status: 409},
		{name: "jobs not loaded", method: "POST", path: "/dlq/release", body: `{}`, startErr: dlq.ErrJobsNotReady, status: 503},
		{name: "job not written in time", method: "POST", path: "/dlq/replay", body: `{}`, startErr: dlq.ErrJobUnsure, status: 503},
		{name: "unknown job", method: "GET", path: "/dlq/replay/nope", status: 404},
		{name: "cancel unknown job", method: "DELETE", path: "/dlq/replay/nope", status: 404},
		{name: "cancel finished job", method: "DELETE", path: "/dlq/replay/old", status: 409},
		{name: "wrong method", method: "PUT", path: "/dlq/replay", status: 405, allow: "GET, POST"},
		{name: "wrong method on a job", method: "POST", path: "/dlq/replay/job-1", status: 405, allow: "GET, DELETE"},
		{name: "unknown dlq path", method: "GET", path: "/dlq/nope", status: 404},
		{name: "dlq without a slash", method: "GET", path: "/dlq", status: 404},
		{name: "jobs listed before they are loaded", method: "GET", path: "/dlq/replay", notLoaded: true, status: 503},
		{name: "a job asked for before the jobs are loaded", method: "GET", path: "/dlq/replay/job-1", notLoaded: true, status: 503},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f.mu.Lock()
			f.startErr, f.notLoaded = tt.startErr, tt.notLoaded
			f.mu.Unlock()
			st, hdr, body := call(t, tt.method, srv.URL+tt.path, "t", tt.body)
			if st != tt.status || hdr.Get("Content-Type") != "application/json" {
				t.Fatalf("%s %s: %d %q %s, want %d JSON", tt.method, tt.path, st, hdr.Get("Content-Type"), body, tt.status)
			}
			if msg, _ := jsonOf(t, body)["error"].(string); msg == "" {
				t.Fatalf("%s %s: body %s has no error", tt.method, tt.path, body)
			}
			if hdr.Get("Allow") != tt.allow {
				t.Fatalf("Allow: %q, want %q", hdr.Get("Allow"), tt.allow)
			}
		})
	}
	f.mu.Lock()
	f.startErr, f.notLoaded = nil, false
	f.mu.Unlock()
	st, hdr, body := call(t, "POST", srv.URL+"/dlq/replay", "t", `{"key":"user-3","rate":50}`)
	if st != 202 || hdr.Get("Location") != "/dlq/replay/job-1" || jsonOf(t, body)["id"] != "job-1" || f.req.Key != "user-3" || f.req.Rate != 50 {
		t.Fatalf("POST /dlq/replay: %d %s (Location %q), request passed on %+v", st, body, hdr.Get("Location"), f.req)
	}
	if st, _, body := call(t, "DELETE", srv.URL+"/dlq/replay/job-1", "t", ""); st != 202 || jsonOf(t, body)["state"] != dlq.JobCancelling {
		t.Fatalf("DELETE /dlq/replay/job-1: %d %s", st, body)
	}
}

// TestDLQDisabled: without a DLQ the endpoints answer a JSON 404 (after
// the token check).
func TestDLQDisabled(t *testing.T) {
	srv := serve(t, Options{Token: "t"})
	if st, _, _ := call(t, "GET", srv.URL+"/dlq/messages", "", ""); st != 401 {
		t.Fatalf("no token: %d, want 401", st)
	}
	st, _, body := call(t, "GET", srv.URL+"/dlq/messages", "t", "")
	if st != 404 || !strings.Contains(jsonOf(t, body)["error"].(string), "disabled") {
		t.Fatalf("GET /dlq/messages without a DLQ: %d %s", st, body)
	}
}

// TestListenRefusesOpenDLQ: /dlq/ without a token is served only on a
// loopback address.
func TestListenRefusesOpenDLQ(t *testing.T) {
	if _, err := Listen(Options{Listen: "0.0.0.0:0", DLQ: &fakeDLQ{}, Metrics: telemetry.NewMetrics()}); err == nil ||
		!strings.Contains(err.Error(), "without admin.token") {
		t.Fatalf("Listen on 0.0.0.0 with a DLQ and no token: %v, want a refusal", err)
	}
	for _, o := range []Options{
		{Listen: "127.0.0.1:0", DLQ: &fakeDLQ{}},
		{Listen: "0.0.0.0:0", DLQ: &fakeDLQ{}, Token: "t"},
		{Listen: "0.0.0.0:0"},
	} {
		o.Metrics = telemetry.NewMetrics()
		s, err := Listen(o)
		if err != nil {
			t.Fatalf("Listen(%s, token %q, dlq %v): %v", o.Listen, o.Token, o.DLQ != nil, err)
		}
		s.ln.Close()
	}
	if _, err := Listen(Options{Listen: "256.0.0.1:1", Metrics: telemetry.NewMetrics()}); err == nil {
		t.Fatal("Listen on a bad address succeeded")
	}
}

// TestServe: Serve answers on the listener until its context ends, then
// shuts down and returns nil.
func TestServe(t *testing.T) {
	s, err := Listen(Options{Listen: "127.0.0.1:0", Ready: func() bool { return true }, Metrics: telemetry.NewMetrics()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(ctx) }()
	if st, _, _ := call(t, "GET", "http://"+s.Addr()+"/healthz", "", ""); st != 200 {
		t.Fatalf("/healthz on %s: %d", s.Addr(), st)
	}
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
	if _, err := http.Get("http://" + s.Addr() + "/healthz"); err == nil {
		t.Fatal("still serving after Serve returned")
	}
}
