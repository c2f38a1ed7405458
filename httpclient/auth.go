package httpclient

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/orderly-dispatch/orderly/config"
)

// Targets is what the Sender applies to requests that name a configured
// target (filters.Request.TargetName): its TLS client configuration, its
// credentials, its static headers and its signing keys, loaded once by
// LoadTargets. It is immutable and may be given to several Senders.
//
// Per attempt to a named target, the Sender
//
//   - sends over a transport of the target's own, with its CA pool (ca_file
//     instead of the system roots) and client certificate (mutual TLS),
//     when it has a tls block (else over the shared one);
//   - adds the target's static headers (the request's own headers of the
//     same name win) and its Authorization (basic, bearer or OAuth2), which
//     wins over both;
//   - for oauth2, takes the token from a cache (the client credentials
//     token source under oauth2.ReuseTokenSourceWithExpiry): fetched on
//     first use and again when it is about to expire. A token that cannot
//     be fetched makes no attempt: the call waits (Retry, not counted) and
//     the failure is logged at warn at most every 30 s. A 401 answer drops
//     the cached token and retries the call at once, once per call,
//     without counting the attempt; a second 401 is a permanent failure
//     like any other 4xx. The token endpoint is reached with the system's
//     trusted CAs, http.timeout (10 s when 0), and no redirects;
//   - signs the request (see signing.go).
type Targets struct {
	byName map[string]*namedTarget
	// earlyExpiry is how long before its expiry an OAuth2 token is
	// replaced (oauth2's default, 10 s; tests shorten it).
	earlyExpiry time.Duration
}

// namedTarget is one target as loaded. Immutable once built.
type namedTarget struct {
	name   string
	tls    *tls.Config // nil: the shared transport's defaults
	header map[string][]string
	oauth  *clientcredentials.Config // nil unless auth.type = "oauth2"
	keys   [][]byte                  // signing keys, one signature each
	flow   flowConfig                // rate and concurrency limits (limits.go)
	// redirectOrigin is base_url's scheme://host:port when redirects are
	// followed (follow_redirects), "" when not (redirects.go).
	redirectOrigin string
}

// LoadTargets reads what targets need at start: CA and client certificate
// files, bearer tokens from the environment, signing secrets. Its errors name
// the target; config validation reports the same problems with their keys,
// so after a successful Load they only occur when a file or variable changed
// since.
func LoadTargets(targets []config.Target) (*Targets, error) {
	ts := &Targets{byName: make(map[string]*namedTarget, len(targets)), earlyExpiry: 10 * time.Second}
	var errs []error
	for i := range targets {
		t := &targets[i]
		nt, err := loadTarget(t)
		if err != nil {
			errs = append(errs, fmt.Errorf("target %q: %w", t.Name, err))
			continue
		}
		ts.byName[t.Name] = nt
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return ts, nil
}

func loadTarget(t *config.Target) (*namedTarget, error) {
	nt := &namedTarget{name: t.Name, header: make(map[string][]string, len(t.Headers)+1), flow: newFlowConfig(t)}
	for name, v := range t.Headers {
		nt.header[http.CanonicalHeaderKey(name)] = []string{v}
	}
	if t.FollowRedirects {
		u, err := url.Parse(t.BaseURL)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("base_url %q is not an absolute URL", t.BaseURL)
		}
		nt.redirectOrigin = origin(u)
	}
	var err error
	if nt.tls, err = t.TLS.ClientConfig(); err != nil { // nil: the system's defaults
		return nil, err
	}
	switch a := t.Auth; a.Type {
	case config.AuthNone:
	case config.AuthBasic:
		cred := base64.StdEncoding.EncodeToString([]byte(a.Username + ":" + a.Password))
		nt.header["Authorization"] = []string{"Basic " + cred}
	case config.AuthBearer:
		tok := strings.TrimSpace(os.Getenv(a.TokenEnv))
		if tok == "" {
			return nil, fmt.Errorf("auth.token_env: the environment variable %s is not set or empty", a.TokenEnv)
		}
		nt.header["Authorization"] = []string{"Bearer " + tok}
	case config.AuthOAuth2:
		nt.oauth = &clientcredentials.Config{ClientID: a.ClientID, ClientSecret: a.ClientSecret,
			TokenURL: a.TokenURL, Scopes: a.Scopes}
	default:
		return nil, fmt.Errorf("auth.type %q is not supported", a.Type)
	}
	for k, s := range t.Signing.Secrets {
		key, err := config.SigningKey(s)
		if err != nil {
			return nil, fmt.Errorf("signing.secrets[%d]: %w", k, err)
		}
		nt.keys = append(nt.keys, key)
	}
	return nt, nil
}

