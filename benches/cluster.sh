#!/usr/bin/env bash
# Cluster ingest on this machine (BENCHMARKS.md, "Cluster mode"): a NATS server with
# JetStream, NODES `serve --cluster` nodes on 12 partitions, and one load generator per
# node (EVENTS/NODES events each, 2 streams, 1,000 tokens), all on the same machine.
# Prints each load generator's acknowledged rate and when every event was applied.
#
#   benches/cluster.sh target/release/tokenwatch NODES [EVENTS] [BATCH]
#   benches/cluster.sh target/release/tokenwatch 0 [EVENTS] [BATCH]   # embedded serve, for comparison
set -euo pipefail
BIN=$(readlink -f "$1")
NODES=$2
EVENTS=${3:-1000000}
BATCH=${4:-1000}
DIR=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start() { # start ARGS... -> prints the gRPC address
  local out=$DIR/out.$RANDOM
  "$BIN" serve --listen 127.0.0.1:0 --insecure-no-auth "$@" >"$out" 2>/dev/null &
  PIDS+=($!)
  for _ in $(seq 300); do
    if grep -q "^listening on " "$out" 2>/dev/null; then
      sed -n 's/^listening on //p' "$out"; return; fi
    sleep 0.1
  done
  echo "node did not start" >&2; exit 1
}
ADDRS=()
if [ "$NODES" = 0 ]; then
  ADDRS+=("$(start --data-dir "$DIR/embedded")")
  N=1
else
  nats-server -a 127.0.0.1 -p "$PORT" -js -sd "$DIR/js" >/dev/null 2>&1 &
  PIDS+=($!)
  sleep 1
  for i in $(seq "$NODES"); do
    ADDRS+=("$(start --data-dir "$DIR/n$i" --cluster "nats://127.0.0.1:$PORT" --node-id "n$i" --partitions 12)")
  done
  sleep 8 # the lease rounds spread the partitions
  N=$NODES
fi
LG=()
for i in $(seq "$N"); do
  "$BIN" loadgen --target "${ADDRS[$((i-1))]}" --events $((EVENTS / N)) --batch "$BATCH" \
    --streams 2 --tokens 1000 --risk-rate 0 --seed "$i" >"$DIR/lg.$i" 2>&1 &
  LG+=($!)
done
for p in "${LG[@]}"; do wait "$p"; done
for i in $(seq "$N"); do echo "== loadgen $i -> ${ADDRS[$((i-1))]}"; grep -E "accepted|cluster:" "$DIR/lg.$i"; done
