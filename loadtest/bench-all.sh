#!/usr/bin/env bash
# Every ingest path beside its peer, in one run, with one generator build, printed as one table:
#   HTTP batches of 100 and single events      peer: the bare hyper sink (sluice-loadtest sink)
#   HTTP single events, second generator       wrk (Debian's), against Sluice and against the sink
#   gRPC PublishStream (x100) and unary (x1)   peer: single-event HTTP (unary's target is 90% of it)
#   WebSocket 10 and 1 events per frame         peer: MQTT QoS 1 over the same 100 connections
#   MQTT QoS 1                                  peer: Mosquitto (Debian's, persistence off)
#   HTTP -> Kafka (Tansu)                       peer: a direct rdkafka producer into the same Tansu
# For each: the closed-loop maximum, then (where the generator has an open loop: HTTP, gRPC,
# WebSocket, MQTT; not the direct Kafka producer) p50 / p99 / p99.9 at half that maximum.
#
#   loadtest/bench-all.sh [SECONDS] [CPUS] [PAYLOAD]
# SECONDS per measurement (default 5, after 1 s of warm-up); CPUS pins the gateway and the peer
# servers with taskset (e.g. `0` for one core, `0-1` for two, empty for none); the generators are
# not pinned. PAYLOAD: bytes of each event's value (default 100; wrk's body stays 100).
# Installs what it needs (Mosquitto, wrk, Tansu) and builds the release binaries. Prints the
# table (Markdown, with the machine and the commit) and leaves it in target/bench-all.md, for
# BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-5}"
cpus="${2:-}"
payload="${3:-100}"
scripts/install-deps.sh --with-mqtt --with-wrk --with-tansu >/dev/null
cargo build --release --locked -q --bin sluice --bin sluice-loadtest
lt=target/release/sluice-loadtest
tansu="$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")"
pin=()
[ -n "$cpus" ] && pin=(taskset -c "$cpus")
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # file pattern
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  echo "bench-all: '$2' never appeared in $1" >&2; cat "$1" >&2; exit 1
}
ulimit -n 65536 2>/dev/null || true

# The gateway on the embedded log, `ack = durable` (the default).
mqtt_port="$(free_port)"
SLUICE_LOG__DATA_DIR="$work/data" SLUICE_HTTP__LISTEN=127.0.0.1:0 SLUICE_ADMIN__LISTEN=127.0.0.1:0 \
  SLUICE_GRPC__LISTEN=127.0.0.1:0 SLUICE_MQTT__LISTEN="127.0.0.1:$mqtt_port" RUST_LOG=error \
  "${pin[@]}" target/release/sluice serve >"$work/sluice.out" 2>/dev/null &
pids+=($!)
wait_for "$work/sluice.out" "sluice listening"
line="$(grep "sluice listening" "$work/sluice.out")"
http="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$line")"
grpc="$(sed -E 's/.*grpc=([^ ]+).*/\1/' <<<"$line")"
admin="$(sed -E 's/.*admin=([^ ]+).*/\1/' <<<"$line")"

# The bare hyper sink.
sink_port="$(free_port)"
"${pin[@]}" "$lt" sink --listen "127.0.0.1:$sink_port" >"$work/sink.out" 2>&1 &
pids+=($!)
for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$sink_port/x" -d x && break; sleep 0.05; done

# Mosquitto.
mosq_port="$(free_port)"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n' \
  "$mosq_port" >"$work/mosquitto.conf"
"${pin[@]}" /usr/sbin/mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)

# Tansu, and a second gateway producing to it.
kafka_port="$(free_port)"
"$tansu" broker --listener-url "tcp://127.0.0.1:$kafka_port" \
  --advertised-listener-url "tcp://127.0.0.1:$kafka_port" --storage-engine memory://tansu/ \
  >"$work/tansu.log" 2>&1 &
pids+=($!)
cat >"$work/kafka.toml" <<TOML
[http]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[grpc]
enabled = false
[mqtt]
enabled = false
[log]
kind = "kafka"
[log.kafka]
bootstrap_servers = "127.0.0.1:$kafka_port"
create_topics = true
[streams.declare.bench]
partitions = 4
TOML
RUST_LOG=error "${pin[@]}" target/release/sluice serve --config "$work/kafka.toml" \
  >"$work/kafka.out" 2>/dev/null &
pids+=($!)
wait_for "$work/kafka.out" "sluice listening"
khttp="$(sed -E 's/.*http=([^ ]+).*/\1/' <<<"$(grep "sluice listening" "$work/kafka.out")")"
kadmin="$(sed -E 's/.*admin=([^ ]+).*/\1/' <<<"$(grep "sluice listening" "$work/kafka.out")")"
for _ in $(seq 600); do
  curl -sf -H 'content-type: application/json' -d '"warm"' "http://$khttp/v1/streams/bench/events" \
    >/dev/null && break
  sleep 0.1
