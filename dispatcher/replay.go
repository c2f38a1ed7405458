package dispatcher

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// ErrReplayRunning is returned by StartReplay while another job runs.
var ErrReplayRunning = errors.New("a replay job is already running")

// ErrNoDLQ is returned when dlq.topic is empty.
var ErrNoDLQ = errors.New("dlq.topic is not configured")

// DLQRecord is a dead-lettered message as the admin API shows it.
type DLQRecord struct {
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
}

// DLQFilter selects DLQ records. Zero values select everything; To is
// exclusive and -1 means "to the end".
type DLQFilter struct {
	Partition int32  // -1: every partition
	From      int64  // first offset
	To        int64  // -1: the end
	Route     string // "": any
	Key       string // "": any
	Limit     int    // 0: no limit
}

// ReplayRequest is the body of POST /dlq/replay.
type ReplayRequest struct {
	Partition  *int32 `json:"partition"`
	FromOffset *int64 `json:"from_offset"`
	ToOffset   *int64 `json:"to_offset"` // inclusive
	Route      string `json:"route"`
	Key        string `json:"key"`
	Limit      int    `json:"limit"`
	DryRun     bool   `json:"dry_run"`
}

// ReplayJob is a replay's progress.
type ReplayJob struct {
	ID         string        `json:"id"`
	State      string        `json:"state"` // running, done, failed
	DryRun     bool          `json:"dry_run"`
	Request    ReplayRequest `json:"request"`
	Scanned    int           `json:"scanned"`
	Matched    int           `json:"matched"`
	Replayed   int           `json:"replayed"`
	Failed     int           `json:"failed"` // dead-lettered again
	Skipped    int           `json:"skipped"`
	Error      string        `json:"error,omitempty"`
	StartedAt  time.Time     `json:"started_at"`
	FinishedAt *time.Time    `json:"finished_at,omitempty"`
}

// DLQAdmin lists the DLQ and replays it. Replayed messages go through the
// route named in orderly.route, resuming at orderly.request_index, with the
// same sender (retries, breakers); those that fail again go back to the DLQ
// with orderly.attempts increased. Progress is committed under the consumer
// group "<group_id>.replay" so a restarted replay does not resend what it
// already replayed. Safe for concurrent use; Close stops a running job.
type DLQAdmin struct {
	brokers string
	cfg     *config.Config
	router  *filters.Router
	sender  Sender
	metrics *telemetry.Metrics
	log     *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu   sync.Mutex // protects jobs and running
	jobs map[string]*ReplayJob
	run  string // id of the running job, "" if none
}

// NewDLQAdmin returns a DLQAdmin; it connects only when used.
func NewDLQAdmin(o Options) *DLQAdmin {
	ctx, cancel := context.WithCancel(context.Background())
	return &DLQAdmin{brokers: o.brokers(), cfg: o.Config, router: o.Router, sender: o.Sender, metrics: o.Metrics,
		log: o.logger(), ctx: ctx, cancel: cancel, jobs: make(map[string]*ReplayJob)}
}

// Close cancels a running job and waits for it.
func (a *DLQAdmin) Close() {
	a.cancel()
	a.wg.Wait()
}

func (a *DLQAdmin) consumer(group string) (*kafka.Consumer, error) {
	cm := kafka.ConfigMap{"bootstrap.servers": a.brokers, "group.id": group, "enable.auto.commit": false,
		"enable.auto.offset.store": false, "auto.offset.reset": "earliest", "enable.metrics.push": false,
		"enable.partition.eof": true, "log_level": 3}
	for k, v := range a.cfg.Kafka.Properties {
		if producerProperty(k) {
			cm[k] = v
		}
	}
	return kafka.NewConsumer(&cm)
}

// List returns DLQ records matching f, in partition then offset order.
func (a *DLQAdmin) List(ctx context.Context, f DLQFilter) ([]DLQRecord, error) {
	if a.cfg.DLQ.Topic == "" {
		return nil, ErrNoDLQ
	}
	c, err := a.consumer(a.cfg.Kafka.GroupID + ".dlq-browser")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	var out []DLQRecord
	err = a.scan(ctx, c, f, nil, func(m *kafka.Message) bool {
		out = append(out, toRecord(m))
		return f.Limit <= 0 || len(out) < f.Limit
	})
	return out, err
}

