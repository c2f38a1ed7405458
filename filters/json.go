package filters

import (
	"encoding/json"
	"strconv"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// This file holds the JSON decoder behind `value` (expressions) and .Value
// (templates).
//
// Why not encoding/json: the two consumers want different numbers. Templates
// must print {{ .Value.id }} exactly as the producer wrote it (an id of
// 12345678901234567890 must not become 1.2345678901234567e+19), which asks for
// json.Number; expressions must compare value.amount > 100, which json.Number
// (a string type) cannot do in expr. Decoding twice with encoding/json, or
// once with UseNumber and converting in a second walk, allocates more than
// this decoder, which makes one pass over the message (copied once into a
// string) and builds both trees at once:
//
//   - strings without escapes are substrings of that one copy (no allocation
//     besides boxing them into an interface);
//   - an integer literal that fits an int and prints back identically (not
//     "-0") is an int, shared by both trees;
//   - any other number is a json.Number holding the literal in the template
//     tree and a float64 (±Inf when out of range) in the expression tree;
//   - an object or array whose members are all shared is itself shared, so
//     the trees only fork where a number needs it.
//
// It also decodes only what the routes read: Compile collects the paths
// below `value` and .Value that expressions and templates use (value.type,
// .Value.customer.id) into a pathTrie, and the decoder builds only those
// members of objects, only checking the syntax of the rest. A path used as a
// whole (len(value.items), {{ json .Value }}, value[key]) is built entirely.
//
// Otherwise it follows encoding/json: the same grammar (RFC 8259, with the
// same maximum nesting depth), invalid UTF-8 and lone surrogates in strings
// become U+FFFD, the last of duplicate object keys wins. FuzzDecodeJSON checks
// the equivalence against encoding/json.
//
// Why it stays (it was weighed against gjson and encoding/json): a route that
// reads the value decodes it once per message, and the replacement that keeps
// both number behaviours (encoding/json with UseNumber, then a second walk
// for the expression tree) costs about 2.5 times as much CPU and 3 times the
// allocations (BenchmarkDecode). At Orderly's 0 ms rate on 2 cores a message
// has about 80 µs of CPU in all, so the difference is over 10% of the
// throughput of a route with a `when` on the value, more than the 5% a
// hand-written decoder must earn. gjson reads paths without allocating but
// yields strings and results, not the maps and numbers expressions and
// templates work with. A route that reads no value (orderly-bench's routes
// post {{ .Key }}) never runs the decoder.

// decodeMode says which trees to build.
type decodeMode uint8

const (
	modeTemplate decodeMode = 1 << iota // json.Number for non-canonical numbers
	modeExpr                            // float64 for non-canonical numbers
)

// maxJSONDepth is encoding/json's nesting limit.
const maxJSONDepth = 10000

// jsonSyntaxError is a syntax error in a message value.
type jsonSyntaxError struct {
	msg    string
	offset int
}

func (e *jsonSyntaxError) Error() string {
	if e.offset < 0 {
		return e.msg
	}
	return e.msg + " (offset " + strconv.Itoa(e.offset) + ")"
}

// Is makes every syntax error match ErrNotJSON.
func (e *jsonSyntaxError) Is(target error) bool { return target == ErrNotJSON }

// errEmptyValue is the syntax error of an empty value.
var errEmptyValue = &jsonSyntaxError{msg: "the value is empty", offset: -1}

// member is one decoded object member, kept on a scratch stack until the
// object is complete so that its map can be made with the exact size.
type member struct {
	key  string
	t, e any
}

// pathTrie is the set of paths below the value that a route reads. A full
// node is read as a whole; otherwise only the members named in kids are.
type pathTrie struct {
	full bool
	kids map[string]*pathTrie
}

// fullTrie is the trie of a value read as a whole.
var fullTrie = &pathTrie{full: true}

// add adds path (nil: the whole value) to p.
func (p *pathTrie) add(path []string) {
	for _, k := range path {
		if p.full {
			return // fullTrie included: it is never written
		}
		if p.kids[k] == nil {
			if p.kids == nil {
				p.kids = make(map[string]*pathTrie)
			}
			p.kids[k] = &pathTrie{}
		}
		p = p.kids[k]
	}
	if !p.full {
		p.full, p.kids = true, nil
	}
}

// addKind adds the nodes of path to p without reading the last one whole:
// an object there is built without members, enough to know it is one.
func (p *pathTrie) addKind(path []string) {
	for _, k := range path {
		if p.full {
			return
		}
		if p.kids[k] == nil {
			if p.kids == nil {
				p.kids = make(map[string]*pathTrie)
			}
			p.kids[k] = &pathTrie{}
		}
		p = p.kids[k]
	}
}

// union returns a new trie with the paths of p and q (either may be nil).
func union(p, q *pathTrie) *pathTrie {
	switch {
	case p == nil && q == nil:
		return nil
	case p == nil:
		p, q = q, nil
	}
	if p.full || (q != nil && q.full) {
		return fullTrie
	}
	u := &pathTrie{kids: make(map[string]*pathTrie)}
	for k, c := range p.kids {
		u.kids[k] = union(c, nil)
	}
	if q != nil {
		for k, c := range q.kids {
			u.kids[k] = union(u.kids[k], c)
		}
	}
	return u
}

// child is the trie of member k of an object read through p (nil: skip it).
func (p *pathTrie) child(k string) *pathTrie {
	if p.full {
		return p
	}
	return p.kids[k]
}

// decoder decodes one JSON document. Its scratch stacks are reused between
// documents; a decoder is not safe for concurrent use.
type decoder struct {
	s     string
	i     int
	mode  decodeMode
	depth int
	mems  []member // pending object members, innermost object last
	elems []any    // pending array elements (template tree, or the only tree)
	exprs []any    // pending array elements of the expression tree
}

// decode parses s as one JSON document and returns the template tree, the
// expression tree, or both, as mode asks, with the parts that paths names.
// The whole document is checked.
func (d *decoder) decode(s string, mode decodeMode, paths *pathTrie) (t, e any, err error) {
	d.s, d.i, d.mode, d.depth = s, 0, mode, 0
	defer d.release()
	t, e, _, err = d.value(paths)
	if err != nil {
		return nil, nil, err
	}
	d.skipSpace()
	if d.i < len(d.s) {
		return nil, nil, d.errChar("after top-level value")
	}
	return t, e, nil
}

// release drops the references the decoder holds so that a pooled decoder
// keeps no message alive.
func (d *decoder) release() {
	d.s = ""
	clear(d.mems[:cap(d.mems)])
	d.mems = d.mems[:0]
	clear(d.elems[:cap(d.elems)])
	d.elems = d.elems[:0]
	clear(d.exprs[:cap(d.exprs)])
	d.exprs = d.exprs[:0]
}

func (d *decoder) skipSpace() {
	for d.i < len(d.s) {
		switch d.s[d.i] {
		case ' ', '\t', '\n', '\r':
			d.i++
		default:
			return
		}
	}
}

// value decodes the value at d.i, the parts of it that p names; with a nil
// p it only checks the syntax. split reports that t and e differ (the
// subtree holds a number the two trees represent differently).
func (d *decoder) value(p *pathTrie) (t, e any, split bool, err error) {
	d.skipSpace()
	if d.i >= len(d.s) {
		return nil, nil, false, d.errEOF()
	}
	switch c := d.s[d.i]; {
	case c == '{':
		return d.object(p)
	case c == '[':
		return d.array(p)
	case c == '"':
		if p == nil {
			return nil, nil, false, d.skipString()
		}
		s, err := d.str()
		if err != nil {
			return nil, nil, false, err
		}
		v := any(s)
		return v, v, false, nil
	case c == '-' || ('0' <= c && c <= '9'):
		return d.number(p != nil)
	case c == 't':
		return true, true, false, d.literal("true")
	case c == 'f':
		return false, false, false, d.literal("false")
	case c == 'n':
		return nil, nil, false, d.literal("null")
	default:
		return nil, nil, false, d.errChar("looking for beginning of value")
	}
}

func (d *decoder) literal(lit string) error {
	for k := 0; k < len(lit); k++ {
		if d.i >= len(d.s) {
			return d.errEOF()
		}
		if d.s[d.i] != lit[k] {
			return d.errChar("in literal " + lit + " (expecting " + quoteChar(lit[k]) + ")")
		}
		d.i++
	}
	return nil
}

// object decodes an object. Of a partial p, only the members in p.kids are
// built (an array or scalar where p expects an object is built whole).
func (d *decoder) object(p *pathTrie) (t, e any, split bool, err error) {
	d.i++ // '{'
	if d.depth++; d.depth > maxJSONDepth {
		return nil, nil, false, &jsonSyntaxError{msg: "exceeded max depth", offset: d.i - 1}
	}
	base := len(d.mems)
	defer func() {
		clear(d.mems[base:])
		d.mems = d.mems[:base]
		d.depth--
	}()
	d.skipSpace()
	if d.i < len(d.s) && d.s[d.i] == '}' {
		d.i++
		if p == nil {
			return nil, nil, false, nil
		}
		return d.makeObject(base, false)
	}
	for more := true; more; {
		d.skipSpace()
		if d.i >= len(d.s) {
			return nil, nil, false, d.errEOF()
		}
		if d.s[d.i] != '"' {
			return nil, nil, false, d.errChar("looking for beginning of object key string")
		}
		var key string
		if p == nil {
			err = d.skipString()
		} else {
			key, err = d.str()
		}
		if err != nil {
			return nil, nil, false, err
		}
		d.skipSpace()
		if d.i >= len(d.s) {
			return nil, nil, false, d.errEOF()
		}
		if d.s[d.i] != ':' {
			return nil, nil, false, d.errChar("after object key")
		}
		d.i++
		var c *pathTrie
		if p != nil {
			c = p.child(key)
		}
		vt, ve, vsplit, err := d.value(c)
		if err != nil {
			return nil, nil, false, err
		}
		if c != nil {
			split = split || vsplit
			d.mems = append(d.mems, member{key: key, t: vt, e: ve})
		}
		if more, err = d.more('}', "after object key:value pair"); err != nil {
			return nil, nil, false, err
		}
	}
	if p == nil {
		return nil, nil, false, nil
	}
	return d.makeObject(base, split)
}

// more reads the separator after a member or element: true after a comma,
// false after close (the end of the object or array).
func (d *decoder) more(close byte, context string) (bool, error) {
	d.skipSpace()
	if d.i >= len(d.s) {
		return false, d.errEOF()
	}
	switch d.s[d.i] {
	case ',':
		d.i++
		return true, nil
	case close:
		d.i++
		return false, nil
	}
	return false, d.errChar(context)
}

// makeObject builds the map(s) of the members above base.
func (d *decoder) makeObject(base int, split bool) (t, e any, _ bool, _ error) {
	mems := d.mems[base:]
	both := d.mode == modeTemplate|modeExpr
	tm := make(map[string]any, len(mems))
	for _, m := range mems {
		tm[m.key] = m.t // in a single mode, m.t and m.e are the same
	}
	if !both || !split {
		return tm, tm, false, nil
	}
	em := make(map[string]any, len(mems))
	for _, m := range mems {
		em[m.key] = m.e
	}
	return tm, em, true, nil
}

// array decodes an array: whole, or with a nil p, only checked.
func (d *decoder) array(p *pathTrie) (t, e any, split bool, err error) {
	d.i++ // '['
	if d.depth++; d.depth > maxJSONDepth {
		return nil, nil, false, &jsonSyntaxError{msg: "exceeded max depth", offset: d.i - 1}
	}
	both := d.mode == modeTemplate|modeExpr
	base, ebase := len(d.elems), len(d.exprs)
	defer func() {
		clear(d.elems[base:])
		d.elems = d.elems[:base]
		clear(d.exprs[ebase:])
		d.exprs = d.exprs[:ebase]
		d.depth--
	}()
	if p != nil {
		p = fullTrie // elements are read by index: build them whole
	}
	d.skipSpace()
	if d.i < len(d.s) && d.s[d.i] == ']' {
		d.i++
		if p == nil {
			return nil, nil, false, nil
		}
		a := []any{}
		return a, a, false, nil
	}
	for more := true; more; {
		vt, ve, vsplit, err := d.value(p)
		if err != nil {
			return nil, nil, false, err
		}
		if p != nil {
			split = split || vsplit
			d.elems = append(d.elems, vt) // in a single mode, vt and ve are the same
			if both {
				d.exprs = append(d.exprs, ve)
			}
		}
		if more, err = d.more(']', "after array element"); err != nil {
			return nil, nil, false, err
		}
	}
	if p == nil {
		return nil, nil, false, nil
	}
	ta := append([]any(nil), d.elems[base:]...)
	if !both || !split {
		return ta, ta, false, nil
	}
	ea := append([]any(nil), d.exprs[ebase:]...)
	return ta, ea, true, nil
}

// number decodes a number literal, or with build false only checks it.
func (d *decoder) number(build bool) (t, e any, split bool, err error) {
	s, start := d.s, d.i
	i := start
	if s[i] == '-' {
		i++
	}
	if i >= len(s) {
		d.i = i
		return nil, nil, false, d.errEOF()
	}
	switch c := s[i]; {
	case c == '0':
		i++
	case '1' <= c && c <= '9':
		for i++; i < len(s) && '0' <= s[i] && s[i] <= '9'; i++ {
		}
	default:
		d.i = i
		return nil, nil, false, d.errChar("in numeric literal")
	}
	integer := true
	if i < len(s) && s[i] == '.' {
		integer = false
		i++
		if d.i = i; i >= len(s) {
			return nil, nil, false, d.errEOF()
		}
		if s[i] < '0' || s[i] > '9' {
			return nil, nil, false, d.errChar("after decimal point in numeric literal")
		}
		for ; i < len(s) && '0' <= s[i] && s[i] <= '9'; i++ {
		}
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		integer = false
		i++
		if i < len(s) && (s[i] == '+' || s[i] == '-') {
			i++
		}
		if d.i = i; i >= len(s) {
			return nil, nil, false, d.errEOF()
		}
		if s[i] < '0' || s[i] > '9' {
			return nil, nil, false, d.errChar("in exponent of numeric literal")
		}
		for ; i < len(s) && '0' <= s[i] && s[i] <= '9'; i++ {
		}
	}
	d.i = i
	if !build {
		return nil, nil, false, nil
	}
	lit := s[start:i]
	if integer {
		if n, err := strconv.ParseInt(lit, 10, strconv.IntSize); err == nil {
			v := any(int(n))
			if lit != "-0" || d.mode&modeTemplate == 0 {
				return v, v, false, nil
			}
			// "-0" prints back as "0": the template tree keeps the literal.
			nt := any(json.Number(lit))
			if d.mode&modeExpr == 0 {
				return nt, nt, false, nil
			}
			return nt, v, true, nil
		}
	}
	var ev any
	if d.mode&modeExpr != 0 {
		f, _ := strconv.ParseFloat(lit, 64) // valid syntax: only ErrRange, with ±Inf
		ev = f
	}
	if d.mode&modeTemplate == 0 {
		return ev, ev, false, nil
	}
	return json.Number(lit), ev, d.mode&modeExpr != 0, nil
}

// str decodes the string literal at d.i (which is '"').
func (d *decoder) str() (string, error) {
	s := d.s
	start := d.i + 1
	ascii := true
	for i := start; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"':
			d.i = i + 1
			lit := s[start:i]
			if !ascii && !utf8.ValidString(lit) {
				return string(appendValid(make([]byte, 0, len(lit)+8), lit)), nil
			}
			return lit, nil
		case c == '\\':
			return d.unquote(start, i)
		case c < 0x20:
			d.i = i
			return "", d.errChar("in string literal")
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	d.i = len(s)
	return "", d.errEOF()
}

// skipString checks the string literal at d.i (which is '"').
func (d *decoder) skipString() error {
	s := d.s
	for i := d.i + 1; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"':
			d.i = i + 1
			return nil
		case c < 0x20:
			d.i = i
			return d.errChar("in string literal")
		case c == '\\':
			i++
			if i >= len(s) {
				d.i = i
				return d.errEOF()
			}
			switch s[i] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
			case 'u':
				if _, ok, err := d.hex4(i + 1); !ok {
					return err
				}
				i += 4
			default:
				d.i = i
				return d.errChar("in string escape code")
			}
		}
	}
	d.i = len(s)
	return d.errEOF()
}

