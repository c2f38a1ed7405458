package dispatcher

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// Failures that last: long outages, stuck keys, DLQ refusals, revokes.

// TestLongOutageOnDefaultRetrySettings: the target refuses connections, then
// answers 503, for many times what max_attempts (the default, 10) allows,
// with two keys of 50 messages. Nothing is dead-lettered: those attempts
// are not counted, the target being down for every key. Then it recovers
// and everything arrives in order.
func TestLongOutageOnDefaultRetrySettings(t *testing.T) {
	h := newHarness(t, 2)
	gen := &testkit.Generator{Keys: 2}
	const n = 100
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	addr := testkit.FreeAddr(t) // nothing listens there yet: connections are refused
	cfg := h.ConfigTo("http://"+addr, "outage-default", "", "[http.breaker]\nopen_timeout = \"300ms\"\n")
	max := cfg.HTTP.Retry.MaxAttempts
	if max != 10 {
		t.Fatalf("default max_attempts is %d; the test assumes 10", max)
	}
	_, m, stop := h.run(cfg, nil)
	status := func(s string) float64 {
		return m.SumWhere("orderly_http_requests_total", map[string]string{"status": s})
	}
	testkit.WaitFor(t, time.Minute, "refused attempts, several times max_attempts", func() bool {
		return status("error") >= float64(3*max)
	})

	var healthy atomic.Bool
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !healthy.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		h.Sink.ServeHTTP(w, r)
	})}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	testkit.WaitFor(t, time.Minute, "503 answers, several times max_attempts, and half-open probes", func() bool {
		return status("503") >= float64(3*max) &&
			m.SumWhere("orderly_breaker_transitions_total", map[string]string{"to": "half-open"}) >= 2
	})
	healthy.Store(true)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == n
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
		t.Fatal(rep)
	}
	if got := m.Sum("orderly_dlq_produced_total"); got != 0 {
		t.Fatalf("%v messages dead-lettered during an outage", got)
	}
	if got := m.Sum("orderly_http_attempts_uncounted_total"); got == 0 {
		t.Fatal("no attempt was reported uncounted")
	}
	t.Logf("%v refused and %v 503 attempts, %v uncounted, breaker opened %v times", status("error"), status("503"),
		m.Sum("orderly_http_attempts_uncounted_total"), m.SumWhere("orderly_breaker_transitions_total", map[string]string{"to": "open"}))
}

// TestPoisonOnHealthyTargetExhaustsAttempts: one message the target always
// answers 500 while it serves every other message: its attempts count, and
// after max_attempts (the default, 10) it is dead-lettered.
func TestPoisonOnHealthyTargetExhaustsAttempts(t *testing.T) {
	h := newHarness(t, 2)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "key-3" && d.Seq == 5 {
			return http.StatusInternalServerError
		}
		return 0
	}
	gen := &testkit.Generator{Keys: 10}
	const n = 300
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	_, m, stop := h.run(h.Config("poison-healthy", "", ""), nil)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == n
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	letters := h.ReadAll("orderly.dlq", 1, 30*time.Second)
	if len(letters) != 1 {
		t.Fatalf("DLQ holds %d records, want 1", len(letters))
	}
	var ev struct {
		Key string `json:"key"`
		Seq int64  `json:"seq"`
	}
	if err := jsonUnmarshal(letters[0].Value, &ev); err != nil || ev.Key != "key-3" || ev.Seq != 5 {
		t.Fatalf("DLQ holds %s (%v), want key-3 seq 5", letters[0].Value, err)
	}
	if a, _ := kafkatest.Header(letters[0], dlq.HeaderAttempts); a != "10" {
		t.Fatalf("orderly.attempts = %q, want 10", a)
	}
	want := gen.Expected()
	want["key-3"] = append(append([]int64{}, want["key-3"][:5]...), want["key-3"][6:]...)
	if rep := h.Sink.Check(want); !rep.OK() {
		t.Fatal(rep)
	}
}

// hold makes the sink keep the requests of keys in held open until release
// is called for that key (or the request's context ends).
type hold struct {
	mu      sync.Mutex
	gates   map[string]chan struct{}
	waiting atomic.Int64
}

func newHold(sink *testkit.Sink, keys ...string) *hold {
	hd := &hold{gates: map[string]chan struct{}{}}
	for _, k := range keys {
		hd.gates[k] = make(chan struct{})
	}
	sink.Observe = func(d *testkit.Delivery, r *http.Request) {
		hd.mu.Lock()
		g := hd.gates[d.Key]
		hd.mu.Unlock()
		if g == nil {
			return
		}
		hd.waiting.Add(1)
		defer hd.waiting.Add(-1)
		select {
		case <-g:
		case <-r.Context().Done():
		}
	}
	return hd
}

