#!/usr/bin/env bash
# Builds Jaeger all-in-one v1.57.0 into <repo>/bin/jaeger-all-in-one from the
# Go module proxy, using this directory's own module (jaegertool), never the
# main module. Idempotent: does nothing when the binary already exists
# (FORCE=1 rebuilds; ORDERLY_JAEGER_BIN=path builds elsewhere, and the
# tracing end-to-end test looks there too). The first build takes about
# 4 minutes on 2 cores with an empty module cache.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${ORDERLY_JAEGER_BIN:-$repo/bin/jaeger-all-in-one}"
if [ -x "$out" ] && [ "${FORCE:-}" != 1 ]; then
  echo "jaeger: $out already built"
  exit 0
fi
mkdir -p "$(dirname "$out")"
cd "$here"
export GOWORK=off GOFLAGS="-mod=mod -buildvcs=false"
start=$(date +%s)
go mod tidy
go build -o "$out.tmp" github.com/jaegertracing/jaeger/cmd/all-in-one
mv -f "$out.tmp" "$out"
echo "jaeger: built $out in $(( $(date +%s) - start ))s"