// scan reads the DLQ partitions selected by f from their start (f.From, or
// the committed offset when committed is given and later) to their end at
// the time of the call, calling fn for each matching record until it returns
// false.
func (a *DLQAdmin) scan(ctx context.Context, c *kafka.Consumer, f DLQFilter, committed map[int32]int64, fn func(*kafka.Message) bool) error {
	topic := a.cfg.DLQ.Topic
	md, err := c.GetMetadata(&topic, false, 10000)
	if err != nil {
		return fmt.Errorf("dlq metadata: %w", err)
	}
	tm, ok := md.Topics[topic]
	if !ok || tm.Error.Code() != kafka.ErrNoError {
		return fmt.Errorf("dlq topic %q: %v", topic, tm.Error)
	}
	for _, pm := range tm.Partitions {
		if f.Partition >= 0 && pm.ID != f.Partition {
			continue
		}
		lo, hi, err := c.QueryWatermarkOffsets(topic, pm.ID, 10000)
		if err != nil {
			return fmt.Errorf("dlq offsets: %w", err)
		}
		start := max(lo, f.From)
		if c, ok := committed[pm.ID]; ok && c > start {
			start = c
		}
		end := hi
		if f.To >= 0 && f.To < end {
			end = f.To
		}
		if start >= end {
			continue
		}
		if err := c.Assign([]kafka.TopicPartition{{Topic: &topic, Partition: pm.ID, Offset: kafka.Offset(start)}}); err != nil {
			return err
		}
		for next := start; next < end; {
			if err := ctx.Err(); err != nil {
				return err
			}
			switch e := c.Poll(200).(type) {
			case *kafka.Message:
				if e.TopicPartition.Error != nil {
					return e.TopicPartition.Error
				}
				next = int64(e.TopicPartition.Offset) + 1
				if int64(e.TopicPartition.Offset) >= end {
					break
				}
				if matches(e, f) && !fn(e) {
					return c.Unassign()
				}
			case kafka.Error:
				if e.IsFatal() {
					return e
				}
			}
		}
		if err := c.Unassign(); err != nil {
			return err
		}
	}
	return nil
}

