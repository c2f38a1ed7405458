package main

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// scenario is one of the README's performance scenarios: presets for the
// flags, the target it checks and the run that measures it.
//
// To add a scenario, append it to scenarios: -scenario, its help and -scenario
// all pick it up. A scenario that is not Orderly against a plain net/http
// client on a local sink sets run to a function of its own (see httpRun for
// what one does: start what it needs, measure, fill a benchResult, print it).
type scenario struct {
	num, name string
	target    string // printed before the run and kept in the results
	// apply sets the scenario's flags; the flags given on the command line
	// then override them.
	apply func(f *benchFlags)
	// run measures one run; nil means httpRun.
	run func(b *bencher, r benchRun) (*benchResult, error)
	// first puts the scenario before the others with -scenario all, while
	// the harness process is still fresh.
	first bool
}

// scenarios are listed, and run with -scenario all, in this order (those
// marked first before the others).
var scenarios = []scenario{
	{num: "1", name: "throughput", target: "throughput >= 0.7 of the raw-HTTP ceiling", apply: func(f *benchFlags) {
		f.messages, f.keys, f.partitions, f.size, f.latency = 100000, 10000, 8, 200, 0
	}},
	{num: "2", name: "latency", target: "throughput >= 0.8 of min(keys, in-flight limit)/latency, or 0.7 of the ceiling where the CPU binds first", apply: func(f *benchFlags) {
		// max_conns_per_host 0 (unlimited): the default 256 connections
		// would cap 2,000 keys at 256/latency before anything else does.
		f.messages, f.keys, f.partitions, f.size, f.latency, f.maxConns = 40000, 2000, 8, 200, 20*time.Millisecond, 0
	}},
	{num: "3", name: "hotkey", target: "the other keys' throughput within 10% of the same run without the hot key", apply: func(f *benchFlags) {
		// Default max_in_flight and max_key_in_flight: the hot key holds at
		// most a tenth of its partition's budget and lets the rest of its
		// messages go, to read them again later. 64,000 messages give the
		// other keys' runs a few seconds, so that start-up does not weigh
		// on the comparison.
		f.messages, f.keys, f.partitions, f.size, f.latency, f.hotKey = 64000, 1000, 8, 200, 5*time.Millisecond, 0.5
	}},
	{num: "4", name: "memory", target: "steady-state RSS <= 150 MB with 8 partitions x max_in_flight 10,000 of 1 KB, back near the baseline after the burst", first: true, apply: func(f *benchFlags) {
		// 1.5 times what the partitions may hold, so that every partition
		// fills up, pauses and resumes; the settle time outlasts the
		// default lane_idle (10s), after which idle lanes are retired.
		f.messages, f.keys, f.partitions, f.size, f.latency, f.maxInFlight = 120000, 10000, 8, 1024, 0, 10000
		f.settle = 12 * time.Second
	}},
	{num: "5", name: "allocs", target: "at most 30 allocations per delivered message beyond what a plain net/http client allocates for its request", apply: func(f *benchFlags) {
		f.messages, f.keys, f.partitions, f.size, f.latency = 50000, 1000, 8, 200, 0
	}},
	{num: "6", name: "transform", target: "the transform route (Kafka to Kafka) >= 0.8 of a plain consume, md5, produce loop's rate, keeping order per key, commit behind the acknowledged produce and the DLQ",
		run: (*bencher).transformRun,
		apply: func(f *benchFlags) {
			// The 200 keys on 8 partitions; 100,000 name events
			// rather than its 20,000, which the plain loop writes in a
			// quarter of a second here: too short to time.
			f.messages, f.keys, f.partitions, f.size = 100000, 200, 8, 200
		}},
	{num: "7", name: "manykeys", target: "every message under a key of its own: >= 0.8 of scenario 5's 1,000-key rate, RSS peak <= 150 MB (idle lanes retired, dispatch.max_lanes bounds them)", apply: func(f *benchFlags) {
		// A million keys, each seen once: a lane is created and retired per
		// message, and most of the held messages wait for a sender.
		f.messages, f.keys, f.partitions, f.size, f.latency = 1000000, 1000000, 8, 200, 0
	}},
}

