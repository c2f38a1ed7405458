package dispatcher

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestBrokerFaults injects failures through kfake's control hooks: failing
// offset commits, failing produces to the DLQ, and slow fetches. Nothing is
// lost and the dispatcher recovers without a restart.
func TestBrokerFaults(t *testing.T) {
	t.Run("failing OffsetCommit", func(t *testing.T) {
		h := newHarness(t, 2)
		gen := &testkit.Generator{Keys: 20}
		if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(1000)); err != nil {
			t.Fatal(err)
		}
		fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.OffsetCommit}, Group: "f-commit",
			Err: kerr.CoordinatorLoadInProgress, Count: 5})
		_, m, stop := h.run(h.Config("f-commit", "", ""), nil)
		testkit.WaitFor(t, time.Minute, "commits to the end despite failing commits", func() bool {
			return m.Sum("orderly_committed_offset") == 1000
		})
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if fh.Hits() != 5 || m.Sum("orderly_commit_errors_total") < 1 {
			t.Fatalf("fault hits %d, commit errors counted %v", fh.Hits(), m.Sum("orderly_commit_errors_total"))
		}
		if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
			t.Fatal(rep)
		}
	})

	t.Run("failing Produce to the DLQ", func(t *testing.T) {
		h := newHarness(t, 2)
		h.Sink.Status = func(d *testkit.Delivery) int {
			if d.Seq%10 == 0 {
				return http.StatusBadRequest
			}
			return 0
		}
		gen := &testkit.Generator{Keys: 10}
		if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(500)); err != nil {
			t.Fatal(err)
		}
		fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "orderly.dlq",
			Err: kerr.NotEnoughReplicas, Count: 3})
		_, m, stop := h.run(h.Config("f-dlq", "", ""), nil)
		testkit.WaitFor(t, time.Minute, "every message finished", func() bool { return m.Sum("orderly_committed_offset") == 500 })
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if fh.Hits() != 3 {
			t.Fatalf("fault hits %d, want 3", fh.Hits())
		}
		if got := len(h.ReadAll("orderly.dlq", 50, 20*time.Second)); got != 50 {
			t.Fatalf("DLQ holds %d records, want 50 (5 per key)", got)
		}
	})

	t.Run("slow Fetch", func(t *testing.T) {
		h := newHarness(t, 2)
		gen := &testkit.Generator{Keys: 20}
		if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(1000)); err != nil {
			t.Fatal(err)
		}
		cl := h.Broker.Cluster()
		var slowed atomic.Int32
		cl.ControlKey(int16(kmsg.Fetch), func(kmsg.Request) (kmsg.Response, error, bool) {
			if slowed.Add(1) < 4 {
				cl.KeepControl()
			}
			cl.SleepControl(func() { time.Sleep(1500 * time.Millisecond) })
			return nil, nil, false
		})
		_, m, stop := h.run(h.Config("f-fetch", "", ""), nil)
		testkit.WaitFor(t, time.Minute, "every message delivered", func() bool { return m.Sum("orderly_committed_offset") == 1000 })
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		if slowed.Load() < 1 {
			t.Fatal("no fetch was slowed")
		}
		t.Logf("%d fetches slowed by 1.5 s", slowed.Load())
		if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
			t.Fatal(rep)
		}
	})
}

