package config

import (
	"bytes"
	"cmp"
	"errors"
	"math"
	"reflect"
	"regexp"
	"slices"
	"strings"

	toml "github.com/pelletier/go-toml/v2"
)

// decode decodes data onto Defaults() with go-toml, strictly. A value
// that go-toml rejects, or that the index found it would mishandle, is
// reported and blanked out, and decoding starts again without it, so that
// one run reports every such value; left lists them. Unknown keys do not
// stop decoding. ok is false when the values cannot all be decoded (a
// syntax error): errs says why.
func (s *source) decode(data []byte) (cfg Config, errs Errors, left []keyPath, ok bool) {
	doc := bytes.Clone(data)
	leave := func(e *FieldError) bool {
		p, ok := s.blank(doc, e.Line, e.Col)
		if ok {
			left = append(left, p)
		}
		return ok
	}
	errs, ok = s.issues, true
	for _, e := range errs {
		ok = leave(e) && ok
	}
	for attempt := 0; ok; attempt++ {
		cfg = Defaults()
		err := toml.NewDecoder(bytes.NewReader(doc)).DisallowUnknownFields().Decode(&cfg)
		var missing *toml.StrictMissingError
		if errors.As(err, &missing) {
			for i := range missing.Errors {
				errs = append(errs, s.unknownKey(&missing.Errors[i]))
			}
		}
		if err == nil || missing != nil {
			break
		}
		fe := s.decodeError(err)
		errs = append(errs, fe)
		ok = fe.path != nil && attempt < maxDecodeAttempts && leave(fe)
	}
	names := func(i int) string { // as written
		if name := cfg.routeName(i); name != "" {
			return name
		}
		return s.names[i]
	}
	for _, e := range errs {
		e.Key = e.path.display(names)
	}
	// By line and column, keeping the order of those at the same place.
	slices.SortStableFunc(errs, func(a, b *FieldError) int { return cmp.Or(a.Line-b.Line, a.Col-b.Col) })
	return cfg, errs, left, ok
}

// maxDecodeAttempts bounds the values of the wrong type Parse leaves out
// before it gives up on decoding the rest: each costs a decoding of the
// whole file.
const maxDecodeAttempts = 50

var typeMismatch = regexp.MustCompile(`^cannot decode TOML (\w+) into `)

// decodeError turns a go-toml error into a FieldError, with the indexed
// path of its key (decode renders Key once route names are known) and, for
// a value of the wrong type, what the value should be.
func (s *source) decodeError(err error) *FieldError {
	fe := &FieldError{File: s.file, Msg: strings.TrimPrefix(err.Error(), "toml: "), Err: err}
	var de *toml.DecodeError
	if !errors.As(err, &de) {
		return fe
	}
	fe.Line, fe.Col = de.Position()
	if key := de.Key(); len(key) > 0 {
		fe.path = s.pathAt(pos{fe.Line, fe.Col}, key)
		if m := typeMismatch.FindStringSubmatch(fe.Msg); m != nil && describe(typeAt(fe.path)) != "" {
			fe.Msg = "must be " + describe(typeAt(fe.path)) + ", not a TOML " + m[1]
		}
	}
	return fe
}

// unknownKey turns one of go-toml's strict-mode errors into a FieldError
// placed at the key (a table: at its header), with a suggestion when the
// key is close to a known one.
func (s *source) unknownKey(de *toml.DecodeError) *FieldError {
	fe := s.decodeError(de)
	fe.Msg = "unknown key"
	if strings.Contains(de.Error(), "table") {
		fe.Msg = "unknown table"
	}
	if at, ok := s.keys[fe.path.id()]; ok {
		fe.Line, fe.Col = at.line, at.col
	}
	if alt := suggest(fe.path); alt != "" {
		fe.Msg += " (did you mean " + alt + "?)"
	}
	return fe
}

// suggest returns the known key next to the last key of p that is closest
// to it, if it is close enough to be a typo.
func suggest(p keyPath) string {
	if len(p) == 0 || p[len(p)-1].index >= 0 {
		return ""
	}
	parent := typeAt(p[:len(p)-1])
	if parent == nil || parent.Kind() != reflect.Struct || parent == durationType {
		return ""
	}
	best, bestD := "", 3
	for i := 0; i < parent.NumField(); i++ {
		if tag := tagName(parent.Field(i)); tag != "" {
			if d := editDistance(strings.ToLower(p[len(p)-1].name), tag); d < bestD {
				best, bestD = tag, d
			}
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b (bytes).
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return math.MaxInt
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// describe names what a value of Go type t is written as in TOML.
func describe(t reflect.Type) string {
	if t == nil {
		return ""
	}
	switch k := t.Kind(); {
	case t == durationType:
		return `a quoted Go duration such as "1s"`
	case k == reflect.String:
		return "a string"
	case k >= reflect.Int && k <= reflect.Uint64:
		return "an integer"
	case k == reflect.Float32 || k == reflect.Float64:
		return "a number"
	case k == reflect.Bool:
		return "true or false"
	case k == reflect.Map || k == reflect.Struct:
		return "a table"
	case k != reflect.Slice:
		return ""
	}
	switch el := describe(t.Elem()); {
	case t.Elem().Kind() == reflect.Struct && t.Elem() != durationType:
		return "an array of tables"
	case el == "a string" || el == "an integer" || el == "a number":
		return "an array of " + el[strings.IndexByte(el, ' ')+1:] + "s"
	}
	return "an array"
}
