// Package httpclient sends the HTTP requests Orderly renders from Kafka
// messages. One Sender serves the whole process and every key lane; it is
// safe for concurrent use.
//
// # What one Send does
//
// Send turns a filters.Request into a go-retryablehttp Request and runs it
// through one shared retryablehttp.Client. The client owns the attempt loop:
//
//   - RetryMax is http.retry.max_attempts-1 (max_attempts counts the first
//     try; 0 means unbounded, i.e. until success or ctx is done);
//   - CheckRetry retries a status in retry_statuses and every transport
//     error that go-retryablehttp considers recoverable (connection refused or
//     reset, EOF, per-attempt timeout, ...; not a bad URL scheme, an invalid
//     header or an untrusted certificate); anything else ends the loop;
//   - Backoff is exponential with equal jitter, kept within
//     [initial_backoff, max_backoff]; on 429 and 503 a Retry-After header
//     (seconds or HTTP-date, parsed by go-retryablehttp) replaces it, capped
//     at max_backoff;
//   - the body is a []byte that go-retryablehttp replays through a fresh
//     bytes.Reader (and GetBody) on every attempt; the caller's slice is never
//     consumed or modified;
//   - redirects are not followed: a 3xx is an answer like any other.
//
// The client's RoundTripper (attemptTransport) is where one attempt happens:
//
//  1. wait until the target's circuit breaker admits a request (see below);
//  2. count the attempt, derive the per-attempt context (http.timeout);
//  3. call Options.Propagate on a copy of the headers (trace context);
//  4. round trip on the tuned *http.Transport, then drain (up to 64 KiB) and
//     close the response body so the connection goes back to the pool;
//  5. record metrics and report the outcome to the breaker.
//
// Because the breaker wait happens inside the RoundTripper before the attempt
// is counted, an open breaker never consumes an attempt and never makes a
// request permanent: the request simply waits (DESIGN guarantee 4). The
// RoundTripper deliberately has no CloseIdleConnections method, so the
// CloseIdleConnections calls go-retryablehttp makes when it gives up do not
// tear down the shared pool.
//
// # Outcomes
//
// A 2xx is success. Any other status outside retry_statuses (other 4xx,
// 3xx, 501, ...) is permanent at once. A retryable failure that exhausts
// max_attempts is permanent too, with the last status or error; the
// dispatcher dead-letters permanent failures. When ctx is done (shutdown,
// partition revoked) Send returns promptly with an *Error that is not
// permanent and wraps ctx.Err(); every wait (backoff, breaker) selects on
// ctx.Done().
//
// # Circuit breaker
//
// With http.breaker.enabled there is one sony/gobreaker TwoStepCircuitBreaker
// per target host:port (the URL's port, or 80/443 by scheme). It trips when,
// within a rolling window of 10 s (ten 1 s buckets), at least min_requests
// attempts completed and failures/completed >= failure_ratio, or when
// consecutive_failures > 0 failures happened in a row. Failures are
// transport errors, per-attempt timeouts, any 5xx and any status in
// retry_statuses (429, 408, ...): the outcomes that say the target is not
// well. A permanent 4xx is a success for the breaker (the target answered);
// an attempt cut short because the caller's ctx is done (shutdown) is
// excluded. It stays open for open_timeout, then admits half_open_requests
// probes; that many consecutive successes close it, one failure reopens it.
//
// While the breaker refuses (open, or half-open with every probe slot taken)
// the attempt waits without being counted: it retries admission every
// min(open_timeout/10, 100ms) and immediately on any state change of that
// breaker, and gives up only when ctx is done. State changes are logged at
// warn (host, from, to), counted in orderly_breaker_transitions_total{host,to}
// (to is "closed", "half-open" or "open") and mirrored in
// orderly_breaker_state{host} (0 closed, 1 half-open, 2 open). gobreaker
// moves from open to half-open lazily, on the next admission check, so the
// gauge changes when a request is waiting for that host.
//
// # Connections
//
// The transport speaks HTTP/1.1 only (one request per connection at a time,
// which is what lets an L4 load balancer spread the load), keeps connections
// alive, allows max_conns_per_host connections per host (0 = unlimited) and
// keeps as many idle (1024 when unlimited), closes idle ones after
// idle_conn_timeout, bounds dialing and TLS handshakes at 10 s and honours
// HTTP_PROXY/HTTPS_PROXY/NO_PROXY. There is no response-header timeout: the
// per-attempt context covers it.
//
// With max_conn_age > 0 every dialed connection records its birth. When the
// pool hands out a reused connection older than max_conn_age (seen through an
// httptrace GotConn hook), the connection is marked retired and its next
// Write fails before a byte is written; net/http then closes it and, because
// every request carries an Idempotency-Key and a replayable body, retries the
// request transparently on another connection (documented Transport
// behaviour). The retry is invisible to Send: no attempt, error or breaker
// failure is recorded, and no request is ever sent twice because of it. Old
// idle connections that are never picked again die at idle_conn_timeout.
// No background goroutine is involved.
//
// # Metrics
//
// Per attempt: orderly_http_requests_total{host,status} (status is the code
// or "error"), orderly_http_request_duration_seconds{host} (round trip plus
// body drain, breaker wait excluded); orderly_http_retries_total{host} for
// every attempt after the first.
package httpclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"sync"
	"time"

	"github.com/hashicorp/go-retryablehttp"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Fallbacks for zero values in Options.HTTP. config applies the documented
