// Package offsets tracks, per partition, which offsets have been handed out
// for processing and which have completed, and answers the one question a
// committer needs: up to where is every message done?
//
// Offsets are begun in arrival order (strictly increasing, gaps allowed: a
// compacted topic or a transaction marker skips offsets) and completed in any
// order. Committable returns the offset after the longest completed prefix,
// which is the offset Kafka expects in a commit.
package offsets

import (
	"fmt"
	"sync"
)

// Tracker is the completion tracker of one partition. It is safe for
// concurrent use: typically one goroutine calls Begin while many call Done
// and a committer calls Committable.
//
// Begin, Done and Committable are O(1) amortized: entries live in a ring in
// arrival order; Done finds its entry by direct index when the offsets since
// the oldest pending one have no gaps and by binary search otherwise, and
// the head advances past completed entries exactly once each.
type Tracker struct {
	mu sync.Mutex // protects everything below
	// ring holds the pending window: entries[head..head+n) in arrival order.
	ring []entry
	head int
	n    int
	// next is the committable offset when the window is empty: one past
	// the last offset begun, or the start offset given to New.
	next int64
	// done counts completed entries still in the window (behind a gap).
	done int
}

type entry struct {
	offset int64
	done   bool
}

// New returns a tracker for a partition whose next offset to consume is
// start (the committed offset, or -1 when unknown). Until the first Begin,
// Committable returns start.
func New(start int64) *Tracker {
	return &Tracker{ring: make([]entry, 64), next: start}
}

// Begin records that offset has been handed out for processing. Offsets must
// be begun in strictly increasing order; Begin returns an error otherwise and
// records nothing.
func (t *Tracker) Begin(offset int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if last, ok := t.lastLocked(); ok && offset <= last {
		return fmt.Errorf("offsets: begin %d after %d: offsets must increase", offset, last)
	}
	if t.n == len(t.ring) {
		t.growLocked()
	}
	t.ring[(t.head+t.n)%len(t.ring)] = entry{offset: offset}
	t.n++
	return nil
}

// Done records that offset completed. It returns an error for an offset that
// was never begun or is already done.
func (t *Tracker) Done(offset int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.findLocked(offset)
	if !ok {
		return fmt.Errorf("offsets: done %d: not pending", offset)
	}
	e := &t.ring[(t.head+i)%len(t.ring)]
	if e.done {
		return fmt.Errorf("offsets: done %d twice", offset)
	}
	e.done = true
	t.done++
	for t.n > 0 && t.ring[t.head].done {
		t.next = t.ring[t.head].offset + 1
		t.ring[t.head] = entry{}
		t.head = (t.head + 1) % len(t.ring)
		t.n--
		t.done--
	}
	return nil
}

// Committable returns the offset after the longest completed prefix of begun
// offsets: the first pending offset if any is pending, else one past the last
// offset begun (or the start offset when nothing was begun).
func (t *Tracker) Committable() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.n > 0 {
		return t.ring[t.head].offset
	}
	return t.next
}

// InFlight returns the number of offsets begun and not yet done.
func (t *Tracker) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.n - t.done
}

// lastLocked returns the newest offset begun, if it is still known.
func (t *Tracker) lastLocked() (int64, bool) {
	if t.n > 0 {
		return t.ring[(t.head+t.n-1)%len(t.ring)].offset, true
	}
	if t.next >= 0 {
		return t.next - 1, true
	}
	return 0, false
}

// findLocked returns the window index of offset.
func (t *Tracker) findLocked(offset int64) (int, bool) {
	if t.n == 0 {
		return 0, false
	}
	first := t.ring[t.head].offset
	if offset < first {
		return 0, false
	}
	// Fast path: no gaps between the oldest pending offset and this one.
	if d := offset - first; d < int64(t.n) && t.ring[(t.head+int(d))%len(t.ring)].offset == offset {
		return int(d), true
	}
	lo, hi := 0, t.n-1
	for lo <= hi {
		mid := int(uint(lo+hi) >> 1)
		o := t.ring[(t.head+mid)%len(t.ring)].offset
		switch {
		case o == offset:
			return mid, true
		case o < offset:
			lo = mid + 1
		default:
			hi = mid - 1
		}
	}
	return 0, false
}

func (t *Tracker) growLocked() {
	r := make([]entry, 2*len(t.ring))
	for i := 0; i < t.n; i++ {
		r[i] = t.ring[(t.head+i)%len(t.ring)]
	}
	t.ring, t.head = r, 0
}

// Next returns one past the newest offset begun (the position to consume
// from next), or false when nothing was begun and no start is known.
func (t *Tracker) Next() (int64, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	last, ok := t.lastLocked()
	return last + 1, ok
}
