package dlq

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/kafkalog"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/offsets"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// HeaderReplayOf is set on a record a replay wrote back to the DLQ (a
// record that failed again, or one copied forward behind it) to
// "<dlq partition>/<dlq offset>" of the record it copies.
const HeaderReplayOf = "orderly.replay_of"

// Job kinds.
const (
	JobReplay  = "replay"  // sends the matching dead letters again
	JobRelease = "release" // marks them handled without sending (drops them)
)

// Job states.
const (
	JobQueued     = "queued" // written to the jobs topic, waiting for the runner
	JobRunning    = "running"
	JobCancelling = "cancelling" // cancel asked; the records in flight finish
	JobDone       = "done"
	JobCancelled  = "cancelled"
	JobFailed     = "failed"
)

var (
	// ErrReplayRunning is returned by StartReplay and StartRelease while
	// another job is queued or runs (as the jobs topic shows it here).
	ErrReplayRunning = errors.New("a replay or release job is already queued or running")
	// ErrNoDLQ is returned when dlq.topic is empty.
	ErrNoDLQ = errors.New("dlq.topic is not configured")
	// ErrNoJob is returned for a job id that is unknown or was pruned.
	ErrNoJob = errors.New("no such job")
	// ErrJobFinished is returned when cancelling a job that has finished.
	ErrJobFinished = errors.New("the job has already finished")
	// ErrBadRequest wraps what is wrong with a ReplayRequest.
	ErrBadRequest = errors.New("invalid request")
)

const (
	// replayLanes bounds the keys a replay sends at once (and so its
	// requests in flight); http.max_conns_per_host lowers it.
	replayLanes = 16
	// replayWindow bounds the records a replay has read and not finished.
	replayWindow = 1024
	// replayProgressBytes is the budget of the progress record committed
	// with the replay group's offsets (Kafka's offset.metadata.max.bytes
	// defaults to 4096).
	replayProgressBytes = 4096
	// replayCommitEvery is how often a job commits its progress.
	replayCommitEvery = 250 * time.Millisecond
	// replayCancelGrace is how long a cancelled job lets the records in
	// flight finish before it abandons their sends (they stay unhandled).
	replayCancelGrace = 10 * time.Second
	// replayTailPasses bounds the passes over the DLQ's end for the held
	// keys' later records.
	replayTailPasses = 5
	// replaySettle is how long after its last hold a job reads the DLQ's
	// end for the held keys' later records: time for the instances that
	// own those keys to see the hold, and for their dead letters already
	// being written to land.
	replaySettle = time.Second
	// replayGateTimeout bounds the key gate calls a job makes as it ends.
	replayGateTimeout = 30 * time.Second
	// replayWriteBackTimeout bounds the wait for a write-back to the DLQ,
	// past the cancel's grace (see writeBack).
	replayWriteBackTimeout = 30 * time.Second
	// Finished jobs are kept for jobRetention, at most jobsKept of them.
	jobRetention = time.Hour
	jobsKept     = 100
)

// KeyGate is the key quarantine as replay sees it (nil when dlq.quarantine_keys is off).
type KeyGate interface {
	// Hold marks the key as being replayed: its live messages wait behind the replay.
	Hold(ctx context.Context, topic string, key []byte) error
	// Release frees the key: its live messages flow again.
	Release(ctx context.Context, topic string, key []byte) error
	// Requarantine keeps the key quarantined after a replayed record of it failed again;
	// cause is the original message (topic, partition, offset) of the failed record.
	Requarantine(ctx context.Context, topic string, key []byte, causePartition int32, causeOffset int64) error
	// HoldFailed keeps the key held for the next run of a replay handed
	// over after a record of the key failed again (cause: its original).
	HoldFailed(ctx context.Context, topic string, key []byte, causePartition int32, causeOffset int64) error
	// Held returns the keys held now, as far as the gate has read: those of
	// a replay that stopped before it released them.
	Held(ctx context.Context) ([]HeldKey, error)
}

// Record is a dead-lettered message as the admin API shows it.
type Record struct {
	Partition         int32  `json:"partition"`
	Offset            int64  `json:"offset"`
	Key               string `json:"key"`
	ValuePreview      string `json:"value_preview"`
	ValueBytes        int    `json:"value_bytes"`
	Error             string `json:"error"`
	Status            int    `json:"status"`
	Route             string `json:"route"`
	RequestIndex      int    `json:"request_index"`
	Attempts          int    `json:"attempts"`
	OriginalTopic     string `json:"original_topic"`
	OriginalPartition int32  `json:"original_partition"`
	OriginalOffset    int64  `json:"original_offset"`
	FailedAt          string `json:"failed_at"`
	// ReplayOf is "<partition>/<offset>" of the DLQ record this one copies
	// (orderly.replay_of), "" for a first dead letter.
	ReplayOf string `json:"replay_of"`
	// Handled: a replay or release job has handled the record (replayed,
	// written back, or released), so later jobs pass over it.
	Handled bool `json:"handled"`
}

// Position is a place in the DLQ: an offset in a partition.
type Position struct {
	Partition int32 `json:"partition"`
	From      int64 `json:"from"`
}

// Page is one page of the DLQ listing. Next, when set, is where the next
// page starts (possibly at the start of a later partition).
type Page struct {
	Records []Record
	Next    *Position
}

// Filter selects DLQ records. Zero values select everything; To is
// exclusive and -1 means "to the end".
type Filter struct {
	Partition int32  // -1: every partition
	From      int64  // first offset
	To        int64  // -1: the end
	Route     string // "": any
	Key       string // "": any
	Limit     int    // 0: no limit
	// Cursor, if set, resumes a listing: partitions before Cursor.Partition
	// are passed over and that one starts at Cursor.From.
	Cursor *Position
}

// ReplayRequest is the body of POST /dlq/replay and POST /dlq/release.
type ReplayRequest struct {
	Partition  *int32 `json:"partition"`
	FromOffset *int64 `json:"from_offset"`
	ToOffset   *int64 `json:"to_offset"` // inclusive
	Route      string `json:"route"`
	Key        string `json:"key"`
	Limit      int    `json:"limit"` // at most this many records not yet handled
	DryRun     bool   `json:"dry_run"`
	// Rate caps a replay's pace in records per second (0: no cap).
	Rate float64 `json:"rate,omitempty"`
}

// Validate reports what is wrong with r for a job of the given kind; the
// error wraps ErrBadRequest.
func (r ReplayRequest) Validate(kind string) error {
	bad := func(msg string) error { return fmt.Errorf("%w: %s", ErrBadRequest, msg) }
	switch {
	case r.Limit < 0:
		return bad("limit must not be negative")
	case r.Partition != nil && *r.Partition < 0:
		return bad("partition must not be negative")
	case r.FromOffset != nil && *r.FromOffset < 0:
		return bad("from_offset must not be negative")
	case r.ToOffset != nil && *r.ToOffset < 0:
		return bad("to_offset must not be negative")
	case r.FromOffset != nil && r.ToOffset != nil && *r.ToOffset < *r.FromOffset:
		return bad("to_offset is before from_offset")
	case r.Rate < 0:
		return bad("rate must not be negative")
	case r.Rate != 0 && kind != JobReplay:
		return bad("rate applies to replay jobs only")
	}
	return nil
}

