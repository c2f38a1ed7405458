// Package filters turns Kafka messages into HTTP requests. The [[routes]] of
// the configuration are compiled once by Compile into a Router; Router.Plan
// then picks the first route that takes a message and renders its requests.
//
// # Routes
//
// Routes are tried in configuration order. A route takes a message when its
// topics (empty: every topic) contain the message's topic and its `when`
// expression is true (empty: always). The first route that takes a message
// wins; when none does, Plan returns ErrNoRoute and the caller decides whether
// to skip the message or dead-letter it. A route without requests takes the
// message and sends nothing.
//
// # Expressions
//
// `when` is an expr-lang (github.com/expr-lang/expr) expression that must
// yield a bool. It sees:
//
//	key        string             the record key; "" when there is none
//	has_key    bool               whether the record has a key (a null key is not an empty one)
//	value      any                the value decoded as JSON (map[string]any, []any, string, bool, nil, number)
//	raw        string             the value as a string
//	headers    map[string]string  the record headers; for a repeated header the last value wins
//	topic      string
//	partition  int
//	offset     int
//
// Expressions are compiled against this typed environment, so an unknown name
// (valu.type) or a result that is not a bool (key + "x") is a compile error,
// and so is a result that could be anything (value.active: compare it,
// value.active == true). In `value`, JSON integers that fit an int are ints
// and every other number is a float64, so value.amount > 100 and
// value.id == 42 both work.
//
// A `when` that cannot evaluate a message (a value that is not JSON,
// value.type when the value is a JSON array, value.n > 1 when n is a string
// or missing) does not take it, like a `when` that is false: the next route
// is tried, so "JSON events here, everything else there" is a route reading
// `value` followed by one without `when`. When no route takes the message,
// Plan returns ErrNoRoute wrapped with the first such failure, for the
// caller's log or dead letter.
//
// # Templates
//
// The method (when it contains "{{"), the URL, every header value and the
// body of a request are Go text/template templates over:
//
//	.Key        string             the record key ("" when there is none)
//	.Raw        string             the value as a string
//	.Value      any                the value decoded as JSON
//	.Headers    map[string]string  the record headers, last value wins
//	.Topic      string
//	.Partition  int
//	.Offset     int
//	.Timestamp  time.Time
//
// Templates run with missingkey=error: {{ .Value.id }} on a value without
// "id" is an error, not "<no value>"; {{ index .Value "id" }} yields nil
// instead, for use with default. An unknown top-level field ({{ .Vaule }}) is
// a compile error. Besides the text/template builtins (urlquery, print,
// index, ...) templates have:
//
//	json        the argument as JSON (no HTML escaping): {{ json .Value.name }} is a quoted, escaped
//	            JSON string, safe inside a JSON body; a json.Number keeps its literal; nil is null
//	pathescape  url.PathEscape of the argument
//	raw         the argument as it is, unescaped in a URL (see URLs)
//	default     {{ index .Value "note" | default "none" }}: the argument unless it is empty (nil, "", 0, false, empty collection)
//	lower       strings.ToLower
//	upper       strings.ToUpper
//	md5         the lowercase hex MD5 of the argument: {{ md5 .Raw }}
//	sha256      the lowercase hex SHA-256 of the argument
//	b64enc      the standard, padded base64 of the argument
//	b64dec      the bytes the standard, padded base64 argument encodes; invalid base64 is an error
//
// md5, sha256, b64enc and b64dec take a string or bytes, or a number or bool
// as it prints ({{ md5 .Value.id }} hashes the id's literal); a nil, map or
// slice is an error: {{ md5 (json .Value.items) }} hashes a value's JSON.
// A function that fails (b64dec of invalid base64, md5 of a map) fails the
// rendering, like a missing key: Plan reports a *BadMessageError. In a URL,
// their output is escaped like any other action's (see URLs). So does what
// would let a message's data decide how long rendering runs or how much it
// writes: a {{ range }} over a number above 10,000 (a check added to every
// range's pipeline) or a text over 64 MiB.
//
// In .Value, numbers print exactly as the producer wrote them: integers that
// fit an int are ints and every other number is a json.Number holding the
// original literal, so an id of 12345678901234567890 stays
// 12345678901234567890.
//
// # URLs
//
// The scheme, host and port of every request come from the configuration:
// a URL template must start with literal text "scheme://host[:port]"
// followed by "/", "?" or "#", and no action may print before that (a
// compile error naming the url otherwise). Whatever a message holds, its
// requests go to the configured host:port.
//
// Each action of a URL template is escaped for where it prints: in the path,
// as one path segment (url.PathEscape: "/", "?", "#", "%", spaces and
// control characters escaped), so /orders/{{ .Value.id }} with id
// "../admin?x=" renders /orders/..%2Fadmin%3Fx= and stays one segment; in
// the query and the fragment, as a query value (url.QueryEscape). An action
// ending in pathescape (in the path) or urlquery is escaped already and left
// alone; one ending in raw ({{ raw .Value.path }}, {{ .Value.q | raw }})
// is inserted as it is, for parts of a path or query a trusted producer
// builds. A rendered path with a "." or ".." segment (%2E too) is refused,
// raw or not. A URL template cannot call {{ template }}, and the branches of
// if, with and range must end in the same part of the URL (path, query or
// fragment). A Host header cannot be a template.
//
// A request may name a configured target (target = "billing", with
// WithTargets) and give a path template instead of a url: it renders as the
// target's base_url followed by the path, escaped as above, and
// Request.TargetName names the target, whose TLS, authentication, headers
// and signing the HTTP client applies.
//
// A nil body (no `body` key) sends the message value unchanged; an empty
// method is POST. Static parts are checked at compile time (absolute http(s)
// URL, method and header names are tokens, no control characters in header
// values). After rendering, a header value containing CR or LF is rejected as
// header injection, and a URL or method that is not valid is rejected too,
// each as a *BadMessageError.
//
// # JSON
//
// The value is decoded only for routes whose `when` uses `value` or whose
// templates use .Value, at most once per Plan, and only when such a route is
// reached. Compile works out which members the routes read (value.type,
// .Value.customer.id) and only those are built; the rest of the document is
// only checked. A route whose `when` reads `value` does not take a value
// that is not valid JSON, or is empty (see Expressions). A route that took
// the message and whose templates need JSON reports a *BadMessageError
// wrapping ErrNotJSON instead: it is never skipped. Likewise the key, the
// raw string and the headers map are only built for the routes that use
// them. See json.go for the decoder and why it is not encoding/json.
//
// # Value and key formats
//
// A route's value_format says what `value` and .Value are: "json" (the
// default, above), "string" (the value as a string), "bytes" (as []byte),
// or a Schema Registry framing, "avro", "protobuf" or "json_schema": the
// value decoded by the SchemaDecoder given WithSchemaRegistry, as JSON,
// then read as a JSON value is. `raw`, .Raw and a request without body keep
// the original bytes. key_format "avro", "protobuf" or "json_schema" makes
// `key` and .Key the decoded key (a string as it is, anything else as
// JSON); the other formats leave the key as it is. A value or key that its
// format cannot decode is a bad message (ErrUndecodable); a registry that
// does not answer is an *UnavailableError, never a bad message. See
// schemaregistry.go.
//
// # Concurrency and memory
//
// A Router is immutable and safe for concurrent use. Plan never modifies the
// Message. Every Plan returns a fresh Requests slice, but what the requests
// hold may be shared and is read-only: a Request.Body may alias
// Message.Value (no body template, or a body of exactly {{ .Raw }}), and the
// Header map of a request whose headers are all static is one map shared by
// every Plan of that route (the HTTP client builds each outgoing header set
// from it; a Plan costs no map then). Headers with templates are rendered
// into a fresh map per Plan.
package filters

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
	"text/template/parse"

	"golang.org/x/net/http/httpguts"

	"github.com/orderly-dispatch/orderly/config"
)

