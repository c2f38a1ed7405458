package dispatcher

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// shareRecorder is the dispatcher's sender with the shares it was given.
type shareRecorder struct {
	*httpclient.Sender
	mu     sync.Mutex
	shares []float64
}

func (r *shareRecorder) SetShare(f float64) {
	r.mu.Lock()
	r.shares = append(r.shares, f)
	r.mu.Unlock()
	r.Sender.SetShare(f)
}

func (r *shareRecorder) got() []float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]float64(nil), r.shares...)
}

// recordShares is a tweak for harness.run that records the shares the
// dispatcher gives its sender.
func recordShares(rec **shareRecorder) func(*Dispatcher) {
	return func(d *Dispatcher) {
		*rec = &shareRecorder{Sender: d.sender.(*httpclient.Sender)}
		d.sender = *rec
	}
}

// TestTargetRateLimit: a named target with rate 100 (burst 100) and 300
// messages on 4 partitions, one instance (share 1): everything is
// delivered in order, nothing dead-lettered, and it takes at least the
// 2 s the rate asks for the 200 messages beyond the burst. Only a lower
// bound: rate limiting can only make delivery slower; its accuracy is
// httpclient's BenchmarkRateAccuracy.
func TestTargetRateLimit(t *testing.T) {
	h := newHarness(t, 4)
	const n = 300
	gen := &testkit.Generator{Keys: 40}
	if err := h.Prod.Produce(context.Background(), h.Topic, gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	cfg := h.Config("ratelimit", "", "")
	cfg.Targets = []config.Target{{Name: "sink", BaseURL: h.Srv.URL, Rate: 100}}
	rq := &cfg.Routes[0].Requests[0]
	rq.URL, rq.Target, rq.Path = "", "sink", "/people/{{ .Key }}"
	var rec *shareRecorder
	start := time.Now() // before the bucket exists: it starts full
	_, m, stop := h.run(cfg, recordShares(&rec))
	testkit.WaitFor(t, time.Minute, "all messages finished", func() bool {
		return m.Sum("orderly_committed_offset") == n
	})
	elapsed := time.Since(start)
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if rep := h.Sink.Check(gen.Expected()); !rep.OK() {
		t.Fatal(rep)
	}
	if got := m.Sum("orderly_dlq_produced_total"); got != 0 {
		t.Fatalf("%v messages dead-lettered", got)
	}
	if elapsed < 1900*time.Millisecond {
		t.Fatalf("%d messages at rate 100 (burst 100) took %v, want at least 2s", n, elapsed)
	}
	if got := testutilCounter(t, m, "orderly_target_rate_limited_total", "target", "sink"); got < 1 {
		t.Fatal("no wait for the rate limiter was counted")
	}
	if shares := rec.got(); len(shares) == 0 || shares[0] != 1 {
		t.Fatalf("shares given to the sender: %v, want 1 (the only instance owns every partition)", shares)
	}
	t.Logf("%d messages in %v; %d requests; %v waits for the rate", n, elapsed.Round(time.Millisecond),
		h.Sink.Requests(), testutilCounter(t, m, "orderly_target_rate_limited_total", "target", "sink"))
}
