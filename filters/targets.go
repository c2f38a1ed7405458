package filters

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/orderly-dispatch/orderly/config"
)

// A CompileOption configures Compile.
type CompileOption func(*compileOptions)

type compileOptions struct {
	targets map[string]*config.Target // by name
	schemas SchemaDecoder             // nil: no schema registry (schemaregistry.go)
}

// WithTargets gives Compile the [[targets]] that requests may name. Without
// it, a request that names a target is a compile error.
func WithTargets(targets []config.Target) CompileOption {
	return func(o *compileOptions) {
		for i := range targets {
			if _, dup := o.targets[targets[i].Name]; !dup {
				o.targets[targets[i].Name] = &targets[i]
			}
		}
	}
}

// compileTarget compiles where a request that names a target goes: the
// target's base_url followed by the path template, compiled as one URL
// template, so that the path is escaped exactly as a url's path is (each
// action one segment, see URLs in the package doc) and the origin is the
// configured one.
func (rt *Route) compileTarget(rq *request, j int, cr *config.Request, o *compileOptions, fail func(string, error), use func(string, *text)) {
	at := "requests[" + strconv.Itoa(j) + "]"
	switch {
	case cr.URL != "":
		fail(at, errors.New("sets url and target/path: set either url, or target with path"))
		return
	case cr.Target == "":
		fail(at+".target", errors.New("a request with a path needs a target"))
		return
	}
	t := o.targets[cr.Target]
	if t == nil {
		fail(at+".target", fmt.Errorf("%q is not the name of a [[targets]]", cr.Target))
		return
	}
	if cr.Path != "" && !strings.HasPrefix(cr.Path, "/") {
		fail(at+".path", fmt.Errorf("%q must start with \"/\"", cr.Path))
		return
	}
	base := strings.TrimRight(t.BaseURL, "/")
	if strings.Contains(base, "{{") {
		fail(at+".target", fmt.Errorf("the base_url of target %q cannot be a template", t.Name))
		return
	}
	rq.targetName = t.Name
	tx, err := compileText("path", base+cr.Path)
	if err != nil {
		fail(at+".path", err)
		return
	}
	// base_url is literal scheme://host[:port][/path] and path starts with
	// "/": only an invalid base_url fails to fix the origin.
	rq.setURL(tx, at+".path", at+".target", fmt.Errorf("the base_url of target %q is not scheme://host[:port][/path]", t.Name), fail)
	use("path", tx)
}

// urlKey is the key of rq's URL template in errors: "url", or "path" for a
// request to a named target.
func (rq *request) urlKey() string {
	if rq.targetName != "" {
		return "path"
	}
	return "url"
}
