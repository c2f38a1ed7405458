package main

// The Orderly side of a bench run (or the transform's plain loop), in this
// process or in a child (-serve-dispatcher, -serve-plainloop), so that its
// figures are its own process's, without the harness's.
//
// The child and the bench process talk over the child's stdin and stdout,
// one line each way:
//
//	child:  ready                  once svc.Ready() (polled every millisecond)
//	stats                          -> one JSON line: orderlyStats
//	gc                             -> runtime.GC + debug.FreeOSMemory, ok
//	cpuprofile start FILE          -> ok | error: ...
//	cpuprofile stop                -> ok | error: ...
//	heap FILE                      -> runtime.GC, then the heap profile; ok | error: ...
//	allocs FILE                    -> the allocs profile; ok | error: ...
//	stop, or EOF on stdin          -> graceful drain, svc.Close, exit 0 (1 if the service failed)
//
// Every other answer is `error: ...`. The child's logs go to its stderr,
// which is the bench process's.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/service"
)

// orderlyStats is what the Orderly process reports about itself: its Go
// runtime's counters and the sums of two of the service's metrics.
type orderlyStats struct {
	Mallocs    uint64  `json:"mallocs"`
	HeapInuse  uint64  `json:"heap_inuse"`
	StackInuse uint64  `json:"stack_inuse"`
	Sys        uint64  `json:"sys"`
	Retries    float64 `json:"retries"` // orderly_http_retries_total
	Pauses     float64 `json:"pauses"`  // orderly_partition_pauses_total
	// Partitions is how many partitions the service owns now (from
	// orderly_rebalances_total: assigned - revoked - lost).
	Partitions float64 `json:"partitions"`
}

// orderlySide is the Orderly service of a run, wherever it runs.
type orderlySide interface {
	// start runs the service and returns once its partitions are
	// assigned, or with an error when it stops first or ctx ends.
	start(ctx context.Context) error
	// exited is closed once the service has stopped, on its own or after
	// shutdown; exitErr then tells why.
	exited() <-chan struct{}
	exitErr() error
	// cpu, rss and peakRSS measure the process the service runs in:
	// user+system CPU so far, the resident set now and its peak so far.
	cpu() time.Duration
	rss() int64
	peakRSS() int64
	stats() (orderlyStats, error)
	// settle runs runtime.GC and debug.FreeOSMemory in that process.
	settle() error
	startCPUProfile(file string) error
	stopCPUProfile() error
	// profile writes the named profile ("heap" after a GC, or "allocs").
	profile(kind, file string) error
	// shutdown stops the service gracefully (drain and commit) and
	// releases everything; it returns the service's error, if any, and
	// may be called more than once.
	shutdown() error
}

// stopTimeout bounds a graceful stop: the drain is bounded by
// dispatch.drain_timeout (2s in the bench configuration).
const stopTimeout = 30 * time.Second

