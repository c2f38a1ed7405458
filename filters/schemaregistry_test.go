package filters_test

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/avrov2"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/jsonschema"
	"github.com/confluentinc/confluent-kafka-go/v2/schemaregistry/serde/protobuf"
	"github.com/jhump/protoreflect/desc/protoparse"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/dynamicpb"

	"github.com/orderly-dispatch/orderly/config"
	"github.com/orderly-dispatch/orderly/filters"
	"github.com/orderly-dispatch/orderly/internal/schemareg"
	"github.com/orderly-dispatch/orderly/internal/schemareg/schemaregtest"
)

// person is the value the tests produce, in every format.
type person struct {
	Name  string  `avro:"name" json:"name"`
	N     int32   `avro:"n" json:"n"`
	Email *string `avro:"email" json:"email,omitempty"` // an Avro union with null
}

const personProto = `syntax = "proto3";
package orderly.test;
message Person {
  string name = 1;
  int32 n = 2;
  Address address = 3;
  message Address { string city = 1; }
}
message Other { string name = 1; }
`

// registries are the two registries the tests run against: confluent-kafka-go's
// in-memory mock, and an HTTP server speaking the REST API (schemaregtest).
var registries = []string{"mock", "http"}

// env is a registry, a serializer client registering through it and the
// decoder reading from it.
type env struct {
	t      *testing.T
	client schemaregistry.Client // the producers'
	dec    *schemareg.Registry
	srv    *schemaregtest.Server // nil for the mock
	proto  map[string]protoreflect.MessageDescriptor
}

