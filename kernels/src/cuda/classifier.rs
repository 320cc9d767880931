//! Launchers of `classifier.cu`: softmax + cross-entropy over rows of `v` logits without materialising the
//! probabilities. Losses are fp32 for every element type.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::{dim_u32, launch_kernel, Device, Elem, GRID_X_MAX};
use super::embedding::Tokens;
use super::error::{check_len, CudaError, Result};
use super::registry::CLASSIFIER;

/// Threads per block (`CLASSIFIER_BLOCK`): one block per row.
const CLASSIFIER_BLOCK: u32 = 512;

fn row_cfg(op: &'static str, n: usize) -> Result<Option<LaunchConfig>> {
    if n == 0 {
        return Ok(None);
    }
    if n as u64 > GRID_X_MAX {
        return Err(CudaError::shape(op, format!("{n} rows exceed the grid limit")));
    }
    Ok(Some(LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (CLASSIFIER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }))
}

fn check(op: &'static str, logits_len: usize, targets: &Tokens, n: usize, v: usize) -> Result<(u32, u32)> {
    if v == 0 {
        return Err(CudaError::shape(op, "v must be positive"));
    }
    check_len(op, "logits", logits_len, n * v)?;
    check_len(op, "targets", targets.len(), n)?;
    targets.check_below(op, v)?;
    Ok((dim_u32(op, "n", n)?, dim_u32(op, "v", v)?))
}

/// `losses[i] = −log softmax(logits[i])[targets[i]]`.
pub fn cross_entropy_forward<T: Elem>(
    dev: &Device,
    losses: &mut CudaSlice<f32>,
    logits: &CudaSlice<T>,
    targets: &Tokens,
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "cross_entropy_forward";
    let (n32, v32) = check(OP, logits.len(), targets, n, v)?;
    check_len(OP, "losses", losses.len(), n)?;
    let Some(cfg) = row_cfg(OP, n)? else {
        return Ok(());
    };
    // SAFETY: cross_entropy_forward_{f32,bf16}(float* losses, const T* logits, const u32* targets, u32 n, u32 v);
    // losses holds n, logits n*v, targets n ids all below v (checked); grid.x = n rows.
    launch_kernel!(
        dev,
        CLASSIFIER,
        T::pick(["cross_entropy_forward_f32", "cross_entropy_forward_bf16"]),
        cfg,
        [losses, logits, targets.device(), &n32, &v32]
    )
}

/// `dlogits += scale · (softmax(logits) − onehot(targets))`.
#[allow(clippy::too_many_arguments)] // typed buffers + the (n, v) shape
pub fn cross_entropy_backward<T: Elem>(
    dev: &Device,
    dlogits: &mut CudaSlice<T>,
    logits: &CudaSlice<T>,
    targets: &Tokens,
    scale: f32,
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "cross_entropy_backward";
    let (n32, v32) = check(OP, logits.len(), targets, n, v)?;
    check_len(OP, "dlogits", dlogits.len(), n * v)?;
    let Some(cfg) = row_cfg(OP, n)? else {
        return Ok(());
    };
    // SAFETY: cross_entropy_backward_{f32,bf16}(T* dlogits, const T* logits, const u32* targets, float scale,
    // u32 n, u32 v); dlogits and logits hold n*v, targets n ids below v (checked); grid.x = n rows.
    launch_kernel!(
        dev,
        CLASSIFIER,
        T::pick(["cross_entropy_backward_f32", "cross_entropy_backward_bf16"]),
        cfg,
        [dlogits, logits, targets.device(), &scale, &n32, &v32]
    )
}

/// The fused training-path classifier: `losses[i]` as in [`cross_entropy_forward`], and the logits overwritten in
/// place by `scale · (softmax − onehot)`. One read pass and one read/write pass over the logits.
pub fn classifier_fused<T: Elem>(
    dev: &Device,
    logits: &mut CudaSlice<T>,
    losses: &mut CudaSlice<f32>,
    targets: &Tokens,
    scale: f32,
    n: usize,
    v: usize,
) -> Result<()> {
    const OP: &str = "classifier_fused";
    let (n32, v32) = check(OP, logits.len(), targets, n, v)?;
    check_len(OP, "losses", losses.len(), n)?;
    let Some(cfg) = row_cfg(OP, n)? else {
        return Ok(());
    };
    // SAFETY: classifier_fused_{f32,bf16}(T* logits, float* losses, const u32* targets, float scale, u32 n, u32 v);
    // logits hold n*v, losses n, targets n ids below v (checked); grid.x = n rows.
    launch_kernel!(
        dev,
        CLASSIFIER,
        T::pick(["classifier_fused_f32", "classifier_fused_bf16"]),
        cfg,
        [logits, losses, targets.device(), &scale, &n32, &v32]
    )
}
