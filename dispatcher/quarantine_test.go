package dispatcher

import (
	"context"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// TestQuarantineHoldsExactlyTheFailingKey: with dlq.quarantine_keys, the
// target rejects key-3's message seq 10. That message and every later one
// of key-3 land in the DLQ in order, the later ones without an attempt and
// marked quarantined by it; the other keys complete. A second run over new
// messages (the restart in the middle) keeps key-3 quarantined.
func TestQuarantineHoldsExactlyTheFailingKey(t *testing.T) {
	h := newHarness(t, 4)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "key-3" && d.Seq == 10 {
			return http.StatusBadRequest
		}
		return 0
	}
	const keys, first, more = 8, 30, 10
	gen := &testkit.Generator{Keys: keys}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys*first)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("quarantine", "", "[dlq]\nquarantine_keys = true\n")
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == keys*first
	})
	if got := m.Sum("orderly_quarantined_keys"); got != 1 {
		t.Fatalf("orderly_quarantined_keys = %v, want 1", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// The restart: more messages for every key, a new process.
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys*more)); err != nil {
		t.Fatal(err)
	}
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the new messages finished", func() bool {
		return m2.Sum("orderly_committed_offset") == keys*(first+more)
	})
	if err := stop2(); err != nil {
		t.Fatal(err)
	}

	want := map[string][]int64{}
	for k, seqs := range gen.Expected() {
		if k == "key-3" {
			want[k] = seqs[:10]
			continue
		}
		want[k] = seqs
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
	if n := len(h.Sink.Sequences("key-3")); n != 10 {
		t.Fatalf("the target saw %d requests of key-3's delivered messages, want 10", n)
	}
	letters := h.ReadAll("orderly.dlq", first+more-10, 30*time.Second)
	if len(letters) != first+more-10 {
		t.Fatalf("DLQ holds %d records, want key-3's seq 10..%d (%d)", len(letters), first+more-1, first+more-10)
	}
	cause := ""
	for i, r := range letters {
		var ev struct {
			Key string `json:"key"`
			Seq int64  `json:"seq"`
		}
		if err := jsonUnmarshal(r.Value, &ev); err != nil || ev.Key != "key-3" || ev.Seq != int64(10+i) {
			t.Fatalf("DLQ record %d holds %s, want key-3 seq %d (in order)", i, r.Value, 10+i)
		}
		q, _ := kafkatest.Header(r, dlq.HeaderQuarantined)
		by, _ := kafkatest.Header(r, dlq.HeaderQuarantinedBy)
		if i == 0 {
			if q != "" || by != "" {
				t.Fatalf("the failing message is marked quarantined (%q, %q)", q, by)
			}
			part, _ := kafkatest.Header(r, dlq.HeaderOriginalPartition)
			off, _ := kafkatest.Header(r, dlq.HeaderOriginalOffset)
			cause = "orders/" + part + "/" + off
			continue
		}
		if q != "true" || by != cause {
			t.Fatalf("DLQ record of seq %d: quarantined %q by %q, want true by %s", 10+i, q, by, cause)
		}
		if a, _ := kafkatest.Header(r, dlq.HeaderAttempts); a != "0" {
			t.Fatalf("a quarantined message was attempted: orderly.attempts = %s", a)
		}
	}
	if got := m.Sum("orderly_quarantined_messages_total") + m2.Sum("orderly_quarantined_messages_total"); got != first+more-11 {
		t.Fatalf("orderly_quarantined_messages_total = %v, want %d", got, first+more-11)
	}
	if got := m2.Sum("orderly_quarantined_messages_total"); got != more {
		t.Fatalf("the second run quarantined %v messages, want its %d of key-3", got, more)
	}
}

// TestRedriveReleasesTheKeyInOrder: key-3 is quarantined after its seq 5
// was rejected. Once the target accepts it, a replay of key-3 sends its
// dead letters in order; a message of key-3 produced while the replay runs
// (held back by a slow target) arrives after them, then the key is free and
// its next messages flow directly. The target sees every sequence in
// order, nothing twice.
func TestRedriveReleasesTheKeyInOrder(t *testing.T) {
	h := newHarness(t, 2)
	var fixed atomic.Bool
	var slow atomic.Bool
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "key-3" && d.Seq == 5 && !fixed.Load() {
			return http.StatusBadRequest
		}
		return 0
	}
	h.Sink.Delay = func(d *testkit.Delivery) time.Duration {
		if slow.Load() && d.Key == "key-3" {
			return 100 * time.Millisecond
		}
		return 0
	}
	const keys, per = 6, 20
	gen := &testkit.Generator{Keys: keys}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys*per)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("redrive", "", "[dlq]\nquarantine_keys = true\n")
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics)
	if err != nil {
		t.Fatal(err)
	}
	var admin *dlq.Admin
	_, m, stop := h.run(cfg, func(d *Dispatcher) {
		admin = dlq.NewAdmin(dlq.Options{Config: cfg, Router: router, Sender: d.sender.(dlq.Sender), Metrics: d.metrics, Brokers: h.Broker.Addr()})
		d.onQuarantine = func(q *dlq.Quarantine) { admin.SetGate(q) }
	})
	t.Cleanup(func() { admin.Close() })
	testkit.WaitFor(t, time.Minute, "all messages finished, key-3 quarantined", func() bool {
		return m.Sum("orderly_committed_offset") == keys*per && m.Sum("orderly_quarantined_keys") == 1
	})
	if got := len(h.Sink.Sequences("key-3")); got != 5 {
		t.Fatalf("the target accepted %d messages of key-3 before the fix, want 5", got)
	}

	fixed.Store(true)
	slow.Store(true)
	id, err := admin.StartReplay(dlq.ReplayRequest{Key: "key-3"})
	if err != nil {
		t.Fatal(err)
	}
	// A new message of key-3 while the replay runs: it waits behind it.
	testkit.WaitFor(t, time.Minute, "the replay under way", func() bool { return len(h.Sink.Sequences("key-3")) >= 7 })
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, time.Minute, "the replay done", func() bool {
		j, ok := admin.Job(id)
		return ok && j.State == dlq.JobDone
	})
	slow.Store(false)
	testkit.WaitFor(t, time.Minute, "key-3 free and every message finished", func() bool {
		return m.Sum("orderly_quarantined_keys") == 0 && m.Sum("orderly_committed_offset") == keys*(per+1)
	})
	// And after the release, the key's messages flow directly.
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, time.Minute, "the last messages delivered", func() bool {
		return h.Sink.Distinct() == keys*(per+2)
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
	if j, _ := admin.Job(id); j.Replayed != per-5 {
		t.Fatalf("replayed %d, want key-3's %d dead letters", j.Replayed, per-5)
	}
}

