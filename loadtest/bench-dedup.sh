#!/usr/bin/env bash
# Exactly-once cost: HTTP single events and batches of 100 (64 connections, 100-byte events,
# every event with a unique id) against one gateway build with dedup off, dedup on with the
# embedded window, and dedup on with the window in Redis (Debian's redis-server, started here on
# a free port without persistence), alternating in the same run, each on a fresh data directory.
#   loadtest/bench-dedup.sh [ROUNDS] [SECONDS]
# Prints one line per round, store and scenario: throughput, p99, the gateway's CPU time per
# event (and redis-server's, for the Redis store); then, per scenario, each store's median
# throughput as a share of dedup off.
set -euo pipefail
rounds=${1:-3} secs=${2:-5}
cd "$(dirname "$0")/.."
[ -x target/release/sluice ] && [ -x target/release/sluice-loadtest ] \
  || cargo build --release -q -p sluice-gateway -p sluice-loadtest
bin=target/release/sluice lt=target/release/sluice-loadtest
command -v redis-server >/dev/null || { echo "redis-server missing: scripts/install-deps.sh --with-redis" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no > "$work/redis.log" 2>&1 &
redis=$!
trap 'kill $redis 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
results=$work/results
run() { # label config
  local dir; dir=$(mktemp -d -p "$work")
  printf '%s' "$2" > "$dir/sluice.toml"
  SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__ENABLED=false \
    SLUICE_MQTT__ENABLED=false SLUICE_LOG__DATA_DIR="$dir/data" RUST_LOG=error \
    "$bin" serve --config "$dir/sluice.toml" > "$dir/out" 2>/dev/null &
  local pid=$! addr=""
  for _ in $(seq 1 200); do
    addr=$(grep -o 'http=[^ ]*' "$dir/out" 2>/dev/null | cut -d= -f2 || true)
    [ -n "$addr" ] && break
    sleep 0.05
  done
  [ -n "$addr" ] || { echo "no address for $1" >&2; kill $pid; exit 1; }
  local c0 r0 r
  for n in 1 100; do
    c0=$(cpu $pid) r0=$(cpu $redis)
    r=$($lt http --url "http://$addr/v1/streams/d/events" --connections 64 --events-per-request $n \
      --payload-bytes 100 --duration-secs "$secs" --warmup-secs 1 --ids --json)
    python3 - "$r" "$c0" "$(cpu $pid)" "$1" "$n" "$results" "$r0" "$(cpu $redis)" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); cpu = (int(sys.argv[3]) - int(sys.argv[2])) / 100
rcpu = (int(sys.argv[8]) - int(sys.argv[7])) / 100
rate = d["events_per_s"]; n = rate * d["duration_s"] or 1
line = "%-9s http x%-3s  %8.0f events/s  p99 %6.2f ms  CPU %5.2f us/event  errors %d  non-2xx %d" % (
    sys.argv[4], sys.argv[5], rate, d["latency_us"]["p99"] / 1000, cpu * 1e6 / n, d["errors"], d["non_2xx"])
if sys.argv[4] == "redis":
    # Redis's CPU over the run (with the 1 s warm-up, so a slight overestimate per event).
    line += "  redis-server CPU %5.2f us/event" % (rcpu * 1e6 / n)
print(line)
with open(sys.argv[6], "a") as f:
    f.write("%s %s %f\n" % (sys.argv[4], sys.argv[5], rate))
PY
  done
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$dir"
}
on='[streams.defaults]
dedup = true
'
for _ in $(seq 1 "$rounds"); do
  run off ''
  run embedded "$on"
  run redis "$on[dedup]
store = \"redis\"
[dedup.redis]
url = \"redis://127.0.0.1:$port\"
"
done
python3 - "$results" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    store, n, rate = line.split()
    rates.setdefault((store, n), []).append(float(rate))
for n in ("1", "100"):
    off = statistics.median(rates[("off", n)])
    for store in ("embedded", "redis"):
        m = statistics.median(rates[(store, n)])
        print("http x%-3s  %-8s median %8.0f events/s = %3.0f%% of dedup off (%.0f)" % (n, store, m, 100 * m / off, off))
PY
