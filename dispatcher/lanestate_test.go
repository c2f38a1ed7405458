package dispatcher

import (
	"log/slog"
	"testing"
)

// Every dispatcher test runs with the lane state table enforced: a move it
// does not allow panics.
func init() { strictLanes = true }

// TestLaneMoves: the transition table says what the design does, and
// moveLocked keeps the partition's counters of busy and unwaited lanes.
func TestLaneMoves(t *testing.T) {
	all := []laneState{laneIdle, laneHeld, laneQueued, parkBackoff, parkDLQ, parkRecord, parkDLQRetry, parkReplaying, parkStalled, laneAbandoned}
	for _, from := range all {
		for _, to := range all {
			allowed := laneMoves[from][to]
			var want bool
			switch {
			case from == laneAbandoned:
				want = false // terminal
			case to == laneAbandoned:
				want = true // a stop drops a lane wherever it is
			case from == laneHeld:
				want = to != laneHeld // only a holder moves a lane on
			case to == laneHeld:
				want = from != parkStalled // taken back by what it waits for; stalled waits for the stop
			default:
				// an acknowledgement may park a lane again at once
				want = from == parkDLQ && to == parkDLQRetry || from == parkRecord && to == parkBackoff
			}
			if allowed != want {
				t.Errorf("%s -> %s allowed = %v, want %v", from, to, allowed, want)
			}
		}
	}

	p := &partition{d: &Dispatcher{log: slog.New(slog.DiscardHandler)}}
	l := &lane{p: p}
	for _, step := range []struct {
		to            laneState
		busy, stalled int
	}{
		{laneHeld, 1, 0}, {laneQueued, 1, 0}, {laneHeld, 1, 0}, {parkDLQ, 1, 0}, {parkDLQRetry, 1, 1},
		{laneHeld, 1, 0}, {parkReplaying, 1, 1}, {laneHeld, 1, 0}, {parkStalled, 1, 1}, {laneAbandoned, 0, 0},
	} {
		p.mu.Lock()
		l.moveLocked(step.to)
		p.mu.Unlock()
		if p.busy != step.busy || p.stalled != step.stalled {
			t.Fatalf("after the move to %s: busy %d stalled %d, want %d and %d", step.to, p.busy, p.stalled, step.busy, step.stalled)
		}
	}
	defer func() {
		if recover() == nil {
			t.Fatal("a move out of abandoned did not panic")
		}
	}()
	l.moveLocked(laneHeld)
}
