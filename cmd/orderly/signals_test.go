package main

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// signalEnv is a broker, a sink and a producer in the test process, and a
// configuration file for an orderly process with an admin address.
type signalEnv struct {
	broker *embedded.Broker
	sink   *testkit.Sink
	prod   *testkit.Producer
	admin  string
	cfg    string
}

// newSignalEnv writes a configuration whose [dispatch] and [admin] tables
// get the extra lines given; setup, if given, sets the sink's hooks.
func newSignalEnv(t *testing.T, group, dispatchTOML, adminTOML string, setup func(*testkit.Sink)) *signalEnv {
	t.Helper()
	b, err := embedded.Start(embedded.Options{Listen: "127.0.0.1:0", Partitions: 2, Topics: []string{"orders", "orderly.dlq"},
		MinSessionTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	e := &signalEnv{broker: b, sink: testkit.NewSink(), admin: testkit.FreeAddr(t)}
	e.sink.Jitter, e.sink.JitterSeed = time.Millisecond, kafkatest.Seed(t, "ORDERLY_TEST_SEED")
	if setup != nil {
		setup(e.sink)
	}
	srv := httptest.NewServer(e.sink)
	t.Cleanup(srv.Close)
	if e.prod, err = testkit.NewProducer(b.Addr()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.prod.Close)
	e.cfg = filepath.Join(t.TempDir(), "orderly.toml")
	os.WriteFile(e.cfg, []byte(fmt.Sprintf(`
[kafka]
brokers = %q
group_id = %q
topics = ["orders"]
[kafka.properties]
"session.timeout.ms" = 2000
"heartbeat.interval.ms" = 250
[dispatch]
commit_interval = "100ms"
%s
[admin]
listen = %q
%s
[log]
level = "info"
[[routes]]
name = "people"
  [[routes.requests]]
  url = "%s/people/{{ .Key }}"
`, b.Addr(), group, dispatchTOML, e.admin, adminTOML, srv.URL)), 0o644)
	return e
}

func (e *signalEnv) produce(t *testing.T, gen *testkit.Generator, n int) {
	t.Helper()
	if err := e.prod.Produce(context.Background(), "orders", gen.Records(n)); err != nil {
		t.Fatal(err)
	}
}

// exit waits for p to exit within timeout and returns its exit code.
func exit(t *testing.T, p *proc, timeout time.Duration) int {
	t.Helper()
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		if err == nil {
			return 0
		}
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		t.Fatalf("wait: %v", err)
	case <-time.After(timeout):
		t.Fatalf("no exit within %s", timeout)
	}
	return -1
}

// TestDrainGraceKeepsConsumingWhileNotReady: on SIGTERM with
// admin.drain_grace = 3s, /readyz turns 503 at once while /healthz stays
// 200, and for the grace Orderly goes on consuming (messages produced
// after the signal are delivered); then it drains and exits 0.
func TestDrainGraceKeepsConsumingWhileNotReady(t *testing.T) {
	const grace = 3 * time.Second
	e := newSignalEnv(t, "grace", `drain_timeout = "10s"`, `drain_grace = "3s"`, nil)
	gen := &testkit.Generator{Keys: 10}
	e.produce(t, gen, 200)
	p := start(t, "run", "--config", e.cfg)
	base := "http://" + e.admin
	testkit.WaitFor(t, 30*time.Second, "readiness", func() bool { return httpStatus(base+"/readyz") == 200 })
	testkit.WaitFor(t, time.Minute, "the first messages delivered", func() bool { return e.sink.Distinct() == 200 })

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	testkit.WaitFor(t, grace/2, "/readyz 503 at once", func() bool { return httpStatus(base+"/readyz") == 503 })
	if st := httpStatus(base + "/healthz"); st != 200 {
		t.Fatalf("/healthz %d during the grace, want 200", st)
	}
	e.produce(t, gen, 100)
	testkit.WaitFor(t, grace, "messages produced during the grace delivered", func() bool { return e.sink.Distinct() == 300 })
	if took := time.Since(sent); took >= grace {
		t.Fatalf("the messages produced after SIGTERM took %s: not within the grace", took)
	}
	if st := httpStatus(base + "/readyz"); time.Since(sent) < grace && st != 503 {
		t.Fatalf("/readyz %d during the grace, want 503", st)
	}
	if code := exit(t, p, grace+30*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM, want 0", code)
	}
	if took := time.Since(sent); took < grace {
		t.Fatalf("exited %s after SIGTERM, before admin.drain_grace (%s)", took, grace)
	}
	if rep := e.sink.Check(gen.Expected()); !rep.OK() || rep.Duplicates != 0 {
		t.Fatal(rep)
	}
}

// TestSecondSignalExitsAtOnce: a SIGTERM starts a drain that cannot end
// (the target holds every request, drain_timeout is a minute); a second
// SIGTERM exits at once with status 1, saying so.
func TestSecondSignalExitsAtOnce(t *testing.T) {
	e := newSignalEnv(t, "second", `drain_timeout = "60s"`, "", func(s *testkit.Sink) {
		s.Observe = func(_ *testkit.Delivery, r *http.Request) { <-r.Context().Done() }
	})
	gen := &testkit.Generator{Keys: 5}
	e.produce(t, gen, 50)
	p := start(t, "run", "--config", e.cfg)
	testkit.WaitFor(t, 30*time.Second, "requests held by the target", func() bool { return e.sink.InFlight() == 5 })
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 30*time.Second, "the drain to begin", func() bool {
		out := p.output()
		return strings.Contains(out, `"msg":"draining"`) || strings.Contains(out, "msg=draining")
	})
	if st := httpStatus("http://" + e.admin + "/readyz"); st != 503 {
		t.Fatalf("/readyz %d while draining, want 503", st)
	}
	sent := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := exit(t, p, 10*time.Second); code != 1 {
		t.Fatalf("exit %d after a second signal, want 1", code)
	}
	t.Logf("exited %s after the second signal", time.Since(sent).Round(time.Millisecond))
	if !strings.Contains(p.output(), "second signal") {
		t.Fatalf("the exit does not say why:\n%s", p.output())
	}
	if e.sink.Delivered() != 0 {
		t.Fatalf("%d delivered while every request was held", e.sink.Delivered())
	}
}

// committedSum returns the sum over the partitions of group's committed
// offsets on topic (a partition with none counts 0).
func committedSum(t *testing.T, brokers, group, topic string, partitions int) int64 {
	t.Helper()
	c, err := kafka.NewConsumer(&kafka.ConfigMap{"bootstrap.servers": brokers, "group.id": group,
		"enable.metrics.push": false, "log_level": 3})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tps := make([]kafka.TopicPartition, partitions)
	for i := range tps {
		tps[i] = kafka.TopicPartition{Topic: &topic, Partition: int32(i)}
	}
	res, err := c.Committed(tps, 10000)
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, tp := range res {
		sum += max(int64(tp.Offset), 0)
	}
	return sum
}
