package httpclient

import (
	"bytes"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/telemetry"
)

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a slog
// handler and the test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// lines returns the lines written so far that contain every one of substr.
func (b *syncBuffer) lines(substr ...string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
next:
	for _, l := range strings.Split(b.b.String(), "\n") {
		if l == "" {
			continue
		}
		for _, s := range substr {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

// TestFailingTargetIsSummarized: while a target refuses connections (a
// listener that was closed), its failures are summarized at warn, at most
// once per interval: host, the last error, how many calls wait for it and
// for how long it has been failing. Once it answers, the calls delivered
// leave its waiting calls.
func TestFailingTargetIsSummarized(t *testing.T) {
	addr, serve := closedAddr(t)
	h := breakerHTTP(20 * time.Millisecond)
	h.Breaker.ConsecutiveFailures = 2
	h.Retry.MaxAttempts = 0
	buf := &syncBuffer{}
	s := New(Options{HTTP: h, Version: "9.9.9", Metrics: telemetry.NewMetrics(),
		Logger: slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	t.Cleanup(s.Close)
	const every = 300 * time.Millisecond
	s.failingEvery = every // before the first attempt

	start := time.Now()
	x := drive(t, s, post("http://"+addr+"/orders", []byte("x")))
	y := drive(t, s, post("http://"+addr+"/orders", []byte("y")))
	summary := []string{"level=WARN", `msg="target still failing`, "host=" + addr,
		"connection refused", "waiting_calls=2", "failing_for="}
	waitFor(t, 20*time.Second, "a summary naming the host, the error and 2 waiting calls", func() bool {
		x.running(t, "x")
		y.running(t, "y")
		return len(buf.lines(summary...)) >= 2
	})
	elapsed := time.Since(start)
	t.Logf("summary: %s", buf.lines(summary...)[0])
	if l := buf.lines(summary...)[1]; strings.Contains(l, "failing_for=0s") {
		t.Fatalf("the second summary says failing_for=0s: %s", l)
	}
	first := buf.lines("target failing", "host="+addr, "http://"+addr+"/orders", "connection refused")
	if len(first) != 1 {
		t.Fatalf("%d 'target failing' lines, want 1:\n%s", len(first), strings.Join(buf.lines(), "\n"))
	}
	// The first line and the summaries share one interval per target.
	logged := len(first) + len(buf.lines("target still failing"))
	if most := int(elapsed/every) + 1; logged > most {
		t.Fatalf("%d lines about the failing target in %s, want at most %d (one per %s):\n%s",
			logged, elapsed, most, every, strings.Join(buf.lines("failing"), "\n"))
	}

	serve(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	x.delivered(t, "x")
	y.delivered(t, "y")
	s.mu.RLock()
	tg := s.targets[addr]
	s.mu.RUnlock()
	if _, since, waiting := tg.failingSummary(time.Now()); waiting != 0 || !since.IsZero() {
		t.Fatalf("after delivery: %d waiting calls, failing since %v; want none, not failing", waiting, since)
	}
}
