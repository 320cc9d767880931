#!/usr/bin/env bash
# One command for a lent GPU (an H200): library discovery, the GPU parity suite, the engine's CUDA test, the
# kernel and transport benches, then GPT-2 124M end to end (bf16, p = 1, 2, 4 stages of 1F1B on the one GPU),
# printing LAST a table (kernel, shape, time, GB/s or TFLOP/s, % of the measured ceiling) and one line per stage
# count (tokens/s, MFU, measured vs simulated bubble). Full logs go under $OUT (default ./gpu-check-out).
# Expected runtime on an H200, about 8.5 minutes: parity suites + engine test + NCCL collectives ~2.5 min, kernel
# bench ~2.5 min, transport bench ~0.5 min, end to end ~1.5 min (3 runs of 6 steps at 64×1024 tokens; start-up
# included), the PyTorch reference ~1.5 min (torch.compile included; skipped when the budget is short). Run it with
# a 600 s limit. The per-step timeouts bound a hung step, not the expected time.
#
#   scripts/gpu-check.sh build   # on a machine with cargo (e.g. the dev machine): release-build the three test /
#                                # bench executables into target/gpu-bin (carry that folder to the GPU machine)
#   scripts/gpu-check.sh         # on the GPU machine: uses target/gpu-bin if present, else builds with cargo
#
# The GPU image has no Rust toolchain and no network, hence the prebuilt executables; they load libcuda, libnvrtc,
# libcublas(Lt) at run time, found through LD_LIBRARY_PATH as set up below.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BIN="$ROOT/target/gpu-bin"

# Copies the executable cargo built for a target (release: `cargo bench` builds with the bench profile) (read from cargo's JSON messages) to $BIN/<name>.
build_one() {
  local name="$1"
  shift
  local exe
  exe=$(cargo "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
exe=[m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable")]
print(exe[-1] if exe else "")')
  [[ -n "$exe" ]] || { echo "gpu-check: building $name failed (cargo $*)" >&2; exit 1; }
  cp "$exe" "$BIN/$name"
  strip --strip-debug "$BIN/$name" 2>/dev/null || true
  echo "gpu-check: $name <- $exe ($(du -h "$BIN/$name" | cut -f1))"
}

if [[ "${1:-}" == "build" ]]; then
  mkdir -p "$BIN"
  build_one gpu_parity test --release -p baton-kernels --test gpu_parity
  build_one gpu_parity_attention test --release -p baton-kernels --test gpu_parity_attention
  build_one gpu_parity_gemm test --release -p baton-kernels --test gpu_parity_gemm
  build_one cuda_backend test --release -p baton-engine --test cuda_backend
  # The engine's unit tests: the GPU ones among them (`comm::nccl::` — NCCL collectives against LocalGroup) are ignored
  # without a device.
  build_one engine_lib test --release -p baton-engine --lib
  # The backend-generic suites (written once; `cuda::*` are their CUDA instances).
  for suite in equivalence faults faults_matrix checkpoint data_parallel two_bw; do
    build_one "suite_$suite" test --release -p baton-engine --test "$suite"
  done
  build_one kernels_bench bench -p baton --bench kernels
  build_one transport_bench bench -p baton --bench transport
  cargo build --release --bin baton >/dev/null 2>&1 && cp target/release/baton "$BIN/baton" &&
    strip --strip-debug "$BIN/baton" 2>/dev/null || true
  echo "gpu-check: baton <- target/release/baton"
  # The multi-process CLI (`--features mpi`: MPI bootstrap, NCCL between ranks); needs an MPI library here and
  # the same MPI (mpirun, libmpi) on the GPU machine to run.
  if cargo build --release --features mpi --bin baton --target-dir target/mpi >/dev/null 2>&1; then
    cp target/mpi/release/baton "$BIN/baton-mpi" && strip --strip-debug "$BIN/baton-mpi" 2>/dev/null || true
    echo "gpu-check: baton-mpi <- target/mpi/release/baton (--features mpi)"
  else
    echo "gpu-check: baton-mpi not built (cargo build --features mpi failed: no MPI library or libclang?)"
  fi
  echo "gpu-check: built into $BIN; carry target/gpu-bin to the GPU machine and run scripts/gpu-check.sh there"
  exit 0
fi

OUT="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
START=$(date +%s)

# --- Where are the CUDA libraries? (the image may hold them in its toolkit or inside Python packages) ---------
echo "== libraries"
declare -a LIBDIRS=()
# One walk of the file system for every library and the bf16 header (each walk of a large image takes a while).
FOUND_ALL=$(timeout 90 find / \( -path /proc -o -path /sys -o -path /dev -o -path "$ROOT" \) -prune -o \
  \( -name 'libcuda.so*' -o -name 'libnvrtc.so*' -o -name 'libcublasLt.so*' -o -name 'libcublas.so*' \
  -o -name 'libnccl.so*' -o -name cuda_bf16.h \) -print 2>/dev/null | grep -v -e '\.alt\.' -e 'stubs' | sort || true)
for lib in libcuda.so libnvrtc.so libcublasLt.so libcublas.so libnccl.so; do
  sys=$(ldconfig -p 2>/dev/null | grep -m1 "$lib" | awk '{print $NF}' || true)
  found=$(echo "$FOUND_ALL" | grep "/$lib" | head -5 || true)
  echo "$lib: ldconfig: ${sys:-none}"
  if [[ -n "$found" ]]; then
    echo "$found" | sed 's/^/    found: /'
  fi
  if [[ -z "$sys" && -n "$found" ]]; then
    # Prefer a CUDA 13 location when several exist.
    pick=$(echo "$found" | grep -m1 -e cu13 -e 'cuda-13' || echo "$found" | head -1)
    LIBDIRS+=("$(dirname "$pick")")
  fi
done
for d in "${LIBDIRS[@]}"; do
  case ":${LD_LIBRARY_PATH:-}:" in *":$d:"*) ;; *) export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