func benchLogger(verbose bool, stderr io.Writer) *slog.Logger {
	level := slog.LevelError
	if verbose {
		level = slog.LevelWarn
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
}

// --- in this process ----------------------------------------------------------

// procTools are the measurements and profiles of this process that a
// served side (localOrderly, localPlain) answers the protocol's commands
// with. Not safe for concurrent use: the protocol sends one command at a
// time.
type procTools struct {
	stopCPU func()
	// statsMallocs counts the allocations of stats's own gathers (the
	// service's metrics), left out of the Mallocs it reports.
	statsMallocs uint64
}

// readStats reads the runtime's counters, then calls gather (which may be
// nil) for the figures that allocate, and leaves gather's allocations out
// of the Mallocs of later calls, so that measuring does not count as the
// side's allocations.
func (p *procTools) readStats(gather func(*orderlyStats)) orderlyStats {
	var m, after runtime.MemStats
	runtime.ReadMemStats(&m)
	st := orderlyStats{Mallocs: m.Mallocs - p.statsMallocs, HeapInuse: m.HeapInuse, StackInuse: m.StackInuse, Sys: m.Sys}
	if gather != nil {
		gather(&st)
	}
	runtime.ReadMemStats(&after)
	p.statsMallocs += after.Mallocs - m.Mallocs
	return st
}

func (p *procTools) cpu() time.Duration { return cpuTime() }
func (p *procTools) rss() int64         { return processRSS(0) }
func (p *procTools) peakRSS() int64     { return maxRSS() }

func (p *procTools) settle() error {
	settleMemory()
	return nil
}

func (p *procTools) startCPUProfile(file string) error {
	if p.stopCPU != nil {
		return errors.New("a CPU profile is already being written")
	}
	stop, err := startCPUProfile(file)
	if err != nil {
		return fmt.Errorf("CPU profile: %w", err)
	}
	p.stopCPU = stop
	return nil
}

func (p *procTools) stopCPUProfile() error {
	if p.stopCPU == nil {
		return errors.New("no CPU profile is being written")
	}
	p.stopCPU()
	p.stopCPU = nil
	return nil
}

func (p *procTools) profile(kind, file string) error {
	switch kind {
	case "heap":
		runtime.GC()
	case "allocs":
	default:
		return fmt.Errorf("unknown profile %q", kind)
	}
	if err := writeProfile(kind, file); err != nil {
		return fmt.Errorf("%s profile: %w", kind, err)
	}
	return nil
}

// ending is how a side ends, in this process or in a child: done is closed
// once its loop returned or its process exited, endErr then says why; the
// side's shutdown runs once.
type ending struct {
	done    chan struct{}
	endErr  error
	once    sync.Once
	shutErr error
}

func newEnding() ending { return ending{done: make(chan struct{})} }

func (e *ending) exited() <-chan struct{} { return e.done }

func (e *ending) exitErr() error {
	select {
	case <-e.done:
		return e.endErr
	default:
		return nil
	}
}

// shutdownOnce runs stop the first time and returns its error every time.
func (e *ending) shutdownOnce(stop func() error) error {
	e.once.Do(func() { e.shutErr = stop() })
	return e.shutErr
}

// localSide is what the sides served in this process share: procTools, and
// a loop run in a goroutine until shutdown.
type localSide struct {
	procTools
	ending
	what    string             // "the service" or "the plain loop", in errors
	stopRun context.CancelFunc // nil until run
}

func newLocalSide(what string) localSide { return localSide{what: what, ending: newEnding()} }

// run starts loop in a goroutine, on a context that stopLoop cancels.
func (l *localSide) run(loop func(context.Context) error) {
	ctx, stop := context.WithCancel(context.Background())
	l.stopRun = stop
	go func() {
		defer close(l.done)
		l.endErr = loop(ctx)
	}()
}

// stopped is the error of start when the loop returned first.
func (l *localSide) stopped() error { return fmt.Errorf("%s stopped: %v", l.what, l.endErr) }

// stopLoop stops the CPU profile and the loop, then calls release (which
// may be nil) unless the loop did not stop within stopTimeout: release
// would pull things from under it. It returns the loop's error.
func (l *localSide) stopLoop(release func()) error {
	return l.shutdownOnce(func() error {
		if l.stopCPU != nil {
			_ = l.stopCPUProfile()
		}
		var err error
		if l.stopRun != nil {
			l.stopRun()
			select {
			case <-l.done:
				if !errors.Is(l.endErr, context.Canceled) {
					err = l.endErr
				}
			case <-time.After(stopTimeout):
				return fmt.Errorf("%s did not stop within %s", l.what, stopTimeout)
			}
		}
		if release != nil {
			release()
		}
		return err
	})
}

// localOrderly is the service in this process: the bench process with
// -dispatcher in-process, or the child itself with -dispatcher process.
type localOrderly struct {
	localSide
	svc *service.Service
}

func newLocalOrderly(cfg *config.Config, verbose bool, stderr io.Writer) (*localOrderly, error) {
	svc, err := service.New(cfg, benchLogger(verbose, stderr), version)
	if err != nil {
		return nil, fmt.Errorf("starting the service: %w", err)
	}
	return &localOrderly{localSide: newLocalSide("the service"), svc: svc}, nil
}

func (l *localOrderly) start(ctx context.Context) error {
	l.run(l.svc.Run)
	for !l.svc.Ready() {
		select {
		case <-l.done:
			return l.stopped()
		case <-ctx.Done():
			return errors.New("timed out waiting for the partition assignment")
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// stats reads the runtime's counters and the service's metrics.
func (l *localOrderly) stats() (orderlyStats, error) {
	return l.readStats(func(st *orderlyStats) {
		st.Retries = l.svc.Metrics().Sum("orderly_http_retries_total")
		st.Pauses = l.svc.Metrics().Sum("orderly_partition_pauses_total")
		rb := func(kind string) float64 {
			return l.svc.Metrics().SumWhere("orderly_rebalances_total", map[string]string{"kind": kind})
		}
		st.Partitions = rb("assigned") - rb("revoked") - rb("lost")
	}), nil
}

func (l *localOrderly) shutdown() error { return l.stopLoop(l.svc.Close) }

// command executes one line of the protocol on the side served in this
// process and returns the answer, and whether it was stop.
func command(l orderlySide, line string) (answer string, stop bool) {
	verb, arg, _ := strings.Cut(strings.TrimSpace(line), " ")
	var err error
	switch verb {
	case "stop":
		return "", true
	case "stats":
		var st orderlyStats
		if st, err = l.stats(); err == nil {
			var b []byte
			if b, err = json.Marshal(st); err == nil {
				return string(b), false
			}
		}
	case "gc":
		err = l.settle()
	case "cpuprofile":
		switch what, file, _ := strings.Cut(arg, " "); {
		case what == "start" && file != "":
			err = l.startCPUProfile(file)
		case what == "stop" && file == "":
			err = l.stopCPUProfile()
		default:
			err = errors.New("want cpuprofile start FILE or cpuprofile stop")
		}
	case "heap", "allocs":
		if arg == "" {
			err = fmt.Errorf("want %s FILE", verb)
		} else {
			err = l.profile(verb, arg)
		}
	default:
		err = fmt.Errorf("unknown command %q", verb)
	}
	if err != nil {
		return "error: " + strings.ReplaceAll(err.Error(), "\n", "; "), false
	}
	return "ok", false
}

// serveDispatcher is `orderly-bench -serve-dispatcher -config FILE`: the
// Orderly service alone, built and run as `orderly run` and the in-process
// bench do, answering the protocol above on stdin and stdout.
func serveDispatcher(path string, verbose bool, stdin io.Reader, stdout, stderr io.Writer) int {
	fail := failer("serve-dispatcher", stderr)
	if path == "" {
		return fail(errors.New("-config FILE is required"))
	}
	cfg, err := config.Load(path)
	if err != nil {
		return fail(fmt.Errorf("loading the configuration: %w", err))
	}
	l, err := newLocalOrderly(cfg, verbose, stderr)
	if err != nil {
		return fail(err)
	}
	return serveSide(l, stdin, stdout, fail)
}

// failer returns the function that reports an error of the -serve-MODE
// process on stderr and returns its exit status.
func failer(mode string, stderr io.Writer) func(error) int {
	return func(err error) int {
		fmt.Fprintln(stderr, "orderly-bench -"+mode+":", err)
		return 1
	}
}

// serveSide starts l, says ready on stdout once it is, and answers the
// protocol's commands on stdin until stop or EOF; then it shuts l down.
// fail reports an error and returns the exit status.
func serveSide(l orderlySide, stdin io.Reader, stdout io.Writer, fail func(error) int) int {
	// The reader ends at EOF, or when this function returns after stop
	// (the blocked read itself ends with the process). EOF before the
	// assignment also ends the start-up.
	startCtx, cancelStart := context.WithCancel(context.Background())
	defer cancelStart()
	lines := make(chan string)
	quit := make(chan struct{})
	defer close(quit)
	go func() {
		defer close(lines)
		defer cancelStart()
		sc := bufio.NewScanner(stdin)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			case <-quit:
				return
			}
		}
	}()
	if err := l.start(startCtx); err != nil {
		_ = l.shutdown()
		return fail(err)
	}
	fmt.Fprintln(stdout, "ready")
	for stop := false; !stop; {
		select {
		case line, ok := <-lines:
			if !ok {
				stop = true
				break
			}
			var answer string
			if answer, stop = command(l, line); !stop {
				fmt.Fprintln(stdout, answer)
			}
		case <-l.exited():
			err := l.exitErr()
			_ = l.shutdown()
			return fail(fmt.Errorf("the service stopped: %v", err))
		}
	}
	if err := l.shutdown(); err != nil {
		return fail(fmt.Errorf("the service stopped with an error: %w", err))
	}
	return 0
}

// --- in a child process ---------------------------------------------------------

// childCallTimeout bounds the wait for one answer of the child: a heap
// profile of a large heap takes a GC and a while to write.
const childCallTimeout = time.Minute

// childOrderly is the parent's end of `orderly-bench -serve-dispatcher`, of
// `orderly-bench -serve-plainloop` (newChildPlain), or of `orderly-bench
// -serve-ceiling` (ceiling.go). Each says ready once it can work: the
// services once their partitions are assigned.
type childOrderly struct {
	ending          // done: the child has exited
	what   string   // "dispatcher" or "plain loop", in errors
	args   []string // of the child
	file   string   // its input file (configuration, job), removed by shutdown ("": none)
	stderr io.Writer

	mu     sync.Mutex // one call at a time
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string   // the child's stdout line by line, closed at EOF
	quit   chan struct{} // closed by shutdown: nobody reads lines any more
	broken error         // set when an answer did not come: the protocol is out of step
}

// newChildOrderly writes the configuration to a temporary file for the
// child; start starts it.
func newChildOrderly(toml string, verbose bool, stderr io.Writer) (*childOrderly, error) {
	file, err := writeTemp("orderly-bench-*.toml", func(w io.Writer) error { _, err := io.WriteString(w, toml); return err })
	if err != nil {
		return nil, fmt.Errorf("writing the dispatcher's configuration: %w", err)
	}
	args := []string{"-serve-dispatcher", "-config", file}
	if verbose {
		args = append(args, "-v")
	}
	c := newChild("dispatcher", stderr, args...)
	c.file = file
	return c, nil
}

// writeTemp writes a new temporary file, named after pattern as
// os.CreateTemp does, and returns its name.
func writeTemp(pattern string, write func(io.Writer) error) (string, error) {
	fh, err := os.CreateTemp("", pattern)
	if err != nil {
		return "", err
	}
	if err := errors.Join(write(fh), fh.Close()); err != nil {
		os.Remove(fh.Name())
		return "", err
	}
	return fh.Name(), nil
}

// newChild returns the parent's end of `orderly-bench args...`, a child
// that answers the protocol; start starts it.
func newChild(what string, stderr io.Writer, args ...string) *childOrderly {
	return &childOrderly{ending: newEnding(), what: what, args: args, stderr: stderr,
		lines: make(chan string, 1), quit: make(chan struct{})}
}

func (c *childOrderly) start(ctx context.Context) error {
	cmd, stdin, stdout, err := startChild(c.what, c.stderr, c.args...)
	if err != nil {
		return err
	}
	c.cmd, c.stdin = cmd, stdin
	go func() {
		defer close(c.done)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			select {
			case c.lines <- sc.Text():
			case <-c.quit:
			}
		}
		close(c.lines)
		_, _ = io.Copy(io.Discard, stdout)
		c.endErr = cmd.Wait()
	}()
	select {
	case l, ok := <-c.lines:
		switch {
		case !ok:
			return fmt.Errorf("the %s process exited before it was ready: %v", c.what, c.waitExit())
		case l != "ready":
			return fmt.Errorf("the %s process said %q, want ready", c.what, l)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("timed out waiting for the %s process to be ready", c.what)
	}
}

// waitExit waits (briefly: stdout is closed) for the child's exit status.
func (c *childOrderly) waitExit() error {
	select {
	case <-c.done:
		if c.endErr == nil {
			return errors.New("exit status 0")
		}
		return c.endErr
	case <-time.After(5 * time.Second):
		return errors.New("stdout closed, but the process did not exit")
	}
}

func (c *childOrderly) pid() int {
	if c.cmd == nil {
		return -1
	}
	return c.cmd.Process.Pid
}

func (c *childOrderly) cpu() time.Duration { return processCPU(c.pid()) }
func (c *childOrderly) rss() int64         { return processRSS(c.pid()) }
func (c *childOrderly) peakRSS() int64     { return processPeakRSS(c.pid()) }

// call sends one command and returns the child's answer, waiting up to
// timeout for it; `error: ...` answers are returned as errors.
func (c *childOrderly) call(command string, timeout time.Duration) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	verb, _, _ := strings.Cut(command, " ")
	if c.broken != nil {
		return "", c.broken
	}
	if c.cmd == nil {
		return "", fmt.Errorf("the %s process is not running", c.what)
	}
	if _, err := io.WriteString(c.stdin, command+"\n"); err != nil {
		return "", fmt.Errorf("sending %s to the %s process: %w", verb, c.what, err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case l, ok := <-c.lines:
		if !ok {
			return "", fmt.Errorf("%s: the %s process exited: %v", verb, c.what, c.waitExit())
		}
		if msg, failed := strings.CutPrefix(l, "error: "); failed {
			return "", fmt.Errorf("the %s process: %s: %s", c.what, verb, msg)
		}
		return l, nil
	case <-t.C:
		c.broken = fmt.Errorf("the %s process did not answer %s within %s", c.what, verb, timeout)
		return "", c.broken
	}
}

// callOK sends a command whose answer is ok.
func (c *childOrderly) callOK(command string) error {
	l, err := c.call(command, childCallTimeout)
	if err == nil && l != "ok" {
		err = fmt.Errorf("the %s process answered %q to %s, want ok", c.what, l, command)
	}
	return err
}

func (c *childOrderly) stats() (orderlyStats, error) {
	var st orderlyStats
	l, err := c.call("stats", childCallTimeout)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(l), &st); err != nil {
		return st, fmt.Errorf("the %s process's stats %q: %w", c.what, l, err)
	}
	return st, nil
}

func (c *childOrderly) settle() error { return c.callOK("gc") }

// callFile sends command with a profile's file name, made absolute; it
// refuses what the line protocol cannot carry.
func (c *childOrderly) callFile(command, file string) error {
	if strings.ContainsAny(file, "\r\n") {
		return fmt.Errorf("profile file name %q: no line breaks, please", file)
	}
	abs, err := filepath.Abs(file)
	if err != nil {
		return err
	}
	return c.callOK(command + " " + abs)
}

func (c *childOrderly) startCPUProfile(file string) error {
	return c.callFile("cpuprofile start", file)
}

func (c *childOrderly) stopCPUProfile() error           { return c.callOK("cpuprofile stop") }
func (c *childOrderly) profile(kind, file string) error { return c.callFile(kind, file) }

// shutdown closes the child's stdin (a graceful drain, svc.Close, exit),
// kills it if it has not exited within stopTimeout, and removes its input
// file.
func (c *childOrderly) shutdown() error {
	return c.shutdownOnce(func() error {
		if c.file != "" {
			defer os.Remove(c.file)
		}
		if c.cmd == nil {
			return nil
		}
		close(c.quit)
		_ = c.stdin.Close()
		select {
		case <-c.done:
			if c.endErr != nil {
				return fmt.Errorf("the %s process: %w", c.what, c.endErr)
			}
			return nil
		case <-time.After(stopTimeout):
			_ = c.cmd.Process.Kill()
			<-c.done // killed: stdout closes, Wait returns
			return fmt.Errorf("the %s process did not stop within %s: killed", c.what, stopTimeout)
		}
	})
}

// startProfiles starts what -cpuprofile and -memprofile ask for at the
// start of Orderly's backlog phase and returns the function that ends them.
func startProfiles(side orderlySide, f benchFlags, name func(string) string) (stop func() error, err error) {
	if f.cpuProfile != "" {
		if err := side.startCPUProfile(name(f.cpuProfile)); err != nil {
			return nil, err
		}
	}
	if f.memProfile != "" {
		if err := side.profile("allocs", name(f.memProfile)+".base"); err != nil {
			return nil, err
		}
	}
	return func() error {
		if f.cpuProfile != "" {
			if err := side.stopCPUProfile(); err != nil {
				return err
			}
		}
		if f.memProfile != "" {
			return side.profile("allocs", name(f.memProfile))
		}
		return nil
	}, nil
}
