package filters

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/orderly-dispatch/orderly/config"
)

// ---- helpers ----

func strp(s string) *string { return &s }

// mustCompile compiles routes for the topics "orders" and "users".
func mustCompile(t testing.TB, routes ...config.Route) *Router {
	t.Helper()
	r, err := Compile(routes, []string{"orders", "users"})
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return r
}

// compileErrors compiles routes and returns the lines of the error.
func compileErrors(t *testing.T, routes ...config.Route) []string {
	t.Helper()
	r, err := Compile(routes, []string{"orders", "users"})
	if err == nil {
		t.Fatalf("Compile succeeded, want errors")
	}
	if r != nil {
		t.Errorf("Compile returned a Router with its error")
	}
	return strings.Split(err.Error(), "\n")
}

func msg(topic, value string) *Message {
	return &Message{Topic: topic, Partition: 3, Offset: 42, Key: []byte("k1"), Value: []byte(value),
		Timestamp: time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)}
}

// req1 is a route with one request to url and body (nil: passthrough).
func req1(name, when, url string, body *string) config.Route {
	return config.Route{Name: name, When: when, Requests: []config.Request{{Method: "POST", URL: url, Body: body}}}
}

func mustPlan(t testing.TB, r *Router, m *Message) Plan {
	t.Helper()
	p, err := r.Plan(m)
	if err != nil {
		t.Fatalf("Plan: %v", err)
	}
	return p
}

func badMessage(t *testing.T, err error) *BadMessageError {
	t.Helper()
	var bad *BadMessageError
	if !errors.As(err, &bad) {
		t.Fatalf("error = %v (%T), want a *BadMessageError", err, err)
	}
	return bad
}

// renderURL compiles one route with the url template and renders m.
func renderURL(t *testing.T, url string, m *Message) (string, error) {
	t.Helper()
	r := mustCompile(t, req1("r", "", url, nil))
	p, err := r.Plan(m)
	if err != nil {
		return "", err
	}
	return p.Requests[0].URL, nil
}

// ---- templates ----

func TestTemplateDataFields(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "all", Requests: []config.Request{{
		Method: `{{ if eq .Topic "orders" }}PUT{{ else }}POST{{ end }}`,
		URL:    "http://sink/{{ .Topic }}/{{ .Partition }}/{{ .Offset }}/{{ .Key }}?ts={{ .Timestamp.Format \"2006-01-02T15:04:05Z07:00\" }}",
		Headers: map[string]string{
			"X-Id":      "{{ .Value.order.id }}",
			"X-Raw-Len": "{{ len .Raw }}",
			"X-Trace":   "{{ .Headers.trace }}",
			"X-Static":  "static",
		},
		Body: strp(`{{ .Key }}|{{ .Raw }}|{{ .Value.order.id }}|{{ .Headers.trace }}|{{ .Partition }}|{{ .Offset }}|{{ .Timestamp.Unix }}`),
	}}})
	m := msg("orders", `{"order":{"id":7}}`)
	m.Headers = []Header{{Key: "trace", Value: []byte("first")}, {Key: "trace", Value: []byte("t-1")}}
	p := mustPlan(t, r, m)
	if p.Route != "all" || len(p.Requests) != 1 {
		t.Fatalf("plan = %+v", p)
	}
	rq := p.Requests[0]
	if rq.Method != "PUT" {
		t.Errorf("Method = %q", rq.Method)
	}
	if want := "http://sink/orders/3/42/k1?ts=2024-05-06T07%3A08%3A09Z"; rq.URL != want { // a query value, escaped
		t.Errorf("URL = %q, want %q", rq.URL, want)
	}
	wantH := http.Header{"X-Id": {"7"}, "X-Raw-Len": {"18"}, "X-Trace": {"t-1"}, "X-Static": {"static"}}
	if !reflect.DeepEqual(rq.Header, wantH) {
		t.Errorf("Header = %v, want %v", rq.Header, wantH)
	}
	wantBody := fmt.Sprintf(`k1|{"order":{"id":7}}|7|t-1|3|42|%d`, m.Timestamp.Unix())
	if string(rq.Body) != wantBody {
		t.Errorf("Body = %q, want %q", rq.Body, wantBody)
	}
}

func TestTemplateMissingKeyIsError(t *testing.T) {
	r := mustCompile(t,
		req1("first", "", "http://sink/{{ .Value.id }}", nil),
		req1("second", "", "http://sink/second", nil))
	_, err := r.Plan(msg("orders", `{"other":1}`))
	bad := badMessage(t, err)
	if bad.Route != "first" || bad.Index != 0 {
		t.Errorf("Route, Index = %q, %d", bad.Route, bad.Index)
	}
	if !strings.Contains(bad.Reason, `requests[0].url:`) || !strings.Contains(bad.Reason, `map has no entry for key "id"`) {
		t.Errorf("Reason = %q", bad.Reason)
	}
	if strings.Contains(err.Error(), "<no value>") || !strings.HasPrefix(err.Error(), `route "first": `) {
		t.Errorf("Error() = %q", err)
	}
	// Missing headers are errors too; index gives "" instead.
	r = mustCompile(t, config.Route{Name: "h", Requests: []config.Request{{URL: "http://sink/", Headers: map[string]string{
		"X-A": `{{ index .Headers "absent" }}`}}}})
	if p := mustPlan(t, r, msg("orders", "x")); p.Requests[0].Header.Get("X-A") != "" {
		t.Errorf("X-A = %q", p.Requests[0].Header.Get("X-A"))
	}
	r = mustCompile(t, req1("h", "", "http://sink/{{ .Headers.absent }}", nil))
	_, err = r.Plan(msg("orders", "x"))
	badMessage(t, err)
}

func TestTemplateFuncs(t *testing.T) {
	m := msg("orders", `{"name":"Ünïcode Name/1","empty":"","n":null,"id":12345678901234567890,"f":1.50,"html":"<a&b>","list":[1,"x",true,null],"obj":{"z":1,"a":2}}`)
	tests := []struct{ tmpl, want string }{
		{`{{ .Value.name | pathescape }}`, "%C3%9Cn%C3%AFcode%20Name%2F1"},
		{`{{ .Value.name | urlquery }}`, "%C3%9Cn%C3%AFcode+Name%2F1"},
		{`{{ .Value.name | lower }}`, "ünïcode name/1"},
		{`{{ .Value.name | upper }}`, "ÜNÏCODE NAME/1"},
		{`{{ .Value.id | upper }}`, "12345678901234567890"},
		{`{{ .Value.empty | default "dflt" }}`, "dflt"},
		{`{{ .Value.n | default "dflt" }}`, "dflt"},
		{`{{ index .Value "absent" | default "dflt" }}`, "dflt"},
		{`{{ .Value.name | default "dflt" }}`, "Ünïcode Name/1"},
		{`{{ .Value.id | default 0 }}`, "12345678901234567890"},
		{`{{ json .Value.html }}`, `"<a&b>"`},
		{`{{ json .Value.id }}`, `12345678901234567890`},
		{`{{ json .Value.f }}`, `1.50`},
		{`{{ json .Value.list }}`, `[1,"x",true,null]`},
		{`{{ json .Value.obj }}`, `{"a":2,"z":1}`},
		{`{{ json .Key }}`, `"k1"`},
		{`{{ json .Value }}`, `{"empty":"","f":1.50,"html":"<a&b>","id":12345678901234567890,"list":[1,"x",true,null],"n":null,"name":"Ünïcode Name/1","obj":{"a":2,"z":1}}`},
	}
	for _, tt := range tests {
		r := mustCompile(t, config.Route{Name: "f", Requests: []config.Request{{URL: "http://sink/", Body: strp(tt.tmpl)}}})
		p, err := r.Plan(m)
		if err != nil {
			t.Errorf("%s: %v", tt.tmpl, err)
			continue
		}
		if got := string(p.Requests[0].Body); got != tt.want {
			t.Errorf("%s = %q, want %q", tt.tmpl, got, tt.want)
		}
	}
}

