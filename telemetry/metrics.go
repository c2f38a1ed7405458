// Package telemetry sets up Orderly's Prometheus metrics and OpenTelemetry
// tracing. Every metric name starts with "orderly_".
package telemetry

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	dto "github.com/prometheus/client_model/go"
)

// Message outcomes counted in orderly_messages_total.
const (
	OutcomeDelivered    = "delivered"     // every request of the message succeeded
	OutcomeDeadLettered = "dead_lettered" // acknowledged by the DLQ topic
	OutcomeSkipped      = "skipped"       // matched no route, dispatch.unmatched = "skip"
	OutcomeStalled      = "stalled"       // failed permanently with no DLQ configured: its key waits
	// OutcomeAlreadyDone: finished by an earlier owner of the partition
	// (recorded in the commit's metadata) and skipped on redelivery.
	OutcomeAlreadyDone = "already_done"
	// OutcomeLost: deferred (a hot key's message left to be read again) and
	// gone from the log when read again (retention): never delivered.
	OutcomeLost = "lost"
	// OutcomeDeferred marks a span only, not orderly_messages_total: the
	// message is read again later (dispatch.max_key_in_flight).
	OutcomeDeferred = "deferred"
)

// Breaker states as reported by orderly_breaker_state.
const (
	BreakerClosed   = 0
	BreakerHalfOpen = 1
	BreakerOpen     = 2
)

// Metrics holds every collector Orderly exports. A Metrics is safe for
// concurrent use. Build it with NewMetrics; pass nil-safe wrappers nowhere:
// components that accept a *Metrics require a non-nil one (tests use NewMetrics too).
type Metrics struct {
	Registry *prometheus.Registry

	Messages         *prometheus.CounterVec   // outcome
	HTTPRequests     *prometheus.CounterVec   // host, status ("200", "503", "error")
	HTTPDuration     *prometheus.HistogramVec // host
	HTTPRetries      *prometheus.CounterVec   // host
	HTTPUncounted    *prometheus.CounterVec   // host
	HTTPPauses       *prometheus.CounterVec   // host
	BreakerState     *prometheus.GaugeVec     // host
	BreakerChanges   *prometheus.CounterVec   // host, to
	InFlight         *prometheus.GaugeVec     // topic, partition
	Paused           *prometheus.GaugeVec     // topic, partition
	Pauses           prometheus.Counter
	Committed        *prometheus.GaugeVec // topic, partition
	Lag              *prometheus.GaugeVec // topic, partition
	ActiveLanes      prometheus.Gauge
	Senders          *prometheus.GaugeVec   // host
	QueuedLanes      *prometheus.GaugeVec   // host
	SenderLimit      *prometheus.GaugeVec   // host
	Rebalances       *prometheus.CounterVec // kind: assigned, revoked, lost
	CommitErrors     prometheus.Counter
	DLQProduced      prometheus.Counter
	DLQErrors        prometheus.Counter
	Records          *prometheus.CounterVec // topic, result: the records of topic requests
	ReplayMessages   *prometheus.CounterVec // outcome
	ReplayJobsActive prometheus.Gauge

	Span              *prometheus.GaugeVec // topic, partition
	OldestUnfinished  *prometheus.GaugeVec // topic, partition
	ProgressTruncated prometheus.Counter
	ProgressRefused   prometheus.Counter
	DLQTruncated      prometheus.Counter
	DLQFailing        prometheus.Gauge
	ProducerRestarts  *prometheus.CounterVec // producer

	QuarantinedKeys     prometheus.Gauge
	QuarantinedMessages prometheus.Counter

	Deferred prometheus.Counter
	Rereads  prometheus.Counter

	// Per named target ([[targets]]), by its name.
	TargetConcurrencyLimit *prometheus.GaugeVec   // target
	TargetRateLimited      *prometheus.CounterVec // target
}

