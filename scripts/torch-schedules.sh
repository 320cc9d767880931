#!/usr/bin/env bash
# Schedule interchange with real PyTorch (run by hand; the test command never runs it).
#
#   scripts/torch-schedules.sh            regenerate schedules/tests/golden/torch/ and check that
#                                         PyTorch loads Baton's exported CSVs
#   scripts/torch-schedules.sh check      only the check
#
# Creates a venv under target/torch-venv with torch==2.15.0 from the package index (the Linux
# wheel pulls its CUDA libraries, several GB; no GPU is needed), builds the release `baton`
# binary, then runs scripts/torch_schedules.py: `dump` writes PyTorch's compute-only and lowered
# dumps of its interleaved 1F1B, interleaved zero-bubble and ZB-V schedules (p = 2 and 4, m = 8,
# v = 2); `check-baton` exports every Baton generator with `baton schedule --format csv [--comms]`
# and loads the files with PyTorch's `_load_csv`. Review `git diff` after a regeneration.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/target/torch-venv
TORCH_VERSION=2.15.0
PY=$VENV/bin/python

if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "== installing torch==$TORCH_VERSION into $VENV (large download; log in target/torch-pip.log)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --upgrade pip >"$ROOT/target/torch-pip.log" 2>&1
    if ! timeout 3600 "$VENV/bin/pip" install "torch==$TORCH_VERSION" >>"$ROOT/target/torch-pip.log" 2>&1; then
        tail -20 "$ROOT/target/torch-pip.log"
        exit 1
    fi
fi
"$PY" -c "import torch; print('torch', torch.__version__)"

echo "== building the release baton binary"
cargo build --release --bin baton

if [[ "${1:-}" != "check" ]]; then
    echo "== dumping PyTorch's schedules into schedules/tests/golden/torch/"
    "$PY" scripts/torch_schedules.py dump schedules/tests/golden/torch
fi

echo "== loading Baton's exports with PyTorch"
"$PY" scripts/torch_schedules.py check-baton "$ROOT/target/release/baton" "$ROOT/target/torch-check"
