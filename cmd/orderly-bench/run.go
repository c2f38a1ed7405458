package main

// The run of the HTTP scenarios: Orderly against a plain net/http client.

import (
	"context"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// benchResult is what one run measured. Rates are per second, durations in
// milliseconds, sizes in megabytes (2^20 bytes).
type benchResult struct {
	Name        string  `json:"name"`
	Target      string  `json:"target,omitempty"`
	Messages    int     `json:"messages"`
	Keys        int     `json:"keys"`
	Partitions  int     `json:"partitions"`
	Size        int     `json:"size_bytes"`
	LatencyMS   float64 `json:"sink_latency_ms"`
	Requests    int     `json:"requests_per_message"`
	FailureRate float64 `json:"failure_rate"`
	HotKey      float64 `json:"hot_key_share"`
	MaxInFlight int     `json:"max_in_flight"`
	MaxConns    int     `json:"max_conns_per_host"`
	Broker      string  `json:"broker"`
	Dispatcher  string  `json:"dispatcher"` // where Orderly ran: process (a child) or in-process
	Instances   int     `json:"instances"`  // Orderly processes in the consumer group (-instances)

	ProduceSeconds float64 `json:"produce_seconds"`

	// The ceiling: a plain net/http client, same transport tuning, same
	// sink, same number of requests, at Orderly's sending concurrency.
	CeilingConcurrency   int     `json:"ceiling_concurrency,omitempty"`
	Ceiling              float64 `json:"ceiling_msgs_per_s,omitempty"` // the mean of the runs before and after Orderly's
	CeilingBefore        float64 `json:"ceiling_before_msgs_per_s,omitempty"`
	CeilingAfter         float64 `json:"ceiling_after_msgs_per_s,omitempty"`
	CeilingCPUPer10k     float64 `json:"ceiling_cpu_s_per_10k,omitempty"`
	CeilingAllocsPerMsg  float64 `json:"ceiling_allocs_per_msg,omitempty"`     // the bench process: client, sink server, recorder
	CeilingAllocsPerReq  float64 `json:"ceiling_allocs_per_request,omitempty"` // the same per successful request
	CeilingSinkMaxInFlow int64   `json:"ceiling_sink_max_concurrent,omitempty"`

	// Orderly.
	Seconds            float64 `json:"seconds"` // assignment to the last request received
	Throughput         float64 `json:"msgs_per_s"`
	Ratio              float64 `json:"ratio_to_ceiling,omitempty"`
	LatencyBound       float64 `json:"latency_bound_msgs_per_s,omitempty"` // sendConcurrency: min(keys, partitions*max_in_flight, max_conns if > 0)/(latency*requests)
	BoundRatio         float64 `json:"ratio_to_latency_bound,omitempty"`
	StartupMS          float64 `json:"startup_ms"`                   // dispatcher start (the child's exec with -dispatcher process) to assignment
	FirstRequestMS     float64 `json:"first_request_ms"`             // assignment to the first request received
	Delivered          int     `json:"delivered"`                    // messages delivered in the backlog window (hot-key runs: the hot key's too)
	DispatchP50MS      float64 `json:"dispatch_p50_ms"`              // assignment to request received
	DispatchP99MS      float64 `json:"dispatch_p99_ms"`              //
	LiveMessages       int     `json:"live_messages"`                // messages of the live phase
	LiveRate           float64 `json:"live_msgs_per_s"`              // their rate
	LiveP50MS          float64 `json:"live_e2e_p50_ms"`              // produce timestamp to request received
	LiveP99MS          float64 `json:"live_e2e_p99_ms"`              //
	CPUPer10k          float64 `json:"cpu_s_per_10k"`                // the Orderly process, user+sys (in-process: this process)
	SinkCPUPer10k      float64 `json:"sink_cpu_s_per_10k,omitempty"` // -dispatcher process: this process (sink, recorder, harness)
	BrokerCPUPer10k    float64 `json:"broker_cpu_s_per_10k,omitempty"`
	AllocsPerMsg       float64 `json:"allocs_per_msg"`                      // the Orderly process
	SinkAllocsPerReq   float64 `json:"sink_allocs_per_request,omitempty"`   // -dispatcher process: this process per successful request
	ClientAllocsPerReq float64 `json:"client_allocs_per_request,omitempty"` // -dispatcher process: ceiling_allocs_per_request - sink_allocs_per_request
	// OwnAllocsPerMsg is what Orderly allocates per message beyond the
	// plain client ("vs plain"; the name is from when Orderly sent through
	// net/http's Transport and this was its own code's share).
	OwnAllocsPerMsg float64 `json:"own_allocs_per_msg,omitempty"` // process: allocs_per_msg - client_allocs_per_request x requests; in-process: allocs_per_msg - ceiling_allocs_per_msg
	SinkMaxInFlow   int64   `json:"sink_max_concurrent"`
	Retries         float64 `json:"retries"`
	Pauses          float64 `json:"pauses"`

	// Memory of the Orderly process (with -dispatcher in-process, of this one).
	RSSBaselineMB  float64 `json:"rss_baseline_mb"`   // process: the child right after the assignment and a GC; in-process: before the dispatcher started, after a GC
	RSSSteadyMB    float64 `json:"rss_steady_mb"`     // median of samples every 100ms during the backlog
	RSSPeakMB      float64 `json:"rss_peak_mb"`       // largest of those samples
	RSSAfterMB     float64 `json:"rss_after_mb"`      // after the run (and -settle)
	RSSAfterFreeMB float64 `json:"rss_after_free_mb"` // then after runtime.GC + debug.FreeOSMemory
	MaxRSSMB       float64 `json:"maxrss_mb"`         // the process's peak so far: VmHWM of the child, or getrusage
	HeapInUseMB    float64 `json:"heap_in_use_mb"`    // Go heap in use at the end of the backlog
	StackInUseMB   float64 `json:"stack_in_use_mb"`   // goroutine stacks (lanes) at the end of the backlog
	GoSysMB        float64 `json:"go_sys_mb"`         // runtime.MemStats.Sys at the end of the backlog
	HeapAfterMB    float64 `json:"heap_after_mb"`     // Go heap in use after the run and a GC
	StackAfterMB   float64 `json:"stack_after_mb"`    // goroutine stacks after the run
	OrderViolation int     `json:"order_violations"`  //
	Duplicates     int     `json:"duplicates"`        // expected: (requests-1) x messages
	Missing        int     `json:"missing"`           // of the keys waited for
	OtherKeys      *hotKey `json:"hot_key_result,omitempty"`

	// The transform scenario: Orderly and the plain loop side by side
	// (Throughput and the figures above are Orderly's, Ceiling the plain
	// loop's rate).
	Transform *transformResult `json:"transform,omitempty"`
}

// hotKey is the hot-key scenario's result.
type hotKey struct {
	HotDelivered           int     `json:"hot_delivered"`
	Others                 int     `json:"other_messages"`
	OthersThroughput       float64 `json:"other_keys_msgs_per_s"`
	HotPartition           int32   `json:"hot_partition"`
	OthersSamePartitionMS  float64 `json:"other_keys_on_hot_partition_done_ms"`    // assignment to their last request
	OthersOtherPartitionMS float64 `json:"other_keys_on_other_partitions_done_ms"` //
	WithoutHot             float64 `json:"without_hot_key_msgs_per_s"`
	Ratio                  float64 `json:"ratio"`
}

func (res *benchResult) attachHotBaseline(base *benchResult) {
	if res.OtherKeys == nil {
		return
	}
	res.OtherKeys.WithoutHot = base.Throughput
	switch {
	case res.Ceiling > 0 && base.Ceiling > 0 && base.Throughput > 0:
		// Each run against its own ceiling, measured beside it: the
		// machine's drift between the two runs cancels.
		res.OtherKeys.Ratio = (res.OtherKeys.OthersThroughput / res.Ceiling) / (base.Throughput / base.Ceiling)
	case base.Throughput > 0:
		res.OtherKeys.Ratio = res.OtherKeys.OthersThroughput / base.Throughput
	}
}

// bencher runs the runs of one command line and prints their progress.
type bencher struct {
	out, stderr io.Writer // progress; the child processes' stderr
	multi       bool      // several runs: profile file names get the run's name
}

func (b *bencher) printf(format string, args ...any) { fmt.Fprintf(b.out, format, args...) }

func mb(n int64) float64 { return float64(n) / (1 << 20) }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// httpRun is the run of every scenario but those with a run of their own:
// the ceiling (a plain net/http client) on a local sink, then Orderly
// draining a pre-produced backlog to the same kind of sink, then live
// messages, then the memory after the burst, and a check of the order.
func (b *bencher) httpRun(r benchRun) (*benchResult, error) {
	f := r.f
	m := r.messages()
	res := &benchResult{Name: r.name, Target: r.target, Messages: m, Keys: f.keys, Partitions: f.partitions,
		Size: f.size, LatencyMS: ms(f.latency), Requests: f.requests, FailureRate: f.failureRate, HotKey: f.hotKey,
		MaxInFlight: f.maxInFlight, MaxConns: f.maxConns, Broker: f.broker, Dispatcher: f.dispatcher, Instances: f.instances}
	b.printf("\n== %s: %d messages, %d keys, %d partitions, %d B, sink latency %s, %d request(s)/message, failure rate %.2f",
		r.name, m, f.keys, f.partitions, f.size, f.latency, f.requests, f.failureRate)
	if f.hotKey > 0 {
		b.printf(", hot key share %.2f", f.hotKey)
	}
	if r.baselineOf > 0 {
		b.printf(", keys 1..%d only (hot key left out)", f.keys-1)
	}
	b.printf(", max_in_flight %d, max_conns_per_host %d, broker %s, dispatcher %s", f.maxInFlight, f.maxConns, f.broker, f.dispatcher)
	if f.instances > 1 {
		b.printf(" x %d instances in one group (CPU, memory and allocations summed)", f.instances)
	}
	b.printf("\n")
	if r.target != "" {
		b.printf("   issue target: %s\n", r.target)
	}

	ctx, cancel := context.WithTimeout(context.Background(), f.timeout)
	defer cancel()

	sink, err := startSink()
	if err != nil {
		return nil, err
	}
	defer sink.close()

	// 1. The ceiling.
	if f.ceiling {
		if err := b.bestCeiling(ctx, r, sink, res); err != nil {
			return nil, fmt.Errorf("ceiling: %w", err)
		}
	}

	// 2. The broker and the backlog. With -dispatcher in-process the
	// service is built first: with -broker in-process it holds the broker.
	var brokerChild *brokerProcess
	brokers := config.EmbeddedBrokers
	inProcess := f.dispatcher == "in-process"
	if f.broker == "process" || !inProcess {
		// With -broker in-process and -dispatcher process, the broker is in
		// this process, beside the sink; the child connects to it.
		var stopBroker func()
		if brokers, brokerChild, stopBroker, err = startBroker(f, b.stderr); err != nil {
			return nil, err
		}
		defer stopBroker()
	}
	toml := benchConfig(f, brokers, sink.addr())
	cfg, err := config.Parse([]byte(toml), "bench.toml")
	if err != nil {
		return nil, fmt.Errorf("bench configuration: %w", err)
	}
	// Orderly: in this process, as several instances in one group, or in a
	// child; none of them started yet.
	var side orderlySide
	var multi *instances
	switch {
	case inProcess:
		l, err := newLocalOrderly(cfg, f.verbose, b.stderr)
		if err != nil {
			return nil, err
		}
		defer l.shutdown()
		side, brokers = l, l.svc.Brokers()
	case f.instances > 1:
		if multi, err = newInstances(f.instances, f.partitions, toml, f.verbose, b); err != nil {
			return nil, err
		}
		defer multi.shutdown()
		side = multi
	default:
		c, err := newChildOrderly(toml, f.verbose, b.stderr)
		if err != nil {
			return nil, err
		}
		defer c.shutdown()
		side = c
	}

	// The recorder is in place before anything can send. A hot-key run has
	// no live phase.
	liveCap, hotKeyName := 0, ""
	if f.hotKey > 0 {
		hotKeyName = "key-0"
	} else if f.live > 0 {
		liveCap = 200000
	}
	rec := newRecorder(m*f.requests+liveCap*f.requests+1024, f.latency, f.failureRate, hotKeyName)
	sink.cur.Store(rec)

	// Several instances start on the empty topic and settle into one group
	// first: their window is from the backlog's first produce to the last
	// request (see instances).
	var base measureBase
	if multi != nil {
		started := time.Now()
		if err := multi.start(ctx); err != nil {
			return nil, err
		}
		res.StartupMS = ms(time.Since(started))
		if base, err = takeBase(multi, brokerChild); err != nil {
			return nil, err
		}
	}

	gen := r.generator()
	t0 := time.Now()
	// The producer stays open (idle) for the live phase, so that its
	// start-up is not measured as latency.
	prod, err := testkit.NewProducer(brokers)
	if err != nil {
		return nil, err
	}
	defer prod.Close() // before an in-process service and its broker
	if err := produceChunks(ctx, prod, benchTopic, m, func(i, j int) []testkit.Record { return gen.Records(j - i) }); err != nil {
		return nil, fmt.Errorf("producing the backlog: %w", err)
	}
	res.ProduceSeconds = time.Since(t0).Seconds()
	b.printf("   produced %d messages in %.1fs\n", m, res.ProduceSeconds)

	// 3. Orderly drains the backlog.

	want, counted := int64(m*f.requests), &rec.ok
	if f.hotKey > 0 {
		want, counted = int64((m-hotCount(m, f.hotKey))*f.requests), &rec.okOthers
	}
	profName := func(file string) string { return b.profileName(file, r.name) }

	// The RSS baseline, after a GC, then the profiles: in this process
	// before the dispatcher starts (once started, it consumes at once); a
	// child is consuming already: its baseline is the process at start-up.
	var stopProfiles func() error
	baseline := func() (err error) {
		if err = side.settle(); err == nil {
			res.RSSBaselineMB = mb(side.rss())
			stopProfiles, err = startProfiles(side, f, profName)
		}
		return err
	}
	if inProcess {
		if err := baseline(); err != nil {
			return nil, err
		}
	}
	if multi != nil {
		base.s0.at = t0 // the instances consume as the backlog is produced
	} else {
		started := time.Now()
		if err := side.start(ctx); err != nil {
			return nil, err
		}
		// The partitions are assigned: every pre-produced message is consumable.
		if base, err = takeBase(side, brokerChild); err != nil {
			return nil, err
		}
		res.StartupMS = ms(base.s0.at.Sub(started))
	}
	if !inProcess {
		if err := baseline(); err != nil {
			return nil, err
		}
	}
	rss := sampleRSS(100*time.Millisecond, side.rss)
	defer rss.end()
	heapAt := want / 2
	if f.heapProfile == "" {
		heapAt = math.MaxInt64
	}
	for counted.Load() < want {
		if rec.ok.Load() >= heapAt {
			heapAt = math.MaxInt64
			if err := side.profile("heap", profName(f.heapProfile)); err != nil {
				return nil, err
			}
		}
		select {
		case <-side.exited():
			return nil, fmt.Errorf("the service stopped: %v", side.exitErr())
		case <-ctx.Done():
			return nil, fmt.Errorf("timed out after %s with %d of %d requests delivered", f.timeout, rec.ok.Load(), want)
		case <-time.After(2 * time.Millisecond):
		}
	}
	s1 := snap()
	cpu1 := side.cpu()
	brokerCPU := brokerChild.cpu() - base.brokerCPU
	st1, err := side.stats()
	if err != nil {
		return nil, err
	}
	// Per message delivered in the window: all of them, or in a hot-key
	// run the other keys' and the few hot ones.
	okRequests := rec.ok.Load()
	delivered := float64(okRequests) / float64(f.requests)
	res.Delivered = int(okRequests) / f.requests
	res.HeapInUseMB, res.StackInUseMB, res.GoSysMB = mb(int64(st1.HeapInuse)), mb(int64(st1.StackInuse)), mb(int64(st1.Sys))
	steady, peak := rss.end()
	if err := stopProfiles(); err != nil {
		return nil, err
	}
	res.RSSSteadyMB, res.RSSPeakMB = mb(steady), mb(peak)
	res.BrokerCPUPer10k = per10k(brokerCPU, delivered)
	res.CPUPer10k = per10k(cpu1-base.cpu, delivered)
	res.AllocsPerMsg = float64(st1.Mallocs-base.stats.Mallocs) / delivered
	if inProcess {
		if res.CeilingAllocsPerMsg > 0 {
			res.OwnAllocsPerMsg = res.AllocsPerMsg - res.CeilingAllocsPerMsg
		}
	} else {
		// This process served the sink: its allocations per request
		// are the server's side of net/http (and the harness's), which
		// the ceiling run's per request has too, beside the client's.
		res.SinkCPUPer10k = per10k(s1.cpu-base.s0.cpu, delivered)
		res.SinkAllocsPerReq = float64(s1.mallocs-base.s0.mallocs) / float64(okRequests)
		if res.CeilingAllocsPerReq > 0 {
			res.ClientAllocsPerReq = res.CeilingAllocsPerReq - res.SinkAllocsPerReq
			res.OwnAllocsPerMsg = res.AllocsPerMsg - res.ClientAllocsPerReq*float64(f.requests)
		}
	}
	res.SinkMaxInFlow = rec.sink.MaxInFlight()
	samples := rec.recorded() // the backlog window's; a hot key goes on meanwhile

	// The ceiling again, now that Orderly's backlog is done: the ratio is to
	// the mean of the runs before and after, so that a machine whose speed
	// drifts during the run moves both sides alike. It gets a sink of its
	// own: in a hot-key run the hot key is still being delivered to
	// Orderly's.
	if f.ceiling {
		sink2, err := startSink()
		if err != nil {
			return nil, err
		}
		after := *res // its figures but the rate are the run's before
		err = b.ceiling(ctx, r, sink2, &after, res.CeilingConcurrency)
		sink2.close()
		if err != nil {
			return nil, fmt.Errorf("ceiling after: %w", err)
		}
		res.CeilingBefore, res.CeilingAfter = res.Ceiling, after.Ceiling
		res.Ceiling = (res.CeilingBefore + res.CeilingAfter) / 2
	}
	b.analyse(res, samples, base.s0.at, f)

	// 4. Live messages: produce-to-request latency.
	if liveCap > 0 {
		if err := b.livePhase(ctx, prod, gen, rec, res, f, liveCap); err != nil {
			return nil, fmt.Errorf("live phase: %w", err)
		}
	}

	// 5. Memory after the burst.
	if f.settle > 0 {
		b.printf("   settling %s\n", f.settle)
		select {
		case <-time.After(f.settle):
		case <-side.exited():
			return nil, fmt.Errorf("the service stopped: %v", side.exitErr())
		}
	}
	res.RSSAfterMB = mb(side.rss())
	if err := side.settle(); err != nil {
		return nil, err
	}
	res.RSSAfterFreeMB = mb(side.rss())
	if f.heapProfile != "" {
		if err := side.profile("heap", profName(f.heapProfile)+".after"); err != nil {
			return nil, err
		}
	}
	st2, err := side.stats()
	if err != nil {
		return nil, err
	}
	res.HeapAfterMB, res.StackAfterMB = mb(int64(st2.HeapInuse)), mb(int64(st2.StackInuse))
	res.MaxRSSMB = mb(side.peakRSS())
	res.Retries, res.Pauses = st2.Retries, st2.Pauses

	if err := side.shutdown(); err != nil {
		return nil, fmt.Errorf("the service stopped with an error: %w", err)
	}
	rep := rec.sink.Check(gen.Expected())
	res.OrderViolation, res.Duplicates = rep.Violations, rep.Duplicates
	if f.hotKey == 0 {
		res.Missing = rep.Missing
	}
	b.printRun(res)
	if rep.Violations > 0 || res.Missing > 0 {
		return nil, fmt.Errorf("delivery check failed: %s", rep)
	}
	return res, nil
}

// measureBase is where a run's measurements start from.
type measureBase struct {
	s0        snapshot // this process: with -dispatcher process the sink and the harness
	cpu       time.Duration
	brokerCPU time.Duration
	stats     orderlyStats
}

func takeBase(side orderlySide, broker *brokerProcess) (measureBase, error) {
	b := measureBase{s0: snap(), cpu: side.cpu(), brokerCPU: broker.cpu()}
	var err error
	b.stats, err = side.stats()
	return b, err
}

func (b *bencher) profileName(file, run string) string {
	if !b.multi {
		return file
	}
	ext := filepath.Ext(file)
	return strings.TrimSuffix(file, ext) + "-" + run + ext
}

// analyse turns the samples of the backlog into throughput and latencies.
func (b *bencher) analyse(res *benchResult, samples []sample, assigned time.Time, f benchFlags) {
	t0 := assigned.UnixNano()
	var last, first int64 = 0, math.MaxInt64
	disp := make([]time.Duration, 0, len(samples))
	var hk *hotKey
	partHot := int32(-1) // partition of the hot key
	if f.hotKey > 0 {
		hk = &hotKey{}
		res.OtherKeys = hk
		for _, s := range samples {
			if s.hot {
				partHot = s.part
				break
			}
		}
	}
	var lastSame, lastOther int64
	var nSame, nOther int
	for _, s := range samples {
		first = min(first, s.recv)
		if s.hot {
			hk.HotDelivered++
			continue
		}
		last = max(last, s.recv)
		disp = append(disp, time.Duration(s.recv-t0))
		if hk != nil {
			if s.part == partHot {
				nSame++
				lastSame = max(lastSame, s.recv)
			} else {
				nOther++
				lastOther = max(lastOther, s.recv)
			}
		}
	}
	window := time.Duration(last - t0)
	res.Seconds = window.Seconds()
	msgs := res.Messages
	if hk != nil {
		msgs = res.Messages - hotCount(res.Messages, f.hotKey)
		hk.HotDelivered /= f.requests
		hk.Others = msgs
		hk.OthersThroughput = float64(msgs) / window.Seconds()
		hk.HotPartition = partHot
		if nSame > 0 {
			hk.OthersSamePartitionMS = ms(time.Duration(lastSame - t0))
		}
		if nOther > 0 {
			hk.OthersOtherPartitionMS = ms(time.Duration(lastOther - t0))
		}
	}
	if window > 0 {
		res.Throughput = float64(msgs) / window.Seconds()
	}
	if first != math.MaxInt64 {
		res.FirstRequestMS = ms(time.Duration(first - t0))
	}
	if res.Ceiling > 0 && hk == nil {
		res.Ratio = res.Throughput / res.Ceiling
	}
	if f.latency > 0 {
		res.LatencyBound = float64(f.sendConcurrency(f.keys)) / (f.latency.Seconds() * float64(f.requests))
		if hk == nil {
			res.BoundRatio = res.Throughput / res.LatencyBound
		}
	}
	slices.Sort(disp)
	res.DispatchP50MS, res.DispatchP99MS = ms(percentile(disp, 50)), ms(percentile(disp, 99))
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(p/100*float64(len(sorted)-1))]
}

