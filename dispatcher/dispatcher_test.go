package dispatcher

import (
	"context"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestDeliversInOrderAndCommits is the core contract: 20,000 messages over
// 500 keys on 8 partitions, a sink with random latencies, zero loss, zero
// per-key order violations, committed offsets at the end offsets, and a
// second start of the group delivers nothing again.
func TestDeliversInOrderAndCommits(t *testing.T) {
	n, keys := 20000, 500
	if testing.Short() {
		n = 4000
	}
	h := newHarness(t, 8)
	var mu sync.Mutex
	rng := rand.New(rand.NewPCG(3, 4))
	h.Sink.Delay = func(*testkit.Delivery) time.Duration {
		mu.Lock()
		defer mu.Unlock()
		if rng.IntN(10) == 0 {
			return time.Duration(rng.IntN(3000)) * time.Microsecond
		}
		return 0
	}
	gen := &testkit.Generator{Keys: keys, Size: 200}
	ctx := context.Background()
	if err := h.Prod.Produce(ctx, h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}

	cfg := h.Config("core", "", "")
	// A lost assignment redelivers legitimately; under -race on a busy
	// machine the in-process broker can miss a 2 s session. Zero duplicates
	// is what this test checks, so the session must not expire.
	cfg.Kafka.Properties["session.timeout.ms"] = "10000"
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, 2*time.Minute, "every message delivered", func() bool { return h.Sink.Distinct() >= n })
	rep := h.Sink.Check(gen.Expected())
	if !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("first run: %s", rep)
	}
	testkit.WaitFor(t, 30*time.Second, "commits at the end offsets", func() bool {
		return m.Sum("orderly_committed_offset") == float64(n)
	})
	if err := stop(); err != nil {
		t.Fatalf("run: %v", err)
	}
	committed, end := h.Committed("core")
	for i := range end {
		if committed[i] != end[i] {
			t.Fatalf("partition %d: committed %d, end offset %d", i, committed[i], end[i])
		}
	}
	if got := m.Sum("orderly_messages_total"); got != float64(n) {
		t.Fatalf("orderly_messages_total = %v, want %d", got, n)
	}

	// Second start of the group: a marker per key reaches the sink, the
	// group commits to the new end, and nothing old came again.
	markers := gen.Records(keys)
	if err := h.Prod.Produce(ctx, h.Topic, markers); err != nil {
		t.Fatal(err)
	}
	_, m2, stop2 := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "markers delivered and committed", func() bool {
		return h.Sink.Distinct() >= n+keys && m2.Sum("orderly_committed_offset") == float64(n+keys)
	})
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	rep = h.Sink.Check(gen.Expected())
	if !rep.OK() || rep.Duplicates != 0 || rep.Delivered != n+keys {
		t.Fatalf("second run redelivered or lost: %s", rep)
	}
}

// TestSlowKeyDoesNotBlockOthers: key A's requests take 50 ms and its first
// one is held until keys B and C are completely delivered; all three keys
// share one partition. B and C finishing proves a slow key does not block
// other keys.
func TestSlowKeyDoesNotBlockOthers(t *testing.T) {
	h := newHarness(t, 1)
	const perKey = 200
	var others atomic.Int64
	released := make(chan struct{})
	var gate sync.Once
	h.Sink.Delay = func(d *testkit.Delivery) time.Duration {
		if d.Key != "A" {
			return 0
		}
		select {
		case <-released:
		case <-time.After(30 * time.Second):
		}
		return 50 * time.Millisecond
	}
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key != "A" && others.Add(1) == 2*perKey {
			gate.Do(func() { close(released) })
		}
		return 0
	}
	var recs []testkit.Record
	expected := map[string][]int64{}
	for i := 0; i < perKey; i++ {
		for _, k := range []string{"A", "B", "C"} {
			if k == "A" && i >= 20 {
				continue
			}
			recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, int64(i))})
			expected[k] = append(expected[k], int64(i))
		}
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
		t.Fatal(err)
	}
	h.run(h.Config("parallel", "", ""), nil)
	select {
	case <-released:
	case <-time.After(60 * time.Second):
		t.Fatalf("keys B and C were not delivered while key A was held: %d of %d", others.Load(), 2*perKey)
	}
	if got := len(h.Sink.Sequences("A")); got != 0 {
		t.Fatalf("key A delivered %d before it was released", got)
	}
	testkit.WaitFor(t, time.Minute, "key A delivered", func() bool { return h.Sink.Distinct() == len(recs) })
	if rep := h.Sink.Check(expected); !rep.OK() {
		t.Fatal(rep)
	}
}

