package offsets

import (
	"encoding/base64"
	"encoding/binary"
	"hash/crc32"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// testRunsRecord writes a kind r record for the done offsets set (sorted,
// all after commit) without the package's encoder, from the format's
// description.
func testRunsRecord(commit int64, set []int64) string {
	if len(set) == 0 {
		return ""
	}
	var data []byte
	pos := commit
	for i := 0; i < len(set); {
		j := i + 1
		for j < len(set) && set[j] == set[j-1]+1 {
			j++
		}
		data = binary.AppendUvarint(data, uint64(set[i]-pos))
		data = binary.AppendUvarint(data, uint64(j-i))
		pos = set[j-1] + 1
		i = j
	}
	header := "o1:" + strconv.FormatInt(commit, 10) + ":r:"
	sum := crc32.Checksum(append([]byte(header), data...), crc32.MakeTable(crc32.Castagnoli))
	return header + base64.RawURLEncoding.EncodeToString(binary.BigEndian.AppendUint32(data, sum))
}

// shape builds a tracker from start with n offsets begun (after random gaps
// when gaps), each done with probability doneP, offset start staying
// pending. It returns the tracker and whether each offset from start on is
// done for a progress record.
func shape(t testing.TB, r *rand.Rand, start int64, n int, doneP float64, gaps bool) (*Tracker, []bool) {
	tr := New(start)
	var isDone []bool
	o := start
	for i := 0; i < n; i++ {
		if gaps && i > 0 && r.IntN(4) == 0 {
			g := 1 + r.IntN(20)
			if r.IntN(200) == 0 {
				g = 1 + r.IntN(5000)
			}
			for range g {
				isDone = append(isDone, true) // a gap counts as done
			}
			o += int64(g)
		}
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
		d := i > 0 && r.Float64() < doneP
		if d {
			if err := tr.Done(o); err != nil {
				t.Fatal(err)
			}
		}
		isDone = append(isDone, d)
		o++
	}
	return tr, isDone
}

// TestProgressRoundTrip writes records of random shapes and budgets, and
// checks that a tracker restored from one skips exactly the done offsets of
// a prefix (all of them when not truncated), and nothing that was not done.
func TestProgressRoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	kinds := map[byte]int{}
	truncations := 0
	for iter := 0; iter < 400; iter++ {
		start := r.Int64N(1 << 40)
		n := 1 + r.IntN(3000)
		tr, isDone := shape(t, r, start, n, []float64{0, 0.01, 0.5, 0.9, 0.999, 1}[iter%6], iter%3 == 0)
		maxBytes := 4096
		if iter%2 == 1 {
			maxBytes = r.IntN(200)
		}
		c, meta, truncated := tr.Progress(maxBytes)
		if c != start {
			t.Fatalf("commit %d, want %d", c, start)
		}
		if len(meta) > maxBytes {
			t.Fatalf("record of %d bytes, limit %d", len(meta), maxBytes)
		}
		if meta != "" {
			kinds[meta[strings.LastIndexByte(meta, ':')-1]]++
		}
		if truncated {
			truncations++
		}
		rt, err := NewFromProgress(c, meta)
		if err != nil {
			t.Fatalf("record %q: %v", meta, err)
		}
		// The restored tracker keeps the record until it has begun anything.
		if c2, meta2, trunc2 := rt.Progress(maxBytes); c2 != c || meta2 != meta && !truncated || trunc2 {
			t.Fatalf("restored tracker rewrites %q as %d, %q, %v", meta, c2, meta2, trunc2)
		}
		lastSkipped, firstMissed := -1, -1
		for i, d := range isDone {
			already, err := rt.Begin(start + int64(i))
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case already && !d:
				t.Fatalf("record %q: offset %d restored as done, was not", meta, start+int64(i))
			case already:
				lastSkipped = i
			case d && firstMissed < 0:
				firstMissed = i
			}
		}
		if firstMissed >= 0 && firstMissed < lastSkipped {
			t.Fatalf("record %q: done offset %d missed before %d was restored: not a prefix", meta, start+int64(firstMissed), start+int64(lastSkipped))
		}
		if firstMissed >= 0 && !truncated {
			t.Fatalf("record %q, not truncated, misses done offset %d", meta, start+int64(firstMissed))
		}
		if truncated && firstMissed < 0 {
			t.Fatalf("record %q says truncated but restores every done offset", meta)
		}
	}
	if kinds['r'] == 0 || kinds['b'] == 0 || truncations == 0 {
		t.Fatalf("shapes too narrow: kinds %v, %d truncated", kinds, truncations)
	}
}

