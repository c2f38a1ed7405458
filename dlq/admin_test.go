package dlq

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// dlqAdmin returns a Admin for cfg on the harness's broker, its Run
// (the jobs runner) started, closed by t.Cleanup.
func (h *harness) dlqAdmin(cfg *config.Config) *Admin {
	h.T.Helper()
	a, _ := h.dlqInstance(cfg)
	return a
}

// dlqInstance is dlqAdmin, also returning a function that stops its Run
// (as a shutdown does: the running job is handed over) and waits for it.
func (h *harness) dlqInstance(cfg *config.Config) (*Admin, func()) {
	h.T.Helper()
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics)
	if err != nil {
		h.T.Fatal(err)
	}
	m := telemetry.NewMetrics()
	sender := httpclient.New(httpclient.Options{HTTP: cfg.HTTP, Version: "test", Metrics: m})
	a := NewAdmin(Options{Config: cfg, Router: router, Sender: sender, Metrics: m, Logger: kafkatest.Logger(h.T), Brokers: h.Broker.Addr()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := a.Run(ctx); err != nil {
			h.T.Errorf("Admin.Run: %v", err)
		}
	}()
	stop := func() { cancel(); <-done }
	h.T.Cleanup(func() { stop(); a.Close(); sender.Close() })
	return a, stop
}

// dead is a dead letter to seed the DLQ with: event seq of key.
type dead struct {
	key string
	seq int64
}

var seedOffset atomic.Int64 // original offsets of seeded dead letters, unique per test binary

// seedDLQ writes dead letters as the dispatcher does (route people, request
// 0, one attempt, status 400) to DLQ partition part, or by key when part is
// kafka.PartitionAny, in order.
func (h *harness) seedDLQ(part int32, ds ...dead) {
	h.T.Helper()
	if err := h.Prod.ProduceTo(context.Background(), "orderly.dlq", part, h.deadLetters(ds...)); err != nil {
		h.T.Fatal(err)
	}
}

// deadLetters returns ds as the dispatcher writes them to the DLQ.
func (h *harness) deadLetters(ds ...dead) []testkit.Record {
	recs := make([]testkit.Record, len(ds))
	for i, d := range ds {
		hs := []kafka.Header{{Key: "trace", Value: []byte("t-" + d.key)}}
		for _, kv := range [][2]string{{HeaderError, "seeded"}, {HeaderStatus, "400"}, {HeaderRoute, "people"},
			{HeaderRequestIndex, "0"}, {HeaderAttempts, "1"}, {HeaderOriginalTopic, h.Topic},
			{HeaderOriginalPartition, "0"}, {HeaderOriginalOffset, strconv.FormatInt(seedOffset.Add(1), 10)},
			{HeaderOriginalTimestamp, time.Now().UTC().Format(time.RFC3339Nano)}, {HeaderFailedAt, time.Now().UTC().Format(time.RFC3339Nano)}} {
			hs = append(hs, kafka.Header{Key: kv[0], Value: []byte(kv[1])})
		}
		recs[i] = testkit.Record{Key: []byte(d.key), Value: testkit.EventJSON(d.key, d.seq), Headers: hs}
	}
	return recs
}

// seq returns n dead letters per key, interleaved: k0/0, k1/0, ..., k0/1, ...
func seqs(keys []string, n int) []dead {
	var out []dead
	for s := range n {
		for _, k := range keys {
			out = append(out, dead{k, int64(s)})
		}
	}
	return out
}

// expected maps each key of ds to its sequence numbers, in order.
func expected(ds ...dead) map[string][]int64 {
	out := map[string][]int64{}
	for _, d := range ds {
		out[d.key] = append(out[d.key], d.seq)
	}
	return out
}

// runJob starts a job and waits for it to finish.
func runJob(t *testing.T, a *Admin, kind string, req ReplayRequest) ReplayJob {
	t.Helper()
	start := a.StartReplay
	if kind == JobRelease {
		start = a.StartRelease
	}
	id, err := start(req)
	if err != nil {
		t.Fatal(err)
	}
	return waitJob(t, a, id)
}

