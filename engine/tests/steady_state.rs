//! The CPU backend allocates no tensor buffer in the steady state of a step: after warm-up every buffer the
//! layers and ops ask for comes from the scratch cache (same lengths, same pattern every step). Unpipelined, the
//! first step is the whole warm-up; with stages running at once, how many buffers of one length are alive
//! together depends on timing, so the cache may grow for a few steps before it holds the most that occur.
//! (Its own test binary: the cache is process-wide.)

mod common;

use baton_engine::backend::scratch::scratch;
use baton_engine::{Cpu, Pipeline, PipelineConfig};
use baton_schedules::ScheduleKind;

fn pipeline(kind: ScheduleKind, p: u32) -> Pipeline<Cpu> {
    Pipeline::new(
        PipelineConfig::new(common::tiny_model(), p, kind, 4),
        vec![Cpu; p as usize],
    )
    .unwrap()
}

/// One test, so nothing else uses the process-wide cache meanwhile.
#[test]
fn steady_state_steps_allocate_nothing() {
    unpipelined_steps_after_the_first_allocate_nothing();
    pipelined_steps_stop_allocating_within_a_few_steps();
}

fn unpipelined_steps_after_the_first_allocate_nothing() {
    let first = scratch().stats().allocations;
    let mut pipe = pipeline(ScheduleKind::OneFOneB, 1);
    let batches = common::batches(4);
    pipe.train_step(&batches[0]).unwrap();
    let before = scratch().stats();
    assert!(before.allocations > first, "the first step must fill the cache");
    for batch in &batches[1..] {
        pipe.train_step(batch).unwrap();
    }
    let after = scratch().stats();
    assert_eq!(after.allocations, before.allocations, "steps after the first allocated");
    assert!(after.hits > before.hits, "nothing was served from the cache");
}

fn pipelined_steps_stop_allocating_within_a_few_steps() {
    for kind in [ScheduleKind::OneFOneB, ScheduleKind::ZbH1] {
        let mut pipe = pipeline(kind, 4);
        let batches = common::batches(16);
        // Steps in a row that allocated nothing.
        let mut quiet = 0;
        let mut allocated = Vec::new();
        for batch in &batches {
            let before = scratch().stats().allocations;
            pipe.train_step(batch).unwrap();
            let n = scratch().stats().allocations - before;
            allocated.push(n);
            quiet = if n == 0 { quiet + 1 } else { 0 };
            if quiet == 3 {
                break;
            }
        }
        assert_eq!(quiet, 3, "{kind}: allocations per step {allocated:?}");
    }
}
