package httpclient

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"time"

	"github.com/hashicorp/go-retryablehttp"

	"github.com/orderly-dispatch/orderly/telemetry"
)

// attemptTransport is the RoundTripper of the go-retryablehttp client: each
// RoundTrip is one attempt, guarded by the target's breaker. It has no
// CloseIdleConnections method on purpose (see the package doc).
type attemptTransport struct{ s *Sender }

var _ http.RoundTripper = (*attemptTransport)(nil)

// Breaker outcomes reported through TwoStepCircuitBreaker's done callback.
var (
	errAttemptFailed = errors.New("attempt failed")   // counts as a breaker failure
	errExcluded      = errors.New("attempt excluded") // neither success nor failure
)

// RoundTrip makes one attempt. It returns the response with its body already
// drained and closed (replaced by http.NoBody); status and headers remain
// for CheckRetry and Backoff.
func (t *attemptTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	s := t.s
	ctx := req.Context()
	st, _ := ctx.Value(stateKey{}).(*sendState)
	if st == nil || st.target == nil { // not sent through Send; keep it working anyway
		st = &sendState{target: s.target(hostKey(req.URL))}
	}
	tg := st.target

	var done func(error)
	if tg.breaker != nil {
		var err error
		if done, err = s.admit(ctx, tg); err != nil {
			if req.Body != nil {
				_ = req.Body.Close()
			}
			return nil, err
		}
	}

	st.attempts++
	if st.attempts > 1 {
		tg.retries.Inc()
	}
	actx := ctx
	if s.timeout > 0 {
		var cancel context.CancelFunc
		actx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	if s.connTrace != nil {
		tr := s.connTrace
		if httptrace.ContextClientTrace(actx) != nil {
			// WithClientTrace composes into (mutates) its argument when the
			// context already holds a trace: give it a private copy.
			c := *s.connTrace
			tr = &c
		}
		actx = httptrace.WithClientTrace(actx, tr)
	}
	actx, span := s.tracing.StartAttemptURL(actx, req.Method, req.URL, st.attempts)
	r := req.WithContext(actx)
	if s.propagate != nil {
		r.Header = req.Header.Clone()
		s.propagate(actx, r.Header)
	}

	start := time.Now()
	resp, err := s.transport.RoundTrip(r)
	if err == nil {
		drain(resp.Body)
		resp.Body = http.NoBody
	}
	tg.duration.Observe(time.Since(start).Seconds())
	if err != nil {
		telemetry.EndAttempt(span, 0, err)
	} else {
		telemetry.EndAttempt(span, resp.StatusCode, nil)
	}

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
		st.status, st.lastErr = 0, err
		return nil, err
	}
	tg.statusCounter(resp.StatusCode).Inc()
	st.status, st.lastErr = resp.StatusCode, nil
	return resp, nil
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

// backoff is the go-retryablehttp Backoff policy. On 429 and 503 a
// Retry-After header (seconds or HTTP-date) decides, capped at hi. Otherwise
// the wait is exponential with equal jitter: ceiling = lo*2^attempt capped at
// hi, wait uniformly in [ceiling/2, ceiling], never below lo.
func backoff(lo, hi time.Duration, attempt int, resp *http.Response) time.Duration {
	hi = max(hi, lo)
	if resp != nil && (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable) {
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