func waitJob(t *testing.T, a *Admin, id string) ReplayJob {
	t.Helper()
	var j ReplayJob
	testkit.WaitFor(t, time.Minute, "job "+id+" to finish", func() bool {
		var ok bool
		j, ok = a.Job(id)
		return ok && j.FinishedAt != nil
	})
	return j
}

func counts(j ReplayJob) string {
	return fmt.Sprintf("state %s scanned %d matched %d skipped %d replayed %d failed %d deferred %d released %d error %q",
		j.State, j.Scanned, j.Matched, j.Skipped, j.Replayed, j.Failed, j.Deferred, j.Released, j.Error)
}

func wantCounts(t *testing.T, what string, j ReplayJob, scanned, matched, skipped, replayed int) {
	t.Helper()
	if j.State != JobDone || j.Scanned != scanned || j.Matched != matched || j.Skipped != skipped || j.Replayed != replayed {
		t.Fatalf("%s: %s; want done, scanned %d matched %d skipped %d replayed %d", what, counts(j), scanned, matched, skipped, replayed)
	}
}

// TestReplayFilteredThenRest: a replay filtered by key marks only that
// key's records handled, although they sit between other keys' records in
// one partition; a later unfiltered replay sends exactly the rest, each
// record once. Dry runs count what the real job then sends, before and
// after the filtered replay.
func TestReplayFilteredThenRest(t *testing.T) {
	h := newHarness(t, 3)
	p0 := seqs([]string{"user-1", "user-2", "user-3", "user-4"}, 5) // interleaved in partition 0
	p2 := seqs([]string{"user-5", "user-3b"}, 3)
	h.seedDLQ(0, p0...)
	h.seedDLQ(2, p2...)
	total := len(p0) + len(p2)
	a := h.dlqAdmin(h.Config("filtered", "", ""))

	wantCounts(t, "dry run, all", runJob(t, a, JobReplay, ReplayRequest{DryRun: true}), total, total, 0, 0)
	wantCounts(t, "dry run, user-3", runJob(t, a, JobReplay, ReplayRequest{Key: "user-3", DryRun: true}), total, 5, 0, 0)
	if n := h.Sink.Requests(); n != 0 {
		t.Fatalf("dry runs sent %d requests", n)
	}
	wantCounts(t, "replay user-3", runJob(t, a, JobReplay, ReplayRequest{Key: "user-3"}), total, 5, 0, 5)
	if rep := h.Sink.Check(expected(dead{"user-3", 0}, dead{"user-3", 1}, dead{"user-3", 2}, dead{"user-3", 3}, dead{"user-3", 4})); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("after the filtered replay: %s", rep)
	}
	// The commit point stays at the first record not handled (user-1/0 at
	// offset 0): the progress record carries user-3's.
	if c, _, meta := h.committedDLQ("filtered.replay"); c[0] != 0 || meta[0] == "" {
		t.Fatalf("partition 0: committed %d with progress %q; want 0 and a progress record", c[0], meta[0])
	}
	wantCounts(t, "dry run, user-3 again", runJob(t, a, JobReplay, ReplayRequest{Key: "user-3", DryRun: true}), total, 0, 5, 0)
	wantCounts(t, "dry run, the rest", runJob(t, a, JobReplay, ReplayRequest{DryRun: true}), total, total-5, 5, 0)
	wantCounts(t, "replay, the rest", runJob(t, a, JobReplay, ReplayRequest{}), total, total-5, 5, total-5)
	all := append(slices.Clone(p0), p2...)
	if rep := h.Sink.Check(expected(all...)); !rep.OK() || rep.Duplicates != 0 || rep.Delivered != total {
		t.Fatalf("after both replays: %s", rep)
	}
	// Everything is handled: the commit is at the end, a new job reads nothing.
	c, end, _ := h.committedDLQ("filtered.replay")
	if !slices.Equal(c, []int64{int64(len(p0)), -1001, int64(len(p2))}) || !slices.Equal(end, []int64{int64(len(p0)), 0, int64(len(p2))}) {
		t.Fatalf("committed %v, ends %v", c, end)
	}
	wantCounts(t, "replay, nothing left", runJob(t, a, JobReplay, ReplayRequest{}), 0, 0, 0, 0)
	page, err := a.List(context.Background(), Filter{Partition: -1, To: -1})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range page.Records {
		if !r.Handled {
			t.Fatalf("record %d/%d not shown handled", r.Partition, r.Offset)
		}
	}
}

