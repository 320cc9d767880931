//! Launchers of the fused causal flash attention (`kernels/cuda/flash_attention.cu`): forward and the
//! deterministic two-pass backward, bf16 storage on tensor cores, head sizes 64 and 128.
//!
//! Layout: `q`, `k`, `v`, `out` and their gradients are (B, NH, T, HS) bf16; `lse` and `delta` are (B, NH, T)
//! fp32. The softmax scale is `1 / sqrt(HS)`. Unlike the CPU reference ops, these **overwrite** their outputs
//! (the gradients are complete after one call, nothing to accumulate into).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::device::Device;
use super::error::{check_len, CudaError, Result};
use super::registry::FLASH_ATTENTION;

/// Threads per block of every flash-attention kernel (4 warps).
pub const THREADS: u32 = 128;
/// Query rows per block of the forward and the dQ pass, key rows per block of the dK/dV pass.
pub const BLOCK_ROWS: usize = 64;
/// Key rows per pipeline stage of the forward and the dQ pass.
const BLOCK_COLS: usize = 64;
/// The largest grid.y the driver accepts (B * NH must fit).
const GRID_Y_MAX: usize = 65_535;

/// The shape of one attention call: batch, heads, sequence length and head size (64 or 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// Batch size B.
    pub b: usize,
    /// Number of heads NH.
    pub nh: usize,
    /// Sequence length T (any value >= 1; tiles are predicated).
    pub t: usize,
    /// Head size HS: 64 or 128.
    pub hs: usize,
}

impl AttentionDims {
    /// Elements of one (B, NH, T, HS) tensor.
    pub fn qkv_len(&self) -> usize {
        self.b * self.nh * self.t * self.hs
    }

    /// Elements of one (B, NH, T) row statistic (`lse`, `delta`).
    pub fn rows_len(&self) -> usize {
        self.b * self.nh * self.t
    }

    /// Floating-point operations of the causal forward (two products over the lower triangle, counting the
    /// diagonal as FlashAttention's benchmarks do: `4 * B * NH * T^2 * HS / 2`).
    pub fn forward_flops(&self) -> f64 {
        4.0 * (self.b * self.nh) as f64 * (self.t as f64).powi(2) * self.hs as f64 / 2.0
    }

    /// Floating-point operations of the causal backward by the usual convention (2.5 times the forward: five
    /// products), not counting the recomputation of the separate dQ pass.
    pub fn backward_flops(&self) -> f64 {
        2.5 * self.forward_flops()
    }
}

/// The three kernels of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    BackwardDq,
    BackwardDkDv,
}

/// Validated launch parameters of one pass: entry point, configuration and the scalar arguments.
struct Launch {
    kernel: &'static str,
    cfg: LaunchConfig,
    t: i32,
    scale: f32,
}

/// Query (or key) rows per pipeline stage of the dK/dV pass, as in the `.cu` file.
fn dkdv_block_rows(hs: usize) -> usize {
    if hs <= 64 {
        64
    } else {
        16
    }
}

/// Dynamic shared memory of a pass in bytes (must match the layout at the top of each kernel, which traps
/// if it gets less).
fn smem_bytes(pass: Pass, hs: usize) -> usize {
    let (br, bc) = (BLOCK_ROWS, BLOCK_COLS);
    match pass {
        Pass::Forward => (br + 4 * bc) * hs * 2,
        Pass::BackwardDq => (2 * br + 4 * bc) * hs * 2 + 2 * br * 4,
        Pass::BackwardDkDv => {
            let br = dkdv_block_rows(hs);
            (2 * BLOCK_ROWS + 4 * br) * hs * 2 + 4 * br * 4
        }
    }
}