done

results="$work/results.jsonl"
# run NAME SIDE KIND -- generator args...: one measurement, appended to the results.
# At half load, Sluice's own histograms are read before and after (the gateway's /metrics):
# the time from admission to the ack point (`sluice_ack_seconds` of the path's protocol) and the
# fsync itself (`sluice_log_fsync_seconds`; Kafka's round trip for the Kafka path is inside
# the ack time and not separable), for the added-latency columns.
run() {
  local name=$1 side=$2 kind=$3
  shift 4
  local out scrape="" url="http://$admin/metrics"
  [ "$name" = kafka ] && url="http://$kadmin/metrics"
  [ "$side/$kind" = sluice/half ] && scrape=1 && curl -s "$url" >"$work/m0"
  out="$("$lt" "$@" --duration-secs "$secs" --warmup-secs 1 --json)"
  if [ -n "$scrape" ]; then
    curl -s "$url" >"$work/m1"
    out="$(python3 - "$name" "$out" "$work/m0" "$work/m1" <<'PY'
import json, re, sys
name, r = sys.argv[1], json.loads(sys.argv[2])
proto = {"http": "http", "kafka": "http", "grpc": "grpc", "ws": "websocket", "mqtt": "mqtt"}[name.split("-")[0]]
def buckets(text, metric, labels):
    out = {}
    for m in re.finditer(r'^%s_bucket\{([^}]*)\} (\S+)$' % metric, text, re.M):
        ls = m.group(1)
        if all(l in ls for l in labels):
            le = re.search(r'le="([^"]+)"', ls).group(1)
            out[float("inf") if le == "+Inf" else float(le)] = out.get(float("inf") if le == "+Inf" else float(le), 0) + float(m.group(2))
    return out
def quantiles(metric, labels):
    a = buckets(open(sys.argv[3]).read(), metric, labels)
    b = buckets(open(sys.argv[4]).read(), metric, labels)
    d = sorted((le, b[le] - a.get(le, 0)) for le in b)
    total = d[-1][1] if d else 0
    if total <= 0: return None
    q = {}
    for name, p in (("p50", 0.5), ("p99", 0.99)):
        # The upper bound of the bucket the quantile falls in (histograms give no more).
        q[name] = next((le for le, c in d if c >= p * total), None)
    return q
r["ack"] = quantiles("sluice_ack_seconds", ['protocol="%s"' % proto, 'ack="durable"'])
r["fsync"] = quantiles("sluice_log_fsync_seconds", [])
print(json.dumps(r))
PY
)"
  fi
  printf '{"name":"%s","side":"%s","kind":"%s","r":%s}\n' "$name" "$side" "$kind" "$out" >>"$results"
}
# rate_of NAME SIDE: the closed-loop rate of a measurement (requests, frames or messages per s,
# as the generator's --rate counts them).
rate_of() {
  python3 - "$results" "$1" "$2" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["name"] == sys.argv[2] and d["side"] == sys.argv[3] and d["kind"] == "max":
        r = d["r"]
        n = r.get("requests_per_s") or r.get("msgs_per_s") or (r.get("frames", 0) / r["duration_s"])
        print(max(1, int(n)))
PY
}
# wrk_run NAME SIDE URL BODY: wrk's closed loop (64 connections, 2 threads), as a measurement.
wrk_run() {
  cat >"$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$4'
wrk.headers["Content-Type"] = "application/json"
LUA
  local out
  out="$(wrk -t 2 -c 64 -d "${secs}s" --latency -s "$work/post.lua" "$3")"
  python3 - "$1" "$2" "$secs" "$results" <<PY
import json, re, sys
out = """$out"""
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
def us(q):
    m = re.search(r"\s%s%%\s+([\d.]+)(us|ms|s)\b" % q, out)
    if not m: return None
    v, u = float(m.group(1)), m.group(2)
    return int(v * {"us": 1, "ms": 1e3, "s": 1e6}[u])
r = {"requests_per_s": rps, "events_per_s": rps, "duration_s": int(sys.argv[3]),
     "latency_us": {"p50": us(50), "p99": us(99), "p999": None}}
with open(sys.argv[4], "a") as f:
    f.write(json.dumps({"name": sys.argv[1], "side": sys.argv[2], "kind": "max", "r": r}) + "\n")
PY
}

