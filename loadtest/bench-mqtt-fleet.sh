#!/usr/bin/env bash
# A device fleet against Sluice (release build, embedded log): a reconnect storm of N devices
# with API-key credentials (all CONNECT at once, publish one QoS 1 message, wait for PUBACK),
# clean and with persistent sessions, the latter again after a gateway restart (sessions
# restored from data_dir); then the memory of idle connections, Sluice and Mosquitto in the
# same run, spread over loopback source addresses.
# Usage: loadtest/bench-mqtt-fleet.sh [storm devices, 10000] [idle connections, 18000]
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-10000}"
idle="${2:-18000}"
scripts/install-deps.sh --with-mqtt >/dev/null
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
work="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port="$(free_port)"
mosq_port="$(free_port)"
secret="storm-secret-$(date +%s)"
hash="$(printf '%s' "fleet.$secret" | sha256sum | cut -d' ' -f1)"
cat >"$work/sluice.toml" <<CONF
[mqtt]
max_connections_per_principal = 200000
[mqtt.auth]
allow_anonymous = false
[http.auth]
allow_anonymous = false
[[auth.api_keys]]
id = "fleet"
secret_sha256 = "$hash"
principal = "fleet"
streams = ["*"]
CONF
cat >"$work/mosquitto.conf" <<CONF
listener $mosq_port 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
CONF
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$work"' EXIT
start_sluice() {
  : >"$work/sluice.out"
  SLUICE_LOG__DATA_DIR="$work/data" SLUICE_MQTT__LISTEN="127.0.0.1:$port" \
    SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__LISTEN=127.0.0.1:0 \
    target/release/sluice serve --config "$work/sluice.toml" >"$work/sluice.out" 2>"$work/sluice.err" &
  sluice_pid=$!
  pids+=("$sluice_pid")
  for _ in $(seq 300); do grep -q "sluice listening" "$work/sluice.out" && return; sleep 0.1; done
  echo "sluice did not start" >&2; cat "$work/sluice.err" >&2; exit 1
}
stop_sluice() { kill -TERM "$sluice_pid"; wait "$sluice_pid" || true; }
storm() { # label, extra args
  local label="$1"; shift
  echo "== $label"
  target/release/sluice-loadtest mqtt --addr "127.0.0.1:$port" --storm --connections "$devices" \
    --username fleet --password "$secret" --topic "fleet/dev{c}" "$@"
}
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), open files $(ulimit -n); commit $(git rev-parse --short HEAD)"
start_sluice
storm "storm: $devices devices, clean sessions" --client-prefix clean
storm "storm: $devices devices, persistent sessions (first connect: none to resume)" --client-prefix dev --persistent
stop_sluice
start_sluice
storm "storm after a gateway restart: $devices devices resuming persistent sessions" --client-prefix dev --persistent
stop_sluice

# Idle connections on fresh processes (memory freed after load stays with the allocator).
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
start_sluice
/usr/sbin/mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
mosq_pid=$!
pids+=("$mosq_pid")
sleep 0.5
# One loopback source address has ~28,000 ephemeral ports towards one listener.
addrs=$(( idle / 25000 + 1 ))
for target in "sluice $port $sluice_pid fleet $secret" "mosquitto $mosq_port $mosq_pid" ; do
  set -- $target
  creds=()
  [ -n "${4:-}" ] && creds=(--username "$4" --password "$5")
  before="$(rss "$3")"
  target/release/sluice-loadtest mqtt --addr "127.0.0.1:$2" --connections "$idle" --idle \
    --source-addrs "$addrs" --duration-secs 20 "${creds[@]}" >"$work/idle.out" 2>&1 &
  idle_pid=$!
  for _ in $(seq 1200); do grep -q "idle connections open" "$work/idle.out" && break; sleep 0.1; done
  sleep 1
  after="$(rss "$3")"
  cat "$work/idle.out"
  echo "== $1: $idle idle connections: RSS ${before} KiB -> ${after} KiB = $(( (after - before) * 1024 / idle )) bytes per connection"
  kill "$idle_pid" 2>/dev/null; wait "$idle_pid" 2>/dev/null || true
done
