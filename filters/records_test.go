package filters

import (
	"crypto/md5"
	"encoding/hex"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/orderly-dispatch/orderly/config"
)

// TestRecordRequests: a topic request renders to a record: the message's
// key and value unless templated, headers under the names as written, and
// no method, URL or target; the routes' topics are listed.
func TestRecordRequests(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "transform", Requests: []config.Request{
		{URL: "http://sink.example/people/{{ .Key }}"},
		{Topic: "names_hashed", Value: strp(`{"key":"{{ .Value.key }}","first":{{ json .Value.first_name }},"hash":"{{ md5 .Raw }}"}`),
			Headers: map[string]string{"source": "{{ .Topic }}", "traceparent-copy": "static"}},
		{Topic: "raw"},
		{Topic: "rekeyed", Key: strp("{{ .Value.first_name }}"), Value: strp("fixed")},
		{Topic: "unkeyed", Key: strp("{{ if false }}x{{ end }}")},
	}})
	raw := []byte(`{"key":"k1","first_name":"Ann \"A\"","seq":3}`)
	m := &Message{Topic: "orders", Key: []byte("k1"), Value: raw}
	plan, err := r.Plan(m)
	if err != nil {
		t.Fatal(err)
	}
	rqs := plan.Requests
	if len(rqs) != 5 || rqs[0].Topic != "" || rqs[0].Method != "POST" {
		t.Fatalf("plan %+v", rqs)
	}
	sum := md5.Sum(raw)
	want := `{"key":"k1","first":"Ann \"A\"","hash":"` + hex.EncodeToString(sum[:]) + `"}`
	if rq := rqs[1]; rq.Topic != "names_hashed" || string(rq.Key) != "k1" || string(rq.Body) != want ||
		rq.Method != "" || rq.URL != "" || rq.Target != "" {
		t.Fatalf("record %+v, value %s; want value %s under k1", rq, rq.Body, want)
	}
	if h := rqs[1].Header; h["source"][0] != "orders" || h["traceparent-copy"][0] != "static" {
		t.Fatalf("headers %v: want the names as written", h)
	}
	if rq := rqs[2]; string(rq.Key) != "k1" || &rq.Body[0] != &raw[0] {
		t.Fatalf("a record without key/value templates: %+v; want the message's key and value as they are", rq)
	}
	if rq := rqs[3]; string(rq.Key) != `Ann "A"` || string(rq.Body) != "fixed" {
		t.Fatalf("templated key and static value: %+v", rq)
	}
	if rq := rqs[4]; rq.Key != nil {
		t.Fatalf("a key that renders empty: %q, want none", rq.Key)
	}
	if got := r.RecordTopics(); !slices.Equal(got, []string{"names_hashed", "raw", "rekeyed", "unkeyed"}) {
		t.Fatalf("RecordTopics = %v", got)
	}

	// A value the template cannot render is a bad message naming the field.
	_, err = r.Plan(&Message{Topic: "orders", Key: []byte("k2"), Value: []byte(`{"first_name":"x"}`)})
	if bad := (*BadMessageError)(nil); !errors.As(err, &bad) || bad.Index != 1 || !strings.Contains(bad.Reason, "requests[1].value") {
		t.Fatalf("err = %v; want a bad message at requests[1].value", err)
	}
}

func TestRecordCompileErrors(t *testing.T) {
	got := compileErrors(t, config.Route{Name: "r", Requests: []config.Request{
		{Topic: "out", URL: "http://x.example/"},
		{Value: strp("x")},
		{Topic: "bad topic"},
		{Topic: "out", Value: strp("{{ .Value.x ")},
	}})
	for i, want := range []string{
		`requests[0].topic: set either topic`,
		`requests[1].topic: a request with a key or value produces a record and needs a topic`,
		`requests[2].topic: "bad topic" is not a valid topic name`,
		`requests[3].value: template`,
	} {
		if i >= len(got) || !strings.Contains(got[i], want) {
			t.Fatalf("errors %q; want %d: %q", got, i, want)
		}
	}
}
