// Package testkit holds what Orderly's tests, demo and benchmark share: an
// HTTP sink that records per-key order, an event generator, a producer and
// an order checker.
package testkit

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Event is what the generator produces: a person, with the key it is
// produced under and its sequence number within that key.
type Event struct {
	Key        string `json:"key"`
	Seq        int64  `json:"seq"`
	FirstName  string `json:"first_name"`
	LastName   string `json:"last_name"`
	ProducedAt int64  `json:"produced_at"` // Unix nanoseconds
	Pad        string `json:"pad,omitempty"`
}

// Delivery is one request the sink received.
type Delivery struct {
	Key            string
	Seq            int64
	IdempotencyKey string
	Latency        time.Duration // since Event.ProducedAt
	Header         http.Header
}

// Sink is an HTTP handler that records, per key, the sequence numbers of the
// events it receives (the request body is the JSON Event), and every request
// that arrives for a key while another request of that key is in flight
// (Report.Concurrent). It is safe for concurrent use. Set the hooks before
// serving.
type Sink struct {
	// Jitter, if set, adds a random latency in [0, Jitter) to every request,
	// before Delay: keys overtake each other, so that per-key order and
	// per-key concurrency are checked under varying timing.
	Jitter time.Duration
	// JitterSeed seeds Jitter's random source (log it to replay a run).
	JitterSeed uint64
	// Delay, if set, is how long to take before answering a request.
	Delay func(d *Delivery) time.Duration
	// Status, if set, picks the answer's status (0 means 200). A non-2xx
	// answer is not recorded as a delivery, only counted as a request.
	Status func(d *Delivery) int
	// Observe, if set, sees every request before it is answered.
	Observe func(d *Delivery, r *http.Request)

	requests atomic.Int64
	inFlight atomic.Int64
	maxIn    atomic.Int64

	mu        sync.Mutex // protects below
	byKey     map[string][]int64
	delivered int64
	latencies []time.Duration
	rng       *rand.Rand           // Jitter's, created on first use
	active    map[string][]*flight // the requests in flight, per key
	// concurrent counts requests that overlapped an earlier request of
	// their key which the client was still waiting for; firstConcurrent
	// describes the first.
	concurrent      int
	firstConcurrent string
}

// NewSink returns an empty sink.
func NewSink() *Sink {
	return &Sink{byKey: make(map[string][]int64), active: make(map[string][]*flight)}
}

// flight is one request in flight for a key.
type flight struct {
	seq      int64
	ctx      context.Context
	stop     func() bool // stops the AfterFunc that sets gaveUp
	gaveUp   time.Time   // when the client gave up on it (its context ended), under Sink.mu
	over     []int64     // seqs of the key's requests that arrived meanwhile
	overWhen []time.Time
}

// abandonGrace is how long before its client gave up on a request another
// request of its key may arrive without counting as concurrent: the
// server notices a closed connection a little after the client closed it
// (a timeout, a lost partition, a killed process), and the client may send
// again at once.
const abandonGrace = time.Second

// begin records a request of key in flight and its overlap with those
// already in flight whose clients still wait for them.
func (s *Sink) begin(ctx context.Context, key string, seq int64) *flight {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for _, g := range s.active[key] {
		if g.ctx.Err() == nil {
			g.over, g.overWhen = append(g.over, seq), append(g.overWhen, now)
		}
	}
	f := &flight{seq: seq, ctx: ctx}
	f.stop = context.AfterFunc(ctx, func() {
		s.mu.Lock()
		f.gaveUp = time.Now()
		s.mu.Unlock()
	})
	s.active[key] = append(s.active[key], f)
	return f
}

// end removes f from key's requests in flight and counts the requests that
// arrived while f's client waited for it (up to abandonGrace before it gave
// up, if it did) as concurrent.
func (s *Sink) end(key string, f *flight) {
	stopped := f.stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !stopped && f.gaveUp.IsZero() {
		f.gaveUp = time.Now() // the AfterFunc runs but has not recorded it yet
	}
	fs := s.active[key]
	for i, g := range fs {
		if g == f {
			fs = append(fs[:i], fs[i+1:]...)
			break
		}
	}
	if len(fs) == 0 {
		delete(s.active, key)
	} else {
		s.active[key] = fs
	}
	for i, q := range f.over {
		if !f.gaveUp.IsZero() && f.overWhen[i].After(f.gaveUp.Add(-abandonGrace)) {
			continue
		}
		s.concurrent++
		if s.firstConcurrent == "" {
			s.firstConcurrent = fmt.Sprintf("key %q: seq %d arrived while seq %d was in flight", key, q, f.seq)
		}
	}
}

