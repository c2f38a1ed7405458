package dispatcher

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

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
