package testkit

import (
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"testing"
)

func hashedOf(r Record, seq int64) []byte {
	sum := md5.Sum(r.Value)
	return fmt.Appendf(nil, `{"key":%q,"seq":%d,"hash":%q}`, r.Key, seq, hex.EncodeToString(sum[:]))
}

// TestHashedCheck: the checker counts what is missing, duplicated, out of
// order or wrong, and passes only the complete, ordered, right set.
func TestHashedCheck(t *testing.T) {
	g := &Generator{Keys: 2}
	recs := g.Records(6) // key-0: seq 0,1,2 at 0,2,4; key-1 at 1,3,5
	c := NewHashedCheck(recs)
	for i, r := range recs {
		c.Add(r.Key, hashedOf(r, int64(i/2)))
	}
	if r := c.Report(); !r.OK() || r.Records != 6 || r.Duplicates != 0 {
		t.Fatalf("complete run: %s", r)
	}

	c = NewHashedCheck(recs)
	c.Add(recs[2].Key, hashedOf(recs[2], 1)) // key-0 seq 1 before 0
	c.Add(recs[0].Key, hashedOf(recs[0], 0))
	c.Add(recs[0].Key, hashedOf(recs[0], 0))     // again
	c.Add([]byte("key-1"), hashedOf(recs[0], 0)) // under another key
	c.Add(recs[1].Key, hashedOf(recs[3], 0))     // hash of another event
	c.Add(recs[1].Key, []byte(`not json`))       // not a transform
	r := c.Report()
	if r.OK() || r.Violations != 1 || r.Duplicates != 1 || r.Wrong != 3 || r.Missing != 4 || len(r.Problems) != 3 {
		t.Fatalf("broken run: %s", r)
	}
}
