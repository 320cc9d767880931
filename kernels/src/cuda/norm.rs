//! Launchers of `norm.cu`: deterministic two-pass fp64 sums (sum, sum of squares, the global gradient norm).

use cudarc::driver::{CudaSlice, CudaViewMut, LaunchConfig};

use super::device::{launch_kernel, Device, Elem};
use super::error::{CudaError, Result};
use super::registry::NORM;

/// Blocks of the first pass (`NORM_BLOCKS`): fixed, so the summation order depends on `n` only.
pub const NORM_BLOCKS: usize = 512;
/// Threads per block of both passes (`NORM_THREADS`).
const NORM_THREADS: u32 = 512;

fn reduce_into<T: Elem>(dev: &Device, x: &CudaSlice<T>, square: bool, out: &mut CudaViewMut<'_, f64>) -> Result<()> {
    const OP: &str = "sum_reduce";
    if out.len() != 1 {
        return Err(CudaError::shape(
            OP,
            format!("out holds {} elements, expected 1", out.len()),
        ));
    }
    let mut partial = dev.zeros::<f64>(NORM_BLOCKS)?;
    let n = x.len() as u64;
    let cfg = LaunchConfig {
        grid_dim: (NORM_BLOCKS as u32, 1, 1),
        block_dim: (NORM_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let kernel = if square {
        T::pick(["sum_squares_partial_f32", "sum_squares_partial_bf16"])
    } else {
        T::pick(["sum_partial_f32", "sum_partial_bf16"])
    };
    // SAFETY: {sum,sum_squares}_partial_{f32,bf16}(double* partial, const T* x, u64 n); partial holds NORM_BLOCKS
    // doubles = grid.x (one per block), x holds n elements and the kernel reads indices < n only.
    launch_kernel!(dev, NORM, kernel, cfg, [&mut partial, x, &n])?;
    let finish = LaunchConfig {
        grid_dim: (1, 1, 1),
        ..cfg
    };
    // SAFETY: sum_finish(double* out, const double* partial); out is a 1-element view (checked), partial holds the
    // NORM_BLOCKS doubles the kernel reads, written by the launch above on this stream.
    launch_kernel!(dev, NORM, "sum_finish", finish, [out, &partial])
}

/// Writes `Σ x²` (fp64, deterministic order) to the one-element `out`, without synchronising.
pub fn sum_squares_into<T: Elem>(dev: &Device, x: &CudaSlice<T>, out: &mut CudaViewMut<'_, f64>) -> Result<()> {
    reduce_into(dev, x, true, out)
}

/// `Σ x²` in fp64, deterministic order (waits for the result).
pub fn sum_squares<T: Elem>(dev: &Device, x: &CudaSlice<T>) -> Result<f64> {
    let mut out = dev.zeros::<f64>(1)?;
    reduce_into(dev, x, true, &mut out.as_view_mut())?;
    Ok(dev.download(&out)?[0])
}

/// `Σ x` in fp64, deterministic order (waits for the result). A NaN in `x` makes the sum NaN.
pub fn sum<T: Elem>(dev: &Device, x: &CudaSlice<T>) -> Result<f64> {
    let mut out = dev.zeros::<f64>(1)?;
    reduce_into(dev, x, false, &mut out.as_view_mut())?;
    Ok(dev.download(&out)?[0])
}

/// The global L2 norm of several tensors: per-tensor fp64 sums of squares on the device, read back once and
/// added on the host in the given order. Deterministic.
pub fn global_norm<T: Elem>(dev: &Device, tensors: &[&CudaSlice<T>]) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let mut sums = dev.zeros::<f64>(tensors.len())?;
    for (i, x) in tensors.iter().enumerate() {
        let mut slot = sums.slice_mut(i..i + 1);
        reduce_into(dev, x, true, &mut slot)?;
    }
    Ok(dev.download(&sums)?.iter().sum::<f64>().sqrt())
}
