package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/service"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// lbTarget is one backend behind HAProxy: an HTTP server on a fixed
// address that can be stopped and started again (a rolling restart).
type lbTarget struct {
	addr  string
	h     http.Handler
	count atomic.Int64
	mu    sync.Mutex
	srv   *http.Server
	done  chan struct{}
}

func (tg *lbTarget) start(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	for i := 0; i < 100; i++ { // the port may linger briefly after a stop
		if ln, err = net.Listen("tcp", tg.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("restart %s: %v", tg.addr, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tg.count.Add(1)
		tg.h.ServeHTTP(w, r)
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ln) }()
	tg.mu.Lock()
	tg.srv, tg.done = srv, done
	tg.mu.Unlock()
}

// stop closes the listener and every connection at once, as a killed
// target would.
func (tg *lbTarget) stop() {
	tg.mu.Lock()
	srv, done := tg.srv, tg.done
	tg.srv = nil
	tg.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
		<-done
	}
}

// TestL4LoadBalancer puts a real HAProxy (mode tcp, balance roundrobin) in
// front of three targets. Connections recycle after http.max_conn_age, so
// every target gets at least 20% of the requests; a rolling restart of the
// targets while messages flow loses nothing and breaks no per-key order.
func TestL4LoadBalancer(t *testing.T) {
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("ORDERLY_E2E") == "1" {
			t.Fatal("haproxy not installed (ORDERLY_E2E=1)")
		}
		t.Skip("haproxy not installed: apt-get install haproxy")
	}
	if testing.Short() {
		t.Skip("end-to-end: skipped with -short")
	}
	sink := testkit.NewSink()
	targets := make([]*lbTarget, 3)
	for i := range targets {
		targets[i] = &lbTarget{addr: testkit.FreeAddr(t), h: sink}
		targets[i].start(t)
		t.Cleanup(targets[i].stop)
	}
	front := testkit.FreeAddr(t)
	cfgPath := filepath.Join(t.TempDir(), "haproxy.cfg")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf(`global
  maxconn 4096
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option redispatch
  retries 3
frontend targets
  bind %s
  default_backend targets
backend targets
  balance roundrobin
  server t0 %s check inter 100ms fall 1 rise 1
  server t1 %s check inter 100ms fall 1 rise 1
  server t2 %s check inter 100ms fall 1 rise 1
`, front, targets[0].addr, targets[1].addr, targets[2].addr)), 0o644)
	if out, err := exec.Command(haproxy, "-c", "-f", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	hp := exec.Command(haproxy, "-db", "-f", cfgPath)
	hp.Stdout, hp.Stderr = os.Stderr, os.Stderr
	if err := hp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = hp.Process.Kill(); _ = hp.Wait() })
	testkit.WaitFor(t, 10*time.Second, "haproxy listening", func() bool {
		c, err := net.DialTimeout("tcp", front, 100*time.Millisecond)
		if err == nil {
			c.Close()
		}
		return err == nil
	})

	cfg, err := config.Parse([]byte(fmt.Sprintf(`
[kafka]
group_id = "lb"
embedded_listen = "127.0.0.1:0"
embedded_partitions = 4
[kafka.properties]
"session.timeout.ms" = 1000
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
[http]
max_conn_age = "200ms"
max_conns_per_host = 32
[http.retry]
max_attempts = 0
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
`, front)), "lb.toml")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler), "test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(svc.Close)
	ctx, cancel := context.WithCancel(context.Background())
	runErr := make(chan error, 1)
	go func() { runErr <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runErr; err != nil {
			t.Errorf("run: %v", err)
		}
	})
	prod, err := testkit.NewProducer(svc.Brokers())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(prod.Close)

	// Phase 1: spread. A steady trickle over a few seconds, so that
	// connections age out and re-spread over the backends.
	gen := &testkit.Generator{Keys: 50}
	for i := 0; i < 20; i++ {
		if err := prod.Produce(ctx, "orders", gen.Records(100)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond) // pacing the producer, not an assertion
	}
	testkit.WaitFor(t, time.Minute, "phase 1 delivered", func() bool { return sink.Distinct() >= 2000 })
	total := targets[0].count.Load() + targets[1].count.Load() + targets[2].count.Load()
	for i, tg := range targets {
		share := float64(tg.count.Load()) / float64(total)
		t.Logf("target %d received %.1f%% of %d requests", i, 100*share, total)
		if share < 0.20 {
			t.Errorf("target %d received %.1f%% of the requests, want at least 20%%", i, 100*share)
		}
	}

	// Phase 2: a rolling restart of the targets while messages flow.
	var wg sync.WaitGroup
	produced := make(chan error, 1)
	wg.Go(func() {
		for i := 0; i < 30; i++ {
			if err := prod.Produce(ctx, "orders", gen.Records(100)); err != nil {
				produced <- err
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		produced <- nil
	})
	for _, tg := range targets {
		time.Sleep(200 * time.Millisecond) // let traffic flow between restarts
		tg.stop()
		time.Sleep(300 * time.Millisecond) // the target is down this long
		tg.start(t)
	}
	wg.Wait()
	if err := <-produced; err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 2*time.Minute, "everything delivered after the rolling restart", func() bool { return sink.Distinct() >= 5000 })
	rep := sink.Check(gen.Expected())
	t.Logf("after a rolling restart behind haproxy: %s", rep)
	if !rep.OK() {
		t.Fatal(rep)
	}
}
