package testkit

import (
	"sync"
	"sync/atomic"
	"time"
)

// Gate makes a Sink refuse deliveries, so that they are dead-lettered, and
// hold them at the target, so that a job can be caught mid-way. It is safe
// for concurrent use.
type Gate struct {
	refusing, holding atomic.Bool
	held              chan struct{} // closed by Release
	release           sync.Once
}

// NewGate installs a gate as s.Status and s.Delay, before s serves. While
// refusing, which it starts doing, it answers status to the deliveries
// match picks (nil: every delivery); while holding it keeps them waiting.
func NewGate(s *Sink, status int, match func(*Delivery) bool) *Gate {
	g := &Gate{held: make(chan struct{})}
	g.refusing.Store(true)
	picks := func(d *Delivery) bool { return match == nil || match(d) }
	s.Status = func(d *Delivery) int {
		if g.refusing.Load() && picks(d) {
			return status
		}
		return 0
	}
	s.Delay = func(d *Delivery) time.Duration {
		if g.holding.Load() && picks(d) {
			<-g.held
		}
		return 0
	}
	return g
}

// Refuse sets whether the gate refuses.
func (g *Gate) Refuse(on bool) { g.refusing.Store(on) }

// Hold keeps the deliveries the gate picks waiting until Release.
func (g *Gate) Hold() { g.holding.Store(true) }

// Release lets the held deliveries go, for good: the gate holds nothing
// after. It may be called more than once. A test that holds releases before
// its service stops (defer g.Release()), since a shutdown waits for the
// attempts under way.
func (g *Gate) Release() {
	g.holding.Store(false)
	g.release.Do(func() { close(g.held) })
}
