package config

import (
	"slices"
	"strings"

	toml "github.com/pelletier/go-toml/v2"
)

// redactedValue replaces secrets in Redacted.
const redactedValue = "REDACTED"

// Redacted returns c as TOML, after defaults and ${...} expansion, with
// secrets replaced by "REDACTED": admin.token, kafka.properties whose names
// suggest a secret (password, secret, token, jaas, key.pem, ...), header
// values whose names suggest credentials (Authorization, Cookie, X-Api-Key,
// ...), passwords in URLs, the passwords, client secrets and signing
// secrets of [[targets]], and schema_registry.password and bearer_token.
// It is meant for logs and for showing the effective configuration; c is
// not modified.
func (c *Config) Redacted() string {
	cp := *c
	if cp.Admin.Token != "" {
		cp.Admin.Token = redactedValue
	}
	cp.Tracing.Endpoint = redactURL(cp.Tracing.Endpoint)
	props := make(map[string]any, len(c.Kafka.Properties))
	for name, v := range c.Kafka.RawProperties {
		if s, err := propertyString(v); err == nil {
			props[name] = s
		}
	}
	for name, v := range c.Kafka.Properties {
		props[name] = v
	}
	for name := range props {
		if secretName(name, propertySecrets) {
			props[name] = redactedValue
		}
	}
	cp.Kafka.RawProperties = props
	cp.Targets = redactTargets(c.Targets)
	cp.SchemaRegistry = redactSchemaRegistry(c.SchemaRegistry)
	cp.Routes = make([]Route, len(c.Routes))
	for i, r := range c.Routes {
		r.Requests = make([]Request, len(c.Routes[i].Requests))
		for j, rq := range c.Routes[i].Requests {
			rq.URL = redactURL(rq.URL)
			rq.Headers = redactHeaders(rq.Headers)
			r.Requests[j] = rq
		}
		cp.Routes[i] = r
	}
	b, err := toml.Marshal(cp)
	if err != nil {
		return "# unable to render the configuration: " + err.Error() + "\n"
	}
	return string(b)
}

var (
	propertySecrets = []string{"password", "secret", "token", "jaas", "credential", "oauthbearer.config", "key.pem"}
	headerSecrets   = []string{"auth", "cookie", "token", "secret", "password", "key", "signature", "credential"}
)

func secretName(name string, parts []string) bool {
	name = strings.ToLower(name)
	return slices.ContainsFunc(parts, func(p string) bool { return strings.Contains(name, p) })
}

// redactURL replaces the password of a URL's userinfo, textually so that
// templates in the URL are left as they are.
func redactURL(u string) string {
	scheme := strings.Index(u, "://")
	if scheme < 0 {
		return u
	}
	rest := u[scheme+3:]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	at := strings.LastIndexByte(rest[:end], '@')
	if at < 0 {
		return u
	}
	user, _, hasPassword := strings.Cut(rest[:at], ":")
	if !hasPassword {
		return u
	}
	return u[:scheme+3] + user + ":" + redactedValue + rest[at:]
}

// redactHeaders returns a copy of headers with the values of credential
// headers (Authorization, API keys, ...) redacted; nil stays nil.
func redactHeaders(headers map[string]string) map[string]string {
	if headers == nil {
		return nil
	}
	h := make(map[string]string, len(headers))
	for name, v := range headers {
		if secretName(name, headerSecrets) {
			v = redactedValue
		}
		h[name] = v
	}
	return h
}
