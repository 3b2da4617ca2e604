#!/usr/bin/env bash
# A/B: two gateway builds on the same machine in the same run, alternating, each on a fresh
# data directory: HTTP single events and batches of 100 (64 connections, 100-byte events).
#   loadtest/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS]
# Prints one line per round and build; build both with `cargo build --release`.
set -euo pipefail
old=$1 new=$2 rounds=${3:-2} secs=${4:-5}
cd "$(dirname "$0")/.."
lt=target/release/sluice-loadtest
[ -x "$lt" ] || cargo build --release -q -p sluice-loadtest
run() { # binary label
  local dir; dir=$(mktemp -d)
  SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__LISTEN=127.0.0.1:0 \
    SLUICE_MQTT__LISTEN=127.0.0.1:0 SLUICE_LOG__DATA_DIR="$dir/data" RUST_LOG=error \
    "$1" serve > "$dir/out" 2>/dev/null &
  local pid=$!
  local addr=""
  for _ in $(seq 1 200); do
    addr=$(grep -o 'http=[^ ]*' "$dir/out" 2>/dev/null | cut -d= -f2 || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { echo "no address from $1" >&2; kill $pid; exit 1; }
  for n in 1 100; do
    r=$($lt http --url "http://$addr/v1/streams/ab/events" --connections 64 --events-per-request $n \
      --payload-bytes 100 --duration-secs "$secs" --warmup-secs 1 --json)
    printf '%-4s events/request=%-3s %s\n' "$2" "$n" \
      "$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('%.0f events/s  p99 %.2f ms  errors %d  non-2xx %d' % (d['events_per_s'], d['latency_us']['p99']/1000, d['errors'], d['non_2xx']))" "$r")"
  done
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$dir"
}
for r in $(seq 1 "$rounds"); do
  run "$old" old
  run "$new" new
done
