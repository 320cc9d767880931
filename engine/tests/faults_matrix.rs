//! The fault-injection matrix: an injected panic or error on every stage at every action kind,
//! for 1F1B and ZB-H1 at p = 4. Each ends the step with `StageFailed` naming the stage and the
//! action within a bounded time, changes nothing in the model, and the retried step equals a
//! clean run; every worker thread is joined. (Its own test binary, so the thread count is ours.)

mod common;

use std::time::{Duration, Instant};

use baton_engine::executor::{FailureKind, FailurePoint};
use baton_engine::{Backend, EngineError, Pipeline, PipelineConfig};
use baton_schedules::{Op, ScheduleKind};
use common::{batches, tiny_model, Device};

on_every_backend!(injected_failures_are_contained);

fn pipeline<D: Device>(d: &D, kind: ScheduleKind, timeout_ms: u64) -> Pipeline<D::B> {
    let mut cfg = PipelineConfig::new(tiny_model(), 4, kind, 4);
    cfg.recv_timeout_ms = timeout_ms;
    Pipeline::new(cfg, d.stages(4)).unwrap()
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn bits<B: Backend>(p: &Pipeline<B>) -> Vec<u32> {
    p.parameters()
        .unwrap()
        .values()
        .flat_map(|t| t.data.iter().map(|x| x.to_bits()))
        .collect()
}

/// Every stage × every action kind × {panic, error}, for 1F1B and ZB-H1 at p = 4.
fn injected_failures_are_contained(d: &impl Device) {
    std::panic::set_hook(Box::new(|_| {})); // the injected panics are expected
    let data = batches(3);
    // The CPU backend's compute pool lives for the process: start it before counting.
    let _ = baton_kernels::fast::threads();
    let baseline_threads = threads();
    let mut cases = 0;
    for kind in [ScheduleKind::OneFOneB, ScheduleKind::ZbH1] {
        // What an undisturbed run gives after two steps.
        let mut clean = pipeline(d, kind, 5_000);
        clean.train_step(&data[0]).unwrap();
        clean.train_step(&data[1]).unwrap();
        let want = bits(&clean);
        let schedule = clean.schedule().clone();
        for stage in 0..4u32 {
            for op in [Op::F, Op::B, Op::I, Op::W] {
                let Some(index) = schedule.actions[stage as usize].iter().position(|a| a.op == op) else {
                    continue;
                };
                for fault in [FailureKind::Panic, FailureKind::Error] {
                    let mut p = pipeline(d, kind, 5_000);
                    p.train_step(&data[0]).unwrap();
                    let before = bits(&p);
                    p.set_failure(Some(FailurePoint {
                        stage,
                        action: index,
                        kind: fault,
                        step: None,
                    }));
                    let started = Instant::now();
                    let err = p.train_step(&data[1]).unwrap_err();
                    assert!(
                        started.elapsed() < Duration::from_secs(3),
                        "{kind} stage {stage} {op}: took {:?}",
                        started.elapsed()
                    );
                    match &err {
                        EngineError::StageFailed {
                            stage: s,
                            index: i,
                            action,
                            cause,
                        } => {
                            assert_eq!((*s, *i), (stage, index), "{kind} {fault:?}: {err}");
                            assert_eq!(action, &schedule.actions[stage as usize][index].to_string());
                            let needle = if fault == FailureKind::Panic {
                                "panic"
                            } else {
                                "injected error"
                            };
                            assert!(cause.contains(needle), "{err}");
                        }
                        other => panic!("{kind} stage {stage} {op} {fault:?}: expected StageFailed, got {other}"),
                    }
                    assert_eq!(bits(&p), before, "a failed step changed the model");
                    // The failure fired once; the step now succeeds and matches the clean run.
                    p.train_step(&data[1]).unwrap();
                    assert_eq!(
                        bits(&p),
                        want,
                        "{kind} stage {stage} {op} {fault:?}: retry differs from a clean run"
                    );
                    cases += 1;
                }
            }
        }
    }
    // 1F1B: F and B on 4 stages; ZB-H1: F, I and W on 4 stages; × 2 fault kinds.
    assert_eq!(cases, (4 * 2 + 4 * 3) * 2);
    // Every worker thread was joined.
    let deadline = Instant::now() + Duration::from_secs(2);
    while threads() > baseline_threads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        threads() <= baseline_threads,
        "{} threads left, {} before",
        threads(),
        baseline_threads
    );
}
