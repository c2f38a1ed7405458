package config

import (
	"maps"
	"os"
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

// names counts the keys (not the indices) of p.
func (p keyPath) names() int {
	n := 0
	for _, s := range p {
		if s.index < 0 {
			n++
		}
	}
	return n
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

// source is what Parse learned about a file besides its values: where each
// key is, and the problems that decoding alone would report badly or not at
// all. Positions refer to the file as Parse read it.
type source struct {
	file string
	// keys maps keyPath.id() to the position of the key (for a table, its
	// header; for an array element, the element).
	keys map[string]pos
	// paths maps a position to the longest path found there: the start of
	// a key, or a value. It turns go-toml's positions into indexed paths.
	paths map[pos]keyPath
	// typeIssues are values decoding would mishandle (a duration given as
	// a number or a table, or with a malformed ${...}); Parse reports them
	// instead of decoding.
	typeIssues []issue
	// envIssues are malformed ${...} references in other strings.
	envIssues []issue
	// unset are the environment variables referenced but not set, sorted.
	unset []string
	// routeNames are the names of the routes as written (before ${...}
	// expansion), by index, for messages given before decoding.
	routeNames map[int]string
	// envRaw holds, by keyPath.id(), the string values that contain ${...}
	// as written, so that a message about a value that came out empty can
	// name the variable.
	envRaw map[string]string
	// spans are the top-level expressions of the file, in file order;
	// Parse blanks those that decoding cannot take (see span).
	spans []span

	lineStarts []int
	data       []byte
}

// issue is a problem found by scan.
type issue struct {
	p   keyPath
	at  pos
	msg string
	// span is the index in source.spans of the expression to blank so that
	// decoding can go on without the value; -1 for none.
	span int
}

// span is the bytes of one top-level expression: a key-value, or a table
// header with its whole table (up to the next header). A value that
// decoding would reject is blanked out with its span (spaces, newlines
// kept, so that every position stays where it was), so that one bad value
// does not stop the decoding, and the checks, of the rest.
type span struct {
	start, end int
	header     bool // a [table] header: the span covers its table
	array      bool // an [[array]] header: never blanked, indices would shift
	p          keyPath
}

// spanAt returns the index of the span holding the byte at line, col, or -1.
func (s *source) spanAt(line, col int) int {
	if line < 1 || line > len(s.lineStarts) {
		return -1
	}
	off := s.lineStarts[line-1] + col - 1
	i := sort.Search(len(s.spans), func(i int) bool { return s.spans[i].start > off }) - 1
	if i < 0 || off >= s.spans[i].end {
		return -1
	}
	return i
}

// blankable reports whether span i can be blanked.
func (s *source) blankable(i int) bool {
	return i >= 0 && i < len(s.spans) && !s.spans[i].array && s.spans[i].end > s.spans[i].start
}

// blank overwrites the bytes of span i in data with spaces, keeping line
// breaks.
func (s *source) blank(data []byte, i int) {
	for j := s.spans[i].start; j < s.spans[i].end && j < len(data); j++ {
		if data[j] != '\n' && data[j] != '\r' {
			data[j] = ' '
		}
	}
}

// emptyEnv names the environment variables that the value at p refers to
// (without a :-default) and that are unset or empty, as in "the
// environment variable ORDERLY_ADMIN_TOKEN is not set"; "" when there are
// none.
func (s *source) emptyEnv(p keyPath) string {
	if s == nil {
		return ""
	}
	raw, ok := s.envRaw[p.id()]
	if !ok {
		return ""
	}
	_, refs, _ := expand(raw)
	var parts []string
	for _, r := range refs {
		if r.hasDefault {
			continue
		}
		switch v, set := os.LookupEnv(r.name); {
		case !set:
			parts = append(parts, "the environment variable "+r.name+" is not set")
		case v == "":
			parts = append(parts, "the environment variable "+r.name+" is empty")
		}
	}
	return strings.Join(parts, "; ")
}

// routeName returns the name of routes[i] as written, or "".
func (s *source) routeName(i int) string {
	if s == nil {
		return ""
	}
	return s.routeNames[i]
}

// position returns where the key at p is, or where its nearest ancestor
// present in the file is; ok is false when neither is.
func (s *source) position(p keyPath) (pos, bool) {
	if s == nil {
		return pos{}, false
	}
	for n := len(p); n > 0; n-- {
		if at, ok := s.keys[p[:n].id()]; ok {
			return at, true
		}
	}
	return pos{}, false
}

// pathAt turns the key go-toml reports at (line, col) into an indexed path:
// the longest path starting there, cut after as many keys as key has. Some
// go-toml errors give the key relative to its table: then the path found
// there is returned whole if it ends with key. pathAt returns nil when the
// two do not agree.
func (s *source) pathAt(line, col int, key []string) keyPath {
	p, ok := s.paths[pos{line, col}]
	if !ok || len(key) == 0 || p.names() < len(key) {
		return nil
	}
	if cut := p.prefixOf(key); cut != nil {
		return cut
	}
	var names []string
	for _, sg := range p {
		if sg.index < 0 {
			names = append(names, sg.name)
		}
	}
	if slices.Equal(names[len(names)-len(key):], key) {
		return p
	}
	return nil
}

// prefixOf returns p cut after its len(key)-th key (keeping the indices that
// follow it), if p's keys start with key; else nil.
func (p keyPath) prefixOf(key []string) keyPath {
	if len(key) == 0 || p.names() < len(key) {
		return nil
	}
	n, cut := 0, len(p)
	for i, sg := range p {
		if sg.index >= 0 {
			continue
		}
		if sg.name != key[n] {
			return nil
		}
		n++
		if n == len(key) {
			cut = i + 1
			for cut < len(p) && p[cut].index >= 0 {
				cut++
			}
			break
		}
	}
	return p[:cut]
}

func (s *source) offsetPos(off int) pos {
	line := sort.Search(len(s.lineStarts), func(i int) bool { return s.lineStarts[i] > off })
	return pos{line: line, col: off - s.lineStarts[line-1] + 1}
}

// lineStart returns the position of the first non-blank byte of at's line.
func (s *source) lineStart(at pos) pos {
	off := s.lineStarts[at.line-1]
	col := 1
	for off < len(s.data) && (s.data[off] == ' ' || s.data[off] == '\t') && col < at.col {
		off++
		col++
	}
	return pos{line: at.line, col: col}
}

func (s *source) nodePos(n *unstable.Node) pos { return s.offsetPos(int(n.Raw.Offset)) }

// offset returns the byte offset of at.
func (s *source) offset(at pos) int { return s.lineStarts[at.line-1] + at.col - 1 }

// record notes that the key at p starts at at (keeping the first position
// seen for p) and that p starts there.
func (s *source) record(p keyPath, at pos) {
	if _, ok := s.keys[p.id()]; !ok {
		s.keys[p.id()] = at
	}
	s.mark(p, at)
}

// mark notes that p starts at at, unless a longer path does.
func (s *source) mark(p keyPath, at pos) {
	if old, ok := s.paths[at]; !ok || len(old) < len(p) {
		s.paths[at] = p
	}
}

// maxDepth bounds the paths scan follows: the schema's deepest key,
// routes[i].requests[j].headers.name, has 6 steps. Without a bound, absurd
// documents (a key of 10000 dotted parts) would take quadratic time.
const maxDepth = 16

// scan reads the structure of a TOML document: positions of keys, values
// whose Go type makes decoding go wrong, ${...} references. It stops
// quietly at a syntax error, which decoding then reports.
func scan(file string, data []byte) *source {
	s := &source{
		file:       file,
		data:       data,
		keys:       make(map[string]pos),
		paths:      make(map[pos]keyPath),
		routeNames: make(map[int]string),
		envRaw:     make(map[string]string),
		lineStarts: []int{0},
	}
	for i, c := range data {
		if c == '\n' {
			s.lineStarts = append(s.lineStarts, i+1)
		}
	}
	unset := map[string]bool{}
	arrays := map[string]int{} // array tables seen so far: path id -> count
	var table keyPath
	skip := false // in a table too deep to be of the schema
	var p unstable.Parser
	p.Reset(data)
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			keys := keyNodes(e)
			if len(keys) == 0 {
				continue
			}
			// Keys of a header are placed at its '[' (where the line's text
			// starts), and go-toml's positions, at each key part, lead to
			// them too.
			header := s.lineStart(s.nodePos(keys[0]))
			s.spans = append(s.spans, span{start: s.offset(header), end: -1, header: true, array: e.Kind == unstable.ArrayTable})
			skip = len(keys) > maxDepth
			if skip {
				continue
			}
			cur := keyPath{}
			for i, k := range keys {
				cur = cur.key(string(k.Data))
				s.record(cur, header)
				s.mark(cur, s.nodePos(k))
				if i == len(keys)-1 && e.Kind == unstable.ArrayTable {
					n := arrays[cur.id()]
					arrays[cur.id()] = n + 1
					cur = cur.at(n)
					s.record(cur, header)
					s.mark(cur, s.nodePos(k))
					break
				}
				if n, ok := arrays[cur.id()]; ok {
					cur = cur.at(n - 1)
				}
			}
			table = cur
			s.spans[len(s.spans)-1].p = cur
			s.mark(cur, s.nodePos(keys[0])) // go-toml reports a header at its first key
			if t, inside := typeAt(cur); t == durationType {
				s.typeIssue(cur, header, durationMsg("a table", inside))
			}
		case unstable.KeyValue:
			if keys := keyNodes(e); len(keys) > 0 {
				sp := span{start: s.offset(s.lineStart(s.nodePos(keys[0]))), end: -1, p: table}
				if e.Raw.Length > 0 {
					sp.end = int(e.Raw.Offset + e.Raw.Length)
				}
				for _, k := range keys {
					sp.p = sp.p.key(string(k.Data))
				}
				s.spans = append(s.spans, sp)
			}
			if !skip {
				s.keyValue(table, e, unset)
			}
		}
	}
	// A table ends where the next header starts. After a syntax error
	// where the last one ends is unknown: it cannot be blanked.
	end := len(s.data)
	if p.Error() != nil {
		end = -1
	}
	for i := len(s.spans) - 1; i >= 0; i-- {
		if sp := &s.spans[i]; sp.header {
			sp.end = end
			end = sp.start
		}
	}
	s.data = nil // only needed while scanning; do not keep the caller's bytes
	s.unset = slices.Sorted(maps.Keys(unset))
	return s
}

