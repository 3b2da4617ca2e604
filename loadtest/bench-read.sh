#!/usr/bin/env bash
# The read side (docs/consume.md) on the embedded log, release build, this machine:
#  1. fetch: a stream of N 100-byte events read back by cursor in batches of 1,000 over HTTP
#     (NDJSON), beside `sluice log read` reading the same files locally (the peer: the same
#     log without the network, JSON rendering included);
#  2. SSE fan-out: S subscribers of one stream while producers write R events/s (HTTP batches
#     of 100, open loop), with the latency from a producer's ack to a subscriber's receipt.
# Usage: loadtest/bench-read.sh [events to fetch, 1000000] [subscribers, 100] [rate, 100000] [seconds, 10]
set -euo pipefail
cd "$(dirname "$0")/.."
events="${1:-1000000}"
subscribers="${2:-100}"
rate="${3:-100000}"
secs="${4:-10}"
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
work="$(mktemp -d)"
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat >"$work/sluice.toml" <<CONF
[http]
max_subscribers = 1000
max_subscribers_per_principal = 1000
max_connections_per_principal = 0
CONF
SLUICE_LOG__DATA_DIR="$work/data" SLUICE_HTTP__LISTEN="127.0.0.1:$port" SLUICE_MQTT__LISTEN=127.0.0.1:0 \
  SLUICE_MQTT__TLS_LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__LISTEN=127.0.0.1:0 \
  RUST_LOG=warn target/release/sluice serve --config "$work/sluice.toml" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 300); do grep -q "sluice listening" "$work/out" && break; sleep 0.1; done
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); commit $(git rev-parse --short HEAD)"
echo "== fetch: $events events, batches of 1,000"
target/release/sluice-loadtest read-fetch --addr "127.0.0.1:$port" --stream fetch --prefill "$events" --batch 1000
echo "== peer: sluice log read of the same stream (local files, same JSON shape with --json-values)"
start=$(date +%s.%N)
n=$(target/release/sluice log read --data-dir "$work/data" --stream fetch --json-values | wc -l)
end=$(date +%s.%N)
python3 -c "print(f'log read: {$n} records in {$end-$start:.2f} s: {$n/($end-$start):.0f} records/s')"
for case in "1 $rate" "10 $rate" "$subscribers $rate" "$subscribers $(( rate / 10 ))"; do
  set -- $case
  echo "== SSE: $1 subscribers, producers at $2 events/s for $secs s"
  target/release/sluice-loadtest read-tail --addr "127.0.0.1:$port" --stream "tail$1-$2" \
    --subscribers "$1" --rate "$2" --duration-secs "$secs"
done
