package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
)

// Span names and attributes of Orderly's own (outside the conventions).
const (
	// AttrRoute is the name of the route that took the message.
	AttrRoute = attribute.Key("orderly.route")
	// AttrOutcome is the message's outcome (one of the Outcome* constants).
	AttrOutcome = attribute.Key("orderly.outcome")
	// AttrError is the reason a message was dead-lettered.
	AttrError = attribute.Key("orderly.error")
	// EventDeadLettered is the span event added by MessageDeadLettered.
	EventDeadLettered = "orderly.dead_lettered"

	tracerName = "github.com/orderly-dispatch/orderly"
)

// Tracing is the process's tracing setup: one span per Kafka message and one
// client span per HTTP attempt. Build it with SetupTracing and call Shutdown
// before exiting. A nil *Tracing behaves like a disabled one. It is safe for
// concurrent use.
//
// Span model (semantic conventions v1.43.0, go.opentelemetry.io/otel/semconv/v1.43.0):
//
//   - "<topic> process", kind CONSUMER, started by StartMessage when the
//     partition worker takes a message and ended by the dispatcher when the
//     message is finished (delivered, skipped, dead-lettered or abandoned).
//     Its parent is the W3C trace context found in the message's Kafka
//     headers (traceparent/tracestate), if any; otherwise it is a root.
//     Attributes: messaging.system=kafka, messaging.operation.type=process,
//     messaging.operation.name=process, messaging.destination.name=<topic>,
//     messaging.destination.partition.id=<partition> (a string, as the
//     convention says), messaging.kafka.offset=<offset> (the v1.27+ name;
//     older conventions called it messaging.kafka.message.offset), and
//     messaging.kafka.message.key=<key> when the key is present and valid
//     UTF-8. MessageRouted adds orderly.route; MessageOutcome adds
//     orderly.outcome; MessageDeadLettered adds orderly.outcome=dead_lettered,
//     an "orderly.dead_lettered" event with orderly.error=<reason> and an
//     Error status.
//   - "<METHOD>", kind CLIENT, one per HTTP attempt (StartAttemptURL, ended by
//     EndAttempt), a child of the message span. Attributes:
//     http.request.method (or _OTHER plus http.request.method_original),
//     url.full (user info and query values redacted: an API key in a
//     query must not reach the tracing backend; no fragment),
//     server.address, server.port,
//     http.request.resend_count (attempt-1, from the second attempt on),
//     http.response.status_code, and error.type on failure. Status is Error
//     for a transport error and for any status >= 400 (the convention for
//     CLIENT spans: for Orderly a 4xx is a failed delivery).
//
// The context injected into outgoing requests is the attempt span's, so the
// target's server span is a child of the attempt that reached it.
//
// Sampling is ParentBased(TraceIDRatioBased(tracing.sample_ratio)): a message
// whose traceparent says "sampled" is always traced, one that says "not
// sampled" never is, and messages without trace context are sampled at
// sample_ratio.
//
// When tracing is disabled (or the *Tracing is nil) every helper is a no-op
// that allocates nothing, with one deliberate exception: a message that
// carries a traceparent header still has it passed through, so that
// downstream services see the producer's trace context continued (the
// outgoing traceparent then names the producer's span as parent). Only
// messages with that header pay for parsing it.
type Tracing struct {
	// Tracer starts spans; a no-op tracer when tracing is disabled.
	Tracer trace.Tracer
	// Propagator is W3C tracecontext + baggage.
	Propagator propagation.TextMapPropagator

	enabled  bool
	provider *sdktrace.TracerProvider // nil when disabled
}

// w3c is the propagator of every Tracing (and of a nil one).
var w3c propagation.TextMapPropagator = propagation.NewCompositeTextMapPropagator(
	propagation.TraceContext{}, propagation.Baggage{})