// keyNodes returns the parts of the key of a KeyValue, Table or ArrayTable.
func keyNodes(n *unstable.Node) []*unstable.Node {
	var keys []*unstable.Node
	it := n.Key()
	for it.Next() {
		keys = append(keys, it.Node())
	}
	return keys
}

// keyValue records a key-value (and, inside its value, array elements and
// inline tables) under the table prefix.
func (s *source) keyValue(prefix keyPath, kv *unstable.Node, unset map[string]bool) {
	if t, _ := typeAt(prefix); t == durationType {
		return // inside a table that is a duration: reported at its header
	}
	keys := keyNodes(kv)
	if len(keys) == 0 || len(prefix)+len(keys) > maxDepth {
		return // nothing of the schema is that deep; decoding reports it
	}
	start := s.nodePos(keys[0])
	full := prefix
	for i, k := range keys {
		full = full.key(string(k.Data))
		if i == len(keys)-1 {
			s.record(full, start) // a dotted key is placed where it starts
			s.mark(full, s.nodePos(k))
		} else {
			s.record(full, s.nodePos(k))
		}
		if t, inside := typeAt(full); t == durationType && i < len(keys)-1 {
			s.typeIssue(full, s.nodePos(k), durationMsg("a table", inside))
			return
		}
	}
	s.value(full, kv.Value(), start, unset)
}

