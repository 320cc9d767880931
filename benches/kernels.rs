//! GPU kernel benches: the compute-bound kernels (fused flash attention, the hand-written tensor-core GEMM,
//! cuBLASLt products) at GPT-2 124M shapes (B = 16..64, T = 1024, C = 768, 12 heads) and a larger size,
//! against two ceilings measured first on the same device: a large device-to-device copy (bandwidth, bytes
//! read + written) and a large cuBLASLt bf16 GEMM (TFLOP/s).
//!
//! Timing: CUDA events around the work, synchronised inside criterion's `iter_custom`; every input set is
//! larger than the H200's 60 MB L2 (the smallest GEMM case moves ~130 MB), so no repetition is served from
//! cache. Besides criterion's report, each case prints one machine-readable line that
//! `scripts/gpu-check.sh` collects into its final table:
//!
//! `SUMMARY kernel=<name> shape=<dims> time_us=<median> tflops=<x> gbs=<y> pct_ceiling=<z>`
//!
//! (`tflops` / `gbs` are `-` when they do not apply; `pct_ceiling` is against the TFLOP/s ceiling for
//! compute-bound cases and the copy bandwidth for the copy). Without a CUDA device (CI, `cargo test
//! --all-targets`) it prints why and exits successfully without touching a GPU.

use std::sync::Arc;
use std::time::Duration;

use baton_kernels::cuda::blaslt::{Accumulate, Blaslt};
use baton_kernels::cuda::cudarc::driver::{sys::CUevent_flags, CudaSlice, CudaStream};
use baton_kernels::cuda::flash_attention::{flash_attention_backward, flash_attention_forward, AttentionDims};
use baton_kernels::cuda::gemm::{gemm_flops, gemm_forward};
use baton_kernels::cuda::{Device, Result};
use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;

/// Repetitions of the SUMMARY timing (median), after [`WARMUP_REPS`] untimed ones.
const SUMMARY_REPS: usize = 20;
/// Untimed runs before timing: module load, NVRTC (cached), cuBLASLt heuristics.
const WARMUP_REPS: usize = 3;
/// Elements of the random host chunk that seeds every device buffer (tiled on the device).
const SEED_CHUNK_ELEMS: usize = 1 << 22;
/// Bytes of each buffer of the copy ceiling (read 1 GiB, write 1 GiB).
const COPY_BYTES: usize = 1 << 30;
/// Side of the cuBLASLt GEMM that measures the TFLOP/s ceiling.
const CEILING_GEMM: usize = 8192;

/// Everything a case needs: the device, the cuBLASLt handle and the measured ceilings.
struct Bench {
    dev: Device,
    lt: Blaslt,
    seed: CudaSlice<bf16>,
    /// Measured TFLOP/s of the ceiling GEMM (0 until measured).
    tflops_ceiling: f64,
    /// Measured GB/s of the copy (0 until measured).
    gbs_ceiling: f64,
    /// Whether SUMMARY timing runs (not in criterion's test mode).
    summarise: bool,
}

impl Bench {
    fn stream(&self) -> &Arc<CudaStream> {
        self.dev.stream()
    }

    /// A bf16 buffer of `n` random normal values (a host chunk tiled on the device).
    fn random(&self, n: usize) -> Result<CudaSlice<bf16>> {
        let mut buf = self.dev.zeros::<bf16>(n)?;
        let chunk = self.seed.len();
        let mut at = 0;
        while at < n {
            let len = chunk.min(n - at);
            let mut dst = buf.slice_mut(at..at + len);
            self.stream()
                .memcpy_dtod(&self.seed.slice(0..len), &mut dst)
                .map_err(|e| baton_kernels::cuda::CudaError::driver("tiling random data", e))?;
            at += len;
        }
        Ok(buf)
    }

