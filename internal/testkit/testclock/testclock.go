// Package testclock is a clock tests move by hand, for the now func()
// time.Time fields of the code under test. It is apart from testkit so that
// the tests of packages without Kafka do not link librdkafka (cgo).
package testclock

import (
	"sync"
	"time"
)

// Clock is a clock a test moves by hand. It is safe for concurrent use.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// New returns a clock that reads start until moved.
func New(start time.Time) *Clock { return &Clock{t: start} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Add moves the clock forward by d.
func (c *Clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}
