package config

import (
	"cmp"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2/unstable"
)

// seg is one step of a key path: a key (index < 0) or an array index.
type seg struct {
	name  string
	index int
}

// keyPath is the path of a value in the document, array indices included:
// routes[0].requests[1].url is {routes} {0} {requests} {1} {url}.
type keyPath []seg

// key returns a copy of p extended by the keys names.
func (p keyPath) key(names ...string) keyPath {
	q := make(keyPath, len(p), len(p)+len(names))
	copy(q, p)
	for _, n := range names {
		q = append(q, seg{name: n, index: -1})
	}
	return q
}

// at returns a copy of p extended by the array index i.
func (p keyPath) at(i int) keyPath {
	q := make(keyPath, len(p), len(p)+1)
	copy(q, p)
	return append(q, seg{index: i})
}

// id is an unambiguous map key for p.
func (p keyPath) id() string {
	var b strings.Builder
	for _, s := range p {
		if s.index >= 0 {
			b.WriteString("[" + strconv.Itoa(s.index) + "]")
		} else {
			b.WriteString("." + strconv.Quote(s.name))
		}
	}
	return b.String()
}

// display renders p for a message: keys joined with dots, indices in
// brackets, a key quoted unless it is made of letters, digits, '_', '-' and
// '.', and the name of a route after its index when routeName knows it.
func (p keyPath) display(routeName func(int) string) string {
	var b strings.Builder
	for i, s := range p {
		if s.index >= 0 {
			b.WriteString("[" + strconv.Itoa(s.index) + "]")
			if i == 1 && p[0].name == "routes" && routeName != nil {
				if name := routeName(s.index); name != "" {
					b.WriteString(" (" + strconv.Quote(name) + ")")
				}
			}
			continue
		}
		if i > 0 {
			b.WriteByte('.')
		}
		if plainKey(s.name) {
			b.WriteString(s.name)
		} else {
			b.WriteString(strconv.Quote(s.name))
		}
	}
	return b.String()
}

func (p keyPath) String() string { return p.display(nil) }

// hasPrefix reports whether p is q or lies inside it.
func (p keyPath) hasPrefix(q keyPath) bool {
	return len(q) <= len(p) && slices.Equal(p[:len(q)], q)
}

// parseKeyPath reads a key path as messages write it: keys separated by
// dots, a key quoted when it is not a plain word, indices in brackets, and
// ["key"] for a key in brackets (as package filters writes header names):
// `routes[0].requests[1].headers["X-Id"]`, `headers."Bad Header"`.
func parseKeyPath(s string) (keyPath, bool) {
	var p keyPath
	for first := true; s != ""; first = false {
		switch {
		case s[0] == '[':
			end := strings.IndexByte(s, ']')
			if end < 0 {
				return nil, false
			}
			in := s[1:end]
			if n, err := strconv.Atoi(in); err == nil && n >= 0 {
				p = p.at(n)
				s = s[end+1:]
				break
			}
			// A quoted key may hold ']': read the quoted string itself.
			q, err := strconv.QuotedPrefix(s[1:])
			if err != nil || !strings.HasPrefix(s[1+len(q):], "]") {
				return nil, false
			}
			name, _ := strconv.Unquote(q)
			p = p.key(name)
			s = s[1+len(q)+1:]
		case s[0] == '.' || first:
			if !first {
				s = s[1:]
			}
			if strings.HasPrefix(s, `"`) {
				q, err := strconv.QuotedPrefix(s)
				if err != nil {
					return nil, false
				}
				name, _ := strconv.Unquote(q)
				p = p.key(name)
				s = s[len(q):]
				break
			}
			end := strings.IndexAny(s, ".[")
			if end < 0 {
				end = len(s)
			}
			if !plainKey(s[:end]) {
				return nil, false
			}
			p = p.key(s[:end])
			s = s[end:]
		default:
			return nil, false
		}
	}
	return p, len(p) > 0
}