    /// Median milliseconds of `work` over [`SUMMARY_REPS`] event-timed runs.
    fn median_ms(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..WARMUP_REPS {
            work()?;
        }
        let mut times = Vec::with_capacity(SUMMARY_REPS);
        for _ in 0..SUMMARY_REPS {
            times.push(self.time_ms(1, work)?);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }

    /// Event-timed milliseconds of `iters` back-to-back runs of `work` (synchronised before returning).
    fn time_ms(&self, iters: u64, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let ctx = self.dev.context();
        let driver = |e| baton_kernels::cuda::CudaError::driver("timing events", e);
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
        start.record(self.stream()).map_err(driver)?;
        for _ in 0..iters {
            work()?;
        }
        end.record(self.stream()).map_err(driver)?;
        self.dev.synchronize()?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(driver)?))
    }

    /// Registers `work` with criterion and, outside test mode, prints its SUMMARY line. `flops` and `bytes`
    /// are the work of one run (0 when not counted). Returns the median microseconds (0 in test mode).
    fn case(
        &self,
        c: &mut Criterion,
        kernel: &str,
        shape: &str,
        flops: f64,
        bytes: f64,
        work: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        let mut group = c.benchmark_group(kernel);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1));
        if flops > 0.0 {
            group.throughput(Throughput::Elements(flops as u64));
        } else {
            group.throughput(Throughput::Bytes(bytes as u64));
        }
        let mut failure = None;
        group.bench_function(BenchmarkId::from_parameter(shape), |b| {
            b.iter_custom(|iters| match self.time_ms(iters, work) {
                Ok(ms) => Duration::from_secs_f64(ms / 1e3),
                Err(e) => {
                    failure.get_or_insert(e);
                    Duration::from_secs(1)
                }
            })
        });
        group.finish();
        if let Some(e) = failure {
            return Err(e);
        }
        if !self.summarise {
            return Ok(0.0);
        }
        let ms = self.median_ms(work)?;
        let secs = ms / 1e3;
        let tflops = (flops > 0.0).then(|| flops / secs / 1e12);
        let gbs = (bytes > 0.0).then(|| bytes / secs / 1e9);
        let pct = match (tflops, gbs) {
            (Some(t), _) if self.tflops_ceiling > 0.0 => format!("{:.1}", 100.0 * t / self.tflops_ceiling),
            (None, Some(g)) if self.gbs_ceiling > 0.0 => format!("{:.1}", 100.0 * g / self.gbs_ceiling),
            _ => "100.0".into(),
        };
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "SUMMARY kernel={kernel} shape={shape} time_us={:.1} tflops={} gbs={} pct_ceiling={pct}",
            ms * 1e3,
            fmt(tflops),
            fmt(gbs)
        );
        Ok(ms * 1e3)
    }
}

/// The two ceilings: a 1 GiB device-to-device copy and an 8192³ cuBLASLt bf16 GEMM.
fn ceilings(b: &mut Bench, c: &mut Criterion) -> Result<()> {
    let src = b.dev.zeros::<u8>(COPY_BYTES)?;
    let mut dst = b.dev.zeros::<u8>(COPY_BYTES)?;
    let stream = b.stream().clone();
    let mut copy = || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| baton_kernels::cuda::CudaError::driver("copy ceiling", e))
    };
    let us = b.case(c, "ceiling_copy", "1GiB", 0.0, 2.0 * COPY_BYTES as f64, &mut copy)?;
    if us > 0.0 {
        b.gbs_ceiling = 2.0 * COPY_BYTES as f64 / (us * 1e-6) / 1e9;
    }

    let n = CEILING_GEMM;
    let (x, w) = (b.random(n * n)?, b.random(n * n)?);
    let mut out = b.dev.zeros::<bf16>(n * n)?;
    let flops = gemm_flops(n, n, n);
    let lt = &b.lt;
    let mut gemm = || lt.matmul_forward(&mut out, None, &x, &w, None, false, n, n, n);
    let us = b.case(c, "ceiling_cublaslt_bf16", &format!("{n}^3"), flops, 0.0, &mut gemm)?;
    if us > 0.0 {
        b.tflops_ceiling = flops / (us * 1e-6) / 1e12;
    }
    Ok(())
}

