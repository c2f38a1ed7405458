// Package httpclient sends Orderly's HTTP requests: one Sender per service,
// over a tuned keep-alive transport, with retries (exponential backoff with
// jitter, Retry-After honoured, through go-retryablehttp's backoff and
// transport-error policy) and a circuit breaker per target host:port
// (sony/gobreaker).
//
// Send's contract, which the dispatcher relies on:
//   - success is a 2xx answer;
//   - a status in retry_statuses, a connection error or a per-attempt
//     timeout is retried until max_attempts (0 = forever); when attempts run
//     out the error is permanent;
//   - any other status is permanent at once (the message is dead-lettered);
//   - while a target's breaker is open (or half-open and busy), Send waits
//     without spending attempts: an outage is never a permanent failure;
//   - when ctx ends, Send returns promptly with an error that is not
//     permanent (the message is abandoned, to be redelivered).
package httpclient

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sony/gobreaker/v2"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Options configures a Sender.
type Options struct {
	HTTP    config.HTTP
	Version string             // User-Agent: orderly/<Version>
	Metrics *telemetry.Metrics // required
	Logger  *slog.Logger       // nil discards
	// Propagate, if set, injects trace context into each attempt's headers.
	Propagate func(ctx context.Context, h http.Header)
}

// Result describes a successful Send.
type Result struct {
	Status   int
	Attempts int
}

// Error is a failed Send. Permanent errors mean the request will never
// succeed as it is (dead-letter it); others mean ctx ended.
type Error struct {
	Status    int // last HTTP status, 0 if none
	Attempts  int
	Permanent bool
	Err       error
}

func (e *Error) Error() string {
	if e.Status != 0 {
		return fmt.Sprintf("HTTP %d after %d attempt(s): %v", e.Status, e.Attempts, e.Err)
	}
	return fmt.Sprintf("after %d attempt(s): %v", e.Attempts, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// IsPermanent reports whether err is a permanent delivery failure.
func IsPermanent(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Permanent
}

// errBreakerOpen marks an attempt refused by an open breaker.
var errBreakerOpen = errors.New("circuit breaker open")

// Sender sends requests. It is safe for concurrent use; Close it when done.
type Sender struct {
	o         Options
	client    *http.Client
	transport *http.Transport
	userAgent string
	retryable [600]bool
	log       *slog.Logger

	mu       sync.Mutex // protects breakers
	breakers map[string]*target
}

// target is the per host:port state.
type target struct {
	host     string
	cb       *gobreaker.TwoStepCircuitBreaker[struct{}]
	requests map[int]prometheus.Counter // by status; guarded by Sender.mu when created
	errors   prometheus.Counter
	duration prometheus.Observer
	retries  prometheus.Counter
}

// New returns a Sender for the given options.
func New(o Options) *Sender {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := o.HTTP
	maxAge := h.MaxConnAge.D()
	dialer := &net.Dialer{Timeout: min(h.Timeout.D(), 10*time.Second), KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err != nil || maxAge <= 0 {
				return c, err
			}
			return &agedConn{Conn: c, born: time.Now()}, nil
		},
		MaxConnsPerHost:       h.MaxConnsPerHost,
		MaxIdleConns:          0,
		MaxIdleConnsPerHost:   max(h.MaxConnsPerHost, 64),
		IdleConnTimeout:       h.IdleConnTimeout.D(),
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		ForceAttemptHTTP2:     false, // one connection per concurrent request spreads over L4 balancers
	}
	s := &Sender{
		o: o, transport: tr, log: log,
		client:    &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }},
		userAgent: "orderly/" + o.Version,
		breakers:  make(map[string]*target),
	}
	for _, st := range h.Retry.RetryStatuses {
		if st >= 0 && st < len(s.retryable) {
			s.retryable[st] = true
		}
	}
	return s
}

// Close closes idle connections.
func (s *Sender) Close() { s.transport.CloseIdleConnections() }

