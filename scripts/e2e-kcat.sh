#!/usr/bin/env bash
# End to end with outside parts: the built binary runs config.example.toml's
# shape (embedded broker on a fixed port), kcat produces into it as any Kafka
# client would, a separate sink process receives the requests. Checks: every
# message arrives in per-key order, SIGTERM exits 0, and a restart delivers
# nothing again (everything was committed).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=e2e-kcat
source scripts/e2e-lib.sh

kport=$(free_port); sport=$(free_port); aport=$(free_port)

bin/sinkserver -listen "127.0.0.1:$sport" & pids+=($!); disown
sed -e "s/127.0.0.1:9092/127.0.0.1:$kport/" -e "s/127.0.0.1:9464/127.0.0.1:$aport/" -e "s/127.0.0.1:8081/127.0.0.1:$sport/g" \
  -e "s#^embedded_data_dir = .*#embedded_data_dir = \"$work/kafka\"#" \
  config.example.toml > "$work/orderly.toml"
export ORDERLY_ADMIN_TOKEN=e2e
bin/orderly validate --config "$work/orderly.toml"

bin/orderly run --config "$work/orderly.toml" > "$work/run1.log" 2>&1 & run=$!; pids+=($run)
wait_for 60 readiness curl -sf "127.0.0.1:$aport/readyz"

N=2000; KEYS=20
for i in $(seq 0 $((N-1))); do
  k="user-$((i % KEYS))"
  echo "$k|{\"type\":\"order.created\",\"id\":$i,\"key\":\"$k\",\"seq\":$((i / KEYS))}"
done | kcat -P -b "127.0.0.1:$kport" -t orders -K '|'

expect=$(seq 0 $((KEYS-1)) | sed "s/.*/user-&:$((N / KEYS))/" | paste -sd, -)
stats() { curl -sf "127.0.0.1:$sport/stats?expect=$expect"; }
wait_for 120 "all $N delivered" sh -c "[ \"\$(curl -sf '127.0.0.1:$sport/stats' | jq .distinct)\" -ge $N ]"
stats | jq .
[ "$(stats | jq '.missing + .violations + .concurrent')" = 0 ] || { echo "e2e-kcat: loss, order violation or concurrent requests for a key" >&2; exit 1; }

curl -sf "127.0.0.1:$aport/metrics" | grep -E '^orderly_messages_total' || true
# The example announces each event on orders_announced after its POST: all of them, each key's in order.
wait_for 60 "all $N announced" sh -c "[ \"\$(kcat -C -b 127.0.0.1:$kport -t orders_announced -e -q -f '%k\n' | wc -l)\" -ge $N ]"
kcat -C -b "127.0.0.1:$kport" -t orders_announced -e -q -f '%k %s\n' | awk -v n=$N '
  { id = $0; sub(/.*"id": */, "", id); sub(/[,}].*/, "", id); id += 0
    if (($1 in last) && id <= last[$1]) { print "e2e-kcat: " $1 " announced " id " after " last[$1] > "/dev/stderr"; bad = 1 }
    last[$1] = id; count++ }
  END { if (count != n) { print "e2e-kcat: " count " announcements, want " n > "/dev/stderr"; bad = 1 }; exit bad }'
echo "e2e-kcat: $N announcements on orders_announced, each key in order"
# ... and records each order's answer on orders_replies.
wait_for 60 "all $N replies" sh -c "[ \"\$(curl -sf 127.0.0.1:$aport/metrics | awk '/^orderly_records_total/ && /orders_replies/ && /produced/ {s+=\$2} END {print s+0}')\" -ge $N ]"
wait_for 30 "offsets committed" sh -c "[ \"\$(curl -sf 127.0.0.1:$aport/metrics | awk '/^orderly_committed_offset/ {s+=\$2} END {print s}')\" = $N ]"
kill -TERM $run
status=0; wait $run || status=$?
[ $status = 0 ] || { echo "e2e-kcat: exit $status after SIGTERM" >&2; cat "$work/run1.log" >&2; exit 1; }
echo "e2e-kcat: SIGTERM exit 0"

# Restart on the durable embedded log: nothing is delivered again.
before=$(curl -sf "127.0.0.1:$sport/stats" | jq .requests)
bin/orderly run --config "$work/orderly.toml" > "$work/run2.log" 2>&1 & run=$!; pids+=($run)
wait_for 60 readiness curl -sf "127.0.0.1:$aport/readyz"
echo "user-0|{\"type\":\"order.created\",\"id\":$N,\"key\":\"user-0\",\"seq\":$((N / KEYS))}" | kcat -P -b "127.0.0.1:$kport" -t orders -K '|'
wait_for 60 "the marker delivered" sh -c "[ \"\$(curl -sf '127.0.0.1:$sport/stats' | jq .distinct)\" -ge $((N+1)) ]"
wait_for 30 "offsets committed" sh -c "[ \"\$(curl -sf 127.0.0.1:$aport/metrics | awk '/^orderly_committed_offset/ {s+=\$2} END {print s}')\" = $((N+1)) ]"
after=$(curl -sf "127.0.0.1:$sport/stats" | jq .requests)
kill -TERM $run; wait $run
[ $((after - before)) = 1 ] || { echo "e2e-kcat: restart sent $((after - before)) requests, want 1 (the marker)" >&2; exit 1; }
echo "e2e-kcat: OK ($N messages via kcat, order held, SIGTERM exit 0, restart redelivered nothing)"
