package dlq

import (
	"cmp"
	"context"
	"encoding/json"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// DLQ headers of a message dead-lettered because its key was quarantined.
const (
	HeaderQuarantined   = "orderly.quarantined"    // "true"
	HeaderQuarantinedBy = "orderly.quarantined_by" // <topic>/<partition>/<offset> of the message whose failure quarantined the key
)

// KeyState is a key's state in the quarantine.
type KeyState uint8

const (
	// KeyFree: the key's messages are delivered as usual.
	KeyFree KeyState = iota
	// KeyQuarantined: a message of the key was dead-lettered; its later
	// messages go to the DLQ, in order, without an attempt.
	KeyQuarantined
	// KeyReplaying: a replay redelivers the key's dead letters; its live
	// messages wait behind it.
	KeyReplaying
)

var keyStateNames = map[KeyState]string{KeyFree: "free", KeyQuarantined: "quarantined", KeyReplaying: "replaying"}

func (s KeyState) String() string { return keyStateNames[s] }

// Cause names the message whose failure quarantined a key.
type Cause struct {
	Topic     string `json:"topic"`
	Partition int32  `json:"partition"`
	Offset    int64  `json:"offset"`
}

func (c Cause) String() string {
	return c.Topic + "/" + strconv.Itoa(int(c.Partition)) + "/" + strconv.FormatInt(c.Offset, 10)
}

// keyRecord is the value of a quarantine topic record; its key is
// "<source topic>/<message key>" (topic names cannot hold a slash). A
// released key is a tombstone, so compaction forgets it.
type keyRecord struct {
	State string    `json:"state"` // "quarantined" or "replaying"
	Cause Cause     `json:"cause"`
	Since time.Time `json:"since"`
	// Failed (replaying only): a record of the key failed again in a replay
	// that was handed over; its next run copies the key's later records
	// forward behind the failed one, whose original Cause names.
	Failed bool `json:"failed,omitempty"`
}

type keyEntry struct {
	state  KeyState
	cause  Cause
	failed bool
}

// Quarantine is the set of quarantined keys (dlq.quarantine_keys), kept in
// a compacted Kafka topic so that it survives restarts and follows
// partitions to whichever instance owns them: every instance reads the
// whole topic at start and then follows it. A key's owner changes its
// state (the dispatcher when it dead-letters, a replay when it redelivers
// or releases) and sees its own change once the topic acknowledged it
// (a write that fails changes nothing here), before its reader reaches
// it; the others see it when they read it. The reader then passes over the
// key's records older than that write, so that the state never goes back.
// Safe for concurrent use; Run follows the topic until its context ends,
// Close then releases the clients.
type Quarantine struct {
	log     *slog.Logger
	metrics *telemetry.Metrics
	store   *compacted

	mu      sync.Mutex // protects the fields below
	keys    map[string]keyEntry
	waiters map[string][]func() // called once at the key's next change
	// own holds the offset of this instance's latest write of a key,
	// applied before the reader reached it; gone once the reader did.
	own map[string]int64
}

// QuarantineTopic is the topic a configuration keeps its quarantine in.
func QuarantineTopic(cfg *config.Config) string {
	return cmp.Or(cfg.DLQ.QuarantineTopic, cfg.DLQ.Topic+".quarantine")
}

// NewQuarantine connects to brokers, creates the quarantine topic if it
// does not exist (one partition, compacted) and reads it to its end.
func NewQuarantine(ctx context.Context, brokers string, cfg *config.Config, log *slog.Logger, m *telemetry.Metrics) (*Quarantine, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	q := &Quarantine{log: log, metrics: m, keys: map[string]keyEntry{}, waiters: map[string][]func(){}, own: map[string]int64{}}
	store, err := openCompacted(ctx, "quarantine", QuarantineTopic(cfg), brokers, cfg.Kafka.GroupID+".quarantine-reader", cfg, log, m, q.apply)
	if err != nil {
		return nil, err
	}
	q.store = store
	q.log.Info("quarantine loaded", "topic", store.topic, "keys", q.Count())
	return q, nil
}

// Run follows the quarantine topic until ctx ends.
func (q *Quarantine) Run(ctx context.Context) { q.store.follow(ctx) }

// Close releases the clients. Run must have returned.
func (q *Quarantine) Close() { q.store.close() }

// apply takes a record read from the topic into the map.
func (q *Quarantine) apply(m *kafka.Message) {
	var e keyEntry
	if m.Value != nil {
		var r keyRecord
		if err := json.Unmarshal(m.Value, &r); err != nil {
			q.log.Warn("quarantine: unreadable record skipped", "offset", m.TopicPartition.Offset, "error", err)
			return
		}
		e = keyEntry{state: KeyQuarantined, cause: r.Cause}
		if r.State == KeyReplaying.String() {
			e.state, e.failed = KeyReplaying, r.Failed
		}
	}
	id, off := string(m.Key), int64(m.TopicPartition.Offset)
	q.mu.Lock()
	defer q.mu.Unlock()
	if at, ok := q.own[id]; ok {
		if off < at {
			return // older than this instance's own write, applied already
		}
		delete(q.own, id)
	}
	q.setLocked(id, e)
}

// setLocked records a key's state and wakes whoever waits for it.
func (q *Quarantine) setLocked(id string, e keyEntry) {
	if old, ok := q.keys[id]; ok && old == e || !ok && e.state == KeyFree {
		return
	}
	if e.state == KeyFree {
		delete(q.keys, id)
	} else {
		q.keys[id] = e
	}
	q.metrics.QuarantinedKeys.Set(float64(len(q.keys)))
	ws := q.waiters[id]
	delete(q.waiters, id)
	for _, w := range ws {
		go w()
	}
}

// CatchUp waits until Run has read everything written to the topic before
// the call: a partition assigned afterwards sees every key its previous
// owner quarantined.
func (q *Quarantine) CatchUp(ctx context.Context) error { return q.store.catchUp(ctx, nil) }

func keyID(topic string, key []byte) string { return topic + "/" + string(key) }

// State returns the state of a key of a source topic and, unless free,
// what caused its quarantine.
func (q *Quarantine) State(topic string, key []byte) (KeyState, Cause) {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.keys[keyID(topic, key)]
	return e.state, e.cause
}

// HeldKey is a key a replay holds (KeyReplaying), with the cause of its
// quarantine.
type HeldKey struct {
	Topic  string
	Key    []byte
	Cause  Cause
	Failed bool // see HoldFailed
}

// Held returns the keys being replayed, once the topic has been read up to
// the call: those a replay that stopped (handed over, or its instance
// crashed) left held. It implements KeyGate for replays.
func (q *Quarantine) Held(ctx context.Context) ([]HeldKey, error) {
	if err := q.CatchUp(ctx); err != nil {
		return nil, err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []HeldKey
	for id, e := range q.keys {
		if e.state != KeyReplaying {
			continue
		}
		topic, key, _ := strings.Cut(id, "/") // topic names hold no slash
		out = append(out, HeldKey{Topic: topic, Key: []byte(key), Cause: e.cause, Failed: e.failed})
	}
	return out, nil
}

// Count returns the number of keys not free.
func (q *Quarantine) Count() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.keys)
}