func newEnv(t *testing.T, kind string) *env {
	t.Helper()
	e := &env{t: t}
	var err error
	switch kind {
	case "mock":
		e.client, err = schemaregistry.NewClient(schemaregistry.NewConfig("mock://" + t.Name()))
		if err == nil {
			e.dec, err = schemareg.New(schemareg.Options{Client: e.client})
		}
	case "http":
		e.srv = schemaregtest.New(t)
		e.client, err = schemaregistry.NewClient(schemaregistry.NewConfig(e.srv.URL))
		if err == nil {
			e.dec, err = schemareg.New(schemareg.Options{
				Config:         config.SchemaRegistry{URL: e.srv.URL, Timeout: config.Duration{Duration: 2 * time.Second}},
				InitialBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
			})
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	p := protoparse.Parser{Accessor: func(name string) (io.ReadCloser, error) {
		if name != "person.proto" {
			return nil, os.ErrNotExist
		}
		return io.NopCloser(strings.NewReader(personProto)), nil
	}}
	fds, err := p.ParseFiles("person.proto")
	if err != nil {
		t.Fatal(err)
	}
	e.proto = map[string]protoreflect.MessageDescriptor{}
	for _, name := range []string{"orderly.test.Person", "orderly.test.Other", "orderly.test.Person.Address"} {
		e.proto[name] = fds[0].FindMessage(name).UnwrapMessage()
	}
	return e
}

// produce returns p as a value of topic framed in format.
func (e *env) produce(format, topic string, p person) []byte {
	e.t.Helper()
	return e.serialize(format, topic, serde.ValueSerde, p)
}

func (e *env) serialize(format, topic string, typ serde.Type, p person) []byte {
	e.t.Helper()
	var ser serde.Serializer
	var msg any = &p
	var err error
	switch format {
	case config.FormatAvro:
		ser, err = avrov2.NewSerializer(e.client, typ, avrov2.NewSerializerConfig())
	case config.FormatProtobuf:
		ser, err = protobuf.NewSerializer(e.client, typ, protobuf.NewSerializerConfig())
		m := dynamicpb.NewMessage(e.proto["orderly.test.Person"])
		fields := m.Descriptor().Fields()
		m.Set(fields.ByName("name"), protoreflect.ValueOfString(p.Name))
		m.Set(fields.ByName("n"), protoreflect.ValueOfInt32(p.N))
		msg = m
	case config.FormatJSONSchema:
		ser, err = jsonschema.NewSerializer(e.client, typ, jsonschema.NewSerializerConfig())
	}
	if err != nil {
		e.t.Fatal(err)
	}
	b, err := ser.Serialize(topic, msg)
	if err != nil {
		e.t.Fatalf("%s: %v", format, err)
	}
	return b
}

func (e *env) compile(routes ...config.Route) *filters.Router {
	e.t.Helper()
	var topics []string
	for _, rt := range routes {
		topics = append(topics, rt.Topics...)
	}
	r, err := filters.Compile(routes, topics, filters.WithSchemaRegistry(e.dec))
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func ptr(s string) *string { return &s }

// route is a route of topic reading values in format: a `when` and a
// templated request, then a request without body.
func route(name, topic, format, when string) config.Route {
	return config.Route{Name: name, Topics: []string{topic}, ValueFormat: format, When: when,
		Requests: []config.Request{
			{Method: "POST", URL: "http://sink:8080/people/{{ .Value.name }}", Body: ptr(`{"n":{{ .Value.n }},"name":{{ json .Value.name }}}`)},
			{Method: "POST", URL: "http://sink:8080/raw"},
		}}
}

var formats = []string{config.FormatAvro, config.FormatProtobuf, config.FormatJSONSchema}

// TestSchemaRegistryFormats: each format's value is read by a `when` and by
// templates; .Raw and a request without body keep the original bytes.
func TestSchemaRegistryFormats(t *testing.T) {
	for _, kind := range registries {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind)
			for _, f := range formats {
				t.Run(f, func(t *testing.T) {
					topic := "t-" + f
					r := e.compile(route("r", topic, f, `value.name == "ann" && value.n > 2`))
					value := e.produce(f, topic, person{Name: "ann", N: 5})
					m := &filters.Message{Topic: topic, Key: []byte("k"), Value: value}
					plan, err := r.Plan(m)
					if err != nil {
						t.Fatal(err)
					}
					rq := plan.Requests
					if plan.Route != "r" || rq[0].URL != "http://sink:8080/people/ann" || string(rq[0].Body) != `{"n":5,"name":"ann"}` {
						t.Errorf("plan: %s %s %s", plan.Route, rq[0].URL, rq[0].Body)
					}
					if string(rq[1].Body) != string(value) {
						t.Errorf("a request without body sends %x, not the value %x", rq[1].Body, value)
					}
					// Match, then Render, as the dispatcher does.
					rt, err := r.Match(m)
					if err != nil || rt.Name() != "r" || rt.Pending() {
						t.Fatalf("Match: %v, %v", rt, err)
					}
					if p, err := rt.Render(m, nil); err != nil || p.Requests[0].URL != rq[0].URL {
						t.Errorf("Render: %v, %v", p, err)
					}
					other := &filters.Message{Topic: topic, Value: e.produce(f, topic, person{Name: "bob", N: 5})}
					if _, err := r.Plan(other); err != filters.ErrNoRoute {
						t.Errorf("a value the when does not take: %v", err)
					}
				})
			}
		})
	}
}

// TestSchemaRegistryAvroValues: unions read as the value they hold, .Raw is
// the framed bytes.
func TestSchemaRegistryAvroValues(t *testing.T) {
	e := newEnv(t, "mock")
	r := e.compile(config.Route{Name: "r", Topics: []string{"t"}, ValueFormat: config.FormatAvro,
		When: `value.email != nil`, Requests: []config.Request{{Method: "POST", URL: "http://sink:8080/x",
			Body: ptr(`{{ .Value.email }} {{ json .Value }} {{ len .Raw }}`)}}})
	value := e.produce(config.FormatAvro, "t", person{Name: "ann", N: 1, Email: ptr("ann@example.com")})
	plan, err := r.Plan(&filters.Message{Topic: "t", Value: value})
	if err != nil {
		t.Fatal(err)
	}
	want := `ann@example.com {"email":"ann@example.com","n":1,"name":"ann"} ` + strconv.Itoa(len(value))
	if got := string(plan.Requests[0].Body); got != want {
		t.Errorf("body %s, want %s", got, want)
	}
	if _, err := r.Plan(&filters.Message{Topic: "t", Value: e.produce(config.FormatAvro, "t", person{Name: "bob"})}); !errors.Is(err, filters.ErrNoRoute) {
		t.Errorf("null email: %v", err)
	}
}

