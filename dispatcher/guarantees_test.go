package dispatcher

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// The README's guarantees, each checked where it could break: drain then
// commit, rebalances mid-flight, the Idempotency-Key on the wire, dead
// letters' headers, and the dispatch settings no other test exercises.

// idemOffset parses an Idempotency-Key "<topic>-<partition>-<offset>-<index>".
func idemOffset(t *testing.T, key string) (partition int32, offset int64, index int) {
	parts := strings.Split(key, "-")
	if len(parts) != 4 || parts[0] != "orders" {
		t.Errorf("Idempotency-Key %q is not orders-<partition>-<offset>-<index>", key)
		return -1, -1, -1
	}
	p, err1 := strconv.ParseInt(parts[1], 10, 32)
	o, err2 := strconv.ParseInt(parts[2], 10, 64)
	i, err3 := strconv.Atoi(parts[3])
	if err1 != nil || err2 != nil || err3 != nil {
		t.Errorf("Idempotency-Key %q is not orders-<partition>-<offset>-<index>", key)
		return -1, -1, -1
	}
	return int32(p), o, i
}

// owned returns the number of partitions a member owns, from its metrics.
func owned(t *testing.T, m *telemetry.Metrics) float64 {
	return testutilCounter(t, m, "orderly_rebalances_total", "kind", "assigned") -
		testutilCounter(t, m, "orderly_rebalances_total", "kind", "revoked") -
		testutilCounter(t, m, "orderly_rebalances_total", "kind", "lost")
}

// TestShutdownDrainsInFlightThenCommits: the stop comes while the target
// holds a request of every busy key. The drain lets them (and the lanes'
// queues) finish, then commits: the committed offsets are past every
// message that was in flight at the stop, nothing below them is
// undelivered, and a restart sends nothing twice.
func TestShutdownDrainsInFlightThenCommits(t *testing.T) {
	h := newHarness(t, 2)
	const n, keys = 2000, 40
	gen := &testkit.Generator{Keys: keys}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	var (
		gated     atomic.Bool
		gate      = make(chan struct{})
		mu        sync.Mutex
		held      = map[int32][]int64{}                   // offsets sent from the stop on (held until the drain began)
		delivered = map[int32]map[int64]int{0: {}, 1: {}} // answered 200, per partition and offset
	)
	h.Sink.Observe = func(d *testkit.Delivery, r *http.Request) {
		if !gated.Load() {
			return
		}
		p, o, _ := idemOffset(t, d.IdempotencyKey)
		mu.Lock()
		held[p] = append(held[p], o)
		mu.Unlock()
		select {
		case <-gate:
		case <-r.Context().Done():
		}
	}
	h.Sink.Status = func(d *testkit.Delivery) int {
		p, o, _ := idemOffset(t, d.IdempotencyKey)
		mu.Lock()
		delivered[p][o]++
		mu.Unlock()
		return 0
	}
	heldCount := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(held[0]) + len(held[1])
	}

	cfg := h.Config("drain", "max_in_flight = 50", "")
	cfg.Dispatch.DrainTimeout.Duration = 30 * time.Second
	d, _, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "a quarter delivered", func() bool { return h.Sink.Distinct() >= n/4 })
	gated.Store(true)
	testkit.WaitFor(t, time.Minute, "requests of many keys held", func() bool { return heldCount() >= 20 })
	errc := make(chan error, 1)
	go func() { errc <- stop() }()
	testkit.WaitFor(t, 30*time.Second, "the drain to begin", d.draining.Load)
	inFlight := heldCount()
	close(gate)
	if err := <-errc; err != nil {
		t.Fatalf("run: %v", err)
	}

	// The drain's commit covers what was in flight at the stop, and only
	// what was delivered.
	committed, _ := h.Committed("drain")
	mu.Lock()
	total := int64(0)
	for p := range int32(2) {
		c := committed[p]
		total += max(c, 0)
		var past, undelivered []int64
		for _, o := range held[p] {
			if o >= c {
				past = append(past, o)
			}
		}
		for o := range c {
			if delivered[p][o] == 0 {
				undelivered = append(undelivered, o)
			}
		}
		if len(past) > 0 {
			t.Errorf("partition %d: committed %d, short of %d of the %d messages sent from the stop on (in flight or queued, delivered in the drain): %v",
				p, c, len(past), len(held[p]), past)
		}
		if len(undelivered) > 0 {
			t.Errorf("partition %d: committed %d past %d messages never delivered: %v", p, c, len(undelivered), undelivered)
		}
	}
	mu.Unlock()
	if total >= n {
		t.Fatalf("everything was committed before the restart (%d): the test proves nothing", total)
	}
	t.Logf("stopped with %d requests in flight; committed %v (%d of %d)", inFlight, committed, total, n)

	gated.Store(false)
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, 2*time.Minute, "the rest delivered and committed", func() bool {
		return h.Sink.Distinct() >= n && m2.Sum("orderly_committed_offset") == n
	})
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("after the restart: %s", rep)
	}
}