func (r ReplayRequest) filter() Filter {
	f := Filter{Partition: -1, To: -1, Route: r.Route, Key: r.Key, Limit: r.Limit}
	if r.Partition != nil {
		f.Partition = *r.Partition
	}
	if r.FromOffset != nil {
		f.From = *r.FromOffset
	}
	if r.ToOffset != nil {
		f.To = *r.ToOffset + 1
	}
	return f
}

// ReplayJob is a replay or release job's progress. A job reads each
// selected DLQ partition from the point where earlier jobs' handled records
// stop (the committed offset of "<group_id>.replay") to its end when the
// job started (or to_offset), passing over the records earlier jobs
// handled; with the key gate it then reads on to the DLQ's current end for
// the keys it holds (see Admin).
type ReplayJob struct {
	ID      string        `json:"id"`
	Kind    string        `json:"kind"`  // replay or release
	State   string        `json:"state"` // queued, running, cancelling, done, cancelled, failed
	DryRun  bool          `json:"dry_run"`
	Request ReplayRequest `json:"request"`
	// Scanned counts the DLQ records read: every record in the range
	// scanned, whether it matched or not, handled before or not.
	Scanned int `json:"scanned"`
	// Matched counts the records the job took on: matching the filter and
	// not handled by an earlier job (at most limit), plus, with the key
	// gate, the later records of the keys it held. A dry run stops here:
	// Matched is what the real job would send (or release).
	Matched int `json:"matched"`
	// Skipped counts the records matching the filter that an earlier job
	// already handled: they are not sent again.
	Skipped int `json:"skipped"`
	// Replayed counts the records delivered.
	Replayed int `json:"replayed"`
	// Failed counts the records that failed again and were written back
	// to the DLQ with orderly.attempts increased (and those whose value the
	// DLQ holds cut, orderly.value_truncated, written back unsent).
	Failed int `json:"failed"`
	// Deferred counts the records not sent because an earlier record of
	// their key failed again in this job: they were copied forward to the
	// DLQ behind the failed one, unchanged, keeping the key's order.
	Deferred int `json:"deferred"`
	// Released counts the records a release job marked handled unsent.
	Released int    `json:"released"`
	Error    string `json:"error,omitempty"`
	// CancelRequested: DELETE /dlq/replay/{id} asked the job to stop (on
	// any instance); the runner cancels it.
	CancelRequested bool       `json:"cancel_requested"`
	QueuedAt        time.Time  `json:"queued_at"`
	StartedAt       time.Time  `json:"started_at"` // zero while queued
	FinishedAt      *time.Time `json:"finished_at,omitempty"`
}

// Admin lists the DLQ and runs replay and release jobs, one at a time
// per consumer group: jobs are queued, followed and cancelled through the
// jobs topic, and run by the one instance that owns it (see Run, and
// jobs.go). Run must be running (once) for jobs to start and be seen.
//
// A replay sends each record through the route named in orderly.route,
// from orderly.request_index on, with the same sender (retries, breakers):
// records of different keys concurrently (up to 16 keys, fewer with
// http.max_conns_per_host), those of one key strictly in DLQ order. A
// record that fails again goes back to the DLQ with orderly.attempts
// increased and orderly.replay_of; the later records of its key in the job
// are then not sent but copied forward behind it, so the DLQ keeps the
// key's sequence in order for the next replay.
//
// Which records are handled (replayed, written back, copied forward or
// released) is committed under the consumer group "<group_id>.replay": its
// offset is the first record not handled and its commit metadata an
// offsets progress record of those handled beyond. Records a job did not
// match are never marked, so a later job with other filters still finds
// them.
//
// With a key gate (SetGate), a replay holds each key before sending its
// first record, reads on to the DLQ's end for the held keys' later records
// (live messages dead-lettered before the hold took effect) and at the end
// releases the keys whose records all went through, or requarantines the
// others. Safe for concurrent use; Close stops a running job.
type Admin struct {
	brokers string
	cfg     *config.Config
	router  *filters.Router
	sender  Sender
	metrics *telemetry.Metrics
	log     *slog.Logger

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // the running job's goroutine

	ready   chan struct{} // closed when Run has loaded the jobs topic
	startMu sync.Mutex    // serializes the 409 check and the queueing of a job

	mu         sync.Mutex // protects gate, store, running and the running jobEntry's job and cancelled
	gate       KeyGate
	store      *jobStore // set by Run
	runClaimed bool      // Run (or autoRun) runs the jobs
	running    *jobEntry // the job this instance runs

	// retention and keep bound the finished jobs kept; now is the clock.
	// Set only before use (tests shorten them).
	retention time.Duration
	keep      int
	now       func() time.Time
}

type jobEntry struct {
	job       ReplayJob          // under Admin.mu
	cancelled bool               // under Admin.mu: Cancel asked it to stop
	stop      context.CancelFunc // asks the job to stop
}

// NewAdmin returns a Admin; it connects only when used.
func NewAdmin(o Options) *Admin {
	ctx, cancel := context.WithCancel(context.Background())
	return &Admin{brokers: cmp.Or(o.Brokers, o.Config.Kafka.Brokers), cfg: o.Config, router: o.Router, sender: o.Sender, metrics: o.Metrics,
		log: cmp.Or(o.Logger, slog.New(slog.DiscardHandler)), ctx: ctx, cancel: cancel, ready: make(chan struct{}),
		retention: jobRetention, keep: jobsKept, now: time.Now}
}

// SetGate sets the key gate replay and release jobs use from their next
// start on; nil (the default) means no gate. g must be a usable gate or a
// nil interface, not a nil pointer in an interface.
func (a *Admin) SetGate(g KeyGate) {
	a.mu.Lock()
	a.gate = g
	a.mu.Unlock()
}

// keyGate returns the gate SetGate set.
func (a *Admin) keyGate() KeyGate {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.gate
}

// Close stops Run and a running job (the records in flight are abandoned
// and stay unhandled), waits for the job and its final commit. The job
// stays "running" in the jobs topic: the next owner goes on with it.
func (a *Admin) Close() {
	a.cancel()
	a.wg.Wait()
}

func (a *Admin) consumer(group string) (*kafka.Consumer, error) {
	cm := kafka.ConfigMap{"bootstrap.servers": a.brokers, "group.id": group, "enable.auto.commit": false,
		"enable.auto.offset.store": false, "auto.offset.reset": "earliest", "enable.metrics.push": false,
		"enable.partition.eof": true, "log_level": 3}
	producer.CopyClientProperties(cm, a.cfg.Kafka.Properties)
	return kafka.NewConsumer(&cm)
}

func (a *Admin) replayGroup() string { return a.cfg.Kafka.GroupID + ".replay" }

// dlqPart is one DLQ partition as a job or a listing sees it. The fields
// are owned by the goroutine reading the partition (the job's), except
// that workers call t.Done and set dirty.
type dlqPart struct {
	id     int32
	lo, hi int64 // watermarks when opened
	// t tracks which records are handled: restored from the replay group's
	// commit, it answers Begin with alreadyDone for those handled before.
	t *offsets.Tracker
	// next is the next offset to Begin: offsets are begun in order, and
	// one never begun below the newest begun counts as handled, so gaps
	// the job does not read are begun (as not handled) by fill.
	next int64
	// commOff and commMeta are the replay group's commit (-1: none).
	commOff  int64
	commMeta string
	budget   int         // the progress record's size bound, halved when refused
	warned   bool        // a truncated progress record was reported
	dirty    atomic.Bool // a record was marked handled since the last commit
}

