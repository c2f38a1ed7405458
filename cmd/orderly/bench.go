package main

// orderly bench: the benchmark harness of the performance issue. Each run
// pre-produces a backlog to a fresh embedded broker, drives a plain net/http
// client against a local sink (the ceiling), then lets Orderly drain the same
// backlog to the same kind of sink, and reports throughput, the ratio to the
// ceiling, latencies, CPU, memory and allocations side by side. By default
// the broker and Orderly each run in a child process (-broker process,
// -dispatcher process: see bench_dispatcher.go), so that Orderly's figures
// are those of the Orderly process alone, as deployed; the sink, the
// recorder, the producer and the ceiling client stay in this one.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// benchTopic is the topic every bench run produces to and consumes from.
const benchTopic = "orders"

type benchFlags struct {
	scenario    string
	messages    int
	keys        int
	partitions  int
	size        int
	latency     time.Duration
	requests    int
	failureRate float64
	hotKey      float64
	maxInFlight int
	maxConns    int
	live        time.Duration
	liveRate    float64
	settle      time.Duration
	broker      string
	dispatcher  string
	ceiling     bool
	timeout     time.Duration
	json        bool
	repeat      int
	cpuProfile  string
	memProfile  string
	heapProfile string
	verbose     bool
	serveBroker bool // hidden: run only the embedded broker (the child of -broker process)
	// hidden: run only the Orderly service of configuration file config
	// (the child of -dispatcher process)
	serveDispatcher bool
	config          string
}

// benchScenario is one of the targets as flag presets. Flags given
// explicitly on the command line override a preset's values.
type benchScenario struct {
	num, name, target string
	apply             func(f *benchFlags)
}

var benchScenarios = []benchScenario{
	{"1", "throughput", "throughput >= 0.7 of the raw-HTTP ceiling", func(f *benchFlags) {
		f.messages, f.keys, f.partitions, f.size, f.latency = 100000, 10000, 8, 200, 0
	}},
	{"2", "latency", "throughput >= 0.8 of min(keys, in-flight limit)/latency, or 0.7 of the ceiling where the CPU binds first", func(f *benchFlags) {
		// max_conns_per_host 0 (unlimited): the default 256 connections
		// would cap 2,000 keys at 256/latency before anything else does.
		f.messages, f.keys, f.partitions, f.size, f.latency, f.maxConns = 40000, 2000, 8, 200, 20*time.Millisecond, 0
	}},
	{"3", "hotkey", "the other keys' throughput within 10% of the same run without the hot key", func(f *benchFlags) {
		// The hot key's partition must hold its share (32,000 hot + ~4,000
		// others) under max_in_flight: beyond it the partition pauses by
		// design (back-pressure) and its other keys wait for the hot one.
		// 64,000 messages give the other keys' runs a few seconds, so
		// that start-up (~0.1 s from assignment to the first request)
		// does not weigh on the comparison.
		f.messages, f.keys, f.partitions, f.size, f.latency, f.hotKey = 64000, 1000, 8, 200, 5*time.Millisecond, 0.5
		f.maxInFlight = 40000
	}},
	{"4", "memory", "steady-state RSS <= 150 MB with 8 partitions x max_in_flight 10,000 of 1 KB, back near the baseline after the burst", func(f *benchFlags) {
		// 1.5 times what the partitions may hold, so that every partition
		// fills up, pauses and resumes; the settle time outlasts the
		// default lane_idle (10s), after which idle lanes are retired.
		f.messages, f.keys, f.partitions, f.size, f.latency, f.maxInFlight = 120000, 10000, 8, 1024, 0, 10000
		f.settle = 12 * time.Second
	}},
	{"5", "allocs", "at most 30 allocations per delivered message in Orderly's own code (net/http excluded)", func(f *benchFlags) {
		f.messages, f.keys, f.partitions, f.size, f.latency = 50000, 1000, 8, 200, 0
	}},
}

var benchCommand = command{
	name:     "bench",
	synopsis: "[-scenario NAME|all] [flags]",
	desc: `
Measure Orderly against a plain net/http client (the ceiling) on a local HTTP sink: messages are
pre-produced to an embedded broker, then both send them, and the throughput, latency, memory and
allocations of each are printed side by side. A -scenario sets the flags of one of the README's
performance scenarios (flags given explicitly override it) and checks its target. By default the
broker and Orderly each run in a child process, so that what is measured is Orderly's alone.`,
	// The child processes' side of -broker process and -dispatcher process.
	hidden: []string{"serve-broker", "serve-dispatcher", "config"},
}

