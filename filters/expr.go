package filters

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/ast"
	"github.com/expr-lang/expr/file"
	"github.com/expr-lang/expr/vm"
)

// exprEnv is the environment of `when` expressions. The checker reads its
// types, so unknown names and type errors fail at compile time. One lives in
// every pooled state; eval fills only the fields the expression uses.
type exprEnv struct {
	Key       string            `expr:"key"`
	HasKey    bool              `expr:"has_key"`
	Value     any               `expr:"value"`
	Raw       string            `expr:"raw"`
	Headers   map[string]string `expr:"headers"`
	Topic     string            `expr:"topic"`
	Partition int               `expr:"partition"`
	Offset    int               `expr:"offset"`
}

// whenExpr is a compiled `when`.
type whenExpr struct {
	prog  *vm.Program
	needs needs     // what of the message the expression reads
	value *pathTrie // what of the value it reads
}

// compileWhen compiles src, which must yield a bool. A result whose type
// is only known when the message is (value.active) is refused too: it
// would fail on every message whose member is not a JSON boolean.
func compileWhen(src string) (*whenExpr, error) {
	prog, err := expr.Compile(src, expr.Env(exprEnv{}), expr.AsBool())
	if err != nil {
		return nil, exprError(err)
	}
	if t := prog.Node().Type(); t == nil || t.Kind() != reflect.Bool {
		e := strings.TrimSpace(src)
		if strings.ContainsAny(e, " \t\r\n()+-*/%<>=!&|?:,;") {
			e = "(" + e + ")"
		}
		return nil, fmt.Errorf("must yield true or false, but %s may be any JSON value: compare it (%s == true, %s != nil)", e, e, e)
	}
	var u exprUses
	root := prog.Node()
	ast.Walk(&root, &u)
	return &whenExpr{prog: prog, needs: u.needs, value: u.valueTrie()}, nil
}

// exprUses collects what an expression reads of the message.
type exprUses struct {
	needs   needs
	values  int               // `value` identifiers
	members []*ast.MemberNode // member accesses by a constant name (a.b, a["b"])
	kinds   map[ast.Node]bool // arguments of type(): only their JSON type is read
	full    bool              // the value is read by name ($env)
}

// Visit records the identifiers and the member accesses of an expression.
// $env reaches every variable by name, so it needs everything.
func (u *exprUses) Visit(node *ast.Node) {
	switch n := (*node).(type) {
	case *ast.IdentifierNode:
		switch n.Value {
		case "key":
			u.needs |= needKey
		case "raw":
			u.needs |= needRaw
		case "headers":
			u.needs |= needHeaders
		case "value":
			u.needs |= needValueExpr
			u.values++
		case "$env":
			u.needs |= needKey | needRaw | needHeaders | needValueExpr
			u.full = true
		}
	case *ast.MemberNode:
		if _, ok := n.Property.(*ast.StringNode); ok {
			u.members = append(u.members, n)
		}
	case *ast.BuiltinNode:
		if n.Name == "type" && len(n.Arguments) == 1 {
			if u.kinds == nil {
				u.kinds = make(map[ast.Node]bool)
			}
			u.kinds[n.Arguments[0]] = true
		}
	}
}

// valueTrie returns the paths of the value the expression reads: every
// longest chain value.a.b of constant member names is a path read whole,
// except as the argument of type(), which reads only whether it is an
// object, an array, ... (a partially decoded object is still a map). When
// some `value` is not the root of such a chain (len(value), value[k]), the
// value is read whole. Anything the analysis does not recognise thus errs
// towards decoding more.
func (u *exprUses) valueTrie() *pathTrie {
	if u.needs&needValueExpr == 0 {
		return nil
	}
	if u.full {
		return fullTrie
	}
	var pathOf func(m *ast.MemberNode) []string
	pathOf = func(m *ast.MemberNode) []string {
		name := m.Property.(*ast.StringNode).Value
		switch n := m.Node.(type) {
		case *ast.IdentifierNode:
			if n.Value == "value" {
				return []string{name}
			}
		case *ast.MemberNode:
			if _, ok := n.Property.(*ast.StringNode); ok {
				if p := pathOf(n); p != nil {
					return append(p, name)
				}
			}
		}
		return nil
	}
	paths := make(map[*ast.MemberNode][]string)
	for _, m := range u.members {
		if p := pathOf(m); p != nil {
			paths[m] = p
		}
	}
	inner := make(map[*ast.MemberNode]bool) // not the longest chain
	for m := range paths {
		if n, ok := m.Node.(*ast.MemberNode); ok {
			inner[n] = true
		}
	}
	t := &pathTrie{}
	chains := 0
	for m, p := range paths {
		if !inner[m] {
			if u.kinds[m] {
				t.addKind(p)
			} else {
				t.add(p)
			}
			chains++
		}
	}
	for n := range u.kinds {
		if id, ok := n.(*ast.IdentifierNode); ok && id.Value == "value" {
			chains++ // type(value): the root, partial as it is, tells
		}
	}
	if chains != u.values {
		return fullTrie
	}
	return t
}

// eval evaluates the expression for the message in st. A failure to decode
// the value the expression needs is returned as is (it matches ErrNotJSON);
// an evaluation error is returned with its position.
func (w *whenExpr) eval(st *state, spec *valueSpec) (bool, error) {
	if err := st.need(w.needs, spec); err != nil {
		return false, err
	}
	env := &st.env
	m := st.m
	env.Key = st.key
	env.HasKey = m.Key != nil
	env.Value = st.eval
	env.Raw = st.raw
	env.Headers = st.headers
	env.Topic = m.Topic
	env.Partition = int(m.Partition)
	env.Offset = int(m.Offset)
	out, err := st.vm.Run(w.prog, env)
	if err != nil {
		err = exprError(err)
		if w.needs&needValueExpr != 0 {
			// expr's messages for value.type on an array ("invalid
			// operation: int(string)") do not say what went wrong.
			if kind := jsonKind(st.eval); kind != "object" {
				err = fmt.Errorf("%w (the value is a JSON %s)", err, kind)
			}
		}
		return false, err
	}
	b, ok := out.(bool)
	if !ok {
		return false, fmt.Errorf("evaluated to %T, not bool", out)
	}
	return b, nil
}

// posError is an expr error in one line: "line L, column C: message".
type posError struct {
	fe *file.Error
}

func (e *posError) Error() string {
	return "line " + strconv.Itoa(e.fe.Line) + ", column " + strconv.Itoa(e.fe.Column+1) + ": " + e.fe.Message
}

func (e *posError) Unwrap() error { return e.fe }

// exprError gives expr's errors a one-line form with the position (expr's own
// adds a multi-line snippet).
func exprError(err error) error {
	var fe *file.Error
	if errors.As(err, &fe) && fe.Line > 0 {
		return &posError{fe: fe}
	}
	return err
}

// jsonKind names the JSON type of a decoded value.
func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	case string:
		return "string"
	case bool:
		return "boolean"
	}
	return "number"
}
