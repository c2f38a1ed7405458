package dispatcher

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// TestTargetOutageIsNotPoison: the sink answers 503 for its first 5 s, then
// recovers. Nothing is lost or reordered, nothing is dead-lettered, the
// breaker opened and closed again, and partitions were paused meanwhile.
func TestTargetOutageIsNotPoison(t *testing.T) {
	h := newHarness(t, 4)
	var once sync.Once
	var downUntil time.Time
	var mu sync.Mutex
	h.Sink.Status = func(*testkit.Delivery) int {
		mu.Lock()
		defer mu.Unlock()
		once.Do(func() { downUntil = time.Now().Add(5 * time.Second) })
		if time.Now().Before(downUntil) {
			return http.StatusServiceUnavailable
		}
		return 0
	}
	const n = 3000
	gen := &testkit.Generator{Keys: 200}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("outage", "max_in_flight = 200", `
[http.breaker]
min_requests = 5
failure_ratio = 0.5
open_timeout = "500ms"
`)
	cfg.HTTP.Retry.MaxAttempts = 30
	cfg.HTTP.Retry.InitialBackoff.Duration = 100 * time.Millisecond
	cfg.HTTP.Retry.MaxBackoff.Duration = time.Second
	_, m, stop := h.run(cfg, nil)
	testkit.WaitFor(t, 2*time.Minute, "all messages finished", func() bool {
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
	if got := len(h.ReadAll("orderly.dlq", 1, 2*time.Second)); got != 0 {
		t.Fatalf("DLQ holds %d records after an outage", got)
	}
	opened := testutilCounter(t, m, "orderly_breaker_transitions_total", "to", "open")
	closed := testutilCounter(t, m, "orderly_breaker_transitions_total", "to", "closed")
	if opened < 1 || closed < 1 {
		t.Fatalf("breaker transitions: open %v, closed %v; want both", opened, closed)
	}
	if got := m.Sum("orderly_partition_pauses_total"); got < 1 {
		t.Fatalf("no partition was paused during the outage")
	}
	t.Logf("breaker opened %v times, closed %v times; %v pauses; %d requests for %d messages",
		opened, closed, m.Sum("orderly_partition_pauses_total"), h.Sink.Requests(), n)
}

// TestRetryAfterPausesOnlyItsTarget: on default retry settings, target A
// answers 429 with Retry-After: 2 for its first 6 s while target B (another
// host) answers at once. B's keys are all delivered while A still refuses,
// then A's keys arrive in order once it accepts: nothing is lost, sent
// twice or dead-lettered, and A's 429s spent no attempt.
func TestRetryAfterPausesOnlyItsTarget(t *testing.T) {
	h := newHarness(t, 4)
	sinkA := testkit.NewSink()
	var mu sync.Mutex
	var refuseUntil time.Time
	var accepted atomic.Int64
	srvA := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if refuseUntil.IsZero() {
			refuseUntil = time.Now().Add(6 * time.Second)
		}
		refusing := time.Now().Before(refuseUntil)
		mu.Unlock()
		if refusing {
			w.Header().Set("Retry-After", "2")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		accepted.Add(1)
		sinkA.ServeHTTP(w, r)
	}))
	t.Cleanup(srvA.Close)
	want := map[string][]int64{}
	var recs []testkit.Record
	for i := range 1000 {
		k := fmt.Sprintf("%c%d", "ab"[i%2], i%20)
		seq := int64(len(want[k]))
		want[k] = append(want[k], seq)
		recs = append(recs, testkit.Record{Key: []byte(k), Value: testkit.EventJSON(k, seq)})
	}
	if err := h.Prod.Produce(context.Background(), h.Topic, recs); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("retry-after", "", "")
	// Default retry settings: the harness shortens them.
	def := config.Defaults()
	cfg.HTTP.Retry = def.HTTP.Retry
	cfg.HTTP.Breaker = def.HTTP.Breaker
	cfg.Routes = append([]config.Route{{Name: "a", When: `key startsWith "a"`,
		Requests: []config.Request{{URL: srvA.URL + "/people/{{ .Key }}"}}}}, cfg.Routes...)
	_, m, stop := h.run(cfg, nil)
	wantA, wantB := map[string][]int64{}, map[string][]int64{}
	for k, v := range want {
		if k[0] == 'a' {
			wantA[k] = v
		} else {
			wantB[k] = v
		}
	}
	testkit.WaitFor(t, time.Minute, "target B's keys delivered", func() bool { return h.Sink.Distinct() >= 500 })
	if n := accepted.Load(); n > 0 {
		t.Fatalf("target A accepted %d requests before B's keys were all delivered: B waited for A", n)
	}
	testkit.WaitFor(t, time.Minute, "every offset committed", func() bool {
		return m.Sum("orderly_committed_offset") == float64(len(recs))
	})
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(wantB); !rep.OK() {
		t.Fatalf("target B: %v", rep)
	}
	if rep := sinkA.Check(wantA); !rep.OK() || accepted.Load() != 500 {
		t.Fatalf("target A: %v; %d requests accepted for 500 messages", rep, accepted.Load())
	}
	if got := m.Sum("orderly_dlq_produced_total"); got != 0 {
		t.Fatalf("%v messages dead-lettered", got)
	}
	if got := m.Sum("orderly_http_retry_after_pauses_total"); got < 1 {
		t.Fatal("no Retry-After pause was counted")
	}
}
