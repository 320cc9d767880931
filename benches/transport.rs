//! Transport bench: `Cuda::transfer` between two backends on device 0 (two pipeline stages sharing one GPU,
//! each with its compute and copy stream) against a raw `cuMemcpyDtoDAsync` of the same size on one stream, at
//! 1, 16 and 256 MiB; the executor's pooled path (`transfer_pooled` into each side's receive pool); and the
//! pinned-host fallback route (`Cuda::transfer_via_pinned_host`, the path taken between GPUs without peer
//! access) at the same sizes.
//!
//! Each timed unit moves the buffer there and back (A → B → A: two transfers; `transfer_d2d` allocates each
//! destination from the memory pool and frees its source, `transfer_pooled` reuses the receivers' buffers);
//! the raw copy does two copies between two preallocated buffers. Timing: CUDA events on stream A around `iters` units, synchronised inside
//! criterion's `iter_custom`; the SUMMARY line reports the median of 20 units, per transfer:
//!
//! `SUMMARY kernel=<transfer_d2d|transfer_pooled|transfer_pinned_host|raw_memcpy_dtod> shape=<size> time_us=<one copy>
//!  tflops=- gbs=<payload GB/s> pct_ceiling=<% of the raw copy's GB/s>`
//!
//! `gbs` counts the payload once (bytes moved, not read + written, unlike `kernels`' copy ceiling). Without a
//! CUDA device (CI, `cargo test --all-targets`) it prints why and exits successfully.

use std::sync::Arc;
use std::time::Duration;

use baton_engine::backend::{Cuda, CudaBuf, CudaData, Precision, RecvPool};
use baton_engine::Backend;
use baton_kernels::cuda::cudarc::driver::sys::CUevent_flags;
use criterion::{BenchmarkId, Criterion, Throughput};

const MIB: usize = 1 << 20;
const SIZES_MIB: [usize; 3] = [1, 16, 256];
const SUMMARY_REPS: usize = 20;
const WARMUP_REPS: usize = 3;

type BenchResult<T> = std::result::Result<T, String>;

/// The two stages and the raw-copy buffers.
struct Bench {
    a: Cuda,
    b: Cuda,
    summarise: bool,
}

impl Bench {
    /// Event-timed milliseconds of `iters` runs of `work` on A's stream (every unit ends there).
    fn time_ms(&self, iters: u64, work: &mut dyn FnMut() -> BenchResult<()>) -> BenchResult<f64> {
        let dev = self.a.device();
        let ctx = dev.context();
        let e = |e| format!("timing events: {e:?}");
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(e)?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(e)?;
        start.record(dev.stream()).map_err(e)?;
        for _ in 0..iters {
            work()?;
        }
        end.record(dev.stream()).map_err(e)?;
        dev.synchronize().map_err(|e| e.to_string())?;
        self.b.synchronize().map_err(|e| e.to_string())?;
        Ok(f64::from(start.elapsed_ms(&end).map_err(e)?))
    }

