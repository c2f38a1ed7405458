// Package httpclient sends the HTTP requests Orderly renders from Kafka
// messages. One Sender serves the whole process; it is safe for concurrent
// use.
//
// # Attempts and calls
//
// The unit of work is one attempt. A Call is the delivery of one
// filters.Request: Sender.Attempt makes its next attempt and says what comes
// next (a Step): Delivered, Retry after a backoff, Failed for good, or
// Canceled because ctx ended. The caller owns the waiting between attempts,
// so that a request in backoff holds no goroutine: the dispatcher parks the
// key lane on a timer and its sender goroutine serves another key
// meanwhile. Sender.Send is the blocking loop over the same attempts, for
// callers that can afford to wait (DLQ replay, tools).
//
// The policy, per attempt:
//
//   - http.retry.max_attempts bounds the attempts that count, the first try
//     included; 0 means unbounded, i.e. until success or ctx is done. A
//     failure while the target is failing as a whole does not count (see
//     "Outages are not poison"); Error.Attempts and Result.Attempts report
//     every attempt made, Error.Counted and Result.Counted the counted ones;
//   - a status in retry_statuses, and every transport error that
//     go-retryablehttp's ErrorPropagatedRetryPolicy considers recoverable
//     (connection refused or reset, EOF, per-attempt timeout, ...; not a bad
//     URL scheme, an invalid header or an untrusted certificate) is retried;
//     anything else ends the call;
//   - the backoff is exponential in the attempts made (counted or not),
//     with equal jitter, kept within [initial_backoff, max_backoff];
//   - a retryable 429 or 503 with a Retry-After header (seconds or
//     HTTP-date, parsed by go-retryablehttp) pauses the whole target
//     instead: no attempt to it starts until then (see "Retry-After"),
//     capped at max_retry_after; a Retry-After of 0, or of a date in the
//     past, leaves the exponential backoff;
//   - the body is replayed from the request's []byte on every attempt (and
//     through GetBody); the caller's slice is never consumed or modified;
//   - redirects are not followed (the transport's RoundTrip is called, never
//     an http.Client's Do): a 3xx is a permanent failure like any other
//     status outside retry_statuses, so a target cannot send a request, its
//     body and its headers elsewhere. A named target with follow_redirects
//     is the exception, and only toward its own scheme://host:port
//     (redirects.go).
//
// go-retryablehttp supplies the policy pieces (error classification,
// Retry-After parsing); its Client.Do loop is not used, because it sleeps
// inside the sending goroutine between attempts.
//
// One attempt:
//
//  1. return Retry at once while the target is paused by a Retry-After,
//     or a named target has no token of its rate (see "Flow control");
//     else wait until its circuit breaker admits a request (see below),
//     then return Retry after a few milliseconds if a named target has as
//     many attempts under way as its concurrency limit allows;
//  2. number the attempt, derive the per-attempt context (http.timeout);
//  3. when the context carries a trace (a span, or a traceparent passed
//     through), call Options.Propagate on a private copy of the headers;
//  4. round trip on the tuned *http.Transport, then drain (up to 64 KiB) and
//     close the response body so the connection goes back to the pool;
//  5. put the outcome on the target's health record, pause the target on a
//     Retry-After, report the outcome to the breaker, record metrics, and
//     decide whether the attempt counts.
//
// Because the breaker wait happens before the attempt is made, an open
// breaker never consumes an attempt and never makes a request permanent: the
// request simply waits (DESIGN guarantee 4).
//
// # Outages are not poison
//
// max_attempts is there to dead-letter a message the target keeps failing
// on (poison), not the messages in flight while the target is down. Every
// attempt counts toward it except a retryable failure (a retryable status or
// a recoverable transport error) for which one of these holds:
//
//   - retry_after: a 429 or 503 with a Retry-After in the future (the
//     target asked for the wait; see "Retry-After");
//   - target_failing: since the target's last success (a 2xx, or any other
//     answer the breaker counts as a success, such as a 400), another call
//     also failed on it in a retryable way;
//   - connection: the attempt got no connection (refused, DNS failure,
//     connect timeout, TLS handshake failure: no request reached the
//     target), and no other call succeeded on the target since this call's
//     first failure;
//   - probe: the breaker was half-open when the attempt was admitted;
//   - breaker_open: the breaker is open once the failure is recorded.
//
// probe and breaker_open do not apply when the breaker last opened on this
// call's failures alone (it was the only call that failed since the target's
// last success): a lone call that trips the breaker tests itself again. So a
// call answered 5xx while other calls to the target succeed counts every
// attempt, and so does a lone call answered 5xx by an otherwise idle target
// (nothing tells an outage from poison then); after another call succeeded
// during its failures, even its connection failures count. A target that
// refuses connections, or fails every call of two keys or more, spends no
// attempts however long it lasts. Uncounted attempts are counted in
// orderly_http_attempts_uncounted_total{host} and logged at debug with their
// reason.
//
// A run of failures (retryable failures since the target's last success) is
// logged at warn when it starts, with the failure, and while it goes on by a
// summary: the newest failure, how many calls that failed wait for the
// target (those that have not ended since; one not seen for 5 minutes is
// taken as abandoned) and since when it fails; at most one of these lines
// per target every 30 s.
//
// # Retry-After
//
// A retryable 429 or 503 whose Retry-After lies in the future pauses its
// target (host:port) until then, capped at http.retry.max_retry_after: the
// answer spends no attempt, and until the pause ends every Attempt for that
// target, of any call, returns Retry with the rest of the pause at once,
// without sending, counting or touching the breaker (the dispatcher parks
// the lane on a timer: no goroutine waits). Attempts already under way when
// the answer arrives finish; another Retry-After can only lengthen the
// pause. Other targets are unaffected. Pauses that start are counted in
// orderly_http_retry_after_pauses_total{host} and logged at warn, at most
// once per target every 30 s.
//
// # Outcomes
//
// A 2xx is success. Any other status outside retry_statuses (other 4xx,
// 3xx, 501, ...) is permanent at once. A retryable failure that exhausts
// max_attempts is permanent too, with the last status or error; the
// dispatcher dead-letters permanent failures. When ctx is done (shutdown,
// partition revoked) the attempt returns promptly with an *Error that is not
// permanent and wraps ctx.Err(); every wait (breaker, Send's backoff) selects
// on ctx.Done().
//
// # Circuit breaker
//
// With http.breaker.enabled there is one sony/gobreaker TwoStepCircuitBreaker
// per target host:port (the URL's port, or 80/443 by scheme). It trips when,
// within a rolling window of 10 s (ten 1 s buckets), at least min_requests
// attempts completed and failures/completed >= failure_ratio, or when
// consecutive_failures > 0 failures happened in a row. Failures are
// transport errors, per-attempt timeouts and every 5xx but 501: the
// outcomes that say the target is not well. A 4xx and a 501 are answers
// about the request: a retryable one (429, 408, 425) is excluded (neither
// failure nor success, so a rate limit cannot open the breaker, nor close
// it from half-open), any other (400, 404, 501, a 3xx) is a success for the
// breaker (the target answered). An attempt cut short because the caller's
// ctx is done (shutdown) is excluded too. It stays open for open_timeout, then admits half_open_requests
// probes; that many consecutive successes close it, one failure reopens it.
// A failed probe, and a failure that leaves the breaker open, spend no attempt
// unless the breaker opened on that call alone (see "Outages are not
// poison").
//
// While the breaker refuses (open, or half-open with every probe slot taken)
// the attempt waits without being counted: it retries admission every
// min(open_timeout/10, 100ms) and immediately on any state change of that
// breaker, and gives up only when ctx is done. The dispatcher runs a bounded
// set of sender goroutines per target, so this wait holds only that target's
// senders. State changes are logged at warn (host, from, to), counted in
// orderly_breaker_transitions_total{host,to} (to is "closed", "half-open" or
// "open") and mirrored in orderly_breaker_state{host} (0 closed, 1
// half-open, 2 open). gobreaker moves from open to half-open lazily, on the
// next admission check, so the gauge changes when a request is waiting for
// that host.
//
// # Connections
//
// The transport speaks HTTP/1.1 only (one request per connection at a time,
// which is what lets an L4 load balancer spread the load), keeps connections
// alive, allows max_conns_per_host connections per host (0 = unlimited) and
// keeps as many idle (1024 when unlimited), closes idle ones after
// idle_conn_timeout, bounds dialing and TLS handshakes at 10 s and honours
// HTTP_PROXY/HTTPS_PROXY/NO_PROXY. There is no response-header timeout: the
// per-attempt context covers it. Requests make their round trip on the
// calling goroutine (h1.go), over TLS for https; proxied ones go through
// net/http's Transport with the same policy.
//
// With max_conn_age > 0 every dialed connection records its birth. When the
// pool hands a reused connection older than max_conn_age to an attempt (seen
// through an httptrace GotConn hook), that attempt's request carries
// "Connection: close": it is the connection's last. The server answers and
// closes (RFC 9112 requires it; net/http's client then sees the answer's
// Connection: close and does not pool the connection, and h1.go closes it
// after the answer anyway), and the next request
// dials. Nothing fails, nothing is retried, no request is sent twice. Should
// a server ignore the close and the connection come back, its next write
// fails before a byte is written and net/http replays that request on
// another connection. (Failing the write at once, without the close, raced
// with net/http: for an answer without a body it pools the connection before
// handing the answer over, and a request that picked the connection up and
// closed it made the previous, answered request fail.) Old idle connections
// that are never picked again die at idle_conn_timeout. No background
// goroutine is involved.
//
// # Targets over time
//
// The state kept per target (breaker, health record, pause, metric series)
// is created on the first request to its host:port. A target with no
// attempt under way and none for 5 minutes, and not paused, is forgotten
// with its metric series (deleted from the registry) by a sweep that runs
// when another target is created, at most once a minute; a call whose
// target was forgotten while it waited moves to the host's new target. So
// however many hosts messages name over time, the Sender keeps those used
// in the last few minutes.
//
// # Named targets
//
// A request that names a configured target (filters.Request.TargetName)
// is sent with that target's transport (its TLS), headers, authentication
// and Standard Webhooks signature: see Targets (auth.go) and sign
// (signing.go).
//
// # Flow control
//
// A named target may have a rate (targets[].rate, burst) and a limit of
// attempts under way (max_concurrency, fixed or adaptive): see limits.go.
// Waiting for either spends no attempt and holds no goroutine (Attempt
// returns Retry). The rate is the group's: Sender.SetShare scales it to
// this instance's share of the partitions.
//
// # Metrics
//
// Per attempt: orderly_http_requests_total{host,status} (status is the code
// or "error"), orderly_http_request_duration_seconds{host} (round trip plus
// body drain, breaker wait excluded); orderly_http_retries_total{host} for
// every attempt after the first; orderly_http_attempts_uncounted_total{host}
// for every failed attempt that did not count toward max_attempts;
// orderly_http_retry_after_pauses_total{host} for every pause that starts.
// Per named target: orderly_target_rate_limited_total{target} for every
// wait for its rate, orderly_target_concurrency_limit{target} for its
// concurrency limit now.
package httpclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

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
	defaultMaxRetryAfter   = 10 * time.Minute
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
	// Propagate, if set, is called on every attempt whose context carries a
	// valid span context (a span of its own, or a trace passed through from
	// the message), with the attempt's context and a private copy of the
	// request headers, to inject trace context headers
	// (traceparent/tracestate).
	Propagate func(ctx context.Context, h http.Header)
	// Tracing, if set, gives every attempt a CLIENT span (nil: none).
	Tracing *telemetry.Tracing
	// Targets, if set, are the configured targets requests may name
	// (filters.Request.TargetName), from LoadTargets; see auth.go.
	Targets *Targets
}

