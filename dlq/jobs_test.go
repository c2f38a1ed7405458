package dlq

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// keysN returns n keys named prefix0, prefix1, ...
func keysN(prefix string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = prefix + strconv.Itoa(i)
	}
	return keys
}

// sameEverywhere waits until every instance shows job id finished, and the
// same.
func sameEverywhere(t *testing.T, id string, as ...*Admin) ReplayJob {
	t.Helper()
	var js []ReplayJob
	testkit.WaitFor(t, time.Minute, "job "+id+" finished and the same on every instance", func() bool {
		js = js[:0]
		for _, a := range as {
			j, ok := a.Job(id)
			if !ok || j.FinishedAt == nil {
				return false
			}
			js = append(js, j)
		}
		for _, j := range js[1:] {
			if !reflect.DeepEqual(j, js[0]) {
				return false
			}
		}
		return true
	})
	return js[0]
}

// owner returns the instance running a job, or nil.
func owner(as ...*Admin) *Admin {
	for _, a := range as {
		a.mu.Lock()
		running := a.running != nil
		a.mu.Unlock()
		if running {
			return a
		}
	}
	return nil
}

// TestJobsAcrossInstances: two instances of one group. A replay posted to
// A and another posted to B at the same time: if both are accepted (B did
// not see A's yet) they run one after the other, never at once; otherwise
// B's answers ErrReplayRunning and is posted again once A's ended. Every
// dead letter is sent exactly once, and each job answers the same on both
// instances.
func TestJobsAcrossInstances(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return time.Millisecond }
	ds := seqs(keysN("k", 10), 20)
	h.seedDLQ(kafka.PartitionAny, ds...)
	cfg := h.Config("multi", "", "")
	a, b := h.dlqAdmin(cfg), h.dlqAdmin(cfg)

	var wg sync.WaitGroup
	var idA, idB string
	var errA, errB error
	wg.Go(func() { idA, errA = a.StartReplay(ReplayRequest{Key: "k3"}) })
	wg.Go(func() { idB, errB = b.StartReplay(ReplayRequest{}) })
	wg.Wait()
	if errA != nil && !errors.Is(errA, ErrReplayRunning) || errB != nil && !errors.Is(errB, ErrReplayRunning) {
		t.Fatalf("starting: A %v, B %v", errA, errB)
	}
	t.Logf("racing starts: A %v, B %v", errA, errB)
	if errA != nil { // B's won
		sameEverywhere(t, idB, a, b)
		if idA, errA = a.StartReplay(ReplayRequest{Key: "k3"}); errA != nil {
			t.Fatal(errA)
		}
	}
	if errB != nil {
		sameEverywhere(t, idA, a, b)
		if idB, errB = b.StartReplay(ReplayRequest{}); errB != nil {
			t.Fatal(errB)
		}
	}
	ja, jb := sameEverywhere(t, idA, a, b), sameEverywhere(t, idB, a, b)
	if ja.State != JobDone || jb.State != JobDone || ja.Replayed+jb.Replayed != len(ds) {
		t.Fatalf("A's job: %s; B's job: %s; want both done, %d replayed between them", counts(ja), counts(jb), len(ds))
	}
	// Never at the same time: one started after the other finished.
	first, second := ja, jb
	if second.StartedAt.Before(first.StartedAt) {
		first, second = second, first
	}
	if second.StartedAt.Before(*first.FinishedAt) {
		t.Fatalf("the jobs overlapped: %v..%v and %v..", first.StartedAt, *first.FinishedAt, second.StartedAt)
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 || rep.Delivered != len(ds) {
		t.Fatalf("at the sink: %s", rep)
	}
	for _, x := range []*Admin{a, b} {
		if js := x.Jobs(); len(js) != 2 {
			t.Fatalf("jobs listed: %+v", js)
		}
	}
	// A queued job cancelled on the other instance never runs. (It is
	// cancelled, or the runner took it first and found nothing left.)
	id, err := a.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 10*time.Second, "B to see the job", func() bool { _, ok := b.Job(id); return ok })
	if _, err := b.Cancel(id); err != nil && !errors.Is(err, ErrJobFinished) {
		t.Fatal(err)
	}
	if j := sameEverywhere(t, id, a, b); j.Replayed != 0 {
		t.Fatalf("third job: %s", counts(j))
	}
}

