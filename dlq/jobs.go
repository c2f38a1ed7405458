package dlq

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/internal/producer"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Replay and release jobs are shared by every instance of a consumer group
// through the compacted jobs topic "<dlq.topic>.jobs" (one partition): a
// record keyed by the job id holds the job's JSON (ReplayJob). Any instance
// queues a job (StartReplay, StartRelease) or asks for its cancellation
// (Cancel) by writing its record; every instance follows the topic and
// answers Job and Jobs from it. Exactly one instance runs jobs: the member
// of the consumer group "<kafka.group_id>.dlq-jobs" that Kafka gives the
// topic's one partition (see Admin.Run).

const (
	// jobsProgressEvery is how often the runner writes a running job's
	// counts to the jobs topic.
	jobsProgressEvery = time.Second
	// jobsPruneEvery is how often the runner looks for finished jobs to
	// forget (tombstones).
	jobsPruneEvery = 5 * time.Second
	// jobsSettleEvery spaces out the runner's looks, while no job runs, for
	// keys a stopped replay left held (see settle).
	jobsSettleEvery = 30 * time.Second
	// jobsWriteTimeout bounds a write of a job record asked by the admin API.
	jobsWriteTimeout = 15 * time.Second
	// jobsReadyTimeout bounds the wait of the admin API for the jobs topic
	// to be loaded.
	jobsReadyTimeout = 15 * time.Second
)

// ErrJobsNotReady is returned while the jobs topic is not loaded yet (Run
// has not connected).
var ErrJobsNotReady = errors.New("the DLQ jobs topic is not loaded yet")

// ErrJobUnsure is returned when a job's record was not acknowledged in
// time: it was not started here, but the record may still land, and the
// job then runs.
var ErrJobUnsure = errors.New("the job could not be written to the jobs topic in time; it may still land there and run: check GET /dlq/replay before asking again")

// JobsTopic is the topic a configuration keeps its replay and release jobs in.
func JobsTopic(cfg *config.Config) string { return cfg.DLQ.Topic + ".jobs" }

func (a *Admin) jobsGroup() string { return a.cfg.Kafka.GroupID + ".dlq-jobs" }

// stateRank orders job states: a job's record never goes back to a lower rank.
func stateRank(s string) int {
	switch s {
	case JobQueued, "":
		return 0
	case JobRunning, JobCancelling:
		return 1
	default: // done, cancelled, failed
		return 2
	}
}

func finished(j ReplayJob) bool { return stateRank(j.State) == 2 }

// mergeJob merges a job record read or written (nw) into what is known of
// the job (old): states never go back, counts never decrease and a cancel
// request sticks, so that writers racing (the runner's progress, a cancel
// asked on another instance) do not undo each other.
func mergeJob(old, nw ReplayJob) ReplayJob {
	out := nw
	if stateRank(old.State) > stateRank(nw.State) {
		out.State, out.Error, out.FinishedAt = old.State, old.Error, old.FinishedAt
	}
	out.CancelRequested = old.CancelRequested || nw.CancelRequested
	out.Scanned = max(old.Scanned, nw.Scanned)
	out.Matched = max(old.Matched, nw.Matched)
	out.Skipped = max(old.Skipped, nw.Skipped)
	out.Replayed = max(old.Replayed, nw.Replayed)
	out.Failed = max(old.Failed, nw.Failed)
	out.Deferred = max(old.Deferred, nw.Deferred)
	out.Released = max(old.Released, nw.Released)
	if !old.QueuedAt.IsZero() {
		out.QueuedAt = old.QueuedAt
	}
	if out.StartedAt.IsZero() {
		out.StartedAt = old.StartedAt
	}
	return out
}

// shown is a job as the admin API shows it: "cancelling" once a cancel was
// asked and until it finished.
func shown(j ReplayJob) ReplayJob {
	if j.CancelRequested && !finished(j) {
		j.State = JobCancelling
	}
	return j
}

// jobStore is the jobs topic as one instance follows it. Safe for
// concurrent use; follow reads until its context ends, close then releases
// the clients.
type jobStore struct {
	log   *slog.Logger
	store *compacted

	mu    sync.Mutex // protects the fields below
	jobs  map[string]ReplayJob
	order []string         // job ids, first seen first
	at    map[string]int64 // the offset of each job's first record read
}

