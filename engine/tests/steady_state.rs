//! The CPU backend allocates no tensor buffer in the steady state of a step: after warm-up every buffer the
//! layers and ops ask for comes from the scratch cache (same lengths, same pattern every step). Unpipelined, the
//! first step is the whole warm-up (no allocation after it). With stages running at once, how many buffers of one
//! length are alive together depends on timing, so the cache grows now and then, by a few buffers, when a new
//! most is reached (checked: far fewer over 15 steps than one step asks for).
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
        let start = scratch().stats();
        pipe.train_step(&batches[0]).unwrap();
        let first = scratch().stats();
        // Buffers one step asks for: a cache that reused nothing would allocate that many every step.
        let per_step = (first.hits + first.allocations) - (start.hits + start.allocations);
        let mut allocated = Vec::new();
        for batch in &batches[1..] {
            let before = scratch().stats().allocations;
            pipe.train_step(batch).unwrap();
            allocated.push(scratch().stats().allocations - before);
        }
        // New buffers after the first step only when more of one length are alive at once than ever before: a
        // handful over the next 15 steps, against 15 × `per_step` without reuse.
        let later: u64 = allocated.iter().sum();
        assert!(
            later < per_step,
            "{kind}: {later} allocations over 15 steps after the first (a step asks for {per_step}): {allocated:?}"
        );
    }
}