// ErrNoRoute is returned by Plan when no route takes the message. The caller
// decides whether that means skip or dead-letter (dispatch.unmatched). When
// a `when` could not evaluate the message, Plan wraps ErrNoRoute with why:
// test it with errors.Is.
var ErrNoRoute = errors.New("no route matched the message")

// ErrUnknownRoute is returned by PlanRoute for a name no route has.
var ErrUnknownRoute = errors.New("unknown route")

// ErrNotJSON is wrapped by the *BadMessageError of a route that needs the
// value as JSON when the value is not valid JSON (or is empty).
var ErrNotJSON = errors.New("value is not valid JSON")

// ErrHeaderInjection is wrapped by the *BadMessageError of a rendered header
// value that contains CR or LF.
var ErrHeaderInjection = errors.New("header injection")

// ErrInvalidRequest is wrapped by the *BadMessageError of a rendered method,
// URL or header value that cannot be sent (other than header injection).
var ErrInvalidRequest = errors.New("invalid request")

// BadMessageError reports a message that the route that took it cannot
// handle: its value is not JSON while the route's templates need JSON, a
// template failed to render, or a rendered request is invalid.
// Such a message is permanently bad for that route (the dispatcher
// dead-letters it).
type BadMessageError struct {
	// Route is the name of the route.
	Route string
	// Index is the index of the request that failed. A value that the
	// templates need and that is not JSON is charged to the first request
	// that uses it.
	Index int
	// Reason says what failed, where (when, requests[1].url, ...) and why, in
	// one line.
	Reason string
	// Err is the underlying error: ErrNotJSON, ErrHeaderInjection and
	// ErrInvalidRequest can be tested with errors.Is; expression and
	// template errors are passed through.
	Err error
}