func TestBigIntegersAndNumberLiteralsPreserved(t *testing.T) {
	tests := []struct{ value, want string }{
		{`{"id":12345678901234567890}`, "12345678901234567890"},
		{`{"id":123456789012345678901234567890}`, "123456789012345678901234567890"},
		{`{"id":9007199254740993}`, "9007199254740993"},
		{`{"id":-9223372036854775808}`, "-9223372036854775808"},
		{`{"id":42}`, "42"},
		{`{"id":-0}`, "-0"},
		{`{"id":1.50}`, "1.50"},
		{`{"id":1e3}`, "1e3"},
		{`{"id":1E-7}`, "1E-7"},
		{`{"id":"abc"}`, "abc"},
		{`{"id":true}`, "true"},
	}
	for _, tt := range tests {
		got, err := renderURL(t, "http://sink/orders/{{ .Value.id }}", msg("orders", tt.value))
		if err != nil {
			t.Errorf("%s: %v", tt.value, err)
			continue
		}
		if want := "http://sink/orders/" + tt.want; got != want {
			t.Errorf("%s: URL = %q, want %q", tt.value, got, want)
		}
	}
}

// TestFastPathMatchesTextTemplate checks that the fast renderer prints what
// text/template prints, and falls back to it for everything else.
func TestFastPathMatchesTextTemplate(t *testing.T) {
	values := []string{
		`{"id":12345678901234567890,"s":"x y","b":false,"n":null,"f":-0.0,"o":{"k":"v","i":255,"j":256},"a":[1,2],"e":""}`,
		`[1,2,3]`, `"just a string"`, `12`, `null`, `{}`,
	}
	tmpls := []string{
		"{{ .Value.id }}", "{{ .Value.s }}", "{{ .Value.b }}", "{{ .Value.n }}", "{{ .Value.f }}",
		"{{ .Value.o.k }}/{{ .Value.o.i }}/{{ .Value.o.j }}", "{{ .Value.a }}", "{{ .Value.o }}", "{{ .Value.e }}",
		"{{ .Value }}", "{{ .Value.missing }}", "{{ .Value.o.k.deeper }}", "{{ .Value.id.x }}",
		"a{{ .Key }}b{{ .Raw }}c{{ .Topic }}d{{ .Partition }}e{{ .Offset }}f", "{{ .Headers.h }}", "{{ .Headers.absent }}",
		"{{.Raw}}", "{{- .Key -}} ", "x{{/* comment */}}y{{ .Key }}",
	}
	for _, v := range values {
		for _, src := range tmpls {
			tx, err := compileText("t", src)
			if err != nil {
				t.Fatalf("%s: %v", src, err)
			}
			if tx.segs == nil {
				t.Errorf("%s: not on the fast path", src)
				continue
			}
			m := msg("orders", v)
			m.Headers = []Header{{Key: "h", Value: []byte("\xff\xfe")}}
			st := getState(m)
			decErr := st.need(needAll, nil)
			want, wantErr := "", error(nil)
			if decErr == nil {
				var b bytes.Buffer
				d := tplData{Key: st.key, Raw: st.raw, Value: st.tval, Headers: st.headers, Topic: m.Topic,
					Partition: int(m.Partition), Offset: int(m.Offset), Timestamp: m.Timestamp}
				wantErr = tx.t.Execute(&b, &d)
				want = b.String()
			}
			got, gotErr := st.renderString(tx)
			putState(st)
			if decErr != nil {
				t.Fatalf("%s: %v", v, decErr)
			}
			if (gotErr != nil) != (wantErr != nil) || (gotErr != nil && gotErr.Error() != wantErr.Error()) {
				t.Errorf("%s on %s: error %v, text/template says %v", src, v, gotErr, wantErr)
			}
			if gotErr == nil && got != want {
				t.Errorf("%s on %s: %q, text/template says %q", src, v, got, want)
			}
		}
	}
}

func TestRawBodyAliasesValue(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Requests: []config.Request{
		{URL: "http://sink/a"},
		{URL: "http://sink/b", Body: strp("{{ .Raw }}")},
		{URL: "http://sink/c", Body: strp("<{{ .Raw }}>")},
		{URL: "http://sink/d", Body: strp("static")},
		{URL: "http://sink/e", Body: strp("")},
	}})
	m := msg("orders", "not json at all")
	p := mustPlan(t, r, m)
	for i, want := range []string{"not json at all", "not json at all", "<not json at all>", "static", ""} {
		if got := string(p.Requests[i].Body); got != want {
			t.Errorf("requests[%d].Body = %q, want %q", i, got, want)
		}
	}
	if &p.Requests[0].Body[0] != &m.Value[0] || &p.Requests[1].Body[0] != &m.Value[0] {
		t.Errorf("passthrough bodies should alias the message value (documented)")
	}
	if &p.Requests[2].Body[0] == &m.Value[0] {
		t.Errorf("rendered body aliases the message value")
	}
	// Static bodies are not shared between plans.
	p2 := mustPlan(t, r, m)
	p2.Requests[3].Body[0] = 'X'
	if p3 := mustPlan(t, r, m); string(p3.Requests[3].Body) != "static" {
		t.Errorf("a caller's write to a static body leaked into the next plan: %q", p3.Requests[3].Body)
	}
}

func TestHeaderMapsAreFreshPerPlan(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Requests: []config.Request{{URL: "http://sink/",
		Headers: map[string]string{"content-type": "application/json", "X-Key": "{{ .Key }}"}}}})
	m := msg("orders", "x")
	p1 := mustPlan(t, r, m)
	h := p1.Requests[0].Header
	if h.Get("Content-Type") != "application/json" || h.Get("X-Key") != "k1" {
		t.Fatalf("Header = %v", h)
	}
	h.Set("Idempotency-Key", "x")
	h["Content-Type"][0] = "mutated"
	h["X-Key"] = append(h["X-Key"], "appended")
	p2 := mustPlan(t, r, m)
	want := http.Header{"Content-Type": {"application/json"}, "X-Key": {"k1"}}
	if !reflect.DeepEqual(p2.Requests[0].Header, want) {
		t.Errorf("second plan Header = %v, want %v", p2.Requests[0].Header, want)
	}
}

func TestMatchThenRender(t *testing.T) {
	r := mustCompile(t,
		config.Route{Name: "bad-when", Topics: []string{"users"}, When: `value.n > 1`, Requests: []config.Request{{URL: "http://sink/a"}}},
		config.Route{Name: "tpl", Requests: []config.Request{{URL: "http://sink/{{ .Value.id }}"}, {URL: "http://sink/b"}}},
	)
	// A `when` that fails does not take the message; a template that fails
	// is Render's error.
	if rt, err := r.Match(msg("users", `{"n":"x"}`)); err != nil || rt.Name() != "tpl" {
		t.Fatalf("Match of a failing when = %v, %v; want the next route, tpl", rt, err)
	}
	rt, err := r.Match(msg("orders", `{"id":7}`))
	if err != nil || rt.Name() != "tpl" {
		t.Fatalf("Match = %v, %v; want route tpl", rt, err)
	}
	buf := make([]Request, 0, 2)
	p, err := rt.Render(msg("orders", `{"id":7}`), buf)
	if err != nil || len(p.Requests) != 2 || p.Requests[0].URL != "http://sink/7" || &p.Requests[0] != &buf[:1][0] {
		t.Fatalf("Render = %+v, %v; want two requests rendered into buf", p, err)
	}
	if _, err := rt.Render(msg("orders", `{"other":1}`), nil); badIndex(t, err) != 0 {
		t.Fatalf("Render with a missing key: %v", err)
	}
	if rt, err := r.Match(&Message{Topic: "users"}); err != nil || rt.Name() != "tpl" {
		t.Fatalf("Match of an empty value on a JSON when = %v, %v; want the next route, tpl", rt, err)
	}
}

// badIndex returns the request index of a *BadMessageError (failing the test
// for any other error).
func badIndex(t *testing.T, err error) int {
	t.Helper()
	var bad *BadMessageError
	if !errors.As(err, &bad) {
		t.Fatalf("error %v (%T), want a *BadMessageError", err, err)
	}
	return bad.Index
}

func TestStaticHeadersAreSharedReadOnly(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Requests: []config.Request{
		{URL: "http://sink/a", Headers: map[string]string{"content-type": "application/json", "X-Static": "1"}},
		{URL: "http://sink/b"},
	}})
	m := msg("orders", "x")
	p1, p2 := mustPlan(t, r, m), mustPlan(t, r, m)
	want := http.Header{"Content-Type": {"application/json"}, "X-Static": {"1"}}
	if !reflect.DeepEqual(p1.Requests[0].Header, want) {
		t.Fatalf("Header = %v, want %v", p1.Requests[0].Header, want)
	}
	if reflect.ValueOf(p1.Requests[0].Header).UnsafePointer() != reflect.ValueOf(p2.Requests[0].Header).UnsafePointer() {
		t.Error("two plans of a route with static headers got different Header maps; want one shared map")
	}
	if p1.Requests[1].Header != nil {
		t.Errorf("a request without headers got Header %v, want nil", p1.Requests[1].Header)
	}
	if &p1.Requests[0] == &p2.Requests[0] {
		t.Error("two plans share their Requests slice")
	}
}