// fill begins the offsets from p.next up to off as not handled (unless an
// earlier job handled them), so that the commit cannot pass records the job
// does not read.
func (p *dlqPart) fill(off int64) error {
	for ; p.next < off; p.next++ {
		if _, err := p.t.Begin(p.next); err != nil {
			return err
		}
	}
	return nil
}

// openParts returns the DLQ partitions selected (all when partition is
// -1), in id order, with their watermarks and the replay group's progress.
func (a *Admin) openParts(c *kafka.Consumer, partition int32) ([]*dlqPart, error) {
	topic := a.cfg.DLQ.Topic
	md, err := c.GetMetadata(&topic, false, 10000)
	if err != nil {
		return nil, fmt.Errorf("dlq metadata: %w", err)
	}
	tm, ok := md.Topics[topic]
	if !ok || tm.Error.Code() != kafka.ErrNoError {
		return nil, fmt.Errorf("dlq topic %q: %v", topic, tm.Error)
	}
	var tps []kafka.TopicPartition
	for _, pm := range tm.Partitions {
		if partition < 0 || pm.ID == partition {
			tps = append(tps, kafka.TopicPartition{Topic: &topic, Partition: pm.ID})
		}
	}
	slices.SortFunc(tps, func(x, y kafka.TopicPartition) int { return int(x.Partition) - int(y.Partition) })
	committed := map[int32]kafka.TopicPartition{}
	if len(tps) > 0 {
		res, err := c.Committed(tps, 10000)
		var ke kafka.Error
		switch {
		case errors.As(err, &ke) && ke.Code() == kafka.ErrGroupIDNotFound: // no job has committed yet
		case err != nil:
			return nil, fmt.Errorf("reading the replay progress: %w", err)
		default:
			for _, tp := range res {
				committed[tp.Partition] = tp
			}
		}
	}
	parts := make([]*dlqPart, 0, len(tps))
	for _, tp := range tps {
		lo, hi, err := c.QueryWatermarkOffsets(topic, tp.Partition, 10000)
		if err != nil {
			return nil, fmt.Errorf("dlq offsets: %w", err)
		}
		p := &dlqPart{id: tp.Partition, lo: lo, hi: hi, commOff: -1, budget: replayProgressBytes}
		start := lo
		if ct, ok := committed[tp.Partition]; ok && ct.Offset >= 0 {
			if c := int64(ct.Offset); c > hi {
				a.log.Warn("replay progress ignored: it is past the DLQ's end (was the topic recreated?)",
					"dlq", topic, "partition", tp.Partition, "committed", c, "end", hi)
			} else {
				p.commOff, start = c, c
				if ct.Metadata != nil {
					p.commMeta = *ct.Metadata
				}
			}
		}
		if p.commOff >= 0 {
			t, err := offsets.NewFromProgress(p.commOff, p.commMeta)
			if err != nil {
				a.log.Warn("replay progress record ignored: the records it marked handled are sent again",
					"dlq", topic, "partition", tp.Partition, "error", err)
			}
			p.t = t
		} else {
			p.t = offsets.New(start)
		}
		// Offsets below lo are gone: the first Begin at lo or later counts
		// them as done.
		p.next = max(start, lo)
		parts = append(parts, p)
	}
	return parts, nil
}

// read reads DLQ partition part from offset from up to end (exclusive) or
// the partition's end, calling fn for each record until it returns false
// or an error, or ctx ends.
func (a *Admin) read(ctx context.Context, c *kafka.Consumer, part int32, from, end int64, fn func(*kafka.Message) (bool, error)) error {
	if from >= end {
		return nil
	}
	topic := a.cfg.DLQ.Topic
	if err := c.Assign([]kafka.TopicPartition{{Topic: &topic, Partition: part, Offset: kafka.Offset(from)}}); err != nil {
		return err
	}
	defer func() { _ = c.Unassign() }()
	for next := from; next < end; {
		if err := ctx.Err(); err != nil {
			return err
		}
		switch e := c.Poll(100).(type) {
		case *kafka.Message:
			if e.TopicPartition.Error != nil {
				return e.TopicPartition.Error
			}
			off := int64(e.TopicPartition.Offset)
			if e.TopicPartition.Partition != part || off < next {
				continue // left over from an earlier assignment
			}
			if off >= end {
				return nil
			}
			next = off + 1
			if ok, err := fn(e); err != nil || !ok {
				return err
			}
		case kafka.PartitionEOF:
			if e.Partition == part && int64(e.Offset) >= next {
				return nil // what remains below end are not records (markers)
			}
		case kafka.Error:
			if e.IsFatal() {
				return e
			}
		}
	}
	return nil
}

// List returns a page of the DLQ records matching f, in partition then
// offset order, each marked handled or not. When the page is full (Limit)
// and more may follow, Next says where the next page starts: after the last
// record, or at the start of the next partition that holds records.
func (a *Admin) List(ctx context.Context, f Filter) (Page, error) {
	var page Page
	if a.cfg.DLQ.Topic == "" {
		return page, ErrNoDLQ
	}
	c, err := a.consumer(a.replayGroup()) // reads the group's progress, commits nothing
	if err != nil {
		return page, err
	}
	defer c.Close()
	parts, err := a.openParts(c, f.Partition)
	if err != nil {
		return page, err
	}
	span := func(p *dlqPart) (int64, int64) {
		start, end := max(p.lo, f.From), p.hi
		if f.Cursor != nil && p.id == f.Cursor.Partition {
			start = max(start, f.Cursor.From)
		}
		if f.To >= 0 {
			end = min(end, f.To)
		}
		return start, end
	}
	for i, p := range parts {
		if f.Cursor != nil && p.id < f.Cursor.Partition {
			continue
		}
		start, end := span(p)
		last := int64(-1)
		err := a.read(ctx, c, p.id, start, end, func(m *kafka.Message) (bool, error) {
			off := int64(m.TopicPartition.Offset)
			handled := p.commOff >= 0 && off < p.commOff
			if !handled && p.commOff >= 0 && off >= p.next {
				done, err := p.t.Begin(off)
				handled = err == nil && done
				p.next = off + 1
			}
			if !matches(m, f) {
				return true, nil
			}
			r := toRecord(m)
			r.Handled = handled
			page.Records = append(page.Records, r)
			if f.Limit > 0 && len(page.Records) >= f.Limit {
				last = off
				return false, nil
			}
			return true, nil
		})
		if err != nil {
			return page, err
		}
		if last < 0 {
			continue
		}
		if last+1 < end {
			page.Next = &Position{Partition: p.id, From: last + 1}
			return page, nil
		}
		for _, q := range parts[i+1:] {
			if s, e := span(q); s < e {
				page.Next = &Position{Partition: q.id, From: s}
				break
			}
		}
		return page, nil
	}
	return page, nil
}

func matches(m *kafka.Message, f Filter) bool {
	if f.Key != "" && string(m.Key) != f.Key {
		return false
	}
	if f.Route != "" {
		r, _ := hdr(m, HeaderRoute)
		if r != f.Route {
			return false
		}
	}
	return true
}