// TestSchemaRegistryBadMessages: a value that cannot be decoded is a bad
// message whose reason names why; a `when` cannot judge it.
func TestSchemaRegistryBadMessages(t *testing.T) {
	for _, kind := range registries {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind)
			for _, f := range formats {
				topic := "t-" + f
				good := e.produce(f, topic, person{Name: "ann", N: 5})
				unknown := append([]byte{0, 0, 0, 3, 0xe7}, good[5:]...) // schema id 999
				cases := []struct {
					name, reason string
					value        []byte
				}{
					{"magic byte", "unknown magic byte 123", append([]byte{'{'}, good[1:]...)},
					{"unknown id", "unknown schema id 999", unknown},
					{"short", "too short", []byte{0, 0, 0}},
					{"empty", "empty", nil},
				}
				if f != config.FormatJSONSchema {
					cases = append(cases, struct {
						name, reason string
						value        []byte
					}{"payload", "value_format", append(append([]byte{}, good...), 0xff, 0xff, 0xff)[:len(good)-1]})
				}
				if f == config.FormatProtobuf {
					// Message index 5 of a schema with two message types.
					bad := append(append([]byte{}, good[:5]...), 2, 10)
					cases = append(cases, struct {
						name, reason string
						value        []byte
					}{"message index", "message indexes [5]", append(bad, good[6:]...)})
				}
				for _, c := range cases {
					t.Run(f+"/"+c.name, func(t *testing.T) {
						r := e.compile(route("r", topic, f, ""))
						m := &filters.Message{Topic: topic, Value: c.value}
						_, err := r.Plan(m)
						var bad *filters.BadMessageError
						if !errors.As(err, &bad) || !errors.Is(err, filters.ErrUndecodable) || errors.Is(err, filters.ErrUnavailable) {
							t.Fatalf("Plan: %v, want a bad message", err)
						}
						if !strings.Contains(bad.Reason, c.reason) || !strings.Contains(bad.Reason, `value_format "`+f+`"`) || bad.Index != 0 {
							t.Errorf("reason %q (index %d), want it to name %q", bad.Reason, bad.Index, c.reason)
						}
						rw := e.compile(route("r", topic, f, `value.n > 1`))
						_, err = rw.Plan(m)
						if !errors.Is(err, filters.ErrNoRoute) || !strings.Contains(err.Error(), c.reason) {
							t.Errorf("with a when: %v, want ErrNoRoute naming %q", err, c.reason)
						}
						if rt, err := rw.Match(m); err == nil || rt != nil {
							t.Errorf("Match: %v, %v", rt, err)
						}
					})
				}
			}
		})
	}
}

