package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// harness is an embedded broker, a recording sink and a way to run
// dispatchers against them, all torn down in the right order by t.Cleanup.
type harness struct {
	t      *testing.T
	broker *embedded.Broker
	sink   *testkit.Sink
	srv    *httptest.Server
	prod   *testkit.Producer
	topic  string
	parts  int
}

func newHarness(t *testing.T, partitions int) *harness {
	t.Helper()
	return newHarnessWith(t, partitions, nil)
}

type embeddedOptions = embedded.Options

// newHarnessWith is newHarness with the broker's options adjusted by tweak.
func newHarnessWith(t *testing.T, partitions int, tweak func(*embeddedOptions)) *harness {
	t.Helper()
	o := embedded.Options{
		Listen: "127.0.0.1:0", Partitions: partitions, Topics: []string{"orders", "orderly.dlq"},
		MinSessionTimeout: 500 * time.Millisecond,
	}
	if tweak != nil {
		tweak(&o)
	}
	b, err := embedded.Start(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close) // registered first: runs last, after every client closed
	h := &harness{t: t, broker: b, sink: testkit.NewSink(), topic: "orders", parts: partitions}
	h.srv = httptest.NewServer(h.sink)
	t.Cleanup(h.srv.Close)
	p, err := testkit.NewProducer(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	h.prod = p
	return h
}

// config returns a configuration for the harness, with extra TOML appended
// to the [dispatch] table (dispatch keys) and the route posting to the sink.
func (h *harness) config(group, dispatchTOML, extraTOML string) *config.Config {
	h.t.Helper()
	return h.configTo(h.srv.URL, group, dispatchTOML, extraTOML)
}

// configTo is config with the route posting to base instead of the sink.
func (h *harness) configTo(base, group, dispatchTOML, extraTOML string) *config.Config {
	h.t.Helper()
	src := fmt.Sprintf(`
[kafka]
brokers = %q
group_id = %q
topics = [%q]
[kafka.properties]
"session.timeout.ms" = 2000
"heartbeat.interval.ms" = 250
"topic.metadata.refresh.interval.ms" = 1000
[dispatch]
commit_interval = "100ms"
drain_timeout = "10s"
%s
[http]
timeout = "5s"
[http.retry]
initial_backoff = "5ms"
max_backoff = "200ms"
[admin]
listen = ""
%s
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, h.broker.Addr(), group, h.topic, dispatchTOML, extraTOML, base)
	cfg, err := config.Parse([]byte(src), "test.toml")
	if err != nil {
		h.t.Fatalf("config: %v\n%s", err, src)
	}
	return cfg
}

// run starts a dispatcher with cfg; stop (also run by t.Cleanup) ends it and
// returns Run's error.
func (h *harness) run(cfg *config.Config, tweak func(*Dispatcher)) (d *Dispatcher, m *telemetry.Metrics, stop func() error) {
	h.t.Helper()
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics)
	if err != nil {
		h.t.Fatal(err)
	}
	m = telemetry.NewMetrics()
	sender := httpclient.New(httpclient.Options{HTTP: cfg.HTTP, Version: "test", Metrics: m})
	d, err = New(Options{Config: cfg, Router: router, Sender: sender, Metrics: m, Logger: testLogger(h.t)})
	if err != nil {
		h.t.Fatal(err)
	}
	if tweak != nil {
		tweak(d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-errc:
			case <-time.After(60 * time.Second):
				runErr = fmt.Errorf("dispatcher did not stop within 60s")
			}
			sender.Close()
		})
		return runErr
	}
	h.t.Cleanup(func() { _ = stop() })
	return d, m, stop
}

// committed returns the group's committed offset and the end offset of every
// partition, read with a separate librdkafka client.
func (h *harness) committed(group string) (committed, end []int64) {
	h.t.Helper()
	committed, end, _ = h.committedMeta(group)
	return committed, end
}

// committedMeta is committed with each partition's commit metadata.
func (h *harness) committedMeta(group string) (committed, end []int64, meta []string) {
	h.t.Helper()
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": h.broker.Addr(), "group.id": group,
		"enable.metrics.push": false, "log_level": 3})
	if err != nil {
		h.t.Fatal(err)
	}
	defer c.Close()
	tps := make([]kafka.TopicPartition, h.parts)
	for i := range tps {
		tps[i] = kafka.TopicPartition{Topic: &h.topic, Partition: int32(i)}
	}
	res, err := c.Committed(tps, 10000)
	if err != nil {
		h.t.Fatal(err)
	}
	for _, tp := range res {
		committed = append(committed, int64(tp.Offset))
		md := ""
		if tp.Metadata != nil {
			md = *tp.Metadata
		}
		meta = append(meta, md)
		_, hi, err := c.QueryWatermarkOffsets(h.topic, tp.Partition, 10000)
		if err != nil {
			h.t.Fatal(err)
		}
		end = append(end, hi)
	}
	return committed, end, meta
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("ORDERLY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(&tlogWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// tlogWriter sends log lines to t.Log while the test runs.
type tlogWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		func() {
			defer func() {
				if recover() != nil { // logging after the test ended
					w.done = true
				}
			}()
			w.t.Log(strings.TrimSpace(string(p)))
		}()
	}
	return len(p), nil
}

// readAll reads every record of topic (all partitions, from the start) until
// want records arrived or timeout passed, and then a little longer to catch
// extras.
func (h *harness) readAll(topic string, want int, timeout time.Duration) []*kafka.Message {
	h.t.Helper()
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": h.broker.Addr(), "group.id": "reader-" + topic,
		"enable.auto.commit": false, "auto.offset.reset": "earliest", "enable.metrics.push": false, "log_level": 3})
	if err != nil {
		h.t.Fatal(err)
	}
	defer c.Close()
	md, err := c.GetMetadata(&topic, false, 10000)
	if err != nil {
		h.t.Fatal(err)
	}
	var tps []kafka.TopicPartition
	for _, p := range md.Topics[topic].Partitions {
		tps = append(tps, kafka.TopicPartition{Topic: &topic, Partition: p.ID, Offset: kafka.OffsetBeginning})
	}
	if err := c.Assign(tps); err != nil {
		h.t.Fatal(err)
	}
	var out []*kafka.Message
	deadline := time.Now().Add(timeout)
	var extra time.Time
	for time.Now().Before(deadline) {
		if len(out) >= want {
			if extra.IsZero() {
				extra = time.Now().Add(500 * time.Millisecond)
			} else if time.Now().After(extra) {
				break
			}
		}
		if m, ok := c.Poll(50).(*kafka.Message); ok && m.TopicPartition.Error == nil {
			out = append(out, m)
		}
	}
	return out
}

func header(m *kafka.Message, key string) (string, bool) {
	for _, h := range m.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// testutilCounter sums the series of a counter whose label has the given value.
func testutilCounter(t *testing.T, m *telemetry.Metrics, name, label, value string) float64 {
	t.Helper()
	return m.SumWhere(name, map[string]string{label: value})
}
