//! Launchers of `layernorm.cu`: layer norm forward (plain and fused with the residual add), input backward, and
//! the deterministic two-pass weight backward. `mean` and `rstd` are fp32 for every element type.

use cudarc::driver::CudaSlice;

use super::bias::{reduce_cfg, reduce_groups, REDUCE_BLOCK};
use super::device::{dim_u32, grid_1d, launch_kernel, Device, Elem};
use super::error::{check_len, CudaError, Result};
use super::registry::LAYERNORM;

/// Threads per block of the row kernels (`LN_BLOCK`): one warp per row, 8 rows per block.
const LN_BLOCK: u32 = 256;
/// Rows per block of the row kernels.
const LN_ROWS_PER_BLOCK: u64 = (LN_BLOCK / 32) as u64;

/// One warp per row: grid.x = ceil(n / 8) blocks of 256 threads.
fn row_cfg(op: &'static str, n: usize) -> Result<Option<cudarc::driver::LaunchConfig>> {
    let cfg = grid_1d(op, n as u64 * 32, LN_BLOCK)?;
    assert!(cfg.is_none_or(|c| u64::from(c.grid_dim.0) * LN_ROWS_PER_BLOCK >= n as u64));
    Ok(cfg)
}

fn check_c(op: &'static str, c: usize) -> Result<u32> {
    if c == 0 {
        return Err(CudaError::shape(op, "c must be positive"));
    }
    dim_u32(op, "c", c)
}

/// `out = layernorm(inp) · weight + bias` over rows of width `c`; stashes `mean`, `rstd` (n each).
#[allow(clippy::too_many_arguments)] // typed buffers + the (n, c) shape
pub fn layernorm_forward<T: Elem>(
    dev: &Device,
    out: &mut CudaSlice<T>,
    mean: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
    inp: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: &CudaSlice<T>,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_forward";
    let c32 = check_c(OP, c)?;
    let n32 = dim_u32(OP, "n", n)?;
    check_len(OP, "out", out.len(), n * c)?;
    check_len(OP, "inp", inp.len(), n * c)?;
    check_len(OP, "weight", weight.len(), c)?;
    check_len(OP, "bias", bias.len(), c)?;
    check_len(OP, "mean", mean.len(), n)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    let Some(cfg) = row_cfg(OP, n)? else {
        return Ok(());
    };
    // SAFETY: layernorm_forward_{f32,bf16}(T* out, float* mean, float* rstd, const T* inp, const T* weight,
    // const T* bias, u32 n, u32 c); every buffer has the length checked above; warps past row n return.
    launch_kernel!(
        dev,
        LAYERNORM,
        T::pick(["layernorm_forward_f32", "layernorm_forward_bf16"]),
        cfg,
        [out, mean, rstd, inp, weight, bias, &n32, &c32]
    )
}

/// Fused residual + layer norm: `resid_out = a + b`, then `out = layernorm(resid_out)` (stats as in
/// [`layernorm_forward`]), one pass over the inputs.
#[allow(clippy::too_many_arguments)] // typed buffers + the (n, c) shape
pub fn residual_layernorm_forward<T: Elem>(
    dev: &Device,
    resid_out: &mut CudaSlice<T>,
    out: &mut CudaSlice<T>,
    mean: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    bias: &CudaSlice<T>,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "residual_layernorm_forward";
    let c32 = check_c(OP, c)?;
    let n32 = dim_u32(OP, "n", n)?;
    for (what, len) in [
        ("resid_out", resid_out.len()),
        ("out", out.len()),
        ("a", a.len()),
        ("b", b.len()),
    ] {
        check_len(OP, what, len, n * c)?;
    }
    check_len(OP, "weight", weight.len(), c)?;
    check_len(OP, "bias", bias.len(), c)?;
    check_len(OP, "mean", mean.len(), n)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    let Some(cfg) = row_cfg(OP, n)? else {
        return Ok(());
    };
    // SAFETY: residual_layernorm_forward_{f32,bf16}(T* resid_out, T* out, float* mean, float* rstd, const T* a,
    // const T* b, const T* weight, const T* bias, u32 n, u32 c); lengths checked above; warps past row n return.
    launch_kernel!(
        dev,
        LAYERNORM,
        T::pick(["residual_layernorm_forward_f32", "residual_layernorm_forward_bf16"]),
        cfg,
        [resid_out, out, mean, rstd, a, b, weight, bias, &n32, &c32]
    )
}

