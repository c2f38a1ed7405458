// Package schemareg decodes Kafka keys and values framed for a Confluent
// Schema Registry (magic byte, schema id, payload; Protobuf adds message
// indexes) into JSON, with confluent-kafka-go's schemaregistry client and
// serde packages. A *Registry is the filters.SchemaDecoder of the routes
// with value_format or key_format "avro", "protobuf" or "json_schema":
//
//   - Avro: avrov2's generic deserializer, into map[string]any, as JSON
//     (bytes as base64, NaN and infinities as strings, decimals as numbers);
//   - Protobuf: a dynamic message of the writer schema's message type, as
//     protojson writes it with the .proto field names and every field
//     (64-bit integers are JSON strings, enums their names);
//   - JSON Schema: validated against the writer schema, then the payload as
//     the producer wrote it.
//
// Schemas are fetched once per id and kept; the deserializers are built once.
//
// # Outages and bad messages
//
// Decode tells a registry that does not answer from a message that cannot
// be decoded. A connection error, a timeout, a 5xx, a 408 or 429, a 401 or
// 403, or an answer that is not the registry's JSON is an outage: Decode
// returns a *filters.UnavailableError, whose RetryAfter grows with the
// outage (from InitialBackoff, about as long as the outage has lasted, up
// to MaxBackoff). While it lasts only one request probes the registry at
// a time, once RetryAfter has passed; the others fail at once. The
// registry's own "not found" (404: an unknown schema id or subject
// version) and anything wrong with the payload (a wrong magic byte,
// message indexes or data that do not fit the schema) are ordinary errors:
// the message is bad.
package schemareg

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"math/big"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/rest"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/avrov2"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/jsonschema"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/protobuf"
	"github.com/hamba/avro/v2"
	"github.com/jhump/protoreflect/desc"
	"github.com/jhump/protoreflect/desc/protoparse"
	jsonschemav5 "github.com/santhosh-tekuri/jsonschema/v5"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
)

// Options configure New.
type Options struct {
	// Config is the [schema_registry] section; its URL must be set unless
	// Client is.
	Config config.SchemaRegistry
	// Client, if set, is used instead of a client built from Config: a
	// mock:// client shared with a serializer, in tests.
	Client schemaregistry.Client
	// InitialBackoff and MaxBackoff bound the RetryAfter of an outage
	// (defaults 100 ms and 30 s; the service passes http.retry's).
	InitialBackoff, MaxBackoff time.Duration
	// Logger hears when an outage begins (warn) and ends (info); nil
	// discards.
	Logger *slog.Logger
}

// Registry decodes schema-framed keys and values. It is safe for concurrent
// use.
type Registry struct {
	c *client
	// The deserializers, [0] for values (subject <topic>-value), [1] for
	// keys (<topic>-key).
	avro  [2]*avrov2.Deserializer
	proto [2]*protobuf.Deserializer
	jsch  [2]*jsonschema.Deserializer
	// Parsed writer schemas, by their text.
	descs       sync.Map // Protobuf -> *desc.FileDescriptor
	avroSchemas sync.Map // Avro -> avro.Schema
	jsonSchemas sync.Map // JSON Schema -> *jsonschemav5.Schema
}

var _ filters.SchemaDecoder = (*Registry)(nil)