// defaults before a Sender is built; these only keep a hand-built Options
// (tests, tools) from spinning or dividing by zero.
const (
	defaultInitialBackoff  = 100 * time.Millisecond
	defaultMaxBackoff      = 30 * time.Second
	defaultIdleConnTimeout = 90 * time.Second
	defaultOpenTimeout     = 15 * time.Second
	// unlimitedIdlePerHost is MaxIdleConnsPerHost when max_conns_per_host is
	// 0 (unlimited); net/http's default of 2 would defeat keep-alive.
	unlimitedIdlePerHost = 1024
	dialTimeout          = 10 * time.Second
	tlsHandshakeTimeout  = 10 * time.Second
	// drainLimit bounds how much of a response body is read (and thrown
	// away) to keep its connection reusable.
	drainLimit = 64 << 10
)

// defaultRetryStatuses is used when Options.HTTP.Retry.RetryStatuses is nil
// (an empty, non-nil slice means: retry no status).
var defaultRetryStatuses = []int{408, 425, 429, 500, 502, 503, 504}

var (
	// ErrRetriesExhausted is wrapped by the Err of a permanent *Error when
	// max_attempts attempts all failed in a retryable way.
	ErrRetriesExhausted = errors.New("retries exhausted")
	// ErrStatus is wrapped by the Err of a permanent *Error when the target
	// answered with a status that is neither 2xx nor retryable.
	ErrStatus = errors.New("non-retryable status")
)

// Options configures a Sender.
type Options struct {
	HTTP    config.HTTP
	Version string             // User-Agent: orderly/<Version>
	Metrics *telemetry.Metrics // required
	Logger  *slog.Logger       // nil = discard
	// Propagate, if set, is called on every outgoing attempt, with the
	// attempt's context and a private copy of the request headers, to inject
	// trace context headers (traceparent/tracestate).
	Propagate func(ctx context.Context, h http.Header)
	// Tracing, if set, gives every attempt a CLIENT span (nil: none).
	Tracing *telemetry.Tracing
}

// Result describes a delivered request.
type Result struct {
	Status   int // the 2xx status of the last attempt
	Attempts int // attempts made, the successful one included
}

// Error is the error Send returns. Permanent failures (non-retryable status,
// retries exhausted, a request that cannot be built or sent at all) have
// Permanent set: the dispatcher dead-letters them. An Error that is not
// permanent means the caller's context ended first; the request should be
// tried again later (redelivery).
type Error struct {
	Status    int  // status of the last attempt, 0 if it got no response (or none was made)
	Attempts  int  // attempts made
	Permanent bool // true: retrying the same request will not help
	Err       error
}

// Error implements error.
func (e *Error) Error() string {
	kind := "temporary"
	if e.Permanent {
		kind = "permanent"
	}
	return fmt.Sprintf("httpclient: %v (status %d, %d attempts, %s)", e.Err, e.Status, e.Attempts, kind)
}

// Unwrap returns the underlying error.
func (e *Error) Unwrap() error { return e.Err }

// IsPermanent reports whether err is (or wraps) a permanent *Error.
func IsPermanent(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Permanent
}

// Sender sends requests with retries, a circuit breaker per target and a
// connection policy. It is safe for concurrent use. Build it with New and
// call Close when done.
type Sender struct {
	log       *slog.Logger
	metrics   *telemetry.Metrics
	userAgent string
	propagate func(context.Context, http.Header)
	tracing   *telemetry.Tracing

	timeout     time.Duration // per attempt; 0 = none
	maxConnAge  time.Duration // 0 = never retire connections
	retryStatus [600]bool     // indexed by status code
	breaker     config.Breaker
	breakerPoll time.Duration

	transport *http.Transport
	client    *retryablehttp.Client
	connTrace *httptrace.ClientTrace // GotConn hook for max_conn_age; nil when off

	mu      sync.RWMutex // protects targets
	targets map[string]*target
}

