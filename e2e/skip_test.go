package e2e

import (
	"fmt"
	"os"
	"testing"
)

// skipMissing skips t because a tool it needs is missing: what is missing
// and enable says how to get it. With ORDERLY_E2E=1 (CI) it fails instead.
// It also appends "TestName: what: enable" to the file named by
// $ORDERLY_SKIP_REPORT, from which `make test` lists the skips at the end
// of the run (go test prints a skip only with -v).
func skipMissing(t *testing.T, what, enable string) {
	t.Helper()
	msg := what + ": " + enable
	if os.Getenv("ORDERLY_E2E") == "1" {
		t.Fatal(msg + " (ORDERLY_E2E=1 makes this a failure)")
	}
	if path := os.Getenv("ORDERLY_SKIP_REPORT"); path != "" {
		if f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644); err == nil {
			fmt.Fprintf(f, "%s: %s\n", t.Name(), msg)
			f.Close()
		}
	}
	t.Skip(msg + " (ORDERLY_E2E=1 makes this a failure)")
}