func cmdBench(args []string, stdout, stderr io.Writer) int {
	c := &benchCommand
	fs := c.flags(stderr)
	var f benchFlags
	fs.StringVar(&f.scenario, "scenario", "", "preset: 1|throughput, 2|latency, 3|hotkey, 4|memory, 5|allocs, or all (explicit flags override a preset)")
	fs.IntVar(&f.messages, "messages", 50000, "messages pre-produced before the dispatcher starts")
	fs.IntVar(&f.keys, "keys", 1000, "distinct keys")
	fs.IntVar(&f.partitions, "partitions", 8, "partitions of the topic")
	fs.IntVar(&f.size, "size", 200, "message size in bytes (JSON event, padded)")
	fs.DurationVar(&f.latency, "latency", 0, "time the sink takes per request")
	fs.IntVar(&f.requests, "requests", 1, "HTTP requests per message (the route gets this many [[routes.requests]])")
	fs.Float64Var(&f.failureRate, "failure-rate", 0, "share of requests the sink answers 503 (retried)")
	fs.Float64Var(&f.hotKey, "hot-key", 0, "share of the messages on one hot key (key-0); a comparison run without it follows")
	fs.IntVar(&f.maxInFlight, "max-in-flight", 10000, "dispatch.max_in_flight")
	fs.IntVar(&f.maxConns, "max-conns", 256, "http.max_conns_per_host (0 = unlimited), for Orderly and the ceiling client alike")
	fs.DurationVar(&f.live, "live", time.Second, "after the backlog, produce live messages for this long to measure produce-to-request latency (0 = skip)")
	fs.Float64Var(&f.liveRate, "live-rate", 0, "live messages per second (0 = a quarter of the measured throughput: moderate load)")
	fs.DurationVar(&f.settle, "settle", 0, "after the run, wait this long before measuring the RSS after the burst")
	fs.StringVar(&f.broker, "broker", "auto", "where the embedded broker runs: process (a child process, so that its CPU, memory and allocations are not counted), in-process, or auto (process unless running inside a Go test binary)")
	fs.StringVar(&f.dispatcher, "dispatcher", "auto", "where the Orderly service runs: process (a child process, so that its CPU, memory and allocations are those of Orderly alone, as deployed), in-process (with the sink and the harness), or auto (process unless running inside a Go test binary)")
	fs.BoolVar(&f.ceiling, "ceiling", true, "also drive the plain net/http client (the ceiling)")
	fs.DurationVar(&f.timeout, "timeout", 5*time.Minute, "give up on a run after this long (an error)")
	fs.IntVar(&f.repeat, "repeat", 1, "do each run this many times (ceiling and Orderly side by side each time) and summarise the medians: shared machines drift")
	fs.BoolVar(&f.json, "json", false, "print the results as JSON on stdout (progress goes to stderr)")
	fs.StringVar(&f.cpuProfile, "cpuprofile", "", "write a CPU profile of Orderly's backlog phase to this file (suffixed with the run name when there are several runs)")
	fs.StringVar(&f.memProfile, "memprofile", "", "write allocation profiles before (FILE.base) and after (FILE) Orderly's backlog phase")
	fs.StringVar(&f.heapProfile, "heapprofile", "", "write a heap (in-use) profile when half of the backlog has been delivered (FILE) and after the run (FILE.after), each after a GC")
	fs.BoolVar(&f.verbose, "v", false, "log the service's warnings to stderr")
	fs.BoolVar(&f.serveBroker, "serve-broker", false, "internal: serve only the embedded broker until stdin closes")
	fs.BoolVar(&f.serveDispatcher, "serve-dispatcher", false, "internal: run only the Orderly service of -config, answering the bench's commands on stdin, until stdin closes")
	fs.StringVar(&f.config, "config", "", "internal: the configuration file of -serve-dispatcher")
	if code, ok := c.parse(fs, args, stdout, stderr); !ok {
		return code
	}
	if f.repeat < 1 {
		fmt.Fprintln(stderr, "orderly bench: -repeat must be at least 1")
		return 2
	}
	if f.serveBroker {
		return serveBroker(f.partitions, stdout, stderr)
	}
	if f.serveDispatcher {
		return serveDispatcher(f.config, f.verbose, os.Stdin, stdout, stderr)
	}
	set := map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { set[fl.Name] = true })
	runs, err := benchRuns(f, set)
	if err != nil {
		fmt.Fprintln(stderr, "orderly bench:", err)
		return 2
	}
	for _, r := range runs {
		if err := r.f.validate(); err != nil {
			fmt.Fprintf(stderr, "orderly bench: %s: %v\n", r.name, err)
			return 2
		}
	}
	for _, w := range []struct {
		flag  string
		value *string
	}{{"broker", &f.broker}, {"dispatcher", &f.dispatcher}} {
		switch *w.value {
		case "auto":
			*w.value = "process"
			if exe, err := os.Executable(); err != nil || strings.HasSuffix(filepath.Base(exe), ".test") {
				*w.value = "in-process"
			}
		case "process", "in-process":
		default:
			fmt.Fprintf(stderr, "orderly bench: -%s %q: want process, in-process or auto\n", w.flag, *w.value)
			return 2
		}
	}

	progress := stdout
	if f.json {
		progress = stderr
	}
	b := &bencher{out: progress, stderr: stderr, multi: len(runs) > 1 || f.repeat > 1}
	var results []*benchResult
	var repeated []benchRun
	for _, r := range runs {
		for i := range f.repeat {
			if f.repeat > 1 {
				r.name = fmt.Sprintf("%s#%d", strings.Split(r.name, "#")[0], i+1)
				if r.hotCompare != nil {
					c := *r.hotCompare
					c.name = r.name + "-nohot"
					r.hotCompare = &c
				}
			}
			repeated = append(repeated, r)
		}
	}
	for _, r := range repeated {
		r.f.broker, r.f.dispatcher = f.broker, f.dispatcher
		if r.hotCompare != nil {
			r.hotCompare.f.broker, r.hotCompare.f.dispatcher = f.broker, f.dispatcher
		}
		res, err := b.run(r)
		if err != nil {
			fmt.Fprintf(stderr, "orderly bench: %s: %v\n", r.name, err)
			return 1
		}
		results = append(results, res)
		if r.hotCompare != nil {
			base, err := b.run(*r.hotCompare)
			if err != nil {
				fmt.Fprintf(stderr, "orderly bench: %s: %v\n", r.hotCompare.name, err)
				return 1
			}
			res.attachHotBaseline(base)
			results = append(results, base)
			b.printHot(res)
		}
	}
	if f.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(map[string]any{"definitions": benchDefinitions, "runs": results}); err != nil {
			fmt.Fprintln(stderr, "orderly bench:", err)
			return 1
		}
		return 0
	}
	printBenchTable(stdout, results)
	if f.repeat > 1 {
		printBenchMedians(stdout, results)
	}
	return 0
}

// sendConcurrency is how many requests Orderly can have in flight at once:
// one sender per key lane with work, at most partitions x max_in_flight
// messages held, and at most max_conns_per_host senders per target host:port
// (all of the bench's requests go to one sink) when it is not 0 (unlimited).
func (f benchFlags) sendConcurrency(keys int) int {
	n := min(keys, f.partitions*f.maxInFlight)
	if f.maxConns > 0 {
		n = min(n, f.maxConns)
	}
	return n
}

func (f benchFlags) validate() error {
	switch {
	case f.messages < 1 || f.keys < 1 || f.partitions < 1 || f.requests < 1 || f.maxInFlight < 1:
		return errors.New("-messages, -keys, -partitions, -requests and -max-in-flight must be at least 1")
	case f.size < 0 || f.maxConns < 0 || f.latency < 0 || f.live < 0 || f.liveRate < 0 || f.settle < 0:
		return errors.New("-size, -max-conns, -latency, -live, -live-rate and -settle must not be negative")
	case f.failureRate < 0 || f.failureRate >= 1:
		return errors.New("-failure-rate must be in [0, 1)")
	case f.hotKey < 0 || f.hotKey >= 1:
		return errors.New("-hot-key must be in [0, 1)")
	case f.hotKey > 0 && f.keys < 2:
		return errors.New("-hot-key needs at least 2 keys")
	case f.hotKey > 0 && f.messages-hotCount(f.messages, f.hotKey) < 1:
		return errors.New("-hot-key leaves no message for the other keys")
	}
	return nil
}

