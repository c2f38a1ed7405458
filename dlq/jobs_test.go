package dlq

import (
	"errors"
	"reflect"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/internal/testkit"
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
	if j.State != JobDone || j.Replayed != len(ds) {
		t.Fatalf("handed-over job: %s; want done, %d replayed", counts(j), len(ds))
	}
	if rep := h.Sink.Check(expected(ds...)); !rep.OK() || rep.Duplicates != 0 || rep.Delivered != len(ds) {
		t.Fatalf("at the sink: %s", rep)
	}
}
