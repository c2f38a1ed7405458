package filters

import (
	"bytes"
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// stdTrees decodes data with encoding/json the two ways this package's
// decoder replaces: UseNumber (templates) and float64 (expressions; ok is
// false when encoding/json refuses a number out of float64 range).
func stdTrees(data []byte) (t, e any, ok bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&t); err != nil {
		panic(err)
	}
	ok = json.Unmarshal(data, &e) == nil
	return t, e, ok
}

// normalize turns the ints of the decoder's trees into what encoding/json
// returns: json.Number in the template tree, float64 in the expression tree.
func normalize(v any, template bool) any {
	switch v := v.(type) {
	case int:
		if template {
			return json.Number(strconv.Itoa(v))
		}
		return float64(v)
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, x := range v {
			out[k] = normalize(x, template)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = normalize(x, template)
		}
		return out
	}
	return v
}

// checkDecode checks the decoder against encoding/json on data.
func checkDecode(t *testing.T, data []byte) {
	t.Helper()
	var d decoder
	for _, mode := range []decodeMode{modeTemplate | modeExpr, modeTemplate, modeExpr} {
		tv, ev, err := d.decode(string(data), mode, fullTrie)
		if valid := json.Valid(data); valid != (err == nil) {
			t.Fatalf("%q mode %d: decoder error %v, json.Valid %v", data, mode, err, valid)
		}
		if err != nil {
			if !errors.Is(err, ErrNotJSON) {
				t.Fatalf("%q: error %v does not match ErrNotJSON", data, err)
			}
			for _, paths := range testTries() {
				if _, _, perr := d.decode(string(data), mode, paths); perr == nil || perr.Error() != err.Error() {
					t.Fatalf("%q with paths %v: error %v, want %v", data, paths, perr, err)
				}
			}
			continue
		}
		// Partial decoding checks the same syntax and builds the pruned trees.
		for _, paths := range testTries() {
			ptv, pev, perr := d.decode(string(data), mode, paths)
			if perr != nil {
				t.Fatalf("%q with paths %v: %v", data, paths, perr)
			}
			if want := prune(tv, paths); !reflect.DeepEqual(ptv, want) {
				t.Fatalf("%q with paths %v: template tree %#v, want %#v", data, paths, ptv, want)
			}
			if want := prune(ev, paths); !reflect.DeepEqual(pev, want) {
				t.Fatalf("%q with paths %v: expression tree %#v, want %#v", data, paths, pev, want)
			}
		}
		st, se, ok := stdTrees(data)
		if mode&modeTemplate != 0 {
			if got := normalize(tv, true); !reflect.DeepEqual(got, st) {
				t.Fatalf("%q template tree:\n got %#v\nwant %#v", data, got, st)
			}
		}
		if mode&modeExpr != 0 && ok {
			if got := normalize(ev, false); !reflect.DeepEqual(got, se) {
				t.Fatalf("%q expression tree:\n got %#v\nwant %#v", data, got, se)
			}
		}
	}
}