// New builds the registry client and the deserializers. It does not contact
// the registry.
func New(o Options) (*Registry, error) {
	if o.InitialBackoff <= 0 {
		o.InitialBackoff = 100 * time.Millisecond
	}
	if o.MaxBackoff < o.InitialBackoff {
		o.MaxBackoff = max(30*time.Second, o.InitialBackoff)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	inner := o.Client
	if inner == nil {
		var err error
		if inner, err = newClient(&o.Config); err != nil {
			return nil, fmt.Errorf("schema registry: %w", err)
		}
	}
	c := &client{Client: inner, initial: o.InitialBackoff, max: o.MaxBackoff, log: o.Logger}
	if conf := inner.Config(); conf != nil {
		c.mock = strings.HasPrefix(conf.SchemaRegistryURL, "mock://")
	}
	r := &Registry{c: c}
	for i, typ := range []serde.Type{serde.ValueSerde, serde.KeySerde} {
		var err error
		if r.avro[i], err = avrov2.NewDeserializer(c, typ, avrov2.NewDeserializerConfig()); err != nil {
			return nil, fmt.Errorf("schema registry: avro deserializer: %w", err)
		}
		if r.proto[i], err = protobuf.NewDeserializer(c, typ, protobuf.NewDeserializerConfig()); err != nil {
			return nil, fmt.Errorf("schema registry: protobuf deserializer: %w", err)
		}
		// Validation is decodeJSONSchema's.
		if r.jsch[i], err = jsonschema.NewDeserializer(c, typ, jsonschema.NewDeserializerConfig()); err != nil {
			return nil, fmt.Errorf("schema registry: json_schema deserializer: %w", err)
		}
	}
	return r, nil
}

// FromConfig returns the registry of cfg's [schema_registry], with outages
// retried as http.retry retries a target's (initial_backoff up to
// max_backoff); nil without schema_registry.url.
func FromConfig(cfg *config.Config, log *slog.Logger) (*Registry, error) {
	if cfg.SchemaRegistry.URL == "" {
		return nil, nil
	}
	return New(Options{Config: cfg.SchemaRegistry, Logger: log,
		InitialBackoff: cfg.HTTP.Retry.InitialBackoff.D(), MaxBackoff: cfg.HTTP.Retry.MaxBackoff.D()})
}

// newClient builds the client of cfg: its URLs, basic or bearer
// authentication, TLS, and an HTTP client whose every request is bounded by
// cfg.Timeout. The client's own retries are few and short: the caller
// retries an outage with its backoff, without holding a goroutine.
func newClient(cfg *config.SchemaRegistry) (schemaregistry.Client, error) {
	urls := cfg.RegistryURLs()
	if len(urls) == 0 {
		return nil, errors.New("no url")
	}
	conf := schemaregistry.NewConfig(strings.Join(urls, ","))
	switch {
	case cfg.BearerToken != "":
		conf.BearerAuthCredentialsSource = "STATIC_TOKEN"
		conf.BearerAuthToken = cfg.BearerToken
	case cfg.Username != "" || cfg.Password != "":
		conf.BasicAuthCredentialsSource = "USER_INFO"
		conf.BasicAuthUserInfo = cfg.Username + ":" + cfg.Password
	}
	tlsConf, err := cfg.TLS.ClientConfig()
	if err != nil {
		return nil, err
	}
	timeout := cfg.Timeout.D()
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	conf.HTTPClient = &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           (&net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:       tlsConf,
			TLSHandshakeTimeout:   timeout,
			ResponseHeaderTimeout: timeout,
			MaxIdleConnsPerHost:   2,
			IdleConnTimeout:       90 * time.Second,
		},
		// The registry answers GETs itself: a redirect is a misconfiguration.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	conf.ConnectionTimeoutMs = int(timeout / time.Millisecond)
	conf.RequestTimeoutMs = int(timeout / time.Millisecond)
	conf.MaxRetries = 1 // once more after a 5xx, 408 or 429
	conf.RetriesWaitMs = 100
	conf.RetriesMaxWaitMs = 500
	return schemaregistry.NewClient(conf)
}

// Close releases the client's caches.
func (r *Registry) Close() error { return r.c.Client.Close() }

// Decode returns payload, a key or value of topic framed for the registry in
// format, as JSON (see the package doc). Its errors are an
// *filters.UnavailableError when the registry did not answer, else why the
// payload cannot be decoded.
func (r *Registry) Decode(format, topic string, key bool, payload []byte) (js []byte, err error) {
	defer func() {
		// The serde packages index the payload and the schema's message
		// types without checking their bounds.
		if p := recover(); p != nil {
			js, err = nil, fmt.Errorf("malformed: %v", p)
		}
	}()
	if len(payload) < 5 {
		return nil, fmt.Errorf("%d bytes: too short for the schema registry framing (magic byte and 4-byte schema id)", len(payload))
	}
	i := 0
	if key {
		i = 1
	}
	switch format {
	case config.FormatAvro:
		return r.decodeAvro(r.avro[i], topic, payload)
	case config.FormatProtobuf:
		return r.decodeProtobuf(r.proto[i], topic, payload)
	case config.FormatJSONSchema:
		return r.decodeJSONSchema(r.jsch[i], topic, payload)
	}
	return nil, fmt.Errorf("%q is not a schema registry format", format)
}

// decodeProtobuf decodes payload into a dynamic message of the type its
// message indexes name in the writer schema, and writes that as JSON.
func (r *Registry) decodeProtobuf(d *protobuf.Deserializer, topic string, payload []byte) ([]byte, error) {
	id := serde.SchemaID{SchemaType: protobuf.SchemaType}
	info, _, err := d.GetWriterSchema(topic, nil, payload, &id)
	if err != nil {
		return nil, err
	}
	fd, err := r.fileDesc(info)
	if err != nil {
		return nil, err
	}
	var md *desc.MessageDescriptor
	types := fd.GetMessageTypes()
	for _, k := range id.MessageIndexes {
		if k < 0 || k >= len(types) {
			return nil, fmt.Errorf("message indexes %v name no message type of schema id %d", id.MessageIndexes, id.ID)
		}
		md = types[k]
		types = md.GetNestedMessageTypes()
	}
	if md == nil {
		return nil, fmt.Errorf("no message indexes (schema id %d)", id.ID)
	}
	msg := dynamicpb.NewMessage(md.UnwrapMessage())
	if err := d.DeserializeInto(topic, payload, msg); err != nil {
		return nil, err
	}
	return protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(msg)
}

// fileDesc parses a Protobuf writer schema, as the protobuf serde does:
// its references from the registry, the well-known and Confluent types from
// those compiled in.
func (r *Registry) fileDesc(info schemaregistry.SchemaInfo) (*desc.FileDescriptor, error) {
	if fd, ok := r.descs.Load(info.Schema); ok {
		return fd.(*desc.FileDescriptor), nil
	}
	deps := make(map[string]string)
	if err := serde.ResolveReferences(r.c, info, deps); err != nil {
		return nil, err
	}
	p := protoparse.Parser{
		Accessor: func(name string) (io.ReadCloser, error) {
			if name == "." {
				return io.NopCloser(strings.NewReader(info.Schema)), nil
			}
			if s, ok := deps[name]; ok {
				return io.NopCloser(strings.NewReader(s)), nil
			}
			return nil, os.ErrNotExist
		},
		LookupImport: desc.LoadFileDescriptor,
	}
	fds, err := p.ParseFiles(".")
	if err != nil {
		return nil, fmt.Errorf("the writer schema does not parse: %w", err)
	}
	if len(fds) != 1 {
		return nil, errors.New("the writer schema does not parse into one file")
	}
	r.descs.Store(info.Schema, fds[0])
	return fds[0], nil
}

// decodeAvro decodes payload generically and writes it as JSON, each union
// as the value it holds (not Avro's {"type": value}).
func (r *Registry) decodeAvro(d *avrov2.Deserializer, topic string, payload []byte) ([]byte, error) {
	var v any
	if err := d.DeserializeInto(topic, payload, &v); err != nil {
		return nil, err
	}
	id := serde.SchemaID{SchemaType: avrov2.SchemaType}
	info, _, err := d.GetWriterSchema(topic, nil, payload, &id)
	if err != nil {
		return nil, err
	}
	var schema avro.Schema
	if sc, ok := r.avroSchemas.Load(info.Schema); ok {
		schema = sc.(avro.Schema)
	} else if schema, err = avro.Parse(info.Schema); err == nil {
		// The deserializer parsed it, its references included, already.
		r.avroSchemas.Store(info.Schema, schema)
	}
	if v == nil && schema != nil && !nullable(schema) {
		// What the generic decoder makes of a payload cut short.
		return nil, fmt.Errorf("the payload does not match schema id %d (cut short?)", id.ID)
	}
	return json.Marshal(jsonable(schema, v))
}

// nullable reports whether null is a value of s.
func nullable(s avro.Schema) bool {
	if u, ok := s.(*avro.UnionSchema); ok {
		return u.Nullable()
	}
	return s.Type() == avro.Null
}

// decodeJSONSchema validates payload against its writer schema and returns
// the JSON as the producer wrote it (numbers keep their literals).
func (r *Registry) decodeJSONSchema(d *jsonschema.Deserializer, topic string, payload []byte) ([]byte, error) {
	var v any
	if err := d.DeserializeInto(topic, payload, &v); err != nil {
		return nil, err
	}
	id := serde.SchemaID{SchemaType: jsonschema.SchemaType}
	info, n, err := d.GetWriterSchema(topic, nil, payload, &id)
	if err != nil {
		return nil, err
	}
	schema, err := r.jsonSchema(info)
	if err != nil {
		return nil, err
	}
	js := payload[n:]
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	if err := schema.Validate(v); err != nil {
		return nil, fmt.Errorf("does not match schema id %d: %w", id.ID, err)
	}
	return js, nil
}

// jsonSchema compiles a JSON Schema writer schema as the jsonschema serde
// does (its validation cannot validate generic values), its references from
// the registry; it loads nothing else.
func (r *Registry) jsonSchema(info schemaregistry.SchemaInfo) (*jsonschemav5.Schema, error) {
	if sc, ok := r.jsonSchemas.Load(info.Schema); ok {
		return sc.(*jsonschemav5.Schema), nil
	}
	deps := make(map[string]string)
	if err := serde.ResolveReferences(r.c, info, deps); err != nil {
		return nil, err
	}
	const base = "mem://input/"
	c := jsonschemav5.NewCompiler()
	c.LoadURL = func(u string) (io.ReadCloser, error) {
		if s, ok := deps[strings.TrimPrefix(u, base)]; ok {
			return io.NopCloser(strings.NewReader(s)), nil
		}
		return nil, fmt.Errorf("%s is not a reference of the schema", u)
	}
	if err := c.AddResource(base, strings.NewReader(info.Schema)); err != nil {
		return nil, fmt.Errorf("the writer schema does not parse: %w", err)
	}
	sc, err := c.Compile(base)
	if err != nil {
		return nil, fmt.Errorf("the writer schema does not compile: %w", err)
	}
	r.jsonSchemas.Store(info.Schema, sc)
	return sc, nil
}

// jsonable returns v, as avrov2 decodes it generically with schema s (nil
// when unknown), in a form encoding/json writes: a union as the value it
// holds, NaN and infinities as the strings protojson uses, decimals
// (*big.Rat) as exact numbers; maps and slices converted recursively.
func jsonable(s avro.Schema, v any) any {
	if ref, ok := s.(*avro.RefSchema); ok {
		s = ref.Schema()
	}
	switch x := v.(type) {
	case map[string]any:
		switch s := s.(type) {
		case *avro.RecordSchema:
			for _, f := range s.Fields() {
				if e, ok := x[f.Name()]; ok {
					x[f.Name()] = jsonable(f.Type(), e)
				}
			}
			return x
		case *avro.UnionSchema:
			if len(x) == 1 {
				for name, e := range x {
					return jsonable(unionMember(s, name), e)
				}
			}
		}
		var vs avro.Schema
		if m, ok := s.(*avro.MapSchema); ok {
			vs = m.Values()
		}
		for k, e := range x {
			x[k] = jsonable(vs, e)
		}
	case []any:
		var is avro.Schema
		if a, ok := s.(*avro.ArraySchema); ok {
			is = a.Items()
		}
		for i, e := range x {
			x[i] = jsonable(is, e)
		}
	case float64:
		return floatJSON(x)
	case float32:
		return floatJSON(float64(x))
	case time.Time:
		return x.UTC().Format(time.RFC3339Nano)
	case *big.Rat:
		return ratJSON(x)
	case big.Rat:
		return ratJSON(&x)
	}
	return v
}

// unionMember returns the member of union u that avro names name in a
// generic value ({"string": "x"}, {"com.example.Order": {...}},
// {"long.timestamp-millis": ...}), nil if none.
func unionMember(u *avro.UnionSchema, name string) avro.Schema {
	for _, t := range u.Types() {
		s := t
		if ref, ok := s.(*avro.RefSchema); ok {
			s = ref.Schema()
		}
		n := string(s.Type())
		if named, ok := s.(avro.NamedSchema); ok {
			n = named.FullName()
		} else if l, ok := s.(avro.LogicalTypeSchema); ok && l.Logical() != nil {
			n += "." + string(l.Logical().Type())
		}
		if n == name {
			return t
		}
	}
	return nil
}

func floatJSON(f float64) any {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	}
	return f
}

