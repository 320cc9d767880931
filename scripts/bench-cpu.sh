#!/usr/bin/env bash
# Side-by-side CPU benchmark (run by hand, not by the test command): Baton's CPU backend against PyTorch eager
# fp32 on the same GPT-2 shapes, batch, AdamW and number of threads, interleaved round by round so machine noise
# hits both; prints the median step times, the Baton / PyTorch tokens/s ratios and peak resident memory. Baton runs
# p=1, p=2 at m=1, p=2 at m=4 with and without batched weight gradients; PyTorch runs the whole batch (m=1) and 4
# accumulated micro-batches (m=4, the same weight traffic as Baton's m=4).
#
#   scripts/bench-cpu.sh                 # 2 threads, 2 rounds, the three configurations below
#   THREADS=4 ROUNDS=5 scripts/bench-cpu.sh
#
# PyTorch comes from PyPI into a venv under target/ (a few GB with its CUDA dependencies) the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-2}"
VENV="$PWD/target/torch-venv"
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "== installing torch 2.15.0 into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.15.0
fi
cargo build --quiet --release -p baton-engine --example bench_step
# Cargo builds into $CARGO_TARGET_DIR when set (default: target/).
BATON="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/bench_step"
OUT="$PWD/target/bench-cpu"
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

# name | layers d_model heads vocab batch seq | measured steps | warm-up steps
CONFIGS=(
  "small-4L-d128-bytes-B8T128|4 128 4 256 8 128|30|5"
  "gpt2-124M-B4T64|12 768 12 50257 4 64|4|2"
  "gpt2-124M-B8T256|12 768 12 50257 8 256|2|1"
)
# Baton runs: name | stages | micro-batches | extra flags. p=2 is compared with p=1 at the same micro-batch count
# (m=1 and m=4): at m=4 each micro-batch re-reads every weight, so it is also compared with PyTorch accumulating 4
# micro-batches.
RUNS=(
  "baton p=1|1|1|"
  "baton p=2 m=1|2|1|"
  "baton p=1 m=4|1|4|"
  "baton p=2 m=4|2|4|"
  "baton p=2 m=4 batched-W|2|4|--batch-weight-grads"
)
for round in $(seq 1 "$ROUNDS"); do
  for entry in "${CONFIGS[@]}"; do
    IFS='|' read -r name shape steps warmup <<<"$entry"
    read -r L D H V B T <<<"$shape"
    common=(--layers "$L" --d-model "$D" --heads "$H" --vocab "$V" --batch "$B" --seq "$T" --threads "$THREADS" --steps "$steps" --warmup "$warmup")
    echo "== round $round: $name"
    for run in "${RUNS[@]}"; do
      IFS='|' read -r label p m extra <<<"$run"
      # shellcheck disable=SC2086 # $extra is zero or one flag
      line=$("$BATON" "${common[@]}" --stages "$p" --microbatches "$m" $extra)
      echo "{\"config\": \"$name\", \"round\": $round, \"run\": \"$label\", \"result\": $line}" | tee -a "$OUT/results.jsonl"
    done
    for m in 1 4; do
      line=$("$VENV/bin/python" scripts/bench_cpu_torch.py "${common[@]}" --microbatches "$m")
      echo "{\"config\": \"$name\", \"round\": $round, \"run\": \"pytorch m=$m\", \"result\": $line}" | tee -a "$OUT/results.jsonl"
    done
  done
done

python3 - "$OUT/results.jsonl" "$THREADS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
threads = sys.argv[2]
configs = list(dict.fromkeys(r["config"] for r in rows))
runs = list(dict.fromkeys(r["run"] for r in rows))
med, rss = {}, {}
for c in configs:
    for run in runs:
        rs = [r["result"] for r in rows if r["config"] == c and r["run"] == run]
        med[c, run] = statistics.median(x["step_s"] for x in rs)
        rss[c, run] = max(x["peak_rss_bytes"] for x in rs) / 2**20
print(f"\nMedian step time ({threads} threads; 1F1B; batched-W: --batch-weight-grads):\n")
print("| configuration | " + " | ".join(runs) + " |")
print("|---|" + "---|" * len(runs))
for c in configs:
    print(f"| {c} | " + " | ".join(f"{med[c, r]*1e3:.0f} ms" for r in runs) + " |")
# tokens/s ratios = inverse time ratios
pairs = [("baton p=1", "pytorch m=1"), ("baton p=2 m=1", "pytorch m=1"), ("baton p=2 m=1", "baton p=1"),
         ("baton p=2 m=4", "baton p=1 m=4"), ("baton p=2 m=4", "pytorch m=4"), ("baton p=2 m=4 batched-W", "pytorch m=4"),
         ("baton p=2 m=4 batched-W", "baton p=2 m=4")]
print("\nTokens/s ratios (> 1: the first is faster) and peak resident memory:\n")
print("| configuration | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " | peak RSS Baton p=1 / PyTorch m=1 |")
print("|---|" + "---|" * (len(pairs) + 1))
for c in configs:
    print(f"| {c} | " + " | ".join(f"{med[c, b] / med[c, a]:.2f}x" for a, b in pairs)
          + f" | {rss[c, 'baton p=1']:.0f} / {rss[c, 'pytorch m=1']:.0f} MiB |")
PY