func TestTargets(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Requests: []config.Request{
		{URL: "http://sink/static"},
		{URL: "https://secure.example/{{ .Key }}"},
		{URL: "http://sink:8081/{{ .Key }}?q=1"},
		{URL: "https://dyn.example:8443?k={{ .Key }}"},
		{URL: "http://[::1]/v6"},
	}})
	m := msg("orders", "x")
	p := mustPlan(t, r, m)
	for i, want := range []string{"sink:80", "secure.example:443", "sink:8081", "dyn.example:8443", "[::1]:80"} {
		if got := p.Requests[i].Target; got != want {
			t.Errorf("requests[%d] (%s): Target = %q, want %q", i, p.Requests[i].URL, got, want)
		}
	}
}

func TestEmptyMethodIsPOST(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Requests: []config.Request{{URL: "http://sink/"}}})
	if p := mustPlan(t, r, msg("orders", "")); p.Requests[0].Method != http.MethodPost {
		t.Errorf("Method = %q", p.Requests[0].Method)
	}
}

// ---- expressions ----

func TestWhenEnvironment(t *testing.T) {
	m := msg("users", `{"type":"user.updated","amount":100.5,"count":3,"id":42,"tags":["a","b"],"nested":{"ok":true},"big":12345678901234567890}`)
	m.Headers = []Header{{Key: "kind", Value: []byte("old")}, {Key: "kind", Value: []byte("new")}, {Key: "bin", Value: []byte{0xff, 0xfe}}}
	tests := []struct {
		when string
		want bool
	}{
		{`key == "k1" && has_key`, true},
		{`value.type == "user.updated"`, true},
		{`value.type == "order.created"`, false},
		{`value.amount > 100`, true},
		{`value.amount > 100.5`, false},
		{`value.amount >= 100.5 && value.amount < 101`, true},
		{`value.count % 2 == 1`, true},
		{`value.count + 1 == 4`, true},
		{`value.id == 42`, true},
		{`value.id == 42.0`, true},
		{`value.big > 1e19`, true},
		{`"b" in value.tags && len(value.tags) == 2`, true},
		{`value.nested.ok == true`, true},
		{`value.absent == nil`, true},
		{`value?.absent?.deeper == nil`, true},
		{`raw startsWith "{" && len(raw) > 10`, true},
		{`headers.kind == "new"`, true},
		{`headers["kind"] == "new" && len(headers.bin) == 2`, true},
		{`headers.absent == ""`, true},
		{`topic == "users"`, true},
		{`partition == 3 && offset == 42`, true},
		{`offset > partition`, true},
		{`$env.topic == "users"`, true},
	}
	for _, tt := range tests {
		r := mustCompile(t, req1("r", tt.when, "http://sink/", nil))
		_, err := r.Plan(m)
		switch {
		case tt.want && err != nil:
			t.Errorf("%s: %v, want a match", tt.when, err)
		case !tt.want && !errors.Is(err, ErrNoRoute):
			t.Errorf("%s: %v, want ErrNoRoute", tt.when, err)
		}
	}
}

func TestWhenNullKey(t *testing.T) {
	r := mustCompile(t,
		config.Route{Name: "keyed", When: "has_key", Requests: []config.Request{{URL: "http://sink/keyed/{{ .Key }}"}}},
		config.Route{Name: "unkeyed", When: `!has_key && key == ""`, Requests: []config.Request{{URL: "http://sink/unkeyed/{{ .Key }}"}}})
	m := msg("orders", "v")
	m.Key = nil
	p := mustPlan(t, r, m)
	if p.Route != "unkeyed" || p.Requests[0].URL != "http://sink/unkeyed/" {
		t.Errorf("null key: %+v", p)
	}
	m.Key = []byte{}
	if p := mustPlan(t, r, m); p.Route != "keyed" {
		t.Errorf("empty (not null) key: route %q", p.Route)
	}
}

// TestWhenThatCannotEvaluateDoesNotMatch: a `when` that fails on a message
// does not take it; the next route does, or ErrNoRoute names the failure.
func TestWhenThatCannotEvaluateDoesNotMatch(t *testing.T) {
	r := mustCompile(t,
		req1("typed", `value.type == "x"`, "http://sink/", nil),
		req1("catch-all", "", "http://sink/all", nil))
	for _, v := range []string{`[1,2]`, `"str"`, `12`, `null`} {
		if p := mustPlan(t, r, msg("orders", v)); p.Route != "catch-all" {
			t.Errorf("%s: route %q, want catch-all", v, p.Route)
		}
	}
	alone := mustCompile(t, req1("typed", `value.type == "x"`, "http://sink/", nil))
	for _, v := range []string{`[1,2]`, `"str"`, `12`} {
		_, err := alone.Plan(msg("orders", v))
		if !errors.Is(err, ErrNoRoute) || !strings.Contains(err.Error(), `route "typed": when: line 1, column `) ||
			!strings.Contains(err.Error(), "the value is a JSON ") {
			t.Errorf("%s: %v, want ErrNoRoute naming the failed when and what the value is", v, err)
		}
	}
	// The guard the package doc used to recommend still works.
	g := mustCompile(t, req1("guarded", `type(value) == "map" && value.type == "x"`, "http://sink/", nil))
	for _, v := range []string{`[1,2]`, `"str"`, `12`, `null`, `{"type":"y"}`} {
		if _, err := g.Plan(msg("orders", v)); err != ErrNoRoute {
			t.Errorf("guarded, %s: %v", v, err)
		}
	}
	if _, err := g.Plan(msg("orders", `{"type":"x"}`)); err != nil {
		t.Errorf("guarded: %v", err)
	}
	// A string compared with a number.
	r = mustCompile(t, req1("n", `value.n > 1`, "http://sink/", nil))
	if _, err := r.Plan(msg("orders", `{"n":"12"}`)); !errors.Is(err, ErrNoRoute) || !strings.Contains(err.Error(), "string > int") {
		t.Errorf("Plan = %v", err)
	}
}

func TestCompileErrors(t *testing.T) {
	lines := compileErrors(t,
		config.Route{Name: "ok", When: `value.type == "a"`, Requests: []config.Request{{URL: "http://sink/{{ .Value.id }}"}}},
		config.Route{Name: "unknown", Topics: []string{"orders", "nope"}, When: "valu.type == 1"},
		config.Route{Name: "order-created", When: "true &&\n  valu.type"},
		config.Route{Name: "nonbool", When: `key + "x"`},
		config.Route{Name: "nonbool2", When: `partition`},
		config.Route{Name: "syntax", When: `value.type ==`},
		config.Route{Name: "mismatch", When: `key == 1`},
		config.Route{Name: "tmpl", Requests: []config.Request{
			{URL: "http://sink/"},
			{Method: "GE T", URL: "http://sink/{{ .Vaule.id }}", Body: strp("{{ .Value.id "),
				Headers: map[string]string{"X-A": "{{ nofunc .Key }}", "Bad Name": "x", "X-B": "a\r\nb", "x-a": "dup"}},
			{URL: "ftp://sink/"},
			{URL: ""},
			{URL: "http://sink/{{ .Key.x }}", Method: "{{ .Method }}"},
		}},
		config.Route{Name: "", When: "true"},
		config.Route{Name: "ok"},
	)
	want := []string{
		`routes[1] ("unknown").topics: topic "nope" is not consumed (kafka.topics = ["orders" "users"])`,
		`routes[1] ("unknown").when: line 1, column 1: unknown name valu`,
		`routes[2] ("order-created").when: line 2, column 3: unknown name valu`,
		`routes[3] ("nonbool").when: expected bool, but got string`,
		`routes[4] ("nonbool2").when: expected bool, but got int`,
		`routes[5] ("syntax").when: line 1, column `,
		`routes[6] ("mismatch").when: line 1, column 5: invalid operation: == (mismatched types string and int)`,
		`routes[7] ("tmpl").requests[1].method: "GE T" is not a valid HTTP method`,
		`routes[7] ("tmpl").requests[1].url: template: url:1:21: unknown field .Vaule`,
		`routes[7] ("tmpl").requests[1].headers["Bad Name"]: "Bad Name" is not a valid header name`,
		`routes[7] ("tmpl").requests[1].headers["X-A"]: template: headers["X-A"]:1: function "nofunc" not defined`,
		`routes[7] ("tmpl").requests[1].headers["X-B"]: header injection: value contains CR or LF`,
		`routes[7] ("tmpl").requests[1].headers["x-a"]: header "x-a" is also set as "X-A"`,
		`routes[7] ("tmpl").requests[1].body: template: body:1: unclosed action`,
		`routes[7] ("tmpl").requests[2].url: invalid request: URL "ftp://sink/" is not an absolute http or https URL`,
		`routes[7] ("tmpl").requests[3].url: a request needs a url`,
		`routes[7] ("tmpl").requests[4].method: template: method:1:3: unknown field .Method`,
		`routes[7] ("tmpl").requests[4].url: template: url:1:19: .Key has no field or method x`,
		`routes[8] ("").name: a route needs a name`,
		`routes[9] ("ok").name: the name is already used by routes[0]`,
	}
	for _, w := range want {
		found := false
		for _, l := range lines {
			if strings.HasPrefix(l, w) {
				found = true
			}
		}
		if !found {
			t.Errorf("missing error %q", w)
		}
	}
	if len(lines) != len(want) {
		t.Errorf("got %d errors, want %d:\n%s", len(lines), len(want), strings.Join(lines, "\n"))
	}
	_, err := Compile([]config.Route{{Name: "x", When: "valu"}}, nil)
	var ce *CompileError
	if !errors.As(err, &ce) || ce.Index != 0 || ce.Route != "x" || ce.Field != "when" {
		t.Errorf("errors.As CompileError: %#v", ce)
	}
}

