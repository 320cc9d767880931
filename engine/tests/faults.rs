//! Failure containment: an injected panic or error on any stage at any action kind ends the step
//! with `StageFailed` naming the stage and the action, quickly; every thread is joined; nothing
//! changes in the model; the next step trains as if the failed one never happened. A stalled
//! stage is caught by the watchdog. A NaN is skipped (or aborts), and reported with the stage
//! where it first appeared. Written once for every backend (`on_every_backend!`).

mod common;

use std::time::{Duration, Instant};

use baton_engine::executor::{FailureKind, FailurePoint};
use baton_engine::pipeline::NonFinitePolicy;
use baton_engine::{Backend, EngineError, Pipeline, PipelineConfig};
use baton_schedules::{Op, ScheduleKind};
use common::{batches, tiny_model, Device};

on_every_backend!(
    a_stalled_stage_is_caught_by_the_watchdog,
    nan_skips_the_step_and_names_the_stage,
    nan_loss_read_back_at_the_end_still_names_the_head_stage,
    nan_with_abort_policy_and_consecutive_skips_fail_clearly
);

fn pipeline<D: Device>(d: &D, kind: ScheduleKind, timeout_ms: u64) -> Pipeline<D::B> {
    let mut cfg = PipelineConfig::new(tiny_model(), 4, kind, 4);
    cfg.recv_timeout_ms = timeout_ms;
    Pipeline::new(cfg, d.stages(4)).unwrap()
}

fn bits<B: Backend>(p: &Pipeline<B>) -> Vec<u32> {
    p.parameters()
        .unwrap()
        .values()
        .flat_map(|t| t.data.iter().map(|x| x.to_bits()))
        .collect()
}

fn a_stalled_stage_is_caught_by_the_watchdog(d: &impl Device) {
    let data = batches(2);
    let mut p = pipeline(d, ScheduleKind::OneFOneB, 300);
    p.set_failure(Some(FailurePoint {
        stage: 2,
        action: 3,
        kind: FailureKind::Stall,
        step: None,
    }));
    let started = Instant::now();
    let err = p.train_step(&data[0]).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        took >= Duration::from_millis(300),
        "the watchdog fired before its deadline: {took:?}"
    );
    match &err {
        EngineError::StageFailed {
            stage: 2,
            index: 3,
            cause,
            ..
        } => assert!(cause.contains("stalled"), "{err}"),
        other => panic!("expected stage 2 stalled, got {other}"),
    }
    // The stalled thread noticed the abort and came back: the pipeline still works.
    p.train_step(&data[1]).unwrap();
}

fn nan_skips_the_step_and_names_the_stage(d: &impl Device) {
    let data = batches(3);
    let mut p = pipeline(d, ScheduleKind::OneFOneB, 5_000);
    p.train_step(&data[0]).unwrap();
    let before = bits(&p);
    // Stage 2's first forward emits NaN: the loss is NaN, the step is skipped.
    p.set_failure(Some(FailurePoint {
        stage: 2,
        action: 0,
        kind: FailureKind::Nan,
        step: None,
    }));
    let report = p.train_step(&data[1]).unwrap();
    assert!(report.skipped && !report.loss.is_finite());
    assert_eq!(report.nonfinite_stage, Some(2));
    assert_eq!(report.step, 1, "no optimizer step was taken");
    assert_eq!(bits(&p), before);
    let report = p.train_step(&data[1]).unwrap();
    assert!(!report.skipped && report.loss.is_finite());
}

/// The loss stays on the device until the stage's list is done: a NaN loss from the head's forward is still
/// caught, and attributed to the last stage's forward, even though it is read back only after later actions.
fn nan_loss_read_back_at_the_end_still_names_the_head_stage(d: &impl Device) {
    let data = batches(2);
    let mut p = pipeline(d, ScheduleKind::OneFOneB, 5_000);
    p.train_step(&data[0]).unwrap();
    let before = bits(&p);
    // Stage 3 (the head) poisons its second forward: micro-batch 1's loss.
    let index = p.schedule().actions[3]
        .iter()
        .position(|a| a.op == Op::F && a.mb == 1)
        .unwrap();
    p.set_failure(Some(FailurePoint {
        stage: 3,
        action: index,
        kind: FailureKind::Nan,
        step: None,
    }));
    let report = p.train_step(&data[1]).unwrap();
    assert!(report.skipped && report.loss.is_nan(), "{report:?}");
    assert_eq!(report.nonfinite_stage, Some(3));
    assert_eq!(bits(&p), before, "a skipped step changes nothing");
}

fn nan_with_abort_policy_and_consecutive_skips_fail_clearly(d: &impl Device) {
    let data = batches(1);
    let mut cfg = PipelineConfig::new(tiny_model(), 4, ScheduleKind::ZbH1, 4);
    cfg.nonfinite = NonFinitePolicy::Abort;
    let mut p = Pipeline::new(cfg, d.stages(4)).unwrap();
    // A NaN gradient leaving stage 3's first input-gradient action.
    let index = p.schedule().actions[3].iter().position(|a| a.op == Op::I).unwrap();
    p.set_failure(Some(FailurePoint {
        stage: 3,
        action: index,
        kind: FailureKind::Nan,
        step: None,
    }));
    let err = p.train_step(&data[0]).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            EngineError::NonFinite {
                stage: Some(3),
                what: "gradient norm",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("stage 3") && text.contains("abort"), "{text}");

    let mut cfg = PipelineConfig::new(tiny_model(), 2, ScheduleKind::OneFOneB, 2);
    cfg.max_consecutive_skips = 3;
    let mut p = Pipeline::new(cfg, d.stages(2)).unwrap();
    for i in 1..=3u32 {
        p.set_failure(Some(FailurePoint {
            stage: 0,
            action: 0,
            kind: FailureKind::Nan,
            step: None,
        }));
        let r = p.train_step(&data[0]);
        if i < 3 {
            assert!(r.unwrap().skipped);
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("3 consecutive skipped steps"), "{e}");
        }
    }
}

#[test]
fn failure_points_parse_from_the_env_format() {
    let p: FailurePoint = "stage:2,action:7,kind:panic".parse().unwrap();
    assert_eq!(
        p,
        FailurePoint {
            stage: 2,
            action: 7,
            kind: FailureKind::Panic,
            step: None
        }
    );
    let p: FailurePoint = "stage:0, action:1, kind:nan, step:5".parse().unwrap();
    assert_eq!(p.step, Some(5));
    for bad in [
        "stage:2,action:7",
        "stage:x,action:1,kind:error",
        "stage:1,action:1,kind:explode",
        "oops",
    ] {
        assert!(bad.parse::<FailurePoint>().is_err(), "{bad}");
    }
}