done
# cudarc opens libnccl.so (or libnccl.so.13), never libnccl.so.2, the only name PyPI's nvidia-nccl-cu13 ships: give
# it a folder with a `libnccl.so -> libnccl.so.2` link (engine/src/comm/nccl.rs says the same when NCCL fails to load).
if ! echo "$FOUND_ALL" | grep -q -e '/libnccl\.so$' -e '/libnccl\.so\.13$' &&
  ! ldconfig -p 2>/dev/null | grep -q -e 'libnccl\.so ' -e 'libnccl\.so\.13 '; then
  nccl2=$(echo "$FOUND_ALL" | grep -m1 -e 'cu13.*/libnccl\.so\.2$' || echo "$FOUND_ALL" | grep -m1 '/libnccl\.so\.2$' || true)
  if [[ -n "$nccl2" ]]; then
    NCCL_LINK_DIR="${TMPDIR:-/tmp}/baton-nccl-lib"
    mkdir -p "$NCCL_LINK_DIR" && ln -sf "$nccl2" "$NCCL_LINK_DIR/libnccl.so"
    export LD_LIBRARY_PATH="$NCCL_LINK_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libnccl.so -> $nccl2 (link in $NCCL_LINK_DIR)"
  fi
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
if [[ -z "${BATON_CUDA_INCLUDE:-}" ]]; then
  hdr=$(echo "$FOUND_ALL" | grep '/cuda_bf16\.h$' | grep -m1 -e cu13 -e 'cuda-13' -e '/usr/local/cuda/' || true)
  [[ -n "$hdr" ]] && export BATON_CUDA_INCLUDE="$(dirname "$hdr")"
fi
echo "BATON_CUDA_INCLUDE=${BATON_CUDA_INCLUDE:-unset}"
export BATON_KERNEL_CACHE="${BATON_KERNEL_CACHE:-/tmp/baton-kernel-cache}"

echo "== nvidia-smi"
nvidia-smi || true

if [[ ! -x "$BIN/gpu_parity" || ! -x "$BIN/gpu_parity_attention" || ! -x "$BIN/gpu_parity_gemm" ]]; then
  echo "== release build (no target/gpu-bin)"
  "$0" build
fi

