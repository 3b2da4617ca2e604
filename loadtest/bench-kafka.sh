#!/usr/bin/env bash
# HTTP → Sluice → Tansu against a direct rdkafka producer into the same broker, same run,
# same producer settings (the [log.kafka] of the generated config), alternating A/B rounds.
# Usage: loadtest/bench-kafka.sh [seconds per round] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
rounds="${2:-2}"
scripts/install-deps.sh --with-tansu >/dev/null
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
tansu="$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
tansu_pid=$!
cat >"$work/sluice.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[log]
kind = "kafka"
[log.kafka]
bootstrap_servers = "127.0.0.1:$port"
create_topics = true
[streams.declare.bench]
partitions = 4
TOML
target/release/sluice serve --config "$work/sluice.toml" >"$work/sluice.out" 2>"$work/sluice.err" &
sluice_pid=$!
trap 'kill $sluice_pid $tansu_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 300); do grep -q "sluice listening" "$work/sluice.out" && break; sleep 0.1; done
line="$(grep "sluice listening" "$work/sluice.out")"
http_addr="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$line")"
admin_addr="$(sed -E 's/.*admin=([^ ]+).*/\1/' <<<"$line")"
for _ in $(seq 600); do curl -sf "http://$admin_addr/readyz" >/dev/null && break; sleep 0.1; done
# The declared stream's topic exists once the gateway can produce to it.
for _ in $(seq 600); do
  curl -sf -H 'content-type: application/json' -d '"warm"' "http://$http_addr/v1/streams/bench/events" >/dev/null && break
  sleep 0.1
done
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); tansu $("$tansu" --version 2>/dev/null | head -1)"
for r in $(seq "$rounds"); do
  echo "== round $r: direct rdkafka producer (64 producers x 100 events of 100 B, Sluice's settings)"
  target/release/sluice-loadtest kafka --config "$work/sluice.toml" --topic bench \
    --connections 64 --events-per-request 100 --payload-bytes 100 --duration-secs "$secs" --json
  echo "== round $r: HTTP -> Sluice -> Tansu (64 connections x 100 events of 100 B, ack durable)"
  target/release/sluice-loadtest http --url "http://$http_addr/v1/streams/bench/events" \
    --connections 64 --events-per-request 100 --payload-bytes 100 --duration-secs "$secs" --json
done
