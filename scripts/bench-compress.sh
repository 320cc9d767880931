#!/usr/bin/env bash
# Less communication, measured: the default model on the CPU backend, D=2 replicas × p=2 stages, the same tokens for
# every setting; loss after N steps and bytes per replica per step (both deterministic), the measured step, and the
# step simulated on a slow link between replicas from one common cost profile (the first row's measured mean
# action time, F = 2/3 and B = 4/3 of it) with each row's payload, so rows differ only by what they send. Prints a
# Markdown table (BENCHMARKS.md, "Less communication").
#   scripts/bench-compress.sh [STEPS] [GBPS] [SETTING ...]   (a SETTING is the flags of one row, quoted)
#   COST_MS=7.9 scripts/bench-compress.sh ...                 (a given mean action time instead of the first row's)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-300}
gbps=${2:-1}
shift 2 || true
if [ "$#" -eq 0 ]; then
  set -- "--compress none" "--compress bf16" "--compress powersgd:1" "--compress powersgd:2" \
    "--compress powersgd:4" "--compress topk:0.01" "--compress auto" "--sync diloco:4" "--sync diloco:16" \
    "--sync diloco:64" "--schedule 2bw"
fi
cargo build --release --quiet
baton=target/release/baton
out=$(mktemp -d)
echo "| setting | train loss | val loss | bytes/replica/step | vs fp32 | measured step | step on ${gbps} Gbit/s (sim.) |"
echo "|---|---|---|---|---|---|---|"
i=0
cost_ms=${COST_MS:-}
for flags in "$@"; do
  i=$((i + 1))
  dir="$out/run$i"
  # shellcheck disable=SC2086
  log=$($baton train --data-parallel 2 --stages 2 --steps "$steps" --link-gbps "$gbps" $flags --out "$dir" 2>&1)
  last=$(tail -n 1 "$dir/metrics.jsonl")
  loss=$(echo "$last" | sed -E 's/.*"loss":([0-9.]+).*/\1/')
  val=$(echo "$log" | sed -nE 's/.*validation loss [0-9.]+ -> ([0-9.]+).*/\1/p' | tail -n 1)
  avg=$(awk -F'"comm_bytes":' '{split($2, a, /[,}]/); s += a[1]; n++} END {printf "%.0f", s / n}' "$dir/metrics.jsonl")
  dense=$(echo "$log" | sed -nE 's/.*\(([0-9.]+) MiB as fp32 every step.*/\1/p')
  ratio=$(echo "$log" | sed -nE 's/.*every step: ([0-9.]+)× less.*/\1/p')
  step=$(echo "$log" | sed -nE 's/.* ([0-9.]+) ms\/step, [0-9]+ tokens\/s.*/\1/p')
  if [ -z "$cost_ms" ]; then
    # Mean action time over both stages of the first row's steps (µs → ms).
    cost_ms=$(awk -F'"host_us_per_action":\\[' '{split($2, a, /\]/); n = split(a[1], v, ","); for (j = 1; j <= n; j++) {s += v[j]; c++}} END {printf "%.3f", s / c / 1000}' "$dir/metrics.jsonl")
  fi
  f=$(awk -v h="$cost_ms" 'BEGIN {printf "%.4f", 2 * h / 3}')
  b=$(awk -v h="$cost_ms" 'BEGIN {printf "%.4f", 4 * h / 3}')
  per_part=$(awk -v a="$avg" 'BEGIN {printf "%.6f", a / 2 / 1048576}')
  case "$flags" in
    *diloco*)
      # The outer reduction runs after the optimizer, exposed, once per H steps: compute + ring time of the
      # average bytes per step.
      compute=$($baton schedule --schedule 1f1b --stages 2 --microbatches 8 --costs "$f,$b,$f,$b,0" 2>&1 |
        sed -nE 's/^makespan ([0-9.]+).*/\1/p' | head -n 1)
      sim=$(awk -v c="$compute" -v a="$avg" -v g="$gbps" 'BEGIN {printf "%.1f", c + a * 8 / (g * 1e9) * 1e3}')
      ;;
    *2bw*)
      # Steady-state window time of the flush-free stream; the reduction overlaps the next window.
      sim=$($baton schedule --schedule 2bw --stages 2 --microbatches 8 --costs "$f,$b,$f,$b,0" 2>&1 |
        sed -nE 's/.*steady state per window: 2bw ([0-9.]+).*/\1/p' | head -n 1)
      ;;
    *)
      sim=$($baton schedule --schedule 1f1b --stages 2 --microbatches 8 --costs "$f,$b,$f,$b,0" --data-parallel 2 \
        --link-gbps "$gbps" --grad-mib "$per_part,$per_part" 2>&1 | sed -nE 's/^  step time +([0-9.]+) ms.*/\1/p')
      ;;
  esac
  echo "| \`$flags\` | $loss | $val | $(numfmt --to=iec --suffix=B "$avg") | ${ratio}× (fp32 ${dense} MiB) | $step ms | ${sim:-–} ms |"
done
echo
echo "Common cost profile: mean action ${cost_ms} ms (F = 2/3, B = 4/3 of it), link ${gbps} Gbit/s, no latency."
rm -rf "$out"
