package dlq

import (
	"testing"

	"github.com/orderly-dispatch/orderly/internal/kafkatest"
)

// harness is kafkatest's broker, sink and producer; the tests add ways to
// seed the DLQ and run Admins against it.
type harness struct{ *kafkatest.Harness }

func newHarness(t *testing.T, partitions int) *harness {
	t.Helper()
	return &harness{kafkatest.New(t, partitions, nil)}
}
