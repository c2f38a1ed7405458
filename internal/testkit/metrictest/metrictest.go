// Package metrictest reads Prometheus registries in tests. It is apart from
// testkit so that the tests of packages without Kafka do not link
// librdkafka (cgo).
package metrictest

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// SeriesCount returns how many series of the named metric g has: what a
// test that label values (hosts, targets) are forgotten bounds.
func SeriesCount(t testing.TB, g prometheus.Gatherer, name string) int {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric())
		}
	}
	return 0
}
