// Package config loads Orderly's TOML configuration: strict decoding (an
// unknown key is an error naming it and its line), defaults for everything
// optional, ${NAME} expansion from the environment in string values, and
// validation that reports every problem at once, each naming its key.
package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"
)

// FieldError is one problem in a configuration file.
type FieldError struct {
	File      string
	Line, Col int // 0 when unknown
	Key       string
	Msg       string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
		if e.Col > 0 {
			fmt.Fprintf(&b, ":%d", e.Col)
		}
	}
	if e.Key != "" {
		b.WriteString(": " + e.Key)
	}
	b.WriteString(": " + e.Msg)
	return b.String()
}

// Errors is every problem found in a configuration file, one per line.
type Errors []*FieldError

func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Defaults returns a configuration with every default of DESIGN.md and no routes.
func Defaults() Config {
	return Config{
		Kafka: Kafka{Brokers: EmbeddedBrokers, GroupID: "orderly", Topics: []string{"orders"},
			EmbeddedListen: "127.0.0.1:9092", EmbeddedPartitions: 8},
		Dispatch: Dispatch{MaxInFlight: 10000, CommitInterval: dur(time.Second), DrainTimeout: dur(30 * time.Second),
			Unkeyed: UnkeyedPartition, Unmatched: UnmatchedSkip, MaxLanes: 10000, LaneIdle: dur(10 * time.Second)},
		HTTP: HTTP{Timeout: dur(10 * time.Second), MaxConnsPerHost: 256, MaxConnAge: dur(60 * time.Second),
			IdleConnTimeout: dur(90 * time.Second),
			Retry: Retry{MaxAttempts: 10, InitialBackoff: dur(100 * time.Millisecond), MaxBackoff: dur(30 * time.Second),
				RetryStatuses: []int{408, 425, 429, 500, 502, 503, 504}},
			Breaker: Breaker{Enabled: true, FailureRatio: 0.5, MinRequests: 20, ConsecutiveFailures: 10,
				OpenTimeout: dur(15 * time.Second), HalfOpenRequests: 3}},
		DLQ:     DLQ{Topic: "orderly.dlq"},
		Admin:   Admin{Listen: "127.0.0.1:9464"},
		Tracing: Tracing{Endpoint: "http://127.0.0.1:4318", SampleRatio: 1},
		Log:     Log{Level: "info", Format: "json"},
	}
}

func dur(d time.Duration) Duration { return Duration{d} }

// Load reads and parses a configuration file.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, Errors{{File: path, Msg: "unable to read: " + err.Error()}}
	}
	return Parse(data, path)
}

// Parse decodes, expands, defaults and validates a configuration. Every
// error is of type Errors.
func Parse(data []byte, filename string) (*Config, error) {
	cfg := Defaults()
	dec := toml.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return nil, decodeErrors(filename, err)
	}
	var errs Errors
	add := func(key, msg string) { errs = append(errs, &FieldError{File: filename, Key: key, Msg: msg}) }
	expandStrings(reflect.ValueOf(&cfg).Elem())
	cfg.Kafka.Properties = make(map[string]string, len(cfg.Kafka.RawProperties))
	for k, v := range cfg.Kafka.RawProperties {
		key := "kafka.properties." + k
		s, err := propertyString(v)
		if err != nil {
			add(key, err.Error())
			continue
		}
		s = expand(s, nil)
		if hint, owned := ownedProperties[k]; owned {
			add(key, "set by Orderly: "+hint)
			continue
		}
		cfg.Kafka.Properties[k] = s
	}
	lines := routeLines(data)
	for i := range cfg.Routes {
		if i < len(lines) {
			cfg.Routes[i].Line = lines[i]
		}
		for j := range cfg.Routes[i].Requests {
			r := &cfg.Routes[i].Requests[j]
			if r.Method == "" {
				r.Method = http.MethodPost
			}
			if !strings.Contains(r.Method, "{{") {
				r.Method = strings.ToUpper(r.Method)
			}
		}
	}
	errs = append(errs, cfg.validate(filename)...)
	if len(errs) > 0 {
		return nil, errs
	}
	return &cfg, nil
}

