//! Launchers of `attention.cu`: the element-wise pieces of the simple attention path (qkv permute, causal
//! softmax, unpermute, and their backwards). The batched matrix products between them are the caller's (cuBLAS).
//! Shapes: `qkv` (b, t, 3, nh, hs); `q`, `k`, `v`, `y` (b, nh, t, hs); `preatt`, `att` (b, nh, t, t);
//! `out` (b, t, nh, hs).

use cudarc::driver::CudaSlice;

use super::device::{dim_u32, grid_1d, launch_kernel, pack_len, Device, Elem};
use super::error::{check_len, CudaError, Result};
use super::registry::ATTENTION;

/// Threads per block (`ATTENTION_BLOCK`); the softmaxes put one warp on a row, 8 rows per block.
const ATTENTION_BLOCK: u32 = 256;

/// The (b, t, nh, hs) shape of an attention op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch.
    pub b: usize,
    /// Sequence length.
    pub t: usize,
    /// Heads.
    pub nh: usize,
    /// Head size.
    pub hs: usize,
}

impl AttentionShape {
    /// Elements of one (b, nh, t, hs) tensor.
    pub fn head_elems(&self) -> usize {
        self.b * self.nh * self.t * self.hs
    }

    /// Elements of one (b, nh, t, t) tensor.
    pub fn score_elems(&self) -> usize {
        self.b * self.nh * self.t * self.t
    }

    fn dims(&self, op: &'static str) -> Result<[u32; 4]> {
        if self.hs == 0 || self.nh == 0 {
            return Err(CudaError::shape(op, "nh and hs must be positive"));
        }
        dim_u32(op, "b*nh*t*hs", self.head_elems())?;
        Ok([
            dim_u32(op, "b", self.b)?,
            dim_u32(op, "t", self.t)?,
            dim_u32(op, "nh", self.nh)?,
            dim_u32(op, "hs", self.hs)?,
        ])
    }

    fn unit_threads<T>(&self) -> u64 {
        let unit = if self.hs % pack_len::<T>() == 0 {
            pack_len::<T>()
        } else {
            1
        };
        (self.head_elems() / unit) as u64
    }
}

