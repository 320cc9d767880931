//! Launchers of `bias.cu`: the bias add after a GEMM and the deterministic two-pass bias gradient.

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::device::{dim_u32, grid_1d, launch_kernel, pack_len, Device, Elem, GRID_YZ_MAX};
use super::error::{check_len, CudaError, Result};
use super::registry::BIAS;

/// Threads per block of the column-reduction kernels (`BIAS_BLOCK`, `LN_WEIGHT_BLOCK`).
pub(crate) const REDUCE_BLOCK: u32 = 256;
/// The most row groups of a two-pass column reduction.
pub(crate) const REDUCE_GROUPS_MAX: usize = 512;
/// The fewest rows per group of a two-pass column reduction.
pub(crate) const REDUCE_ROWS_MIN: usize = 32;

/// Rows per group and number of groups of a two-pass reduction over `n` rows: a function of `n` alone, so the
/// summation order (and the result) is the same on every run and device.
pub(crate) fn reduce_groups(n: usize) -> (usize, usize) {
    let rows = REDUCE_ROWS_MIN.max(n.div_ceil(REDUCE_GROUPS_MAX));
    (rows, n.div_ceil(rows).max(1))
}

/// The launch of a pass-1 column reduction: grid (ceil(cols / 256), groups).
pub(crate) fn reduce_cfg(op: &'static str, cols: usize, groups: usize) -> Result<LaunchConfig> {
    let gx = cols.div_ceil(REDUCE_BLOCK as usize);
    if groups as u64 > GRID_YZ_MAX {
        return Err(CudaError::shape(op, format!("{groups} row groups exceed grid.y")));
    }
    Ok(LaunchConfig {
        grid_dim: (dim_u32(op, "column blocks", gx)?, groups as u32, 1),
        block_dim: (REDUCE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `out (n, oc) += bias (oc)` on every row.
pub fn bias_forward<T: Elem>(
    dev: &Device,
    out: &mut CudaSlice<T>,
    bias: &CudaSlice<T>,
    n: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "bias_forward";
    check_len(OP, "out", out.len(), n * oc)?;
    check_len(OP, "bias", bias.len(), oc)?;
    let (n32, oc32) = (dim_u32(OP, "n", n)?, dim_u32(OP, "oc", oc)?);
    let unit = if oc % pack_len::<T>() == 0 { pack_len::<T>() } else { 1 };
    let Some(cfg) = grid_1d(OP, (n * (oc / unit)) as u64, REDUCE_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: bias_forward_{f32,bf16}(T* out, const T* bias, u32 n, u32 oc); out holds n*oc and bias oc elements
    // (checked); the kernel takes the same vector-or-scalar unit as `unit` and indexes rows < n, columns < oc.
    launch_kernel!(
        dev,
        BIAS,
        T::pick(["bias_forward_f32", "bias_forward_bf16"]),
        cfg,
        [out, bias, &n32, &oc32]
    )
}

/// `dbias (oc) += Σ rows of dout (n, oc)`, deterministic: fp32 partial sums per row group, then one ordered sum
/// per column.
pub fn bias_backward<T: Elem>(
    dev: &Device,
    dbias: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    n: usize,
    oc: usize,
) -> Result<()> {
    const OP: &str = "bias_backward";
    check_len(OP, "dout", dout.len(), n * oc)?;
    check_len(OP, "dbias", dbias.len(), oc)?;
    if n == 0 || oc == 0 {
        return Ok(());
    }
    let (rows, groups) = reduce_groups(n);
    let (n32, oc32, rows32, groups32) = (
        dim_u32(OP, "n", n)?,
        dim_u32(OP, "oc", oc)?,
        dim_u32(OP, "rows", rows)?,
        dim_u32(OP, "groups", groups)?,
    );
    let mut partial = dev.zeros::<f32>(groups * oc)?;
    let cfg = reduce_cfg(OP, oc, groups)?;
    // SAFETY: bias_backward_partial_{f32,bf16}(float* partial, const T* dout, u32 n, u32 oc, u32 rows_per_group);
    // partial holds groups*oc floats (grid.y = groups, columns < oc), dout n*oc elements (checked); the kernel
    // stops at row n.
    launch_kernel!(
        dev,
        BIAS,
        T::pick(["bias_backward_partial_f32", "bias_backward_partial_bf16"]),
        cfg,
        [&mut partial, dout, &n32, &oc32, &rows32]
    )?;
    let Some(cfg) = grid_1d(OP, oc as u64, REDUCE_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: bias_backward_finish_{f32,bf16}(T* dbias, const float* partial, u32 groups, u32 oc); dbias holds oc
    // elements (checked) and partial groups*oc floats, all written by the previous launch on this stream.
    launch_kernel!(
        dev,
        BIAS,
        T::pick(["bias_backward_finish_f32", "bias_backward_finish_bf16"]),
        cfg,
        [dbias, &partial, &groups32, &oc32]
    )
}
