package e2e

// Orderly behind a real L4 load balancer: HAProxy (mode tcp, balance
// roundrobin, TCP health checks every 100 ms) in front of three HTTP targets
// that share one recording sink, and Orderly as `orderly run` wires it
// (internal/service, embedded broker).
//
//   - spread: with http.max_conn_age = "200ms" Orderly's connections age out
//     and HAProxy hands the new ones round robin to the targets, so every
//     target serves at least 20% of the requests.
//   - rolling restart: while messages keep flowing, target 1 is killed (its
//     listener and every open connection closed at once, in the middle of
//     serving a request that Orderly then has to retry), HAProxy marks it
//     DOWN, it stays down at least 300 ms while the others carry the load, it
//     comes back on the same port, HAProxy marks it UP and it serves requests
//     again; then target 2, then target 3. Afterwards nothing is missing, no
//     key saw its events out of order, and nothing was dead-lettered.
//
// HAProxy's state is read from its stats socket (`show stat`), so the test
// waits for conditions, not for "long enough". Without haproxy the test skips,
// unless ORDERLY_E2E=1 (CI), which makes it fail. Identifiers here start with
// "hp" to stay out of the way of the package's other tests.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/csv"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/service"
	"github.com/orderly-dispatch/orderly/internal/testkit"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// hpTarget is one backend behind HAProxy: an HTTP server on a fixed address
// that can be killed and started again on the same port. Every target serves
// the same handler (the shared sink) and counts the requests it served.
type hpTarget struct {
	name  string
	addr  string
	h     http.Handler
	count atomic.Int64
	// served maps the Idempotency-Key of every request answered 2xx, by
	// any target, to the target's name (shared by all targets).
	served *sync.Map
	// hold makes the next request hang until its connection dies; heldKeys
	// are the Idempotency-Keys of the requests caught that way.
	hold     atomic.Bool
	held     atomic.Int64
	heldKeys []string // under mu

	mu   sync.Mutex
	srv  *http.Server
	done chan struct{}
}