/// `qkv (b, t, 3, nh, hs)` → `q`, `k`, `v` (b, nh, t, hs).
pub fn attention_permute<T: Elem>(
    dev: &Device,
    q: &mut CudaSlice<T>,
    k: &mut CudaSlice<T>,
    v: &mut CudaSlice<T>,
    qkv: &CudaSlice<T>,
    s: AttentionShape,
) -> Result<()> {
    const OP: &str = "attention_permute";
    let [b, t, nh, hs] = s.dims(OP)?;
    for (what, len) in [("q", q.len()), ("k", k.len()), ("v", v.len())] {
        check_len(OP, what, len, s.head_elems())?;
    }
    check_len(OP, "qkv", qkv.len(), 3 * s.head_elems())?;
    let Some(cfg) = grid_1d(OP, s.unit_threads::<T>(), ATTENTION_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: attention_permute_{f32,bf16}(T* q, T* k, T* v, const T* qkv, u32 b, u32 t, u32 nh, u32 hs); q, k, v
    // hold b*nh*t*hs and qkv three times that (checked); the kernel's unit matches unit_threads and it stops there.
    launch_kernel!(
        dev,
        ATTENTION,
        T::pick(["attention_permute_f32", "attention_permute_bf16"]),
        cfg,
        [q, k, v, qkv, &b, &t, &nh, &hs]
    )
}

/// `dqkv += permuteᵀ(dq, dk, dv)`.
pub fn attention_permute_backward<T: Elem>(
    dev: &Device,
    dqkv: &mut CudaSlice<T>,
    dq: &CudaSlice<T>,
    dk: &CudaSlice<T>,
    dv: &CudaSlice<T>,
    s: AttentionShape,
) -> Result<()> {
    const OP: &str = "attention_permute_backward";
    let [b, t, nh, hs] = s.dims(OP)?;
    for (what, len) in [("dq", dq.len()), ("dk", dk.len()), ("dv", dv.len())] {
        check_len(OP, what, len, s.head_elems())?;
    }
    check_len(OP, "dqkv", dqkv.len(), 3 * s.head_elems())?;
    let Some(cfg) = grid_1d(OP, s.unit_threads::<T>(), ATTENTION_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: attention_permute_backward_{f32,bf16}(T* dqkv, const T* dq, const T* dk, const T* dv, u32 b, u32 t,
    // u32 nh, u32 hs); lengths checked above, as for attention_permute.
    launch_kernel!(
        dev,
        ATTENTION,
        T::pick(["attention_permute_backward_f32", "attention_permute_backward_bf16"]),
        cfg,
        [dqkv, dq, dk, dv, &b, &t, &nh, &hs]
    )
}

/// `y (b, nh, t, hs)` → `out (b, t, nh, hs)`.
pub fn attention_unpermute<T: Elem>(
    dev: &Device,
    out: &mut CudaSlice<T>,
    y: &CudaSlice<T>,
    s: AttentionShape,
) -> Result<()> {
    const OP: &str = "attention_unpermute";
    let [b, t, nh, hs] = s.dims(OP)?;
    check_len(OP, "out", out.len(), s.head_elems())?;
    check_len(OP, "y", y.len(), s.head_elems())?;
    let Some(cfg) = grid_1d(OP, s.unit_threads::<T>(), ATTENTION_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: attention_unpermute_{f32,bf16}(T* out, const T* y, u32 b, u32 t, u32 nh, u32 hs); both hold
    // b*nh*t*hs elements (checked).
    launch_kernel!(
        dev,
        ATTENTION,
        T::pick(["attention_unpermute_f32", "attention_unpermute_bf16"]),
        cfg,
        [out, y, &b, &t, &nh, &hs]
    )
}

/// `dout (b, t, nh, hs)` → `dy (b, nh, t, hs)` (overwrites `dy`).
pub fn attention_unpermute_backward<T: Elem>(
    dev: &Device,
    dy: &mut CudaSlice<T>,
    dout: &CudaSlice<T>,
    s: AttentionShape,
) -> Result<()> {
    const OP: &str = "attention_unpermute_backward";
    let [b, t, nh, hs] = s.dims(OP)?;
    check_len(OP, "dy", dy.len(), s.head_elems())?;
    check_len(OP, "dout", dout.len(), s.head_elems())?;
    let Some(cfg) = grid_1d(OP, s.unit_threads::<T>(), ATTENTION_BLOCK)? else {
        return Ok(());
    };
    // SAFETY: attention_unpermute_backward_{f32,bf16}(T* dy, const T* dout, u32 b, u32 t, u32 nh, u32 hs); both
    // hold b*nh*t*hs elements (checked).
    launch_kernel!(
        dev,
        ATTENTION,
        T::pick(["attention_unpermute_backward_f32", "attention_unpermute_backward_bf16"]),
        cfg,
        [dy, dout, &b, &t, &nh, &hs]
    )
}

fn softmax_cfg(op: &'static str, rows: usize) -> Result<Option<cudarc::driver::LaunchConfig>> {
    grid_1d(op, rows as u64 * 32, ATTENTION_BLOCK)
}

/// `att[r, s] = softmax_{s ≤ t}(scale · preatt[r, s])`, zero above the diagonal; `rows` = b·nh·t rows of `t`.
pub fn causal_softmax_forward<T: Elem>(
    dev: &Device,
    att: &mut CudaSlice<T>,
    preatt: &CudaSlice<T>,
    scale: f32,
    rows: usize,
    t: usize,
) -> Result<()> {
    const OP: &str = "causal_softmax_forward";
    if t == 0 || rows % t != 0 {
        return Err(CudaError::shape(
            OP,
            format!("rows ({rows}) must be a multiple of t ({t}), t > 0"),
        ));
    }
    check_len(OP, "att", att.len(), rows * t)?;
    check_len(OP, "preatt", preatt.len(), rows * t)?;
    let (rows32, t32) = (dim_u32(OP, "rows", rows)?, dim_u32(OP, "t", t)?);
    let Some(cfg) = softmax_cfg(OP, rows)? else {
        return Ok(());
    };
    // SAFETY: causal_softmax_forward_{f32,bf16}(T* att, const T* preatt, float scale, u32 rows, u32 t); both hold
    // rows*t elements (checked); warps past the last row return.
    launch_kernel!(
        dev,
        ATTENTION,
        T::pick(["causal_softmax_forward_f32", "causal_softmax_forward_bf16"]),
        cfg,
        [att, preatt, &scale, &rows32, &t32]
    )
}

/// `dpreatt[r, s] = scale · att[r, s] · (datt[r, s] − Σ_{s'} att[r, s'] datt[r, s'])` for s ≤ t, else 0
/// (overwrites `dpreatt`).
pub fn causal_softmax_backward<T: Elem>(
    dev: &Device,
    dpreatt: &mut CudaSlice<T>,
    datt: &CudaSlice<T>,
    att: &CudaSlice<T>,
    scale: f32,
    rows: usize,
    t: usize,
) -> Result<()> {
    const OP: &str = "causal_softmax_backward";
    if t == 0 || rows % t != 0 {
        return Err(CudaError::shape(
            OP,
            format!("rows ({rows}) must be a multiple of t ({t}), t > 0"),
        ));
    }
    check_len(OP, "dpreatt", dpreatt.len(), rows * t)?;
    check_len(OP, "datt", datt.len(), rows * t)?;
    check_len(OP, "att", att.len(), rows * t)?;
    let (rows32, t32) = (dim_u32(OP, "rows", rows)?, dim_u32(OP, "t", t)?);
    let Some(cfg) = softmax_cfg(OP, rows)? else {
        return Ok(());
    };
    // SAFETY: causal_softmax_backward_{f32,bf16}(T* dpreatt, const T* datt, const T* att, float scale, u32 rows,
    // u32 t); all hold rows*t elements (checked); warps past the last row return.
    launch_kernel!(
        dev,
        ATTENTION,
        T::pick(["causal_softmax_backward_f32", "causal_softmax_backward_bf16"]),
        cfg,
        [dpreatt, datt, att, &scale, &rows32, &t32]
    )
}
