package config

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// Validate checks every field of c and returns an Errors listing every
// problem, or nil. It expects defaults to be applied already (Parse does;
// for a Config built in code, start from Defaults). For a Config that Parse
// returned, each problem carries the file, and the line and column of its
// key, or of the nearest enclosing table present in the file when the key
// itself is absent. Validate does not compile `when` expressions or
// templates (package filters does) and does not modify c.
func (c *Config) Validate() error {
	v := &validator{c: c}
	v.all()
	if len(v.errs) == 0 {
		return nil
	}
	return v.errs
}

// validator collects the problems of one Config.
type validator struct {
	c    *Config
	errs Errors
	// skip are the values Parse left out because they had the wrong type:
	// a problem with them, or involving them, is not reported again.
	skip []keyPath
}

// all checks every field.
func (v *validator) all() {
	v.kafka()
	v.dispatch()
	v.dlq()
	v.http()
	v.rest()
	v.targets()
	v.routes()
	v.schemaRegistry() // schemaregistry.go
}

// fail reports a problem with the key at p.
func (v *validator) fail(p keyPath, format string, args ...any) {
	v.failAt(p, nil, format, args...)
}

// failAt reports a problem with the key at p, placed at p if the file has
// it, else at the key alt (another key the problem involves), else at the
// nearest table around p. When the value of p came from environment
// variables that are unset or empty, the message names them.
func (v *validator) failAt(p, alt keyPath, format string, args ...any) {
	if under(p, v.skip) || alt != nil && under(alt, v.skip) {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if note := v.c.src.emptyEnv(p); note != "" && !strings.Contains(msg, note) {
		msg += " (" + note + ")"
	}
	fe := &FieldError{Key: p.display(v.c.routeName), Msg: msg, path: p}
	if src := v.c.src; src != nil {
		fe.File = src.file
		if at, ok := src.position(p, alt); ok {
			fe.Line, fe.Col = at.line, at.col
		}
	}
	v.errs = append(v.errs, fe)
}

func key(names ...string) keyPath { return keyPath{}.key(names...) }

func (v *validator) kafka() {
	k := &v.c.Kafka
	switch {
	case strings.TrimSpace(k.Brokers) == "":
		v.fail(key("kafka", "brokers"), `must be "host:port,host:port" or "embedded"`)
	case !k.Embedded():
		for i, b := range strings.Split(k.Brokers, ",") {
			b = strings.TrimSpace(b)
			if err := hostPort(b, false); err != nil {
				v.fail(key("kafka", "brokers"), "entry %d %q: %v (or \"embedded\" alone for the in-process broker)", i+1, b, err)
			}
		}
	}
	if strings.TrimSpace(k.GroupID) == "" {
		v.fail(key("kafka", "group_id"), "must not be empty")
	}
	if len(k.Topics) == 0 {
		v.fail(key("kafka", "topics"), "must name at least one topic")
	}
	seen := map[string]int{}
	for i, t := range k.Topics {
		p := key("kafka", "topics").at(i)
		if err := TopicName(t); err != nil {
			v.fail(p, "%v", err)
		} else if j, dup := seen[t]; dup {
			v.fail(p, "%q is listed twice (also kafka.topics[%d])", t, j)
		} else {
			seen[t] = i
		}
	}
	if k.Embedded() {
		if err := hostPort(k.EmbeddedListen, true); err != nil {
			v.fail(key("kafka", "embedded_listen"), "%q: %v", k.EmbeddedListen, err)
		}
		if k.EmbeddedPartitions < 1 || k.EmbeddedPartitions > 10000 {
			v.fail(key("kafka", "embedded_partitions"), "must be from 1 to 10000, not %d", k.EmbeddedPartitions)
		}
	}

	// Properties: RawProperties as decoded, or Properties of a Config built
	// in code.
	names := slices.AppendSeq(slices.Collect(maps.Keys(k.RawProperties)), maps.Keys(k.Properties))
	slices.Sort(names)
	for _, name := range slices.Compact(names) {
		p := key("kafka", "properties", name)
		if raw, ok := k.RawProperties[name]; ok {
			if _, err := propertyString(raw); err != nil {
				v.fail(p, "%v", err)
				continue
			}
		}
		if strings.TrimSpace(name) == "" {
			v.fail(p, "a property needs a name")
		} else if hint, owned := ownedProperties[name]; owned {
			v.fail(p, "Orderly sets this librdkafka property itself: %s", hint)
		}
	}
}

func (v *validator) dlq() {
	d := &v.c.DLQ
	if d.QuarantineKeys && d.Topic == "" {
		v.failAt(key("dlq", "quarantine_keys"), key("dlq", "topic"), `needs a dead-letter topic, but dlq.topic is ""`)
	}
	if d.QuarantineTopic != "" && (d.QuarantineTopic == d.Topic || slices.Contains(v.c.Kafka.Topics, d.QuarantineTopic)) {
		v.fail(key("dlq", "quarantine_topic"), "%q must differ from dlq.topic and kafka.topics", d.QuarantineTopic)
	}
}

func (v *validator) dispatch() {
	d := &v.c.Dispatch
	if d.MaxInFlight < 1 {
		v.fail(key("dispatch", "max_in_flight"), "must be at least 1, not %d", d.MaxInFlight)
	}
	if d.CommitInterval.D() <= 0 {
		v.fail(key("dispatch", "commit_interval"), "must be positive, not %s", d.CommitInterval.D())
	}
	if d.DrainTimeout.D() < 0 {
		v.fail(key("dispatch", "drain_timeout"), "must not be negative, not %s", d.DrainTimeout.D())
	}
	if d.Unkeyed != UnkeyedPartition && d.Unkeyed != UnkeyedParallel {
		v.fail(key("dispatch", "unkeyed"), `must be "partition" or "parallel", not %q`, d.Unkeyed)
	}
	switch {
	case d.Unmatched != UnmatchedSkip && d.Unmatched != UnmatchedDLQ:
		v.fail(key("dispatch", "unmatched"), `must be "skip" or "dlq", not %q`, d.Unmatched)
	case d.Unmatched == UnmatchedDLQ && v.c.DLQ.Topic == "":
		v.failAt(key("dispatch", "unmatched"), key("dlq", "topic"), `"dlq" needs a dead-letter topic, but dlq.topic is ""`)
	}
	if d.MaxLanes < 1 {
		v.fail(key("dispatch", "max_lanes"), "must be at least 1, not %d", d.MaxLanes)
	}
	if d.LaneIdle.D() <= 0 {
		v.fail(key("dispatch", "lane_idle"), "must be positive, not %s", d.LaneIdle.D())
	}
	if d.MaxKeyInFlight < 0 || d.MaxKeyInFlight > d.MaxInFlight && d.MaxInFlight >= 1 {
		v.fail(key("dispatch", "max_key_in_flight"), "must be between 0 (max_in_flight/10) and dispatch.max_in_flight (%d), not %d", d.MaxInFlight, d.MaxKeyInFlight)
	}
	if d.MaxSpan < int64(d.MaxInFlight) {
		v.failAt(key("dispatch", "max_span"), key("dispatch", "max_in_flight"), "must be at least dispatch.max_in_flight (%d), not %d", d.MaxInFlight, d.MaxSpan)
	}
	if d.CommitMetadataMaxBytes < 0 {
		v.fail(key("dispatch", "commit_metadata_max_bytes"), "must not be negative (0 = record no progress), not %d", d.CommitMetadataMaxBytes)
	}
	// A revoked partition drains before this member rejoins the group,
	// and the group waits for that at most max.poll.interval.ms.
	if poll, ok := v.c.maxPollInterval(); ok && d.DrainTimeout.D() >= poll-drainMargin {
		v.failAt(key("dispatch", "drain_timeout"), key("kafka", "properties", "max.poll.interval.ms"),
			"%s does not fit in max.poll.interval.ms (%s) with %s to spare: the group would expel this member while a revoked partition drains",
			d.DrainTimeout.D(), poll, drainMargin)
	}
}

// drainMargin is what a drain leaves of max.poll.interval.ms for the final
// commit and the rejoin.
const drainMargin = 5 * time.Second

// maxPollInterval is librdkafka's max.poll.interval.ms as configured (its
// default, 300000, when unset), and false when the property is invalid
// (reported elsewhere).
func (c *Config) maxPollInterval() (time.Duration, bool) {
	v, set := c.Kafka.Properties["max.poll.interval.ms"]
	if raw, ok := c.Kafka.RawProperties["max.poll.interval.ms"]; ok && !set {
		s, err := propertyString(raw)
		if err != nil {
			return 0, false
		}
		v, set = s, true
	}
	if !set {
		return 300 * time.Second, true
	}
	ms, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || ms <= 0 {
		return 0, false
	}
	return time.Duration(ms) * time.Millisecond, true
}

func (v *validator) http() {
	h := &v.c.HTTP
	if h.Timeout.D() <= 0 {
		v.fail(key("http", "timeout"), "must be positive, not %s", h.Timeout.D())
	}
	if h.MaxConnsPerHost < 0 {
		v.fail(key("http", "max_conns_per_host"), "must not be negative (0 = unlimited), not %d", h.MaxConnsPerHost)
	}
	if h.MaxConnAge.D() < 0 {
		v.fail(key("http", "max_conn_age"), `must not be negative ("0s" = never), not %s`, h.MaxConnAge.D())
	}
	if h.IdleConnTimeout.D() <= 0 {
		v.fail(key("http", "idle_conn_timeout"), "must be positive, not %s", h.IdleConnTimeout.D())
	}

	r := &h.Retry
	if r.MaxAttempts < 0 {
		v.fail(key("http", "retry", "max_attempts"), "must not be negative (0 = until it succeeds), not %d", r.MaxAttempts)
	}
	if r.InitialBackoff.D() <= 0 {
		v.fail(key("http", "retry", "initial_backoff"), "must be positive, not %s", r.InitialBackoff.D())
	} else if r.MaxBackoff.D() < r.InitialBackoff.D() {
		v.failAt(key("http", "retry", "max_backoff"), key("http", "retry", "initial_backoff"), "%s is less than http.retry.initial_backoff (%s)", r.MaxBackoff.D(), r.InitialBackoff.D())
	}
	if r.MaxRetryAfter.D() <= 0 {
		v.fail(key("http", "retry", "max_retry_after"), "must be positive, not %s", r.MaxRetryAfter.D())
	}
	for i, s := range r.RetryStatuses {
		p := key("http", "retry", "retry_statuses").at(i)
		switch {
		case s < 100 || s > 599:
			v.fail(p, "%d is not an HTTP status (100 to 599)", s)
		case s >= 200 && s < 300:
			v.fail(p, "%d is a success, it cannot be retried", s)
		}
	}

	b := &h.Breaker
	if !(b.FailureRatio > 0 && b.FailureRatio <= 1) {
		v.fail(key("http", "breaker", "failure_ratio"), "must be more than 0 and at most 1, not %g", b.FailureRatio)
	}
	if b.MinRequests < 1 {
		v.fail(key("http", "breaker", "min_requests"), "must be at least 1, not %d", b.MinRequests)
	}
	if b.ConsecutiveFailures < 0 {
		v.fail(key("http", "breaker", "consecutive_failures"), "must not be negative (0 = off), not %d", b.ConsecutiveFailures)
	}
	if b.OpenTimeout.D() <= 0 {
		v.fail(key("http", "breaker", "open_timeout"), "must be positive, not %s", b.OpenTimeout.D())
	}
	if b.HalfOpenRequests < 1 {
		v.fail(key("http", "breaker", "half_open_requests"), "must be at least 1, not %d", b.HalfOpenRequests)
	}
}

// rest checks dlq, admin, tracing and log.
func (v *validator) rest() {
	c := v.c
	if t := c.DLQ.Topic; t != "" {
		if err := TopicName(t); err != nil {
			v.fail(key("dlq", "topic"), "%v", err)
		} else if i := slices.Index(c.Kafka.Topics, t); i >= 0 {
			v.failAt(key("dlq", "topic"), key("kafka", "topics").at(i), "%q is also consumed (kafka.topics[%d]): dead letters would be dispatched again, in a loop", t, i)
		}
	}

	a := &c.Admin
	if a.Listen != "" {
		if err := hostPort(a.Listen, true); err != nil {
			v.fail(key("admin", "listen"), "%q: %v (or \"\" to disable the admin server)", a.Listen, err)
		} else if a.Token == "" && c.DLQ.Topic != "" && !Loopback(a.Listen) {
			if note := c.src.emptyEnv(key("admin", "token")); note != "" {
				v.failAt(key("admin", "token"), key("admin", "listen"), "is empty because %s: /dlq/* would be open to anyone on %s (set the variable, or listen on a loopback address)", note, a.Listen)
			} else {
				v.failAt(key("admin", "token"), key("admin", "listen"), "must be set: /dlq/* would be open to anyone on %s (set a token, e.g. \"${ORDERLY_ADMIN_TOKEN}\", or listen on a loopback address)", a.Listen)
			}
		}
	}
	if a.DrainGrace.D() < 0 {
		v.fail(key("admin", "drain_grace"), "must not be negative, not %s", a.DrainGrace.D())
	}

	t := &c.Tracing
	if t.Enabled {
		if u, err := url.Parse(t.Endpoint); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.fail(key("tracing", "endpoint"), "%q is not an http:// or https:// URL (OTLP over HTTP, e.g. \"http://127.0.0.1:4318\")", t.Endpoint)
		}
	}
	if !(t.SampleRatio >= 0 && t.SampleRatio <= 1) {
		v.fail(key("tracing", "sample_ratio"), "must be from 0 to 1, not %g", t.SampleRatio)
	}

	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		v.fail(key("log", "level"), `must be "debug", "info", "warn" or "error", not %q`, c.Log.Level)
	}
	if c.Log.Format != "json" && c.Log.Format != "text" {
		v.fail(key("log", "format"), `must be "json" or "text", not %q`, c.Log.Format)
	}
}