func hdr(m *kafka.Message, key string) (string, bool) {
	for i := len(m.Headers) - 1; i >= 0; i-- { // the last wins
		if m.Headers[i].Key == key {
			return string(m.Headers[i].Value), true
		}
	}
	return "", false
}

func hdrInt(m *kafka.Message, key string) int64 {
	s, _ := hdr(m, key)
	n, _ := strconv.ParseInt(s, 10, 64)
	return n
}

func toRecord(m *kafka.Message) Record {
	r := Record{Partition: m.TopicPartition.Partition, Offset: int64(m.TopicPartition.Offset), Key: string(m.Key),
		ValueBytes: len(m.Value), Status: int(hdrInt(m, HeaderStatus)), RequestIndex: int(hdrInt(m, HeaderRequestIndex)),
		Attempts: int(hdrInt(m, HeaderAttempts)), OriginalPartition: int32(hdrInt(m, HeaderOriginalPartition)),
		OriginalOffset: hdrInt(m, HeaderOriginalOffset)}
	r.Error, _ = hdr(m, HeaderError)
	r.Route, _ = hdr(m, HeaderRoute)
	r.OriginalTopic, _ = hdr(m, HeaderOriginalTopic)
	r.FailedAt, _ = hdr(m, HeaderFailedAt)
	r.ReplayOf, _ = hdr(m, HeaderReplayOf)
	v := m.Value
	if len(v) > 256 {
		v = v[:256]
	}
	if utf8.Valid(v) {
		r.ValuePreview = string(v)
	} else {
		r.ValuePreview = fmt.Sprintf("%q", v)
	}
	return r
}

// StartReplay starts a background replay job and returns its id.
func (a *Admin) StartReplay(req ReplayRequest) (string, error) {
	return a.start(JobReplay, req)
}

// StartRelease starts a background release job, which marks the matching
// records not yet handled as handled without sending them (the operator
// drops those dead letters) and frees their keys at the key gate, and
// returns its id.
func (a *Admin) StartRelease(req ReplayRequest) (string, error) {
	return a.start(JobRelease, req)
}

