#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a bounded time each (not part of CI):
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
# Needs cargo-fuzz (`cargo install cargo-fuzz`); libFuzzer needs nightly features, which the
# stable toolchain unlocks with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in checkpoint_load token_shard; do
  echo "== fuzzing $target for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" --fuzz-dir fuzz -- -max_total_time="$secs" -rss_limit_mb=4096
done
