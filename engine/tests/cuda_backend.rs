//! The CUDA backend: a clean error (never a panic) without a device, and — on a GPU — pipelines on `Cuda` that
//! train like the same pipeline on `Cpu`: fp32 within 1e-4 relative (cuBLAS and the kernels reassociate sums, so
//! bitwise equality is not expected), bf16 mixed precision within 2%, for p ∈ {1, 2, 4} stages on one GPU and every
//! schedule family; two CUDA runs with the same seed are bitwise identical; a transfer never reads a buffer before
//! its producer's (deliberately slow) kernel has written it.

mod common;

use std::time::Instant;

use baton_engine::backend::{Cuda, CudaBuf, CudaData, Precision, RecvPool};
use baton_engine::data::Batch;
use baton_engine::error::EngineError;
use baton_engine::{Backend, Cpu, GptConfig, Pipeline, PipelineConfig};
use baton_schedules::{generate, ScheduleKind};

const STEPS: usize = 3;
const BATCH: usize = 4;
const SEQ: usize = 16;
const VOCAB: usize = 67;

fn model() -> GptConfig {
    GptConfig {
        vocab_size: VOCAB,
        max_seq: SEQ,
        layers: 4,
        d_model: 32,
        heads: 4,
    }
}

fn batches() -> Vec<Batch> {
    common::batches_with(STEPS, BATCH, SEQ, VOCAB, 0x2545_f491_4f6c_dd1d)
}

/// Fresh pseudo-random values in [-1, 1) (xorshift) from a seed drawn from the clock and printed, so that a
/// failure can be replayed.
struct Fresh(u64);

impl Fresh {
    fn new(what: &str) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        println!("seed {seed} {what}");
        Fresh(seed | 1)
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }
}