// ---- routing ----

func TestFirstMatchWinsInOrder(t *testing.T) {
	r := mustCompile(t,
		req1("big", `value.amount > 1000`, "http://sink/big", nil),
		req1("created", `value.type == "order.created"`, "http://sink/created", nil),
		req1("any", "", "http://sink/any", nil),
		req1("never", "", "http://sink/never", nil))
	tests := []struct{ value, route string }{
		{`{"type":"order.created","amount":5000}`, "big"},
		{`{"type":"order.created","amount":5}`, "created"},
		{`{"type":"order.deleted","amount":5}`, "any"},
	}
	for _, tt := range tests {
		if p := mustPlan(t, r, msg("orders", tt.value)); p.Route != tt.route {
			t.Errorf("%s: route %q, want %q", tt.value, p.Route, tt.route)
		}
	}
}

func TestTopicFiltering(t *testing.T) {
	r := mustCompile(t,
		config.Route{Name: "orders", Topics: []string{"orders"}, Requests: []config.Request{{URL: "http://sink/o"}}},
		config.Route{Name: "users-x", Topics: []string{"users"}, When: `key == "x"`, Requests: []config.Request{{URL: "http://sink/u"}}})
	if p := mustPlan(t, r, msg("orders", "")); p.Route != "orders" {
		t.Errorf("orders: %q", p.Route)
	}
	if _, err := r.Plan(msg("users", "")); !errors.Is(err, ErrNoRoute) {
		t.Errorf("users with key k1: %v, want ErrNoRoute", err)
	}
	m := msg("users", "")
	m.Key = []byte("x")
	if p := mustPlan(t, r, m); p.Route != "users-x" {
		t.Errorf("users with key x: %q", p.Route)
	}
	if _, err := r.Plan(msg("other", "")); err != ErrNoRoute {
		t.Errorf("other topic: %v, want ErrNoRoute itself", err)
	}
}

func TestRouteWithoutRequests(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "drop", When: `key == "k1"`})
	p := mustPlan(t, r, msg("orders", "x"))
	if p.Route != "drop" || len(p.Requests) != 0 {
		t.Errorf("plan = %+v", p)
	}
}

// ---- bad messages ----

func TestNonJSONOnJSONRoute(t *testing.T) {
	// A route whose `when` reads the value does not take a value that is
	// not JSON: the next route does.
	r := mustCompile(t,
		req1("json-when", `value.type == "a"`, "http://sink/", nil),
		req1("catch-all", "", "http://sink/all", nil))
	for _, v := range []string{"not json", "", `{"type":"a"`, `{"type":"a"}x`, "\xff", `{"type":'a'}`, "{\"type\":\"a\x01\"}"} {
		if p := mustPlan(t, r, msg("orders", v)); p.Route != "catch-all" {
			t.Errorf("%q: route %q, want catch-all", v, p.Route)
		}
	}
	r = mustCompile(t, req1("json-when", `value.type == "a"`, "http://sink/", nil))
	_, err := r.Plan(msg("orders", ""))
	if !errors.Is(err, ErrNoRoute) || !errors.Is(err, ErrNotJSON) || !strings.Contains(err.Error(), "the value is empty") {
		t.Errorf("empty value: %v", err)
	}
	_, err = r.Plan(msg("orders", "nope"))
	if want := `no route matched the message (route "json-when": when needs the value as JSON: invalid character 'o' in literal null (expecting 'u') (offset 1))`; err.Error() != want {
		t.Errorf("Error() = %q\nwant      %q", err, want)
	}

	// A route whose templates need JSON.
	r = mustCompile(t, config.Route{Name: "tmpl", Requests: []config.Request{
		{URL: "http://sink/first"},
		{URL: "http://sink/{{ .Key }}", Body: strp(`{"id":{{ .Value.id }}}`)},
	}})
	_, err = r.Plan(msg("orders", "{oops"))
	bad := badMessage(t, err)
	if bad.Index != 1 || !errors.Is(err, ErrNotJSON) || !strings.HasPrefix(bad.Reason, "requests[1].body needs the value as JSON: ") {
		t.Errorf("template route: %+v", bad)
	}
}

func TestNonJSONOnPassthroughRoute(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "pass", When: `key == "k1" && len(raw) >= 0 && headers.x == "" && topic == "orders"`,
		Requests: []config.Request{{URL: "http://sink/{{ .Topic }}/{{ .Key }}", Headers: map[string]string{"X-Len": "{{ len .Raw }}"}}}})
	for _, v := range []string{"not json", "", "\x00\xff\xfe", `{"truncated":`} {
		p := mustPlan(t, r, msg("orders", v))
		if string(p.Requests[0].Body) != v || p.Requests[0].URL != "http://sink/orders/k1" {
			t.Errorf("%q: %+v", v, p.Requests[0])
		}
	}
}

func TestNonUTF8Headers(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", When: "headers.bin == raw", Requests: []config.Request{{
		URL:     "http://sink/",
		Headers: map[string]string{"X-Bin": "{{ .Headers.bin }}"},
		Body:    strp("{{ .Headers.bin }}|{{ index .Headers \"bin\" }}"),
	}}})
	m := msg("orders", "\xff\xfe\x80")
	m.Headers = []Header{{Key: "bin", Value: []byte("\xff\xfe\x80")}}
	p := mustPlan(t, r, m)
	if got := p.Requests[0].Header.Get("X-Bin"); got != "\xff\xfe\x80" {
		t.Errorf("X-Bin = %q", got)
	}
	if got := string(p.Requests[0].Body); got != "\xff\xfe\x80|\xff\xfe\x80" {
		t.Errorf("Body = %q", got)
	}
}

func TestHeaderInjectionRejected(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Requests: []config.Request{
		{URL: "http://sink/ok"},
		{URL: "http://sink/", Headers: map[string]string{"X-Note": "{{ .Value.note }}", "X-Trace": "{{ .Headers.trace }}"}},
	}})
	for _, note := range []string{`a\r\nX-Evil: 1`, `a\nb`, `a\rb`} {
		_, err := r.Plan(msg("orders", `{"note":"`+note+`"}`))
		bad := badMessage(t, err)
		if bad.Index != 1 || !errors.Is(err, ErrHeaderInjection) || !strings.HasPrefix(bad.Reason, `requests[1].headers["X-Note"]: header injection`) {
			t.Errorf("%s: %+v", note, bad)
		}
	}
	m := msg("orders", `{"note":"fine\ttab"}`)
	m.Headers = []Header{{Key: "trace", Value: []byte("x\r\nSet-Cookie: a=b")}}
	_, err := r.Plan(m)
	if !errors.Is(err, ErrHeaderInjection) {
		t.Errorf("Kafka header with CRLF: %v", err)
	}
	m.Headers = []Header{{Key: "trace", Value: []byte("nul\x00")}}
	_, err = r.Plan(m)
	if !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("Kafka header with NUL: %v", err)
	}
}