func (a *Admin) start(kind string, req ReplayRequest) (string, error) {
	if a.cfg.DLQ.Topic == "" {
		return "", ErrNoDLQ
	}
	if err := req.Validate(kind); err != nil {
		return "", err
	}
	st, err := a.waitStore()
	if err != nil {
		return "", err
	}
	a.startMu.Lock()
	for _, j := range a.view() {
		if !finished(j) {
			a.startMu.Unlock()
			return "", ErrReplayRunning
		}
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	j := ReplayJob{ID: hex.EncodeToString(b[:]), Kind: kind, State: JobQueued, DryRun: req.DryRun, Request: req,
		QueuedAt: a.now().UTC()}
	st.mu.Lock()
	st.applyLocked(j.ID, &j) // the next start here sees it at once
	st.mu.Unlock()
	a.startMu.Unlock()
	ctx, cancel := context.WithTimeout(a.ctx, jobsWriteTimeout)
	defer cancel()
	if err := st.write(ctx, j.ID, &j); err != nil {
		st.forget(j.ID)
		return "", errors.Join(ErrJobUnsure, err)
	}
	return j.ID, nil
}

// waitStore waits (a while) for Run to load the jobs topic.
func (a *Admin) waitStore() (*jobStore, error) {
	a.autoRun()
	t := time.NewTimer(jobsReadyTimeout)
	defer t.Stop()
	select {
	case <-a.ready:
	case <-a.ctx.Done():
		return nil, errors.New("the DLQ admin is closed")
	case <-t.C:
		return nil, ErrJobsNotReady
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.store, nil
}

// view returns the jobs as this instance knows them (the jobs topic, and
// the live counts of the job it runs), not pruned, oldest first.
func (a *Admin) view() []ReplayJob {
	a.autoRun()
	a.mu.Lock()
	st, live := a.store, a.running
	var lj ReplayJob
	if live != nil {
		lj = live.job
	}
	a.mu.Unlock()
	if st == nil {
		return nil
	}
	jobs := st.list()
	for i, j := range jobs {
		if live != nil && j.ID == lj.ID {
			jobs[i] = mergeJob(j, lj)
		}
	}
	return jobs
}

// pruned returns the ids of the finished jobs of jobs (oldest first) past
// the retention, and of the oldest finished ones beyond the number kept.
func (a *Admin) pruned(jobs []ReplayJob) []string {
	now := a.now()
	n := 0
	for _, j := range jobs {
		if j.FinishedAt != nil {
			n++
		}
	}
	var out []string
	for _, j := range jobs {
		if f := j.FinishedAt; f != nil && (now.Sub(*f) > a.retention || n > a.keep) {
			n--
			out = append(out, j.ID)
		}
	}
	return out
}

// kept returns the jobs not pruned, oldest first, as shown.
func (a *Admin) kept() []ReplayJob {
	jobs := a.view()
	gone := a.pruned(jobs)
	out := jobs[:0]
	for _, j := range jobs {
		if !slices.Contains(gone, j.ID) {
			out = append(out, shown(j))
		}
	}
	return out
}

// Job returns a job's progress, as the jobs topic shows it on this
// instance (the same on every instance, once they have read it).
func (a *Admin) Job(id string) (ReplayJob, bool) {
	for _, j := range a.kept() {
		if j.ID == id {
			return j, true
		}
	}
	return ReplayJob{}, false
}

// JobsLoaded reports whether Run has loaded the jobs topic; Job and Jobs
// know no job before.
func (a *Admin) JobsLoaded() bool {
	a.autoRun()
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.store != nil
}

// Jobs returns the jobs kept, newest first.
func (a *Admin) Jobs() []ReplayJob {
	jobs := a.kept()
	slices.Reverse(jobs)
	return jobs
}

// Cancel asks a job to stop, on whichever instance runs it: a queued job
// ends "cancelled" without running; a running one takes no more records,
// lets those in flight finish (for up to 10 s), commits its progress and
// ends "cancelled"; a new job resumes where it stopped. It returns the job
// as it is now, "cancelling" (ErrNoJob, ErrJobFinished otherwise).
func (a *Admin) Cancel(id string) (ReplayJob, error) {
	st, err := a.waitStore()
	if err != nil {
		return ReplayJob{}, err
	}
	j, ok := a.Job(id)
	switch {
	case !ok:
		return ReplayJob{}, ErrNoJob
	case finished(j):
		return j, ErrJobFinished
	}
	if stored, ok := st.get(id); ok {
		j = stored
	}
	j.CancelRequested = true
	ctx, cancel := context.WithTimeout(a.ctx, jobsWriteTimeout)
	defer cancel()
	if err := st.put(ctx, j); err != nil {
		return ReplayJob{}, err
	}
	// Running here: stop it now rather than when the runner sees the record.
	a.mu.Lock()
	e := a.running
	here := e != nil && e.job.ID == id
	a.mu.Unlock()
	if here {
		a.stopCancelled(e)
	}
	// Answer with the counts as the job shows them now (the stored record
	// may lag behind the running job's).
	if live, ok := a.Job(id); ok {
		live.CancelRequested = true
		return shown(live), nil
	}
	return shown(j), nil
}

func (a *Admin) update(fn func()) {
	a.mu.Lock()
	fn()
	a.mu.Unlock()
}

// laneID names a replay lane, as the dispatcher's lanes go: the records of
// one key of one source topic, the unkeyed records of one source partition,
// or (dispatch.unkeyed = "parallel") one unkeyed record.
type laneID struct {
	topic string
	key   string
	keyed bool
	// Unkeyed: the source partition, or with single the DLQ record's place.
	at     pos
	single bool
}

// pos is a place in a topic: a partition and an offset.
type pos struct {
	partition int32
	offset    int64
}

// originOf returns where m's original message was consumed.
func originOf(m *kafka.Message) pos {
	return pos{int32(hdrInt(m, HeaderOriginalPartition)), hdrInt(m, HeaderOriginalOffset)}
}

// dlqRec is a record a replay has taken on, with its partition.
type dlqRec struct {
	p *dlqPart
	m *kafka.Message
}

// rlane is one lane of a replay: its records are handled one at a time,
// in DLQ order, by whichever worker holds the lane.
type rlane struct {
	id  laneID
	key []byte // nil when unkeyed

	q    []dlqRec // under run.mu
	busy bool     // under run.mu: queued in ready or held by a worker

	// Touched only by the worker holding the lane, and by the job's
	// goroutine after the workers stopped.
	held    bool // the gate holds the key
	failed  bool // a record failed again: the rest are copied forward
	dropped bool // a record was left unhandled (the job stopped)
	cause   pos  // the failed, or first dropped, record's original
	last    pos  // the last record's original
	touched bool // a record was handled
}

// run is one job at work. Its fields are set before the job's goroutine
// starts, or by that goroutine, unless noted.
type run struct {
	a    *Admin
	e    *jobEntry
	kind string
	req  ReplayRequest
	f    Filter
	dry  bool
	gate KeyGate
	// resumed: an earlier run of this job stopped (handed over, or its
	// instance crashed); the keys it held are this run's.
	resumed bool
	// lastHold is when a worker last held a key (unix ns; 0: none).
	lastHold atomic.Int64

	c       *kafka.Consumer // the job goroutine's alone
	parts   []*dlqPart
	matched int // records taken on (for the limit)

	stop       context.Context    // Cancel or Close
	halt       context.Context    // stop or a failure: take no more records
	halted     context.CancelFunc // ends halt
	send       context.Context    // sends and DLQ writes: ends replayCancelGrace after halt, or with Close
	cancelSend context.CancelFunc
	tick       *time.Ticker // commits while the job reads or waits

	w       *Writer
	records *producer.Producer // writes topic requests' records; nil when no route has one
	pace    *pacer
	ready   chan *rlane   // lanes with records to handle; workers take them
	window  chan struct{} // a slot per record taken on and not finished
	pending sync.WaitGroup
	workers sync.WaitGroup

	mu      sync.Mutex // protects lanes, touched, written, failure, and each rlane's q and busy
	lanes   map[laneID]*rlane
	touched map[laneID][]byte // keyed lanes the job took records of, with their key
	written map[pos]bool      // DLQ (partition, offset) of the records the job wrote
	failure error
}

// run runs the job. stopped reports that it was cancelled or shut down
// before it finished.
func (r *run) run() (stopped bool, err error) {
	a := r.a
	r.halt, r.halted = context.WithCancel(r.stop)
	defer r.halted()
	r.send, r.cancelSend = context.WithCancel(a.ctx)
	defer r.cancelSend()
	r.lanes, r.touched, r.written = map[laneID]*rlane{}, map[laneID][]byte{}, map[pos]bool{}
	r.tick = time.NewTicker(replayCommitEvery)
	defer r.tick.Stop()
	if r.c, err = a.consumer(a.replayGroup()); err != nil {
		return false, err
	}
	defer r.c.Close()
	if r.parts, err = a.openParts(r.c, r.f.Partition); err != nil {
		return false, err
	}
	if r.resumed && r.gate != nil && r.kind == JobReplay && !r.dry {
		if err = r.adopt(); err != nil {
			return false, err
		}
	}
	if r.kind == JobReplay && !r.dry {
		logs := make(chan kafka.LogEvent, 16)
		stopLogs := make(chan struct{})
		var lw sync.WaitGroup
		lw.Go(func() { kafkalog.Pump(a.log, logs, stopLogs) })
		defer func() { close(stopLogs); lw.Wait() }()
		if r.w, err = NewWriter(a.brokers, a.cfg, a.log, logs, a.metrics); err != nil {
			return false, err
		}
		defer r.w.Close()
		if topics := a.router.RecordTopics(); len(topics) > 0 {
			if r.records, err = producer.NewRecords(a.brokers, topics, a.cfg.Kafka.Properties, 5*time.Second, a.log, logs, a.metrics); err != nil {
				return false, err
			}
			defer r.records.Close()
		}
		r.pace = newPacer(r.req.Rate)
		n := replayLanes
		if m := a.cfg.HTTP.MaxConnsPerHost; m > 0 {
			n = min(n, m)
		}
		r.ready = make(chan *rlane, replayWindow)
		r.window = make(chan struct{}, replayWindow)
		for range n {
			r.workers.Go(r.worker)
		}
	}
	if err = r.scan(false); err != nil {
		r.halted()
	}
	r.drain()
	// The held keys' later records: live messages dead-lettered before the
	// hold took effect. Passes repeat while they find some.
	for pass := 0; pass < replayTailPasses && err == nil && r.gate != nil && r.kind == JobReplay && r.halt.Err() == nil; pass++ {
		if held := r.lastHold.Load(); held != 0 {
			t := time.NewTimer(time.Until(time.Unix(0, held).Add(replaySettle)))
			select {
			case <-t.C:
			case <-r.halt.Done():
			}
			t.Stop()
		}
		before := r.matched
		if err = r.scan(true); err != nil {
			r.halted()
		}
		r.drain()
		if r.matched == before {
			break
		}
	}
	if r.ready != nil {
		close(r.ready)
		r.workers.Wait()
	}
	r.mu.Lock()
	if r.failure != nil {
		err = errors.Join(r.failure, err)
	}
	r.mu.Unlock()
	if err == nil && r.stop.Err() != nil {
		stopped = true
	}
	if !r.dry {
		if cerr := r.commit(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("committing the replay progress: %w", cerr))
		}
		if r.gate != nil {
			r.a.mu.Lock()
			handedOver := stopped && err == nil && !r.e.cancelled
			r.a.mu.Unlock()
			if gerr := r.gateActions(stopped || err != nil, handedOver); gerr != nil {
				err = errors.Join(err, gerr)
			}
		}
	}
	if stopped && err == nil {
		return true, nil
	}
	return false, err
}

// scan reads the selected partitions, taking on the records that match and
// no earlier job handled, until the limit. tail (the key gate's second
// pass) reads on from where the first pass stopped to each partition's
// current end, taking on the later records of the keys the job took.
func (r *run) scan(tail bool) error {
	for _, p := range r.parts {
		start := max(p.next, p.lo, r.f.From)
		end := p.hi
		if tail {
			_, hi, err := r.c.QueryWatermarkOffsets(r.a.cfg.DLQ.Topic, p.id, 10000)
			if err != nil {
				return fmt.Errorf("dlq offsets: %w", err)
			}
			end = hi
		} else if r.f.To >= 0 {
			end = min(end, r.f.To)
		}
		if start >= end {
			continue
		}
		if err := p.fill(start); err != nil {
			return err
		}
		more := true
		err := r.a.read(r.halt, r.c, p.id, start, end, func(m *kafka.Message) (bool, error) {
			ok, err := r.record(p, m, tail)
			more = ok
			return ok, err
		})
		if err != nil {
			if r.halt.Err() != nil {
				return nil // stopped: what was not taken on stays for a later job
			}
			return err
		}
		if !more {
			return nil
		}
	}
	return nil
}

// record handles one record read; false stops the scan (the limit, or the
// job halted).
func (r *run) record(p *dlqPart, m *kafka.Message, tail bool) (bool, error) {
	off := int64(m.TopicPartition.Offset)
	done, err := p.t.Begin(off)
	if err != nil {
		return false, err
	}
	p.next = off + 1
	r.a.update(func() { r.e.job.Scanned++ })
	select {
	case <-r.tick.C:
		r.commitLogged()
	default:
	}
	id := r.laneOf(m)
	switch {
	case done:
		if !tail && matches(m, r.f) {
			r.a.update(func() { r.e.job.Skipped++ })
		}
		return true, nil
	case tail:
		r.mu.Lock()
		_, held := r.touched[id]
		ours := r.written[pos{p.id, off}]
		r.mu.Unlock()
		if !held || ours {
			return true, nil
		}
	case !matches(m, r.f):
		return true, nil
	}
	if r.failedHere(id, m) {
		return true, nil
	}
	r.matched++
	r.a.update(func() { r.e.job.Matched++ })
	if id.keyed {
		r.mu.Lock()
		r.touched[id] = m.Key
		r.mu.Unlock()
	}
	switch {
	case r.dry:
	case r.kind == JobRelease:
		r.done(p, m, &r.e.job.Released, "released")
	default:
		if !r.dispatch(id, dlqRec{p, m}) {
			return false, nil
		}
	}
	return tail || r.f.Limit <= 0 || r.matched < r.f.Limit, nil
}

// failedHere reports whether m is the copy of the record that failed again
// on its lane (its original is the lane's cause), written back by an
// earlier run of the job: it heads the key's records in the DLQ, where it
// stays, the key's other records being copied forward behind it.
func (r *run) failedHere(id laneID, m *kafka.Message) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.lanes[id]
	return l != nil && l.failed && originOf(m) == l.cause
}

