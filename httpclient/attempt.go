package httpclient

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-retryablehttp"
	"go.opentelemetry.io/otel/trace"

	"github.com/orderly-dispatch/orderly/telemetry"
)

// Breaker outcomes reported through TwoStepCircuitBreaker's done callback.
var (
	errAttemptFailed = errors.New("attempt failed")   // counts as a breaker failure
	errExcluded      = errors.New("attempt excluded") // neither success nor failure
)

// Attempt makes the next attempt of c and says what comes next: Delivered,
// Retry after Step.After, Failed (permanent) or Canceled (ctx ended). It
// waits while the target's breaker refuses (without counting an attempt) and
// for the round trip itself, never for a backoff: that wait is the caller's.
// A request that cannot be built at all fails at once.
func (s *Sender) Attempt(ctx context.Context, c *Call) Step {
	if c.tg == nil {
		if err := s.prepare(c); err != nil {
			return Step{Outcome: Failed, Err: &Error{Permanent: true, Err: err}}
		}
	}
	tg := c.tg
	var done func(error)
	if tg.breaker != nil {
		var err error
		if done, err = s.admit(ctx, tg); err != nil {
			return Step{Outcome: Canceled, Err: &Error{Status: c.status, Attempts: c.attempts,
				Err: fmt.Errorf("unable to send %s: %w", c.what(), err)}}
		}
	}
	c.attempts++
	if c.attempts > 1 {
		tg.retries.Inc()
	}
	resp, err := s.roundTrip(ctx, c)

	outcome := error(nil)
	switch {
	case ctx.Err() != nil:
		// The caller gave up (shutdown, revoke): says nothing about the target.
		outcome = errExcluded
	case err != nil:
		outcome = errAttemptFailed
	case resp.StatusCode >= 500 || s.retryable(resp.StatusCode):
		outcome = errAttemptFailed
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
	return s.verdict(ctx, c, resp, err)
}

// roundTrip sends one attempt of c and returns the response with its body
// drained and closed (replaced by http.NoBody); status and headers remain.
func (s *Sender) roundTrip(ctx context.Context, c *Call) (*http.Response, error) {
	actx := ctx
	if s.timeout > 0 {
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel() // after the drain: the body is read under the same limit
	}
	actx = s.withConnTrace(actx, c)
	actx, span := s.tracing.StartAttemptURL(actx, c.req.Method, c.u, c.attempts)
	h := c.header
	if s.propagate != nil && trace.SpanContextFromContext(actx).IsValid() {
		h = h.Clone()
		s.propagate(actx, h)
	}
	c.sending = h // for gotConn

	start := time.Now()
	resp, err := s.transport.RoundTrip(c.newRequest(actx, h))
	if err == nil {
		drain(resp.Body)
		resp.Body = http.NoBody
	}
	c.tg.duration.Observe(time.Since(start).Seconds())
	if err != nil {
		// As http.Client reports it: "Post "http://host/path": ...".
		err = &url.Error{Op: urlErrorOp(c.req.Method), URL: safeURL(c.u), Err: err}
		telemetry.EndAttempt(span, 0, err)
	} else {
		telemetry.EndAttempt(span, resp.StatusCode, nil)
	}
	return resp, err
}

// verdict classifies the attempt just made.
func (s *Sender) verdict(ctx context.Context, c *Call, resp *http.Response, err error) Step {
	if ctx.Err() != nil {
		return Step{Outcome: Canceled, Err: c.canceled(ctx)}
	}
	fail := func(err error) Step {
		return Step{Outcome: Failed, Err: &Error{Status: c.status, Attempts: c.attempts, Permanent: true, Err: err}}
	}
	if err != nil {
		// Decides which transport errors are hopeless (bad scheme, invalid
		// header, untrusted certificate); the rest are retried.
		if retry, _ := retryablehttp.ErrorPropagatedRetryPolicy(ctx, nil, err); !retry {
			return fail(fmt.Errorf("unable to send %s: %w", c.what(), err))
		}
	} else {
		if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			return Step{Outcome: Delivered}
		}
		if !s.retryable(resp.StatusCode) {
			return fail(fmt.Errorf("%w: %s answered %d", ErrStatus, c.what(), resp.StatusCode))
		}
	}
	if s.maxAttempts > 0 && c.attempts >= s.maxAttempts {
		if err != nil {
			return fail(fmt.Errorf("%w after %d attempts: %w", ErrRetriesExhausted, c.attempts, err))
		}
		return fail(fmt.Errorf("%w after %d attempts: %s answered %d", ErrRetriesExhausted, c.attempts, c.what(), resp.StatusCode))
	}
	return Step{Outcome: Retry, After: backoff(s.initialBackoff, s.maxBackoff, c.attempts-1, resp)}
}

// withConnTrace attaches c's GotConn hook (the max_conn_age check) to ctx,
// unless max_conn_age is off.
func (s *Sender) withConnTrace(ctx context.Context, c *Call) context.Context {
	if s.maxConnAge <= 0 {
		return ctx
	}
	if c.trace.GotConn == nil {
		c.trace.GotConn = c.gotConn
	}
	tr := &c.trace
	if httptrace.ContextClientTrace(ctx) != nil {
		// WithClientTrace composes into (mutates) its argument when the
		// context already holds a trace: give it a private copy.
		cp := c.trace
		tr = &cp
	}
	return httptrace.WithClientTrace(ctx, tr)
}

// urlErrorOp is the Op of a *url.Error for method, as http.Client spells
// it ("Post", "Get").
func urlErrorOp(method string) string {
	if method == "" {
		return "Get"
	}
	return method[:1] + strings.ToLower(method[1:])
}

// admit waits until tg's breaker admits a request and returns its done
// callback. It gives up only when ctx is done. Waiting spends no attempt.
func (s *Sender) admit(ctx context.Context, tg *target) (func(error), error) {
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
	}
}

// backoff is the wait before attempt number attempt+2 (attempt counts the
// failed attempts before the last one). On 429 and 503 a Retry-After header
// (seconds or HTTP-date) decides, capped at hi. Otherwise the wait is
// exponential with equal jitter: ceiling = lo*2^attempt capped at hi, wait
// uniformly in [ceiling/2, ceiling], never below lo.
func backoff(lo, hi time.Duration, attempt int, resp *http.Response) time.Duration {
	hi = max(hi, lo)
	if resp != nil && (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable) {
		// Seconds beyond hi are capped here: go-retryablehttp multiplies
		// them into a Duration unchecked, and a huge value wraps around
		// to a short wait.
		if v := resp.Header.Get("Retry-After"); v != "" {
			if secs, err := strconv.ParseInt(v, 10, 64); err == nil && secs > int64(hi/time.Second) {
				return hi
			}
		}
		// With min = max = 0 DefaultBackoff returns exactly the parsed
		// Retry-After, and 0 when there is none (or it is unparsable or in
		// the past, which all mean: no server-imposed wait).
		if ra := retryablehttp.DefaultBackoff(0, 0, 0, resp); ra > 0 {
			return min(ra, hi)
		}
	}
	ceiling := hi
	if lo > 0 && attempt >= 0 && attempt < 62 {
		if c := lo << attempt; c>>attempt == lo && c < hi {
			ceiling = c
		}
	}
	half := ceiling / 2
	return max(half+rand.N(ceiling-half+1), lo)
}
