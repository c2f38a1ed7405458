package telemetry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	coltrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
)

const (
	trTraceID    = "4bf92f3577b34da6a3ce929d0e0e4736"
	trParentSpan = "00f067aa0ba902b7"
	trParent     = "00-" + trTraceID + "-" + trParentSpan + "-01"
)

// recordingTracing is an enabled Tracing whose spans go to a SpanRecorder.
func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func recordingTracing(t *testing.T, sampler sdktrace.Sampler) (*Tracing, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	if sampler == nil {
		sampler = sdktrace.ParentBased(sdktrace.AlwaysSample())
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec), sdktrace.WithSampler(sampler))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
	return &Tracing{Tracer: tp.Tracer(tracerName), Propagator: w3c, enabled: true, provider: tp}, rec
}

func attrMap(kvs []attribute.KeyValue) map[string]attribute.Value {
	m := make(map[string]attribute.Value, len(kvs))
	for _, kv := range kvs {
		m[string(kv.Key)] = kv.Value
	}
	return m
}

func wantAttrs(t *testing.T, what string, got []attribute.KeyValue, want map[string]any) {
	t.Helper()
	m := attrMap(got)
	for k, w := range want {
		v, ok := m[k]
		if !ok {
			t.Errorf("%s: attribute %s missing (have %v)", what, k, got)
			continue
		}
		if v.AsInterface() != w {
			t.Errorf("%s: %s = %#v, want %#v", what, k, v.AsInterface(), w)
		}
	}
}

func TestStartMessageContinuesTraceparent(t *testing.T) {
	tr, rec := recordingTracing(t, nil)
	headers := []filters.Header{
		{Key: "other", Value: []byte("x")},
		{Key: "traceparent", Value: []byte(trParent)},
		{Key: "tracestate", Value: []byte("vendor=abc")},
	}
	ctx, span := tr.StartMessage(context.Background(), "orders", 3, 42, []byte("key-7"), headers)
	if sc := trace.SpanContextFromContext(ctx); sc.SpanID() != span.SpanContext().SpanID() {
		t.Fatalf("the returned context does not hold the message span")
	}
	MessageRouted(span, "order-created")
	MessageOutcome(span, OutcomeDelivered)
	span.End()

	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans ended, want 1", len(spans))
	}
	s := spans[0]
	if s.Name() != "orders process" {
		t.Errorf("name %q", s.Name())
	}
	if s.SpanKind() != trace.SpanKindConsumer {
		t.Errorf("kind %v, want consumer", s.SpanKind())
	}
	if got := s.SpanContext().TraceID().String(); got != trTraceID {
		t.Errorf("trace id %s, want the producer's %s", got, trTraceID)
	}
	if got := s.Parent().SpanID().String(); got != trParentSpan || !s.Parent().IsRemote() {
		t.Errorf("parent %s (remote %v), want remote %s", got, s.Parent().IsRemote(), trParentSpan)
	}
	if got := s.SpanContext().TraceState().Get("vendor"); got != "abc" {
		t.Errorf("tracestate vendor=%q, want abc", got)
	}
	wantAttrs(t, "message span", s.Attributes(), map[string]any{
		"messaging.system":                   "kafka",
		"messaging.operation.type":           "process",
		"messaging.operation.name":           "process",
		"messaging.destination.name":         "orders",
		"messaging.destination.partition.id": "3",
		"messaging.kafka.offset":             int64(42),
		"messaging.kafka.message.key":        "key-7",
		"orderly.route":                      "order-created",
		"orderly.outcome":                    "delivered",
	})
}

func TestStartMessageWithoutContextIsRoot(t *testing.T) {
	tr, rec := recordingTracing(t, nil)
	_, span := tr.StartMessage(context.Background(), "orders", 0, 1, nil, nil)
	span.End()
	s := rec.Ended()[0]
	if s.Parent().IsValid() {
		t.Errorf("parent %v, want none", s.Parent())
	}
	if _, ok := attrMap(s.Attributes())["messaging.kafka.message.key"]; ok {
		t.Errorf("a message without key has messaging.kafka.message.key")
	}
	// A key that is not UTF-8 has no canonical string form: left out.
	_, span = tr.StartMessage(context.Background(), "orders", 0, 2, []byte{0xff, 0xfe}, nil)
	span.End()
	if _, ok := attrMap(rec.Ended()[1].Attributes())["messaging.kafka.message.key"]; ok {
		t.Errorf("a binary key is recorded")
	}
}

