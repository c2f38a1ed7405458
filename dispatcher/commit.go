package dispatcher

import (
	"errors"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/kafka"

	"github.com/orderly-dispatch/orderly/offsets"
)

// Commits. The poll loop decides when to commit and what: each changed
// partition's committable offset with its progress record (a commitJob).
// While it runs, the committer goroutine sends the commit, so that the poll
// loop does not wait a broker round trip every few milliseconds; the poll
// loop applies the answer. One commit is in flight at a time, so commits
// reach the broker in order and a partition's committed state only moves
// forward. A revoke or shutdown commits on the poll loop itself, after the
// commit in flight was answered (commit).
//
// What a crash sends again is what finished since the last commit that
// was answered, plus the requests under way: commit_interval (5 ms by
// default) plus a commit's round trip of work.

// soonest is the longest a commit waits while the poll loop finds nothing
// to consume (or messages are in flight), when commit_interval is longer.
const soonest = 25 * time.Millisecond

// commitNowEvery spaces the commits of dead-lettered messages (commitNow)
// when commit_interval is longer.
const commitNowEvery = 5 * time.Millisecond

// recordEvery spaces the commits of a partition whose committed offset
// stands still (a key holds it back) and whose progress record alone
// changed: that record may be 4 KB, and every 5 ms it would write 800 KB a
// second per partition to __consumer_offsets. A crash resends at most
// this much more of such a partition's work. A dead letter's commit is
// not spaced.
const recordEvery = 25 * time.Millisecond

// gaugesEvery spaces the updates of the per-partition gauges (lag, span,
// in flight, oldest unfinished), which cost a client call per partition.
const gaugesEvery = 100 * time.Millisecond

// commitJob is one commit: the partitions whose committed state changed.
type commitJob struct {
	offs       []kafka.TopicPartition
	which      []*partition
	finishedAt []int64 // each partition's finished count when its progress was taken
}

type commitResult struct {
	job commitJob
	res []kafka.TopicPartition
	err error
}

// committer sends the poll loop's commits. busy (owned by the poll loop)
// is set from the hand-over of a job until its result was applied.
type committer struct {
	jobs    chan commitJob
	results chan commitResult
	busy    bool
	stopped bool // poll loop: after stopCommitter, commits are synchronous (commit) only
	wg      sync.WaitGroup
}

// startCommitter starts the committer goroutine; stopCommitter, called by
// Run after the last commit, stops it.
func (d *Dispatcher) startCommitter() {
	d.commits = &committer{jobs: make(chan commitJob, 1), results: make(chan commitResult, 1)}
	d.commits.wg.Go(func() {
		for job := range d.commits.jobs {
			res, err := d.consumer.CommitOffsets(job.offs)
			d.commits.results <- commitResult{job, res, err}
		}
	})
}

func (d *Dispatcher) stopCommitter() {
	d.awaitCommit()
	d.commits.stopped = true // Close may still run a rebalance callback
	close(d.commits.jobs)
	d.commits.wg.Wait()
}

// maybeCommit updates the gauges every gaugesEvery, applies the answer to
// the commit in flight, if it came, and starts the next commit when it is
// time: every commit_interval; sooner (soonest) when the poll loop found
// nothing to consume; sooner still (commitNowEvery) after a dead letter.
func (d *Dispatcher) maybeCommit() {
	now := time.Now()
	if now.Sub(d.lastGauges) >= gaugesEvery {
		d.lastGauges = now
		d.updateGauges(d.ownedPartitions(), now)
	}
	if d.commits.stopped {
		return
	}
	if d.commits.busy {
		select {
		case r := <-d.commits.results:
			d.commits.busy = false
			d.applyCommit(r)
		default:
			return
		}
	}
	since, every := now.Sub(d.lastCommit), d.cfg.Dispatch.CommitInterval.D()
	if since < every && (since < min(every, soonest) || !d.commitSoon.Load()) && (since < commitNowEvery || !d.commitNow.Load()) {
		return
	}
	d.commitSoon.Store(false)
	spacing := recordEvery
	if d.commitNow.Swap(false) {
		spacing = 0
	}
	d.lastCommit = now
	if job, ok := d.prepareCommit(d.ownedPartitions(), now, spacing); ok {
		d.commits.busy = true
		d.commits.jobs <- job // never blocks: the committer is idle
	}
}

// awaitCommit waits for the commit in flight, if any, and applies its
// answer.
func (d *Dispatcher) awaitCommit() {
	if d.commits.busy {
		d.commits.busy = false
		d.applyCommit(<-d.commits.results)
	}
}

// commit commits the given partitions on the poll loop, after the commit
// in flight: for a revoke and shutdown, whose partitions are forgotten
// right after.
func (d *Dispatcher) commit(ps []*partition) {
	d.awaitCommit()
	if job, ok := d.prepareCommit(ps, time.Now(), 0); ok {
		res, err := d.consumer.CommitOffsets(job.offs)
		d.applyCommit(commitResult{job, res, err})
	}
}

