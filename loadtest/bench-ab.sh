#!/usr/bin/env bash
# A/B: two gateway builds on the same machine in the same run, alternating, each on a fresh
# data directory: HTTP single events and batches of 100 (64 connections, 100-byte events), gRPC
# PublishStream (16 streams x 8 batches of 100 in flight) and MQTT QoS 1 (100 connections x 64
# publishes in flight), all 100-byte events.
#   loadtest/bench-ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS]
# Prints one line per round, build and scenario: throughput, p99, and the gateway's CPU time per
# event (user + system from /proc, over the run including its 1 s warm-up: the figure that moves
# least with the machine's neighbours, for comparing builds). Build both with
# `cargo build --release`.
set -euo pipefail
old=$1 new=$2 rounds=${3:-2} secs=${4:-5}
cd "$(dirname "$0")/.."
lt=target/release/sluice-loadtest
[ -x "$lt" ] || cargo build --release -q -p sluice-loadtest
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; } # clock ticks (1/100 s) of user + system
# per_event JSON C0 C1 FIELD: "N events/s  p99 X ms  CPU Y us/event  errors E"
per_event() {
  python3 -c "
import json,sys
d=json.loads(sys.argv[1]); rate=d[sys.argv[4]]; cpu=(int(sys.argv[3])-int(sys.argv[2]))/100
n=rate*d.get('duration_s', 0) or 1
print('%.0f events/s  p99 %.2f ms  CPU %.2f us/event  errors %d%s' % (rate, d['latency_us']['p99']/1000, cpu*1e6/n, d['errors'],
  ('  non-2xx %d' % d['non_2xx']) if 'non_2xx' in d else ''))" "$@"
}
run() { # binary label
  local dir; dir=$(mktemp -d)
  SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__LISTEN=127.0.0.1:0 \
    SLUICE_MQTT__LISTEN=127.0.0.1:0 SLUICE_LOG__DATA_DIR="$dir/data" RUST_LOG=error \
    "$1" serve > "$dir/out" 2>/dev/null &
  local pid=$!
  local addr="" grpc mqtt
  for _ in $(seq 1 200); do
    addr=$(grep -o 'http=[^ ]*' "$dir/out" 2>/dev/null | cut -d= -f2 || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  grpc=$(grep -o 'grpc=[^ ]*' "$dir/out" | cut -d= -f2)
  mqtt=$(grep -o 'mqtt=[^ ]*' "$dir/out" | cut -d= -f2)
  [ -n "$addr" ] || { echo "no address from $1" >&2; kill $pid; exit 1; }
  local c0 r
  for n in 1 100; do
    c0=$(cpu $pid)
    r=$($lt http --url "http://$addr/v1/streams/ab/events" --connections 64 --events-per-request $n \
      --payload-bytes 100 --duration-secs "$secs" --warmup-secs 1 --json)
    printf '%-4s http x%-3s          %s\n' "$2" "$n" "$(per_event "$r" "$c0" "$(cpu $pid)" events_per_s)"
  done
  c0=$(cpu $pid)
  r=$($lt grpc --url "http://$grpc" --stream ab --mode stream --connections 16 --in-flight 8 \
    --events-per-request 100 --payload-bytes 100 --duration-secs "$secs" --warmup-secs 1 --json)
  printf '%-4s grpc-stream x100   %s\n' "$2" "$(per_event "$r" "$c0" "$(cpu $pid)" admitted_events_per_s)"
  c0=$(cpu $pid)
  r=$($lt mqtt --addr "$mqtt" --connections 100 --window 64 --payload-bytes 100 \
    --duration-secs "$secs" --warmup-secs 1 --json)
  printf '%-4s mqtt-qos1          %s\n' "$2" "$(per_event "$r" "$c0" "$(cpu $pid)" msgs_per_s)"
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$dir"
}
for r in $(seq 1 "$rounds"); do
  run "$old" old
  run "$new" new
done