// TestBackPressure: max_in_flight = 100 and a slow sink. A partition never
// holds more than 100 messages, is paused and resumed, and the group does
// not rebalance although processing takes many times max.poll.interval.ms.
func TestBackPressure(t *testing.T) {
	h := newHarness(t, 2)
	// 10 keys of 350 messages at 20 ms each: at least 7 s of processing,
	// over three times max.poll.interval.ms below.
	h.Sink.Delay = func(*testkit.Delivery) time.Duration { return 20 * time.Millisecond }
	const n = 3500
	gen := &testkit.Generator{Keys: 10}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("backpressure", "max_in_flight = 100", "")
	// 2 s, not 1 s: under -race on a busy machine a 1 s session (or poll
	// interval) can expire for reasons unrelated to back-pressure, and
	// exactly one assignment is what this test checks.
	const maxPoll = 2 * time.Second
	cfg.Kafka.Properties["max.poll.interval.ms"] = strconv.Itoa(int(maxPoll.Milliseconds()))
	cfg.Kafka.Properties["session.timeout.ms"] = strconv.Itoa(int(maxPoll.Milliseconds())) // librdkafka wants it <= max.poll.interval.ms
	var peak, peakHeld atomic.Int64
	start := time.Now()
	d, m, stop := h.run(cfg, func(d *Dispatcher) {
		d.onBegin = func(_ string, _ int32, inFlight int) {
			for held := d.HeldBytes(); ; {
				p := peakHeld.Load()
				if held <= p || peakHeld.CompareAndSwap(p, held) {
					break
				}
			}
			for {
				p := peak.Load()
				if int64(inFlight) <= p || peak.CompareAndSwap(p, int64(inFlight)) {
					return
				}
			}
		}
	})
	testkit.WaitFor(t, 2*time.Minute, "every message delivered", func() bool { return h.Sink.Distinct() >= n })
	elapsed := time.Since(start)
	if got := m.Sum("orderly_rebalances_total"); got != 2 {
		t.Fatalf("rebalance events %v, want only the initial assignment of 2 partitions (no revoke)", got)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
		t.Fatal(rep)
	}
	if p := peak.Load(); p != 100 {
		t.Fatalf("peak in flight per partition = %d, want exactly the limit 100", p)
	}
	if got := m.Sum("orderly_partition_pauses_total"); got < 2 {
		t.Fatalf("partitions paused %v times, want at least once each", got)
	}
	// Held memory follows the messages in flight: at least one full
	// partition's worth at the peak, at most both partitions', none after.
	// (The generator's values here are 80 to 200 bytes.)
	lo, hi := 100*heldSize(5, 80, 0), 2*101*heldSize(6, 200, 0)
	if p := peakHeld.Load(); p < lo || p > hi {
		t.Fatalf("peak HeldBytes = %d, want between %d and %d (100 messages per partition)", p, lo, hi)
	}
	if got := d.HeldBytes(); got != 0 {
		t.Fatalf("HeldBytes = %d after the stop, want 0", got)
	}
	if elapsed < 3*maxPoll {
		t.Fatalf("processing took %s: the test no longer spans several max.poll.interval.ms", elapsed)
	}
	t.Logf("processing took %s with max.poll.interval.ms %d; %v pauses", elapsed.Round(time.Millisecond),
		maxPoll.Milliseconds(), m.Sum("orderly_partition_pauses_total"))
}

// TestNewGroupStartsWhereAutoOffsetResetSays: the partitions of a group
// without committed offsets are assigned at auto.offset.reset's offset by
// the dispatcher itself (assign, startAt). With "latest", the messages
// produced before the group joined are never sent; those produced after
// are.
func TestNewGroupStartsWhereAutoOffsetResetSays(t *testing.T) {
	h := newHarness(t, 2)
	var early []testkit.Record
	for i := range 10 {
		early = append(early, testkit.Record{Key: []byte("early"), Value: testkit.EventJSON("early", int64(i))})
	}
	if err := h.Prod.Produce(context.Background(), h.Topic, early); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("reset-latest", "", "")
	cfg.Kafka.Properties["auto.offset.reset"] = "latest"
	d, _, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the partitions assigned", d.Ready)
	// The end offsets are looked up after the assignment: produce until
	// one of the later messages arrives.
	seq := int64(0)
	testkit.WaitFor(t, time.Minute, "a message produced after the start delivered", func() bool {
		if h.Sink.Distinct() > 0 {
			return true
		}
		rec := testkit.Record{Key: []byte("late"), Value: testkit.EventJSON("late", seq)}
		seq++
		if err := h.Prod.Produce(context.Background(), h.Topic, []testkit.Record{rec}); err != nil {
			t.Fatal(err)
		}
		return false
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if got := h.Sink.Sequences("early"); len(got) > 0 {
		t.Fatalf("messages produced before the group joined were sent: early %v", got)
	}
	if got := h.Sink.Sequences("late"); len(got) == 0 {
		t.Fatal("no message produced after the start was sent")
	}
}