U="http://$http/v1/streams/bench/events"
S="http://127.0.0.1:$sink_port/x"
echo "bench-all: HTTP" >&2
run http-x100 sluice max -- http --url "$U" --connections 64 --events-per-request 100 --payload-bytes "$payload"
run http-x100 peer max -- http --url "$S" --connections 64 --events-per-request 100 --payload-bytes "$payload"
run http-x1 sluice max -- http --url "$U" --connections 64 --events-per-request 1 --payload-bytes "$payload"
run http-x1 peer max -- http --url "$S" --connections 64 --events-per-request 1 --payload-bytes "$payload"
for side in sluice peer; do
  url=$U; [ $side = peer ] && url=$S
  for n in 100 1; do
    half=$(( $(rate_of "http-x$n" $side) / 2 ))
    run "http-x$n" $side half -- http --url "$url" --connections 64 --events-per-request $n \
      --payload-bytes "$payload" --rate "$half"
  done
done
body='[{"value":"'"$(head -c 88 /dev/zero | tr '\0' x)"'"}]'
wrk_run http-x1-wrk sluice "$U" "$body"
wrk_run http-x1-wrk peer "$S" "$body"

echo "bench-all: gRPC" >&2
run grpc-stream sluice max -- grpc --url "http://$grpc" --stream bench --mode stream --connections 4 \
  --in-flight 16 --events-per-request 100 --payload-bytes "$payload"
run grpc-unary sluice max -- grpc --url "http://$grpc" --stream bench --mode unary --connections 16 \
  --calls-per-connection 4 --events-per-request 1 --payload-bytes "$payload"
run grpc-stream sluice half -- grpc --url "http://$grpc" --stream bench --mode stream --connections 4 \
  --in-flight 16 --events-per-request 100 --payload-bytes "$payload" --rate $(( $(rate_of grpc-stream sluice) / 2 ))
run grpc-unary sluice half -- grpc --url "http://$grpc" --stream bench --mode unary --connections 16 \
  --calls-per-connection 4 --events-per-request 1 --payload-bytes "$payload" --rate $(( $(rate_of grpc-unary sluice) / 2 ))

echo "bench-all: WebSocket and MQTT" >&2
W="ws://$http/v1/streams/bench/ws"
run ws-x10 sluice max -- ws --url "$W" --connections 100 --window 32 --events-per-frame 10 --payload-bytes "$payload"
run ws-x1 sluice max -- ws --url "$W" --connections 100 --window 32 --events-per-frame 1 --payload-bytes "$payload"
run mqtt sluice max -- mqtt --addr "127.0.0.1:$mqtt_port" --connections 100 --window 32 --payload-bytes "$payload"
run mqtt peer max -- mqtt --addr "127.0.0.1:$mosq_port" --connections 100 --window 32 --payload-bytes "$payload"
for n in 10 1; do
  run "ws-x$n" sluice half -- ws --url "$W" --connections 100 --window 32 --events-per-frame $n \
    --payload-bytes "$payload" --rate $(( $(rate_of "ws-x$n" sluice) / 2 ))
done
run mqtt sluice half -- mqtt --addr "127.0.0.1:$mqtt_port" --connections 100 --window 32 \
  --payload-bytes "$payload" --rate $(( $(rate_of mqtt sluice) / 2 ))
run mqtt peer half -- mqtt --addr "127.0.0.1:$mosq_port" --connections 100 --window 32 \
  --payload-bytes "$payload" --rate $(( $(rate_of mqtt peer) / 2 ))

echo "bench-all: Kafka" >&2
run kafka sluice max -- http --url "http://$khttp/v1/streams/bench/events" --connections 64 \
  --events-per-request 100 --payload-bytes "$payload"
run kafka peer max -- kafka --config "$work/kafka.toml" --topic bench --connections 64 \
  --events-per-request 100 --payload-bytes "$payload"
run kafka sluice half -- http --url "http://$khttp/v1/streams/bench/events" --connections 64 \
  --events-per-request 100 --payload-bytes "$payload" --rate $(( $(rate_of kafka sluice) / 2 ))

mkdir -p target
python3 - "$results" "$secs" "${cpus:-all}" "$(git rev-parse --short HEAD)" "$payload" \
  "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(lscpu | sed -n 's/^Model name: *//p' | head -1)" \
  <<'PY' | tee target/bench-all.md
import json, sys
path, secs, cpus, commit, payload, machine = sys.argv[1:7]
res = {}
for line in open(path):
    d = json.loads(line)
    res[(d["name"], d["side"], d["kind"])] = d["r"]
def rate(name, side, kind="max"):
    r = res.get((name, side, kind))
    if r is None: return None
    return r.get("admitted_events_per_s") or r.get("events_per_s") or r.get("msgs_per_s")
def calls(name, side):
    r = res.get((name, side, "max"))
    if r is None: return None
    return r.get("requests_per_s") or r.get("msgs_per_s") or rate(name, side)