// TestProgressMaxBytes checks that records never exceed their budget and
// always decode, for many shapes and every small budget.
func TestProgressMaxBytes(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for iter := 0; iter < 60; iter++ {
		start := []int64{0, 9, 1 << 62}[iter%3] + r.Int64N(1000)
		tr, isDone := shape(t, r, start, 1+r.IntN(2000), r.Float64(), iter%2 == 0)
		anyDone := false
		for _, d := range isDone {
			anyDone = anyDone || d
		}
		prev := 0
		for maxBytes := -1; maxBytes <= 400; maxBytes++ {
			c, meta, truncated := tr.Progress(maxBytes)
			if len(meta) > max(maxBytes, 0) {
				t.Fatalf("record of %d bytes, limit %d", len(meta), maxBytes)
			}
			if !anyDone && (meta != "" || truncated) {
				t.Fatalf("nothing done, record %q, truncated %v", meta, truncated)
			}
			if anyDone && meta == "" && !truncated {
				t.Fatalf("budget %d: empty record not marked truncated", maxBytes)
			}
			if meta == "" {
				continue
			}
			if _, err := NewFromProgress(c, meta); err != nil {
				t.Fatalf("record %q: %v", meta, err)
			}
			if len(meta) < prev && truncated {
				// More room never describes less: the record may only
				// shrink when it switches to a shorter, complete form.
				t.Fatalf("budget %d: truncated record of %d bytes after one of %d", maxBytes, len(meta), prev)
			}
			prev = len(meta)
		}
		if _, _, truncated := tr.Progress(1 << 30); truncated {
			t.Fatal("a huge budget truncated")
		}
	}
}

// TestProgressFormat pins the record format.
func TestProgressFormat(t *testing.T) {
	tr := New(1000)
	for o := int64(1000); o <= 1010; o++ {
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
	}
	for _, o := range []int64{1002, 1003, 1004, 1010} {
		mustDone(t, tr, o)
	}
	// Runs 2, 3, 5, 1 take four bytes, the bitmap 00011100 00000100 two.
	const bitmap = "o1:1000:b:HAR7Vd9s"
	if w := withChecksum("o1:1000:b:", 0x1c, 0x04); w != bitmap {
		t.Fatalf("test encoder wrote %q", w)
	}
	if c, meta, truncated := tr.Progress(4096); c != 1000 || meta != bitmap || truncated {
		t.Fatalf("progress %d, %q, %v; want 1000, %q", c, meta, truncated, bitmap)
	}
	// One byte of data fits: not the two runs before 1002..1004, but their
	// eight bits.
	if c, meta, truncated := tr.Progress(len(bitmap) - 1); c != 1000 || !truncated || meta != withChecksum("o1:1000:b:", 0x1c) {
		t.Fatalf("progress %d, %q, %v", c, meta, truncated)
	}
	// A budget of exactly the record's length fits it whole.
	if c, meta, truncated := tr.Progress(len(bitmap)); c != 1000 || truncated || meta != bitmap {
		t.Fatalf("progress %d, %q, %v", c, meta, truncated)
	}
	// Long runs are shorter as runs: 1001..1500 and 1600.
	tr = New(1000)
	for o := int64(1000); o <= 1600; o++ {
		if _, err := tr.Begin(o); err != nil {
			t.Fatal(err)
		}
		if o > 1000 && (o <= 1500 || o == 1600) {
			mustDone(t, tr, o)
		}
	}
	want := testRunsRecord(1000, append(seq(1001, 1501), 1600))
	if c, meta, truncated := tr.Progress(4096); c != 1000 || meta != want || truncated {
		t.Fatalf("progress %d, %q, %v; want 1000, %q", c, meta, truncated, want)
	}
	if !strings.HasPrefix(want, "o1:1000:r:") {
		t.Fatalf("test encoder wrote %q", want)
	}
	// Nothing done beyond the commit: no record.
	tr = New(5)
	if c, meta, truncated := tr.Progress(4096); c != 5 || meta != "" || truncated {
		t.Fatalf("progress %d, %q, %v", c, meta, truncated)
	}
	if _, err := tr.Begin(5); err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Begin(6); err != nil {
		t.Fatal(err)
	}
	mustDone(t, tr, 5)
	if c, meta, truncated := tr.Progress(4096); c != 6 || meta != "" || truncated {
		t.Fatalf("progress %d, %q, %v", c, meta, truncated)
	}
}

