#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, and every unit, property and end-to-end test.
# Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --for-tests

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace
echo "== schemathesis (docs/openapi.yaml against the real binary)"
scripts/schemathesis.sh
