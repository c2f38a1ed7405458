#!/usr/bin/env bash
# Runs one native fuzz target for a while: scripts/fuzz.sh PKG TARGET DURATION.
# A real failure always writes its input ("Failing input written to ...")
# and fails this script. Go's fuzzer can also end with a bare "context
# deadline exceeded" when the time runs out while a worker is minimizing a
# new interesting input (not a crash); that is reported and tolerated.
set -uo pipefail
pkg=$1 target=$2 time=$3
out=$(go test "$pkg" -run '^$' -fuzz "^${target}\$" -fuzztime "$time" 2>&1)
status=$?
echo "$out" | grep -v '^fuzz: elapsed' 
if [ $status -ne 0 ]; then
  if ! echo "$out" | grep -q 'Failing input written to' && echo "$out" | grep -q 'context deadline exceeded'; then
    echo "fuzz: $target stopped at the deadline while minimizing (no failing input): tolerated"
    exit 0
  fi
  exit $status
fi
