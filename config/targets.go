package config

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// Target is a named destination ([[targets]]): where requests that name it
// go (BaseURL followed by the request's path), and how they are sent there
// (TLS, authentication, static headers, signatures). A request that gives a
// full url instead is sent with none of these.
type Target struct {
	Name string `toml:"name"`
	// BaseURL is an absolute http(s) URL, scheme://host[:port][/base path],
	// without query, fragment, user info or template.
	BaseURL string            `toml:"base_url"`
	TLS     TargetTLS         `toml:"tls"`
	Auth    TargetAuth        `toml:"auth"`
	Headers map[string]string `toml:"headers"` // added to every request; the request's own headers win
	Signing Signing           `toml:"signing"`
	// FollowRedirects lets an attempt follow a 301, 302, 303, 307 or 308
	// to the same scheme://host:port as BaseURL, at most 5 in a row.
	FollowRedirects bool `toml:"follow_redirects"`

	// Flow control. Rate is in requests per second for the whole consumer
	// group (each instance takes its share of the assigned partitions), 0 =
	// unlimited; Burst is how many may go at once after a quiet spell, 0 =
	// max(1, ceil(Rate)) (see BurstOrDefault). MaxConcurrency bounds the
	// requests under way per instance, 0 = http.max_conns_per_host; with
	// AdaptiveConcurrency that is the ceiling of a limit that goes down on
	// 429, 503 and rising latency and back up while the target is healthy.
	Rate                float64 `toml:"rate"`
	Burst               int     `toml:"burst"`
	MaxConcurrency      int     `toml:"max_concurrency"`
	AdaptiveConcurrency bool    `toml:"adaptive_concurrency"`
}

// BurstOrDefault is the target's burst: Burst, or max(1, ceil(Rate)) when 0.
func (t *Target) BurstOrDefault() int {
	if t.Burst > 0 {
		return t.Burst
	}
	return max(1, int(math.Ceil(min(t.Rate, math.MaxInt32))))
}

// TargetTLS configures the TLS client of an https target. Certificates are
// always verified (against CAFile, else the system's roots) unless
// InsecureSkipVerify is set.
type TargetTLS struct {
	CAFile             string `toml:"ca_file"`   // PEM; replaces the system roots for this target
	CertFile           string `toml:"cert_file"` // PEM client certificate (mutual TLS), with KeyFile
	KeyFile            string `toml:"key_file"`
	InsecureSkipVerify bool   `toml:"insecure_skip_verify"`
}

// Values of targets[i].auth.type.
const (
	AuthNone   = ""
	AuthBasic  = "basic"
	AuthBearer = "bearer"
	AuthOAuth2 = "oauth2"
)

// TargetAuth configures how requests to a target authenticate. Type says
// which of the other fields apply.
type TargetAuth struct {
	Type string `toml:"type"` // "", "basic", "bearer" or "oauth2"
	// basic
	Username string `toml:"username"`
	Password string `toml:"password"`
	// bearer: the token is read from this environment variable at start.
	TokenEnv string `toml:"token_env"`
	// oauth2: client credentials grant.
	TokenURL     string   `toml:"token_url"`
	ClientID     string   `toml:"client_id"`
	ClientSecret string   `toml:"client_secret"`
	Scopes       []string `toml:"scopes"`
}

// Signing configures Standard Webhooks signatures. Each secret is
// "whsec_<base64>"; every request carries one v1 signature per secret, so
// that a receiver can move to a new secret while the old one still works.
type Signing struct {
	Secrets []string `toml:"secrets"`
}

// SigningKey decodes a "whsec_<base64>" secret into the HMAC key.
func SigningKey(secret string) ([]byte, error) {
	b64, ok := strings.CutPrefix(secret, signingPrefix)
	if !ok {
		return nil, errors.New(`a signing secret is "whsec_" followed by base64`)
	}
	key, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf(`the part after "whsec_" is not valid base64: %v`, err)
	}
	if len(key) < minSigningKey {
		return nil, fmt.Errorf("the secret decodes to %d bytes; Standard Webhooks asks for %d to 64", len(key), minSigningKey)
	}
	return key, nil
}

const (
	signingPrefix = "whsec_"
	minSigningKey = 24
)

// Target returns the target called name, or nil.
func (c *Config) Target(name string) *Target {
	if i := slices.IndexFunc(c.Targets, func(t Target) bool { return t.Name == name }); i >= 0 {
		return &c.Targets[i]
	}
	return nil
}

// targets checks every [[targets]] block.
func (v *validator) targets() {
	names := map[string]int{}
	for i := range v.c.Targets {
		t := &v.c.Targets[i]
		p := key("targets").at(i)
		switch j, dup := names[t.Name]; {
		case strings.TrimSpace(t.Name) == "":
			v.fail(p.key("name"), `every target needs a name (requests refer to it: target = "billing")`)
		case dup:
			v.fail(p.key("name"), "%q is also the name of targets[%d]", t.Name, j)
		default:
			names[t.Name] = i
		}
		https := v.baseURL(p.key("base_url"), t.BaseURL)
		v.targetTLS(p.key("tls"), &t.TLS, https)
		v.targetAuth(p.key("auth"), &t.Auth, t.Headers)
		v.targetHeaders(p.key("headers"), t)
		for k, s := range t.Signing.Secrets {
			if _, err := SigningKey(s); err != nil {
				v.fail(p.key("signing", "secrets").at(k), "%v", err)
			}
		}
		v.targetFlow(p, t)
	}
}