// committedDLQ returns group's committed offsets (-1001 when none), the end
// offsets and the commit metadata of the DLQ's partitions.
func (h *harness) committedDLQ(group string) (committed, end []int64, meta []string) {
	h.T.Helper()
	topic := h.Topic
	h.Topic = "orderly.dlq"
	defer func() { h.Topic = topic }()
	return h.CommittedMeta(group)
}

// TestReplayFiltersByRangeAndLimit: a replay of an offset range with a
// limit handles exactly those records; the rest stay for a later job.
func TestReplayFiltersByRangeAndLimit(t *testing.T) {
	h := newHarness(t, 1)
	ds := seqs([]string{"a", "b"}, 10) // offsets 0..19
	h.seedDLQ(0, ds...)
	a := h.dlqAdmin(h.Config("ranged", "", ""))
	from, to := int64(4), int64(15)
	// Offsets 4..15 of key a: 4, 6, ..., 14 (seq 2..7); the limit takes 3.
	j := runJob(t, a, JobReplay, ReplayRequest{FromOffset: &from, ToOffset: &to, Key: "a", Limit: 3})
	if j.State != JobDone || j.Matched != 3 || j.Replayed != 3 || j.Scanned != 5 {
		t.Fatalf("ranged replay: %s; want 3 of key a replayed after 5 records read", counts(j))
	}
	if got := h.Sink.Sequences("a"); !slices.Equal(got, []int64{2, 3, 4}) {
		t.Fatalf("key a got %v, want [2 3 4]", got)
	}
	j = runJob(t, a, JobReplay, ReplayRequest{})
	if j.Replayed != 17 || j.Skipped != 3 || j.Scanned != 20 {
		t.Fatalf("the rest: %s; want 17 replayed, 3 skipped", counts(j))
	}
	if got := h.Sink.Sequences("a"); !slices.Equal(got, []int64{2, 3, 4, 0, 1, 5, 6, 7, 8, 9}) {
		t.Fatalf("key a got %v", got)
	}
}

// TestReplayCancel: a replay cancelled while the target is slow stops after
// the records in flight and commits; a new replay sends exactly the
// remaining records, none twice.
func TestReplayCancel(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 20 * time.Millisecond }
	keys := make([]string, 8)
	for i := range keys {
		keys[i] = "k" + strconv.Itoa(i)
	}
	ds := seqs(keys, 40)
	h.seedDLQ(kafka.PartitionAny, ds...)
	a := h.dlqAdmin(h.Config("cancel", "", ""))
	id, err := a.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "some records replayed", func() bool { return h.Sink.Delivered() >= 30 })
	if j, err := a.Cancel(id); err != nil || (j.State != JobCancelling && j.State != JobCancelled) {
		t.Fatalf("cancel: %v, %s", err, counts(j))
	}
	first := waitJob(t, a, id)
	if first.State != JobCancelled || first.Replayed >= len(ds) || first.Replayed < 30 {
		t.Fatalf("cancelled job: %s", counts(first))
	}
	if got := h.Sink.Delivered(); got != int64(first.Replayed) {
		t.Fatalf("the sink got %d records, the job counts %d replayed", got, first.Replayed)
	}
	if _, err := a.Cancel(id); err != ErrJobFinished {
		t.Fatalf("cancelling a finished job: %v", err)
	}
	second := runJob(t, a, JobReplay, ReplayRequest{})
	// It starts at the first record not handled and passes over those
	// handled beyond it (the progress record).
	if second.State != JobDone || second.Replayed != len(ds)-first.Replayed || second.Matched != second.Replayed ||
		second.Scanned != second.Matched+second.Skipped {
		t.Fatalf("second job: %s; first replayed %d of %d", counts(second), first.Replayed, len(ds))
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("after the second replay: %s", rep)
	}
}