// boundTarget is a named target as one Sender uses it: with its transport
// and its token cache.
type boundTarget struct {
	*namedTarget
	transport *http.Transport // nil: the Sender's shared transport
	h1        *h1Transport    // over transport; nil with it
	tokens    *tokenCache     // nil unless oauth2
	flow      *flow           // nil: no rate or concurrency limit of its own (limits.go)
	// tokenLogged is when a token failure was last logged (unix nanoseconds).
	tokenLogged atomic.Int64
}

// bindTargets makes the Sender's view of ts: a transport per target with a
// tls block (a clone of the shared one, so with the same connection
// policy) and a token cache per oauth2 target.
func (s *Sender) bindTargets(ts *Targets) map[string]*boundTarget {
	if ts == nil {
		return nil
	}
	out := make(map[string]*boundTarget, len(ts.byName))
	for name, nt := range ts.byName {
		bt := &boundTarget{namedTarget: nt, flow: newFlow(name, nt.flow, s.transport.MaxConnsPerHost, s.metrics)}
		if nt.tls != nil {
			bt.transport = s.transport.Clone()
			bt.transport.TLSClientConfig = nt.tls.Clone()
			bt.h1 = newH1Transport(bt.transport, s.h1.dial)
		}
		if nt.oauth != nil {
			client := &http.Client{Transport: s.transport, Timeout: positiveOr(s.timeout, 10*time.Second),
				CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
			bt.tokens = newTokenCache(nt.oauth, client, ts.earlyExpiry)
		}
		out[name] = bt
	}
	return out
}

// closeTargets closes the idle connections of the targets' transports.
func (s *Sender) closeTargets() {
	for _, bt := range s.named {
		if bt.h1 != nil {
			bt.h1.CloseIdleConnections() // and bt.transport's
		}
		if bt.tokens != nil {
			bt.tokens.close()
		}
	}
}

// tokenCache holds the current OAuth2 token of a target. It is safe for
// concurrent use; close ends a fetch under way.
type tokenCache struct {
	cfg     *clientcredentials.Config
	ctx     context.Context // the fetches': carries the token endpoint's client (oauth2.HTTPClient)
	cancel  context.CancelFunc
	early   time.Duration
	fetches sync.WaitGroup

	mu    sync.Mutex    // protects the fields below
	tok   *oauth2.Token // the current token (nil: none)
	gen   uint64        // bumped when a 401 drops the token
	fetch *tokenFetch   // the fetch under way, nil if none
}

// tokenFetch is one fetch of a token, shared by the callers that wait for it.
type tokenFetch struct {
	done chan struct{} // closed once tok or err is set
	gen  uint64
	tok  *oauth2.Token
	err  error
}

func newTokenCache(cfg *clientcredentials.Config, client *http.Client, early time.Duration) *tokenCache {
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), oauth2.HTTPClient, client))
	return &tokenCache{cfg: cfg, ctx: ctx, cancel: cancel, early: early}
}

// token returns the Authorization value of the current token and its
// generation. When there is none valid (none yet, or within early of its
// expiry) it waits for a fetch, one at a time, shared by the callers that
// come meanwhile, or until ctx ends: a token endpoint that hangs holds up
// no caller beyond its own context, and is asked once, not once per caller.
func (tc *tokenCache) token(ctx context.Context) (string, uint64, error) {
	tc.mu.Lock()
	if t := tc.tok; t != nil && (t.Expiry.IsZero() || time.Until(t.Expiry) > tc.early) {
		gen := tc.gen
		tc.mu.Unlock()
		return authorization(t), gen, nil
	}
	f := tc.fetch
	if f == nil {
		f = &tokenFetch{done: make(chan struct{}), gen: tc.gen}
		tc.fetch = f
		tc.fetches.Go(func() { tc.get(f) })
	}
	tc.mu.Unlock()
	select {
	case <-f.done:
		if f.err != nil {
			return "", f.gen, f.err
		}
		return authorization(f.tok), f.gen, nil
	case <-ctx.Done():
		return "", f.gen, ctx.Err()
	}
}

// authorization is the Authorization value of t.
func authorization(t *oauth2.Token) string { return t.Type() + " " + t.AccessToken }

// get makes fetch f and keeps its token, unless a 401 dropped f's
// generation meanwhile.
func (tc *tokenCache) get(f *tokenFetch) {
	tok, err := tc.cfg.Token(tc.ctx) // a new token: the cache is here
	if err == nil && tok.AccessToken == "" {
		tok, err = nil, errors.New("the token endpoint issued an empty access_token")
	}
	tc.mu.Lock()
	f.tok, f.err = tok, err
	tc.fetch = nil
	if err == nil && tc.gen == f.gen {
		tc.tok = tok
	}
	tc.mu.Unlock()
	close(f.done)
}

// invalidate drops the token of generation gen (a 401 answered it), unless
// it was replaced already.
func (tc *tokenCache) invalidate(gen uint64) {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.gen == gen {
		tc.gen++
		tc.tok = nil
	}
}

