package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/service"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

type demoFlags struct {
	messages    int
	keys        int
	partitions  int
	size        int
	latency     time.Duration
	failureRate float64
	maxInFlight int
	timeout     time.Duration
	verbose     bool
	transform   bool
}

var demoCommand = command{
	name:     "demo",
	synopsis: "[flags]",
	desc: `
Run everything in one process: an embedded Kafka-protocol broker, a generator producing keyed
JSON events, an HTTP sink that checks the order per key, and the dispatcher between them. Nothing
else is needed, and nothing outside the process is touched. Prints a live progress line, then a
summary (delivered/expected, order per key, duplicates, end-to-end latency p50/p99); exits 0 when
everything arrived in order, 1 otherwise.

With -transform, the route produces to Kafka instead of calling HTTP: each name event
({"key", "seq", "first_name", "last_name", ...}) goes to the topic names_hashed with the md5 of the
whole event added as "hash", under its key; a reader checks that every event's record arrived once,
in its key's order, with the right hash.`,
}

func cmdDemo(args []string, stdout, stderr io.Writer) int {
	c := &demoCommand
	fs := c.flags(stderr)
	var f demoFlags
	fs.IntVar(&f.messages, "messages", 20000, "events to produce")
	fs.IntVar(&f.keys, "keys", 500, "distinct keys (entities)")
	fs.IntVar(&f.partitions, "partitions", 8, "partitions of the demo topic")
	fs.IntVar(&f.size, "size", 200, "approximate event size in bytes")
	fs.DurationVar(&f.latency, "latency", 0, "time the sink takes per request (HTTP only)")
	fs.Float64Var(&f.failureRate, "failure-rate", 0, "share of requests the sink answers 503, retried (HTTP only)")
	fs.IntVar(&f.maxInFlight, "max-in-flight", 2000, "dispatch.max_in_flight")
	fs.DurationVar(&f.timeout, "timeout", 2*time.Minute, "give up after this long")
	fs.BoolVar(&f.verbose, "v", false, "log the service's info lines to stderr")
	fs.BoolVar(&f.transform, "transform", false, "produce the hashed events to the topic names_hashed instead of calling HTTP")
	if code, ok := c.parse(fs, args, stdout, stderr); !ok {
		return code
	}
	if f.messages < 1 || f.keys < 1 || f.partitions < 1 || f.failureRate < 0 || f.failureRate >= 1 {
		fmt.Fprintln(stderr, "orderly demo: -messages, -keys and -partitions must be at least 1 and -failure-rate in [0, 1)")
		return 2
	}
	ok, err := runDemo(f, stdout, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "orderly demo:", err)
		return 1
	}
	if !ok {
		return 1
	}
	return 0
}

// demoCheck is what a demo verifies: the HTTP sink's deliveries, or the
// records a transform produced.
type demoCheck interface {
	// arrived counts the events that arrived so far.
	arrived() int64
	// summary prints the check's lines and reports whether it passed.
	summary(w io.Writer) bool
}

