#!/usr/bin/env bash
# Starts the gateway with the embedded log. With no arguments it needs no config file:
# HTTP on 127.0.0.1:8080, admin on 127.0.0.1:9090, data under ./data.
# Any arguments are passed to `sluice serve` (e.g. --config config/examples/full.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release --locked --bin sluice -- serve "$@"