func (tg *hpTarget) start(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	deadline := time.Now().Add(5 * time.Second)
	for { // Go listeners set SO_REUSEADDR; this only rides out a slow close
		if ln, err = net.Listen("tcp", tg.addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("start %s on %s: %v", tg.name, tg.addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tg.count.Add(1)
		if tg.hold.CompareAndSwap(true, false) {
			tg.mu.Lock()
			tg.heldKeys = append(tg.heldKeys, r.Header.Get("Idempotency-Key"))
			tg.mu.Unlock()
			tg.held.Add(1)
			select { // never answered: the kill cuts it off
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
			return
		}
		sw := &hpStatusWriter{ResponseWriter: w}
		tg.h.ServeHTTP(sw, r)
		if sw.status == 0 || sw.status/100 == 2 {
			tg.served.Store(r.Header.Get("Idempotency-Key"), tg.name)
		}
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	tg.mu.Lock()
	tg.srv, tg.done = srv, done
	tg.mu.Unlock()
}

// hpStatusWriter remembers the status a handler answered with.
type hpStatusWriter struct {
	http.ResponseWriter
	status int
}

func (w *hpStatusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// kill closes the listener and every connection at once, requests in flight
// included, as a crashing or SIGKILLed target would.
func (tg *hpTarget) kill() {
	tg.mu.Lock()
	srv, done := tg.srv, tg.done
	tg.srv = nil
	tg.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
		<-done
	}
}

// hpLockedBuffer collects HAProxy's output for the failure log.
type hpLockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *hpLockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *hpLockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// hpServerStatus asks HAProxy's stats socket for the status of every server
// of backend "targets" ("UP", "DOWN", ...).
func hpServerStatus(sock string) (map[string]string, error) {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "show stat\n"); err != nil {
		return nil, err
	}
	raw, err := io.ReadAll(bufio.NewReader(c))
	if err != nil {
		return nil, err
	}
	r := csv.NewReader(bytes.NewReader(bytes.TrimPrefix(raw, []byte("# "))))
	r.FieldsPerRecord = -1
	rows, err := r.ReadAll()
	if err != nil {
		return nil, fmt.Errorf("show stat: %v: %q", err, raw)
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("show stat: empty answer")
	}
	col := map[string]int{}
	for i, name := range rows[0] {
		col[name] = i
	}
	px, sv, st := col["pxname"], col["svname"], col["status"]
	out := map[string]string{}
	for _, row := range rows[1:] {
		if len(row) > st && row[px] == "targets" && row[sv] != "BACKEND" && row[sv] != "FRONTEND" {
			out[row[sv]] = row[st]
		}
	}
	return out, nil
}

// hpCounter is the value of a counter series of m with the given labels (0
// when it has none yet).
func hpCounter(t *testing.T, m *telemetry.Metrics, name string, labels map[string]string) float64 {
	t.Helper()
	return m.SumWhere(name, labels)
}

func TestHAProxyRoundRobinAndRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test: skipped with -short")
	}
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		skipMissing(t, "haproxy is not installed (not in $PATH)", "install it (apt-get install haproxy) to run this test")
	}

	// Three targets sharing one sink, so that per-key order is checked
	// across all of them.
	sink := testkit.NewSink()
	var served sync.Map
	targets := make([]*hpTarget, 3)
	for i := range targets {
		targets[i] = &hpTarget{name: fmt.Sprintf("target%d", i+1), addr: testkit.FreeAddr(t), h: sink, served: &served}
		targets[i].start(t)
		t.Cleanup(targets[i].kill)
	}

	// HAProxy: its socket path must stay under the 108 bytes of sun_path,
	// which a t.TempDir() under a long TMPDIR may not.
	dir, err := os.MkdirTemp("", "orderly-hp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "stats.sock")
	front := testkit.FreeAddr(t)
	var servers strings.Builder
	for _, tg := range targets {
		fmt.Fprintf(&servers, "  server %s %s check inter 100ms fall 1 rise 1\n", tg.name, tg.addr)
	}
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(`global
  maxconn 4096
  stats socket %s mode 600 level admin
defaults
  mode tcp
  log stderr format short local0 info
  option tcplog
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout check 500ms
  option redispatch
  retries 3
frontend front
  bind %s
  default_backend targets
backend targets
  balance roundrobin
%s`, sock, front, servers.String())), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(haproxy, "-c", "-f", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	hpOut := &hpLockedBuffer{}
	hp := exec.Command(haproxy, "-db", "-f", cfgPath)
	hp.Stdout, hp.Stderr = hpOut, hpOut
	if err := hp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = hp.Process.Kill()
		_ = hp.Wait()
		if t.Failed() {
			out := hpOut.String()
			if len(out) > 8000 {
				out = "..." + out[len(out)-8000:]
			}
			t.Logf("haproxy output:\n%s", out)
		}
	})
	status := func() map[string]string {
		st, err := hpServerStatus(sock)
		if err != nil {
			return nil
		}
		return st
	}
	testkit.WaitFor(t, 10*time.Second, "haproxy to listen and report every target UP", func() bool {
		st := status()
		for _, tg := range targets {
			if st[tg.name] != "UP" {
				return false
			}
		}
		c, err := net.DialTimeout("tcp", front, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	// Orderly, through HAProxy. Retries are bounded (about 3 s of backoff)
	// so that a message lost to the restarts would show as dead-lettered,
	// not as a stall; the breaker is off because every request goes to one
	// host:port (HAProxy), where a tripped breaker would stop everything.
	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
group_id = "haproxy-e2e"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 4
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
[http]
timeout = "2s"
max_conn_age = "200ms"
max_conns_per_host = 32
[http.retry]
max_attempts = 20
initial_backoff = "10ms"
max_backoff = "200ms"
[http.breaker]
enabled = false
[admin]
listen = ""
[[routes]]
name = "people"
  [[routes.requests]]
  url = "http://%s/people/{{ .Key }}"
`, front)), "haproxy-e2e.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler), "test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close) // runs after Run returned and the producer closed: the broker goes last
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-runErr:
			if err != nil {
				t.Errorf("service run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("service did not stop within 30s")
		}
	})
	prod, err := testkit.NewProducer(svc.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(prod.Close)
	m := svc.Metrics()
	gen := &testkit.Generator{Keys: 50}
	counts := func() []int64 {
		c := make([]int64, len(targets))
		for i, tg := range targets {
			c[i] = tg.count.Load()
		}
		return c
	}

	// Phase 1: spread. A steady trickle for about two seconds, so that
	// connections age out (200 ms) many times over.
	const phase1 = 2000
	for i := 0; i < phase1/100; i++ {
		if err := prod.Produce(ctx, "orders", gen.Records(100)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // pacing the producer, not waiting for an outcome
	}
	testkit.WaitFor(t, 30*time.Second, "phase 1 delivered", func() bool { return sink.Distinct() >= phase1 })
	c1 := counts()
	var total int64
	for _, n := range c1 {
		total += n
	}
	for i, tg := range targets {
		share := float64(c1[i]) / float64(total)
		t.Logf("spread: %s served %d of %d requests (%.1f%%)", tg.name, c1[i], total, 100*share)
		if share < 0.20 {
			t.Errorf("%s served %.1f%% of the requests, want at least 20%%", tg.name, 100*share)
		}
	}

	// Phase 2: a rolling restart while a producer keeps messages flowing.
	stopProducing := make(chan struct{})
	producerDone := make(chan struct{})
	var producerErr error
	var stopOnce sync.Once
	stop := func() { stopOnce.Do(func() { close(stopProducing) }) }
	go func() {
		defer close(producerDone)
		for {
			select {
			case <-stopProducing:
				return
			default:
			}
			if err := prod.Produce(ctx, "orders", gen.Records(50)); err != nil {
				producerErr = err
				return
			}
			time.Sleep(25 * time.Millisecond) // pacing, about 2000 messages/s
		}
	}()
	t.Cleanup(func() { stop(); <-producerDone }) // runs before prod.Close
	retries0 := hpCounter(t, m, "orderly_http_retries_total", nil)
	errors0 := hpCounter(t, m, "orderly_http_requests_total", map[string]string{"status": "error"})
	const downFor = 300 * time.Millisecond
	for i, tg := range targets {
		// It serves traffic before it goes down.
		before := tg.count.Load()
		testkit.WaitFor(t, 10*time.Second, tg.name+" serving before its restart", func() bool {
			return tg.count.Load() > before+20
		})
		// A request is in the middle of being served when it dies.
		heldBefore := tg.held.Load()
		tg.hold.Store(true)
		testkit.WaitFor(t, 10*time.Second, "a request held by "+tg.name, func() bool { return tg.held.Load() > heldBefore })
		killed := time.Now()
		tg.kill()
		testkit.WaitFor(t, 5*time.Second, "haproxy to mark "+tg.name+" DOWN", func() bool {
			return status()[tg.name] == "DOWN"
		})
		detected := time.Since(killed)
		// While it is down, the other targets carry the load: deliveries go on.
		others := func() int64 {
			var n int64
			for j, o := range targets {
				if j != i {
					n += o.count.Load()
				}
			}
			return n
		}
		othersAtKill, distinctAtKill := others(), sink.Distinct()
		testkit.WaitFor(t, 10*time.Second, fmt.Sprintf("%s down for %s while the others deliver", tg.name, downFor), func() bool {
			return time.Since(killed) >= downFor && others() > othersAtKill+20 && sink.Distinct() > distinctAtKill
		})
		downCount, othersAtStart := tg.count.Load(), others()
		tg.start(t)
		restarted := time.Now()
		testkit.WaitFor(t, 5*time.Second, "haproxy to mark "+tg.name+" UP again", func() bool {
			return status()[tg.name] == "UP"
		})
		up := time.Since(restarted)
		testkit.WaitFor(t, 10*time.Second, tg.name+" serving again after its restart", func() bool {
			return tg.count.Load() > downCount+20
		})
		t.Logf("rolling restart: %s down %s (HAProxy saw it DOWN after %s and UP %s after its start); "+
			"the other targets served %d requests meanwhile", tg.name, restarted.Sub(killed).Round(time.Millisecond),
			detected.Round(time.Millisecond), up.Round(time.Millisecond), othersAtStart-othersAtKill)
	}
	stop()
	<-producerDone
	if producerErr != nil {
		t.Fatalf("producer: %v", producerErr)
	}
	want := 0
	for _, seqs := range gen.Expected() {
		want += len(seqs)
	}
	testkit.WaitFor(t, 30*time.Second, fmt.Sprintf("all %d messages delivered after the rolling restart", want), func() bool {
		return sink.Distinct() >= want
	})
	c2 := counts()
	for i, tg := range targets {
		t.Logf("rolling restart phase: %s served %d requests", tg.name, c2[i]-c1[i])
	}
	rep := sink.Check(gen.Expected())
	retries := hpCounter(t, m, "orderly_http_retries_total", nil) - retries0
	transportErrors := hpCounter(t, m, "orderly_http_requests_total", map[string]string{"status": "error"}) - errors0
	dead := hpCounter(t, m, "orderly_messages_total", map[string]string{"outcome": telemetry.OutcomeDeadLettered})
	t.Logf("after the rolling restart: %s; Orderly saw %.0f transport errors and made %.0f retries",
		rep, transportErrors, retries)
	if !rep.OK() {
		t.Fatalf("rolling restart behind haproxy: %s", rep)
	}
	// Each kill cut off the request its target was serving; that request
	// was sent again through HAProxy and answered by a live target. (Go's
	// transport resends a request that carries an Idempotency-Key by itself
	// when a reused connection dies, so this need not show in the retry and
	// error counters above.)
	for _, tg := range targets {
		tg.mu.Lock()
		keys := append([]string(nil), tg.heldKeys...)
		tg.mu.Unlock()
		for _, k := range keys {
			by, ok := served.Load(k)
			if !ok {
				t.Errorf("the request %s cut off by the kill of %s was never answered by a target", k, tg.name)
				continue
			}
			t.Logf("the request %s cut off by the kill of %s was delivered again through %s", k, tg.name, by)
		}
	}
	if dead != 0 {
		t.Fatalf("%.0f messages were dead-lettered during the rolling restart, want 0", dead)
	}
}