// benchRun is one measured run.
type benchRun struct {
	name   string // row name
	target string // the target, for the output
	f      benchFlags
	// baselineOf, for a hot-key comparison run: produce only the other
	// keys' messages of a run with this hot-key share (no hot key at all).
	baselineOf float64
	hotCompare *benchRun // the comparison run to do after this one
}

func benchRuns(f benchFlags, set map[string]bool) ([]benchRun, error) {
	var picked []benchScenario
	switch s := strings.ToLower(f.scenario); s {
	case "", "custom":
	case "all":
		// The memory scenario first, while this process's own baseline
		// is still that of a fresh process (with -dispatcher in-process;
		// a child process is fresh for every run).
		picked = append([]benchScenario{benchScenarios[3]}, benchScenarios[:3]...)
		picked = append(picked, benchScenarios[4])
	default:
		for _, sc := range benchScenarios {
			if s == sc.num || s == sc.name {
				picked = append(picked, sc)
			}
		}
		if len(picked) == 0 {
			return nil, fmt.Errorf("-scenario %q: want 1..5, throughput, latency, hotkey, memory, allocs or all", f.scenario)
		}
	}
	var runs []benchRun
	add := func(name, target string, g benchFlags) {
		r := benchRun{name: name, target: target, f: g}
		if g.hotKey > 0 {
			c := benchRun{name: name + "-nohot", target: "comparison run: the same other-key messages, no hot key", f: g, baselineOf: g.hotKey}
			c.f.hotKey = 0
			r.hotCompare = &c
		}
		runs = append(runs, r)
	}
	if len(picked) == 0 {
		add("custom", "", f)
		return runs, nil
	}
	for _, sc := range picked {
		g := f
		sc.apply(&g)
		overrideSet(&g, f, set)
		add(sc.num+"-"+sc.name, sc.target, g)
	}
	return runs, nil
}

// overrideSet copies the flags given on the command line from f over g.
func overrideSet(g *benchFlags, f benchFlags, set map[string]bool) {
	for name := range set {
		switch name {
		case "messages":
			g.messages = f.messages
		case "keys":
			g.keys = f.keys
		case "partitions":
			g.partitions = f.partitions
		case "size":
			g.size = f.size
		case "latency":
			g.latency = f.latency
		case "requests":
			g.requests = f.requests
		case "failure-rate":
			g.failureRate = f.failureRate
		case "hot-key":
			g.hotKey = f.hotKey
		case "max-in-flight":
			g.maxInFlight = f.maxInFlight
		case "max-conns":
			g.maxConns = f.maxConns
		case "settle":
			g.settle = f.settle
		}
	}
}

// hotCount is how many of n messages go to the hot key with share h: message
// i is hot when floor((i+1)h) > floor(ih), which spreads them evenly.
func hotCount(n int, h float64) int { return int(math.Floor(float64(n) * h)) }

func isHot(i int, h float64) bool {
	return h > 0 && math.Floor(float64(i+1)*h) > math.Floor(float64(i)*h)
}

// generator returns the event generator of a run. Key 0 is the hot key; the
// other messages go round-robin over keys 1..keys-1 (over every key when
// there is no hot key at all).
func (r benchRun) generator() *testkit.Generator {
	g := &testkit.Generator{Keys: r.f.keys, Size: r.f.size}
	switch {
	case r.f.hotKey > 0:
		h, other := r.f.hotKey, 0
		g.KeyOf = func(i int) int {
			if isHot(i, h) {
				return 0
			}
			k := 1 + other%(r.f.keys-1)
			other++
			return k
		}
	case r.baselineOf > 0:
		g.KeyOf = func(i int) int { return 1 + i%(r.f.keys-1) }
	}
	return g
}

// messages is how many messages the run produces.
func (r benchRun) messages() int {
	if r.baselineOf > 0 {
		return r.f.messages - hotCount(r.f.messages, r.baselineOf)
	}
	return r.f.messages
}

// --- the sink and what it records -------------------------------------------

// sample is one successful request as the sink saw it.
type sample struct {
	recv int64         // Unix nanoseconds, when the request (its body) was received
	lat  time.Duration // since the event's produced_at
	part int32         // partition, from the Idempotency-Key (-1 unknown)
	hot  bool
}

// recorder is a testkit.Sink with hooks that apply the sink latency and the
// failure rate, and record every successful request without allocating.
type recorder struct {
	sink    *testkit.Sink
	latency time.Duration
	failure float64
	hotKey  string

	ok       atomic.Int64 // successful requests
	okOthers atomic.Int64 // successful requests of keys other than the hot one
	next     atomic.Int64
	samples  []sample
}

func newRecorder(capacity int, latency time.Duration, failure float64, hotKey string) *recorder {
	r := &recorder{sink: testkit.NewSink(), latency: latency, failure: failure, hotKey: hotKey,
		samples: make([]sample, capacity)}
	r.sink.Status = r.status
	return r
}

// status runs for every request once its body is parsed: it waits the sink
// latency, fails the configured share and records the rest.
func (r *recorder) status(d *testkit.Delivery) int {
	recv := time.Now()
	if r.latency > 0 {
		time.Sleep(r.latency)
	}
	if r.failure > 0 && rand.Float64() < r.failure {
		return http.StatusServiceUnavailable
	}
	hot := r.hotKey != "" && d.Key == r.hotKey
	if i := r.next.Add(1) - 1; i < int64(len(r.samples)) {
		r.samples[i] = sample{recv: recv.UnixNano(), lat: d.Latency, part: partitionOf(d.IdempotencyKey), hot: hot}
	}
	r.ok.Add(1)
	if !hot {
		r.okOthers.Add(1)
	}
	return 0
}

// recorded returns the samples recorded so far.
func (r *recorder) recorded() []sample {
	return r.samples[:min(int(r.next.Load()), len(r.samples))]
}

// partitionOf parses the partition out of <topic>-<partition>-<offset>-<index>.
func partitionOf(idem string) int32 {
	end := len(idem)
	for field := 0; field < 3; field++ {
		i := strings.LastIndexByte(idem[:end], '-')
		if i < 0 {
			return -1
		}
		if field == 2 {
			p, err := strconv.Atoi(idem[i+1 : end])
			if err != nil {
				return -1
			}
			return int32(p)
		}
		end = i
	}
	return -1
}

// sinkServer serves whichever recorder is current on one listener.
type sinkServer struct {
	srv  *http.Server
	ln   net.Listener
	cur  atomic.Pointer[recorder]
	done chan struct{}
}

