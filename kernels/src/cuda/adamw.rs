//! Launchers of `adamw.cu`: AdamW on fp32 master weights and moments (the CPU reference's formula, with the bias
//! corrections computed on the host exactly as `cpu::adamw_step` does).

use cudarc::driver::CudaSlice;
use half::bf16;

use super::device::{grid_1d, launch_kernel, Device, BLOCK_1D};
use super::error::{check_len, CudaError, Result};
use super::registry::ADAMW;
use crate::cpu::AdamW;

fn corrections(op: &'static str, cfg: &AdamW, step: u32) -> Result<(f32, f32)> {
    if step == 0 {
        return Err(CudaError::shape(op, "step is 1-based"));
    }
    Ok((1.0 - cfg.beta1.powf(step as f32), 1.0 - cfg.beta2.powf(step as f32)))
}

/// One AdamW step (1-based `step`) on fp32 `params` with fp32 `grads` and moments `m`, `v`.
pub fn adamw_f32(
    dev: &Device,
    cfg: &AdamW,
    params: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    step: u32,
) -> Result<()> {
    const OP: &str = "adamw_f32";
    let (bc1, bc2) = corrections(OP, cfg, step)?;
    let n = params.len();
    check_len(OP, "grads", grads.len(), n)?;
    check_len(OP, "m", m.len(), n)?;
    check_len(OP, "v", v.len(), n)?;
    let n64 = n as u64;
    let Some(lc) = grid_1d(OP, n64, BLOCK_1D)? else {
        return Ok(());
    };
    // SAFETY: adamw_f32(float* params, const float* grads, float* m, float* v, u64 n, float lr, float beta1,
    // float beta2, float bc1, float bc2, float eps, float weight_decay): 12 arguments in this order; the four
    // buffers hold n elements (checked); threads past n return.
    launch_kernel!(
        dev,
        ADAMW,
        "adamw_f32",
        lc,
        [
            params,
            grads,
            m,
            v,
            &n64,
            &cfg.lr,
            &cfg.beta1,
            &cfg.beta2,
            &bc1,
            &bc2,
            &cfg.eps,
            &cfg.weight_decay
        ]
    )
}

/// One AdamW step on fp32 `master` weights from bf16 `grads`, also writing the bf16 working copy `params`.
#[allow(clippy::too_many_arguments)] // the five buffers of mixed-precision AdamW
pub fn adamw_bf16(
    dev: &Device,
    cfg: &AdamW,
    master: &mut CudaSlice<f32>,
    params: &mut CudaSlice<bf16>,
    grads: &CudaSlice<bf16>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    step: u32,
) -> Result<()> {
    const OP: &str = "adamw_bf16";
    let (bc1, bc2) = corrections(OP, cfg, step)?;
    let n = master.len();
    check_len(OP, "params", params.len(), n)?;
    check_len(OP, "grads", grads.len(), n)?;
    check_len(OP, "m", m.len(), n)?;
    check_len(OP, "v", v.len(), n)?;
    let n64 = n as u64;
    let Some(lc) = grid_1d(OP, n64, BLOCK_1D)? else {
        return Ok(());
    };
    // SAFETY: adamw_bf16(float* master, bf16* params, const bf16* grads, float* m, float* v, u64 n, float lr,
    // float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay): 13 arguments in this order;
    // the five buffers hold n elements (checked); threads past n return.
    launch_kernel!(
        dev,
        ADAMW,
        "adamw_bf16",
        lc,
        [
            master,
            params,
            grads,
            m,
            v,
            &n64,
            &cfg.lr,
            &cfg.beta1,
            &cfg.beta2,
            &bc1,
            &bc2,
            &cfg.eps,
            &cfg.weight_decay
        ]
    )
}
