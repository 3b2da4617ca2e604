#!/usr/bin/env bash
# Schema cost (issue 18): HTTP batches of 100 JSON events of ~100 bytes with 5 fields, against
# one gateway build with no schema on the stream, with a small JSON Schema (5 typed fields,
# 3 required, one bound) on it, and with the same shape as an Avro record (JSON checked and
# encoded to Avro binary), alternating in the same run on fresh data directories.
#   loadtest/bench-schema.sh [ROUNDS] [SECONDS]
# Prints a line per round and configuration (throughput, p99, the gateway's CPU per event), then
# the median with the schema as a share of without.
set -euo pipefail
rounds=${1:-3} secs=${2:-5}
cd "$(dirname "$0")/.."
[ -x target/release/sluice ] && [ -x target/release/sluice-loadtest ] \
  || cargo build --release -q -p sluice-gateway -p sluice-loadtest
bin=target/release/sluice lt=target/release/sluice-loadtest
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/order.json" <<'JSON'
{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
 "required": ["id", "amount", "currency"],
 "properties": {"id": {"type": "string"}, "amount": {"type": "number", "minimum": 0},
   "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
   "customer": {"type": "string"}, "items": {"type": "integer"}}}
JSON
cat > "$work/order.avsc" <<'JSON'
{"type": "record", "name": "Order", "fields": [
  {"name": "id", "type": "string"}, {"name": "amount", "type": "double"},
  {"name": "currency", "type": {"type": "enum", "name": "Currency", "symbols": ["EUR", "USD", "GBP"]}},
  {"name": "customer", "type": ["null", "string"], "default": null},
  {"name": "items", "type": ["null", "long"], "default": null}]}
JSON
python3 - "$work/body.json" <<'PY'
import json, sys
events = [{"id": "o-%08d" % i, "amount": 12.5 + i, "currency": "EUR",
           "customer": "customer-%010d" % i, "items": i % 7} for i in range(100)]
text = "[" + ",".join(json.dumps(e, separators=(",", ":")) for e in events) + "]"
open(sys.argv[1], "w").write(text)
print("body: 100 events, %d bytes each on average" % (len(text) // 100), file=sys.stderr)
PY
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
  local c0 r
  c0=$(cpu $pid)
  r=$($lt http --url "http://$addr/v1/streams/orders/events" --connections 64 \
    --body-file "$work/body.json" --header "content-type: application/json" \
    --duration-secs "$secs" --warmup-secs 1 --json)
  python3 - "$r" "$c0" "$(cpu $pid)" "$1" "$results" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); cpu = (int(sys.argv[3]) - int(sys.argv[2])) / 100
rate = d["admitted_events_per_s"]; n = rate * d["duration_s"] or 1
print("%-7s http x100  %8.0f events/s  p99 %6.2f ms  CPU %5.2f us/event  errors %d  non-2xx %d" % (
    sys.argv[4], rate, d["latency_us"]["p99"] / 1000, cpu * 1e6 / n, d["errors"], d["non_2xx"]))
with open(sys.argv[5], "a") as f:
    f.write("%s %f\n" % (sys.argv[4], rate))
PY
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$dir"
}
for _ in $(seq 1 "$rounds"); do
  run off ''
  run schema "[schemas.orders]
value = \"$work/order.json\"
"
  run avro "[schemas.orders]
format = \"avro\"
value = \"$work/order.avsc\"
"
done
python3 - "$results" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    label, rate = line.split()
    rates.setdefault(label, []).append(float(rate))
off = statistics.median(rates["off"])
for label in ("schema", "avro"):
    on = statistics.median(rates[label])
    print("http x100  %-6s median %8.0f events/s = %3.0f%% of no schema (%.0f)" % (label, on, 100 * on / off, off))
PY