func startSink() (*sinkServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &sinkServer{ln: ln, done: make(chan struct{})}
	s.srv = &http.Server{ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.cur.Load().sink.ServeHTTP(w, r) })}
	go func() { defer close(s.done); _ = s.srv.Serve(ln) }()
	return s, nil
}

func (s *sinkServer) addr() string { return s.ln.Addr().String() }

func (s *sinkServer) close() {
	_ = s.srv.Close()
	<-s.done
}

// --- process measurements ---------------------------------------------------

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// maxRSS is the process's peak resident set size in bytes (getrusage).
func maxRSS() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Maxrss * 1024 // kilobytes on Linux
}

// currentRSS is this process's resident set size now, in bytes.
func currentRSS() int64 { return processRSS(0) }

// procFile is the path of a /proc file of process pid, 0 being this one.
func procFile(pid int, name string) string {
	if pid == 0 {
		return "/proc/self/" + name
	}
	return fmt.Sprintf("/proc/%d/%s", pid, name)
}

// processRSS is the resident set size of process pid now
// (/proc/PID/statm), in bytes; 0 if unknown.
func processRSS(pid int) int64 {
	b, err := os.ReadFile(procFile(pid, "statm"))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// processPeakRSS is the peak resident set size of process pid so far
// (VmHWM in /proc/PID/status), in bytes; 0 if unknown.
func processPeakRSS(pid int) int64 {
	b, err := os.ReadFile(procFile(pid, "status"))
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(v) // "1234 kB"
			if len(f) == 0 {
				return 0
			}
			kb, _ := strconv.ParseInt(f[0], 10, 64)
			return kb * 1024
		}
	}
	return 0
}

// processCPU is the user+system CPU time of process pid so far
// (/proc/PID/stat, in clock ticks of 10ms); 0 if unknown.
func processCPU(pid int) time.Duration {
	data, err := os.ReadFile(procFile(pid, "stat"))
	if err != nil {
		return 0
	}
	s := string(data)
	// Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const clkTck = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / clkTck
}

func mallocs() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.Mallocs
}

// snapshot is the process's counters at one moment.
type snapshot struct {
	at      time.Time
	cpu     time.Duration
	mallocs uint64
}

func snap() snapshot { return snapshot{at: time.Now(), cpu: cpuTime(), mallocs: mallocs()} }

// rssSampler samples a process's current RSS every interval until stopped.
type rssSampler struct {
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
	samples []int64
}

func sampleRSS(every time.Duration, rss func() int64) *rssSampler {
	s := &rssSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			s.samples = append(s.samples, rss())
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// end stops sampling and returns the median and the maximum sample; it may
// be called more than once.
func (s *rssSampler) end() (median, peak int64) {
	s.once.Do(func() { close(s.stop) })
	<-s.done
	l := slices.Clone(s.samples)
	slices.Sort(l)
	if len(l) == 0 {
		return 0, 0
	}
	return l[len(l)/2], l[len(l)-1]
}

func settleMemory() {
	runtime.GC()
	debug.FreeOSMemory()
}

// --- the broker as a child process -----------------------------------------

// startBenchBroker starts the embedded broker with the bench topic.
func startBenchBroker(partitions int) (*embedded.Broker, error) {
	return embedded.Start(embedded.Options{Listen: "127.0.0.1:0", Partitions: partitions,
		Topics: []string{benchTopic}, MinSessionTimeout: time.Second})
}

// serveBroker is `orderly bench -serve-broker`: the embedded broker alone,
// printing its address and serving until stdin closes.
func serveBroker(partitions int, stdout, stderr io.Writer) int {
	b, err := startBenchBroker(partitions)
	if err != nil {
		fmt.Fprintln(stderr, "orderly bench -serve-broker:", err)
		return 1
	}
	defer b.Close()
	fmt.Fprintln(stdout, b.Addr())
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

type brokerProcess struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	addr  string
	wait  chan error
}

// startChild starts this executable as `orderly bench args...`, killed
// should this process die, with pipes to its stdin and from its stdout.
func startChild(what string, stderr io.Writer, args ...string) (*exec.Cmd, io.WriteCloser, io.ReadCloser, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, nil, err
	}
	cmd := exec.Command(exe, append([]string{"bench"}, args...)...)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, nil, nil, fmt.Errorf("unable to start the %s process: %w", what, err)
	}
	return cmd, stdin, stdout, nil
}

func startBrokerProcess(partitions int, stderr io.Writer) (*brokerProcess, error) {
	cmd, stdin, stdout, err := startChild("broker", stderr, "-serve-broker", "-partitions", strconv.Itoa(partitions))
	if err != nil {
		return nil, err
	}
	b := &brokerProcess{cmd: cmd, stdin: stdin, wait: make(chan error, 1)}
	line := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(l)
		_, _ = io.Copy(io.Discard, stdout)
		b.wait <- cmd.Wait()
	}()
	select {
	case b.addr = <-line:
	case <-time.After(30 * time.Second):
	}
	if b.addr == "" {
		b.close()
		return nil, errors.New("the broker process did not report its address")
	}
	return b, nil
}

// cpu returns the child's user+system CPU time so far (/proc/PID/stat).
func (b *brokerProcess) cpu() time.Duration { return processCPU(b.cmd.Process.Pid) }

func (b *brokerProcess) close() {
	_ = b.stdin.Close()
	select {
	case <-b.wait:
	case <-time.After(10 * time.Second):
		_ = b.cmd.Process.Kill()
		<-b.wait
	}
}

// --- one run ----------------------------------------------------------------

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
	OwnAllocsPerMsg    float64 `json:"own_allocs_per_msg,omitempty"`        // process: allocs_per_msg - client_allocs_per_request x requests; in-process: allocs_per_msg - ceiling_allocs_per_msg
	SinkMaxInFlow      int64   `json:"sink_max_concurrent"`
	Retries            float64 `json:"retries"`
	Pauses             float64 `json:"pauses"`

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

	partHot int32 // partition of the hot key
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

type bencher struct {
	out, stderr io.Writer
	multi       bool
}

func (b *bencher) printf(format string, args ...any) { fmt.Fprintf(b.out, format, args...) }

