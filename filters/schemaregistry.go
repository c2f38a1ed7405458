package filters

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/orderly-dispatch/orderly/config"
)

// This file holds how a route reads values and keys that are not JSON
// (value_format, key_format: see "Value and key formats" in the package
// doc). A registry that cannot be asked is not the message's fault: Plan
// and Render return the *UnavailableError itself (never inside a
// *BadMessageError), and Match returns a Pending route.

// ErrUnavailable is matched (errors.Is) by an *UnavailableError.
var ErrUnavailable = errors.New("schema registry unavailable")

// UnavailableError reports that a value or key could not be decoded because
// the schema registry did not answer (connection refused, timeout, 5xx): an
// outage, not a bad message. The message should be tried again after
// RetryAfter.
type UnavailableError struct {
	// RetryAfter is how long to wait before trying again; the decoder
	// grows it while the outage lasts.
	RetryAfter time.Duration
	Err        error
}

// Error returns "schema registry unavailable: <Err>".
func (e *UnavailableError) Error() string {
	if e.Err == nil {
		return ErrUnavailable.Error()
	}
	return "schema registry unavailable: " + e.Err.Error()
}

// Is makes an *UnavailableError match ErrUnavailable.
func (e *UnavailableError) Is(target error) bool { return target == ErrUnavailable }

// Unwrap returns e.Err.
func (e *UnavailableError) Unwrap() error { return e.Err }

// ErrUndecodable is matched (errors.Is) by the error of a value or key that
// its value_format or key_format cannot decode: a wrong magic byte, a
// schema id the registry does not know, a payload that does not match its
// schema. The *BadMessageError of such a message wraps it.
var ErrUndecodable = errors.New("cannot be decoded")

// decodeError is an ErrUndecodable: what could not be decoded, in which
// format, and why.
type decodeError struct {
	key    bool
	format format
	err    error
}

func (e *decodeError) Error() string {
	what := "value_format "
	if e.key {
		what = "key_format "
	}
	return what + strconv.Quote(e.format.String()) + ": " + e.err.Error()
}

func (e *decodeError) Is(target error) bool { return target == ErrUndecodable }
func (e *decodeError) Unwrap() error        { return e.err }

// A SchemaDecoder decodes keys and values framed for a schema registry.
// It must be safe for concurrent use; the routes of a Router share it.
type SchemaDecoder interface {
	// Decode returns payload, a key (key = true) or value of topic framed
	// for the registry in format (config.FormatAvro, FormatProtobuf or
	// FormatJSONSchema), as JSON. An error matching ErrUnavailable (an
	// *UnavailableError) means the registry could not be asked; any other
	// means the payload cannot be decoded.
	Decode(format, topic string, key bool, payload []byte) ([]byte, error)
}

// WithSchemaRegistry gives Compile the decoder of schema-framed formats.
// Without it, a route with value_format or key_format "avro", "protobuf"
// or "json_schema" is a compile error.
func WithSchemaRegistry(d SchemaDecoder) CompileOption {
	return func(o *compileOptions) { o.schemas = d }
}

// format is a value_format or key_format.
type format uint8

const (
	formatJSON format = iota
	formatString
	formatBytes
	formatAvro
	formatProtobuf
	formatJSONSchema
)

var formatNames = [...]string{
	formatJSON: config.FormatJSON, formatString: config.FormatString, formatBytes: config.FormatBytes,
	formatAvro: config.FormatAvro, formatProtobuf: config.FormatProtobuf, formatJSONSchema: config.FormatJSONSchema,
}

func (f format) String() string { return formatNames[f] }

// framed reports whether f needs the schema registry.
func (f format) framed() bool { return f >= formatAvro }

// parseFormat returns the format named s, def for "".
func parseFormat(s string, def format) (format, error) {
	if s == "" {
		return def, nil
	}
	if f := slices.Index(formatNames[:], s); f >= 0 {
		return format(f), nil
	}
	return 0, fmt.Errorf("must be %q, %q, %q, %q, %q or %q, not %q", config.FormatJSON, config.FormatString,
		config.FormatBytes, config.FormatAvro, config.FormatProtobuf, config.FormatJSONSchema, s)
}

// codec is how a route reads the value and the key; nil is the default
// (the value as JSON, the key as a string).
type codec struct {
	value format
	key   format // formatString (the key as it is) or a framed one
	dec   SchemaDecoder
}

