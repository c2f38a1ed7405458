// Package offsets tracks, per partition, which offsets have been handed out
// for processing and which have completed, and answers the one question a
// committer needs: up to where is every message done?
//
// Offsets are begun in arrival order (strictly increasing, gaps allowed: a
// compacted topic or a transaction marker skips offsets) and completed in any
// order. Committable returns the offset after the longest completed prefix,
// which is the offset Kafka expects in a commit. Progress adds, as commit
// metadata, which offsets beyond that point are already done, so that a
// consumer that restarts from the commit (NewFromProgress) skips them instead
// of processing them again.
package offsets

import (
	"fmt"
	"math"
	"math/bits"
	"sync"
	"time"
)

const (
	// maxGapWords is the longest run of words without a begun offset that
	// Begin stores inline; a longer gap (a compacted topic) starts a new
	// segment, so that memory follows the offsets begun, not the gap.
	maxGapWords = 64
	// minWords is the smallest bitmap array allocated; arrays larger than
	// shrinkAbove words are released or copied down when mostly unused.
	minWords    = 16
	shrinkAbove = 4 * minWords
	// checkpointEvery is the least time between two age checkpoints, and
	// maxCheckpoints bounds how many are kept.
	checkpointEvery = 100 * time.Millisecond
	maxCheckpoints  = 1024
)

// Tracker is the completion tracker of one partition. It is safe for
// concurrent use: typically one goroutine calls Begin while many call Done
// and a committer calls Committable or Progress.
//
// The window [Committable, next) is a bitmap of pending offsets: a set bit
// is an offset begun and not done, a clear bit one that is done or was never
// begun (a gap, which counts as done). Finished offsets thus cost a bit
// while a stuck offset holds the window open, and the bitmap is trimmed and
// shrunk as the window's start advances, so memory follows the span, not
// the history. Begin, Done, Committable, InFlight and Span are O(1)
// amortized (Done is O(log s) with s segments when gaps longer than
// maxGapWords*64 offsets split the window).
type Tracker struct {
	mu sync.Mutex // protects every field below

	// next is one past the newest offset begun, or the start given to New
	// before the first Begin; negative means unknown (nothing begun and no
	// start given).
	next int64

	// words is the pending bitmap, split into segments (see segment).
	// words[0] is never zero: leading zero words are trimmed as soon as
	// they appear, and the slice is empty exactly when pending is 0. w0 is
	// the logical index of words[0] (words trimmed from the front since the
	// bitmap was last empty), so segment positions survive trimming.
	words []uint64
	w0    int
	alloc int // length of the array words lives in
	// segs are the bitmap's segments in offset order; segs[0] contains
	// words[0] (segs[0].at <= w0 < segs[1].at).
	segs    []segment
	pending int // set bits in words

	// restored holds offsets at or after next known to be done from a
	// previous consumer's progress record (NewFromProgress): sorted,
	// disjoint, non-adjacent intervals. Begin drops what falls behind next.
	restored []interval

	// checkpoints are (offset, begin time) samples, in offset order, taken
	// by Begin at most every checkpointEvery while offsets are pending;
	// checkpoints[0] is at or before the lowest pending offset.
	checkpoints []checkpoint

	// now is the clock Begin reads for checkpoints; nil means time.Now.
	// Set only before the tracker is shared (tests inject a fake clock).
	now func() time.Time
}

// A segment is a run of consecutive bitmap words: the word at logical index
// at covers offsets off..off+63 (off is a multiple of 64), the next word the
// 64 offsets after, up to the next segment's at.
type segment struct {
	off int64
	at  int
}

// An interval is the offsets lo..hi-1.
type interval struct{ lo, hi int64 }

// A checkpoint records that offset off was begun at time at.
type checkpoint struct {
	off int64
	at  time.Time
}

// New returns a tracker for a partition whose next offset to consume is
// start (the committed offset, or -1 when unknown). Until the first Begin,
// Committable returns start.
func New(start int64) *Tracker {
	return &Tracker{next: start}
}