func (hd *hold) release(key string) {
	hd.mu.Lock()
	defer hd.mu.Unlock()
	if g := hd.gates[key]; g != nil {
		close(g)
		delete(hd.gates, key)
	}
}

// TestSpanLimitPausesAndResumes: one key is stuck while the others flow on
// its partition. Finished offsets pile up behind it until the span reaches
// dispatch.max_span; then the partition pauses, and what is held stays flat.
// Once the stuck key moves, the partition resumes and everything arrives in
// order.
func TestSpanLimitPausesAndResumes(t *testing.T) {
	h := newHarness(t, 1)
	hd := newHold(h.Sink, "key-0")
	gen := &testkit.Generator{Keys: 20}
	const n, maxSpan = 2000, 500
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("span", "max_in_flight = 200\nmax_span = "+strconv.Itoa(maxSpan), "")
	cfg.HTTP.Timeout.Duration = time.Minute
	d, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the partition paused at max_span", func() bool {
		return m.Sum("orderly_partition_paused") == 1 && m.Sum("orderly_partition_span_offsets") >= maxSpan
	})
	// Paused, nothing more is fetched: the span and what is held stay put
	// while the stuck key waits.
	span, held := m.Sum("orderly_partition_span_offsets"), d.HeldBytes()
	delivered := h.Sink.Delivered()
	testkit.WaitFor(t, time.Minute, "the others' deliveries to settle", func() bool {
		time.Sleep(200 * time.Millisecond)
		now := h.Sink.Delivered()
		settled := now == delivered
		delivered = now
		return settled
	})
	if got := m.Sum("orderly_partition_span_offsets"); got > span || got > maxSpan+1 {
		t.Fatalf("span grew to %v while paused (was %v, max_span %d)", got, span, maxSpan)
	}
	if got := d.HeldBytes(); got > held {
		t.Fatalf("held memory grew from %d to %d bytes while paused", held, got)
	}
	if age := m.Sum("orderly_partition_oldest_unfinished_seconds"); age <= 0 {
		t.Fatalf("oldest unfinished age %v, want > 0 while a message is stuck", age)
	}
	if hd.waiting.Load() != 1 {
		t.Fatalf("%d requests held, want the stuck key's one", hd.waiting.Load())
	}
	hd.release("key-0")
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == n
	})
	if got := m.Sum("orderly_partition_paused"); got != 0 {
		t.Fatalf("partition still paused")
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
		t.Fatal(rep)
	}
}

// TestOversizedDeadLetterIsTruncated: the DLQ topic accepts smaller records
// than the source topic. A message that fails permanently and is too large
// for the DLQ goes there with its value cut and orderly.value_truncated
// naming the original size; the partition commits past it.
func TestOversizedDeadLetterIsTruncated(t *testing.T) {
	h := newHarness(t, 1)
	setTopicConfig(t, h.Broker.Addr(), "orderly.dlq", "max.message.bytes", "20000")
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "key-1" && d.Seq == 2 {
			return http.StatusBadRequest
		}
		return 0
	}
	pad := make([]byte, 50000)
	for i := range pad {
		pad[i] = 'x'
	}
	large := []byte(`{"key":"key-1","seq":2,"pad":"` + string(pad) + `"}`)
	all := []testkit.Record{
		{Key: []byte("key-1"), Value: testkit.EventJSON("key-1", 0)},
		{Key: []byte("key-1"), Value: testkit.EventJSON("key-1", 1)},
		{Key: []byte("key-1"), Value: large},
		{Key: []byte("key-1"), Value: testkit.EventJSON("key-1", 3)},
		{Key: []byte("key-2"), Value: testkit.EventJSON("key-2", 0)},
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, all); err != nil {
		t.Fatal(err)
	}
	_, m, stop := h.run(h.Config("dlq-size", "", ""), nil)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == float64(len(all))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	letters := h.ReadAll("orderly.dlq", 1, 30*time.Second)
	if len(letters) != 1 {
		t.Fatalf("DLQ holds %d records, want 1", len(letters))
	}
	r := letters[0]
	orig, ok := kafkatest.Header(r, dlq.HeaderValueTruncated)
	if !ok || orig != strconv.Itoa(len(large)) {
		t.Fatalf("orderly.value_truncated = %q, want the original size %d", orig, len(large))
	}
	if len(r.Value) == 0 || len(r.Value) >= 20000 || string(r.Value) != string(large[:len(r.Value)]) {
		t.Fatalf("DLQ value of %d bytes, want a prefix of the original below the topic's limit", len(r.Value))
	}
	if off, _ := kafkatest.Header(r, dlq.HeaderOriginalOffset); off != "2" {
		t.Fatalf("orderly.original_offset = %q, want 2", off)
	}
	if got := m.Sum("orderly_dlq_truncated_total"); got != 1 {
		t.Fatalf("orderly_dlq_truncated_total = %v, want 1", got)
	}
	want := map[string][]int64{"key-1": {0, 1, 3}, "key-2": {0}}
	if rep := h.Sink.Check(want); !rep.OK() {
		t.Fatal(rep)
	}
}