// unquote decodes a string literal starting at start that has an escape at
// esc, the slow path of str.
func (d *decoder) unquote(start, esc int) (string, error) {
	s := d.s
	b := make([]byte, 0, len(s[start:esc])+16)
	b = appendValid(b, s[start:esc])
	i := esc
	for i < len(s) {
		c := s[i]
		switch {
		case c == '"':
			d.i = i + 1
			return string(b), nil
		case c < 0x20:
			d.i = i
			return "", d.errChar("in string literal")
		case c != '\\':
			j := i + 1
			for j < len(s) && s[j] != '"' && s[j] != '\\' && s[j] >= 0x20 {
				j++
			}
			b = appendValid(b, s[i:j])
			i = j
			continue
		}
		// Backslash.
		i++
		if i >= len(s) {
			d.i = i
			return "", d.errEOF()
		}
		switch s[i] {
		case '"', '\\', '/':
			b = append(b, s[i])
		case 'b':
			b = append(b, '\b')
		case 'f':
			b = append(b, '\f')
		case 'n':
			b = append(b, '\n')
		case 'r':
			b = append(b, '\r')
		case 't':
			b = append(b, '\t')
		case 'u':
			r, ok, err := d.hex4(i + 1)
			if !ok {
				return "", err
			}
			i += 4
			if utf16.IsSurrogate(r) {
				// A pair is two escapes: \uD83D\uDE00. Anything else is
				// replaced, as encoding/json does.
				if i+2 < len(s) && s[i+1] == '\\' && s[i+2] == 'u' {
					if r2, ok, _ := d.hex4(i + 3); ok {
						if dec := utf16.DecodeRune(r, r2); dec != unicode.ReplacementChar {
							b = utf8.AppendRune(b, dec)
							i += 7
							continue
						}
					}
				}
				r = unicode.ReplacementChar
			}
			b = utf8.AppendRune(b, r)
		default:
			d.i = i
			return "", d.errChar("in string escape code")
		}
		i++
	}
	d.i = len(s)
	return "", d.errEOF()
}