// openJobStore creates the jobs topic if it does not exist (one partition,
// compacted), connects and reads it to its end.
func openJobStore(ctx context.Context, brokers string, cfg *config.Config, log *slog.Logger, m *telemetry.Metrics) (*jobStore, error) {
	s := &jobStore{log: log, jobs: map[string]ReplayJob{}, at: map[string]int64{}}
	store, err := openCompacted(ctx, "dlq jobs", JobsTopic(cfg), brokers, cfg.Kafka.GroupID+".dlq-jobs-reader", cfg, log, m, s.apply)
	if err != nil {
		return nil, err
	}
	s.store = store
	return s, nil
}

// apply takes a record read from the topic into the map.
func (s *jobStore) apply(m *kafka.Message) {
	var j *ReplayJob
	if m.Value != nil {
		j = new(ReplayJob)
		if err := json.Unmarshal(m.Value, j); err != nil {
			s.log.Warn("dlq jobs: unreadable record skipped", "offset", m.TopicPartition.Offset, "error", err)
			return
		}
	}
	id := string(m.Key)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.applyLocked(id, j)
	if _, ok := s.at[id]; !ok && j != nil {
		s.at[id] = int64(m.TopicPartition.Offset)
	}
}

// applyLocked merges a job record (nil: a tombstone) into the map.
func (s *jobStore) applyLocked(id string, j *ReplayJob) {
	old, ok := s.jobs[id]
	switch {
	case j == nil:
		if ok {
			delete(s.jobs, id)
			delete(s.at, id)
			for i, o := range s.order {
				if o == id {
					s.order = append(s.order[:i], s.order[i+1:]...)
					break
				}
			}
		}
	case ok:
		s.jobs[id] = mergeJob(old, *j)
	default:
		s.jobs[id] = *j
		s.order = append(s.order, id)
	}
}

// get returns what is known of a job (not as shown).
func (s *jobStore) get(id string) (ReplayJob, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	j, ok := s.jobs[id]
	return j, ok
}

// list returns the jobs known in the topic's order (the same on every
// instance), then those written here and not read back yet.
func (s *jobStore) list() []ReplayJob {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := slices.Clone(s.order)
	pos := func(id string) int64 {
		if at, ok := s.at[id]; ok {
			return at
		}
		return math.MaxInt64
	}
	slices.SortStableFunc(ids, func(x, y string) int { return cmp.Compare(pos(x), pos(y)) })
	out := make([]ReplayJob, 0, len(ids))
	for _, id := range ids {
		out = append(out, s.jobs[id])
	}
	return out
}

// landed reports whether the job's record has been read from the topic:
// a job written here is run only then, since a write that fails is
// forgotten (and its start answered with an error).
func (s *jobStore) landed(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.at[id]
	return ok
}

// forget drops a job from the map (a write of it failed).
func (s *jobStore) forget(id string) {
	s.mu.Lock()
	s.applyLocked(id, nil)
	s.mu.Unlock()
}

// put applies j here at once and writes it, retrying with backoff until it
// is acknowledged or ctx ends.
func (s *jobStore) put(ctx context.Context, j ReplayJob) error {
	s.mu.Lock()
	s.applyLocked(j.ID, &j)
	s.mu.Unlock()
	return s.write(ctx, j.ID, &j)
}

// del writes a tombstone for a job and forgets it here.
func (s *jobStore) del(ctx context.Context, id string) error {
	s.forget(id)
	return s.write(ctx, id, nil)
}

func (s *jobStore) write(ctx context.Context, id string, j *ReplayJob) error {
	var v []byte
	if j != nil {
		var err error
		if v, err = json.Marshal(j); err != nil {
			return err
		}
	}
	_, err := s.store.write(ctx, []byte(id), v)
	return err
}

// Run loads the jobs topic (creating it if missing), then until ctx ends
// (or Close) follows it, so that Job, Jobs, Cancel and the start of jobs
// work on this instance, and takes part in the consumer group
// "<kafka.group_id>.dlq-jobs": while this instance owns the topic's one
// partition it runs the queued jobs, one at a time, oldest first.
//
// On losing the partition (a revoke, or Run ending) the running job stops
// taking records, lets those in flight finish, commits its progress under
// "<group_id>.replay" and is written back still "running" before the
// partition goes: the next owner runs it again, and the bookkeeping passes
// over what this one handled. A runner that dies without a revoke leaves
// its job "running" too, and the next owner (after the group's session
// timeout) does the same; records in flight when it died may be sent again.
//
// Run is meant to run once per Admin, for its life. When a job is
// started, cancelled or looked up before Run was called, the Admin runs
// it itself until Close; a later Run then only waits for ctx.
func (a *Admin) Run(ctx context.Context) error {
	if a.cfg.DLQ.Topic == "" || !a.claimRun() {
		<-ctx.Done()
		return nil
	}
	return a.runJobs(ctx)
}

