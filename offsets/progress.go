package offsets

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"strings"
)

// A progress record is the commit metadata that says which offsets at or
// after the committed offset are already done:
//
//	o1:<commit>:<kind>:<payload>
//
// o1 is the format and its version, commit the committed offset in decimal,
// and payload the unpadded base64url encoding of data followed by a
// big-endian CRC-32C (Castagnoli) of the header (the record up to and
// including its third colon) and data, so that a corrupted or foreign
// record is refused rather than misread. The data describes the offsets
// from commit on, where commit itself is never done:
//
//   - kind r (runs): uvarint lengths of alternating runs, not done then
//     done, starting at commit; an even number of runs, each at least 1.
//   - kind b (bitmap): bit i (byte i/8, bit i%8 from the least
//     significant) set when commit+i is done; bit 0 is clear, the last
//     byte is not zero.
//
// Offsets past the described range are not done.
const (
	progressVersion = "o1"
	checksumLen     = 4
	// maxProgressBytes bounds the budget Progress works with, whatever it
	// is given.
	maxProgressBytes = 1 << 20
)

var (
	progressEncoding = base64.RawURLEncoding.Strict()
	castagnoli       = crc32.MakeTable(crc32.Castagnoli)
)

// Progress returns the committable offset and a progress record, at most
// maxBytes long, of which offsets after it are already done: completed,
// skipped (a gap below the newest offset begun), or restored as done. The
// record is "" when nothing after commit is done. When the whole record
// does not fit, it describes the part nearest commit and truncated is true;
// a consumer restarting from the record then processes the rest again.
// Budgets above 1 MiB count as 1 MiB.
func (t *Tracker) Progress(maxBytes int) (commit int64, metadata string, truncated bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	commit = t.committableLocked()
	header := progressVersion + ":" + strconv.FormatInt(commit, 10) + ":r:"
	room := min(maxBytes, maxProgressBytes) - len(header)
	limit := max(room, 0)*6/8 - checksumLen // data bytes that fit
	r := runEncoder{limit: limit, missed: math.MaxInt64}
	b := bitmapEncoder{limit: limit, missed: math.MaxInt64}
	if limit > 0 {
		// Room for the checksum too: the chosen buffer gets it appended.
		r.buf = make([]byte, 0, min(limit, 4096)+checksumLen)
		b.buf = make([]byte, 0, min(limit, 4096)+checksumLen)
	}
	anyDone := false
	t.eachDoneLocked(commit, func(lo, hi int64) bool {
		anyDone = true
		r.add(lo-commit, hi-commit)
		b.add(lo-commit, hi-commit)
		return !(r.full && b.full)
	})
	if !anyDone {
		return commit, "", false
	}
	kind, data, missed := "r", r.buf, r.missed
	if b.missed > r.missed || b.missed == r.missed && len(b.buf) < len(r.buf) {
		kind, data, missed = "b", b.buf, b.missed
	}
	truncated = missed != math.MaxInt64
	if len(data) == 0 || kind == "b" && !b.ones {
		return commit, "", truncated
	}
	header = header[:len(header)-2] + kind + ":"
	sum := crc32.Update(crc32.Checksum([]byte(header), castagnoli), castagnoli, data)
	data = binary.BigEndian.AppendUint32(data, sum)
	return commit, header + progressEncoding.EncodeToString(data), truncated
}