// hex4 reads the four hex digits of a \u escape at i. Without an error it
// only reports whether they are there (used to look ahead for a surrogate
// pair).
func (d *decoder) hex4(i int) (rune, bool, error) {
	var r rune
	for k := 0; k < 4; k++ {
		if i+k >= len(d.s) {
			d.i = len(d.s)
			return 0, false, d.errEOF()
		}
		c := d.s[i+k]
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			c = c - 'A' + 10
		default:
			d.i = i + k
			return 0, false, d.errChar("in \\u hexadecimal character escape")
		}
		r = r<<4 | rune(c)
	}
	return r, true, nil
}

// appendValid appends s to b with every invalid UTF-8 byte replaced by
// U+FFFD, as encoding/json does.
func appendValid(b []byte, s string) []byte {
	for len(s) > 0 {
		r, size := utf8.DecodeRuneInString(s)
		if r == utf8.RuneError && size == 1 {
			b = append(b, "\uFFFD"...)
		} else {
			b = append(b, s[:size]...)
		}
		s = s[size:]
	}
	return b
}

func (d *decoder) errEOF() error {
	return &jsonSyntaxError{msg: "unexpected end of JSON input", offset: len(d.s)}
}

func (d *decoder) errChar(context string) error {
	return &jsonSyntaxError{msg: "invalid character " + quoteChar(d.s[d.i]) + " " + context, offset: d.i}
}

// quoteChar formats c as encoding/json does in its syntax errors.
func quoteChar(c byte) string {
	if c == '\'' {
		return `'\''`
	}
	if c == '"' {
		return `'"'`
	}
	s := strconv.Quote(string(rune(c)))
	return "'" + s[1:len(s)-1] + "'"
}