    /// Registers `work` (two copies of `bytes` each) with criterion and, outside test mode, prints its SUMMARY
    /// line against `ceiling_gbs` (0: this is the ceiling). Returns the payload GB/s (0 in test mode).
    fn case(
        &self,
        c: &mut Criterion,
        kernel: &str,
        bytes: usize,
        ceiling_gbs: f64,
        work: &mut dyn FnMut() -> BenchResult<()>,
    ) -> BenchResult<f64> {
        let shape = format!("{}MiB", bytes / MIB);
        let mut group = c.benchmark_group(kernel);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
            .throughput(Throughput::Bytes(2 * bytes as u64));
        let mut failure = None;
        group.bench_function(BenchmarkId::from_parameter(&shape), |bch| {
            bch.iter_custom(|iters| match self.time_ms(iters, work) {
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
        for _ in 0..WARMUP_REPS {
            self.time_ms(1, work)?;
        }
        let mut times: Vec<f64> = (0..SUMMARY_REPS)
            .map(|_| self.time_ms(1, work))
            .collect::<BenchResult<_>>()?;
        times.sort_by(|x, y| x.total_cmp(y));
        // Per copy: the unit is two.
        let us = times[times.len() / 2] * 1e3 / 2.0;
        let gbs = bytes as f64 / (us * 1e-6) / 1e9;
        let pct = if ceiling_gbs > 0.0 {
            100.0 * gbs / ceiling_gbs
        } else {
            100.0
        };
        println!("SUMMARY kernel={kernel} shape={shape} time_us={us:.1} tflops=- gbs={gbs:.1} pct_ceiling={pct:.1}");
        Ok(gbs)
    }
}

/// How a case moves its buffer.
#[derive(Clone, Copy)]
enum Route {
    /// `transfer`: a new destination buffer per copy (stream-ordered allocator).
    Allocating,
    /// `transfer_pooled`: into the receiver's pool (what the executor does).
    Pooled,
    /// `transfer_via_pinned_host`: the fallback between GPUs without peer access.
    PinnedHost,
}

fn run(c: &mut Criterion, summarise: bool) -> BenchResult<()> {
    let a = Cuda::with_precision(0, Precision::Bf16).map_err(|e| e.to_string())?;
    let b = a.with_new_stream().map_err(|e| e.to_string())?;
    println!(
        "transport bench: {} -> {} on {:?}: route {}",
        a.name(),
        b.name(),
        a.device().arch(),
        a.route_to(&b).map_err(|e| e.to_string())?.name()
    );
    let bench = Bench { a, b, summarise };
    let s = |e: baton_engine::error::EngineError| e.to_string();
    for mib in SIZES_MIB {
        let bytes = mib * MIB;
        // Raw: two device-to-device copies on A's stream between preallocated buffers.
        let ceiling = {
            let dev = bench.a.device();
            let mut x = dev.zeros::<u8>(bytes).map_err(|e| e.to_string())?;
            let mut y = dev.zeros::<u8>(bytes).map_err(|e| e.to_string())?;
            let stream = dev.stream().clone();
            let mut raw = || {
                stream.memcpy_dtod(&x, &mut y).map_err(|e| format!("{e:?}"))?;
                stream.memcpy_dtod(&y, &mut x).map_err(|e| format!("{e:?}"))
            };
            bench.case(c, "raw_memcpy_dtod", bytes, 0.0, &mut raw)?
        };
        // bf16 buffers of `bytes`: an activation as the pipeline moves it.
        let elems = bytes / 2;
        // The executor's path: each side lands transfers in its receive pool (capacity 1: one buffer in flight).
        let pools = (RecvPool::with_capacity(1), RecvPool::with_capacity(1));
        for (kernel, route) in [
            ("transfer_d2d", Route::Allocating),
            ("transfer_pooled", Route::Pooled),
            ("transfer_pinned_host", Route::PinnedHost),
        ] {
            let mut held = Some(bench.a.zeros(elems).map_err(s)?);
            let (a, b) = (&bench.a, &bench.b);
            let hop = |buf: CudaBuf, from: &Cuda, to: &Cuda, pool: &Arc<RecvPool<CudaData>>| match route {
                Route::PinnedHost => from.transfer_via_pinned_host(buf, to),
                Route::Allocating => from.transfer(buf, to),
                Route::Pooled => from.transfer_pooled(buf, to, pool),
            };
            let mut unit = || {
                let buf = held.take().ok_or("the buffer was lost by a failed transfer")?;
                let there = hop(buf, a, b, &pools.1).map_err(s)?;
                let back = hop(there, b, a, &pools.0).map_err(s)?;
                // Transfers run on the receiver's copy stream: order A's compute stream (where the timing events
                // are recorded) after the copy back.
                a.await_ready(&back).map_err(s)?;
                held = Some(back);
                Ok(())
            };
            bench.case(c, kernel, bytes, ceiling, &mut unit)?;
        }
        let (pa, pb) = (pools.0.stats(), pools.1.stats());
        println!(
            "transport bench: {mib} MiB pooled receives: A {} allocations / {} reuses, B {} / {}",
            pa.allocations(),
            pa.hits,
            pb.allocations(),
            pb.hits
        );
    }
    Ok(())
}

fn main() {
    // Criterion's measuring mode is `--bench` (cargo bench); without it (cargo test) each case runs once.
    let summarise = std::env::args().any(|a| a == "--bench");
    match baton_kernels::cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) | Err(_) => {
            println!("transport bench: no CUDA device on this machine; nothing to measure (skipped)");
            return;
        }
    }
    let mut c = Criterion::default().configure_from_args();
    if let Err(e) = run(&mut c, summarise) {
        eprintln!("transport bench failed: {e}");
        std::process::exit(1);
    }
    c.final_summary();
}
