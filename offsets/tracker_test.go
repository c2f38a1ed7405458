package offsets

import (
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
)

// model is the obviously-correct reference: the committable offset is the
// first begun offset that is not done, else one past the last begun.
type model struct {
	begun []int64
	done  map[int64]bool
	start int64
}

func (m *model) committable() int64 {
	for _, o := range m.begun {
		if !m.done[o] {
			return o
		}
	}
	if len(m.begun) == 0 {
		return m.start
	}
	return m.begun[len(m.begun)-1] + 1
}

// run drives a tracker and the model with ops decoded from data and fails on
// the first disagreement or on a committable offset past an incomplete one.
func run(t *testing.T, data []byte) {
	t.Helper()
	tr := New(-1)
	m := &model{done: map[int64]bool{}, start: -1}
	next := int64(0)
	var pending []int64
	for i, b := range data {
		switch {
		case b < 160: // begin, with a gap of b%4 (gaps are legal)
			next += int64(b % 4)
			if err := tr.Begin(next); err != nil {
				t.Fatalf("op %d: begin %d: %v", i, next, err)
			}
			m.begun = append(m.begun, next)
			pending = append(pending, next)
			next++
		case len(pending) > 0: // done, of a pending offset chosen by b
			k := int(b) % len(pending)
			o := pending[k]
			pending = append(pending[:k], pending[k+1:]...)
			if err := tr.Done(o); err != nil {
				t.Fatalf("op %d: done %d: %v", i, o, err)
			}
			m.done[o] = true
		}
		got, want := tr.Committable(), m.committable()
		if got != want {
			t.Fatalf("op %d: committable %d, model says %d", i, got, want)
		}
		for _, o := range pending {
			if got > o {
				t.Fatalf("op %d: committable %d is past incomplete offset %d", i, got, o)
			}
		}
		if tr.InFlight() != len(pending) {
			t.Fatalf("op %d: in flight %d, want %d", i, tr.InFlight(), len(pending))
		}
	}
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
	f.Fuzz(func(t *testing.T, data []byte) { run(t, data) })
}

func TestTrackerStartAndErrors(t *testing.T) {
	tr := New(100)
	if got := tr.Committable(); got != 100 {
		t.Fatalf("committable before begin = %d, want the start 100", got)
	}
	if err := tr.Begin(99); err == nil {
		t.Fatal("begin below the start offset accepted")
	}
	if err := tr.Begin(100); err != nil {
		t.Fatal(err)
	}
	if err := tr.Begin(100); err == nil {
		t.Fatal("begin of the same offset twice accepted")
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
}

// TestTrackerGapsAndGrowth covers compacted offsets and a window larger than
// the initial ring, completed in reverse.
func TestTrackerGapsAndGrowth(t *testing.T) {
	tr := New(-1)
	var offs []int64
	for o := int64(10); len(offs) < 1000; o += 1 + int64(len(offs)%3) {
		offs = append(offs, o)
		if err := tr.Begin(o); err != nil {
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

// TestTrackerConcurrent completes offsets from many goroutines while a reader
// checks that the committable offset never passes an incomplete one.
func TestTrackerConcurrent(t *testing.T) {
	const n = 20000
	tr := New(-1)
	var doneMu sync.Mutex
	completed := make([]bool, n)
	for o := int64(0); o < n; o++ {
		if err := tr.Begin(o); err != nil {
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
			c := tr.Committable()
			doneMu.Lock()
			for o := int64(0); o < c; o++ {
				if !completed[o] {
					t.Errorf("committable %d but %d not completed", c, o)
					break
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
		_ = tr.Begin(int64(i))
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
				_ = tr.Begin(base + o)
			}
		}
		_ = tr.Done(base + int64(order[i%w]))
	}
}