// setTopicConfig sets one config of a topic through the admin API.
func setTopicConfig(t *testing.T, brokers, topic, name, value string) {
	t.Helper()
	a, err := kafka.NewAdminClient(&kafka.ConfigMap{"bootstrap.servers": brokers, "log_level": 3})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := a.IncrementalAlterConfigs(ctx, []kafka.ConfigResource{{Type: kafka.ResourceTopic, Name: topic,
		Config: []kafka.ConfigEntry{{Name: name, Value: value, IncrementalOperation: kafka.AlterConfigOpTypeSet}}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res {
		if r.Error.Code() != kafka.ErrNoError {
			t.Fatalf("setting %s=%s on %s: %v", name, value, topic, r.Error)
		}
	}
}

// TestRefusedDLQWaitsLoudlyWithoutHoldingTheDrain: the broker refuses every
// DLQ write (topic authorization). The failing message's key waits, nothing
// is skipped, the failure shows in Problems (/readyz) and
// orderly_dlq_failing, the other keys finish, and the stop does not wait
// out the five-minute drain_timeout for the waiting key. The next run, with
// the DLQ writable again, dead-letters it and sends nothing twice: what
// finished is in the progress committed with the offset.
func TestRefusedDLQWaitsLoudlyWithoutHoldingTheDrain(t *testing.T) {
	h := newHarness(t, 1)
	h.Sink.Status = func(d *testkit.Delivery) int {
		if d.Key == "bad" {
			return http.StatusBadRequest
		}
		return 0
	}
	recs := []testkit.Record{{Key: []byte("bad"), Value: testkit.EventJSON("bad", 0)}}
	want := map[string][]int64{}
	for i := range 50 {
		k := "k" + strconv.Itoa(i%5)
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, int64(i/5))})
		want[k] = append(want[k], int64(i/5))
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
		t.Fatal(err)
	}
	fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "orderly.dlq",
		Err: kerr.TopicAuthorizationFailed, Count: -1})
	cfg := h.Config("dlq-refused", "", "")
	cfg.Dispatch.DrainTimeout.Duration = 5 * time.Minute
	d, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the others delivered and the DLQ failure reported", func() bool {
		return h.Sink.Distinct() == 50 && m.Sum("orderly_dlq_errors_total") >= 2 && m.Sum("orderly_dlq_failing") == 1 &&
			len(d.Problems()) == 1
	})
	t.Logf("problem reported: %s", d.Problems()[0])
	testkit.WaitFor(t, time.Minute, "progress beyond the waiting message committed", func() bool {
		c, _, meta := h.CommittedMeta("dlq-refused")
		return c[0] == 0 && meta[0] != ""
	})
	start := time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Minute {
		t.Fatalf("the stop took %s: it waited for a key whose DLQ write cannot succeed", took)
	}
	if c, _ := h.Committed("dlq-refused"); c[0] != 0 {
		t.Fatalf("committed offset %d past the message that was never dead-lettered", c[0])
	}
	fh.Remove()

	_, m2, stop2 := h.run(h.Config("dlq-refused", "", ""), nil)
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m2.Sum("orderly_committed_offset") == float64(len(recs))
	})
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	if got := len(h.ReadAll("orderly.dlq", 1, 10*time.Second)); got != 1 {
		t.Fatalf("DLQ holds %d records, want 1", got)
	}
	if got := testutilCounter(t, m2, "orderly_messages_total", "outcome", "already_done"); got != 50 {
		t.Fatalf("the second run skipped %v messages as already done, want the 50 the first delivered", got)
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
}

