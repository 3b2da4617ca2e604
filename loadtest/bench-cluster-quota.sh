#!/usr/bin/env bash
# Cluster-wide quotas: how well three gateways on one Redis hold one stream quota under uneven
# load, for each way of sharing it, in the same run:
#   local     - no sharing: each gateway has the whole rate (what quotas did before)
#   share     - a static split: each gateway has rate / 3
#   exact     - cluster = true, quotas.cluster.lease_ms = 0 (one Redis call per request)
#   lease10   - cluster = true, lease_ms = 10
#   lease100  - cluster = true, lease_ms = 100 (the default)
#   lease1000 - cluster = true, lease_ms = 1000
# Load (HTTP, 10 events of 100 bytes per request): the first gateway 32 connections in a closed
# loop, the second 4, the third an open loop of 50 requests/s (500 events/s).
#   loadtest/bench-cluster-quota.sh [SECONDS] [RATE]
# Prints one line per mode: events/s admitted over the three gateways as a share of RATE, the
# split by gateway, the first gateway's p99, Redis's CPU per admitted event, Redis calls.
set -euo pipefail
secs=${1:-10} rate=${2:-10000}
cd "$(dirname "$0")/.."
[ -x target/release/sluice ] && [ -x target/release/sluice-loadtest ] \
  || cargo build --release -q -p sluice-gateway -p sluice-loadtest
bin=target/release/sluice lt=target/release/sluice-loadtest
command -v redis-server >/dev/null || { echo "redis-server missing: scripts/install-deps.sh --with-redis" >&2; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no > "$work/redis.log" 2>&1 &
redis=$!
pids=()
trap 'kill $redis "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
calls() { redis-cli -p "$port" info commandstats | awk -F'[=,:]' '/cmdstat_evalsha/ {print $3}'; }
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(nproc) cores; quota $rate events/s on one stream; ${secs} s per mode"
for mode in local share exact lease10 lease100 lease1000; do
  case $mode in
    local) r=$rate cluster=false lease=0 ;;
    share) r=$(( (rate + 2) / 3 )) cluster=false lease=0 ;;
    exact) r=$rate cluster=true lease=0 ;;
    lease*) r=$rate cluster=true lease=${mode#lease} ;;
  esac
  redis-cli -p "$port" flushall >/dev/null
  addrs=()
  pids=()
  for g in 0 1 2; do
    dir=$work/$mode-$g
    mkdir -p "$dir"
    cat > "$dir/sluice.toml" <<EOF
[dedup]
store = "redis"
[dedup.redis]
url = "redis://127.0.0.1:$port"
[quotas.cluster]
gateways = 3
lease_ms = $lease
[[quotas.rules]]
scope = "stream"
streams = "c.*"
events_per_sec = $r
cluster = $cluster
EOF
    SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__ENABLED=false \
      SLUICE_MQTT__ENABLED=false SLUICE_LOG__DATA_DIR="$dir/data" RUST_LOG=error \
      "$bin" serve --config "$dir/sluice.toml" > "$dir/out" 2>/dev/null &
    pids+=($!)
    addr=""
    for _ in $(seq 1 200); do
      addr=$(grep -o 'http=[^ ]*' "$dir/out" 2>/dev/null | cut -d= -f2 || true)
      [ -n "$addr" ] && break
      sleep 0.05
    done
    [ -n "$addr" ] || { echo "no address for $mode gateway $g" >&2; exit 1; }
    addrs+=("$addr")
  done
  common=(--events-per-request 10 --payload-bytes 100 --duration-secs "$secs" --warmup-secs 2 --json)
  r0=$(cpu $redis) k0=$(calls || echo 0)
  $lt http --url "http://${addrs[0]}/v1/streams/c.one/events" --connections 32 "${common[@]}" > "$work/g0" &
  l0=$!
  $lt http --url "http://${addrs[1]}/v1/streams/c.one/events" --connections 4 "${common[@]}" > "$work/g1" &
  l1=$!
  $lt http --url "http://${addrs[2]}/v1/streams/c.one/events" --connections 2 --rate 50 "${common[@]}" > "$work/g2"
  wait $l0 $l1
  python3 - "$mode" "$rate" "$work" "$r0" "$(cpu $redis)" "$k0" "$(calls || echo 0)" <<'PY'
import json, sys
mode, rate, work = sys.argv[1], float(sys.argv[2]), sys.argv[3]
g = [json.load(open(f"{work}/g{i}")) for i in range(3)]
adm = [x["admitted_events_per_s"] for x in g]
total = sum(adm)
rcpu = (int(sys.argv[5]) - int(sys.argv[4])) / 100
dur = g[0]["duration_s"] + 2
calls = int(sys.argv[7] or 0) - int(sys.argv[6] or 0)
print("%-9s %8.0f events/s admitted = %5.1f%% of %d  by gateway %s  g0 p99 %6.2f ms  redis CPU %5.2f us/event  %7.0f redis calls/s" % (
    mode, total, 100 * total / rate, rate, "/".join("%.0f" % a for a in adm),
    g[0]["latency_us"]["p99"] / 1000, rcpu * 1e6 / max(total * dur, 1), calls / dur))
PY
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
done