// ParentBased sampling: a producer that said "not sampled" is obeyed even
// at ratio 1, and its context still travels on.
func TestUnsampledParentIsObeyed(t *testing.T) {
	tr, rec := recordingTracing(t, sdktrace.ParentBased(sdktrace.TraceIDRatioBased(1)))
	unsampled := "00-" + trTraceID + "-" + trParentSpan + "-00"
	ctx, span := tr.StartMessage(context.Background(), "orders", 0, 1, nil,
		[]filters.Header{{Key: "traceparent", Value: []byte(unsampled)}})
	if span.IsRecording() {
		t.Errorf("the span of an unsampled parent records")
	}
	actx, as := tr.StartAttemptURL(ctx, "POST", mustURL(t, "http://h/x"), 1)
	h := http.Header{}
	tr.Inject(actx, h)
	EndAttempt(as, 200, nil)
	span.End()
	if n := len(rec.Ended()); n != 0 {
		t.Errorf("%d spans recorded, want 0", n)
	}
	tp := h.Get("traceparent")
	if !strings.HasPrefix(tp, "00-"+trTraceID+"-") || !strings.HasSuffix(tp, "-00") {
		t.Errorf("traceparent %q, want the producer's trace, not sampled", tp)
	}
}

func TestAttemptSpans(t *testing.T) {
	tr, rec := recordingTracing(t, nil)
	ctx, msg := tr.StartMessage(context.Background(), "orders", 1, 7, []byte("k"),
		[]filters.Header{{Key: "TraceParent", Value: []byte(trParent)}})

	// First attempt: 503.
	actx, a1 := tr.StartAttemptURL(ctx, "POST", mustURL(t, "http://user:pw@target.example:8081/orders/1?x=1"), 1)
	h := http.Header{}
	tr.Inject(actx, h)
	EndAttempt(a1, 503, nil)
	// Second attempt: a transport error (timeout).
	_, a2 := tr.StartAttemptURL(ctx, "POST", &url.URL{Scheme: "https", Host: "target.example", Path: "/o"}, 2)
	EndAttempt(a2, 0, &url.Error{Op: "Post", URL: "https://target.example/o", Err: context.DeadlineExceeded})
	// Third: 200.
	_, a3 := tr.StartAttemptURL(ctx, "POST", mustURL(t, "http://target.example/orders/1"), 3)
	EndAttempt(a3, 200, nil)
	// A method outside the well-known set.
	_, a4 := tr.StartAttemptURL(ctx, "PURGE", mustURL(t, "http://target.example/cache"), 1)
	EndAttempt(a4, 404, nil)
	msg.End()

	spans := rec.Ended()
	if len(spans) != 5 {
		t.Fatalf("%d spans, want 5", len(spans))
	}
	msgSpan := spans[4]
	for i, s := range spans[:4] {
		if s.SpanKind() != trace.SpanKindClient {
			t.Errorf("attempt %d: kind %v", i+1, s.SpanKind())
		}
		if s.Parent().SpanID() != msgSpan.SpanContext().SpanID() || s.SpanContext().TraceID().String() != trTraceID {
			t.Errorf("attempt %d: parent %v, want the message span %v", i+1, s.Parent().SpanID(), msgSpan.SpanContext().SpanID())
		}
	}
	s1, s2, s3, s4 := spans[0], spans[1], spans[2], spans[3]
	if s1.Name() != "POST" {
		t.Errorf("name %q, want POST", s1.Name())
	}
	wantAttrs(t, "attempt 1", s1.Attributes(), map[string]any{
		"http.request.method":       "POST",
		"url.full":                  "http://REDACTED:REDACTED@target.example:8081/orders/1?x=REDACTED",
		"server.address":            "target.example",
		"server.port":               int64(8081),
		"http.response.status_code": int64(503),
		"error.type":                "503",
	})
	if _, ok := attrMap(s1.Attributes())["http.request.resend_count"]; ok {
		t.Errorf("the first attempt has http.request.resend_count")
	}
	if s1.Status().Code != codes.Error {
		t.Errorf("503: status %v, want Error", s1.Status())
	}
	wantAttrs(t, "attempt 2", s2.Attributes(), map[string]any{
		"http.request.resend_count": int64(1),
		"server.port":               int64(443),
		"url.full":                  "https://target.example/o",
		"error.type":                "timeout",
	})
	if _, ok := attrMap(s2.Attributes())["http.response.status_code"]; ok {
		t.Errorf("a transport error has a status code")
	}
	if s2.Status().Code != codes.Error || !strings.Contains(s2.Status().Description, "deadline") {
		t.Errorf("transport error: status %v", s2.Status())
	}
	wantAttrs(t, "attempt 3", s3.Attributes(), map[string]any{
		"http.request.resend_count": int64(2),
		"http.response.status_code": int64(200),
		"server.port":               int64(80),
	})
	if s3.Status().Code != codes.Unset {
		t.Errorf("200: status %v, want Unset", s3.Status())
	}
	if s4.Name() != "HTTP" {
		t.Errorf("unknown method: name %q, want HTTP", s4.Name())
	}
	wantAttrs(t, "attempt 4", s4.Attributes(), map[string]any{
		"http.request.method":          "_OTHER",
		"http.request.method_original": "PURGE",
		"error.type":                   "404",
	})

	// The injected context names the attempt span as parent and keeps the
	// producer's trace id and tracestate-less flags.
	want := "00-" + trTraceID + "-" + s1.SpanContext().SpanID().String() + "-01"
	if got := h.Get("traceparent"); got != want {
		t.Errorf("traceparent %q, want %q", got, want)
	}
}

