package filters

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"

	"github.com/expr-lang/expr/vm"
)

// state is the scratch space of one Plan: what has been built from the
// message so far (each at most once, and only when a route needs it), the
// expression environment, the template data, an expr VM, the render buffer
// and the JSON decoder. States are pooled; one is used by one goroutine at a
// time.
type state struct {
	m       *Message
	have    needs
	key     string
	raw     string
	headers map[string]string // reused between messages, cleared
	tval    any               // value decoded for templates
	eval    any               // value decoded for expressions
	decErr  error             // why the value does not decode, once known
	keyErr  error             // why the key does not decode (a framed key_format), once known
	env     exprEnv
	data    tplData
	vm      vm.VM
	buf     bytes.Buffer
	dec     decoder

	// codec is the value and key formats the above were built with (the
	// last spec's): a route with other formats builds them again. framed
	// is the JSON of a framed value, once decoded.
	codec  *codec
	framed []byte
}

var statePool = sync.Pool{New: func() any { return new(state) }}

// maxPooledBuffer bounds the render buffer kept in a pooled state.
const maxPooledBuffer = 64 << 10

func getState(m *Message) *state {
	st := statePool.Get().(*state)
	st.m = m
	return st
}

// putState returns st to the pool holding no reference to the message.
func putState(st *state) {
	st.m = nil
	st.have = 0
	st.key, st.raw = "", ""
	if len(st.headers) > 64 {
		st.headers = nil
	} else {
		clear(st.headers)
	}
	st.tval, st.eval, st.decErr, st.keyErr, st.codec, st.framed = nil, nil, nil, nil, nil, nil
	st.env = exprEnv{}
	st.data = tplData{}
	clear(st.vm.Stack[:cap(st.vm.Stack)])
	st.vm.Stack = st.vm.Stack[:0]
	clear(st.vm.Variables)
	if st.buf.Cap() > maxPooledBuffer {
		st.buf = bytes.Buffer{}
	} else {
		st.buf.Reset()
	}
	statePool.Put(st)
}

// need builds what n asks for and is not built yet, decoding the value as
// spec says (nil: as the last spec said). It fails only when the value is
// needed as JSON and does not decode (the error matches ErrNotJSON), or
// when a value or key in a schema-registry format cannot be decoded
// (ErrUndecodable) or the registry is unavailable (ErrUnavailable).
func (st *state) need(n needs, spec *valueSpec) error {
	if spec != nil && spec.codec != st.codec {
		st.setCodec(spec.codec)
	}
	miss := n &^ st.have
	if miss == 0 {
		return nil
	}
	m := st.m
	if miss&needKey != 0 {
		if err := st.buildKey(); err != nil {
			return err
		}
	}
	if miss&needHeaders != 0 && len(m.Headers) > 0 {
		if st.headers == nil {
			st.headers = make(map[string]string, len(m.Headers))
		}
		for _, h := range m.Headers {
			// Not valid UTF-8 stays as it is: the bytes as a string.
			st.headers[h.Key] = string(h.Value)
		}
	}
	if miss&(needRaw|needValue) != 0 && st.have&needRaw == 0 {
		st.raw = string(m.Value) // the decoded strings are substrings of it
		st.have |= needRaw
	}
	st.have |= miss &^ needValue
	if miss&needValue == 0 {
		return nil
	}
	if st.decErr != nil {
		return st.decErr
	}
	src := st.raw
	switch f := st.codec.valueFormat(); {
	case f == formatString || f == formatBytes:
		st.tval, st.eval = st.raw, st.raw
		if f == formatBytes {
			st.tval, st.eval = m.Value, m.Value
		}
		st.have |= needValue
		return nil
	case f.framed():
		if st.framed == nil {
			js, err := st.decodeFramed(st.codec, false, m.Value)
			if err != nil {
				st.decErr = err
				return err
			}
			st.framed = js
		}
		src = string(st.framed)
	case len(m.Value) == 0:
		st.decErr = errEmptyValue
		return st.decErr
	}
	paths, mode := fullTrie, decodeMode(0)
	if spec != nil && spec.paths != nil {
		paths, mode = spec.paths, spec.mode
	}
	mode |= modeOf(miss)
	t, e, err := st.dec.decode(src, mode, paths)
	if err != nil {
		st.decErr = err
		return err
	}
	if mode&modeTemplate != 0 {
		st.tval = t
		st.have |= needValueTpl
	}
	if mode&modeExpr != 0 {
		st.eval = e
		st.have |= needValueExpr
	}
	return nil
}

// modeOf is how to decode the value for what n reads of it.
func modeOf(n needs) (m decodeMode) {
	if n&needValueTpl != 0 {
		m |= modeTemplate
	}
	if n&needValueExpr != 0 {
		m |= modeExpr
	}
	return m
}