// ratJSON writes r as a decimal number: exactly when it has a finite
// decimal expansion (an Avro decimal always has), else with 18 decimals.
func ratJSON(r *big.Rat) json.Number {
	d := new(big.Int).Set(r.Denom())
	var twos, fives int
	for _, f := range []struct {
		p int64
		n *int
	}{{2, &twos}, {5, &fives}} {
		p, q, m := big.NewInt(f.p), new(big.Int), new(big.Int)
		for {
			q.QuoRem(d, p, m)
			if m.Sign() != 0 {
				break
			}
			d.Set(q)
			*f.n++
		}
	}
	if d.Cmp(big.NewInt(1)) != 0 {
		return json.Number(r.FloatString(18))
	}
	return json.Number(r.FloatString(max(twos, fives)))
}

// client is the registry client the deserializers use: the schemas it
// fetched kept for good, one request to the registry at a time, and the
// registry's failures sorted into outages and answers (see the package
// doc).
type client struct {
	schemaregistry.Client
	mock         bool // mock://: its errors are "not found"
	initial, max time.Duration
	log          *slog.Logger

	byID    sync.Map // idKey -> schemaregistry.SchemaInfo
	byGUID  sync.Map // string -> schemaregistry.SchemaInfo
	version sync.Map // versionKey -> schemaregistry.SchemaMetadata

	// call serializes requests: the client shares one header map between
	// requests, and one request at a time is all a probe needs.
	call sync.Mutex
	mu   sync.Mutex // protects below
	// downSince is when the current outage began (zero: none); no request
	// goes out before nextProbe, nor while probing.
	downSince time.Time
	nextProbe time.Time
	probing   bool
	lastErr   error
}