func TestInjectKeepsTracestate(t *testing.T) {
	tr, _ := recordingTracing(t, nil)
	ctx, span := tr.StartMessage(context.Background(), "orders", 0, 0, nil, []filters.Header{
		{Key: "traceparent", Value: []byte(trParent)}, {Key: "tracestate", Value: []byte("vendor=abc")}})
	defer span.End()
	h := http.Header{}
	tr.Inject(ctx, h)
	if got := h.Get("tracestate"); got != "vendor=abc" {
		t.Errorf("tracestate %q", got)
	}
	if h.Get("traceparent") == "" {
		t.Errorf("no traceparent")
	}
	// Nothing to inject: nothing written.
	h = http.Header{}
	tr.Inject(context.Background(), h)
	if len(h) != 0 {
		t.Errorf("injected %v from an empty context", h)
	}
}

func TestDeadLettered(t *testing.T) {
	tr, rec := recordingTracing(t, nil)
	_, span := tr.StartMessage(context.Background(), "orders", 0, 9, nil, nil)
	MessageDeadLettered(span, "non-retryable status: 422")
	span.End()
	s := rec.Ended()[0]
	if s.Status().Code != codes.Error || s.Status().Description != "non-retryable status: 422" {
		t.Errorf("status %v", s.Status())
	}
	wantAttrs(t, "dead-lettered", s.Attributes(), map[string]any{"orderly.outcome": "dead_lettered"})
	evs := s.Events()
	if len(evs) != 1 || evs[0].Name != EventDeadLettered {
		t.Fatalf("events %v", evs)
	}
	wantAttrs(t, "event", evs[0].Attributes, map[string]any{"orderly.error": "non-retryable status: 422"})
}