STATUS=0
declare -a FALLBACK=()
LAST_RC=0
# The whole check must end (summary printed, logs packed) inside the device tool's 10-minute call: every step's
# limit is cut to what is left of BATON_GPU_CHECK_BUDGET seconds (default 570) minus a reserve for the summary,
# and a step with no time left is skipped (and says so).
BUDGET="${BATON_GPU_CHECK_BUDGET:-570}"
SUMMARY_RESERVE=25
run_step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name"
  LAST_RC=0
  local left=$(( BUDGET - ($(date +%s) - START) - SUMMARY_RESERVE ))
  if (( left < 10 )); then
    echo "SKIPPED: $name (time budget: $(( $(date +%s) - START )) s of $BUDGET s used)"
    STATUS=1
    LAST_RC=2
    return 0
  fi
  (( limit > left )) && limit=$left
  if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "FAILED: $name (log: $OUT/$name.log)"
    STATUS=1
    LAST_RC=1
  fi
  grep -E "rel err|^test |test result|seed|step [0-9]|determinism|bitwise|panicked|FAILED|failed|SKIPPED|^NCCL" "$OUT/$name.log" | tail -120 || true
}
run_step parity 150 "$BIN/gpu_parity" --ignored --test-threads 1 --nocapture
run_step parity_attention 60 "$BIN/gpu_parity_attention" --ignored --test-threads 1 --nocapture
run_step parity_gemm 60 "$BIN/gpu_parity_gemm" --ignored --test-threads 1 --nocapture
run_step engine 150 "$BIN/cuda_backend" --ignored --test-threads 1 --nocapture
# NCCL collectives (engine/src/comm/nccl.rs): bitwise equal to LocalGroup on 1 GPU (one rank); the multi-GPU
# layouts print SKIPPED with fewer than 2 GPUs.
if [[ -x "$BIN/engine_lib" ]]; then
  run_step nccl 60 "$BIN/engine_lib" --ignored comm::nccl:: --test-threads 1 --nocapture
else
  echo "engine_lib: not built (scripts/gpu-check.sh build): NCCL collectives not checked"
fi
# NCCL between ranks (engine/src/comm/nccl_world.rs): the non-blocking wrapper (init, split, a send/recv round trip,
# the watchdog aborting a receive that never matches), one-rank groups against LocalGroup and the host sum, and two
# GPUs as two ranks (transport + all-reduce; SKIPPED with fewer than 2 GPUs).
if [[ -x "$BIN/engine_lib" ]]; then
  run_step nccl_world 90 "$BIN/engine_lib" --ignored comm::nccl_world:: --test-threads 1 --nocapture
fi
# Two ranks under mpirun against one process, both `--stages 2`: stage traffic is copies (NCCL send/recv with a GPU
# per rank; MPI host staging when the ranks share the one GPU, which NCCL refuses) and the reductions are
# member-order sums in fp32 either way, so the losses must be bitwise equal.
mpi_smoke() {
  local args=(train --device cuda --precision f32 --layers 2 --d-model 128 --heads 4 --seq 128 --batch 8
    --microbatches 4 --stages 2 --schedule 1f1b --steps 4 --warmup 1 --eval-every 0)
  "$BIN/baton-mpi" "${args[@]}" --out "$OUT/mpi-one" || return 1
  mpirun --allow-run-as-root --oversubscribe -np 2 -x LD_LIBRARY_PATH -x BATON_KERNEL_CACHE -x BATON_CUDA_INCLUDE \
    "$BIN/baton-mpi" "${args[@]}" --out "$OUT/mpi-two" || return 1
  python3 - "$OUT/mpi-one/metrics.jsonl" "$OUT/mpi-two/metrics.jsonl" <<'PY'
import json, struct, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if l.strip() and "loss" in json.loads(l)]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
bits = lambda xs: [struct.pack("<d", x).hex() for x in xs]
print("one process:", a)
print("two ranks:  ", b)
ok = len(a) > 0 and bits(a) == bits(b)
print("mpirun 2 ranks vs 1 process, --stages 2:", "bitwise equal" if ok else "DIFFERENT (FAILED)")
sys.exit(0 if ok else 1)
PY
}
export -f mpi_smoke
export OUT
if [[ -x "$BIN/baton-mpi" ]] && command -v mpirun >/dev/null && ! ldd "$BIN/baton-mpi" | grep -q 'not found'; then
  run_step mpi_smoke 120 bash -c mpi_smoke
  grep -h -e 'bitwise' -e 'NCCL' -e 'share GPUs' "$OUT/mpi_smoke.log" | head -5 || true
else
  echo "SKIPPED: mpi_smoke (needs target/gpu-bin/baton-mpi, mpirun and its libmpi on this machine)"