// TestReplayIsParallelAndOrdered: many keys are replayed concurrently,
// each key's records in order; rate caps the pace.
func TestReplayIsParallelAndOrdered(t *testing.T) {
	h := newHarness(t, 4)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 2 * time.Millisecond }
	keys := make([]string, 40)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
	}
	ds := seqs(keys, 10)
	h.seedDLQ(kafka.PartitionAny, ds...)
	a := h.dlqAdmin(h.Config("parallel", "", ""))
	j := runJob(t, a, JobReplay, ReplayRequest{})
	if j.State != JobDone || j.Replayed != len(ds) {
		t.Fatalf("replay: %s", counts(j))
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
	if n := h.Sink.MaxInFlight(); n < 2 || n > replayLanes {
		t.Fatalf("at most %d requests in flight at once, want 2..%d", n, replayLanes)
	}
	t.Logf("%d records, up to %d requests in flight", len(ds), h.Sink.MaxInFlight())

	// rate: 15 more records at 50 per second take at least 14/50 s.
	more := seqs([]string{"r1", "r2", "r3"}, 5)
	h.seedDLQ(kafka.PartitionAny, more...)
	began := time.Now()
	j = runJob(t, a, JobReplay, ReplayRequest{Rate: 50})
	took := time.Since(began)
	if j.Replayed != len(more) || took < 280*time.Millisecond {
		t.Fatalf("paced replay: %s in %s; want %d replayed in at least 280ms", counts(j), took, len(more))
	}
	if err := (ReplayRequest{Rate: -1}).Validate(JobReplay); err == nil {
		t.Fatal("a negative rate passes")
	}
}

// TestReplayFailsAgain: the target still rejects key K's second record. It
// goes back to the DLQ with orderly.attempts increased and
// orderly.replay_of; K's later records are not sent but copied forward
// behind it, in order, unchanged; other keys go through. Once the target
// accepts, the next replay delivers K's rest in order.
func TestReplayFailsAgain(t *testing.T) {
	h := newHarness(t, 1)
	var rejecting atomic.Bool
	rejecting.Store(true)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "K" && d.Seq == 1 && rejecting.Load() {
			return http.StatusUnprocessableEntity
		}
		return 0
	}
	ds := seqs([]string{"K", "G"}, 5) // K/0 at 0, G/0 at 1, K/1 at 2, ...
	h.seedDLQ(0, ds...)
	a := h.dlqAdmin(h.Config("again", "", ""))
	j := runJob(t, a, JobReplay, ReplayRequest{})
	if j.State != JobDone || j.Matched != 10 || j.Replayed != 6 || j.Failed != 1 || j.Deferred != 3 {
		t.Fatalf("replay: %s; want 6 replayed, 1 failed, 3 deferred", counts(j))
	}
	if got := h.Sink.Sequences("K"); !slices.Equal(got, []int64{0}) {
		t.Fatalf("K got %v, want only [0]: its records after the failure must wait", got)
	}
	page, err := a.List(context.Background(), Filter{Partition: -1, To: -1, Key: "K"})
	if err != nil {
		t.Fatal(err)
	}
	recs := page.Records
	if len(recs) != 9 {
		t.Fatalf("K has %d records in the DLQ, want 5 originals and 4 copies", len(recs))
	}
	for i, r := range recs[:5] {
		if !r.Handled || r.ReplayOf != "" {
			t.Fatalf("original %d: %+v", i, r)
		}
	}
	for i, r := range recs[5:] {
		want := fmt.Sprintf("0/%d", recs[1+i].Offset) // K/1.. at offsets 2, 4, 6, 8
		if r.Handled || r.ReplayOf != want || r.Key != "K" {
			t.Fatalf("copy %d: replay_of %q handled %v, want %q, not handled", i, r.ReplayOf, r.Handled, want)
		}
		if wantSeq := fmt.Sprintf(`"seq":%d`, i+1); !strings.Contains(r.ValuePreview, wantSeq) {
			t.Fatalf("copy %d holds %s, want seq %d: K's order kept", i, r.ValuePreview, i+1)
		}
	}
	if c := recs[5]; c.Attempts != 2 || c.Status != 422 || c.Error == "seeded" {
		t.Fatalf("the failed copy: attempts %d status %d error %q; want 1 earlier + 1 now, 422", c.Attempts, c.Status, c.Error)
	}
	for _, c := range recs[6:] {
		if c.Attempts != 1 || c.Status != 400 || c.Error != "seeded" {
			t.Fatalf("a copy forward changed: %+v", c)
		}
	}
	dlq := h.ReadAll("orderly.dlq", 14, 10*time.Second)
	for _, m := range dlq[10:] {
		if v, _ := kafkatest.Header(m, "trace"); v != "t-K" {
			t.Fatalf("copy lost the original's own header: %v", m.Headers)
		}
		n := 0
		for _, hd := range m.Headers {
			if hd.Key == HeaderAttempts || hd.Key == HeaderReplayOf {
				n++
			}
		}
		if n != 2 {
			t.Fatalf("copy carries orderly.attempts / orderly.replay_of %d times, want once each: %v", n, m.Headers)
		}
	}

	rejecting.Store(false)
	j = runJob(t, a, JobReplay, ReplayRequest{})
	if j.State != JobDone || j.Replayed != 4 || j.Scanned != 4 {
		t.Fatalf("second replay: %s; want K's 4 copies replayed, the handled records before them not read", counts(j))
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
}

