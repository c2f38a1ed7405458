package dispatcher

import (
	"slices"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Hot keys. A key holds at most dispatch.max_key_in_flight messages per
// partition. Its further messages are deferred: the worker lets them go
// (their memory too) and notes their offsets, which stay pending in the
// tracker, so nothing past them is committed. Once the key is down to half
// of its cap, the poll loop seeks back to the oldest deferred offset and
// reads the partition again up to where it was (a pass); the worker takes
// the deferred messages, in order, and drops the others, which are held
// or finished already. The key's order holds because, once one of its
// messages is deferred, all its later ones are too until the next pass.
// A pass ends early once every key it serves is at its cap again: the
// rest of it would only be deferred again.

// passStart is the Opaque of the marker the poll loop puts on the worker's
// queue before the messages of a pass: offsets below end are read again.
type passStart struct{ end, seq int64 }

// deferLocked reports whether m, headed for lane l (nil if none yet), must
// be deferred, and if so notes it.
func (p *partition) deferLocked(l *lane, m *filters.Message) bool {
	keyed := len(m.Key) > 0
	if !keyed && p.d.cfg.Dispatch.Unkeyed == config.UnkeyedParallel {
		return false // a lane per message: nothing to cap
	}
	deferred := false
	if keyed && len(p.deferKeys) > 0 {
		_, deferred = p.deferKeys[string(m.Key)]
	} else if !keyed {
		deferred = p.deferUnkeyed
	}
	if !deferred && (l == nil || len(l.q) < p.d.keyCap) {
		return false
	}
	p.deferred = append(p.deferred, m.Offset)
	if deferred {
		return true
	}
	if !keyed {
		p.deferUnkeyed = true
	} else {
		p.deferKeys[string(m.Key)] = struct{}{}
	}
	if p.passAt < len(p.pass) {
		if p.passCapped++; p.passCapped >= p.passKeys {
			p.cutPassLocked()
		}
	}
	return true
}

// cutPassLocked ends the current pass early: its members not met yet are
// deferred again as they are (their keys are all at their cap), and the
// poll loop skips to the pass's end. What the pass still reads meanwhile
// is dropped.
func (p *partition) cutPassLocked() {
	p.deferred = append(p.deferred, p.pass[p.passAt:]...)
	p.pass, p.passAt = nil, 0
	p.cutPass.Store(p.passSeq)
	p.d.rewindSoon.Store(true)
}

// deferredOut lets go of a message deferLocked deferred.
func (p *partition) deferredOut(it *item) {
	telemetry.MessageOutcome(it.span(), telemetry.OutcomeDeferred)
	it.span().End()
	p.unhold(heldSize(len(it.msg.Key), len(it.msg.Value), len(it.msg.Headers)))
	p.d.metrics.Deferred.Inc()
}

// roomLocked is called when l's queue shrank: a key with deferred messages
// down to half of its cap asks for a pass.
func (p *partition) roomLocked(l *lane) {
	if len(l.q) > p.d.keyCap/2 || p.rewind.Load() {
		return
	}
	switch l.key.kind {
	case laneKeyed:
		if _, ok := p.deferKeys[l.key.key]; !ok {
			return
		}
	case laneUnkeyed:
		if !p.deferUnkeyed {
			return
		}
	default:
		return
	}
	p.rewind.Store(true)
	p.d.rewindSoon.Store(true)
}

// startPass, on the worker at a pass marker, makes every deferred offset
// a member of the new pass and frees the keys: the pass hands their
// messages to lanes again, deferring anew those still without room.
func (p *partition) startPass(end, seq int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pass := append(slices.Clone(p.pass[p.passAt:]), p.deferred...)
	slices.Sort(pass)
	p.pass, p.passAt, p.passEnd, p.passSeq = slices.Compact(pass), 0, end, seq
	p.passKeys, p.passCapped = len(p.deferKeys), 0
	if p.deferUnkeyed {
		p.passKeys++
	}
	p.deferred = nil
	clear(p.deferKeys)
	p.deferUnkeyed = false
}

// reread reports, for a message read again by a pass (offset below
// passEnd), whether it is one the pass takes. Deferred offsets the pass
// did not meet in order are gone from the log (retention): they are
// finished as lost, or the partition's commits would never pass them.
func (p *partition) reread(off int64) bool {
	p.mu.Lock()
	var gone []int64
	for p.passAt < len(p.pass) && p.pass[p.passAt] < off {
		gone = append(gone, p.pass[p.passAt])
		p.passAt++
	}
	take := p.passAt < len(p.pass) && p.pass[p.passAt] == off
	if take {
		p.passAt++
	}
	p.mu.Unlock()
	for _, o := range gone {
		p.d.log.Error("a deferred message is no longer in the log (retention?): it cannot be delivered",
			"topic", p.topic, "partition", p.id, "offset", o)
		if err := p.tracker.Done(o); err != nil {
			p.d.log.Error("offset tracking", "topic", p.topic, "partition", p.id, "error", err)
		}
		p.finished.Add(1)
		p.d.outcome(telemetry.OutcomeLost).Inc()
	}
	return take
}

// rewindFrom returns where the next pass starts: the oldest deferred
// offset not yet taken, false if there is none on the worker's side yet.
func (p *partition) rewindFrom() (int64, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	from, ok := int64(0), false
	if p.passAt < len(p.pass) {
		from, ok = p.pass[p.passAt], true
	}
	if len(p.deferred) > 0 && (!ok || p.deferred[0] < from) {
		from, ok = p.deferred[0], true
	}
	return from, ok
}

// rewind, on the poll loop, starts a pass on each partition that asked for
// one and can: not paused, not revoking, its previous pass read to its end.
func (d *Dispatcher) rewind() {
	if !d.rewindSoon.Swap(false) {
		return
	}
	for _, p := range d.parts {
		if cut := p.cutPass.Swap(0); cut != 0 && cut == p.passes && p.next < p.rereadEnd && !p.revoking {
			// The worker cut the current pass short (a cut of an earlier
			// pass is stale): read on from its end.
			to := p.rereadEnd
			tp := p.tp
			tp.Offset = kafka.Offset(to)
			if _, err := d.consumer.SeekPartitions([]kafka.TopicPartition{tp}); err != nil {
				d.log.Warn("seek past a pass", "topic", p.topic, "partition", p.id, "offset", to, "error", err)
			} else {
				p.next = to
			}
		}
		if !p.rewind.Load() || p.revoking {
			continue
		}
		if p.paused || p.next < p.rereadEnd {
			d.rewindSoon.Store(true) // later
			continue
		}
		p.rewind.Store(false)
		from, ok := p.rewindFrom()
		if !ok {
			continue
		}
		tp := p.tp
		tp.Offset = kafka.Offset(from)
		if _, err := d.consumer.SeekPartitions([]kafka.TopicPartition{tp}); err != nil {
			d.log.Warn("seek back for deferred messages", "topic", p.topic, "partition", p.id, "offset", from, "error", err)
			p.rewind.Store(true)
			d.rewindSoon.Store(true)
			continue
		}
		// The marker goes to the worker before any message read from the
		// seek on: the worker has seen every deferral by then.
		p.passes++
		p.in <- &kafka.Message{TopicPartition: p.tp, Opaque: passStart{end: p.next, seq: p.passes}}
		d.log.Debug("reading deferred messages again", "topic", p.topic, "partition", p.id, "from", from, "to", p.next)
		// From here the pass reads again up to where the partition was read;
		// a resume after a pause seeks to next, within the pass.
		p.rereadEnd, p.next = p.next, from
	}
}