type idKey struct {
	subject string
	id      int
}

type versionKey struct {
	subject string
	version int
	deleted bool
}

// GetBySubjectAndID returns the schema of id (the writer schema of a
// message), from what it fetched before when it can.
func (c *client) GetBySubjectAndID(subject string, id int) (schemaregistry.SchemaInfo, error) {
	return cached(c, &c.byID, idKey{subject, id}, func() (schemaregistry.SchemaInfo, error) {
		return c.Client.GetBySubjectAndID(subject, id)
	}, func() string { return fmt.Sprintf("unknown schema id %d", id) })
}

// GetByGUID returns the schema of guid, from what it fetched before when
// it can.
func (c *client) GetByGUID(guid string) (schemaregistry.SchemaInfo, error) {
	return cached(c, &c.byGUID, guid, func() (schemaregistry.SchemaInfo, error) {
		return c.Client.GetByGUID(guid)
	}, func() string { return "unknown schema guid " + guid })
}

// GetSchemaMetadataIncludeDeleted returns a version of a subject (a
// schema's reference), from what it fetched before when it can.
func (c *client) GetSchemaMetadataIncludeDeleted(subject string, version int, deleted bool) (schemaregistry.SchemaMetadata, error) {
	return cached(c, &c.version, versionKey{subject, version, deleted}, func() (schemaregistry.SchemaMetadata, error) {
		return c.Client.GetSchemaMetadataIncludeDeleted(subject, version, deleted)
	}, func() string { return fmt.Sprintf("unknown version %d of subject %q (a reference)", version, subject) })
}