func plainKey(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// pos is a 1-based line and column (in bytes, as go-toml counts them).
type pos struct{ line, col int }

// source is what Parse learns from one walk over the file's syntax tree
// (go-toml's unstable parser): where each key is, which go-toml's errors
// do not say for validation, and say without array indices for decoding;
// the durations decoding would mishandle; the ${...} references each
// string makes, as written.
type source struct {
	file string
	// keys maps keyPath.id() to where messages about the key point: the key
	// (a dotted one where it starts), a table's header, an array element.
	keys map[string]pos
	// paths maps each position go-toml may report (a key, a value, a
	// header's first key) to the longest path found there.
	paths map[pos]keyPath
	// exprs are the top-level expressions in file order: Parse blanks out
	// those go-toml rejects so that it can decode the rest.
	exprs []expr
	// issues are durations given as something else than a string, which
	// go-toml would reject without a position.
	issues Errors
	// envIssues are malformed ${...} references in other strings than
	// durations (decoding reports those).
	envIssues Errors
	// names are the routes' names as written, by index: decoding may stop
	// before it reaches them.
	names map[int]string
	// notes are, by keyPath.id(), the unset or empty variables a value
	// refers to (see emptyEnv); unset are those unset.
	notes map[string]string
	unset map[string]bool

	lines []int // offsets at which lines start
}

// expr is one top-level expression: a key-value, or a table header with
// its whole table (up to the next header). Blanking one (spaces, line
// breaks kept, so that every position stays where it was) leaves its
// value out and decoding can go on.
type expr struct {
	start, end int  // end < 0: unknown (a syntax error follows)
	array      bool // an [[array]] header: never blanked, indices would shift
	p          keyPath
}

// maxDepth bounds the paths index follows: the schema's deepest key,
// routes[i].requests[j].headers.name, has 6 steps. Without a bound, absurd
// documents (a key of 10000 dotted parts) would take quadratic time.
const maxDepth = 16

// index walks the syntax tree of a TOML document. It stops quietly at a
// syntax error, which decoding then reports.
func index(file string, data []byte) *source {
	s := &source{file: file, keys: map[string]pos{}, paths: map[pos]keyPath{},
		names: map[int]string{}, notes: map[string]string{}, unset: map[string]bool{}, lines: []int{0}}
	for i, c := range data {
		if c == '\n' {
			s.lines = append(s.lines, i+1)
		}
	}
	arrays := map[string]int{} // [[array]] elements so far, by path id
	var table keyPath
	skip := false // in a table that is not of the schema (too deep, or a duration)
	header := -1  // the current table's header, in s.exprs
	var p unstable.Parser
	p.Reset(data)
	for p.NextExpression() {
		e := p.Expression()
		var keys []*unstable.Node
		for it := e.Key(); it.Next(); {
			keys = append(keys, it.Node())
		}
		if e.Kind == unstable.KeyValue {
			x := expr{start: int(e.Raw.Offset), end: int(e.Raw.Offset + e.Raw.Length), p: slices.Clip(table)}
			for _, k := range keys {
				x.p = append(x.p, seg{name: string(k.Data), index: -1})
			}
			s.exprs = append(s.exprs, x)
			if !skip {
				s.keyValue(table, e, keys)
			}
			continue
		}
		// A header is where its line's text starts, at '['.
		start := s.lines[s.nodePos(keys[0]).line-1]
		for data[start] == ' ' || data[start] == '\t' {
			start++
		}
		if header >= 0 {
			s.exprs[header].end = start
		}
		header = len(s.exprs)
		s.exprs = append(s.exprs, expr{start: start, array: e.Kind == unstable.ArrayTable})
		at := s.pos(start)
		table, skip = keyPath{}, len(keys) > maxDepth
		duration := false // the header goes into a duration
		for i := 0; i < len(keys) && !skip; i++ {
			table = table.key(string(keys[i].Data))
			s.record(table, at)
			// An array of tables: its last element, or a new one.
			elem := i == len(keys)-1 && e.Kind == unstable.ArrayTable
			if n, ok := arrays[table.id()]; ok || elem {
				if elem {
					n++
					arrays[table.id()] = n
				}
				table = table.at(n - 1)
				s.record(table, at)
			}
			s.mark(table, s.nodePos(keys[i]))
			duration = duration || typeAt(table) == durationType
		}
		if duration {
			s.issue(table, at, "a table")
			skip = true
		}
		s.mark(table, s.nodePos(keys[0])) // go-toml reports a header at its first key
		s.exprs[header].p = table
	}
	// A table ends where the next header starts; after a syntax error,
	// where the last one ends is unknown.
	if header >= 0 {
		s.exprs[header].end = len(data)
		if p.Error() != nil {
			s.exprs[header].end = -1
		}
	}
	return s
}

// keyValue indexes a key-value (and, inside its value, array elements and
// inline tables) of the table prefix.
func (s *source) keyValue(prefix keyPath, kv *unstable.Node, keys []*unstable.Node) {
	if len(prefix)+len(keys) > maxDepth {
		return // nothing of the schema is that deep; decoding reports it
	}
	start := s.nodePos(keys[0])
	p := prefix
	for i, k := range keys {
		p = p.key(string(k.Data))
		at := s.nodePos(k)
		s.mark(p, at)
		if i == len(keys)-1 {
			at = start // a dotted key is placed where it starts
		}
		s.record(p, at)
		if i < len(keys)-1 && typeAt(p) == durationType {
			s.issue(p, s.nodePos(k), "a table")
			return
		}
	}
	s.value(p, kv.Value(), start)
}

// value indexes the value v of the key at p.
func (s *source) value(p keyPath, v *unstable.Node, at pos) {
	if v.Raw.Length > 0 { // arrays have no position: they take their key's
		at = s.nodePos(v)
		s.mark(p, at)
	}
	if typeAt(p) == durationType && v.Kind != unstable.String {
		got := map[unstable.Kind]string{unstable.Bool: "a boolean", unstable.Array: "an array", unstable.InlineTable: "a table",
			unstable.Integer: "the number " + string(v.Data), unstable.Float: "the number " + string(v.Data)}[v.Kind]
		if _, err := time.ParseDuration(string(v.Data)); err != nil { // 0 is a duration
			s.issue(p, at, cmp.Or(got, "a date or time"))
		}
		return
	}
	switch v.Kind {
	case unstable.String:
		if len(p) == 3 && p[0].name == "routes" && p[1].index >= 0 && p[2].name == "name" {
			s.names[p[1].index] = string(v.Data)
		}
		if err := s.readEnv(p, string(v.Data)); err != nil && typeAt(p) != durationType {
			s.envIssues = append(s.envIssues, &FieldError{File: s.file, Line: at.line, Col: at.col, Msg: err.Error(), path: p})
		}
	case unstable.Array:
		if len(p) >= maxDepth {
			return
		}
		i := 0
		for it := v.Children(); it.Next(); {
			if el := it.Node(); el.Kind != unstable.Comment {
				elAt := at
				if el.Raw.Length > 0 {
					elAt = s.nodePos(el)
				}
				s.record(p.at(i), elAt)
				s.value(p.at(i), el, elAt)
				i++
			}
		}
	case unstable.InlineTable:
		for it := v.Children(); it.Next(); {
			if kv := it.Node(); kv.Kind == unstable.KeyValue {
				var keys []*unstable.Node
				for k := kv.Key(); k.Next(); {
					keys = append(keys, k.Node())
				}
				s.keyValue(p, kv, keys)
			}
		}
	}
}

// issue records a duration given as got.
func (s *source) issue(p keyPath, at pos, got string) {
	s.issues = append(s.issues, &FieldError{File: s.file, Line: at.line, Col: at.col, path: p,
		Msg: `must be a quoted Go duration such as "1s" or "250ms", not ` + got})
}

// record notes that the key at p is at at, unless it was seen before, and
// that p starts there.
func (s *source) record(p keyPath, at pos) {
	if _, ok := s.keys[p.id()]; !ok {
		s.keys[p.id()] = at
	}
	s.mark(p, at)
}

// mark notes that p starts at at, unless a longer path does.
func (s *source) mark(p keyPath, at pos) {
	if len(s.paths[at]) < len(p) {
		s.paths[at] = p
	}
}

func (s *source) pos(off int) pos {
	line := sort.Search(len(s.lines), func(i int) bool { return s.lines[i] > off })
	return pos{line: line, col: off - s.lines[line-1] + 1}
}

func (s *source) nodePos(n *unstable.Node) pos { return s.pos(int(n.Raw.Offset)) }

// position returns where a message about p points: p's key, else alt's
// (another key the problem involves), else p's nearest enclosing table in
// the file; ok is false when there is none.
func (s *source) position(p, alt keyPath) (at pos, ok bool) {
	if s == nil {
		return pos{}, false
	}
	if at, ok = s.keys[p.id()]; !ok && alt != nil {
		at, ok = s.keys[alt.id()]
	}
	for n := len(p) - 1; !ok && n > 0; n-- {
		at, ok = s.keys[p[:n].id()]
	}
	return at, ok
}

// blank overwrites in doc the top-level expression holding line:col with
// spaces, keeping line breaks, and returns its path; false when it cannot.
func (s *source) blank(doc []byte, line, col int) (keyPath, bool) {
	if line < 1 || line > len(s.lines) {
		return nil, false
	}
	off := s.lines[line-1] + col - 1
	i := sort.Search(len(s.exprs), func(i int) bool { return s.exprs[i].start > off }) - 1
	if i < 0 || off >= s.exprs[i].end || s.exprs[i].array {
		return nil, false
	}
	for j := s.exprs[i].start; j < s.exprs[i].end; j++ {
		if doc[j] != '\n' && doc[j] != '\r' {
			doc[j] = ' '
		}
	}
	return s.exprs[i].p, true
}

// pathAt returns the indexed path of the key go-toml reports at at: the
// path found there cut after as many keys as key has, when they agree, or
// whole when it ends with key (go-toml gives some keys relative to their
// table). Otherwise key itself, without indices.
func (s *source) pathAt(at pos, key []string) keyPath {
	p := s.paths[at]
	var names []string
	cut := 0
	for i, sg := range p {
		if sg.index < 0 {
			if names = append(names, sg.name); len(names) == len(key) {
				cut = i + 1
			}
		}
	}
	switch {
	case len(names) < len(key):
	case slices.Equal(names[:len(key)], key):
		for cut < len(p) && p[cut].index >= 0 {
			cut++ // keep the indices that follow the last key
		}
		return p[:cut]
	case slices.Equal(names[len(names)-len(key):], key):
		return p
	}
	return keyPath{}.key(key...)
}

var durationType = reflect.TypeOf(Duration{})

// typeAt returns the Go type that holds the value at p in a Config, or nil
// when there is none (an unknown key, inside a Duration or a
// map[string]any).
func typeAt(p keyPath) reflect.Type {
	t := reflect.TypeOf(Config{})
	for _, s := range p {
		switch {
		case s.index >= 0 && t.Kind() == reflect.Slice, s.index < 0 && t.Kind() == reflect.Map:
			t = t.Elem()
		case s.index < 0 && t.Kind() == reflect.Struct:
			f, ok := fieldByTag(t, s.name)
			if !ok {
				return nil
			}
			t = f.Type
		default:
			return nil
		}
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
	}
	return t
}

// fieldByTag finds the field of struct type t whose toml tag is name.
func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		if name != "" && tagName(t.Field(i)) == name {
			return t.Field(i), true
		}
	}
	return reflect.StructField{}, false
}

// tagName is the key of field f in TOML, "" for none.
func tagName(f reflect.StructField) string {
	if name, _, _ := strings.Cut(f.Tag.Get("toml"), ","); name != "-" && f.IsExported() {
		return name
	}
	return ""
}
