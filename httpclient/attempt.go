package httpclient

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/trace"

	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Breaker outcomes reported through TwoStepCircuitBreaker's done callback.
var (
	errAttemptFailed = errors.New("attempt failed")   // counts as a breaker failure
	errExcluded      = errors.New("attempt excluded") // neither success nor failure
)

// Reasons an attempt spent no attempt of max_attempts, as logged.
const (
	uncountedRetryAfter    = "retry_after"    // a 429 or 503 with Retry-After: the target asked for the wait
	uncountedProbe         = "probe"          // a half-open probe
	uncountedBreakerOpen   = "breaker_open"   // the breaker is open after the failure
	uncountedTargetFailing = "target_failing" // another call failed since the target's last success
	uncountedConnection    = "connection"     // no connection, and no other call succeeded meanwhile
	uncountedUnavailable   = "unavailable"    // 429, 502, 503 or 504, and no other call succeeded meanwhile
)

// unavailable reports whether status says the target (or the gateway in
// front of it) cannot serve anyone right now, whatever the request: such an
// answer is no evidence against the message.
func unavailable(status int) bool {
	switch status {
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// breakerFailure reports whether an answer with status counts against the
// target's breaker: a 5xx says the target is not well, but for 501, which
// only says it does not implement what was asked. A 4xx (429 and 408
// included) is about the request or the client, not the target's health.
func breakerFailure(status int) bool {
	return status >= 500 && status != http.StatusNotImplemented
}

// Attempt makes the next attempt of c and says what comes next: Delivered,
// Retry after Step.After, Failed (permanent) or Canceled (ctx ended). It
// waits while the target's breaker refuses (without counting an attempt) and
// for the round trip itself, never for a backoff: that wait is the caller's.
// While the target is paused by a Retry-After it sends nothing and returns
// Retry with the rest of the pause, counting no attempt; so it does while a
// named target has no token of its rate or no room under its concurrency
// limit (limits.go), with the wait for either. A request that
// cannot be built at all fails at once.
func (s *Sender) Attempt(ctx context.Context, c *Call) Step { return s.attempt(ctx, c, nil) }

// attempt is Attempt, made in sl when it is not nil.
func (s *Sender) attempt(ctx context.Context, c *Call, sl *Slot) Step {
	if c.tg == nil {
		if err := s.prepare(c); err != nil {
			return Step{Outcome: Failed, Err: &Error{Permanent: true, Err: err}}
		}
	}
	tg := s.acquire(c)
	defer s.release(tg)
	if wait := tg.pausedNow(); wait > 0 {
		return Step{Outcome: Retry, After: wait}
	}
	fl := c.named.flow()
	if fl != nil {
		if wait := fl.takeToken(c, time.Now()); wait > 0 {
			return Step{Outcome: Retry, After: wait} // rate limited: no attempt (limits.go)
		}
	}
	if st, ok := s.authorize(ctx, c); !ok {
		return st // no OAuth2 token: no attempt (auth.go)
	}
	var done func(error)
	probe, trip := false, uint64(0)
	if tg.breaker != nil {
		var err error
		if done, err = s.admit(ctx, tg, c.id); err != nil {
			tg.ended(c.id)
			return Step{Outcome: Canceled, Err: &Error{Status: c.status, Attempts: c.attempts, Counted: c.counted,
				Err: fmt.Errorf("unable to send %s: %w", c.what(), err)}}
		}
		// A Retry-After may have paused the target during the wait.
		if wait := tg.pausedNow(); wait > 0 {
			done(errExcluded)
			return Step{Outcome: Retry, After: wait}
		}
		// Admitted while the breaker is not closed: a half-open probe. The
		// trip record read now is that of the open period before it.
		if gobreaker.State(tg.state.Load()) != gobreaker.StateClosed {
			probe, trip = true, tg.soloTrip.Load()
		}
	}
	var cs slot
	if fl != nil && fl.conc != nil {
		var ok bool
		if cs, ok = fl.conc.acquire(time.Now()); !ok {
			if done != nil {
				done(errExcluded)
			}
			return Step{Outcome: Retry, After: concurrencyWait()} // over the target's concurrency limit (limits.go)
		}
	}
	c.attempts++
	if c.attempts > 1 {
		tg.retries.Inc()
	}
	resp, latency, err := s.roundTrip(ctx, c, sl)
	if cs.c != nil {
		cs.end(loadSignal(ctx, resp, err), latency)
	}
	if st, ok := s.unauthorized(ctx, c, tg, resp, err, done); ok {
		return st // the first 401 with an OAuth2 token (auth.go)
	}

	outcome, retry := error(nil), false
	switch {
	case ctx.Err() != nil:
		// The caller gave up (shutdown, revoke): says nothing about the target.
		outcome = errExcluded
	case err != nil:
		outcome = errAttemptFailed
		// Decides which transport errors are hopeless (bad scheme, invalid
		// header, untrusted certificate); the rest are retried.
		retry, _ = retryablehttp.ErrorPropagatedRetryPolicy(ctx, nil, err)
	default:
		retry = s.retryable(resp.StatusCode)
		switch {
		case breakerFailure(resp.StatusCode):
			outcome = errAttemptFailed
		case retry:
			// 429, 408, ...: neither a failure nor proof of health.
			outcome = errExcluded
		default:
			tg.succeeded()
		}
	}
	// A retryable failure goes on the health record before the breaker
	// hears of it, so that a trip it causes knows which calls failed.
	var othersFailed, otherSucceeded bool
	if retry {
		if c.id == 0 {
			c.id = s.callID(c)
		}
		var why string
		if err != nil {
			why = err.Error() // names the method and URL (roundTrip's *url.Error)
		} else {
			why = fmt.Sprintf("%s answered %d", c.what(), resp.StatusCode)
		}
		var starts bool
		othersFailed, otherSucceeded, starts = tg.failed(c, why)
		if starts {
			s.failing(tg, why)
		} else {
			s.stillFailing(tg)
		}
	}
	// The target asked for a wait: no attempt to it starts before it ends.
	var pause time.Duration
	if retry && err == nil {
		if pause = retryAfter(resp, s.maxRetryAfter); pause > 0 {
			s.pause(tg, c, resp.StatusCode, pause)
		}
	}
	if done != nil {
		done(outcome)
	}
	if err != nil {
		tg.errors.Inc()
		c.status = 0
	} else {
		tg.statusCounter(resp.StatusCode).Inc()
		c.status = resp.StatusCode
	}

	reason := ""
	if retry {
		// c.id is set: a trip record of 0 (several calls) never matches it.
		switch {
		case pause > 0:
			reason = uncountedRetryAfter
		case probe && trip != c.id:
			reason = uncountedProbe
		case tg.breaker != nil && gobreaker.State(tg.state.Load()) == gobreaker.StateOpen && tg.soloTrip.Load() != c.id:
			reason = uncountedBreakerOpen
		case othersFailed:
			reason = uncountedTargetFailing
		case err != nil && !c.connected && !otherSucceeded:
			reason = uncountedConnection
		case err == nil && unavailable(resp.StatusCode) && !otherSucceeded:
			reason = uncountedUnavailable
		}
	}
	if reason == "" {
		c.counted++
	} else {
		tg.uncounted.Inc()
		if s.log.Enabled(ctx, slog.LevelDebug) {
			s.log.Debug("failed attempt not counted toward max_attempts", "host", tg.host, "reason", reason,
				"request", c.what(), "attempts", c.attempts, "counted", c.counted, "status", c.status)
		}
	}
	st := s.verdict(ctx, c, resp, err, retry, pause)
	if st.Outcome != Retry {
		tg.ended(c.id)
	}
	if err == nil && !retry {
		// A 429 or 5xx that is retried says nothing of how fast the target
		// serves: a target failing fast would set the sender limit's base
		// far below its latency once it recovers.
		st.Latency = latency
	}
	return st
}

// pause pauses tg for d after c was answered status with a Retry-After, and
// logs a pause that starts (at most one line per target every 30 s).
func (s *Sender) pause(tg *target, c *Call, status int, d time.Duration) {
	now := time.Now()
	if !tg.pause(now, d) {
		return
	}
	tg.pauses.Inc()
	last := tg.pauseLogged.Load()
	if now.UnixNano()-last < int64(failingLogEvery) || !tg.pauseLogged.CompareAndSwap(last, now.UnixNano()) {
		return
	}
	s.log.Warn("target paused: it answered with Retry-After, no request is sent to it until then",
		"host", tg.host, "request", c.what(), "status", status, "pause", d.String())
}

// failingLogEvery spaces the log lines of a target's failures (and the
// Retry-After pauses).
const failingLogEvery = 30 * time.Second

// failing logs that a target that answered (or had not been tried) now
// fails, with the first failure: what an operator needs to see a refused
// connection or a wrong URL. Together with stillFailing, at most one line
// per target every s.failingEvery (30 s).
func (s *Sender) failing(tg *target, why string) {
	if !s.failingLogDue(tg) {
		return
	}
	s.log.Warn("target failing: its requests are retried, see orderly_http_requests_total and the breaker", "host", tg.host, "error", why)
}

// stillFailing logs a summary of a target whose run of failures goes on:
// the newest failure, how many calls that failed wait for it, and since
// when it fails. It is called on the run's later failures (half-open
// probes, while the breaker is open), at most once per s.failingEvery.
// Keys queued behind the waiting calls are orderly_http_queued_lanes.
func (s *Sender) stillFailing(tg *target) {
	if !s.failingLogDue(tg) {
		return
	}
	now := time.Now()
	last, since, waiting := tg.failingSummary(now)
	if since.IsZero() {
		return // a success ended the run meanwhile
	}
	d := now.Sub(since)
	if d >= time.Second {
		d = d.Round(time.Second)
	} else {
		d = d.Round(time.Millisecond)
	}
	s.log.Warn("target still failing: its requests wait and are retried, keys queued behind them are orderly_http_queued_lanes",
		"host", tg.host, "error", last, "waiting_calls", waiting, "failing_for", d.String())
}

// failingLogDue reports whether a line about tg's failures may be logged
// now, and if so records that one is.
func (s *Sender) failingLogDue(tg *target) bool {
	now := time.Now().UnixNano()
	last := tg.failingLogged.Load()
	return now-last >= int64(s.failingEvery) && tg.failingLogged.CompareAndSwap(last, now)
}

// roundTrip sends one attempt of c, in sl if it is not nil, and returns the
// response with its body drained and closed (replaced by http.NoBody);
// status and headers remain. latency is the time from the start of the
// attempt (building its request) to the drained answer (or the error).
func (s *Sender) roundTrip(ctx context.Context, c *Call, sl *Slot) (resp *http.Response, latency time.Duration, err error) {
	start := time.Now()
	actx, traced := ctx, false
	switch {
	case s.timeout <= 0:
	case sl != nil && sl.ctx != nil && ctx.Err() == nil:
		actx, traced = sl.begin(ctx, start.Add(s.timeout), c.connTrace())
		defer sl.end() // after the drain: the body is read under the same limit
	default:
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	c.connected = false
	if !traced {
		actx = s.withConnTrace(actx, c)
	}
	actx, span := s.tracing.StartAttemptURL(actx, c.req.Method, c.u, c.attempts)
	h := c.attemptHeader() // a named target's token and signature (auth.go)
	if s.propagate != nil && trace.SpanContextFromContext(actx).IsValid() {
		h = h.Clone()
		s.propagate(actx, h)
	}
	c.sending = h // for gotConn

	resp, err = s.send(actx, c, h) // follows redirects if the target allows (redirects.go)
	if err != nil && dialFailed(err) {
		// A pooled connection found dead, then no new one: as good as
		// none (h1.go replays on a new connection).
		c.connected = false
	}
	if err == nil {
		var cut error
		if c.capture {
			cut = c.keep(resp)
		}
		drain(resp.Body)
		resp.Body = http.NoBody
		if cut != nil {
			// What a later request or the reply would read of this answer
			// is missing: the attempt failed as a transport error does, and
			// is sent again (with the same Idempotency-Key).
			resp, err = nil, fmt.Errorf("reading the answer (status %d): %w", resp.StatusCode, cut)
		}
	}
	latency = time.Since(start)
	c.tg.duration.Observe(latency.Seconds())
	if err != nil {
		// As http.Client reports it: "Post "http://host/path": ...".
		err = &url.Error{Op: urlErrorOp(c.req.Method), URL: safeURL(c.u), Err: err}
		telemetry.EndAttempt(span, 0, err)
	} else {
		telemetry.EndAttempt(span, resp.StatusCode, nil)
	}
	return resp, latency, err
}

// callID returns the id a failing call goes by on the health record: one
// derived from its Idempotency-Key, so that a message sent again in a new
// call (its partition revoked while the first call waited out a backoff,
// then assigned back) is the same failing call, not a second one making the
// target look down; a call without a key gets a number of its own (below
// 2^63, where no derived id is).
func (s *Sender) callID(c *Call) uint64 {
	if key := c.idem[0]; key != "" {
		h := fnv.New64a()
		_, _ = h.Write([]byte(key))
		return h.Sum64() | 1<<63
	}
	return s.callIDs.Add(1)
}

// keep records resp's status, headers and the start of its body as c's
// response; the rest of the body is left for drain. It returns the error of
// a body cut short (the connection, http.timeout), kept empty.
func (c *Call) keep(resp *http.Response) error {
	body, err := io.ReadAll(io.LimitReader(resp.Body, filters.MaxResponseBody+1))
	if err != nil {
		body = nil
	}
	c.resp = filters.Response{Status: resp.StatusCode, Header: resp.Header, Body: body}
	if len(body) > filters.MaxResponseBody {
		c.resp.Body, c.resp.Truncated = body[:filters.MaxResponseBody], true
	}
	return err
}

// verdict classifies the attempt just made; retry says whether it failed in
// a retryable way, pause how long the target asked to be left alone (0:
// it did not). The retries are exhausted once max_attempts attempts
// counted; the backoff grows with every attempt made.
func (s *Sender) verdict(ctx context.Context, c *Call, resp *http.Response, err error, retry bool, pause time.Duration) Step {
	if ctx.Err() != nil {
		return Step{Outcome: Canceled, Err: c.canceled(ctx)}
	}
	fail := func(err error) Step {
		return Step{Outcome: Failed, Err: &Error{Status: c.status, Attempts: c.attempts, Counted: c.counted, Permanent: true, Err: err}}
	}
	if err != nil {
		if !retry {
			return fail(fmt.Errorf("unable to send %s: %w", c.what(), err))
		}
	} else {
		if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			return Step{Outcome: Delivered}
		}
		if !retry {
			return fail(fmt.Errorf("%w: %s answered %d%s", ErrStatus, c.what(), resp.StatusCode, redirectNote(c, resp)))
		}
	}
	if s.maxAttempts > 0 && c.counted >= s.maxAttempts {
		after := strconv.Itoa(c.attempts) + " attempts"
		if c.counted != c.attempts {
			after += " (" + strconv.Itoa(c.counted) + " counted)"
		}
		if err != nil {
			return fail(fmt.Errorf("%w after %s: %w", ErrRetriesExhausted, after, err))
		}
		return fail(fmt.Errorf("%w after %s: %s answered %d", ErrRetriesExhausted, after, c.what(), resp.StatusCode))
	}
	if pause > 0 {
		return Step{Outcome: Retry, After: pause}
	}
	return Step{Outcome: Retry, After: backoff(s.initialBackoff, s.maxBackoff, c.attempts-1)}
}

// connTrace returns c's GotConn hook: it tells whether an attempt got a
// connection, and runs the max_conn_age check.
func (c *Call) connTrace() *httptrace.ClientTrace {
	if c.trace.GotConn == nil {
		c.trace.GotConn = c.gotConn
	}
	return &c.trace
}

// withConnTrace attaches c's GotConn hook (connTrace) to ctx.
func (s *Sender) withConnTrace(ctx context.Context, c *Call) context.Context {
	tr := c.connTrace()
	if httptrace.ContextClientTrace(ctx) != nil {
		// WithClientTrace composes into (mutates) its argument when the
		// context already holds a trace: give it a private copy.
		cp := c.trace
		tr = &cp
	}
	return httptrace.WithClientTrace(ctx, tr)
}

// dialFailed reports whether err is a failure to open a connection.
func dialFailed(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "dial"
}

// urlErrorOp is the Op of a *url.Error for method, as http.Client spells
// it ("Post", "Get").
func urlErrorOp(method string) string {
	if method == "" {
		return "Get"
	}
	return method[:1] + strings.ToLower(method[1:])
}

// admit waits until tg's breaker admits a request of the call with id (0:
// it has not failed) and returns its done callback. It gives up only when
// ctx is done. Waiting spends no attempt; a call that failed stays among
// the target's waiting calls meanwhile.
func (s *Sender) admit(ctx context.Context, tg *target, id uint64) (func(error), error) {
	done, err := tg.breaker.Allow()
	if err == nil {
		return done, nil
	}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		// Take the change channel before asking, so that a change between
		// the refusal and the select still wakes us.
		changed := tg.stateChanged()
		if done, err = tg.breaker.Allow(); err == nil {
			return done, nil
		}
		if timer == nil {
			timer = time.NewTimer(s.breakerPoll)
		} else {
			timer.Reset(s.breakerPoll)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the circuit breaker of %s: %w", tg.host, ctx.Err())
		case <-changed:
		case <-timer.C:
		}
		tg.seen(id)
	}
}

// retryAfter is the wait a 429 or 503 asks for in its Retry-After header
// (seconds or HTTP-date, parsed by go-retryablehttp), capped at hi; 0 when
// there is none, or it cannot be parsed, or it is not in the future.
func retryAfter(resp *http.Response, hi time.Duration) time.Duration {
	if resp == nil || (resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable) {
		return 0
	}
	v := resp.Header.Get("Retry-After")
	if v == "" {
		return 0
	}
	// Seconds beyond hi are capped here: go-retryablehttp multiplies them
	// into a Duration unchecked, and a huge value wraps around to a short
	// wait.
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil && secs > int64(hi/time.Second) {
		return hi
	}
	// With min = max = 0 DefaultBackoff returns exactly the parsed
	// Retry-After, and 0 when there is none.
	return min(max(retryablehttp.DefaultBackoff(0, 0, 0, resp), 0), hi)
}

// backoff is the wait before attempt number attempt+2 (attempt counts the
// failed attempts before the last one): exponential with equal jitter,
// ceiling = lo*2^attempt capped at hi, wait uniformly in [ceiling/2,
// ceiling], never below lo.
func backoff(lo, hi time.Duration, attempt int) time.Duration {
	hi = max(hi, lo)
	ceiling := hi
	if lo > 0 && attempt >= 0 && attempt < 62 {
		if c := lo << attempt; c>>attempt == lo && c < hi {
			ceiling = c
		}
	}
	half := ceiling / 2
	return max(half+rand.N(ceiling-half+1), lo)
}