// close ends a fetch under way and waits for it.
func (tc *tokenCache) close() {
	tc.cancel()
	tc.fetches.Wait()
}

// targetCall is what a Call to a named target keeps across its attempts.
type targetCall struct {
	bt        *boundTarget // nil: a request with a full url
	auth      []string     // oauth2: the Authorization of the current attempt
	tokenGen  uint64       // the generation of that token
	reauthed  bool         // a 401 already dropped the token once
	tokenFail int          // token fetches failed in a row, for the backoff
	webhookID []string     // the webhook-id header value (signing)
	// A token of the target's rate reserved for the next attempt, due at
	// tokenAt (mono); see flow.takeToken.
	reserved bool
	tokenAt  int64
}

// flow returns the flow control of the call's named target, nil if none.
func (tc *targetCall) flow() *flow {
	if tc.bt == nil {
		return nil
	}
	return tc.bt.flow
}

// prepareTarget resolves the named target of c's request, if any, and adds
// its static headers (under the request's own) and static Authorization
// (over them) to h.
func (s *Sender) prepareTarget(c *Call, h http.Header) error {
	name := c.req.TargetName
	if name == "" {
		return nil
	}
	bt := s.named[name]
	if bt == nil {
		return fmt.Errorf("unable to build %s request: unknown target %q", c.req.Method, name)
	}
	c.named = targetCall{bt: bt}
	for k, v := range bt.header {
		if _, set := h[k]; !set || k == "Authorization" {
			h[k] = v
		}
	}
	if len(bt.keys) > 0 {
		id := c.idem[0]
		if id == "" {
			id = randomID()
		}
		c.named.webhookID = []string{id}
	}
	return nil
}

// authorize makes sure an attempt of c to an oauth2 target has a token.
// When none can be fetched it returns the step to take instead of the
// attempt (Retry after a backoff, or Canceled) and false.
func (s *Sender) authorize(ctx context.Context, c *Call) (Step, bool) {
	bt := c.named.bt
	if bt == nil || bt.tokens == nil {
		return Step{}, true
	}
	auth, gen, err := bt.tokens.token(ctx)
	if err == nil {
		c.named.auth, c.named.tokenGen, c.named.tokenFail = []string{auth}, gen, 0
		return Step{}, true
	}
	if ctx.Err() != nil {
		return Step{Outcome: Canceled, Err: c.canceled(ctx)}, false
	}
	c.named.tokenFail++
	now := time.Now().UnixNano()
	if last := bt.tokenLogged.Load(); now-last >= int64(failingLogEvery) && bt.tokenLogged.CompareAndSwap(last, now) {
		s.log.Warn("unable to get an OAuth2 token: requests to the target wait until one is issued",
			"target", bt.name, "token_url", bt.oauth.TokenURL, "error", err.Error())
	}
	return Step{Outcome: Retry, After: backoff(s.initialBackoff, s.maxBackoff, c.named.tokenFail-1)}, false
}

// attemptHeader returns the headers of one attempt of c: c.header, or for
// a named target with OAuth2 or signing a copy with the attempt's
// Authorization and signature.
func (c *Call) attemptHeader() http.Header {
	bt := c.named.bt
	if bt == nil || (bt.tokens == nil && len(bt.keys) == 0) {
		return c.header
	}
	h := c.header.Clone()
	if c.named.auth != nil {
		h["Authorization"] = c.named.auth
	}
	if len(bt.keys) > 0 {
		sign(h, bt.keys, c.named.webhookID, time.Now(), c.req.Body)
	}
	return h
}

// transportFor returns the transport of c's target.
func (s *Sender) transportFor(c *Call) http.RoundTripper {
	if bt := c.named.bt; bt != nil && bt.h1 != nil {
		return bt.h1
	}
	return s.plain
}

// unauthorized handles a 401 answer to an attempt with an OAuth2 token, the
// first of the call: the token is dropped and the call retried at once,
// the attempt not counted. It reports false for any other answer, which
// Attempt then judges as usual. done is the breaker's callback (nil
// without a breaker): the target answered, a success for it.
func (s *Sender) unauthorized(ctx context.Context, c *Call, tg *target, resp *http.Response, err error, done func(error)) (Step, bool) {
	bt := c.named.bt
	if err != nil || resp.StatusCode != http.StatusUnauthorized || bt == nil || bt.tokens == nil || c.named.reauthed || ctx.Err() != nil {
		return Step{}, false
	}
	c.named.reauthed = true
	bt.tokens.invalidate(c.named.tokenGen)
	tg.succeeded()
	if done != nil {
		done(nil)
	}
	tg.statusCounter(resp.StatusCode).Inc()
	tg.uncounted.Inc()
	c.status = resp.StatusCode
	s.log.Debug("401 with an OAuth2 token: token dropped, request retried", "target", bt.name, "request", c.what())
	return Step{Outcome: Retry}, true
}
