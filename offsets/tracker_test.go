package offsets

import (
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// Per-offset states of the model.
const (
	never   = iota // not begun: a gap if below next
	pending        // begun, not done
	done           // begun and done (or begun when restored as done)
)

// model is the obviously-correct reference, with one state per offset.
type model struct {
	start    int64
	last     int64  // newest offset begun, -1 if none
	low      int64  // no offset below is pending
	inFlight int    // offsets pending
	state    []byte // by offset
	restored []bool // by offset: the restored done set
}

func newModel(start int64, size int) *model {
	return &model{start: start, last: -1, low: max(start, 0), state: make([]byte, size), restored: make([]bool, size)}
}

func (m *model) next() int64 {
	if m.last < 0 {
		return m.start
	}
	return m.last + 1
}

// lowest returns the lowest pending offset.
func (m *model) lowest() (int64, bool) {
	for ; m.low <= m.last; m.low++ {
		if m.state[m.low] == pending {
			return m.low, true
		}
	}
	return 0, false
}

// committable is the first pending offset, else the first offset from next
// on that is not restored as done.
func (m *model) committable() int64 {
	if o, ok := m.lowest(); ok {
		return o
	}
	c := m.next()
	for c >= 0 && c < int64(len(m.restored)) && m.restored[c] {
		c++
	}
	return c
}

func (m *model) span() int64 {
	if o, ok := m.lowest(); ok {
		return m.last + 1 - o
	}
	return 0
}

// isDone says whether offset o, at or after the committable offset, is done
// for a progress record: below next when not pending (gaps count), from
// next on when restored.
func (m *model) isDone(o int64) bool {
	if o >= int64(len(m.state)) {
		return false
	}
	if o < m.next() {
		return m.state[o] != pending
	}
	return m.restored[o]
}

// sim drives a tracker and the model with ops decoded from data.
type sim struct {
	t       testing.TB
	tr      *Tracker
	m       *model
	next    int64   // the next offset to begin, before its gap
	pending []int64 // in begin order
}

// newSim starts a tracker from data's first bytes: either New(-1), or, when
// data[0]%4 == 1, a tracker restored with NewFromProgress from a record
// (written by the test's own encoder) marking done the offsets
// start+1+i for each bit i of data[1:5]. It returns the remaining data.
func newSim(t testing.TB, data []byte, size int) (*sim, []byte) {
	s := &sim{t: t}
	if len(data) >= 5 && data[0]%4 == 1 {
		start := int64(data[0])
		s.m = newModel(start, size)
		var set []int64
		for i := range 32 {
			if data[1+i/8]>>(i%8)&1 == 1 {
				o := start + 1 + int64(i)
				s.m.restored[o] = true
				set = append(set, o)
			}
		}
		tr, err := NewFromProgress(start, testRunsRecord(start, set))
		if err != nil {
			t.Fatalf("restoring %v after %d: %v", set, start, err)
		}
		s.tr, s.next = tr, start
		return s, data[5:]
	}
	s.m = newModel(-1, size)
	s.tr = New(-1)
	return s, data
}

// longGap is the gap op 156 leaves: longer than a bitmap segment holds.
const longGap = 64*maxGapWords + 200

// simSize returns the offsets a sim of data may begin.
func simSize(data []byte) int {
	n := 300 + 4*len(data)
	for _, b := range data {
		if b == 156 {
			n += longGap
		}
	}
	return n
}

// op applies one op: b < 160 begins the next offset after a gap of b%4
// (longGap for 156), anything else completes the pending offset chosen by
// b.
func (s *sim) op(i int, b byte) {
	t := s.t
	switch {
	case b < 160:
		s.next += int64(b % 4)
		if b == 156 {
			s.next += longGap
		}
		o := s.next
		s.next++
		already, err := s.tr.Begin(o)
		if err != nil {
			t.Fatalf("op %d: begin %d: %v", i, o, err)
		}
		if want := s.m.restored[o]; already != want {
			t.Fatalf("op %d: begin %d: already done %v, want %v", i, o, already, want)
		}
		s.m.last = o
		if already {
			s.m.state[o] = done
		} else {
			s.m.state[o] = pending
			s.m.inFlight++
			s.pending = append(s.pending, o)
		}
	case len(s.pending) > 0:
		k := int(b) % len(s.pending)
		o := s.pending[k]
		s.pending = append(s.pending[:k], s.pending[k+1:]...)
		if err := s.tr.Done(o); err != nil {
			t.Fatalf("op %d: done %d: %v", i, o, err)
		}
		s.m.state[o] = done
		s.m.inFlight--
	}
}

// check compares the tracker with the model.
func (s *sim) check(i int) {
	t, tr, m := s.t, s.tr, s.m
	got, want := tr.Committable(), m.committable()
	if got != want {
		t.Fatalf("op %d: committable %d, model says %d", i, got, want)
	}
	for _, o := range s.pending {
		if got > o {
			t.Fatalf("op %d: committable %d is past incomplete offset %d", i, got, o)
		}
	}
	if n := tr.InFlight(); n != len(s.pending) || n != m.inFlight {
		t.Fatalf("op %d: in flight %d, want %d", i, n, len(s.pending))
	}
	if got, want := tr.Span(), m.span(); got != want {
		t.Fatalf("op %d: span %d, want %d", i, got, want)
	}
	if n, ok := tr.Next(); ok != (m.next() >= 0) || ok && n != m.next() {
		t.Fatalf("op %d: next %d, %v; want %d", i, n, ok, m.next())
	}
}

// checkProgress checks a progress record of at most maxBytes against the
// model: it describes done offsets only, a prefix of them, and all of them
// unless truncated (which must not happen when mustFit).
func (s *sim) checkProgress(i, maxBytes int, mustFit bool) {
	t := s.t
	c, meta, truncated := s.tr.Progress(maxBytes)
	if c != s.m.committable() {
		t.Fatalf("op %d: progress commit %d, want %d", i, c, s.m.committable())
	}
	if len(meta) > maxBytes {
		t.Fatalf("op %d: progress record of %d bytes, limit %d", i, len(meta), maxBytes)
	}
	if mustFit && truncated {
		t.Fatalf("op %d: progress truncated at %d bytes", i, maxBytes)
	}
	var got []interval
	if meta != "" {
		cc, d, err := decodeProgress(meta)
		if err != nil || cc != c {
			t.Fatalf("op %d: record %q: commit %d, %v; want commit %d", i, meta, cc, err, c)
		}
		got = d
	}
	// The record must match the model up to its last done offset, and up to
	// the end (no offset past the restored ones or next is done) when not
	// truncated.
	end := max(s.m.next(), s.m.start+34)
	if truncated {
		end = c
		if len(got) > 0 {
			end = got[len(got)-1].hi
		}
	}
	k := 0
	for o := max(c, 0); o < end; o++ {
		for k < len(got) && got[k].hi <= o {
			k++
		}
		in := k < len(got) && got[k].lo <= o
		if in != s.m.isDone(o) {
			t.Fatalf("op %d: record %q (truncated %v) says %d done=%v, model says %v", i, meta, truncated, o, in, s.m.isDone(o))
		}
	}
	if len(got) > 0 && got[len(got)-1].hi > end {
		t.Fatalf("op %d: record %q goes past %d", i, meta, end)
	}
}

// run drives a tracker and the model with ops decoded from data and fails on
// the first disagreement.
func run(t testing.TB, data []byte) {
	s, ops := newSim(t, data, simSize(data))
	s.check(-1)
	for i, b := range ops {
		s.op(i, b)
		s.check(i)
		if b%16 == 0 {
			s.checkProgress(i, 4096, true)
			s.checkProgress(i, int(b)%97, false)
		}
	}
	s.checkProgress(len(ops), 4096, true)
}

func TestTrackerProperty(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for iter := 0; iter < 300; iter++ {
		data := make([]byte, 1+r.IntN(600))
		for i := range data {
			data[i] = byte(r.IntN(256))
		}
		run(t, data)
	}
}

func FuzzTracker(f *testing.F) {
	f.Add([]byte{0, 1, 2, 200, 201, 3, 255, 255})
	f.Add([]byte{5, 5, 5, 5, 250, 250, 250, 250})
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 170, 180, 190})
	f.Add([]byte{13, 0xf0, 0x0f, 0x55, 0x81, 0, 1, 1, 200, 2, 3, 250, 9, 0})
	f.Fuzz(func(t *testing.T, data []byte) { run(t, data) })
}