// TestSchemaRegistryOutage: a registry that answers 503, or no registry at
// all, is an *UnavailableError, never a bad message; Match returns a
// pending route, rendered once the registry answers again. While down, one
// request probes it at a time, after the backoff.
func TestSchemaRegistryOutage(t *testing.T) {
	producer := newEnv(t, "http")
	srv := producer.srv
	for _, f := range formats {
		t.Run(f, func(t *testing.T) {
			topic := "t-" + f
			value := producer.produce(f, topic, person{Name: "ann", N: 5})
			// A new decoder: nothing fetched yet.
			dec, err := schemareg.New(schemareg.Options{
				Config:         config.SchemaRegistry{URL: srv.URL, Timeout: config.Duration{Duration: 2 * time.Second}},
				InitialBackoff: 50 * time.Millisecond, MaxBackoff: 50 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			routes := []config.Route{route("r", topic, f, `value.name == "ann"`)}
			r, err := filters.Compile(routes, []string{topic}, filters.WithSchemaRegistry(dec))
			if err != nil {
				t.Fatal(err)
			}
			plain, err := filters.Compile([]config.Route{route("p", topic, f, "")}, []string{topic}, filters.WithSchemaRegistry(dec))
			if err != nil {
				t.Fatal(err)
			}
			m := &filters.Message{Topic: topic, Value: value}

			srv.SetStatus(http.StatusServiceUnavailable)
			before := srv.Requests()
			_, err = plain.Plan(m)
			var ue *filters.UnavailableError
			var bad *filters.BadMessageError
			if !errors.As(err, &ue) || !errors.Is(err, filters.ErrUnavailable) || errors.As(err, &bad) || errors.Is(err, filters.ErrUndecodable) {
				t.Fatalf("Plan while the registry answers 503: %v", err)
			}
			if ue.RetryAfter <= 0 || !strings.Contains(err.Error(), "503") {
				t.Errorf("%v: RetryAfter %v", err, ue.RetryAfter)
			}
			asked := srv.Requests() - before
			rt, err := r.Match(m)
			if err != nil || !rt.Pending() || rt.Name() != "" {
				t.Fatalf("Match while down: %v, %v; want a pending route", rt, err)
			}
			if _, err := rt.Render(m, nil); !errors.Is(err, filters.ErrUnavailable) {
				t.Fatalf("Render of the pending route while down: %v", err)
			}
			if n := srv.Requests() - before; n != asked {
				t.Errorf("%d requests within the backoff after the first failure, want none", n-asked)
			}

			srv.SetStatus(0)
			deadline := time.Now().Add(10 * time.Second)
			var plan filters.Plan
			for {
				plan, err = rt.Render(m, nil)
				if err == nil || time.Now().After(deadline) {
					break
				}
				if !errors.Is(err, filters.ErrUnavailable) {
					t.Fatalf("Render after the outage: %v", err)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if err != nil || plan.Route != "r" || plan.Requests[0].URL != "http://sink:8080/people/ann" {
				t.Fatalf("Render after the outage: %v, %v", plan, err)
			}
			if r.Route(plan.Route) == nil {
				t.Errorf("Router.Route(%q) = nil", plan.Route)
			}
			if _, err := plain.Plan(m); err != nil {
				t.Errorf("Plan after the outage: %v", err)
			}
		})
	}

	t.Run("unreachable", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close() // connections are refused
		dec, err := schemareg.New(schemareg.Options{Config: config.SchemaRegistry{URL: "http://" + addr, Timeout: config.Duration{Duration: time.Second}}})
		if err != nil {
			t.Fatal(err)
		}
		r, err := filters.Compile([]config.Route{route("r", "t", config.FormatAvro, "")}, []string{"t"}, filters.WithSchemaRegistry(dec))
		if err != nil {
			t.Fatal(err)
		}
		_, err = r.Plan(&filters.Message{Topic: "t", Value: producer.produce(config.FormatAvro, "t", person{Name: "x"})})
		var bad *filters.BadMessageError
		if !errors.Is(err, filters.ErrUnavailable) || errors.As(err, &bad) {
			t.Fatalf("Plan with the registry unreachable: %v", err)
		}
	})
}

// TestSchemaRegistryKeyFormat: a framed key is .Key and `key` decoded (an
// object as JSON); the lane key, Idempotency-Key and .Raw are unaffected.
func TestSchemaRegistryKeyFormat(t *testing.T) {
	for _, kind := range registries {
		t.Run(kind, func(t *testing.T) {
			e := newEnv(t, kind)
			key := e.serialize(config.FormatAvro, "t", serde.KeySerde, person{Name: "k1", N: 7})
			r := e.compile(config.Route{Name: "r", Topics: []string{"t"}, KeyFormat: config.FormatAvro, ValueFormat: config.FormatString,
				When: `key contains "k1"`, Requests: []config.Request{
					{Method: "POST", URL: "http://sink:8080/keys/{{ .Key }}", Body: ptr("{{ .Key }}|{{ .Value }}")}}})
			plan, err := r.Plan(&filters.Message{Topic: "t", Key: key, Value: []byte("v")})
			if err != nil {
				t.Fatal(err)
			}
			wantKey := `{"email":null,"n":7,"name":"k1"}`
			if got := string(plan.Requests[0].Body); got != wantKey+"|v" {
				t.Errorf("body %s", got)
			}
			if got := plan.Requests[0].URL; !strings.HasPrefix(got, "http://sink:8080/keys/%7B%22email") {
				t.Errorf("url %s", got)
			}
			_, err = r.Plan(&filters.Message{Topic: "t", Key: []byte("plain"), Value: []byte("v")})
			if !errors.Is(err, filters.ErrNoRoute) || !strings.Contains(err.Error(), `key_format "avro"`) {
				t.Errorf("a key without framing: %v", err)
			}
			rn := e.compile(config.Route{Name: "r", Topics: []string{"t"}, KeyFormat: config.FormatAvro,
				Requests: []config.Request{{Method: "POST", URL: "http://sink:8080/keys/{{ .Key }}"}}})
			_, err = rn.Plan(&filters.Message{Topic: "t", Key: []byte("plain"), Value: []byte("{}")})
			var bad *filters.BadMessageError
			if !errors.As(err, &bad) || !strings.Contains(bad.Reason, `key_format "avro"`) {
				t.Errorf("a key without framing, rendered: %v", err)
			}
		})
	}
}

// TestValueFormatStringBytes: "string" and "bytes" values are not decoded.
func TestValueFormatStringBytes(t *testing.T) {
	r, err := filters.Compile([]config.Route{
		{Name: "s", Topics: []string{"s"}, ValueFormat: config.FormatString, When: `value startsWith "he"`,
			Requests: []config.Request{{Method: "POST", URL: "http://sink:8080/{{ .Value }}", Body: ptr("{{ upper .Value }}")}}},
		{Name: "b", Topics: []string{"b"}, ValueFormat: config.FormatBytes, When: `len(value) == 3`,
			Requests: []config.Request{{Method: "POST", URL: "http://sink:8080/b", Body: ptr("{{ b64enc .Value }}")}}},
	}, []string{"s", "b"})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := r.Plan(&filters.Message{Topic: "s", Value: []byte("hello world")})
	if err != nil || plan.Requests[0].URL != "http://sink:8080/hello%20world" || string(plan.Requests[0].Body) != "HELLO WORLD" {
		t.Errorf("string: %v, %v", plan, err)
	}
	plan, err = r.Plan(&filters.Message{Topic: "b", Value: []byte{0, 1, 2}})
	if err != nil || string(plan.Requests[0].Body) != base64.StdEncoding.EncodeToString([]byte{0, 1, 2}) {
		t.Errorf("bytes: %v, %v", plan, err)
	}
}

// TestSchemaRegistryCompile: a framed format needs WithSchemaRegistry; an
// unknown format is an error naming its key.
func TestSchemaRegistryCompile(t *testing.T) {
	rq := []config.Request{{Method: "POST", URL: "http://sink:8080/x"}}
	_, err := filters.Compile([]config.Route{
		{Name: "a", ValueFormat: config.FormatAvro, Requests: rq},
		{Name: "b", KeyFormat: config.FormatProtobuf, Requests: rq},
		{Name: "c", ValueFormat: "xml", Requests: rq},
		{Name: "d", ValueFormat: config.FormatBytes, KeyFormat: config.FormatJSON, Requests: rq},
	}, nil)
	var fields []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var ce *filters.CompileError
		if errors.As(e, &ce) {
			fields = append(fields, ce.Route+"."+ce.Field)
		}
	}
	if strings.Join(fields, " ") != "a.value_format b.key_format c.value_format" {
		t.Errorf("compile errors at %v: %v", fields, err)
	}
}

// TestSchemaRegistryAuth: basic and bearer credentials reach the registry.
func TestSchemaRegistryAuth(t *testing.T) {
	srv := schemaregtest.New(t)
	for _, c := range []struct {
		cfg  config.SchemaRegistry
		want string
	}{
		{config.SchemaRegistry{Username: "key", Password: "secret"}, "Basic " + base64.StdEncoding.EncodeToString([]byte("key:secret"))},
		{config.SchemaRegistry{BearerToken: "tok"}, "Bearer tok"},
	} {
		c.cfg.URL, c.cfg.Timeout = srv.URL, config.Duration{Duration: time.Second}
		dec, err := schemareg.New(schemareg.Options{Config: c.cfg})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := dec.Decode(config.FormatAvro, "t", false, []byte{0, 0, 0, 0, 1, 2}); !strings.Contains(fmt.Sprint(err), "unknown schema id 1") {
			t.Errorf("Decode: %v", err)
		}
		if got := srv.Authorization(); got != c.want {
			t.Errorf("Authorization %q, want %q", got, c.want)
		}
	}
}
