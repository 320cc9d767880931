#!/usr/bin/env bash
# Side-by-side CPU benchmark (run by hand, not by the test command): Baton's CPU backend against PyTorch eager
# fp32 on the same GPT-2 shapes, batch, AdamW and number of threads, interleaved round by round so machine noise
# hits both; prints the median step time, tokens/s, peak resident memory and the Baton / PyTorch ratio.
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
  "small-4L-d128-bytes-B8T128|4 128 4 256 8 128|10|3"
  "gpt2-124M-B4T64|12 768 12 50257 4 64|4|2"
  "gpt2-124M-B8T256|12 768 12 50257 8 256|2|1"
)
for round in $(seq 1 "$ROUNDS"); do
  for entry in "${CONFIGS[@]}"; do
    IFS='|' read -r name shape steps warmup <<<"$entry"
    read -r L D H V B T <<<"$shape"
    common=(--layers "$L" --d-model "$D" --heads "$H" --vocab "$V" --batch "$B" --seq "$T" --threads "$THREADS" --steps "$steps" --warmup "$warmup")
    echo "== round $round: $name"
    for p in 1 2; do
      m=$(( p == 1 ? 1 : 4 ))
      line=$("$BATON" "${common[@]}" --stages "$p" --microbatches "$m")
      echo "{\"config\": \"$name\", \"round\": $round, \"run\": \"baton p=$p\", \"result\": $line}" | tee -a "$OUT/results.jsonl"
    done
    line=$("$VENV/bin/python" scripts/bench_cpu_torch.py "${common[@]}")
    echo "{\"config\": \"$name\", \"round\": $round, \"run\": \"pytorch\", \"result\": $line}" | tee -a "$OUT/results.jsonl"
  done
done

python3 - "$OUT/results.jsonl" "$THREADS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
threads = sys.argv[2]
configs = list(dict.fromkeys(r["config"] for r in rows))
print(f"\n| configuration ({threads} threads) | Baton p=1 | Baton p=2 (1F1B, m=4) | PyTorch eager | Baton p=1 / PyTorch | Baton p=2 / PyTorch | peak RSS Baton p=1 / PyTorch |")
print("|---|---|---|---|---|---|---|")
for c in configs:
    med = {}
    rss = {}
    for run in ("baton p=1", "baton p=2", "pytorch"):
        rs = [r["result"] for r in rows if r["config"] == c and r["run"] == run]
        med[run] = statistics.median(x["step_s"] for x in rs)
        rss[run] = max(x["peak_rss_bytes"] for x in rs) / 2**20
    ratio = lambda run: med["pytorch"] / med[run]  # tokens/s ratio = inverse time ratio
    print(f"| {c} | {med['baton p=1']*1e3:.0f} ms | {med['baton p=2']*1e3:.0f} ms | {med['pytorch']*1e3:.0f} ms | "
          f"{ratio('baton p=1'):.2f}x | {ratio('baton p=2'):.2f}x | {rss['baton p=1']:.0f} / {rss['pytorch']:.0f} MiB |")
PY
