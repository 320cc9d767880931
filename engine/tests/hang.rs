//! A stage that hangs and ignores the abort flag: the watchdog reports it, the executor stops
//! waiting (detaching the thread, whose state is lost), and the pipeline refuses further steps
//! with `Lost` instead of silently training without that stage. (Its own test binary: the
//! detached thread sleeps until the process exits.)

mod common;

use std::time::{Duration, Instant};

use baton_engine::executor::{FailureKind, FailurePoint};
use baton_engine::{Cpu, EngineError, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;

#[test]
fn a_hung_stage_is_detached_and_the_pipeline_is_marked_lost() {
    let data = common::batches(1);
    let mut cfg = PipelineConfig::new(common::tiny_model(), 4, ScheduleKind::OneFOneB, 4);
    cfg.recv_timeout_ms = 200;
    let mut p = Pipeline::new(cfg, vec![Cpu; 4]).unwrap();
    p.set_failure(Some(FailurePoint {
        stage: 1,
        action: 2,
        kind: FailureKind::Hang,
        step: None,
    }));
    let started = Instant::now();
    let err = p.train_step(&data[0]).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    match &err {
        EngineError::StageFailed {
            stage: 1,
            index: 2,
            cause,
            ..
        } => {
            assert!(cause.contains("stalled") && cause.contains("detached"), "{err}")
        }
        other => panic!("expected stage 1 stalled and detached, got {other}"),
    }
    assert!(matches!(p.train_step(&data[0]), Err(EngineError::Lost(_))));
    assert!(matches!(p.parameters(), Err(EngineError::Lost(_))));
}
