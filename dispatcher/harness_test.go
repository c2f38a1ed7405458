package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/internal/embedded"
	"github.com/orderly-dispatch/orderly/internal/kafkatest"
	"github.com/orderly-dispatch/orderly/internal/schemareg"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// harness is kafkatest's broker, sink and producer plus a way to run
// dispatchers against them.
type harness struct{ *kafkatest.Harness }

func newHarness(t *testing.T, partitions int) *harness {
	t.Helper()
	return newHarnessWith(t, partitions, nil)
}

// newHarnessWith is newHarness with the broker's options adjusted by tweak.
func newHarnessWith(t *testing.T, partitions int, tweak func(*embedded.Options)) *harness {
	t.Helper()
	return &harness{kafkatest.New(t, partitions, tweak)}
}

// run starts a dispatcher with cfg, its routes compiled against cfg's
// [schema_registry] when it has one; stop (also run by t.Cleanup) ends it
// and returns Run's error.
func (h *harness) run(cfg *config.Config, tweak func(*Dispatcher)) (d *Dispatcher, m *telemetry.Metrics, stop func() error) {
	h.T.Helper()
	copts := []filters.CompileOption{filters.WithTargets(cfg.Targets)}
	reg, err := schemareg.FromConfig(cfg, kafkatest.Logger(h.T))
	if err != nil {
		h.T.Fatal(err)
	}
	if reg != nil {
		copts = append(copts, filters.WithSchemaRegistry(reg))
	}
	router, err := filters.Compile(cfg.Routes, cfg.Kafka.Topics, copts...)
	if err != nil {
		h.T.Fatal(err)
	}
	targets, err := httpclient.LoadTargets(cfg.Targets)
	if err != nil {
		h.T.Fatal(err)
	}
	m = telemetry.NewMetrics()
	sender := httpclient.New(httpclient.Options{HTTP: cfg.HTTP, Version: "test", Metrics: m, Targets: targets})
	d, err = New(Options{Config: cfg, Router: router, Sender: sender, Metrics: m, Logger: kafkatest.Logger(h.T)})
	if err != nil {
		h.T.Fatal(err)
	}
	if tweak != nil {
		tweak(d)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- d.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-errc:
			case <-time.After(60 * time.Second):
				runErr = fmt.Errorf("dispatcher did not stop within 60s")
			}
			sender.Close()
			if reg != nil {
				reg.Close()
			}
		})
		return runErr
	}
	h.T.Cleanup(func() { _ = stop() })
	return d, m, stop
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// testutilCounter sums the series of a counter whose label has the given value.
func testutilCounter(t *testing.T, m *telemetry.Metrics, name, label, value string) float64 {
	t.Helper()
	return m.SumWhere(name, map[string]string{label: value})
}