/// Own GEMM against cuBLASLt at 4096³ and at GPT-2's MLP up-projection (N = B*T, C = 768 → OC = 3072,
/// bias + GELU, bf16 out).
fn gemms(b: &Bench, c: &mut Criterion) -> Result<()> {
    let mut shapes: Vec<(String, usize, usize, usize, bool)> = vec![("4096^3".into(), 4096, 4096, 4096, false)];
    for batch in [16, 64] {
        shapes.push((format!("fc_B{batch}_T1024_C768_OC3072"), batch * 1024, 768, 3072, true));
    }
    for (name, n, k, oc, fused) in shapes {
        let (x, w, bias) = (b.random(n * k)?, b.random(oc * k)?, b.random(oc)?);
        let mut out = b.dev.zeros::<bf16>(n * oc)?;
        let flops = gemm_flops(n, oc, k);
        let bias_opt = fused.then_some(&bias);
        let lt = &b.lt;
        let dev = &b.dev;
        let lt_us = {
            let mut run = || lt.matmul_forward(&mut out, None, &x, &w, bias_opt, fused, n, k, oc);
            b.case(c, "cublaslt_matmul_forward", &name, flops, 0.0, &mut run)?
        };
        let own_us = {
            let mut run = || gemm_forward(dev, &mut out, None, &x, &w, bias_opt, fused, n, k, oc);
            b.case(c, "own_gemm_forward", &name, flops, 0.0, &mut run)?
        };
        if own_us > 0.0 {
            println!(
                "SUMMARY kernel=own_gemm_vs_cublaslt shape={name} time_us={own_us:.1} tflops=- gbs=- pct_ceiling={:.1}",
                100.0 * lt_us / own_us
            );
        }
    }
    // The two backward products of the same layer at B = 16 (bf16, cuBLASLt).
    let (n, k, oc) = (16 * 1024, 768, 3072);
    let (x, w, dout) = (b.random(n * k)?, b.random(oc * k)?, b.random(n * oc)?);
    let (mut dx, mut dw, mut db) = (
        b.dev.zeros::<bf16>(n * k)?,
        b.dev.zeros::<bf16>(oc * k)?,
        b.dev.zeros::<bf16>(oc)?,
    );
    let flops = gemm_flops(n, oc, k);
    let lt = &b.lt;
    let mut run = || lt.matmul_backward_input(&mut dx, &dout, &w, None, Accumulate::Overwrite, n, k, oc);
    b.case(
        c,
        "cublaslt_matmul_backward_input",
        "fc_B16_T1024_C768_OC3072",
        flops,
        0.0,
        &mut run,
    )?;
    let mut run = || lt.matmul_backward_weight(&mut dw, Some(&mut db), &dout, &x, Accumulate::Add, n, k, oc);
    b.case(
        c,
        "cublaslt_matmul_backward_weight_bgradb",
        "fc_B16_T1024_C768_OC3072",
        flops,
        0.0,
        &mut run,
    )?;
    Ok(())
}

