package main

// The ceiling: a plain net/http client sending the run's requests to the sink,
// from a -serve-ceiling child when Orderly runs in one: both cross a process boundary.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// plainJob is what the plain client sends: Messages messages, cycling over
// Pool, each as Requests requests in order, from Goroutines goroutines.
type plainJob struct {
	Pool       []plainMsg `json:"pool"`
	Messages   int        `json:"messages"`
	Requests   int        `json:"requests"`
	Goroutines int        `json:"goroutines"`
	MaxConns   int        `json:"max_conns"`
	Partitions int        `json:"partitions"`
}

type plainMsg struct {
	URL  string `json:"url"`
	Body []byte `json:"body"`
}

// plainCost is what a ceiling run cost its client's process.
type plainCost struct {
	CPU     time.Duration `json:"cpu_ns"`
	Mallocs uint64        `json:"mallocs"`
}

// ceiling drives the plain client at conc goroutines against a fresh
// recorder on sink, for the run's number of messages, and sets the ceiling
// figures of res.
func (b *bencher) ceiling(ctx context.Context, r benchRun, sink *sinkServer, res *benchResult, conc int) error {
	f := r.f
	m := r.messages()
	// Bodies like the messages' (the sink parses them), cycled.
	gen := r.generator()
	job := plainJob{Pool: make([]plainMsg, min(m, 10000)), Messages: m, Requests: f.requests,
		Goroutines: conc, MaxConns: f.maxConns, Partitions: f.partitions}
	for i := range job.Pool {
		k, v := gen.Next()
		job.Pool[i] = plainMsg{URL: "http://" + sink.addr() + "/people/" + k, Body: v}
	}
	rec := newRecorder(m*f.requests, f.latency, f.failureRate, "")
	sink.cur.Store(rec)

	where := "own process"
	run := b.ceilingChild
	if f.dispatcher == "in-process" {
		where, run = "this process", ceilingHere
	}
	el, cost, err := run(ctx, job)
	if err != nil {
		return err
	}
	res.CeilingConcurrency = conc
	res.Ceiling = float64(m) / el.Seconds()
	res.CeilingCPUPer10k = per10k(cost.CPU, float64(m))
	res.CeilingAllocsPerMsg = float64(cost.Mallocs) / float64(m)
	res.CeilingAllocsPerReq = res.CeilingAllocsPerMsg / float64(f.requests)
	res.CeilingSinkMaxInFlow = rec.sink.MaxInFlight()
	b.printf("   ceiling   plain net/http (%s), %d goroutines: %d messages (%d requests) in %.2fs = %.0f msg/s; cpu %.2f s/10k; %.1f allocs/msg; sink concurrency max %d\n",
		where, conc, m, m*f.requests, el.Seconds(), res.Ceiling, res.CeilingCPUPer10k, res.CeilingAllocsPerMsg, res.CeilingSinkMaxInFlow)
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

// ceilingHere sends job from this process, the sink's: the time it took and
// what it cost this process (client and sink side).
func ceilingHere(ctx context.Context, job plainJob) (time.Duration, plainCost, error) {
	c := newPlainClient(job)
	defer c.close()
	settleMemory()
	return c.timedSend(ctx)
}

// ceilingChild sends job from a child process (-serve-ceiling): the time
// from the go to the child's report, and what it cost the child and this
// process (the sink side) together.
func (b *bencher) ceilingChild(ctx context.Context, job plainJob) (time.Duration, plainCost, error) {
	fail := func(err error) (time.Duration, plainCost, error) {
		return 0, plainCost{}, fmt.Errorf("the plain client's process: %w", err)
	}
	file, err := writeTemp("orderly-bench-ceiling-*.json", func(w io.Writer) error { return json.NewEncoder(w).Encode(job) })
	if err != nil {
		return fail(err)
	}
	c := newChild("plain client", b.stderr, "-serve-ceiling", file)
	c.file = file
	defer c.shutdown()
	if err := c.start(ctx); err != nil {
		return 0, plainCost{}, err
	}
	// The answer comes when the job is sent: allow it the run's time.
	within := childCallTimeout
	if d, ok := ctx.Deadline(); ok {
		within = time.Until(d)
	}
	settleMemory()
	s0 := snap()
	l, err := c.call("go", within)
	s1 := snap()
	if err != nil {
		return 0, plainCost{}, err
	}
	var cost plainCost
	if err := json.Unmarshal([]byte(l), &cost); err != nil {
		return fail(fmt.Errorf("reading its report %q: %w", l, err))
	}
	cost.CPU += s1.cpu - s0.cpu
	cost.Mallocs += s1.mallocs - s0.mallocs
	return s1.at.Sub(s0.at), cost, nil
}

// serveCeiling is `orderly-bench -serve-ceiling FILE`: it reads the job in
// FILE, says ready, sends the job once a line comes on stdin and answers
// with its cost as a JSON line (or `error: ...`), then exits at EOF.
func serveCeiling(path string, stdin io.Reader, stdout, stderr io.Writer) int {
	fail := failer("serve-ceiling", stderr)
	b, err := os.ReadFile(path)
	if err != nil {
		return fail(err)
	}
	var job plainJob
	if err := json.Unmarshal(b, &job); err != nil {
		return fail(fmt.Errorf("%s: %w", path, err))
	}
	c := newPlainClient(job)
	defer c.close()
	settleMemory()
	fmt.Fprintln(stdout, "ready")
	in := bufio.NewReader(stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return fail(errors.New("no go on stdin"))
	}
	_, cost, err := c.timedSend(context.Background())
	if err != nil {
		fmt.Fprintln(stdout, "error: "+strings.ReplaceAll(err.Error(), "\n", "; "))
	} else {
		line, _ := json.Marshal(cost)
		fmt.Fprintln(stdout, string(line))
	}
	_, _ = io.Copy(io.Discard, in) // until the parent closes stdin
	return 0
}

// plainClient is the ceiling's client: net/http with the transport tuning of
// Orderly's sender.
type plainClient struct {
	job    plainJob
	tr     *http.Transport
	client *http.Client
}

func newPlainClient(job plainJob) *plainClient {
	idle := job.MaxConns
	if idle <= 0 {
		idle = 1024 // as httpclient does when max_conns_per_host is unlimited
	}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		Protocols:           &protocols,
		MaxIdleConnsPerHost: idle,
		MaxConnsPerHost:     job.MaxConns,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &plainClient{job: job, tr: tr, client: &http.Client{Transport: tr}}
}

func (c *plainClient) close() { c.tr.CloseIdleConnections() }

// timedSend sends the job and returns the time it took and what it cost
// this process.
func (c *plainClient) timedSend(ctx context.Context) (time.Duration, plainCost, error) {
	s0 := snap()
	err := c.send(ctx)
	s1 := snap()
	return s1.at.Sub(s0.at), plainCost{CPU: s1.cpu - s0.cpu, Mallocs: s1.mallocs - s0.mallocs}, err
}

// send sends the job: each goroutine takes the next message and sends its
// requests in order, each until the sink answers 2xx.
func (c *plainClient) send(ctx context.Context) error {
	job := c.job
	var next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	for g := 0; g < job.Goroutines; g++ {
		wg.Go(func() {
			h := http.Header{
				"Content-Type":    {"application/json"},
				"Idempotency-Key": {fmt.Sprintf("%s-%d-%d-0", benchTopic, g%max(1, job.Partitions), g)},
				"User-Agent":      {"orderly-bench-ceiling"},
			}
			for {
				i := next.Add(1) - 1
				if i >= int64(job.Messages) || ctx.Err() != nil {
					return
				}
				mg := job.Pool[i%int64(len(job.Pool))]
				for range job.Requests {
					if err := sendUntilOK(ctx, c.client, mg.URL, mg.Body, h); err != nil {
						errOnce.Do(func() { firstErr = err })
						return
					}
				}
			}
		})
	}
	wg.Wait()
	return firstErr
}

// sendUntilOK posts body to url until the sink answers 2xx, retrying its
// 503s at once; any other answer is an error.
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