// value records the value v of the key at p.
func (s *source) value(p keyPath, v *unstable.Node, keyAt pos, unset map[string]bool) {
	at := keyAt
	if v.Raw.Length > 0 {
		at = s.nodePos(v)
		s.mark(p, at)
	}
	t, inside := typeAt(p)
	isDuration := t == durationType
	if isDuration && v.Kind != unstable.String {
		switch v.Kind {
		case unstable.Integer, unstable.Float:
			if _, err := time.ParseDuration(string(v.Data)); err != nil || inside {
				s.typeIssue(p, at, durationMsg("the number "+string(v.Data), inside))
			}
		default:
			s.typeIssue(p, at, durationMsg(kindName(v.Kind), inside))
		}
		return
	}
	switch v.Kind {
	case unstable.String:
		if isDuration && inside {
			s.typeIssue(p, at, durationMsg("a table", true))
			return
		}
		if len(p) == 3 && p[0].name == "routes" && p[1].index >= 0 && p[2].name == "name" {
			s.routeNames[p[1].index] = string(v.Data)
		}
		_, refs, err := expand(string(v.Data))
		if len(refs) > 0 {
			s.envRaw[p.id()] = string(v.Data)
		}
		if err != nil {
			if isDuration {
				s.typeIssue(p, at, err.Error())
			} else {
				s.envIssues = append(s.envIssues, issue{p, at, err.Error(), -1})
			}
		}
		for _, r := range refs {
			if !r.set && !r.hasDefault {
				unset[r.name] = true
			}
		}
	case unstable.Array:
		if len(p) >= maxDepth {
			return
		}
		i := 0
		for it := v.Children(); it.Next(); {
			el := it.Node()
			if el.Kind == unstable.Comment {
				continue
			}
			ep := p.at(i)
			i++
			elAt := at
			if el.Raw.Length > 0 {
				elAt = s.nodePos(el)
			}
			s.record(ep, elAt)
			s.value(ep, el, elAt, unset)
		}
	case unstable.InlineTable:
		for it := v.Children(); it.Next(); {
			if kv := it.Node(); kv.Kind == unstable.KeyValue {
				s.keyValue(p, kv, unset)
			}
		}
	}
}