func (s *Sender) target(host string) *target {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t := s.breakers[host]; t != nil {
		return t
	}
	m := s.o.Metrics
	t := &target{host: host, requests: make(map[int]prometheus.Counter),
		errors:   m.HTTPRequests.WithLabelValues(host, "error"),
		duration: m.HTTPDuration.WithLabelValues(host),
		retries:  m.HTTPRetries.WithLabelValues(host)}
	if b := s.o.HTTP.Breaker; b.Enabled {
		t.cb = gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
			Name:        host,
			MaxRequests: uint32(b.HalfOpenRequests),
			Interval:    10 * time.Second,
			Timeout:     b.OpenTimeout.D(),
			ReadyToTrip: func(c gobreaker.Counts) bool {
				if b.ConsecutiveFailures > 0 && int(c.ConsecutiveFailures) >= b.ConsecutiveFailures {
					return true
				}
				return int(c.Requests) >= b.MinRequests && float64(c.TotalFailures)/float64(c.Requests) >= b.FailureRatio
			},
			OnStateChange: func(name string, from, to gobreaker.State) {
				s.log.Warn("circuit breaker state change", "host", name, "from", from.String(), "to", to.String())
				m.BreakerChanges.WithLabelValues(name, to.String()).Inc()
				m.BreakerState.WithLabelValues(name).Set(breakerGauge(to))
			},
			IsExcluded: func(err error) bool { return errors.Is(err, context.Canceled) },
		})
		m.BreakerState.WithLabelValues(host).Set(telemetry.BreakerClosed)
	}
	s.breakers[host] = t
	return t
}

func breakerGauge(st gobreaker.State) float64 {
	switch st {
	case gobreaker.StateOpen:
		return telemetry.BreakerOpen
	case gobreaker.StateHalfOpen:
		return telemetry.BreakerHalfOpen
	}
	return telemetry.BreakerClosed
}

func (t *target) requestCounter(s *Sender, status int) prometheus.Counter {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := t.requests[status]
	if c == nil {
		c = s.o.Metrics.HTTPRequests.WithLabelValues(t.host, strconv.Itoa(status))
		t.requests[status] = c
	}
	return c
}

// Send sends req, retrying as configured. See the package doc for the
// contract. The request's body is not modified.
func (s *Sender) Send(ctx context.Context, req *filters.Request, idempotencyKey string) (Result, error) {
	u, err := url.Parse(req.URL)
	if err != nil || u.Host == "" {
		return Result{}, &Error{Permanent: true, Err: fmt.Errorf("invalid URL %q: %v", req.URL, err)}
	}
	t := s.target(u.Host)
	r := s.o.HTTP.Retry
	attempts := 0
	var lastStatus int
	var lastErr error
	for {
		if err := ctx.Err(); err != nil {
			return Result{}, &Error{Status: lastStatus, Attempts: attempts, Err: err}
		}
		var done func(error)
		if t.cb != nil {
			d, err := t.cb.Allow()
			if err != nil {
				// Open, or half-open with every probe taken: wait without
				// spending an attempt.
				if !sleep(ctx, s.breakerPoll()) {
					return Result{}, &Error{Status: lastStatus, Attempts: attempts, Err: ctx.Err()}
				}
				continue
			}
			done = d
		}
		attempts++
		if attempts > 1 {
			t.retries.Inc()
		}
		status, resp, err := s.attempt(ctx, t, u, req, idempotencyKey)
		outcome := classify(ctx, status, err, &s.retryable)
		if done != nil {
			switch outcome {
			case success, permanent:
				done(nil) // the target answered
			case canceled:
				done(context.Canceled)
			default:
				done(errBreakerOpen) // any non-nil error counts as a failure
			}
		}
		switch outcome {
		case success:
			return Result{Status: status, Attempts: attempts}, nil
		case canceled:
			return Result{}, &Error{Status: status, Attempts: attempts, Err: ctx.Err()}
		case permanent:
			return Result{}, &Error{Status: status, Attempts: attempts, Permanent: true, Err: statusError(status, err)}
		}
		lastStatus, lastErr = status, err
		if r.MaxAttempts > 0 && attempts >= r.MaxAttempts {
			return Result{}, &Error{Status: lastStatus, Attempts: attempts, Permanent: true,
				Err: fmt.Errorf("retries exhausted: %w", statusError(lastStatus, lastErr))}
		}
		if !sleep(ctx, s.backoff(attempts, resp)) {
			return Result{}, &Error{Status: lastStatus, Attempts: attempts, Err: ctx.Err()}
		}
	}
}

