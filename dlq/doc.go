// Package dlq is everything Orderly does with its dead-letter topic: it
// writes dead letters (Writer, Build), keeps the key quarantine (Quarantine)
// and replays or releases dead letters in jobs coordinated through Kafka
// (Admin).
//
// The dispatcher needs only Writer and Build, to dead-letter a message, and
// Quarantine's State, Wait, Quarantine and CatchUp, to hold a key's later
// messages. The admin API needs only Admin. Replay sends with the
// dispatcher's own Sender, so it shares its breakers and connection limits.
package dlq

import (
	"context"
	"log/slog"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/httpclient"
	"github.com/orderly-dispatch/orderly/telemetry"
)

// Sender sends one request with retries and circuit breaking until it
// succeeds, fails permanently (httpclient.IsPermanent) or ctx ends.
// *httpclient.Sender implements it.
type Sender interface {
	Send(ctx context.Context, req *filters.Request, idempotencyKey string) (httpclient.Result, error)
}

// Options configures an Admin.
type Options struct {
	Config  *config.Config
	Router  *filters.Router
	Sender  Sender
	Metrics *telemetry.Metrics
	Logger  *slog.Logger // nil discards
	// Brokers overrides Config.Kafka.Brokers (the embedded broker's actual
	// address, for instance).
	Brokers string
}