// TestQuarantineFollowsThePartition: key-3 is quarantined by one member;
// its partitions then move to a second member (the first stops), which
// keeps the key quarantined: its new messages go to the DLQ, the other
// keys' are delivered.
func TestQuarantineFollowsThePartition(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "key-3" && d.Seq == 2 {
			return http.StatusBadRequest
		}
		return 0
	}
	const keys = 6
	gen := &testkit.Generator{Keys: keys}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys*5)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("quarantine-move", "", "[dlq]\nquarantine_keys = true\n")
	_, m1, stop1 := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the first member finished, key-3 quarantined", func() bool {
		return m1.Sum("orderly_committed_offset") == keys*5 && m1.Sum("orderly_quarantined_keys") == 1
	})
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the second member loaded the quarantine", func() bool {
		return m2.Sum("orderly_quarantined_keys") == 1
	})
	if err := stop1(); err != nil {
		t.Fatal(err)
	}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(keys*5)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, time.Minute, "the second member finished the new messages", func() bool {
		return m2.Sum("orderly_committed_offset") == keys*10
	})
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	if got := m2.Sum("orderly_quarantined_messages_total"); got != 5 {
		t.Fatalf("the second member quarantined %v messages, want key-3's 5 new ones", got)
	}
	want := map[string][]int64{}
	for k, seqs := range gen.Expected() {
		if k == "key-3" {
			seqs = seqs[:2]
		}
		want[k] = seqs
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
}

// TestQuarantinedDeadLetterOutlivesARelease: a message dead-lettered
// because its key was quarantined is still being written when the key is
// released elsewhere (a replay on another instance that held and released
// the key before this one saw the hold, and may have missed this record).
// Once written, the key is quarantined again with the same cause, and the
// key's next message goes to the DLQ behind it instead of being delivered
// ahead of it.
func TestQuarantinedDeadLetterOutlivesARelease(t *testing.T) {
	h := newHarness(t, 1)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "K" && d.Seq == 0 {
			return http.StatusBadRequest
		}
		return 0
	}
	cfg := h.Config("qrelease", "", "[dlq]\nquarantine_keys = true\n")
	var q atomic.Pointer[dlq.Quarantine]
	_, m, stop := h.run(cfg, func(d *Dispatcher) { d.onQuarantine = func(x *dlq.Quarantine) { q.Store(x) } })
	produce := func(seqs ...int64) {
		var recs []testkit.Record
		for _, s := range seqs {
			recs = append(recs, testkit.Record{Key: []byte("K"), Value: testkit.EventJSON("K", s)})
		}
		if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
			t.Fatal(err)
		}
	}
	state := func() dlq.KeyState {
		if q.Load() == nil {
			return dlq.KeyFree
		}
		st, _ := q.Load().State(h.Topic, []byte("K"))
		return st
	}
	produce(0)
	testkit.WaitFor(t, time.Minute, "K quarantined by its seq 0", func() bool { return state() == dlq.KeyQuarantined })
	_, cause := q.Load().State(h.Topic, []byte("K"))

	var writes atomic.Int64
	fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "orderly.dlq", Err: kerr.NotEnoughReplicas,
		Count: -1, When: func(kmsg.Request) bool { writes.Add(1); return true }})
	produce(1, 2)
	testkit.WaitFor(t, time.Minute, "K's seq 1 being written to the DLQ", func() bool { return writes.Load() >= 1 })
	other, err := dlq.NewQuarantine(context.Background(), h.Broker.Addr(), cfg, kafkatest.Logger(t), telemetry.NewMetrics())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(other.Close)
	if err := other.Release(context.Background(), h.Topic, []byte("K")); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, time.Minute, "the release seen here", func() bool { return state() == dlq.KeyFree })
	fh.Remove()
	testkit.WaitFor(t, time.Minute, "K's three messages finished", func() bool { return m.Sum("orderly_committed_offset") == 3 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if seqs := h.Sink.Sequences("K"); len(seqs) != 0 {
		t.Fatalf("K delivered %v after its seq 1 went to the DLQ", seqs)
	}
	if st, c := q.Load().State(h.Topic, []byte("K")); st != dlq.KeyQuarantined || c != cause {
		t.Fatalf("K at the end: %s by %v, want quarantined by %v", st, c, cause)
	}
}
