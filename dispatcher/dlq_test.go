package dispatcher

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

var dlqHeaders = []string{dlq.HeaderError, dlq.HeaderStatus, dlq.HeaderRoute, dlq.HeaderRequestIndex, dlq.HeaderAttempts,
	dlq.HeaderOriginalTopic, dlq.HeaderOriginalPartition, dlq.HeaderOriginalOffset, dlq.HeaderOriginalTimestamp, dlq.HeaderFailedAt}

// TestPermanentFailuresGoToTheDLQ: the sink answers 400 for every third
// message of a chosen set of keys. Exactly those messages are in the DLQ with
// every documented header; everything else is delivered in order, later
// messages of the failing keys included.
func TestPermanentFailuresGoToTheDLQ(t *testing.T) {
	h := newHarness(t, 4)
	failing := map[string]bool{"key-3": true, "key-7": true, "key-11": true}
	rejected := func(key string, seq int64) bool { return failing[key] && seq%3 == 0 }
	h.Sink.Status = func(d *testkit.Delivery) int {
		if rejected(d.Key, d.Seq) {
			return http.StatusBadRequest
		}
		return 0
	}
	const n, keys = 2000, 20
	gen := &testkit.Generator{Keys: keys}
	recs := gen.Records(n)
	recs[0].Headers = []kafka.Header{{Key: "trace", Value: []byte("abc")}}
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	want := map[string][]int64{}
	wantDLQ := map[string]bool{}
	for k, seqs := range gen.Expected() {
		for _, q := range seqs {
			if rejected(k, q) {
				wantDLQ[k+"/"+strconv.FormatInt(q, 10)] = true
			} else {
				want[k] = append(want[k], q)
			}
		}
	}
	_, m, stop := h.run(h.Config("dlq", "", ""), nil)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == n
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
	letters := h.ReadAll("orderly.dlq", len(wantDLQ), 30*time.Second)
	if len(letters) != len(wantDLQ) {
		t.Fatalf("DLQ holds %d records, want %d", len(letters), len(wantDLQ))
	}
	for _, r := range letters {
		var ev struct {
			Key string `json:"key"`
			Seq int64  `json:"seq"`
		}
		if err := jsonUnmarshal(r.Value, &ev); err != nil {
			t.Fatalf("DLQ value is not the original: %v", err)
		}
		id := ev.Key + "/" + strconv.FormatInt(ev.Seq, 10)
		if !wantDLQ[id] {
			t.Fatalf("DLQ holds %s, which the sink did not reject", id)
		}
		delete(wantDLQ, id)
		if string(r.Key) != ev.Key {
			t.Fatalf("DLQ key %q, want the original %q", r.Key, ev.Key)
		}
		for _, hk := range dlqHeaders {
			if _, ok := kafkatest.Header(r, hk); !ok {
				t.Fatalf("DLQ record %s lacks header %s", id, hk)
			}
		}
		if st, _ := kafkatest.Header(r, dlq.HeaderStatus); st != "400" {
			t.Fatalf("orderly.status = %q, want 400", st)
		}
		if rt, _ := kafkatest.Header(r, dlq.HeaderRoute); rt != "people" {
			t.Fatalf("orderly.route = %q", rt)
		}
		if ot, _ := kafkatest.Header(r, dlq.HeaderOriginalTopic); ot != "orders" {
			t.Fatalf("orderly.original_topic = %q", ot)
		}
		if a, _ := kafkatest.Header(r, dlq.HeaderAttempts); a != "1" {
			t.Fatalf("orderly.attempts = %q, want 1 (400 is not retried)", a)
		}
	}
	if got := m.Sum("orderly_messages_total"); got != n {
		t.Fatalf("messages counted %v, want %d", got, n)
	}
}

