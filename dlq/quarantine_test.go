package dlq

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// TestQuarantineChangesOnlyWhatTheTopicHolds: a write the topic refuses
// changes nothing on this instance (before, the key was quarantined here
// and free everywhere else, or the other way round once the write landed
// late); once the topic takes it, the change is seen here.
func TestQuarantineChangesOnlyWhatTheTopicHolds(t *testing.T) {
	h := newHarness(t, 1)
	cfg := h.Config("qwrite", "", "")
	cfg.DLQ.QuarantineKeys = true
	q := h.quarantine(cfg)
	fh := h.Broker.Cluster().Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: QuarantineTopic(cfg),
		Err: kerr.TopicAuthorizationFailed, Count: -1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	cause := Cause{Topic: h.Topic, Partition: 0, Offset: 3}
	if err := q.Quarantine(ctx, h.Topic, []byte("k"), cause); err == nil {
		t.Fatal("a refused quarantine write reported no error")
	}
	if st, _ := q.State(h.Topic, []byte("k")); st != KeyFree {
		t.Fatalf("after a refused write: %s, want free", st)
	}
	fh.Remove()
	if err := q.Quarantine(context.Background(), h.Topic, []byte("k"), cause); err != nil {
		t.Fatal(err)
	}
	if st, c := q.State(h.Topic, []byte("k")); st != KeyQuarantined || c != cause {
		t.Fatalf("after the write: %s %v, want quarantined by %v", st, c, cause)
	}
}

// TestQuarantineReaderDoesNotGoBack: the reader, behind this instance's own
// writes, passes over the key's records older than the last of them: a key
// held then released here is never seen held again when the reader reaches
// the hold.
func TestQuarantineReaderDoesNotGoBack(t *testing.T) {
	h := newHarness(t, 1)
	cfg := h.Config("qorder", "", "")
	cfg.DLQ.QuarantineKeys = true
	q, err := NewQuarantine(context.Background(), h.Broker.Addr(), cfg, kafkatest.Logger(t), telemetry.NewMetrics())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	key := []byte("k")
	for _, write := range []func() error{
		func() error { return q.Quarantine(ctx, h.Topic, key, Cause{Topic: h.Topic}) },
		func() error { return q.Hold(ctx, h.Topic, key) },
		func() error { return q.Release(ctx, h.Topic, key) },
	} {
		if err := write(); err != nil {
			t.Fatal(err)
		}
	}
	if st, _ := q.State(h.Topic, key); st != KeyFree {
		t.Fatalf("after the release: %s", st)
	}
	changed := make(chan struct{}, 1)
	q.Wait(h.Topic, key, KeyFree, func() { changed <- struct{}{} })
	// Only now does the reader follow the topic, from behind the writes.
	rctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); q.Run(rctx) }()
	t.Cleanup(func() { stop(); <-done; q.Close() })
	if st, _ := keyState(t, q, h.Topic, "k"); st != KeyFree {
		t.Fatalf("after the reader caught up: %s, want free", st)
	}
	select {
	case <-changed:
		t.Fatal("the reader moved the key back to an older state on its way")
	default:
	}
}
