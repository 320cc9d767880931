#!/usr/bin/env bash
# Less communication, measured: the default model on the CPU backend, D=2 replicas × p=2 stages, the same tokens for
# every setting; loss after N steps, bytes per replica per step, and the step simulated on a slow link between
# replicas. Prints a Markdown table (BENCHMARKS.md, "Less communication").
#   scripts/bench-compress.sh [STEPS] [GBPS] [SETTING ...]   (a SETTING is the flags of one row, quoted)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
gbps=${2:-1}
shift 2 || true
if [ "$#" -eq 0 ]; then
  set -- "--compress none" "--compress bf16" "--compress powersgd:1" "--compress powersgd:2" \
    "--compress powersgd:4" "--compress topk:0.01" "--compress auto" "--sync diloco:4" "--sync diloco:16" \
    "--sync diloco:64"
fi
cargo build --release --quiet
out=$(mktemp -d)
echo "| setting | train loss | val loss | bytes/replica/step | vs fp32 | step on ${gbps} Gbit/s (sim.) | measured step |"
echo "|---|---|---|---|---|---|---|"
i=0
for flags in "$@"; do
  i=$((i + 1))
  dir="$out/run$i"
  # shellcheck disable=SC2086
  log=$(target/release/baton train --data-parallel 2 --stages 2 --steps "$steps" --link-gbps "$gbps" $flags \
    --out "$dir" 2>&1)
  last=$(tail -n 1 "$dir/metrics.jsonl")
  loss=$(echo "$last" | sed -E 's/.*"loss":([0-9.]+).*/\1/')
  val=$(echo "$log" | sed -nE 's/.*validation loss [0-9.]+ -> ([0-9.]+).*/\1/p' | tail -n 1)
  avg=$(awk -F'"comm_bytes":' '{split($2, a, /[,}]/); s += a[1]; n++} END {printf "%.0f", s / n}' "$dir/metrics.jsonl")
  ratio=$(echo "$log" | sed -nE 's/.*every step: ([0-9.]+)× less.*/\1/p')
  sim=$(echo "$log" | sed -nE 's/.*link between replicas \(simulated\): ([0-9.]+) ms\/step.*/\1/p')
  step=$(echo "$log" | sed -nE 's/.* ([0-9.]+) ms\/step, [0-9]+ tokens\/s.*/\1/p')
  echo "| \`$flags\` | $loss | $val | $(numfmt --to=iec --suffix=B "$avg") | ${ratio}× | ${sim:-–} ms | $step ms |"
done
rm -rf "$out"
