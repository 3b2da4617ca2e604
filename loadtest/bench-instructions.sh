#!/usr/bin/env bash
# Instructions per event of each ingest path, counted by valgrind's callgrind in the gateway
# process: unlike events/s, the count does not move with the neighbours' load, so a change's cost
# shows as a ratio between two commits (issue 23). One gateway runs under callgrind (the embedded
# log, `ack = durable`); per path its counters are zeroed, the generator runs a few seconds with
# few connections (no warm-up: every request sent is counted), the counters are dumped, and the
# instructions are divided by the events the gateway acked. A second gateway with dedup on (the
# embedded window) gives the cost of exactly-once on the same paths.
#   loadtest/bench-instructions.sh [SECONDS]
# Prints a Markdown table (also left in target/bench-instructions.md).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3}"
command -v valgrind >/dev/null || { echo "valgrind missing (Debian: apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
lt="$PWD/target/release/sluice-loadtest"
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
rows="$work/rows"

# start NAME CONFIG: a gateway under callgrind; sets addr_http, addr_grpc, addr_mqtt, gw_pid.
start() {
  mkdir -p "$work/$1"
  printf '%s' "$2" >"$work/$1/sluice.toml"
  SLUICE_LOG__DATA_DIR="$work/$1/data" SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 \
    SLUICE_GRPC__LISTEN=127.0.0.1:0 SLUICE_MQTT__LISTEN=127.0.0.1:0 RUST_LOG=error \
    valgrind --tool=callgrind --callgrind-out-file="$work/$1/cg.out" \
    target/release/sluice serve --config "$work/$1/sluice.toml" >"$work/$1/out" 2>"$work/$1/err" &
  gw_pid=$!
  pids+=("$gw_pid")
  for _ in $(seq 1200); do grep -q "sluice listening" "$work/$1/out" 2>/dev/null && break; sleep 0.05; done
  local line
  line="$(grep "sluice listening" "$work/$1/out")" || { cat "$work/$1/err" >&2; exit 1; }
  addr_http="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$line")"
  addr_grpc="$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$line")"
  addr_mqtt="$(sed -E 's/.*mqtt=([^ ]+).*/\1/' <<<"$line")"
}

# measure GATEWAY PATH -- generator args: zero, run, dump, and record instructions per event.
dumps=0
measure() {
  local gw=$1 path=$2
  shift 3
  callgrind_control -z "$gw_pid" >/dev/null 2>&1
  local out
  out="$("$lt" "$@" --duration-secs "$secs" --warmup-secs 0 --json)"
  dumps=$((dumps + 1))
  callgrind_control -d "$gw_pid" >/dev/null 2>&1
  local file="$work/$gw/cg.out.$dumps"
  for _ in $(seq 600); do grep -q '^totals:' "$file" 2>/dev/null && break; sleep 0.05; done
  python3 - "$gw" "$path" "$out" "$file" >>"$rows" <<'PY'
import json, sys
gw, path, out, file = sys.argv[1:5]
r = json.loads(out)
events = r.get("admitted_events") or round(r.get("msgs_per_s", 0) * r["duration_s"])
ir = next(int(l.split()[1]) for l in open(file) if l.startswith("totals:"))
print(json.dumps({"gw": gw, "path": path, "events": events, "ir": ir}))
PY
}

start plain ''
dumps=0
# HTTP events carry unique ids on both gateways (the same bodies with dedup off and on).
measure plain "HTTP batches of 100" -- http --url "http://$addr_http/v1/streams/b/events" \
  --connections 4 --events-per-request 100 --payload-bytes 100 --ids
measure plain "HTTP single events" -- http --url "http://$addr_http/v1/streams/s/events" \
  --connections 4 --events-per-request 1 --payload-bytes 100 --ids
measure plain "gRPC PublishStream, batches of 100" -- grpc --url "http://$addr_grpc" --stream g \
  --mode stream --connections 1 --in-flight 4 --events-per-request 100 --payload-bytes 100
measure plain "gRPC unary, single events" -- grpc --url "http://$addr_grpc" --stream u --mode unary \
  --connections 4 --events-per-request 1 --payload-bytes 100
measure plain "WebSocket, 10 events per frame" -- ws --url "ws://$addr_http/v1/streams/w/ws" \
  --connections 4 --window 8 --events-per-frame 10 --payload-bytes 100
measure plain "WebSocket, 1 event per frame" -- ws --url "ws://$addr_http/v1/streams/w1/ws" \
  --connections 4 --window 8 --events-per-frame 1 --payload-bytes 100
measure plain "MQTT QoS 1" -- mqtt --addr "$addr_mqtt" --connections 4 --window 8 --payload-bytes 100
kill "$gw_pid"; wait "$gw_pid" 2>/dev/null || true

start dedup $'[streams.defaults]\ndedup = true\n'
dumps=0
measure dedup "HTTP batches of 100" -- http --url "http://$addr_http/v1/streams/b/events" \
  --connections 4 --events-per-request 100 --payload-bytes 100 --ids
measure dedup "HTTP single events" -- http --url "http://$addr_http/v1/streams/s/events" \
  --connections 4 --events-per-request 1 --payload-bytes 100 --ids
kill "$gw_pid"; wait "$gw_pid" 2>/dev/null || true

mkdir -p target
python3 - "$rows" "$(git rev-parse --short HEAD)" "$secs" <<'PY' | tee target/bench-instructions.md
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
plain = {r["path"]: r for r in rows if r["gw"] == "plain"}
dedup = {r["path"]: r for r in rows if r["gw"] == "dedup"}
print("### Instructions per event (callgrind), commit %s, %s s per path" % (sys.argv[2], sys.argv[3]))
print()
print("| path | events | instructions per event | with dedup (embedded) | dedup's share |")
print("|---|---|---|---|---|")
for path, r in plain.items():
    per = r["ir"] / max(1, r["events"])
    d = dedup.get(path)
    dper = d["ir"] / max(1, d["events"]) if d else None
    print("| %s | %s | %s | %s | %s |" % (
        path, "{:,}".format(r["events"]), "{:,.0f}".format(per),
        "-" if dper is None else "{:,.0f}".format(dper),
        "-" if dper is None else "+%.0f%%" % (100 * (dper - per) / per)))
PY
