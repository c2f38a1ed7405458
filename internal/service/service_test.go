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
			ReplayOf string `json:"replay_of"`
			Handled  bool   `json:"handled"`
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
		return job.State != "" && job.State != "queued" && job.State != "running"
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
		return job.State != "" && job.State != "queued" && job.State != "running"
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
		return job.State != "" && job.State != "queued" && job.State != "running"
	})
	if job.State != "done" || job.Matched != 1 || job.Failed != 1 {
		t.Fatalf("third replay job %+v: want one record failing again", job)
	}
	api.do("GET", "/dlq/messages?limit=1000&key=bad", nil, &list)
	if last := list.Messages[len(list.Messages)-1]; list.Count != 12 || last.Attempts != 2 || last.Status != 422 || last.ReplayOf == "" || last.Handled {
		t.Fatalf("re-dead-lettered record: count %d, last %+v; want 12 records, the last with attempts 2, a replay_of and not handled", list.Count, last)
	}
	if prev := list.Messages[len(list.Messages)-2]; !prev.Handled || prev.ReplayOf != "" {
		t.Fatalf("the record replayed: %+v; want it handled", prev)
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

// TestDLQJobsAPI: the listing pages across partitions; release drops dead
// letters (a later replay does not send them); a running job can be
// cancelled and a new replay sends exactly the rest; jobs are listed newest
// first; every error is JSON with the right status.
func TestDLQJobsAPI(t *testing.T) {
	sink := testkit.NewSink()
	var rejecting, holding atomic.Bool
	rejecting.Store(true)
	hold := make(chan struct{})
	var holdOnce sync.Once
	sink.Status = func(*testkit.Delivery) int {
		if rejecting.Load() {
			return http.StatusBadRequest
		}
		return 0
	}
	sink.Delay = func(*testkit.Delivery) time.Duration {
		if holding.Load() {
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
group_id = "jobsapi"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 3
[dispatch]
commit_interval = "100ms"
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
	gen := &testkit.Generator{Keys: 4}
	if err := prod.Produce(context.Background(), "orders", gen.Records(20)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "20 dead letters", func() bool { return svc.Metrics().Sum("orderly_dlq_produced_total") >= 20 })
	api := apiClient{t: t, base: "http://" + adminAddr, token: "s3cret"}

	// Paging across the partitions with next_page.
	seen := map[string]bool{}
	parts := map[int32]bool{}
	for path := "/dlq/messages?limit=3"; path != ""; {
		var page struct {
			Messages []struct {
				Partition int32 `json:"partition"`
				Offset    int64 `json:"offset"`
			} `json:"messages"`
			Next     map[string]int `json:"next"`
			NextPage string         `json:"next_page"`
		}
		if st := api.do("GET", path, nil, &page); st != 200 {
			t.Fatalf("GET %s: %d", path, st)
		}
		for _, m := range page.Messages {
			id := fmt.Sprint(m.Partition, "/", m.Offset)
			if seen[id] {
				t.Fatalf("%s listed twice", id)
			}
			seen[id], parts[m.Partition] = true, true
		}
		if (page.Next == nil) != (page.NextPage == "") {
			t.Fatalf("next %v with next_page %q", page.Next, page.NextPage)
		}
		path = page.NextPage
	}
	if len(seen) != 20 || len(parts) < 2 {
		t.Fatalf("paging saw %d records in %d partitions, want 20 in several", len(seen), len(parts))
	}
	for path, want := range map[string]int{
		"/dlq/messages?cursor=x":               400,
		"/dlq/messages?cursor=1:2&partition=0": 400,
		"/dlq/messages?cursor=2:0&partition=2": 200,
		"/dlq/nope":                            404,
		"/dlq/replay/nope":                     404,
	} {
		if st := api.do("GET", path, nil, nil); st != want {
			t.Fatalf("GET %s: %d, want %d", path, st, want)
		}
	}
	for _, c := range []struct {
		method, path string
		want         int
	}{{"PUT", "/dlq/replay", 405}, {"PATCH", "/dlq/replay/x", 405}, {"GET", "/dlq/release", 405}, {"DELETE", "/dlq/replay/nope", 404}} {
		if st := api.do(c.method, c.path, nil, nil); st != c.want {
			t.Fatalf("%s %s: %d, want %d", c.method, c.path, st, c.want)
		}
	}
	for _, body := range []map[string]any{{"rate": 5}, {"limit": -1}, {"from_offset": 5, "to_offset": 1}, {"bogus": true}} {
		if st := api.do("POST", "/dlq/release", body, nil); st != 400 {
			t.Fatalf("release %v: %d, want 400", body, st)
		}
	}

	type jobT struct {
		ID       string `json:"id"`
		Kind     string `json:"kind"`
		State    string `json:"state"`
		Scanned  int    `json:"scanned"`
		Matched  int    `json:"matched"`
		Skipped  int    `json:"skipped"`
		Replayed int    `json:"replayed"`
		Released int    `json:"released"`
	}
	wait := func(id string) jobT {
		var j jobT
		testkit.WaitFor(t, 30*time.Second, "job "+id, func() bool {
			api.do("GET", "/dlq/replay/"+id, nil, &j)
			return j.State != "" && j.State != "queued" && j.State != "running" && j.State != "cancelling"
		})
		return j
	}
	var started struct{ ID, Kind string }
	if st := api.do("POST", "/dlq/release", map[string]any{"key": "key-0", "dry_run": true}, &started); st != 202 || started.Kind != "release" {
		t.Fatalf("dry-run release: %d %+v", st, started)
	}
	if j := wait(started.ID); j.State != "done" || j.Kind != "release" || j.Matched != 5 || j.Released != 0 || j.Scanned == 0 {
		t.Fatalf("dry-run release: %+v", j)
	}
	api.do("POST", "/dlq/release", map[string]any{"key": "key-0"}, &started)
	release := started.ID
	if j := wait(release); j.State != "done" || j.Released != 5 {
		t.Fatalf("release: %+v", j)
	}

	// A replay held at the target, cancelled.
	rejecting.Store(false)
	holding.Store(true)
	if st := api.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 {
		t.Fatalf("replay: %d", st)
	}
	cancelled := started.ID
	testkit.WaitFor(t, 30*time.Second, "a request held at the target", func() bool { return sink.InFlight() > 0 })
	if st := api.do("POST", "/dlq/release", map[string]any{}, nil); st != 409 {
		t.Fatalf("release while a replay runs: %d, want 409", st)
	}
	var j jobT
	if st := api.do("DELETE", "/dlq/replay/"+cancelled, nil, &j); st != 202 || j.State != "cancelling" {
		t.Fatalf("cancel: %d %+v", st, j)
	}
	holding.Store(false)
	holdOnce.Do(func() { close(hold) })
	if j = wait(cancelled); j.State != "cancelled" || j.Replayed >= 15 || int64(j.Replayed) != sink.Delivered() {
		t.Fatalf("cancelled job %+v; the sink has %d", j, sink.Delivered())
	}
	if st := api.do("DELETE", "/dlq/replay/"+cancelled, nil, nil); st != 409 {
		t.Fatalf("cancelling a finished job: %d, want 409", st)
	}
	firstReplayed := j.Replayed
	api.do("POST", "/dlq/replay", map[string]any{}, &started)
	if j = wait(started.ID); j.State != "done" || j.Replayed != 15-firstReplayed {
		t.Fatalf("replay after the cancel: %+v; the cancelled one replayed %d", j, firstReplayed)
	}
	want := gen.Expected()
	delete(want, "key-0")
	if rep := sink.Check(want); !rep.OK() || rep.Duplicates != 0 || len(sink.Sequences("key-0")) != 0 {
		t.Fatalf("%s; released key-0 got %v", rep, sink.Sequences("key-0"))
	}
	var jobs struct {
		Jobs  []jobT `json:"jobs"`
		Count int    `json:"count"`
	}
	if api.do("GET", "/dlq/replay", nil, &jobs); jobs.Count != 4 || jobs.Jobs[0].ID != started.ID || jobs.Jobs[1].ID != cancelled || jobs.Jobs[2].ID != release {
		t.Fatalf("jobs: %+v", jobs)
	}
	var list struct {
		Messages []struct {
			Handled bool `json:"handled"`
		} `json:"messages"`
	}
	api.do("GET", "/dlq/messages?limit=1000", nil, &list)
	for i, m := range list.Messages {
		if !m.Handled {
			t.Fatalf("record %d not handled after the replays and the release", i)
		}
	}
}

// TestDLQJobsAcrossInstances: two instances of one group on one broker. A
// replay posted to the second answers on both with the same final state,
// and delivers every dead letter once; the jobs list is the same on both.
func TestDLQJobsAcrossInstances(t *testing.T) {
	sink := testkit.NewSink()
	var rejecting atomic.Bool
	rejecting.Store(true)
	sink.Status = func(*testkit.Delivery) int {
		if rejecting.Load() {
			return http.StatusBadRequest
		}
		return 0
	}
	srv := httptest.NewServer(sink)
	defer srv.Close()
	parse := func(brokers, adminAddr string) *config.Config {
		t.Helper()
		cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = "twoinstances"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 2
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
[admin]
listen = %q
token = "s3cret"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, brokers, adminAddr, srv.URL)), "t.toml")
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	start := func(cfg *config.Config) *Service {
		t.Helper()
		svc, err := New(cfg, slog.New(slog.DiscardHandler), "test")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		runErr := make(chan error, 1)
		go func() { runErr <- svc.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			if err := <-runErr; err != nil {
				t.Errorf("run: %v", err)
			}
			svc.Close()
		})
		return svc
	}
	addrA, addrB := testkit.FreeAddr(t), testkit.FreeAddr(t)
	a := start(parse("embedded", addrA))
	b := start(parse(a.Brokers(), addrB)) // stopped first (cleanups run last first), before A's broker
	apiA := apiClient{t: t, base: "http://" + addrA, token: "s3cret"}
	apiB := apiClient{t: t, base: "http://" + addrB, token: "s3cret"}

	prod, err := testkit.NewProducer(a.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	gen := &testkit.Generator{Keys: 4}
	if err := prod.Produce(context.Background(), "orders", gen.Records(20)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "20 dead letters", func() bool {
		return a.Metrics().Sum("orderly_dlq_produced_total")+b.Metrics().Sum("orderly_dlq_produced_total") >= 20
	})
	rejecting.Store(false)

	var started struct{ ID string }
	if st := apiB.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 || started.ID == "" {
		t.Fatalf("replay on B: status %d %+v", st, started)
	}
	type job struct {
		ID       string `json:"id"`
		State    string `json:"state"`
		Replayed int    `json:"replayed"`
		Matched  int    `json:"matched"`
	}
	var ja, jb job
	testkit.WaitFor(t, 30*time.Second, "the replay done, the same on both instances", func() bool {
		ja, jb = job{}, job{}
		apiA.do("GET", "/dlq/replay/"+started.ID, nil, &ja)
		apiB.do("GET", "/dlq/replay/"+started.ID, nil, &jb)
		return ja.State == "done" && ja == jb
	})
	if ja.Replayed != 20 {
		t.Fatalf("job %+v; want 20 replayed", ja)
	}
	if rep := sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 || rep.Delivered != 20 {
		t.Fatalf("at the sink: %s", rep)
	}
	var listA, listB struct {
		Jobs  []job `json:"jobs"`
		Count int   `json:"count"`
	}
	apiA.do("GET", "/dlq/replay", nil, &listA)
	apiB.do("GET", "/dlq/replay", nil, &listB)
	if listA.Count != 1 || listB.Count != 1 || listA.Jobs[0] != listB.Jobs[0] {
		t.Fatalf("jobs on A %+v, on B %+v", listA, listB)
	}
	// A second replay, posted to A, finds nothing left.
	if st := apiA.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 {
		t.Fatalf("second replay on A: status %d", st)
	}
	testkit.WaitFor(t, 30*time.Second, "the second replay done on B", func() bool {
		jb = job{}
		apiB.do("GET", "/dlq/replay/"+started.ID, nil, &jb)
		return jb.State == "done"
	})
	if jb.Matched != 0 || sink.Delivered() != 20 {
		t.Fatalf("second job %+v, %d delivered; want nothing matched", jb, sink.Delivered())
	}
}