// NewMetrics registers every Orderly collector, plus the Go and process
// collectors, on a fresh registry.
func NewMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	pl := []string{"topic", "partition"}
	f := promauto.With(reg)
	return &Metrics{
		Registry: reg,
		Messages: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_messages_total",
			Help: "Messages finished, by outcome (delivered, dead_lettered, skipped, stalled)."}, []string{"outcome"}),
		HTTPRequests: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_http_requests_total",
			Help: "HTTP attempts by target host and status code (\"error\" for transport errors)."}, []string{"host", "status"}),
		HTTPDuration: f.NewHistogramVec(prometheus.HistogramOpts{Name: "orderly_http_request_duration_seconds",
			Help: "Duration of one HTTP attempt by target host.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}, []string{"host"}),
		HTTPRetries: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_http_retries_total",
			Help: "HTTP attempts that were retries, by target host."}, []string{"host"}),
		HTTPUncounted: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_http_attempts_uncounted_total",
			Help: "Failed HTTP attempts that spent none of http.retry.max_attempts because the target was failing as a whole, by target host."}, []string{"host"}),
		HTTPPauses: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_http_retry_after_pauses_total",
			Help: "Answers (429 or 503 with Retry-After) that paused every request to their target host, by target host."}, []string{"host"}),
		BreakerState: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_breaker_state",
			Help: "Circuit breaker state per target host: 0 closed, 1 half-open, 2 open."}, []string{"host"}),
		BreakerChanges: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_breaker_transitions_total",
			Help: "Circuit breaker state changes per target host and new state."}, []string{"host", "to"}),
		TargetConcurrencyLimit: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_target_concurrency_limit",
			Help: "Requests a named target may have under way on this instance (max_concurrency, or its adaptive limit now)."}, []string{"target"}),
		TargetRateLimited: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_target_rate_limited_total",
			Help: "Attempts to a named target that waited for its rate limiter (parked, no attempt spent)."}, []string{"target"}),
		InFlight: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_partition_in_flight",
			Help: "Messages held (begun, not finished) per partition."}, pl),
		Paused: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_partition_paused",
			Help: "1 while a partition is paused for back-pressure."}, pl),
		Pauses: f.NewCounter(prometheus.CounterOpts{Name: "orderly_partition_pauses_total",
			Help: "Times a partition was paused because it held max_in_flight messages or spanned max_span offsets."}),
		Committed: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_committed_offset",
			Help: "Last committed offset per partition."}, pl),
		Lag: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_consumer_lag",
			Help: "High watermark minus committed offset per partition."}, pl),
		ActiveLanes: f.NewGauge(prometheus.GaugeOpts{Name: "orderly_active_lanes",
			Help: "Key lanes alive across all partitions."}),
		Senders: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_http_senders",
			Help: "Sender goroutines per target host (at most http.max_conns_per_host)."}, []string{"host"}),
		QueuedLanes: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_http_queued_lanes",
			Help: "Key lanes with a request ready for a target host, waiting for one of its senders."}, []string{"host"}),
		SenderLimit: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_http_sender_limit",
			Help: "How many senders a target host may have now: http.max_conns_per_host, or below it where http.adaptive_conns_per_host has taken it."}, []string{"host"}),
		Rebalances: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_rebalances_total",
			Help: "Partition assignment changes by kind (assigned, revoked, lost)."}, []string{"kind"}),
		CommitErrors: f.NewCounter(prometheus.CounterOpts{Name: "orderly_commit_errors_total",
			Help: "Offset commits that failed."}),
		DLQProduced: f.NewCounter(prometheus.CounterOpts{Name: "orderly_dlq_produced_total",
			Help: "Records acknowledged by the dead-letter topic."}),
		DLQErrors: f.NewCounter(prometheus.CounterOpts{Name: "orderly_dlq_errors_total",
			Help: "Dead-letter writes that failed and will be retried."}),
		Records: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_records_total",
			Help: "Records of topic requests by topic and result: produced (acknowledged), retried (a failed write, written again after a backoff) or failed (refused for good: dead-lettered)."},
			[]string{"topic", "result"}),
		ReplayMessages: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_replay_messages_total",
			Help: "DLQ records handled by replay jobs, by outcome."}, []string{"outcome"}),
		ReplayJobsActive: f.NewGauge(prometheus.GaugeOpts{Name: "orderly_replay_jobs_active",
			Help: "Replay jobs running (0 or 1)."}),
		Span: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_partition_span_offsets",
			Help: "Offsets from the oldest unfinished message to the newest fetched one, per partition; the partition pauses at dispatch.max_span."}, pl),
		OldestUnfinished: f.NewGaugeVec(prometheus.GaugeOpts{Name: "orderly_partition_oldest_unfinished_seconds",
			Help: "Age of the oldest unfinished message per partition (since it was fetched); 0 when none."}, pl),
		ProgressTruncated: f.NewCounter(prometheus.CounterOpts{Name: "orderly_commit_progress_truncated_total",
			Help: "Commits whose record of finished offsets did not fit dispatch.commit_metadata_max_bytes and kept only the offsets nearest the commit point."}),
		ProgressRefused: f.NewCounter(prometheus.CounterOpts{Name: "orderly_commit_metadata_refused_total",
			Help: "Commits a broker refused with OFFSET_METADATA_TOO_LARGE; the partition's budget is halved."}),
		DLQTruncated: f.NewCounter(prometheus.CounterOpts{Name: "orderly_dlq_truncated_total",
			Help: "Dead-letter records written with their value cut because the DLQ topic refused the whole record for its size."}),
		DLQFailing: f.NewGauge(prometheus.GaugeOpts{Name: "orderly_dlq_failing",
			Help: "1 while dead-letter writes fail (the keys concerned wait), 0 once one succeeds."}),
		ProducerRestarts: f.NewCounterVec(prometheus.CounterOpts{Name: "orderly_producer_restarts_total",
			Help: "Kafka producers (dlq, records, quarantine, dlq-jobs) started anew after a fatal error; the records the old one held are written again."},
			[]string{"producer"}),
		QuarantinedKeys: f.NewGauge(prometheus.GaugeOpts{Name: "orderly_quarantined_keys",
			Help: "Keys quarantined or being replayed (dlq.quarantine_keys), as this instance knows them."}),
		QuarantinedMessages: f.NewCounter(prometheus.CounterOpts{Name: "orderly_quarantined_messages_total",
			Help: "Messages dead-lettered without an attempt because their key was quarantined."}),
		Deferred: f.NewCounter(prometheus.CounterOpts{Name: "orderly_messages_deferred_total",
			Help: "Messages let go because their key held dispatch.max_key_in_flight; they are read again once it has room."}),
		Rereads: f.NewCounter(prometheus.CounterOpts{Name: "orderly_messages_reread_total",
			Help: "Messages read again to fetch deferred ones (the cost of hot keys)."}),
	}
}

// Sum gathers the registry and returns the sum of every series of the named
// gauge or counter (0 if it has none). It is meant for progress lines and
// tests, not for hot paths.
func (m *Metrics) Sum(name string) float64 { return m.SumWhere(name, nil) }

// SumWhere is Sum over the series whose labels include every pair of labels:
// counter and gauge values, and the sample counts of histograms.
func (m *Metrics) SumWhere(name string, labels map[string]string) float64 {
	mfs, err := m.Registry.Gather()
	if err != nil {
		return 0
	}
	var s float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, mt := range mf.GetMetric() {
			for k, v := range labels {
				if !slices.ContainsFunc(mt.GetLabel(), func(lp *dto.LabelPair) bool { return lp.GetName() == k && lp.GetValue() == v }) {
					continue series
				}
			}
			switch {
			case mt.Gauge != nil:
				s += mt.Gauge.GetValue()
			case mt.Counter != nil:
				s += mt.Counter.GetValue()
			case mt.Histogram != nil:
				s += float64(mt.Histogram.GetSampleCount())
			}
		}
	}
	return s
}
