package dispatcher

import "fmt"

// laneState is where a lane is. A lane is in exactly one state at a time;
// the partition's counters of busy and unwaited lanes follow from it (move).
// Every state but laneIdle and laneAbandoned is busy: the lane has work.
type laneState uint8

const (
	laneIdle      laneState = iota // no work: in its partition's map, ready for the key's next message
	laneHeld                       // held by a goroutine (the worker, a sender, a timer, an acknowledgement) that moves it on
	laneQueued                     // in a sender pool's queue, for the pool's next free sender
	parkBackoff                    // on its retry timer after a failed attempt or record write
	parkDLQ                        // for the DLQ's acknowledgement of its head message
	parkRecord                     // for the broker's acknowledgement of its head message's record (records.go)
	parkDLQRetry                   // on its retry timer after a failed DLQ write: a drain does not wait for it
	parkReplaying                  // its key is being replayed: until the replay ends (a drain does not wait for it)
	parkStalled                    // its head message failed and there is no DLQ: until the partition stops
	laneAbandoned                  // its partition stopped: whoever holds or finds it lets it go
)

var laneStateNames = [...]string{"idle", "held", "queued", "backoff", "dlq", "record", "dlq-retry", "replaying", "stalled", "abandoned"}

func (s laneState) String() string {
	if int(s) < len(laneStateNames) {
		return laneStateNames[s]
	}
	return fmt.Sprintf("laneState(%d)", s)
}

// busy reports whether a lane in s has work.
func (s laneState) busy() bool { return s != laneIdle && s != laneAbandoned }

// unwaited reports whether a drain does not wait for a lane in s: it cannot
// finish by itself meanwhile.
func (s laneState) unwaited() bool {
	return s == parkStalled || s == parkDLQRetry || s == parkReplaying
}

// parked reports whether s is one of the park* states: busy, held by
// nobody, out of every pool.
func (s laneState) parked() bool { return s >= parkBackoff && s <= parkStalled }

// laneMoves are the allowed transitions. Only a held lane goes anywhere by
// itself; a queued or parked one is taken back (held) by whoever it waits
// for, except that an acknowledgement may park it again at once (a failed
// DLQ or record write goes to its retry timer). Every busy lane may be
// abandoned; an abandoned one goes nowhere.
var laneMoves = func() (m [laneAbandoned + 1][laneAbandoned + 1]bool) {
	allow := func(from laneState, to ...laneState) {
		for _, t := range to {
			m[from][t] = true
		}
	}
	allow(laneIdle, laneHeld, laneAbandoned)
	allow(laneHeld, laneIdle, laneQueued, parkBackoff, parkDLQ, parkRecord, parkDLQRetry, parkReplaying, parkStalled, laneAbandoned)
	allow(laneQueued, laneHeld, laneAbandoned)
	allow(parkBackoff, laneHeld, laneAbandoned)
	allow(parkDLQ, laneHeld, parkDLQRetry, laneAbandoned)
	allow(parkRecord, laneHeld, parkBackoff, laneAbandoned)
	allow(parkDLQRetry, laneHeld, laneAbandoned)
	allow(parkReplaying, laneHeld, laneAbandoned)
	allow(parkStalled, laneAbandoned)
	return m
}()

// strictLanes makes a move the table does not allow panic (tests); otherwise
// it is logged at error level and made anyway.
var strictLanes = false

// moveLocked moves l to state to and keeps its partition's counters of busy
// and unwaited lanes; the caller holds p.mu.
func (l *lane) moveLocked(to laneState) {
	from, p := l.state, l.p
	if !laneMoves[from][to] {
		if strictLanes {
			panic(fmt.Sprintf("lane %v: move from %s to %s", l.key, from, to))
		}
		p.d.log.Error("lane state: a move the design does not allow (a bug)", "topic", p.topic, "partition", p.id,
			"from", from.String(), "to", to.String())
	}
	l.state = to
	if from == laneIdle {
		p.idle.remove(l) // idleLocked puts it on the list when it goes idle
	}
	if from.busy() != to.busy() {
		if to.busy() {
			p.busy++
		} else {
			p.busy--
		}
	}
	if from.unwaited() != to.unwaited() {
		if to.unwaited() {
			p.stalled++
		} else {
			p.stalled--
		}
	}
	p.checkQuietLocked()
}