// TestJobsCancelOnAnotherInstance: a replay posted to A is cancelled by a
// DELETE on B; it stops after the records in flight on whichever instance
// runs it, and a new replay sends exactly the rest.
func TestJobsCancelOnAnotherInstance(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 20 * time.Millisecond }
	ds := seqs(keysN("k", 8), 40)
	h.seedDLQ(kafka.PartitionAny, ds...)
	cfg := h.Config("multicancel", "", "")
	a, b := h.dlqAdmin(cfg), h.dlqAdmin(cfg)
	id, err := a.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "some records replayed", func() bool { return h.Sink.Delivered() >= 30 })
	testkit.WaitFor(t, 10*time.Second, "B to see the job", func() bool { _, ok := b.Job(id); return ok })
	if j, err := b.Cancel(id); err != nil || j.State != JobCancelling {
		t.Fatalf("cancel on B: %v, %s", err, counts(j))
	}
	j := sameEverywhere(t, id, a, b)
	if j.State != JobCancelled || j.Replayed >= len(ds) || j.Replayed < 30 {
		t.Fatalf("cancelled job: %s", counts(j))
	}
	if got := h.Sink.Delivered(); got != int64(j.Replayed) {
		t.Fatalf("the sink got %d records, the job counts %d replayed", got, j.Replayed)
	}
	if _, err := a.Cancel(id); !errors.Is(err, ErrJobFinished) {
		t.Fatalf("cancelling the finished job on A: %v", err)
	}
	id2, err := b.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if j2 := sameEverywhere(t, id2, a, b); j2.State != JobDone || j2.Replayed != len(ds)-j.Replayed {
		t.Fatalf("second job: %s; the first replayed %d of %d", counts(j2), j.Replayed, len(ds))
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("after the second replay: %s", rep)
	}
}

// TestJobsHandOver: the instance running a job shuts down; the other gets
// the jobs partition and goes on with the job where it stopped. Every dead
// letter is sent exactly once and the job ends done.
func TestJobsHandOver(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 10 * time.Millisecond }
	ds := seqs(keysN("k", 8), 40)
	h.seedDLQ(kafka.PartitionAny, ds...)
	cfg := h.Config("handover", "", "")
	a, stopA := h.dlqInstance(cfg)
	b, stopB := h.dlqInstance(cfg)
	id, err := a.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "some records replayed", func() bool { return h.Sink.Delivered() >= 30 })
	var run *Admin
	testkit.WaitFor(t, 10*time.Second, "the runner", func() bool { run = owner(a, b); return run != nil })
	other := a
	if run == a {
		stopA()
		other = b
	} else {
		stopB()
	}
	if j, ok := other.Job(id); !ok || j.FinishedAt != nil {
		t.Fatalf("after the hand-over: %v %s; want the job not finished", ok, counts(j))
	}
	j := sameEverywhere(t, id, other)
	// matched counts a record taken on by both runs (the first took it,
	// the hand-over left it unhandled) once.
	if j.State != JobDone || j.Replayed != len(ds) || j.Matched != len(ds) {
		t.Fatalf("handed-over job: %s; want done, %d matched and replayed", counts(j), len(ds))
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 || rep.Delivered != len(ds) {
		t.Fatalf("at the sink: %s", rep)
	}
}

// quarantine returns a key quarantine for cfg on the harness's broker,
// following its topic until t's cleanup.
func (h *harness) quarantine(cfg *config.Config) *Quarantine {
	h.T.Helper()
	q, err := NewQuarantine(context.Background(), h.Broker.Addr(), cfg, kafkatest.Logger(h.T), telemetry.NewMetrics())
	if err != nil {
		h.T.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); q.Run(ctx) }()
	h.T.Cleanup(func() { cancel(); <-done; q.Close() })
	return q
}

// keyState returns a key's state in q once q has read its topic.
func keyState(t *testing.T, q *Quarantine, topic, key string) (KeyState, Cause) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := q.CatchUp(ctx); err != nil {
		t.Fatal(err)
	}
	return q.State(topic, []byte(key))
}

