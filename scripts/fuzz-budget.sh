#!/usr/bin/env bash
# Fuzzes each target until its own CPU time (user + system of the fuzzer process, not wall time)
# passes a budget, in 300 s chunks, on a corpus that grows from run to run. Outside CI: it needs
# nightly and cargo-fuzz (`rustup toolchain install nightly && cargo install cargo-fuzz`).
#
#   scripts/fuzz-budget.sh DIR:TARGET:CPU_SECONDS ...
#   scripts/fuzz-budget.sh protocols:mqtt_decoder:1800 gateway/log:segment_recovery:1800
#
# DIR is the crate whose fuzz/ holds TARGET. The working corpus is $FUZZ_WORK/TARGET (default
# ./target/fuzz-work), seeded from DIR/fuzz/corpus/TARGET; findings go to $FUZZ_WORK/TARGET-*.
# One line per chunk and a total per target; stops a target at its first finding. The totals go
# to docs/security.md ("Fuzzing").
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=${FUZZ_WORK:-$root/target/fuzz-work}
chunk=${FUZZ_CHUNK_SECS:-300}
[ $# -gt 0 ] || { sed -n '2,13p' "$0"; exit 2; }
for spec in "$@"; do
  IFS=: read -r dir target need <<<"$spec"
  corpus=$work/$target
  mkdir -p "$corpus"
  cp -n "$root/$dir/fuzz/corpus/$target/"* "$corpus/" 2>/dev/null || true
  (cd "$root/$dir" && cargo +nightly fuzz build --release "$target" >"$work/$target-build.log" 2>&1) \
    || { echo "== $target: build failed, see $work/$target-build.log"; continue; }
  # The binary is copied so that rebuilding the workspace meanwhile does not change what runs.
  bin=$work/$target-bin
  cp "$(ls -t "$root/$dir"/fuzz/target/*/release/"$target" | head -1)" "$bin"
  spent=0 n=0
  echo "== $target: budget ${need}s of CPU, $(date +%T)"
  while awk -v s="$spent" -v n="$need" 'BEGIN { exit !(s < n) }'; do
    n=$((n + 1))
    log=$work/$target-chunk-$n.log
    (cd "$root/$dir/fuzz" && /usr/bin/time -f "CPU %U %S %e" "$bin" "$corpus" \
      -max_total_time="$chunk" -print_final_stats=1 -rss_limit_mb=2048 \
      -artifact_prefix="$work/$target-" >"$log" 2>&1) 2>>"$log" || true
    read -r user sys wall < <(grep '^CPU ' "$log" | tail -1 | cut -d' ' -f2-)
    spent=$(awk -v a="$spent" -v u="$user" -v s="$sys" 'BEGIN { print a + u + s }')
    runs=$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | awk '{ print $2 }')
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    found=$(grep -cE 'ERROR: libFuzzer|panicked|SUMMARY' "$log" || true)
    echo "== $target chunk=$n runs=$runs cpu=$user+$sys wall=$wall total_cpu=$spent $cov findings=$found"
    if [ "$found" != 0 ]; then
      echo "== $target: FINDING, see $log and $work/$target-*"
      break
    fi
  done
  echo "== $target: done $(date +%T), $(awk -v s="$spent" 'BEGIN { printf "%.1f", s / 60 }') CPU-minutes"
done
