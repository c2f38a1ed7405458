// Package dispatcher moves messages from Kafka partitions to HTTP targets:
// one poll loop owns the consumer, one worker per assigned partition plans
// each message through the filters, and one lane per active key sends the
// message's requests in order. Offsets are committed only behind messages
// whose requests all succeeded or which the dead-letter topic acknowledged.
//
// Goroutines and their owners:
//   - Run's goroutine is the poll loop; it alone calls the consumer (Poll,
//     Pause, Resume, Close), but for the committer, and owns the partition
//     map.
//   - The committer goroutine (commit.go) sends the commits the poll loop
//     prepares, one at a time; Run starts it and stops it after the last
//     commit.
//   - Each partition's worker is started by the poll loop when the partition
//     is assigned and stopped by it on revoke or shutdown, after which the
//     partition's lanes are drained, then abandoned (see partition.stop).
//   - Lanes are not goroutines. The sender goroutines (senders.go), at most
//     http.max_conns_per_host per target, are started on demand by whoever
//     hands them a lane, exit when idle, and are waited for by Run after the
//     last partition stopped. Retry timers and DLQ acknowledgements move
//     lanes on from the timer's goroutine and the DLQ writer's pump.
//   - The log pump and the DLQ producer's event pumps are started by Run and
//     stopped before Run returns.
package dispatcher

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/kafkalog"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/offsets"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Sender makes HTTP attempts with circuit breaking and says what comes next
// (see httpclient.Step): the dispatcher waits out backoffs itself, holding no
// goroutine. *httpclient.Sender implements it.
type Sender interface {
	Attempt(ctx context.Context, c *httpclient.Call) httpclient.Step
}

// slotSender is a Sender whose attempts each sender goroutine makes in a
// slot of its own, bounded by http.timeout without a context per attempt
// (httpclient.Slot). *httpclient.Sender is one. A slot's attempts are the
// httpclient.Sender's: a wrapper that embeds one to change Attempt must
// hide NewSlot too.
type slotSender interface {
	NewSlot() *httpclient.Slot
}

// Options configures a Dispatcher.
type Options struct {
	Config  *config.Config
	Router  *filters.Router
	Sender  Sender
	Metrics *telemetry.Metrics
	Logger  *slog.Logger // nil discards
	// Tracing gives each message a CONSUMER span (nil: none).
	Tracing *telemetry.Tracing
	// Brokers overrides Config.Kafka.Brokers (the embedded broker's actual
	// address, for instance).
	Brokers string
	// OnQuarantine, if set, is called with the key quarantine once Run has
	// loaded it (dlq.quarantine_keys), so that replays can release keys.
	OnQuarantine func(*dlq.Quarantine)
}

// Dispatcher is the service's engine. Create it with New and start it with
// Run; Ready reports whether it should receive traffic.
type Dispatcher struct {
	cfg     *config.Config
	router  *filters.Router
	sender  Sender
	metrics *telemetry.Metrics
	log     *slog.Logger
	brokers string
	tracing *telemetry.Tracing

	ctx context.Context // the partitions' parent; cancelled when Run returns

	assigned atomic.Bool // a group assignment was received
	draining atomic.Bool // shutdown began

	// Owned by the poll loop.
	consumer   *kafka.Consumer
	parts      map[partKey]*partition
	commits    *committer // sends the poll loop's commits (commit.go)
	lastCommit time.Time
	lastGauges time.Time
	// lastCommitWarn is when a failed commit was last logged (commitWarn).
	lastCommitWarn time.Time
	anyPaused      bool // some partition is paused

	dlq *dlq.Writer // nil when dlq.topic is ""
	// records writes the records of topic requests; nil when no route has
	// one (records.go). missingTopics are those of its topics the brokers
	// did not know at start-up.
	records       *producer.Producer
	missingTopics atomic.Pointer[[]string]
	dlqErr        atomic.Pointer[dlqProblem] // the last DLQ write's failure, nil once one succeeds
	// quarantine is the key quarantine, nil unless dlq.quarantine_keys.
	quarantine   *dlq.Quarantine
	onQuarantine func(*dlq.Quarantine)
	// commitSoon asks the poll loop to commit at its next turn (at most
	// every 25 ms, where commit_interval is longer); commitNow, set once a
	// message is dead-lettered, asks it to commit at once (at most every
	// 5 ms), and while DLQ writes are under way (dlqWriting) it polls every
	// 5 ms: a crash between the DLQ's acknowledgement and the commit that
	// records the message dead-letters it again.
	commitSoon atomic.Bool
	commitNow  atomic.Bool
	dlqWriting atomic.Int64
	// rewindSoon asks the poll loop to look for partitions that want a
	// pass over their deferred messages (hotkeys.go).
	rewindSoon atomic.Bool
	senders    *senders // the sender pools, one per target
	keyCap     int      // messages a key may hold per partition (dispatch.max_key_in_flight)

	outcomes map[string]prometheus.Counter // orderly_messages_total by outcome, resolved once

	// held is the memory the messages in flight hold, estimated (heldSize):
	// from the hand-over to a partition until finished or abandoned.
	held atomic.Int64

	// onBegin, if set (tests only), sees each partition's in-flight count
	// right after a message was handed to its worker.
	onBegin func(topic string, partition int32, inFlight int)
	// onRevoke, if set (tests only), sees the partitions of each revoke
	// before their drain starts.
	onRevoke func(partitions []int32)
}