fi
# The equivalence, fault and checkpoint suites on CUDA: the same test code CI runs on the CPU.
run_suites() {
  local rc=0 suite
  for suite in equivalence faults faults_matrix checkpoint data_parallel two_bw; do
    if [[ -x "$BIN/suite_$suite" ]]; then
      "$BIN/suite_$suite" --ignored cuda:: --test-threads 1 || rc=1
    else
      echo "suite_$suite: not built (scripts/gpu-check.sh build)"
      rc=1
    fi
  done
  return $rc
}
export -f run_suites
export BIN
run_step suites 120 bash -c run_suites
run_step bench 240 "$BIN/kernels_bench" --bench
if [[ -x "$BIN/transport_bench" ]]; then
  run_step transport 90 "$BIN/transport_bench" --bench
fi
# End-to-end benchmark: GPT-2 124M, B·T = 64×1024 per step, bf16, 1F1B with p = 1, 2, 4 stages on the one GPU.
# MFU against the kernel bench's measured cuBLASLt bf16 ceiling when it printed one.
PEAK=$(grep -h '^SUMMARY kernel=ceiling_cublaslt_bf16 ' "$OUT/bench.log" 2>/dev/null |
  sed -n 's/.* tflops=\([0-9.]*\).*/\1/p' | head -1 || true)
declare -a PEAK_ARG=()
[[ -n "$PEAK" ]] && PEAK_ARG=(--peak-tflops "$PEAK")
echo "== e2e: peak for MFU: ${PEAK:-none measured} TFLOP/s"
E2E_STAGES=(1 2 4)
if [[ -x "$BIN/baton" ]]; then
  for p in "${E2E_STAGES[@]}"; do
    E2E=("$BIN/baton" train --device cuda --precision bf16 --tokenizer gpt2 --layers 12 --d-model 768 --heads 12
      --seq 1024 --batch 64 --microbatches 8 --stages "$p" --schedule 1f1b --steps 6 --warmup 2 --eval-every 0
      ${PEAK_ARG[@]+"${PEAK_ARG[@]}"} --out "$OUT/e2e-p$p")
    run_step "e2e_p$p" 150 "${E2E[@]}"
    if [[ $LAST_RC == 1 ]] && (( $(date +%s) - START < 420 )); then
      # So that a defect in the fused paths still leaves figures (time allowing): the materialised attention and cuBLAS + separate
      # kernels (the summary marks the row).
      FALLBACK[$p]=1
      run_step "e2e_p${p}_fallback" 150 env BATON_CUDA_ATTENTION=simple BATON_CUDA_GEMM=cublas "${E2E[@]}"
    fi
    # The run ends with a checkpoint (~1.5 GB for 124M parameters + moments): not needed here.
    rm -rf "$OUT/e2e-p$p/checkpoints"
  done
fi
# The PyTorch reference (the same GPT-2 124M and batch, bf16 autocast, torch.compile, fused AdamW), timed in this
# same run for the Baton / PyTorch ratio. On by default; skipped (said so in the summary) when less than
# TORCH_MIN_LEFT seconds of the ~9.5-minute budget remain, so the rest of the check always comes back;
# BATON_GPU_CHECK_TORCH=0 skips it.
TORCH_MIN_LEFT=150
ELAPSED=$(( $(date +%s) - START ))
TORCH_NOTE=""
if [[ "${BATON_GPU_CHECK_TORCH:-1}" == "0" ]]; then
  TORCH_NOTE="skipped (BATON_GPU_CHECK_TORCH=0)"
elif (( ELAPSED > BUDGET - TORCH_MIN_LEFT )); then
  TORCH_NOTE="skipped: ${ELAPSED} s elapsed, too little time left"
else
  run_step torch_reference $(( BUDGET - ELAPSED )) python3 "$ROOT/scripts/torch_reference.py" --batch 64 --seq 1024 \
    --steps 8 --warmup 3 ${PEAK:+--peak-tflops "$PEAK"}
  grep '^TORCH_REFERENCE' "$OUT/torch_reference.log" || true
fi