// Begin records that offset has been handed out for processing. Offsets must
// be begun in strictly increasing order (and be valid, non-negative Kafka
// offsets); Begin returns an error otherwise and records nothing.
//
// When a previous consumer's progress record (NewFromProgress) says offset is
// already done, Begin records it as begun and done at once and returns
// alreadyDone: the caller must not process it and must not call Done for it.
func (t *Tracker) Begin(offset int64) (alreadyDone bool, err error) {
	if offset < 0 || offset == math.MaxInt64 {
		return false, fmt.Errorf("offsets: begin %d: not a valid offset", offset)
	}
	now := time.Now
	if t.now != nil {
		now = t.now
	}
	at := now() // read before locking: the clock is the slowest step
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.next >= 0 && offset < t.next {
		return false, fmt.Errorf("offsets: begin %d: offsets must increase, the next is at least %d", offset, t.next)
	}
	t.next = offset + 1
	if t.takeRestoredLocked(offset) {
		return true, nil
	}
	t.setPendingLocked(offset)
	t.checkpointLocked(offset, at)
	return false, nil
}

// Done records that offset completed. It returns an error for an offset that
// is not pending: never begun, already done, or restored as done.
func (t *Tracker) Done(offset int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	p, ok := t.indexLocked(offset)
	bit := uint64(1) << (offset & 63)
	if !ok || t.words[p]&bit == 0 {
		return fmt.Errorf("offsets: done %d: not pending (never begun, or already done)", offset)
	}
	t.words[p] &^= bit
	t.pending--
	if t.pending == 0 {
		t.resetLocked()
		return nil
	}
	if p == 0 {
		if t.words[0] == 0 {
			t.trimLocked()
		}
		t.trimCheckpointsLocked(t.lowestLocked())
	}
	return nil
}

// Committable returns the offset after the longest completed prefix: the
// lowest pending offset if any is pending, else the first offset at or after
// one past the newest begun that the restored progress does not mark done
// (or the start offset when nothing was begun).
func (t *Tracker) Committable() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.committableLocked()
}

// InFlight returns the number of offsets begun and not yet done.
func (t *Tracker) InFlight() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending
}

// Span returns the number of offsets from Committable up to and including
// the newest offset begun, done or not, or 0 when nothing is pending. It is
// what an unfinished message holds back: the dispatcher pauses a partition
// whose span reaches a limit.
func (t *Tracker) Span() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.pending == 0 {
		return 0
	}
	return t.next - t.lowestLocked()
}

// OldestPending returns how long before now the lowest pending offset was
// begun, or 0 when nothing is pending. The answer comes from checkpoints
// taken at most every 100 ms, so it may overstate the age by about that
// much (more once a stuck offset has outlived a thousand checkpoints), and
// never understates it.
func (t *Tracker) OldestPending(now time.Time) time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.pending == 0 {
		return 0
	}
	t.trimCheckpointsLocked(t.lowestLocked())
	return max(now.Sub(t.checkpoints[0].at), 0)
}

// Next returns one past the newest offset begun (the position to consume
// from next), or false when nothing was begun and no start is known.
func (t *Tracker) Next() (int64, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.next < 0 {
		return 0, false
	}
	return t.next, true
}

func (t *Tracker) committableLocked() int64 {
	if t.pending > 0 {
		return t.lowestLocked()
	}
	if len(t.restored) > 0 && t.restored[0].lo == t.next {
		return t.restored[0].hi
	}
	return t.next
}

// lowestLocked returns the lowest pending offset; pending must be > 0.
func (t *Tracker) lowestLocked() int64 {
	return t.wordOffLocked() + int64(bits.TrailingZeros64(t.words[0]))
}

// wordOffLocked returns the offset of bit 0 of words[0].
func (t *Tracker) wordOffLocked() int64 {
	s := t.segs[0]
	return s.off + 64*int64(t.w0-s.at)
}

// takeRestoredLocked drops the restored intervals behind offset and reports
// whether offset itself was restored as done, removing it if so.
func (t *Tracker) takeRestoredLocked(offset int64) bool {
	r := t.restored
	for len(r) > 0 && r[0].hi <= offset {
		r = r[1:]
	}
	found := len(r) > 0 && r[0].lo <= offset
	if found {
		r[0].lo = offset + 1
		if r[0].lo == r[0].hi {
			r = r[1:]
		}
	}
	if len(r) == 0 {
		r = nil
	}
	t.restored = r
	return found
}