// TestCooperativeRebalanceMidFlight: with the default assignor
// (cooperative-sticky) a second member joins while the first is sending.
// Only the partitions that move are revoked; their attempts under way
// finish and what finished is committed before they go, so nothing is
// lost, no key ever has two requests in flight (across members), order
// holds, and nothing is sent twice.
func TestCooperativeRebalanceMidFlight(t *testing.T) {
	h := newHarness(t, 4)
	// Many keys, each far below its share of max_in_flight, and slow
	// requests: a few seconds of steady sending for the rebalance to cut into.
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 40 * time.Millisecond }
	const n, keys = 12000, 128
	gen := &testkit.Generator{Keys: keys}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("cooperative", "max_in_flight = 200", "")
	if _, set := cfg.Kafka.Properties["partition.assignment.strategy"]; set {
		t.Fatal("the harness sets an assignor: this test is about the default")
	}
	var atRevoke struct {
		sync.Once
		inFlight int64
		distinct int
	}
	_, m1, stop1 := h.run(cfg, func(d *Dispatcher) {
		d.onRevoke = func([]int32) {
			atRevoke.Do(func() { atRevoke.inFlight, atRevoke.distinct = h.Sink.InFlight(), h.Sink.Distinct() })
		}
	})
	testkit.WaitFor(t, time.Minute, "a sixth delivered", func() bool { return h.Sink.Distinct() >= n/6 })
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, 2*time.Minute, "every message delivered and committed", func() bool {
		return h.Sink.Distinct() >= n && m1.Sum("orderly_committed_offset")+m2.Sum("orderly_committed_offset") == n
	})
	// Read before the stops: leaving the group revokes the rest.
	revoked := testutilCounter(t, m1, "orderly_rebalances_total", "kind", "revoked")
	lost := testutilCounter(t, m1, "orderly_rebalances_total", "kind", "lost")
	if err := stop1(); err != nil {
		t.Fatal(err)
	}
	// Stopped in the middle of the rebalance that hands it the first
	// member's partitions, the second member's Close runs that assignment:
	// let it settle first (that case is not what this test is about).
	testkit.WaitFor(t, time.Minute, "the second member owns every partition", func() bool { return owned(t, m2) == 4 })
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	if revoked < 1 || revoked > 3 || lost != 0 {
		t.Fatalf("the first member had %v partitions revoked and %v lost, want some but not all 4 revoked (incremental rebalance)",
			revoked, lost)
	}
	if atRevoke.distinct >= n {
		t.Fatalf("the revoke came after everything was delivered: the test proves nothing")
	}
	rep := h.Sink.Check(gen.Expected())
	if !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("%s", rep)
	}
	committed, end := h.Committed("cooperative")
	for i := range end {
		if committed[i] != end[i] {
			t.Fatalf("partition %d: committed %d, end offset %d", i, committed[i], end[i])
		}
	}
	t.Logf("revoke at %d of %d delivered with %d requests in flight; %v partitions moved; %s",
		atRevoke.distinct, n, atRevoke.inFlight, revoked, rep)
}