func (r *run) laneOf(m *kafka.Message) laneID {
	topic, _ := hdr(m, HeaderOriginalTopic)
	if len(m.Key) > 0 {
		return laneID{topic: topic, key: string(m.Key), keyed: true}
	}
	if r.a.cfg.Dispatch.Unkeyed == config.UnkeyedParallel {
		return laneID{single: true, at: pos{m.TopicPartition.Partition, int64(m.TopicPartition.Offset)}}
	}
	return laneID{topic: topic, at: pos{int32(hdrInt(m, HeaderOriginalPartition)), -1}}
}

// dispatch queues rec on its lane, waiting for room in the window; false
// means the job halted first.
func (r *run) dispatch(id laneID, rec dlqRec) bool {
	for acquired := false; !acquired; {
		select {
		case r.window <- struct{}{}:
			acquired = true
		case <-r.halt.Done():
			return false
		case <-r.tick.C:
			r.commitLogged()
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.lanes[id]
	if l == nil {
		l = &rlane{id: id}
		if id.keyed {
			l.key = rec.m.Key
		}
		r.lanes[id] = l
	}
	l.q = append(l.q, rec)
	r.pending.Add(1)
	if !l.busy {
		l.busy = true
		r.ready <- l // never blocks: a lane is queued at most once, and lanes queued <= records in the window
	}
	return true
}

// worker handles the records of the lanes it takes, one record per turn,
// until ready is closed.
func (r *run) worker() {
	for l := range r.ready {
		r.mu.Lock()
		rec := l.q[0]
		r.mu.Unlock()
		r.handle(l, rec)
		r.mu.Lock()
		l.q[0] = dlqRec{}
		l.q = l.q[1:]
		switch {
		case len(l.q) > 0:
			r.ready <- l // to the back: other keys get their turn
		default:
			l.busy = false
			if !l.held && !l.failed && !l.dropped {
				delete(r.lanes, l.id) // nothing to remember: a later record starts afresh
			}
		}
		r.mu.Unlock()
		<-r.window
		r.pending.Done()
	}
}

// handle replays one record of l (or copies it forward behind its key's
// failure), marking it handled unless the job halted first.
func (r *run) handle(l *rlane, rec dlqRec) {
	m := rec.m
	orig := originOf(m)
	drop := func() {
		if !l.dropped && !l.failed {
			l.cause = orig
		}
		l.dropped = true
	}
	if r.halt.Err() != nil {
		drop()
		return
	}
	if l.failed {
		if err := r.writeBack(copyForward(r.w.topic, m), m); err != nil {
			r.fail(fmt.Errorf("copying %d/%d forward in the DLQ: %w", rec.p.id, m.TopicPartition.Offset, err))
			drop()
			return
		}
		r.done(rec.p, m, &r.e.job.Deferred, "deferred")
		return
	}
	if r.gate != nil && l.id.keyed && !l.held {
		// Held before the call: a hold that fails may still be written (or
		// applied here), and the end then requarantines the key.
		l.held = true
		if err := r.gate.Hold(r.send, l.id.topic, l.key); err != nil {
			r.fail(fmt.Errorf("holding key %q of %s: %w", l.key, l.id.topic, err))
			drop()
			return
		}
		r.lastHold.Store(time.Now().UnixNano())
	}
	if err := r.pace.wait(r.halt); err != nil {
		drop()
		return
	}
	back, err := r.replayOne(m)
	if err != nil {
		if r.halt.Err() == nil {
			r.fail(err)
		}
		drop()
		return
	}
	l.last = orig
	if back == nil {
		r.done(rec.p, m, &r.e.job.Replayed, telemetry.OutcomeDelivered)
		return
	}
	if err := r.writeBack(back, m); err != nil {
		r.fail(fmt.Errorf("writing %d/%d back to the DLQ: %w", rec.p.id, m.TopicPartition.Offset, err))
		drop()
		return
	}
	l.failed, l.cause = true, orig
	r.done(rec.p, m, &r.e.job.Failed, telemetry.OutcomeDeadLettered)
}

// done marks m handled, counting it in *counter (a field of the job) and
// under outcome in orderly_replay_messages_total.
func (r *run) done(p *dlqPart, m *kafka.Message, counter *int, outcome string) {
	if err := p.t.Done(int64(m.TopicPartition.Offset)); err != nil {
		r.a.log.Error("replay: offset tracking", "partition", p.id, "error", err)
	}
	p.dirty.Store(true)
	r.a.update(func() { *counter++ })
	r.a.metrics.ReplayMessages.WithLabelValues(outcome).Inc()
}

// fail records the job's first failure and halts it.
func (r *run) fail(err error) {
	r.mu.Lock()
	if r.failure == nil {
		r.failure = err
	}
	r.mu.Unlock()
	r.halted()
}

// drain waits until the records taken on are finished, committing on the
// way; once the job halted it gives those in flight replayCancelGrace.
func (r *run) drain() {
	if r.ready == nil {
		return
	}
	idle := make(chan struct{})
	go func() { // ends when the workers finish the records taken on, which they always do
		r.pending.Wait()
		close(idle)
	}()
	halt := r.halt.Done()
	var grace <-chan time.Time
	for {
		select {
		case <-idle:
			return
		case <-r.tick.C:
			r.commitLogged()
		case <-halt:
			halt = nil
			t := time.NewTimer(replayCancelGrace)
			defer t.Stop()
			grace = t.C
		case <-grace:
			grace = nil
			r.cancelSend()
		}
	}
}

// commit commits the handled prefix of each partition where records were
// handled since the last commit, with the progress record of those beyond.
func (r *run) commit() error {
	if r.dry {
		return nil
	}
	var tps []kafka.TopicPartition
	var which []*dlqPart
	topic := r.a.cfg.DLQ.Topic
	for _, p := range r.parts {
		if !p.dirty.Swap(false) {
			continue
		}
		off, meta, truncated := p.t.Progress(p.budget)
		if off < 0 || off == p.commOff && meta == p.commMeta {
			continue
		}
		if truncated {
			r.a.metrics.ProgressTruncated.Inc()
			if !p.warned {
				p.warned = true
				r.a.log.Warn("replay progress record full: records handled beyond it will be sent again by a later job",
					"dlq", topic, "partition", p.id, "committed", off, "budget_bytes", p.budget)
			}
		}
		tps = append(tps, kafka.TopicPartition{Topic: &topic, Partition: p.id, Offset: kafka.Offset(off), Metadata: &meta})
		which = append(which, p)
	}
	if len(tps) == 0 {
		return nil
	}
	refused := func(p *dlqPart, size int) {
		r.a.metrics.ProgressRefused.Inc()
		p.budget = offsets.RefusedBudget(p.budget, size)
	}
	res, err := r.c.CommitOffsets(tps)
	if err != nil {
		var ke kafka.Error
		for i, p := range which {
			p.dirty.Store(true)
			if errors.As(err, &ke) && ke.Code() == kafka.ErrOffsetMetadataTooLarge {
				refused(p, len(*tps[i].Metadata))
			}
		}
		return err
	}
	var errs []error
	for i, tp := range res {
		p := which[i]
		if tp.Error != nil {
			p.dirty.Store(true)
			var ke kafka.Error
			if errors.As(tp.Error, &ke) && ke.Code() == kafka.ErrOffsetMetadataTooLarge {
				refused(p, len(*tps[i].Metadata))
			}
			errs = append(errs, fmt.Errorf("partition %d: %w", p.id, tp.Error))
			continue
		}
		p.commOff, p.commMeta = int64(tps[i].Offset), *tps[i].Metadata
	}
	return errors.Join(errs...)
}

func (r *run) commitLogged() {
	if err := r.commit(); err != nil {
		r.a.log.Warn("replay: committing progress failed, will retry", "error", err)
	}
}

// gateActions tells the key gate how the job left each key, once its
// progress is committed: a release job releases the keys it took (and,
// with a key filter, that key on every source topic); a replay releases
// the keys whose records all went through, and requarantines those where a
// record failed again or was left unhandled (or, the job having stopped
// early, whose later records it did not look for). A replay handed over
// leaves its keys held: the next run of the job takes them on (adopt) and
// releases them once their later records went through too.
func (r *run) gateActions(stoppedEarly, handedOver bool) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.a.ctx), replayGateTimeout)
	defer cancel()
	var errs []error
	note := func(what string, id laneID, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s key %q of %s: %w", what, id.key, id.topic, err))
		}
	}
	if r.kind == JobRelease {
		if r.f.Key != "" && r.f.Route == "" {
			for _, t := range r.a.cfg.Kafka.Topics {
				r.touched[laneID{topic: t, key: r.f.Key, keyed: true}] = []byte(r.f.Key)
			}
		}
		for id, key := range r.touched {
			note("releasing", id, r.gate.Release(ctx, id.topic, key))
		}
		return errors.Join(errs...)
	}
	n := 0
	for _, l := range r.lanes {
		if !l.held {
			continue
		}
		n++
		switch {
		case handedOver && l.failed:
			note("holding", l.id, r.gate.HoldFailed(ctx, l.id.topic, l.key, l.cause.partition, l.cause.offset))
		case handedOver: // held as it is
		case l.failed || l.dropped:
			note("requarantining", l.id, r.gate.Requarantine(ctx, l.id.topic, l.key, l.cause.partition, l.cause.offset))
		case stoppedEarly:
			note("requarantining", l.id, r.gate.Requarantine(ctx, l.id.topic, l.key, l.last.partition, l.last.offset))
		default:
			note("releasing", l.id, r.gate.Release(ctx, l.id.topic, l.key))
		}
	}
	if handedOver && n > 0 {
		r.a.log.Info("dlq job handed over: its keys stay held for its next run", "id", r.e.job.ID, "keys", n)
	}
	return errors.Join(errs...)
}

