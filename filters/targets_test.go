package filters

import (
	"errors"
	"strings"
	"testing"

	"github.com/orderly-dispatch/orderly/config"
)

var testTargets = []config.Target{
	{Name: "billing", BaseURL: "https://billing.example:8443/api/v1/"},
	{Name: "plain", BaseURL: "http://plain.example"},
}

// TestNamedTargets: a request that names a target renders as its base_url
// followed by the path, escaped per segment like a url's path, with the
// target's host:port and name.
func TestNamedTargets(t *testing.T) {
	r, err := Compile([]config.Route{{Name: "r", Requests: []config.Request{
		{Method: "PUT", Target: "billing", Path: "/invoices/{{ .Value.id }}?note={{ .Value.note }}"},
		{Target: "plain", Path: "/static"},
		{Target: "plain"},
		{URL: "http://full.example:81/x"},
		{Target: "billing", Path: "/raw/{{ raw .Value.raw }}"},
	}}}, []string{"orders"}, WithTargets(testTargets))
	if err != nil {
		t.Fatal(err)
	}
	p := mustPlan(t, r, msg("orders", `{"id": "../admin?x=", "note": "a&b=1", "raw": "a/b"}`))
	want := []struct{ url, target, name string }{
		{"https://billing.example:8443/api/v1/invoices/..%2Fadmin%3Fx=?note=a%26b%3D1", "billing.example:8443", "billing"},
		{"http://plain.example/static", "plain.example:80", "plain"},
		{"http://plain.example", "plain.example:80", "plain"},
		{"http://full.example:81/x", "full.example:81", ""},
		{"https://billing.example:8443/api/v1/raw/a/b", "billing.example:8443", "billing"},
	}
	for i, w := range want {
		got := p.Requests[i]
		if got.URL != w.url || got.Target != w.target || got.TargetName != w.name {
			t.Errorf("requests[%d]: %q %q %q, want %q %q %q", i, got.URL, got.Target, got.TargetName, w.url, w.target, w.name)
		}
	}
	if p.Requests[0].Method != "PUT" {
		t.Errorf("method %q", p.Requests[0].Method)
	}

	// A raw insertion still cannot climb out of the base path.
	_, err = r.Plan(msg("orders", `{"id": 1, "note": "", "raw": "../../admin"}`))
	if bad := badMessage(t, err); bad.Index != 4 || !strings.Contains(bad.Reason, "requests[4].path:") || !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("dot segment: %v", err)
	}
	// Errors of rendering name the path.
	_, err = r.Plan(msg("orders", `{"note": "", "raw": ""}`))
	if bad := badMessage(t, err); !strings.Contains(bad.Reason, "requests[0].path:") {
		t.Errorf("missing key: %v", err)
	}
}

func TestNamedTargetCompileErrors(t *testing.T) {
	routes := []config.Route{{Name: "r", Requests: []config.Request{
		{Target: "nope", Path: "/x"},
		{Target: "billing", Path: "x"},
		{Target: "billing", Path: "/x", URL: "http://h/x"},
		{Path: "/x"},
		{Target: "billing", Path: "/{{ .Vaule }}"},
		{Target: "bad", Path: "/x"},
	}}}
	bad := append(testTargets, config.Target{Name: "bad", BaseURL: "http://{{ .Value.h }}"})
	_, err := Compile(routes, []string{"orders"}, WithTargets(bad))
	if err == nil {
		t.Fatal("no error")
	}
	for _, w := range []string{
		`routes[0] ("r").requests[0].target: "nope" is not the name of a [[targets]]`,
		`routes[0] ("r").requests[1].path: "x" must start with "/"`,
		`routes[0] ("r").requests[2]: sets url and target/path`,
		`routes[0] ("r").requests[3].target: a request with a path needs a target`,
		`routes[0] ("r").requests[4].path: template: path:1:`,
		`routes[0] ("r").requests[5].target: the base_url of target "bad" cannot be a template`,
	} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q:\n%v", w, err)
		}
	}
	// Without WithTargets no target is known.
	if _, err := Compile(routes[:1], []string{"orders"}); err == nil || !strings.Contains(err.Error(), `"nope" is not the name`) {
		t.Errorf("without targets: %v", err)
	}
}