// FuzzProgress decodes arbitrary records, as given and re-signed with a
// valid checksum so that the fuzzer reaches the payload's parsing (neither
// may panic; an accepted one must restore a well-formed set that the
// restored tracker skips and writes back), and checks the record of a
// tracker driven by ops against the model.
func FuzzProgress(f *testing.F) {
	f.Add(int64(1000), "o1:1000:r:AgMFAe95uDw", []byte{1, 2, 200, 3}, uint16(40))
	f.Add(int64(7), "o1:7:b:HATwzQRQRg", []byte{9, 0xff, 0, 0x10, 0x80, 0, 0, 170, 1, 2}, uint16(4096))
	f.Add(int64(0), "o1:0:r:Af__A02Kp0Q", []byte{5, 0, 0, 0, 0x80, 156, 1, 200}, uint16(25))
	f.Add(int64(0), "garbage", []byte{}, uint16(0))
	f.Add(int64(5), "o1:5:r:\x01\x02\x03\x04", []byte{0, 0, 0, 0, 255}, uint16(20))
	f.Add(int64(5), "o1:5:b:\x1c\x04", []byte{}, uint16(20))
	f.Fuzz(func(t *testing.T, commit int64, meta string, ops []byte, maxBytes uint16) {
		checkDecode(t, commit, meta)
		if k := strings.LastIndexByte(meta, ':'); k >= 0 {
			checkDecode(t, commit, withChecksum(meta[:k+1], []byte(meta[k+1:])...))
		}
		if len(ops) > 2000 {
			ops = ops[:2000]
		}
		s, rest := newSim(t, ops, simSize(ops))
		for i, b := range rest {
			s.op(i, b)
		}
		s.check(len(rest))
		s.checkProgress(len(rest), int(maxBytes), false)
		s.checkProgress(len(rest), 1<<16, true)
	})
}

