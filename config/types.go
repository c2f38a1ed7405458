package config

import (
	"fmt"
	"time"
)

// Config is the whole of an Orderly configuration file. The zero value is
// not useful: build one with Load or Parse, which apply defaults and validate.
type Config struct {
	Kafka    Kafka    `toml:"kafka"`
	Dispatch Dispatch `toml:"dispatch"`
	HTTP     HTTP     `toml:"http"`
	DLQ      DLQ      `toml:"dlq"`
	Admin    Admin    `toml:"admin"`
	Tracing  Tracing  `toml:"tracing"`
	Log      Log      `toml:"log"`
	Targets  []Target `toml:"targets,omitempty"` // see targets.go
	Routes   []Route  `toml:"routes"`
	// SchemaRegistry is where schema-framed values and keys find their
	// schemas (see schemaregistry.go).
	SchemaRegistry SchemaRegistry `toml:"schema_registry"`

	// UnsetEnv lists, sorted, the environment variables the file refers to
	// with ${NAME} (without a :-default) that were not set: each expanded
	// to "". Parse does not treat this as an error (admin.token may well be
	// empty); callers should log it.
	UnsetEnv []string `toml:"-"`

	// src is where Parse read the configuration: Validate uses it to give
	// file, line and column. nil for a Config built in code.
	src *source
}

// EmbeddedBrokers is the value of kafka.brokers that starts the in-process broker.
const EmbeddedBrokers = "embedded"

// Kafka configures the consumer group and, for brokers = "embedded", the
// in-process broker.
type Kafka struct {
	Brokers            string   `toml:"brokers"`
	GroupID            string   `toml:"group_id"`
	Topics             []string `toml:"topics"`
	EmbeddedListen     string   `toml:"embedded_listen"`
	EmbeddedPartitions int      `toml:"embedded_partitions"`
	EmbeddedDataDir    string   `toml:"embedded_data_dir"`
	// Properties are handed to librdkafka unchanged. TOML strings, integers,
	// floats and booleans are accepted and rendered as librdkafka expects
	// (6000 -> "6000", 0.25 -> "0.25", true -> "true"). Parse always sets
	// it, to an empty map when there are no properties.
	Properties map[string]string `toml:"-"`
	// RawProperties holds the [kafka.properties] table as decoded (after
	// ${NAME} expansion); Parse converts it into Properties.
	RawProperties map[string]any `toml:"properties"`
}

// Embedded reports whether the in-process broker is to be used.
func (k Kafka) Embedded() bool { return k.Brokers == EmbeddedBrokers }

// Dispatch configures ordering, back-pressure and commits.
type Dispatch struct {
	MaxInFlight    int      `toml:"max_in_flight"`
	CommitInterval Duration `toml:"commit_interval"`
	DrainTimeout   Duration `toml:"drain_timeout"`
	Unkeyed        string   `toml:"unkeyed"`   // UnkeyedPartition or UnkeyedParallel
	Unmatched      string   `toml:"unmatched"` // UnmatchedSkip or UnmatchedDLQ
	// MaxLanes bounds the number of key lanes (per-key queues, not
	// goroutines) alive at once per partition.
	MaxLanes int `toml:"max_lanes"`
	// LaneIdle is how long an idle key lane lives before it is retired.
	LaneIdle Duration `toml:"lane_idle"`
	// MaxSpan bounds, per partition, the offsets from the oldest unfinished
	// message to the newest fetched one; at the limit the partition pauses.
	MaxSpan int64 `toml:"max_span"`
	// MaxKeyInFlight bounds, per partition, the messages one key holds; its
	// further messages are read again once it has room (0: max_in_flight/10;
	// the dispatcher derives it).
	MaxKeyInFlight int `toml:"max_key_in_flight"`
	// CommitMetadataMaxBytes bounds the progress (offsets finished beyond
	// the committed one) written into each commit's metadata; 0 writes none.
	CommitMetadataMaxBytes int `toml:"commit_metadata_max_bytes"`
}

// Values of dispatch.unkeyed and dispatch.unmatched.
const (
	UnkeyedPartition = "partition"
	UnkeyedParallel  = "parallel"
	UnmatchedSkip    = "skip"
	UnmatchedDLQ     = "dlq"
)

// HTTP configures the outgoing client.
type HTTP struct {
	Timeout         Duration `toml:"timeout"`
	MaxConnsPerHost int      `toml:"max_conns_per_host"`
	// AdaptiveConnsPerHost lets the senders (and so the connections) per
	// host adapt below MaxConnsPerHost to the fewest that keep the host's
	// latency near its unloaded level.
	AdaptiveConnsPerHost bool     `toml:"adaptive_conns_per_host"`
	MaxConnAge           Duration `toml:"max_conn_age"`
	IdleConnTimeout      Duration `toml:"idle_conn_timeout"`
	Retry                Retry    `toml:"retry"`
	Breaker              Breaker  `toml:"breaker"`
}