/// `dinp += ∂L/∂inp` of a layer norm.
#[allow(clippy::too_many_arguments)] // typed buffers + the (n, c) shape
pub fn layernorm_backward_input<T: Elem>(
    dev: &Device,
    dinp: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    inp: &CudaSlice<T>,
    weight: &CudaSlice<T>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_backward_input";
    let c32 = check_c(OP, c)?;
    let n32 = dim_u32(OP, "n", n)?;
    check_len(OP, "dinp", dinp.len(), n * c)?;
    check_len(OP, "dout", dout.len(), n * c)?;
    check_len(OP, "inp", inp.len(), n * c)?;
    check_len(OP, "weight", weight.len(), c)?;
    check_len(OP, "mean", mean.len(), n)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    let Some(cfg) = row_cfg(OP, n)? else {
        return Ok(());
    };
    // SAFETY: layernorm_backward_input_{f32,bf16}(T* dinp, const T* dout, const T* inp, const T* weight,
    // const float* mean, const float* rstd, u32 n, u32 c); lengths checked above; warps past row n return.
    launch_kernel!(
        dev,
        LAYERNORM,
        T::pick(["layernorm_backward_input_f32", "layernorm_backward_input_bf16"]),
        cfg,
        [dinp, dout, inp, weight, mean, rstd, &n32, &c32]
    )
}

/// `dweight += Σ dout · x̂`, `dbias += Σ dout` over the rows, deterministic: fp32 partials per row group (a
/// function of `n` only), then one ordered sum per channel.
#[allow(clippy::too_many_arguments)] // typed buffers + the (n, c) shape
pub fn layernorm_backward_weight<T: Elem>(
    dev: &Device,
    dweight: &mut CudaSlice<T>,
    dbias: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    inp: &CudaSlice<T>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    n: usize,
    c: usize,
) -> Result<()> {
    const OP: &str = "layernorm_backward_weight";
    let c32 = check_c(OP, c)?;
    let n32 = dim_u32(OP, "n", n)?;
    check_len(OP, "dweight", dweight.len(), c)?;
    check_len(OP, "dbias", dbias.len(), c)?;
    check_len(OP, "dout", dout.len(), n * c)?;
    check_len(OP, "inp", inp.len(), n * c)?;
    check_len(OP, "mean", mean.len(), n)?;
    check_len(OP, "rstd", rstd.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let (rows, groups) = reduce_groups(n);
    let (rows32, groups32) = (dim_u32(OP, "rows", rows)?, dim_u32(OP, "groups", groups)?);
    let mut partial = dev.zeros::<f32>(groups * 2 * c)?;
    let cfg = reduce_cfg(OP, c, groups)?;
    // SAFETY: layernorm_backward_weight_partial_{f32,bf16}(float* partial, const T* dout, const T* inp,
    // const float* mean, const float* rstd, u32 n, u32 c, u32 rows_per_group); partial holds groups*2*c floats
    // (grid.y = groups, channels < c), the inputs have the lengths checked above, rows stop at n.
    launch_kernel!(
        dev,
        LAYERNORM,
        T::pick([
            "layernorm_backward_weight_partial_f32",
            "layernorm_backward_weight_partial_bf16"
        ]),
        cfg,
        [&mut partial, dout, inp, mean, rstd, &n32, &c32, &rows32]
    )?;
    let Some(cfg) = grid_1d(OP, c as u64, REDUCE_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: layernorm_backward_weight_finish_{f32,bf16}(T* dweight, T* dbias, const float* partial, u32 groups,
    // u32 c); dweight and dbias hold c elements, partial groups*2*c floats written by the launch above.
    launch_kernel!(
        dev,
        LAYERNORM,
        T::pick([
            "layernorm_backward_weight_finish_f32",
            "layernorm_backward_weight_finish_bf16"
        ]),
        cfg,
        [dweight, dbias, &partial, &groups32, &c32]
    )
}
