package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/testkit"
)

// The benchmark harness keeps working: tiny runs through run(), checking the
// exit status and the output's shape, never a number's size.

// binary is orderly-bench built by TestMain, for the tests that need the
// harness to start itself again as a child process.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "orderly-bench-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "orderly-bench")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building orderly-bench: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// TestHelp: --help and -h print the synopsis, the description and the
// flags to stdout and exit 0; the helper processes' flags are left out.
func TestHelp(t *testing.T) {
	for _, h := range []string{"--help", "-h"} {
		var out, errb bytes.Buffer
		if code := run([]string{h}, &out, &errb); code != 0 || errb.Len() > 0 {
			t.Errorf("%s: exit %d, stderr %q; want 0 and nothing", h, code, errb.String())
		}
		for _, w := range []string{"Usage: orderly-bench [-scenario NAME|all]", "ceiling", "-scenario", "1|throughput", "5|allocs", "-broker", "-repeat"} {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%s: help does not show %q:\n%s", h, w, out.String())
			}
		}
		for _, w := range []string{"serve-broker", "serve-dispatcher", "serve-plainloop", "serve-ceiling", "-brokers", "-config", "internal"} {
			if strings.Contains(out.String(), w) {
				t.Errorf("%s: help shows %q:\n%s", h, w, out.String())
			}
		}
	}
	var out, errb bytes.Buffer
	if code := run([]string{"-nope"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "Usage: orderly-bench") {
		t.Errorf("-nope: exit %d, stderr %q; want 2 and the synopsis", code, errb.String())
	}
}

// TestScenarioFlags: a scenario's presets, with the flags given on the
// command line over them, and -scenario all's order.
func TestScenarioFlags(t *testing.T) {
	fs := flag.NewFlagSet("", flag.ContinueOnError)
	var f benchFlags
	bindFlags(fs, &f)
	if err := fs.Parse([]string{"-scenario", "all", "-messages", "3000", "-latency", "2ms", "-live", "0"}); err != nil {
		t.Fatal(err)
	}
	var set []*flag.Flag
	fs.Visit(func(fl *flag.Flag) { set = append(set, fl) })
	runs, err := benchRuns(f, set)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range runs {
		names = append(names, r.name)
		if r.f.messages != 3000 || r.f.latency != 2*time.Millisecond || r.f.live != 0 {
			t.Errorf("%s: messages %d, latency %s, live %s: want the command line's 3000, 2ms, 0", r.name, r.f.messages, r.f.latency, r.f.live)
		}
	}
	if want := []string{"4-memory", "1-throughput", "2-latency", "3-hotkey", "5-allocs", "6-transform", "7-manykeys"}; !slices.Equal(names, want) {
		t.Errorf("-scenario all runs %v, want %v", names, want)
	}
	// The presets the command line left alone.
	if r := runs[0]; r.f.size != 1024 || r.f.settle != 12*time.Second || r.f.keys != 10000 {
		t.Errorf("4-memory: size %d, settle %s, keys %d: want the preset's 1024, 12s, 10000", r.f.size, r.f.settle, r.f.keys)
	}
	if r := runs[3]; r.f.hotKey != 0.5 || r.hotCompare == nil || r.hotCompare.f.hotKey != 0 || r.hotCompare.baselineOf != 0.5 {
		t.Errorf("3-hotkey: hot key %v, comparison %+v: want 0.5 and a run without it", r.f.hotKey, r.hotCompare)
	}
	if r := runs[2]; r.f.maxConns != 0 {
		t.Errorf("2-latency: max-conns %d, want the preset's 0", r.f.maxConns)
	}
	if r := runs[5]; r.f.keys != 200 || r.f.partitions != 8 || r.run == nil {
		t.Errorf("6-transform: keys %d, partitions %d, run function %v: want the preset's 200, 8 and its own run", r.f.keys, r.f.partitions, r.run != nil)
	}
}

