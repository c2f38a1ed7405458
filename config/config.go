// Package config loads Orderly's TOML configuration.
//
// Load (or Parse) does everything in one go and reports every problem at
// once, as Errors, each naming its file, line and column when known, and its
// key:
//
//	orderly.toml:14:1: dispatch.max_in_flihgt: unknown key (did you mean max_in_flight?)
//	orderly.toml:31:29: http.retry.retry_statuses[2]: 1000 is not an HTTP status (100 to 599)
//	orderly.toml:52:3: routes[0] ("order-created").requests[0].url: must not be empty
//
// The steps are:
//
//   - Strict decoding with go-toml: a syntax error stops there (with line
//     and column); a value of the wrong type is reported and left out (its
//     key keeps its default), and the rest is decoded and checked. Unknown
//     keys are collected and reported together with the validation
//     problems.
//   - Defaults: the file is decoded onto Defaults(), so a key that is absent
//     keeps its default and a key that is present, even with a zero value
//     (max_attempts = 0, enabled = false, topic = "", sample_ratio = 0.0),
//     keeps what the file says. Route defaults (method POST) are filled in
//     afterwards, since an empty method has no other meaning.
//   - Environment expansion in every string value, durations included (see
//     below).
//   - [kafka.properties] is converted to strings for librdkafka.
//   - Validate checks every field.
//
// # Environment
//
// In every string value (not in keys; not in numbers or booleans, which
// cannot come from the environment):
//
//	${NAME}            the variable NAME, "" when it is not set
//	${NAME:-default}   the variable, or default when it is unset or empty
//	$${                a literal "${"
//
// NAME is a letter or '_' followed by letters, digits and '_'. Any other
// "${" is an error, so that a typo is not silently taken literally.
// Variables that are referenced but unset are listed in Config.UnsetEnv.
// Expansion happens after parsing, on the decoded values, so a value
// containing quotes or newlines cannot change the structure of the file.
//
// `when` expressions and templates are not compiled here: package filters
// does that, through a Check given to Load or Parse, so that its problems
// come in the same list, with their file, line and key.
package config

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"
)

// Defaults returns a configuration holding every default of the schema and
// no routes. Parse decodes the file onto it.
func Defaults() Config {
	return Config{
		Kafka: Kafka{
			Brokers:            EmbeddedBrokers,
			GroupID:            "orderly",
			Topics:             []string{"orders"},
			EmbeddedListen:     "127.0.0.1:9092",
			EmbeddedPartitions: 8,
		},
		Dispatch: Dispatch{
			MaxInFlight:    2000,
			CommitInterval: dur(5 * time.Millisecond),
			DrainTimeout:   dur(30 * time.Second),
			Unkeyed:        UnkeyedPartition,
			Unmatched:      UnmatchedSkip,
			MaxLanes:       10000,
			LaneIdle:       dur(10 * time.Second),
			MaxSpan:        1_000_000,
			// Kafka's default offset.metadata.max.bytes.
			CommitMetadataMaxBytes: 4096,
		},
		HTTP: HTTP{
			Timeout:              dur(10 * time.Second),
			MaxConnsPerHost:      256,
			AdaptiveConnsPerHost: true,
			MaxConnAge:           dur(60 * time.Second),
			IdleConnTimeout:      dur(90 * time.Second),
			Retry: Retry{
				MaxAttempts:    10,
				InitialBackoff: dur(100 * time.Millisecond),
				MaxBackoff:     dur(30 * time.Second),
				RetryStatuses:  []int{408, 425, 429, 500, 502, 503, 504},
				MaxRetryAfter:  dur(10 * time.Minute),
			},
			Breaker: Breaker{
				Enabled:             true,
				FailureRatio:        0.5,
				MinRequests:         20,
				ConsecutiveFailures: 10,
				OpenTimeout:         dur(15 * time.Second),
				HalfOpenRequests:    3,
			},
		},
		DLQ:     DLQ{Topic: "orderly.dlq"},
		Admin:   Admin{Listen: "127.0.0.1:9464"},
		Tracing: Tracing{Endpoint: "http://127.0.0.1:4318", SampleRatio: 1},
		Log:     Log{Level: "info", Format: "json"},
		// No registry; a request to one, once configured, takes at most 5 s.
		SchemaRegistry: SchemaRegistry{Timeout: dur(5 * time.Second)},
	}
}

func dur(d time.Duration) Duration { return Duration{d} }

// Load reads the file at path and parses it with Parse, running checks
// too. Every error it returns is an Errors; a file that cannot be read
// gives one whose Err is the *fs.PathError.
func Load(path string, checks ...Check) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, Errors{{File: path, Msg: "unable to read the configuration: " + err.Error(), Err: err}}
	}
	return Parse(data, path, checks...)
}

// A Check checks what this package cannot judge itself: cmd/orderly passes
// one that compiles the routes' `when` expressions and templates with
// package filters (which imports this one). Parse runs each check once the
// values are decoded, even when they have other problems, so that one run
// reports everything. A check returns nil or the problems it found, as an
// Errors, errors joined with errors.Join, or one error; build them with
// Config.ErrorAt to give them their file, line and key.
type Check func(*Config) error