func mb(n int64) float64 { return float64(n) / (1 << 20) }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (b *bencher) run(r benchRun) (*benchResult, error) {
	f := r.f
	m := r.messages()
	res := &benchResult{Name: r.name, Target: r.target, Messages: m, Keys: f.keys, Partitions: f.partitions,
		Size: f.size, LatencyMS: ms(f.latency), Requests: f.requests, FailureRate: f.failureRate, HotKey: f.hotKey,
		MaxInFlight: f.maxInFlight, MaxConns: f.maxConns, Broker: f.broker, Dispatcher: f.dispatcher, partHot: -1}
	b.printf("\n== %s: %d messages, %d keys, %d partitions, %d B, sink latency %s, %d request(s)/message, failure rate %.2f",
		r.name, m, f.keys, f.partitions, f.size, f.latency, f.requests, f.failureRate)
	if f.hotKey > 0 {
		b.printf(", hot key share %.2f", f.hotKey)
	}
	if r.baselineOf > 0 {
		b.printf(", keys 1..%d only (hot key left out)", f.keys-1)
	}
	b.printf(", max_in_flight %d, max_conns_per_host %d, broker %s, dispatcher %s\n", f.maxInFlight, f.maxConns, f.broker, f.dispatcher)
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
	hotKeyName := ""
	if f.hotKey > 0 {
		hotKeyName = "key-0"
	}

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
	switch {
	case f.broker == "process":
		brokerChild, err = startBrokerProcess(f.partitions, b.stderr)
		if err != nil {
			return nil, err
		}
		defer brokerChild.close()
		brokers = brokerChild.addr
	case !inProcess:
		// -broker in-process, -dispatcher process: the broker in this
		// process, beside the sink; the child connects to it.
		eb, err := startBenchBroker(f.partitions)
		if err != nil {
			return nil, fmt.Errorf("starting the broker: %w", err)
		}
		defer eb.Close()
		brokers = eb.Addr()
	}
	toml := benchConfig(f, brokers, sink.addr())
	cfg, err := config.Parse([]byte(toml), "bench.toml")
	if err != nil {
		return nil, fmt.Errorf("bench configuration: %w", err)
	}
	var side orderlySide
	if inProcess {
		l, err := newLocalOrderly(cfg, f.verbose, b.stderr)
		if err != nil {
			return nil, err
		}
		defer l.shutdown()
		side, brokers = l, l.svc.Brokers()
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
	if err := produceBacklog(ctx, prod, gen, m); err != nil {
		return nil, fmt.Errorf("producing the backlog: %w", err)
	}
	res.ProduceSeconds = time.Since(t0).Seconds()
	b.printf("   produced %d messages in %.1fs\n", m, res.ProduceSeconds)

	// 3. Orderly drains the backlog.
	liveCap := 0
	if f.live > 0 && f.hotKey == 0 {
		liveCap = 200000
	}
	rec := newRecorder(m*f.requests+liveCap*f.requests+1024, f.latency, f.failureRate, hotKeyName)
	sink.cur.Store(rec)

	want := int64(m * f.requests)
	done := func() bool { return rec.ok.Load() >= want }
	if f.hotKey > 0 {
		want = int64((m - hotCount(m, f.hotKey)) * f.requests)
		done = func() bool { return rec.okOthers.Load() >= want }
	}
	profName := func(file string) string { return b.profileName(file, r.name) }

	if inProcess {
		// The baseline before the dispatcher starts: once started, it
		// consumes at once.
		settleMemory()
		res.RSSBaselineMB = mb(currentRSS())
		if err := startProfiles(side, f, profName); err != nil {
			return nil, err
		}
	} else {
		c, err := newChildOrderly(toml, f.verbose, b.stderr)
		if err != nil {
			return nil, err
		}
		defer c.shutdown()
		side = c
	}
	started := time.Now()
	if err := side.start(ctx); err != nil {
		return nil, err
	}
	// The partitions are assigned: every pre-produced message is consumable.
	s0 := snap() // this process: with -dispatcher process the sink and the harness
	cpu0 := side.cpu()
	var brokerCPU0 time.Duration
	if brokerChild != nil {
		brokerCPU0 = brokerChild.cpu()
	}
	st0, err := side.stats()
	if err != nil {
		return nil, err
	}
	res.StartupMS = ms(s0.at.Sub(started))
	if !inProcess {
		// The child is consuming already: its baseline is the process
		// at start-up.
		if err := side.settle(); err != nil {
			return nil, err
		}
		res.RSSBaselineMB = mb(side.rss())
		if err := startProfiles(side, f, profName); err != nil {
			return nil, err
		}
	}
	rss := sampleRSS(100*time.Millisecond, side.rss)
	defer rss.end()
	heapAt := want / 2
	if f.heapProfile == "" {
		heapAt = math.MaxInt64
	}
	for !done() {
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
	var brokerCPU time.Duration
	if brokerChild != nil {
		brokerCPU = brokerChild.cpu() - brokerCPU0
	}
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
	if err := stopProfiles(side, f, profName); err != nil {
		return nil, err
	}
	res.RSSSteadyMB, res.RSSPeakMB = mb(steady), mb(peak)
	res.BrokerCPUPer10k = brokerCPU.Seconds() / delivered * 10000
	res.CPUPer10k = (cpu1 - cpu0).Seconds() / delivered * 10000
	res.AllocsPerMsg = float64(st1.Mallocs-st0.Mallocs) / delivered
	if inProcess {
		if res.CeilingAllocsPerMsg > 0 {
			res.OwnAllocsPerMsg = res.AllocsPerMsg - res.CeilingAllocsPerMsg
		}
	} else {
		// This process served the sink: its allocations per request
		// are the server's side of net/http (and the harness's), which
		// the ceiling run's per request has too, beside the client's.
		res.SinkCPUPer10k = (s1.cpu - s0.cpu).Seconds() / delivered * 10000
		res.SinkAllocsPerReq = float64(s1.mallocs-s0.mallocs) / float64(okRequests)
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
		before := *res
		sink2, err := startSink()
		if err != nil {
			return nil, err
		}
		err = b.ceiling(ctx, r, sink2, res, before.CeilingConcurrency)
		sink2.close()
		if err != nil {
			return nil, fmt.Errorf("ceiling after: %w", err)
		}
		after := res.Ceiling
		res.CeilingConcurrency, res.CeilingCPUPer10k = before.CeilingConcurrency, before.CeilingCPUPer10k
		res.CeilingAllocsPerMsg, res.CeilingAllocsPerReq = before.CeilingAllocsPerMsg, before.CeilingAllocsPerReq
		res.CeilingSinkMaxInFlow = before.CeilingSinkMaxInFlow
		res.CeilingBefore, res.CeilingAfter = before.Ceiling, after
		res.Ceiling = (before.Ceiling + after) / 2
	}
	b.analyse(res, samples, s0.at, f)

	// 4. Live messages: produce-to-request latency.
	if f.live > 0 && f.hotKey == 0 {
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

func (b *bencher) profileName(file, run string) string {
	if !b.multi {
		return file
	}
	ext := filepath.Ext(file)
	return strings.TrimSuffix(file, ext) + "-" + run + ext
}

func startCPUProfile(file string) (func(), error) {
	fh, err := os.Create(file)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(fh); err != nil {
		fh.Close()
		return nil, err
	}
	return func() { pprof.StopCPUProfile(); fh.Close() }, nil
}

func writeProfile(name, file string) error {
	fh, err := os.Create(file)
	if err != nil {
		return err
	}
	defer fh.Close()
	return pprof.Lookup(name).WriteTo(fh, 0)
}

// analyse turns the samples of the backlog into throughput and latencies.
func (b *bencher) analyse(res *benchResult, samples []sample, assigned time.Time, f benchFlags) {
	t0 := assigned.UnixNano()
	var last, first int64 = 0, math.MaxInt64
	disp := make([]time.Duration, 0, len(samples))
	var hk *hotKey
	if f.hotKey > 0 {
		hk = &hotKey{}
		res.OtherKeys = hk
		for _, s := range samples {
			if s.hot {
				res.partHot = s.part
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
			if s.part == res.partHot {
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
		hk.HotPartition = res.partHot
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

// produceBacklog produces n generated messages in chunks, so that the
// generated values are not all held at once.
func produceBacklog(ctx context.Context, p *testkit.Producer, gen *testkit.Generator, n int) error {
	const chunk = 20000
	for done := 0; done < n; {
		c := min(chunk, n-done)
		if err := p.Produce(ctx, benchTopic, gen.Records(c)); err != nil {
			return err
		}
		done += c
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
			stampNow(recs)
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

// ceilingConcurrencies are the plain client's goroutine counts bestCeiling
// tries (up to Orderly's own sending concurrency, which it always tries).
var ceilingConcurrencies = []int{256, 128, 64, 32, 16}

// bestCeiling runs the plain client (ceiling) at several concurrencies and
// keeps the fastest in res: more goroutines than the machine can serve are
// slower, so the ceiling is the best the plain client reaches, not the
// rate at Orderly's concurrency. A count whose latency bound (goroutines /
// latency) is below the best rate so far cannot win and is skipped.
func (b *bencher) bestCeiling(ctx context.Context, r benchRun, sink *sinkServer, res *benchResult) error {
	keys := r.f.keys
	if r.baselineOf > 0 {
		keys-- // the hot key's messages are left out
	}
	top := r.f.sendConcurrency(keys)
	tries := []int{top}
	for _, c := range ceilingConcurrencies {
		if c < top {
			tries = append(tries, c)
		}
	}
	var best benchResult
	for _, c := range tries {
		if lat := r.f.latency.Seconds(); lat > 0 && best.Ceiling > 0 && float64(c)/lat < best.Ceiling {
			continue
		}
		trial := *res
		if err := b.ceiling(ctx, r, sink, &trial, c); err != nil {
			return err
		}
		if trial.Ceiling > best.Ceiling {
			best = trial
		}
	}
	*res = best
	b.printf("   ceiling   best: %d goroutines, %.0f msg/s\n", res.CeilingConcurrency, res.Ceiling)
	return nil
}

// ceiling drives a plain net/http client with the same transport tuning as
// Orderly's sender against a fresh recorder on the same sink server: conc
// goroutines, each sending a message's requests in order, for the same
// number of messages.
func (b *bencher) ceiling(ctx context.Context, r benchRun, sink *sinkServer, res *benchResult, conc int) error {
	f := r.f
	m := r.messages()
	// Bodies like the messages' (the sink parses them), cycled.
	gen := r.generator()
	type msg struct {
		url  string
		body []byte
	}
	pool := make([]msg, min(m, 10000))
	for i := range pool {
		k, v := gen.Next()
		pool[i] = msg{url: "http://" + sink.addr() + "/people/" + k, body: v}
	}
	rec := newRecorder(m*f.requests, f.latency, f.failureRate, "")
	sink.cur.Store(rec)

	idle := f.maxConns
	if idle <= 0 {
		idle = 1024 // as httpclient does when max_conns_per_host is unlimited
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		Protocols:           &protocols,
		MaxIdleConnsPerHost: idle,
		MaxConnsPerHost:     f.maxConns,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}

	settleMemory()
	var next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	s0 := snap()
	for g := 0; g < conc; g++ {
		wg.Go(func() {
			h := http.Header{
				"Content-Type":    {"application/json"},
				"Idempotency-Key": {fmt.Sprintf("%s-%d-%d-0", benchTopic, g%f.partitions, g)},
				"User-Agent":      {"orderly-bench-ceiling"},
			}
			for {
				i := next.Add(1) - 1
				if i >= int64(m) || ctx.Err() != nil {
					return
				}
				mg := pool[i%int64(len(pool))]
				for range f.requests {
					if err := sendUntilOK(ctx, client, mg.url, mg.body, h); err != nil {
						errOnce.Do(func() { firstErr = err })
						return
					}
				}
			}
		})
	}
	wg.Wait()
	s1 := snap()
	if firstErr != nil {
		return firstErr
	}
	el := s1.at.Sub(s0.at)
	res.CeilingConcurrency = conc
	res.Ceiling = float64(m) / el.Seconds()
	res.CeilingCPUPer10k = (s1.cpu - s0.cpu).Seconds() / float64(m) * 10000
	res.CeilingAllocsPerMsg = float64(s1.mallocs-s0.mallocs) / float64(m)
	res.CeilingAllocsPerReq = res.CeilingAllocsPerMsg / float64(f.requests)
	res.CeilingSinkMaxInFlow = rec.sink.MaxInFlight()
	b.printf("   ceiling   plain net/http, %d goroutines: %d messages (%d requests) in %.2fs = %.0f msg/s; cpu %.2f s/10k; %.1f allocs/msg; sink concurrency max %d\n",
		conc, m, m*f.requests, el.Seconds(), res.Ceiling, res.CeilingCPUPer10k, res.CeilingAllocsPerMsg, res.CeilingSinkMaxInFlow)
	return nil
}

func sendUntilOK(ctx context.Context, c *http.Client, url string, body []byte, h http.Header) error {
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header = h
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			return nil
		}
		if resp.StatusCode != http.StatusServiceUnavailable {
			return fmt.Errorf("the sink answered %d", resp.StatusCode)
		}
	}
}

func benchConfig(f benchFlags, brokers, sink string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `
[kafka]
brokers = %q
group_id = "orderly-bench"
topics = [%q]
`, brokers, benchTopic)
	if brokers == config.EmbeddedBrokers {
		fmt.Fprintf(&b, "embedded_listen = \"127.0.0.1:0\"\nembedded_partitions = %d\n", f.partitions)
	}
	fmt.Fprintf(&b, `
[dispatch]
max_in_flight = %d
drain_timeout = "2s"

[http]
max_conns_per_host = %d

[http.retry]
max_attempts = 0
initial_backoff = "10ms"
max_backoff = "1s"

[dlq]
topic = ""

[admin]
listen = ""

[log]
level = "warn"
format = "text"

[[routes]]
name = "bench"
`, f.maxInFlight, f.maxConns)
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

// --- output -----------------------------------------------------------------

func (b *bencher) printRun(res *benchResult) {
	if res.OtherKeys != nil {
		b.printf("   orderly   the other keys' %d messages in %.2fs (assignment to their last request) = %.0f msg/s", res.OtherKeys.Others, res.Seconds, res.Throughput)
	} else {
		b.printf("   orderly   %d messages in %.2fs (assignment to last request) = %.0f msg/s", res.Messages, res.Seconds, res.Throughput)
	}
	if res.Ratio > 0 {
		b.printf(", %.2f of the ceiling", res.Ratio)
		if res.CeilingAfter > 0 {
			b.printf(" (mean of %.0f before and %.0f after)", res.CeilingBefore, res.CeilingAfter)
		}
	}
	b.printf("; assignment after %.0fms, first request %.1fms later; sink concurrency max %d\n", res.StartupMS, res.FirstRequestMS, res.SinkMaxInFlow)
	if res.LatencyBound > 0 && res.BoundRatio > 0 {
		b.printf("             latency bound min(keys, partitions x max_in_flight, max_conns)/(latency x requests) = %.0f msg/s: ratio %.2f\n", res.LatencyBound, res.BoundRatio)
	}
	b.printf("             dispatch latency (assignment to request received) p50 %.1fms p99 %.1fms", res.DispatchP50MS, res.DispatchP99MS)
	if res.LiveMessages > 0 {
		b.printf("; live e2e (produce to request received, %d messages at %.0f msg/s) p50 %.2fms p99 %.2fms", res.LiveMessages, res.LiveRate, res.LiveP50MS, res.LiveP99MS)
	}
	if res.Dispatcher == "process" {
		b.printf("\n             cpu %.2f s/10k (orderly process) + sink/harness %.2f s/10k", res.CPUPer10k, res.SinkCPUPer10k)
	} else {
		b.printf("\n             cpu %.2f s/10k (this process: orderly, sink and harness)", res.CPUPer10k)
	}
	if res.BrokerCPUPer10k > 0 {
		b.printf(" + broker %.2f s/10k", res.BrokerCPUPer10k)
	}
	switch {
	case res.Dispatcher != "process":
		b.printf("; allocs %.1f/msg", res.AllocsPerMsg)
		if res.CeilingAllocsPerMsg > 0 {
			b.printf(" - ceiling %.1f = own ~%.1f/msg", res.CeilingAllocsPerMsg, res.OwnAllocsPerMsg)
		}
	case res.CeilingAllocsPerReq > 0:
		b.printf("\n             allocs %.1f/msg in the orderly process - net/http client %.1f", res.AllocsPerMsg, res.ClientAllocsPerReq)
		if res.Requests > 1 {
			b.printf("/request x %d", res.Requests)
		}
		b.printf(" = own ~%.1f/msg; sink side %.1f/request (ceiling run %.1f/request: client + sink side)",
			res.OwnAllocsPerMsg, res.SinkAllocsPerReq, res.CeilingAllocsPerReq)
	default:
		b.printf("\n             allocs %.1f/msg in the orderly process; sink side %.1f/request", res.AllocsPerMsg, res.SinkAllocsPerReq)
	}
	where := "this process"
	if res.Dispatcher == "process" {
		where = "orderly process"
	}
	b.printf("\n             rss MB (%s): baseline %.0f, steady %.0f, peak %.0f, after %.0f, after FreeOSMemory %.0f (maxrss %.0f)\n             Go heap in use / goroutine stacks / runtime Sys MB: %.0f / %.0f / %.0f at the end of the backlog; heap / stacks %.0f / %.0f after the run and a GC\n",
		where, res.RSSBaselineMB, res.RSSSteadyMB, res.RSSPeakMB, res.RSSAfterMB, res.RSSAfterFreeMB, res.MaxRSSMB,
		res.HeapInUseMB, res.StackInUseMB, res.GoSysMB, res.HeapAfterMB, res.StackAfterMB)
	b.printf("             order: %d violations, %d duplicates, %d missing; %d messages delivered in the backlog window; retries %.0f, pauses %.0f\n",
		res.OrderViolation, res.Duplicates, res.Missing, res.Delivered, res.Retries, res.Pauses)
}

func (b *bencher) printHot(res *benchResult) {
	h := res.OtherKeys
	if h == nil {
		return
	}
	b.printf("   hot key   other keys: %.0f msg/s with the hot key, %.0f msg/s without: ratio %.2f, each run against its own ceiling (raw %.2f); those sharing the hot key's partition %d done after %.0fms, the others after %.0fms; hot key delivered %d of %d meanwhile\n",
		h.OthersThroughput, h.WithoutHot, h.Ratio, h.OthersThroughput/max(h.WithoutHot, 1e-9), h.HotPartition, h.OthersSamePartitionMS, h.OthersOtherPartitionMS, h.HotDelivered, hotCount(res.Messages, res.HotKey))
}

var benchDefinitions = map[string]string{
	"msg/s":      "messages delivered / time from the partition assignment (every pre-produced message consumable) to the last request received; hot-key runs: the other keys' messages only",
	"ceiling":    "the best rate of a plain net/http client (same transport tuning) sending the same number of messages' requests to the same sink, over goroutine counts from Orderly's own sending concurrency, min(keys, partitions x max_in_flight, max_conns_per_host when not 0), down to 16 (256, 128, 64, 32, 16); run before and again (at the best count) after Orderly's backlog, the ratio being to the mean of the two (a drifting machine moves both sides)",
	"dispatch":   "per request: from the partition assignment to the request received by the sink (pre-produced backlog: mostly the message's place in it)",
	"live e2e":   "per request of the live phase (messages produced at a steady rate after the backlog, by default a quarter of msg/s for 1s): from the produce timestamp in the event to the request received (includes the producer's linger.ms=5)",
	"cpu s/10k":  "user+system CPU from assignment to the last request, per 10,000 messages, of the Orderly process: with -dispatcher process the child alone (/proc/PID/stat, 10ms ticks), the bench process's (sink, recorder, harness: on 2 cores they compete as two processes do) and the broker child's beside it; with -dispatcher in-process this process (getrusage), sink included and, with -broker in-process, the broker",
	"rss":        "MB of the Orderly process; base: with -dispatcher process the child at start-up, right after its partitions are assigned and a GC (it is already consuming the backlog), with -dispatcher in-process before the dispatcher started, after a GC (with -broker in-process the backlog is in this heap); steady: median of 100ms samples of /proc/PID/statm during the backlog; peak: their largest; after: after the run (and -settle); freed: then after runtime.GC + debug.FreeOSMemory; maxrss: the process's peak (VmHWM of the child; getrusage in-process, the harness included)",
	"allocs/msg": "runtime.MemStats.Mallocs delta of the Orderly process / messages delivered over the backlog; own: Orderly's own code (go-retryablehttp and the Kafka client's Go side included), net/http excluded: with -dispatcher process allocs/msg - the net/http client's per request x requests, the client's per request being the bench process's during the ceiling run (client + sink side) - the bench process's during Orderly's run (sink side and harness only; with -broker in-process the broker too); with -dispatcher in-process allocs/msg - the ceiling run's per message (net/http client and server, the sink; the broker with -broker in-process is counted as own)",
}

func printBenchTable(w io.Writer, results []*benchResult) {
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tmessages\tmsg/s\tceiling (goroutines)\tratio\tdispatch p50\tp99\tlive p50\tp99\tcpu s/10k\trss MB base\tsteady\tpeak\tafter\tfreed\tallocs/msg\town\t")
	for _, r := range results {
		ratio := "-"
		switch {
		case r.Ratio > 0:
			ratio = fmt.Sprintf("%.2f", r.Ratio)
		case r.OtherKeys != nil && r.OtherKeys.Ratio > 0:
			ratio = fmt.Sprintf("%.2f*", r.OtherKeys.Ratio)
		}
		ceiling, own, live50, live99 := "-", "-", "-", "-"
		if r.Ceiling > 0 {
			ceiling = fmt.Sprintf("%.0f (%d)", r.Ceiling, r.CeilingConcurrency)
			own = fmt.Sprintf("%.1f", r.OwnAllocsPerMsg)
		}
		if r.LiveMessages > 0 {
			live50, live99 = fmt.Sprintf("%.1fms", r.LiveP50MS), fmt.Sprintf("%.1fms", r.LiveP99MS)
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%s\t%s\t%.0fms\t%.0fms\t%s\t%s\t%.2f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%.1f\t%s\t\n",
			r.Name, r.Messages, r.Throughput, ceiling, ratio, r.DispatchP50MS, r.DispatchP99MS, live50, live99,
			r.CPUPer10k, r.RSSBaselineMB, r.RSSSteadyMB, r.RSSPeakMB, r.RSSAfterMB, r.RSSAfterFreeMB, r.AllocsPerMsg, own)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, k := range []string{"msg/s", "ceiling", "dispatch", "live e2e", "cpu s/10k", "rss", "allocs/msg"} {
		fmt.Fprintf(w, "  %-10s %s\n", k, benchDefinitions[k])
	}
	for _, r := range results {
		if r.OtherKeys != nil {
			fmt.Fprintf(w, "  %-10s %s: the other keys' msg/s with the hot key / without it (run %s-nohot), each divided by its run's ceiling so that drift between the runs cancels\n", "ratio*", r.Name, r.Name)
		}
	}
}

// printBenchMedians summarises repeated runs (named NAME#k): the median of
// each figure over the repetitions.
func printBenchMedians(w io.Writer, results []*benchResult) {
	groups := map[string][]*benchResult{}
	var order []string
	for _, r := range results {
		name, _, _ := strings.Cut(r.Name, "#")
		if strings.HasSuffix(r.Name, "-nohot") {
			name += "-nohot"
		}
		if groups[name] == nil {
			order = append(order, name)
		}
		groups[name] = append(groups[name], r)
	}
	med := func(rs []*benchResult, f func(*benchResult) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		if len(v)%2 == 1 {
			return v[len(v)/2]
		}
		return (v[len(v)/2-1] + v[len(v)/2]) / 2
	}
	fmt.Fprintln(w, "\nmedians over the repetitions")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\truns\tmsg/s\tceiling (goroutines)\tratio\tratio min\tmax\tlive p50\tp99\tcpu s/10k\trss steady\tpeak\tallocs/msg\town\t")
	for _, name := range order {
		rs := groups[name]
		ratio := func(r *benchResult) float64 {
			if r.OtherKeys != nil {
				return r.OtherKeys.Ratio
			}
			return r.Ratio
		}
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, r := range rs {
			lo, hi = min(lo, ratio(r)), max(hi, ratio(r))
		}
		live50, live99 := "-", "-"
		if rs[0].LiveMessages > 0 {
			live50 = fmt.Sprintf("%.1fms", med(rs, func(r *benchResult) float64 { return r.LiveP50MS }))
			live99 = fmt.Sprintf("%.1fms", med(rs, func(r *benchResult) float64 { return r.LiveP99MS }))
		}
		fmt.Fprintf(tw, "%s\t%d\t%.0f\t%.0f (%.0f)\t%.2f\t%.2f\t%.2f\t%s\t%s\t%.2f\t%.0f\t%.0f\t%.1f\t%.1f\t\n", name, len(rs),
			med(rs, func(r *benchResult) float64 { return r.Throughput }),
			med(rs, func(r *benchResult) float64 { return r.Ceiling }),
			med(rs, func(r *benchResult) float64 { return float64(r.CeilingConcurrency) }),
			med(rs, ratio), lo, hi, live50, live99,
			med(rs, func(r *benchResult) float64 { return r.CPUPer10k }),
			med(rs, func(r *benchResult) float64 { return r.RSSSteadyMB }),
			med(rs, func(r *benchResult) float64 { return r.RSSPeakMB }),
			med(rs, func(r *benchResult) float64 { return r.AllocsPerMsg }),
			med(rs, func(r *benchResult) float64 { return r.OwnAllocsPerMsg }))
	}
	tw.Flush()
}
