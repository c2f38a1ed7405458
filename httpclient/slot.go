package httpclient

import (
	"context"
	"errors"
	"fmt"
	"net/http/httptrace"
	"sync"
	"time"
)

// slotTick is how often the watchdog looks at the slots: how late past
// http.timeout, or past the end of its caller's context, an attempt made
// in a slot may be canceled.
const slotTick = 10 * time.Millisecond

// A Slot is where one goroutine makes attempts one after another (a
// dispatcher sender): it bounds them by http.timeout without a
// context.WithTimeout per attempt. Its context is canceled only when an
// attempt overruns (or its caller's context ends), by the Sender's
// watchdog goroutine, which checks every slot every slotTick; so a
// sequence of attempts that end in time shares one context and allocates
// no timer, no context and none of the cancellation records net/http links
// to it (together the largest share of a request's garbage). A Slot is
// used by one goroutine at a time; Close it when done.
type Slot struct {
	s *Sender

	mu       sync.Mutex
	ctx      context.Context // canceled by the watchdog only; replaced once canceled
	cancel   context.CancelCauseFunc
	parent   context.Context // the caller's context of the attempt under way; nil between attempts
	deadline time.Time       // of the attempt under way
}

// errAttemptTimeout is the cause of an attempt canceled for http.timeout.
var errAttemptTimeout = fmt.Errorf("attempt exceeded http.timeout: %w", context.DeadlineExceeded)

// NewSlot returns a Slot of s. Without an http.timeout it needs no
// watchdog, and its attempts are those of s.Attempt. Not after s.Close.
func (s *Sender) NewSlot() *Slot {
	sl := &Slot{s: s}
	if s.timeout <= 0 {
		return sl
	}
	sl.ctx, sl.cancel = context.WithCancelCause(context.Background())
	s.slotsMu.Lock()
	defer s.slotsMu.Unlock()
	if s.slots == nil {
		s.slots = make(map[*Slot]struct{})
	}
	s.slots[sl] = struct{}{}
	if !s.watching {
		s.watching = true
		s.watchers.Go(s.watch)
	}
	return sl
}

// Close releases sl; the watchdog exits with the last slot.
func (sl *Slot) Close() {
	if sl.cancel == nil {
		return
	}
	s := sl.s
	s.slotsMu.Lock()
	delete(s.slots, sl)
	s.slotsMu.Unlock()
	sl.cancel(context.Canceled)
}

// Attempt is s.Attempt made in the slot.
func (sl *Slot) Attempt(ctx context.Context, c *Call) Step { return sl.s.attempt(ctx, c, sl) }

// begin returns the context of an attempt of the caller's ctx that must
// end by deadline: the slot's, with ctx's values and, when ctx holds no
// client trace of its own, tr as its client trace (traced reports it does:
// otherwise the caller composes tr with ctx's).
func (sl *Slot) begin(ctx context.Context, deadline time.Time, tr *httptrace.ClientTrace) (actx context.Context, traced bool) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.ctx.Err() != nil {
		// The previous attempt overran.
		sl.ctx, sl.cancel = context.WithCancelCause(context.Background())
	}
	sl.parent, sl.deadline = ctx, deadline
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d // the caller's comes first, as under context.WithTimeout
	}
	if httptrace.ContextClientTrace(ctx) != nil {
		tr = nil
	}
	return &slotContext{Context: sl.ctx, values: ctx, deadline: deadline, trace: tr}, tr != nil
}

// end ends the attempt begun last.
func (sl *Slot) end() {
	sl.mu.Lock()
	sl.parent = nil
	sl.mu.Unlock()
}

// expire cancels the attempt under way if it overran or its caller's
// context ended.
func (sl *Slot) expire(now time.Time) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if sl.parent == nil {
		return
	}
	switch {
	case sl.parent.Err() != nil:
		sl.cancel(context.Cause(sl.parent))
	case !now.Before(sl.deadline):
		sl.cancel(errAttemptTimeout)
	default:
		return
	}
	sl.parent = nil
}

// watch is the watchdog goroutine: it expires the slots' overrunning
// attempts every slotTick, and exits once s has no slot left (NewSlot
// starts another).
func (s *Sender) watch() {
	t := time.NewTicker(slotTick)
	defer t.Stop()
	var slots []*Slot
	for now := range t.C {
		s.slotsMu.Lock()
		if len(s.slots) == 0 {
			s.watching = false
			s.slotsMu.Unlock()
			return
		}
		slots = slots[:0]
		for sl := range s.slots {
			slots = append(slots, sl)
		}
		s.slotsMu.Unlock()
		for _, sl := range slots {
			sl.expire(now)
		}
		clear(slots)
	}
}

// slotContext is the context of an attempt made in a slot: cancellation
// (and the cancelCtx that net/http's own contexts link to) is the slot's,
// values are the caller's.
type slotContext struct {
	context.Context // the slot's
	values          context.Context
	deadline        time.Time              // the earlier of the attempt's and the caller's
	trace           *httptrace.ClientTrace // the attempt's client trace, or nil
}

func (c *slotContext) Deadline() (time.Time, bool) { return c.deadline, true }

// Err reports an attempt canceled for http.timeout as DeadlineExceeded,
// as context.WithTimeout would.
func (c *slotContext) Err() error {
	err := c.Context.Err()
	if err != nil && errors.Is(context.Cause(c.Context), context.DeadlineExceeded) {
		return context.DeadlineExceeded
	}
	return err
}

// Value answers the client trace key with the attempt's trace (sparing a
// context.WithValue per attempt), then looks in the slot's context, which
// answers only for the key of its cancelCtx (so that context.WithCancel on
// an attempt's context links to the slot's instead of starting a
// goroutine), then in the caller's.
func (c *slotContext) Value(key any) any {
	if c.trace != nil && key == clientTraceKey {
		return c.trace
	}
	if v := c.Context.Value(key); v != nil {
		return v
	}
	return c.values.Value(key)
}

// clientTraceKey is net/http/httptrace's (unexported) context key of a
// *httptrace.ClientTrace, caught as httptrace.ContextClientTrace looks it
// up.
var clientTraceKey = func() any {
	var k keyCatcher
	httptrace.ContextClientTrace(&k)
	return k.key
}()

// keyCatcher is a context that records the key it is asked for.
type keyCatcher struct {
	context.Context // nil: only Value is called
	key             any
}

func (k *keyCatcher) Value(key any) any {
	k.key = key
	return nil
}
