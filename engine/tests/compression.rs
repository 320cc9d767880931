//! Less communication between replicas, on the CPU backend: gradient compression (bf16, PowerSGD, top-k with error
//! feedback) and local SGD (DiLoCo).
//!
//! - every mode is bitwise reproducible run to run and leaves every replica with the same parameters after every
//!   step (after every outer step under DiLoCo), with and without overlap;
//! - bf16 and PowerSGD (per tensor) do not depend on the stage count; the bytes per step fall as promised;
//! - error feedback (top-k, PowerSGD) and DiLoCo's anchor, momentum and diverged replicas are carried across a
//!   checkpoint: resuming from `sync_state` is bitwise the uninterrupted run, and dropping it is not;
//! - DiLoCo with outer lr 1 and no momentum lands on the replicas' mean; replicas diverge between outer steps and
//!   communicate nothing then.

mod common;

use baton_engine::data::Batch;
use baton_engine::pipeline::TensorMap;
use baton_engine::{Compression, Cpu, DataParallel, Pipeline, PipelineConfig, SyncMode};
use baton_schedules::ScheduleKind;
use common::rel_err;

const BATCH: usize = 8;

fn batches(n: usize) -> Vec<Batch> {
    common::batches_with(n, BATCH, common::SEQ, common::VOCAB, 0xc0de_c0de_0013)
}

fn config(p: u32, dp: DataParallel, steps: u64) -> PipelineConfig {
    let mut cfg = PipelineConfig::new(common::tiny_model(), p, ScheduleKind::OneFOneB, 2);
    cfg.optimizer.warmup_steps = 1;
    cfg.optimizer.total_steps = steps;
    cfg.optimizer.grad_clip = 1.0;
    cfg.data_parallel = dp;
    cfg
}

fn dp(compress: &str, sync: &str) -> DataParallel {
    DataParallel {
        compress: compress.parse().unwrap(),
        sync: sync.parse().unwrap(),
        // Small buckets: several per stage, so per-bucket settings matter.
        bucket_mib: 0.004,
        ..DataParallel::replicas(2)
    }
}

fn pipeline(cfg: &PipelineConfig) -> Pipeline<Cpu> {
    let d = cfg.data_parallel.replicas;
    Pipeline::new(cfg.clone(), vec![Cpu; (cfg.stages * d) as usize]).unwrap()
}

#[derive(Debug, PartialEq)]
struct Run {
    losses: Vec<u32>,
    bytes: Vec<usize>,
    params: TensorMap,
}

/// Trains `steps` steps from `start` (a fresh pipeline when `None`), checking after every step that the replicas
/// agree (under DiLoCo: after outer steps).
fn train(cfg: &PipelineConfig, pipe: Option<Pipeline<Cpu>>, data: &[Batch]) -> (Run, Pipeline<Cpu>) {
    let mut pipe = pipe.unwrap_or_else(|| pipeline(cfg));
    let local = cfg.data_parallel.sync.is_local();
    let (mut losses, mut bytes) = (Vec::new(), Vec::new());
    for batch in data {
        let r = pipe.train_step(batch).unwrap();
        assert!(r.loss.is_finite() && !r.skipped);
        losses.push(r.loss.to_bits());
        bytes.push(r.reduced_bytes);
        if !local || r.outer_step {
            let first = pipe.replica_parameters(0).unwrap();
            for rep in 1..pipe.num_replicas() {
                assert!(first == pipe.replica_parameters(rep).unwrap(), "replica {rep} diverged");
            }
        }
    }
    let params = pipe.parameters().unwrap();
    (Run { losses, bytes, params }, pipe)
}

const MODES: [&str; 5] = ["none", "bf16", "powersgd:2:0", "powersgd:1:2", "topk:0.05"];