// TestRelease: released records are marked handled unsent; a later replay
// sends only the others. A dry run counts without releasing.
func TestRelease(t *testing.T) {
	h := newHarness(t, 2)
	ds := seqs([]string{"drop-me", "keep-1", "keep-2"}, 4)
	h.seedDLQ(0, ds...)
	a := h.dlqAdmin(h.Config("release", "", ""))
	j := runJob(t, a, JobRelease, ReplayRequest{Key: "drop-me", DryRun: true})
	if j.Kind != JobRelease || j.State != JobDone || j.Matched != 4 || j.Released != 0 {
		t.Fatalf("dry-run release: %s", counts(j))
	}
	j = runJob(t, a, JobRelease, ReplayRequest{Key: "drop-me"})
	if j.State != JobDone || j.Matched != 4 || j.Released != 4 {
		t.Fatalf("release: %s", counts(j))
	}
	if n := h.Sink.Requests(); n != 0 {
		t.Fatalf("a release sent %d requests", n)
	}
	j = runJob(t, a, JobReplay, ReplayRequest{})
	if j.Replayed != 8 || j.Skipped != 3 || j.Scanned != 11 { // the commit passed drop-me/0 at offset 0
		t.Fatalf("replay after the release: %s", counts(j))
	}
	if got := h.Sink.Sequences("drop-me"); len(got) != 0 {
		t.Fatalf("released records sent: %v", got)
	}
	if err := (ReplayRequest{Rate: 5}).Validate(JobRelease); err == nil {
		t.Fatal("rate accepted on a release")
	}
	if jobs := a.Jobs(); len(jobs) != 3 || jobs[0].ID != j.ID {
		t.Fatalf("jobs, newest first: %+v", jobs)
	}
}

// TestListPagesAcrossPartitions: paging through a DLQ spread over several
// partitions (one of them empty) with the cursor Next gives sees every
// record exactly once.
func TestListPagesAcrossPartitions(t *testing.T) {
	h := newHarness(t, 4)
	want := map[string]bool{}
	for p, n := range []int{7, 3, 0, 11} {
		var ds []dead
		for i := range n {
			ds = append(ds, dead{"p" + strconv.Itoa(p), int64(i)})
			want[fmt.Sprintf("%d/%d", p, i)] = true
		}
		if n > 0 {
			h.seedDLQ(int32(p), ds...)
		}
	}
	a := h.dlqAdmin(h.Config("pages", "", ""))
	for _, limit := range []int{1, 3, 7, 100} {
		seen := map[string]bool{}
		var cursor *Position
		pages := 0
		for {
			page, err := a.List(context.Background(), Filter{Partition: -1, To: -1, Limit: limit, Cursor: cursor})
			if err != nil {
				t.Fatal(err)
			}
			pages++
			for _, r := range page.Records {
				id := fmt.Sprintf("%d/%d", r.Partition, r.Offset)
				if seen[id] || !want[id] {
					t.Fatalf("limit %d: record %s seen twice or unknown", limit, id)
				}
				seen[id] = true
			}
			if page.Next == nil {
				break
			}
			if len(page.Records) != limit {
				t.Fatalf("limit %d: a page of %d with a next page", limit, len(page.Records))
			}
			cursor = page.Next
			if pages > 100 {
				t.Fatal("paging does not end")
			}
		}
		if len(seen) != len(want) {
			t.Fatalf("limit %d: saw %d records of %d", limit, len(seen), len(want))
		}
		if wantPages := (len(want) + limit - 1) / limit; pages != wantPages {
			t.Fatalf("limit %d: %d pages, want %d (no empty page at the end)", limit, pages, wantPages)
		}
	}
	// Within one partition, by key.
	page, err := a.List(context.Background(), Filter{Partition: 3, To: -1, Key: "p3", Limit: 5, Cursor: &Position{Partition: 3, From: 8}})
	if err != nil || len(page.Records) != 3 || page.Next != nil || page.Records[0].Offset != 8 {
		t.Fatalf("partition 3 from 8: %v %+v", err, page)
	}
}

