//! Launchers of the element-wise kernels: GELU (`gelu.cu`), residual add and the backend helpers `dst += src`,
//! `buf *= alpha` (`residual.cu`), and the fp32 ↔ bf16 casts (`cast.cu`).

use cudarc::driver::{CudaSlice, LaunchConfig};
use half::bf16;

use super::device::{elementwise_cfg, launch_kernel, Device, Elem, BLOCK_1D};
use super::error::{check_len, Result};
use super::registry::{CAST, GELU, RESIDUAL};

/// `out = gelu(inp)` (tanh form).
pub fn gelu_forward<T: Elem>(dev: &Device, out: &mut CudaSlice<T>, inp: &CudaSlice<T>) -> Result<()> {
    const OP: &str = "gelu_forward";
    check_len(OP, "inp", inp.len(), out.len())?;
    let n = out.len() as u64;
    let Some(cfg) = elementwise_cfg::<T>(OP, out.len())? else {
        return Ok(());
    };
    // SAFETY: gelu_forward_{f32,bf16}(T* out, const T* inp, u64 n) — three arguments in this order with T matching
    // the slices' element type; both buffers hold n elements (checked) and the kernel indexes below n only.
    launch_kernel!(
        dev,
        GELU,
        T::pick(["gelu_forward_f32", "gelu_forward_bf16"]),
        cfg,
        [out, inp, &n]
    )
}

/// `dinp += gelu'(inp) · dout`.
pub fn gelu_backward<T: Elem>(
    dev: &Device,
    dinp: &mut CudaSlice<T>,
    inp: &CudaSlice<T>,
    dout: &CudaSlice<T>,
) -> Result<()> {
    const OP: &str = "gelu_backward";
    check_len(OP, "inp", inp.len(), dinp.len())?;
    check_len(OP, "dout", dout.len(), dinp.len())?;
    let n = dinp.len() as u64;
    let Some(cfg) = elementwise_cfg::<T>(OP, dinp.len())? else {
        return Ok(());
    };
    // SAFETY: gelu_backward_{f32,bf16}(T* dinp, const T* inp, const T* dout, u64 n); all three buffers hold n
    // elements (checked) and the kernel indexes below n only.
    launch_kernel!(
        dev,
        GELU,
        T::pick(["gelu_backward_f32", "gelu_backward_bf16"]),
        cfg,
        [dinp, inp, dout, &n]
    )
}

/// `out = a + b`.
pub fn residual_forward<T: Elem>(
    dev: &Device,
    out: &mut CudaSlice<T>,
    a: &CudaSlice<T>,
    b: &CudaSlice<T>,
) -> Result<()> {
    const OP: &str = "residual_forward";
    check_len(OP, "a", a.len(), out.len())?;
    check_len(OP, "b", b.len(), out.len())?;
    let n = out.len() as u64;
    let Some(cfg) = elementwise_cfg::<T>(OP, out.len())? else {
        return Ok(());
    };
    // SAFETY: residual_forward_{f32,bf16}(T* out, const T* a, const T* b, u64 n); all buffers hold n elements
    // (checked) and the kernel indexes below n only.
    launch_kernel!(
        dev,
        RESIDUAL,
        T::pick(["residual_forward_f32", "residual_forward_bf16"]),
        cfg,
        [out, a, b, &n]
    )
}

/// `dst += src`.
pub fn add_assign<T: Elem>(dev: &Device, dst: &mut CudaSlice<T>, src: &CudaSlice<T>) -> Result<()> {
    const OP: &str = "add_assign";
    check_len(OP, "src", src.len(), dst.len())?;
    let n = dst.len() as u64;
    let Some(cfg) = elementwise_cfg::<T>(OP, dst.len())? else {
        return Ok(());
    };
    // SAFETY: add_assign_{f32,bf16}(T* dst, const T* src, u64 n); both buffers hold n elements (checked).
    launch_kernel!(
        dev,
        RESIDUAL,
        T::pick(["add_assign_f32", "add_assign_bf16"]),
        cfg,
        [dst, src, &n]
    )
}

/// `buf *= alpha`.
pub fn scale<T: Elem>(dev: &Device, buf: &mut CudaSlice<T>, alpha: f32) -> Result<()> {
    let n = buf.len() as u64;
    let Some(cfg) = elementwise_cfg::<T>("scale", buf.len())? else {
        return Ok(());
    };
    // SAFETY: scale_{f32,bf16}(T* buf, float alpha, u64 n); the buffer holds n elements.
    launch_kernel!(
        dev,
        RESIDUAL,
        T::pick(["scale_f32", "scale_bf16"]),
        cfg,
        [buf, &alpha, &n]
    )
}

/// Blocks of [`slow_fill_f32`]: enough to cover a large buffer in a few grid-stride rounds.
const SLOW_FILL_BLOCKS_MAX: u64 = 1024;

/// Test helper: after spinning `cycles` SM clock cycles (≈ `cycles` / 1.9e9 s on an H200), writes `value` to every
/// element of `buf`. Used to show that a consumer on another stream waits for the producer's last write.
pub fn slow_fill_f32(dev: &Device, buf: &mut CudaSlice<f32>, value: f32, cycles: u64) -> Result<()> {
    let n = buf.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let blocks = n.div_ceil(u64::from(BLOCK_1D)).min(SLOW_FILL_BLOCKS_MAX) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK_1D, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: slow_fill_f32(float* buf, float value, u64 n, u64 cycles); buf holds n elements and the kernel's
    // grid-stride loop writes indices < n only.
    launch_kernel!(dev, RESIDUAL, "slow_fill_f32", cfg, [buf, &value, &n, &cycles])
}

/// `out = bf16(inp)` (round to nearest even).
pub fn cast_f32_to_bf16(dev: &Device, out: &mut CudaSlice<bf16>, inp: &CudaSlice<f32>) -> Result<()> {
    const OP: &str = "cast_f32_to_bf16";
    check_len(OP, "inp", inp.len(), out.len())?;
    let n = out.len() as u64;
    let Some(cfg) = elementwise_cfg::<bf16>(OP, out.len())? else {
        return Ok(());
    };
    // SAFETY: cast_f32_to_bf16(bf16* out, const float* inp, u64 n); both buffers hold n elements (checked); the
    // kernel's 8-element packs use the bf16 pack count that elementwise_cfg::<bf16> counts threads by.
    launch_kernel!(dev, CAST, "cast_f32_to_bf16", cfg, [out, inp, &n])
}

/// `out = f32(inp)` (exact).
pub fn cast_bf16_to_f32(dev: &Device, out: &mut CudaSlice<f32>, inp: &CudaSlice<bf16>) -> Result<()> {
    const OP: &str = "cast_bf16_to_f32";
    check_len(OP, "inp", inp.len(), out.len())?;
    let n = out.len() as u64;
    let Some(cfg) = elementwise_cfg::<bf16>(OP, out.len())? else {
        return Ok(());
    };
    // SAFETY: cast_bf16_to_f32(float* out, const bf16* inp, u64 n); both buffers hold n elements (checked).
    launch_kernel!(dev, CAST, "cast_bf16_to_f32", cfg, [out, inp, &n])
}
