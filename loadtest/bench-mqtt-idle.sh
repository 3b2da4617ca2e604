#!/usr/bin/env bash
# Memory per idle MQTT connection at scale: N idle connections (API-key credentials, keep-alive
# only) held at once against Sluice (release build, embedded log), then against Mosquitto, in
# the same run with the same generator. A process may hold at most `ulimit -Hn` open files (20,000
# on the machines this project is measured on, with no CAP_SYS_RESOURCE to raise it), so the
# connections are spread over P gateway processes (and P generators, each on loopback source
# addresses of its own); memory per connection = the gateways' summed RSS growth / N.
# Usage: loadtest/bench-mqtt-idle.sh [connections, 100000] [processes, enough for the fd limit]
set -euo pipefail
cd "$(dirname "$0")/.."
total="${1:-100000}"
limit="$(ulimit -Hn)"
[ "$limit" = unlimited ] && limit=1000000
ulimit -n "$limit"
# Each side needs one descriptor per connection plus its own (listeners, log, epoll, ...).
# The fewest processes that split the connections evenly within that.
procs="${2:-}"
if [ -z "$procs" ]; then
  procs=$(( (total + limit - 2001) / (limit - 2000) ))
  while [ $(( total % procs )) -ne 0 ]; do procs=$(( procs + 1 )); done
fi
per=$(( total / procs ))
total=$(( per * procs ))
scripts/install-deps.sh --with-mqtt >/dev/null
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
work="$(mktemp -d)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret="idle-secret-$(date +%s)"
hash="$(printf '%s' "fleet.$secret" | sha256sum | cut -d' ' -f1)"
cat >"$work/sluice.toml" <<CONF
[mqtt]
max_connections = 200000
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
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Each generator binds loopback source addresses of its own (127.0.0.N), a few thousand
# connections each: ports picked at bind time (before the destination is known) come from a
# smaller share of the ephemeral range than connect's.
addrs_per=$(( per / 4000 + 1 ))
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), open files per process $limit; commit $(git rev-parse --short HEAD)"
echo "$total idle connections over $procs processes of $per each"
measure() { # label, first source address; servers: "pid port" per process; creds in $creds
  local label="$1" base="$2" before=0 after=0 gen=()
  for s in "${servers[@]}"; do set -- $s; before=$(( before + $(rss "$1") )); done
  local i=0
  for s in "${servers[@]}"; do
    set -- $s
    target/release/sluice-loadtest mqtt --addr "127.0.0.1:$2" --connections "$per" --idle \
      --source-addrs "$addrs_per" --source-first $(( base + i * addrs_per )) --duration-secs 600 \
      --client-prefix "idle$i" "${creds[@]}" >"$work/gen$i.out" 2>&1 &
    gen+=($!)
    i=$(( i + 1 ))
  done
  for i in $(seq 0 $(( procs - 1 ))); do
    for _ in $(seq 3000); do
      grep -q "idle connections open" "$work/gen$i.out" && break
      if ! kill -0 "${gen[$i]}" 2>/dev/null; then cat "$work/gen$i.out" >&2; exit 1; fi
      sleep 0.1
    done
    grep -q "idle connections open" "$work/gen$i.out" || { echo "generator $i did not connect" >&2; cat "$work/gen$i.out" >&2; exit 1; }
  done
  sleep 1
  for s in "${servers[@]}"; do set -- $s; after=$(( after + $(rss "$1") )); done
  echo "== $label: $total idle connections: RSS ${before} KiB -> ${after} KiB = $(( (after - before) * 1024 / total )) bytes per connection"
  kill "${gen[@]}" 2>/dev/null; wait "${gen[@]}" 2>/dev/null || true
}
servers=()
for i in $(seq 0 $(( procs - 1 ))); do
  port="$(free_port)"
  SLUICE_LOG__DATA_DIR="$work/data$i" SLUICE_MQTT__LISTEN="127.0.0.1:$port" \
    SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__LISTEN=127.0.0.1:0 \
    target/release/sluice serve --config "$work/sluice.toml" >"$work/sluice$i.out" 2>"$work/sluice$i.err" &
  pids+=($!)
  servers+=("$! $port")
done
for i in $(seq 0 $(( procs - 1 ))); do
  for _ in $(seq 300); do grep -q "sluice listening" "$work/sluice$i.out" && break; sleep 0.1; done
  grep -q "sluice listening" "$work/sluice$i.out" || { echo "sluice $i did not start" >&2; cat "$work/sluice$i.err" >&2; exit 1; }
done
creds=(--username fleet --password "$secret")
measure "sluice ($procs processes)" 2
kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
pids=()
servers=()
for i in $(seq 0 $(( procs - 1 ))); do
  port="$(free_port)"
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n' "$port" >"$work/mosquitto$i.conf"
  /usr/sbin/mosquitto -c "$work/mosquitto$i.conf" >"$work/mosquitto$i.log" 2>&1 &
  pids+=($!)
  servers+=("$! $port")
done
sleep 0.5
creds=()
measure "mosquitto ($procs processes)" $(( 2 + procs * addrs_per ))
