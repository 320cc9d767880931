//! The memory estimate against what the executor measures: per stage, the estimated peak stash bytes of every
//! schedule family (with and without recomputation, with and without batched weight gradients) must be within 25%
//! of the step's measured peak.

mod common;

use std::sync::Arc;

use baton_engine::memory::{estimate_gpt2, StashPolicy};
use baton_engine::{Cpu, Gpt2, Model, Pipeline, StageSplit, TrainOptions};
use baton_schedules::{generate, ScheduleKind};

#[test]
fn estimated_stash_bytes_are_within_25_percent_of_the_measured_peak_per_stage() {
    let cfg = common::tiny_model();
    let batch = &common::batches(1)[0];
    for (kind, p, m, v) in [
        (ScheduleKind::GPipe, 4, 4, 1),
        (ScheduleKind::OneFOneB, 4, 8, 1),
        (ScheduleKind::OneFOneB, 2, 4, 1),
        (ScheduleKind::Interleaved, 2, 4, 2),
        (ScheduleKind::ZbH1, 4, 8, 1),
        (ScheduleKind::ZbV, 2, 4, 2),
    ] {
        for (recompute, batch_weight_grads) in [(false, false), (true, false), (false, true), (true, true)] {
            let policy = StashPolicy {
                recompute,
                batch_weight_grads,
            };
            let model = Arc::new(Gpt2::new(cfg.clone(), 7).unwrap());
            let schedule = generate(kind, p, m, v).unwrap();
            let ranges = StageSplit::Uniform
                .resolve::<Cpu>(model.as_ref() as &dyn Model<Cpu>, (p * v) as usize)
                .unwrap();
            let est = estimate_gpt2(
                &cfg,
                &schedule,
                &ranges,
                common::BATCH / m as usize,
                common::SEQ,
                policy,
                0,
            );
            let mut pipeline = Pipeline::builder(model)
                .schedule(schedule)
                .split(StageSplit::Uniform)
                .options(TrainOptions {
                    recompute,
                    batch_weight_grads,
                    ..TrainOptions::default()
                })
                .build(vec![Cpu; p as usize])
                .unwrap();
            let report = pipeline.train_step(batch).unwrap();
            for (s, (&measured, &estimated)) in report.peak_stash_bytes.iter().zip(&est.stash_bytes).enumerate() {
                if measured == 0 {
                    assert_eq!(estimated, 0, "{kind:?} {policy:?} stage {s}: nothing is stashed");
                    continue;
                }
                let ratio = estimated as f64 / measured as f64;
                assert!(
                    (0.75..=1.25).contains(&ratio),
                    "{kind:?} p={p} m={m} v={v} {policy:?} stage {s}: estimated {estimated} B, measured \
                     {measured} B (ratio {ratio:.2})"
                );
            }
        }
    }
}

#[test]
fn the_2bw_estimate_counts_its_weight_and_moment_copies() {
    let cfg = common::tiny_model();
    let model = Gpt2::new(cfg.clone(), 7).unwrap();
    let ranges = StageSplit::Uniform
        .resolve::<Cpu>(&model as &dyn Model<Cpu>, 2)
        .unwrap();
    let est = |kind| {
        let schedule = generate(kind, 2, 4, 1).unwrap();
        estimate_gpt2(&cfg, &schedule, &ranges, 2, common::SEQ, StashPolicy::default(), 1000)
    };
    let (plain, two_bw) = (est(ScheduleKind::OneFOneB), est(ScheduleKind::TwoBw));
    assert_eq!(two_bw.params_bytes, 6 * plain.params_bytes);
    assert_eq!(two_bw.adam_bytes, 2 * plain.adam_bytes);
    assert_eq!(two_bw.grads_bytes, plain.grads_bytes);
    assert!(two_bw.total_bytes() > plain.total_bytes());
}