// eachDoneLocked calls yield with the maximal intervals of done offsets
// after commit, in order, until yield returns false: the clear bits of the
// window below next, then the restored intervals.
func (t *Tracker) eachDoneLocked(commit int64, yield func(lo, hi int64) bool) {
	cur := commit // the first offset not yet classified
	if t.pending > 0 {
		for i, s := range t.segs {
			first, end := max(s.at, t.w0), t.w0+len(t.words)
			if i+1 < len(t.segs) {
				end = t.segs[i+1].at
			}
			for j := first; j < end; j++ {
				w := t.words[j-t.w0]
				base := s.off + 64*int64(j-s.at)
				for w != 0 {
					start := bits.TrailingZeros64(w)
					n := bits.TrailingZeros64(^(w >> start))
					if lo := base + int64(start); lo > cur {
						if !yield(cur, lo) {
							return
						}
					}
					cur = base + int64(start+n)
					if start+n == 64 {
						w = 0
					} else {
						w &^= (1<<n - 1) << start
					}
				}
			}
		}
	}
	r := t.restored
	if cur < t.next {
		// Done up to next; merged with a restored interval that continues it.
		hi := t.next
		if len(r) > 0 && r[0].lo == hi {
			hi, r = r[0].hi, r[1:]
		}
		if !yield(cur, hi) {
			return
		}
	}
	for _, iv := range r {
		if iv.lo > commit && !yield(iv.lo, iv.hi) {
			return
		}
	}
}

// runEncoder writes the runs of a kind r record, relative to commit, into at
// most limit bytes.
type runEncoder struct {
	buf    []byte
	limit  int
	pos    int64 // end of the last done run written
	missed int64 // the first done offset not written; MaxInt64 if none
	full   bool
}

func (e *runEncoder) add(lo, hi int64) {
	if e.full {
		return
	}
	gap := uint64(lo - e.pos)
	n := len(e.buf) + uvarintLen(gap)
	if n >= e.limit {
		e.full, e.missed = true, lo
		return
	}
	run := uint64(hi - lo)
	if room := e.limit - n; uvarintLen(run) > room {
		// Shorten the last run to what fits: still a prefix.
		run = 1<<(7*room) - 1
		e.full, e.missed = true, lo+int64(run)
	}
	e.buf = binary.AppendUvarint(binary.AppendUvarint(e.buf, gap), run)
	e.pos = lo + int64(run)
}

// bitmapEncoder writes the bits of a kind b record, relative to commit, into
// at most limit bytes.
type bitmapEncoder struct {
	buf    []byte
	limit  int
	ones   bool  // a bit is set
	missed int64 // the first done offset not written; MaxInt64 if none
	full   bool
}

func (e *bitmapEncoder) add(lo, hi int64) {
	if e.full {
		return
	}
	if capBits := 8 * int64(max(e.limit, 0)); hi > capBits {
		e.full, e.missed = true, max(lo, capBits)
		hi = capBits
	}
	if lo >= hi {
		return
	}
	if need := int((hi + 7) / 8); need > len(e.buf) {
		old := len(e.buf)
		e.buf = slices.Grow(e.buf, need-old)[:need]
		clear(e.buf[old:])
	}
	for ; lo < hi && lo%8 != 0; lo++ {
		e.buf[lo/8] |= 1 << (lo % 8)
	}
	for ; lo+8 <= hi; lo += 8 {
		e.buf[lo/8] = 0xff
	}
	for ; lo < hi; lo++ {
		e.buf[lo/8] |= 1 << (lo % 8)
	}
	e.ones = true
}

func uvarintLen(v uint64) int {
	return (bits.Len64(v|1) + 6) / 7
}

// NewFromProgress returns a tracker that starts at commit, like New(commit),
// and knows the offsets that metadata, a record from Progress committed with
// commit, says are done: Begin reports them as already done. Empty metadata
// restores nothing. Metadata that does not parse, fails its checksum or was
// written for another commit offset restores nothing either and returns an
// error saying why, together with the tracker, for the caller to log.
func NewFromProgress(commit int64, metadata string) (*Tracker, error) {
	t := New(commit)
	if metadata == "" {
		return t, nil
	}
	c, done, err := decodeProgress(metadata)
	if err != nil {
		return t, fmt.Errorf("offsets: progress record ignored: %w", err)
	}
	if c != commit {
		return t, fmt.Errorf("offsets: progress record ignored: it is for commit offset %d, not %d", c, commit)
	}
	t.restored = done
	return t, nil
}

