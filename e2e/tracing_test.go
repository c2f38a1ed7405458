package e2e

// Tracing end to end against a real Jaeger all-in-one (v1.57.0, built from
// the Go module proxy by scripts/jaeger/build.sh into bin/jaeger-all-in-one).
//
//   - export: telemetry.SetupTracing exports over OTLP/HTTP to Jaeger; the
//     message span continues the producer's traceparent and the attempt span
//     is its child, as Jaeger's query API reports them.
//   - pipeline: the real service (embedded broker, dispatcher, sender) with
//     tracing.enabled = true: a message produced with a traceparent reaches
//     the sink with a traceparent of the same trace, and Jaeger holds the
//     consumer span "orders process" (service orderly) under the producer's
//     span with at least one HTTP client span under it, and the PRODUCER
//     span of its topic request's record, whose traceparent names it.
//
// Without the Jaeger binary the test skips, unless ORDERLY_E2E=1 (CI), which
// makes it fail. Everything here is prefixed "tr" to stay out of the way of
// the package's other tests.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/service"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// trJaegerBinary finds bin/jaeger-all-in-one (or $ORDERLY_JAEGER_BIN).
func trJaegerBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("ORDERLY_JAEGER_BIN")
	if bin == "" {
		abs, err := filepath.Abs(filepath.Join("..", "bin", "jaeger-all-in-one"))
		if err != nil {
			t.Fatal(err)
		}
		bin = abs
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		skipMissing(t, "Jaeger all-in-one is not at "+bin,
			"build it with scripts/jaeger/build.sh (or point $ORDERLY_JAEGER_BIN at one) to run this test")
	}
	return bin
}