// jitter returns a random latency below s.Jitter.
func (s *Sink) jitter() time.Duration {
	if s.Jitter <= 0 {
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.rng == nil {
		s.rng = rand.New(rand.NewPCG(s.JitterSeed, 0x5eed))
	}
	return time.Duration(s.rng.Int64N(int64(s.Jitter)))
}

// ServeHTTP records one request.
func (s *Sink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.requests.Add(1)
	n := s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	for {
		m := s.maxIn.Load()
		if n <= m || s.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var ev Event
	if err := json.Unmarshal(body, &ev); err != nil {
		http.Error(w, "sink: body is not an event: "+err.Error(), http.StatusBadRequest)
		return
	}
	d := &Delivery{Key: ev.Key, Seq: ev.Seq, IdempotencyKey: r.Header.Get("Idempotency-Key"), Header: r.Header}
	if ev.ProducedAt > 0 {
		d.Latency = time.Since(time.Unix(0, ev.ProducedAt))
	}
	f := s.begin(r.Context(), ev.Key, ev.Seq)
	defer s.end(ev.Key, f)
	if s.Observe != nil {
		s.Observe(d, r)
		if r.Context().Err() != nil {
			return // the client left while Observe held the request: nothing was answered
		}
	}
	dl := s.jitter()
	if s.Delay != nil {
		dl += max(s.Delay(d), 0)
	}
	if dl > 0 {
		t := time.NewTimer(dl)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if s.Status != nil {
		if st := s.Status(d); st != 0 && (st < 200 || st > 299) {
			w.WriteHeader(st)
			return
		}
	}
	s.mu.Lock()
	s.byKey[ev.Key] = append(s.byKey[ev.Key], ev.Seq)
	s.delivered++
	if d.Latency > 0 {
		s.latencies = append(s.latencies, d.Latency)
	}
	s.mu.Unlock()
	w.WriteHeader(http.StatusOK)
}

// Requests returns the number of requests received, answered or not.
func (s *Sink) Requests() int64 { return s.requests.Load() }

// InFlight returns the number of requests being handled now.
func (s *Sink) InFlight() int64 { return s.inFlight.Load() }

// MaxInFlight returns the most requests ever handled at once.
func (s *Sink) MaxInFlight() int64 { return s.maxIn.Load() }

// Concurrent returns the number of requests so far that arrived while
// another request of their key was in flight (see Report.Concurrent).
func (s *Sink) Concurrent() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.concurrent
}

// Delivered returns the number of successful deliveries recorded.
func (s *Sink) Delivered() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delivered
}

// Distinct returns the number of distinct (key, seq) pairs delivered.
func (s *Sink) Distinct() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, seqs := range s.byKey {
		seen := make(map[int64]struct{}, len(seqs))
		for _, q := range seqs {
			seen[q] = struct{}{}
		}
		n += len(seen)
	}
	return n
}

// Sequences returns a copy of the sequence numbers delivered for key, in
// arrival order.
func (s *Sink) Sequences(key string) []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.byKey[key])
}

// Latency returns the p-th percentile (0..100) of the end-to-end latency of
// the deliveries recorded so far, 0 if there are none.
func (s *Sink) Latency(p float64) time.Duration {
	s.mu.Lock()
	l := slices.Clone(s.latencies)
	s.mu.Unlock()
	if len(l) == 0 {
		return 0
	}
	sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
	i := int(p / 100 * float64(len(l)-1))
	return l[i]
}

// Report is the outcome of checking deliveries against what was produced.
type Report struct {
	Expected   int // events produced
	Delivered  int // deliveries recorded, duplicates included
	Missing    int // produced events never delivered
	Duplicates int // deliveries of an event delivered before
	Violations int // deliveries that broke per-key order
	// Concurrent counts requests that arrived while another request of
	// their key was in flight (requests, not deliveries: answered or not).
	Concurrent int
	First      string // the first order violation
	// FirstConcurrent describes the first concurrent request.
	FirstConcurrent string
}

// OK reports whether nothing is missing, the order held and no key ever
// had two requests in flight.
func (r Report) OK() bool { return r.Missing == 0 && r.Violations == 0 && r.Concurrent == 0 }

func (r Report) String() string {
	s := fmt.Sprintf("expected %d, delivered %d, missing %d, duplicates %d, order violations %d, concurrent requests %d",
		r.Expected, r.Delivered, r.Missing, r.Duplicates, r.Violations, r.Concurrent)
	if r.First != "" {
		s += " (first: " + r.First + ")"
	}
	if r.FirstConcurrent != "" {
		s += " (first concurrent: " + r.FirstConcurrent + ")"
	}
	return s
}

// Check compares the deliveries with the events produced: expected maps each
// key to the sequence numbers produced for it, in order. Order holds when
// every delivery of a key is either the key's next expected event after the
// previous delivery, or a step back to an event already delivered (a
// redelivered suffix after a crash or rebalance, which then must go on in
// order). A key delivered out of order in one run shows as a step forward
// past an undelivered event. Concurrent requests of a key are counted over
// every key, produced or not, as the sink saw them so far.
func (s *Sink) Check(expected map[string][]int64) Report {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := Report{Concurrent: s.concurrent, FirstConcurrent: s.firstConcurrent}
	for key, want := range expected {
		r.Expected += len(want)
		pos := make(map[int64]int, len(want))
		for i, q := range want {
			pos[q] = i
		}
		got := s.byKey[key]
		r.Delivered += len(got)
		seen := make(map[int64]bool, len(want))
		prev := -1 // index in want of the previous delivery
		for _, q := range got {
			i, ok := pos[q]
			switch {
			case !ok:
				r.Violations++
				if r.First == "" {
					r.First = fmt.Sprintf("key %q: seq %d was never produced", key, q)
				}
			case seen[q]:
				r.Duplicates++
				if i > prev+1 {
					r.Violations++
					if r.First == "" {
						r.First = fmt.Sprintf("key %q: redelivered seq %d after seq index %d", key, q, prev)
					}
				}
			case i != prev+1:
				r.Violations++
				if r.First == "" {
					r.First = fmt.Sprintf("key %q: seq %d arrived after %v", key, q, seqAt(want, prev))
				}
			}
			if ok {
				seen[q] = true
				prev = i
			}
		}
		r.Missing += len(want) - len(seen)
	}
	for key, got := range s.byKey {
		if _, ok := expected[key]; !ok {
			r.Delivered += len(got)
			r.Violations += len(got)
			if r.First == "" {
				r.First = fmt.Sprintf("key %q was never produced", key)
			}
		}
	}
	return r
}

func seqAt(want []int64, i int) any {
	if i < 0 {
		return "nothing"
	}
	return want[i]
}