// Disabled (and nil) tracing: every helper is a no-op and allocates nothing;
// a traceparent in the message is passed through unchanged.
func TestDisabledIsFree(t *testing.T) {
	off, err := SetupTracing(context.Background(), config.Tracing{Enabled: false}, "orderly", "test")
	if err != nil {
		t.Fatal(err)
	}
	if off.Enabled() || off.Tracer == nil || off.Propagator == nil {
		t.Fatalf("disabled tracing: Enabled %v, Tracer %v, Propagator %v", off.Enabled(), off.Tracer, off.Propagator)
	}
	defer off.Shutdown(context.Background())
	var nilTracing *Tracing
	headers := []filters.Header{{Key: "k", Value: []byte("v")}}
	u := &url.URL{Scheme: "http", Host: "h:1", Path: "/p"}
	bg := context.Background()
	for name, tr := range map[string]*Tracing{"disabled": off, "nil": nilTracing} {
		h := http.Header{}
		allocs := testing.AllocsPerRun(200, func() {
			ctx, span := tr.StartMessage(bg, "orders", 1, 2, []byte("key"), headers)
			MessageRouted(span, "r")
			actx, as := tr.StartAttemptURL(ctx, "POST", u, 2)
			tr.Inject(actx, h)
			EndAttempt(as, 500, nil)
			MessageDeadLettered(span, "reason")
			MessageOutcome(span, OutcomeDeadLettered)
			span.End()
		})
		if allocs != 0 {
			t.Errorf("%s: %.1f allocations per message, want 0", name, allocs)
		}
		if len(h) != 0 {
			t.Errorf("%s: injected %v without any trace context", name, h)
		}
		if tr.Enabled() {
			t.Errorf("%s: Enabled", name)
		}

		// Pass-through of the producer's context.
		ctx, span := tr.StartMessage(bg, "orders", 1, 2, nil, []filters.Header{{Key: "traceparent", Value: []byte(trParent)}})
		if span.IsRecording() {
			t.Errorf("%s: recording span", name)
		}
		actx, as := tr.StartAttemptURL(ctx, "POST", u, 1)
		tr.Inject(actx, h)
		EndAttempt(as, 200, nil)
		if got := h.Get("traceparent"); got != trParent {
			t.Errorf("%s: traceparent %q, want the producer's %q passed through", name, got, trParent)
		}
		if err := tr.Shutdown(bg); err != nil {
			t.Errorf("%s: Shutdown: %v", name, err)
		}
	}
}

func TestHeaderCarrier(t *testing.T) {
	var c HeaderCarrier
	c.Set("traceparent", "a")
	c.Set("TraceParent", "b") // same key, case-insensitively
	c.Set("tracestate", "s")
	if len(c) != 2 || c.Get("TRACEPARENT") != "b" || c.Get("tracestate") != "s" || c.Get("none") != "" {
		t.Errorf("carrier %v", c)
	}
	if ks := c.Keys(); len(ks) != 2 || ks[0] != "traceparent" || ks[1] != "tracestate" {
		t.Errorf("keys %v", ks)
	}
}

func TestExporterOptions(t *testing.T) {
	for _, bad := range []string{"", "127.0.0.1:4318", "grpc://h:4317", "http://", "://x"} {
		if _, err := exporterOptions(bad); err == nil {
			t.Errorf("endpoint %q accepted", bad)
		}
		if _, err := SetupTracing(context.Background(), config.Tracing{Enabled: true, Endpoint: bad, SampleRatio: 1}, "orderly", "t"); err == nil {
			t.Errorf("SetupTracing accepted endpoint %q", bad)
		}
	}
}

// otlpReceiver is an OTLP/HTTP trace endpoint that decodes what it gets.
type otlpReceiver struct {
	mu    sync.Mutex
	paths []string
	reqs  []*coltrace.ExportTraceServiceRequest
}

