package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// chaosEnv is a broker and a sink in the test process, and a configuration
// file for orderly processes that use them.
type chaosEnv struct {
	broker *embedded.Broker
	sink   *testkit.Sink
	gen    *testkit.Generator
	cfg    string
}

// setup, if given, sets the sink's hooks before it serves.
func newChaosEnv(t *testing.T, partitions, n, keys int, group, dispatchTOML string, delay time.Duration, setup ...func(*testkit.Sink)) *chaosEnv {
	t.Helper()
	b, err := embedded.Start(embedded.Options{Listen: "127.0.0.1:0", Partitions: partitions,
		Topics: []string{"orders", "orderly.dlq"}, MinSessionTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	e := &chaosEnv{broker: b, sink: testkit.NewSink(), gen: &testkit.Generator{Keys: keys}}
	// Random latency on every request, also with a fixed delay.
	e.sink.Jitter, e.sink.JitterSeed = time.Millisecond, kafkatest.Seed(t, "ORDERLY_TEST_SEED")
	var mu = make(chan struct{}, 1)
	rng := rand.New(rand.NewPCG(5, 6))
	e.sink.Delay = func(*testkit.Delivery) time.Duration {
		if delay > 0 {
			return delay
		}
		mu <- struct{}{}
		defer func() { <-mu }()
		return time.Duration(rng.IntN(1000)) * time.Microsecond
	}
	for _, f := range setup {
		f(e.sink)
	}
	srv := httptest.NewServer(e.sink)
	t.Cleanup(srv.Close)
	prod, err := testkit.NewProducer(b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	if err := prod.Produce(context.Background(), "orders", e.gen.Records(n)); err != nil {
		t.Fatal(err)
	}
	e.cfg = filepath.Join(t.TempDir(), "orderly.toml")
	os.WriteFile(e.cfg, []byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = %q
topics = ["orders"]
[kafka.properties]
"session.timeout.ms" = 1500
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
drain_timeout = "5s"
%s
[admin]
listen = ""
[log]
level = "warn"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, b.Addr(), group, dispatchTOML, srv.URL)), 0o644)
	return e
}

// TestChaosSIGKILL: 50,000 messages over 1,000 keys while the dispatcher is
// SIGKILLed three times at random moments and restarted. Nothing is lost;
// per-key order holds except for redelivered suffixes; duplicates stay
// within the bound that uncommitted work allows.
func TestChaosSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test: skipped with -short")
	}
	const n, keys, parts, maxInFlight, kills = 50000, 1000, 8, 500, 3
	e := newChaosEnv(t, parts, n, keys, "chaos", fmt.Sprintf("max_in_flight = %d", maxInFlight), 0)
	// The kill points: logged, and repeatable with ORDERLY_CHAOS_SEED.
	rng := rand.New(rand.NewPCG(kafkatest.Seed(t, "ORDERLY_CHAOS_SEED"), 1))
	p := start(t, "run", "--config", e.cfg)
	for k := 0; k < kills; k++ {
		// Kill somewhere in the next stretch of progress.
		target := e.sink.Distinct() + 2000 + rng.IntN(8000)
		testkit.WaitFor(t, 2*time.Minute, fmt.Sprintf("progress to %d before kill %d", target, k+1),
			func() bool { return e.sink.Distinct() >= target })
		if err := p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		<-p.done
		p.done <- nil
		t.Logf("kill %d at %d distinct deliveries", k+1, e.sink.Distinct())
		p = start(t, "run", "--config", e.cfg)
	}
	testkit.WaitFor(t, 3*time.Minute, "every message delivered", func() bool { return e.sink.Distinct() >= n })
	rep := e.sink.Check(e.gen.Expected())
	t.Logf("after %d SIGKILLs: %s", kills, rep)
	if !rep.OK() {
		t.Fatal(rep)
	}
	// What a kill can redeliver is what was handed out but not committed:
	// up to max_in_flight per partition, plus what completed since the
	// last commit (commit_interval 100 ms); bound it generously by twice
	// the in-flight capacity per kill.
	if bound := kills * parts * maxInFlight * 2; rep.Duplicates > bound {
		t.Fatalf("%d duplicates exceed the bound %d", rep.Duplicates, bound)
	}
}

// TestGroupOfProcesses: three dispatcher processes in one group; one is
// killed and a fourth added mid-run. Nothing is lost, order holds as above,
// and every partition is owned at the end (the rest gets delivered).
func TestGroupOfProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test: skipped with -short")
	}
	const n, keys, parts = 30000, 600, 8
	e := newChaosEnv(t, parts, n, keys, "trio", "max_in_flight = 500", time.Millisecond)
	ps := []*proc{start(t, "run", "--config", e.cfg), start(t, "run", "--config", e.cfg), start(t, "run", "--config", e.cfg)}
	testkit.WaitFor(t, 2*time.Minute, "a quarter delivered", func() bool { return e.sink.Distinct() >= n/4 })
	if err := ps[1].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-ps[1].done
	ps[1].done <- nil
	t.Logf("killed one of three at %d", e.sink.Distinct())
	testkit.WaitFor(t, 2*time.Minute, "half delivered", func() bool { return e.sink.Distinct() >= n/2 })
	start(t, "run", "--config", e.cfg)
	t.Logf("added a fourth at %d", e.sink.Distinct())
	testkit.WaitFor(t, 3*time.Minute, "every message delivered", func() bool { return e.sink.Distinct() >= n })
	rep := e.sink.Check(e.gen.Expected())
	t.Logf("group of processes: %s", rep)
	if !rep.OK() {
		t.Fatal(rep)
	}
}