type partKey struct {
	topic     string
	partition int32
}

// New checks the options and returns a Dispatcher. It does not connect.
func New(o Options) (*Dispatcher, error) {
	if o.Config == nil || o.Router == nil || o.Sender == nil || o.Metrics == nil {
		return nil, errors.New("dispatcher: Config, Router, Sender and Metrics are required")
	}
	log, brokers := cmp.Or(o.Logger, slog.New(slog.DiscardHandler)), cmp.Or(o.Brokers, o.Config.Kafka.Brokers)
	if brokers == config.EmbeddedBrokers {
		return nil, errors.New("dispatcher: brokers = \"embedded\" needs the embedded broker's address in Options.Brokers")
	}
	d := &Dispatcher{
		cfg: o.Config, router: o.Router, sender: o.Sender, metrics: o.Metrics, log: log, brokers: brokers, tracing: o.Tracing,
		onQuarantine: o.OnQuarantine,
		parts:        make(map[partKey]*partition), outcomes: make(map[string]prometheus.Counter),
		keyCap: o.Config.Dispatch.MaxKeyInFlight,
	}
	if d.keyCap == 0 {
		d.keyCap = max(o.Config.Dispatch.MaxInFlight/10, 1)
	}
	for _, oc := range []string{telemetry.OutcomeDelivered, telemetry.OutcomeDeadLettered, telemetry.OutcomeSkipped, telemetry.OutcomeStalled} {
		d.outcomes[oc] = o.Metrics.Messages.WithLabelValues(oc)
	}
	return d, nil
}

// outcome returns the orderly_messages_total counter of an outcome.
func (d *Dispatcher) outcome(name string) prometheus.Counter {
	if c, ok := d.outcomes[name]; ok {
		return c
	}
	return d.metrics.Messages.WithLabelValues(name)
}

// heldOverhead estimates what a message in flight costs beyond its key,
// value and headers: the client library's message while it waits for its
// partition's worker, then the item, its rendered request and its place in
// a lane (estimated from heap profiles of orderly-bench).
const heldOverhead = 512

// heldSize is the memory a message in flight holds, estimated.
func heldSize(key, value, headers int) int64 {
	return int64(key + value + headers*48 + heldOverhead)
}

// HeldBytes returns an estimate of the memory the messages in flight hold:
// their keys, values and headers plus a fixed overhead each. Safe for
// concurrent use.
func (d *Dispatcher) HeldBytes() int64 { return d.held.Load() }

// Ready reports whether the dispatcher has its group assignment and is not
// shutting down. Safe for concurrent use.
func (d *Dispatcher) Ready() bool { return d.assigned.Load() && !d.draining.Load() }