// produceChunks produces n records to topic in chunks, records(i, j) being
// those from i to j, so that generated values need not all be held at once.
func produceChunks(ctx context.Context, p *testkit.Producer, topic string, n int, records func(i, j int) []testkit.Record) error {
	const chunk = 20000
	for i := 0; i < n; i += chunk {
		if err := p.Produce(ctx, topic, records(i, min(i+chunk, n))); err != nil {
			return err
		}
	}
	return nil
}

// livePhase produces messages at a steady rate after the backlog and
// measures produce-timestamp-to-request-received latency on them.
func (b *bencher) livePhase(ctx context.Context, p *testkit.Producer, gen *testkit.Generator, rec *recorder, res *benchResult, f benchFlags, capacity int) error {
	rate := f.liveRate
	if rate == 0 {
		rate = max(res.Throughput/4, 100)
	}
	n := min(max(int(rate*f.live.Seconds()), 1), capacity)
	from := rec.next.Load()
	before := rec.ok.Load()
	const tick = 10 * time.Millisecond
	per := max(rate*tick.Seconds(), 1)
	t := time.NewTicker(tick)
	defer t.Stop()
	start := time.Now()
	for sent := 0; sent < n; {
		// Catch up to the schedule: messages due by now.
		due := min(int(per*float64(time.Since(start)/tick+1)), n)
		if due > sent {
			recs := gen.Records(due - sent)
			testkit.StampNow(recs)
			if err := p.Produce(ctx, benchTopic, recs); err != nil {
				return err
			}
			sent = due
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	want := before + int64(n*f.requests)
	for rec.ok.Load() < want {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d of %d live requests delivered: %w", rec.ok.Load()-before, n*f.requests, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
	all := rec.recorded()
	lat := make([]time.Duration, 0, len(all)-int(from))
	for _, s := range all[from:] {
		lat = append(lat, s.lat)
	}
	slices.Sort(lat)
	res.LiveMessages, res.LiveRate = n, float64(n)/time.Since(start).Seconds()
	res.LiveP50MS, res.LiveP99MS = ms(percentile(lat, 50)), ms(percentile(lat, 99))
	return nil
}

// benchConfig is the Orderly configuration of a run: one route with
// f.requests requests to the sink, on the defaults as deployed (the DLQ
// writer and its producers, the admin server, on a port of its own per
// instance), but for the flags' settings, a short drain and retries that
// never give up, with short backoffs (what -failure-rate measures).
func benchConfig(f benchFlags, brokers, sink string) string {
	var b strings.Builder
	b.WriteString(configHead(f, brokers, benchTopic))
	if brokers == config.EmbeddedBrokers {
		fmt.Fprintf(&b, "embedded_listen = \"127.0.0.1:0\"\nembedded_partitions = %d\n", f.partitions)
	}
	fmt.Fprintf(&b, `
[http]
max_conns_per_host = %d

[http.retry]
max_attempts = 0
initial_backoff = "10ms"
max_backoff = "1s"

[admin]
listen = "127.0.0.1:0"

[[routes]]
name = "bench"
`, f.maxConns)
	for i := range f.requests {
		path := "/people/{{ .Key }}"
		if i > 0 {
			path += "/" + strconv.Itoa(i)
		}
		fmt.Fprintf(&b, `  [[routes.requests]]
  method = "POST"
  url = "http://%s%s"
  [routes.requests.headers]
  Content-Type = "application/json"
`, sink, path)
	}
	return b.String()
}

// configHead is what the bench's configurations share: the [log] and
// [dispatch] sections, then [kafka] on topic, left open for more keys.
func configHead(f benchFlags, brokers, topic string) string {
	return fmt.Sprintf(`
[log]
level = "warn"
format = "text"

[dispatch]
max_in_flight = %d
drain_timeout = "2s"

[kafka]
brokers = %q
group_id = "orderly-bench"
topics = [%q]
`, f.maxInFlight, brokers, topic)
}
