package config

import (
	"fmt"
	"os"
	"reflect"
	"strings"
)

// envRef is one ${NAME} reference found by expand.
type envRef struct {
	name       string
	set        bool // the variable is set
	empty      bool // its value is ""
	hasDefault bool // ${NAME:-default}
}

// expand replaces ${NAME} and ${NAME:-default} with values from the
// environment and $${ with a literal ${ (see the package documentation).
// On a malformed reference it returns s unchanged and an error.
func expand(s string) (string, []envRef, error) {
	if !strings.Contains(s, "${") {
		return s, nil, nil
	}
	var b strings.Builder
	var refs []envRef
	for i := 0; i < len(s); {
		switch {
		case strings.HasPrefix(s[i:], "$${"):
			b.WriteString("${")
			i += 3
		case strings.HasPrefix(s[i:], "${"):
			end := strings.IndexByte(s[i:], '}')
			if end < 0 {
				return s, refs, malformed(s[i:])
			}
			name, def, hasDef := strings.Cut(s[i+2:i+end], ":-")
			if !envName(name) {
				return s, refs, malformed(s[i : i+end+1])
			}
			v, set := os.LookupEnv(name)
			refs = append(refs, envRef{name: name, set: set, empty: v == "", hasDefault: hasDef})
			if hasDef && v == "" {
				v = def
			}
			b.WriteString(v)
			i += end + 1
		default:
			b.WriteByte(s[i])
			i++
		}
	}
	return b.String(), refs, nil
}

func malformed(ref string) error {
	if len(ref) > 40 {
		ref = ref[:40] + "..."
	}
	return fmt.Errorf("malformed environment reference %q: write ${NAME} or ${NAME:-default}, or $${ for a literal ${", ref)
}

func envName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c == '_' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return s != ""
}

// readEnv reads the references of raw, the value at p as written: it
// notes the variables that are unset or empty, and returns the error of a
// malformed reference.
func (s *source) readEnv(p keyPath, raw string) error {
	_, refs, err := expand(raw)
	var notes []string
	for _, r := range refs {
		switch {
		case r.hasDefault:
		case !r.set:
			s.unset[r.name] = true
			notes = append(notes, "the environment variable "+r.name+" is not set")
		case r.empty:
			notes = append(notes, "the environment variable "+r.name+" is empty")
		}
	}
	if len(notes) > 0 {
		s.notes[p.id()] = strings.Join(notes, "; ")
	}
	return err
}

// emptyEnv names the environment variables that the value at p refers to
// (without a :-default) and that were unset or empty, as in "the
// environment variable ORDERLY_ADMIN_TOKEN is not set"; "" when there are
// none.
func (s *source) emptyEnv(p keyPath) string {
	if s == nil {
		return ""
	}
	return s.notes[p.id()]
}

// expandEnv expands ${...} in every string reachable from v, a decoded
// Config (a Duration expanded its text as it was decoded): fields, slice
// elements, pointers, and the values (not keys) of maps, including strings
// held in interfaces (kafka.properties). Malformed references are left as
// they are; the index reported them.
func expandEnv(v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		v.SetString(expanded(v.String()))
	case reflect.Pointer:
		if !v.IsNil() {
			expandEnv(v.Elem())
		}
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if tagName(v.Type().Field(i)) != "" {
				expandEnv(v.Field(i))
			}
		}
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			expandEnv(v.Index(i))
		}
	case reflect.Map:
		for _, k := range v.MapKeys() {
			el := v.MapIndex(k)
			if el.Kind() == reflect.Interface {
				el = el.Elem()
			}
			if el.Kind() == reflect.String {
				v.SetMapIndex(k, reflect.ValueOf(expanded(el.String())))
			}
		}
	}
}

// expanded is s expanded, or s when it is malformed.
func expanded(s string) string {
	if out, _, err := expand(s); err == nil {
		return out
	}
	return s
}