#[test]
fn every_mode_is_reproducible_and_keeps_the_replicas_equal() {
    let data = batches(4);
    let mut dense_bytes = 0;
    for mode in MODES {
        let cfg = config(2, dp(mode, "bsp"), 4);
        let (a, _) = train(&cfg, None, &data);
        let (b, _) = train(&cfg, None, &data);
        assert_eq!(a, b, "{mode}: two runs");
        // Overlap changes no bit: the order of every sum is fixed.
        let mut no_overlap = cfg.clone();
        no_overlap.data_parallel.overlap = false;
        let (c, _) = train(&no_overlap, None, &data);
        assert_eq!(a, c, "{mode}: overlap on vs off");
        let last = *a.bytes.last().unwrap();
        match mode {
            "none" => dense_bytes = last,
            "bf16" => assert_eq!(2 * last, dense_bytes, "bf16 halves the payload"),
            "topk:0.05" => assert!(last * 8 < dense_bytes, "top-k 5%: {last} vs {dense_bytes}"),
            m => {
                assert!(last * 2 < dense_bytes, "{m}: {last} vs {dense_bytes}");
                if m == "powersgd:1:2" {
                    assert_eq!(a.bytes[0], dense_bytes, "warm-up steps are uncompressed");
                    assert_eq!(a.bytes[1], dense_bytes);
                    assert!(a.bytes[2] < dense_bytes);
                }
            }
        }
        if mode != "none" {
            let (none, _) = train(&config(2, dp("none", "bsp"), 4), None, &data);
            if mode != "powersgd:1:2" {
                assert_ne!(a.params, none.params, "{mode} changes the result");
            }
            // Lossy, not broken: the first step's loss is the same (same initial weights), and the last one stays
            // within 1% of the uncompressed run's.
            assert_eq!(a.losses[0], none.losses[0]);
            let (x, y) = (f32::from_bits(a.losses[3]), f32::from_bits(none.losses[3]));
            eprintln!("{mode}: last loss {x} vs {y} uncompressed");
            assert!(((x - y) / y).abs() < 0.01, "{mode}: last loss {x} vs {y} uncompressed");
        }
    }
}

#[test]
fn per_tensor_modes_do_not_depend_on_the_stage_count() {
    let data = batches(3);
    for mode in ["bf16", "powersgd:2:0"] {
        let (two, _) = train(&config(2, dp(mode, "bsp"), 3), None, &data);
        let (one, _) = train(&config(1, dp(mode, "bsp"), 3), None, &data);
        assert_eq!(two.losses, one.losses, "{mode}");
        assert!(two.params == one.params, "{mode}: p=2 vs p=1");
    }
}

/// Trains 4 steps straight, and 2 + 2 through a fresh pipeline restored from parameters, moments and
/// `sync_state` (what a checkpoint holds); also 2 + 2 with the sync state dropped.
fn resume_matches(mode: &str, sync: &str) {
    let data = batches(4);
    let cfg = config(2, dp(mode, sync), 4);
    let (straight, _) = train(&cfg, None, &data);
    let (_, first) = train(&cfg, None, &data[..2]);
    let values = first.parameters().unwrap();
    let (m, v) = first.optimizer_state().unwrap();
    let state = first.sync_state().unwrap();
    assert!(!state.is_empty(), "{mode} {sync}: something to carry");
    let restore = |with_state: bool| {
        let mut p = pipeline(&cfg);
        p.load(&values, Some((&m, &v))).unwrap();
        p.set_step(2);
        if with_state {
            p.load_sync_state(&state).unwrap();
        }
        train(&cfg, Some(p), &data[2..]).0
    };
    let resumed = restore(true);
    assert_eq!(
        &straight.losses[2..],
        &resumed.losses[..],
        "{mode} {sync}: losses after resume"
    );
    assert!(
        straight.params == resumed.params,
        "{mode} {sync}: parameters after resume"
    );
    let dropped = restore(false);
    assert!(
        straight.params != dropped.params,
        "{mode} {sync}: the carried state matters"
    );
}

#[test]
fn error_feedback_is_carried_across_a_checkpoint() {
    resume_matches("topk:0.05", "bsp");
    resume_matches("powersgd:2:0", "bsp");
}

#[test]
fn diloco_state_is_carried_across_a_checkpoint_mid_window() {
    // H = 4: the checkpoint after step 2 falls inside the window, with the replicas apart.
    resume_matches("none", "diloco:4");
    // The outer delta compressed, with its residual carried.
    resume_matches("topk:0.1", "diloco:2");
}

#[test]
fn diloco_synchronises_every_h_steps_only() {
    let data = batches(6);
    let cfg = config(2, dp("none", "diloco:3"), 6);
    let mut pipe = pipeline(&cfg);
    for (i, batch) in data.iter().enumerate() {
        let r = pipe.train_step(batch).unwrap();
        let outer = (i + 1) % 3 == 0;
        assert_eq!(r.outer_step, outer, "step {}", i + 1);
        assert_eq!(r.reduced_bytes > 0, outer, "step {}: bytes only on outer steps", i + 1);
        let same = pipe.replica_parameters(0).unwrap() == pipe.replica_parameters(1).unwrap();
        assert_eq!(
            same,
            outer,
            "step {}: replicas apart inside a window, equal after",
            i + 1
        );
    }
    let again = train(&cfg, None, &data).0;
    assert_eq!(again.params, pipe.parameters().unwrap(), "reproducible");
}