// TestJobsArePruned: finished jobs are kept for the retention, and only
// the newest so many.
func TestJobsArePruned(t *testing.T) {
	h := newHarness(t, 1)
	h.seedDLQ(0, dead{"a", 0})
	a := h.dlqAdmin(h.Config("prune", "", ""))
	var mu sync.Mutex
	now := time.Now()
	a.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	a.keep = 2
	var ids []string
	for range 3 {
		ids = append(ids, runJob(t, a, JobReplay, ReplayRequest{DryRun: true}).ID)
	}
	jobs := a.Jobs()
	if len(jobs) != 2 || jobs[0].ID != ids[2] || jobs[1].ID != ids[1] {
		t.Fatalf("jobs %+v; want the newest two of %v", jobs, ids)
	}
	if _, ok := a.Job(ids[0]); ok {
		t.Fatal("the oldest job was not pruned")
	}
	mu.Lock()
	now = now.Add(jobRetention + time.Second)
	mu.Unlock()
	if jobs := a.Jobs(); len(jobs) != 0 {
		t.Fatalf("jobs after the retention: %+v", jobs)
	}
	if _, err := a.Cancel(ids[2]); err != ErrNoJob {
		t.Fatalf("cancelling a pruned job: %v", err)
	}
}

// gateCall is one call a recordingGate saw.
type gateCall struct {
	op, topic, key string
	cause          pos
}

// recordingGate is a KeyGate that records its calls, in order, with the
// sink's deliveries (see observe) between them, and keeps the keys held.
type recordingGate struct {
	mu     sync.Mutex // protects calls and held
	calls  []gateCall
	held   map[string]HeldKey // by topic/key
	onHold func(key string)
}

func (g *recordingGate) add(c gateCall) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.calls = append(g.calls, c)
	if c.op == "send" {
		return
	}
	if g.held == nil {
		g.held = map[string]HeldKey{}
	}
	id := c.topic + "/" + c.key
	switch c.op {
	case "hold", "holdfailed":
		h := HeldKey{Topic: c.topic, Key: []byte(c.key), Failed: c.op == "holdfailed"}
		h.Cause.Partition, h.Cause.Offset = c.cause.partition, c.cause.offset
		g.held[id] = h
	default:
		delete(g.held, id)
	}
}

func (g *recordingGate) HoldFailed(_ context.Context, topic string, key []byte, p int32, o int64) error {
	g.add(gateCall{op: "holdfailed", topic: topic, key: string(key), cause: pos{p, o}})
	return nil
}

func (g *recordingGate) Held(context.Context) ([]HeldKey, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []HeldKey
	for _, h := range g.held {
		out = append(out, h)
	}
	return out, nil
}

func (g *recordingGate) Hold(_ context.Context, topic string, key []byte) error {
	g.add(gateCall{op: "hold", topic: topic, key: string(key)})
	if g.onHold != nil {
		g.onHold(string(key))
	}
	return nil
}

func (g *recordingGate) Release(_ context.Context, topic string, key []byte) error {
	g.add(gateCall{op: "release", topic: topic, key: string(key)})
	return nil
}

