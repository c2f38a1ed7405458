package config

import (
	"strconv"
	"strings"
)

// FieldError is one problem in a configuration: where it is (File, and Line
// and Col when the parser knows them), which key it concerns, and what is
// wrong. Error renders it as
//
//	orderly.toml:12:3: dispatch.max_in_flight: must be at least 1, not 0
//
// leaving out whatever is unknown (no line: "orderly.toml: routes: ...", no
// key: "orderly.toml:4:9: expected '=' after key").
//
// Key is the TOML path with array indices ("http.retry.retry_statuses[2]",
// "kafka.properties.group.id"). Inside a route that has a name the name
// follows the index, as the filters package writes it:
// `routes[1] ("order-created").requests[0].url`. Key parts that are not
// plain words are quoted: `headers."Bad Header"`.
type FieldError struct {
	File      string
	Line, Col int // 1-based; 0 when unknown
	Key       string
	Msg       string
	// Err is the underlying error, if any (for example the *fs.PathError of
	// a file Load could not read); Unwrap returns it.
	Err error

	// path is Key as a path, when this package made the error: Parse uses
	// it to leave out problems that follow from one already reported.
	path keyPath
}

// Error returns "file:line:col: key: msg", leaving out the parts that are
// unknown.
func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
		if e.Col > 0 {
			b.WriteString(":" + strconv.Itoa(e.Col))
		}
	}
	for _, part := range []string{e.Key, e.Msg} {
		if part == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteString(": ")
		}
		b.WriteString(part)
	}
	return b.String()
}

// Unwrap returns the underlying error, or nil.
func (e *FieldError) Unwrap() error { return e.Err }

// Errors is every problem found in a configuration, in a stable order: those
// of decoding (syntax, types, unknown keys) first, in file order, then those
// of validation, in schema order, then those of the checks given to Load or
// Parse. Load, Parse and Validate return an Errors (never an empty one)
// whenever anything is wrong.
type Errors []*FieldError

// Error returns one problem per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap returns the problems, so that errors.As finds a *FieldError and
// errors.Is sees the underlying errors.
func (es Errors) Unwrap() []error {
	errs := make([]error, len(es))
	for i, e := range es {
		errs[i] = e
	}
	return errs
}