// Error returns `route "<name>": <reason>`.
func (e *BadMessageError) Error() string {
	return "route " + strconv.Quote(e.Route) + ": " + e.Reason
}

// Unwrap returns e.Err.
func (e *BadMessageError) Unwrap() error { return e.Err }

// CompileError is one problem Compile found in one route. Compile returns all
// of them joined with errors.Join.
type CompileError struct {
	Index int    // position of the route in the configuration
	Route string // its name
	Field string // "when", "topics", "requests[1].url", `requests[0].headers["X-Id"]`, ...
	Err   error
}

// Error returns `routes[<index>] ("<name>").<field>: <problem>`.
func (e *CompileError) Error() string {
	return fmt.Sprintf("routes[%d] (%q).%s: %v", e.Index, e.Route, e.Field, e.Err)
}

// Unwrap returns e.Err.
func (e *CompileError) Unwrap() error { return e.Err }

// Router holds the compiled routes. It is immutable and safe for concurrent
// use.
type Router struct {
	routes []Route
	byName map[string]*Route
}

// Route is one compiled route. It is immutable and safe for concurrent use.
type Route struct {
	name      string
	topics    []string // empty: every topic
	when      *whenExpr
	reqs      []request
	needs     needs     // what rendering the requests needs
	value     *pathTrie // what of the value the templates read
	valueUser string    // first template that uses .Value ("requests[0].url"), for errors
	valueReq  int       // its request index
	// spec says how to decode the value when this route is the first to
	// need it: what this route and every later one read, so that one
	// decoding serves the whole Plan.
	spec valueSpec
	// matchSpec is spec for Match: what the `when` of this route and every
	// later one read, for expressions only; renderSpec what this route's
	// templates read, for Render. Together they decode what one Plan does.
	matchSpec, renderSpec valueSpec
	// chained: some request reads an earlier one's answer (responses.go);
	// reply and fail are the reply_topic and error_topic records' settings.
	chained     bool
	reply, fail *replyTo
	// codec is how the route reads the value and key (value_format,
	// key_format; nil: JSON and as it is); rematch is set on the pending
	// route Match returns while the schema registry is unavailable
	// (schemaregistry.go).
	codec   *codec
	rematch *Router
}

// valueSpec says what to decode of a value, and how (codec).
type valueSpec struct {
	paths *pathTrie
	mode  decodeMode
	codec *codec
}

