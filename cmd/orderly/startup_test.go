package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// logLines returns the JSON log lines of out at level whose message
// contains msg.
func logLines(out, level, msg string) []map[string]any {
	var got []map[string]any
	for _, l := range strings.Split(out, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) != nil {
			continue
		}
		if rec["level"] == level && strings.Contains(fmt.Sprint(rec["msg"]), msg) {
			got = append(got, rec)
		}
	}
	return got
}

// TestStartWaitsForWhatIsNotReady: `orderly run` started while its admin
// address is still taken and no broker listens at kafka.brokers (with the
// DLQ and key quarantine on, so that the DLQ, quarantine and jobs topics
// are needed too) keeps running and says what it waits for; once the
// address is free and a broker starts there, it delivers, and exits 0 on
// SIGTERM. Nothing but librdkafka's connection failures is logged at error
// level on the way.
func TestStartWaitsForWhatIsNotReady(t *testing.T) {
	kafkaAddr := testkit.FreeAddr(t)
	held, err := net.Listen("tcp", "127.0.0.1:0") // an instance still stopping
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	admin := held.Addr().String()
	sink := testkit.NewSink()
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close)
	cfgPath := filepath.Join(t.TempDir(), "orderly.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = "not-ready"
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
"reconnect.backoff.max.ms" = 500
[dlq]
topic = "orderly.dlq"
quarantine_keys = true
[admin]
listen = %q
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, kafkaAddr, admin, srv.URL)), 0o644)

	p := start(t, "run", "--config", cfgPath)
	testkit.WaitFor(t, 30*time.Second, "a warning about the admin address in use", func() bool {
		return len(logLines(p.output(), "WARN", "admin server: address in use, retrying")) > 0
	})
	held.Close()
	testkit.WaitFor(t, 30*time.Second, "the admin server, once its address is free", func() bool {
		return httpStatus("http://"+admin+"/healthz") == 200
	})
	// The dispatcher runs: its DLQ producer finds no broker (the
	// quarantine's load waits for one too, and warns after 30 s).
	testkit.WaitFor(t, 30*time.Second, "a warning about the unreachable broker", func() bool {
		for _, rec := range logLines(p.output(), "WARN", "dlq producer error") {
			if strings.Contains(fmt.Sprint(rec["error"]), "brokers are down") {
				return true
			}
		}
		return false
	})
	if st := httpStatus("http://" + admin + "/readyz"); st != 503 {
		t.Fatalf("readyz %d without a broker, want 503", st)
	}
	// It keeps waiting: no exit for a few seconds without a broker.
	select {
	case err := <-p.done:
		p.done <- err
		t.Fatalf("orderly exited while waiting for the broker: %v", err)
	case <-time.After(3 * time.Second):
	}

	// The topics the dispatcher consumes and writes exist; the quarantine
	// and jobs topics are created by orderly.
	b, err := embedded.Start(embedded.Options{Listen: kafkaAddr, Partitions: 2, Topics: []string{"orders", "orderly.dlq"},
		MinSessionTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	gen := &testkit.Generator{Keys: 5}
	prod, err := testkit.NewProducer(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	if err := prod.Produce(context.Background(), "orders", gen.Records(50)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 90*time.Second, "delivery once the broker is up", func() bool { return sink.Distinct() >= 50 })
	testkit.WaitFor(t, 30*time.Second, "readiness", func() bool { return httpStatus("http://"+admin+"/readyz") == 200 })
	if rep := sink.Check(gen.Expected()); !rep.OK() {
		t.Fatalf("delivery: %s", rep)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-p.done; err != nil {
		t.Fatalf("exit: %v", err)
	}
	p.done <- nil
	// librdkafka logs its refused connections at error level itself.
	for _, rec := range logLines(p.output(), "ERROR", "") {
		if rec["component"] != "librdkafka" {
			t.Errorf("logged at error level while waiting for what was not ready: %v", rec)
		}
	}
}

// TestStartFailureIsLoggedAtErrorLevel: a configuration that does not load,
// and a service that cannot start (an admin address this host does not
// have), exit non-zero after a line at error level that says why.
func TestStartFailureIsLoggedAtErrorLevel(t *testing.T) {
	t.Run("invalid configuration", func(t *testing.T) {
		path := writeConfig(t, `
[kafka]
brokers = "127.0.0.1:1"
[dispatch]
commit_interval = "soon"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "http://127.0.0.1:1/people"
`)
		code, _, stderr := runCLI(t, "run", "--config", path)
		if code != 2 {
			t.Fatalf("exit %d, want 2; stderr:\n%s", code, stderr)
		}
		recs := logLines(stderr, "ERROR", "invalid configuration")
		if len(recs) != 1 || !strings.Contains(fmt.Sprint(recs[0]["error"]), "dispatch.commit_interval") {
			t.Fatalf("want one error line naming dispatch.commit_interval; stderr:\n%s", stderr)
		}
	})
	t.Run("admin address not on this host", func(t *testing.T) {
		path := writeConfig(t, fmt.Sprintf(`
[kafka]
brokers = %q
[admin]
listen = "192.0.2.1:9464"
token = "secret"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "http://127.0.0.1:1/people"
`, testkit.FreeAddr(t)))
		p := start(t, "run", "--config", path)
		var err error
		select {
		case err = <-p.done:
			p.done <- err
		case <-time.After(30 * time.Second):
			t.Fatal("orderly still runs with an admin address it cannot listen on")
		}
		if code := p.cmd.ProcessState.ExitCode(); code != 1 {
			t.Fatalf("exit %d (%v), want 1; output:\n%s", code, err, p.output())
		}
		recs := logLines(p.output(), "ERROR", "unable to start")
		if len(recs) != 1 || !strings.Contains(fmt.Sprint(recs[0]["error"]), "192.0.2.1:9464") {
			t.Fatalf("want one error line naming the admin address; output:\n%s", p.output())
		}
	})
}
