#!/usr/bin/env bash
# The one test command (README.md, .ci/run): installs what the tests need on a fresh machine,
# then checks formatting, lints, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# NVRTC 13.0 and the CUDA headers (cuda_bf16.h, ...) for the kernel compile check (kernels/tests/nvrtc_compile.rs),
# from PyPI into target/nvrtc (no GPU and no CUDA toolkit needed). pip lays them out as nvidia/cu13/{lib,include};
# cudarc's loader finds libnvrtc.so.13 on LD_LIBRARY_PATH by that name. Under CI=true a missing NVRTC fails the test.
NVRTC_DIR="$PWD/target/nvrtc"
NVRTC_LIB="$NVRTC_DIR/nvidia/cu13/lib"
NVRTC_INCLUDE="$NVRTC_DIR/nvidia/cu13/include"
if [[ ! -f "$NVRTC_LIB/libnvrtc.so.13" || ! -f "$NVRTC_INCLUDE/cuda_bf16.h" ]]; then
  echo "== installing NVRTC 13.0.88 and the CUDA 13.0 headers into $NVRTC_DIR"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$NVRTC_DIR" \
    nvidia-cuda-nvrtc==13.0.88 'nvidia-cuda-runtime==13.0.*'
fi
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export BATON_CUDA_INCLUDE="$NVRTC_INCLUDE"

# Debian packages, installed when missing (one `apt-get update`): Chromium for the headless-browser tests of the
# run report and the SVG timeline (tests/cli_report.rs); OpenMPI and libclang (bindgen of the `mpi` crate) for the
# multi-process suite (tests/cli_mpi.rs, the `mpi` feature); Slurm and munge for its srun test (a one-node cluster it
# starts in a temporary directory).
DEBS=(chromium libopenmpi-dev openmpi-bin libclang1-14 libclang-common-14-dev slurmctld slurmd slurm-client munge)
MISSING=()
for deb in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || MISSING+=("$deb")
done
if (( ${#MISSING[@]} )); then
  echo "== installing ${MISSING[*]} (Debian)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}" >/dev/null
fi
# mpirun as root on a machine with fewer cores than ranks.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

# The real `tensorboard` package, for the test that reads Baton's event files with its reader
# (tests/cli_ux.rs, scripts/tensorboard_readback.py), in a venv under target/.
TB_VENV="$PWD/target/tb-venv"
if ! "$TB_VENV/bin/python" -c "import tensorboard" >/dev/null 2>&1; then
  echo "== installing tensorboard into $TB_VENV"
  python3 -m venv "$TB_VENV"
  "$TB_VENV/bin/pip" install --quiet --disable-pip-version-check tensorboard
fi
export BATON_TENSORBOARD_PYTHON="$TB_VENV/bin/python"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo clippy --features mpi"
cargo clippy --workspace --all-targets --locked --features mpi -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked
echo "== multi-process tests (--features mpi: mpirun, killed ranks, baton launch)"
cargo test --locked -p baton-engine --features mpi --lib comm::mpi
# In a PID namespace of their own where the sandbox allows one: the suite kills ranks and process groups, and
# nothing it signals can then reach a process outside it.
ISOLATE=()
if unshare --pid --fork --mount-proc true >/dev/null 2>&1; then
  ISOLATE=(unshare --pid --fork --mount-proc)
fi
"${ISOLATE[@]}" cargo test --locked --features mpi --test cli_mpi
echo "== doc tests (the crate-root embedding example and the API examples)"
cargo test --workspace --doc --locked
echo "== examples (small settings; each checks what it claims and exits non-zero otherwise)"
for example in custom_model gpt2_split torch_schedule; do
  echo "-- cargo run --example $example -- --quick"
  cargo run --quiet --locked --example "$example" -- --quick
done