// TestIdempotencyKeyOnTheWire: every request carries
// Idempotency-Key: <topic>-<partition>-<offset>-<index> as the target
// receives it, and a retried request carries the same key again.
func TestIdempotencyKeyOnTheWire(t *testing.T) {
	h := newHarness(t, 2)
	type sent struct {
		key  string
		seq  int64
		step string
		idem string
	}
	var (
		mu       sync.Mutex
		requests []sent
		tries    = map[string]int{} // by key/seq/request index, as the body and X-Step say
	)
	h.Sink.Observe = func(d *testkit.Delivery, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		requests = append(requests, sent{d.Key, d.Seq, r.Header.Get("X-Step"), d.IdempotencyKey})
	}
	// The second request of every third message fails once (503, retried).
	h.Sink.Status = func(d *testkit.Delivery) int {
		mu.Lock()
		defer mu.Unlock()
		id := d.Key + "/" + strconv.FormatInt(d.Seq, 10) + "/" + d.Header.Get("X-Step")
		tries[id]++
		if d.Header.Get("X-Step") == "1" && d.Seq%3 == 0 && tries[id] == 1 {
			return http.StatusServiceUnavailable
		}
		return 0
	}
	// Each key on its own partition; offsets 0, 1, 2, ... in production order.
	type at struct {
		partition int32
		offset    int64
	}
	where := map[string]at{}
	want := map[string][]int64{}
	for p := range int32(2) {
		var recs []testkit.Record
		for i := range 60 {
			k := "p" + strconv.Itoa(int(p)) + "-k" + strconv.Itoa(i%6)
			seq := int64(i / 6)
			recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
			where[k+"/"+strconv.FormatInt(seq, 10)] = at{p, int64(i)}
			want[k] = append(want[k], seq)
		}
		if err := h.Prod.ProduceTo(context.Background(), h.Topic, p, recs); err != nil {
			t.Fatal(err)
		}
	}
	// A short open_timeout: the 503s may open the breaker.
	cfg := h.Config("idem", "", "[http.breaker]\nopen_timeout = \"200ms\"\n")
	first := cfg.Routes[0].Requests[0]
	first.Headers = map[string]string{"X-Step": "0"}
	second := first
	second.Headers = map[string]string{"X-Step": "1"}
	cfg.Routes[0].Requests = append(cfg.Routes[0].Requests[:0], first, second)
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "every message delivered and committed", func() bool {
		return m.Sum("orderly_committed_offset") == 120
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	retried := 0
	for _, r := range requests {
		loc, ok := where[r.key+"/"+strconv.FormatInt(r.seq, 10)]
		if !ok {
			t.Fatalf("request for %s/%d, never produced", r.key, r.seq)
		}
		wantKey := "orders-" + strconv.Itoa(int(loc.partition)) + "-" + strconv.FormatInt(loc.offset, 10) + "-" + r.step
		if r.idem != wantKey {
			t.Fatalf("%s/%d request %s: Idempotency-Key %q, want %q", r.key, r.seq, r.step, r.idem, wantKey)
		}
	}
	for k, n := range tries {
		if n > 1 {
			retried++
			if !strings.HasSuffix(k, "/1") {
				t.Fatalf("%s sent %d times; only second requests fail", k, n)
			}
		}
	}
	// The messages with seq % 3 == 0 have their second request retried.
	wantRetried := 0
	for _, seqs := range want {
		for _, q := range seqs {
			if q%3 == 0 {
				wantRetried++
			}
		}
	}
	if len(requests) != 2*120+wantRetried || retried != wantRetried {
		t.Fatalf("%d requests, %d keys sent more than once; want %d and %d", len(requests), retried, 2*120+wantRetried, wantRetried)
	}
	if rep := h.Sink.Check(want); !rep.OK() {
		t.Fatal(rep)
	}
}

// TestDeadLetterKeepsTheOriginal: a message that fails permanently goes to
// the DLQ with its own key, value and headers (binary values byte for byte,
// in their order, before Orderly's) and orderly.original_* naming where it
// came from: partition, offset, the producer's timestamp; and
// orderly.failed_at is the time it failed.
func TestDeadLetterKeepsTheOriginal(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "k-a" && d.Seq == 1 {
			return http.StatusBadRequest
		}
		return 0
	}
	ts := time.Date(2024, 5, 6, 7, 8, 9, 123e6, time.UTC)
	orig := []kafka.Header{{Key: "traceparent", Value: []byte("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")},
		{Key: "tenant", Value: []byte{0, 1, 0xfe, 0xff}}, {Key: "tenant", Value: []byte("second")}}
	failing := testkit.Record{Key: []byte("k-a"), Value: testkit.EventJSON("k-a", 1), Headers: orig, Timestamp: ts}
	recs := []testkit.Record{
		{Key: []byte("k-a"), Value: testkit.EventJSON("k-a", 0), Headers: []kafka.Header{{Key: "other", Value: []byte("x")}}},
		failing,
		{Key: []byte("k-a"), Value: testkit.EventJSON("k-a", 2)},
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 1, recs); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	_, m, stop := h.run(h.Config("dlq-original", "", ""), nil)
	testkit.WaitFor(t, time.Minute, "every message finished", func() bool { return m.Sum("orderly_committed_offset") == 3 })
	after := time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	letters := h.ReadAll("orderly.dlq", 1, 30*time.Second)
	if len(letters) != 1 {
		t.Fatalf("DLQ holds %d records, want 1", len(letters))
	}
	r := letters[0]
	if string(r.Key) != "k-a" || string(r.Value) != string(failing.Value) {
		t.Fatalf("DLQ record %q = %q, want the original %q = %q", r.Key, r.Value, failing.Key, failing.Value)
	}
	if len(r.Headers) < len(orig) {
		t.Fatalf("DLQ record has %d headers, want the %d original ones first", len(r.Headers), len(orig))
	}
	for i, hd := range orig {
		if r.Headers[i].Key != hd.Key || string(r.Headers[i].Value) != string(hd.Value) {
			t.Fatalf("DLQ header %d = %s=%q, want the original %s=%q", i, r.Headers[i].Key, r.Headers[i].Value, hd.Key, hd.Value)
		}
	}
	for _, hd := range r.Headers {
		if hd.Key == "other" {
			t.Fatal("the DLQ record carries another message's header")
		}
	}
	for name, want := range map[string]string{
		dlq.HeaderOriginalTopic:     "orders",
		dlq.HeaderOriginalPartition: "1",
		dlq.HeaderOriginalOffset:    "1",
		dlq.HeaderOriginalTimestamp: "2024-05-06T07:08:09.123Z",
		dlq.HeaderStatus:            "400",
		dlq.HeaderRoute:             "people",
		dlq.HeaderRequestIndex:      "0",
		dlq.HeaderAttempts:          "1",
	} {
		if got, _ := kafkatest.Header(r, name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	fa, _ := kafkatest.Header(r, dlq.HeaderFailedAt)
	failedAt, err := time.Parse(time.RFC3339Nano, fa)
	if err != nil || failedAt.Before(before.Add(-time.Millisecond)) || failedAt.After(after) || failedAt.Location() != time.UTC {
		t.Errorf("%s = %q (%v), want a UTC time between the start %s and %s", dlq.HeaderFailedAt, fa, err,
			before.UTC().Format(time.RFC3339Nano), after.UTC().Format(time.RFC3339Nano))
	}
	if rep := h.Sink.Check(map[string][]int64{"k-a": {0, 2}}); !rep.OK() {
		t.Fatal(rep)
	}
}

// nullKeyed makes n records without a key (nil, or empty when empty is
// set for odd i), all carrying the body key key with seq 0, 1, ...
func nullKeyed(key string, n int, empty bool) []testkit.Record {
	recs := make([]testkit.Record, n)
	for i := range recs {
		recs[i].Value = testkit.EventJSON(key, int64(i))
		if empty && i%2 == 1 {
			recs[i].Key = []byte{}
		}
	}
	return recs
}

// TestUnkeyedSharePartitionLane: with dispatch.unkeyed = "partition" (the
// default) messages without a key, null or empty, go out one at a time in
// offset order, and keyed messages beside them are not held up by them.
func TestUnkeyedSharePartitionLane(t *testing.T) {
	h := newHarness(t, 1)
	const n = 200
	recs := nullKeyed("unkeyed", n, true)
	want := map[string][]int64{}
	for i := range n {
		want["unkeyed"] = append(want["unkeyed"], int64(i))
	}
	for i := range 100 {
		k := "k" + strconv.Itoa(i%4)
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, int64(i/4))})
		want[k] = append(want[k], int64(i/4))
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("unkeyed", "", "")
	if cfg.Dispatch.Unkeyed != "partition" {
		t.Fatalf("default dispatch.unkeyed = %q, want partition", cfg.Dispatch.Unkeyed)
	}
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "every message finished", func() bool {
		return m.Sum("orderly_committed_offset") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	// One lane for null and empty keys: in order, never two at once.
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
	if h.Sink.MaxInFlight() < 2 {
		t.Fatal("never two requests in flight: the keyed messages waited for the unkeyed ones")
	}
}

// TestUnkeyedParallel: with dispatch.unkeyed = "parallel" messages without
// a key go out at the same time: the target holds each until ten are in
// flight together, which the shared lane would never reach.
func TestUnkeyedParallel(t *testing.T) {
	h := newHarness(t, 1)
	const n, together = 50, 10
	var recs []testkit.Record
	want := map[string][]int64{}
	for i := range n {
		k := "u" + strconv.Itoa(i) // a body key each: they may overlap
		recs = append(recs, testkit.Record{Value: testkit.EventJSON(k, 0)})
		want[k] = []int64{0}
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
		t.Fatal(err)
	}
	reached := make(chan struct{})
	var once sync.Once
	h.Sink.Observe = func(_ *testkit.Delivery, r *http.Request) {
		if h.Sink.InFlight() >= together {
			once.Do(func() { close(reached) })
		}
		select {
		case <-reached:
		case <-r.Context().Done():
		case <-time.After(30 * time.Second):
		}
	}
	_, m, stop := h.run(h.Config("parallel", `unkeyed = "parallel"`, ""), nil)
	select {
	case <-reached:
	case <-time.After(time.Minute):
		t.Fatalf("at most %d unkeyed requests in flight at once, want %d", h.Sink.MaxInFlight(), together)
	}
	testkit.WaitFor(t, time.Minute, "every message finished", func() bool { return m.Sum("orderly_committed_offset") == n })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
}

// TestUnmatched: a message no route takes is skipped (counted, committed,
// never sent) with dispatch.unmatched = "skip", and dead-lettered with the
// reason with "dlq"; the matching messages of the same key go on in order.
func TestUnmatched(t *testing.T) {
	for _, mode := range []string{"skip", "dlq"} {
		t.Run(mode, func(t *testing.T) {
			h := newHarness(t, 1)
			var recs []testkit.Record
			want := map[string][]int64{}
			robots := 0
			for i := range 60 {
				k := "k" + strconv.Itoa(i%3)
				seq := int64(i / 3)
				kind := "person"
				if i%5 == 0 {
					kind, robots = "robot", robots+1
				} else {
					want[k] = append(want[k], seq)
				}
				v := `{"key":"` + k + `","seq":` + strconv.FormatInt(seq, 10) + `,"kind":"` + kind + `"}`
				recs = append(recs, testkit.Record{Key: []byte(k), Value: []byte(v)})
			}
			if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
				t.Fatal(err)
			}
			cfg := h.Config("unmatched-"+mode, `unmatched = "`+mode+`"`, "")
			cfg.Routes[0].When = `value.kind == "person"`
			_, m, stop := h.run(cfg, nil)
			testkit.WaitFor(t, time.Minute, "every message finished", func() bool {
				return m.Sum("orderly_committed_offset") == float64(len(recs))
			})
			if err := stop(); err != nil {
				t.Fatal(err)
			}
			if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
				t.Fatal(rep)
			}
			if got := h.Sink.Requests(); got != int64(len(recs)-robots) {
				t.Fatalf("%d requests, want %d: an unmatched message was sent", got, len(recs)-robots)
			}
			skipped := testutilCounter(t, m, "orderly_messages_total", "outcome", "skipped")
			deadLettered := testutilCounter(t, m, "orderly_messages_total", "outcome", "dead_lettered")
			wantDLQ := 0
			if mode == "skip" {
				if skipped != float64(robots) || deadLettered != 0 {
					t.Fatalf("skipped %v, dead-lettered %v; want %d skipped", skipped, deadLettered, robots)
				}
			} else {
				wantDLQ = robots
				if skipped != 0 || deadLettered != float64(robots) {
					t.Fatalf("skipped %v, dead-lettered %v; want %d dead-lettered", skipped, deadLettered, robots)
				}
			}
			letters := h.ReadAll("orderly.dlq", wantDLQ, 10*time.Second)
			if len(letters) != wantDLQ {
				t.Fatalf("DLQ holds %d records, want %d", len(letters), wantDLQ)
			}
			for _, r := range letters {
				reason, _ := kafkatest.Header(r, dlq.HeaderError)
				route, _ := kafkatest.Header(r, dlq.HeaderRoute)
				if !strings.Contains(string(r.Value), `"robot"`) || !strings.Contains(reason, "no route") || route != "" {
					t.Fatalf("DLQ record %s: error %q, route %q; want a robot, no route", r.Value, reason, route)
				}
			}
		})
	}
}