// Parse decodes a configuration (filename is only used in messages), applies
// defaults, expands ${NAME} references, converts kafka.properties, validates
// the result and runs checks. It returns the configuration, or nil and an
// Errors listing every problem found. A value of the wrong type does not
// stop it: the value is left out (its key keeps its default) and the rest
// is decoded and checked; only a syntax error stops decoding. Parse never
// panics on any input.
func Parse(data []byte, filename string, checks ...Check) (*Config, error) {
	src := index(filename, data)
	cfg, errs, left, ok := src.decode(data)
	if !ok {
		// The values cannot all be judged.
		return nil, errs
	}
	cfg.src = src
	cfg.UnsetEnv = slices.Sorted(maps.Keys(src.unset))
	expandEnv(reflect.ValueOf(&cfg).Elem())
	cfg.setDefaults()
	for _, e := range src.envIssues {
		e.Key = e.path.display(cfg.routeName)
		errs = append(errs, e)
	}
	v := &validator{c: &cfg, skip: left}
	v.all()
	errs = append(errs, v.errs...)
	for _, check := range checks {
		for _, e := range flatten(check(&cfg)) {
			var fe *FieldError
			if !errors.As(e, &fe) {
				fe = &FieldError{File: filename, Msg: e.Error(), Err: e}
			}
			if !covered(fe.path, left, errs) {
				errs = append(errs, fe)
			}
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return &cfg, nil
}

// flatten returns the errors err holds: those of an Errors or of
// errors.Join, err itself otherwise; none for nil.
func flatten(err error) []error {
	switch e := err.(type) {
	case nil:
		return nil
	case Errors:
		return e.Unwrap()
	case interface{ Unwrap() []error }:
		var all []error
		for _, x := range e.Unwrap() {
			all = append(all, flatten(x)...)
		}
		return all
	}
	return []error{err}
}

// covered reports whether a problem at p follows from one already
// reported: p lies in a value left out (blanked), or an error in errs is
// at p, inside it or around it (package filters and Validate both check
// route names, topics, URLs and header names).
func covered(p keyPath, blanked []keyPath, errs Errors) bool {
	return p != nil && (under(p, blanked) || slices.ContainsFunc(errs, func(e *FieldError) bool {
		return e.path != nil && (p.hasPrefix(e.path) || e.path.hasPrefix(p))
	}))
}

// under reports whether p is one of paths or inside one.
func under(p keyPath, paths []keyPath) bool {
	return slices.ContainsFunc(paths, func(q keyPath) bool { return q != nil && p.hasPrefix(q) })
}

// ErrorAt returns a FieldError about the key at path, written as in
// messages ("routes[0].when", `routes[1].requests[0].headers["X-Id"]`,
// "dispatch.max_in_flight"), placed at the line and column of the key in
// the file Parse read, or of the nearest enclosing table present. Its Msg
// is err's message and its Err is err. For a Config built in code, or a
// path that cannot be read, only the file (if any) and Key are set.
func (c *Config) ErrorAt(path string, err error) *FieldError {
	fe := &FieldError{Key: path, Msg: err.Error(), Err: err}
	if c.src != nil {
		fe.File = c.src.file
	}
	p, ok := parseKeyPath(path)
	if !ok {
		return fe
	}
	fe.path = p
	fe.Key = p.display(c.routeName)
	if at, ok := c.src.position(p, nil); ok {
		fe.Line, fe.Col = at.line, at.col
	}
	return fe
}

// setDefaults fills in what has a default but no meaningful zero value
// (Watermill's setDefaults): the method of a request, the line of a route,
// and Properties from RawProperties (leaving out values Validate rejects).
func (c *Config) setDefaults() {
	for i := range c.Routes {
		r := &c.Routes[i]
		if r.Line == 0 && c.src != nil {
			if at, ok := c.src.keys[keyPath{}.key("routes").at(i).id()]; ok {
				r.Line = at.line
			}
		}
		for j := range r.Requests {
			rq := &r.Requests[j]
			switch {
			case rq.Topic != "":
				// A record: no method.
			case rq.Method == "":
				rq.Method = http.MethodPost
			case !strings.Contains(rq.Method, "{{"):
				rq.Method = strings.ToUpper(rq.Method)
			}
		}
	}
	if c.Kafka.Properties == nil {
		c.Kafka.Properties = make(map[string]string, len(c.Kafka.RawProperties))
		for k, v := range c.Kafka.RawProperties {
			if s, err := propertyString(v); err == nil {
				c.Kafka.Properties[k] = s
			}
		}
	}
}

// routeName returns the name of routes[i], or "".
func (c *Config) routeName(i int) string {
	if i >= 0 && i < len(c.Routes) {
		return c.Routes[i].Name
	}
	return ""
}

// ownedProperties are the librdkafka properties Orderly sets itself, with
// what to do instead.
var ownedProperties = map[string]string{
	"bootstrap.servers":        "set kafka.brokers instead",
	"group.id":                 "set kafka.group_id instead",
	"enable.auto.commit":       "Orderly manages it: it commits only offsets whose messages are finished",
	"enable.auto.offset.store": "Orderly manages it: it stores only offsets whose messages are finished",
}

// propertyString renders a [kafka.properties] value as librdkafka expects:
// strings as they are, integers in decimal, floats without an exponent,
// booleans as "true"/"false".
func propertyString(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case bool:
		return strconv.FormatBool(x), nil
	case int64:
		return strconv.FormatInt(x, 10), nil
	case int:
		return strconv.Itoa(x), nil
	case float64:
		if math.IsInf(x, 0) || math.IsNaN(x) {
			return "", errors.New("must be a finite number")
		}
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case map[string]any:
		return "", errors.New(`is a table: librdkafka properties are flat; quote a dotted name ("security.protocol" = "SSL", not security.protocol = "SSL")`)
	case []any:
		return "", errors.New(`is an array: librdkafka takes lists as one comma-separated string ("a,b")`)
	case toml.LocalDate, toml.LocalDateTime, toml.LocalTime, time.Time:
		return "", errors.New("must be a string, number or boolean, not a date or time (quote it)")
	default:
		return "", fmt.Errorf("must be a string, number or boolean, not %T", v)
	}
}