type request struct {
	method    *text // nil: methodStr
	methodStr string
	url       *text    // a template's leading text fixes scheme://host:port (see escapeURL)
	target    string   // host:port of the URL
	headers   []header // sorted by name
	// staticHeader, when every header is static, is the Header map every
	// Plan shares (read-only); nil otherwise.
	staticHeader http.Header
	body         *text // nil: the message value
	// targetName is the [[targets]] the request names ("": a full url);
	// url is then its base_url followed by the path (see compileTarget).
	targetName string
	// topic, when set, makes the request a Kafka record (records.go): key
	// is its key template (nil: the message's key), body its value.
	topic string
	key   *text
	// responses is 1 + the highest earlier request whose answer its
	// templates read (0: none): it is rendered on its turn (RenderRequest).
	responses int
}

type header struct {
	name string // canonical
	val  *text
}

// Compile compiles routes, in configuration order, for messages of
// consumedTopics; every topic a route lists must be one of them. It reports
// every problem it finds, each as a *CompileError, joined with errors.Join;
// the Router is nil then. Requests may name the targets given WithTargets.
func Compile(routes []config.Route, consumedTopics []string, opts ...CompileOption) (*Router, error) {
	o := &compileOptions{targets: map[string]*config.Target{}}
	for _, opt := range opts {
		opt(o)
	}
	r := &Router{
		routes: make([]Route, len(routes)),
		byName: make(map[string]*Route, len(routes)),
	}
	var errs []error
	seen := make(map[string]int, len(routes))
	for i := range routes {
		cr := &routes[i]
		fail := func(field string, err error) {
			errs = append(errs, &CompileError{Index: i, Route: cr.Name, Field: field, Err: err})
		}
		rt := &r.routes[i]
		rt.name = cr.Name
		rt.valueReq = -1
		switch prev, dup := seen[cr.Name]; {
		case cr.Name == "":
			fail("name", errors.New("a route needs a name"))
		case dup:
			fail("name", fmt.Errorf("the name is already used by routes[%d]", prev))
		default:
			seen[cr.Name] = i
			r.byName[cr.Name] = rt
		}
		for _, t := range cr.Topics {
			if !slices.Contains(consumedTopics, t) {
				fail("topics", fmt.Errorf("topic %q is not consumed (kafka.topics = %q)", t, consumedTopics))
			}
		}
		rt.topics = slices.Clone(cr.Topics)
		if strings.TrimSpace(cr.When) != "" {
			w, err := compileWhen(cr.When)
			if err != nil {
				fail("when", err)
			}
			rt.when = w
		}
		rt.codec = compileCodec(cr, o, fail) // schemaregistry.go
		rt.reqs = make([]request, len(cr.Requests))
		for j := range cr.Requests {
			rt.compileRequest(j, &cr.Requests[j], o, fail)
		}
		rt.compileReplies(cr, fail) // responses.go
		if rt.codec.keyFormat().framed() && rt.readsKey() {
			rt.needs |= needKey // decoded up front, not by the fast path
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var spec, matchSpec valueSpec
	for i := len(r.routes) - 1; i >= 0; i-- {
		rt := &r.routes[i]
		n, paths := rt.needs, rt.value
		if rt.when != nil {
			n |= rt.when.needs
			paths = union(paths, rt.when.value)
			matchSpec.paths = union(rt.when.value, matchSpec.paths)
			matchSpec.mode |= modeOf(rt.when.needs)
		}
		spec.paths = union(paths, spec.paths)
		spec.mode |= modeOf(n)
		spec.codec, matchSpec.codec = rt.codec, rt.codec
		rt.spec, rt.matchSpec = spec, matchSpec
		rt.renderSpec = valueSpec{paths: rt.value, mode: modeOf(rt.needs), codec: rt.codec}
	}
	return r, nil
}

func (rt *Route) compileRequest(j int, cr *config.Request, o *compileOptions, fail func(string, error)) {
	rq := &rt.reqs[j]
	at := func(field string) string { return "requests[" + strconv.Itoa(j) + "]." + field }
	use := func(field string, tx *text) {
		if tx == nil {
			return
		}
		rt.needs |= tx.needs()
		rt.value = union(rt.value, tx.value)
		if tx.needs()&needValue != 0 && rt.valueReq < 0 {
			rt.valueReq, rt.valueUser = j, at(field)
		}
		if tx.responses > j {
			fail(at(field), fmt.Errorf("reads the response of requests[%d], which is sent after it: a request reads only the responses of the requests before it", tx.responses-1))
		}
		rq.responses = max(rq.responses, tx.responses)
		rt.chained = rt.chained || tx.responses > 0
	}
	// compile compiles the template src of field; nil when it fails.
	compile := func(field, src string) *text {
		tx, err := compileText(field, src)
		if err != nil {
			fail(at(field), err)
		}
		use(field, tx)
		return tx
	}

	if cr.Topic != "" || cr.Key != nil || cr.Value != nil {
		compileRecord(rq, cr, at, fail, compile) // records.go
		return
	}

	switch m := cr.Method; {
	case strings.Contains(m, "{{"):
		rq.method = compile("method", m)
	case m == "":
		rq.methodStr = http.MethodPost
	case !httpguts.ValidHeaderFieldName(m):
		fail(at("method"), fmt.Errorf("%q is not a valid HTTP method", m))
	default:
		rq.methodStr = m
	}

	switch tx, err := compileText("url", cr.URL); {
	case cr.Target != "" || cr.Path != "":
		rt.compileTarget(rq, j, cr, o, fail, use) // targets.go
	case err != nil:
		fail(at("url"), err)
	case cr.URL == "":
		fail(at("url"), errors.New("a request needs a url"))
	default:
		rq.setURL(tx, at("url"), at("url"), errors.New("a url template must start with a literal scheme://host[:port] followed by /, ? or #: "+
			"the scheme, host and port of a request come from the configuration only"), fail)
		use("url", tx)
	}

	names := slices.Sorted(maps.Keys(cr.Headers))
	canon := make(map[string]string, len(names))
	for _, name := range names {
		field := fmt.Sprintf("headers[%q]", name)
		cn := http.CanonicalHeaderKey(name)
		if !httpguts.ValidHeaderFieldName(name) {
			fail(at(field), fmt.Errorf("%q is not a valid header name", name))
			continue
		}
		if prev, dup := canon[cn]; dup {
			fail(at(field), fmt.Errorf("header %q is also set as %q", name, prev))
			continue
		}
		canon[cn] = name
		tx, err := compileText(field, cr.Headers[name])
		switch {
		case err != nil:
		case tx.static:
			err = checkHeaderValue(tx.str)
		case cn == "Host":
			err = errors.New("the Host header cannot be a template: the host of a request comes from the configuration only")
		}
		if err != nil {
			fail(at(field), err)
			continue
		}
		use(field, tx)
		rq.headers = append(rq.headers, header{name: cn, val: tx})
	}
	slices.SortFunc(rq.headers, func(a, b header) int { return strings.Compare(a.name, b.name) })
	rq.shareStaticHeaders()

	if cr.Body != nil {
		rq.body = compile("body", *cr.Body)
	}
}

// Plan returns the requests of the first route that takes m. It returns
// ErrNoRoute (possibly wrapped, see the package doc) when no route does,
// a *BadMessageError when the route that takes m cannot render it, and an
// *UnavailableError when the schema registry that a key or value format
// needs could not be asked (an outage: try again later). Plan does not
// modify m; the returned Plan may alias m.Value in Request.Body.
func (r *Router) Plan(m *Message) (Plan, error) { return r.planInto(m, nil) }

// planInto is Plan rendering the requests into buf when it has room (see Render).
func (r *Router) planInto(m *Message, buf []Request) (Plan, error) {
	st := getState(m)
	defer putState(st)
	rt, err := r.match(st, false)
	if err != nil {
		return Plan{}, err
	}
	if err := rt.prepare(st, &rt.spec); err != nil {
		return Plan{}, err
	}
	plan, err := rt.render(st, buf, &rt.spec)
	return plan, unavailable(err)
}

// Match returns the route Plan would render m with, without rendering: the
// first whose topics and `when` take m. Its errors are Plan's, but for those
// of rendering, which Render reports later. A caller that holds many
// messages before sending them (the dispatcher) matches on arrival and
// renders when a message's turn comes, so that rendered requests are never
// held. Match decodes only what the expressions read, Render only what the
// templates read: a member both read is decoded twice.
func (r *Router) Match(m *Message) (*Route, error) {
	st := getState(m)
	defer putState(st)
	return r.match(st, true)
}

// match finds the route for the message in st; alone (for Match) it decodes
// only what the expressions read, else what the whole Plan needs. A `when`
// that cannot evaluate the message does not take it; when no route does,
// the first such failure is named in the ErrNoRoute returned.
func (r *Router) match(st *state, alone bool) (*Route, error) {
	m := st.m
	var failed error
	for i := range r.routes {
		rt := &r.routes[i]
		if len(rt.topics) > 0 && !slices.Contains(rt.topics, m.Topic) {
			continue
		}
		if rt.when != nil {
			spec := &rt.spec
			if alone {
				spec = &rt.matchSpec
			}
			ok, err := rt.when.eval(st, spec)
			if err != nil && errors.Is(err, ErrUnavailable) {
				if alone {
					return &Route{rematch: r}, nil // Pending: matched again when rendered
				}
				return nil, err
			}
			if err != nil && failed == nil {
				where := "when"
				if errors.Is(err, ErrNotJSON) {
					where = "when needs the value as JSON"
				}
				failed = fmt.Errorf("%w (route %q: %s: %w)", ErrNoRoute, rt.name, where, err)
			}
			if !ok {
				continue
			}
		}
		return rt, nil
	}
	if failed != nil {
		return nil, failed
	}
	return nil, ErrNoRoute
}

// Name returns the route's name.
func (rt *Route) Name() string { return rt.name }

// FirstTarget returns the host:port of the route's first request when that
// is an HTTP request (every URL fixes its origin), "" when it is a record or
// the route is a pending one (Pending): what the dispatcher needs to queue
// a message for a sender before rendering it.
func (rt *Route) FirstTarget() string {
	if rt == nil || rt.rematch != nil || len(rt.reqs) == 0 || rt.reqs[0].topic != "" {
		return ""
	}
	return rt.reqs[0].target
}

// Render renders the requests of rt for m, whatever its topics and `when`
// say, into buf when it has room (cap(buf) >= its request count; the
// Plan's Requests then alias buf, saving their allocation). It fails with a
// *BadMessageError or an *UnavailableError as Plan does; a Pending route
// is matched again (see Pending).
func (rt *Route) Render(m *Message, buf []Request) (Plan, error) {
	if rt.rematch != nil {
		return rt.rematch.planInto(m, buf) // Pending
	}
	st := getState(m)
	defer putState(st)
	if err := rt.prepare(st, &rt.renderSpec); err != nil {
		return Plan{}, err
	}
	plan, err := rt.render(st, buf, &rt.renderSpec)
	return plan, unavailable(err)
}

// PlanRoute renders the requests of the route called name for m, whatever
// its topics and `when` say (DLQ replay uses it to send a message through a
// chosen route). It returns ErrUnknownRoute (wrapped, with the name) when no
// route has that name, and a *BadMessageError when the route cannot render m.
func (r *Router) PlanRoute(name string, m *Message) (Plan, error) {
	rt := r.byName[name]
	if rt == nil {
		return Plan{}, fmt.Errorf("%w %q", ErrUnknownRoute, name)
	}
	return rt.Render(m, nil)
}

// bad is the *BadMessageError of request i of rt failing at where.
func (rt *Route) bad(i int, where string, err error) *BadMessageError {
	return &BadMessageError{Route: rt.name, Index: i, Reason: where + ": " + err.Error(), Err: err}
}

// render renders every request of rt for the message in st, into buf when
// it has room, decoding the value as spec says if it is not decoded yet.
func (rt *Route) render(st *state, buf []Request, spec *valueSpec) (Plan, error) {
	if err := st.need(rt.needs, spec); err != nil {
		return Plan{}, rt.bad(rt.valueReq, rt.valueUser+" needs the value as JSON", err)
	}
	var reqs []Request
	if cap(buf) >= len(rt.reqs) {
		reqs = buf[:len(rt.reqs)]
		clear(reqs)
	} else {
		reqs = make([]Request, len(rt.reqs))
	}
	for i := range rt.reqs {
		rq, out := &rt.reqs[i], &reqs[i]
		if rq.responses > 0 {
			// Rendered on its turn, with the answers it reads (RenderRequest).
			out.Topic, out.Pending = rq.topic, true
			continue
		}
		if field, err := rt.renderRequest(st, i, out); err != nil {
			return Plan{}, rt.bad(i, "requests["+strconv.Itoa(i)+"]."+field, err)
		}
	}
	return Plan{Route: rt.name, Requests: reqs}, nil
}

// renderRequest renders request i of rt into out; on error it returns the
// field that failed.
func (rt *Route) renderRequest(st *state, i int, out *Request) (string, error) {
	rq := &rt.reqs[i]
	if rq.topic != "" {
		return st.renderRecord(rq, out)
	}
	out.Method = rq.methodStr
	if rq.method != nil {
		s, err := st.renderString(rq.method)
		if err == nil && !httpguts.ValidHeaderFieldName(s) {
			err = fmt.Errorf("%w: rendered method %q is not a valid HTTP method", ErrInvalidRequest, s)
		}
		if err != nil {
			return "method", err
		}
		out.Method = s
	}

	u, err := st.renderString(rq.url)
	out.Target, out.TargetName = rq.target, rq.targetName
	if err == nil && !rq.url.static {
		err = checkURLTail(u)
	}
	if err != nil {
		return rq.urlKey(), err
	}
	out.URL = u

	if field, err := st.renderHeaders(rq, out, checkHeaderValue); err != nil {
		return field, err
	}
	if err := st.renderBody(rq, out); err != nil {
		return "body", err
	}
	return "", nil
}

// renderHeaders renders the headers of rq into out, each value checked by
// check (nil: not checked) unless static; on error it returns the field.
func (st *state) renderHeaders(rq *request, out *Request, check func(string) error) (string, error) {
	switch {
	case rq.staticHeader != nil:
		out.Header = rq.staticHeader
	case len(rq.headers) > 0:
		h := make(http.Header, len(rq.headers))
		// One backing array for all values; each capped so that no
		// append can reach its neighbour.
		vals := make([]string, len(rq.headers))
		for j := range rq.headers {
			hd := &rq.headers[j]
			v, err := st.renderString(hd.val)
			if err == nil && check != nil && !hd.val.static {
				err = check(v)
			}
			if err != nil {
				return fmt.Sprintf("headers[%q]", hd.name), err
			}
			vals[j] = v
			h[hd.name] = vals[j : j+1 : j+1]
		}
		out.Header = h
	}
	return "", nil
}

// renderBody renders the body (a record's value) of rq into out: the
// message's value itself when there is no template or it is {{ .Raw }}.
func (st *state) renderBody(rq *request, out *Request) error {
	switch b := rq.body; {
	case b == nil || b.raw:
		out.Body = st.m.Value
	case b.static:
		out.Body = []byte(b.str)
	default:
		if err := st.render(b); err != nil {
			return err
		}
		if st.buf.Len() > 0 {
			out.Body = slices.Clone(st.buf.Bytes())
		}
	}
	return nil
}

// checkHeaderValue rejects what net/http would refuse to send, CR and LF
// (header injection) first.
func checkHeaderValue(v string) error {
	if strings.ContainsAny(v, "\r\n") {
		return fmt.Errorf("%w: value contains CR or LF", ErrHeaderInjection)
	}
	if !httpguts.ValidHeaderFieldValue(v) {
		return fmt.Errorf("%w: header value contains a control character", ErrInvalidRequest)
	}
	return nil
}

// shareStaticHeaders sets staticHeader when every header of rq is static.
func (rq *request) shareStaticHeaders() {
	if len(rq.headers) > 0 && !slices.ContainsFunc(rq.headers, func(h header) bool { return !h.val.static }) {
		rq.staticHeader = make(http.Header, len(rq.headers))
		for _, h := range rq.headers {
			rq.staticHeader[h.name] = []string{h.val.str}
		}
	}
}

// setURL makes tx rq's URL (key names it in errors): a static URL is
// checked whole; a template must fix its origin (originErr at originKey
// otherwise), and its actions are escaped for where they print.
func (rq *request) setURL(tx *text, key, originKey string, originErr error, fail func(string, error)) {
	rq.url = tx
	if tx.static {
		if u, err := checkURL(tx.str); err != nil {
			fail(key, err)
		} else {
			rq.target = TargetOf(u)
		}
		return
	}
	if rq.target = fixedOrigin(tx); rq.target == "" {
		fail(originKey, originErr)
	} else if err := escapeURL(tx); err != nil {
		fail(key, err)
	}
}

// fixedOrigin returns the target (host:port) when the leading text of a URL
// template fixes a valid scheme, host and port, ended by "/", "?" or "#"
// ("http://sink:8081/orders/{{ .Value.id }}"), so that no message can change
// them and checkURLTail is enough after rendering; "" when it does not
// ("http://sink:8081{{ .Value.x }}" would let x = "@evil.example/" choose
// the host).
func fixedOrigin(tx *text) string {
	nodes := tx.t.Tree.Root.Nodes
	if len(nodes) == 0 {
		return ""
	}
	lead, ok := nodes[0].(*parse.TextNode)
	if !ok {
		return ""
	}
	s := string(lead.Text)
	i := strings.Index(s, "://")
	if i < 0 {
		return ""
	}
	end := strings.IndexAny(s[i+3:], "/?#")
	if end < 0 {
		return ""
	}
	u, err := checkURL(s[:i+3+end] + "/")
	if err != nil {
		return ""
	}
	return TargetOf(u)
}

// TargetOf returns the host:port of an absolute URL, the port made explicit
// from the scheme (80 for http, 443 for https) when the URL has none.
func TargetOf(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	switch u.Scheme {
	case "https":
		return net.JoinHostPort(u.Hostname(), "443")
	case "http":
		return net.JoinHostPort(u.Hostname(), "80")
	}
	return u.Host
}

// checkURLTail checks a rendered URL whose origin is known to be valid: no
// control characters, a path without malformed %-escapes (what url.Parse
// would reject) and without "." or ".." segments (%2E included: servers
// resolve them, and a message could climb out of the configured path), without
// the cost of url.Parse.
func checkURLTail(s string) error {
	path, seg := true, -1 // seg: where the current path segment starts, -1 before the path
	if i := strings.Index(s, "://"); i >= 0 {
		if j := strings.IndexAny(s[i+3:], "/?#"); j >= 0 && s[i+3+j] == '/' {
			seg = i + 3 + j + 1
		}
	}
	for i := 0; i <= len(s); i++ {
		c := byte('/')
		if i < len(s) {
			c = s[i]
		}
		if path && seg >= 0 && i >= seg && (c == '/' || c == '?' || c == '#') {
			if dotSegment(s[seg:i]) {
				return fmt.Errorf("%w: URL path contains a %q segment", ErrInvalidRequest, s[seg:i])
			}
			seg = i + 1
		}
		switch {
		case i == len(s):
		case c < 0x20 || c == 0x7f:
			return fmt.Errorf("%w: URL contains control character %#02x", ErrInvalidRequest, c)
		case c == '?' || c == '#':
			path = false
		case c == '%' && path:
			if i+2 >= len(s) || !isHex(s[i+1]) || !isHex(s[i+2]) {
				return fmt.Errorf("%w: URL path contains a malformed %%-escape", ErrInvalidRequest)
			}
		}
	}
	return nil
}

// dotSegment reports whether a path segment is "." or "..", each dot
// possibly written %2E.
func dotSegment(seg string) bool {
	dots := 0
	for i := 0; i < len(seg); {
		switch {
		case seg[i] == '.':
			i++
		case strings.HasPrefix(seg[i:], "%2e") || strings.HasPrefix(seg[i:], "%2E"):
			i += 3
		default:
			return false
		}
		dots++
	}
	return dots == 1 || dots == 2
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// checkURL accepts an absolute http or https URL without control characters
// and returns it parsed.
func checkURL(s string) (*url.URL, error) {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f {
			return nil, fmt.Errorf("%w: URL contains control character %#02x", ErrInvalidRequest, c)
		}
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidRequest, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("%w: URL %q is not an absolute http or https URL", ErrInvalidRequest, s)
	}
	return u, nil
}