// Run consumes until ctx ends, then stops fetching, lets in-flight work finish
// within dispatch.drain_timeout, commits and leaves the group. It returns nil
// after a clean shutdown and an error when the consumer cannot be created or
// fails fatally.
func (d *Dispatcher) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d.ctx = runCtx
	d.senders = newSenders(d.cfg.HTTP.MaxConnsPerHost, d.cfg.HTTP.AdaptiveConnsPerHost, d.metrics)

	var pumps sync.WaitGroup
	logs := make(chan kafka.LogEvent, 256)
	stopLogs := make(chan struct{})
	pumps.Go(func() { kafkalog.Pump(d.log, logs, stopLogs) })
	defer func() { close(stopLogs); pumps.Wait() }()

	if d.cfg.DLQ.Topic != "" {
		w, err := dlq.NewWriter(d.brokers, d.cfg, d.log, logs, d.metrics)
		if err != nil {
			return err
		}
		d.dlq = w
		defer w.Close()
	}

	records, err := d.newRecords(logs)
	if err != nil {
		return fmt.Errorf("dispatcher: unable to create the producer of topic requests: %w", err)
	}
	if records != nil {
		d.records = records
		defer records.Close()
	}

	if d.cfg.DLQ.QuarantineKeys {
		q, err := d.loadQuarantine(ctx)
		if err != nil {
			return nil // ctx ended while the brokers were unreachable
		}
		d.quarantine = q
		qctx, stopQ := context.WithCancel(context.Background())
		var follow sync.WaitGroup
		follow.Go(func() { q.Run(qctx) })
		defer func() { stopQ(); follow.Wait(); q.Close() }()
		if d.onQuarantine != nil {
			d.onQuarantine(q)
		}
	}

	c, err := kafka.NewConsumer(d.consumerConfig(logs))
	if err != nil {
		return fmt.Errorf("dispatcher: unable to create the consumer: %w", err)
	}
	d.consumer = c
	if err := c.SubscribeTopics(d.cfg.Kafka.Topics, d.onRebalance); err != nil {
		c.Close()
		return fmt.Errorf("dispatcher: unable to subscribe to %v: %w", d.cfg.Kafka.Topics, err)
	}
	d.log.Info("consuming", "brokers", d.brokers, "group", d.cfg.Kafka.GroupID, "topics", d.cfg.Kafka.Topics)

	d.startCommitter()
	runErr := d.pollLoop(ctx)
	d.shutdown()
	d.stopCommitter()
	d.senders.close()
	if err := c.Close(); err != nil {
		d.log.Warn("closing the consumer", "error", err)
	}
	d.log.Info("stopped")
	return runErr
}

// loadQuarantine reads the key quarantine, retrying while the brokers are
// unreachable, until ctx ends.
func (d *Dispatcher) loadQuarantine(ctx context.Context) (*dlq.Quarantine, error) {
	for {
		q, err := dlq.NewQuarantine(ctx, d.brokers, d.cfg, d.log, d.metrics)
		if err == nil {
			return q, nil
		}
		d.log.Warn("unable to load the key quarantine, retrying", "topic", dlq.QuarantineTopic(d.cfg), "error", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(5 * time.Second):
		}
	}
}

func (d *Dispatcher) consumerConfig(logs chan kafka.LogEvent) *kafka.ConfigMap {
	cm := kafka.ConfigMap{
		"bootstrap.servers":             d.brokers,
		"group.id":                      d.cfg.Kafka.GroupID,
		"client.id":                     "orderly",
		"enable.auto.commit":            false,
		"enable.auto.offset.store":      false,
		"auto.offset.reset":             "earliest",
		"partition.assignment.strategy": "cooperative-sticky",
		"enable.metrics.push":           false,
		// librdkafka's default of 1000 ms caps a busy consumer far below
		// what the dispatcher can send.
		"fetch.queue.backoff.ms": 20,
		// A resumed partition joins the next fetch; a long poll on the
		// other partitions (default 500 ms) would delay it that long.
		"fetch.wait.max.ms": 100,
		// Pre-fetched messages count against memory, not against
		// max_in_flight, and live in fetch buffers of librdkafka's own
		// heap: 2 MB still outruns the dispatcher (the fetcher refills
		// every fetch.queue.backoff.ms) and keeps tens of MB of resident
		// memory off a full back-pressure cycle.
		"queued.max.messages.kbytes": 2048,
		"go.logs.channel.enable":     true,
		"go.logs.channel":            logs,
	}
	for k, v := range d.cfg.Kafka.Properties {
		cm[k] = v
	}
	if cm["group.protocol"] == "consumer" {
		// KIP-848: the broker assigns; these client settings are refused.
		if _, set := d.cfg.Kafka.Properties["partition.assignment.strategy"]; !set {
			delete(cm, "partition.assignment.strategy")
		}
	}
	return &cm
}