// decodeProgress parses a progress record into its commit offset and the
// intervals of done offsets it describes.
func decodeProgress(s string) (commit int64, done []interval, err error) {
	rest, ok := strings.CutPrefix(s, progressVersion+":")
	if !ok {
		return 0, nil, errors.New("not a version " + progressVersion + " record")
	}
	num, rest, ok1 := strings.Cut(rest, ":")
	kind, payload, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return 0, nil, errors.New("malformed record")
	}
	commit, err = strconv.ParseInt(num, 10, 64)
	if err != nil || commit < 0 || strconv.FormatInt(commit, 10) != num {
		return 0, nil, fmt.Errorf("bad commit offset %q", num)
	}
	raw, err := progressEncoding.DecodeString(payload)
	if err != nil {
		return 0, nil, fmt.Errorf("bad payload: %v", err)
	}
	if len(raw) < checksumLen {
		return 0, nil, errors.New("payload too short")
	}
	data, sum := raw[:len(raw)-checksumLen], binary.BigEndian.Uint32(raw[len(raw)-checksumLen:])
	header := s[:len(s)-len(payload)]
	if crc32.Update(crc32.Checksum([]byte(header), castagnoli), castagnoli, data) != sum {
		return 0, nil, errors.New("checksum mismatch")
	}
	room := uint64(math.MaxInt64 - commit) // offsets past commit that exist
	switch kind {
	case "r":
		done, err = decodeRuns(data, room)
	case "b":
		done, err = decodeBitmap(data, room)
	default:
		err = fmt.Errorf("unknown kind %q", kind)
	}
	if err != nil {
		return 0, nil, err
	}
	for i := range done {
		done[i].lo += commit
		done[i].hi += commit
	}
	return commit, done, nil
}

// decodeRuns decodes kind r data into intervals relative to commit, none
// reaching past room.
func decodeRuns(data []byte, room uint64) ([]interval, error) {
	if len(data) == 0 {
		return nil, errors.New("no runs")
	}
	var done []interval
	var pos uint64
	for k := 0; len(data) > 0; k++ {
		v, n := binary.Uvarint(data)
		if n <= 0 {
			return nil, errors.New("bad run length")
		}
		data = data[n:]
		if v == 0 || v > room-pos {
			return nil, fmt.Errorf("run length %d out of range", v)
		}
		if k%2 == 1 {
			done = append(done, interval{int64(pos), int64(pos + v)})
		}
		pos += v
		if k%2 == 0 && len(data) == 0 {
			return nil, errors.New("odd number of runs")
		}
	}
	return done, nil
}

// decodeBitmap decodes kind b data into intervals relative to commit, none
// reaching past room.
func decodeBitmap(data []byte, room uint64) ([]interval, error) {
	switch {
	case len(data) == 0 || data[len(data)-1] == 0:
		return nil, errors.New("bitmap not trimmed")
	case data[0]&1 != 0:
		return nil, errors.New("bitmap marks the commit offset done")
	case uint64(len(data)) > room/8:
		return nil, errors.New("bitmap past the last offset")
	}
	var done []interval
	for i, byt := range data {
		base := int64(8 * i)
		for byt != 0 {
			start := bits.TrailingZeros8(byt)
			n := bits.TrailingZeros8(^(byt >> start))
			lo, hi := base+int64(start), base+int64(start+n)
			if k := len(done); k > 0 && done[k-1].hi == lo {
				done[k-1].hi = hi
			} else {
				done = append(done, interval{lo, hi})
			}
			if start+n == 8 {
				byt = 0
			} else {
				byt &^= (1<<n - 1) << start
			}
		}
	}
	return done, nil
}

// minProgressBudget is the smallest progress record worth sending: below it
// a partition records no progress at all.
const minProgressBudget = 32

// RefusedBudget is the progress budget after a broker refused a record of
// size bytes as too large (its offset.metadata.max.bytes is lower): half of
// what was refused, or 0 when that is too small to be worth sending.
func RefusedBudget(budget, size int) int {
	b := min(budget, size) / 2
	if b < minProgressBudget {
		return 0
	}
	return b
}