// New builds a Sender. It panics if o.Metrics is nil. Zero durations in
// o.HTTP.Retry fall back to 100ms/30s, a zero idle_conn_timeout to 90s, a
// zero open_timeout to 15s; a zero http.timeout means no per-attempt limit.
func New(o Options) *Sender {
	if o.Metrics == nil {
		panic("httpclient: Options.Metrics is required")
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := o.HTTP
	s := &Sender{
		log:        log,
		metrics:    o.Metrics,
		userAgent:  "orderly/" + o.Version,
		propagate:  o.Propagate,
		tracing:    o.Tracing,
		timeout:    max(h.Timeout.D(), 0),
		maxConnAge: max(h.MaxConnAge.D(), 0),
		breaker:    h.Breaker,
		targets:    make(map[string]*target),
	}
	statuses := h.Retry.RetryStatuses
	if statuses == nil {
		statuses = defaultRetryStatuses
	}
	for _, c := range statuses {
		if c >= 0 && c < len(s.retryStatus) {
			s.retryStatus[c] = true
		}
	}
	if s.breaker.Enabled {
		if s.breaker.OpenTimeout.D() <= 0 {
			s.breaker.OpenTimeout = config.Duration{Duration: defaultOpenTimeout}
		}
		s.breakerPoll = min(s.breaker.OpenTimeout.D()/10, 100*time.Millisecond)
		s.breakerPoll = max(s.breakerPoll, time.Millisecond)
	}

	s.transport = s.newTransport(h)
	if s.maxConnAge > 0 {
		s.connTrace = &httptrace.ClientTrace{GotConn: s.gotConn}
	}

	initial := h.Retry.InitialBackoff.D()
	if initial <= 0 {
		initial = defaultInitialBackoff
	}
	maxBackoff := h.Retry.MaxBackoff.D()
	if maxBackoff <= 0 {
		maxBackoff = defaultMaxBackoff
	}
	maxBackoff = max(maxBackoff, initial)
	retryMax := math.MaxInt // max_attempts 0: until success or ctx done
	if h.Retry.MaxAttempts > 0 {
		retryMax = h.Retry.MaxAttempts - 1
	}
	s.client = &retryablehttp.Client{
		HTTPClient: &http.Client{
			Transport: &attemptTransport{s: s},
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			},
		},
		RetryWaitMin: initial,
		RetryWaitMax: maxBackoff,
		RetryMax:     retryMax,
		CheckRetry:   s.checkRetry,
		Backoff:      backoff,
		ErrorHandler: retryablehttp.PassthroughErrorHandler,
	}
	// go-retryablehttp formats its debug lines eagerly; only pay for that
	// when they can be seen.
	if log.Enabled(context.Background(), slog.LevelDebug) {
		s.client.Logger = retryLogger{log}
	}
	return s
}

func (s *Sender) newTransport(h config.HTTP) *http.Transport {
	dialer := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	dial := dialer.DialContext
	if s.maxConnAge > 0 {
		dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &agedConn{Conn: c, born: time.Now()}, nil
		}
	}
	idlePerHost := h.MaxConnsPerHost
	if idlePerHost <= 0 {
		idlePerHost = unlimitedIdlePerHost
	}
	idleTimeout := h.IdleConnTimeout.D()
	if idleTimeout <= 0 {
		idleTimeout = defaultIdleConnTimeout
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	return &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         dial,
		Protocols:           &protocols,
		TLSHandshakeTimeout: tlsHandshakeTimeout,
		MaxIdleConns:        0, // no global limit; the per-host one applies
		MaxIdleConnsPerHost: idlePerHost,
		MaxConnsPerHost:     max(h.MaxConnsPerHost, 0),
		IdleConnTimeout:     idleTimeout,
		// Bodies are drained and discarded; do not ask for gzip only to
		// inflate it for nothing.
		DisableCompression: true,
	}
}

// Close closes the idle connections of the Sender's pool. No background
// goroutine outlives Send, so there is nothing else to stop. A Send after
// Close still works, on new connections.
func (s *Sender) Close() {
	s.transport.CloseIdleConnections()
}

// stateKey is the context key of the *sendState of one Send.
type stateKey struct{}

// sendState is what one Send and its attempts share. It is used by one
// goroutine at a time: the one running Send (http.Client calls the
// RoundTripper synchronously).
type sendState struct {
	target    *target
	attempts  int
	status    int   // status of the last attempt, 0 if it had no response
	retryable bool  // CheckRetry's verdict on the last attempt
	lastErr   error // transport error of the last attempt
}