func TestRenderedURLAndMethodChecked(t *testing.T) {
	r := mustCompile(t, req1("r", "", "http://sink/{{ raw .Value.u }}", nil))
	for _, u := range []string{`a\nb`, `a%zz`, `a\u0000`} {
		_, err := r.Plan(msg("orders", `{"u":"`+u+`"}`))
		if !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%s: %v, want ErrInvalidRequest", u, err)
		}
	}
	if p := mustPlan(t, r, msg("orders", `{"u":"x?y=1"}`)); p.Requests[0].URL != "http://sink/x?y=1" {
		t.Errorf("URL = %q", p.Requests[0].URL)
	}
	r = mustCompile(t, config.Route{Name: "m", Requests: []config.Request{{Method: "{{ .Value.m }}", URL: "http://sink/"}}})
	if _, err := r.Plan(msg("orders", `{"m":"GET /x HTTP/1.1\r\n"}`)); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("bad method: %v", err)
	}
	if p := mustPlan(t, r, msg("orders", `{"m":"PATCH"}`)); p.Requests[0].Method != "PATCH" {
		t.Errorf("Method = %q", p.Requests[0].Method)
	}
}

// ---- PlanRoute ----

func TestPlanRoute(t *testing.T) {
	r := mustCompile(t,
		config.Route{Name: "orders", Topics: []string{"orders"}, When: `value.type == "order.created"`,
			Requests: []config.Request{{URL: "http://sink/orders/{{ .Value.id }}"}}},
		req1("other", "false", "http://sink/other/{{ .Key }}", nil))
	// Neither topic nor when holds, the route is rendered anyway.
	p, err := r.PlanRoute("orders", msg("users", `{"type":"user.created","id":5}`))
	if err != nil || p.Route != "orders" || p.Requests[0].URL != "http://sink/orders/5" {
		t.Errorf("PlanRoute(orders) = %+v, %v", p, err)
	}
	p, err = r.PlanRoute("other", msg("orders", "x"))
	if err != nil || p.Requests[0].URL != "http://sink/other/k1" {
		t.Errorf("PlanRoute(other) = %+v, %v", p, err)
	}
	if _, err := r.PlanRoute("nope", msg("orders", "x")); !errors.Is(err, ErrUnknownRoute) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("PlanRoute(nope): %v", err)
	}
	if _, err := r.PlanRoute("orders", msg("orders", "not json")); !errors.Is(err, ErrNotJSON) {
		t.Errorf("PlanRoute on a bad message: %v", err)
	}
}

// ---- concurrency and allocations ----

