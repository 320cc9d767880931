//! The validator: a schedule is valid when every (part, micro-batch) is computed exactly once
//! on the stage holding the part, and the per-stage orders admit an execution (no deadlock).

use serde::Serialize;

use crate::error::ScheduleError;
use crate::graph::DepGraph;
use crate::ir::{Op, Schedule};

/// What the validator learnt about a valid schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Validation {
    /// Per stage: the most micro-batch activations stashed at once (+1 at F, -1 at B or I),
    /// counted per chunk. This is the number of activation stashes a stage must hold.
    pub peak_inflight: Vec<u32>,
    /// Per stage: the most weight-gradient stashes held at once (+1 at I, -1 at W).
    pub peak_weight_stash: Vec<u32>,
    /// Total compute actions.
    pub actions: usize,
}

/// Validates a schedule; see the module doc. A deadlock is reported with the cycle of actions.
pub fn validate(schedule: &Schedule) -> Result<Validation, ScheduleError> {
    let graph = DepGraph::build(schedule)?;
    graph.run_order()?;
    Ok(Validation {
        peak_inflight: peak_inflight(schedule),
        peak_weight_stash: peak_weight_stash(schedule),
        actions: graph.nodes.len(),
    })
}

/// Per-stage peak of stashed activations, from the list order alone.
pub fn peak_inflight(schedule: &Schedule) -> Vec<u32> {
    peak_by(schedule, |op| match op {
        Op::F => 1,
        Op::B | Op::I => -1,
        Op::W => 0,
    })
}

/// Per-stage peak of weight-gradient stashes (I done, W not yet), from the list order alone.
pub fn peak_weight_stash(schedule: &Schedule) -> Vec<u32> {
    peak_by(schedule, |op| match op {
        Op::I => 1,
        Op::W => -1,
        Op::F | Op::B => 0,
    })
}

fn peak_by(schedule: &Schedule, delta: impl Fn(Op) -> i64) -> Vec<u32> {
    schedule
        .actions
        .iter()
        .map(|list| {
            let (mut live, mut peak) = (0i64, 0i64);
            for a in list {
                live += delta(a.op);
                peak = peak.max(live);
            }
            peak as u32
        })
        .collect()
}