// claimRun reports whether the caller is the first to run the jobs.
func (a *Admin) claimRun() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.runClaimed {
		return false
	}
	a.runClaimed = true
	return true
}

// autoRun runs the jobs until Close unless Run already does.
func (a *Admin) autoRun() {
	if a.cfg.DLQ.Topic == "" || !a.claimRun() {
		return
	}
	a.wg.Go(func() {
		if err := a.runJobs(a.ctx); err != nil {
			a.log.Error("dlq jobs runner stopped", "error", err)
		}
	})
}

func (a *Admin) runJobs(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopOnClose := context.AfterFunc(a.ctx, cancel)
	defer stopOnClose()
	var s *jobStore
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		var err error
		if s, err = openJobStore(ctx, a.brokers, a.cfg, a.log, a.metrics); err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		a.log.Warn("dlq jobs: unable to load the jobs topic, retrying", "error", err, "retry_in", wait.String())
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
	defer s.store.close()
	var wg sync.WaitGroup
	defer wg.Wait()
	fctx, stopFollow := context.WithCancel(context.Background())
	defer stopFollow() // runs before wg.Wait: the follower stops once the runner is done
	wg.Go(func() { s.store.follow(fctx) })
	a.mu.Lock()
	a.store = s
	a.mu.Unlock()
	close(a.ready)
	a.log.Info("dlq jobs loaded", "topic", s.store.topic, "jobs", len(s.list()))
	r := &runner{a: a, s: s}
	return r.loop(ctx)
}

// runner runs the jobs while its instance owns the jobs topic's partition.
// Its fields are the loop goroutine's (the rebalance callback runs in it).
type runner struct {
	a       *Admin
	s       *jobStore
	c       *kafka.Consumer
	owner   bool // the partition is assigned
	fresh   bool // assigned since the last catch-up
	cur     *current
	pruned  time.Time
	settled time.Time // the last settle; zero: settle at the next idle step
}

// current is the job the runner runs.
type current struct {
	e     *jobEntry
	done  chan runResult
	wrote time.Time
}

type runResult struct {
	stopped bool
	err     error
}

func (r *runner) loop(ctx context.Context) error {
	a := r.a
	cc := kafka.ConfigMap{"bootstrap.servers": a.brokers, "group.id": a.jobsGroup(), "enable.auto.commit": false,
		"auto.offset.reset": "latest", "enable.metrics.push": false, "log_level": 3, "client.id": "orderly-dlq-runner",
		"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
	producer.CopyClientProperties(cc, a.cfg.Kafka.Properties)
	var err error
	if r.c, err = kafka.NewConsumer(&cc); err != nil {
		return fmt.Errorf("dlq jobs: unable to create the runner: %w", err)
	}
	defer func() {
		r.handOff()
		r.owner = false
		r.c.Close()
	}()
	topic := r.s.store.topic
	if err := r.c.Subscribe(topic, func(c *kafka.Consumer, ev kafka.Event) error {
		switch e := ev.(type) {
		case kafka.AssignedPartitions:
			r.owner, r.fresh = len(e.Partitions) > 0, true
			if r.owner {
				a.log.Info("dlq jobs: this instance runs the jobs")
			}
			return c.Assign(e.Partitions)
		case kafka.RevokedPartitions:
			r.handOff()
			if r.owner {
				a.log.Info("dlq jobs: another instance runs the jobs now")
			}
			r.owner = false
			return c.Unassign()
		}
		return nil
	}); err != nil {
		return fmt.Errorf("dlq jobs: %w", err)
	}
	for ctx.Err() == nil {
		switch e := r.c.Poll(100).(type) {
		case kafka.Error:
			if e.IsFatal() {
				return e
			}
		}
		r.step(ctx)
	}
	return nil
}

// writeCtx bounds the runner's writes; they go on after Run's context
// ended (a hand-off's last progress).
func (r *runner) writeCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), jobsWriteTimeout)
}