// benchFlags are the command line's settings of a run.
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
	instances   int
	ceiling     bool
	timeout     time.Duration
	json        bool
	repeat      int
	cpuProfile  string
	memProfile  string
	heapProfile string
	verbose     bool
}

// bindFlags defines the command line's flags on fs, stored in f. The
// helper processes' flags are not among them (see run).
func bindFlags(fs *flag.FlagSet, f *benchFlags) {
	var presets []string
	for _, sc := range scenarios {
		presets = append(presets, sc.num+"|"+sc.name)
	}
	fs.StringVar(&f.scenario, "scenario", "", "preset: "+strings.Join(presets, ", ")+", or all (explicit flags override a preset)")
	fs.IntVar(&f.messages, "messages", 50000, "messages pre-produced before the dispatcher starts")
	fs.IntVar(&f.keys, "keys", 1000, "distinct keys")
	fs.IntVar(&f.partitions, "partitions", 8, "partitions of the topic")
	fs.IntVar(&f.size, "size", 200, "message size in bytes (JSON event, padded)")
	fs.DurationVar(&f.latency, "latency", 0, "time the sink takes per request")
	fs.IntVar(&f.requests, "requests", 1, "HTTP requests per message (the route gets this many [[routes.requests]])")
	fs.Float64Var(&f.failureRate, "failure-rate", 0, "share of requests the sink answers 503 (retried)")
	fs.Float64Var(&f.hotKey, "hot-key", 0, "share of the messages on one hot key (key-0); a comparison run without it follows")
	fs.IntVar(&f.maxInFlight, "max-in-flight", 2000, "dispatch.max_in_flight")
	fs.IntVar(&f.maxConns, "max-conns", 256, "http.max_conns_per_host (0 = unlimited), for Orderly and the ceiling client alike")
	fs.DurationVar(&f.live, "live", time.Second, "after the backlog, produce live messages for this long to measure produce-to-request latency (0 = skip)")
	fs.Float64Var(&f.liveRate, "live-rate", 0, "live messages per second (0 = a quarter of the measured throughput: moderate load)")
	fs.DurationVar(&f.settle, "settle", 0, "after the run, wait this long before measuring the RSS after the burst")
	fs.StringVar(&f.broker, "broker", "auto", "where the embedded broker runs: process (a child process, so that its CPU, memory and allocations are not counted), in-process, or auto (process unless running inside a Go test binary)")
	fs.StringVar(&f.dispatcher, "dispatcher", "auto", "where the Orderly service runs: process (a child process, so that its CPU, memory and allocations are those of Orderly alone, as deployed), in-process (with the sink and the harness), or auto (process unless running inside a Go test binary); the transform scenario's plain loop runs there too")
	fs.IntVar(&f.instances, "instances", 1, "Orderly processes in one consumer group (with -dispatcher process): the scale-out figures")
	fs.BoolVar(&f.ceiling, "ceiling", true, "also drive the plain net/http client (the ceiling), or in the transform scenario the plain loop")
	fs.DurationVar(&f.timeout, "timeout", 5*time.Minute, "give up on a run after this long (an error)")
	fs.IntVar(&f.repeat, "repeat", 1, "do each run this many times (ceiling and Orderly side by side each time) and summarise the medians: shared machines drift")
	fs.BoolVar(&f.json, "json", false, "print the results as JSON on stdout (progress goes to stderr)")
	fs.StringVar(&f.cpuProfile, "cpuprofile", "", "write a CPU profile of Orderly's backlog phase to this file (suffixed with the run name when there are several runs)")
	fs.StringVar(&f.memProfile, "memprofile", "", "write allocation profiles before (FILE.base) and after (FILE) Orderly's backlog phase")
	fs.StringVar(&f.heapProfile, "heapprofile", "", "write a heap (in-use) profile when half of the backlog has been delivered (FILE) and after the run (FILE.after), each after a GC")
	fs.BoolVar(&f.verbose, "v", false, "log the service's warnings to stderr")
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

// validate reports the first setting of f that a run cannot do.
func (f benchFlags) validate() error {
	switch {
	case f.messages < 1 || f.keys < 1 || f.partitions < 1 || f.requests < 1 || f.maxInFlight < 1:
		return errors.New("-messages, -keys, -partitions, -requests and -max-in-flight must be at least 1")
	case f.size < 0 || f.maxConns < 0 || f.latency < 0 || f.live < 0 || f.liveRate < 0 || f.settle < 0:
		return errors.New("-size, -max-conns, -latency, -live, -live-rate and -settle must not be negative")
	case f.instances < 1:
		return errors.New("-instances must be at least 1")
	case f.instances > 1 && f.dispatcher == "in-process":
		return errors.New("-instances above 1 needs -dispatcher process: each instance is a process of its own")
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
	target string // the scenario's target, for the output
	f      benchFlags
	run    func(b *bencher, r benchRun) (*benchResult, error) // the scenario's, or httpRun
	// baselineOf, for a hot-key comparison run: produce only the other
	// keys' messages of a run with this hot-key share (no hot key at all).
	baselineOf float64
	hotCompare *benchRun // the comparison run to do after this one
	rep        int       // the repetition (0, 1, ... with -repeat)
}

// benchRuns returns the runs of f.scenario, or the one custom run of f
// when there is none: each scenario's presets, then the flags given on the
// command line (set) over them.
func benchRuns(f benchFlags, set []*flag.Flag) ([]benchRun, error) {
	var picked []scenario
	switch s := strings.ToLower(f.scenario); s {
	case "", "custom":
	case "all":
		for _, first := range []bool{true, false} {
			for _, sc := range scenarios {
				if sc.first == first {
					picked = append(picked, sc)
				}
			}
		}
	default:
		for _, sc := range scenarios {
			if s == sc.num || s == sc.name {
				picked = append(picked, sc)
			}
		}
		if len(picked) == 0 {
			names := make([]string, len(scenarios))
			for i, sc := range scenarios {
				names[i] = sc.name
			}
			return nil, fmt.Errorf("-scenario %q: want 1..%d, %s or all", f.scenario, len(scenarios), strings.Join(names, ", "))
		}
	}
	var runs []benchRun
	add := func(name, target string, g benchFlags, run func(*bencher, benchRun) (*benchResult, error)) {
		if run == nil {
			run = (*bencher).httpRun
		}
		r := benchRun{name: name, target: target, f: g, run: run}
		if g.hotKey > 0 {
			c := benchRun{name: name + "-nohot", target: "comparison run: the same other-key messages, no hot key", f: g, run: run, baselineOf: g.hotKey}
			c.f.hotKey = 0
			r.hotCompare = &c
		}
		runs = append(runs, r)
	}
	if len(picked) == 0 {
		add("custom", "", f, nil)
		return runs, nil
	}
	for _, sc := range picked {
		g, err := sc.flags(f, set)
		if err != nil {
			return nil, err
		}
		add(sc.num+"-"+sc.name, sc.target, g, sc.run)
	}
	return runs, nil
}

// flags returns f with the scenario's presets applied, then the flags of
// set (those given on the command line) set again over them.
func (sc scenario) flags(f benchFlags, set []*flag.Flag) (benchFlags, error) {
	var g benchFlags
	fs := flag.NewFlagSet("", flag.ContinueOnError)
	bindFlags(fs, &g) // fs now writes to g
	g = f
	sc.apply(&g)
	for _, fl := range set {
		if fs.Lookup(fl.Name) == nil {
			continue
		}
		if err := fs.Set(fl.Name, fl.Value.String()); err != nil {
			return g, fmt.Errorf("scenario %s: -%s: %w", sc.name, fl.Name, err)
		}
	}
	return g, nil
}

// hotCount is how many of n messages go to the hot key with share h: message
// i is hot when floor((i+1)h) > floor(ih), which spreads them evenly.
func hotCount(n int, h float64) int { return int(math.Floor(float64(n) * h)) }

// isHot reports whether message i goes to the hot key with share h.
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