// trFreePort returns a 127.0.0.1 address whose port was free a moment ago.
func trFreePort(t *testing.T, network string) string {
	t.Helper()
	if network == "udp" {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.LocalAddr().String()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// trJaeger is a running Jaeger all-in-one.
type trJaeger struct {
	otlpHTTP string // host:port of the OTLP/HTTP receiver
	query    string // base URL of the query API
	logPath  string
}

// trStartJaeger starts Jaeger with in-memory storage and every listener on a
// free 127.0.0.1 port, and waits until its query API answers and its OTLP
// receiver accepts connections. It is stopped when the test ends.
func trStartJaeger(t *testing.T, bin string) *trJaeger {
	t.Helper()
	tcp := func() string { return trFreePort(t, "tcp") }
	udp := func() string { return trFreePort(t, "udp") }
	otlpHTTP, otlpGRPC, queryHTTP, admin, collectorGRPC := tcp(), tcp(), tcp(), tcp(), tcp()
	args := []string{
		"--collector.otlp.enabled=true",
		"--collector.otlp.http.host-port=" + otlpHTTP,
		"--collector.otlp.grpc.host-port=" + otlpGRPC,
		"--collector.grpc-server.host-port=" + collectorGRPC,
		"--collector.http-server.host-port=" + tcp(),
		"--collector.zipkin.host-port=", // off
		"--query.http-server.host-port=" + queryHTTP,
		"--query.grpc-server.host-port=" + tcp(),
		"--admin.http.host-port=" + admin,
		// The embedded agent: sampling HTTP server, UDP processors, and its
		// reporter pointed at this collector.
		"--http-server.host-port=" + tcp(),
		"--processor.jaeger-binary.server-host-port=" + udp(),
		"--processor.jaeger-compact.server-host-port=" + udp(),
		"--processor.zipkin-compact.server-host-port=" + udp(),
		"--reporter.grpc.host-port=" + collectorGRPC,
		"--memory.max-traces=10000",
	}
	logPath := filepath.Join(t.TempDir(), "jaeger.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "SPAN_STORAGE_TYPE=memory",
		// Jaeger's own tracer exports to localhost:4317 by default: keep it
		// off, and pointed at this instance, so that it neither reaches
		// another collector nor stalls shutdown retrying a closed port.
		"OTEL_TRACES_SAMPLER=always_off", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://"+otlpGRPC)
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start Jaeger: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); logf.Close() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("Jaeger log (tail):\n%s", trTail(logPath, 40))
		}
	})

	j := &trJaeger{otlpHTTP: otlpHTTP, query: "http://" + queryHTTP, logPath: logPath}
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case err := <-exited:
			exited <- err // for the cleanup
			t.Fatalf("Jaeger exited at start-up (%v):\n%s", err, trTail(logPath, 40))
		default:
		}
		if trGetOK(j.query+"/api/services") && trDialOK(otlpHTTP) {
			return j
		}
		if time.Now().After(deadline) {
			t.Fatalf("Jaeger not ready after 60s:\n%s", trTail(logPath, 40))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func trGetOK(u string) bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(u)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func trDialOK(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func trTail(path string, lines int) string {
	b, _ := os.ReadFile(path)
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

// Jaeger query API (v1 JSON, GET /api/traces/{id}).
type trTraceResponse struct {
	Data []trTrace `json:"data"`
}

type trTrace struct {
	TraceID   string               `json:"traceID"`
	Spans     []trSpan             `json:"spans"`
	Processes map[string]trProcess `json:"processes"`
}

type trSpan struct {
	TraceID       string  `json:"traceID"`
	SpanID        string  `json:"spanID"`
	OperationName string  `json:"operationName"`
	References    []trRef `json:"references"`
	Tags          []trTag `json:"tags"`
	ProcessID     string  `json:"processID"`
}

type trRef struct {
	RefType string `json:"refType"`
	TraceID string `json:"traceID"`
	SpanID  string `json:"spanID"`
}

type trTag struct {
	Key   string `json:"key"`
	Type  string `json:"type"`
	Value any    `json:"value"`
}

type trProcess struct {
	ServiceName string  `json:"serviceName"`
	Tags        []trTag `json:"tags"`
}

func (s trSpan) tag(key string) string {
	for _, tg := range s.Tags {
		if tg.Key == key {
			return fmt.Sprint(tg.Value)
		}
	}
	return ""
}

func (s trSpan) parent() string {
	for _, r := range s.References {
		if r.RefType == "CHILD_OF" {
			return r.SpanID
		}
	}
	return ""
}

// trWantTrace polls Jaeger for traceID until check accepts the trace,
// failing with the last complaint after timeout.
func trWantTrace(t *testing.T, j *trJaeger, traceID string, timeout time.Duration, check func(tr *trTrace) error) *trTrace {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := "no answer yet"
	c := http.Client{Timeout: 2 * time.Second}
	for {
		resp, err := c.Get(j.query + "/api/traces/" + traceID)
		if err != nil {
			last = err.Error()
		} else {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var tr trTraceResponse
			switch {
			case resp.StatusCode != http.StatusOK:
				last = fmt.Sprintf("status %d: %s", resp.StatusCode, bytes.TrimSpace(body))
			case json.Unmarshal(body, &tr) != nil || len(tr.Data) == 0:
				last = "no trace in: " + string(body)
			default:
				if err := check(&tr.Data[0]); err != nil {
					last = err.Error()
				} else {
					return &tr.Data[0]
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("trace %s not as expected in Jaeger after %s: %s", traceID, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// trCheckMessageTrace finds, in a trace, the consumer span "<topic> process"
// of service orderly whose parent is producerSpan, and the client spans under
// it; it complains unless there is at least one.
func trCheckMessageTrace(tr *trTrace, topic, producerSpan string) (proc trSpan, clients []trSpan, err error) {
	var found bool
	for _, s := range tr.Spans {
		if s.tag("span.kind") == "consumer" && s.OperationName == topic+" process" {
			proc, found = s, true
		}
	}
	if !found {
		names := make([]string, len(tr.Spans))
		for i, s := range tr.Spans {
			names[i] = s.OperationName + "/" + s.tag("span.kind")
		}
		return proc, nil, fmt.Errorf("no consumer span %q among %v", topic+" process", names)
	}
	if svc := tr.Processes[proc.ProcessID].ServiceName; svc != "orderly" {
		return proc, nil, fmt.Errorf("process span of service %q, want orderly", svc)
	}
	if p := proc.parent(); p != producerSpan {
		return proc, nil, fmt.Errorf("process span's parent %q, want the producer's span %s", p, producerSpan)
	}
	for _, s := range tr.Spans {
		if s.tag("span.kind") == "client" && s.parent() == proc.SpanID {
			clients = append(clients, s)
		}
	}
	if len(clients) == 0 {
		return proc, nil, fmt.Errorf("no client span under the process span %s (%d spans in the trace)", proc.SpanID, len(tr.Spans))
	}
	return proc, clients, nil
}

func trWantTags(t *testing.T, what string, s trSpan, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got := s.tag(k); got != v {
			t.Errorf("%s: tag %s = %q, want %q (tags %v)", what, k, got, v, s.Tags)
		}
	}
}

func TestTracingJaeger(t *testing.T) {
	if testing.Short() {
		t.Skip("starts Jaeger and an embedded broker")
	}
	j := trStartJaeger(t, trJaegerBinary(t))
	t.Run("export", func(t *testing.T) { trTestExport(t, j) })
	t.Run("pipeline", func(t *testing.T) { trTestPipeline(t, j) })
}

// trTestExport drives the tracing helpers by hand, as the dispatcher and the
// sender use them, and finds the result in Jaeger.
func trTestExport(t *testing.T, j *trJaeger) {
	const (
		traceID      = "0af7651916cd43dd8448eb211c80319c"
		producerSpan = "b7ad6b7169203331"
	)
	var gotParent sync.Map
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotParent.Store("traceparent", r.Header.Get("traceparent"))
		w.WriteHeader(http.StatusNoContent)
	}))
	defer target.Close()

	ctx := context.Background()
	tr, err := telemetry.SetupTracing(ctx, config.Tracing{Enabled: true, Endpoint: "http://" + j.otlpHTTP, SampleRatio: 1},
		"orderly", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	mctx, span := tr.StartMessage(ctx, "orders", 2, 17, []byte("key-1"),
		[]filters.Header{{Key: "traceparent", Value: []byte("00-" + traceID + "-" + producerSpan + "-01")}})
	telemetry.MessageRouted(span, "people")
	req, _ := http.NewRequest(http.MethodPost, target.URL+"/people/key-1", strings.NewReader("{}"))
	actx, attempt := tr.StartAttemptURL(mctx, http.MethodPost, req.URL, 1)
	req = req.WithContext(actx)
	tr.Inject(actx, req.Header)
	resp, err := http.DefaultClient.Do(req)
	status := 0
	if err == nil {
		status = resp.StatusCode
		resp.Body.Close()
	}
	telemetry.EndAttempt(attempt, status, err)
	telemetry.MessageOutcome(span, telemetry.OutcomeDelivered)
	span.End()
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := tr.Shutdown(sctx); err != nil {
		t.Fatalf("Shutdown (flush to Jaeger): %v", err)
	}

	sent, _ := gotParent.Load("traceparent")
	if s, _ := sent.(string); !strings.HasPrefix(s, "00-"+traceID+"-") {
		t.Fatalf("target saw traceparent %q, want trace %s", s, traceID)
	}
	var proc trSpan
	var clients []trSpan
	trWantTrace(t, j, traceID, 30*time.Second, func(tt *trTrace) error {
		var err error
		proc, clients, err = trCheckMessageTrace(tt, "orders", producerSpan)
		return err
	})
	trWantTags(t, "process span", proc, map[string]string{
		"messaging.system":                   "kafka",
		"messaging.destination.name":         "orders",
		"messaging.destination.partition.id": "2",
		"messaging.kafka.offset":             "17",
		"messaging.kafka.message.key":        "key-1",
		"messaging.operation.type":           "process",
		"orderly.route":                      "people",
		"orderly.outcome":                    "delivered",
	})
	trWantTags(t, "client span", clients[0], map[string]string{
		"http.request.method":       "POST",
		"http.response.status_code": "204",
		"url.full":                  target.URL + "/people/key-1",
		"server.address":            "127.0.0.1",
	})
	if s, _ := sent.(string); s != "00-"+traceID+"-"+clients[0].SpanID+"-01" {
		t.Errorf("target saw traceparent %q, want the client span %s as parent", s, clients[0].SpanID)
	}
}

// trTestPipeline runs the service as `orderly run` does, with tracing on.
func trTestPipeline(t *testing.T, j *trJaeger) {
	const (
		traceID      = "4bf92f3577b34da6a3ce929d0e0e4736"
		producerSpan = "00f067aa0ba902b7"
	)
	sink := testkit.NewSink()
	var mu sync.Mutex
	var parents []string
	sink.Observe = func(d *testkit.Delivery, r *http.Request) {
		mu.Lock()
		parents = append(parents, r.Header.Get("traceparent"))
		mu.Unlock()
	}
	srv := httptest.NewServer(sink)
	defer srv.Close()

	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
brokers = "embedded"
group_id = "tracing-e2e"
topics = ["orders"]
embedded_listen = "127.0.0.1:0"
embedded_partitions = 1
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
drain_timeout = "5s"
[admin]
listen = ""
[tracing]
enabled = true
endpoint = "http://%s"
sample_ratio = 1.0
[[routes]]
name = "people"
  [[routes.requests]]
  method = "POST"
  url = "%s/people/{{ .Key }}"
  [routes.requests.headers]
  Content-Type = "application/json"
  [[routes.requests]]
  topic = "orders_announced"
  value = '{"key": {{ json .Key }}}'
`, j.otlpHTTP, srv.URL)), "tracing-e2e.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler), "e2e")
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			svc.Close()
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- svc.Run(ctx) }()
	stop := func() {
		cancel()
		select {
		case err := <-runErr:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("the service did not stop within 30s")
		}
		svc.Close() // flushes the spans (tracing shutdown)
		closed = true
	}

	prod, err := testkit.NewProducer(svc.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	value, _ := json.Marshal(testkit.Event{Key: "key-1", Seq: 0, FirstName: "Mei", LastName: "Tanaka"})
	pctx, pcancel := context.WithTimeout(context.Background(), 20*time.Second)
	err = prod.Produce(pctx, "orders", []testkit.Record{{Key: []byte("key-1"), Value: value, Headers: []kafka.Header{
		{Key: "traceparent", Value: []byte("00-" + traceID + "-" + producerSpan + "-01")},
	}}})
	pcancel()
	prod.Close()
	if err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "the message at the sink", func() bool { return sink.Delivered() >= 1 })
	announced := trReadOne(t, svc.Brokers(), "orders_announced")
	stop()

	mu.Lock()
	got := parents[len(parents)-1]
	mu.Unlock()
	if got == "" {
		t.Fatal("the delivered request carries no traceparent")
	}
	if !strings.HasPrefix(got, "00-"+traceID+"-") {
		t.Fatalf("the sink saw traceparent %q, want trace %s continued", got, traceID)
	}

	var proc trSpan
	var clients []trSpan
	trWantTrace(t, j, traceID, 30*time.Second, func(tt *trTrace) error {
		var err error
		proc, clients, err = trCheckMessageTrace(tt, "orders", producerSpan)
		return err
	})
	trWantTags(t, "process span", proc, map[string]string{
		"messaging.system":            "kafka",
		"messaging.destination.name":  "orders",
		"messaging.kafka.message.key": "key-1",
	})
	var sentBy *trSpan
	for i := range clients {
		if got == "00-"+traceID+"-"+clients[i].SpanID+"-01" {
			sentBy = &clients[i]
		}
	}
	if sentBy == nil {
		t.Fatalf("the sink's traceparent %q names no client span under the process span (%d client spans)", got, len(clients))
	}
	trWantTags(t, "client span", *sentBy, map[string]string{
		"http.request.method":       "POST",
		"http.response.status_code": "200",
		"url.full":                  srv.URL + "/people/key-1",
	})

	// The topic request's record: a PRODUCER span under the process span,
	// whose context the record carries.
	var publish *trSpan
	trWantTrace(t, j, traceID, 30*time.Second, func(tt *trTrace) error {
		for i, s := range tt.Spans {
			if s.tag("span.kind") == "producer" && s.parent() == proc.SpanID {
				publish = &tt.Spans[i]
				return nil
			}
		}
		return fmt.Errorf("no producer span under the process span %s (%d spans)", proc.SpanID, len(tt.Spans))
	})
	if publish.OperationName != "orders_announced publish" {
		t.Errorf("producer span %q, want %q", publish.OperationName, "orders_announced publish")
	}
	trWantTags(t, "producer span", *publish, map[string]string{
		"messaging.system":           "kafka",
		"messaging.destination.name": "orders_announced",
		"messaging.operation.type":   "send",
	})
	var recParent string
	for _, h := range announced.Headers {
		if h.Key == "traceparent" {
			recParent = string(h.Value)
		}
	}
	if want := "00-" + traceID + "-" + publish.SpanID + "-01"; recParent != want {
		t.Errorf("the record's traceparent %q, want %q (the producer span)", recParent, want)
	}
}

// trReadOne reads the first record of topic (partition 0) from brokers.
func trReadOne(t *testing.T, brokers, topic string) *kafka.Message {
	t.Helper()
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": brokers, "group.id": "tr-reader",
		"enable.auto.commit": false, "enable.metrics.push": false, "log_level": 3})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Assign([]kafka.TopicPartition{{Topic: &topic, Partition: 0, Offset: kafka.OffsetBeginning}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if m, ok := c.Poll(100).(*kafka.Message); ok && m.TopicPartition.Error == nil {
			return m
		}
	}
	t.Fatalf("no record in %s within 30s", topic)
	return nil
}
