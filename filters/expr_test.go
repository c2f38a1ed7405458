package filters

import (
	"errors"
	"strings"
	"testing"

	"github.com/orderly-dispatch/orderly/config"
)

// TestWhenMustBeBoolean: a `when` whose result is only known per message
// (value.id) fails to compile, with a hint; comparing it compiles.
func TestWhenMustBeBoolean(t *testing.T) {
	for when, hint := range map[string]string{
		`value.id`:               `value.id == true`,
		`value?.x ?? false`:      `(value?.x ?? false) == true`,
		`true ? value.x : false`: `(true ? value.x : false) != nil`,
		`$env.value.ok`:          `$env.value.ok == true`,
		`let x = value.a; x`:     `(let x = value.a; x) == true`,
	} {
		_, err := Compile([]config.Route{{Name: "r", When: when}}, nil)
		var ce *CompileError
		if !errors.As(err, &ce) || ce.Field != "when" {
			t.Errorf("%s: %v, want a CompileError of when", when, err)
			continue
		}
		if !strings.Contains(err.Error(), "must yield true or false") || !strings.Contains(err.Error(), hint) {
			t.Errorf("%s: %v, want a hint %q", when, err, hint)
		}
	}
	for _, when := range []string{`value.id == true`, `value.id != nil`, `!value.ok`, `value.a and value.b`, `has_key`} {
		if _, err := Compile([]config.Route{{Name: "r", When: when}}, nil); err != nil {
			t.Errorf("%s: %v", when, err)
		}
	}
}

// TestJSONHereEverythingElseThere is the README's example: a route for JSON
// objects, then one without `when` for the rest, with no dead letter in
// between, for Plan and for Match as the dispatcher calls it.
func TestJSONHereEverythingElseThere(t *testing.T) {
	r := mustCompile(t,
		req1("json-events", `type(value) == "map"`, "http://sink/json", nil),
		req1("everything-else", "", "http://sink/raw", nil))
	for v, want := range map[string]string{
		`{"type":"a"}`: "json-events",
		`{}`:           "json-events",
		`[1,2]`:        "everything-else",
		`"str"`:        "everything-else",
		`plain text`:   "everything-else",
		`{"broken":`:   "everything-else",
		"":             "everything-else",
		"\xff\xfe":     "everything-else",
	} {
		if p := mustPlan(t, r, msg("orders", v)); p.Route != want {
			t.Errorf("Plan %q: route %q, want %q", v, p.Route, want)
		}
		if rt, err := r.Match(msg("orders", v)); err != nil || rt.Name() != want {
			t.Errorf("Match %q: %v, %v; want %q", v, rt, err, want)
		}
	}
}