// Retry configures per-request retries.
type Retry struct {
	MaxAttempts    int      `toml:"max_attempts"` // first try included; 0 = until it succeeds
	InitialBackoff Duration `toml:"initial_backoff"`
	MaxBackoff     Duration `toml:"max_backoff"`
	RetryStatuses  []int    `toml:"retry_statuses"`
	// MaxRetryAfter caps how long a Retry-After answer pauses its target.
	MaxRetryAfter Duration `toml:"max_retry_after"`
}

// Breaker configures the circuit breaker kept per target host:port.
type Breaker struct {
	Enabled             bool     `toml:"enabled"`
	FailureRatio        float64  `toml:"failure_ratio"`
	MinRequests         int      `toml:"min_requests"`
	ConsecutiveFailures int      `toml:"consecutive_failures"`
	OpenTimeout         Duration `toml:"open_timeout"`
	HalfOpenRequests    int      `toml:"half_open_requests"`
}

// DLQ configures the dead-letter topic. An empty Topic disables it.
type DLQ struct {
	Topic string `toml:"topic"`
	// QuarantineKeys: once a message is dead-lettered, its key's later
	// messages go to the DLQ too, in order, until a replay or a release.
	QuarantineKeys bool `toml:"quarantine_keys"`
	// QuarantineTopic keeps the quarantined keys (compacted); "" means
	// "<topic>.quarantine".
	QuarantineTopic string `toml:"quarantine_topic"`
}

// Admin configures the admin HTTP server.
type Admin struct {
	Listen     string   `toml:"listen"`
	Token      string   `toml:"token"`
	DrainGrace Duration `toml:"drain_grace"`
}

// Tracing configures OpenTelemetry export.
type Tracing struct {
	Enabled     bool    `toml:"enabled"`
	Endpoint    string  `toml:"endpoint"`
	SampleRatio float64 `toml:"sample_ratio"`
}

// Log configures the slog logger.
type Log struct {
	Level  string `toml:"level"`  // debug, info, warn, error
	Format string `toml:"format"` // json or text
}

// Route sends the messages it matches as a sequence of HTTP requests.
type Route struct {
	Name     string    `toml:"name"`
	Topics   []string  `toml:"topics"` // empty: every consumed topic
	When     string    `toml:"when"`   // expr-lang expression; empty: true
	Requests []Request `toml:"requests"`
	// ReplyTopic, if set, receives a record of the last response once the
	// message's last request succeeded; ErrorTopic one of the failing
	// response once it is dead-lettered. ReplyHeaders are the response
	// headers those records carry.
	ReplyTopic   string   `toml:"reply_topic,omitempty"`
	ErrorTopic   string   `toml:"error_topic,omitempty"`
	ReplyHeaders []string `toml:"reply_headers,omitempty"`
	// ValueFormat and KeyFormat say how `when` and the templates read the
	// value and the key (Format* in schemaregistry.go); "" is FormatJSON
	// for the value, FormatString for the key.
	ValueFormat string `toml:"value_format,omitempty"`
	KeyFormat   string `toml:"key_format,omitempty"`
	// Line is the line of the route's [[routes]] header (or inline table)
	// in the file, 0 if unknown. Parse sets it.
	Line int `toml:"-"`
}

// Request is one templated request of a route: an HTTP request to URL, or
// to the base_url of the [[targets]] named Target followed by Path, or a
// Kafka record to Topic. Exactly one of URL, Target and Topic is set.
type Request struct {
	Method  string            `toml:"method"`
	URL     string            `toml:"url"`
	Body    *string           `toml:"body"` // nil: the message value unchanged
	Headers map[string]string `toml:"headers"`
	// Target names a [[targets]]; Path is the template appended to its
	// base_url.
	Target string `toml:"target,omitempty"`
	Path   string `toml:"path,omitempty"`
	// Topic makes the request a record produced to that topic; Key and
	// Value are its key and value templates (nil: the message's own).
	Topic string  `toml:"topic,omitempty"`
	Key   *string `toml:"key,omitempty"`
	Value *string `toml:"value,omitempty"`
}

// Duration is a time.Duration written in TOML as a Go duration string ("1s", "250ms").
type Duration struct{ time.Duration }

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return d.Duration }

// UnmarshalText parses a Go duration string, after expanding ${NAME}
// references from the environment as every configuration string is.
func (d *Duration) UnmarshalText(b []byte) error {
	s, _, err := expand(string(b))
	if err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		from := ""
		if s != string(b) {
			from = fmt.Sprintf(" (expanded from %q)", string(b))
		}
		return fmt.Errorf("invalid duration %q%s: want a Go duration such as \"1s\" or \"250ms\"", s, from)
	}
	d.Duration = v
	return nil
}

// MarshalText writes d as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.Duration.String()), nil }