/// Fused flash attention forward, backward and both, causal, at GPT-2 shapes and a larger head size.
fn attention(b: &Bench, c: &mut Criterion) -> Result<()> {
    let cases = [
        AttentionDims {
            b: 16,
            nh: 12,
            t: 1024,
            hs: 64,
        },
        AttentionDims {
            b: 64,
            nh: 12,
            t: 1024,
            hs: 64,
        },
        AttentionDims {
            b: 8,
            nh: 16,
            t: 2048,
            hs: 128,
        },
    ];
    for d in cases {
        let shape = format!("B{}_NH{}_T{}_HS{}", d.b, d.nh, d.t, d.hs);
        let (q, k, v, dout) = (
            b.random(d.qkv_len())?,
            b.random(d.qkv_len())?,
            b.random(d.qkv_len())?,
            b.random(d.qkv_len())?,
        );
        let mut out = b.dev.zeros::<bf16>(d.qkv_len())?;
        let mut lse = b.dev.zeros::<f32>(d.rows_len())?;
        let (mut dq, mut dk, mut dv) = (
            b.dev.zeros::<bf16>(d.qkv_len())?,
            b.dev.zeros::<bf16>(d.qkv_len())?,
            b.dev.zeros::<bf16>(d.qkv_len())?,
        );
        let mut delta = b.dev.zeros::<f32>(d.rows_len())?;
        let dev = &b.dev;
        {
            let mut run = || flash_attention_forward(dev, &mut out, &mut lse, &q, &k, &v, d);
            b.case(c, "flash_attention_forward", &shape, d.forward_flops(), 0.0, &mut run)?;
        }
        {
            let mut run = || {
                flash_attention_backward(
                    dev, &mut dq, &mut dk, &mut dv, &mut delta, &dout, &q, &k, &v, &out, &lse, d,
                )
            };
            b.case(c, "flash_attention_backward", &shape, d.backward_flops(), 0.0, &mut run)?;
        }
        let mut run = || {
            flash_attention_forward(dev, &mut out, &mut lse, &q, &k, &v, d)?;
            flash_attention_backward(
                dev, &mut dq, &mut dk, &mut dv, &mut delta, &dout, &q, &k, &v, &out, &lse, d,
            )
        };
        b.case(
            c,
            "flash_attention_fwd_bwd",
            &shape,
            d.forward_flops() + d.backward_flops(),
            0.0,
            &mut run,
        )?;
    }
    Ok(())
}

/// A bench run: measure the ceilings first, then every case.
fn run(c: &mut Criterion, summarise: bool) -> Result<()> {
    let dev = Device::new(0)?;
    let lt = Blaslt::new(&dev)?;
    // Random normal bf16 values from a fixed SplitMix64 stream (Box–Muller).
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + 1e-12
    };
    let host: Vec<bf16> = (0..SEED_CHUNK_ELEMS)
        .map(|_| {
            let r = (-2.0 * next().ln()).sqrt() * (2.0 * std::f64::consts::PI * next()).cos();
            bf16::from_f64(r)
        })
        .collect();
    let seed = dev.upload(&host)?;
    let mut b = Bench {
        dev,
        lt,
        seed,
        tflops_ceiling: 0.0,
        gbs_ceiling: 0.0,
        summarise,
    };
    ceilings(&mut b, c)?;
    gemms(&b, c)?;
    attention(&b, c)?;
    memory_bound(&b, c)?;
    Ok(())
}

/// The memory-bound kernels (`baton_kernels::cuda::bench_support`) at B = 16 and 64, then the per-parameter
/// ones (AdamW, gradient norm, casts), as GB/s against the copy ceiling. Each batch's buffers are freed before
/// the next batch allocates.
fn memory_bound(b: &Bench, c: &mut Criterion) -> Result<()> {
    use baton_kernels::cuda::bench_support::{memory_bound_cases, parameter_cases};
    for batch in [16, 64] {
        for mut case in memory_bound_cases(&b.dev, batch)? {
            b.case(c, case.kernel, &case.shape, 0.0, case.bytes, &mut *case.run)?;
        }
    }
    for mut case in parameter_cases(&b.dev)? {
        b.case(c, case.kernel, &case.shape, 0.0, case.bytes, &mut *case.run)?;
    }
    Ok(())
}

fn main() {
    // Criterion's measuring mode is `--bench` (cargo bench); without it (cargo test) each case runs once.
    let summarise = std::env::args().any(|a| a == "--bench");
    match baton_kernels::cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) | Err(_) => {
            println!("kernels bench: no CUDA device on this machine; nothing to measure (skipped)");
            return;
        }
    }
    let mut c = Criterion::default().configure_from_args();
    if let Err(e) = run(&mut c, summarise) {
        eprintln!("kernels bench failed: {e}");
        std::process::exit(1);
    }
    c.final_summary();
}