// TestHandOverKeepsHeldKeys: a replay with the key quarantine handed over
// by a stopping instance leaves the keys it held held, including one whose
// records had all gone through; the next owner's run takes them on and
// releases every key once its records went through. Before, the hand-over
// requarantined them, and the resumed run, with nothing left of such a key
// to replay, never released it.
func TestHandOverKeepsHeldKeys(t *testing.T) {
	h := newHarness(t, 1)
	h.Sink.Delay = func(d *testkit.Delivery) time.Duration {
		if d.Key == "quick" {
			return 0
		}
		return 20 * time.Millisecond
	}
	ds := append(seqs([]string{"quick"}, 2), seqs(keysN("slow", 4), 30)...)
	h.seedDLQ(0, ds...)
	cfg := h.Config("handovergate", "", "")
	cfg.DLQ.QuarantineKeys = true
	a, stopA := h.dlqInstance(cfg)
	b, stopB := h.dlqInstance(cfg)
	qa, qb := h.quarantine(cfg), h.quarantine(cfg)
	a.SetGate(qa)
	b.SetGate(qb)
	keys := append([]string{"quick"}, keysN("slow", 4)...)
	for _, k := range keys { // quarantined by the dead letters seeded
		if err := qa.Quarantine(context.Background(), h.Topic, []byte(k), Cause{Topic: h.Topic}); err != nil {
			t.Fatal(err)
		}
	}
	id, err := a.StartReplay(ReplayRequest{})
	if err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "quick's records and some others replayed", func() bool {
		return h.Sink.Check(expected(seqs([]string{"quick"}, 2)...)).Missing == 0 && h.Sink.Delivered() >= 12
	})
	var run *Admin
	testkit.WaitFor(t, 10*time.Second, "the runner", func() bool { run = owner(a, b); return run != nil })
	other, q := a, qa
	if run == a {
		stopA()
		other, q = b, qb
	} else {
		stopB()
	}
	if j, ok := other.Job(id); !ok || j.FinishedAt != nil {
		t.Fatalf("after the hand-over: %v %s; want the job not finished", ok, counts(j))
	}
	if st, _ := keyState(t, q, h.Topic, "quick"); st != KeyReplaying {
		t.Fatalf("key quick after the hand-over: %s, want still held (replaying)", st)
	}
	j := sameEverywhere(t, id, other)
	if j.State != JobDone || j.Replayed != len(ds) {
		t.Fatalf("handed-over job: %s; want done, %d replayed", counts(j), len(ds))
	}
	for _, k := range keys {
		if st, _ := keyState(t, q, h.Topic, k); st != KeyFree {
			t.Errorf("key %s after the job: %s, want free", k, st)
		}
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 || rep.Delivered != len(ds) {
		t.Fatalf("at the sink: %s", rep)
	}
}

// TestNewJobSettlesKeysNobodyHolds: a key left held with no job to run it
// (its replay's instance crashed and the job was cancelled, or its end
// could not reach the gate) is quarantined again, with its cause, before a
// new job starts: the new job neither releases it nor leaves its live
// messages waiting for good.
func TestNewJobSettlesKeysNobodyHolds(t *testing.T) {
	h := newHarness(t, 1)
	ds := seqs([]string{"a"}, 3)
	h.seedDLQ(0, ds...)
	cfg := h.Config("settle", "", "")
	cfg.DLQ.QuarantineKeys = true
	q := h.quarantine(cfg)
	cause := Cause{Topic: h.Topic, Partition: 0, Offset: 7}
	ctx := context.Background()
	if err := q.Quarantine(ctx, h.Topic, []byte("orphan"), cause); err != nil {
		t.Fatal(err)
	}
	if err := q.Hold(ctx, h.Topic, []byte("orphan")); err != nil {
		t.Fatal(err)
	}
	a := h.dlqAdmin(cfg)
	a.SetGate(q)
	j := runJob(t, a, JobReplay, ReplayRequest{Key: "a"})
	if j.State != JobDone || j.Replayed != 3 {
		t.Fatalf("replay: %s", counts(j))
	}
	if st, c := keyState(t, q, h.Topic, "orphan"); st != KeyQuarantined || c != cause {
		t.Fatalf("key orphan: %s %v, want quarantined by %v", st, c, cause)
	}
	if st, _ := keyState(t, q, h.Topic, "a"); st != KeyFree {
		t.Fatalf("key a: %s, want released", st)
	}
}

