package dispatcher

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestQuarantineHoldsExactlyTheFailingKey: with dlq.quarantine_keys, the
// target rejects key-3's message seq 10. That message and every later one
// of key-3 land in the DLQ in order, the later ones without an attempt and
// marked quarantined by it; the other keys complete. A second run over new
// messages (the restart in the middle) keeps key-3 quarantined.
func TestQuarantineHoldsExactlyTheFailingKey(t *testing.T) {
	h := newHarness(t, 4)
	h.sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "key-3" && d.Seq == 10 {
			return http.StatusBadRequest
		}
		return 0
	}
	const keys, first, more = 8, 30, 10
	gen := &testkit.Generator{Keys: keys}
	if err := h.prod.Produce(context.Background(), h.topic, gen.Records(keys*first)); err != nil {
		t.Fatal(err)
	}
	cfg := h.config("quarantine", "", "[dlq]\nquarantine_keys = true\n")
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
	if err := h.prod.Produce(context.Background(), h.topic, gen.Records(keys*more)); err != nil {
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
	if rep := h.sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
	if n := len(h.sink.Sequences("key-3")); n != 10 {
		t.Fatalf("the target saw %d requests of key-3's delivered messages, want 10", n)
	}
	dlq := h.readAll("orderly.dlq", first+more-10, 30*time.Second)
	if len(dlq) != first+more-10 {
		t.Fatalf("DLQ holds %d records, want key-3's seq 10..%d (%d)", len(dlq), first+more-1, first+more-10)
	}
	cause := ""
	for i, r := range dlq {
		var ev struct {
			Key string `json:"key"`
			Seq int64  `json:"seq"`
		}
		if err := jsonUnmarshal(r.Value, &ev); err != nil || ev.Key != "key-3" || ev.Seq != int64(10+i) {
			t.Fatalf("DLQ record %d holds %s, want key-3 seq %d (in order)", i, r.Value, 10+i)
		}
		q, _ := header(r, HeaderQuarantined)
		by, _ := header(r, HeaderQuarantinedBy)
		if i == 0 {
			if q != "" || by != "" {
				t.Fatalf("the failing message is marked quarantined (%q, %q)", q, by)
			}
			part, _ := header(r, HeaderOriginalPartition)
			off, _ := header(r, HeaderOriginalOffset)
			cause = "orders/" + part + "/" + off
			continue
		}
		if q != "true" || by != cause {
			t.Fatalf("DLQ record of seq %d: quarantined %q by %q, want true by %s", 10+i, q, by, cause)
		}
		if a, _ := header(r, HeaderAttempts); a != "0" {
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
