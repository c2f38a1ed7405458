package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

// The benchmark harness keeps working: tiny runs through run(), checking the
// exit status and the output's shape, never a number's size.

func TestBenchSmoke(t *testing.T) {
	var out, errb bytes.Buffer
	code := run([]string{"bench", "-messages", "2000", "-keys", "100", "-live", "200ms"}, &out, &errb)
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
		"cpu s/10k", "rss MB base", "steady", "peak", "after", "allocs/msg", "own"} {
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
	code := run([]string{"bench", "-json", "-messages", "600", "-keys", "20", "-requests", "2",
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
		{"bench", "-scenario", "nope"},
		{"bench", "-failure-rate", "1"},
		{"bench", "-hot-key", "0.5", "-keys", "1"},
		{"bench", "-broker", "elsewhere"},
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
}
