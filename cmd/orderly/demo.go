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
}

var demoCommand = command{
	name:     "demo",
	synopsis: "[flags]",
	desc: `
Run everything in one process: an embedded Kafka-protocol broker, a generator producing keyed
JSON events, an HTTP sink that checks the order per key, and the dispatcher between them. Nothing
else is needed, and nothing outside the process is touched. Prints a live progress line, then a
summary (delivered/expected, order per key, duplicates, end-to-end latency p50/p99); exits 0 when
everything arrived in order, 1 otherwise.`,
}

func cmdDemo(args []string, stdout, stderr io.Writer) int {
	c := &demoCommand
	fs := c.flags(stderr)
	var f demoFlags
	fs.IntVar(&f.messages, "messages", 20000, "events to produce")
	fs.IntVar(&f.keys, "keys", 500, "distinct keys (entities)")
	fs.IntVar(&f.partitions, "partitions", 8, "partitions of the demo topic")
	fs.IntVar(&f.size, "size", 200, "approximate event size in bytes")
	fs.DurationVar(&f.latency, "latency", 0, "time the sink takes per request")
	fs.Float64Var(&f.failureRate, "failure-rate", 0, "share of requests the sink answers 503 (retried)")
	fs.IntVar(&f.maxInFlight, "max-in-flight", 10000, "dispatch.max_in_flight")
	fs.DurationVar(&f.timeout, "timeout", 2*time.Minute, "give up after this long")
	fs.BoolVar(&f.verbose, "v", false, "log the service's info lines to stderr")
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

func runDemo(f demoFlags, stdout, stderr io.Writer) (bool, error) {
	sink := testkit.NewSink()
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
		return false, err
	}
	srv := &http.Server{Handler: sink, ReadHeaderTimeout: 5 * time.Second}
	var wg sync.WaitGroup
	wg.Go(func() { _ = srv.Serve(ln) })
	defer func() {
		_ = srv.Close()
		wg.Wait()
	}()

	cfg, err := config.Parse([]byte(demoConfig(f, ln.Addr().String())), "demo.toml")
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

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	wg.Go(func() { runErr <- svc.Run(ctx) })

	fmt.Fprintf(stdout, "orderly demo: %d events over %d keys on %d partitions (embedded broker %s, sink http://%s, latency %s, failure rate %.2f)\n",
		f.messages, f.keys, f.partitions, svc.Brokers(), ln.Addr(), f.latency, f.failureRate)
	gen := &testkit.Generator{Keys: f.keys, Size: f.size}
	recs := gen.Records(f.messages)
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
		// production time and latency measures dispatch, not the backlog.
		const chunk = 1000
		for i := 0; i < len(recs); i += chunk {
			testkit.StampNow(recs[i:min(i+chunk, len(recs))])
			if err := p.Produce(ctx, "orders", recs[i:min(i+chunk, len(recs))]); err != nil {
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
	for int(sink.Distinct()) < f.messages {
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
			n := sink.Delivered()
			rate := float64(n-lastN) / now.Sub(lastT).Seconds()
			lastN, lastT = n, now
			line := fmt.Sprintf("delivered %6d/%d  %8.0f msg/s  in flight %5.0f  lag %6.0f  lanes %5.0f  retries %4.0f",
				n, f.messages, rate, svc.Metrics().Sum("orderly_partition_in_flight"),
				svc.Metrics().Sum("orderly_consumer_lag"), svc.Metrics().Sum("orderly_active_lanes"),
				svc.Metrics().Sum("orderly_http_retries_total"))
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

	rep := sink.Check(gen.Expected())
	fmt.Fprintf(stdout, "\nsummary\n")
	fmt.Fprintf(stdout, "  delivered      %d/%d distinct events in %s (%.0f msg/s)\n", sink.Distinct(), f.messages,
		elapsed.Round(time.Millisecond), float64(sink.Distinct())/elapsed.Seconds())
	fmt.Fprintf(stdout, "  per-key order  %s\n", verdict(rep.Violations == 0, fmt.Sprintf("%d violations", rep.Violations)))
	fmt.Fprintf(stdout, "  duplicates     %d\n", rep.Duplicates)
	fmt.Fprintf(stdout, "  http requests  %d (retried: %.0f)\n", sink.Requests(), svc.Metrics().Sum("orderly_http_retries_total"))
	fmt.Fprintf(stdout, "  latency        p50 %s  p99 %s (produce to request received)\n",
		sink.Latency(50).Round(100*time.Microsecond), sink.Latency(99).Round(100*time.Microsecond))
	fmt.Fprintf(stdout, "  committed      %.0f offsets, lag %.0f\n", committed, lag)
	ok := rep.OK() && !timedOut
	if timedOut {
		fmt.Fprintf(stdout, "  TIMED OUT after %s: %s\n", f.timeout, rep)
	}
	if ok {
		fmt.Fprintln(stdout, "result: OK — every event delivered, per-key order held")
	} else {
		fmt.Fprintln(stdout, "result: FAILED —", rep)
	}
	return ok, nil
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

func demoConfig(f demoFlags, sink string) string {
	return fmt.Sprintf(`
[kafka]
brokers = "embedded"
group_id = "orderly-demo"
topics = ["orders"]
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

[[routes]]
name = "people"
  [[routes.requests]]
  method = "POST"
  url = "http://%s/people/{{ .Key }}"
  [routes.requests.headers]
  Content-Type = "application/json"
`, f.partitions, f.maxInFlight, sink)
}