// TestMultiRequestFailureIndex: a message's second of three requests fails
// permanently; the DLQ record says orderly.request_index = 1, the first
// request was sent once and the third never.
func TestMultiRequestFailureIndex(t *testing.T) {
	h := newHarness(t, 1)
	var third atomic.Int32
	h.Sink.Observe = func(d *testkit.Delivery, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/third/") {
			third.Add(1)
		}
	}
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "k" && d.Seq == 1 && d.Header.Get("X-Step") == "2" {
			return http.StatusConflict
		}
		return 0
	}
	recs := []testkit.Record{{Key: []byte("k"), Value: testkit.EventJSON("k", 0)}, {Key: []byte("k"), Value: testkit.EventJSON("k", 1)},
		{Key: []byte("k"), Value: testkit.EventJSON("k", 2)}}
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("multi", "", "")
	base := cfg.Routes[0].Requests[0]
	second, thirdReq := base, base
	second.Headers = map[string]string{"X-Step": "2"}
	thirdReq.URL = h.Srv.URL + "/third/{{ .Key }}"
	cfg.Routes[0].Requests = append(cfg.Routes[0].Requests, second, thirdReq)
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, 30*time.Second, "every message finished", func() bool { return m.Sum("orderly_committed_offset") == 3 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	letters := h.ReadAll("orderly.dlq", 1, 10*time.Second)
	if len(letters) != 1 {
		t.Fatalf("DLQ holds %d records, want 1", len(letters))
	}
	if idx, _ := kafkatest.Header(letters[0], dlq.HeaderRequestIndex); idx != "1" {
		t.Fatalf("orderly.request_index = %q, want 1", idx)
	}
	if got := third.Load(); got != 2 {
		t.Fatalf("third request sent %d times, want 2 (messages 0 and 2 only)", got)
	}
	// Messages 0 and 2 delivered all three requests, in order; message 1
	// delivered its first request only.
	if seqs := h.Sink.Sequences("k"); len(seqs) != 7 {
		t.Fatalf("deliveries for k: %v, want 3+1+3", seqs)
	}
}

// TestEagerRebalance: with an eager assignor, a second member joining
// mid-run takes partitions over: every partition is revoked from the first
// member, which finishes the attempts under way and commits what finished
// before it lets them go. Nothing is lost, per-key order holds, no key has
// two requests in flight, nothing is sent twice, and the group's commits
// reach the end offsets.
func TestEagerRebalance(t *testing.T) {
	h := newHarness(t, 4)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return time.Millisecond }
	gen := &testkit.Generator{Keys: 40}
	const n = 4000
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("eager", "max_in_flight = 100", "")
	cfg.Kafka.Properties["partition.assignment.strategy"] = "range"
	var atRevoke atomic.Int64 // deliveries when the first revoke began
	_, m1, stop1 := h.run(cfg, func(d *Dispatcher) {
		d.onRevoke = func([]int32) { atRevoke.CompareAndSwap(0, int64(h.Sink.Distinct())) }
	})
	testkit.WaitFor(t, time.Minute, "a quarter delivered", func() bool { return h.Sink.Distinct() >= n/4 })
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "every message delivered and committed", func() bool {
		return h.Sink.Distinct() >= n && m1.Sum("orderly_committed_offset")+m2.Sum("orderly_committed_offset") == n
	})
	if m2.Sum("orderly_rebalances_total") == 0 || m1.Sum("orderly_rebalances_total") < 2 {
		t.Fatalf("no rebalance seen: first member %v, second %v", m1.Sum("orderly_rebalances_total"), m2.Sum("orderly_rebalances_total"))
	}
	if a := atRevoke.Load(); a == 0 || a >= n {
		t.Fatalf("the first revoke came at %d of %d delivered: the test needs it mid-run", a, n)
	}
	if err := stop1(); err != nil {
		t.Fatal(err)
	}
	// The second member takes every partition; stopping it in the middle
	// of that rebalance is not what this test is about.
	testkit.WaitFor(t, time.Minute, "the second member owns every partition", func() bool { return owned(t, m2) == 4 })
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	rep := h.Sink.Check(gen.Expected())
	if !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
	committed, end := h.Committed("eager")
	for i := range end {
		if committed[i] != end[i] {
			t.Fatalf("partition %d: committed %d, end offset %d", i, committed[i], end[i])
		}
	}
	t.Logf("eager rebalance at %d of %d delivered: %s", atRevoke.Load(), n, rep)
}