// checkRecord checks that tr's record, within the default budget, has
// commit offset commit and restores exactly the done offsets want.
func checkRecord(t *testing.T, tr *Tracker, commit int64, want []int64) {
	t.Helper()
	c, meta, truncated := tr.Progress(4096)
	if c != commit || truncated {
		t.Fatalf("progress %d, %q, %v; want commit %d", c, meta, truncated, commit)
	}
	_, ivs, err := decodeProgress(meta)
	if err != nil {
		t.Fatalf("record %q: %v", meta, err)
	}
	var got []int64
	for _, iv := range ivs {
		got = append(got, seq(iv.lo, iv.hi)...)
	}
	if len(got) != len(want) {
		t.Fatalf("record %q restores %v, want %v", meta, got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("record %q restores %v, want %v", meta, got, want)
		}
	}
}

func seq(lo, hi int64) []int64 {
	var s []int64
	for o := lo; o < hi; o++ {
		s = append(s, o)
	}
	return s
}

// TestRestoredBeyondNext checks that restored offsets the consumer has not
// fetched again count for the committable offset and stay in the record.
func TestRestoredBeyondNext(t *testing.T) {
	meta := testRunsRecord(100, append(seq(101, 106), 110, 111))
	tr, err := NewFromProgress(100, meta)
	if err != nil {
		t.Fatal(err)
	}
	if got := tr.Committable(); got != 100 {
		t.Fatalf("committable %d, want 100", got)
	}
	if n, ok := tr.Next(); !ok || n != 100 {
		t.Fatalf("next %d, %v; want 100: restored offsets are fetched again", n, ok)
	}
	if already, err := tr.Begin(100); already || err != nil {
		t.Fatalf("begin 100: %v, %v", already, err)
	}
	if already, err := tr.Begin(101); !already || err != nil {
		t.Fatalf("begin 101: %v, %v; want already done", already, err)
	}
	if err := tr.Done(101); err == nil {
		t.Fatal("done of an offset restored as done accepted")
	}
	if got, n := tr.Span(), tr.InFlight(); got != 2 || n != 1 {
		t.Fatalf("span %d, in flight %d; want 2, 1", got, n)
	}
	// 102..105 and 110, 111 are not fetched yet: the record keeps them.
	checkRecord(t, tr, 100, append(seq(101, 106), 110, 111))
	mustDone(t, tr, 100)
	if got := tr.Committable(); got != 106 {
		t.Fatalf("committable %d, want 106: 102..105 were done", got)
	}
	checkRecord(t, tr, 106, []int64{110, 111})
	// A fetch that skips 102..104 (compacted away) and begins 105.
	if already, err := tr.Begin(105); !already || err != nil {
		t.Fatalf("begin 105: %v, %v; want already done", already, err)
	}
	if already, err := tr.Begin(107); already || err != nil {
		t.Fatalf("begin 107: %v, %v", already, err)
	}
	if got := tr.Committable(); got != 107 {
		t.Fatalf("committable %d, want 107", got)
	}
	// 106 was never begun: a gap, done; 108, 109 not fetched: not done.
	checkRecord(t, tr, 107, []int64{110, 111})
	mustDone(t, tr, 107)
	if got := tr.Committable(); got != 108 {
		t.Fatalf("committable %d, want 108", got)
	}
	// Begin past the restored set drops it.
	if already, err := tr.Begin(200); already || err != nil {
		t.Fatalf("begin 200: %v, %v", already, err)
	}
	if tr.restored != nil {
		t.Fatalf("restored %v kept behind next", tr.restored)
	}
	mustDone(t, tr, 200)
	if got := tr.Committable(); got != 201 {
		t.Fatalf("committable %d, want 201", got)
	}
}

