package dispatcher

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// hotRecords is n messages of key "hot" followed by others messages over
// otherKeys keys, each key's seq counting from 0; it returns them and the
// expected sequences.
func hotRecords(n, others, otherKeys int) ([]testkit.Record, map[string][]int64) {
	want := map[string][]int64{}
	var recs []testkit.Record
	add := func(k string) {
		seq := int64(len(want[k]))
		want[k] = append(want[k], seq)
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
	}
	for range n {
		add("hot")
	}
	for i := range others {
		add(fmt.Sprintf("k%d", i%otherKeys))
	}
	return recs, want
}

// TestHotKeyDoesNotStallItsPartition: a slow key with 1,000 messages ahead
// of 500 messages of 20 other keys, on one partition with max_in_flight
// 200. The hot key holds at most max_key_in_flight (20) messages; the rest
// are deferred and read again as it drains, so the other keys finish while
// it is still far from done (without the cap, the hot key filled
// max_in_flight and the partition read no further until it drained). Every
// key's sequence arrives in order, nothing is lost or sent twice, and all
// offsets are committed.
func TestHotKeyDoesNotStallItsPartition(t *testing.T) {
	h := newHarness(t, 1)
	h.Sink.Delay = func(d *testkit.Delivery) time.Duration {
		if d.Key == "hot" {
			return 10 * time.Millisecond
		}
		return 0
	}
	recs, want := hotRecords(1000, 500, 20)
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("hotkey", "max_in_flight = 200\n", "")
	d, m, stop := h.run(cfg, nil)
	if d.keyCap != 20 {
		t.Fatalf("max_key_in_flight 0 means %d, want max_in_flight/10 = 20", d.keyCap)
	}
	othersDone := func() bool {
		for k, seqs := range want {
			if k != "hot" && len(h.Sink.Sequences(k)) < len(seqs) {
				return false
			}
		}
		return true
	}
	testkit.WaitFor(t, 2*time.Minute, "the other keys delivered", othersDone)
	if hot := len(h.Sink.Sequences("hot")); hot >= 500 {
		t.Fatalf("the hot key had %d of 1000 messages delivered when the others finished: they waited for it", hot)
	}
	testkit.WaitFor(t, 2*time.Minute, "every message delivered", func() bool { return h.Sink.Distinct() >= len(recs) })
	testkit.WaitFor(t, time.Minute, "every offset committed", func() bool {
		return m.Sum("orderly_committed_offset") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() || h.Sink.Requests() != int64(len(recs)) {
		t.Fatalf("%v; %d requests for %d messages", rep, h.Sink.Requests(), len(recs))
	}
	if m.Sum("orderly_messages_deferred_total") == 0 || m.Sum("orderly_messages_reread_total") == 0 {
		t.Fatal("nothing was deferred and read again: the test no longer exercises the key cap")
	}
	if got := d.HeldBytes(); got != 0 {
		t.Fatalf("HeldBytes = %d after the stop, want 0", got)
	}
	t.Logf("deferred %v, read again %v offsets", m.Sum("orderly_messages_deferred_total"), m.Sum("orderly_messages_reread_total"))
}
