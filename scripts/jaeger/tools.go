//go:build tools

// Package jaegertool pins the Jaeger all-in-one build used by the tracing
// end-to-end test (e2e/tracing_test.go). It is its own module so that the
// main module never sees Jaeger's dependency graph; build.sh builds it.
package jaegertool

import _ "github.com/jaegertracing/jaeger/cmd/all-in-one"
