//! The device's measured bf16 matrix-product rate: what MFU is reported against. A square cuBLASLt bf16 GEMM
//! (fp32 accumulation) on pseudo-random data (zeros run faster and would flatter the ceiling), timed with CUDA
//! events after warm-up runs; the median of the timed runs.

use cudarc::driver::sys::CUevent_flags;
use half::bf16;

use super::blaslt::Blaslt;
use super::gemm::gemm_flops;
use super::{CudaError, Device, Result};

/// Side of the square GEMM [`measure_bf16_gemm_tflops`] times by default (8192³: large enough to reach the
/// device's sustained rate; 2.2 TFLOP per run).
pub const PEAK_GEMM_SIDE: usize = 8192;
/// Untimed runs before timing (cuBLASLt heuristics, clocks ramping up).
const WARMUP: usize = 3;
/// Elements of the host-generated pseudo-random chunk, tiled on the device.
const SEED_ELEMS: usize = 1 << 20;

/// TFLOP/s of an `n`³ cuBLASLt bf16 GEMM on `dev`'s stream: the median of `reps` event-timed runs after a few
/// untimed ones. Waits for the device. Allocates three `n × n` bf16 matrices for the duration (384 MiB at the
/// default side).
///
/// # Errors
/// Shape errors for `n` or `reps` of 0; the driver's or cuBLASLt's errors otherwise.
pub fn measure_bf16_gemm_tflops(dev: &Device, n: usize, reps: usize) -> Result<f64> {
    if n == 0 || reps == 0 {
        return Err(CudaError::shape(
            "measure_bf16_gemm_tflops",
            format!("n = {n}, reps = {reps}"),
        ));
    }
    let driver = |what: &'static str| move |e| CudaError::driver(what, e);
    // A fixed xorshift sequence in [-1, 1): reproducible, far from zero.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let seed: Vec<bf16> = (0..SEED_ELEMS.min(n * n))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bf16::from_f32((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect();
    let seed = dev.upload(&seed)?;
    let mut a = dev.zeros::<bf16>(n * n)?;
    let mut at = 0;
    while at < n * n {
        let len = seed.len().min(n * n - at);
        let mut dst = a.slice_mut(at..at + len);
        dev.stream()
            .memcpy_dtod(&seed.slice(0..len), &mut dst)
            .map_err(driver("tiling the GEMM operand"))?;
        at += len;
    }
    let b = dev
        .stream()
        .clone_dtod(&a)
        .map_err(driver("copying the GEMM operand"))?;
    let mut out = dev.zeros::<bf16>(n * n)?;
    let lt = Blaslt::new(dev)?;
    let mut run = || lt.matmul_forward(&mut out, None, &a, &b, None, false, n, n, n);
    for _ in 0..WARMUP {
        run()?;
    }
    let ctx = dev.context();
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver("timing event"))?;
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver("timing event"))?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps {
        start.record(dev.stream()).map_err(driver("recording a timing event"))?;
        run()?;
        end.record(dev.stream()).map_err(driver("recording a timing event"))?;
        ms.push(f64::from(start.elapsed_ms(&end).map_err(driver("cuEventElapsedTime"))?));
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    if median <= 0.0 {
        return Err(CudaError::shape(
            "measure_bf16_gemm_tflops",
            format!("timed {median} ms"),
        ));
    }
    Ok(gemm_flops(n, n, n) / (median * 1e-3) / 1e12)
}