// targetFlow checks a target's rate and concurrency limits.
func (v *validator) targetFlow(p keyPath, t *Target) {
	switch {
	case math.IsNaN(t.Rate) || math.IsInf(t.Rate, 0) || t.Rate < 0:
		v.fail(p.key("rate"), "must be a number of requests per second, at least 0 (0 = unlimited), not %v", t.Rate)
	case t.Burst < 0:
		v.fail(p.key("burst"), "must not be negative (0 = max(1, ceil(rate))), not %d", t.Burst)
	case t.Burst > 0 && t.Rate == 0:
		v.failAt(p.key("burst"), p.key("rate"), "applies to a rate, and rate is 0 (unlimited): set rate too")
	}
	conns := v.c.HTTP.MaxConnsPerHost
	switch {
	case t.MaxConcurrency < 0:
		v.fail(p.key("max_concurrency"), "must not be negative (0 = http.max_conns_per_host), not %d", t.MaxConcurrency)
	case conns > 0 && t.MaxConcurrency > conns:
		v.fail(p.key("max_concurrency"), "%d is above http.max_conns_per_host (%d), which bounds the requests under way to a host anyway", t.MaxConcurrency, conns)
	case t.AdaptiveConcurrency && t.MaxConcurrency == 0 && conns <= 0:
		v.failAt(p.key("adaptive_concurrency"), p.key("max_concurrency"),
			"needs a ceiling: set max_concurrency (http.max_conns_per_host is 0, unlimited)")
	}
}

// baseURL checks a target's base_url and reports whether it is https.
func (v *validator) baseURL(p keyPath, s string) (https bool) {
	bad := func(why string) bool {
		v.fail(p, "%q %s: want scheme://host[:port][/base path], e.g. \"https://billing.internal:8443/api\"", s, why)
		return false
	}
	switch {
	case strings.TrimSpace(s) == "":
		v.fail(p, `must be set, e.g. "https://billing.internal:8443/api"`)
		return false
	case strings.Contains(s, "{{"):
		v.fail(p, "%q cannot be a template: where a request goes comes from the configuration only (a request's path may be one)", s)
		return false
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return bad("is not a URL")
	case u.Scheme != "http" && u.Scheme != "https" || u.Host == "":
		return bad("is not an absolute http:// or https:// URL")
	case u.User != nil:
		return bad("has user info (set targets[].auth instead)")
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.ContainsAny(s, "?#"):
		return bad("has a query or fragment")
	}
	return u.Scheme == "https"
}

func (v *validator) targetTLS(p keyPath, t *TargetTLS, https bool) {
	if *t == (TargetTLS{}) {
		return
	}
	if !https {
		v.fail(p, "applies to https:// targets only, and base_url is not https://")
		return
	}
	if t.CAFile != "" {
		switch pem, err := os.ReadFile(t.CAFile); {
		case err != nil:
			v.fail(p.key("ca_file"), "unable to read: %v", err)
		case !x509.NewCertPool().AppendCertsFromPEM(pem):
			v.fail(p.key("ca_file"), "%q holds no PEM certificate", t.CAFile)
		}
	}
	switch {
	case t.CertFile == "" && t.KeyFile == "":
	case t.CertFile == "":
		v.fail(p.key("cert_file"), "must be set with tls.key_file (the client certificate of mutual TLS)")
	case t.KeyFile == "":
		v.fail(p.key("key_file"), "must be set with tls.cert_file (the key of the client certificate)")
	default:
		if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
			v.failAt(p.key("cert_file"), p.key("key_file"), "unable to load the client certificate and key: %v", err)
		}
	}
}