// checkDecode restores a tracker from meta: a refused record must leave it
// as New(commit); an accepted one must restore sorted, disjoint,
// non-adjacent intervals after commit, which Begin reports as done and
// Progress writes back.
func checkDecode(t *testing.T, commit int64, meta string) {
	tr, err := NewFromProgress(commit, meta)
	if tr == nil {
		t.Fatal("nil tracker")
	}
	if err != nil || meta == "" {
		if len(tr.restored) != 0 || tr.Committable() != commit {
			t.Fatalf("refused record %q left state: %v, committable %d", meta, tr.restored, tr.Committable())
		}
		return
	}
	want := append([]interval(nil), tr.restored...)
	prev := commit
	for _, iv := range want {
		if iv.lo <= prev || iv.hi <= iv.lo {
			t.Fatalf("record %q restored malformed %v", meta, want)
		}
		prev = iv.hi
	}
	c, meta2, truncated := tr.Progress(4096)
	if c != commit {
		t.Fatalf("record %q: committable %d, want %d", meta, c, commit)
	}
	_, again, err := decodeProgress(meta2)
	if err != nil {
		t.Fatalf("record %q rewritten as %q: %v", meta, meta2, err)
	}
	if len(again) > len(want) || !truncated && len(again) != len(want) {
		t.Fatalf("record %q rewritten as %q (truncated %v): %v, want %v", meta, meta2, truncated, again, want)
	}
	for k, iv := range again {
		w := want[k]
		if truncated && k == len(again)-1 {
			w.hi = min(w.hi, iv.hi)
		}
		if iv != w {
			t.Fatalf("record %q rewritten as %q (truncated %v): %v, want %v", meta, meta2, truncated, again, want)
		}
	}
	// Begin the first few thousand offsets: exactly the restored ones are
	// already done.
	end := commit + min(5000, math.MaxInt64-1-commit)
	k := 0
	for o := commit; o < end; o++ {
		for k < len(want) && want[k].hi <= o {
			k++
		}
		restored := k < len(want) && want[k].lo <= o
		already, err := tr.Begin(o)
		if err != nil || already != restored {
			t.Fatalf("record %q: begin %d: %v, %v; want %v", meta, o, already, err, restored)
		}
	}
}