func (v *validator) routes() {
	c := v.c
	if len(c.Routes) == 0 {
		v.fail(key("routes"), "at least one [[routes]] table is needed: without routes nothing would be sent")
	}
	names := map[string]int{}
	for i := range c.Routes {
		rt := &c.Routes[i]
		rp := key("routes").at(i)
		switch j, dup := names[rt.Name]; {
		case strings.TrimSpace(rt.Name) == "":
			v.fail(rp.key("name"), "every route needs a name (it labels metrics, logs and dead letters)")
		case dup:
			v.fail(rp.key("name"), "%q is also the name of routes[%d]", rt.Name, j)
		default:
			names[rt.Name] = i
		}
		for j, t := range rt.Topics {
			if !slices.Contains(c.Kafka.Topics, t) {
				v.fail(rp.key("topics").at(j), "%q is not consumed (kafka.topics = %s)", t, quoteList(c.Kafka.Topics))
			}
		}
		if len(rt.Requests) == 0 {
			v.fail(rp.key("requests"), "at least one [[routes.requests]] is needed")
		}
		for j := range rt.Requests {
			v.request(rp.key("requests").at(j), &rt.Requests[j])
		}
		for _, t := range []struct{ key, topic string }{{"reply_topic", rt.ReplyTopic}, {"error_topic", rt.ErrorTopic}} {
			if t.topic == "" {
				continue
			}
			if err := TopicName(t.topic); err != nil || strings.Contains(t.topic, "{{") {
				v.fail(rp.key(t.key), "%q is not a topic name (a literal one: where replies go comes from the configuration only)", t.topic)
			}
		}
		for j, h := range rt.ReplyHeaders {
			if !httpguts.ValidHeaderFieldName(h) {
				v.fail(rp.key("reply_headers").at(j), "%q is not a valid header name", h)
			}
		}
		if len(rt.ReplyHeaders) > 0 && rt.ReplyTopic == "" && rt.ErrorTopic == "" {
			v.fail(rp.key("reply_headers"), "is set without reply_topic or error_topic: no record would carry them")
		}
	}
}