// GetSchemaMetadata is GetSchemaMetadataIncludeDeleted without deleted
// versions.
func (c *client) GetSchemaMetadata(subject string, version int) (schemaregistry.SchemaMetadata, error) {
	return c.GetSchemaMetadataIncludeDeleted(subject, version, false)
}

// GetLatestSchemaMetadata asks the registry through do (the deserializers
// ask only when configured to read with the latest schema).
func (c *client) GetLatestSchemaMetadata(subject string) (schemaregistry.SchemaMetadata, error) {
	return ask(c, func() (schemaregistry.SchemaMetadata, error) {
		return c.Client.GetLatestSchemaMetadata(subject)
	}, func() string { return fmt.Sprintf("no latest version of subject %q", subject) })
}

// GetLatestWithMetadata is GetLatestSchemaMetadata by metadata.
func (c *client) GetLatestWithMetadata(subject string, metadata map[string]string, deleted bool) (schemaregistry.SchemaMetadata, error) {
	return ask(c, func() (schemaregistry.SchemaMetadata, error) {
		return c.Client.GetLatestWithMetadata(subject, metadata, deleted)
	}, func() string { return fmt.Sprintf("no version of subject %q with metadata %v", subject, metadata) })
}

// cached returns what cache holds under k, else what ask returns for fetch,
// kept in cache when it succeeds.
func cached[K comparable, V any](c *client, cache *sync.Map, k K, fetch func() (V, error), notFound func() string) (V, error) {
	if v, ok := cache.Load(k); ok {
		return v.(V), nil
	}
	v, err := ask(c, fetch, notFound)
	if err == nil {
		cache.Store(k, v)
	}
	return v, err
}