// SetupTracing returns the tracing c asks for. Disabled, it returns a no-op
// Tracing at once. Enabled, it builds an OTLP/HTTP exporter to c.Endpoint
// (http:// means plain HTTP; the path defaults to /v1/traces), a batch span
// processor, the ParentBased(TraceIDRatioBased(c.SampleRatio)) sampler and a
// resource with service.name=serviceName ("orderly" if empty; the standard
// OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES variables override it),
// service.version=version, host and process id. Nothing is connected before
// the first export: an unreachable endpoint shows up as export errors (on
// the OpenTelemetry error handler), not as a start-up failure. The global
// OpenTelemetry providers are left alone.
func SetupTracing(ctx context.Context, c config.Tracing, serviceName, version string) (*Tracing, error) {
	if !c.Enabled {
		return &Tracing{Tracer: noop.NewTracerProvider().Tracer(tracerName), Propagator: w3c}, nil
	}
	opts, err := exporterOptions(c.Endpoint)
	if err != nil {
		return nil, err
	}
	exp, err := otlptracehttp.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("tracing: unable to create the OTLP exporter: %w", err)
	}
	if serviceName == "" {
		serviceName = "orderly"
	}
	res, err := resource.New(ctx,
		resource.WithSchemaURL(semconv.SchemaURL),
		resource.WithTelemetrySDK(),
		resource.WithHost(),
		resource.WithProcessPID(),
		resource.WithAttributes(semconv.ServiceName(serviceName), semconv.ServiceVersion(version)),
		resource.WithFromEnv(), // last: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		_ = exp.Shutdown(ctx)
		return nil, fmt.Errorf("tracing: unable to describe the resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(c.SampleRatio))),
		sdktrace.WithResource(res),
	)
	return &Tracing{
		Tracer:     tp.Tracer(tracerName, trace.WithInstrumentationVersion(version), trace.WithSchemaURL(semconv.SchemaURL)),
		Propagator: w3c,
		enabled:    true,
		provider:   tp,
	}, nil
}

// exporterOptions turns tracing.endpoint ("http://host:port[/path]") into
// otlptracehttp options.
func exporterOptions(endpoint string) ([]otlptracehttp.Option, error) {
	u, err := url.Parse(endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("tracing: endpoint %q is not an http(s) URL", endpoint)
	}
	path := u.Path
	if path == "" || path == "/" {
		path = "/v1/traces"
	}
	opts := []otlptracehttp.Option{otlptracehttp.WithEndpoint(u.Host), otlptracehttp.WithURLPath(path)}
	if u.Scheme == "http" {
		opts = append(opts, otlptracehttp.WithInsecure())
	}
	return opts, nil
}

// Enabled reports whether spans are recorded and exported.
func (t *Tracing) Enabled() bool { return t != nil && t.enabled }

// Shutdown flushes the spans not yet exported and stops the exporter,
// within ctx. It is a no-op when disabled; call it once.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t == nil || t.provider == nil {
		return nil
	}
	if err := t.provider.Shutdown(ctx); err != nil {
		return fmt.Errorf("tracing: shutdown: %w", err)
	}
	return nil
}

// HeaderCarrier adapts Kafka record headers to propagation.TextMapCarrier.
// Get matches keys case-insensitively (Kafka header keys are case-sensitive,
// but producers spell "traceparent" in various ways); Set replaces the first
// header of that key or appends one.
type HeaderCarrier []filters.Header

var _ propagation.TextMapCarrier = (*HeaderCarrier)(nil)

// Get returns the value of the first header named key, or "".
func (c *HeaderCarrier) Get(key string) string {
	for _, h := range *c {
		if strings.EqualFold(h.Key, key) {
			return string(h.Value)
		}
	}
	return ""
}

// Set sets the header key to value.
func (c *HeaderCarrier) Set(key, value string) {
	for i, h := range *c {
		if strings.EqualFold(h.Key, key) {
			(*c)[i].Value = []byte(value)
			return
		}
	}
	*c = append(*c, filters.Header{Key: key, Value: []byte(value)})
}

// Keys returns every header key.
func (c *HeaderCarrier) Keys() []string {
	ks := make([]string, len(*c))
	for i, h := range *c {
		ks[i] = h.Key
	}
	return ks
}

