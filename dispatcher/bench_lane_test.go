package dispatcher

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/offsets"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Benchmarks of the dispatcher's hot path without Kafka or HTTP: a partition
// built directly (as the poll loop builds it on assignment), a Sender that
// succeeds at once, and messages handed over the way the poll loop hands them.

// benchNopSender succeeds at once without sending anything.
type benchNopSender struct{}

func (benchNopSender) Attempt(context.Context, *httpclient.Call) httpclient.Step {
	return httpclient.Step{Outcome: httpclient.Delivered}
}

func (benchNopSender) Send(context.Context, *filters.Request, string) (httpclient.Result, error) {
	return httpclient.Result{Status: 200, Attempts: 1}, nil
}

const benchValue = `{"key":"key-17","seq":42,"first_name":"Bonita","last_name":"Kautzer","produced_at":1700000000000000000,` +
	`"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}`

// benchPartition returns a running partition of a dispatcher whose single
// route posts the message to a templated URL, as `orderly-bench` does.
func benchPartition(b *testing.B, maxInFlight int) *partition {
	b.Helper()
	src := fmt.Sprintf(`
[kafka]
brokers = "127.0.0.1:1"
topics = ["orders"]
[dispatch]
max_in_flight = %d
[dlq]
topic = ""
[admin]
listen = ""
[[routes]]
name = "people"
  [[routes.requests]]
  method = "POST"
  url = "http://127.0.0.1:1/people/{{ .Key }}"
  [routes.requests.headers]
  Content-Type = "application/json"
`, maxInFlight)
	cfg, err := config.Parse([]byte(src), "bench.toml")
	if err != nil {
		b.Fatal(err)
	}
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics)
	if err != nil {
		b.Fatal(err)
	}
	d, err := New(Options{Config: cfg, Router: router, Sender: benchNopSender{}, Metrics: telemetry.NewMetrics()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d.ctx = ctx
	d.senders = newSenders(cfg.HTTP.MaxConnsPerHost, cfg.HTTP.AdaptiveConnsPerHost, d.metrics)
	topic := "orders"
	p := newPartition(d, kafka.TopicPartition{Topic: &topic, Partition: 0}, offsets.New(-1))
	b.Cleanup(func() {
		if !p.stop(10*time.Second, true) {
			b.Error("the partition did not drain")
		}
		d.senders.close()
		cancel()
	})
	return p
}

func benchKeys(n int) [][]byte {
	keys := make([][]byte, n)
	for i := range keys {
		keys[i] = []byte("key-" + strconv.Itoa(i))
	}
	return keys
}

// waitBelow yields until fewer than window messages are in flight.
func waitBelow(p *partition, window int) {
	for p.tracker.InFlight() >= window {
		runtime.Gosched()
	}
}

// BenchmarkLaneHandoff measures one message from partition.enqueue through
// its key lane and the target's sender pool to finish (an attempt with a
// no-op sender, offset done, outcome counted): the lane lookup or creation,
// the hand-off to a sender (a wake-up when one is idle), rendering the
// request, the idempotency key and the tracker. Messages are matched to
// their route once, outside the loop. window
// bounds the messages in flight; window=1 is a ping-pong that measures the
// wake-up latency of a sender.
func BenchmarkLaneHandoff(b *testing.B) {
	for _, bc := range []struct{ keys, window int }{{1, 1}, {1, 1000}, {100, 1000}, {10000, 10000}} {
		b.Run(fmt.Sprintf("keys=%d/window=%d", bc.keys, bc.window), func(b *testing.B) {
			p := benchPartition(b, 10000)
			keys := benchKeys(bc.keys)
			tmpl := filters.Message{Topic: "orders", Partition: 0, Key: keys[0], Value: []byte(benchValue)}
			rt, err := p.d.router.Match(&tmpl)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			var off int64
			for b.Loop() {
				waitBelow(p, bc.window)
				if _, err := p.tracker.Begin(off); err != nil {
					b.Fatal(err)
				}
				it := &item{msg: tmpl, route: rt}
				it.msg.Offset = off
				it.msg.Key = keys[off%int64(len(keys))]
				if !p.enqueue(it) {
					b.Fatal("the partition is stopping")
				}
				off++
			}
			waitBelow(p, 1)
		})
	}
}

// BenchmarkPartitionWorker measures the whole in-process path of a message:
// the poll loop's hand-off over the partition's channel, the worker's
// conversion and planning (route match, template rendering), the lane and
// finish. A *kafka.Message is allocated per message, as librdkafka's Go
// client does.
func BenchmarkPartitionWorker(b *testing.B) {
	for _, bc := range []struct{ keys, window int }{{100, 1000}, {10000, 10000}} {
		b.Run(fmt.Sprintf("keys=%d/window=%d", bc.keys, bc.window), func(b *testing.B) {
			p := benchPartition(b, 10000)
			keys := benchKeys(bc.keys)
			value := []byte(benchValue)
			topic := "orders"
			b.ReportAllocs()
			b.SetBytes(int64(len(value)))
			var off int64
			for b.Loop() {
				waitBelow(p, bc.window)
				if _, err := p.tracker.Begin(off); err != nil {
					b.Fatal(err)
				}
				p.in <- &kafka.Message{
					TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: 0, Offset: kafka.Offset(off)},
					Key:            keys[off%int64(len(keys))], Value: value,
				}
				off++
			}
			waitBelow(p, 1)
		})
	}
}

func BenchmarkIdempotencyKey(b *testing.B) {
	m := &filters.Message{Topic: "orders", Partition: 7, Offset: 123456789}
	b.ReportAllocs()
	for b.Loop() {
		_ = m.IdempotencyKey(2)
	}
}

func BenchmarkToMessage(b *testing.B) {
	topic := "orders"
	km := &kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: 3, Offset: 42},
		Key: []byte("key-17"), Value: []byte(benchValue),
		Headers: []kafka.Header{{Key: "traceparent", Value: []byte("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")}}}
	b.ReportAllocs()
	var m filters.Message
	for b.Loop() {
		toMessage(km, &m)
	}
}
