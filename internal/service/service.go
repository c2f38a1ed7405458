// Package service wires Orderly's parts together as `orderly run` runs them:
// the embedded broker (when configured), the routes, the HTTP sender, the
// dispatcher and the admin server. The demo, the benchmark and the
// integration tests use the same wiring.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/orderly-dispatch/orderly/admin"
	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/dispatcher"
	"github.com/orderly-dispatch/orderly/dlq"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/gcpolicy"
	"github.com/orderly-dispatch/orderly/internal/schemareg"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Service is one Orderly instance. Build it with New, run it with Run, and
// Close it afterwards.
type Service struct {
	cfg     *config.Config
	log     *slog.Logger
	metrics *telemetry.Metrics
	broker  *embedded.Broker // nil unless kafka.brokers = "embedded"
	sender  *httpclient.Sender
	disp    *dispatcher.Dispatcher
	admin   *admin.Server // nil when admin.listen is ""
	dlq     *dlq.Admin    // nil when dlq.topic is ""
	brokers string
	tracing *telemetry.Tracing
	schemas *schemareg.Registry // nil without [schema_registry]

	draining atomic.Bool // set when shutdown begins, before the drain grace
}

// New compiles the routes, starts the embedded broker if configured and binds
// the admin address. Nothing is consumed before Run. It is NewContext with a
// context that never ends.
func New(cfg *config.Config, log *slog.Logger, version string) (*Service, error) {
	return NewContext(context.Background(), cfg, log, version)
}

// NewContext is New, retrying with backoff while an address to listen on
// (the admin server's, the embedded broker's) is in use: an instance that
// is still shutting down may hold it. Every retry is logged at warn. It
// gives up when ctx ends, returning the last error. Other errors are
// returned at once.
//
// What Run needs from Kafka is not needed here: the brokers, the topics'
// metadata, the DLQ, quarantine and jobs topics are waited for by Run,
// which keeps retrying while they are unreachable.
func NewContext(ctx context.Context, cfg *config.Config, log *slog.Logger, version string) (*Service, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	copts := []filters.CompileOption{filters.WithTargets(cfg.Targets)}
	schemas, err := schemareg.FromConfig(cfg, log) // nil without [schema_registry]
	if err != nil {
		return nil, err
	}
	if schemas != nil {
		copts = append(copts, filters.WithSchemaRegistry(schemas))
	}
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics, copts...)
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, log: log, metrics: telemetry.NewMetrics(), brokers: cfg.Kafka.Brokers, schemas: schemas}
	if cfg.Kafka.Embedded() {
		// The embedded broker holds everything a run needs: the consumed
		// topics, the DLQ and the topics the routes write to.
		topics := append([]string(nil), cfg.Kafka.Topics...)
		if cfg.DLQ.Topic != "" {
			topics = append(topics, cfg.DLQ.Topic)
		}
		for _, t := range router.RecordTopics() {
			if !slices.Contains(topics, t) {
				topics = append(topics, t)
			}
		}
		var b *embedded.Broker
		err := retryInUse(ctx, log, "embedded broker", cfg.Kafka.EmbeddedListen, func() (err error) {
			b, err = embedded.Start(embedded.Options{
				Listen: cfg.Kafka.EmbeddedListen, Partitions: cfg.Kafka.EmbeddedPartitions, Topics: topics,
				DataDir: cfg.Kafka.EmbeddedDataDir, MinSessionTimeout: time.Second, Logger: log,
			})
			return err
		})
		if err != nil {
			return nil, err
		}
		s.broker = b
		s.brokers = b.Addr()
		log.Info("embedded broker started", "addr", b.Addr(), "topics", topics,
			"partitions", cfg.Kafka.EmbeddedPartitions, "data_dir", cfg.Kafka.EmbeddedDataDir)
	}
	s.tracing, err = telemetry.SetupTracing(context.Background(), cfg.Tracing, "orderly", version)
	if err != nil {
		s.Close()
		return nil, err
	}
	targets, err := httpclient.LoadTargets(cfg.Targets)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.sender = httpclient.New(httpclient.Options{HTTP: cfg.HTTP, Version: version, Metrics: s.metrics, Logger: log,
		Tracing: s.tracing, Propagate: s.tracing.Inject, Targets: targets})
	dopts := dispatcher.Options{
		Config: cfg, Router: router, Sender: s.sender, Metrics: s.metrics, Logger: log, Brokers: s.brokers,
		Tracing: s.tracing,
		// Replays release the keys they redeliver.
		OnQuarantine: func(q *dlq.Quarantine) {
			if s.dlq != nil {
				s.dlq.SetGate(q)
			}
		},
	}
	s.disp, err = dispatcher.New(dopts)
	if err != nil {
		s.Close()
		return nil, err
	}
	var dlqAPI admin.DLQ
	if cfg.DLQ.Topic != "" {
		s.dlq = dlq.NewAdmin(dlq.Options{Config: cfg, Router: router, Sender: s.sender, Metrics: s.metrics, Logger: log, Brokers: s.brokers})
		dlqAPI = s.dlq
	}
	if cfg.Admin.Listen != "" {
		err = retryInUse(ctx, log, "admin server", cfg.Admin.Listen, func() (err error) {
			s.admin, err = admin.Listen(admin.Options{Listen: cfg.Admin.Listen, Ready: s.Ready, Problems: s.disp.Problems,
				Metrics: s.metrics, Token: cfg.Admin.Token, DLQ: dlqAPI, Logger: log})
			return err
		})
		if err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// retryInUse calls listen until it returns nil or an error other than an
// address in use, or ctx ends; an address in use is retried with backoff
// (250 ms doubling up to 5 s), each retry logged at warn naming what and
// addr.
func retryInUse(ctx context.Context, log *slog.Logger, what, addr string, listen func() error) error {
	var t *time.Timer
	for wait := 250 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		err := listen()
		if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			return err
		}
		log.Warn(what+": address in use, retrying (another process listens there, perhaps an instance still stopping)",
			"addr", addr, "error", err, "retry_in", wait.String())
		if t == nil {
			t = time.NewTimer(wait)
			defer t.Stop()
		} else {
			t.Reset(wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (stopped retrying: %w)", err, context.Cause(ctx))
		case <-t.C:
		}
	}
}