// Send sends req, retrying as configured, and returns once it succeeded,
// failed permanently, or ctx is done. Every attempt carries req.Header,
// Idempotency-Key: idempotencyKey (omitted if empty) and User-Agent:
// orderly/<version>; these two override configured headers of the same name,
// and a configured Host header sets the request's Host. req is not modified.
//
// On failure the error is an *Error (see IsPermanent) and the Result still
// holds the attempts made and the last status.
func (s *Sender) Send(ctx context.Context, req *filters.Request, idempotencyKey string) (Result, error) {
	st := &sendState{}
	var body any // untyped nil: no body at all (not an empty chunked one)
	if len(req.Body) > 0 {
		body = req.Body // replayed through bytes.NewReader, never consumed
	}
	rreq, err := retryablehttp.NewRequestWithContext(context.WithValue(ctx, stateKey{}, st), req.Method, req.URL, body)
	if err != nil {
		return Result{}, &Error{Permanent: true, Err: fmt.Errorf("unable to build %s request: %w", req.Method, err)}
	}
	st.target = s.target(hostKey(rreq.URL))
	for k, v := range req.Header {
		rreq.Header[k] = v
	}
	if host := req.Header.Get("Host"); host != "" {
		rreq.Host = host
	}
	if idempotencyKey != "" {
		rreq.Header.Set("Idempotency-Key", idempotencyKey)
	}
	rreq.Header.Set("User-Agent", s.userAgent)

	resp, err := s.client.Do(rreq)
	if resp != nil {
		resp.Body.Close() // already drained and replaced by the attempt transport
	}
	res := Result{Status: st.status, Attempts: st.attempts}
	if err == nil && resp != nil && resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return res, nil
	}
	what := req.Method + " " + safeURL(rreq.URL)
	if ctx.Err() != nil {
		return res, &Error{Status: st.status, Attempts: st.attempts,
			Err: fmt.Errorf("unable to send %s: %w", what, ctx.Err())}
	}
	exhausted := st.retryable // CheckRetry wanted another attempt, RetryMax said no
	switch {
	case err != nil && exhausted:
		err = fmt.Errorf("%w after %d attempts: %w", ErrRetriesExhausted, st.attempts, err)
	case err != nil:
		err = fmt.Errorf("unable to send %s: %w", what, err)
	case resp == nil: // not expected from go-retryablehttp; never report success without a status
		err = fmt.Errorf("unable to send %s: no response", what)
	case exhausted:
		err = fmt.Errorf("%w after %d attempts: %s answered %d", ErrRetriesExhausted, st.attempts, what, resp.StatusCode)
	default:
		err = fmt.Errorf("%w: %s answered %d", ErrStatus, what, resp.StatusCode)
	}
	return res, &Error{Status: st.status, Attempts: st.attempts, Permanent: true, Err: err}
}

// checkRetry is the go-retryablehttp CheckRetry policy: stop when ctx is done,
// retry the configured statuses and recoverable transport errors.
func (s *Sender) checkRetry(ctx context.Context, resp *http.Response, err error) (bool, error) {
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	var retry bool
	if err != nil {
		// Decides which transport errors are hopeless (bad scheme, invalid
		// header, untrusted certificate) and returns them; retries the rest.
		retry, err = retryablehttp.ErrorPropagatedRetryPolicy(ctx, nil, err)
	} else {
		retry = s.retryable(resp.StatusCode)
	}
	if st, ok := ctx.Value(stateKey{}).(*sendState); ok {
		st.retryable = retry
	}
	return retry, err
}

func (s *Sender) retryable(status int) bool {
	return status >= 0 && status < len(s.retryStatus) && s.retryStatus[status]
}

// hostKey is the target's host:port, the unit of breakers and metric labels.
func hostKey(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	switch u.Scheme {
	case "https":
		return net.JoinHostPort(u.Hostname(), "443")
	case "http":
		return net.JoinHostPort(u.Hostname(), "80")
	}
	return u.Host
}

// safeURL renders u for error messages without user info or query.
func safeURL(u *url.URL) string {
	return u.Scheme + "://" + u.Host + u.Path
}

// drain reads up to drainLimit bytes of body and closes it, so that the
// connection can be reused when the body was small enough.
func drain(body io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(body, drainLimit))
	_ = body.Close()
}

// retryLogger adapts slog to go-retryablehttp's LeveledLogger. Everything it
// says is per-attempt detail, so it all goes out at debug.
type retryLogger struct{ l *slog.Logger }

var _ retryablehttp.LeveledLogger = retryLogger{}

func (r retryLogger) Error(msg string, kv ...any) { r.l.Debug("retryablehttp: "+msg, kv...) }
func (r retryLogger) Info(msg string, kv ...any)  { r.l.Debug("retryablehttp: "+msg, kv...) }
func (r retryLogger) Debug(msg string, kv ...any) { r.l.Debug("retryablehttp: "+msg, kv...) }
func (r retryLogger) Warn(msg string, kv ...any)  { r.l.Debug("retryablehttp: "+msg, kv...) }
