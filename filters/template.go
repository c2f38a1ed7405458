package filters

import (
	"bytes"
	"crypto/md5"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// needs says what of a message an expression or template reads, so that
// Plan builds only that.
type needs uint8

const (
	needKey       needs = 1 << iota // the key as a string
	needRaw                         // the value as a string
	needHeaders                     // the headers map
	needValueExpr                   // the value decoded for expressions
	needValueTpl                    // the value decoded for templates

	needValue = needValueExpr | needValueTpl
	needAll   = needKey | needRaw | needHeaders | needValueTpl // of a template
)

// tplData is the data of every template. One lives in every pooled state.
type tplData struct {
	Key       string
	Raw       string
	Value     any
	Headers   map[string]string
	Topic     string
	Partition int
	Offset    int
	Timestamp time.Time
	// Responses are the answers to the message's earlier requests, read
	// as (index .Responses N) (see responseIndex); nil on the fast path.
	Responses []*tplResponse
}

// tplResponse is an earlier request's answer as templates read it.
type tplResponse struct {
	Status  int
	Headers map[string]string // the first value of each header
	Body    string
	r       *Response
	json    any
	jsonErr error
	decoded bool
}

// JSON decodes the body (numbers keep their literal); a body that is not
// JSON, or was cut at MaxResponseBody, is an error.
func (r *tplResponse) JSON() (any, error) {
	if !r.decoded {
		r.decoded = true
		if r.r.Truncated {
			r.jsonErr = fmt.Errorf("the response body is over %d bytes: not decoded", MaxResponseBody)
		} else {
			d := json.NewDecoder(bytes.NewReader(r.r.Body))
			d.UseNumber()
			if err := d.Decode(&r.json); err != nil {
				r.jsonErr = fmt.Errorf("the response body is not JSON: %w", err)
			}
		}
	}
	return r.json, r.jsonErr
}

// newTplResponses returns rs as templates read them.
func newTplResponses(rs []Response) []*tplResponse {
	out := make([]*tplResponse, len(rs))
	for i := range rs {
		r := &rs[i]
		h := make(map[string]string, len(r.Header))
		for k, v := range r.Header {
			if len(v) > 0 {
				h[k] = v[0]
			}
		}
		out[i] = &tplResponse{Status: r.Status, Headers: h, Body: string(r.Body), r: r}
	}
	return out
}

// dataField identifies a field of tplData (or literal text) in a fast-path
// segment.
type dataField uint8

const (
	fieldText dataField = iota
	fieldKey
	fieldRaw
	fieldValue
	fieldHeaders
	fieldTopic
	fieldPartition
	fieldOffset
	fieldTimestamp
)

var dataFields = map[string]dataField{
	"Key":       fieldKey,
	"Raw":       fieldRaw,
	"Value":     fieldValue,
	"Headers":   fieldHeaders,
	"Topic":     fieldTopic,
	"Partition": fieldPartition,
	"Offset":    fieldOffset,
	"Timestamp": fieldTimestamp,
}

// needs is what reading the field needs.
func (f dataField) needs() needs {
	switch f {
	case fieldKey:
		return needKey
	case fieldRaw:
		return needRaw
	case fieldValue:
		return needValueTpl
	case fieldHeaders:
		return needHeaders
	}
	return 0
}

// segment is one piece of a template on the fast path: literal text, or a
// field printed as text/template would print it, escaped as esc says.
type segment struct {
	field dataField
	text  string   // fieldText
	path  []string // fieldValue: map keys below .Value; fieldHeaders: the header
	esc   urlPart  // in a URL, the part it prints into; urlOrigin: not escaped
}

// text is a compiled template (or a plain string).
type text struct {
	static bool   // no actions: str is the result
	str    string // the static result
	t      *template.Template
	// segs renders the common shapes (text and {{ .Field.path }} actions)
	// without text/template; nil when the template has another shape. When
	// a segment cannot be rendered (a missing key, a value printed in a way
	// the fast path does not copy), the template is executed instead, so
	// the result and the errors are always text/template's.
	segs  []segment
	raw   bool      // exactly {{ .Raw }}: the value bytes
	need  needs     // what executing t needs
	fast  needs     // what segs needs (no string copies of the key or value)
	value *pathTrie // what of .Value the template reads
	// responses is 1 + the highest N of the (index .Responses N) it reads:
	// the earlier requests whose answers it needs (0: none).
	responses int
}

// needs is what rendering tx needs up front; the fast path needs less.
func (tx *text) needs() needs {
	if tx.static {
		return 0
	}
	if tx.segs != nil {
		return tx.fast
	}
	return tx.need
}

// funcs are the functions templates have besides the builtins; the package
// doc lists them. The two escapers are added to the actions of URL templates
// (see escapeURL).
var funcs = template.FuncMap{
	"json":       toJSON,
	"pathescape": func(v any) string { return url.PathEscape(toString(v)) },
	"raw":        toString,
	"default":    defaultValue,
	"lower":      func(v any) string { return strings.ToLower(toString(v)) },
	"upper":      func(v any) string { return strings.ToUpper(toString(v)) },
	"md5":        hashFunc(func(b []byte) []byte { s := md5.Sum(b); return s[:] }),
	"sha256":     hashFunc(func(b []byte) []byte { s := sha256.Sum256(b); return s[:] }),
	"b64enc":     b64enc,
	"b64dec":     b64dec,
	escPathFunc:  func(v any) string { return url.PathEscape(toString(v)) },
	escQueryFunc: func(v any) string { return url.QueryEscape(toString(v)) },
	rangeFunc:    rangeable,
}

// maxRangeCount is the most iterations a {{ range }} over a number may
// make: text/template ranges over an integer, and a message's number
// would otherwise set how long rendering runs (a body that prints nothing
// never hits maxRendered).
const maxRangeCount = 10000

// rangeable passes v on to a range, unless it is an integer above
// maxRangeCount.
func rangeable(v any) (any, error) {
	if rv := reflect.ValueOf(v); rv.CanInt() && rv.Int() > maxRangeCount || rv.CanUint() && rv.Uint() > maxRangeCount {
		return nil, fmt.Errorf("range over the number %v: at most %d iterations", v, maxRangeCount)
	}
	return v, nil
}

// compileText compiles src, named name in errors.
func compileText(name, src string) (*text, error) {
	if !strings.Contains(src, "{{") {
		return &text{static: true, str: src}, nil
	}
	t, err := template.New(name).Option("missingkey=error").Funcs(funcs).Parse(src)
	if err != nil {
		return nil, err
	}
	if t.Tree == nil || t.Tree.Root == nil {
		return nil, fmt.Errorf("template: %s: defines templates but renders nothing", name)
	}
	tx := &text{t: t}
	var errs []error
	for _, sub := range t.Templates() {
		if sub.Tree == nil {
			continue
		}
		a := analyzer{tree: sub.Tree}
		ctx := dotRoot
		if sub != t {
			ctx = dotUnknown // called with any data: {{ template "x" .Value }}
		}
		a.list(sub.Tree.Root, ctx)
		tx.need |= a.needs
		tx.value = union(tx.value, a.value)
		tx.responses = max(tx.responses, a.responses)
		errs = append(errs, a.errs...)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(t.Templates()) == 1 {
		tx.segs, tx.fast = fastSegments(t.Tree.Root)
		tx.raw = len(tx.segs) == 1 && tx.segs[0].field == fieldRaw
	}
	return tx, nil
}

// fastSegments returns the segments of a template made only of text and
// {{ .Field }} / {{ .Value.a.b }} / {{ .Headers.name }} actions, or nil.
func fastSegments(root *parse.ListNode) ([]segment, needs) {
	var segs []segment
	var n needs
	for _, node := range root.Nodes {
		switch node := node.(type) {
		case *parse.TextNode:
			segs = append(segs, segment{field: fieldText, text: string(node.Text)})
		case *parse.ActionNode:
			p := node.Pipe
			if len(p.Decl) > 0 || len(p.Cmds) != 1 || len(p.Cmds[0].Args) != 1 {
				return nil, 0
			}
			f, ok := p.Cmds[0].Args[0].(*parse.FieldNode)
			if !ok {
				return nil, 0
			}
			field := dataFields[f.Ident[0]]
			path := f.Ident[1:]
			switch field {
			case fieldValue:
			case fieldHeaders:
				if len(path) != 1 {
					return nil, 0
				}
			case fieldKey, fieldRaw, fieldTopic, fieldPartition, fieldOffset:
				if len(path) != 0 {
					return nil, 0
				}
			default:
				return nil, 0
			}
			segs = append(segs, segment{field: field, path: path})
			if field == fieldValue || field == fieldHeaders {
				n |= field.needs()
			}
		default:
			return nil, 0
		}
	}
	if len(segs) == 0 {
		return nil, 0
	}
	return segs, n
}

// dotCtx says what dot is at a point of a template.
type dotCtx uint8

const (
	dotRoot    dotCtx = iota // the template data: fields are checked
	dotDerived               // something taken from the data (inside with/range)
	dotUnknown               // possibly the data (a {{ define }} body)
)

// analyzer walks a template to find what it reads and to reject unknown
// top-level fields.
type analyzer struct {
	tree  *parse.Tree
	needs needs
	value *pathTrie // the paths below .Value read (see pathTrie)
	// responses is 1 + the highest N of (index .Responses N) read.
	responses int
	errs      []error
}

// all records that the whole data is read ({{ . }}, {{ $ }}).
func (a *analyzer) all() {
	a.needs |= needAll
	a.value = fullTrie
}

func (a *analyzer) list(l *parse.ListNode, ctx dotCtx) {
	if l == nil {
		return
	}
	for _, n := range l.Nodes {
		a.node(n, ctx)
	}
}

func (a *analyzer) node(n parse.Node, ctx dotCtx) {
	switch n := n.(type) {
	case *parse.ListNode:
		a.list(n, ctx)
	case *parse.ActionNode:
		a.node(n.Pipe, ctx)
	case *parse.IfNode:
		a.node(n.Pipe, ctx)
		a.list(n.List, ctx)
		a.list(n.ElseList, ctx)
	case *parse.RangeNode:
		a.node(n.Pipe, ctx)
		if cmds := n.Pipe.Cmds; len(cmds) > 0 {
			pos := cmds[len(cmds)-1].Pos
			n.Pipe.Cmds = append(cmds, &parse.CommandNode{NodeType: parse.NodeCommand, Pos: pos,
				Args: []parse.Node{parse.NewIdentifier(rangeFunc).SetTree(a.tree).SetPos(pos)}})
		}
		a.list(n.List, dotDerived)
		a.list(n.ElseList, ctx)
	case *parse.WithNode:
		a.node(n.Pipe, ctx)
		a.list(n.List, dotDerived)
		a.list(n.ElseList, ctx)
	case *parse.TemplateNode:
		if n.Pipe != nil {
			a.node(n.Pipe, ctx)
		}
	case *parse.PipeNode:
		if n == nil {
			return
		}
		for _, c := range n.Cmds {
			a.node(c, ctx)
		}
	case *parse.CommandNode:
		args := n.Args
		if i, ok := responseIndex(n); ok && ctx != dotDerived {
			a.responses = max(a.responses, i+1)
			args = args[3:] // index .Responses N: read; what follows as usual
		}
		for _, arg := range args {
			a.node(arg, ctx)
		}
	case *parse.ChainNode:
		a.node(n.Node, ctx)
	case *parse.FieldNode:
		a.field(n, n.Ident, ctx)
	case *parse.VariableNode:
		if n.Ident[0] == "$" {
			if len(n.Ident) == 1 {
				a.all()
			} else {
				a.field(n, n.Ident[1:], dotRoot)
			}
		}
	case *parse.DotNode:
		if ctx != dotDerived {
			a.all()
		}
	}
}

// field records a field chain read from dot (or $) in ctx. Inside with and
// range, dot is not the data: its fields are none of the data's.
func (a *analyzer) field(n parse.Node, ident []string, ctx dotCtx) {
	if ctx == dotDerived {
		return
	}
	f, known := dataFields[ident[0]]
	if known {
		a.needs |= f.needs()
	}
	if f == fieldValue {
		// .Value.a.b reads a.b whole; any other use of .Value (index,
		// json, with, range) is a chain ending at .Value: the whole value.
		if a.value == nil {
			a.value = &pathTrie{}
		}
		a.value.add(ident[1:])
	}
	if ctx != dotRoot {
		return
	}
	switch {
	case ident[0] == "Responses":
		loc, _ := a.tree.ErrorContext(n)
		a.errs = append(a.errs, fmt.Errorf("template: %s: read an earlier response as (index .Responses N), N a number: (index .Responses 0).JSON.id", loc))
	case !known:
		loc, _ := a.tree.ErrorContext(n)
		a.errs = append(a.errs, fmt.Errorf("template: %s: unknown field .%s (the data has .Key, .Raw, .Value, .Headers, .Topic, .Partition, .Offset, .Timestamp and .Responses)", loc, ident[0]))
	case len(ident) > 1 && f != fieldValue && f != fieldHeaders && f != fieldTimestamp:
		loc, _ := a.tree.ErrorContext(n)
		a.errs = append(a.errs, fmt.Errorf("template: %s: .%s has no field or method %s", loc, ident[0], ident[1]))
	}
}

// responseIndex reports N when n is the command index .Responses N (or
// $.Responses), N a non-negative integer literal.
func responseIndex(n *parse.CommandNode) (int, bool) {
	if len(n.Args) < 3 {
		return 0, false
	}
	if id, ok := n.Args[0].(*parse.IdentifierNode); !ok || id.Ident != "index" {
		return 0, false
	}
	var ident []string
	switch f := n.Args[1].(type) {
	case *parse.FieldNode:
		ident = f.Ident
	case *parse.VariableNode:
		if len(f.Ident) == 2 && f.Ident[0] == "$" {
			ident = f.Ident[1:]
		}
	}
	if len(ident) != 1 || ident[0] != "Responses" {
		return 0, false
	}
	num, ok := n.Args[2].(*parse.NumberNode)
	if !ok || !num.IsInt || num.Int64 < 0 || num.Int64 > 1<<16 {
		return 0, false
	}
	return int(num.Int64), true
}

// toJSON is the json template function.
func toJSON(v any) (string, error) {
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return "", err
	}
	return strings.TrimSuffix(b.String(), "\n"), nil
}

// textArg returns the text the byte functions (md5, sha256, b64enc, b64dec)
// work on: a string or []byte as it is, a number or bool as it prints. A nil,
// map or slice is an error rather than the hash of "" or of "map[...]":
// {{ md5 (json .Value) }} hashes a value's JSON. text/template prefixes the
// error with "error calling <fn>:".
func textArg(v any) (string, error) {
	switch v := v.(type) {
	case string:
		return v, nil
	case []byte:
		return string(v), nil
	case json.Number:
		return string(v), nil
	case int, int64, float64, bool:
		return fmt.Sprint(v), nil
	case nil:
		return "", errors.New("the argument is nil, not a string, bytes or a number")
	}
	return "", fmt.Errorf("the argument is a %T, not a string, bytes or a number (encode a value with json first)", v)
}

// hashFunc returns a hash template function: the lowercase hex of sum of
// its argument.
func hashFunc(sum func([]byte) []byte) func(any) (string, error) {
	return func(v any) (string, error) {
		s, err := textArg(v)
		if err != nil {
			return "", err
		}
		return hex.EncodeToString(sum([]byte(s))), nil
	}
}

// b64enc is the b64enc template function: standard base64, padded.
func b64enc(v any) (string, error) {
	s, err := textArg(v)
	if err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString([]byte(s)), nil
}

// b64dec is the b64dec template function: the bytes standard, padded base64
// encodes, as a string. Invalid input is an error, which makes the message a
// bad message.
func b64dec(v any) (string, error) {
	s, err := textArg(v)
	if err != nil {
		return "", err
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// toString prints v as a template would.
func toString(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	case json.Number:
		return string(v)
	case []byte:
		return string(v)
	}
	return fmt.Sprint(v)
}

// defaultValue is the default template function: {{ x | default "d" }}.
func defaultValue(def, v any) any {
	if isEmpty(v) {
		return def
	}
	return v
}

func isEmpty(v any) bool {
	if v == nil {
		return true
	}
	rv := reflect.ValueOf(v)
	switch rv.Kind() {
	case reflect.Array, reflect.Map, reflect.Slice, reflect.String:
		return rv.Len() == 0
	case reflect.Pointer, reflect.Interface:
		return rv.IsNil()
	}
	return rv.IsZero()
}

// Names of the escapers escapeURL adds to the actions of URL templates.
const (
	escPathFunc  = "_orderly_path_segment" // url.PathEscape
	escQueryFunc = "_orderly_query"        // url.QueryEscape
	rangeFunc    = "_orderly_range"        // rangeable, on every range's pipeline
)

// urlPart is the part of a URL a point of a URL template is in.
type urlPart uint8

const (
	urlOrigin   urlPart = iota // scheme://host:port: configuration only
	urlPath                    // output is escaped as one path segment
	urlQuery                   // output is query-escaped
	urlFragment                // output is query-escaped
)

// escapeURL makes the actions of the URL template tx, whose leading text
// fixes its origin, escape their output for the part of the URL they print
// into: as one path segment in the path ("/" "?" "#" "%" CR LF escaped), as a
// query value in the query and the fragment. An action ending in raw is left
// as it is; one ending in pathescape (in the path) or urlquery is escaped
// already. It refuses a template where an action prints into the origin, a
// {{ template }} call (its output could not be escaped), and branches or
// loops that end in different parts of the URL.
func escapeURL(tx *text) error {
	e := urlEscaper{tree: tx.t.Tree, parts: map[*parse.ActionNode]urlPart{}}
	if len(tx.t.Templates()) > 1 {
		return errors.New("a url template cannot define templates: the output of {{ template }} could not be escaped")
	}
	e.list(tx.t.Tree.Root, urlOrigin)
	if len(e.errs) > 0 {
		return errors.Join(e.errs...)
	}
	// The fast path renders the same actions, one segment each, in order.
	if tx.segs != nil {
		for i, n := range tx.t.Tree.Root.Nodes {
			if a, ok := n.(*parse.ActionNode); ok {
				tx.segs[i].esc = e.parts[a]
			}
		}
	}
	return nil
}

// urlEscaper walks a URL template, following the URL part each point is in.
type urlEscaper struct {
	tree  *parse.Tree
	parts map[*parse.ActionNode]urlPart // the part each printing action prints into
	errs  []error
}

func (e *urlEscaper) fail(n parse.Node, format string, args ...any) {
	loc, _ := e.tree.ErrorContext(n)
	e.errs = append(e.errs, fmt.Errorf("template: %s: "+format, append([]any{loc}, args...)...))
}

// list walks l from part p and returns the part at its end.
func (e *urlEscaper) list(l *parse.ListNode, p urlPart) urlPart {
	if l == nil {
		return p
	}
	for _, n := range l.Nodes {
		p = e.node(n, p)
	}
	return p
}

func (e *urlEscaper) node(n parse.Node, p urlPart) urlPart {
	switch n := n.(type) {
	case *parse.TextNode:
		return advanceURL(p, n.Text)
	case *parse.ActionNode:
		if len(n.Pipe.Decl) > 0 {
			return p // {{ $x := ... }} prints nothing
		}
		if p == urlOrigin {
			e.fail(n, "the scheme, host and port of a url must be literal text (an action there lets a message choose where the request goes)")
			return p
		}
		e.escape(n, p)
	case *parse.IfNode:
		return e.branches(n, p, n.List, n.ElseList, "if")
	case *parse.WithNode:
		return e.branches(n, p, n.List, n.ElseList, "with")
	case *parse.RangeNode:
		// Any number of iterations, the else branch or nothing: all must
		// end where the range began.
		if e.list(n.List, p) != p || e.list(n.ElseList, p) != p {
			e.fail(n, "the body of {{ range }} must not move from the path to the query or the fragment of the url")
		}
	case *parse.TemplateNode:
		e.fail(n, "{{ template }} is not allowed in a url: its output could not be escaped")
	}
	return p
}

// branches walks the two branches of an if or with; they must end in the
// same part.
func (e *urlEscaper) branches(n parse.Node, p urlPart, then, els *parse.ListNode, what string) urlPart {
	a, b := e.list(then, p), e.list(els, p)
	if a != b {
		e.fail(n, "the branches of {{ %s }} must end in the same part of the url (path, query or fragment)", what)
	}
	return a
}

// escape makes the action a, printing into part p, escape its output.
func (e *urlEscaper) escape(a *parse.ActionNode, p urlPart) {
	e.parts[a] = p
	name := escPathFunc
	if p != urlPath {
		name = escQueryFunc
	}
	cmds := a.Pipe.Cmds
	last := cmds[len(cmds)-1]
	if id, ok := last.Args[0].(*parse.IdentifierNode); ok {
		switch {
		case id.Ident == "raw":
			delete(e.parts, a)
			return
		case id.Ident == "urlquery", id.Ident == "pathescape" && p == urlPath:
			// Escaped already, and what it keeps cannot leave the segment
			// or the query value.
			return
		case id.Ident == "pathescape":
			// Keeps & = + which would split a query value.
			id.Ident = escQueryFunc
			return
		}
	}
	a.Pipe.Cmds = append(cmds, &parse.CommandNode{NodeType: parse.NodeCommand, Pos: last.Pos,
		Args: []parse.Node{parse.NewIdentifier(name).SetTree(e.tree).SetPos(last.Pos)}})
}

// advanceURL returns the part of the URL after text s, starting in part p.
// The origin ends at the first "/", "?" or "#" after "://".
func advanceURL(p urlPart, s []byte) urlPart {
	if p == urlOrigin {
		i := bytes.Index(s, []byte("://"))
		if i < 0 {
			return p
		}
		s = s[i+3:]
		j := bytes.IndexAny(s, "/?#")
		if j < 0 {
			return p
		}
		p, s = urlPath, s[j:]
	}
	for _, c := range s {
		switch {
		case c == '?' && p == urlPath:
			p = urlQuery
		case c == '#':
			p = urlFragment
		}
	}
	return p
}

// writeURLText writes s to b escaped for part p as the escaper functions
// escape it (urlOrigin: as it is), allocating only when something needs
// escaping.
func writeURLText(b *bytes.Buffer, s string, p urlPart) {
	switch {
	case p == urlOrigin || plainInURL(s):
		b.WriteString(s)
	case p == urlPath:
		b.WriteString(url.PathEscape(s))
	default:
		b.WriteString(url.QueryEscape(s))
	}
}

// plainInURL reports whether v is made of unreserved characters only, which
// no escaper changes.
func plainInURL[T string | []byte](v T) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~') {
			return false
		}
	}
	return true
}