func hasTraceparent(headers []filters.Header) bool {
	for i := range headers {
		if len(headers[i].Key) == len("traceparent") && strings.EqualFold(headers[i].Key, "traceparent") {
			return true
		}
	}
	return false
}

// StartMessage continues the W3C trace context in the message's headers and
// starts the message's CONSUMER span "<topic> process" under it. End the
// span (span.End()) when the message is finished. Disabled, it returns a
// no-op span, and ctx unchanged unless the headers carry a traceparent,
// which is then passed through (see the package notes above).
func (t *Tracing) StartMessage(ctx context.Context, topic string, partition int32, offset int64,
	key []byte, headers []filters.Header) (context.Context, trace.Span) {
	if t == nil || !t.enabled {
		if hasTraceparent(headers) {
			hc := HeaderCarrier(headers)
			ctx = w3c.Extract(ctx, &hc)
		}
		return ctx, noop.Span{}
	}
	if len(headers) > 0 {
		hc := HeaderCarrier(headers)
		ctx = t.Propagator.Extract(ctx, &hc)
	}
	ctx, span := t.Tracer.Start(ctx, topic+" process",
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(
			semconv.MessagingSystemKafka,
			semconv.MessagingOperationTypeProcess,
			semconv.MessagingDestinationName(topic),
		))
	if span.IsRecording() {
		attrs := make([]attribute.KeyValue, 0, 4)
		attrs = append(attrs,
			semconv.MessagingOperationName("process"),
			semconv.MessagingDestinationPartitionID(strconv.Itoa(int(partition))),
			semconv.MessagingKafkaOffset(int(offset)),
		)
		if key != nil && utf8.Valid(key) {
			attrs = append(attrs, semconv.MessagingKafkaMessageKey(string(key)))
		}
		span.SetAttributes(attrs...)
	}
	return ctx, span
}

// MessageRouted records the route that took the message (orderly.route).
func MessageRouted(span trace.Span, route string) {
	if !span.IsRecording() {
		return
	}
	span.SetAttributes(AttrRoute.String(route))
}

// MessageOutcome records how the message finished (orderly.outcome: one of
// OutcomeDelivered, OutcomeSkipped, ...). It does not end the span.
func MessageOutcome(span trace.Span, outcome string) {
	if !span.IsRecording() {
		return
	}
	span.SetAttributes(AttrOutcome.String(outcome))
}

// MessageDeadLettered records that the message goes to the DLQ and why: an
// "orderly.dead_lettered" event with orderly.error, orderly.outcome =
// dead_lettered and an Error status. It does not end the span.
func MessageDeadLettered(span trace.Span, reason string) {
	if !span.IsRecording() {
		return
	}
	span.AddEvent(EventDeadLettered, trace.WithAttributes(AttrError.String(reason)))
	span.SetAttributes(AttrOutcome.String(OutcomeDeadLettered))
	span.SetStatus(codes.Error, reason)
}

// StartAttemptURL starts the CLIENT span of one HTTP attempt to u (the
// *http.Request's URL; attempt counts from 1) as a child of the span in ctx.
// Inject the returned context into the attempt's headers and end the span
// with EndAttempt. Disabled, it returns ctx and a no-op span without
// allocating.
func (t *Tracing) StartAttemptURL(ctx context.Context, method string, u *url.URL, attempt int) (context.Context, trace.Span) {
	if t == nil || !t.enabled {
		return ctx, noop.Span{}
	}
	ctx, span := t.startAttempt(ctx, method, attempt)
	if span.IsRecording() && u != nil {
		setURL(span, u)
	}
	return ctx, span
}

func (t *Tracing) startAttempt(ctx context.Context, method string, attempt int) (context.Context, trace.Span) {
	name, attrs := method, make([]attribute.KeyValue, 0, 3)
	if knownMethod(method) {
		attrs = append(attrs, semconv.HTTPRequestMethodKey.String(method))
	} else {
		name = "HTTP"
		attrs = append(attrs, semconv.HTTPRequestMethodOther, semconv.HTTPRequestMethodOriginal(method))
	}
	if attempt > 1 {
		attrs = append(attrs, semconv.HTTPRequestResendCount(attempt-1))
	}
	return t.Tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...))
}