func (v *validator) request(p keyPath, rq *Request) {
	if rq.Topic != "" || rq.Key != nil || rq.Value != nil {
		v.record(p, rq)
		return
	}
	if m := rq.Method; !strings.Contains(m, "{{") && !httpguts.ValidHeaderFieldName(m) {
		v.fail(p.key("method"), "%q is not an HTTP method (GET, POST, PUT, PATCH, DELETE, ...)", m)
	}
	v.destination(p, rq) // url, or target and path (targets.go)
	canon := map[string]string{}
	for _, name := range slices.Sorted(maps.Keys(rq.Headers)) {
		hp := p.key("headers", name)
		if !httpguts.ValidHeaderFieldName(name) {
			v.fail(hp, "is not a valid header name")
			continue
		}
		c := http.CanonicalHeaderKey(name)
		if other, dup := canon[c]; dup {
			v.fail(hp, "is the same header as %q (names are case-insensitive)", other)
			continue
		}
		canon[c] = name
	}
}

// record checks a request that produces a Kafka record: a topic, and none
// of the HTTP request's keys.
func (v *validator) record(p keyPath, rq *Request) {
	switch {
	case rq.Topic == "":
		v.fail(p.key("topic"), "must be set with key or value: the topic the record is produced to (or remove key and value and set url)")
		return
	case strings.Contains(rq.Topic, "{{"):
		v.fail(p.key("topic"), "cannot be a template: the topics a route writes to come from the configuration only")
		return
	}
	if err := TopicName(rq.Topic); err != nil {
		v.fail(p.key("topic"), "%v", err)
	}
	for _, k := range []struct {
		name string
		set  bool
		use  string
	}{
		{"url", rq.URL != "", "set either url (an HTTP request) or topic (a Kafka record)"},
		{"target", rq.Target != "", "set either target (an HTTP request) or topic (a Kafka record)"},
		{"path", rq.Path != "", "a Kafka record has no path"},
		{"method", rq.Method != "", "a Kafka record has no method"},
		{"body", rq.Body != nil, "a Kafka record's value is set with value"},
	} {
		if k.set {
			v.fail(p.key(k.name), "is set with topic: %s", k.use)
		}
	}
	if _, ok := rq.Headers[""]; ok {
		v.fail(p.key("headers", ""), "a record header needs a name")
	}
}