// Result describes a delivered request.
type Result struct {
	Status   int // the 2xx status of the last attempt
	Attempts int // attempts made, the successful one included
	Counted  int // attempts that counted toward max_attempts (see the package doc)
	// Response is the last answer (see Call.Capture).
	Response filters.Response
}

// Error is the error of a failed call. Permanent failures (non-retryable
// status, retries exhausted, a request that cannot be built or sent at all)
// have Permanent set: the dispatcher dead-letters them. An Error that is not
// permanent means the caller's context ended first; the request should be
// tried again later (redelivery).
type Error struct {
	Status    int  // status of the last attempt, 0 if it got no response (or none was made)
	Attempts  int  // attempts made
	Counted   int  // attempts that counted toward max_attempts (see the package doc)
	Permanent bool // true: retrying the same request will not help
	Err       error
}

// Error implements error.
func (e *Error) Error() string {
	kind := "temporary"
	if e.Permanent {
		kind = "permanent"
	}
	if e.Counted != e.Attempts {
		return fmt.Sprintf("httpclient: %v (status %d, %d attempts, %d counted, %s)", e.Err, e.Status, e.Attempts, e.Counted, kind)
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

// Sender makes attempts with retries, a circuit breaker per target and a
// connection policy. It is safe for concurrent use. Build it with New and
// call Close when done.
type Sender struct {
	log       *slog.Logger
	metrics   *telemetry.Metrics
	userAgent []string // the User-Agent header value, shared by every request (read-only)
	propagate func(context.Context, http.Header)
	tracing   *telemetry.Tracing

	timeout        time.Duration // per attempt; 0 = none
	maxConnAge     time.Duration // 0 = never retire connections
	maxAttempts    int           // 0 = unbounded
	initialBackoff time.Duration
	maxBackoff     time.Duration
	maxRetryAfter  time.Duration
	retryStatus    [600]bool // indexed by status code
	breaker        config.Breaker
	breakerPoll    time.Duration

	transport *http.Transport         // proxies and the like: see h1
	h1        *h1Transport            // HTTP/1.1 round trips; falls back to transport (h1.go)
	plain     http.RoundTripper       // h1 (benchmarks replace it)
	named     map[string]*boundTarget // by target name, read-only (auth.go)
	callIDs   atomic.Uint64           // the last id given to a failing call

	// now is the clock of target idleness (tests replace it before the
	// first attempt).
	now func() time.Time
	// failingEvery spaces the log lines of a target's failures
	// (failingLogEvery; tests shorten it before the first attempt).
	failingEvery time.Duration

	mu        sync.RWMutex // protects targets and lastSweep
	targets   map[string]*target
	lastSweep time.Time

	slotsMu  sync.Mutex // protects slots and watching (slot.go)
	slots    map[*Slot]struct{}
	watching bool           // the watchdog goroutine runs
	watchers sync.WaitGroup // the watchdog goroutine, for Close
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
		log:          log,
		metrics:      o.Metrics,
		userAgent:    []string{"orderly/" + o.Version},
		propagate:    o.Propagate,
		tracing:      o.Tracing,
		timeout:      max(h.Timeout.D(), 0),
		maxConnAge:   max(h.MaxConnAge.D(), 0),
		maxAttempts:  max(h.Retry.MaxAttempts, 0),
		breaker:      h.Breaker,
		now:          time.Now,
		failingEvery: failingLogEvery,
		targets:      make(map[string]*target),
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
		s.breaker.OpenTimeout = config.Duration{Duration: positiveOr(s.breaker.OpenTimeout.D(), defaultOpenTimeout)}
		s.breakerPoll = max(min(s.breaker.OpenTimeout.D()/10, 100*time.Millisecond), time.Millisecond)
	}
	s.initialBackoff = positiveOr(h.Retry.InitialBackoff.D(), defaultInitialBackoff)
	s.maxBackoff = max(positiveOr(h.Retry.MaxBackoff.D(), defaultMaxBackoff), s.initialBackoff)
	s.maxRetryAfter = positiveOr(h.Retry.MaxRetryAfter.D(), defaultMaxRetryAfter)

	s.transport, s.h1 = s.newTransport(h)
	s.plain = s.h1
	s.named = s.bindTargets(o.Targets)
	return s
}

func (s *Sender) newTransport(h config.HTTP) (*http.Transport, *h1Transport) {
	dialer := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	dial := dialer.DialContext
	if s.maxConnAge > 0 {
		dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &agedConn{Conn: c, born: time.Now(), maxAge: s.maxConnAge}, nil
		}
	}
	idlePerHost := positiveOr(h.MaxConnsPerHost, unlimitedIdlePerHost)
	idleTimeout := positiveOr(h.IdleConnTimeout.D(), defaultIdleConnTimeout)
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	tr := &http.Transport{
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
	return tr, newH1Transport(tr, dial)
}

// Close closes the idle connections of the Sender's pool and, once every
// Slot is closed, waits for the slots' watchdog, the only background
// goroutine, to exit (it does within a tick of the last Close). An attempt
// after Close still works, on new connections.
func (s *Sender) Close() {
	s.h1.CloseIdleConnections() // and s.transport's
	s.closeTargets()
	s.slotsMu.Lock()
	open := len(s.slots)
	s.slotsMu.Unlock()
	if open == 0 {
		s.watchers.Wait()
	}
}

// Call is the delivery of one request across its attempts. The zero Call is
// not usable: start it with Reset. A Call is used by one goroutine at a time;
// it may move between goroutines between attempts.
type Call struct {
	req  *filters.Request
	idem [1]string // the Idempotency-Key header value ("" = none)

	// Built by the first attempt; unchanged afterwards, so that attempts may
	// share them with requests net/http may still be reading. The one
	// exception is the Connection: close that gotConn may add to header
	// (when the attempt does not send a copy): the call's later attempts,
	// if any, ask for the close too.
	tg      *target
	u       *url.URL
	header  http.Header                   // configured headers + Idempotency-Key + User-Agent
	host    string                        // a configured Host header
	getBody func() (io.ReadCloser, error) // copyBody, bound once
	named   targetCall                    // the named target's part, if any (auth.go)

	attempts int // attempts made
	counted  int // attempts that count toward max_attempts
	status   int // of the last attempt, 0 if it had no response

	// capture, when set (Capture), keeps the last answer's headers and up
	// to filters.MaxResponseBody bytes of its body in resp.
	capture bool
	resp    filters.Response

	// The call on its target's health record: its id (0 until its first
	// retryable failure), whether it has failed, and the target's success
	// epoch when it first failed (a call fails in one run: its success
	// ends it).
	id       uint64
	failing  bool
	runEpoch uint64

	// The GotConn hook of this call's attempts, the headers of the attempt
	// being sent (which it may add Connection: close to) and whether that
	// attempt got a connection.
	trace     httptrace.ClientTrace
	sending   http.Header
	connected bool
}

// Reset starts c over for req, sent with Idempotency-Key: idempotencyKey
// (omitted if empty). req is not modified and must stay unchanged while c is
// in use.
func (c *Call) Reset(req *filters.Request, idempotencyKey string) {
	// The hooks are bound to c: a Call reused in place (a lane's) binds them once.
	tr, gb := c.trace, c.getBody
	*c = Call{req: req, trace: tr, getBody: gb}
	c.idem[0] = idempotencyKey
}

// Capture makes c keep the headers and body of its attempts' answers (the
// last one's: Response). Call it after Reset.
func (c *Call) Capture() { c.capture = true }

// Response returns the last answer of a Capture call: its status, headers
// and body (cut to filters.MaxResponseBody bytes); zero without Capture or
// an answer.
func (c *Call) Response() filters.Response { return c.resp }

// Request returns the request c delivers.
func (c *Call) Request() *filters.Request { return c.req }

// Attempts returns the attempts made so far.
func (c *Call) Attempts() int { return c.attempts }

// Counted returns the attempts made so far that count toward max_attempts.
func (c *Call) Counted() int { return c.counted }

// Outcome is what an attempt leaves a Call with.
type Outcome uint8

const (
	// Delivered: the target answered 2xx; the call is complete.
	Delivered Outcome = iota
	// Retry: the attempt failed in a retryable way; attempt again after
	// Step.After.
	Retry
	// Failed: the call failed for good; Step.Err is a permanent *Error.
	Failed
	// Canceled: ctx ended first; Step.Err is an *Error that is not
	// permanent. The request should be tried again later (redelivery).
	Canceled
)

// Step is the result of one Attempt.
type Step struct {
	Outcome Outcome
	After   time.Duration // Retry: the backoff before the next attempt
	Err     error         // Failed, Canceled: an *Error
	// Latency is the attempt's round trip, from sending to the drained
	// answer, when the target answered other than with a retryable status
	// (0 otherwise): a sample of its load.
	Latency time.Duration
}

// Send delivers req, retrying as configured, and returns once it succeeded,
// failed permanently, or ctx is done. Every attempt carries req.Header,
// Idempotency-Key: idempotencyKey (omitted if empty) and User-Agent:
// orderly/<version>; these two override configured headers of the same name,
// and a configured Host header sets the request's Host. req is not modified.
// Send blocks through the backoffs; the dispatcher uses Attempt instead.
//
// On failure the error is an *Error (see IsPermanent) and the Result still
// holds the attempts made and the last status. The Result keeps the last
// answer's headers and body (Call.Capture).
func (s *Sender) Send(ctx context.Context, req *filters.Request, idempotencyKey string) (Result, error) {
	var c Call
	c.Reset(req, idempotencyKey)
	c.Capture()
	var t *time.Timer
	defer func() {
		if t != nil {
			t.Stop()
		}
	}()
	for {
		st := s.Attempt(ctx, &c)
		switch st.Outcome {
		case Delivered:
			return Result{Status: c.status, Attempts: c.attempts, Counted: c.counted, Response: c.resp}, nil
		case Failed, Canceled:
			return Result{Status: c.status, Attempts: c.attempts, Counted: c.counted, Response: c.resp}, st.Err
		}
		if t == nil {
			t = time.NewTimer(st.After)
		} else {
			t.Reset(st.After)
		}
		select {
		case <-ctx.Done():
			return Result{Status: c.status, Attempts: c.attempts, Counted: c.counted}, c.canceled(ctx)
		case <-t.C:
		}
	}
}

// prepare resolves the target and builds what every attempt of c shares.
func (s *Sender) prepare(c *Call) error {
	r := c.req
	if !httpguts.ValidHeaderFieldName(r.Method) {
		return fmt.Errorf("unable to build the request: invalid method %q", r.Method)
	}
	u, err := url.Parse(r.URL)
	if err != nil {
		// Not err itself: *url.Error quotes the whole URL, query included.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("unable to build %s request: invalid URL: %w", r.Method, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("unable to build %s request: unsupported protocol scheme %q", r.Method, u.Scheme)
	}
	if u.Host == "" {
		return fmt.Errorf("unable to build %s request: no host in URL", r.Method)
	}
	target := r.Target
	if target == "" {
		target = filters.TargetOf(u)
	}
	h := make(http.Header, len(r.Header)+2)
	for k, v := range r.Header {
		h[k] = v
	}
	if c.idem[0] != "" {
		h["Idempotency-Key"] = c.idem[:]
	} else {
		delete(h, "Idempotency-Key")
	}
	h["User-Agent"] = s.userAgent
	if host := r.Header.Get("Host"); host != "" {
		c.host = host
	}
	if len(r.Body) > 0 && c.getBody == nil {
		c.getBody = c.copyBody // bound once, as trace's hook: a Call is reused in place
	}
	if err := s.prepareTarget(c, h); err != nil {
		return err
	}
	c.u, c.header, c.tg = u, h, s.target(target)
	return nil
}

// newRequest returns the *http.Request of one attempt.
func (c *Call) newRequest(ctx context.Context, h http.Header) *http.Request {
	r := &http.Request{Method: c.req.Method, URL: c.u, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header: h, Host: c.host}
	if b := c.req.Body; len(b) > 0 {
		r.Body, r.ContentLength, r.GetBody = newBody(b), int64(len(b)), c.getBody
	}
	return r.WithContext(ctx)
}

// what names c's request in error messages and logs, without user info or
// query.
func (c *Call) what() string {
	if c.u == nil {
		u, _, _ := strings.Cut(c.req.URL, "?")
		if scheme, rest, ok := strings.Cut(u, "://"); ok {
			if i := strings.IndexByte(rest, '@'); i >= 0 && !strings.Contains(rest[:i], "/") {
				u = scheme + "://" + rest[i+1:]
			}
		}
		return c.req.Method + " " + u
	}
	return c.req.Method + " " + safeURL(c.u)
}

// canceled is the error of a call whose ctx ended.
func (c *Call) canceled(ctx context.Context) error {
	return &Error{Status: c.status, Attempts: c.attempts, Counted: c.counted, Err: fmt.Errorf("unable to send %s: %w", c.what(), ctx.Err())}
}

// copyBody is the GetBody of c's requests: a new body over the request's.
func (c *Call) copyBody() (io.ReadCloser, error) { return newBody(c.req.Body), nil }

// newBody returns a request body over b; a fresh one per attempt, because
// net/http may still read (or close) the previous one after RoundTrip
// returned. It must be an io.NopCloser around a *bytes.Reader: net/http
// recognises that as in memory and writes headers and body with one write
// (any other reader gets its headers flushed first, a second syscall per
// request).
func newBody(b []byte) io.ReadCloser {
	return io.NopCloser(bytes.NewReader(b))
}

func (s *Sender) retryable(status int) bool {
	return status >= 0 && status < len(s.retryStatus) && s.retryStatus[status]
}

// safeURL renders u for error messages without user info or query.
func safeURL(u *url.URL) string {
	return u.Scheme + "://" + u.Host + u.Path
}

// drain reads up to drainLimit bytes of body and closes it, so that the
// connection can be reused when the body was small enough. An empty body
// (http.NoBody, what net/http gives a Content-Length: 0 answer) costs
// nothing; others are read through a pooled buffer.
func drain(body io.ReadCloser) {
	if body != http.NoBody {
		bp := drainBufs.Get().(*[]byte)
		for n := 0; n < drainLimit; {
			m, err := body.Read((*bp)[:min(len(*bp), drainLimit-n)])
			n += m
			if err != nil {
				break
			}
		}
		drainBufs.Put(bp)
	}
	_ = body.Close()
}

var drainBufs = sync.Pool{New: func() any { b := make([]byte, 4096); return &b }}

// positiveOr returns v, or def when v is not positive (unset or invalid).
func positiveOr[T int | time.Duration](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}