// ask returns what fetch returns, asked through c.do.
func ask[V any](c *client, fetch func() (V, error), notFound func() string) (v V, err error) {
	err = c.do(func() (err error) {
		v, err = fetch()
		return err
	}, notFound)
	return v, err
}

// do makes the request fn unless an outage holds requests back, and sorts
// its error: an outage (*filters.UnavailableError), or the registry's
// "not found", returned as notFound() wrapping it.
func (c *client) do(fn func() error, notFound func() string) error {
	c.mu.Lock()
	probe := false
	if !c.downSince.IsZero() {
		if c.probing || time.Now().Before(c.nextProbe) {
			err := c.unavailableLocked()
			c.mu.Unlock()
			return err
		}
		c.probing, probe = true, true
	}
	c.mu.Unlock()

	c.call.Lock()
	c.mu.Lock()
	if !probe && !c.downSince.IsZero() {
		// The registry went down while this request waited for its turn.
		err := c.unavailableLocked()
		c.mu.Unlock()
		c.call.Unlock()
		return err
	}
	c.mu.Unlock()
	err := c.callLocked(fn)

	c.mu.Lock()
	defer c.mu.Unlock()
	if probe {
		c.probing = false
	}
	if err != nil && c.outage(err) {
		now := time.Now()
		if c.downSince.IsZero() {
			c.downSince = now
			c.log.Warn("schema registry unavailable: keys that need it wait", "error", err)
		}
		c.nextProbe = now.Add(min(max(now.Sub(c.downSince), c.initial), c.max))
		c.lastErr = err
		return c.unavailableLocked()
	}
	if !c.downSince.IsZero() {
		c.log.Info("schema registry answers again", "outage", time.Since(c.downSince).Round(time.Millisecond))
		c.downSince, c.lastErr = time.Time{}, nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", notFound(), err)
	}
	return nil
}

// callLocked runs fn, the caller holding c.call, and releases c.call: a
// panic in the registry client becomes fn's error rather than leaving every
// later request waiting for the lock (or the probe it was).
func (c *client) callLocked(fn func() error) (err error) {
	defer c.call.Unlock()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("schema registry client: panic: %v", r)
		}
	}()
	return fn()
}

// unavailableLocked is the error of a request the outage holds back or that
// failed: wait until the next probe (at least the initial backoff).
func (c *client) unavailableLocked() error {
	return &filters.UnavailableError{RetryAfter: max(time.Until(c.nextProbe), c.initial), Err: c.lastErr}
}

// outage reports whether err means the registry did not answer, rather than
// that it does not know what was asked.
func (c *client) outage(err error) bool {
	if c.mock {
		return false
	}
	var re *rest.Error
	if !errors.As(err, &re) {
		return true // no answer, or not the registry's
	}
	status := re.Code
	for status >= 1000 {
		status /= 10 // 40403 -> 404
	}
	switch status {
	case http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusUnauthorized, http.StatusForbidden:
		return true
	}
	return status < 400 || status >= 500
}