func (o *otlpReceiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	req := &coltrace.ExportTraceServiceRequest{}
	err := proto.Unmarshal(b, req)
	o.mu.Lock()
	o.paths = append(o.paths, r.URL.Path)
	if err == nil {
		o.reqs = append(o.reqs, req)
	}
	o.mu.Unlock()
	if err != nil || r.Header.Get("Content-Type") != "application/x-protobuf" {
		http.Error(w, "bad export", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/x-protobuf")
	out, _ := proto.Marshal(&coltrace.ExportTraceServiceResponse{})
	_, _ = w.Write(out)
}

// SetupTracing exports over OTLP/HTTP to the endpoint's /v1/traces (or the
// given path), with the resource, and Shutdown flushes what is buffered.
func TestSetupTracingExportsOnShutdown(t *testing.T) {
	for _, tc := range []struct{ suffix, wantPath string }{{"", "/v1/traces"}, {"/custom/traces", "/custom/traces"}} {
		recv := &otlpReceiver{}
		srv := httptest.NewServer(recv)
		tr, err := SetupTracing(context.Background(), config.Tracing{Enabled: true, Endpoint: srv.URL + tc.suffix, SampleRatio: 1},
			"orderly", "1.2.3")
		if err != nil {
			t.Fatal(err)
		}
		if !tr.Enabled() {
			t.Fatal("not enabled")
		}
		ctx, span := tr.StartMessage(context.Background(), "orders", 0, 5, []byte("k"),
			[]filters.Header{{Key: "traceparent", Value: []byte(trParent)}})
		_, as := tr.StartAttemptURL(ctx, "POST", mustURL(t, "http://127.0.0.1:1/x"), 1)
		EndAttempt(as, 200, nil)
		span.End()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := tr.Shutdown(sctx); err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
		cancel()
		srv.Close()

		recv.mu.Lock()
		if len(recv.paths) == 0 || recv.paths[0] != tc.wantPath {
			t.Errorf("export paths %v, want %s", recv.paths, tc.wantPath)
		}
		var names []string
		res := map[string]string{}
		for _, r := range recv.reqs {
			for _, rs := range r.ResourceSpans {
				for _, kv := range rs.Resource.Attributes {
					res[kv.Key] = kv.Value.GetStringValue()
				}
				for _, ss := range rs.ScopeSpans {
					for _, s := range ss.Spans {
						names = append(names, s.Name)
						if got := trace.TraceID(s.TraceId).String(); got != trTraceID {
							t.Errorf("span %s: trace id %s", s.Name, got)
						}
					}
				}
			}
		}
		recv.mu.Unlock()
		if strings.Join(names, ",") != "POST,orders process" {
			t.Errorf("exported spans %v", names)
		}
		if res["service.name"] != "orderly" || res["service.version"] != "1.2.3" {
			t.Errorf("resource %v", res)
		}
	}
}

// A sample ratio of 0 records nothing new, but sampled parents still win.
func TestSetupTracingRatioZero(t *testing.T) {
	tr, err := SetupTracing(context.Background(), config.Tracing{Enabled: true, Endpoint: "http://127.0.0.1:1", SampleRatio: 0}, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // nothing was recorded; do not wait for the unreachable endpoint
		if err := tr.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("Shutdown: %v", err)
		}
	}()
	_, span := tr.StartMessage(context.Background(), "orders", 0, 0, nil, nil)
	if span.IsRecording() {
		t.Errorf("ratio 0: a root span records")
	}
	span.End()
	_, span = tr.StartMessage(context.Background(), "orders", 0, 0, nil, []filters.Header{{Key: "traceparent", Value: []byte(trParent)}})
	if !span.IsRecording() {
		t.Errorf("ratio 0: the span of a sampled parent does not record")
	}
	// Ending it would queue it for export to the unreachable endpoint;
	// shutdown is cancelled anyway.
	span.End()
}

// TestAttemptURLRedacted: query values, user info and fragments never reach
// the span.
func TestAttemptURLRedacted(t *testing.T) {
	tr, rec := recordingTracing(t, nil)
	ctx := context.Background()
	_, a1 := tr.StartAttemptURL(ctx, "POST", mustURL(t, "https://bob:s3cret@target.example/x?api_key=s3cret&flag&page=2#s3cret"), 1)
	EndAttempt(a1, 200, nil)
	_, a2 := tr.StartAttemptURL(ctx, "POST", mustURL(t, "http://target.example:8081/o?token=s3cret"), 1)
	EndAttempt(a2, 200, nil)
	spans := rec.Ended()
	if len(spans) != 2 {
		t.Fatalf("%d spans, want 2", len(spans))
	}
	for i, want := range []string{
		"https://REDACTED:REDACTED@target.example/x?api_key=REDACTED&flag&page=REDACTED",
		"http://target.example:8081/o?token=REDACTED",
	} {
		wantAttrs(t, fmt.Sprintf("attempt %d", i+1), spans[i].Attributes(), map[string]any{"url.full": want})
		for _, kv := range spans[i].Attributes() {
			if strings.Contains(kv.Value.Emit(), "s3cret") {
				t.Errorf("attempt %d: %s = %q holds the secret", i+1, kv.Key, kv.Value.Emit())
			}
		}
	}
}
