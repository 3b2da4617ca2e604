#!/usr/bin/env bash
# The spool in front of Kafka (docs/kafka.md "The spool"), against Tansu, same run:
#  1. throughput: HTTP batches of 100 into a spooled stream (acked from the spool, forwarded to
#     Kafka) beside the same load into a stream acked by Kafka directly, and the direct rdkafka
#     producer as the peer; alternating rounds. For the spooled stream the forwarded rate is
#     printed too: sustained throughput is the lower of the two.
#  2. drain: Kafka frozen (SIGSTOP) while producers fill the spool with BACKLOG events, then
#     resumed (SIGCONT) while new load continues at LIVE events/s: how fast the backlog drains.
# Usage: loadtest/bench-spool.sh [seconds per round] [rounds] [backlog events] [live events/s]
#                                [outage seconds]
# The outage lasts as long as spooling the backlog takes (20 s by default).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
rounds="${2:-2}"
backlog="${3:-1000000}"
live="${4:-20000}"
outage="${5:-20}"
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
data_dir = "$work/data"
[log.kafka]
bootstrap_servers = "127.0.0.1:$port"
create_topics = true
[log.spool]
max_bytes = 21474836480
[streams.declare.direct]
partitions = 4
[streams.declare.spooled]
partitions = 4
ack = "spooled"
TOML
target/release/sluice serve --config "$work/sluice.toml" >"$work/sluice.out" 2>"$work/sluice.err" &
sluice_pid=$!
trap 'kill -CONT $tansu_pid 2>/dev/null; kill $sluice_pid $tansu_pid 2>/dev/null; wait $sluice_pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 300); do grep -q "sluice listening" "$work/sluice.out" && break; sleep 0.1; done
line="$(grep "sluice listening" "$work/sluice.out")"
http_addr="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$line")"
admin_addr="$(sed -E 's/.*admin=([^ ]+).*/\1/' <<<"$line")"
for _ in $(seq 600); do curl -sf "http://$admin_addr/readyz" >/dev/null && break; sleep 0.1; done
for s in direct spooled; do
  for _ in $(seq 600); do
    curl -sf -H 'content-type: application/json' -d '"warm"' "http://$http_addr/v1/streams/$s/events" >/dev/null && break
    sleep 0.1
  done
done
metric() { # metric NAME: the sum of its samples for stream "spooled"
  curl -sf "http://$admin_addr/metrics" | awk -v n="$1" '$1 ~ "^"n"\\{stream=\"spooled\"" {s+=$2} END {printf "%d", s}'
}
drained() { # waits until the spooled stream has nothing waiting
  for _ in $(seq 1200); do [ "$(metric sluice_spool_events)" = 0 ] && return; sleep 0.5; done
}
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); tansu $("$tansu" --version 2>/dev/null | head -1); commit $(git rev-parse --short HEAD)"
load=(--connections 64 --events-per-request 100 --payload-bytes 100 --duration-secs "$secs" --json)
for r in $(seq "$rounds"); do
  echo "== round $r: direct rdkafka producer (64 producers x 100 events of 100 B, Sluice's settings)"
  target/release/sluice-loadtest kafka --config "$work/sluice.toml" --topic direct \
    --connections 64 --events-per-request 100 --payload-bytes 100 --duration-secs "$secs" --json
  echo "== round $r: HTTP -> Sluice -> Kafka (ack durable)"
  target/release/sluice-loadtest http --url "http://$http_addr/v1/streams/direct/events" "${load[@]}"
  drained
  before="$(metric sluice_spool_forwarded_events_total)"
  t0="$(date +%s.%N)"
  echo "== round $r: HTTP -> Sluice spool -> Kafka (ack spooled)"
  target/release/sluice-loadtest http --url "http://$http_addr/v1/streams/spooled/events" "${load[@]}"
  waiting="$(metric sluice_spool_events)"
  drained
  t1="$(date +%s.%N)"
  after="$(metric sluice_spool_forwarded_events_total)"
  python3 -c "print('   forwarded %d events in %.1f s (load and the drain after it) = %.0f events/s; %d were waiting when the load stopped' % ($after-$before, $t1-$t0, ($after-$before)/($t1-$t0), $waiting))"
done

echo "== drain: Kafka frozen (SIGSTOP) for $outage s while $backlog events are spooled"
kill -STOP "$tansu_pid"
rate=$(( backlog / 100 / outage ))
target/release/sluice-loadtest http --url "http://$http_addr/v1/streams/spooled/events" \
  --connections 64 --events-per-request 100 --payload-bytes 100 --rate "$rate" --duration-secs "$outage" --warmup-secs 0 --json
echo "   /readyz: $(curl -s "http://$admin_addr/readyz")"
waiting="$(metric sluice_spool_events)"
echo "   waiting: $waiting events; spool bytes: $(metric sluice_spool_bytes)"
echo "== drain: Kafka resumed (SIGCONT) with $live events/s of new load"
before="$(metric sluice_spool_forwarded_events_total)"
kill -CONT "$tansu_pid"
t0="$(date +%s.%N)"
target/release/sluice-loadtest http --url "http://$http_addr/v1/streams/spooled/events" \
  --connections 16 --events-per-request 100 --payload-bytes 100 --rate "$(( live / 100 ))" \
  --duration-secs 600 --warmup-secs 0 --json >"$work/live.json" &
live_pid=$!
# The backlog is gone once what waits is no more than a moment of live load.
for _ in $(seq 2400); do
  [ "$(metric sluice_spool_events)" -le "$(( live / 5 ))" ] && break
  sleep 0.25
done
t1="$(date +%s.%N)"
after="$(metric sluice_spool_forwarded_events_total)"
kill -TERM "$live_pid" 2>/dev/null || true
wait "$live_pid" 2>/dev/null || true
python3 -c "
b, f, t = $waiting, $after - $before, $t1 - $t0
print('   backlog of %d drained in %.1f s beside %d events/s of new load: %.0f events/s forwarded in all, %.0f events/s of backlog' % (b, t, $live, f / t, b / t))"