func TestTrackerStartAndErrors(t *testing.T) {
	tr := New(100)
	if got := tr.Committable(); got != 100 {
		t.Fatalf("committable before begin = %d, want the start 100", got)
	}
	if _, err := tr.Begin(99); err == nil {
		t.Fatal("begin below the start offset accepted")
	}
	if _, err := tr.Begin(100); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Begin(100); err == nil {
		t.Fatal("begin of the same offset twice accepted")
	}
	if got := tr.InFlight(); got != 1 {
		t.Fatalf("in flight %d after a refused begin, want 1", got)
	}
	if err := tr.Done(101); err == nil {
		t.Fatal("done of an offset never begun accepted")
	}
	if err := tr.Done(100); err != nil {
		t.Fatal(err)
	}
	if err := tr.Done(100); err == nil {
		t.Fatal("done twice accepted")
	}
	if got := tr.Committable(); got != 101 {
		t.Fatalf("committable = %d, want 101", got)
	}
	if n, ok := tr.Next(); !ok || n != 101 {
		t.Fatalf("next = %d, %v; want 101", n, ok)
	}
	if _, ok := New(-1).Next(); ok {
		t.Fatal("next known before anything was begun")
	}
	if _, err := New(-1).Begin(-3); err == nil {
		t.Fatal("begin of a negative offset accepted")
	}
	// A gap below a pending offset is not pending.
	tr = New(-1)
	for _, o := range []int64{10, 13} {
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	for _, o := range []int64{9, 11, 12, 14} {
		if err := tr.Done(o); err == nil {
			t.Fatalf("done of %d, never begun, accepted", o)
		}
	}
	if got := tr.Span(); got != 4 {
		t.Fatalf("span %d, want 4 (10..13)", got)
	}
}

// TestTrackerGapsAndGrowth covers compacted offsets and a window larger than
// the initial bitmap, completed in reverse.
func TestTrackerGapsAndGrowth(t *testing.T) {
	tr := New(-1)
	var offs []int64
	for o := int64(10); len(offs) < 1000; o += 1 + int64(len(offs)%3) {
		offs = append(offs, o)
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	for i := len(offs) - 1; i >= 1; i-- {
		if err := tr.Done(offs[i]); err != nil {
			t.Fatal(err)
		}
		if got := tr.Committable(); got != offs[0] {
			t.Fatalf("committable %d with %d still pending", got, offs[0])
		}
	}
	if err := tr.Done(offs[0]); err != nil {
		t.Fatal(err)
	}
	if got, want := tr.Committable(), offs[len(offs)-1]+1; got != want {
		t.Fatalf("committable %d, want %d", got, want)
	}
}

// TestTrackerLongGaps checks that gaps far longer than the bitmap's inline
// limit cost segments, not words, and still count as done.
func TestTrackerLongGaps(t *testing.T) {
	tr := New(0)
	const g = 1<<20 + 64*maxGapWords + 128 // maxGapWords+1 empty words after 1<<20's
	offs := []int64{0, 5, 1 << 20, g, 1 << 40, 1<<40 + 1}
	for _, o := range offs {
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	if len(tr.words) > 6 || len(tr.segs) != 4 {
		t.Fatalf("%d words in %d segments for %d offsets", len(tr.words), len(tr.segs), len(offs))
	}
	if got, want := tr.Span(), int64(1<<40+2); got != want {
		t.Fatalf("span %d, want %d", got, want)
	}
	for _, o := range []int64{1, 1<<20 - 1, 1<<20 + 1, 1<<20 + 64, g - 1, g + 1, 1<<40 - 1, 1<<40 + 2} {
		if err := tr.Done(o); err == nil {
			t.Fatalf("done of %d, never begun, accepted", o)
		}
	}
	c, meta, truncated := tr.Progress(4096)
	if c != 0 || truncated {
		t.Fatalf("progress %d, %q, %v", c, meta, truncated)
	}
	r, err := NewFromProgress(0, meta)
	if err != nil {
		t.Fatal(err)
	}
	want := []interval{{1, 5}, {6, 1 << 20}, {1<<20 + 1, g}, {g + 1, 1 << 40}}
	if len(r.restored) != len(want) {
		t.Fatalf("restored %v, want %v", r.restored, want)
	}
	for i := range want {
		if r.restored[i] != want[i] {
			t.Fatalf("restored %v, want %v", r.restored, want)
		}
	}
	// Complete in an order that empties the middle segments first.
	for _, o := range []int64{1 << 20, g, 5, 1<<40 + 1} {
		if err := tr.Done(o); err != nil {
			t.Fatal(err)
		}
		if got := tr.Committable(); got != 0 {
			t.Fatalf("committable %d, want 0", got)
		}
	}
	if err := tr.Done(0); err != nil {
		t.Fatal(err)
	}
	if got := tr.Committable(); got != 1<<40 {
		t.Fatalf("committable %d, want %d", got, int64(1<<40))
	}
	if len(tr.segs) != 1 || len(tr.words) != 1 {
		t.Fatalf("%d words in %d segments left for one pending offset", len(tr.words), len(tr.segs))
	}
	if err := tr.Done(1 << 40); err != nil {
		t.Fatal(err)
	}
	if got := tr.Committable(); got != 1<<40+2 {
		t.Fatalf("committable %d, want %d", got, int64(1<<40+2))
	}
}

// TestTrackerMemoryFollowsSpan checks that a million offsets done behind a
// stuck one cost about a million bits, and that the bitmap shrinks once the
// stuck offset finishes.
func TestTrackerMemoryFollowsSpan(t *testing.T) {
	const n = 1_000_000
	for _, lateOnes := range []int{0, 10} {
		tr := New(0)
		tr.now = func() time.Time { return time.Unix(0, 0) }
		if _, err := tr.Begin(0); err != nil {
			t.Fatal(err)
		}
		for o := int64(1); o <= n; o++ {
			if _, err := tr.Begin(o); err != nil {
				t.Fatal(err)
			}
			if err := tr.Done(o); err != nil {
				t.Fatal(err)
			}
		}
		if got := len(tr.words) * 64; got < n+1 || got > n+1+64 {
			t.Fatalf("bitmap of %d bits for a span of %d", got, n+1)
		}
		if c := cap(tr.words); c > 2*len(tr.words) {
			t.Fatalf("bitmap array of %d words for %d in use", c, len(tr.words))
		}
		if got := tr.Span(); got != n+1 {
			t.Fatalf("span %d, want %d", got, n+1)
		}
		for i := range lateOnes {
			if _, err := tr.Begin(n + 1 + int64(i)); err != nil {
				t.Fatal(err)
			}
		}
		if err := tr.Done(0); err != nil {
			t.Fatal(err)
		}
		if got := tr.Committable(); got != n+1 {
			t.Fatalf("committable %d, want %d", got, n+1)
		}
		if len(tr.words) > 1 || cap(tr.words) > minWords || tr.alloc > minWords {
			t.Fatalf("%d late offsets pending: bitmap of len %d, cap %d, array %d words", lateOnes, len(tr.words), cap(tr.words), tr.alloc)
		}
		if got := tr.Span(); got != int64(lateOnes) {
			t.Fatalf("span %d, want %d", got, lateOnes)
		}
	}
}

// TestTrackerShrinksGradually checks that a window that narrows while
// offsets stay pending gives its memory back.
func TestTrackerShrinksGradually(t *testing.T) {
	tr := New(0)
	const n = 100_000
	for o := int64(0); o < n; o++ {
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	// Complete in order, keeping 100 in flight behind a sliding front.
	for o := int64(0); o < n; o++ {
		if err := tr.Done(o); err != nil {
			t.Fatal(err)
		}
		if _, err := tr.Begin(n + o); err != nil {
			t.Fatal(err)
		}
		if o == n/2 && tr.alloc > max(8*len(tr.words)+minWords, shrinkAbove) {
			t.Fatalf("bitmap array of %d words for %d in use", tr.alloc, len(tr.words))
		}
	}
	for o := int64(n); o < 2*n-100; o++ {
		if err := tr.Done(o); err != nil {
			t.Fatal(err)
		}
	}
	if tr.alloc > max(8*len(tr.words)+minWords, shrinkAbove) || len(tr.words) > 3 {
		t.Fatalf("bitmap array of %d words for %d in use, 100 offsets pending", tr.alloc, len(tr.words))
	}
}

// TestOldestPending drives the age of the oldest pending offset with a fake
// clock.
func TestOldestPending(t *testing.T) {
	t0 := time.Unix(1000, 0)
	clock := t0
	tr := New(0)
	tr.now = func() time.Time { return clock }
	begin := func(o int64, after time.Duration) {
		clock = clock.Add(after)
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	age := func(want time.Duration) {
		t.Helper()
		if got := tr.OldestPending(t0.Add(time.Second)); got != want {
			t.Fatalf("oldest pending %v, want %v", got, want)
		}
	}
	age(0)
	begin(0, 0)                     // checkpoint 0 at t0
	begin(1, 50*time.Millisecond)   // no checkpoint: 50 ms after the last
	begin(2, 60*time.Millisecond)   // checkpoint 2 at t0+110ms
	begin(3, 1*time.Millisecond)    // none
	begin(10, 300*time.Millisecond) // checkpoint 10 at t0+411ms
	age(time.Second)                // 0 pending, begun at t0
	mustDone(t, tr, 0)
	age(time.Second) // 1 lowest, begun at t0+50ms: checkpoint 0 overstates
	mustDone(t, tr, 2)
	age(time.Second) // 1 still lowest
	mustDone(t, tr, 1)
	age(time.Second - 110*time.Millisecond) // 3 lowest: checkpoint 2, 1 ms earlier
	mustDone(t, tr, 3)
	age(time.Second - 411*time.Millisecond)
	mustDone(t, tr, 10)
	age(0)
	if len(tr.checkpoints) != 0 {
		t.Fatalf("%d checkpoints kept with nothing pending", len(tr.checkpoints))
	}
	// Nothing pending for a while: the next begin is dated afresh.
	begin(11, 10*time.Millisecond)
	if got := tr.OldestPending(clock.Add(time.Second)); got != time.Second {
		t.Fatalf("oldest pending %v, want 1s", got)
	}
	// A clock earlier than the checkpoint gives 0, not a negative age.
	if got := tr.OldestPending(clock.Add(-time.Second)); got != 0 {
		t.Fatalf("oldest pending %v for a time before the begin", got)
	}
}

func mustDone(t *testing.T, tr *Tracker, o int64) {
	t.Helper()
	if err := tr.Done(o); err != nil {
		t.Fatal(err)
	}
}

// TestOldestPendingBounds checks, with random begin times, that the age is
// never understated and overstated by less than the checkpoint interval
// while checkpoints are not thinned, and for a long-stuck offset also while
// they are.
func TestOldestPendingBounds(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	clock := time.Unix(0, 0)
	tr := New(0)
	tr.now = func() time.Time { return clock }
	began := map[int64]time.Time{}
	var pend []int64
	o := int64(0)
	step := func(stuck bool) (lowest int64, ok bool) {
		clock = clock.Add(time.Duration(r.IntN(30)) * time.Millisecond)
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
		began[o] = clock
		pend = append(pend, o)
		o++
		for len(pend) > 1+r.IntN(50) {
			k := r.IntN(len(pend))
			if stuck && k == 0 {
				continue
			}
			mustDone(t, tr, pend[k])
			pend = append(pend[:k], pend[k+1:]...)
		}
		if len(tr.checkpoints) > maxCheckpoints {
			t.Fatalf("%d checkpoints", len(tr.checkpoints))
		}
		if len(pend) == 0 {
			return 0, false
		}
		return pend[0], true // pend is in begin order
	}
	for range 20000 {
		lowest, ok := step(false)
		now := clock.Add(time.Second)
		got, want := tr.OldestPending(now), now.Sub(began[lowest])
		if ok && (got < want || got >= want+checkpointEvery) {
			t.Fatalf("offset %d: oldest pending %v, begun %v ago", lowest, got, want)
		}
	}
	stuck := pend[0]
	for range 40000 {
		lowest, _ := step(true)
		if lowest != stuck {
			t.Fatalf("lowest pending %d, want %d", lowest, stuck)
		}
		now := clock.Add(time.Second)
		if got, want := tr.OldestPending(now), now.Sub(began[stuck]); got < want || got >= want+checkpointEvery {
			t.Fatalf("stuck offset %d: oldest pending %v, begun %v ago", stuck, got, want)
		}
	}
	if len(tr.checkpoints) < maxCheckpoints/2 {
		t.Fatalf("only %d checkpoints: the test did not thin them", len(tr.checkpoints))
	}
	mustDone(t, tr, stuck)
	pend = pend[1:]
	for len(pend) > 0 {
		lowest := pend[0]
		now := clock.Add(time.Second)
		if got, want := tr.OldestPending(now), now.Sub(began[lowest]); got < want {
			t.Fatalf("offset %d: oldest pending %v, begun %v ago", lowest, got, want)
		}
		mustDone(t, tr, lowest)
		pend = pend[1:]
	}
}

// TestTrackerConcurrent completes offsets from many goroutines while a reader
// checks that the committable offset never passes an incomplete one.
func TestTrackerConcurrent(t *testing.T) {
	const n = 20000
	tr := New(-1)
	var doneMu sync.Mutex
	completed := make([]bool, n)
	for o := int64(0); o < n; o++ {
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	perm := rand.Perm(n)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				o := int64(perm[i])
				doneMu.Lock()
				completed[o] = true // marked before Done: the reader may only see fewer done
				doneMu.Unlock()
				if err := tr.Done(o); err != nil {
					t.Error(err)
				}
			}
		})
	}
	stop := make(chan struct{})
	var rwg sync.WaitGroup
	rwg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			c, meta, _ := tr.Progress(4096)
			doneMu.Lock()
			for o := int64(0); o < c; o++ {
				if !completed[o] {
					t.Errorf("committable %d but %d not completed", c, o)
					break
				}
			}
			if meta != "" {
				_, ds, err := decodeProgress(meta)
				if err != nil {
					t.Error(err)
				}
				for _, iv := range ds {
					for o := iv.lo; o < iv.hi; o++ {
						if !completed[o] {
							t.Errorf("record %q says %d done", meta, o)
						}
					}
				}
			}
			doneMu.Unlock()
		}
	})
	wg.Wait()
	close(stop)
	rwg.Wait()
	if got := tr.Committable(); got != n {
		t.Fatalf("committable %d, want %d", got, n)
	}
}

func BenchmarkTrackerInOrder(b *testing.B) {
	tr := New(-1)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_, _ = tr.Begin(int64(i))
		_ = tr.Done(int64(i))
	}
}

func BenchmarkTrackerWindow(b *testing.B) {
	// A window of 10,000 in flight, completed out of order.
	const w = 10000
	tr := New(-1)
	order := rand.Perm(w)
	sort.Ints(order[:w/2])
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		base := int64(i/w) * w
		if i%w == 0 {
			for o := int64(0); o < w; o++ {
				_, _ = tr.Begin(base + o)
			}
		}
		_ = tr.Done(base + int64(order[i%w]))
	}
}

// BenchmarkProgress writes the record of a window of 100,000 offsets of
// which 1% are pending, at the brokers' default limit.
func BenchmarkProgress(b *testing.B) {
	const w = 100_000
	tr := New(0)
	r := rand.New(rand.NewPCG(5, 6))
	for o := int64(0); o < w; o++ {
		if _, err := tr.Begin(o); err != nil {
			b.Fatal(err)
		}
		if o != 0 && r.IntN(100) != 0 {
			if err := tr.Done(o); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_, _, _ = tr.Progress(4096)
	}
}