// TestHandOverAfterAFailureKeepsTheKeyBehindIt: a replay handed over right
// after a record of a key failed again, before the key's later records were
// handled, marks the key failed in the quarantine; its next run copies those
// records forward behind the failed one instead of sending them ahead of it,
// and requarantines the key with the failed record's original as the cause.
func TestHandOverAfterAFailureKeepsTheKeyBehindIt(t *testing.T) {
	h := newHarness(t, 1)
	ds := seqs([]string{"bad"}, 4)
	h.seedDLQ(0, ds...)
	cfg := h.Config("failedhandover", "", "")
	cfg.DLQ.QuarantineKeys = true
	q := h.quarantine(cfg)
	a := h.dlqAdmin(cfg)
	a.SetGate(q)
	var stopped atomic.Bool
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "bad" && d.Seq == 1 {
			// The job's run stops (as for a hand-over: not a cancel) while
			// bad/1 is at the target; the runner starts its next run.
			if !stopped.Swap(true) {
				a.mu.Lock()
				a.running.stop()
				a.mu.Unlock()
			}
			return http.StatusBadRequest
		}
		return 0
	}
	j := runJob(t, a, JobReplay, ReplayRequest{})
	if j.State != JobDone || j.Replayed != 1 || j.Failed != 1 || j.Deferred != 2 {
		t.Fatalf("replay: %s; want bad/0 replayed, bad/1 failed, bad/2 and bad/3 copied forward", counts(j))
	}
	if rep := h.Sink.Check(expected(seqs([]string{"bad"}, 1)...)); !rep.OK() || rep.Delivered != 1 {
		t.Fatalf("at the sink: %s; want bad/0 delivered, nothing after bad/1", rep)
	}
	page, err := a.List(context.Background(), Filter{Partition: -1, To: -1, Key: "bad"})
	if err != nil {
		t.Fatal(err)
	}
	// What the next replay finds of the key: bad/1 (written back), then the
	// copies of bad/2 and bad/3, in that order.
	var left []int64
	for _, rec := range page.Records {
		if !rec.Handled {
			left = append(left, rec.OriginalOffset)
		}
	}
	failed := page.Records[1]
	if want := []int64{failed.OriginalOffset, page.Records[2].OriginalOffset, page.Records[3].OriginalOffset}; !slices.Equal(left, want) {
		t.Fatalf("unhandled records of bad by original offset: %v, want %v", left, want)
	}
	if st, c := keyState(t, q, h.Topic, "bad"); st != KeyQuarantined || c.Offset != failed.OriginalOffset {
		t.Fatalf("key bad: %s %v, want quarantined by bad/1's original offset %d", st, c, failed.OriginalOffset)
	}
}

// TestJobNotWrittenIsNotRun: a replay whose record the jobs topic does not
// take in time is answered ErrJobUnsure and is not run meanwhile (before,
// the runner on the same instance could start it within 100 ms while the
// API answered 500). The record the producer still holds lands once the
// topic takes writes again, and the job then runs, as the error says.
func TestJobNotWrittenIsNotRun(t *testing.T) {
	h := newHarness(t, 1)
	ds := seqs([]string{"a"}, 3)
	h.seedDLQ(0, ds...)
	cfg := h.Config("unsure", "", "")
	a := h.dlqAdmin(cfg)
	if _, err := a.StartReplay(ReplayRequest{DryRun: true}); err != nil { // the runner is up
		t.Fatal(err)
	}
	testkit.WaitFor(t, time.Minute, "the dry run finished", func() bool {
		for _, j := range a.Jobs() {
			if j.FinishedAt == nil {
				return false
			}
		}
		return true
	})
	fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: JobsTopic(cfg), Err: kerr.NotEnoughReplicas, Count: -1})
	_, err := a.StartReplay(ReplayRequest{})
	if !errors.Is(err, ErrJobUnsure) {
		t.Fatalf("start while the jobs topic refuses writes: %v, want ErrJobUnsure", err)
	}
	// For two seconds more, the topic still refusing: nothing runs.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if n := h.Sink.Requests(); n != 0 {
			t.Fatalf("%d records sent by a job whose start failed", n)
		}
	}
	fh.Remove()
	testkit.WaitFor(t, time.Minute, "the record landed late and its job ran", func() bool {
		return h.Sink.Check(expected(ds...)).OK()
	})
}
