//! Discrete-event simulation of a validated schedule under a cost model.
//!
//! Each stage runs its list in order; an action starts when the stage is free and its inputs
//! have arrived (a cross-stage input arrives `latency` after its producer ends). Since the
//! per-stage orders are fixed, the simulation is a longest-path pass over the dependency
//! graph in topological order: linear in the number of actions.

use serde::Serialize;

use crate::error::ScheduleError;
use crate::graph::{DepGraph, EdgeKind};
use crate::ir::{Action, Op, Schedule};
use crate::validate::{peak_inflight, peak_weight_stash};

/// Time each op takes per model part, and the per-hop transfer latency. Units are arbitrary
/// (the CLI uses "time units"; the engine feeds measured seconds).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Costs {
    /// Forward time per part.
    pub forward: Vec<f64>,
    /// Full-backward time per part.
    pub backward: Vec<f64>,
    /// Input-gradient time per part.
    pub backward_input: Vec<f64>,
    /// Weight-gradient time per part.
    pub backward_weight: Vec<f64>,
    /// Time for an activation or gradient to cross from one stage to another.
    pub latency: f64,
}

impl Costs {
    /// The same costs for every one of `parts` parts.
    pub fn uniform(parts: u32, f: f64, b: f64, i: f64, w: f64, latency: f64) -> Self {
        let n = parts as usize;
        Costs {
            forward: vec![f; n],
            backward: vec![b; n],
            backward_input: vec![i; n],
            backward_weight: vec![w; n],
            latency,
        }
    }

    /// Unit costs: F = B = I = W = 1, no latency.
    pub fn unit(parts: u32) -> Self {
        Self::uniform(parts, 1.0, 1.0, 1.0, 1.0, 0.0)
    }

    /// The time of `op` on `part`.
    pub fn of(&self, op: Op, part: u32) -> f64 {
        let table = match op {
            Op::F => &self.forward,
            Op::B => &self.backward,
            Op::I => &self.backward_input,
            Op::W => &self.backward_weight,
        };
        table[part as usize]
    }

    pub(crate) fn check(&self, parts: u32) -> Result<(), ScheduleError> {
        for (name, table) in [
            ("F", &self.forward),
            ("B", &self.backward),
            ("I", &self.backward_input),
            ("W", &self.backward_weight),
        ] {
            if table.len() != parts as usize {
                return Err(ScheduleError::Costs(format!(
                    "{name} costs list {} parts, the schedule has {parts}",
                    table.len()
                )));
            }
            if let Some((part, v)) = table.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0) {
                return Err(ScheduleError::Costs(format!(
                    "{name} cost of part {part} is {v}; costs must be finite and >= 0"
                )));
            }
        }
        if !self.latency.is_finite() || self.latency < 0.0 {
            return Err(ScheduleError::Costs(format!(
                "latency is {}; it must be finite and >= 0",
                self.latency
            )));
        }
        Ok(())
    }
}

/// When one action ran in the simulation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Span {
    /// The action.
    pub action: Action,
    /// Model part it computed.
    pub part: u32,
    /// Start time.
    pub start: f64,
    /// End time.
    pub end: f64,
}

/// The simulation's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimReport {
    /// Time from the first start to the last end.
    pub makespan: f64,
    /// Per stage: time spent computing.
    pub busy: Vec<f64>,
    /// Per stage: `makespan - busy`.
    pub idle: Vec<f64>,
    /// Idle time over all stages divided by `stages * makespan`.
    pub bubble: f64,
    /// Per stage: peak stashed activations (see [`crate::Validation::peak_inflight`]).
    pub peak_inflight: Vec<u32>,
    /// Per stage: peak weight-gradient stashes.
    pub peak_weight_stash: Vec<u32>,
    /// Per stage, in list order: when each action ran.
    pub spans: Vec<Vec<Span>>,
}

/// Validates and simulates `schedule` under `costs`.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<SimReport, ScheduleError> {
    costs.check(schedule.placement.num_parts())?;
    let graph = DepGraph::build(schedule)?;
    let order = graph.run_order()?;
    let mut end = vec![0.0f64; graph.nodes.len()];
    let mut start = vec![0.0f64; graph.nodes.len()];
    for &id in &order {
        let node = &graph.nodes[id as usize];
        let mut ready = 0.0f64;
        for &(pred, kind) in node.preds() {
            let crosses = kind == EdgeKind::Data && graph.nodes[pred as usize].stage != node.stage;
            let arrive = end[pred as usize] + if crosses { costs.latency } else { 0.0 };
            ready = ready.max(arrive);
        }
        start[id as usize] = ready;
        end[id as usize] = ready + costs.of(node.action.op, node.part);
    }
    let makespan = end.iter().copied().fold(0.0, f64::max);
    let stages = schedule.stages() as usize;
    let spans: Vec<Vec<Span>> = (0..stages)
        .map(|s| {
            let range = graph.stage_start[s] as usize..graph.stage_start[s + 1] as usize;
            range
                .map(|id| {
                    let node = &graph.nodes[id];
                    Span {
                        action: node.action,
                        part: node.part,
                        start: start[id],
                        end: end[id],
                    }
                })
                .collect()
        })
        .collect();
    let busy: Vec<f64> = spans
        .iter()
        .map(|list| list.iter().map(|sp| sp.end - sp.start).sum())
        .collect();
    let idle: Vec<f64> = busy.iter().map(|b| (makespan - b).max(0.0)).collect();
    let bubble = if makespan > 0.0 {
        idle.iter().sum::<f64>() / (stages as f64 * makespan)
    } else {
        0.0
    };
    Ok(SimReport {
        makespan,
        busy,
        idle,
        bubble,
        peak_inflight: peak_inflight(schedule),
        peak_weight_stash: peak_weight_stash(schedule),
        spans,
    })
}