// TestPoisonMessagesGoToTheDLQ: values that are not JSON on a route that
// needs JSON are dead-lettered with the cause; the JSON ones around them,
// same key, are delivered in order.
//
// With a `when` that reads value (and dispatch.unmatched = "skip"), the
// messages it cannot judge are dead-lettered too, not skipped.
func TestPoisonMessagesGoToTheDLQ(t *testing.T) {
	for _, when := range []string{"", `value.key != ""`} {
		t.Run("when="+when, func(t *testing.T) { testPoison(t, when) })
	}
}

func testPoison(t *testing.T, when string) {
	h := newHarness(t, 2)
	var recs []testkit.Record
	want := map[string][]int64{}
	poison := 0
	for i := 0; i < 300; i++ {
		key := fmt.Sprintf("k%d", i%10)
		seq := int64(i / 10)
		if i%25 == 0 {
			recs = append(recs, testkit.Record{Key: []byte(key), Value: []byte("not json {" + key)})
			poison++
			continue
		}
		recs = append(recs, testkit.Record{Key: []byte(key), Value: testkit.EventJSON(key, seq)})
		want[key] = append(want[key], seq)
	}
	recs = append(recs, testkit.Record{Key: []byte("k-empty"), Value: nil})
	poison++
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("poison", "", "")
	cfg.Routes[0].Requests[0].URL = h.Srv.URL + "/people/{{ .Value.key }}"
	if when != "" {
		cfg.Routes[0].When = when
		if cfg.Dispatch.Unmatched != "skip" {
			t.Fatalf("dispatch.unmatched = %q, want the default skip", cfg.Dispatch.Unmatched)
		}
	}
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() {
		t.Fatal(rep)
	}
	letters := h.ReadAll("orderly.dlq", poison, 30*time.Second)
	if len(letters) != poison {
		t.Fatalf("DLQ holds %d records, want %d", len(letters), poison)
	}
	for _, r := range letters {
		reason, _ := kafkatest.Header(r, dlq.HeaderError)
		if !strings.Contains(strings.ToLower(reason), "json") {
			t.Fatalf("orderly.error %q does not name the cause (JSON)", reason)
		}
	}
	if got := m.Sum("orderly_messages_total"); got != float64(len(recs)) {
		t.Fatalf("messages counted %v, want %d", got, len(recs))
	}
}

// TestStalledKeyDoesNotHoldTheDrain: without a DLQ a permanently failing
// message stalls its key until the stop; the stop then does not wait out
// drain_timeout (five minutes here) for it, since it cannot finish, and
// commits nothing past it.
func TestStalledKeyDoesNotHoldTheDrain(t *testing.T) {
	h := newHarness(t, 1)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "stuck" {
			return http.StatusBadRequest
		}
		return 0
	}
	recs := []testkit.Record{{Key: []byte("stuck"), Value: testkit.EventJSON("stuck", 0)}}
	expected := map[string][]int64{}
	for i := range 100 {
		k := "k" + strconv.Itoa(i%10)
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, int64(i/10))})
		expected[k] = append(expected[k], int64(i/10))
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("stalled", "", "")
	cfg.DLQ.Topic = ""
	cfg.Dispatch.DrainTimeout.Duration = 5 * time.Minute
	d, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the other keys delivered and the stall counted", func() bool {
		return h.Sink.Distinct() >= 100 && m.Sum("orderly_messages_total") == 101
	})
	if got := testutilCounter(t, m, "orderly_messages_total", "outcome", "stalled"); got != 1 {
		t.Fatalf("stalled outcomes %v, want 1", got)
	}
	start := time.Now()
	if err := stop(); err != nil { // the harness gives up after 60s
		t.Fatal(err)
	}
	t.Logf("stopped in %s with drain_timeout 5m and a stalled key", time.Since(start).Round(time.Millisecond))
	if rep := h.Sink.Check(expected); !rep.OK() {
		t.Fatal(rep)
	}
	if committed, _ := h.Committed("stalled"); committed[0] > 0 {
		t.Fatalf("committed offset %d past the stalled message at offset 0", committed[0])
	}
	if got := d.HeldBytes(); got != 0 {
		t.Fatalf("HeldBytes = %d after the stop, want 0", got)
	}
}