// TestProgressRecordRefusedByTheBroker: a broker whose
// offset.metadata.max.bytes (64 here) is below what Orderly would write
// refuses the commit; Orderly shrinks the record until it fits, keeping
// the offsets nearest the commit point, and keeps committing.
func TestProgressRecordRefusedByTheBroker(t *testing.T) {
	h := newHarnessWith(t, 1, func(o *embedded.Options) { o.MaxCommitMetadata = 64 })
	hd := newHold(h.Sink, "stuck")
	// The stuck key's messages alternate with the others', so the record
	// of what finished needs a bit (or a byte) per offset.
	var recs []testkit.Record
	want := map[string][]int64{}
	for i := range 1000 {
		k := "stuck"
		if i%2 == 1 {
			k = "k" + strconv.Itoa(i%7)
		}
		seq := int64(len(want[k]))
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
		want[k] = append(want[k], seq)
	}
	if err := h.Prod.ProduceTo(context.Background(), h.Topic, 0, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("meta-refused", "", "")
	cfg.HTTP.Timeout.Duration = time.Minute
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, time.Minute, "the others delivered and a shrunk record committed", func() bool {
		if h.Sink.Distinct() != 500 || m.Sum("orderly_commit_metadata_refused_total") < 1 {
			return false
		}
		_, _, meta := h.CommittedMeta("meta-refused")
		return meta[0] != ""
	})
	_, _, meta := h.CommittedMeta("meta-refused")
	if len(meta[0]) > 64 {
		t.Fatalf("committed a record of %d bytes past the broker's limit of 64", len(meta[0]))
	}
	if got := m.Sum("orderly_commit_progress_truncated_total"); got < 1 {
		t.Fatal("no commit reported a truncated record")
	}
	hd.release("stuck")
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() {
		t.Fatal(rep)
	}
}

// TestRevokeKeepsOtherPartitionsCommitting: a second member joins while
// every partition of the first has a key whose request the target holds,
// with more of that key's messages queued behind it. The first member
// waits for the held requests of the partitions it gives up, not for their
// queues (the second member sends those); meanwhile the partitions it
// keeps, their held requests released, finish and commit. Nothing is sent
// twice, nothing out of order.
func TestRevokeKeepsOtherPartitionsCommitting(t *testing.T) {
	const parts, queued, others = 4, 4, 10
	h := newHarness(t, parts)
	slow := make([]string, parts)
	want := map[string][]int64{}
	for i := range slow {
		slow[i] = "slow-" + strconv.Itoa(i)
	}
	hd := newHold(h.Sink, slow...)
	for i := range parts {
		var recs []testkit.Record
		for q := range int64(queued + 1) {
			recs = append(recs, testkit.Record{Key: []byte(slow[i]), Value: testkit.EventJSON(slow[i], q)})
			want[slow[i]] = append(want[slow[i]], q)
		}
		k := "other-" + strconv.Itoa(i)
		for q := range int64(others) {
			recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, q)})
			want[k] = append(want[k], q)
		}
		if err := h.Prod.ProduceTo(context.Background(), h.Topic, int32(i), recs); err != nil {
			t.Fatal(err)
		}
	}
	cfg := h.Config("revoke", "", "")
	cfg.Dispatch.DrainTimeout.Duration = time.Minute
	cfg.HTTP.Timeout.Duration = 2 * time.Minute
	// While the group rebalances, librdkafka counts no heartbeat as a
	// success: a drain longer than the session would lose the assignment.
	cfg.Kafka.Properties["session.timeout.ms"] = "90000"
	revoked := make(chan []int32, 1)
	_, m1, stop1 := h.run(cfg, func(d *Dispatcher) {
		d.onRevoke = func(ps []int32) {
			select {
			case revoked <- ps:
			default:
			}
		}
	})
	testkit.WaitFor(t, time.Minute, "every partition's slow request held and the others delivered", func() bool {
		return hd.waiting.Load() == parts && h.Sink.Delivered() == parts*others
	})
	_, m2, stop2 := h.run(cfg, nil)
	var gone []int32
	select {
	case gone = <-revoked:
	case <-time.After(time.Minute):
		t.Fatal("no partition was revoked from the first member")
	}
	t.Logf("revoked from the first member: %v", gone)
	isGone := map[int32]bool{}
	for _, p := range gone {
		isGone[p] = true
	}
	var kept []int32
	for i := range int32(parts) {
		if !isGone[i] {
			kept = append(kept, i)
			hd.release(slow[i])
		}
	}
	if len(kept) == 0 {
		t.Fatal("the first member kept no partition")
	}
	testkit.WaitFor(t, time.Minute, "the kept partitions finished and committed during the drain", func() bool {
		for _, p := range kept {
			if m1.SumWhere("orderly_committed_offset", map[string]string{"partition": strconv.Itoa(int(p))}) != queued+1+others {
				return false
			}
		}
		return true
	})
	if got := hd.waiting.Load(); got != int64(len(gone)) {
		t.Fatalf("%d held requests left, want the %d of the revoked partitions: the drain ended early", got, len(gone))
	}
	for _, p := range gone {
		hd.release(slow[p])
	}
	testkit.WaitFor(t, time.Minute, "the second member finished the revoked partitions' queues", func() bool {
		for _, p := range gone {
			if m2.SumWhere("orderly_committed_offset", map[string]string{"partition": strconv.Itoa(int(p))}) != queued+1+others {
				return false
			}
		}
		return true
	})
	if err := stop1(); err != nil {
		t.Fatal(err)
	}
	if err := stop2(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(want); !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("deliveries: %s", rep)
	}
}