// TestSlowCommitDoesNotHoldBackConsumption: the broker holds the first
// offset commit until 300 more messages were delivered. The committer
// sends commits off the poll loop, so meanwhile the poll loop goes on
// consuming, resuming and handing messages out; had the commit blocked it,
// no more than max_in_flight per partition could be delivered and the
// commit would be released only by its 1.5 s bound.
func TestSlowCommitDoesNotHoldBackConsumption(t *testing.T) {
	h := newHarness(t, 2)
	gen := &testkit.Generator{Keys: 20}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(2000)); err != nil {
		t.Fatal(err)
	}
	cl := h.Broker.Cluster()
	var held, released atomic.Bool
	cl.ControlKey(int16(kmsg.OffsetCommit), func(kmsg.Request) (kmsg.Response, error, bool) {
		if held.Swap(true) {
			return nil, nil, false // only the first commit is held
		}
		from := h.Sink.Distinct()
		cl.SleepControl(func() {
			// Below the session timeout: heartbeats wait behind the commit.
			deadline := time.Now().Add(1500 * time.Millisecond)
			for time.Now().Before(deadline) {
				if h.Sink.Distinct() >= from+300 {
					released.Store(true)
					return
				}
				time.Sleep(time.Millisecond)
			}
		})
		return nil, nil, false
	})
	cfg := h.Config("slow-commit", "max_in_flight = 20", "")
	cfg.Dispatch.CommitInterval = config.Duration{Duration: 5 * time.Millisecond}
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "every message committed", func() bool { return m.Sum("orderly_committed_offset") == 2000 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if !held.Load() {
		t.Fatal("no commit was held")
	}
	if !released.Load() {
		t.Fatal("fewer than 300 messages were delivered while a commit was under way: the commit held the poll loop back")
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
		t.Fatal(rep)
	}
}

// TestStandingOffsetRecordIsSpaced: key-0's first message never succeeds,
// so its partition's committed offset stands still while the other keys'
// messages finish and its progress record changes with each. Commits go
// out every 5 ms, but those that carry only a changed record (up to 4 KB
// each) are spaced by recordEvery.
func TestStandingOffsetRecordIsSpaced(t *testing.T) {
	h := newHarness(t, 1)
	gen := &testkit.Generator{Keys: 20}
	recs := gen.Records(3000)
	stuck := string(recs[0].Key)
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == stuck {
			return http.StatusServiceUnavailable
		}
		return 0
	}
	cl := h.Broker.Cluster()
	var mu sync.Mutex
	var recordOnly []time.Time // commits that kept the offset and changed the record
	lastOffset, lastMeta := int64(-1), ""
	cl.ControlKey(int16(kmsg.OffsetCommit), func(kreq kmsg.Request) (kmsg.Response, error, bool) {
		cl.KeepControl()
		mu.Lock()
		defer mu.Unlock()
		for _, tp := range kreq.(*kmsg.OffsetCommitRequest).Topics {
			for _, p := range tp.Partitions {
				meta := ""
				if p.Metadata != nil {
					meta = *p.Metadata
				}
				if p.Offset == lastOffset && meta != lastMeta {
					recordOnly = append(recordOnly, time.Now())
				}
				lastOffset, lastMeta = p.Offset, meta
			}
		}
		return nil, nil, false
	})
	cfg := h.Config("spaced", "", "")
	cfg.Dispatch.CommitInterval = config.Duration{Duration: 5 * time.Millisecond}
	cfg.HTTP.Retry.MaxAttempts = 0 // the stuck message is retried for good
	cfg.Dispatch.DrainTimeout = config.Duration{Duration: 100 * time.Millisecond}
	_, _, stop := h.run(cfg, nil)
	others := 3000 - 3000/20
	testkit.WaitFor(t, time.Minute, "every other key delivered", func() bool { return h.Sink.Distinct() == others })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(recordOnly) < 2 {
		t.Fatalf("%d commits changed only the progress record, want several", len(recordOnly))
	}
	// The broker sees each a commit's latency after it was made, so a
	// single gap may be short; over the run they average recordEvery at
	// least (the last may be shutdown's, which is not spaced).
	span := recordOnly[len(recordOnly)-1].Sub(recordOnly[0])
	if n := len(recordOnly); span < time.Duration(n-3)*recordEvery {
		t.Fatalf("%d commits changed only the progress record within %v: more than one per %v", n, span, recordEvery)
	}
	t.Logf("%d record-only commits over %v", len(recordOnly), span)
}