func matches(m *kafka.Message, f DLQFilter) bool {
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
	for i := len(m.Headers) - 1; i >= 0; i-- { // the last wins: replays append
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

func toRecord(m *kafka.Message) DLQRecord {
	r := DLQRecord{Partition: m.TopicPartition.Partition, Offset: int64(m.TopicPartition.Offset), Key: string(m.Key),
		ValueBytes: len(m.Value), Status: int(hdrInt(m, HeaderStatus)), RequestIndex: int(hdrInt(m, HeaderRequestIndex)),
		Attempts: int(hdrInt(m, HeaderAttempts)), OriginalPartition: int32(hdrInt(m, HeaderOriginalPartition)),
		OriginalOffset: hdrInt(m, HeaderOriginalOffset)}
	r.Error, _ = hdr(m, HeaderError)
	r.Route, _ = hdr(m, HeaderRoute)
	r.OriginalTopic, _ = hdr(m, HeaderOriginalTopic)
	r.FailedAt, _ = hdr(m, HeaderFailedAt)
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
func (a *DLQAdmin) StartReplay(req ReplayRequest) (string, error) {
	if a.cfg.DLQ.Topic == "" {
		return "", ErrNoDLQ
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.run != "" {
		return "", ErrReplayRunning
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	job := &ReplayJob{ID: hex.EncodeToString(b[:]), State: "running", DryRun: req.DryRun, Request: req, StartedAt: time.Now().UTC()}
	a.jobs[job.ID] = job
	a.run = job.ID
	a.metrics.ReplayJobsActive.Set(1)
	a.wg.Go(func() {
		err := a.replay(job)
		a.mu.Lock()
		defer a.mu.Unlock()
		now := time.Now().UTC()
		job.FinishedAt = &now
		job.State = "done"
		if err != nil {
			job.State, job.Error = "failed", err.Error()
		}
		a.run = ""
		a.metrics.ReplayJobsActive.Set(0)
		a.log.Info("replay finished", "id", job.ID, "state", job.State, "matched", job.Matched,
			"replayed", job.Replayed, "failed", job.Failed, "error", job.Error)
	})
	return job.ID, nil
}

// Job returns a copy of a job's progress.
func (a *DLQAdmin) Job(id string) (ReplayJob, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	j, ok := a.jobs[id]
	if !ok {
		return ReplayJob{}, false
	}
	return *j, true
}

func (a *DLQAdmin) update(fn func()) {
	a.mu.Lock()
	fn()
	a.mu.Unlock()
}

// replay runs one job: records are replayed one at a time in DLQ order,
// which keeps the order of each key (a key's records share a DLQ partition).
func (a *DLQAdmin) replay(job *ReplayJob) error {
	req := job.Request
	f := DLQFilter{Partition: -1, To: -1, Route: req.Route, Key: req.Key}
	if req.Partition != nil {
		f.Partition = *req.Partition
	}
	if req.FromOffset != nil {
		f.From = *req.FromOffset
	}
	if req.ToOffset != nil {
		f.To = *req.ToOffset + 1
	}
	group := a.cfg.Kafka.GroupID + ".replay"
	c, err := a.consumer(group)
	if err != nil {
		return err
	}
	defer c.Close()
	var committed map[int32]int64
	if !req.DryRun {
		committed, err = a.committed(c)
		if err != nil {
			return err
		}
	}
	var w *dlqWriter
	if !req.DryRun {
		logs := make(chan kafka.LogEvent, 16)
		stop := make(chan struct{})
		var lw sync.WaitGroup
		lw.Go(func() { pumpLogs(a.log, logs, stop) })
		defer func() { close(stop); lw.Wait() }()
		if w, err = newDLQWriter(a.brokers, a.cfg, a.log, logs); err != nil {
			return err
		}
		defer w.close()
	}
	n := 0
	var sendErr error
	err = a.scan(a.ctx, c, f, committed, func(m *kafka.Message) bool {
		n++
		a.update(func() { job.Matched++ })
		if !req.DryRun {
			outcome, err := a.replayOne(m, w)
			if err != nil {
				sendErr = err
				return false
			}
			a.metrics.ReplayMessages.WithLabelValues(outcome).Inc()
			a.update(func() {
				switch outcome {
				case telemetry.OutcomeDelivered:
					job.Replayed++
				case telemetry.OutcomeDeadLettered:
					job.Failed++
				default:
					job.Skipped++
				}
			})
			tp := m.TopicPartition
			tp.Offset++
			if _, err := c.CommitOffsets([]kafka.TopicPartition{tp}); err != nil {
				a.log.Warn("replay: commit failed", "error", err)
			}
		}
		return req.Limit <= 0 || n < req.Limit
	})
	if sendErr != nil {
		return sendErr
	}
	return err
}

func (a *DLQAdmin) committed(c *kafka.Consumer) (map[int32]int64, error) {
	topic := a.cfg.DLQ.Topic
	md, err := c.GetMetadata(&topic, false, 10000)
	if err != nil {
		return nil, err
	}
	var tps []kafka.TopicPartition
	for _, p := range md.Topics[topic].Partitions {
		tps = append(tps, kafka.TopicPartition{Topic: &topic, Partition: p.ID})
	}
	res, err := c.Committed(tps, 10000)
	var ke kafka.Error
	if errors.As(err, &ke) && ke.Code() == kafka.ErrGroupIDNotFound {
		return map[int32]int64{}, nil // no replay has committed yet
	}
	if err != nil {
		return nil, fmt.Errorf("replay: reading committed progress: %w", err)
	}
	out := make(map[int32]int64, len(res))
	for _, tp := range res {
		if tp.Offset >= 0 {
			out[tp.Partition] = int64(tp.Offset)
		}
	}
	return out, nil
}

// replayOne sends one DLQ record's remaining requests. A permanent failure
// writes it back to the DLQ; an error means the job must stop.
func (a *DLQAdmin) replayOne(m *kafka.Message, w *dlqWriter) (string, error) {
	orig := filters.Message{Key: m.Key, Value: m.Value, Timestamp: m.Timestamp}
	orig.Topic, _ = hdr(m, HeaderOriginalTopic)
	orig.Partition = int32(hdrInt(m, HeaderOriginalPartition))
	orig.Offset = hdrInt(m, HeaderOriginalOffset)
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
	route, _ := hdr(m, HeaderRoute)
	start := int(hdrInt(m, HeaderRequestIndex))
	prevAttempts := int(hdrInt(m, HeaderAttempts))
	it := &item{msg: orig}
	var plan filters.Plan
	var err error
	if route == "" {
		plan, err = a.router.Plan(&orig)
	} else {
		plan, err = a.router.PlanRoute(route, &orig)
	}
	if err != nil {
		return a.reDeadLetter(w, it, &failure{reason: "replay: " + err.Error(), route: route, requestIndex: start, attempts: prevAttempts})
	}
	for i := max(start, 0); i < len(plan.Requests); i++ {
		_, err := a.sender.Send(a.ctx, &plan.Requests[i], idempotencyKey(&orig, i))
		if err == nil {
			continue
		}
		if !httpclient.IsPermanent(err) {
			return "", fmt.Errorf("replay stopped: %w", err)
		}
		f := &failure{reason: err.Error(), route: plan.Route, requestIndex: i, attempts: prevAttempts}
		var he *httpclient.Error
		if errors.As(err, &he) {
			f.status, f.attempts = he.Status, prevAttempts+he.Attempts
		}
		return a.reDeadLetter(w, it, f)
	}
	return telemetry.OutcomeDelivered, nil
}

func (a *DLQAdmin) reDeadLetter(w *dlqWriter, it *item, f *failure) (string, error) {
	rec := dlqRecord(w.topic, it, f, time.Now(), -1)
	if err := w.write(a.ctx, rec); err != nil {
		return "", fmt.Errorf("replay: writing back to the DLQ: %w", err)
	}
	a.metrics.DLQProduced.Inc()
	return telemetry.OutcomeDeadLettered, nil
}