// pollLoop is the only caller of the consumer until shutdown.
func (d *Dispatcher) pollLoop(ctx context.Context) error {
	d.lastCommit = time.Now()
	for ctx.Err() == nil {
		// While a partition is paused, poll briefly so that it resumes as
		// soon as its lanes have drained to half of max_in_flight.
		timeout := 100
		switch {
		case d.anyPaused, d.dlqWriting.Load() > 0 || d.commitNow.Load():
			timeout = 5
		case d.commitSoon.Load() || d.held.Load() > 0 || d.commits.busy:
			// Messages may finish any moment: come back in time to commit
			// them (or to take the answer to the commit in flight).
			timeout = max(1, int(min(d.cfg.Dispatch.CommitInterval.D(), soonest)/time.Millisecond))
		}
		switch e := d.consumer.Poll(timeout).(type) {
		case nil:
			// Nothing new to consume: commit what finished soon rather than
			// at the next commit_interval, so a crash now sends little again.
			d.commitSoon.Store(true)
		case *kafka.Message:
			d.handleMessage(e)
		case kafka.Error:
			if e.IsFatal() {
				return fmt.Errorf("dispatcher: fatal consumer error: %w", e)
			}
			if e.Code() == kafka.ErrAllBrokersDown || e.Code() == kafka.ErrTransport {
				d.log.Warn("kafka unreachable, retrying", "brokers", d.brokers, "error", e)
			} else {
				d.log.Warn("consumer error", "error", e)
			}
		}
		d.afterPoll()
	}
	return nil
}

// afterPoll resumes what may resume, looks for partitions that want a pass
// over deferred messages, and commits when it is time (commit.go).
func (d *Dispatcher) afterPoll() {
	d.maybeResume()
	d.rewind()
	d.maybeCommit()
}

func (d *Dispatcher) handleMessage(m *kafka.Message) {
	if m.TopicPartition.Error != nil {
		d.log.Warn("consume error", "topic", *m.TopicPartition.Topic, "partition", m.TopicPartition.Partition,
			"error", m.TopicPartition.Error)
		return
	}
	p := d.parts[partKey{*m.TopicPartition.Topic, m.TopicPartition.Partition}]
	if p == nil || p.revoking {
		return // not ours (any more): whoever owns it next consumes it
	}
	off := int64(m.TopicPartition.Offset)
	// A pass reads deferred messages again (hotkeys.go): they were begun
	// when first read, and the worker drops the others.
	reread := off < p.rereadEnd
	if reread {
		d.metrics.Rereads.Inc()
	} else {
		already, err := p.tracker.Begin(off)
		if err != nil {
			d.log.Error("offset out of order, message ignored", "topic", p.topic, "partition", p.id, "error", err)
			return
		}
		if already {
			// Finished by an earlier owner, as its last commit recorded.
			p.next = off + 1
			d.outcome(telemetry.OutcomeAlreadyDone).Inc()
			return
		}
	}
	p.next = off + 1
	n := heldSize(len(m.Key), len(m.Value), len(m.Headers))
	p.held.Add(n)
	d.held.Add(n)
	inFlight := p.holding.Add(1)
	p.in <- m // never blocks: the partition pauses at max_in_flight
	if d.onBegin != nil {
		d.onBegin(p.topic, p.id, int(inFlight))
	}
	if p.paused {
		return
	}
	// The span only grows with new offsets: a pass does not pause for it.
	span := p.tracker.Span()
	if inFlight < int64(d.cfg.Dispatch.MaxInFlight) && (reread || span < d.cfg.Dispatch.MaxSpan) {
		return
	}
	if err := d.consumer.Pause([]kafka.TopicPartition{p.tp}); err != nil {
		d.log.Error("pause", "topic", p.topic, "partition", p.id, "error", err)
		return
	}
	p.paused = true
	p.spanPaused = inFlight < int64(d.cfg.Dispatch.MaxInFlight)
	d.anyPaused = true
	p.pausedGauge.Set(1)
	d.metrics.Pauses.Inc()
	if p.spanPaused {
		d.log.Warn("partition paused: the oldest unfinished message is dispatch.max_span offsets behind",
			"topic", p.topic, "partition", p.id, "oldest_unfinished", p.tracker.Committable(), "span", span,
			"oldest_age", p.tracker.OldestPending(time.Now()).Round(time.Second).String())
		return
	}
	d.log.Debug("partition paused", "topic", p.topic, "partition", p.id, "in_flight", inFlight)
}