// Brokers returns the bootstrap address in use (the embedded broker's when embedded).
func (s *Service) Brokers() string { return s.brokers }

// Broker returns the embedded broker, or nil.
func (s *Service) Broker() *embedded.Broker { return s.broker }

// Metrics returns the service's metrics.
func (s *Service) Metrics() *telemetry.Metrics { return s.metrics }

// Ready reports whether the service should receive traffic.
func (s *Service) Ready() bool { return !s.draining.Load() && s.disp.Ready() }

// runnerHandOff bounds the wait at shutdown for the DLQ jobs runner to hand
// its job over (its records in flight finish within 10 s, then it writes
// the job and its keys' states) before the dispatcher stops.
const runnerHandOff = 15 * time.Second

// Run serves until ctx ends. Then readiness turns 503 at once, and after
// admin.drain_grace (time for load balancers to notice), and once a DLQ
// job running here has been handed over, the dispatcher stops fetching,
// drains within dispatch.drain_timeout and commits. The admin
// server stays up until the dispatcher has stopped.
func (s *Service) Run(ctx context.Context) error {
	dctx, stopDispatch := context.WithCancel(context.Background())
	defer stopDispatch()
	actx, stopAdmin := context.WithCancel(context.Background())
	defer stopAdmin()

	var wg sync.WaitGroup
	adminErr := make(chan error, 1)
	if s.admin != nil {
		wg.Go(func() { adminErr <- s.admin.Serve(actx) })
		s.log.Info("admin listening", "addr", s.admin.Addr())
	}
	dispErr := make(chan error, 1)
	wg.Go(func() { dispErr <- s.disp.Run(dctx) })
	// The DLQ jobs runner follows the jobs topic (every instance answers
	// for every job) and runs the jobs while this instance owns them. It
	// stops when shutdown begins, so that a running job is handed over to
	// another instance while this one drains.
	rctx, stopRunner := context.WithCancel(context.Background())
	defer stopRunner()
	runnerDone := make(chan struct{})
	if s.dlq != nil {
		wg.Go(func() {
			defer close(runnerDone)
			if err := s.dlq.Run(rctx); err != nil {
				s.log.Error("dlq jobs runner stopped", "error", err)
			}
		})
	} else {
		close(runnerDone)
	}
	// The collector's headroom follows what is held in flight (see
	// gcpolicy); it stops with the admin context, after the dispatcher.
	wg.Go(func() { gcpolicy.Run(actx, gcpolicy.Options{Held: s.disp.HeldBytes, Logger: s.log}) })

	var err error
	select {
	case <-ctx.Done():
		s.draining.Store(true)
		stopRunner()
		s.log.Info("shutting down", "drain_grace", s.cfg.Admin.DrainGrace.D().String())
		dispDone := false
		if g := s.cfg.Admin.DrainGrace.D(); g > 0 {
			t := time.NewTimer(g)
			select {
			case <-t.C:
			case err = <-dispErr:
				dispDone = true
				t.Stop()
			}
		}
		// A DLQ job hands over with the key quarantine open (it writes the
		// state of a key whose record failed again): the dispatcher, which
		// closes the quarantine, stops after it, waiting at most
		// runnerHandOff.
		if !dispDone {
			t := time.NewTimer(runnerHandOff)
			select {
			case <-runnerDone:
			case <-t.C:
				s.log.Warn("the DLQ job is still handing over; stopping the dispatcher")
			case err = <-dispErr:
				dispDone = true
			}
			t.Stop()
		}
		stopDispatch()
		if !dispDone {
			err = <-dispErr
		}
	case err = <-dispErr:
		if err == nil {
			err = errors.New("dispatcher stopped unexpectedly")
		}
	case err = <-adminErr:
		stopDispatch()
		if derr := <-dispErr; derr != nil {
			err = errors.Join(err, derr)
		}
	}
	stopRunner()
	stopAdmin()
	wg.Wait()
	return err
}

// Close releases what New acquired: the sender's connections and the
// embedded broker. Call it after Run returned.
func (s *Service) Close() {
	if s.dlq != nil {
		s.dlq.Close()
	}
	if s.sender != nil {
		s.sender.Close()
	}
	if s.broker != nil {
		s.broker.Close()
	}
	if s.schemas != nil {
		s.schemas.Close()
	}
	if s.tracing != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := s.tracing.Shutdown(ctx); err != nil {
			s.log.Warn("flushing traces", "error", err)
		}
		cancel()
	}
}