def lat(name, side):
    r = res.get((name, side, "half"))
    if r is None: return "n/a (no open loop in its generator)"
    l = r["latency_us"]
    f = lambda v: "-" if v is None else ("%.2f" % (v / 1000))
    return "%s / %s / %s ms" % (f(l.get("p50")), f(l.get("p99")), f(l.get("p999")))
def added(name):
    r = res.get((name, "sluice", "half"))
    if r is None or not r.get("ack"): return "-"
    a, f = r["ack"], r.get("fsync") or {}
    ms = lambda v: "-" if v is None else ("%.2f" % (v * 1000))
    if name == "kafka":
        return "ack %s / %s (Kafka's round trip inside)" % (ms(a["p50"]), ms(a["p99"]))
    return "ack %s / %s, fsync %s / %s" % (ms(a["p50"]), ms(a["p99"]), ms(f.get("p50")), ms(f.get("p99")))
def n(v): return "-" if v is None else "{:,.0f}".format(v)
def ratio(a, b): return "-" if not a or not b else "%.0f%%" % (100 * a / b)
rows = [
  # path, unit, sluice value, peer name, peer value, target, latency of sluice, latency of peer
  ("HTTP batches of 100", "events/s", rate("http-x100", "sluice"), "hyper sink", rate("http-x100", "peer"), ">= 25%", lat("http-x100", "sluice"), lat("http-x100", "peer")),
  ("HTTP single events", "requests/s", calls("http-x1", "sluice"), "hyper sink", calls("http-x1", "peer"), ">= 55%", lat("http-x1", "sluice"), lat("http-x1", "peer")),
  ("HTTP single events (wrk)", "requests/s", calls("http-x1-wrk", "sluice"), "hyper sink (wrk)", calls("http-x1-wrk", "peer"), ">= 55%", "", ""),
  ("gRPC PublishStream, batches of 100", "events/s", rate("grpc-stream", "sluice"), "", None, "", lat("grpc-stream", "sluice"), ""),
  ("gRPC unary, single events", "calls/s", calls("grpc-unary", "sluice"), "HTTP single events", calls("http-x1", "sluice"), ">= 90%", lat("grpc-unary", "sluice"), ""),
  ("WebSocket, 10 events per frame", "events/s", rate("ws-x10", "sluice"), "", None, "", lat("ws-x10", "sluice"), ""),
  ("WebSocket, 1 event per frame", "events/s", rate("ws-x1", "sluice"), "Sluice MQTT QoS 1", rate("mqtt", "sluice"), ">= 80%", lat("ws-x1", "sluice"), ""),
  ("MQTT QoS 1", "messages/s", rate("mqtt", "sluice"), "Mosquitto", rate("mqtt", "peer"), ">= 300%", lat("mqtt", "sluice"), lat("mqtt", "peer")),
  ("HTTP -> Kafka (Tansu), batches of 100", "events/s", rate("kafka", "sluice"), "direct rdkafka", rate("kafka", "peer"), "", lat("kafka", "sluice"), ""),
]
print("### bench-all: commit %s, gateway on CPUs %s, %s-byte events (%s s per measurement)" % (commit, cpus, payload, secs))
print()
print("Machine: %s. Closed-loop maximum of each path and its peer in the same run; the latencies are" % machine)
print("the open loop at half the path's own maximum (p50 / p99 / p99.9).")
print()
print("| path | Sluice | peer | peer's | Sluice / peer | target | Sluice at half: p50 / p99 / p99.9 | peer at half |")
print("|---|---|---|---|---|---|---|---|")
for path, unit, s, peer, p, target, ls, lp in rows:
    print("| %s | %s %s | %s | %s | %s | %s | %s | %s |" % (path, n(s), unit, peer or "-", n(p), ratio(s, p), target or "-", ls, lp))
print()
print("Inside the gateway at half load, from its histograms (upper bounds of the buckets the")
print("quantiles fall in, ms, p50 / p99): admission to ack point, and one fsync of the log. The")
print("time Sluice adds beyond the fsync is at most ack - fsync per quantile; target p99 < 1 ms.")
print()
print("| path | admission to ack, and fsync (p50 / p99, ms) |")
print("|---|---|")
for name, path in (("http-x100", "HTTP batches of 100"), ("http-x1", "HTTP single events"),
                   ("grpc-stream", "gRPC PublishStream"), ("grpc-unary", "gRPC unary"),
                   ("ws-x10", "WebSocket, 10 per frame"), ("ws-x1", "WebSocket, 1 per frame"),
                   ("mqtt", "MQTT QoS 1"), ("kafka", "HTTP -> Kafka")):
    print("| %s | %s |" % (path, added(name)))
PY