// TestMaxLanes: with dispatch.max_lanes = 2 a partition never has more
// than two key lanes, so never more than two requests in flight, however
// many keys it holds; at the cap idle lanes are retired for new keys and
// every key is delivered in order.
func TestMaxLanes(t *testing.T) {
	h := newHarness(t, 1)
	gen := &testkit.Generator{Keys: 12}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, gen.Records(360)); err != nil {
		t.Fatal(err)
	}
	var peak atomic.Int64
	_, m, stop := h.run(h.Config("lanes", "max_lanes = 2", ""), func(d *Dispatcher) {
		d.onBegin = func(string, int32, int) {
			// Sampled as messages arrive: lanes are made for them.
			if v := int64(d.metrics.Sum("orderly_active_lanes")); v > peak.Load() {
				peak.Store(v)
			}
		}
	})
	testkit.WaitFor(t, time.Minute, "every message finished", func() bool { return m.Sum("orderly_committed_offset") == 360 })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
	if got := h.Sink.MaxInFlight(); got != 2 {
		t.Fatalf("at most %d requests in flight, want exactly max_lanes (2)", got)
	}
	if p := peak.Load(); p > 2 {
		t.Fatalf("orderly_active_lanes reached %d, want at most max_lanes (2)", p)
	}
}

// TestLaneIdleRetiresLanes: a key lane idle for dispatch.lane_idle is
// retired (orderly_active_lanes falls to 0), not before; keys that come
// back get new lanes and stay in order.
func TestLaneIdleRetiresLanes(t *testing.T) {
	h := newHarness(t, 1)
	const idle = 600 * time.Millisecond
	var mu sync.Mutex
	var last time.Time // the last delivery: every lane went idle after it
	h.Sink.Status = func(*testkit.Delivery) int {
		mu.Lock()
		last = time.Now()
		mu.Unlock()
		return 0
	}
	gen := &testkit.Generator{Keys: 5}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, gen.Records(50)); err != nil {
		t.Fatal(err)
	}
	_, m, stop := h.run(h.Config("idle", `lane_idle = "600ms"`, ""), nil)
	for round := 1; round <= 2; round++ {
		testkit.WaitFor(t, time.Minute, "every message finished", func() bool {
			return m.Sum("orderly_committed_offset") == float64(50*round)
		})
		testkit.WaitFor(t, 30*time.Second, "the idle lanes retired", func() bool { return m.Sum("orderly_active_lanes") == 0 })
		mu.Lock()
		after := time.Since(last)
		mu.Unlock()
		if after < idle {
			t.Fatalf("round %d: lanes retired %s after the last delivery, before lane_idle (%s)", round, after, idle)
		}
		if round == 1 {
			if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, gen.Records(50)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
}

// TestResumeAtHalfOfMaxInFlight: a partition paused at max_in_flight
// resumes once half of that is left in flight, not before: the first
// message taken after each pause finds at most max_in_flight/2 in flight.
func TestResumeAtHalfOfMaxInFlight(t *testing.T) {
	h := newHarness(t, 1)
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 40 * time.Millisecond }
	const maxInFlight, n = 100, 500
	gen := &testkit.Generator{Keys: 50} // two or so per key in flight: only the partition's limit applies
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	var (
		mu       sync.Mutex
		paused   bool
		resumeAt []int // in flight when the first message after each pause was taken, itself included
		peak     int
	)
	_, m, stop := h.run(h.Config("resume", "max_in_flight = "+strconv.Itoa(maxInFlight), ""), func(d *Dispatcher) {
		d.onBegin = func(_ string, _ int32, inFlight int) {
			mu.Lock()
			defer mu.Unlock()
			peak = max(peak, inFlight)
			if paused {
				resumeAt = append(resumeAt, inFlight)
			}
			paused = inFlight >= maxInFlight
		}
	})
	testkit.WaitFor(t, 2*time.Minute, "every message finished", func() bool { return m.Sum("orderly_committed_offset") == n })
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if peak != maxInFlight || len(resumeAt) < 2 {
		t.Fatalf("peak %d in flight, %d resumes; want the limit %d reached and several resumes", peak, len(resumeAt), maxInFlight)
	}
	for i, v := range resumeAt {
		if v > maxInFlight/2+1 {
			t.Fatalf("resume %d: the first message after the pause found %d in flight, want at most %d (half of max_in_flight, plus itself): %v",
				i+1, v, maxInFlight/2+1, resumeAt)
		}
	}
	if got := m.Sum("orderly_partition_pauses_total"); got < float64(len(resumeAt)) {
		t.Fatalf("%v pauses counted for %d resumes", got, len(resumeAt))
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
	t.Logf("in flight at the first message after each pause: %v", resumeAt)
}
