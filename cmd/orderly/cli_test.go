package main

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// runCLI runs a command line in process and returns its exit status,
// stdout and stderr.
func runCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// writeConfig writes a configuration file and returns its path.
func writeConfig(t *testing.T, src string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "orderly.toml")
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestHelp: every command prints a synopsis, a description and its flags to
// stdout on --help and -h and exits 0; internal and other commands' flags
// are left out, and the admin token never shows.
func TestHelp(t *testing.T) {
	t.Setenv("ORDERLY_ADMIN_TOKEN", "s3cret-from-env")
	tests := []struct {
		args    []string
		want    []string // in stdout
		without []string // not in stdout
	}{
		{[]string{"run"}, []string{"Usage: orderly run --config FILE", "SIGTERM", "-config"}, nil},
		{[]string{"validate"}, []string{"Usage: orderly validate [--print] --config FILE", "FILE:LINE:COL", "-print"}, nil},
		{[]string{"demo"}, []string{"Usage: orderly demo [flags]", "embedded Kafka-protocol broker", "-messages"}, nil},
		{[]string{"dlq"}, []string{"orderly dlq list", "orderly dlq cancel", "ORDERLY_ADMIN_TOKEN", "--token-file"}, nil},
		{[]string{"dlq", "list"}, []string{"Usage: orderly dlq list [flags]", "next_page", "-cursor", "-limit", "-token-file", "ORDERLY_ADMIN_TOKEN", "shows in ps"},
			[]string{"-rate", "-dry-run", "-wait"}},
		{[]string{"dlq", "replay"}, []string{"Usage: orderly dlq replay [flags]", "-rate", "-dry-run", "-wait"}, []string{"-cursor"}},
		{[]string{"dlq", "release"}, []string{"Usage: orderly dlq release [flags]", "-dry-run", "-wait"}, []string{"-rate", "-cursor"}},
		{[]string{"dlq", "status"}, []string{"Usage: orderly dlq status [flags] [ID]", "-admin"}, []string{"-wait", "-key"}},
		{[]string{"dlq", "cancel"}, []string{"Usage: orderly dlq cancel [flags] ID", "-wait"}, []string{"-key"}},
		{[]string{"version"}, []string{"Usage: orderly version"}, nil},
	}
	for _, tt := range tests {
		for _, h := range []string{"--help", "-h"} {
			args := append(append([]string{}, tt.args...), h)
			code, out, errOut := runCLI(t, args...)
			if code != 0 || errOut != "" {
				t.Errorf("%q: exit %d, stderr %q; want 0 and nothing", args, code, errOut)
			}
			for _, w := range tt.want {
				if !strings.Contains(out, w) {
					t.Errorf("%q: help does not show %q:\n%s", args, w, out)
				}
			}
			for _, w := range append(tt.without, "s3cret-from-env") {
				if strings.Contains(out, w) {
					t.Errorf("%q: help shows %q:\n%s", args, w, out)
				}
			}
		}
	}
	// The benchmark harness is orderly-bench's, not a command of orderly.
	if code, out, _ := runCLI(t, "--help"); code != 0 || strings.Contains(out, "bench") {
		t.Errorf("--help: exit %d, want 0 and no bench command:\n%s", code, out)
	}
	if code, _, _ := runCLI(t, "bench", "--help"); code != 2 {
		t.Errorf("bench --help: exit %d, want 2 (unknown command)", code)
	}
	// orderly help COMMAND is COMMAND --help.
	if code, out, _ := runCLI(t, "help", "dlq", "list"); code != 0 || !strings.Contains(out, "Usage: orderly dlq list") {
		t.Errorf("help dlq list: exit %d:\n%s", code, out)
	}
	// A wrong flag: exit 2, with the synopsis and where the help is.
	code, _, errOut := runCLI(t, "dlq", "list", "-rate", "5")
	if code != 2 || !strings.Contains(errOut, "Usage: orderly dlq list") || !strings.Contains(errOut, "orderly dlq list --help") {
		t.Errorf("dlq list -rate: exit %d:\n%s", code, errOut)
	}
}