func (g *recordingGate) Requarantine(_ context.Context, topic string, key []byte, p int32, o int64) error {
	g.add(gateCall{op: "requarantine", topic: topic, key: string(key), cause: pos{p, o}})
	return nil
}

func (g *recordingGate) observe(d *testkit.Delivery, _ *http.Request) {
	g.add(gateCall{op: "send", key: d.Key + "/" + strconv.FormatInt(d.Seq, 10)})
}

// of returns the calls about key (sends as "send K/seq"), in order.
func (g *recordingGate) of(key string) []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []string
	for _, c := range g.calls {
		switch {
		case c.op == "send" && len(c.key) > len(key) && c.key[:len(key)+1] == key+"/":
			out = append(out, "send "+c.key)
		case c.op != "send" && c.key == key:
			out = append(out, c.op)
		}
	}
	return out
}

// TestReplayUsesTheKeyGate: a replay holds each key before its first
// record is sent; records of a held key dead-lettered meanwhile (before
// the hold took effect) are replayed too, in order, before the key is
// released; a key whose record failed again is requarantined with the
// failed record's original as the cause. A release job releases its keys.
func TestReplayUsesTheKeyGate(t *testing.T) {
	h := newHarness(t, 1)
	g := &recordingGate{}
	h.Sink.Observe = g.observe
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "bad" && d.Seq == 1 {
			return http.StatusBadRequest
		}
		return 0
	}
	ds := seqs([]string{"late", "bad", "ok"}, 3)
	h.seedDLQ(0, ds...)
	var once sync.Once
	g.onHold = func(key string) {
		if key == "late" { // a live message dead-lettered just before the hold took effect
			once.Do(func() {
				if err := h.Prod.ProduceTo(context.Background(), "orderly.dlq", 0, h.deadLetters(dead{"late", 3})); err != nil {
					t.Error(err)
				}
			})
		}
	}
	a := h.dlqAdmin(h.Config("gate", "", ""))
	a.SetGate(g)
	j := runJob(t, a, JobReplay, ReplayRequest{})
	if j.State != JobDone || j.Replayed != 3+1+3+1 || j.Failed != 1 || j.Deferred != 1 {
		t.Fatalf("replay: %s", counts(j))
	}
	if got, want := g.of("late"), []string{"hold", "send late/0", "send late/1", "send late/2", "send late/3", "release"}; !slices.Equal(got, want) {
		t.Fatalf("key late: %v, want %v", got, want)
	}
	if got, want := g.of("ok"), []string{"hold", "send ok/0", "send ok/1", "send ok/2", "release"}; !slices.Equal(got, want) {
		t.Fatalf("key ok: %v, want %v", got, want)
	}
	if got, want := g.of("bad"), []string{"hold", "send bad/0", "send bad/1", "requarantine"}; !slices.Equal(got, want) {
		t.Fatalf("key bad: %v, want %v", got, want)
	}
	page, err := a.List(context.Background(), Filter{Partition: -1, To: -1, Key: "bad"})
	if err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	var cause pos
	for _, c := range g.calls {
		if c.op == "requarantine" {
			cause = c.cause
		}
	}
	g.mu.Unlock()
	if failed := page.Records[1]; cause != (pos{failed.OriginalPartition, failed.OriginalOffset}) {
		t.Fatalf("requarantined with cause %+v, want bad/1's original %d/%d", cause, failed.OriginalPartition, failed.OriginalOffset)
	}

	j = runJob(t, a, JobRelease, ReplayRequest{Key: "bad"})
	if j.State != JobDone || j.Released != 2 {
		t.Fatalf("release: %s; want bad's failed copy and the copy forward released", counts(j))
	}
	if got := g.of("bad"); got[len(got)-1] != "release" {
		t.Fatalf("key bad after the release: %v", got)
	}
}

