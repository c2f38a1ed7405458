package main

import (
	"strings"
	"testing"
)

// TestDemo: both demos run in process and verify what they claim: the HTTP
// one every event in order at the sink, the transform one every hashed
// record in order on names_hashed with its event's md5.
func TestDemo(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"demo", "-messages", "2000", "-keys", "50", "-partitions", "4"},
			[]string{"delivered      2000/2000", "http requests  2000"}},
		{[]string{"demo", "-transform", "-messages", "2000", "-keys", "50", "-partitions", "4"},
			[]string{"delivered      2000/2000", "md5 and key    verified", "records        2000 on names_hashed"}},
	} {
		code, out, errOut := runCLI(t, tc.args...)
		if code != 0 {
			t.Fatalf("%v: exit %d\n%s\n%s", tc.args, code, out, errOut)
		}
		for _, w := range append(tc.want, "per-key order  verified", "result: OK") {
			if !strings.Contains(out, w) {
				t.Fatalf("%v: output lacks %q:\n%s", tc.args, w, out)
			}
		}
	}
}