func (r *runner) step(ctx context.Context) {
	if r.cur != nil {
		select {
		case res := <-r.cur.done:
			r.end(res)
		default:
			r.watch()
			return
		}
	}
	if !r.owner || ctx.Err() != nil {
		return
	}
	if r.fresh {
		// What the previous owner wrote before giving the partition up.
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := r.s.store.catchUp(cctx, nil)
		cancel()
		if err != nil {
			r.a.log.Warn("dlq jobs: catching up", "error", err)
			return
		}
		r.fresh = false
	}
	if now := r.a.now(); now.Sub(r.pruned) >= jobsPruneEvery {
		r.pruned = now
		r.prune(ctx)
	}
	if r.a.cfg.DLQ.QuarantineKeys && r.a.keyGate() == nil {
		return // the dispatcher has not loaded the quarantine yet: a job would run ungated
	}
	// A job handed over by the previous owner first, then the queued ones
	// in the topic's order.
	jobs := r.s.list()
	slices.SortStableFunc(jobs, func(x, y ReplayJob) int { return cmp.Compare(stateRank(y.State), stateRank(x.State)) })
	for _, j := range jobs {
		if finished(j) {
			continue
		}
		if j.CancelRequested {
			t := r.a.now().UTC()
			j.State, j.FinishedAt = JobCancelled, &t
			wctx, cancel := r.writeCtx()
			if err := r.s.put(wctx, j); err != nil {
				r.a.log.Warn("dlq jobs: writing a cancelled job", "id", j.ID, "error", err)
			}
			cancel()
			continue // the keys its earlier run held are settled below or before the next job
		}
		if j.State != JobRunning && !r.s.landed(j.ID) {
			return // written here, not read back yet: its write may still fail
		}
		if j.State != JobRunning && !r.settle(ctx) {
			return // a new job does not take on the keys a stopped one held
		}
		r.start(j)
		return
	}
	if r.a.now().Sub(r.settled) >= jobsSettleEvery {
		r.settle(ctx)
	}
}

// settle requarantines the keys held while no job runs them, with the cause
// of their quarantine: those of a replay cancelled or finished before its
// next run, or one whose end could not tell the gate (the brokers down).
// Only one job runs at a time, and only here, so a held key with no job
// running is nobody's. It reports whether none is left held.
func (r *runner) settle(ctx context.Context) bool {
	g := r.a.keyGate()
	if g == nil {
		return true
	}
	r.settled = r.a.now()
	gctx, cancel := context.WithTimeout(ctx, replayGateTimeout)
	defer cancel()
	held, err := g.Held(gctx)
	if err != nil {
		r.a.log.Warn("dlq jobs: reading the held keys", "error", err)
		return false
	}
	ok := true
	for _, h := range held {
		if err := g.Requarantine(gctx, h.Topic, h.Key, h.Cause.Partition, h.Cause.Offset); err != nil {
			r.a.log.Warn("dlq jobs: requarantining a key no job holds", "topic", h.Topic, "key", string(h.Key), "error", err)
			ok = false
		}
	}
	if len(held) > 0 {
		r.a.log.Info("dlq jobs: keys a stopped replay held are quarantined again", "keys", len(held))
	}
	return ok
}

// watch passes a cancel request on to the running job and writes its
// progress every jobsProgressEvery.
func (r *runner) watch() {
	a, cur := r.a, r.cur
	if j, ok := r.s.get(cur.e.job.ID); ok && j.CancelRequested {
		a.stopCancelled(cur.e)
	}
	if time.Since(cur.wrote) >= jobsProgressEvery {
		cur.wrote = time.Now()
		a.mu.Lock()
		j := cur.e.job
		a.mu.Unlock()
		wctx, cancel := r.writeCtx()
		if err := r.s.put(wctx, j); err != nil {
			a.log.Warn("dlq jobs: writing progress", "id", j.ID, "error", err)
		}
		cancel()
	}
}

// stopCancelled stops a job a cancel was asked for (once): it ends
// "cancelled".
func (a *Admin) stopCancelled(e *jobEntry) {
	a.mu.Lock()
	first := !e.cancelled
	e.cancelled = true
	e.job.CancelRequested = true
	a.mu.Unlock()
	if first {
		e.stop()
	}
}

