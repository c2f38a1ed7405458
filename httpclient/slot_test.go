package httpclient

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptrace"
	"sync/atomic"
	"testing"
	"time"
)

// newSlotTest starts a target answering with respond and returns it with a
// Sender of the given http.timeout and a slot of it.
func newSlotTest(t *testing.T, timeout time.Duration, respond func(http.ResponseWriter, *http.Request, int)) (*recorder, *Sender, *Slot) {
	t.Helper()
	rec := newRecorder(t, respond)
	h := baseHTTP()
	h.Timeout = d(timeout)
	s, _ := newTestSender(t, h, nil)
	sl := s.NewSlot()
	t.Cleanup(sl.Close)
	return rec, s, sl
}

// hangFirst leaves the first request unanswered until its client gives up.
func hangFirst(_ http.ResponseWriter, r *http.Request, n int) {
	if n == 0 {
		<-r.Context().Done()
	}
}

// TestSlotAttemptTimeout: an attempt in a slot that the target does not
// answer within http.timeout fails retryably with DeadlineExceeded, and the
// slot's next attempt (on a fresh context) is delivered.
func TestSlotAttemptTimeout(t *testing.T) {
	rec, _, sl := newSlotTest(t, 100*time.Millisecond, hangFirst)
	var c Call
	c.Reset(post(rec.URL, nil), "k")
	start := time.Now()
	st := sl.Attempt(context.Background(), &c)
	if el := time.Since(start); el < 100*time.Millisecond {
		t.Fatalf("first attempt ended after %s, before http.timeout", el)
	}
	if st.Outcome != Retry {
		t.Fatalf("first attempt: outcome %v (%v), want Retry", st.Outcome, st.Err)
	}
	var c2 Call
	c2.Reset(post(rec.URL, nil), "k2")
	if st := sl.Attempt(context.Background(), &c2); st.Outcome != Delivered {
		t.Fatalf("next attempt in the slot: outcome %v (%v), want Delivered", st.Outcome, st.Err)
	}
	// The call that timed out, attempted again in the same slot.
	if st := sl.Attempt(context.Background(), &c); st.Outcome != Delivered {
		t.Fatalf("retry of the first call: outcome %v (%v), want Delivered", st.Outcome, st.Err)
	}
	if rec.n() != 3 {
		t.Fatalf("%d requests reached the target, want 3", rec.n())
	}
}

// TestSlotTimeoutError: the error of an attempt cut by http.timeout in a
// slot wraps context.DeadlineExceeded, as one under context.WithTimeout does.
func TestSlotTimeoutError(t *testing.T) {
	rec, s, sl := newSlotTest(t, 50*time.Millisecond, hangFirst)
	var c Call
	c.Reset(post(rec.URL, nil), "k")
	if err := s.prepare(&c); err != nil {
		t.Fatal(err)
	}
	resp, _, err := s.roundTrip(context.Background(), &c, sl)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("round trip: response %v, error %v; want one wrapping context.DeadlineExceeded", resp, err)
	}
}

// TestSlotCallerCancel: when the caller's context ends during an attempt in
// a slot, the attempt ends (within the watchdog's tick) as Canceled, and the
// slot serves the next caller.
func TestSlotCallerCancel(t *testing.T) {
	rec, _, sl := newSlotTest(t, time.Minute, hangFirst)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan Step, 1)
	var c Call
	c.Reset(post(rec.URL, nil), "k")
	go func() { done <- sl.Attempt(ctx, &c) }()
	waitFor(t, 5*time.Second, "the attempt to reach the target", func() bool { return rec.n() >= 1 })
	cancel()
	select {
	case st := <-done:
		if st.Outcome != Canceled || !errors.Is(st.Err, context.Canceled) {
			t.Fatalf("outcome %v (%v), want Canceled wrapping context.Canceled", st.Outcome, st.Err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the attempt did not end after its caller's context did")
	}
	var c2 Call
	c2.Reset(post(rec.URL, nil), "k2")
	if st := sl.Attempt(context.Background(), &c2); st.Outcome != Delivered {
		t.Fatalf("next attempt in the slot: outcome %v (%v), want Delivered", st.Outcome, st.Err)
	}
}

// TestSlotWatchdogStops: the watchdog runs while a slot is open and exits
// once the last one is closed; a new slot starts it again.
func TestSlotWatchdogStops(t *testing.T) {
	s, _ := newTestSender(t, baseHTTP(), nil)
	watching := func() bool {
		s.slotsMu.Lock()
		defer s.slotsMu.Unlock()
		return s.watching
	}
	a, b := s.NewSlot(), s.NewSlot()
	if !watching() {
		t.Fatal("no watchdog with two slots open")
	}
	a.Close()
	b.Close()
	waitFor(t, 5*time.Second, "the watchdog to exit", func() bool { return !watching() })
	c := s.NewSlot()
	if !watching() {
		t.Fatal("no watchdog after a slot was opened again")
	}
	c.Close()
	s.Close() // waits for the watchdog
	if watching() {
		t.Fatal("the watchdog runs after the last slot and the Sender were closed")
	}
}

// TestSlotCallerDeadline: an attempt in a slot reports the earlier of its
// own deadline and its caller's, as context.WithTimeout would (a dialer
// bounds its dial by it), and ends with the caller's deadline.
func TestSlotCallerDeadline(t *testing.T) {
	rec, s, sl := newSlotTest(t, time.Minute, hangFirst)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	want, _ := ctx.Deadline()
	actx, _ := sl.begin(ctx, time.Now().Add(time.Minute), nil)
	if d, ok := actx.Deadline(); !ok || !d.Equal(want) {
		t.Fatalf("deadline %v (%v), want the caller's %v", d, ok, want)
	}
	sl.end()
	var c Call
	c.Reset(post(rec.URL, nil), "k")
	if err := s.prepare(&c); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.roundTrip(ctx, &c, sl); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("round trip past the caller's deadline: error %v, want one wrapping context.DeadlineExceeded", err)
	}
}

// TestSlotConnTrace: an attempt in a slot runs the call's GotConn hook
// (whether it got a connection: what decides an uncounted failure), and,
// when the caller's context holds a client trace of its own, that one's
// too.
func TestSlotConnTrace(t *testing.T) {
	rec, _, sl := newSlotTest(t, time.Minute, statuses(200, 200))
	var c Call
	c.Reset(post(rec.URL, nil), "k")
	if st := sl.Attempt(context.Background(), &c); st.Outcome != Delivered || !c.connected {
		t.Fatalf("outcome %v (%v), connected %v; want Delivered on a connection", st.Outcome, st.Err, c.connected)
	}
	var theirs atomic.Bool
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) { theirs.Store(true) },
	})
	var c2 Call
	c2.Reset(post(rec.URL, nil), "k2")
	if st := sl.Attempt(ctx, &c2); st.Outcome != Delivered || !c2.connected || !theirs.Load() {
		t.Fatalf("outcome %v (%v), connected %v, the caller's hook called %v; want Delivered and both hooks",
			st.Outcome, st.Err, c2.connected, theirs.Load())
	}
}
