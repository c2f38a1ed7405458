package service

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

type apiClient struct {
	t     *testing.T
	base  string
	token string
}

func (c apiClient) do(method, path string, body any, out any) int {
	c.t.Helper()
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, c.base+path, rd)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 400 {
		var e map[string]string
		if json.Unmarshal(b, &e) != nil || e["error"] == "" {
			c.t.Fatalf("%s %s: status %d without a JSON error: %s", method, path, resp.StatusCode, b)
		}
	}
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			c.t.Fatalf("%s %s: %v: %s", method, path, err, b)
		}
	}
	return resp.StatusCode
}

// TestDLQInspectAndReplay: messages the target rejects land in the DLQ; the
// admin API lists them behind the bearer token; a replay delivers them once
// the target accepts them, one job at a time; a second replay resends
// nothing; what fails again goes back with orderly.attempts increased.
func TestDLQInspectAndReplay(t *testing.T) {
	sink := testkit.NewSink()
	var rejecting atomic.Bool
	rejecting.Store(true)
	hold := make(chan struct{})
	var holdOnce sync.Once
	var holding atomic.Bool
	sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "bad" && rejecting.Load() {
			return http.StatusUnprocessableEntity
		}
		return 0
	}
	sink.Delay = func(d *testkit.Delivery) time.Duration {
		if d.Key == "bad" && holding.Load() {
			<-hold
		}
		return 0
	}
	srv := httptest.NewServer(sink)
	defer srv.Close()
	adminAddr := testkit.FreeAddr(t)
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
brokers = "embedded"
group_id = "replaytest"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 2
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
[http.retry]
initial_backoff = "5ms"
max_backoff = "50ms"
[admin]
listen = %q
token = "s3cret"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, adminAddr, srv.URL)), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := New(cfg, slog.New(slog.DiscardHandler), "test")
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- svc.Run(ctx) }()
	defer func() {
		holdOnce.Do(func() { close(hold) })
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("run: %v", err)
		}
	}()

	prod, err := testkit.NewProducer(svc.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	var recs []testkit.Record
	for i := 0; i < 10; i++ {
		recs = append(recs, testkit.Record{Key: []byte("bad"), Value: []byte(fmt.Sprintf(`{"key":"bad","seq":%d}`, i))})
		recs = append(recs, testkit.Record{Key: []byte("good"), Value: []byte(fmt.Sprintf(`{"key":"good","seq":%d}`, i))})
	}
	if err := prod.Produce(context.Background(), "orders", recs); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "10 dead letters", func() bool { return svc.Metrics().Sum("orderly_dlq_produced_total") >= 10 })

	api := apiClient{t: t, base: "http://" + adminAddr, token: "s3cret"}
	if st := (apiClient{t: t, base: api.base, token: "wrong"}).do("GET", "/dlq/messages", nil, nil); st != 401 {
		t.Fatalf("wrong token: status %d, want 401", st)
	}
	if st := (apiClient{t: t, base: api.base}).do("GET", "/dlq/messages", nil, nil); st != 401 {
		t.Fatalf("no token: status %d, want 401", st)
	}
	if st := api.do("GET", "/dlq/messages?limit=abc", nil, nil); st != 400 {
		t.Fatalf("bad limit: status %d, want 400", st)
	}
	var list struct {
		Messages []struct {
			K        string `json:"key"`
			R        string `json:"route"`
			Status   int    `json:"status"`
			Attempts int    `json:"attempts"`
		} `json:"messages"`
		Count int `json:"count"`
	}
	if st := api.do("GET", "/dlq/messages?limit=1000", nil, &list); st != 200 || list.Count != 10 {
		t.Fatalf("list: status %d, %d records, want 10", st, list.Count)
	}
	if m := list.Messages[0]; m.K != "bad" || m.R != "people" || m.Status != 422 || m.Attempts != 1 {
		t.Fatalf("record %+v", m)
	}
	var page struct {
		Count int            `json:"count"`
		Next  map[string]int `json:"next"`
	}
	if api.do("GET", "/dlq/messages?limit=3&key=bad", nil, &page); page.Count != 3 || page.Next == nil {
		t.Fatalf("paging: %+v", page)
	}

	// Replay while the target accepts again; hold it to see the 409.
	rejecting.Store(false)
	holding.Store(true)
	var started struct{ ID string }
	if st := api.do("POST", "/dlq/replay", map[string]any{"key": "bad"}, &started); st != 202 || started.ID == "" {
		t.Fatalf("replay: status %d %+v", st, started)
	}
	if st := api.do("POST", "/dlq/replay", map[string]any{}, nil); st != 409 {
		t.Fatalf("second replay while one runs: status %d, want 409", st)
	}
	if st := api.do("POST", "/dlq/replay", map[string]any{"bogus": 1}, nil); st != 400 {
		t.Fatalf("unknown field: status %d, want 400", st)
	}
	holding.Store(false)
	holdOnce.Do(func() { close(hold) })
	var job struct {
		State    string `json:"state"`
		Matched  int    `json:"matched"`
		Replayed int    `json:"replayed"`
		Failed   int    `json:"failed"`
	}
	testkit.WaitFor(t, 30*time.Second, "the replay to finish", func() bool {
		api.do("GET", "/dlq/replay/"+started.ID, nil, &job)
		return job.State != "running"
	})
	if job.State != "done" || job.Replayed != 10 || job.Failed != 0 {
		t.Fatalf("replay job %+v", job)
	}
	rep := sink.Check(map[string][]int64{"bad": {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, "good": {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}})
	if !rep.OK() {
		t.Fatalf("after replay: %s", rep)
	}

	// A second replay resends nothing: progress was committed.
	if st := api.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 {
		t.Fatalf("second replay: %d", st)
	}
	testkit.WaitFor(t, 30*time.Second, "the second replay to finish", func() bool {
		api.do("GET", "/dlq/replay/"+started.ID, nil, &job)
		return job.State != "running"
	})
	if job.State != "done" || job.Matched != 0 {
		t.Fatalf("second replay job %+v: want nothing matched", job)
	}
	// What fails again goes back to the DLQ with orderly.attempts increased.
	rejecting.Store(true)
	if err := prod.Produce(context.Background(), "orders", []testkit.Record{{Key: []byte("bad"), Value: []byte(`{"key":"bad","seq":10}`)}}); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "the 11th dead letter", func() bool { return svc.Metrics().Sum("orderly_dlq_produced_total") >= 11 })
	if st := api.do("POST", "/dlq/replay", map[string]any{"key": "bad"}, &started); st != 202 {
		t.Fatalf("third replay: %d", st)
	}
	testkit.WaitFor(t, 30*time.Second, "the third replay to finish", func() bool {
		api.do("GET", "/dlq/replay/"+started.ID, nil, &job)
		return job.State != "running"
	})
	if job.State != "done" || job.Matched != 1 || job.Failed != 1 {
		t.Fatalf("third replay job %+v: want one record failing again", job)
	}
	api.do("GET", "/dlq/messages?limit=1000&key=bad", nil, &list)
	if last := list.Messages[len(list.Messages)-1]; list.Count != 12 || last.Attempts != 2 || last.Status != 422 {
		t.Fatalf("re-dead-lettered record: count %d, last %+v; want 12 records, the last with attempts 2", list.Count, last)
	}

	if st := api.do("GET", "/dlq/replay/nope", nil, nil); st != 404 {
		t.Fatalf("unknown job: %d", st)
	}
	if !strings.Contains(httpGet(t, api.base+"/metrics"), "orderly_replay_messages_total") {
		t.Fatal("no replay metric")
	}
}

func httpGet(t *testing.T, url string) string {
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