func (v *validator) targetAuth(p keyPath, a *TargetAuth, headers map[string]string) {
	// The fields each type uses; any other that is set is a mistake.
	uses := map[string][]string{
		AuthNone:   nil,
		AuthBasic:  {"username", "password"},
		AuthBearer: {"token_env"},
		AuthOAuth2: {"token_url", "client_id", "client_secret", "scopes"},
	}
	used, known := uses[a.Type]
	if !known {
		v.fail(p.key("type"), `must be "basic", "bearer" or "oauth2" (or absent: no authentication), not %q`, a.Type)
		return
	}
	set := map[string]bool{
		"username": a.Username != "", "password": a.Password != "", "token_env": a.TokenEnv != "",
		"token_url": a.TokenURL != "", "client_id": a.ClientID != "", "client_secret": a.ClientSecret != "",
		"scopes": len(a.Scopes) > 0,
	}
	for _, name := range slices.Sorted(maps.Keys(set)) {
		if set[name] && !slices.Contains(used, name) {
			if a.Type == AuthNone {
				v.failAt(p.key(name), p, `is set but auth.type is not: set auth.type = "basic", "bearer" or "oauth2"`)
			} else {
				v.failAt(p.key(name), p.key("type"), "is not used with auth.type = %q", a.Type)
			}
		}
	}
	switch a.Type {
	case AuthNone:
		return
	case AuthBasic:
		if a.Username == "" {
			v.fail(p.key("username"), "must be set for basic authentication")
		} else if strings.Contains(a.Username, ":") {
			v.fail(p.key("username"), "must not contain ':' (basic authentication joins user and password with it)")
		}
	case AuthBearer:
		switch val, ok := os.LookupEnv(a.TokenEnv); {
		case a.TokenEnv == "":
			v.fail(p.key("token_env"), "must name the environment variable that holds the bearer token")
		case !envName(a.TokenEnv):
			v.fail(p.key("token_env"), "%q is not an environment variable name (the name, not ${NAME})", a.TokenEnv)
		case !ok:
			v.fail(p.key("token_env"), "the environment variable %s is not set", a.TokenEnv)
		case strings.TrimSpace(val) == "":
			v.fail(p.key("token_env"), "the environment variable %s is empty", a.TokenEnv)
		case !httpguts.ValidHeaderFieldValue(val) || strings.ContainsAny(val, " \r\n"):
			v.fail(p.key("token_env"), "the environment variable %s does not hold a bearer token (spaces or control characters)", a.TokenEnv)
		}
	case AuthOAuth2:
		if u, err := url.Parse(a.TokenURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.fail(p.key("token_url"), "%q is not an absolute http:// or https:// URL (the token endpoint)", a.TokenURL)
		}
		if a.ClientID == "" {
			v.fail(p.key("client_id"), "must be set for oauth2")
		}
		if a.ClientSecret == "" {
			v.fail(p.key("client_secret"), "must be set for oauth2")
		}
	}
	for name := range headers {
		if http.CanonicalHeaderKey(name) == "Authorization" {
			v.failAt(p.key("type"), p, "sets the Authorization header, which targets[].headers sets too: keep one")
		}
	}
}

// signedHeaders are the headers signing sets.
var signedHeaders = []string{"Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"}

func (v *validator) targetHeaders(p keyPath, t *Target) {
	canon := map[string]string{}
	for _, name := range slices.Sorted(maps.Keys(t.Headers)) {
		hp := p.key(name)
		c := http.CanonicalHeaderKey(name)
		switch other, dup := canon[c]; {
		case !httpguts.ValidHeaderFieldName(name):
			v.fail(hp, "is not a valid header name")
		case dup:
			v.fail(hp, "is the same header as %q (names are case-insensitive)", other)
		case c == "Host" || c == "Idempotency-Key":
			v.fail(hp, "is set by Orderly (Host from base_url)")
		case len(t.Signing.Secrets) > 0 && slices.Contains(signedHeaders, c):
			v.fail(hp, "is set by signing")
		case !httpguts.ValidHeaderFieldValue(t.Headers[name]):
			v.fail(hp, "the value contains a control character (CR, LF, ...)")
		default:
			canon[c] = name
		}
	}
}

// destination checks where a request goes: a url, or a target and a path.
func (v *validator) destination(p keyPath, rq *Request) {
	switch {
	case rq.URL != "" && (rq.Target != "" || rq.Path != ""):
		v.fail(p, "sets url and target/path: set either url, or target with path")
		return
	case rq.Target == "" && rq.Path != "":
		v.fail(p.key("target"), "must be set with path: the name of the [[targets]] the path is appended to")
		return
	case rq.Target != "":
		if v.c.Target(rq.Target) == nil {
			names := make([]string, len(v.c.Targets))
			for i := range v.c.Targets {
				names[i] = v.c.Targets[i].Name
			}
			v.fail(p.key("target"), "%q is not the name of a [[targets]] (targets: %s)", rq.Target, quoteList(names))
		}
		if rq.Path != "" && !strings.HasPrefix(rq.Path, "/") {
			v.fail(p.key("path"), `%q must start with "/" (it is appended to the target's base_url)`, rq.Path)
		}
		return
	}
	switch u := rq.URL; {
	case strings.TrimSpace(u) == "":
		v.fail(p.key("url"), "must not be empty")
	case !strings.Contains(u, "{{"):
		if pu, err := url.Parse(u); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			v.fail(p.key("url"), "%q is not an absolute http:// or https:// URL", u)
		}
	}
}

// redactTargets returns a copy of targets with passwords, client secrets,
// signing secrets and credential headers replaced.
func redactTargets(targets []Target) []Target {
	if targets == nil {
		return nil
	}
	out := make([]Target, len(targets))
	for i, t := range targets {
		if t.Auth.Password != "" {
			t.Auth.Password = redactedValue
		}
		if t.Auth.ClientSecret != "" {
			t.Auth.ClientSecret = redactedValue
		}
		if len(t.Signing.Secrets) > 0 {
			t.Signing.Secrets = slices.Repeat([]string{redactedValue}, len(t.Signing.Secrets))
		}
		t.Headers = redactHeaders(t.Headers)
		out[i] = t
	}
	return out
}
