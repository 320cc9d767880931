//! Launcher of the hand-written tensor-core GEMM (`kernels/cuda/gemm.cu`): the fully connected layer
//! `out = inp · weightᵀ (+ bias) (→ GELU)` with bf16 operands, fp32 accumulation and bf16 or fp32 output.
//!
//! An alternative to [`super::blaslt`] for the MLP forward, benchmarked against it in `benches/kernels.rs`.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

use super::device::{Device, Elem};
use super::error::{check_len, CudaError, Result};
use super::registry::GEMM;

/// Output rows per block.
pub const TILE_M: usize = 128;
/// Output columns per block.
pub const TILE_N: usize = 128;
/// Threads per block (4 warps, each owning a 64 x 64 sub-tile).
pub const THREADS: u32 = 128;
/// Dynamic shared memory per block: 4 stages of a 128 x 32 A tile and a 128 x 32 B tile, bf16.
pub const SMEM_BYTES: u32 = 4 * (128 + 128) * 32 * 2;
/// The largest grid.x the driver accepts.
const GRID_X_MAX: usize = (1 << 31) - 1;

/// The launch configuration for an (M, N) output, checked in this one place.
fn launch_config(op: &'static str, m: usize, n: usize, k: usize) -> Result<LaunchConfig> {
    if m == 0 || n == 0 || k == 0 {
        return Err(CudaError::shape(op, format!("empty product M={m} N={n} K={k}")));
    }
    if k % 8 != 0 {
        return Err(CudaError::shape(
            op,
            format!("K = {k} must be a multiple of 8 (16-byte rows)"),
        ));
    }
    for (what, v) in [("M", m), ("N", n), ("K", k)] {
        if i32::try_from(v).is_err() {
            return Err(CudaError::shape(op, format!("{what} = {v} exceeds i32")));
        }
    }
    let blocks = m.div_ceil(TILE_M) * n.div_ceil(TILE_N);
    if blocks > GRID_X_MAX {
        return Err(CudaError::shape(op, format!("{blocks} blocks exceed the grid limit")));
    }
    const { assert!(SMEM_BYTES <= 227 * 1024) };
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: SMEM_BYTES,
    })
}

/// `out = inp · weightᵀ (+ bias)`, then GELU (tanh form) when `gelu`; overwrites `out`. When `pre_gelu` is
/// given it receives the value before the GELU (what the GELU backward needs). `O` is `f32` or `bf16`.
///
/// Shapes: `out`, `pre_gelu` (N, OC); `inp` (N, C); `weight` (OC, C); `bias` (OC). C must be a multiple of 8.
#[allow(clippy::too_many_arguments)] // output, stash, three operands, the activation flag and three dims.
pub fn gemm_forward<O: Elem>(
    dev: &Device,
    out: &mut CudaSlice<O>,
    pre_gelu: Option<&mut CudaSlice<O>>,
    inp: &CudaSlice<bf16>,
    weight: &CudaSlice<bf16>,
    bias: Option<&CudaSlice<bf16>>,
    gelu: bool,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "gemm_forward";
    let cfg = launch_config(OP, n, oc, c)?;
    check_len(OP, "out", out.len(), n * oc)?;
    check_len(OP, "inp", inp.len(), n * c)?;
    check_len(OP, "weight", weight.len(), oc * c)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), oc)?;
    }
    if let Some(p) = pre_gelu.as_ref() {
        check_len(OP, "pre_gelu", p.len(), n * oc)?;
    }
    let kernel = O::pick(["gemm_bf16_tn_f32", "gemm_bf16_tn_bf16"]);
    let func = dev.library().function(&GEMM, kernel)?;
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        SMEM_BYTES as i32,
    )
    .map_err(|e| CudaError::driver(format!("raising the shared-memory limit of {kernel}"), e))?;

    let stream = dev.stream();
    // Optional operands travel as raw device pointers (0 = absent); the guards keep cudarc's stream-order
    // tracking alive until the launch is queued.
    let (bias_ptr, _bias_guard) = match bias {
        Some(b) => {
            let (p, g) = b.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let (pre_ptr, _pre_guard) = match pre_gelu {
        Some(p) => {
            let (ptr, g) = p.device_ptr_mut(stream);
            (ptr, Some(g))
        }
        None => (0, None),
    };
    let (m_i, n_i, k_i, gelu_i) = (n as i32, oc as i32, c as i32, i32::from(gelu));
    let mut builder = stream.launch_builder(&func);
    builder
        .arg(inp)
        .arg(weight)
        .arg(&bias_ptr)
        .arg(out)
        .arg(&pre_ptr)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i)
        .arg(&gelu_i);
    // SAFETY: matches `gemm_bf16_tn_*(A, B, bias, C, pre, M, N, K, gelu)`. A = inp holds M*K, B = weight N*K,
    // C and pre (when non-null) M*N, bias (when non-null) N elements (all checked above); the kernel reads only
    // rows < M / < N and columns < K (K % 8 == 0, so every 16-byte chunk is whole) and writes only inside
    // (M, N); the null pointers are tested in the kernel before use; shared memory is the size it checks.
    unsafe { builder.launch(cfg) }.map_err(|source| CudaError::Launch { kernel, cfg, source })?;
    Ok(())
}

/// Floating-point operations of one (M, N, K) product: `2 * M * N * K`.
pub fn gemm_flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_config_covers_ragged_shapes() {
        let cfg = launch_config("t", 1000, 77, 40).unwrap();
        assert_eq!(cfg.grid_dim, (8, 1, 1));
        assert_eq!(cfg.shared_mem_bytes, 65_536);
        let cfg = launch_config("t", 4096, 4096, 4096).unwrap();
        assert_eq!(cfg.grid_dim, (1024, 1, 1));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(launch_config("t", 8, 8, 12), Err(CudaError::Shape { .. })));
        assert!(matches!(launch_config("t", 0, 8, 8), Err(CudaError::Shape { .. })));
    }
}