/// The launch configuration of `pass`, computed and checked in this one place.
fn launch(op: &'static str, pass: Pass, d: AttentionDims) -> Result<Launch> {
    let kernel = match (pass, d.hs) {
        (Pass::Forward, 64) => "flash_attn_fwd_hs64",
        (Pass::Forward, 128) => "flash_attn_fwd_hs128",
        (Pass::BackwardDq, 64) => "flash_attn_bwd_dq_hs64",
        (Pass::BackwardDq, 128) => "flash_attn_bwd_dq_hs128",
        (Pass::BackwardDkDv, 64) => "flash_attn_bwd_dkdv_hs64",
        (Pass::BackwardDkDv, 128) => "flash_attn_bwd_dkdv_hs128",
        _ => return Err(CudaError::shape(op, format!("head size {} (supported: 64, 128)", d.hs))),
    };
    if d.b == 0 || d.nh == 0 || d.t == 0 {
        return Err(CudaError::shape(op, format!("empty shape {d:?}")));
    }
    let heads = d.b * d.nh;
    if heads > GRID_Y_MAX {
        return Err(CudaError::shape(
            op,
            format!("B * NH = {heads} exceeds the grid limit {GRID_Y_MAX}"),
        ));
    }
    let t = i32::try_from(d.t).map_err(|_| CudaError::shape(op, format!("T = {} exceeds i32", d.t)))?;
    let blocks = d.t.div_ceil(BLOCK_ROWS);
    let smem = smem_bytes(pass, d.hs);
    assert!(
        smem <= 227 * 1024,
        "{op}: {smem} bytes of shared memory exceed the sm_90 limit"
    );
    assert!(blocks <= u32::MAX as usize && heads <= GRID_Y_MAX);
    Ok(Launch {
        kernel,
        cfg: LaunchConfig {
            grid_dim: (blocks as u32, heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        },
        t,
        scale: 1.0 / (d.hs as f32).sqrt(),
    })
}

/// Looks up `l.kernel` and raises its dynamic shared-memory limit to what the launch asks for.
fn function(dev: &Device, l: &Launch) -> Result<CudaFunction> {
    let func = dev.library().function(&FLASH_ATTENTION, l.kernel)?;
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        l.cfg.shared_mem_bytes as i32,
    )
    .map_err(|e| CudaError::driver(format!("raising the shared-memory limit of {}", l.kernel), e))?;
    Ok(func)
}

/// Forward: writes `out` = softmax_causal(Q K^T / sqrt(HS)) V and the row logsumexp `lse` (natural log of the
/// sum of exp of the scaled scores), which [`flash_attention_backward`] needs.
///
/// Shapes: `out`, `q`, `k`, `v` (B, NH, T, HS); `lse` (B, NH, T).
pub fn flash_attention_forward(
    dev: &Device,
    out: &mut CudaSlice<bf16>,
    lse: &mut CudaSlice<f32>,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    dims: AttentionDims,
) -> Result<()> {
    const OP: &str = "flash_attention_forward";
    let l = launch(OP, Pass::Forward, dims)?;
    for (name, len) in [("out", out.len()), ("q", q.len()), ("k", k.len()), ("v", v.len())] {
        check_len(OP, name, len, dims.qkv_len())?;
    }
    check_len(OP, "lse", lse.len(), dims.rows_len())?;
    let func = function(dev, &l)?;
    let mut builder = dev.stream().launch_builder(&func);
    builder.arg(q).arg(k).arg(v).arg(out).arg(lse).arg(&l.t).arg(&l.scale);
    // SAFETY: the argument list matches `flash_attn_fwd_hs*(q, k, v, o, lse, T, scale)`; every buffer was
    // checked to hold B*NH*T*HS (or B*NH*T) elements, which is all the kernel indexes (grid.y = B*NH heads of
    // T rows, rows >= T are neither read nor written), and the dynamic shared memory is the size it checks.
    unsafe { builder.launch(l.cfg) }.map_err(|source| CudaError::Launch {
        kernel: l.kernel,
        cfg: l.cfg,
        source,
    })?;
    Ok(())
}

