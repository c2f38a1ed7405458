// Package kafkatest runs tests against the embedded Kafka-protocol broker:
// a broker, a recording HTTP sink, a producer, a configuration pointing at
// them, and readers of topics and committed offsets. It imports testing:
// tests only.
package kafkatest

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// Harness is an embedded broker with the topics "orders" (Topic) and
// "orderly.dlq", a recording sink behind an HTTP server and a producer, all
// torn down in the right order by t.Cleanup.
type Harness struct {
	T      *testing.T
	Broker *embedded.Broker
	Sink   *testkit.Sink
	Srv    *httptest.Server
	Prod   *testkit.Producer
	Topic  string
	Parts  int
}

// New starts a Harness whose topics have partitions partitions, with the
// broker's options adjusted by tweak (nil: none).
func New(t *testing.T, partitions int, tweak func(*embedded.Options)) *Harness {
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
	h := &Harness{T: t, Broker: b, Sink: testkit.NewSink(), Topic: "orders", Parts: partitions}
	// Every request takes a random extra 0-1 ms, so that keys overtake each
	// other and the sink's per-key order and concurrency checks bite.
	h.Sink.Jitter, h.Sink.JitterSeed = time.Millisecond, Seed(t, "ORDERLY_TEST_SEED")
	h.Srv = httptest.NewServer(h.Sink)
	t.Cleanup(h.Srv.Close)
	p, err := testkit.NewProducer(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	h.Prod = p
	return h
}

// Config returns a configuration for the harness: group, dispatchTOML
// appended to the [dispatch] table, extraTOML after the [admin] table, and a
// route "people" posting to the sink.
func (h *Harness) Config(group, dispatchTOML, extraTOML string) *config.Config {
	h.T.Helper()
	return h.ConfigTo(h.Srv.URL, group, dispatchTOML, extraTOML)
}

// ConfigTo is Config with the route posting to base instead of the sink.
func (h *Harness) ConfigTo(base, group, dispatchTOML, extraTOML string) *config.Config {
	h.T.Helper()
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
`, h.Broker.Addr(), group, h.Topic, dispatchTOML, extraTOML, base)
	cfg, err := config.Parse([]byte(src), "test.toml")
	if err != nil {
		h.T.Fatalf("config: %v\n%s", err, src)
	}
	return cfg
}

// Committed returns the group's committed offset and the end offset of every
// partition, read with a separate librdkafka client.
func (h *Harness) Committed(group string) (committed, end []int64) {
	h.T.Helper()
	committed, end, _ = h.CommittedMeta(group)
	return committed, end
}

// CommittedMeta is Committed with each partition's commit metadata.
func (h *Harness) CommittedMeta(group string) (committed, end []int64, meta []string) {
	h.T.Helper()
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": h.Broker.Addr(), "group.id": group,
		"enable.metrics.push": false, "log_level": 3})
	if err != nil {
		h.T.Fatal(err)
	}
	defer c.Close()
	tps := make([]kafka.TopicPartition, h.Parts)
	for i := range tps {
		tps[i] = kafka.TopicPartition{Topic: &h.Topic, Partition: int32(i)}
	}
	res, err := c.Committed(tps, 10000)
	if err != nil {
		h.T.Fatal(err)
	}
	for _, tp := range res {
		committed = append(committed, int64(tp.Offset))
		md := ""
		if tp.Metadata != nil {
			md = *tp.Metadata
		}
		meta = append(meta, md)
		_, hi, err := c.QueryWatermarkOffsets(h.Topic, tp.Partition, 10000)
		if err != nil {
			h.T.Fatal(err)
		}
		end = append(end, hi)
	}
	return committed, end, meta
}

// Seed returns the seed named by the environment variable env, or one from
// the clock, and logs it so that a failing run can be repeated.
func Seed(t testing.TB, env string) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(env); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", env, v, err)
		}
		seed = n
	}
	t.Logf("random seed %d (repeat with %s=%d)", seed, env, seed)
	return seed
}

// Logger logs to t at warn level, or to stderr at debug level when
// ORDERLY_TEST_LOG is set.
func Logger(t *testing.T) *slog.Logger {
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

// ReadAll reads every record of topic (all partitions, from the start) until
// want records arrived or timeout passed, and then a little longer to catch
// extras.
func (h *Harness) ReadAll(topic string, want int, timeout time.Duration) []*kafka.Message {
	h.T.Helper()
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": h.Broker.Addr(), "group.id": "reader-" + topic,
		"enable.auto.commit": false, "auto.offset.reset": "earliest", "enable.metrics.push": false, "log_level": 3})
	if err != nil {
		h.T.Fatal(err)
	}
	defer c.Close()
	md, err := c.GetMetadata(&topic, false, 10000)
	if err != nil {
		h.T.Fatal(err)
	}
	var tps []kafka.TopicPartition
	for _, p := range md.Topics[topic].Partitions {
		tps = append(tps, kafka.TopicPartition{Topic: &topic, Partition: p.ID, Offset: kafka.OffsetBeginning})
	}
	if err := c.Assign(tps); err != nil {
		h.T.Fatal(err)
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

// Header returns the value of m's header key.
func Header(m *kafka.Message, key string) (string, bool) {
	for _, h := range m.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}
