package main

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

var binary string

// TestMain builds the orderly binary once for the process tests.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "orderly-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "orderly")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building orderly: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a running orderly process.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

// syncBuffer is a bytes.Buffer safe for the process's writes and the
// test's reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func (p *proc) output() string { return p.out.String() }

func start(t *testing.T, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(binary, args...), out: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("orderly output:\n%s", p.out.String())
		}
	})
	return p
}

func httpStatus(url string) int {
	resp, err := http.Get(url)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.toml")
	os.WriteFile(good, []byte(`
[[routes]]
name = "all"
  [[routes.requests]]
  url = "http://127.0.0.1:1/{{ .Key }}"
`), 0o644)
	var out, errb bytes.Buffer
	if code := run([]string{"validate", "--config", good}, &out, &errb); code != 0 {
		t.Fatalf("validate good config: exit %d: %s", code, errb.String())
	}
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte(`
[dispatch]
max_in_flight = 0
unkeyed = "sometimes"
[[routes]]
name = "broken"
when = 'value.type =='
  [[routes.requests]]
  url = "http://127.0.0.1:1/{{ .Key"
`), 0o644)
	out.Reset()
	errb.Reset()
	code := run([]string{"validate", "--config", bad}, &out, &errb)
	if code != 2 {
		t.Fatalf("validate bad config: exit %d, want 2", code)
	}
	for _, want := range []string{"dispatch.max_in_flight", "dispatch.unkeyed"} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("validate output does not name %s:\n%s", want, errb.String())
		}
	}
	t.Logf("validate output:\n%s", errb.String())
}

func TestValidateCompilesRoutes(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte(`
[[routes]]
name = "broken"
when = 'value.type =='
  [[routes.requests]]
  url = "http://127.0.0.1:1/{{ .Key"
`), 0o644)
	var out, errb bytes.Buffer
	if code := run([]string{"validate", "--config", bad}, &out, &errb); code != 2 {
		t.Fatalf("exit %d, want 2", code)
	}
	for _, want := range []string{"broken", "when", "url"} {
		if !strings.Contains(errb.String(), want) {
			t.Errorf("validate output does not name %q:\n%s", want, errb.String())
		}
	}
}

// TestSIGTERMDrainsAndRestartDeliversTheRest runs the built binary against a
// broker and a sink outside it: SIGTERM mid-run exits 0 within drain_timeout,
// and a restart delivers the rest with nothing lost.
func TestSIGTERMDrainsAndRestartDeliversTheRest(t *testing.T) {
	b, err := embedded.Start(embedded.Options{Listen: "127.0.0.1:0", Partitions: 4, Topics: []string{"orders", "orderly.dlq"},
		MinSessionTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	sink := testkit.NewSink()
	sink.Jitter, sink.JitterSeed = time.Millisecond, kafkatest.Seed(t, "ORDERLY_TEST_SEED")
	sink.Delay = func(*testkit.Delivery) time.Duration { return 2 * time.Millisecond }
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close)

	const n = 6000
	gen := &testkit.Generator{Keys: 100}
	prod, err := testkit.NewProducer(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	if err := prod.Produce(context.Background(), "orders", gen.Records(n)); err != nil {
		t.Fatal(err)
	}

	admin := testkit.FreeAddr(t)
	cfgPath := filepath.Join(t.TempDir(), "orderly.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = "sigterm"
topics = ["orders"]
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
[dispatch]
max_in_flight = 50
commit_interval = "200ms"
drain_timeout = "5s"
[admin]
listen = %q
[log]
level = "info"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, b.Addr(), admin, srv.URL)), 0o644)

	p := start(t, "run", "--config", cfgPath)
	testkit.WaitFor(t, 30*time.Second, "readiness", func() bool { return httpStatus("http://"+admin+"/readyz") == 200 })
	testkit.WaitFor(t, time.Minute, "a third delivered", func() bool { return sink.Distinct() >= n/3 })
	testkit.WaitFor(t, time.Minute, "requests in flight", func() bool { return sink.InFlight() >= 5 })
	inFlight := sink.InFlight()
	sent := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, p.out.String())
		}
	case <-time.After(5*time.Second + 10*time.Second):
		t.Fatalf("no exit within drain_timeout (5s) and a margin")
	}
	took := time.Since(sent)
	atStop := sink.Distinct()
	t.Logf("exit 0 %s after SIGTERM with %d requests in flight and %d of %d delivered", took.Round(time.Millisecond), inFlight, atStop, n)
	if atStop >= n {
		t.Fatalf("everything was delivered before SIGTERM took effect; the test proves nothing")
	}
	// The drain finished what was in flight and committed it: the commits
	// cover exactly what was delivered (a prefix of each partition).
	if c := committedSum(t, b.Addr(), "sigterm", "orders", 4); c != int64(atStop) {
		t.Fatalf("committed %d offsets after the drain, but %d messages were delivered", c, atStop)
	}

	p2 := start(t, "run", "--config", cfgPath)
	testkit.WaitFor(t, 2*time.Minute, "the rest delivered", func() bool { return sink.Distinct() >= n })
	rep := sink.Check(gen.Expected())
	if !rep.OK() || rep.Duplicates != 0 {
		t.Fatalf("the restart lost or sent again what the drain committed: %s", rep)
	}
	t.Logf("after restart: %s", rep)
	if err := p2.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-p2.done; err != nil {
		t.Fatalf("second exit: %v", err)
	}
	p2.done <- nil
}

// TestUnreachableBrokerAtStart: with no broker at the configured address,
// orderly keeps retrying with a clear log line and readiness stays 503; once
// a broker appears there it becomes ready and delivers.
func TestUnreachableBrokerAtStart(t *testing.T) {
	kafkaAddr, admin := testkit.FreeAddr(t), testkit.FreeAddr(t)
	sink := testkit.NewSink()
	srv := httptest.NewServer(sink)
	t.Cleanup(srv.Close)
	cfgPath := filepath.Join(t.TempDir(), "orderly.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = "late"
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
"reconnect.backoff.max.ms" = 500
[admin]
listen = %q
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, kafkaAddr, admin, srv.URL)), 0o644)
	p := start(t, "run", "--config", cfgPath)
	testkit.WaitFor(t, 30*time.Second, "a log line about the unreachable broker", func() bool {
		return strings.Contains(p.output(), "kafka unreachable")
	})
	if st := httpStatus("http://" + admin + "/readyz"); st != 503 {
		t.Fatalf("readyz %d without a broker, want 503", st)
	}
	b, err := embedded.Start(embedded.Options{Listen: kafkaAddr, Partitions: 2, Topics: []string{"orders", "orderly.dlq"},
		MinSessionTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	testkit.WaitFor(t, 60*time.Second, "readiness once the broker is up", func() bool { return httpStatus("http://"+admin+"/readyz") == 200 })
	gen := &testkit.Generator{Keys: 5}
	prod, err := testkit.NewProducer(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	if err := prod.Produce(context.Background(), "orders", gen.Records(50)); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "delivery", func() bool { return sink.Distinct() >= 50 })
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-p.done; err != nil {
		t.Fatalf("exit: %v", err)
	}
	p.done <- nil
}