func knownMethod(m string) bool {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodConnect, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

// setURL sets url.full (user info redacted, as the convention requires, and
// query values too, which may carry credentials; no fragment),
// server.address and server.port.
func setURL(span trace.Span, u *url.URL) {
	full := u
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		c := *u
		if u.User != nil {
			c.User = url.UserPassword("REDACTED", "REDACTED")
		}
		c.RawQuery = redactQuery(u.RawQuery)
		c.ForceQuery = false
		c.Fragment, c.RawFragment = "", ""
		full = &c
	}
	port := 0
	if p := u.Port(); p != "" {
		port, _ = strconv.Atoi(p)
	} else {
		switch u.Scheme {
		case "http":
			port = 80
		case "https":
			port = 443
		}
	}
	attrs := []attribute.KeyValue{semconv.URLFull(full.String()), semconv.ServerAddress(u.Hostname())}
	if port > 0 {
		attrs = append(attrs, semconv.ServerPort(port))
	}
	span.SetAttributes(attrs...)
}

// redactQuery keeps the names of a raw query and replaces every value with
// REDACTED: "key=s3cret&page=2" becomes "key=REDACTED&page=REDACTED".
func redactQuery(q string) string {
	if q == "" {
		return ""
	}
	var b strings.Builder
	for i, part := range strings.Split(q, "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		name, _, hasValue := strings.Cut(part, "=")
		b.WriteString(name)
		if hasValue {
			b.WriteString("=REDACTED")
		}
	}
	return b.String()
}

// EndAttempt records the attempt's outcome and ends its span: the status
// code when there was an answer (status > 0), error.type and an Error status
// for a transport error or a status >= 400.
func EndAttempt(span trace.Span, status int, err error) {
	if span.IsRecording() {
		if status > 0 {
			span.SetAttributes(semconv.HTTPResponseStatusCode(status))
		}
		switch {
		case err != nil:
			span.SetAttributes(semconv.ErrorTypeKey.String(errorType(err)))
			span.SetStatus(codes.Error, err.Error())
		case status >= 400:
			span.SetAttributes(semconv.ErrorTypeKey.String(strconv.Itoa(status)))
			span.SetStatus(codes.Error, "")
		}
	}
	span.End()
}

// errorType is a low-cardinality error.type for a transport error.
func errorType(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	var oe *net.OpError
	if errors.As(err, &oe) {
		return "net." + oe.Op // net.dial, net.read, net.write
	}
	return fmt.Sprintf("%T", err)
}

// Inject writes the trace context of ctx (traceparent, tracestate, baggage)
// into h. It fits httpclient.Options.Propagate. It writes nothing when ctx
// holds no valid span context (and then allocates nothing).
func (t *Tracing) Inject(ctx context.Context, h http.Header) {
	t.InjectInto(ctx, propagation.HeaderCarrier(h))
}

// InjectInto writes the trace context of ctx into c (HTTP or Kafka record
// headers); nothing when ctx holds no valid span context.
func (t *Tracing) InjectInto(ctx context.Context, c propagation.TextMapCarrier) {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return
	}
	p := w3c
	if t != nil && t.Propagator != nil {
		p = t.Propagator
	}
	p.Inject(ctx, c)
}

// StartPublish starts the PRODUCER span "<topic> publish" of a record a
// topic request writes, as a child of the span in ctx. Inject the returned
// context into the record's headers and end the span with EndPublish.
// Disabled, it returns ctx and a no-op span.
func (t *Tracing) StartPublish(ctx context.Context, topic string) (context.Context, trace.Span) {
	if t == nil || !t.enabled {
		return ctx, noop.Span{}
	}
	return t.Tracer.Start(ctx, topic+" publish", trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithAttributes(semconv.MessagingSystemKafka, semconv.MessagingOperationTypeSend,
			semconv.MessagingDestinationName(topic)))
}

// EndPublish ends a span of StartPublish with the write's outcome.
func EndPublish(span trace.Span, err error) {
	if err != nil && span.IsRecording() {
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}