// setCodec makes c the formats st builds with, forgetting what it built
// of the value or key with other formats.
func (st *state) setCodec(c *codec) {
	if c.valueFormat() != st.codec.valueFormat() {
		st.have &^= needValue
		st.tval, st.eval, st.decErr, st.framed = nil, nil, nil, nil
	}
	if c.keyFormat() != st.codec.keyFormat() {
		st.have &^= needKey
		st.key, st.keyErr = "", nil
	}
	st.codec = c
}

// buildKey builds st.key: the key as a string, or the decoded key for a
// framed key_format (an absent or empty key stays "").
func (st *state) buildKey() error {
	m := st.m
	if !st.codec.keyFormat().framed() || len(m.Key) == 0 {
		st.key = string(m.Key)
		return nil
	}
	if st.keyErr != nil {
		return st.keyErr
	}
	js, err := st.decodeFramed(st.codec, true, m.Key)
	if err != nil {
		st.keyErr = err
		return err
	}
	st.key = keyText(js)
	return nil
}

// renderString renders tx to a new string.
func (st *state) renderString(tx *text) (string, error) {
	if tx.static {
		return tx.str, nil
	}
	if err := st.render(tx); err != nil {
		return "", err
	}
	return st.buf.String(), nil
}

// render renders tx (not static) into st.buf: through the fast path when it
// can, else through text/template.
func (st *state) render(tx *text) error {
	st.buf.Reset()
	if tx.segs != nil && st.renderFast(tx.segs) {
		return nil
	}
	st.buf.Reset()
	// The route built the value already (the fast path reads it as well).
	if err := st.need(tx.need, nil); err != nil {
		return err
	}
	m, d := st.m, &st.data
	d.Key = st.key
	d.Raw = st.raw
	d.Value = st.tval
	d.Headers = st.headers
	d.Topic = m.Topic
	d.Partition = int(m.Partition)
	d.Offset = int(m.Offset)
	d.Timestamp = m.Timestamp
	return tx.t.Execute(capped{&st.buf}, d)
}

// maxRendered is the most a template renders (a request's URL, header or
// body): a message's data must not make rendering take the process's
// memory, as a {{ range }} over a huge array of a compressed message could.
const maxRendered = 64 << 20

// capped is st.buf, refusing a write past maxRendered: text/template stops
// at the first failed write.
type capped struct{ b *bytes.Buffer }

func (c capped) Write(p []byte) (int, error) {
	if c.b.Len()+len(p) > maxRendered {
		return 0, fmt.Errorf("the rendered text is over %d MiB", maxRendered>>20)
	}
	return c.b.Write(p)
}

// renderFast renders segs as text/template would. It reports false, leaving
// st.buf dirty, for anything it does not print the same way (a missing key, a
// value that is not a string, number or bool), and the caller falls back to
// text/template for the real result or error.
func (st *state) renderFast(segs []segment) bool {
	m, b := st.m, &st.buf
	for i := range segs {
		sg := &segs[i]
		switch sg.field {
		case fieldText:
			b.WriteString(sg.text)
		case fieldKey:
			if st.codec.keyFormat().framed() {
				return false // .Key is the decoded key, not the bytes
			}
			if sg.esc == urlOrigin || plainInURL(m.Key) {
				b.Write(m.Key)
			} else {
				writeURLText(b, string(m.Key), sg.esc)
			}
		case fieldRaw:
			if sg.esc == urlOrigin || plainInURL(m.Value) {
				b.Write(m.Value)
			} else {
				writeURLText(b, string(m.Value), sg.esc)
			}
		case fieldTopic:
			writeURLText(b, m.Topic, sg.esc)
		case fieldPartition:
			b.Write(strconv.AppendInt(b.AvailableBuffer(), int64(m.Partition), 10))
		case fieldOffset:
			b.Write(strconv.AppendInt(b.AvailableBuffer(), m.Offset, 10))
		case fieldHeaders:
			v, ok := st.headers[sg.path[0]]
			if !ok {
				return false
			}
			writeURLText(b, v, sg.esc)
		case fieldValue:
			v := st.tval
			for _, k := range sg.path {
				obj, ok := v.(map[string]any)
				if !ok {
					return false
				}
				if v, ok = obj[k]; !ok {
					return false
				}
			}
			switch v := v.(type) {
			case string:
				writeURLText(b, v, sg.esc)
			case json.Number:
				writeURLText(b, string(v), sg.esc)
			case int:
				b.Write(strconv.AppendInt(b.AvailableBuffer(), int64(v), 10))
			case bool:
				b.WriteString(strconv.FormatBool(v))
			default:
				return false
			}
		default:
			return false
		}
	}
	return true
}