/// Backward: writes `dq`, `dk`, `dv` from `dout` and the forward's `out` and `lse`. `delta` is scratch of
/// (B, NH, T) fp32 that receives rowsum(dO * O). Two launches on the device's stream: the dQ pass (which also
/// writes `delta`), then the dK/dV pass; no atomics, so the result is bitwise reproducible.
///
/// Shapes: `dq`, `dk`, `dv`, `dout`, `q`, `k`, `v`, `out` (B, NH, T, HS); `lse`, `delta` (B, NH, T).
#[allow(clippy::too_many_arguments)] // three gradients, scratch, four inputs, the forward's two outputs, dims.
pub fn flash_attention_backward(
    dev: &Device,
    dq: &mut CudaSlice<bf16>,
    dk: &mut CudaSlice<bf16>,
    dv: &mut CudaSlice<bf16>,
    delta: &mut CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    out: &CudaSlice<bf16>,
    lse: &CudaSlice<f32>,
    dims: AttentionDims,
) -> Result<()> {
    const OP: &str = "flash_attention_backward";
    let l1 = launch(OP, Pass::BackwardDq, dims)?;
    let l2 = launch(OP, Pass::BackwardDkDv, dims)?;
    for (name, len) in [
        ("dq", dq.len()),
        ("dk", dk.len()),
        ("dv", dv.len()),
        ("dout", dout.len()),
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("out", out.len()),
    ] {
        check_len(OP, name, len, dims.qkv_len())?;
    }
    check_len(OP, "lse", lse.len(), dims.rows_len())?;
    check_len(OP, "delta", delta.len(), dims.rows_len())?;

    let f1 = function(dev, &l1)?;
    let mut b1 = dev.stream().launch_builder(&f1);
    b1.arg(q)
        .arg(k)
        .arg(v)
        .arg(out)
        .arg(dout)
        .arg(lse)
        .arg(dq)
        .arg(&mut *delta)
        .arg(&l1.t)
        .arg(&l1.scale);
    // SAFETY: matches `flash_attn_bwd_dq_hs*(q, k, v, o, dout, lse, dq, delta, T, scale)`; every buffer holds
    // exactly the elements of its (B, NH, T[, HS]) shape (checked above) and the kernel touches no row >= T.
    unsafe { b1.launch(l1.cfg) }.map_err(|source| CudaError::Launch {
        kernel: l1.kernel,
        cfg: l1.cfg,
        source,
    })?;

    let f2 = function(dev, &l2)?;
    let mut b2 = dev.stream().launch_builder(&f2);
    b2.arg(q)
        .arg(k)
        .arg(v)
        .arg(dout)
        .arg(lse)
        .arg(&*delta)
        .arg(dk)
        .arg(dv)
        .arg(&l2.t)
        .arg(&l2.scale);
    // SAFETY: matches `flash_attn_bwd_dkdv_hs*(q, k, v, dout, lse, delta, dk, dv, T, scale)` with the same
    // checked shapes; `delta` was written by the previous launch on this same stream, which orders the two.
    unsafe { b2.launch(l2.cfg) }.map_err(|source| CudaError::Launch {
        kernel: l2.kernel,
        cfg: l2.cfg,
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_configs_cover_the_sequence_and_fit_shared_memory() {
        for hs in [64, 128] {
            for t in [1, 77, 1000, 1024] {
                let d = AttentionDims { b: 3, nh: 12, t, hs };
                for pass in [Pass::Forward, Pass::BackwardDq, Pass::BackwardDkDv] {
                    let l = launch("test", pass, d).unwrap();
                    assert_eq!(l.cfg.grid_dim, (t.div_ceil(64) as u32, 36, 1));
                    assert_eq!(l.cfg.block_dim, (THREADS, 1, 1));
                    assert!(l.cfg.shared_mem_bytes as usize <= 227 * 1024);
                    assert!(l.kernel.ends_with(&format!("hs{hs}")));
                    assert!(FLASH_ATTENTION.kernels.contains(&l.kernel));
                }
            }
        }
        // The sizes the kernels check on entry.
        assert_eq!(smem_bytes(Pass::Forward, 64), 40_960);
        assert_eq!(smem_bytes(Pass::BackwardDq, 128), 98_816);
        assert_eq!(smem_bytes(Pass::BackwardDkDv, 64), 50_176);
        assert_eq!(smem_bytes(Pass::BackwardDkDv, 128), 49_408);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let d = AttentionDims {
            b: 1,
            nh: 1,
            t: 8,
            hs: 96,
        };
        assert!(matches!(launch("x", Pass::Forward, d), Err(CudaError::Shape { .. })));
        let d = AttentionDims {
            b: 1,
            nh: 1,
            t: 0,
            hs: 64,
        };
        assert!(matches!(launch("x", Pass::Forward, d), Err(CudaError::Shape { .. })));
        let d = AttentionDims {
            b: 70_000,
            nh: 1,
            t: 8,
            hs: 64,
        };
        assert!(matches!(launch("x", Pass::BackwardDq, d), Err(CudaError::Shape { .. })));
    }

    #[test]
    fn flop_counts() {
        let d = AttentionDims {
            b: 1,
            nh: 1,
            t: 4,
            hs: 64,
        };
        assert_eq!(d.forward_flops(), 2048.0);
        assert_eq!(d.backward_flops(), 5120.0);
    }
}
