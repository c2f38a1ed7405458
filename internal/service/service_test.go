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
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// startService runs a service until the test ends: its one route delivers
// to sinkURL; its admin API listens on a free address behind the token
// "s3cret" (the client returned); brokers is "embedded" (an embedded broker
// with partitions partitions) or another service's Brokers().
func startService(t *testing.T, group, brokers string, partitions int, sinkURL string) (*Service, apiClient) {
	t.Helper()
	adminAddr := testkit.FreeAddr(t)
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = %q
embedded_listen = "127.0.0.1:0"
embedded_partitions = %d
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
`, brokers, group, partitions, adminAddr, sinkURL)), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := New(cfg, slog.New(slog.DiscardHandler), "test")
	if err != nil {
		t.Fatal(err)
	}
	testkit.RunService(t, svc)
	return svc, apiClient{t: t, base: "http://" + adminAddr, token: "s3cret"}
}

// newProducer returns a producer to brokers, closed when the test ends,
// before the services started earlier.
func newProducer(t *testing.T, brokers string) *testkit.Producer {
	t.Helper()
	prod, err := testkit.NewProducer(brokers)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(prod.Close)
	return prod
}

// produceDeadLetters produces recs to "orders" and waits until svcs have
// dead-lettered want records in all.
func produceDeadLetters(t *testing.T, prod *testkit.Producer, recs []testkit.Record, want int, svcs ...*Service) {
	t.Helper()
	if err := prod.Produce(context.Background(), "orders", recs); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, fmt.Sprint(want, " dead letters"), func() bool {
		var n float64
		for _, s := range svcs {
			n += s.Metrics().Sum("orderly_dlq_produced_total")
		}
		return n >= float64(want)
	})
}

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

// job is a replay or release job as the admin API shows it.
type job struct {
	ID       string `json:"id"`
	Kind     string `json:"kind"`
	State    string `json:"state"`
	Scanned  int    `json:"scanned"`
	Matched  int    `json:"matched"`
	Skipped  int    `json:"skipped"`
	Replayed int    `json:"replayed"`
	Released int    `json:"released"`
	Failed   int    `json:"failed"`
}

// job returns job id as the API shows it (zero if it answers an error).
func (c apiClient) job(id string) job {
	c.t.Helper()
	var j job
	c.do("GET", "/dlq/replay/"+id, nil, &j)
	return j
}

// waitJob waits for job id to end and returns it.
func (c apiClient) waitJob(id string) job {
	c.t.Helper()
	var j job
	testkit.WaitFor(c.t, 30*time.Second, "job "+id+" to end", func() bool {
		switch j = c.job(id); j.State {
		case "", "queued", "running", "cancelling":
			return false
		}
		return true
	})
	return j
}

// TestDLQInspectAndReplay: messages the target rejects land in the DLQ; the
// admin API lists them behind the bearer token; a replay delivers them once
// the target accepts them, one job at a time; a second replay resends
// nothing; what fails again goes back with orderly.attempts increased.
func TestDLQInspectAndReplay(t *testing.T) {
	sink := testkit.NewSink()
	gate := testkit.NewGate(sink, http.StatusUnprocessableEntity, func(d *testkit.Delivery) bool { return d.Key == "bad" })
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close) // closed after the service stopped
	svc, api := startService(t, "replaytest", "embedded", 2, srv.URL)
	defer gate.Release()
	prod := newProducer(t, svc.Brokers())
	var recs []testkit.Record
	for i := 0; i < 10; i++ {
		recs = append(recs, testkit.Record{Key: []byte("bad"), Value: []byte(fmt.Sprintf(`{"key":"bad","seq":%d}`, i))})
		recs = append(recs, testkit.Record{Key: []byte("good"), Value: []byte(fmt.Sprintf(`{"key":"good","seq":%d}`, i))})
	}
	produceDeadLetters(t, prod, recs, 10, svc)

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
	gate.Refuse(false)
	gate.Hold()
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
	gate.Release()
	if j := api.waitJob(started.ID); j.State != "done" || j.Replayed != 10 || j.Failed != 0 {
		t.Fatalf("replay job %+v", j)
	}
	rep := sink.Check(map[string][]int64{"bad": {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, "good": {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}})
	if !rep.OK() {
		t.Fatalf("after replay: %s", rep)
	}

	// A second replay resends nothing: progress was committed.
	if st := api.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 {
		t.Fatalf("second replay: %d", st)
	}
	if j := api.waitJob(started.ID); j.State != "done" || j.Matched != 0 {
		t.Fatalf("second replay job %+v: want nothing matched", j)
	}
	// What fails again goes back to the DLQ with orderly.attempts increased.
	gate.Refuse(true)
	produceDeadLetters(t, prod, []testkit.Record{{Key: []byte("bad"), Value: []byte(`{"key":"bad","seq":10}`)}}, 11, svc)
	if st := api.do("POST", "/dlq/replay", map[string]any{"key": "bad"}, &started); st != 202 {
		t.Fatalf("third replay: %d", st)
	}
	if j := api.waitJob(started.ID); j.State != "done" || j.Matched != 1 || j.Failed != 1 {
		t.Fatalf("third replay job %+v: want one record failing again", j)
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
	gate := testkit.NewGate(sink, http.StatusBadRequest, nil)
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close) // closed after the service stopped
	svc, api := startService(t, "jobsapi", "embedded", 3, srv.URL)
	defer gate.Release()
	gen := &testkit.Generator{Keys: 4}
	produceDeadLetters(t, newProducer(t, svc.Brokers()), gen.Records(20), 20, svc)

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

	var started struct{ ID, Kind string }
	if st := api.do("POST", "/dlq/release", map[string]any{"key": "key-0", "dry_run": true}, &started); st != 202 || started.Kind != "release" {
		t.Fatalf("dry-run release: %d %+v", st, started)
	}
	if j := api.waitJob(started.ID); j.State != "done" || j.Kind != "release" || j.Matched != 5 || j.Released != 0 || j.Scanned == 0 {
		t.Fatalf("dry-run release: %+v", j)
	}
	api.do("POST", "/dlq/release", map[string]any{"key": "key-0"}, &started)
	release := started.ID
	if j := api.waitJob(release); j.State != "done" || j.Released != 5 {
		t.Fatalf("release: %+v", j)
	}

	// A replay held at the target, cancelled.
	gate.Refuse(false)
	gate.Hold()
	if st := api.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 {
		t.Fatalf("replay: %d", st)
	}
	cancelled := started.ID
	testkit.WaitFor(t, 30*time.Second, "a request held at the target", func() bool { return sink.InFlight() > 0 })
	if st := api.do("POST", "/dlq/release", map[string]any{}, nil); st != 409 {
		t.Fatalf("release while a replay runs: %d, want 409", st)
	}
	var j job
	if st := api.do("DELETE", "/dlq/replay/"+cancelled, nil, &j); st != 202 || j.State != "cancelling" {
		t.Fatalf("cancel: %d %+v", st, j)
	}
	gate.Release()
	if j = api.waitJob(cancelled); j.State != "cancelled" || j.Replayed >= 15 || int64(j.Replayed) != sink.Delivered() {
		t.Fatalf("cancelled job %+v; the sink has %d", j, sink.Delivered())
	}
	if st := api.do("DELETE", "/dlq/replay/"+cancelled, nil, nil); st != 409 {
		t.Fatalf("cancelling a finished job: %d, want 409", st)
	}
	firstReplayed := j.Replayed
	api.do("POST", "/dlq/replay", map[string]any{}, &started)
	if j = api.waitJob(started.ID); j.State != "done" || j.Replayed != 15-firstReplayed {
		t.Fatalf("replay after the cancel: %+v; the cancelled one replayed %d", j, firstReplayed)
	}
	want := gen.Expected()
	delete(want, "key-0")
	if rep := sink.Check(want); !rep.OK() || rep.Duplicates != 0 || len(sink.Sequences("key-0")) != 0 {
		t.Fatalf("%s; released key-0 got %v", rep, sink.Sequences("key-0"))
	}
	var jobs struct {
		Jobs  []job `json:"jobs"`
		Count int   `json:"count"`
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
	gate := testkit.NewGate(sink, http.StatusBadRequest, nil)
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close) // closed after the services stopped
	a, apiA := startService(t, "twoinstances", "embedded", 2, srv.URL)
	b, apiB := startService(t, "twoinstances", a.Brokers(), 2, srv.URL) // stopped first (cleanups run last first), before A's broker
	gen := &testkit.Generator{Keys: 4}
	produceDeadLetters(t, newProducer(t, a.Brokers()), gen.Records(20), 20, a, b)
	gate.Refuse(false)

	var started struct{ ID string }
	if st := apiB.do("POST", "/dlq/replay", map[string]any{}, &started); st != 202 || started.ID == "" {
		t.Fatalf("replay on B: status %d %+v", st, started)
	}
	var ja, jb job
	testkit.WaitFor(t, 30*time.Second, "the replay done, the same on both instances", func() bool {
		ja, jb = apiA.job(started.ID), apiB.job(started.ID)
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
		jb = apiB.job(started.ID)
		return jb.State == "done"
	})
	if jb.Matched != 0 || sink.Delivered() != 20 {
		t.Fatalf("second job %+v, %d delivered; want nothing matched", jb, sink.Delivered())
	}
}