// maybeResume resumes paused partitions whose in-flight count fell to half
// of max_in_flight and, when the span paused them, whose span fell to half
// of max_span or that want a pass over deferred messages (the oldest
// unfinished message may be one of them).
func (d *Dispatcher) maybeResume() {
	if !d.anyPaused {
		return
	}
	stillPaused := false
	for _, p := range d.parts {
		if !p.paused || p.revoking {
			continue
		}
		if p.holding.Load() > int64(d.cfg.Dispatch.MaxInFlight/2) ||
			p.spanPaused && p.tracker.Span() > d.cfg.Dispatch.MaxSpan/2 && !p.rewind.Load() {
			stillPaused = true
			continue
		}
		if err := d.consumer.Resume([]kafka.TopicPartition{p.tp}); err != nil {
			d.log.Error("resume", "topic", p.topic, "partition", p.id, "error", err)
			stillPaused = true
			continue
		}
		// librdkafka's fetcher notices a resume only at its next wake-up
		// (up to a second later); a seek to the position it
		// would fetch from anyway wakes it at once. Pause purged the
		// prefetched messages, so that position is one past the last
		// message read.
		if p.next > 0 {
			tp := p.tp
			tp.Offset = kafka.Offset(p.next)
			if _, err := d.consumer.SeekPartitions([]kafka.TopicPartition{tp}); err != nil {
				d.log.Warn("seek after resume", "topic", p.topic, "partition", p.id, "error", err)
			}
		}
		p.paused = false
		p.pausedGauge.Set(0)
		d.log.Debug("partition resumed", "topic", p.topic, "partition", p.id)
	}
	d.anyPaused = stillPaused
}

func (d *Dispatcher) ownedPartitions() []*partition {
	ps := make([]*partition, 0, len(d.parts))
	for _, p := range d.parts {
		ps = append(ps, p)
	}
	return ps
}

// onRebalance runs inside Poll, on the poll loop. The library performs the
// (incremental) assign or unassign after it returns. It may run again,
// nested, while revoke polls during a drain.
func (d *Dispatcher) onRebalance(c *kafka.Consumer, ev kafka.Event) error {
	switch e := ev.(type) {
	case kafka.AssignedPartitions:
		d.startAt(c, e.Partitions, d.assign(c, e.Partitions))
		d.metrics.Rebalances.WithLabelValues("assigned").Add(float64(len(e.Partitions)))
		d.assigned.Store(true)
		d.log.Info("partitions assigned", "partitions", tpString(e.Partitions), "protocol", c.GetRebalanceProtocol())
	case kafka.RevokedPartitions:
		lost := c.AssignmentLost()
		kind := "revoked"
		if lost {
			kind = "lost"
			// A commit under way may include these partitions: let it be
			// answered before anyone else may own them (it may still be
			// refused), and send none for them after.
			d.awaitCommit()
		}
		d.metrics.Rebalances.WithLabelValues(kind).Add(float64(len(e.Partitions)))
		var ps []*partition
		for _, tp := range e.Partitions {
			p := d.parts[partKey{*tp.Topic, tp.Partition}]
			switch {
			case p == nil:
			case p.revoking:
				// Draining in an outer revoke: a loss cuts that drain short
				// and its commit out; a second revoke changes nothing.
				if lost {
					p.lost = true
					p.hurry()
				}
			default:
				ps = append(ps, p)
			}
		}
		if lost {
			d.release(ps, false)
		} else {
			d.revoke(ps)
		}
		d.log.Info("partitions "+kind, "partitions", tpString(e.Partitions))
	}
	d.shareChanged(c) // targets' rates follow this instance's share of the partitions (share.go)
	return nil
}

// startAt assigns tps to the consumer at the offsets of at (as assign
// returned them), or, should that fail, as the library would by itself.
// Explicit offsets spare librdkafka a second committed-offset fetch, and a
// new group's partitions the 100 ms it waits before it looks up their
// auto.offset.reset offset.
func (d *Dispatcher) startAt(c *kafka.Consumer, tps, at []kafka.TopicPartition) {
	assign := c.Assign
	if c.GetRebalanceProtocol() == "COOPERATIVE" {
		assign = c.IncrementalAssign
	}
	if err := assign(at); err != nil {
		d.log.Warn("unable to assign the partitions at their committed offsets; librdkafka looks them up", "error", err)
		if err := assign(tps); err != nil {
			d.log.Error("unable to assign the partitions", "partitions", tpString(tps), "error", err)
		}
	}
}