// TestValidateNonBooleanWhen: a `when` that is not a boolean fails
// validation with the file, line and key.
func TestValidateNonBooleanWhen(t *testing.T) {
	path := writeConfig(t, `
[[routes]]
name = "ids"
when = 'value.id'
  [[routes.requests]]
  url = "http://127.0.0.1:1/{{ .Key }}"
`)
	code, _, errOut := runCLI(t, "validate", "--config", path)
	want := path + `:4:1: routes[0] ("ids").when: must yield true or false, but value.id may be any JSON value`
	if code != 2 || !strings.Contains(errOut, want) {
		t.Errorf("exit %d, want 2 and %q in:\n%s", code, want, errOut)
	}
}

// TestValidateReportsEverything: an invalid duration, an unknown key, and
// route expression and template errors are reported in one run, each with
// file:line and key.
func TestValidateReportsEverything(t *testing.T) {
	path := writeConfig(t, `
[dispatch]
commit_interval = "10x"
max_in_flihgt = 5
[http]
timeout = 30
[[routes]]
name = "broken"
when = 'value.type =='
  [[routes.requests]]
  url = "http://127.0.0.1:1/{{ .Vaule.id }}"
  [routes.requests.headers]
  X-Key = "{{ .Key"
`)
	code, _, errOut := runCLI(t, "validate", "--config", path)
	if code != 2 {
		t.Fatalf("exit %d, want 2:\n%s", code, errOut)
	}
	for _, w := range []string{
		`:3:19: dispatch.commit_interval: invalid duration "10x"`,
		`:4:1: dispatch.max_in_flihgt: unknown key (did you mean max_in_flight?)`,
		`:6:11: http.timeout: must be a quoted Go duration`,
		`:9:1: routes[0] ("broken").when: line 1, column `,
		`:11:3: routes[0] ("broken").requests[0].url: template: url:1:`,
		`:13:3: routes[0] ("broken").requests[0].headers.X-Key: template: `,
	} {
		if !strings.Contains(errOut, path+w) {
			t.Errorf("missing %q in:\n%s", path+w, errOut)
		}
	}
	if n := strings.Count(strings.TrimSpace(errOut), "\n") + 1; n != 6 {
		t.Errorf("%d lines, want 6:\n%s", n, errOut)
	}
}

// secretConfig has an admin token from the environment and credentials in
// a header; the admin server listens on a free port.
func secretConfig(t *testing.T, admin string) string {
	t.Helper()
	return writeConfig(t, `
[kafka]
embedded_listen = "127.0.0.1:0"
embedded_partitions = 1
[admin]
listen = "`+admin+`"
token = "${ORDERLY_ADMIN_TOKEN}"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "http://user:url-password@127.0.0.1:1/{{ .Key }}"
  [routes.requests.headers]
  Authorization = "Bearer header-secret"
  X-Trace = "visible"
`)
}

var secrets = []string{"token-secret", "header-secret", "url-password"}

// TestValidatePrintRedacts: validate --print shows the effective
// configuration on stdout without a secret.
func TestValidatePrintRedacts(t *testing.T) {
	t.Setenv("ORDERLY_ADMIN_TOKEN", "token-secret")
	path := secretConfig(t, "127.0.0.1:0")
	code, out, errOut := runCLI(t, "validate", "--print", "--config", path)
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, errOut)
	}
	for _, w := range []string{"max_in_flight = 2000", "X-Trace = 'visible'", "REDACTED"} {
		if !strings.Contains(out, w) {
			t.Errorf("--print does not show %q:\n%s", w, out)
		}
	}
	for _, s := range secrets {
		if strings.Contains(out+errOut, s) {
			t.Errorf("--print shows the secret %q:\n%s", s, out)
		}
	}
	if !strings.Contains(errOut, path+": ok") {
		t.Errorf("stderr %q, want the ok line", errOut)
	}
}

