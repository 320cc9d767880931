//! The core promise: pipelined training equals unpipelined training. For every schedule family,
//! p ∈ {1,2,3,4} and m ∈ {1,2,4,8} (where the family admits the shape), a tiny GPT trained 3
//! steps gives bitwise the same losses and parameters as the single-stage run on the same
//! micro-batches; the tied copies stay bitwise identical; the measured peak of stashed
//! activations equals the validator's prediction; recomputation changes nothing. With batched weight gradients
//! the micro-batch count changes nothing either: every schedule, split and m trains the bits of one micro-batch.
//!
//! Written once for every backend (`on_every_backend!`): `cpu::*` runs in CI and compares bit for bit; `cuda::*`
//! (ignored without a GPU, run by `scripts/gpu-check.sh`) compares within the device's tolerance.

mod common;

use baton_engine::data::Batch;
use baton_engine::{GptConfig, Pipeline, PipelineConfig};
use baton_schedules::{generate, ScheduleKind};
use common::Device;

on_every_backend!(
    every_schedule_trains_like_the_unpipelined_run,
    recomputation_changes_nothing,
    explicit_split_equals_uniform_split,
    batched_weight_grads_train_the_same_bits_for_any_micro_batch_count
);

const STEPS: usize = 3;

fn model() -> GptConfig {
    common::tiny_model()
}

fn batches() -> Vec<Batch> {
    common::batches(STEPS)
}

type Params = baton_engine::pipeline::TensorMap;

struct Run {
    losses: Vec<u32>,
    params: Params,
}

fn train(d: &impl Device, kind: ScheduleKind, p: u32, m: u32, chunks: u32, recompute: bool) -> Run {
    train_with(d, kind, p, m, chunks, recompute, false)
}

fn train_with(
    d: &impl Device,
    kind: ScheduleKind,
    p: u32,
    m: u32,
    chunks: u32,
    recompute: bool,
    batch_weight_grads: bool,
) -> Run {
    let mut cfg = PipelineConfig::new(model(), p, kind, m);
    cfg.chunks = chunks;
    cfg.recompute = recompute;
    cfg.batch_weight_grads = batch_weight_grads;
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = STEPS as u64;
    let mut pipe = Pipeline::new(cfg, d.stages(p)).unwrap_or_else(|e| panic!("{kind} p={p} m={m}: {e}"));
    let mut losses = Vec::new();
    let mut warm: Option<Vec<baton_engine::backend::PoolStats>> = None;
    for batch in batches() {
        let report = pipe
            .train_step(&batch)
            .unwrap_or_else(|e| panic!("{kind} p={p} m={m}: {e}"));
        assert!(report.loss.is_finite());
        // Receive pools: sized from the schedule, never short, filled on the first step, no allocation after.
        let pools = pipe.receive_pools();
        let needed = if batch_weight_grads {
            baton_schedules::peak_receive_buffers_batched(pipe.schedule()).unwrap()
        } else {
            baton_schedules::peak_receive_buffers(pipe.schedule()).unwrap()
        };
        for (s, pool) in pools.iter().enumerate() {
            let want = needed[s] as usize;
            assert_eq!(pool.capacity, want, "{kind} p={p} m={m} stage {s}");
            assert_eq!(
                pool.misses, 0,
                "{kind} p={p} m={m} stage {s}: the pool ran dry: {pool:?}"
            );
            assert_eq!(pool.owned, want, "{kind} p={p} m={m} stage {s}: {pool:?}");
            assert_eq!(
                pool.free, want,
                "{kind} p={p} m={m} stage {s}: a buffer was not returned: {pool:?}"
            );
            assert_eq!(want > 0, p > 1, "{kind} p={p} m={m} stage {s}: receives iff pipelined");
        }
        if let Some(warm) = &warm {
            for (s, (before, now)) in warm.iter().zip(&pools).enumerate() {
                assert_eq!(
                    now.allocations(),
                    before.allocations(),
                    "{kind} p={p} m={m} stage {s} allocated"
                );
                assert!(
                    now.hits > before.hits || p == 1,
                    "{kind} p={p} m={m} stage {s}: no receive was pooled"
                );
            }
        }
        warm = Some(pools);
        assert_eq!(
            report.peak_stashed,
            pipe.validation().peak_inflight,
            "{kind} p={p} m={m}: measured peak stashed activations differ from the validator's prediction"
        );
        losses.push(report.loss.to_bits());
    }
    let params = pipe.parameters().unwrap();
    assert_eq!(
        params["wte"].data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        params["lm_head.weight"]
            .data
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        "{kind} p={p} m={m}: tied copies differ"
    );
    Run { losses, params }
}

/// Bitwise equality where the device promises it (`tolerance() == None`), else agreement within its tolerance.
fn assert_same(d: &impl Device, a: &Run, b: &Run, what: &str) {
    if let Some(tol) = d.tolerance() {
        let (la, lb): (Vec<f32>, Vec<f32>) = a
            .losses
            .iter()
            .zip(&b.losses)
            .map(|(x, y)| (f32::from_bits(*x), f32::from_bits(*y)))
            .unzip();
        let e = common::rel_err(&lb, &la);
        assert!(e <= tol, "{what}: losses differ by {e:.2e} (tolerance {tol:.0e})");
    } else {
        assert_eq!(a.losses, b.losses, "{what}: losses differ");
    }
    assert_same_params(d, &a.params, &b.params, what);
}