// Wait calls fn once, on its own goroutine, at the key's next change of
// state, or at once when its state is no longer st.
func (q *Quarantine) Wait(topic string, key []byte, st KeyState, fn func()) {
	id := keyID(topic, key)
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.keys[id].state != st {
		go fn()
		return
	}
	q.waiters[id] = append(q.waiters[id], fn)
}

// set writes a key's new state to the topic, retrying with backoff until
// it is acknowledged or ctx ends, and then applies it here (unless the
// reader has read it, and what came after it, already).
func (q *Quarantine) set(ctx context.Context, topic string, key []byte, e keyEntry) error {
	id := keyID(topic, key)
	var v []byte
	if e.state != KeyFree {
		var err error
		if v, err = json.Marshal(keyRecord{State: e.state.String(), Cause: e.cause, Since: time.Now().UTC(), Failed: e.failed}); err != nil {
			return err
		}
	}
	tp, err := q.store.write(ctx, []byte(id), v)
	if err != nil {
		return err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.store.readPast(tp) {
		q.own[id] = int64(tp.Offset)
		q.setLocked(id, e)
	}
	return nil
}

// Quarantine quarantines a key after its message cause was dead-lettered.
func (q *Quarantine) Quarantine(ctx context.Context, topic string, key []byte, cause Cause) error {
	return q.set(ctx, topic, key, keyEntry{state: KeyQuarantined, cause: cause})
}

// Hold marks the key as being replayed: its live messages wait. It
// implements KeyGate for replays.
func (q *Quarantine) Hold(ctx context.Context, topic string, key []byte) error {
	_, cause := q.State(topic, key)
	return q.set(ctx, topic, key, keyEntry{state: KeyReplaying, cause: cause})
}

// HoldFailed keeps the key held for the next run of a replay handed over
// after a record of the key (whose original is at partition/offset) failed
// again: that run copies the key's later records forward behind it. It
// implements KeyGate for replays.
func (q *Quarantine) HoldFailed(ctx context.Context, topic string, key []byte, partition int32, offset int64) error {
	return q.set(ctx, topic, key, keyEntry{state: KeyReplaying, cause: Cause{Topic: topic, Partition: partition, Offset: offset}, failed: true})
}

// Release frees the key. It implements KeyGate for replays and releases.
func (q *Quarantine) Release(ctx context.Context, topic string, key []byte) error {
	return q.set(ctx, topic, key, keyEntry{})
}

// Requarantine keeps the key quarantined after a replayed message of it
// failed again. It implements KeyGate for replays.
func (q *Quarantine) Requarantine(ctx context.Context, topic string, key []byte, partition int32, offset int64) error {
	return q.Quarantine(ctx, topic, key, Cause{Topic: topic, Partition: partition, Offset: offset})
}
