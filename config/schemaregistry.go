package config

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"strings"
)

// SchemaRegistry configures the Confluent Schema Registry client
// ([schema_registry]) that routes with a schema-framed value_format or
// key_format ("avro", "protobuf", "json_schema") read schemas from. An
// empty URL means no registry: such formats are then an error.
type SchemaRegistry struct {
	// URL is the registry's http:// or https:// base URL; several may be
	// given separated by commas (tried in turn).
	URL string `toml:"url"`
	// Basic authentication (Confluent Cloud: the API key and secret), or a
	// static bearer token; not both.
	Username    string `toml:"username"`
	Password    string `toml:"password"`
	BearerToken string `toml:"bearer_token"`
	// TLS of an https:// registry, as for [[targets]].
	TLS TargetTLS `toml:"tls"`
	// Timeout bounds one request to the registry (connection included).
	Timeout Duration `toml:"timeout"`
}

// Values of routes[].value_format and routes[].key_format.
const (
	FormatJSON       = "json"        // the value decoded as JSON (value default)
	FormatString     = "string"      // the bytes as a string (key default)
	FormatBytes      = "bytes"       // the bytes as they are
	FormatAvro       = "avro"        // Schema Registry framing, Avro
	FormatProtobuf   = "protobuf"    // Schema Registry framing, Protobuf
	FormatJSONSchema = "json_schema" // Schema Registry framing, JSON Schema
)

// ClientConfig returns the *tls.Config t describes, nil for the zero
// TargetTLS (the system's defaults): certificates verified against CAFile
// (else the system's roots) unless InsecureSkipVerify, the client
// certificate of CertFile and KeyFile when set, TLS 1.2 at least.
func (t *TargetTLS) ClientConfig() (*tls.Config, error) {
	if *t == (TargetTLS{}) {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: t.InsecureSkipVerify}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("unable to read tls.ca_file: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls.ca_file %q holds no PEM certificate", t.CAFile)
		}
	}
	if t.CertFile != "" || t.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("unable to load the client certificate: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// RegistryURLs splits [schema_registry] url into its URLs.
func (s *SchemaRegistry) RegistryURLs() []string {
	var urls []string
	for _, u := range strings.Split(s.URL, ",") {
		if u = strings.TrimSpace(u); u != "" {
			urls = append(urls, u)
		}
	}
	return urls
}

// schemaRegistry checks [schema_registry] and the routes' value_format and
// key_format.
func (v *validator) schemaRegistry() {
	sr := &v.c.SchemaRegistry
	p := key("schema_registry")
	https := v.registryURL(p.key("url"), sr)
	if sr.URL == "" {
		for _, k := range []struct {
			name string
			set  bool
		}{{"username", sr.Username != ""}, {"password", sr.Password != ""}, {"bearer_token", sr.BearerToken != ""},
			{"tls", sr.TLS != (TargetTLS{})}} {
			if k.set {
				v.failAt(p.key(k.name), p.key("url"), "is set but schema_registry.url is not")
			}
		}
	}
	switch {
	case sr.BearerToken != "" && (sr.Username != "" || sr.Password != ""):
		v.failAt(p.key("bearer_token"), p.key("username"), "is set with username/password: use one of basic authentication and a bearer token")
	case sr.Username != "" && sr.Password == "":
		v.failAt(p.key("password"), p.key("username"), "must be set with username (basic authentication)")
	case sr.Password != "" && sr.Username == "":
		v.failAt(p.key("username"), p.key("password"), "must be set with password (basic authentication)")
	}
	if sr.URL != "" && sr.TLS != (TargetTLS{}) {
		if https {
			v.targetTLS(p.key("tls"), &sr.TLS, true)
		} else {
			v.failAt(p.key("tls"), p.key("url"), "applies to an https:// registry only, and url is not https://")
		}
	}
	if sr.Timeout.D() <= 0 {
		v.fail(p.key("timeout"), "must be positive, not %s", sr.Timeout.D())
	}
	for i := range v.c.Routes {
		rt := &v.c.Routes[i]
		rp := key("routes").at(i)
		v.format(rp.key("value_format"), rt.ValueFormat)
		v.format(rp.key("key_format"), rt.KeyFormat)
	}
}

// format checks a value_format or key_format ("" is the default).
func (v *validator) format(p keyPath, f string) {
	switch f {
	case "", FormatJSON, FormatString, FormatBytes:
	case FormatAvro, FormatProtobuf, FormatJSONSchema:
		if v.c.SchemaRegistry.URL == "" {
			v.failAt(p, key("schema_registry", "url"), "%q reads schemas from a Schema Registry: set [schema_registry] url", f)
		}
	default:
		v.fail(p, `must be "json", "string", "bytes", "avro", "protobuf" or "json_schema", not %q`, f)
	}
}

// registryURL checks schema_registry.url and reports whether every URL it
// lists is https.
func (v *validator) registryURL(p keyPath, sr *SchemaRegistry) (https bool) {
	if strings.TrimSpace(sr.URL) == "" {
		if sr.URL != "" {
			v.fail(p, "is blank: leave it out (no registry) or give the registry's URL")
		}
		return false
	}
	urls := sr.RegistryURLs()
	if len(urls) == 0 {
		v.fail(p, "%q lists no URL", sr.URL)
		return false
	}
	https = true
	for _, s := range urls {
		u, err := url.Parse(s)
		switch {
		case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "":
			v.fail(p, "%q is not an absolute http:// or https:// URL, e.g. \"https://schema-registry.internal:8081\"", redactURL(s))
			return false
		case u.User != nil:
			v.fail(p, "%q has user info: set schema_registry.username and password instead", redactURL(s))
			return false
		case u.RawQuery != "" || u.Fragment != "":
			// Not printed: a query may hold a token.
			v.fail(p, "%q has a query or fragment", redactURL(u.Scheme+"://"+u.Host+u.Path)+"?…")
			return false
		}
		https = https && u.Scheme == "https"
	}
	return https
}

// redactSchemaRegistry returns s with its secrets redacted.
func redactSchemaRegistry(s SchemaRegistry) SchemaRegistry {
	if s.Password != "" {
		s.Password = redactedValue
	}
	if s.BearerToken != "" {
		s.BearerToken = redactedValue
	}
	urls := strings.Split(s.URL, ",")
	for i, u := range urls {
		urls[i] = redactURL(u)
	}
	s.URL = strings.Join(urls, ",")
	return s
}
