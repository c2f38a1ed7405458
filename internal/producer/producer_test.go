package producer_test

import (
	"context"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// startBroker starts an embedded broker with the topic "out", and returns
// its address and a channel for librdkafka's logs, drained until the test
// ends.
func startBroker(t *testing.T) (string, chan kafka.LogEvent) {
	t.Helper()
	b, err := embedded.Start(embedded.Options{Listen: "127.0.0.1:0", Partitions: 1, Topics: []string{"out"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	logs := make(chan kafka.LogEvent, 64)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case _, ok := <-logs:
				if !ok {
					return // closed by the test
				}
			case <-done:
				return
			}
		}
	}()
	t.Cleanup(func() { close(done) })
	return b.Addr(), logs
}

// TestProducerRecoversFromFatalError: after a fatal error of its librdkafka
// producer (raised with rd_kafka_test_fatal_error, against the embedded
// broker), which writes nothing more, the Producer starts a new one: every
// record produced around the error is reported (delivered or failed, never
// lost, the purged ones included), later records are delivered, the
// restart is counted, and Close returns.
func TestProducerRecoversFromFatalError(t *testing.T) {
	addr, logs := startBroker(t)
	// No linger: many records in flight when the error comes.
	m := telemetry.NewMetrics()
	pr, err := producer.New(addr, "orderly-test", nil, kafka.ConfigMap{"linger.ms": 0}, kafkatest.Logger(t), logs, m)
	if err != nil {
		t.Fatal(err)
	}
	topic := "out"
	write := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := pr.Write(ctx, &kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny},
			Value: []byte("v")})
		return err
	}
	if err := write(); err != nil {
		t.Fatalf("before the fatal error: %v", err)
	}
	// Records in flight when the error comes: each one is reported, as
	// delivered or failed (the purged ones), none is left waiting.
	const n = 20000
	var reported, failed atomic.Int64
	for i := range n {
		if i == n/2 {
			if code := pr.TestFatalError(kafka.ErrOutOfOrderSequenceNumber, "test"); code != kafka.ErrNoError {
				t.Fatalf("raising the fatal error: %v", code)
			}
		}
		pr.Produce(&kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny},
			Value: []byte("around")}, func(err error) {
			if err != nil {
				failed.Add(1)
			}
			reported.Add(1)
		})
	}
	testkit.WaitFor(t, 30*time.Second, "every record produced around the fatal error reported", func() bool { return reported.Load() == n })
	t.Logf("%d of the %d records produced around the fatal error failed", failed.Load(), n)
	testkit.WaitFor(t, 30*time.Second, "a write after the fatal error to succeed", func() bool { return write() == nil })
	if n := m.Sum("orderly_producer_restarts_total"); n != 1 {
		t.Fatalf("orderly_producer_restarts_total %v, want 1", n)
	}
	done := make(chan struct{})
	go func() { pr.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return")
	}
	close(logs)
}

// TestProducerHeapIsSmall: a Producer keeps little Go heap. With
// confluent-kafka-go's channel defaults each librdkafka producer held 24 MB
// (a million-slot events channel and produce channel), which every GC
// scanned, in every Orderly process (the DLQ writer and the job store).
func TestProducerHeapIsSmall(t *testing.T) {
	addr, logs := startBroker(t)
	heap := func() uint64 {
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	pr, err := producer.New(addr, "orderly-test", nil, nil, kafkatest.Logger(t), logs, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	if after := heap(); after > before+4<<20 {
		t.Errorf("a Producer holds %d MB of heap, want under 4", (after-before)>>20)
	}
}