// TestPlainTransformMatchesTemplate: the plain loop's transform renders, byte
// for byte, what Orderly renders with the transform scenario's configuration
// (testkit.HashedValue), names with quotes and accents included.
func TestPlainTransformMatchesTemplate(t *testing.T) {
	cfg, err := config.Parse([]byte(transformConfig(benchFlags{maxInFlight: 100}, "127.0.0.1:9092")), "transform.toml")
	if err != nil {
		t.Fatal(err)
	}
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics)
	if err != nil {
		t.Fatal(err)
	}
	if topics := router.RecordTopics(); !slices.Equal(topics, []string{transformOutput}) {
		t.Fatalf("the configuration writes to %v, want [%s]", topics, transformOutput)
	}
	gen := &testkit.Generator{Keys: 7, Size: 200}
	recs := gen.Records(40)
	recs = append(recs, testkit.Record{Key: []byte("key-q"),
		Value: []byte(`{"key":"key-q","seq":12,"first_name":"Lucía \"Lu\" <&>","last_name":"O'Brien","produced_at":1,"pad":"x"}`)})
	var tf plainTransform
	for _, r := range recs {
		plan, err := router.Plan(&filters.Message{Topic: transformInput, Key: r.Key, Value: r.Value})
		if err != nil {
			t.Fatalf("%s: %v", r.Value, err)
		}
		got, err := tf.hashed(r.Value)
		if err != nil {
			t.Fatalf("%s: %v", r.Value, err)
		}
		if want := plan.Requests[0].Body; !bytes.Equal(got, want) {
			t.Errorf("the plain loop's transform of %s:\n got %s\nwant %s", r.Value, got, want)
		}
	}
	if _, err := tf.hashed([]byte("not json")); err == nil {
		t.Error("a value that is not JSON: no error")
	}
}

// TestBenchTransform runs the transform scenario small, the plain loop and
// Orderly each in a child process (the built binary), and checks both sides'
// figures and checks.
func TestBenchTransform(t *testing.T) {
	if testing.Short() {
		t.Skip("four processes")
	}
	cmd := exec.Command(binary, "-json", "-scenario", "transform", "-messages", "5000", "-keys", "50", "-partitions", "4",
		"-repeat", "2", "-timeout", "2m")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
	}
	var doc struct {
		Definitions map[string]string
		Runs        []benchResult
	}
	if err := json.Unmarshal(out.Bytes(), &doc); err != nil || len(doc.Runs) != 2 {
		t.Fatalf("stdout is not the JSON document of two runs (%v):\n%s", err, out.String())
	}
	if doc.Definitions["transform"] == "" {
		t.Error("no definition of the transform columns")
	}
	var cpu, brokerCPU float64 // read from the children
	for i, r := range doc.Runs {
		tr := r.Transform
		if tr == nil || tr.Plain == nil {
			t.Fatalf("run %s: transform %+v, want both sides", r.Name, tr)
		}
		// The first side alternates, so that a drifting machine favours neither.
		if want := []string{"plain loop", "orderly"}[i]; tr.First != want {
			t.Errorf("run %s measured %s first, want %s", r.Name, tr.First, want)
		}
		for _, s := range []transformSide{tr.Orderly, *tr.Plain} {
			if s.Records < 5000 || s.Missing != 0 || s.Violations != 0 || s.Wrong != 0 {
				t.Errorf("run %s, %s: records %d, missing %d, violations %d, wrong %d", r.Name, s.System, s.Records, s.Missing, s.Violations, s.Wrong)
			}
			if s.Throughput <= 0 || s.MaxRSS <= 0 || s.CPUSeconds < 0 || s.BrokerCPU < 0 {
				t.Errorf("run %s, %s: msg/s %v, maxrss %v, cpu %v, broker cpu %v: want them positive (the CPU in 10ms ticks: not negative)",
					r.Name, s.System, s.Throughput, s.MaxRSS, s.CPUSeconds, s.BrokerCPU)
			}
			cpu += s.CPUSeconds
			brokerCPU += s.BrokerCPU
		}
		if second := []*transformSide{tr.Plain, &tr.Orderly}[1-i]; second.Identical == nil || !*second.Identical {
			t.Errorf("run %s: the two outputs are not reported identical", r.Name)
		}
		if tr.Ratio <= 0 || r.Ratio != tr.Ratio || r.Throughput != tr.Orderly.Throughput {
			t.Errorf("run %s: ratio %v (result %v), msg/s %v (orderly %v)", r.Name, tr.Ratio, r.Ratio, r.Throughput, tr.Orderly.Throughput)
		}
	}
	if cpu <= 0 || brokerCPU <= 0 {
		t.Errorf("cpu %v s, broker cpu %v s over the runs: want them positive", cpu, brokerCPU)
	}

	// In this process (a test binary): the broker, Orderly and the plain loop.
	out.Reset()
	errb.Reset()
	if code := run([]string{"-scenario", "transform", "-messages", "1000", "-keys", "20", "-partitions", "2"}, &out, &errb); code != 0 {
		t.Fatalf("in-process: exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	for _, w := range []string{"orderly and plain loop in-process", "orderly / plain loop = ", "plain loop", "violations  dup  missing"} {
		if !strings.Contains(out.String(), w) {
			t.Errorf("in-process: the output lacks %q:\n%s", w, out.String())
		}
	}
}

