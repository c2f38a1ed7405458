// Command orderly-bench is the benchmark harness of the README's Performance
// section (see description). The broker, Orderly and the ceiling client run in
// child processes of this executable by default; the scenarios are in scenarios.go.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// benchTopic is the topic every bench run produces to and consumes from.
const benchTopic = "orders"

const synopsis = "[-scenario NAME|all] [flags]"

const description = `
Measure Orderly against a plain net/http client (the ceiling) on a local HTTP sink: messages are
pre-produced to an embedded broker, then both send them, and the throughput, latency, memory and
allocations of each are printed side by side. A -scenario sets the flags of one of the README's
performance scenarios (flags given explicitly override it) and checks its target. By default the
broker and Orderly each run in a child process, so that what is measured is Orderly's alone. The
transform scenario compares Orderly's Kafka-to-Kafka transform with a plain consume, md5, produce
loop instead.`

// hiddenFlags are the helper processes' flags, left out of the help.
var hiddenFlags = []string{"serve-broker", "serve-dispatcher", "config", "serve-plainloop", "brokers", "serve-ceiling"}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes a command line and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("orderly-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {}
	var f benchFlags
	bindFlags(fs, &f)
	serveBrokerFlag := fs.Bool("serve-broker", false, "internal: serve only the embedded broker until stdin closes")
	serveDispatcherFlag := fs.Bool("serve-dispatcher", false, "internal: run only the Orderly service of -config, answering the bench's commands on stdin, until stdin closes")
	config := fs.String("config", "", "internal: the configuration file of -serve-dispatcher")
	servePlainFlag := fs.Bool("serve-plainloop", false, "internal: run only the transform scenario's plain loop, answering the bench's commands on stdin, until stdin closes")
	brokers := fs.String("brokers", "", "internal: the brokers of -serve-plainloop")
	serveCeilingFile := fs.String("serve-ceiling", "", "internal: send the plain client's job in this file once a line comes on stdin, then report its cost")
	switch err := fs.Parse(args); {
	case errors.Is(err, flag.ErrHelp):
		printHelp(fs, stdout)
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "Usage: orderly-bench %s\nRun 'orderly-bench --help' for more.\n", synopsis)
		return 2
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "orderly-bench: unexpected argument %q\nUsage: orderly-bench %s\n", fs.Arg(0), synopsis)
		return 2
	}
	if f.repeat < 1 {
		fmt.Fprintln(stderr, "orderly-bench: -repeat must be at least 1")
		return 2
	}
	if *serveBrokerFlag {
		return serveBroker(f.partitions, stdout, stderr)
	}
	if *serveDispatcherFlag {
		return serveDispatcher(*config, f.verbose, os.Stdin, stdout, stderr)
	}
	if *servePlainFlag {
		return servePlainLoop(*brokers, os.Stdin, stdout, stderr)
	}
	if *serveCeilingFile != "" {
		return serveCeiling(*serveCeilingFile, os.Stdin, stdout, stderr)
	}
	var set []*flag.Flag
	fs.Visit(func(fl *flag.Flag) { set = append(set, fl) })
	runs, err := benchRuns(f, set)
	if err != nil {
		fmt.Fprintln(stderr, "orderly-bench:", err)
		return 2
	}
	for _, r := range runs {
		if err := r.f.validate(); err != nil {
			fmt.Fprintf(stderr, "orderly-bench: %s: %v\n", r.name, err)
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
			fmt.Fprintf(stderr, "orderly-bench: -%s %q: want process, in-process or auto\n", w.flag, *w.value)
			return 2
		}
	}

	progress := stdout
	if f.json {
		progress = stderr
	}
	b := &bencher{out: progress, stderr: stderr, multi: len(runs) > 1 || f.repeat > 1}
	results, err := b.runAll(repeatRuns(runs, f))
	if err != nil {
		fmt.Fprintln(stderr, "orderly-bench:", err)
		return 1
	}
	if f.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(map[string]any{"definitions": benchDefinitions, "runs": results}); err != nil {
			fmt.Fprintln(stderr, "orderly-bench:", err)
			return 1
		}
		return 0
	}
	var httpResults, transform []*benchResult
	for _, r := range results {
		if r.Transform != nil {
			transform = append(transform, r)
		} else {
			httpResults = append(httpResults, r)
		}
	}
	printBenchTable(stdout, httpResults)
	printTransformTable(stdout, transform)
	if f.repeat > 1 {
		printBenchMedians(stdout, httpResults)
		printTransformMedians(stdout, transform)
	}
	return 0
}

// repeatRuns returns each run f.repeat times, named NAME#k when repeated,
// each with where the broker and Orderly run.
func repeatRuns(runs []benchRun, f benchFlags) []benchRun {
	var repeated []benchRun
	for _, r := range runs {
		for i := range f.repeat {
			if f.repeat > 1 {
				r.name = fmt.Sprintf("%s#%d", strings.Split(r.name, "#")[0], i+1)
			}
			r.f.broker, r.f.dispatcher, r.rep = f.broker, f.dispatcher, i
			if r.hotCompare != nil {
				c := *r.hotCompare
				c.f.broker, c.f.dispatcher = f.broker, f.dispatcher
				if f.repeat > 1 {
					c.name = r.name + "-nohot"
				}
				r.hotCompare = &c
			}
			repeated = append(repeated, r)
		}
	}
	return repeated
}

// runAll measures the runs in turn, each followed by its hot-key comparison
// run if it has one, and returns their results; it stops at the first error.
func (b *bencher) runAll(runs []benchRun) ([]*benchResult, error) {
	var results []*benchResult
	for _, r := range runs {
		res, err := r.run(b, r)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", r.name, err)
		}
		results = append(results, res)
		if h := r.hotCompare; h != nil {
			base, err := h.run(b, *h)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", h.name, err)
			}
			res.attachHotBaseline(base)
			results = append(results, base)
			b.printHot(res)
		}
	}
	return results, nil
}

// printHelp prints the synopsis, the description and the flags but the
// hidden ones to w, each flag with its default as the flag package shows it.
func printHelp(fs *flag.FlagSet, w io.Writer) {
	fmt.Fprintf(w, "Usage: orderly-bench %s\n\n%s\n\nFlags:\n", synopsis, strings.TrimSpace(description))
	visible := flag.NewFlagSet(fs.Name(), flag.ContinueOnError)
	visible.SetOutput(w)
	fs.VisitAll(func(f *flag.Flag) {
		if slices.Contains(hiddenFlags, f.Name) {
			return
		}
		visible.Var(f.Value, f.Name, f.Usage)
		// The default, not what a flag before -h may have set.
		visible.Lookup(f.Name).DefValue = f.DefValue
	})
	visible.PrintDefaults()
}