// TestRunLogsRedactedConfig: `orderly run` logs the effective configuration
// at start-up, secrets redacted.
func TestRunLogsRedactedConfig(t *testing.T) {
	t.Setenv("ORDERLY_ADMIN_TOKEN", "token-secret")
	path := secretConfig(t, testkit.FreeAddr(t))
	p := start(t, "run", "--config", path)
	testkit.WaitFor(t, 30*time.Second, "the configuration in the log", func() bool {
		return strings.Contains(p.output(), "effective configuration")
	})
	out := p.output()
	if !regexp.MustCompile(`"level":"INFO","msg":"effective configuration \(secrets redacted\)","config":"[^"]*max_in_flight = 2000`).MatchString(out) {
		t.Errorf("no info line with the configuration:\n%s", out)
	}
	for _, s := range secrets {
		if strings.Contains(out, s) {
			t.Errorf("the log shows the secret %q:\n%s", s, out)
		}
	}
}

// TestDLQUnauthorized: a 401 says where the token came from and how to set
// it; --token-file is read.
func TestDLQUnauthorized(t *testing.T) {
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Header.Get("Authorization"))
		if r.Header.Get("Authorization") == "Bearer right" {
			w.Write([]byte(`{"messages":[]}`))
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error":"missing or wrong bearer token"}`))
	}))
	defer srv.Close()

	t.Setenv("ORDERLY_ADMIN_TOKEN", "")
	code, _, errOut := runCLI(t, "dlq", "list", "--admin", srv.URL)
	if code != 1 || !strings.Contains(errOut, "no admin token was sent ($ORDERLY_ADMIN_TOKEN is empty): set ORDERLY_ADMIN_TOKEN") ||
		!strings.Contains(errOut, "--token-file FILE") {
		t.Errorf("no token: exit %d:\n%s", code, errOut)
	}
	t.Setenv("ORDERLY_ADMIN_TOKEN", "wrong")
	code, _, errOut = runCLI(t, "dlq", "status", "--admin", srv.URL)
	if code != 1 || !strings.Contains(errOut, "refused the token from $ORDERLY_ADMIN_TOKEN") {
		t.Errorf("wrong token: exit %d:\n%s", code, errOut)
	}
	file := filepath.Join(t.TempDir(), "token")
	os.WriteFile(file, []byte("right\n"), 0o600)
	if code, out, errOut := runCLI(t, "dlq", "list", "--admin", srv.URL, "--token-file", file); code != 0 || !strings.Contains(out, "messages") {
		t.Errorf("--token-file: exit %d: %s%s", code, out, errOut)
	}
	if last := got[len(got)-1]; last != "Bearer right" {
		t.Errorf("--token-file sent %q", last)
	}
	if code, _, _ := runCLI(t, "dlq", "list", "--admin", srv.URL, "--token", "x", "--token-file", file); code != 2 {
		t.Errorf("--token and --token-file: exit %d, want 2", code)
	}
}

// TestValidateNamesEmptyTokenVariable: admin.token = "${ORDERLY_ADMIN_TOKEN}"
// with the variable unset names the variable.
func TestValidateNamesEmptyTokenVariable(t *testing.T) {
	t.Setenv("ORDERLY_ADMIN_TOKEN", "") // restores the variable afterwards
	os.Unsetenv("ORDERLY_ADMIN_TOKEN")
	path := writeConfig(t, `
[admin]
listen = "0.0.0.0:9464"
token = "${ORDERLY_ADMIN_TOKEN}"
[[routes]]
name = "all"
  [[routes.requests]]
  url = "http://127.0.0.1:1/"
`)
	code, _, errOut := runCLI(t, "validate", "--config", path)
	want := path + ":4:1: admin.token: is empty because the environment variable ORDERLY_ADMIN_TOKEN is not set"
	if code != 2 || !strings.Contains(errOut, want) {
		t.Errorf("exit %d, want 2 and %q in:\n%s", code, want, errOut)
	}
}