func (c *codec) valueFormat() format {
	if c == nil {
		return formatJSON
	}
	return c.value
}

func (c *codec) keyFormat() format {
	if c == nil {
		return formatString
	}
	return c.key
}

// compileCodec compiles the value_format and key_format of route cr.
func compileCodec(cr *config.Route, o *compileOptions, fail func(string, error)) *codec {
	vf, err := parseFormat(cr.ValueFormat, formatJSON)
	if err != nil {
		fail("value_format", err)
	}
	kf, err := parseFormat(cr.KeyFormat, formatString)
	if err != nil {
		fail("key_format", err)
	}
	if !kf.framed() {
		kf = formatString // "json" and "bytes" keys are read as they are, like "string"
	}
	for _, f := range []struct {
		field string
		f     format
	}{{"value_format", vf}, {"key_format", kf}} {
		if f.f.framed() && o.schemas == nil {
			fail(f.field, fmt.Errorf("%q reads schemas from a Schema Registry: set [schema_registry] url", f.f.String()))
		}
	}
	if vf == formatJSON && kf == formatString {
		return nil
	}
	return &codec{value: vf, key: kf, dec: o.schemas}
}

// readsKey reports whether a template of rt reads .Key (also where the
// fast path reads the key's bytes without needing it built).
func (rt *Route) readsKey() bool {
	for i := range rt.reqs {
		rq := &rt.reqs[i]
		texts := []*text{rq.method, rq.url, rq.body, rq.key}
		for _, h := range rq.headers {
			texts = append(texts, h.val)
		}
		for _, tx := range texts {
			if tx != nil && !tx.static && tx.need&needKey != 0 {
				return true
			}
		}
	}
	return false
}

// decodeFramed decodes payload, the key (key = true) or value of st's
// message, in c's format for it, returning the JSON for the JSON decoder;
// its errors are an *UnavailableError or a *decodeError.
func (st *state) decodeFramed(c *codec, key bool, payload []byte) ([]byte, error) {
	f := c.value
	if key {
		f = c.key
	}
	if len(payload) == 0 {
		return nil, &decodeError{key: key, format: f, err: errors.New("empty: no schema registry framing")}
	}
	js, err := c.dec.Decode(f.String(), st.m.Topic, key, payload)
	switch {
	case err == nil:
		return js, nil
	case errors.Is(err, ErrUnavailable):
		return nil, err
	}
	return nil, &decodeError{key: key, format: f, err: err}
}

// keyText is .Key of a decoded key: a JSON string's content, anything else
// as compact JSON.
func keyText(js []byte) string {
	var s string
	if len(js) > 0 && js[0] == '"' && json.Unmarshal(js, &s) == nil {
		return s
	}
	var b bytes.Buffer
	if json.Compact(&b, js) != nil {
		return string(js)
	}
	return b.String()
}

// prepare builds what rt's requests read of the message before they are
// rendered, so that a key or value that its format cannot decode is
// reported for what it is: the *UnavailableError itself, or a
// *BadMessageError naming the format and why. Other failures are left to
// render, which meets them again.
func (rt *Route) prepare(st *state, spec *valueSpec) error {
	if rt.codec == nil {
		return nil
	}
	err := st.need(rt.needs, spec)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrUnavailable):
		return err
	case errors.Is(err, ErrUndecodable):
		var de *decodeError
		errors.As(err, &de)
		if de != nil && de.key {
			return rt.bad(0, "the key", err)
		}
		return rt.bad(rt.valueReq, rt.valueUser+" needs the value", err)
	}
	return nil
}

// unavailable returns the *UnavailableError in err's chain (a template that
// read a key or value the registry could not decode), or err.
func unavailable(err error) error {
	if err == nil {
		return nil // before ue, which escapes: no allocation per Render
	}
	var ue *UnavailableError
	if errors.As(err, &ue) {
		return ue
	}
	return err
}

// Pending reports whether rt stands for a route not chosen yet: Match could
// not evaluate a `when` because the schema registry was unavailable.
// Rendering a pending route matches the message again (Plan): it may
// return an *UnavailableError again, ErrNoRoute, or the plan of the route
// that takes the message (Plan.Route names it; Router.Route finds it).
// Its Name is "".
func (rt *Route) Pending() bool { return rt.rematch != nil }

// Route returns the route called name, nil if there is none.
func (r *Router) Route(name string) *Route { return r.byName[name] }