// ownedProperties are librdkafka settings Orderly manages itself.
var ownedProperties = map[string]string{
	"bootstrap.servers":        "use kafka.brokers",
	"group.id":                 "use kafka.group_id",
	"enable.auto.commit":       "Orderly commits only completed work",
	"enable.auto.offset.store": "Orderly stores offsets only for completed work",
}

func decodeErrors(file string, err error) error {
	var sm *toml.StrictMissingError
	if errors.As(err, &sm) {
		errs := make(Errors, 0, len(sm.Errors))
		for _, e := range sm.Errors {
			row, col := e.Position()
			errs = append(errs, &FieldError{File: file, Line: row, Col: col, Key: strings.Join(e.Key(), "."), Msg: "unknown key"})
		}
		return errs
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return Errors{{File: file, Line: row, Col: col, Key: strings.Join(de.Key(), "."),
			Msg: strings.TrimPrefix(de.Error(), "toml: ")}}
	}
	return Errors{{File: file, Msg: strings.TrimPrefix(err.Error(), "toml: ")}}
}

var envRef = regexp.MustCompile(`\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// expand replaces ${NAME} with the environment variable NAME ("" and a
// call to unset when it is not set); $${ stands for a literal ${.
func expand(s string, unset func(name string)) string {
	if !strings.Contains(s, "${") {
		return s
	}
	return envRef.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$${" {
			return "${"
		}
		name := m[2 : len(m)-1]
		v, ok := os.LookupEnv(name)
		if !ok && unset != nil {
			unset(name)
		}
		return v
	})
}

// expandStrings expands ${NAME} in every string reachable from v. An unset
// variable expands to "" (admin.token = "${ORDERLY_ADMIN_TOKEN}" without the
// variable means no token); validation then judges the result.
func expandStrings(v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		if v.CanSet() {
			v.SetString(expand(v.String(), nil))
		}
	case reflect.Pointer:
		if !v.IsNil() {
			expandStrings(v.Elem())
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				expandStrings(v.Field(i))
			}
		}
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			expandStrings(v.Index(i))
		}
	case reflect.Map:
		if v.Type().Elem().Kind() == reflect.String {
			for _, k := range v.MapKeys() {
				v.SetMapIndex(k, reflect.ValueOf(expand(v.MapIndex(k).String(), nil)))
			}
		}
	}
}

func propertyString(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case bool:
		return strconv.FormatBool(x), nil
	case int64:
		return strconv.FormatInt(x, 10), nil
	case float64:
		if math.IsInf(x, 0) || math.IsNaN(x) {
			return "", errors.New("must be a finite number")
		}
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	default:
		return "", fmt.Errorf("must be a string, number or boolean, not %T", v)
	}
}

// routeLines returns the line of each [[routes]] header, in order.
func routeLines(data []byte) []int {
	var lines []int
	for i, l := range strings.Split(string(data), "\n") {
		if t := strings.TrimSpace(l); strings.HasPrefix(t, "[[routes]]") || strings.HasPrefix(t, "[[ routes ]]") {
			lines = append(lines, i+1)
		}
	}
	return lines
}

// validate checks every field and returns every problem.
func (c *Config) validate(file string) Errors {
	var errs Errors
	bad := func(key, format string, args ...any) {
		errs = append(errs, &FieldError{File: file, Key: key, Msg: fmt.Sprintf(format, args...)})
	}
	badAt := func(line int, key, format string, args ...any) {
		errs = append(errs, &FieldError{File: file, Line: line, Key: key, Msg: fmt.Sprintf(format, args...)})
	}

	k := &c.Kafka
	switch {
	case strings.TrimSpace(k.Brokers) == "":
		bad("kafka.brokers", `must be "host:port,..." or "embedded"`)
	case !k.Embedded():
		for _, b := range strings.Split(k.Brokers, ",") {
			if err := hostPort(strings.TrimSpace(b)); err != nil {
				bad("kafka.brokers", "%q: %v", strings.TrimSpace(b), err)
			}
		}
	}
	if strings.TrimSpace(k.GroupID) == "" {
		bad("kafka.group_id", "must not be empty")
	}
	if len(k.Topics) == 0 {
		bad("kafka.topics", "must name at least one topic")
	}
	for i, t := range k.Topics {
		if strings.TrimSpace(t) == "" {
			bad(fmt.Sprintf("kafka.topics[%d]", i), "must not be empty")
		} else if slices.Index(k.Topics, t) != i {
			bad(fmt.Sprintf("kafka.topics[%d]", i), "%q is listed twice", t)
		}
	}
	if k.Embedded() {
		if err := hostPort(k.EmbeddedListen); err != nil {
			bad("kafka.embedded_listen", "%q: %v", k.EmbeddedListen, err)
		}
		if k.EmbeddedPartitions < 1 || k.EmbeddedPartitions > 10000 {
			bad("kafka.embedded_partitions", "must be between 1 and 10000, not %d", k.EmbeddedPartitions)
		}
	}

	d := &c.Dispatch
	if d.MaxInFlight < 1 {
		bad("dispatch.max_in_flight", "must be at least 1, not %d", d.MaxInFlight)
	}
	if d.CommitInterval.D() <= 0 {
		bad("dispatch.commit_interval", "must be positive")
	}
	if d.DrainTimeout.D() < 0 {
		bad("dispatch.drain_timeout", "must not be negative")
	}
	if d.Unkeyed != UnkeyedPartition && d.Unkeyed != UnkeyedParallel {
		bad("dispatch.unkeyed", `must be "partition" or "parallel", not %q`, d.Unkeyed)
	}
	if d.Unmatched != UnmatchedSkip && d.Unmatched != UnmatchedDLQ {
		bad("dispatch.unmatched", `must be "skip" or "dlq", not %q`, d.Unmatched)
	} else if d.Unmatched == UnmatchedDLQ && c.DLQ.Topic == "" {
		bad("dispatch.unmatched", `"dlq" needs dlq.topic`)
	}
	if d.MaxLanes < 1 {
		bad("dispatch.max_lanes", "must be at least 1, not %d", d.MaxLanes)
	}
	if d.LaneIdle.D() <= 0 {
		bad("dispatch.lane_idle", "must be positive")
	}

	h := &c.HTTP
	if h.Timeout.D() <= 0 {
		bad("http.timeout", "must be positive")
	}
	if h.MaxConnsPerHost < 0 {
		bad("http.max_conns_per_host", "must not be negative (0 = unlimited)")
	}
	if h.MaxConnAge.D() < 0 {
		bad("http.max_conn_age", "must not be negative (0 = never)")
	}
	if h.IdleConnTimeout.D() < 0 {
		bad("http.idle_conn_timeout", "must not be negative")
	}
	r := &h.Retry
	if r.MaxAttempts < 0 {
		bad("http.retry.max_attempts", "must not be negative (0 = until it succeeds)")
	}
	if r.InitialBackoff.D() <= 0 {
		bad("http.retry.initial_backoff", "must be positive")
	}
	if r.MaxBackoff.D() < r.InitialBackoff.D() {
		bad("http.retry.max_backoff", "must be at least http.retry.initial_backoff (%s)", r.InitialBackoff.D())
	}
	for i, s := range r.RetryStatuses {
		if s < 100 || s > 599 {
			bad(fmt.Sprintf("http.retry.retry_statuses[%d]", i), "%d is not an HTTP status", s)
		} else if s >= 200 && s < 300 {
			bad(fmt.Sprintf("http.retry.retry_statuses[%d]", i), "%d is a success", s)
		}
	}
	b := &h.Breaker
	if b.FailureRatio <= 0 || b.FailureRatio > 1 {
		bad("http.breaker.failure_ratio", "must be in (0, 1], not %g", b.FailureRatio)
	}
	if b.MinRequests < 1 {
		bad("http.breaker.min_requests", "must be at least 1")
	}
	if b.ConsecutiveFailures < 0 {
		bad("http.breaker.consecutive_failures", "must not be negative (0 = off)")
	}
	if b.OpenTimeout.D() <= 0 {
		bad("http.breaker.open_timeout", "must be positive")
	}
	if b.HalfOpenRequests < 1 {
		bad("http.breaker.half_open_requests", "must be at least 1")
	}

	if c.DLQ.Topic != "" && slices.Contains(k.Topics, c.DLQ.Topic) {
		bad("dlq.topic", "%q is also consumed (kafka.topics): dead letters would loop", c.DLQ.Topic)
	}
	if c.Admin.Listen != "" {
		if err := hostPort(c.Admin.Listen); err != nil {
			bad("admin.listen", "%q: %v", c.Admin.Listen, err)
		}
	}
	if c.Admin.DrainGrace.D() < 0 {
		bad("admin.drain_grace", "must not be negative")
	}
	if c.Tracing.Enabled {
		if u, err := url.Parse(c.Tracing.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("tracing.endpoint", "%q is not an http(s) URL", c.Tracing.Endpoint)
		}
	}
	if c.Tracing.SampleRatio < 0 || c.Tracing.SampleRatio > 1 {
		bad("tracing.sample_ratio", "must be in [0, 1], not %g", c.Tracing.SampleRatio)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", `must be "debug", "info", "warn" or "error", not %q`, c.Log.Level)
	}
	if c.Log.Format != "json" && c.Log.Format != "text" {
		bad("log.format", `must be "json" or "text", not %q`, c.Log.Format)
	}

	if len(c.Routes) == 0 {
		bad("routes", "at least one [[routes]] is needed")
	}
	names := map[string]int{}
	for i, rt := range c.Routes {
		key := fmt.Sprintf("routes[%d]", i)
		if rt.Name != "" {
			key += fmt.Sprintf(" (%q)", rt.Name)
		}
		if strings.TrimSpace(rt.Name) == "" {
			badAt(rt.Line, key+".name", "must not be empty")
		} else if j, dup := names[rt.Name]; dup {
			badAt(rt.Line, key+".name", "%q is also the name of routes[%d]", rt.Name, j)
		} else {
			names[rt.Name] = i
		}
		for j, t := range rt.Topics {
			if !slices.Contains(k.Topics, t) {
				badAt(rt.Line, fmt.Sprintf("%s.topics[%d]", key, j), "%q is not consumed (kafka.topics)", t)
			}
		}
		if len(rt.Requests) == 0 {
			badAt(rt.Line, key+".requests", "at least one [[routes.requests]] is needed")
		}
		for j, rq := range rt.Requests {
			rk := fmt.Sprintf("%s.requests[%d]", key, j)
			if !strings.Contains(rq.Method, "{{") && !token(rq.Method) {
				badAt(rt.Line, rk+".method", "%q is not an HTTP method", rq.Method)
			}
			if strings.TrimSpace(rq.URL) == "" {
				badAt(rt.Line, rk+".url", "must not be empty")
			}
			for name := range rq.Headers {
				if !token(name) {
					badAt(rt.Line, fmt.Sprintf("%s.headers.%q", rk, name), "is not a valid header name")
				}
			}
		}
	}
	return errs
}

func hostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("want host:port")
	}
	_ = host
	p, err := strconv.Atoi(port)
	if err != nil || p < 0 || p > 65535 {
		return fmt.Errorf("port %q is not a number from 0 to 65535", port)
	}
	return nil
}

func token(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}