// TestCancelRequarantinesHeldKeys: a replay cancelled while a held key's
// record is in flight lets it finish, and leaves the key quarantined with
// its first record not sent as the cause; a new replay resumes there and
// releases it.
func TestCancelRequarantinesHeldKeys(t *testing.T) {
	h := newHarness(t, 1)
	g := &recordingGate{}
	hold := make(chan struct{})
	var holdOnce sync.Once
	t.Cleanup(func() { holdOnce.Do(func() { close(hold) }) })
	h.Sink.Observe = g.observe
	h.Sink.Delay = func(d *testkit.Delivery) time.Duration {
		if d.Key == "A" && d.Seq == 1 {
			<-hold
		}
		return 0
	}
	ds := seqs([]string{"A"}, 3)
	h.seedDLQ(0, ds...)
	a := h.dlqAdmin(h.Config("gatecancel", "", ""))
	a.SetGate(g)
	id, err := a.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The sink's jitter keeps A/0 in flight briefly too: wait for A/1 itself.
	testkit.WaitFor(t, 30*time.Second, "A/1 held at the target", func() bool { return slices.Contains(g.of("A"), "send A/1") })
	if _, err := a.Cancel(id); err != nil {
		t.Fatal(err)
	}
	holdOnce.Do(func() { close(hold) })
	j := waitJob(t, a, id)
	if j.State != JobCancelled || j.Replayed != 2 {
		t.Fatalf("cancelled job: %s; want A/0 and A/1 (in flight) replayed", counts(j))
	}
	if got, want := g.of("A"), []string{"hold", "send A/0", "send A/1", "requarantine"}; !slices.Equal(got, want) {
		t.Fatalf("key A: %v, want %v", got, want)
	}
	page, err := a.List(context.Background(), Filter{Partition: -1, To: -1})
	if err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	cause := g.calls[len(g.calls)-1].cause
	g.mu.Unlock()
	if third := page.Records[2]; cause != (pos{third.OriginalPartition, third.OriginalOffset}) || third.Handled {
		t.Fatalf("requarantined with cause %+v, want A/2's original %+v, not handled", cause, third)
	}
	if j := runJob(t, a, JobReplay, ReplayRequest{}); j.Replayed != 1 {
		t.Fatalf("resumed replay: %s", counts(j))
	}
	if got := g.of("A"); got[len(got)-1] != "release" || got[len(got)-2] != "send A/2" {
		t.Fatalf("key A after the resumed replay: %v", got)
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
}

// TestReplayKeepsTruncatedValues: a record whose value the DLQ holds cut is
// not sent (the target would get something else): it is written back with
// the reason, its value and orderly.value_truncated kept, and its key's
// later records wait behind it.
func TestReplayKeepsTruncatedValues(t *testing.T) {
	h := newHarness(t, 1)
	recs := h.deadLetters(dead{"T", 0}, dead{"T", 1}, dead{"U", 0})
	recs[0].Headers = append(recs[0].Headers, kafka.Header{Key: HeaderValueTruncated, Value: []byte("5000")})
	if err := h.Prod.ProduceTo(context.Background(), "orderly.dlq", 0, recs); err != nil {
		t.Fatal(err)
	}
	a := h.dlqAdmin(h.Config("truncated", "", ""))
	j := runJob(t, a, JobReplay, ReplayRequest{})
	if j.State != JobDone || j.Failed != 1 || j.Deferred != 1 || j.Replayed != 1 {
		t.Fatalf("replay: %s", counts(j))
	}
	if got := h.Sink.Sequences("T"); len(got) != 0 {
		t.Fatalf("T sent: %v", got)
	}
	dlq := h.ReadAll("orderly.dlq", 5, 10*time.Second)
	if len(dlq) != 5 {
		t.Fatalf("DLQ holds %d records, want 5", len(dlq))
	}
	back := dlq[3]
	if n, _ := hdr(back, HeaderValueTruncated); n != "5000" || string(back.Value) != string(recs[0].Value) {
		t.Fatalf("written back without its truncation mark: %v", back.Headers)
	}
	if e, _ := hdr(back, HeaderError); !strings.Contains(e, "cut from 5000 bytes") {
		t.Fatalf("orderly.error %q", e)
	}
	if of, _ := hdr(dlq[4], HeaderReplayOf); of != "0/1" {
		t.Fatalf("T/1 copied forward with replay_of %q, want 0/1", of)
	}
}