// typeIssue records a value decoding would mishandle.
func (s *source) typeIssue(p keyPath, at pos, msg string) {
	s.typeIssues = append(s.typeIssues, issue{p, at, msg, len(s.spans) - 1})
}

func durationMsg(got string, inside bool) string {
	if inside {
		got = "a table"
	}
	return `must be a quoted Go duration such as "1s" or "250ms", not ` + got
}

func kindName(k unstable.Kind) string {
	switch k {
	case unstable.Bool:
		return "a boolean"
	case unstable.Array:
		return "an array"
	case unstable.InlineTable, unstable.Table, unstable.ArrayTable:
		return "a table"
	case unstable.LocalDate, unstable.LocalTime, unstable.LocalDateTime, unstable.DateTime:
		return "a date or time"
	case unstable.Integer:
		return "an integer"
	case unstable.Float:
		return "a float"
	case unstable.String:
		return "a string"
	default:
		return "a " + strings.ToLower(k.String())
	}
}

var durationType = reflect.TypeOf(Duration{})

// typeAt returns the Go type that holds the value at p in a Config, or nil
// when there is none (an unknown key, or inside a map[string]any). inside
// is true when p goes into a Duration (which has no keys).
func typeAt(p keyPath) (t reflect.Type, inside bool) {
	t = reflect.TypeOf(Config{})
	for i, s := range p {
		for t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if t == durationType {
			return t, i < len(p)
		}
		switch {
		case s.index >= 0 && (t.Kind() == reflect.Slice || t.Kind() == reflect.Array):
			t = t.Elem()
		case s.index < 0 && t.Kind() == reflect.Map:
			t = t.Elem()
		case s.index < 0 && t.Kind() == reflect.Struct:
			f, ok := fieldByTag(t, s.name)
			if !ok {
				return nil, false
			}
			t = f.Type
		default:
			return nil, false
		}
		if t.Kind() == reflect.Interface {
			return nil, false
		}
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	return t, false
}

// fieldByTag finds the field of struct type t whose toml tag is name.
func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if tag := strings.Split(f.Tag.Get("toml"), ",")[0]; tag == name && tag != "-" && f.IsExported() {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// describe names what a value of Go type t is written as in TOML.
func describe(t reflect.Type) string {
	if t == nil {
		return ""
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == durationType {
		return `a quoted Go duration such as "1s"`
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.Slice, reflect.Array:
		el := t.Elem()
		for el.Kind() == reflect.Pointer {
			el = el.Elem()
		}
		if el.Kind() == reflect.Struct && el != durationType {
			return "an array of tables"
		}
		switch describe(el) {
		case "a string":
			return "an array of strings"
		case "an integer":
			return "an array of integers"
		case "a number":
			return "an array of numbers"
		}
		return "an array"
	case reflect.Map, reflect.Struct:
		return "a table"
	}
	return ""
}