/// Relative L2 error of `got` against `want`.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_err: lengths differ");
    let num: f64 = got.iter().zip(want).map(|(g, w)| f64::from(g - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    (num / den).sqrt()
}

fn losses<B: baton_engine::Backend>(backends: Vec<B>) -> Vec<f32> {
    let mut cfg = PipelineConfig::new(model(), 2, ScheduleKind::OneFOneB, 2);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = STEPS as u64;
    let mut pipe = Pipeline::new(cfg, backends).unwrap();
    batches().iter().map(|b| pipe.train_step(b).unwrap().loss).collect()
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    match Cuda::new(0) {
        Err(EngineError::NoCudaDevice(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("expected NoCudaDevice, got {other}"),
        // A machine with a GPU: the constructor works, which is fine too.
        Ok(cuda) => drop(cuda),
    }
    let msg = match Cuda::new(usize::MAX) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("device usize::MAX cannot exist"),
    };
    assert!(msg.contains("no CUDA device"), "{msg}");
}

#[test]
#[ignore = "needs a CUDA device"]
fn two_stage_pipeline_on_cuda_matches_cpu() {
    let stage0 = Cuda::new(0).unwrap();
    let stage1 = stage0.with_new_stream().unwrap();
    let gpu = losses(vec![stage0, stage1]);
    let cpu = losses(vec![Cpu; 2]);
    for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let rel = ((g - c) / c).abs();
        println!("step {step}: cpu {c:.7} cuda {g:.7} rel {rel:.2e}");
        assert!(g.is_finite() && rel <= 1e-4, "step {step}: cpu loss {c}, cuda loss {g}");
    }
}

#[test]
fn no_device_is_an_error_not_a_panic_in_bf16() {
    match Cuda::with_precision(0, Precision::Bf16) {
        Err(EngineError::NoCudaDevice(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("expected NoCudaDevice, got {other}"),
        Ok(cuda) => assert_eq!(cuda.precision(), Precision::Bf16),
    }
    assert!(matches!(
        Cuda::with_precision(usize::MAX, Precision::Bf16),
        Err(EngineError::NoCudaDevice(_))
    ));
}

/// The schedule-matrix model: 6 blocks (8 layer units: 4 stages × 2 chunks), head size 64, so the bf16 runs go
/// through the fused flash-attention path.
mod matrix {
    use super::*;

    pub const STEPS: usize = 20;
    pub const BATCH: usize = 8;
    pub const SEQ: usize = 32;
    pub const VOCAB: usize = 97;
    pub const MICROBATCHES: u32 = 4;

    pub fn model() -> GptConfig {
        GptConfig {
            vocab_size: VOCAB,
            max_seq: SEQ,
            layers: 6,
            d_model: 128,
            heads: 2,
        }
    }

    /// Fresh pseudo-random tokens (xorshift), different every step.
    pub fn batches() -> Vec<Batch> {
        super::common::batches_with(STEPS, BATCH, SEQ, VOCAB, 0x9e37_79b9_7f4a_7c15)
    }

    pub fn chunks_of(kind: ScheduleKind) -> u32 {
        match kind {
            ScheduleKind::Interleaved | ScheduleKind::ZbV => 2,
            _ => 1,
        }
    }

    /// Losses (bits) and final parameters (bits, by name) of a 20-step run.
    pub struct Run {
        pub losses: Vec<f32>,
        pub params: Vec<(String, Vec<u32>)>,
    }

    pub fn train<B: Backend>(kind: ScheduleKind, backends: Vec<B>) -> Run {
        let p = backends.len() as u32;
        let mut cfg = PipelineConfig::new(model(), p, kind, MICROBATCHES);
        cfg.chunks = chunks_of(kind);
        cfg.optimizer.warmup_steps = 2;
        cfg.optimizer.total_steps = STEPS as u64;
        let mut pipe = Pipeline::new(cfg, backends).unwrap_or_else(|e| panic!("{kind} p={p}: {e}"));
        let losses = batches()
            .iter()
            .map(|b| {
                let r = pipe.train_step(b).unwrap_or_else(|e| panic!("{kind} p={p}: {e}"));
                assert!(r.loss.is_finite(), "{kind} p={p}: loss {}", r.loss);
                r.loss
            })
            .collect();
        let params = pipe
            .parameters()
            .unwrap()
            .into_iter()
            .map(|(name, t)| (name, t.data.iter().map(|x| x.to_bits()).collect()))
            .collect();
        Run { losses, params }
    }

    /// `p` backends on GPU 0, one stream each.
    pub fn stages(p: u32, precision: Precision) -> Vec<Cuda> {
        let first = Cuda::with_precision(0, precision).unwrap();
        let mut all = vec![first.clone()];
        for _ in 1..p {
            all.push(first.with_new_stream().unwrap());
        }
        all
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_schedule_tracks_the_cpu_in_fp32_and_bf16() {
    use matrix::*;
    let started = Instant::now();
    // Pipelined CPU training equals the unpipelined run bitwise (tests/equivalence.rs): one reference suffices.
    let cpu = train(ScheduleKind::OneFOneB, vec![Cpu]).losses;
    assert_ne!(cpu[0], cpu[STEPS - 1], "the reference run does not train");
    let mut checked = 0;
    let mut worst = [0.0f32; 2];
    for kind in ScheduleKind::GENERATED {
        for p in [1u32, 2, 4] {
            // PipeDream-2BW reads weights one window old with a pipeline: not the unpipelined run.
            if generate(kind, p, MICROBATCHES, chunks_of(kind)).is_err() || (kind == ScheduleKind::TwoBw && p > 1) {
                continue;
            }
            for (i, (precision, tol)) in [(Precision::F32, 1e-4f32), (Precision::Bf16, 0.02)]
                .into_iter()
                .enumerate()
            {
                let gpu = train(kind, stages(p, precision)).losses;
                for (step, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
                    let rel = ((g - c) / c).abs();
                    worst[i] = worst[i].max(rel);
                    assert!(
                        rel <= tol,
                        "{kind} p={p} {precision} step {step}: cpu loss {c}, cuda loss {g} (rel {rel:.2e} > {tol})"
                    );
                }
                checked += 1;
            }
        }
    }
    println!(
        "{checked} runs in {:.1} s; worst relative loss error fp32 {:.2e}, bf16 {:.2e}",
        started.elapsed().as_secs_f64(),
        worst[0],
        worst[1]
    );
    // 6 families × 3 stage counts × 2 precisions, less the shapes a family cannot serve (and 2BW with a pipeline).
    assert!(checked >= 20, "only {checked} runs");
}

#[test]
#[ignore = "needs a CUDA device"]
fn same_seed_cuda_runs_are_bitwise_identical() {
    use matrix::*;
    for precision in Precision::ALL {
        for (kind, p) in [(ScheduleKind::ZbV, 2), (ScheduleKind::Interleaved, 4)] {
            let a = train(kind, stages(p, precision));
            let b = train(kind, stages(p, precision));
            let bits = |r: &Run| r.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{kind} p={p} {precision}: losses differ");
            assert_eq!(a.params.len(), b.params.len());
            for ((na, ta), (nb, tb)) in a.params.iter().zip(&b.params) {
                assert_eq!(na, nb);
                let diff = ta.iter().zip(tb).position(|(x, y)| x != y);
                assert!(diff.is_none(), "{kind} p={p} {precision}: {na} differs at {diff:?}");
            }
        }
    }
}

/// In the style of cudarc's `test_peer_memcpy_waits_for_src_stream`: a slow kernel on the producer's stream fills a
/// buffer; `transfer` to a consumer on another stream and a download there must see the filled values.
#[test]
#[ignore = "needs a CUDA device"]
fn transfer_waits_for_a_slow_producer() {
    const N: usize = 4 << 20;
    const VALUE: f32 = 42.5;
    // ≈ 25 ms at the H200's ≈ 1.98 GHz boost clock; the copy of 16 MiB takes ≈ 10 µs.
    const CYCLES: u64 = 50_000_000;
    for precision in Precision::ALL {
        let producer = Cuda::with_precision(0, precision).unwrap();
        let consumer = producer.with_new_stream().unwrap();
        // Make the consumer's stream idle, so nothing else delays its copy.
        consumer.synchronize().unwrap();
        let mut buf = CudaBuf::new(CudaData::F32(producer.device().zeros::<f32>(N).unwrap()));
        producer.synchronize().unwrap();
        let started = Instant::now();
        let CudaData::F32(slice) = &mut *buf else {
            unreachable!()
        };
        baton_kernels::cuda::elementwise::slow_fill_f32(producer.device(), slice, VALUE, CYCLES).unwrap();
        let moved = producer.transfer(buf, &consumer).unwrap();
        let host = consumer.download(&moved).unwrap();
        let elapsed = started.elapsed();
        assert_eq!(host.len(), N);
        let stale = host.iter().position(|&x| x != VALUE);
        assert!(
            stale.is_none(),
            "{precision}: element {stale:?} is stale ({:?}): the copy did not wait for the producer",
            stale.map(|i| host[i])
        );
        // The kernel must really have been slow, or the test proves nothing.
        assert!(
            elapsed.as_secs_f64() > 0.005,
            "{precision}: the slow kernel took only {elapsed:?}"
        );
        // And the other way round: the producer's stream frees its buffer only after the copy (no use-after-free
        // visible as a fault); both streams drain cleanly.
        producer.synchronize().unwrap();
        consumer.synchronize().unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_parameters_keep_an_fp32_master() {
    let cuda = Cuda::with_precision(0, Precision::Bf16).unwrap();
    // 1 + 2⁻¹⁰ is not a bf16 value: the master keeps it, the working copy rounds it.
    let data = [1.0f32 + 1.0 / 1024.0, -3.0, 0.1];
    let param = cuda.upload_param(&data).unwrap();
    assert!(matches!(*param, CudaData::Param { .. }));
    assert_eq!(cuda.download(&param).unwrap(), data);
    assert!(matches!(*cuda.zeros(3).unwrap(), CudaData::Bf16(_)));
    assert!(matches!(*cuda.zeros_state(3).unwrap(), CudaData::F32(_)));
    // The move to another stream keeps both copies.
    let other = cuda.with_new_stream().unwrap();
    let moved = cuda.transfer(param, &other).unwrap();
    assert_eq!(other.download(&moved).unwrap(), data);
    let CudaData::Param { working, .. } = &*moved else {
        panic!("transfer changed the storage")
    };
    let w: Vec<f32> = other
        .device()
        .download(working)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    assert_eq!(w, [1.0, -3.0, half::bf16::from_f32(0.1).to_f32()]);
}

/// The pinned-host fallback (forced on one GPU): a slow producer's buffer moved device→pinned on its stream and
/// pinned→device on the consumer's must arrive filled; repeated transfers reuse the staging buffer in order.
#[test]
#[ignore = "needs a CUDA device"]
fn pinned_host_transfer_waits_for_a_slow_producer() {
    const N: usize = 4 << 20;
    const CYCLES: u64 = 50_000_000;
    for precision in Precision::ALL {
        let producer = Cuda::with_precision(0, precision).unwrap();
        let consumer = producer.with_new_stream().unwrap();
        assert_eq!(
            producer.route_to(&consumer).unwrap(),
            baton_engine::backend::CopyRoute::SameDevice
        );
        consumer.synchronize().unwrap();
        for round in 0..3 {
            let value = 7.0 + round as f32;
            let mut buf = CudaBuf::new(CudaData::F32(producer.device().zeros::<f32>(N).unwrap()));
            producer.synchronize().unwrap();
            let CudaData::F32(slice) = &mut *buf else {
                unreachable!()
            };
            baton_kernels::cuda::elementwise::slow_fill_f32(producer.device(), slice, value, CYCLES).unwrap();
            let moved = producer.transfer_via_pinned_host(buf, &consumer).unwrap();
            let host = consumer.download(&moved).unwrap();
            let stale = host.iter().position(|&x| x != value);
            assert!(
                stale.is_none(),
                "{precision} round {round}: element {stale:?} is stale ({:?})",
                stale.map(|i| host[i])
            );
        }
        // A parameter keeps both copies through the pinned route too.
        let data = [1.0f32 + 1.0 / 1024.0, -3.0, 0.1];
        let param = producer.upload_param(&data).unwrap();
        let moved = producer.transfer_via_pinned_host(param, &consumer).unwrap();
        assert_eq!(consumer.download(&moved).unwrap(), data);
        producer.synchronize().unwrap();
        consumer.synchronize().unwrap();
    }
}

/// The default memory pool keeps what it reserved: after one warm-up step, three more steps of a 2-stage bf16
/// pipeline on one GPU reserve nothing new from the driver.
#[test]
#[ignore = "needs a CUDA device"]
fn memory_pool_does_not_grow_after_warmup() {
    use matrix::*;
    let stages = stages(2, Precision::Bf16);
    let probe = stages[0].clone();
    let mut cfg = PipelineConfig::new(model(), 2, ScheduleKind::OneFOneB, MICROBATCHES);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = 4;
    let mut pipe = Pipeline::new(cfg, stages).unwrap();
    let data = batches();
    pipe.train_step(&data[0]).unwrap();
    probe.synchronize().unwrap();
    let warm = probe.pool_reserved_bytes().unwrap();
    println!("pool reserved after warm-up: {warm} bytes");
    assert!(
        warm > 0,
        "the default memory pool reserved nothing: not the stream-ordered allocator?"
    );
    let recv_warm = pipe.receive_pools();
    for (i, b) in data[1..4].iter().enumerate() {
        pipe.train_step(b).unwrap();
        probe.synchronize().unwrap();
        let now = probe.pool_reserved_bytes().unwrap();
        println!("pool reserved after step {}: {now} bytes", i + 2);
        assert!(now <= warm, "step {}: the pool grew from {warm} to {now} bytes", i + 2);
    }
    // Every receive after the warm-up step was served by a buffer the stage's receive pool already owned.
    for (s, (before, after)) in recv_warm.iter().zip(pipe.receive_pools()).enumerate() {
        println!("stage {s} receive pool: {after:?}");
        assert_eq!(
            after.misses, 0,
            "stage {s}: the schedule's receive-buffer count ran dry"
        );
        assert_eq!(
            after.allocations(),
            before.allocations(),
            "stage {s} allocated after warm-up"
        );
        assert!(after.hits > before.hits, "stage {s} received nothing from its pool");
        assert!(after.owned <= after.capacity);
    }
}

/// A receive buffer reused from the pool must not be overwritten before its last reader ran, nor read before the
/// next (slow) producer finished: rounds of slow fill → pooled transfer → download on one leased buffer.
#[test]
#[ignore = "needs a CUDA device"]
fn pooled_transfer_reuses_the_buffer_in_order() {
    const N: usize = 4 << 20;
    const CYCLES: u64 = 50_000_000;
    for precision in Precision::ALL {
        let producer = Cuda::with_precision(0, precision).unwrap();
        let consumer = producer.with_new_stream().unwrap();
        let pool = RecvPool::with_capacity(1);
        for round in 0..4 {
            let value = 3.0 + round as f32;
            let mut buf = CudaBuf::new(CudaData::F32(producer.device().zeros::<f32>(N).unwrap()));
            let CudaData::F32(slice) = &mut *buf else {
                unreachable!()
            };
            baton_kernels::cuda::elementwise::slow_fill_f32(producer.device(), slice, value, CYCLES).unwrap();
            let got = producer.transfer_pooled(buf, &consumer, &pool).unwrap();
            assert!(got.is_pooled(), "round {round}: the transfer did not land in the pool");
            let host = consumer.download(&got).unwrap();
            let stale = host.iter().position(|&x| x != value);
            assert!(stale.is_none(), "{precision} round {round}: element {stale:?} is stale");
        }
        let stats = pool.stats();
        assert_eq!(
            (stats.owned, stats.grown, stats.hits, stats.misses),
            (1, 1, 3, 0),
            "{stats:?}"
        );
        producer.synchronize().unwrap();
        consumer.synchronize().unwrap();
    }
}

/// The batched sums of squares (one read-back) equal the one-at-a-time ones bitwise, in both precisions.
#[test]
#[ignore = "needs a CUDA device"]
fn sum_squares_many_equals_one_at_a_time() {
    for precision in Precision::ALL {
        let cuda = Cuda::with_precision(0, precision).unwrap();
        let mut random = Fresh::new(&format!("{precision}"));
        let bufs: Vec<CudaBuf> = [1usize, 1000, 65_537, 3 << 20]
            .iter()
            .map(|&n| {
                let data = random.values(n);
                let mut b = cuda.zeros(n).unwrap();
                cuda.copy(&mut b, &cuda.upload(&data).unwrap()).unwrap();
                b
            })
            .collect();
        let refs: Vec<&CudaBuf> = bufs.iter().collect();
        let many = cuda.sum_squares_many(&refs).unwrap();
        let one: Vec<f64> = bufs.iter().map(|b| cuda.sum_squares(b).unwrap()).collect();
        assert_eq!(
            many.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            one.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{precision}"
        );
        assert!(many.iter().all(|&x| x > 0.0), "{precision}: {many:?}");
    }
}

/// Incoming transfers run on the receiving stage's copy stream: a copy into a stage whose compute stream is busy
/// with a slow kernel completes before that kernel does (it does not queue behind the stage's compute), and the
/// received data is right.
#[test]
#[ignore = "needs a CUDA device"]
fn transfers_do_not_wait_behind_the_consumers_compute() {
    const N: usize = 1 << 20;
    const CYCLES: u64 = 100_000_000; // ≈ 50 ms on an H200
    let producer = Cuda::with_precision(0, Precision::F32).unwrap();
    let consumer = producer.with_new_stream().unwrap();
    let data: Vec<f32> = (0..N).map(|i| i as f32).collect();
    let buf = producer.upload(&data).unwrap();
    producer.synchronize().unwrap();
    // Keep the consumer's compute stream busy.
    let mut busy = CudaBuf::new(CudaData::F32(consumer.device().zeros::<f32>(N).unwrap()));
    let CudaData::F32(slice) = &mut *busy else {
        unreachable!()
    };
    baton_kernels::cuda::elementwise::slow_fill_f32(consumer.device(), slice, 1.0, CYCLES).unwrap();
    let after_busy = consumer.mark().unwrap();
    let moved = producer.transfer(buf, &consumer).unwrap();
    let copied = consumer.copy_mark().unwrap();
    copied.synchronize().unwrap();
    assert!(
        !after_busy.is_complete(),
        "the copy finished only after the consumer's slow kernel: it queued behind the consumer's compute"
    );
    assert_eq!(consumer.download(&moved).unwrap(), data);
    consumer.synchronize().unwrap();
}

/// The measured bf16 GEMM rate MFU is reported against is a plausible figure for a current GPU (an H200 gives
/// about 790 TFLOP/s on random data), and the CPU has none.
#[test]
#[ignore = "needs a CUDA device"]
fn measured_peak_is_plausible() {
    let cuda = Cuda::with_precision(0, Precision::Bf16).unwrap();
    let t = cuda.measure_peak_tflops().unwrap().expect("a GPU has a peak");
    println!("measured bf16 GEMM rate: {t:.1} TFLOP/s");
    assert!((20.0..5000.0).contains(&t), "{t} TFLOP/s");
    assert_eq!(Cpu.measure_peak_tflops().unwrap(), None);
}

/// The engine's flash-attention path (bf16, fused kernels, row-logsumexp stash) and its materialised path agree
/// with the CPU reference on fresh random inputs, forward and backward, with a sequence length that is not a
/// multiple of the kernels' 64-row tiles; the flash stash is (b, nh, t), not (b, nh, t, t).
#[test]
#[ignore = "needs a CUDA device"]
fn flash_attention_path_matches_the_cpu() {
    let (b, t, nh) = (2usize, 200usize, 2usize);
    for hs in [64usize, 128] {
        let c = nh * hs;
        let mut random = Fresh::new(&format!("hs {hs}"));
        let (qkv, dout) = (random.values(b * t * 3 * c), random.values(b * t * c));
        // CPU reference.
        let cpu = Cpu;
        let (cq, cd) = (cpu.upload(&qkv).unwrap(), cpu.upload(&dout).unwrap());
        let (mut cout, mut catt) = (cpu.zeros(b * t * c).unwrap(), cpu.zeros(b * nh * t * t).unwrap());
        cpu.attention_forward(&mut cout, &mut catt, &cq, b, t, c, nh).unwrap();
        let mut cdqkv = cpu.zeros(b * t * 3 * c).unwrap();
        cpu.attention_backward(&mut cdqkv, &cd, &cq, &cout, &catt, b, t, c, nh)
            .unwrap();
        let (want_out, want_dqkv) = (cpu.download(&cout).unwrap(), cpu.download(&cdqkv).unwrap());
        for flash in [true, false] {
            let cuda = Cuda::with_precision(0, Precision::Bf16)
                .unwrap()
                .with_flash_attention(flash);
            let stash = cuda.attention_stash_len(b, t, c, nh);
            assert_eq!(stash, if flash { b * nh * t } else { b * nh * t * t });
            let (gq, gd) = (cuda.upload(&qkv).unwrap(), cuda.upload(&dout).unwrap());
            let (mut gout, mut gatt) = (cuda.zeros(b * t * c).unwrap(), cuda.zeros(stash).unwrap());
            // Poison the outputs first: every element must be written.
            cuda.scale(&mut gout, f32::NAN).unwrap();
            cuda.attention_forward(&mut gout, &mut gatt, &gq, b, t, c, nh).unwrap();
            let mut gdqkv = cuda.zeros(b * t * 3 * c).unwrap();
            cuda.attention_backward(&mut gdqkv, &gd, &gq, &gout, &gatt, b, t, c, nh)
                .unwrap();
            let (got_out, got_dqkv) = (cuda.download(&gout).unwrap(), cuda.download(&gdqkv).unwrap());
            let (e_out, e_dqkv) = (rel_err(&got_out, &want_out), rel_err(&got_dqkv, &want_dqkv));
            println!("hs {hs} flash {flash}: out rel err {e_out:.2e}, dqkv rel err {e_dqkv:.2e}");
            assert!(e_out < 2e-2 && e_dqkv < 3e-2, "hs {hs} flash {flash}: {e_out} {e_dqkv}");
        }
    }
}

/// The forward matrix product on cuBLASLt (bias in the epilogue) and on cuBLAS + the bias kernel agree with the
/// CPU on fresh random inputs with odd sizes, in both precisions, and overwrite a poisoned output.
#[test]
#[ignore = "needs a CUDA device"]
fn matmul_forward_on_cublaslt_and_cublas_matches_the_cpu() {
    let (n, c, oc) = (333usize, 96usize, 160usize);
    let mut random = Fresh::new("");
    let (x, w, bias) = (random.values(n * c), random.values(oc * c), random.values(oc));
    let cpu = Cpu;
    let mut want = cpu.zeros(n * oc).unwrap();
    let (cx, cw, cb) = (
        cpu.upload(&x).unwrap(),
        cpu.upload(&w).unwrap(),
        cpu.upload(&bias).unwrap(),
    );
    cpu.matmul_forward(&mut want, &cx, &cw, Some(&cb), n, c, oc).unwrap();
    let want = cpu.download(&want).unwrap();
    for precision in Precision::ALL {
        for lt in [true, false] {
            let cuda = Cuda::with_precision(0, precision).unwrap().with_cublaslt(lt).unwrap();
            assert_eq!(cuda.uses_cublaslt(), lt);
            let (gx, gw, gb) = (
                cuda.upload(&x).unwrap(),
                cuda.upload_param(&w).unwrap(),
                cuda.upload_param(&bias).unwrap(),
            );
            let mut out = cuda.zeros(n * oc).unwrap();
            cuda.scale(&mut out, f32::NAN).unwrap();
            cuda.matmul_forward(&mut out, &gx, &gw, Some(&gb), n, c, oc).unwrap();
            let got = cuda.download(&out).unwrap();
            let rel = rel_err(&got, &want);
            println!("{precision} cublaslt {lt}: rel err {rel:.2e}");
            let tol = if precision == Precision::F32 { 1e-5 } else { 1e-2 };
            assert!(rel < tol, "{precision} cublaslt {lt}: {rel}");
        }
    }
}

/// The MLP's fused ops (cuBLASLt GELU_AUX_BIAS forward, DGELU backward: bf16 with cuBLASLt on) and their unfused
/// forms (fp32, or cuBLASLt off) agree with the CPU on fresh random inputs, overwriting poisoned outputs.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_mlp_ops_match_the_cpu() {
    let (n, c, oc) = (257usize, 64usize, 256usize);
    let mut random = Fresh::new("");
    // Up-projection (n, c) -> (n, oc) with GELU; down-projection's input gradient back through it.
    let (x, w_up, b_up, w_down, dout) = (
        random.values(n * c),
        random.values(oc * c),
        random.values(oc),
        random.values(c * oc),
        random.values(n * c),
    );
    let cpu = Cpu;
    let up = |be: &Cpu| {
        let (mut out, mut pre) = (be.zeros(n * oc).unwrap(), be.zeros(n * oc).unwrap());
        let (bx, bw, bb) = (
            be.upload(&x).unwrap(),
            be.upload(&w_up).unwrap(),
            be.upload(&b_up).unwrap(),
        );
        be.matmul_gelu_forward(&mut out, &mut pre, &bx, &bw, Some(&bb), n, c, oc)
            .unwrap();
        let mut dinp = be.zeros(n * oc).unwrap();
        let (bd, bwd) = (be.upload(&dout).unwrap(), be.upload(&w_down).unwrap());
        // down-projection: weight (c, oc), its input is the GELU output (n, oc), dout (n, c).
        be.matmul_backward_input_gelu(&mut dinp, &bd, &bwd, &pre, n, oc, c)
            .unwrap();
        (
            be.download(&out).unwrap(),
            be.download(&pre).unwrap(),
            be.download(&dinp).unwrap(),
        )
    };
    let want = up(&cpu);
    for precision in Precision::ALL {
        for lt in [true, false] {
            let cuda = Cuda::with_precision(0, precision).unwrap().with_cublaslt(lt).unwrap();
            let (mut out, mut pre) = (cuda.zeros(n * oc).unwrap(), cuda.zeros(n * oc).unwrap());
            cuda.scale(&mut out, f32::NAN).unwrap();
            cuda.scale(&mut pre, f32::NAN).unwrap();
            let (gx, gw, gb) = (
                cuda.upload(&x).unwrap(),
                cuda.upload_param(&w_up).unwrap(),
                cuda.upload_param(&b_up).unwrap(),
            );
            cuda.matmul_gelu_forward(&mut out, &mut pre, &gx, &gw, Some(&gb), n, c, oc)
                .unwrap();
            let mut dinp = cuda.zeros(n * oc).unwrap();
            cuda.scale(&mut dinp, f32::NAN).unwrap();
            let (gd, gwd) = (cuda.upload(&dout).unwrap(), cuda.upload_param(&w_down).unwrap());
            cuda.matmul_backward_input_gelu(&mut dinp, &gd, &gwd, &pre, n, oc, c)
                .unwrap();
            let got = (
                cuda.download(&out).unwrap(),
                cuda.download(&pre).unwrap(),
                cuda.download(&dinp).unwrap(),
            );
            let errs = [
                rel_err(&got.0, &want.0),
                rel_err(&got.1, &want.1),
                rel_err(&got.2, &want.2),
            ];
            println!(
                "{precision} cublaslt {lt}: out / pre / dinp rel err {:.2e} {:.2e} {:.2e}",
                errs[0], errs[1], errs[2]
            );
            let tol = if precision == Precision::F32 { 1e-4 } else { 2e-2 };
            assert!(errs.iter().all(|&e| e < tol), "{precision} cublaslt {lt}: {errs:?}");
        }
    }
}

/// The fused residual + layer norm kernel against the CPU's two ops, in both precisions (outputs poisoned first).
#[test]
#[ignore = "needs a CUDA device"]
fn fused_residual_layernorm_matches_the_cpu() {
    let (n, c) = (300usize, 96usize);
    let mut random = Fresh::new("");
    let (a, b, w, bias) = (
        random.values(n * c),
        random.values(n * c),
        random.values(c),
        random.values(c),
    );
    let cpu = Cpu;
    let (ca, cb, cw, cbias) = (
        cpu.upload(&a).unwrap(),
        cpu.upload(&b).unwrap(),
        cpu.upload(&w).unwrap(),
        cpu.upload(&bias).unwrap(),
    );
    let (mut sum, mut out, mut mean, mut rstd) = (
        cpu.zeros(n * c).unwrap(),
        cpu.zeros(n * c).unwrap(),
        cpu.zeros(n).unwrap(),
        cpu.zeros(n).unwrap(),
    );
    cpu.residual_forward(&mut sum, &ca, &cb).unwrap();
    cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &sum, &cw, &cbias, n, c)
        .unwrap();
    let want = [sum, out, mean, rstd].map(|x| cpu.download(&x).unwrap());
    for precision in Precision::ALL {
        let cuda = Cuda::with_precision(0, precision).unwrap();
        let (ga, gb, gw, gbias) = (
            cuda.upload(&a).unwrap(),
            cuda.upload(&b).unwrap(),
            cuda.upload_param(&w).unwrap(),
            cuda.upload_param(&bias).unwrap(),
        );
        let mut bufs = [n * c, n * c, n, n].map(|len| {
            let mut x = cuda.zeros(len).unwrap();
            cuda.scale(&mut x, f32::NAN).unwrap();
            x
        });
        let [s, o, m, r] = &mut bufs;
        cuda.residual_layernorm_forward(s, o, m, r, &ga, &gb, &gw, &gbias, n, c)
            .unwrap();
        let tol = if precision == Precision::F32 { 1e-5 } else { 2e-2 };
        for (what, (buf, want)) in ["sum", "out", "mean", "rstd"].iter().zip(bufs.iter().zip(&want)) {
            let e = rel_err(&cuda.download(buf).unwrap(), want);
            println!("{precision} fused residual + layer norm: {what} rel err {e:.2e}");
            assert!(e < tol, "{precision} {what}: {e}");
        }
    }
}
