#!/usr/bin/env bash
# Starts a local Kafka-compatible broker (Tansu, in-memory storage) on 127.0.0.1:9092, for
# trying the Kafka sink without a cluster:
#   scripts/kafka-local.sh &
#   scripts/serve.sh --config config/examples/kafka.toml
# Installs Tansu first if it is missing. Data lives in memory and is gone when it stops.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --with-tansu
port="${1:-9092}"
tansu="$(command -v tansu || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")"
exec "$tansu" broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/