func TestPlanConcurrent(t *testing.T) {
	r := benchRouter(t)
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 300; i++ {
				id := g*1000 + i
				m := msg("orders", fmt.Sprintf(`{"type":"order.created","id":%d,"amount":%d}`, id, i))
				p, err := r.Plan(m)
				if err != nil {
					t.Error(err)
					return
				}
				if want := fmt.Sprintf("http://127.0.0.1:8081/orders/%d", id); p.Requests[0].URL != want {
					t.Errorf("URL = %q, want %q", p.Requests[0].URL, want)
					return
				}
				if _, err := r.Plan(msg("orders", "oops")); !errors.Is(err, ErrNotJSON) {
					t.Errorf("oops: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

func TestAllocations(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	r := benchRouter(t)
	typical, pass := benchMessage(), benchPassthroughMessage()
	for _, tt := range []struct {
		name string
		m    *Message
		max  float64
	}{{"typical", typical, 10}, {"passthrough", pass, 2}} {
		n := testing.AllocsPerRun(200, func() {
			if _, err := r.Plan(tt.m); err != nil {
				t.Fatal(err)
			}
		})
		t.Logf("%s: %.0f allocations per Plan", tt.name, n)
		if n > tt.max {
			t.Errorf("%s: %.0f allocations per Plan, want at most %.0f", tt.name, n, tt.max)
		}
	}
}

// ---- fuzzing ----

// FuzzPlan feeds arbitrary keys, values and headers to a few routes: Plan
// must not panic and must fail only with ErrNoRoute or a *BadMessageError.
func FuzzPlan(f *testing.F) {
	r := mustCompile(f, fuzzRoutes...)
	// The same routes decoding every value whole: partial decoding must
	// change nothing.
	full := mustCompile(f, fuzzRoutes...)
	forceFullDecode(full)
	f.Add([]byte("k"), []byte(`{"type":"order.created","amount":500,"id":12345678901234567890}`), []byte("trace"), []byte("t"))
	f.Add([]byte("j1"), []byte(`{"a":{"b":"x/y"},"m":"PATCH"}`), []byte("route"), []byte("h"))
	f.Add([]byte("j2"), []byte(`[1,2,{"a":null}]`), []byte("v"), []byte("a\r\nb"))
	f.Add([]byte(nil), []byte(""), []byte("route"), []byte("h"))
	f.Add([]byte("k"), []byte(`{"type":"order.created","amount":"x"}`), []byte("\xff"), []byte("\xfe"))
	f.Add([]byte("jj"), []byte("\"\\ud800\\u0041\""), []byte("route"), []byte("\x00"))
	f.Add([]byte("k"), []byte(`{"a":{"b":1.50,"c":[1]},"m":null,"type":"x","amount":1e3,"id":-0}`), []byte("route"), []byte("x"))
	f.Add([]byte("k"), []byte(`{"a":{"b":0,"c":"x"},"c":{"d":"x","e":[{}]}}`), []byte("route"), []byte("x"))
	f.Add([]byte("x"), []byte(`{"type":"order.created","amount":200,"id":{"nested":true},"junk":[1,{"z":"\u00e9"}]}`), []byte("trace"), []byte("t"))
	f.Add([]byte("x"), []byte(`{"type":"order.created","amount":200,"id":1,"junk":[1,}`), []byte("trace"), []byte("t"))
	f.Fuzz(func(t *testing.T, key, value, hkey, hval []byte) {
		for _, topic := range []string{"orders", "users"} {
			m := &Message{Topic: topic, Partition: 1, Offset: 7, Key: key, Value: value,
				Headers: []Header{{Key: string(hkey), Value: hval}, {Key: "route", Value: hval}, {Key: "v", Value: hkey}}}
			p, err := r.Plan(m)
			fp, ferr := full.Plan(m)
			if fmt.Sprint(err) != fmt.Sprint(ferr) || !reflect.DeepEqual(p, fp) {
				t.Fatalf("partial decoding: %+v, %v\nfull decoding:    %+v, %v", p, err, fp, ferr)
			}
			// Match then Render is Plan in two steps.
			lp, lerr := Plan{}, error(nil)
			if rt, merr := r.Match(m); merr != nil {
				lerr = merr
			} else {
				lp, lerr = rt.Render(m, make([]Request, 0, 1))
			}
			if fmt.Sprint(err) != fmt.Sprint(lerr) || !reflect.DeepEqual(p, lp) {
				t.Fatalf("Plan: %+v, %v\nMatch+Render: %+v, %v", p, err, lp, lerr)
			}
			var bad *BadMessageError
			switch {
			case err == nil:
				for _, rq := range p.Requests {
					// Every route sends to http://sink: no value moves a request elsewhere.
					if u, err := url.Parse(rq.URL); err != nil || u.Host != "sink" || rq.Target != "sink:80" || strings.Contains("/"+u.EscapedPath()+"/", "/../") {
						t.Fatalf("request %q (target %s) leaves http://sink/: %v", rq.URL, rq.Target, err)
					}
					for _, vs := range rq.Header {
						for _, v := range vs {
							if strings.ContainsAny(v, "\r\n") {
								t.Fatalf("header value with CR/LF: %q", v)
							}
						}
					}
				}
			case errors.Is(err, ErrNoRoute):
			case errors.As(err, &bad):
				if bad.Route == "" || bad.Reason == "" || bad.Err == nil {
					t.Fatalf("incomplete BadMessageError: %#v", bad)
				}
			default:
				t.Fatalf("unexpected error %T: %v", err, err)
			}
		}
	})
}

// fuzzRoutes are the routes of FuzzPlan. The one reading the whole value
// comes first so that the others decode only what they read.
var fuzzRoutes = []config.Route{
	{Name: "json", When: `has_key && key startsWith "j"`,
		Requests: []config.Request{{URL: "http://sink/{{ .Value.a.b | pathescape }}", Body: strp(`{{ json .Value }}`)},
			{Method: "{{ .Value.m | default \"PUT\" }}", URL: "http://sink/x?q={{ urlquery .Raw }}"}}},
	{Name: "created", Topics: []string{"orders"}, When: `value.type == "order.created" && value.amount > 100`,
		Requests: []config.Request{{Method: "POST", URL: "http://sink/orders/{{ .Value.id }}", Body: strp("{{ .Raw }}"),
			Headers: map[string]string{"Content-Type": "application/json", "X-Key": "{{ .Key }}", "X-Trace": `{{ index .Headers "trace" }}`}}}},
	{Name: "nested", When: `value?.a?.b == 0 || value?.c?.d == "x" || len(value?.c?.e ?? []) > 0`,
		Requests: []config.Request{{URL: "http://sink/{{ .Value.a.c }}", Body: strp(`{{ json .Value.c }}{{ with .Value.a }}{{ .b }}{{ end }}`)}}},
	{Name: "hdr", When: `headers.route == "h"`,
		Requests: []config.Request{{URL: "http://sink/h", Headers: map[string]string{"X-H": "{{ .Headers.v }}"}}}},
	{Name: "rest", When: `!has_key || len(raw) % 2 == 0`,
		Requests: []config.Request{{URL: "http://sink/rest/{{ .Key | pathescape }}"}}},
}

// forceFullDecode makes r decode values whole, as if no path analysis
// existed.
func forceFullDecode(r *Router) {
	for i := range r.routes {
		if r.routes[i].spec.paths != nil {
			r.routes[i].spec.paths = fullTrie
		}
	}
}

// TestValuePaths checks what the analysis decides to decode, and that
// decoding only that gives the same results as decoding everything.
func TestValuePaths(t *testing.T) {
	tests := []struct {
		when, tmpl string
		want       string // the trie, as trieString prints it
	}{
		{`value.type == "a"`, "", "{type}"},
		{`value["type"] == "a"`, "", "{type}"},
		{`value.customer.id == 1 && value.type == "x"`, "", "{customer{id} type}"},
		{`value?.a?.b == nil`, "", "{a{b}}"},
		{`value.a.b == 1 && value.a == nil`, "", "{a}"},
		{`value.items[0].price > 1`, "", "{items}"},
		{`all(value.items ?? [], .price > 1)`, "", "{items}"},
		{`value.n in [1, 2, 3]`, "", "{n}"},
		{`len(value) > 0`, "", "full"},
		{`value[key] == 1`, "", "full"},
		{`"x" in value`, "", "full"},
		{`let v = value; v.a == 1`, "", "full"},
		{`$env.value.a == 1`, "", "full"},
		{`$env["value"] != nil`, "", "full"},
		{`value.a == 1 && len(value) > 0`, "", "full"},
		{`type(value) == "map" && value.type == "a"`, "", "{type}"},
		{`type(value) == "array"`, "", "{}"},
		{`type(value.a) == "map" && value.a.b == 1`, "", "{a{b}}"},
		{`type(value.a) == "map"`, "", "{a{}}"},
		{`type(value.a.b) == "map" && value.a == nil`, "", "{a}"},
		{`type(value.items[0]) == "map"`, "", "{items}"},
		{"", "{{ .Value.id }}", "{id}"},
		{"", "{{ .Value.a.b }}/{{ .Value.c }}", "{a{b} c}"},
		{"", "{{ $.Value.a }}", "{a}"},
		{"", "{{ json .Value }}", "full"},
		{"", `{{ index .Value "id" }}`, "full"},
		{"", "{{ with .Value.a }}{{ .b }}{{ .Value }}{{ end }}", "{a}"},
		{"", "{{ range .Value.items }}{{ .x }}{{ end }}", "{items}"},
		{"", "{{ . }}", "full"},
		{"", "{{ $ }}", "full"},
		{"", "{{ with .Key }}{{ . }}{{ end }}", "none"},
		{"", `{{ define "x" }}{{ .id }}{{ end }}{{ template "x" .Value }}`, "full"},
		{"", `{{ define "x" }}{{ .Value.id }}{{ end }}{{ template "x" . }}`, "full"},
		{`value.type == "a"`, "{{ .Value.id }}", "{id type}"},
	}
	docs := []string{
		`{"type":"a","id":1,"customer":{"id":1,"x":2},"a":{"b":1,"c":2},"items":[{"price":2}],"n":2,"x":1}`,
		`{"type":"x","customer":{"id":1},"a":null,"items":[],"n":"2","id":"s"}`,
		`{"a":{"b":null},"items":[{"price":0}],"type":["a"],"customer":"c","id":12345678901234567890,"Value":1}`,
		`[1,2]`, `"str"`, `null`, `{}`,
	}
	for _, tt := range tests {
		body := "-"
		if tt.tmpl != "" {
			body = tt.tmpl
		}
		route := config.Route{Name: "r", When: tt.when, Requests: []config.Request{{URL: "http://sink/", Body: &body}}}
		r := mustCompile(t, route)
		if got := trieString(r.routes[0].spec.paths); got != tt.want {
			t.Errorf("when %q, template %q: paths %s, want %s", tt.when, tt.tmpl, got, tt.want)
		}
		full := mustCompile(t, route)
		forceFullDecode(full)
		for _, doc := range docs {
			m := msg("orders", doc)
			p, err := r.Plan(m)
			fp, ferr := full.Plan(m)
			if fmt.Sprint(err) != fmt.Sprint(ferr) || !reflect.DeepEqual(p, fp) {
				t.Errorf("when %q, template %q on %s:\npartial: %+v, %v\nfull:    %+v, %v", tt.when, tt.tmpl, doc, p, err, fp, ferr)
			}
		}
	}
}

// trieString prints a trie as {a{b} c}, "full" or "none".
func trieString(p *pathTrie) string {
	switch {
	case p == nil:
		return "none"
	case p.full:
		return "full"
	}
	keys := make([]string, 0, len(p.kids))
	for k := range p.kids {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	b.WriteString("{")
	for i, k := range keys {
		if i > 0 {
			b.WriteString(" ")
		}
		b.WriteString(k)
		if c := p.kids[k]; !c.full {
			b.WriteString(trieString(c))
		}
	}
	b.WriteString("}")
	return b.String()
}

func TestSuffixPathsServeLaterRoutes(t *testing.T) {
	r := mustCompile(t,
		req1("a", `value.type == "a"`, "http://sink/a/{{ .Value.id }}", nil),
		req1("b", `value.kind == "b"`, "http://sink/b/{{ .Value.ref.x }}", nil),
		req1("c", `key == "k1"`, "http://sink/c", nil))
	for i, want := range []string{"{id kind ref{x} type}", "{kind ref{x}}", "none"} {
		if got := trieString(r.routes[i].spec.paths); got != want {
			t.Errorf("routes[%d] decodes %s, want %s", i, got, want)
		}
	}
	if r.routes[0].spec.mode != modeTemplate|modeExpr || r.routes[1].spec.mode != modeTemplate|modeExpr {
		t.Errorf("modes %v %v", r.routes[0].spec.mode, r.routes[1].spec.mode)
	}
	p := mustPlan(t, r, msg("orders", `{"type":"x","kind":"b","ref":{"x":"y"},"id":1}`))
	if p.Route != "b" || p.Requests[0].URL != "http://sink/b/y" {
		t.Errorf("plan %+v", p)
	}
}

func TestFixedOriginURLChecks(t *testing.T) {
	r := mustCompile(t, req1("r", "", "http://sink:8081/orders/{{ raw .Value.p }}", nil))
	if got := r.routes[0].reqs[0].target; got != "sink:8081" {
		t.Fatalf("target %q, want sink:8081", got)
	}
	for _, tt := range []struct {
		p  string
		ok bool
	}{{"a b", true}, {"a%20b", true}, {"a?q=100%", true}, {"a%zz", false}, {"a%2", false}, {`a\nb`, false}, {`a\u007f`, false}, {"#x%zz", true}} {
		_, err := r.Plan(msg("orders", `{"p":"`+tt.p+`"}`))
		if (err == nil) != tt.ok || (err != nil && !errors.Is(err, ErrInvalidRequest)) {
			t.Errorf("%q: %v", tt.p, err)
		}
	}
	if _, err := Compile([]config.Route{req1("r", "", "ftp://sink/{{ .Key }}", nil)}, nil); err == nil {
		t.Error("ftp URL template compiled")
	}
}

// TestURLOriginIsConfiguration: a URL template whose scheme, host or port a
// message could write is a compile error that names the url.
func TestURLOriginIsConfiguration(t *testing.T) {
	for _, u := range []string{
		"http://sink:8081{{ .Value.x }}", // x = "@evil.example/" would choose the host
		"http://{{ .Value.h }}/x",
		"{{ .Value.u }}",
		"{{ .Headers.origin }}/x",
		"http://sink{{ .Value.port }}/",
		"http{{ .Value.s }}://sink/",
		"http://sink:{{ .Value.port }}/x",
		"http://user:{{ .Key }}@sink/x",
		"http://sink {{- .Key }}/x",
		`{{ "http://sink/" }}{{ .Key }}`,
	} {
		_, err := Compile([]config.Route{req1("r", "", u, nil)}, nil)
		var ce *CompileError
		if !errors.As(err, &ce) || ce.Field != "requests[0].url" {
			t.Errorf("%s: %v, want a compile error for requests[0].url", u, err)
		}
	}
	// Not a template, and templates with an origin fixed by their text.
	for _, u := range []string{"http://sink:8081/x", "http://sink:8081/{{ .Key }}", "http://sink?k={{ .Key }}", "https://sink#{{ .Key }}"} {
		if _, err := Compile([]config.Route{req1("r", "", u, nil)}, nil); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
	// A templated Host header would let a message choose the virtual host.
	rt := req1("r", "", "http://sink/x", nil)
	rt.Requests[0].Headers = map[string]string{"host": "{{ .Key }}"}
	if _, err := Compile([]config.Route{rt}, nil); err == nil || !strings.Contains(err.Error(), "Host header") {
		t.Errorf("templated Host header: %v", err)
	}
}

// TestURLEscaping: whatever a message holds, its request goes to the
// configured host, and each value stays in the path segment or the query
// value it was written into.
func TestURLEscaping(t *testing.T) {
	tests := []struct {
		url, value, want string // value: the JSON of .Value.x
	}{
		{"http://sink:8081/orders/{{ .Value.x }}", `"../admin?x="`, "http://sink:8081/orders/..%2Fadmin%3Fx="},
		{"http://sink:8081/orders/{{ .Value.x }}", `"@evil.example/"`, "http://sink:8081/orders/@evil.example%2F"},
		{"http://sink:8081/orders/{{ .Value.x }}/items", `"a/b#c%d"`, "http://sink:8081/orders/a%2Fb%23c%25d/items"},
		{"http://sink:8081/orders/{{ .Value.x }}", `"a\r\nHost: evil"`, "http://sink:8081/orders/a%0D%0AHost:%20evil"},
		{"http://sink:8081/o/{{ .Value.x }}", `"x\\y"`, "http://sink:8081/o/x%5Cy"},
		{"http://sink:8081/o/{{ .Value.x }}", `12345678901234567890`, "http://sink:8081/o/12345678901234567890"},
		{"http://sink:8081/o?q={{ .Value.x }}&r=1", `"a&admin=true#f"`, "http://sink:8081/o?q=a%26admin%3Dtrue%23f&r=1"},
		{"http://sink:8081/o?q={{ .Value.x }}", `"a b+c"`, "http://sink:8081/o?q=a+b%2Bc"},
		{"http://sink:8081/o?q={{ .Value.x }}", `1e+5`, "http://sink:8081/o?q=1e%2B5"},
		{"http://sink:8081/o#{{ .Value.x }}", `"a#b"`, "http://sink:8081/o#a%23b"},
		// Escaped by the template already: not escaped twice.
		{"http://sink:8081/o/{{ .Value.x | pathescape }}", `"a b/c"`, "http://sink:8081/o/a%20b%2Fc"},
		{"http://sink:8081/o/{{ urlquery .Value.x }}", `"a b/c"`, "http://sink:8081/o/a+b%2Fc"},
		{"http://sink:8081/o?q={{ urlquery .Value.x }}", `"a&b"`, "http://sink:8081/o?q=a%26b"},
		// pathescape keeps "&" and "=", which would add a query parameter.
		{"http://sink:8081/o?q={{ pathescape .Value.x }}", `"a&admin=1"`, "http://sink:8081/o?q=a%26admin%3D1"},
		// raw: as it is, for what the operator trusts.
		{"http://sink:8081/{{ raw .Value.x }}", `"a/b?c=d"`, "http://sink:8081/a/b?c=d"},
		{"http://sink:8081/{{ .Value.x | raw }}", `"a/b"`, "http://sink:8081/a/b"},
		// Branches and loops, and actions the fast path does not render.
		{"http://sink:8081/{{ if .Value.x }}{{ .Value.x }}{{ else }}none{{ end }}", `"a/b"`, "http://sink:8081/a%2Fb"},
		{"http://sink:8081/{{ range .Value.x }}{{ . }}/{{ end }}", `["a?","b/"]`, "http://sink:8081/a%3F/b%2F/"},
		{"http://sink:8081/{{ .Value.x | lower }}", `"A/B"`, "http://sink:8081/a%2Fb"},
		{"http://sink:8081/{{ with $v := .Value.x }}{{ $v }}{{ end }}", `"a?b"`, "http://sink:8081/a%3Fb"},
		{"http://sink:8081/{{ index .Value \"x\" }}", `null`, "http://sink:8081/"},
		{"http://sink:8081/{{ .Value.x }}", `{"k":"a/b"}`, "http://sink:8081/map%5Bk:a%2Fb%5D"},
	}
	for _, tt := range tests {
		r := mustCompile(t, req1("r", "", tt.url, nil))
		for _, full := range []bool{false, true} {
			if full {
				forceFullDecode(r)
				r.routes[0].reqs[0].url.segs = nil // text/template only
			}
			p, err := r.Plan(msg("orders", `{"x":`+tt.value+`}`))
			if err != nil {
				t.Errorf("%s with x = %s: %v", tt.url, tt.value, err)
				continue
			}
			rq := p.Requests[0]
			if rq.URL != tt.want {
				t.Errorf("%s with x = %s (fast path %v): %q, want %q", tt.url, tt.value, !full, rq.URL, tt.want)
			}
			u, err := url.Parse(rq.URL)
			if err != nil || u.Host != "sink:8081" || rq.Target != "sink:8081" {
				t.Errorf("%s with x = %s: sent to %v (target %s), %v", tt.url, tt.value, u, rq.Target, err)
			}
		}
	}
	// The key and the headers are escaped too, on the fast path as well.
	r := mustCompile(t, req1("r", "", "http://sink:8081/k/{{ .Key }}/{{ .Headers.h }}?t={{ .Topic }}", nil))
	m := msg("orders", "{}")
	m.Key, m.Headers = []byte("a/../b"), []Header{{Key: "h", Value: []byte("x?y")}}
	if got := mustPlan(t, r, m).Requests[0].URL; got != "http://sink:8081/k/a%2F..%2Fb/x%3Fy?t=orders" {
		t.Errorf("key and header: %q", got)
	}
}

// TestURLDotSegments: a value that is a whole "." or ".." segment would be
// resolved by the server: refused, raw or not, however spelled.
func TestURLDotSegments(t *testing.T) {
	r := mustCompile(t, config.Route{Name: "r", Topics: []string{"orders"}, Requests: []config.Request{{URL: "http://sink/orders/{{ .Value.x }}/items"}}},
		config.Route{Name: "raw", Topics: []string{"users"}, Requests: []config.Request{{URL: "http://sink/o/{{ raw .Value.x }}?q=1"}}})
	for _, x := range []string{"..", "."} {
		_, err := r.Plan(msg("orders", `{"x":"`+x+`"}`))
		if !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("orders with x = %q: %v, want ErrInvalidRequest", x, err)
		}
	}
	for _, x := range []string{"a/../../admin", "..", "./x", "a/.", "%2e%2e/x"} {
		_, err := r.Plan(msg("users", `{"x":"`+x+`"}`))
		if !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("raw with x = %q: %v, want ErrInvalidRequest", x, err)
		}
	}
	// Escaped, "%2e%2E" is no dot segment: the server sees %252e%252E.
	for _, x := range []string{"...", "a..", "..a", ".a", "%2e%2E", ".%2E"} {
		if _, err := r.Plan(msg("orders", `{"x":"`+x+`"}`)); err != nil {
			t.Errorf("orders with x = %q: %v", x, err)
		}
	}
	// Dots in the query are no segments.
	q := mustCompile(t, req1("r", "", "http://sink/o?a={{ raw .Value.x }}", nil))
	if _, err := q.Plan(msg("orders", `{"x":"/../.."}`)); err != nil {
		t.Errorf("dots in the query: %v", err)
	}
}

// TestURLTemplateShapes: what cannot be escaped is a compile error.
func TestURLTemplateShapes(t *testing.T) {
	for _, u := range []string{
		`http://sink/{{ define "x" }}{{ .Key }}{{ end }}{{ template "x" . }}`,
		`http://sink/{{ if .Key }}?a={{ .Key }}{{ end }}`,
		`http://sink/{{ range .Value.x }}?{{ . }}{{ end }}`,
		`http://sink/{{ with .Value.x }}#{{ . }}{{ else }}x{{ end }}`,
	} {
		_, err := Compile([]config.Route{req1("r", "", u, nil)}, nil)
		var ce *CompileError
		if !errors.As(err, &ce) || ce.Field != "requests[0].url" {
			t.Errorf("%s: %v, want a compile error for requests[0].url", u, err)
		}
	}
	for _, u := range []string{
		`http://sink/{{ if .Key }}a?b={{ .Key }}{{ else }}?c{{ end }}`,
		`http://sink/{{ $k := .Key }}{{ $k }}`,
	} {
		if _, err := Compile([]config.Route{req1("r", "", u, nil)}, nil); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
}

// ---- benchmarks ----

// benchRouter is the README's example route: a `when` on
// value.type, a URL with .Value.id, a body of {{ .Raw }}; and a passthrough
// route for a topic that carries no JSON.
func benchRouter(t testing.TB) *Router {
	return mustCompile(t,
		config.Route{Name: "order-created", Topics: []string{"orders"}, When: `value.type == "order.created"`,
			Requests: []config.Request{{Method: "POST", URL: "http://127.0.0.1:8081/orders/{{ .Value.id }}",
				Body: strp("{{ .Raw }}"), Headers: map[string]string{"Content-Type": "application/json"}}}},
		config.Route{Name: "passthrough", Topics: []string{"users"},
			Requests: []config.Request{{Method: "POST", URL: "http://127.0.0.1:8081/users",
				Headers: map[string]string{"Content-Type": "application/octet-stream"}}}},
	)
}

// benchValue is a typical 200-byte order event.
const benchValue = `{"type":"order.created","id":1234567,"key":"user-17","seq":42,"amount":129.95,"currency":"EUR",` +
	`"customer":{"id":"c-8812","country":"DE"},"items":3,"created_at":"2024-05-06T07:08:09Z","note":"leave at door"}`

func benchMessage() *Message {
	return &Message{Topic: "orders", Partition: 3, Offset: 123456, Key: []byte("user-17"), Value: []byte(benchValue),
		Headers: []Header{{Key: "traceparent", Value: []byte("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")}}}
}

func benchPassthroughMessage() *Message {
	m := benchMessage()
	m.Topic = "users"
	return m
}

func BenchmarkPlan(b *testing.B) {
	r := benchRouter(b)
	for _, bm := range []struct {
		name string
		m    *Message
	}{{"typical", benchMessage()}, {"passthrough", benchPassthroughMessage()}} {
		b.Run(bm.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bm.m.Value)))
			for b.Loop() {
				if _, err := r.Plan(bm.m); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	// What the dispatcher does: Match on arrival, Render when the message's
	// turn comes, into storage the lane keeps.
	for _, bm := range []struct {
		name string
		m    *Message
	}{{"typical", benchMessage()}, {"passthrough", benchPassthroughMessage()}} {
		b.Run(bm.name+"/match", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := r.Match(bm.m); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(bm.name+"/render", func(b *testing.B) {
			rt, err := r.Match(bm.m)
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]Request, 0, 2)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := rt.Render(bm.m, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("typical-parallel", func(b *testing.B) {
		m := benchMessage()
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := r.Plan(m); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkDecode compares the decoder with the encoding/json ways of getting
// both trees (the measurement behind the choice documented in json.go).
func BenchmarkDecode(b *testing.B) {
	data := []byte(benchValue)
	b.Run("orderly-both-trees", func(b *testing.B) {
		b.ReportAllocs()
		var d decoder
		for b.Loop() {
			if _, _, err := d.decode(string(data), modeTemplate|modeExpr, fullTrie); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("orderly-expr-tree", func(b *testing.B) {
		b.ReportAllocs()
		var d decoder
		for b.Loop() {
			if _, _, err := d.decode(string(data), modeExpr, fullTrie); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json-twice", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var e any
			if err := json.Unmarshal(data, &e); err != nil {
				b.Fatal(err)
			}
			dec := json.NewDecoder(bytes.NewReader(data))
			dec.UseNumber()
			var t any
			if err := dec.Decode(&t); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json-usenumber-convert", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			dec := json.NewDecoder(bytes.NewReader(data))
			dec.UseNumber()
			var t any
			if err := dec.Decode(&t); err != nil {
				b.Fatal(err)
			}
			_ = numbersToFloat(t)
		}
	})
}

// numbersToFloat copies v with json.Number replaced by float64 (the
// alternative to this package's decoder, for BenchmarkDecode).
func numbersToFloat(v any) any {
	switch v := v.(type) {
	case json.Number:
		f, _ := v.Float64()
		return f
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, x := range v {
			out[k] = numbersToFloat(x)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = numbersToFloat(x)
		}
		return out
	}
	return v
}

// FirstTarget is the target of the first request's rendering, known before
// it: the dispatcher queues a message at that target's senders unrendered.
func TestFirstTargetIsTheRenderedTarget(t *testing.T) {
	for _, tc := range []struct {
		route config.Route
		want  string
	}{
		{req1("tpl", "", "http://sink:8081/people/{{ .Key }}?v={{ .Value.id }}", nil), "sink:8081"},
		{req1("static", "", "https://api.example/orders", nil), "api.example:443"},
		{config.Route{Name: "record", Requests: []config.Request{{Topic: "out"}, {Method: "POST", URL: "http://sink:8081/x"}}}, ""},
	} {
		r := mustCompile(t, tc.route)
		m := msg("orders", `{"id":7}`)
		rt, err := r.Match(m)
		if err != nil {
			t.Fatalf("%s: Match: %v", tc.route.Name, err)
		}
		if got := rt.FirstTarget(); got != tc.want {
			t.Fatalf("%s: FirstTarget = %q, want %q", tc.route.Name, got, tc.want)
		}
		plan, err := rt.Render(m, nil)
		if err != nil {
			t.Fatalf("%s: Render: %v", tc.route.Name, err)
		}
		if tc.want != "" && plan.Requests[0].Target != tc.want {
			t.Fatalf("%s: rendered target %q, FirstTarget %q", tc.route.Name, plan.Requests[0].Target, tc.want)
		}
	}
	var none *Route
	if got := none.FirstTarget(); got != "" {
		t.Fatalf("nil route: FirstTarget = %q", got)
	}
}

// TestRenderIsBoundedByTheRoute: what a message holds cannot make rendering
// run or grow without bound, which would crash the process and, its offset
// never committed, crash it again on the same message. A range over a number
// above 10,000 and a text over 64 MiB are the message's errors (it goes to
// the DLQ); a range over a small number still renders.
func TestRenderIsBoundedByTheRoute(t *testing.T) {
	body := func(s string) *string { return &s }
	r := mustCompile(t,
		req1("loop", `value.kind == "loop"`, "http://sink/a", body(`{{ range .Value.items }}{{ end }}done`)),
		req1("grow", "", "http://sink/b", body(`{{ range .Value.items }}{{ $.Raw }}{{ end }}`)))
	render := func(value string) (string, error) {
		m := msg("orders", value)
		rt, err := r.Match(m)
		if err != nil {
			t.Fatal(err)
		}
		p, err := rt.Render(m, nil)
		if err != nil {
			return "", err
		}
		return string(p.Requests[0].Body), nil
	}
	done := make(chan error, 1)
	go func() {
		_, err := render(`{"kind":"loop","items":1000000000000000}`)
		done <- err
	}()
	select {
	case err := <-done:
		if bad := badMessage(t, err); !strings.Contains(bad.Error(), "at most 10000 iterations") {
			t.Fatalf("range over a huge number: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a range over a huge number is still rendering")
	}
	if got, err := render(`{"kind":"loop","items":3}`); err != nil || got != "done" {
		t.Fatalf("range over 3: %q, %v", got, err)
	}
	pad := strings.Repeat("x", 10000)
	if _, err := render(`{"items":9000,"pad":"` + pad + `"}`); !strings.Contains(badMessage(t, err).Error(), "over 64 MiB") {
		t.Fatalf("a 90 MB body: %v", err)
	}
	if got, err := render(`{"items":[1,2],"pad":"p"}`); err != nil || len(got) != 2*len(`{"items":[1,2],"pad":"p"}`) {
		t.Fatalf("a small range: %d bytes, %v", len(got), err)
	}
}
