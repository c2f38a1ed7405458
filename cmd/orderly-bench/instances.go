package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
)

// instances is Orderly as several processes in one consumer group (the
// -instances flag), each a child like -dispatcher process's: the scale-out
// figures. The backlog is produced once the group has settled, with the
// instances waiting on an empty topic, so that what is measured is the
// group's steady rate, not its rebalances. CPU, memory and allocations are
// the sums over the processes; profiles are those of the first.
type instances struct {
	children   []*childOrderly
	partitions int           // of the topic
	exitedCh   chan struct{} // closed when any child exits
	exitOnce   sync.Once
}

func newInstances(n, partitions int, toml string, verbose bool, b *bencher) (*instances, error) {
	in := &instances{partitions: partitions, exitedCh: make(chan struct{})}
	for range n {
		c, err := newChildOrderly(toml, verbose, b.stderr)
		if err != nil {
			_ = in.shutdown()
			return nil, err
		}
		in.children = append(in.children, c)
	}
	return in, nil
}

// start starts every instance at once and returns when each has joined the
// group and the group is stable: every partition owned by one instance,
// and each instance owning some (no rebalance left to come).
func (in *instances) start(ctx context.Context) error {
	if err := in.startAll(ctx); err != nil {
		return err
	}
	for {
		owned, least := 0.0, math.Inf(1)
		for _, c := range in.children {
			st, err := c.stats()
			if err != nil {
				return err
			}
			owned += st.Partitions
			least = min(least, st.Partitions)
		}
		if int(owned) == in.partitions && least > 0 {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the %d instances did not settle into one group (%v partitions owned, some instance %v)", len(in.children), owned, least)
		case <-in.exitedCh:
			return fmt.Errorf("an instance stopped: %v", in.exitErr())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

func (in *instances) startAll(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(in.children))
	for i, c := range in.children {
		wg.Go(func() {
			errs[i] = c.start(ctx)
			if errs[i] == nil {
				go func() {
					<-c.exited()
					in.exitOnce.Do(func() { close(in.exitedCh) })
				}()
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (in *instances) exited() <-chan struct{} { return in.exitedCh }

func (in *instances) exitErr() error {
	var errs []error
	for i, c := range in.children {
		if err := c.exitErr(); err != nil {
			errs = append(errs, fmt.Errorf("instance %d: %w", i+1, err))
		}
	}
	return errors.Join(errs...)
}

// sum adds up a measure of each child.
func sum[T ~int64](children []*childOrderly, measure func(*childOrderly) T) (n T) {
	for _, c := range children {
		n += measure(c)
	}
	return n
}

func (in *instances) cpu() time.Duration { return sum(in.children, (*childOrderly).cpu) }
func (in *instances) rss() int64         { return sum(in.children, (*childOrderly).rss) }

// peakRSS is the sum of the instances' peaks (not necessarily at once).
func (in *instances) peakRSS() int64 { return sum(in.children, (*childOrderly).peakRSS) }

func (in *instances) stats() (orderlyStats, error) {
	var sum orderlyStats
	for _, c := range in.children {
		st, err := c.stats()
		if err != nil {
			return sum, err
		}
		sum.Mallocs += st.Mallocs
		sum.HeapInuse += st.HeapInuse
		sum.StackInuse += st.StackInuse
		sum.Sys += st.Sys
		sum.Retries += st.Retries
		sum.Pauses += st.Pauses
	}
	return sum, nil
}

func (in *instances) settle() error {
	var errs []error
	for _, c := range in.children {
		errs = append(errs, c.settle())
	}
	return errors.Join(errs...)
}

func (in *instances) startCPUProfile(file string) error { return in.children[0].startCPUProfile(file) }
func (in *instances) stopCPUProfile() error             { return in.children[0].stopCPUProfile() }
func (in *instances) profile(kind, file string) error   { return in.children[0].profile(kind, file) }

// shutdown stops them all at once (each drains and commits).
func (in *instances) shutdown() error {
	errs := make([]error, len(in.children))
	var wg sync.WaitGroup
	for i, c := range in.children {
		wg.Go(func() { errs[i] = c.shutdown() })
	}
	wg.Wait()
	return errors.Join(errs...)
}
