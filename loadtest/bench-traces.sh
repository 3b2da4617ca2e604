#!/usr/bin/env bash
# The cost of traces ([telemetry.traces]): HTTP single events and batches of 100 (64
# connections, 100-byte events) against one gateway build with traces off; on with contexts
# propagated only (no OTLP endpoint: Sluice starts an unsampled trace per batch and stores its
# traceparent in every record); on with every batch sampled (the producer's traceparent is
# sampled) and exported over OTLP/gRPC to `sluice-loadtest otlp-sink`. Alternating in the same
# run, each on a fresh data directory.
#   loadtest/bench-traces.sh [ROUNDS] [SECONDS]
# Prints one line per round, mode and scenario (throughput, p99, the gateway's CPU per event,
# spans exported and dropped), then each mode's median as a share of traces off.
set -euo pipefail
rounds=${1:-3} secs=${2:-5}
cd "$(dirname "$0")/.."
[ -x target/release/sluice ] && [ -x target/release/sluice-loadtest ] \
  || cargo build --release -q -p sluice-gateway -p sluice-loadtest
bin=target/release/sluice lt=target/release/sluice-loadtest
work=$(mktemp -d)
"$lt" otlp-sink > "$work/otlp.out" &
sink=$!
trap 'kill $sink 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -q otlp= "$work/otlp.out" 2>/dev/null && break; sleep 0.05; done
otlp=$(grep -o 'otlp=[^ ]*' "$work/otlp.out" | cut -d= -f2)
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
metric() { # admin name labels
  curl -s "http://$1/metrics" | awk -v n="$2" -v l="$3" '$1 == n l {print $2; f=1} END {if (!f) print 0}'
}
results=$work/results
run() { # label config [header]
  local dir; dir=$(mktemp -d -p "$work")
  printf '%s' "$2" > "$dir/sluice.toml"
  SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 SLUICE_GRPC__ENABLED=false \
    SLUICE_MQTT__ENABLED=false SLUICE_LOG__DATA_DIR="$dir/data" RUST_LOG=error \
    "$bin" serve --config "$dir/sluice.toml" > "$dir/out" 2>/dev/null &
  local pid=$! line=""
  for _ in $(seq 1 200); do
    line=$(grep "http=" "$dir/out" 2>/dev/null || true)
    [ -n "$line" ] && break
    sleep 0.05
  done
  [ -n "$line" ] || { echo "no address for $1" >&2; kill $pid; exit 1; }
  local addr admin c0 r e0 d0
  addr=$(grep -o 'http=[^ ]*' <<<"$line" | cut -d= -f2)
  admin=$(grep -o 'admin=[^ ]*' <<<"$line" | cut -d= -f2)
  local hdr=()
  [ -n "${3:-}" ] && hdr=(--header "traceparent: $3")
  for n in 1 100; do
    c0=$(cpu $pid)
    e0=$(metric "$admin" sluice_trace_spans_total '{result="exported"}')
    d0=$(metric "$admin" sluice_trace_spans_total '{result="dropped"}')
    r=$($lt http --url "http://$addr/v1/streams/t/events" --connections 64 --events-per-request $n \
      --payload-bytes 100 --duration-secs "$secs" --warmup-secs 1 --json "${hdr[@]}")
    python3 - "$r" "$c0" "$(cpu $pid)" "$1" "$n" "$results" \
      "$e0" "$(metric "$admin" sluice_trace_spans_total '{result="exported"}')" \
      "$d0" "$(metric "$admin" sluice_trace_spans_total '{result="dropped"}')" <<'PY'
import json, sys
d = json.loads(sys.argv[1]); cpu = (int(sys.argv[3]) - int(sys.argv[2])) / 100
rate = d["events_per_s"]; n = rate * d["duration_s"] or 1
exported = float(sys.argv[8]) - float(sys.argv[7]); dropped = float(sys.argv[10]) - float(sys.argv[9])
print("%-10s http x%-3s  %8.0f events/s  p99 %6.2f ms  CPU %5.2f us/event  errors %d  non-2xx %d  spans exported %d dropped %d" % (
    sys.argv[4], sys.argv[5], rate, d["latency_us"]["p99"] / 1000, cpu * 1e6 / n, d["errors"], d["non_2xx"], exported, dropped))
with open(sys.argv[6], "a") as f:
    f.write("%s %s %f\n" % (sys.argv[4], sys.argv[5], rate))
PY
  done
  kill $pid; wait $pid 2>/dev/null || true; rm -rf "$dir"
}
for _ in $(seq 1 "$rounds"); do
  run off ''
  run propagate '[telemetry.traces]
enabled = true
'
  run exported "[telemetry.traces]
enabled = true
otlp_endpoint = \"http://$otlp\"
" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01
done
python3 - "$results" <<'PY'
import statistics, sys
rates = {}
for line in open(sys.argv[1]):
    mode, n, rate = line.split()
    rates.setdefault((mode, n), []).append(float(rate))
for n in ("1", "100"):
    off = statistics.median(rates[("off", n)])
    for mode in ("propagate", "exported"):
        m = statistics.median(rates[(mode, n)])
        print("http x%-3s  %-9s median %8.0f events/s = %3.0f%% of traces off (%.0f)" % (n, mode, m, 100 * m / off, off))
PY
kill $sink 2>/dev/null || true
wait $sink 2>/dev/null || true