func statusError(status int, err error) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("status %d %s", status, http.StatusText(status))
}

type outcomeKind int

const (
	success outcomeKind = iota
	retry
	permanent
	canceled
)

func classify(ctx context.Context, status int, err error, retryable *[600]bool) outcomeKind {
	if ctx.Err() != nil {
		return canceled
	}
	if err != nil {
		// go-retryablehttp's policy knows which transport errors never
		// heal (bad scheme, bad TLS certificate, too many redirects).
		if ok, _ := retryablehttp.DefaultRetryPolicy(context.Background(), nil, err); ok {
			return retry
		}
		return permanent
	}
	switch {
	case status >= 200 && status < 300:
		return success
	case status > 0 && status < len(retryable) && retryable[status]:
		return retry
	}
	return permanent
}

// backoff is go-retryablehttp's exponential backoff (which honours
// Retry-After in seconds or as an HTTP date on 429 and 503), capped at
// max_backoff, with equal jitter when the server gave no Retry-After.
func (s *Sender) backoff(attempt int, resp *http.Response) time.Duration {
	lo, hi := s.o.HTTP.Retry.InitialBackoff.D(), s.o.HTTP.Retry.MaxBackoff.D()
	d := retryablehttp.DefaultBackoff(lo, hi, attempt-1, resp)
	if resp != nil && resp.Header.Get("Retry-After") != "" && (resp.StatusCode == 429 || resp.StatusCode == 503) {
		return min(d, hi)
	}
	d = min(d, hi)
	if half := d / 2; half > 0 {
		d = half + rand.N(half+1)
	}
	return d
}

func (s *Sender) breakerPoll() time.Duration {
	return max(min(s.o.HTTP.Breaker.OpenTimeout.D()/10, 100*time.Millisecond), time.Millisecond)
}

// attempt performs one round trip. The response returned (for Retry-After)
// has its body drained and closed.
func (s *Sender) attempt(ctx context.Context, t *target, u *url.URL, req *filters.Request, idem string) (int, *http.Response, error) {
	actx, cancel := context.WithTimeout(ctx, s.o.HTTP.Timeout.D())
	defer cancel()
	var expired *agedConn
	if age := s.o.HTTP.MaxConnAge.D(); age > 0 {
		actx = httptrace.WithClientTrace(actx, &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
			if c, ok := info.Conn.(*agedConn); ok && time.Since(c.born) >= age {
				expired = c
			}
		}})
	}
	var body io.Reader
	if len(req.Body) > 0 {
		body = bytes.NewReader(req.Body)
	}
	hr, err := http.NewRequestWithContext(actx, req.Method, req.URL, body)
	if err != nil {
		return 0, nil, err
	}
	for k, vs := range req.Header {
		hr.Header[k] = vs
	}
	hr.Header.Set("Idempotency-Key", idem)
	hr.Header.Set("User-Agent", s.userAgent)
	if s.o.Propagate != nil {
		s.o.Propagate(ctx, hr.Header)
	}
	start := time.Now()
	resp, err := s.client.Do(hr)
	t.duration.Observe(time.Since(start).Seconds())
	if err != nil {
		t.errors.Inc()
		if expired != nil {
			expired.Close()
		}
		return 0, nil, err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if expired != nil {
		// The connection outlived max_conn_age: close it now that it is
		// idle, so the next request dials anew and an L4 load balancer
		// can place it elsewhere.
		expired.Close()
	}
	t.requestCounter(s, resp.StatusCode).Inc()
	return resp.StatusCode, resp, nil
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// agedConn is a connection that knows when it was dialled.
type agedConn struct {
	net.Conn
	born time.Time
	once sync.Once
}

func (c *agedConn) Close() error {
	var err error
	c.once.Do(func() { err = c.Conn.Close() })
	return err
}