func runDemo(f demoFlags, stdout, stderr io.Writer) (bool, error) {
	gen := &testkit.Generator{Keys: f.keys, Size: f.size}
	recs := gen.Records(f.messages)
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var check demoCheck
	var toml, where string
	if f.transform {
		toml, where = demoConfig(f, "", "names"), "to the topic names_hashed"
	} else {
		sink, addr, stop, err := demoSink(f, &wg)
		if err != nil {
			return false, err
		}
		defer stop()
		check = &sinkCheck{sink: sink, expected: gen.Expected}
		toml, where = demoConfig(f, addr, "orders"), fmt.Sprintf("sink http://%s, latency %s, failure rate %.2f", addr, f.latency, f.failureRate)
	}
	cfg, err := config.Parse([]byte(toml), "demo.toml")
	if err != nil {
		return false, fmt.Errorf("demo configuration: %w", err)
	}
	logLevel := slog.LevelWarn
	if f.verbose {
		logLevel = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: logLevel}))
	svc, err := service.New(cfg, log, version)
	if err != nil {
		return false, err
	}
	defer svc.Close()
	runErr := make(chan error, 1)
	wg.Go(func() { runErr <- svc.Run(ctx) })
	if f.transform {
		hc := &hashedCheck{HashedCheck: testkit.NewHashedCheck(recs)}
		check = hc
		readCtx, stopReading := context.WithCancel(ctx)
		defer stopReading()
		wg.Go(func() {
			if err := testkit.Consume(readCtx, svc.Brokers(), "names_hashed", func(m *kafka.Message) { hc.Add(m.Key, m.Value) }); err != nil {
				log.Error("reading names_hashed", "error", err)
			}
		})
	}

	fmt.Fprintf(stdout, "orderly demo: %d events over %d keys on %d partitions (embedded broker %s, %s)\n",
		f.messages, f.keys, f.partitions, svc.Brokers(), where)
	start := time.Now()
	prodErr := make(chan error, 1)
	wg.Go(func() {
		p, err := testkit.NewProducer(svc.Brokers())
		if err != nil {
			prodErr <- err
			return
		}
		defer p.Close()
		// Produce in slices so that events' timestamps are close to their
		// production time and latency measures dispatch, not the backlog
		// (not for the transform, which checks the hash of each event as
		// generated).
		const chunk = 1000
		for i := 0; i < len(recs); i += chunk {
			if !f.transform {
				testkit.StampNow(recs[i:min(i+chunk, len(recs))])
			}
			if err := p.Produce(ctx, cfg.Kafka.Topics[0], recs[i:min(i+chunk, len(recs))]); err != nil {
				prodErr <- err
				return
			}
		}
		prodErr <- nil
	})

	tty := isTerminal(stdout)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	deadline := time.NewTimer(f.timeout)
	defer deadline.Stop()
	var lastN int64
	lastT := start
	timedOut := false
wait:
	for int(check.arrived()) < f.messages {
		select {
		case err := <-prodErr:
			if err != nil {
				return false, fmt.Errorf("producing: %w", err)
			}
		case err := <-runErr:
			return false, fmt.Errorf("the service stopped: %v", err)
		case <-deadline.C:
			timedOut = true
			break wait
		case now := <-tick.C:
			n := check.arrived()
			rate := float64(n-lastN) / now.Sub(lastT).Seconds()
			lastN, lastT = n, now
			line := fmt.Sprintf("delivered %6d/%d  %8.0f msg/s  in flight %5.0f  lag %6.0f  lanes %5.0f  retries %4.0f",
				n, f.messages, rate, svc.Metrics().Sum("orderly_partition_in_flight"),
				svc.Metrics().Sum("orderly_consumer_lag"), svc.Metrics().Sum("orderly_active_lanes"),
				svc.Metrics().Sum("orderly_http_retries_total")+svc.Metrics().SumWhere("orderly_records_total", map[string]string{"result": "retried"}))
			if tty {
				fmt.Fprintf(stdout, "\r%s", line)
			} else if now.Sub(start) >= time.Second && (now.Sub(start)/(500*time.Millisecond))%4 == 0 {
				fmt.Fprintln(stdout, line)
			}
		}
	}
	elapsed := time.Since(start)
	if tty {
		fmt.Fprintln(stdout)
	}
	// Give the committer a moment to commit the end (commit_interval 500ms).
	for i := 0; i < 50 && !timedOut && svc.Metrics().Sum("orderly_committed_offset") < float64(f.messages); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	committed, lag := svc.Metrics().Sum("orderly_committed_offset"), svc.Metrics().Sum("orderly_consumer_lag")
	cancel()
	if err := <-runErr; err != nil && !errors.Is(err, context.Canceled) {
		return false, fmt.Errorf("the service stopped with an error: %w", err)
	}

	fmt.Fprintf(stdout, "\nsummary\n")
	arrived := check.arrived()
	fmt.Fprintf(stdout, "  delivered      %d/%d distinct events in %s (%.0f msg/s)\n", arrived, f.messages,
		elapsed.Round(time.Millisecond), float64(arrived)/elapsed.Seconds())
	ok := check.summary(stdout) && !timedOut
	fmt.Fprintf(stdout, "  committed      %.0f offsets, lag %.0f\n", committed, lag)
	if timedOut {
		fmt.Fprintf(stdout, "  TIMED OUT after %s\n", f.timeout)
	}
	if ok {
		fmt.Fprintln(stdout, "result: OK — every event delivered, per-key order held")
	} else {
		fmt.Fprintln(stdout, "result: FAILED")
	}
	return ok, nil
}