// setPendingLocked sets offset's bit, extending the bitmap to cover it;
// offset is above every offset the bitmap holds.
func (t *Tracker) setPendingLocked(offset int64) {
	aligned := offset &^ 63
	if len(t.words) == 0 {
		t.w0 = 0
		t.segs = append(t.segs[:0], segment{off: aligned})
		t.appendWordLocked()
	} else {
		last := t.segs[len(t.segs)-1]
		end := last.off + 64*int64(t.w0+len(t.words)-last.at)
		if offset >= end {
			gap := (aligned - end) / 64
			if gap > maxGapWords {
				t.segs = append(t.segs, segment{off: aligned, at: t.w0 + len(t.words)})
				gap = 0
			}
			for ; gap >= 0; gap-- {
				t.appendWordLocked()
			}
		}
	}
	last := t.segs[len(t.segs)-1]
	t.words[last.at-t.w0+int((offset-last.off)/64)] |= 1 << (offset & 63)
	t.pending++
}

// appendWordLocked appends a zero word, reallocating to twice the words in
// use when the array is full (which also drops the space trimmed off its
// front).
func (t *Tracker) appendWordLocked() {
	if len(t.words) == cap(t.words) {
		w := make([]uint64, len(t.words), max(2*len(t.words), minWords))
		copy(w, t.words)
		t.words, t.alloc = w, cap(w)
	}
	t.words = append(t.words, 0)
}

// indexLocked returns the index in words of offset's word, if the bitmap
// covers offset.
func (t *Tracker) indexLocked(offset int64) (int, bool) {
	if len(t.words) == 0 || offset >= t.next || offset < t.wordOffLocked() {
		return 0, false
	}
	i := 0
	if n := len(t.segs); n > 1 {
		// The last segment starting at or before offset.
		lo, hi := 0, n-1
		for lo < hi {
			mid := int(uint(lo+hi+1) >> 1)
			if t.segs[mid].off <= offset {
				lo = mid
			} else {
				hi = mid - 1
			}
		}
		i = lo
	}
	s := t.segs[i]
	end := t.w0 + len(t.words)
	if i+1 < len(t.segs) {
		end = t.segs[i+1].at
	}
	d := (offset - s.off) / 64
	if d >= int64(end-s.at) {
		return 0, false // in a gap between segments
	}
	return s.at + int(d) - t.w0, true
}

// trimLocked drops the zero words at the front of the bitmap (pending > 0,
// so a non-zero word follows) and the segments they emptied, and copies the
// bitmap into a smaller array when it uses little of its own.
func (t *Tracker) trimLocked() {
	k := 1
	for t.words[k] == 0 {
		k++
	}
	t.words = t.words[k:]
	t.w0 += k
	for len(t.segs) > 1 && t.segs[1].at <= t.w0 {
		t.segs = t.segs[1:]
	}
	if t.alloc > shrinkAbove && 8*len(t.words) <= t.alloc {
		w := make([]uint64, len(t.words), max(2*len(t.words), minWords))
		copy(w, t.words)
		t.words, t.alloc = w, cap(w)
	}
}

// resetLocked empties the bitmap and the checkpoints once nothing is
// pending, releasing large arrays.
func (t *Tracker) resetLocked() {
	if t.alloc > shrinkAbove {
		t.words, t.alloc = nil, 0
	} else {
		t.words = t.words[:0]
	}
	t.w0 = 0
	if cap(t.segs) > minWords {
		t.segs = nil
	} else {
		t.segs = t.segs[:0]
	}
	clear(t.checkpoints)
	t.checkpoints = t.checkpoints[:0]
}

// checkpointLocked records that offset, now pending, was begun at at,
// unless the last checkpoint is less than checkpointEvery older. When
// maxCheckpoints are kept, every other one is dropped (the first, which
// dates the lowest pending offset, stays).
func (t *Tracker) checkpointLocked(offset int64, at time.Time) {
	n := len(t.checkpoints)
	if n > 0 && at.Sub(t.checkpoints[n-1].at) < checkpointEvery {
		return
	}
	if n >= maxCheckpoints {
		t.trimCheckpointsLocked(t.lowestLocked())
	}
	if n = len(t.checkpoints); n >= maxCheckpoints {
		j := 0
		for i := 0; i < n; i += 2 {
			t.checkpoints[j] = t.checkpoints[i]
			j++
		}
		clear(t.checkpoints[j:n])
		t.checkpoints = t.checkpoints[:j]
	}
	t.checkpoints = append(t.checkpoints, checkpoint{off: offset, at: at})
}

// trimCheckpointsLocked drops the checkpoints before the last one at or
// before lowest, the lowest pending offset.
func (t *Tracker) trimCheckpointsLocked(lowest int64) {
	for len(t.checkpoints) > 1 && t.checkpoints[1].off <= lowest {
		t.checkpoints[0] = checkpoint{}
		t.checkpoints = t.checkpoints[1:]
	}
}