// prepareCommit returns the commit of the completed prefix of each given
// partition, with the record of what finished beyond it
// (offsets.Tracker.Progress) as the commit's metadata, where either
// changed; false when none changed. A partition whose progress record
// alone changed is left out when one was committed less than spacing ago.
// Only partitions in d.parts are ever passed: the poll loop removes a
// partition after its final commit on revoke, so no commit is sent for a
// partition this member no longer owns; one reported lost while its revoke
// drains is skipped (its new owner may have committed already).
func (d *Dispatcher) prepareCommit(ps []*partition, now time.Time, spacing time.Duration) (commitJob, bool) {
	var job commitJob
	for _, p := range ps {
		if p.lost {
			continue
		}
		committable := p.tracker.Committable()
		finished := p.finished.Load()
		if finished == p.committedFinished && committable <= p.committed {
			continue // nothing finished since the last commit
		}
		if committable <= p.committed && now.Sub(p.recordAt) < spacing {
			continue // the record alone changes: not yet
		}
		c, meta, truncated := p.tracker.Progress(p.budget)
		if c >= 0 && (c > p.committed || c == p.committed && meta != p.committedMeta) {
			if c == p.committed {
				p.recordAt = now
			}
			job.offs = append(job.offs, kafka.TopicPartition{Topic: p.tp.Topic, Partition: p.id, Offset: kafka.Offset(c), Metadata: &meta})
			job.which = append(job.which, p)
			job.finishedAt = append(job.finishedAt, finished)
			if truncated {
				d.metrics.ProgressTruncated.Inc()
			}
		} else if c == p.committed {
			p.committedFinished = finished // the record did not change: nothing to send
		}
	}
	return job, len(job.offs) > 0
}

// applyCommit records what the brokers committed; a partition whose commit
// failed is committed again by the next one.
func (d *Dispatcher) applyCommit(r commitResult) {
	offs, which := r.job.offs, r.job.which
	if r.err != nil {
		d.metrics.CommitErrors.Inc()
		if metadataTooLarge(r.err) {
			// The client reports one error for the request: every partition
			// that sent a record shrinks it.
			for i, p := range which {
				if n := len(*offs[i].Metadata); n > 0 {
					d.metadataRefused(p, n)
				}
			}
			return
		}
		d.commitWarn("commit failed, will retry", "error", r.err)
		return
	}
	at := make(map[partKey]int, len(which))
	for i, p := range which {
		at[partKey{p.topic, p.id}] = i
	}
	for _, res := range r.res {
		i, ok := at[partKey{*res.Topic, res.Partition}]
		if !ok {
			continue
		}
		p := which[i]
		if res.Error != nil {
			d.metrics.CommitErrors.Inc()
			if metadataTooLarge(res.Error) {
				d.metadataRefused(p, len(*offs[i].Metadata))
				continue
			}
			d.commitWarn("commit failed for a partition, will retry", "topic", *res.Topic, "partition", res.Partition, "error", res.Error)
			continue
		}
		p.committed = int64(offs[i].Offset)
		p.committedMeta = *offs[i].Metadata
		p.committedFinished = r.job.finishedAt[i]
		p.committedGauge.Set(float64(p.committed))
	}
}

// metadataTooLarge reports whether a commit (or one partition's) was
// refused for its metadata's size (OFFSET_METADATA_TOO_LARGE).
func metadataTooLarge(err error) bool {
	var ke kafka.Error
	return errors.As(err, &ke) && ke.Code() == kafka.ErrOffsetMetadataTooLarge
}

// commitWarnEvery spaces the warnings of failed commits: they are retried
// every commit_interval, and orderly_commit_errors_total counts each.
const commitWarnEvery = 10 * time.Second

// commitWarn logs a failed commit's warning, at most every commitWarnEvery.
func (d *Dispatcher) commitWarn(msg string, args ...any) {
	if now := time.Now(); now.Sub(d.lastCommitWarn) >= commitWarnEvery {
		d.lastCommitWarn = now
		d.log.Warn(msg, args...)
	}
}

// updateGauges sets each partition's in-flight, span, oldest-unfinished
// and lag gauges.
func (d *Dispatcher) updateGauges(ps []*partition, now time.Time) {
	for _, p := range ps {
		if p.lost {
			continue
		}
		p.inFlightGauge.Set(float64(p.holding.Load()))
		p.spanGauge.Set(float64(p.tracker.Span()))
		p.oldestGauge.Set(p.tracker.OldestPending(now).Seconds())
		if _, high, err := d.consumer.GetWatermarkOffsets(p.topic, p.id); err == nil && high >= 0 {
			if base := max(p.committed, p.tracker.Committable()); base >= 0 {
				p.lagGauge.Set(float64(max(high-base, 0)))
			}
		}
	}
}

// metadataRefused halves p's progress budget after a broker refused a
// record of size bytes as too large (its offset.metadata.max.bytes is
// lower than dispatch.commit_metadata_max_bytes); the next commit fits.
func (d *Dispatcher) metadataRefused(p *partition, size int) {
	d.metrics.ProgressRefused.Inc()
	p.budget = offsets.RefusedBudget(p.budget, size)
	d.log.Warn("the broker refused the commit's progress record as too large: lower dispatch.commit_metadata_max_bytes to the brokers' offset.metadata.max.bytes",
		"topic", p.topic, "partition", p.id, "bytes", size, "budget_now", p.budget)
}