// demoSink starts the HTTP sink of the demo, answering 503 to a share of
// the requests and taking the latency f asks for; stop closes it.
func demoSink(f demoFlags, wg *sync.WaitGroup) (sink *testkit.Sink, addr string, stop func(), err error) {
	sink = testkit.NewSink()
	if f.latency > 0 {
		sink.Delay = func(*testkit.Delivery) time.Duration { return f.latency }
	}
	if f.failureRate > 0 {
		var mu sync.Mutex
		rng := rand.New(rand.NewPCG(1, 2))
		sink.Status = func(*testkit.Delivery) int {
			mu.Lock()
			defer mu.Unlock()
			if rng.Float64() < f.failureRate {
				return http.StatusServiceUnavailable
			}
			return 0
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", nil, err
	}
	srv := &http.Server{Handler: sink, ReadHeaderTimeout: 5 * time.Second}
	wg.Go(func() { _ = srv.Serve(ln) })
	return sink, ln.Addr().String(), func() { _ = srv.Close() }, nil
}

// sinkCheck verifies the sink's deliveries against what was generated.
type sinkCheck struct {
	sink     *testkit.Sink
	expected func() map[string][]int64
}

func (c *sinkCheck) arrived() int64 { return int64(c.sink.Distinct()) }

func (c *sinkCheck) summary(w io.Writer) bool {
	rep := c.sink.Check(c.expected())
	fmt.Fprintf(w, "  per-key order  %s\n", verdict(rep.Violations == 0, fmt.Sprintf("%d violations", rep.Violations)))
	fmt.Fprintf(w, "  duplicates     %d\n", rep.Duplicates)
	fmt.Fprintf(w, "  http requests  %d\n", c.sink.Requests())
	fmt.Fprintf(w, "  latency        p50 %s  p99 %s (produce to request received)\n",
		c.sink.Latency(50).Round(100*time.Microsecond), c.sink.Latency(99).Round(100*time.Microsecond))
	if !rep.OK() {
		fmt.Fprintf(w, "  problems       %s\n", rep)
	}
	return rep.OK()
}

// hashedCheck verifies the records of the transform demo.
type hashedCheck struct{ *testkit.HashedCheck }

func (c *hashedCheck) arrived() int64 {
	r := c.Report()
	return int64(r.Records - r.Duplicates - r.Wrong)
}

func (c *hashedCheck) summary(w io.Writer) bool {
	rep := c.Report()
	fmt.Fprintf(w, "  per-key order  %s\n", verdict(rep.Violations == 0, fmt.Sprintf("%d violations", rep.Violations)))
	fmt.Fprintf(w, "  md5 and key    %s\n", verdict(rep.Wrong == 0, fmt.Sprintf("%d wrong: %q", rep.Wrong, rep.Problems)))
	fmt.Fprintf(w, "  duplicates     %d\n", rep.Duplicates)
	fmt.Fprintf(w, "  records        %d on names_hashed\n", rep.Records)
	if !rep.OK() {
		fmt.Fprintf(w, "  problems       %s\n", rep)
	}
	return rep.OK()
}

func verdict(ok bool, bad string) string {
	if ok {
		return "verified"
	}
	return "BROKEN: " + bad
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// demoConfig is the demo's configuration: events from topic, posted to the
// sink, or (f.transform) hashed to names_hashed.
func demoConfig(f demoFlags, sink, topic string) string {
	route := fmt.Sprintf(`
[[routes]]
name = "people"
  [[routes.requests]]
  method = "POST"
  url = "http://%s/people/{{ .Key }}"
  [routes.requests.headers]
  Content-Type = "application/json"
`, sink)
	if f.transform {
		route = fmt.Sprintf(`
[[routes]]
name = "hash-names"
  [[routes.requests]]
  topic = "names_hashed"
  value = '%s'
`, testkit.HashedValue)
	}
	return fmt.Sprintf(`
[kafka]
brokers = "embedded"
group_id = "orderly-demo"
topics = [%q]
embedded_listen = "127.0.0.1:0"
embedded_partitions = %d

[dispatch]
max_in_flight = %d
commit_interval = "500ms"
drain_timeout = "10s"

[http]
timeout = "5s"

[http.retry]
max_attempts = 0
initial_backoff = "10ms"
max_backoff = "1s"

[http.breaker]
enabled = false

[admin]
listen = ""

[log]
level = "warn"
%s`, topic, f.partitions, f.maxInFlight, route)
}
