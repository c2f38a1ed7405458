package main

import (
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/orderly-dispatch/orderly/internal/testkit"
)

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

// startSink serves the sink on a free port of 127.0.0.1; set its cur
// recorder before sending to it.
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