// TestProgressRejects checks that records for another commit offset,
// garbage and corrupted records are refused with an error, without a panic,
// and restore nothing.
func TestProgressRejects(t *testing.T) {
	good := testRunsRecord(100, []int64{102, 103, 107})
	if _, err := NewFromProgress(100, good); err != nil {
		t.Fatalf("record %q: %v", good, err)
	}
	bad := []string{
		good[:len(good)-1],
		good + "A",
		strings.Replace(good, "o1", "o2", 1),
		strings.Replace(good, ":r:", ":x:", 1),
		strings.Replace(good, ":100:", ":0100:", 1),
		strings.Replace(good, ":100:", ":+100:", 1),
		"o1:100:r:",
		"o1:100:r:====",
		"o1:100:b:AAAAAA",
		"o1:100",
		"o1:-5:r:AQE",
		"o1:99999999999999999999:r:AQE",
		"garbage",
		":::",
		"o1:100:r:" + strings.Repeat("_", 5000),
	}
	for i := range good {
		// Every single-character change is caught.
		for _, ch := range []byte{'0', 'A', '_', ':', 'z'} {
			if good[i] != ch {
				bad = append(bad, good[:i]+string(ch)+good[i+1:])
			}
		}
		bad = append(bad, good[:i]+good[i+1:])
	}
	// Records that pass the checksum but break the format.
	bad = append(bad,
		withChecksum("o1:100:r:", 0, 1),       // zero run
		withChecksum("o1:100:r:", 1, 1, 2),    // odd number of runs
		withChecksum("o1:100:r:", 0x80),       // truncated varint
		withChecksum("o1:100:b:", 0x03),       // commit offset done
		withChecksum("o1:100:b:", 0x02, 0x00), // not trimmed
		withChecksum("o1:100:b:"),             // empty bitmap
		withChecksum("o1:9223372036854775000:r:", 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f), // past the last offset
		withChecksum("o1:100:r:", 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01),           // varint overflow
	)
	for _, meta := range bad {
		tr, err := NewFromProgress(100, meta)
		if err == nil {
			t.Fatalf("record %q accepted", meta)
		}
		checkFresh(t, tr, 100, meta)
	}
	tr, err := NewFromProgress(101, good)
	if err == nil || !strings.Contains(err.Error(), "commit offset 100, not 101") {
		t.Fatalf("record for 100 restored at 101: %v", err)
	}
	checkFresh(t, tr, 101, good)
	if tr, err := NewFromProgress(-1, good); err == nil || tr.Committable() != -1 {
		t.Fatalf("record restored with an unknown commit: %v", err)
	}
}

func withChecksum(header string, data ...byte) string {
	sum := crc32.Checksum(append([]byte(header), data...), crc32.MakeTable(crc32.Castagnoli))
	return header + base64.RawURLEncoding.EncodeToString(binary.BigEndian.AppendUint32(data, sum))
}

// checkFresh checks that tr behaves like New(commit).
func checkFresh(t *testing.T, tr *Tracker, commit int64, meta string) {
	t.Helper()
	if tr == nil || tr.restored != nil || tr.Committable() != commit {
		t.Fatalf("record %q: tracker not fresh", meta)
	}
	for o := commit; o < commit+10; o++ {
		if already, err := tr.Begin(o); already || err != nil {
			t.Fatalf("record %q: begin %d: %v, %v", meta, o, already, err)
		}
	}
}

// TestProgressSeeds checks the records FuzzProgress starts from, so that the
// fuzzer begins from accepted records.
func TestProgressSeeds(t *testing.T) {
	for _, c := range []struct {
		commit int64
		meta   string
		want   []interval
	}{
		{1000, "o1:1000:r:AgMFAe95uDw", []interval{{1002, 1005}, {1010, 1011}}},
		{7, "o1:7:b:HATwzQRQRg", []interval{{9, 12}, {17, 18}, {27, 31}}},
		{0, "o1:0:r:Af__A02Kp0Q", []interval{{1, 65536}}},
	} {
		tr, err := NewFromProgress(c.commit, c.meta)
		if err != nil {
			t.Fatalf("record %q: %v", c.meta, err)
		}
		if len(tr.restored) != len(c.want) {
			t.Fatalf("record %q restored %v, want %v", c.meta, tr.restored, c.want)
		}
		for i := range c.want {
			if tr.restored[i] != c.want[i] {
				t.Fatalf("record %q restored %v, want %v", c.meta, tr.restored, c.want)
			}
		}
	}
}
