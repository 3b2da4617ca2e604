#!/usr/bin/env bash
# MQTT QoS 1 into Sluice (PUBACK after the durable append to the embedded log) and into Debian's
# Mosquitto (persistence off: PUBACK once in memory) in the same run with the same generator:
# closed loop (100 connections, 64 in flight each), open loop at half the target rate, and the
# memory of 10,000 idle connections.
# Usage: loadtest/bench-mqtt.sh [seconds per measurement]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
scripts/install-deps.sh --with-mqtt >/dev/null
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
work="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sluice_port="$(free_port)"
mosq_port="$(free_port)"
cat >"$work/mosquitto.conf" <<CONF
listener $mosq_port 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
CONF
SLUICE_LOG__DATA_DIR="$work/data" SLUICE_MQTT__LISTEN="127.0.0.1:$sluice_port" \
  SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__LISTEN=127.0.0.1:0 \
  target/release/sluice serve >"$work/sluice.out" 2>"$work/sluice.err" &
sluice_pid=$!
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mosq_pid=$!
trap 'kill $sluice_pid $mosq_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 300); do grep -q "sluice listening" "$work/sluice.out" && break; sleep 0.1; done
sleep 0.5
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(/usr/sbin/mosquitto -h | head -1)"
# Idle connections first, on fresh processes (memory freed after load stays with the allocator).
for target in "sluice $sluice_port $sluice_pid" "mosquitto $mosq_port $mosq_pid"; do
  set -- $target
  before="$(rss "$3")"
  target/release/sluice-loadtest mqtt --addr "127.0.0.1:$2" --connections 10000 --idle \
    --duration-secs 8 >"$work/idle.out" 2>&1 &
  idle_pid=$!
  for _ in $(seq 600); do grep -q "idle connections open" "$work/idle.out" && break; sleep 0.1; done
  sleep 1
  after="$(rss "$3")"
  echo "== $1: 10,000 idle connections: RSS ${before} KiB -> ${after} KiB = $(( (after - before) * 1024 / 10000 )) bytes per connection"
  wait "$idle_pid" || true
done
for target in "sluice $sluice_port" "mosquitto $mosq_port"; do
  set -- $target
  echo "== $1: closed loop, 100 connections x 64 QoS 1 publishes of 100 B in flight"
  target/release/sluice-loadtest mqtt --addr "127.0.0.1:$2" --connections 100 --window 64 \
    --payload-bytes 100 --duration-secs "$secs" --json
  echo "== $1: open loop at 75,000 msgs/s (100 connections, QoS 1, 100 B)"
  target/release/sluice-loadtest mqtt --addr "127.0.0.1:$2" --connections 100 --window 64 \
    --payload-bytes 100 --rate 75000 --duration-secs "$secs" --json
done
