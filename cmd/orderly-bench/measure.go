package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// rusage is this process's getrusage, zero if it fails.
func rusage() syscall.Rusage {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return syscall.Rusage{}
	}
	return ru
}

// cpuTime is the process's user+system CPU time so far.
func cpuTime() time.Duration {
	ru := rusage()
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// maxRSS is the process's peak resident set size in bytes (kilobytes on Linux).
func maxRSS() int64 { return rusage().Maxrss * 1024 }

// procFile is the path of a /proc file of process pid, 0 being this one.
func procFile(pid int, name string) string {
	if pid == 0 {
		return "/proc/self/" + name
	}
	return fmt.Sprintf("/proc/%d/%s", pid, name)
}

// readProc returns a /proc file of process pid; "" if it cannot be read.
func readProc(pid int, name string) string {
	b, _ := os.ReadFile(procFile(pid, name))
	return string(b)
}

// processRSS is the resident set size of process pid now
// (/proc/PID/statm), in bytes; 0 if unknown.
func processRSS(pid int) int64 {
	f := strings.Fields(readProc(pid, "statm"))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// processPeakRSS is the peak resident set size of process pid so far
// (VmHWM in /proc/PID/status), in bytes; 0 if unknown.
func processPeakRSS(pid int) int64 {
	for line := range strings.Lines(readProc(pid, "status")) {
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
	s := readProc(pid, "stat")
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

// per10k is d in seconds per 10,000 of n (messages, records).
func per10k(d time.Duration, n float64) float64 { return d.Seconds() / n * 10000 }

// mallocs is how many heap objects this process has allocated so far.
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

// settleMemory collects garbage and returns what it can to the OS, so that
// an RSS read next shows what is live.
func settleMemory() {
	runtime.GC()
	debug.FreeOSMemory()
}

// startCPUProfile starts writing a CPU profile of this process to file and
// returns the function that stops it.
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

// writeProfile writes the named runtime/pprof profile of this process to
// file.
func writeProfile(name, file string) error {
	fh, err := os.Create(file)
	if err != nil {
		return err
	}
	defer fh.Close()
	return pprof.Lookup(name).WriteTo(fh, 0)
}