// hostPort checks a host:port address. A listen address may leave the host
// out (every interface) and use port 0 (any free port).
func hostPort(s string, listen bool) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("want host:port")
	}
	if host == "" && !listen {
		return errors.New("want host:port, the host is missing")
	}
	n, err := strconv.Atoi(port)
	lo := 1
	if listen {
		lo = 0
	}
	if err != nil || n < lo || n > 65535 {
		return fmt.Errorf("port %q is not a number from %d to 65535", port, lo)
	}
	return nil
}

// Loopback reports whether the host of addr is a loopback address or
// localhost. Validation and the admin server both use it to decide whether
// /dlq/* may be served without a token.
func Loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// TopicName checks a Kafka topic name: 1 to 249 of [a-zA-Z0-9._-], not "."
// or "..".
func TopicName(t string) error {
	switch {
	case t == "":
		return errors.New("a topic name must not be empty")
	case t == "." || t == "..":
		return fmt.Errorf("%q is not a valid topic name", t)
	case len(t) > 249:
		return fmt.Errorf("topic name is %d characters long, Kafka allows 249", len(t))
	}
	for i := 0; i < len(t); i++ {
		c := t[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%q is not a valid topic name (letters, digits, '.', '_' and '-' only)", t)
		}
	}
	return nil
}

// quoteList renders list as a TOML array of strings.
func quoteList(list []string) string {
	q := make([]string, len(list))
	for i, s := range list {
		q[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}