echo "== done in $(( $(date +%s) - START )) s; logs in $OUT"
echo
echo "== summary (bench: median of 20 CUDA-event-timed runs; % of the measured ceiling)"
printf '%-28s %-28s %10s %9s %9s %8s\n' kernel shape time_us TFLOP/s GB/s '%ceil'
grep -h '^SUMMARY' "$OUT/bench.log" "$OUT/transport.log" 2>/dev/null | sed 's/^SUMMARY //' | awk '{
  for (i = 1; i <= NF; i++) { j = index($i, "="); v[substr($i, 1, j - 1)] = substr($i, j + 1) }
  printf "%-28s %-28s %10s %9s %9s %8s\n", v["kernel"], v["shape"], v["time_us"], v["tflops"], v["gbs"], v["pct_ceiling"]
}' | tee "$OUT/summary.txt" || true
echo
echo "== end to end: GPT-2 124M, bf16, 1F1B, B·T = 64×1024, one GPU (last step of 6; MFU vs ${PEAK:-no} TFLOP/s)"
printf '%-8s %12s %8s %16s %16s\n' stages tokens/s MFU bubble_measured bubble_simulated | tee -a "$OUT/summary.txt"
for p in "${E2E_STAGES[@]}"; do
  metrics="$OUT/e2e-p$p/metrics.jsonl"
  cols=$(python3 - "$metrics" <<'PY' 2>/dev/null || echo "- -"
import json, sys
lines = [l for l in open(sys.argv[1]) if l.strip()]
m = json.loads(lines[-1])
tps = m.get("tokens_per_s")
mfu = m.get("mfu")
print(f"{tps:.0f}" if tps is not None else "-", f"{100 * mfu:.1f}%" if mfu is not None else "-")
PY
)
  log="$OUT/e2e_p$p.log"
  [[ -n "${FALLBACK[$p]:-}" ]] && log="$OUT/e2e_p${p}_fallback.log"
  bubble=$(grep -h 'last step: measured bubble' "$log" 2>/dev/null | tail -1 |
    sed -n 's/.*measured bubble \([^,]*\), simulated from measured action costs \(.*\)$/\1 \2/p' || true)
  # shellcheck disable=SC2086
  label="$p"
  [[ -n "${FALLBACK[$p]:-}" ]] && label="${p}*"
  printf '%-8s %12s %8s %16s %16s\n' "$label" $cols ${bubble:-- -} | tee -a "$OUT/summary.txt"
done
if (( ${#FALLBACK[@]} > 0 )); then
  echo "* the fused run failed (see e2e_p<N>.log); figures from BATON_CUDA_ATTENTION=simple BATON_CUDA_GEMM=cublas" |
    tee -a "$OUT/summary.txt"
fi
# Baton / PyTorch, same model and batch (Baton single stage, last step; PyTorch mean of its timed steps).
TORCH_TPS=$(sed -n 's/^TORCH_REFERENCE tokens_per_s=\([0-9.]*\).*/\1/p' "$OUT/torch_reference.log" 2>/dev/null | tail -1 || true)
BATON_TPS=$(python3 -c 'import json,sys; print(json.loads([l for l in open(sys.argv[1]) if l.strip()][-1])["tokens_per_s"])' \
  "$OUT/e2e-p1/metrics.jsonl" 2>/dev/null || true)
if [[ -n "$TORCH_TPS" && -n "$BATON_TPS" ]]; then
  python3 -c 'import sys; b, t = map(float, sys.argv[1:]); print(f"pytorch  {t:12.0f}   baton/pytorch (p=1) = {b / t:.3f}")' \
    "$BATON_TPS" "$TORCH_TPS" | tee -a "$OUT/summary.txt"
else
  echo "pytorch: ${TORCH_NOTE:-no TORCH_REFERENCE line (see $OUT/torch_reference.log)}" | tee -a "$OUT/summary.txt"
fi
# The device tool brings back at most 8 files from $OUT: pack the per-step logs and e2e metrics into one archive,
# keeping gpu-check.log and summary.txt beside it.
(
  cd "$OUT" &&
    find . -mindepth 1 -maxdepth 1 ! -name gpu-check.log ! -name summary.txt ! -name logs.tar.gz -print0 |
    xargs -0 tar czf logs.tar.gz &&
    find . -mindepth 1 -maxdepth 1 ! -name gpu-check.log ! -name summary.txt ! -name logs.tar.gz -exec rm -rf {} +
) || echo "gpu-check: packing the logs failed; they stay under $OUT"
echo "logs: $OUT/logs.tar.gz (per-step logs, e2e metrics), $OUT/gpu-check.log, $OUT/summary.txt"
exit $STATUS