func TestBenchSmoke(t *testing.T) {
	var out, errb bytes.Buffer
	code := run([]string{"-messages", "2000", "-keys", "100", "-live", "200ms"}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	var header string
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "run ") && strings.Contains(line, "msg/s") {
			header = line
			break
		}
	}
	if header == "" {
		t.Fatalf("no table header in the output:\n%s", out.String())
	}
	for _, field := range []string{"run", "messages", "msg/s", "ceiling", "ratio", "dispatch p50", "p99", "live p50",
		"cpu s/10k", "rss MB base", "steady", "peak", "after", "allocs/msg", "vs plain"} {
		if !strings.Contains(header, field) {
			t.Errorf("table header %q lacks %q", header, field)
		}
	}
	if !strings.Contains(out.String(), "order: 0 violations") {
		t.Errorf("no clean order check in the output:\n%s", out.String())
	}
}

// TestBenchJSONOptions exercises the scenario options (requests per message,
// failures, a hot key and its comparison run) and the JSON output.
func TestBenchJSONOptions(t *testing.T) {
	if testing.Short() {
		t.Skip("two dispatcher runs")
	}
	var out, errb bytes.Buffer
	code := run([]string{"-json", "-messages", "600", "-keys", "20", "-requests", "2",
		"-failure-rate", "0.1", "-hot-key", "0.3", "-latency", "1ms"}, &out, &errb)
	if code != 0 {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
	var doc struct {
		Definitions map[string]string
		Runs        []struct {
			Name       string  `json:"name"`
			Messages   int     `json:"messages"`
			Requests   int     `json:"requests_per_message"`
			Throughput float64 `json:"msgs_per_s"`
			Violations int     `json:"order_violations"`
			Hot        *struct {
				Others int `json:"other_messages"`
			} `json:"hot_key_result"`
		}
	}
	if err := json.Unmarshal(out.Bytes(), &doc); err != nil {
		t.Fatalf("stdout is not the JSON document: %v\n%s", err, out.String())
	}
	if len(doc.Runs) != 2 || doc.Runs[0].Name != "custom" || doc.Runs[1].Name != "custom-nohot" {
		t.Fatalf("runs %+v, want custom and custom-nohot", doc.Runs)
	}
	if doc.Runs[0].Hot == nil || doc.Runs[0].Hot.Others != 600-180 || doc.Runs[1].Messages != 600-180 {
		t.Fatalf("hot-key accounting: %+v", doc.Runs)
	}
	for _, r := range doc.Runs {
		if r.Requests != 2 || r.Violations != 0 || r.Throughput <= 0 {
			t.Errorf("run %+v", r)
		}
	}
	if len(doc.Definitions) == 0 {
		t.Error("no definitions in the JSON output")
	}
}

func TestBenchFlagErrors(t *testing.T) {
	for _, args := range [][]string{
		{"-scenario", "nope"},
		{"-failure-rate", "1"},
		{"-hot-key", "0.5", "-keys", "1"},
		{"-broker", "elsewhere"},
		{"-dispatcher", "elsewhere"},
	} {
		var out, errb bytes.Buffer
		if code := run(args, &out, &errb); code != 2 {
			t.Errorf("%v: exit %d, want 2 (stderr %q)", args, code, errb.String())
		}
	}
}

func TestBenchHelpers(t *testing.T) {
	for in, want := range map[string]int32{"orders-3-1234-0": 3, "my-topic-12-0-1": 12, "x": -1, "a-b-c-d": -1} {
		if got := partitionOf(in); got != want {
			t.Errorf("partitionOf(%q) = %d, want %d", in, got, want)
		}
	}
	n := 0
	for i := range 1000 {
		if isHot(i, 0.3) {
			n++
		}
	}
	if n != hotCount(1000, 0.3) {
		t.Errorf("%d hot of 1000 at 0.3, hotCount says %d", n, hotCount(1000, 0.3))
	}
	for _, c := range []struct {
		f    benchFlags
		keys int
		want int
	}{
		{benchFlags{partitions: 8, maxInFlight: 10000, maxConns: 256}, 10000, 256},
		{benchFlags{partitions: 8, maxInFlight: 10000, maxConns: 0}, 10000, 10000},
		{benchFlags{partitions: 8, maxInFlight: 10000, maxConns: 0}, 2000, 2000},
		{benchFlags{partitions: 2, maxInFlight: 3, maxConns: 256}, 1000, 6},
	} {
		if got := c.f.sendConcurrency(c.keys); got != c.want {
			t.Errorf("%+v.sendConcurrency(%d) = %d, want %d", c.f, c.keys, got, c.want)
		}
	}
	// This process's /proc figures, the ones read of the children.
	for deadline := time.Now().Add(5 * time.Second); cpuTime() < 50*time.Millisecond && time.Now().Before(deadline); {
	}
	if processCPU(0) <= 0 || processRSS(0) <= 0 || processPeakRSS(0) <= 0 {
		t.Errorf("/proc/self: cpu %s, rss %d, peak rss %d: want them positive", processCPU(0), processRSS(0), processPeakRSS(0))
	}
	if processCPU(-1) != 0 || processRSS(-1) != 0 || processPeakRSS(-1) != 0 {
		t.Error("an unknown process should measure 0")
	}
}

// TestBenchChildCommands drives the child's side of the protocol directly,
// without a service: the commands that do not need one, and the errors.
func TestBenchChildCommands(t *testing.T) {
	dir := t.TempDir()
	l := &localOrderly{}
	for _, c := range []struct{ line, want string }{
		{"gc", "ok"},
		{"bogus", `error: unknown command "bogus"`},
		{"heap", "error: want heap FILE"},
		{"allocs " + filepath.Join(dir, "no", "such", "dir"), "error: allocs profile: "},
		{"cpuprofile stop", "error: no CPU profile is being written"},
		{"cpuprofile", "error: want cpuprofile start FILE or cpuprofile stop"},
		{"cpuprofile start " + filepath.Join(dir, "cpu.pprof"), "ok"},
		{"cpuprofile start " + filepath.Join(dir, "cpu2.pprof"), "error: a CPU profile is already being written"},
		{"cpuprofile stop", "ok"},
		{"heap " + filepath.Join(dir, "heap.pprof"), "ok"},
		{"allocs " + filepath.Join(dir, "allocs.pprof"), "ok"},
	} {
		got, stop := command(l, c.line)
		if stop || !strings.HasPrefix(got, c.want) {
			t.Errorf("%q: answer %q (stop %v), want %q", c.line, got, stop, c.want)
		}
	}
	for _, name := range []string{"cpu.pprof", "heap.pprof", "allocs.pprof"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Size() == 0 {
			t.Errorf("%s: %v, want a profile", name, err)
		}
	}
	if _, stop := command(l, "stop"); !stop {
		t.Error("stop did not stop")
	}
}

// TestBenchDispatcherProcess runs the bench with Orderly in a child process
// (the built binary: a test binary cannot be re-executed as orderly-bench) and
// checks that every figure of the Orderly process came from the child.
func TestBenchDispatcherProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("three processes")
	}
	dir := t.TempDir()
	prof := func(name string) string { return filepath.Join(dir, name) }
	// Two requests per message and failures: the client's share is
	// multiplied, the retries metric comes from the child. A small
	// max_in_flight: the partitions pause.
	cmd := exec.Command(binary, "-json", "-dispatcher", "process", "-broker", "process",
		"-messages", "4000", "-keys", "100", "-requests", "2", "-failure-rate", "0.05", "-max-in-flight", "50",
		"-live", "200ms", "-timeout", "2m",
		"-cpuprofile", prof("cpu.pprof"), "-memprofile", prof("mem.pprof"), "-heapprofile", prof("heap.pprof"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v\nstdout:\n%s\nstderr:\n%s", err, out.String(), errb.String())
	}
	var raw struct {
		Runs []map[string]any `json:"runs"`
	}
	if err := json.Unmarshal(out.Bytes(), &raw); err != nil || len(raw.Runs) != 1 {
		t.Fatalf("stdout is not the JSON document of one run (%v):\n%s", err, out.String())
	}
	r := raw.Runs[0]
	num := func(k string) float64 {
		v, ok := r[k].(float64)
		if !ok {
			t.Errorf("field %s: %v, want a number", k, r[k])
		}
		return v
	}
	if r["dispatcher"] != "process" || r["broker"] != "process" {
		t.Fatalf("dispatcher %v, broker %v: want process, process", r["dispatcher"], r["broker"])
	}
	if num("delivered") != 4000 || num("messages") != 4000 || num("missing") != 0 || num("order_violations") != 0 {
		t.Errorf("delivered %v of %v, missing %v, violations %v", r["delivered"], r["messages"], r["missing"], r["order_violations"])
	}
	for _, k := range []string{"cpu_s_per_10k", "sink_cpu_s_per_10k", "rss_baseline_mb", "rss_steady_mb", "rss_peak_mb",
		"maxrss_mb", "heap_in_use_mb", "stack_in_use_mb", "go_sys_mb", "allocs_per_msg", "ceiling_allocs_per_request",
		"sink_allocs_per_request", "retries", "pauses"} {
		if v := num(k); v <= 0 {
			t.Errorf("%s = %v, want it positive", k, v)
		}
	}
	// The ceiling is the best of Orderly's sending concurrency,
	// min(keys 100, 8 x 50, 256) = 100, and the smaller counts tried.
	if c := num("ceiling_concurrency"); !slices.Contains([]float64{100, 64, 32, 16}, c) {
		t.Errorf("ceiling concurrency %v, want one of 100, 64, 32, 16", c)
	}
	// The plain client ran in a process of its own, as Orderly did: its
	// CPU and allocations came back from the child.
	if !strings.Contains(errb.String(), "plain net/http (own process), 100 goroutines") {
		t.Errorf("the ceiling did not run in a process of its own:\n%s", errb.String())
	}
	if num("ceiling_msgs_per_s") <= 0 || num("ceiling_cpu_s_per_10k") <= 0 || num("client_allocs_per_request") <= 0 {
		t.Errorf("ceiling %v msg/s, cpu %v s/10k, client allocs/request %v: want them positive",
			r["ceiling_msgs_per_s"], r["ceiling_cpu_s_per_10k"], r["client_allocs_per_request"])
	}
	// The kernel's RSS counters are approximate (per-CPU batches of pages),
	// so a sample may exceed VmHWM read later by a little.
	if num("maxrss_mb") < num("rss_peak_mb")-2 {
		t.Errorf("maxrss %v well below the sampled peak %v", num("maxrss_mb"), num("rss_peak_mb"))
	}
	client := num("ceiling_allocs_per_request") - num("sink_allocs_per_request")
	if math.Abs(num("client_allocs_per_request")-client) > 1e-6 {
		t.Errorf("client allocs/request %v, want ceiling - sink = %v", num("client_allocs_per_request"), client)
	}
	if own := num("allocs_per_msg") - 2*client; math.Abs(num("own_allocs_per_msg")-own) > 1e-6 {
		t.Errorf("allocs/msg beyond the plain client %v, want allocs/msg - 2 x client = %v", num("own_allocs_per_msg"), own)
	}
	for _, name := range []string{"cpu.pprof", "mem.pprof.base", "mem.pprof", "heap.pprof", "heap.pprof.after"} {
		if fi, err := os.Stat(prof(name)); err != nil || fi.Size() == 0 {
			t.Errorf("profile %s: %v, want it written by the child", name, err)
		}
	}
}