// resetOffset is where a partition without a committed offset starts, as
// auto.offset.reset says (OffsetInvalid: let librdkafka decide, "error").
func (d *Dispatcher) resetOffset() kafka.Offset {
	v, ok := d.cfg.Kafka.Properties["auto.offset.reset"]
	if !ok {
		v = "earliest" // consumerConfig's default
	}
	switch v {
	case "smallest", "earliest", "beginning":
		return kafka.OffsetBeginning
	case "largest", "latest", "end":
		return kafka.OffsetEnd
	}
	return kafka.OffsetInvalid
}

// assign starts the newly assigned partitions where the group left off:
// each partition's tracker starts from the committed offset and the
// progress record committed with it, so that messages an earlier owner
// finished beyond the committed offset are not sent again. It returns tps
// with the offsets the consumer is to start them at (those it could not
// read left as they are).
func (d *Dispatcher) assign(c *kafka.Consumer, tps []kafka.TopicPartition) []kafka.TopicPartition {
	if d.quarantine != nil {
		// Keys the partitions' previous owner quarantined must be known
		// before their next messages are dispatched.
		ctx, cancel := context.WithTimeout(d.ctx, 10*time.Second)
		if err := d.quarantine.CatchUp(ctx); err != nil {
			d.log.Warn("the key quarantine may be behind", "error", err)
		}
		cancel()
	}
	committed := map[partKey]kafka.TopicPartition{}
	if res, err := c.Committed(tps, 5000); err == nil {
		for _, tp := range res {
			committed[partKey{*tp.Topic, tp.Partition}] = tp
		}
	} else {
		// The partitions start without progress: what finished beyond the
		// committed offset is sent again (at-least-once).
		d.log.Warn("unable to read committed offsets and progress", "error", err)
	}
	at := slices.Clone(tps)
	reset := d.resetOffset()
	for i, tp := range tps {
		k := partKey{*tp.Topic, tp.Partition}
		ct, ok := committed[k]
		has := ok && ct.Offset >= 0 // the consumer and the tracker start there
		switch {
		case has:
			at[i].Offset, at[i].LeaderEpoch = ct.Offset, ct.LeaderEpoch
		case ok && ct.Error == nil && ct.Offset == kafka.OffsetInvalid:
			at[i].Offset = reset // nothing committed
		}
		if d.parts[k] != nil {
			continue
		}
		start, meta := int64(-1), ""
		if has {
			start = int64(ct.Offset)
			if ct.Metadata != nil {
				meta = *ct.Metadata
			}
		}
		tracker := offsets.New(start)
		if start >= 0 {
			t, err := offsets.NewFromProgress(start, meta)
			if err != nil {
				d.log.Warn("ignoring the progress record of the committed offset: finished messages beyond it are sent again",
					"topic", k.topic, "partition", k.partition, "committed", start, "error", err)
			}
			tracker = t
		}
		p := newPartition(d, tp, tracker)
		if start >= 0 {
			p.committed, p.committedMeta = start, meta
			p.committedGauge.Set(float64(start))
		}
		d.parts[k] = p
	}
	return at
}

// release stops the given partitions, and forgets them: revoked (commit),
// they drain within drain_timeout and their completed prefix is committed;
// lost, they are abandoned at once. A paused partition is resumed first so that librdkafka does not keep
// it paused should it come back to this member.
func (d *Dispatcher) release(ps []*partition, commit bool) {
	if len(ps) == 0 {
		return
	}
	d.resumeForGood(ps)
	if commit {
		d.stopAll(ps, d.cfg.Dispatch.DrainTimeout.D(), true)
		d.commit(ps)
	} else {
		// Lost: another member may own these partitions already and
		// start from the committed offset. Sending on while it does
		// would interleave two runs of the same keys; stop at once.
		d.stopAll(ps, 0, true)
	}
	d.forget(ps)
}