#[test]
fn diloco_with_unit_outer_lr_and_no_momentum_lands_on_the_replica_mean() {
    let data = batches(2);
    // Two inner steps, then the outer step with lr 1, momentum 0: anchor − mean(anchor − θ_r) = mean θ_r.
    let (synced, _) = train(&config(2, dp("none", "diloco:2:1:0"), 2), None, &data);
    // The same two inner steps with no outer step yet.
    let cfg = config(2, dp("none", "diloco:1000:1:0"), 2);
    let (_, apart) = train(&cfg, None, &data);
    let (a, b) = (
        apart.replica_parameters(0).unwrap(),
        apart.replica_parameters(1).unwrap(),
    );
    assert!(a != b, "the replicas diverged");
    for (name, t) in &synced.params {
        let mean: Vec<f32> = a[name]
            .data
            .iter()
            .zip(&b[name].data)
            .map(|(x, y)| 0.5 * (x + y))
            .collect();
        let e = rel_err(&t.data, &mean);
        assert!(e < 1e-5, "`{name}`: {e:e}");
    }
}

#[test]
fn bad_combinations_are_refused_clearly() {
    let mut bad = dp("none", "diloco:4");
    bad.zero = true;
    let e = Pipeline::new(config(2, bad, 2), vec![Cpu; 4])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("ZeRO-1") && e.contains("diloco:4"), "{e}");
    for (what, text) in [("compress", "topk:2"), ("sync", "diloco:0")] {
        let e = if what == "compress" {
            text.parse::<Compression>().unwrap_err().to_string()
        } else {
            text.parse::<SyncMode>().unwrap_err().to_string()
        };
        assert!(e.contains(what), "{e}");
    }
}

#[test]
fn auto_compresses_only_what_a_slow_link_cannot_hide() {
    let data = batches(3);
    let run = |gbps: f64| {
        let mut dp = dp("auto", "bsp");
        dp.link_gbps = Some(gbps);
        let mut pipe = pipeline(&config(2, dp, 3));
        data.iter().map(|b| pipe.train_step(b).unwrap()).collect::<Vec<_>>()
    };
    // The first step measures (fp32); the plan follows from it.
    let fast = run(1e6);
    let slow = run(1e-4);
    for r in [&fast[0], &slow[0]] {
        assert!(r.compress.iter().flatten().all(|m| *m == Compression::None));
    }
    assert!(
        fast[1..]
            .iter()
            .all(|r| r.compress.iter().flatten().all(|m| *m == Compression::None)),
        "a fast link hides fp32: {:?}",
        fast[2].compress
    );
    // 0.1 Mbit/s hides nothing: every bucket takes the last rung, and the bytes fall with it.
    let last = *baton_engine::compress::auto_ladder().last().unwrap();
    assert!(
        slow[1..]
            .iter()
            .all(|r| r.compress.iter().flatten().all(|m| *m == last)),
        "{:?}",
        slow[1].compress
    );
    assert!(slow[2].reduced_bytes * 20 < fast[2].reduced_bytes);
    // Links in between give a per-bucket mix whose exact form follows the measured times of the step before, so it
    // is not asserted here (it moved with the machine's load in CI); the mix itself is tested on given times in
    // `compress::tests::auto_takes_the_least_lossy_rung_that_hides`.
}

#[test]
fn compression_composes_with_zero1() {
    // ZeRO-1 steps each tensor on its owner and broadcasts it: with compressed gradients, the same bits.
    let data = batches(3);
    for mode in ["bf16", "powersgd:2:0", "topk:0.05"] {
        let (plain, unsharded) = train(&config(2, dp(mode, "bsp"), 3), None, &data);
        let mut z = dp(mode, "bsp");
        z.zero = true;
        let (sharded, pipe) = train(&config(2, z, 3), None, &data);
        assert_eq!(plain, sharded, "{mode}: ZeRO-1 vs unsharded");
        // Every replica of the unsharded run holds all moments; sharded, the two replicas hold them once between them.
        let total = |p: &Pipeline<Cpu>| -> usize { p.optimizer_bytes().iter().map(|r| r.iter().sum::<usize>()).sum() };
        assert_eq!(2 * total(&pipe), total(&unsharded), "{mode}: moments are sharded");
    }
}
