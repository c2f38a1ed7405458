package filters

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/orderly-dispatch/orderly/config"
)

// renderBody compiles one route whose only request has the body template
// tmpl and plans m.
func renderBody(t *testing.T, tmpl string, m *Message) (string, error) {
	t.Helper()
	r := mustCompile(t, config.Route{Name: "f", Requests: []config.Request{{URL: "http://sink/", Body: strp(tmpl)}}})
	if r.routes[0].reqs[0].body.segs != nil {
		t.Fatalf("%s: on the fast path, which renders fields only", tmpl)
	}
	p, err := r.Plan(m)
	if err != nil {
		return "", err
	}
	return string(p.Requests[0].Body), nil
}

// TestByteFuncsOnStringsAndBytes calls md5, sha256, b64enc and b64dec
// directly, with a string and with the same bytes.
func TestByteFuncsOnStringsAndBytes(t *testing.T) {
	tests := []struct{ fn, in, want string }{
		{"md5", "", "d41d8cd98f00b204e9800998ecf8427e"},
		{"md5", "abc", "900150983cd24fb0d6963f7d28e17f72"},
		{"sha256", "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{"sha256", "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
		{"b64enc", "", ""},
		{"b64enc", "abc", "YWJj"},
		{"b64enc", "a?>~", "YT8+fg=="},
		{"b64enc", "\xfb\xff", "+/8="},
		{"b64dec", "", ""},
		{"b64dec", "YWJj", "abc"},
		{"b64dec", "+/8=", "\xfb\xff"},
	}
	for _, tt := range tests {
		f := funcs[tt.fn].(func(any) (string, error))
		for _, in := range []any{tt.in, []byte(tt.in)} {
			got, err := f(in)
			if err != nil || got != tt.want {
				t.Errorf("%s(%T %q) = %q, %v; want %q", tt.fn, in, tt.in, got, err, tt.want)
			}
		}
	}
	// Numbers and bools as they print; nil, maps and slices are errors.
	f := funcs["md5"].(func(any) (string, error))
	for in, want := range map[any]string{
		json.Number("12345678901234567890"): "fd85e62d9beb45428771ec688418b271",
		7:                                   "8f14e45fceea167a5a36dedd4bea2543",
		true:                                "b326b5062b2f0e69046810717534cb09",
	} {
		if got, err := f(in); err != nil || got != want {
			t.Errorf("md5(%T %v) = %q, %v; want %q", in, in, got, err, want)
		}
	}
	for _, in := range []any{nil, map[string]any{"a": 1}, []any{"a"}} {
		for _, fn := range []string{"md5", "sha256", "b64enc", "b64dec"} {
			if got, err := funcs[fn].(func(any) (string, error))(in); err == nil {
				t.Errorf("%s(%#v) = %q, want an error", fn, in, got)
			}
		}
	}
	for _, in := range []string{"YWJ", "YWJj=", "a b", "!!!!", "-_8="} { // not standard, padded base64 (CR and LF are skipped)
		if got, err := b64dec(in); err == nil {
			t.Errorf("b64dec(%q) = %q, want an error", in, got)
		}
	}
}

// TestByteFuncsInTemplates renders the functions over the template data:
// .Raw and .Key are strings, .Value members strings or numbers.
func TestByteFuncsInTemplates(t *testing.T) {
	m := msg("orders", `{"s":"abc","empty":"","id":12345678901234567890,"n":7,"enc":"YWJj","obj":{"a":1}}`)
	rawMD5 := "8c7991617981763b6ef9071130ad9bf6" // of the value above
	tests := []struct{ tmpl, want string }{
		{`{{ md5 .Raw }}`, rawMD5},
		{`{{ .Raw | md5 }}`, rawMD5},
		{`{{ md5 .Value.s }}`, "900150983cd24fb0d6963f7d28e17f72"},
		{`{{ md5 .Value.empty }}`, "d41d8cd98f00b204e9800998ecf8427e"},
		{`{{ md5 .Value.id }}`, "fd85e62d9beb45428771ec688418b271"}, // the literal, not a float
		{`{{ md5 .Value.n }}`, "8f14e45fceea167a5a36dedd4bea2543"},
		{`{{ md5 .Key }}`, "b637b17af08aced8850c18cccde915da"},
		{`{{ sha256 .Value.s }}`, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
		{`{{ sha256 .Value.id }}`, "6ed645ef0e1abea1bf1e4e935ff04f9e18d39812387f63cda3415b46240f0405"},
		{`{{ sha256 "" }}`, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{`{{ b64enc .Key }}`, "azE="},
		{`{{ b64enc .Value.id }}`, "MTIzNDU2Nzg5MDEyMzQ1Njc4OTA="},
		{`{{ b64dec .Value.enc }}`, "abc"},
		{`{{ .Raw | b64enc | b64dec }}`, string(m.Value)},
		{`{{ md5 (json .Value.obj) }}`, "bb6cb5c68df4652941caf652a366f2d8"}, // md5 of {"a":1}
	}
	for _, tt := range tests {
		got, err := renderBody(t, tt.tmpl, m)
		if err != nil {
			t.Errorf("%s: %v", tt.tmpl, err)
		} else if got != tt.want {
			t.Errorf("%s = %q, want %q", tt.tmpl, got, tt.want)
		}
	}
}

// TestByteFuncErrorsAreBadMessages: a function that fails fails the
// rendering, and Plan reports a *BadMessageError for the request.
func TestByteFuncErrorsAreBadMessages(t *testing.T) {
	m := msg("orders", `{"enc":"not base64!","obj":{"a":1}}`)
	tests := []struct{ tmpl, reason string }{
		{`{{ b64dec .Value.enc }}`, "error calling b64dec: illegal base64 data at input byte 3"},
		{`{{ b64dec .Raw }}`, "error calling b64dec: illegal base64 data"},
		{`{{ md5 .Value.obj }}`, "error calling md5: the argument is a map[string]interface {}, not a string"},
		{`{{ sha256 (index .Value "absent") }}`, "error calling sha256: the argument is nil"},
	}
	for _, tt := range tests {
		r := mustCompile(t, config.Route{Name: "f", Requests: []config.Request{
			{URL: "http://sink/first"},
			{URL: "http://sink/", Body: strp(tt.tmpl)},
		}})
		_, err := r.Plan(m)
		bad := badMessage(t, err)
		if bad.Route != "f" || bad.Index != 1 || !strings.HasPrefix(bad.Reason, "requests[1].body: ") || !strings.Contains(bad.Reason, tt.reason) {
			t.Errorf("%s: %+v, want a reason with %q", tt.tmpl, bad, tt.reason)
		}
	}
}

// TestJSONFunc: json yields a JSON value safe inside a JSON body.
func TestJSONFunc(t *testing.T) {
	m := msg("orders", `{"first_name":"Ann \"Nan\" Ünïcode \\ <b>\u2028\t","n":null,"id":12345678901234567890,"f":-0,"obj":{"b":[1,"x"],"a":null}}`)
	tests := []struct{ tmpl, want string }{
		{`{{ json .Value.first_name }}`, `"Ann \"Nan\" Ünïcode \\ <b>\u2028\t"`},
		{`{{ json .Value.n }}`, `null`},
		{`{{ json (index .Value "absent") }}`, `null`},
		{`{{ json .Value.id }}`, `12345678901234567890`},
		{`{{ json .Value.f }}`, `-0`},
		{`{{ json .Value.obj }}`, `{"a":null,"b":[1,"x"]}`},
		{`{{ json .Key }}`, `"k1"`},
		{`{{ json .Partition }}`, `3`},
	}
	for _, tt := range tests {
		got, err := renderBody(t, tt.tmpl, m)
		if err != nil {
			t.Errorf("%s: %v", tt.tmpl, err)
		} else if got != tt.want {
			t.Errorf("%s = %s, want %s", tt.tmpl, got, tt.want)
		}
	}
}

// TestTransformBody renders the transform of issue 17 (the event plus the
// md5 of its value) and checks it is valid JSON with the right members.
func TestTransformBody(t *testing.T) {
	const value = `{"first_name":"Ann \"Nan\" Ünïcode","last_name":"Lee","id":12345678901234567890}`
	const tmpl = `{"first_name": {{ json .Value.first_name }}, "last_name": {{ json .Value.last_name }}, "id": {{ json .Value.id }}, "hash": "{{ md5 .Raw }}", "sha": "{{ sha256 .Raw }}", "b64": "{{ b64enc .Raw }}"}`
	for _, full := range []bool{false, true} {
		r := mustCompile(t, config.Route{Name: "t", Requests: []config.Request{{URL: "http://sink/", Body: strp(tmpl)}}})
		if full {
			forceFullDecode(r)
		}
		body := mustPlan(t, r, msg("orders", value)).Requests[0].Body
		if !json.Valid(body) {
			t.Fatalf("not JSON: %s", body)
		}
		var got map[string]any
		d := json.NewDecoder(strings.NewReader(string(body)))
		d.UseNumber()
		if err := d.Decode(&got); err != nil {
			t.Fatal(err)
		}
		want := map[string]any{
			"first_name": `Ann "Nan" Ünïcode`,
			"last_name":  "Lee",
			"id":         json.Number("12345678901234567890"),
			"hash":       "01963906ff043ad7ef2531b0d2a3f00d",
			"sha":        "611be60d2c20362ff54a7fcccacd2b4b4b91d98926405b83451464da4256faf9",
			"b64":        "eyJmaXJzdF9uYW1lIjoiQW5uIFwiTmFuXCIgw5xuw69jb2RlIiwibGFzdF9uYW1lIjoiTGVlIiwiaWQiOjEyMzQ1Njc4OTAxMjM0NTY3ODkwfQ==",
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("full decode %v: %s = %#v, want %#v", full, k, got[k], v)
			}
		}
		if len(got) != len(want) {
			t.Errorf("full decode %v: %s", full, body)
		}
	}
}

// TestByteFuncsInURLs: in a URL, the functions' output is escaped for where
// it prints like any other action's, unless the action ends in raw.
func TestByteFuncsInURLs(t *testing.T) {
	tests := []struct{ url, x, want string }{
		{"http://sink/k/{{ b64enc .Value.x }}", "Ω?~", "http://sink/k/zqk%2Ffg=="},
		{"http://sink/k?q={{ b64enc .Value.x }}", "a?>~", "http://sink/k?q=YT8%2Bfg%3D%3D"},
		{"http://sink/k/{{ .Value.x | b64enc | raw }}", "a?>~", "http://sink/k/YT8+fg=="},
		{"http://sink/k/{{ b64dec .Value.x }}", "YS9iP2M=", "http://sink/k/a%2Fb%3Fc"}, // a/b?c
		{"http://sink/k/{{ md5 .Value.x }}?s={{ sha256 .Value.x }}", "abc",
			"http://sink/k/900150983cd24fb0d6963f7d28e17f72?s=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
		{"http://sink/k/{{ json .Value.x }}", `a"/`, "http://sink/k/%22a%5C%22%2F%22"},
	}
	for _, tt := range tests {
		x, _ := json.Marshal(tt.x)
		got, err := renderURL(t, tt.url, msg("orders", `{"x":`+string(x)+`}`))
		if err != nil {
			t.Errorf("%s with x = %q: %v", tt.url, tt.x, err)
		} else if got != tt.want {
			t.Errorf("%s with x = %q: %q, want %q", tt.url, tt.x, got, tt.want)
		}
	}
}