// start runs job j, or resumes it where an earlier owner stopped.
func (r *runner) start(j ReplayJob) {
	a := r.a
	resumed := j.State == JobRunning
	j.State = JobRunning
	if j.StartedAt.IsZero() {
		j.StartedAt = a.now().UTC()
	}
	f := j.Request.filter()
	if resumed && !j.DryRun {
		// The records the earlier run took on but did not handle are taken
		// on again: matched counts them once.
		j.Matched = j.Replayed + j.Failed + j.Deferred + j.Released
	}
	if resumed && !j.DryRun && f.Limit > 0 {
		// The records handled before count against the limit.
		f.Limit -= j.Replayed + j.Failed + j.Deferred + j.Released
		if f.Limit <= 0 {
			t := a.now().UTC()
			j.State, j.FinishedAt = JobDone, &t
			wctx, cancel := r.writeCtx()
			if err := r.s.put(wctx, j); err != nil {
				a.log.Warn("dlq jobs: writing a finished job", "id", j.ID, "error", err)
			}
			cancel()
			return
		}
	}
	a.log.Info("dlq job starting", "id", j.ID, "kind", j.Kind, "resumed", resumed, "dry_run", j.DryRun)
	stopCtx, stop := context.WithCancel(a.ctx)
	e := &jobEntry{job: j, stop: stop}
	cur := &current{e: e, done: make(chan runResult, 1), wrote: time.Now()}
	a.mu.Lock()
	a.running = e
	gate := a.gate
	a.mu.Unlock()
	a.metrics.ReplayJobsActive.Set(1)
	wctx, cancel := r.writeCtx()
	if err := r.s.put(wctx, j); err != nil {
		a.log.Warn("dlq jobs: writing a started job", "id", j.ID, "error", err)
	}
	cancel()
	run := &run{a: a, e: e, kind: j.Kind, req: j.Request, f: f, dry: j.DryRun, gate: gate, stop: stopCtx, resumed: resumed}
	r.cur = cur
	a.wg.Go(func() {
		defer stop()
		stopped, err := run.run()
		cur.done <- runResult{stopped, err}
	})
}

// handOff stops the running job, if any, after the records in flight, and
// writes it back still running for the partition's next owner (or as it
// ended, if it ended meanwhile).
func (r *runner) handOff() {
	if r.cur == nil {
		return
	}
	r.a.log.Info("dlq jobs: handing the running job over", "id", r.cur.e.job.ID)
	r.cur.e.stop()
	r.end(<-r.cur.done)
}

// end writes the running job's outcome: finished, or (stopped to hand it
// over) still running.
func (r *runner) end(res runResult) {
	a, cur := r.a, r.cur
	r.cur = nil
	r.settled = time.Time{} // a job that could not tell the gate leaves its keys to settle
	a.mu.Lock()
	j, cancelled := cur.e.job, cur.e.cancelled
	a.running = nil
	a.mu.Unlock()
	a.metrics.ReplayJobsActive.Set(0)
	t := a.now().UTC()
	switch {
	case res.err != nil:
		j.State, j.Error, j.FinishedAt = JobFailed, res.err.Error(), &t
	case res.stopped && cancelled:
		j.State, j.FinishedAt = JobCancelled, &t
	case res.stopped: // handed over (a revoke, or shutdown): the next owner goes on with it
		j.State = JobRunning
	default:
		j.State, j.FinishedAt = JobDone, &t
	}
	wctx, cancel := r.writeCtx()
	if err := r.s.put(wctx, j); err != nil {
		a.log.Error("dlq jobs: writing the job's end", "id", j.ID, "error", err)
	}
	cancel()
	msg := "dlq job ended"
	if j.State == JobRunning {
		msg = "dlq job handed over: the next owner of the jobs goes on with it"
	}
	a.log.Info(msg, "id", j.ID, "kind", j.Kind, "state", j.State, "dry_run", j.DryRun,
		"scanned", j.Scanned, "matched", j.Matched, "skipped", j.Skipped, "replayed", j.Replayed,
		"failed", j.Failed, "deferred", j.Deferred, "released", j.Released, "error", j.Error)
}

// prune writes tombstones for the finished jobs past the retention, and
// the oldest finished ones beyond the number kept.
func (r *runner) prune(ctx context.Context) {
	for _, id := range r.a.pruned(r.s.list()) {
		wctx, cancel := context.WithTimeout(ctx, jobsWriteTimeout)
		if err := r.s.del(wctx, id); err != nil {
			r.a.log.Warn("dlq jobs: pruning", "id", id, "error", err)
		}
		cancel()
	}
}
