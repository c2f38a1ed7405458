package config

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
)

// commentedInExample are the tables of config.example.toml that need files
// or credentials to run: the example shows them in a comment.
var commentedInExample = map[string]bool{"targets.tls": true, "targets.auth": true, "targets.signing": true}

// TestExampleTargets: the commented [[targets]] example of
// config.example.toml shows every key of tls, auth and signing.
func TestExampleTargets(t *testing.T) {
	raw, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []reflect.Type{reflect.TypeOf(TargetTLS{}), reflect.TypeOf(TargetAuth{}), reflect.TypeOf(Signing{})} {
		for i := 0; i < typ.NumField(); i++ {
			name := strings.Split(typ.Field(i).Tag.Get("toml"), ",")[0]
			if !regexp.MustCompile(`(?m)^#.*\b` + name + ` = `).Match(raw) {
				t.Errorf("the example does not show %s.%s in a comment", typ.Name(), name)
			}
		}
	}
}

// writeCert writes a self-signed certificate and its key as PEM files in
// dir and returns their paths.
func writeCert(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	write := func(path, typ string, b []byte) {
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(certFile, "CERTIFICATE", der)
	write(keyFile, "PRIVATE KEY", kder)
	return certFile, keyFile
}

const specSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

func TestTargets(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	t.Setenv("ORDERLY_TEST_BEARER", "tok-123")
	t.Setenv("ORDERLY_TEST_PASSWORD", "s3cret")
	c := mustParse(t, `
[[targets]]
name = "billing"
base_url = "https://billing.example:8443/api/v1/"
  [targets.tls]
  ca_file = "`+cert+`"
  cert_file = "`+cert+`"
  key_file = "`+key+`"
  [targets.auth]
  type = "oauth2"
  token_url = "https://auth.example/token"
  client_id = "orderly"
  client_secret = "${ORDERLY_TEST_PASSWORD}"
  scopes = ["a", "b"]
  [targets.headers]
  X-Tenant = "t1"
  [targets.signing]
  secrets = ["`+specSecret+`"]
[[targets]]
name = "basic"
base_url = "http://basic.example"
auth = { type = "basic", username = "u", password = "${ORDERLY_TEST_PASSWORD}" }
[[targets]]
name = "bearer"
base_url = "http://bearer.example"
auth = { type = "bearer", token_env = "ORDERLY_TEST_BEARER" }

[[routes]]
name = "r"
  [[routes.requests]]
  target = "billing"
  path = "/invoices/{{ .Value.id }}"
  [[routes.requests]]
  target = "basic"
  [[routes.requests]]
  url = "http://full.example/x"
`)
	if len(c.Targets) != 3 || c.Target("billing").Auth.ClientSecret != "s3cret" || c.Target("basic").Auth.Password != "s3cret" ||
		c.Target("billing").Signing.Secrets[0] != specSecret || c.Routes[0].Requests[0].Target != "billing" ||
		c.Routes[0].Requests[0].Path != "/invoices/{{ .Value.id }}" || c.Target("nope") != nil {
		t.Fatalf("targets: %+v routes: %+v", c.Targets, c.Routes)
	}
	out := c.Redacted()
	for _, secret := range []string{"s3cret", specSecret} {
		if strings.Contains(out, secret) {
			t.Errorf("Redacted shows %q:\n%s", secret, out)
		}
	}
	if _, err := Parse([]byte(out), "redacted.toml"); err != nil && strings.Contains(err.Error(), "unknown key") {
		t.Errorf("Redacted output does not parse: %v\n%s", err, out)
	}
}

func TestTargetErrors(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	notPEM := filepath.Join(dir, "x.txt")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Unsetenv("ORDERLY_TEST_UNSET")
	t.Setenv("ORDERLY_TEST_EMPTY", "")
	wantError(t, `
[[targets]]
base_url = "http://a.example"
[[targets]]
name = "a"
base_url = "http://a.example/{{ .Value.x }}"
[[targets]]
name = "a"
base_url = "ftp://a.example"
[[targets]]
name = "q"
base_url = "https://user:pw@q.example/x?y=1"
[[targets]]
name = "tls-on-http"
base_url = "http://t.example"
tls = { ca_file = "`+cert+`" }
[[targets]]
name = "tls"
base_url = "https://t.example"
tls = { ca_file = "`+notPEM+`", cert_file = "`+cert+`" }
[[targets]]
name = "tls2"
base_url = "https://t.example"
tls = { ca_file = "/does/not/exist.pem", cert_file = "`+key+`", key_file = "`+cert+`" }
[[targets]]
name = "auth"
base_url = "https://t.example"
auth = { type = "digest" }
[[targets]]
name = "bearer-unset"
base_url = "https://t.example"
auth = { type = "bearer", token_env = "ORDERLY_TEST_UNSET", username = "u" }
[[targets]]
name = "bearer-empty"
base_url = "https://t.example"
auth = { type = "bearer", token_env = "ORDERLY_TEST_EMPTY" }
[[targets]]
name = "oauth"
base_url = "https://t.example"
auth = { type = "oauth2", token_url = "/token", client_secret = "${ORDERLY_TEST_UNSET}" }
[[targets]]
name = "basic"
base_url = "https://t.example"
auth = { type = "basic" }
headers = { Authorization = "x", "Bad Header" = "y", Webhook-Id = "z" }
signing = { secrets = ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_!!", "whsec_c2hvcnQ="] }
[[targets]]
name = "no-auth"
base_url = "https://t.example"
auth = { password = "p" }

[[routes]]
name = "r"
  [[routes.requests]]
  target = "billing"
  path = "invoices"
  [[routes.requests]]
  url = "http://h/x"
  target = "a"
  [[routes.requests]]
  path = "/x"
`,
		`t.toml:2:1: targets[0].name: every target needs a name`,
		`targets[1].base_url: "http://a.example/{{ .Value.x }}" cannot be a template`,
		`targets[2].name: "a" is also the name of targets[1]`,
		`targets[2].base_url: "ftp://a.example" is not an absolute http:// or https:// URL`,
		`targets[3].base_url: "https://user:pw@q.example/x?y=1" has user info`,
		`targets[4].tls: applies to https:// targets only`,
		`targets[5].tls.ca_file: "`+notPEM+`" holds no PEM certificate`,
		`targets[5].tls.key_file: must be set with tls.cert_file`,
		`targets[6].tls.ca_file: unable to read: open /does/not/exist.pem`,
		`targets[6].tls.cert_file: unable to load the client certificate and key`,
		`targets[7].auth.type: must be "basic", "bearer" or "oauth2" (or absent: no authentication), not "digest"`,
		`targets[8].auth.username: is not used with auth.type = "bearer"`,
		`targets[8].auth.token_env: the environment variable ORDERLY_TEST_UNSET is not set`,
		`targets[9].auth.token_env: the environment variable ORDERLY_TEST_EMPTY is empty`,
		`targets[10].auth.token_url: "/token" is not an absolute http:// or https:// URL`,
		`targets[10].auth.client_id: must be set for oauth2`,
		`targets[10].auth.client_secret: must be set for oauth2 (the environment variable ORDERLY_TEST_UNSET is not set)`,
		`targets[11].auth.username: must be set for basic authentication`,
		`targets[11].auth.type: sets the Authorization header, which targets[].headers sets too`,
		`targets[11].headers."Bad Header": is not a valid header name`,
		`targets[11].headers.Webhook-Id: is set by signing`,
		`targets[11].signing.secrets[0]: a signing secret is "whsec_" followed by base64`,
		`targets[11].signing.secrets[1]: the part after "whsec_" is not valid base64`,
		`targets[11].signing.secrets[2]: the secret decodes to 5 bytes; Standard Webhooks asks for 24 to 64`,
		`targets[12].auth.password: is set but auth.type is not`,
		`routes[0] ("r").requests[0].target: "billing" is not the name of a [[targets]] (targets: ["", "a", "a", "q", "tls-on-http", "tls", "tls2", "auth", "bearer-unset", "bearer-empty", "oauth", "basic", "no-auth"])`,
		`routes[0] ("r").requests[0].path: "invoices" must start with "/"`,
		`routes[0] ("r").requests[1]: sets url and target/path: set either url, or target with path`,
		`routes[0] ("r").requests[2].target: must be set with path`,
	)
}

// TestTargetFlow: rate, burst, max_concurrency and adaptive_concurrency
// parse, and burst defaults to max(1, ceil(rate)).
func TestTargetFlow(t *testing.T) {
	c := mustParse(t, `
[http]
max_conns_per_host = 64
[[targets]]
name = "a"
base_url = "http://a.example"
rate = 2.5
max_concurrency = 8
adaptive_concurrency = true
[[targets]]
name = "b"
base_url = "http://b.example"
rate = 100
burst = 7
[[targets]]
name = "c"
base_url = "http://c.example"
rate = 0.2
[[targets]]
name = "d"
base_url = "http://d.example"
adaptive_concurrency = true

[[routes]]
name = "r"
  [[routes.requests]]
  target = "a"
`)
	a, b, cc, dd := c.Target("a"), c.Target("b"), c.Target("c"), c.Target("d")
	if a.Rate != 2.5 || a.MaxConcurrency != 8 || !a.AdaptiveConcurrency || b.Burst != 7 || dd.MaxConcurrency != 0 || !dd.AdaptiveConcurrency {
		t.Fatalf("targets: %+v", c.Targets)
	}
	for _, tt := range []struct {
		tg   *Target
		want int
	}{{a, 3}, {b, 7}, {cc, 1}, {dd, 1}} {
		if got := tt.tg.BurstOrDefault(); got != tt.want {
			t.Errorf("%s: burst %d, want %d", tt.tg.Name, got, tt.want)
		}
	}
}

func TestTargetFlowErrors(t *testing.T) {
	wantError(t, `
[http]
max_conns_per_host = 16
[[targets]]
name = "neg"
base_url = "http://a.example"
rate = -1.0
max_concurrency = -2
[[targets]]
name = "nan"
base_url = "http://a.example"
rate = nan
[[targets]]
name = "burst"
base_url = "http://a.example"
burst = 5
max_concurrency = 17
[[targets]]
name = "negburst"
base_url = "http://a.example"
rate = 1
burst = -1
`,
		`targets[0].rate: must be a number of requests per second, at least 0 (0 = unlimited), not -1`,
		`targets[0].max_concurrency: must not be negative (0 = http.max_conns_per_host), not -2`,
		`targets[1].rate: must be a number of requests per second, at least 0 (0 = unlimited), not NaN`,
		`targets[2].burst: applies to a rate, and rate is 0 (unlimited): set rate too`,
		`targets[2].max_concurrency: 17 is above http.max_conns_per_host (16)`,
		`targets[3].burst: must not be negative`,
	)
	wantError(t, `
[http]
max_conns_per_host = 0
[[targets]]
name = "adaptive"
base_url = "http://a.example"
adaptive_concurrency = true
`, `t.toml:7:1: targets[0].adaptive_concurrency: needs a ceiling: set max_concurrency (http.max_conns_per_host is 0, unlimited)`)
}
