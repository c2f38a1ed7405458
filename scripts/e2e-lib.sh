# Shared by the end-to-end scripts: source it after setting NAME. Checks the
# outside tools, builds the binary and the sink, and defines a work folder
# cleaned up on exit (with every pid in pids killed), free_port and wait_for.
if ! command -v kcat >/dev/null || ! command -v jq >/dev/null || ! command -v curl >/dev/null; then
  if [ "${ORDERLY_E2E:-}" = 1 ]; then echo "$NAME: kcat, jq and curl are required" >&2; exit 1; fi
  echo "$NAME: SKIP (needs kcat, jq, curl)"; exit 0
fi
make -s build
go build -o bin/sinkserver ./internal/testkit/sinkserver

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }

wait_for() { # seconds, description, command...
  local n=$(( $1 * 10 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do n=$((n-1)); if [ $n -le 0 ]; then echo "$NAME: timed out waiting for $what" >&2; return 1; fi; sleep 0.1; done
}