// adopt takes on the keys held by the job's earlier run: only one job runs
// at a time, and a key a stopped job held stays held until its next run
// (or, cancelled or finished without one, the runner's settle). Each
// becomes a held lane, so that the job's tail pass takes the key's later
// records, and the end releases or requarantines it.
func (r *run) adopt() error {
	ctx, cancel := context.WithTimeout(r.halt, replayGateTimeout)
	defer cancel()
	held, err := r.gate.Held(ctx)
	if err != nil {
		return fmt.Errorf("reading the keys the job held: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, h := range held {
		id := laneID{topic: h.Topic, key: string(h.Key), keyed: true}
		cause := pos{h.Cause.Partition, h.Cause.Offset}
		r.lanes[id] = &rlane{id: id, key: h.Key, held: true, failed: h.Failed, cause: cause, last: cause}
		r.touched[id] = h.Key
	}
	if len(held) > 0 {
		r.a.log.Info("dlq job resumed with the keys its earlier run held", "id", r.e.job.ID, "keys", len(held))
	}
	return nil
}

// source rebuilds the original message of a DLQ record.
func source(m *kafka.Message) filters.Message {
	orig := filters.Message{Key: m.Key, Value: m.Value, Timestamp: m.Timestamp}
	orig.Topic, _ = hdr(m, HeaderOriginalTopic)
	o := originOf(m)
	orig.Partition, orig.Offset = o.partition, o.offset
	if ts, ok := hdr(m, HeaderOriginalTimestamp); ok {
		if t, err := time.Parse(time.RFC3339Nano, ts); err == nil {
			orig.Timestamp = t
		}
	}
	for _, h := range m.Headers {
		if len(h.Key) < 8 || h.Key[:8] != "orderly." {
			orig.Headers = append(orig.Headers, filters.Header{Key: h.Key, Value: h.Value})
		}
	}
	return orig
}

// replayOne sends a DLQ record's remaining requests. When the record fails
// permanently it returns the record to write back to the DLQ; an error
// means the send context ended.
func (r *run) replayOne(m *kafka.Message) (*kafka.Message, error) {
	orig := source(m)
	route, _ := hdr(m, HeaderRoute)
	start := max(int(hdrInt(m, HeaderRequestIndex)), 0)
	prev := int(hdrInt(m, HeaderAttempts))
	if n, ok := hdr(m, HeaderValueTruncated); ok {
		// Sending a cut value would deliver something else: it stays a
		// dead letter, for a release or a re-produce of the original.
		return rewrite(r.w.topic, m, map[string]string{
			HeaderError: "replay: the DLQ holds this value cut from " + n + " bytes; release it, or produce the original (" +
				orig.Topic + "/" + strconv.Itoa(int(orig.Partition)) + "/" + strconv.FormatInt(orig.Offset, 10) + ") again",
			HeaderFailedAt: time.Now().UTC().Format(time.RFC3339Nano),
		}), nil
	}
	back := func(f *Failure) *kafka.Message {
		rec := Build(r.w.topic, &orig, f, time.Now(), -1)
		rec.Headers = append(rec.Headers, kafka.Header{Key: HeaderReplayOf, Value: []byte(dlqPos(m))})
		return rec
	}
	var plan filters.Plan
	var err error
	if route == "" {
		plan, err = r.a.router.Plan(&orig)
	} else {
		plan, err = r.a.router.PlanRoute(route, &orig)
	}
	if errors.Is(err, filters.ErrUnavailable) {
		return nil, fmt.Errorf("replay stopped: %w", err) // the schema registry did not answer: not the record's fault
	}
	if err != nil {
		return back(&Failure{Reason: "replay: " + err.Error(), Route: route, RequestIndex: start, Attempts: prev}), nil
	}
	rt := r.a.router.Route(plan.Route)
	var responses []filters.Response
	switch last := len(plan.Requests) - 1; {
	case rt != nil && rt.ReadsResponses():
		start = 0 // the later requests read the earlier ones' answers: all again, same idempotency keys
	case rt != nil && rt.Replies() && last >= 0 && start > last:
		// Only the reply record was refused, and it is made of the last
		// answer: ask the last request again (same idempotency key) for
		// it; a topic request's answer is empty, its record not written
		// again.
		if plan.Requests[last].Topic != "" {
			responses = []filters.Response{{}}
		} else {
			start = last
		}
	}
	for i := start; i < len(plan.Requests); i++ {
		rq := &plan.Requests[i]
		if rq.Pending {
			if err := rt.RenderRequest(&orig, i, responses, rq); err != nil {
				return back(&Failure{Reason: "replay: " + err.Error(), Route: plan.Route, RequestIndex: i, Attempts: prev}), nil
			}
		}
		if rq.Topic != "" {
			prev++
			err := r.writeRecord(rq, orig.IdempotencyKey(i))
			if err == nil {
				responses = append(responses, filters.Response{})
				continue
			}
			if !producer.Permanent(err) {
				return nil, fmt.Errorf("replay stopped: %w", err)
			}
			return back(&Failure{Reason: err.Error(), Route: plan.Route, RequestIndex: i, Attempts: prev}), nil
		}
		res, err := r.a.sender.Send(r.send, rq, orig.IdempotencyKey(i))
		prev += res.Attempts // orderly.attempts adds this run's attempts to the earlier ones
		if err == nil {
			responses = append(responses, res.Response)
			continue
		}
		if !httpclient.IsPermanent(err) {
			return nil, fmt.Errorf("replay stopped: %w", err)
		}
		return back(&Failure{Reason: err.Error(), Status: res.Status, Route: plan.Route, RequestIndex: i, Attempts: prev}), nil
	}
	if n := len(responses); rt != nil && n > 0 {
		if rq := rt.Reply(&orig, &responses[n-1]); rq != nil {
			if err := r.writeRecord(rq, orig.IdempotencyKey(len(plan.Requests))); err != nil {
				if !producer.Permanent(err) {
					return nil, fmt.Errorf("replay stopped: %w", err)
				}
				return back(&Failure{Reason: "the reply record was refused: " + err.Error(), Route: plan.Route,
					RequestIndex: len(plan.Requests), Attempts: prev}), nil
			}
		}
	}
	return nil, nil
}

// writeRecord writes the record of rq, a topic request, and waits for its
// acknowledgement, writing it again after a backoff (the HTTP retry's)
// while it fails in a way that may pass, until the job's sends end.
func (r *run) writeRecord(rq *filters.Request, idempotencyKey string) error {
	retry := r.a.cfg.HTTP.Retry
	wait := max(retry.InitialBackoff.D(), 10*time.Millisecond)
	for {
		_, err := r.records.Write(r.send, producer.Record(r.send, nil, rq, idempotencyKey))
		if err == nil || producer.Permanent(err) || r.send.Err() != nil {
			return err
		}
		r.a.log.Warn("replay: record write failed, retrying", "to", rq.Topic, "error", err, "retry_in", wait.String())
		t := time.NewTimer(wait)
		select {
		case <-r.send.Done():
			t.Stop()
			return r.send.Err()
		case <-t.C:
		}
		wait = min(2*wait, retry.MaxBackoff.D())
	}
}

func dlqPos(m *kafka.Message) string {
	return strconv.Itoa(int(m.TopicPartition.Partition)) + "/" + strconv.FormatInt(int64(m.TopicPartition.Offset), 10)
}

// copyForward returns m as it goes back to the DLQ unsent behind its key's
// failure: the same key, value and headers, orderly.replay_of naming m.
func copyForward(topic string, m *kafka.Message) *kafka.Message {
	return rewrite(topic, m, nil)
}

// rewrite returns a copy of m for the DLQ with the headers in set replaced
// and orderly.replay_of naming m.
func rewrite(topic string, m *kafka.Message, set map[string]string) *kafka.Message {
	hs := make([]kafka.Header, 0, len(m.Headers)+len(set)+1)
	for _, h := range m.Headers {
		if _, ok := set[h.Key]; !ok && h.Key != HeaderReplayOf {
			hs = append(hs, h)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(set)) {
		hs = append(hs, kafka.Header{Key: k, Value: []byte(set[k])})
	}
	hs = append(hs, kafka.Header{Key: HeaderReplayOf, Value: []byte(dlqPos(m))})
	return &kafka.Message{TopicPartition: kafka.TopicPartition{Topic: &topic, Partition: kafka.PartitionAny},
		Key: m.Key, Value: m.Value, Headers: hs}
}

// writeBack writes rec, the copy of m, to the DLQ and waits for its
// acknowledgement, remembering where it landed so that the gate's second
// pass does not take it for a later record of its key.
func (r *run) writeBack(rec *kafka.Message, m *kafka.Message) error {
	// Not cut by the cancel's grace: a record given to the producer lands
	// even when nobody waits for it, and the original, not marked handled,
	// would then be replayed again ahead of its copy.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.send), replayWriteBackTimeout)
	defer cancel()
	tp, err := r.w.Write(ctx, rec)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.written[pos{tp.Partition, int64(tp.Offset)}] = true
	r.mu.Unlock()
	r.a.metrics.DLQProduced.Inc()
	return nil
}

// pacer spaces the records a replay sends to a rate; a nil pacer does not
// wait.
type pacer struct {
	every time.Duration
	mu    sync.Mutex // protects next
	next  time.Time  // the earliest time the next record may go
}

func newPacer(rate float64) *pacer {
	if rate <= 0 {
		return nil
	}
	return &pacer{every: time.Duration(float64(time.Second) / rate)}
}

// wait waits for the next record's turn, or ctx.
func (p *pacer) wait(ctx context.Context) error {
	if p == nil {
		return ctx.Err()
	}
	p.mu.Lock()
	now := time.Now()
	at := p.next
	if at.Before(now) {
		at = now
	}
	p.next = at.Add(p.every)
	p.mu.Unlock()
	d := at.Sub(now)
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