/// The parameters half of [`assert_same`].
fn assert_same_params(d: &impl Device, a: &Params, b: &Params, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    if let Some(tol) = d.tolerance() {
        for (name, ta) in a {
            let e = common::rel_err(&b[name].data, &ta.data);
            assert!(
                e <= tol,
                "{what}: parameter {name} differs by {e:.2e} (tolerance {tol:.0e})"
            );
        }
        return;
    }
    for (name, ta) in a {
        let tb = &b[name];
        assert_eq!(ta.shape, tb.shape, "{what}: {name} shape");
        let diff = ta
            .data
            .iter()
            .zip(&tb.data)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(diff.is_none(), "{what}: parameter {name} differs at element {diff:?}");
    }
}

fn chunks_of(kind: ScheduleKind) -> u32 {
    match kind {
        ScheduleKind::Interleaved | ScheduleKind::ZbV => 2,
        _ => 1,
    }
}

fn every_schedule_trains_like_the_unpipelined_run(d: &impl Device) {
    let mut checked = 0;
    for m in [1u32, 2, 4, 8] {
        let reference = train(d, ScheduleKind::OneFOneB, 1, m, 1, false);
        // Training moves the loss: the test is not comparing two untouched models.
        assert_ne!(reference.losses[0], reference.losses[STEPS - 1]);
        for kind in ScheduleKind::GENERATED {
            for p in 1..=4u32 {
                // PipeDream-2BW trains differently on purpose (weights one window old; engine/tests/two_bw.rs),
                // except with one stage, where it is plain 1F1B.
                if generate(kind, p, m, chunks_of(kind)).is_err() || (kind == ScheduleKind::TwoBw && p > 1) {
                    continue;
                }
                let run = train(d, kind, p, m, chunks_of(kind), false);
                assert_same(d, &reference, &run, &format!("{kind} p={p} m={m}"));
                checked += 1;
            }
        }
    }
    // GPipe, 1F1B, ZB-H1, ZB-V: 4 × 4 × 4; interleaved: m a multiple of p.
    assert!(checked >= 64, "only {checked} configurations ran");
}

fn recomputation_changes_nothing(d: &impl Device) {
    for (kind, p, m) in [
        (ScheduleKind::OneFOneB, 4, 4),
        (ScheduleKind::ZbH1, 3, 4),
        (ScheduleKind::ZbV, 2, 4),
        (ScheduleKind::Interleaved, 2, 4),
    ] {
        let plain = train(d, kind, p, m, chunks_of(kind), false);
        let recompute = train(d, kind, p, m, chunks_of(kind), true);
        assert_same(d, &plain, &recompute, &format!("{kind} p={p} m={m} recompute"));
    }
}

fn explicit_split_equals_uniform_split(d: &impl Device) {
    let uniform = train(d, ScheduleKind::OneFOneB, 2, 4, 1, false);
    let mut cfg = PipelineConfig::new(model(), 2, ScheduleKind::OneFOneB, 4);
    cfg.split = baton_engine::StageSplit::ranges(vec![0..2, 2..8]);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = STEPS as u64;
    let mut pipe = Pipeline::new(cfg, d.stages(2)).unwrap();
    let losses = batches()
        .iter()
        .map(|b| pipe.train_step(b).unwrap().loss.to_bits())
        .collect();
    assert_same(
        d,
        &uniform,
        &Run {
            losses,
            params: pipe.parameters().unwrap(),
        },
        "split 0..2,2..8",
    );
}

/// Batched weight gradients: every layout and micro-batch count gives the parameters of one micro-batch holding
/// the whole batch (bitwise on the CPU), and the losses agree to rounding (each micro-batch's loss is summed on
/// its own). Without batching, m = 4 accumulates four products per weight and differs, so the test can tell.
fn batched_weight_grads_train_the_same_bits_for_any_micro_batch_count(d: &impl Device) {
    let one = train_with(d, ScheduleKind::OneFOneB, 1, 1, 1, false, false);
    let reference = train_with(d, ScheduleKind::OneFOneB, 1, 1, 1, false, true);
    assert_same(d, &one, &reference, "m=1 batched against m=1");
    let mut checked = 0;
    for (kind, p, m, recompute) in [
        (ScheduleKind::OneFOneB, 1, 2, false),
        (ScheduleKind::OneFOneB, 1, 8, false),
        (ScheduleKind::OneFOneB, 2, 4, false),
        (ScheduleKind::OneFOneB, 2, 4, true),
        (ScheduleKind::GPipe, 4, 8, false),
        (ScheduleKind::ZbH1, 3, 4, false),
        (ScheduleKind::ZbV, 2, 4, false),
        (ScheduleKind::Interleaved, 2, 4, false),
    ] {
        let what = format!("batched {kind} p={p} m={m} recompute={recompute}");
        let run = train_with(d, kind, p, m, chunks_of(kind), recompute, true);
        let want: Vec<f32> = reference.losses.iter().map(|&x| f32::from_bits(x)).collect();
        let got: Vec<f32> = run.losses.iter().map(|&x| f32::from_bits(x)).collect();
        let e = common::rel_err(&got, &want);
        assert!(e <= 1e-5, "{what}: losses differ by {e:.2e}");
        assert_same_params(d, &reference.params, &run.params, &what);
        checked += 1;
    }
    assert_eq!(checked, 8);
    if d.tolerance().is_none() {
        let unbatched = train(d, ScheduleKind::OneFOneB, 1, 4, 1, false);
        let differs = unbatched.params.iter().any(|(name, t)| {
            t.data
                .iter()
                .zip(&reference.params[name].data)
                .any(|(x, y)| x.to_bits() != y.to_bits())
        });
        assert!(
            differs,
            "unbatched m=4 should accumulate its weight gradients in four products"
        );
    }
}