var jsonSamples = []string{
	`{}`, `[]`, `null`, `true`, `false`, `0`, `-0`, `1`, `-1`, `1.5`, `-1.5e10`, `1E+2`, `1e-2`, `0.0`,
	`12345678901234567890`, `-9223372036854775808`, `9223372036854775807`, `9223372036854775808`, `1e400`, `-1e400`,
	`""`, `"abc"`, `"a\"b\\c\/d\b\f\n\r\t"`, `"\u00e9\u4e2d"`, `"\ud83d\ude00"`, `"\ud83d"`, `"\ud83dx"`, `"\ude00\ud83d"`,
	`"\ud83d\u0041"`, `"\ud83d\ud83d\ude00"`, "\"\xff\xfe\"", "\"a\xc3\"", "\"\xed\xa0\x80\"", "\"\u00e9\"",
	` { "a" : [ 1 , 2 , { "b" : null } ] , "c" : "d" } `, `{"a":1,"a":2}`, `[[[[[]]]]]`, `{"a":{"b":{"c":[1.5,2]}}}`,
	`{"-0":-0,"f":1.10,"i":10}`, `[1,-0,2.5,"x",[3.5],{"y":4.5}]`,
	// Invalid.
	``, ` `, `{`, `}`, `[`, `[1,]`, `{"a":1,}`, `{"a" 1}`, `{a:1}`, `{"a":1 "b":2}`, `[1 2]`, `01`, `-`, `-a`, `1.`, `1.e3`,
	`1e`, `1e+`, `.5`, `+1`, `tru`, `trux`, `nul`, `"abc`, `"\x"`, `"\u12"`, `"\u12g4"`, "\"a\x01\"", `"\`, `1 2`,
	`{"a":1}}`, `NaN`, `Infinity`, `'a'`, "\"\t\"", `{"a":}`, `{,}`, `[,]`, `{"a"`, `{"a":`, `{"a":1`, `[1`,
}

func TestDecodeMatchesEncodingJSON(t *testing.T) {
	for _, s := range jsonSamples {
		checkDecode(t, []byte(s))
	}
}

func TestDecodeDepthLimit(t *testing.T) {
	ok := strings.Repeat("[", maxJSONDepth) + strings.Repeat("]", maxJSONDepth)
	checkDecode(t, []byte(ok))
	deep := strings.Repeat("[", maxJSONDepth+1) + strings.Repeat("]", maxJSONDepth+1)
	checkDecode(t, []byte(deep))
	deep = strings.Repeat(`{"a":`, maxJSONDepth+1)
	checkDecode(t, []byte(deep))
}

func TestDecodeNumbers(t *testing.T) {
	var d decoder
	tv, ev, err := d.decode(`{"i":42,"big":12345678901234567890,"f":1.50,"neg0":-0,"inf":1e400}`, modeTemplate|modeExpr, fullTrie)
	if err != nil {
		t.Fatal(err)
	}
	tm, em := tv.(map[string]any), ev.(map[string]any)
	want := map[string]any{"i": 42, "big": json.Number("12345678901234567890"), "f": json.Number("1.50"), "neg0": json.Number("-0"), "inf": json.Number("1e400")}
	if !reflect.DeepEqual(tm, want) {
		t.Errorf("template tree %#v", tm)
	}
	wantE := map[string]any{"i": 42, "big": 12345678901234567890.0, "f": 1.5, "neg0": 0, "inf": math.Inf(1)}
	if !reflect.DeepEqual(em, wantE) {
		t.Errorf("expression tree %#v", em)
	}
	// Without numbers that differ, the trees are one.
	tv, ev, _ = d.decode(`{"a":[1,"x",{"b":true}]}`, modeTemplate|modeExpr, fullTrie)
	if reflect.ValueOf(tv).Pointer() != reflect.ValueOf(ev).Pointer() {
		t.Errorf("trees without differing numbers are not shared")
	}
}

func TestDecodeErrors(t *testing.T) {
	var d decoder
	for _, tt := range []struct{ in, want string }{
		{`x`, `invalid character 'x' looking for beginning of value (offset 0)`},
		{`{"a":1`, `unexpected end of JSON input (offset 6)`},
		{`{"a" 1}`, `invalid character '1' after object key (offset 5)`},
		{`[1 2]`, `invalid character '2' after array element (offset 3)`},
		{`{"a":1}x`, `invalid character 'x' after top-level value (offset 7)`},
		{"\"a\nb\"", `invalid character '\n' in string literal (offset 2)`},
	} {
		_, _, err := d.decode(tt.in, modeExpr, fullTrie)
		if err == nil || err.Error() != tt.want {
			t.Errorf("%q: %v, want %s", tt.in, err, tt.want)
		}
	}
}

// FuzzDecodeJSON checks the decoder against encoding/json: the same
// documents are valid, and the trees are the same once ints are normalized.
func FuzzDecodeJSON(f *testing.F) {
	for _, s := range jsonSamples {
		f.Add([]byte(s))
	}
	f.Add([]byte(benchValue))
	f.Fuzz(func(t *testing.T, data []byte) {
		checkDecode(t, data)
	})
}

// testTries are a few path sets for partial decoding.
func testTries() []*pathTrie {
	var out []*pathTrie
	for _, paths := range [][][]string{
		{{"a"}},
		{{"a", "b"}},
		{{"a", "b"}, {"c"}, {"-0"}},
		{{"x"}, {"a", "b", "c"}, {"a", "y"}},
		{{"y", "z"}, {"a"}},
	} {
		p := &pathTrie{}
		for _, path := range paths {
			p.add(path)
		}
		out = append(out, p)
	}
	return out
}

// prune keeps of a fully decoded tree what paths names, as partial decoding
// does: only the named members of objects; arrays and scalars whole.
func prune(v any, p *pathTrie) any {
	if p.full {
		return v
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return v
	}
	out := make(map[string]any)
	for k, c := range p.kids {
		if x, ok := obj[k]; ok {
			out[k] = prune(x, c)
		}
	}
	return out
}

func TestPathTrie(t *testing.T) {
	p := &pathTrie{}
	p.add([]string{"a", "b"})
	p.add([]string{"a", "c"})
	p.add([]string{"d"})
	if p.full || !p.kids["a"].kids["b"].full || !p.kids["a"].kids["c"].full || !p.kids["d"].full || p.kids["a"].full {
		t.Errorf("trie %+v", p)
	}
	p.add([]string{"a"})
	if !p.kids["a"].full || p.kids["a"].kids != nil {
		t.Errorf("adding a prefix: %+v", p.kids["a"])
	}
	p.addKind([]string{"k", "l"})
	if k := p.kids["k"]; k.full || k.kids["l"].full || k.kids["l"].kids != nil {
		t.Errorf("addKind: %+v", k)
	}
	q := &pathTrie{}
	q.add([]string{"a", "z"})
	q.add([]string{"e", "f"})
	u := union(q, p)
	if !u.kids["a"].full || !u.kids["e"].kids["f"].full || !u.kids["d"].full || len(u.kids) != 4 {
		t.Errorf("union %+v", u)
	}
	if union(nil, nil) != nil || union(p, fullTrie) != fullTrie || union(nil, q) == q {
		t.Errorf("union of nil or full")
	}
	fullTrie.add([]string{"x"})
	fullTrie.add(nil)
	if !fullTrie.full || fullTrie.kids != nil {
		t.Errorf("fullTrie was written")
	}
}
