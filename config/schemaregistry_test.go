package config

import (
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSchemaRegistry(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeCert(t, dir)
	t.Setenv("ORDERLY_TEST_SR_PASSWORD", "s3cret")
	c := mustParse(t, `
[schema_registry]
url = "https://sr-1.internal:8081, https://sr-2.internal:8081"
username = "orderly"
password = "${ORDERLY_TEST_SR_PASSWORD}"
timeout = "2s"
  [schema_registry.tls]
  ca_file = "`+cert+`"
  cert_file = "`+cert+`"
  key_file = "`+key+`"

[[routes]]
name = "avro"
value_format = "avro"
key_format = "string"
  [[routes.requests]]
  url = "http://127.0.0.1:8081/{{ .Value.id }}"
`)
	sr := c.SchemaRegistry
	if sr.Password != "s3cret" || sr.Timeout.D() != 2*time.Second || len(sr.RegistryURLs()) != 2 || sr.TLS.CAFile != cert {
		t.Errorf("schema_registry: %+v", sr)
	}
	if rt := c.Routes[0]; rt.ValueFormat != FormatAvro || rt.KeyFormat != FormatString {
		t.Errorf("route formats: %+v", rt)
	}
	tc, err := sr.TLS.ClientConfig()
	if err != nil || tc.RootCAs == nil || len(tc.Certificates) != 1 {
		t.Errorf("TLS: %v, %v", tc, err)
	}
	out := c.Redacted()
	if strings.Contains(out, "s3cret") || !strings.Contains(out, `password = 'REDACTED'`) {
		t.Errorf("the password is not redacted:\n%s", out)
	}

	// Defaults: no registry, a 5 s timeout, formats "" (json value, key as it is).
	d := mustParse(t, minimal)
	if d.SchemaRegistry != (SchemaRegistry{Timeout: Duration{5 * time.Second}}) || d.Routes[0].ValueFormat != "" || d.Routes[0].KeyFormat != "" {
		t.Errorf("defaults: %+v %+v", d.SchemaRegistry, d.Routes[0])
	}

	tok := mustParse(t, "[schema_registry]\nurl = \"http://sr:8081\"\nbearer_token = \"tok-123\"\n"+minimal)
	if out := tok.Redacted(); strings.Contains(out, "tok-123") {
		t.Errorf("the bearer token is not redacted:\n%s", out)
	}
}

func TestSchemaRegistryErrors(t *testing.T) {
	route := func(format string) string {
		return `
[[routes]]
name = "r"
` + format + `
  [[routes.requests]]
  url = "http://127.0.0.1:8081/x"
`
	}
	wantError(t, route(`value_format = "xml"`),
		`t.toml:4:1: routes[0] ("r").value_format: must be "json", "string", "bytes", "avro", "protobuf" or "json_schema", not "xml"`)
	wantError(t, route(`key_format = "avro"`),
		`t.toml:4:1: routes[0] ("r").key_format: "avro" reads schemas from a Schema Registry: set [schema_registry] url`)
	wantError(t, "[schema_registry]\nurl = \"sr:8081\"\n"+minimal,
		`t.toml:2:1: schema_registry.url: "sr:8081" is not an absolute http:// or https:// URL`)
	wantError(t, "[schema_registry]\nurl = \"https://u:pw@sr:8081\"\n"+minimal,
		`schema_registry.url: "https://u:REDACTED@sr:8081" has user info`)
	// Neither a password nor a query's token is printed.
	wantError(t, "[schema_registry]\nurl = \"ftp://u:pw@sr:8081\"\n"+minimal,
		`schema_registry.url: "ftp://u:REDACTED@sr:8081" is not an absolute http:// or https:// URL`)
	wantError(t, "[schema_registry]\nurl = \"https://sr:8081/api?token=secret\"\n"+minimal,
		`schema_registry.url: "https://sr:8081/api?…" has a query or fragment`)
	wantError(t, "[schema_registry]\nusername = \"u\"\npassword = \"p\"\n"+minimal,
		`t.toml:2:1: schema_registry.username: is set but schema_registry.url is not`,
		`t.toml:3:1: schema_registry.password: is set but schema_registry.url is not`)
	wantError(t, "[schema_registry]\nurl = \"http://sr:8081\"\nusername = \"u\"\n"+minimal,
		`schema_registry.password: must be set with username`)
	wantError(t, "[schema_registry]\nurl = \"http://sr:8081\"\nusername = \"u\"\npassword = \"p\"\nbearer_token = \"t\"\n"+minimal,
		`t.toml:5:1: schema_registry.bearer_token: is set with username/password`)
	wantError(t, "[schema_registry]\nurl = \"http://sr:8081\"\ntimeout = \"0s\"\n"+minimal,
		`t.toml:3:1: schema_registry.timeout: must be positive, not 0s`)
	wantError(t, "[schema_registry]\nurl = \"http://sr:8081\"\n[schema_registry.tls]\ninsecure_skip_verify = true\n"+minimal,
		`schema_registry.tls: applies to an https:// registry only`)
	missing := filepath.Join(t.TempDir(), "missing.pem")
	wantError(t, "[schema_registry]\nurl = \"https://sr:8081\"\n[schema_registry.tls]\nca_file = \""+missing+"\"\n"+minimal,
		`t.toml:4:1: schema_registry.tls.ca_file: unable to read`)
}
