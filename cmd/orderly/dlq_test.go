package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/service"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestDLQCommands drives `orderly dlq list|release|replay|cancel|status`
// against a running service's admin API: list by key and page by cursor,
// a wrong token, a release, a replay held at the target and cancelled, then
// one that waits for the rest at a rate, and the jobs listed.
func TestDLQCommands(t *testing.T) {
	sink := testkit.NewSink()
	gate := testkit.NewGate(sink, http.StatusBadRequest, nil)
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close) // closed after the service stopped
	admin := testkit.FreeAddr(t)
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
group_id = "dlqcli"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 2
[dispatch]
commit_interval = "100ms"
[admin]
listen = %q
token = "tok"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/p/{{ .Key }}"
`, admin, srv.URL)), "t.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler), "test")
	if err != nil {
		t.Fatal(err)
	}
	testkit.RunService(t, svc)
	defer gate.Release()
	prod, err := testkit.NewProducer(svc.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	gen := &testkit.Generator{Keys: 3}
	if err := prod.Produce(context.Background(), "orders", gen.Records(9)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "9 dead letters", func() bool { return svc.Metrics().Sum("orderly_dlq_produced_total") >= 9 })
	t.Setenv("ORDERLY_ADMIN_TOKEN", "tok")
	dlq := func(args ...string) (int, string, string) {
		return runCLI(t, append([]string{"dlq", args[0], "--admin", admin}, args[1:]...)...)
	}

	code, out, errs := dlq("list", "--key", "key-1")
	var list struct{ Count int }
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || list.Count != 3 {
		t.Fatalf("dlq list --key: exit %d: %s %s; want 3 records", code, out, errs)
	}
	// Paging: one record a page, following next_page's cursor.
	seen := map[string]bool{}
	var cursor []string
	for page := 0; ; page++ {
		code, out, errs := dlq(append([]string{"list", "--limit", "1"}, cursor...)...)
		if code != 0 {
			t.Fatalf("dlq list: exit %d: %s", code, errs)
		}
		var l struct {
			Messages []struct {
				Partition int32
				Offset    int64
			}
			NextPage string `json:"next_page"`
		}
		if err := json.Unmarshal([]byte(out), &l); err != nil || len(l.Messages) != 1 {
			t.Fatalf("dlq list page %d: %v: %s", page, err, out)
		}
		id := fmt.Sprint(l.Messages[0].Partition, "/", l.Messages[0].Offset)
		if seen[id] {
			t.Fatalf("record %s listed twice", id)
		}
		seen[id] = true
		if l.NextPage == "" {
			break
		}
		u, err := url.Parse(l.NextPage)
		if err != nil {
			t.Fatal(err)
		}
		cursor = []string{"--cursor", u.Query().Get("cursor")}
	}
	if len(seen) != 9 {
		t.Fatalf("paging saw %d records, want 9", len(seen))
	}
	if code, _, errs := dlq("status", "--token", "wrong", "nope"); code != 1 || !strings.Contains(errs, "401") {
		t.Fatalf("dlq status with a wrong token: exit %d: %s", code, errs)
	}

	// Release key-1's dead letters: a later replay does not send them.
	if code, out, errs := dlq("release", "--key", "key-1", "--wait"); code != 0 || !strings.Contains(out, `"released": 3`) {
		t.Fatalf("dlq release: exit %d: %s %s", code, out, errs)
	}

	// Cancel a replay held at the target; the next replay sends the rest.
	gate.Refuse(false)
	gate.Hold()
	code, out, errs = dlq("replay")
	var started struct{ ID string }
	if code != 0 || json.Unmarshal([]byte(out), &started) != nil || started.ID == "" {
		t.Fatalf("dlq replay: exit %d: %s %s", code, out, errs)
	}
	testkit.WaitFor(t, 30*time.Second, "a replayed request held at the target", func() bool { return sink.InFlight() > 0 })
	if code, out, errs := dlq("cancel", started.ID); code != 0 || !strings.Contains(out, `"state": "cancelling"`) {
		t.Fatalf("dlq cancel: exit %d: %s %s", code, out, errs)
	}
	gate.Release()
	var job struct {
		State    string
		Replayed int
	}
	testkit.WaitFor(t, 30*time.Second, "the replay cancelled", func() bool {
		code, out, _ := dlq("status", started.ID)
		return code == 0 && json.Unmarshal([]byte(out), &job) == nil && job.State == "cancelled"
	})
	if job.Replayed >= 6 {
		t.Fatalf("the cancelled replay sent everything: %+v", job)
	}
	if code, _, errs := dlq("cancel", started.ID); code != 1 || !strings.Contains(errs, "409") {
		t.Fatalf("cancelling a finished job: exit %d: %s", code, errs)
	}
	if code, out, errs := dlq("replay", "--wait", "--rate", "100"); code != 0 || !strings.Contains(out, fmt.Sprintf(`"replayed": %d`, 6-job.Replayed)) {
		t.Fatalf("dlq replay --wait: exit %d: %s %s (the cancelled one replayed %d)", code, out, errs, job.Replayed)
	}
	want := gen.Expected()
	delete(want, "key-1")
	if rep := sink.Check(want); !rep.OK() || rep.Duplicates != 0 || len(sink.Sequences("key-1")) != 0 {
		t.Fatalf("%s; key-1 got %v", rep, sink.Sequences("key-1"))
	}
	code, out, errs = dlq("status")
	var jobs struct{ Count int }
	if code != 0 || json.Unmarshal([]byte(out), &jobs) != nil || jobs.Count != 3 {
		t.Fatalf("dlq status: exit %d: %s %s; want 3 jobs", code, out, errs)
	}
}