// revoke stops revoked partitions, commits what they finished and forgets
// them. It runs inside the rebalance callback, because the partitions may
// go to their next owner only once their lanes stopped sending, and
// librdkafka holds back every partition's messages until it returns: so
// the lanes finish only the attempt or DLQ write under way (within
// drain_timeout) and leave the rest of their queues to the next owner,
// which skips what finished (the progress record). Meanwhile it polls on,
// so the partitions that stay keep being committed and resumed.
func (d *Dispatcher) revoke(ps []*partition) {
	if len(ps) == 0 {
		return
	}
	tps := make([]kafka.TopicPartition, len(ps))
	ids := make([]int32, len(ps))
	for i, p := range ps {
		p.revoking = true
		tps[i], ids[i] = p.tp, p.id
	}
	if d.onRevoke != nil {
		d.onRevoke(ids)
	}
	if err := d.consumer.Pause(tps); err != nil {
		d.log.Warn("pause of revoked partitions", "error", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.stopAll(ps, d.cfg.Dispatch.DrainTimeout.D(), false)
	}()
	d.pollUntil(done)
	// librdkafka would keep them paused should they come back to this member.
	if err := d.consumer.Resume(tps); err != nil {
		d.log.Warn("resume of revoked partitions", "error", err)
	}
	var keep []*partition
	for _, p := range ps {
		if !p.lost {
			keep = append(keep, p)
		}
	}
	d.commit(keep)
	d.forget(ps)
}

// pollUntil runs the poll loop's work (messages, resumes, commits) until
// done is closed. Fatal errors are logged: the caller is a drain that
// ends within drain_timeout, after which the poll loop sees them again.
func (d *Dispatcher) pollUntil(done <-chan struct{}) {
	for {
		select {
		case <-done:
			return
		default:
		}
		switch e := d.consumer.Poll(10).(type) {
		case *kafka.Message:
			d.handleMessage(e)
		case kafka.Error:
			d.log.Warn("consumer error during a drain", "error", e)
		}
		d.afterPoll()
	}
}

// resumeForGood resumes the paused partitions among ps before they go.
func (d *Dispatcher) resumeForGood(ps []*partition) {
	for _, p := range ps {
		if p.paused {
			_ = d.consumer.Resume([]kafka.TopicPartition{p.tp})
			p.paused = false
			p.pausedGauge.Set(0)
		}
	}
}

// forget drops stopped partitions from the poll loop's map and their metrics.
func (d *Dispatcher) forget(ps []*partition) {
	for _, p := range ps {
		delete(d.parts, partKey{p.topic, p.id})
		p.forgetMetrics()
	}
}

// stopAll stops partitions concurrently, each draining (whole or only what
// is under way, see partition.stop) for at most timeout.
func (d *Dispatcher) stopAll(ps []*partition, timeout time.Duration, whole bool) {
	var wg sync.WaitGroup
	start := time.Now()
	for _, p := range ps {
		wg.Go(func() {
			if !p.stop(timeout, whole) {
				// Before the timeout when what is left can only wait
				// (stalled keys, keys held by a replay).
				d.log.Warn("unfinished messages abandoned, they will be redelivered",
					"topic", p.topic, "partition", p.id, "committable", p.tracker.Committable(),
					"drained_for", time.Since(start).Round(time.Millisecond).String(), "drain_timeout", timeout.String())
			}
		})
	}
	wg.Wait()
}

// shutdown stops fetching, drains every partition and commits.
func (d *Dispatcher) shutdown() {
	d.draining.Store(true)
	ps := d.ownedPartitions()
	d.log.Info("draining", "partitions", len(ps), "drain_timeout", d.cfg.Dispatch.DrainTimeout.D().String())
	if len(ps) > 0 {
		tps := make([]kafka.TopicPartition, len(ps))
		for i, p := range ps {
			tps[i] = p.tp
		}
		if err := d.consumer.Pause(tps); err != nil {
			d.log.Warn("pause on shutdown", "error", err)
		}
		for _, p := range ps {
			p.paused = false // paused for good now; release must not resume it
		}
	}
	d.release(ps, true)
}

// failed turns the permanent error of request index of it into the
// message's failure.
func (d *Dispatcher) failed(p *partition, it *item, index int, err error) *dlq.Failure {
	f := &dlq.Failure{Reason: err.Error(), Route: it.route.Name(), RequestIndex: index}
	var he *httpclient.Error
	if errors.As(err, &he) {
		f.Status, f.Attempts = he.Status, he.Attempts
	}
	d.log.Warn("delivery failed permanently", "topic", p.topic, "partition", p.id, "offset", it.msg.Offset,
		"route", it.route.Name(), "request", index, "error", err)
	return f
}

func tpString(tps []kafka.TopicPartition) string {
	b := make([]byte, 0, 16*len(tps))
	for i, tp := range tps {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, *tp.Topic...)
		b = append(b, '/')
		b = strconv.AppendInt(b, int64(tp.Partition), 10)
	}
	return string(b)
}
