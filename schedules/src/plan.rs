//! The planner: the contiguous split of a model's units into pipeline parts, and the schedule, micro-batch count,
//! chunk count and recomputation setting, that minimise the *simulated* step time while every stage's peak memory
//! fits a per-stage budget.
//!
//! **Inputs.** Per unit (embedding, blocks, head, ...) and micro-batch: the F, B, I, W times and the bytes it holds
//! ([`UnitProfile`]), the per-hop transfer latency, the stage count, the micro-batch counts to consider (each with
//! its own profile: a micro-batch's size changes its costs), and a [`MemoryModel`]. A part's costs are the sums of
//! its units' ([`part_costs`]), so the embedding's, the head's and the loss's costs land on the stages that hold
//! them: the first and last stages are not assumed equal to the others.
//!
//! **Partitioner ([`partition`]).** For one [`Candidate`] (schedule family, chunks, micro-batches, recomputation,
//! generated or list-scheduled order), a depth-first search over the split points in lexicographic order, with
//! branch and bound:
//! - every complete split is *simulated* ([`crate::simulate`]; PipeDream-2BW: its steady window,
//!   [`crate::simulate_two_bw`]) and its stages' memory replayed from the schedule ([`stage_memory`]);
//! - a partial split is cut off when its stages' memory (parameters, gradients, optimizer state, one part's worth
//!   of stashes, scratch) already exceeds the budget, or when a lower bound on the step time of every completion
//!   exceeds the best time found. The bound holds for *any* schedule of the split: a stage cannot start before the
//!   first micro-batch's forwards reach its lowest part (`head`), it runs all its `m` micro-batches' work serially,
//!   and after its last input gradient the gradient still has to travel back to part 0 (`tail`):
//!   `step >= head_s + m·work_s` and `step >= head_s + m·(F_s + X_s) + tail_s` (X = B, or I with a split
//!   backward); work not yet assigned is spread over the stages that can still receive it as evenly as possible
//!   (water-filling), which can only lower the maximum; and no split beats one micro-batch's chain forward through
//!   every part and back (with a hop's latency at every stage change). For 2BW's steady window (1F1B stream over
//!   [`PLAN_TWO_BW_WINDOWS`] windows, measured between the ends of windows 0 and `w-2` on stage 0) stage s runs at
//!   least `(w-2)·m - s` whole forwards and backwards inside that interval (the ones stage 0's order has not let
//!   it start before the first end and that the last end waits for), so `window >= ((w-2)·m - s)/(w-2) · work_s`.
//!
//! Ties are broken towards the lexicographically smallest split points, and a subtree is only cut when its bound is
//! *strictly* above the best time, so the result is the one an exhaustive search returns: the first minimum in
//! lexicographic order (tested against brute force in `tests/planner.rs`). Every search is bounded by
//! [`SearchLimits`]; a search that reaches a limit returns the best split it found with `exact: false`.
//!
//! **Choice ([`plan`]).** Every candidate of the [`PlanSpace`] is partitioned; the fastest that fits wins, ties
//! going to the earlier candidate (fewer micro-batches, then the order of [`ScheduleKind::GENERATED`], fewer
//! chunks, no recomputation, generated before list-scheduled). The runner-up is the next fastest that fits, or a
//! faster one that does not fit (at its best split without the budget), with why it lost. Candidates are searched
//! most promising first (by the time of their even and balanced splits), each only for splits as fast as the
//! runner-up so far ([`partition_below`]; every candidate's best is at most its seeds' time, so the second-best
//! seed time bounds the runner-up from the start): the choice and the runner-up are those of searching every
//! candidate fully (tested), at a fraction of the cost (a 24-layer model on 4 stages: 110 candidates in 6 s
//! instead of 166 s).

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::buffers::peak_receive_buffers;
use crate::error::ScheduleError;
use crate::generate::generate;
use crate::graph::{DepGraph, EdgeKind};
use crate::ir::{Op, Placement, Schedule, ScheduleKind, CHUNKS_MAX, MICROBATCHES_MAX, STAGES_MAX};
use crate::list::{interleaved_stash_cap, list_schedule, one_f_one_b_stash_cap, ListOptions};
use crate::simulate::{simulate, Costs, SimReport};
use crate::two_bw::{simulate_two_bw, two_bw, two_bw_delay, two_bw_stream};

/// Default most complete splits one [`partition`] simulates before it stops with `exact: false`.
pub const PLAN_EVALUATIONS_MAX: u64 = 200_000;

/// Default most search nodes (partial splits) one [`partition`] visits before it stops with `exact: false`.
pub const PLAN_NODES_MAX: u64 = 20_000_000;

/// Most candidates one [`plan`] considers.
pub const PLAN_CANDIDATES_MAX: usize = 4096;

/// Most units a model may have for the planner.
pub const PLAN_UNITS_MAX: usize = 4096;

/// Windows of the PipeDream-2BW stream the planner simulates (its steady state is measured over the gaps
/// between windows 0..=2).
pub const PLAN_TWO_BW_WINDOWS: u32 = 4;

/// The chunk counts the planner tries for interleaved 1F1B by default.
pub const INTERLEAVED_CHUNKS_DEFAULT: [u32; 2] = [2, 3];

/// Index of each op in [`UnitProfile::costs`] (the engine's `predict::UnitCosts` order).
const F: usize = 0;
const B: usize = 1;
const I: usize = 2;
const W: usize = 3;

/// What one model unit (a layer: embedding, transformer block, head) costs for one micro-batch, as measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UnitProfile {
    /// Seconds of F, B, I, W for one micro-batch, in that order (any unit works; the planner only adds and compares).
    pub costs: [f64; 4],
    /// Bytes stashed from the forward until its input gradient (`B` or `I`), per micro-batch.
    pub activation_bytes: u64,
    /// Bytes held from the input gradient `I` until the weight gradient `W`, per micro-batch.
    pub weight_stash_bytes: u64,
    /// Bytes of the activation the unit passes to the next one (and of the gradient that comes back), per
    /// micro-batch; what a receive buffer at a part boundary after this unit holds. 0 for the last unit.
    pub output_bytes: u64,
    /// Bytes of the unit's parameters (a tied copy counted on every unit that holds one).
    pub param_bytes: u64,
    /// Largest temporary bytes one of the unit's ops allocates (held only while it runs).
    pub scratch_bytes: u64,
}

impl UnitProfile {
    /// The unit's costs with recomputation on or off: recomputing runs its forward again inside `B` and `I`.
    pub fn effective_costs(&self, recompute: bool) -> [f64; 4] {
        let mut c = self.costs;
        if recompute {
            c[B] += c[F];
            c[I] += c[F];
        }
        c
    }
}

/// How a stage's memory is counted, and the budget it must fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemoryModel {
    /// Most bytes one stage (device) may hold; `u64::MAX`: no budget.
    pub budget_bytes: u64,
    /// Gradient bytes per parameter byte (1 for gradients in the parameters' precision).
    pub grads_per_param: f64,
    /// Optimizer-state bytes per parameter byte (AdamW's two fp32 moments over fp32 parameters: 2).
    pub optimizer_per_param: f64,
    /// Replicas the optimizer state is sharded over (ZeRO-1 with `D` data-parallel replicas: `D`; 1: not sharded).
    pub optimizer_shards: u32,
    /// Bytes every stage holds besides the model (runtime, workspace), counted once per stage.
    pub reserve_bytes: u64,
}

impl Default for MemoryModel {
    /// No budget; AdamW in fp32 (gradients 1×, moments 2× the parameters), unsharded, nothing reserved.
    fn default() -> Self {
        MemoryModel {
            budget_bytes: u64::MAX,
            grads_per_param: 1.0,
            optimizer_per_param: 2.0,
            optimizer_shards: 1,
            reserve_bytes: 0,
        }
    }
}

impl MemoryModel {
    /// AdamW in fp32 under `budget_bytes` per stage.
    pub fn with_budget(budget_bytes: u64) -> Self {
        MemoryModel {
            budget_bytes,
            ..MemoryModel::default()
        }
    }

    fn check(&self) -> Result<(), ScheduleError> {
        for (name, v) in [
            ("grads_per_param", self.grads_per_param),
            ("optimizer_per_param", self.optimizer_per_param),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ScheduleError::Planner(format!(
                    "memory model: {name} is {v}; it must be finite and >= 0"
                )));
            }
        }
        if self.optimizer_shards == 0 {
            return Err(ScheduleError::Planner(
                "memory model: optimizer_shards is 0; use 1 for an unsharded optimizer state".into(),
            ));
        }
        Ok(())
    }
}

/// One stage's peak memory, bytes, by what holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageMemory {
    /// Parameters (PipeDream-2BW: every weight version held).
    pub params_bytes: u64,
    /// Their gradients.
    pub grads_bytes: u64,
    /// Optimizer state (sharded under ZeRO-1).
    pub optimizer_bytes: u64,
    /// The most activation and weight-gradient stash bytes held at once, replayed from the stage's action list.
    pub stash_bytes: u64,
    /// Receive buffers: the schedule's [`crate::peak_receive_buffers`] times the largest message into the stage.
    pub receive_bytes: u64,
    /// The largest temporary of one op.
    pub scratch_bytes: u64,
    /// [`MemoryModel::reserve_bytes`].
    pub reserve_bytes: u64,
}

impl StageMemory {
    /// Everything together, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.params_bytes
            .saturating_add(self.grads_bytes)
            .saturating_add(self.optimizer_bytes)
            .saturating_add(self.stash_bytes)
            .saturating_add(self.receive_bytes)
            .saturating_add(self.scratch_bytes)
            .saturating_add(self.reserve_bytes)
    }
}

/// One configuration the planner partitions and times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    /// Schedule family.
    pub kind: ScheduleKind,
    /// Chunks per stage (interleaved: 2 or more, ZB-V: 2, others: 1).
    pub chunks: u32,
    /// Micro-batches per step (2BW: per window).
    pub microbatches: u32,
    /// Stash only each part's input and recompute the forward inside the backward.
    pub recompute: bool,
    /// The order comes from the list scheduler ([`crate::list_schedule`]) under the split's own costs, at the
    /// family's memory, instead of the family's generator.
    pub list: bool,
}

impl Candidate {
    /// Number of parts (`stages × chunks`).
    pub fn parts(&self, stages: u32) -> u32 {
        stages.saturating_mul(self.chunks)
    }

    /// True when the family splits the backward into `I` and `W`.
    pub fn split_backward(&self) -> bool {
        matches!(self.kind, ScheduleKind::ZbH1 | ScheduleKind::ZbV)
    }

    /// The placement of the family on `stages` stages.
    pub fn placement(&self, stages: u32) -> Placement {
        match self.kind {
            ScheduleKind::Interleaved => Placement::looped(stages, self.chunks),
            ScheduleKind::ZbV => Placement::v_shape(stages),
            _ => Placement::linear(stages),
        }
    }

    /// The list scheduler's options for this family: its backward split and its activation memory.
    pub fn list_options(&self, stages: u32) -> ListOptions {
        let mut opts = ListOptions::new(self.kind, self.split_backward());
        opts.stash_cap = Some(match self.kind {
            ScheduleKind::Interleaved => interleaved_stash_cap(stages, self.chunks, self.microbatches),
            _ => one_f_one_b_stash_cap(stages, self.chunks, self.microbatches),
        });
        opts
    }

    /// `zb-h1 (list) v=1 m=8 recompute`.
    pub fn label(&self) -> String {
        format!(
            "{}{} v={} m={}{}",
            self.kind.name(),
            if self.list { " (list)" } else { "" },
            self.chunks,
            self.microbatches,
            if self.recompute { " recompute" } else { "" }
        )
    }
}

impl fmt::Display for Candidate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// Limits on one [`partition`]'s search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchLimits {
    /// Most complete splits simulated.
    pub evaluations_max: u64,
    /// Most partial splits visited.
    pub nodes_max: u64,
}

impl Default for SearchLimits {
    fn default() -> Self {
        SearchLimits {
            evaluations_max: PLAN_EVALUATIONS_MAX,
            nodes_max: PLAN_NODES_MAX,
        }
    }
}

/// A split of the model simulated under one candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The schedule a training step runs (2BW: one window's order).
    pub schedule: Schedule,
    /// The simulated time per optimizer step: the makespan, or 2BW's steady window.
    pub step_time: f64,
    /// The simulated bubble (2BW: of the steady window).
    pub bubble: f64,
    /// The simulation (2BW: of the flush-free stream, [`Evaluation::timeline`]).
    pub sim: SimReport,
    /// The schedule `sim` ran when it is not `schedule` (2BW's stream of [`PLAN_TWO_BW_WINDOWS`] windows).
    pub stream: Option<Schedule>,
    /// Per stage: its peak memory.
    pub memory: Vec<StageMemory>,
}

impl Evaluation {
    /// The schedule [`Evaluation::sim`] simulated (for rendering).
    pub fn timeline(&self) -> &Schedule {
        self.stream.as_ref().unwrap_or(&self.schedule)
    }

    /// The stage with the most memory and its bytes (the first such stage).
    pub fn peak_memory(&self) -> (u32, u64) {
        peak_of(&self.memory)
    }

    /// True when every stage fits `memory`'s budget.
    pub fn fits(&self, memory: &MemoryModel) -> bool {
        self.memory.iter().all(|m| m.total_bytes() <= memory.budget_bytes)
    }
}

fn peak_of(memory: &[StageMemory]) -> (u32, u64) {
    memory.iter().enumerate().fold((0u32, 0u64), |(bs, bb), (s, m)| {
        let t = m.total_bytes();
        if t > bb {
            (s as u32, t)
        } else {
            (bs, bb)
        }
    })
}

/// The best split the partitioner found for one candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Partition {
    /// The candidate.
    pub candidate: Candidate,
    /// Unit ranges per part, in part order (the placement says which stage and chunk holds each part).
    pub ranges: Vec<Range<usize>>,
    /// Its simulation and memory.
    pub evaluation: Evaluation,
    /// True when the search finished: no split of the model is faster under the budget (ties: this is the
    /// lexicographically first). False when a [`SearchLimits`] limit stopped it.
    pub exact: bool,
    /// Complete splits simulated.
    pub evaluations: u64,
    /// Partial splits visited.
    pub nodes: u64,
}

/// The costs of each part (the sums of its units' effective costs, in unit order) and the per-hop latency.
pub fn part_costs(units: &[UnitProfile], ranges: &[Range<usize>], latency: f64, recompute: bool) -> Costs {
    let sum =
        |r: &Range<usize>, k: usize| -> f64 { units[r.clone()].iter().map(|u| u.effective_costs(recompute)[k]).sum() };
    Costs {
        forward: ranges.iter().map(|r| sum(r, F)).collect(),
        backward: ranges.iter().map(|r| sum(r, B)).collect(),
        backward_input: ranges.iter().map(|r| sum(r, I)).collect(),
        backward_weight: ranges.iter().map(|r| sum(r, W)).collect(),
        latency,
    }
}

/// What one part holds, bytes.
#[derive(Clone, Copy, Debug, Default)]
struct PartBytes {
    params: u64,
    /// Stashed per micro-batch from F until B / I.
    act: u64,
    /// Held per micro-batch from I until W.
    wstash: u64,
    /// The activation it receives (0 for part 0).
    input: u64,
    /// The activation it sends (and the gradient it receives back).
    output: u64,
    scratch: u64,
}

fn part_bytes(units: &[UnitProfile], r: &Range<usize>, recompute: bool) -> PartBytes {
    let us = &units[r.clone()];
    let act: u64 = us.iter().map(|u| u.activation_bytes).fold(0, u64::saturating_add);
    let wstash: u64 = us.iter().map(|u| u.weight_stash_bytes).fold(0, u64::saturating_add);
    let input = if r.start == 0 {
        0
    } else {
        units[r.start - 1].output_bytes
    };
    let (act, wstash) = if recompute {
        // Only the part's input is kept until the backward, which recomputes the forward; what it recomputed
        // waits for the W (as the engine's memory estimate counts it).
        (input, wstash.max(act))
    } else {
        (act, wstash)
    };
    PartBytes {
        params: us.iter().map(|u| u.param_bytes).fold(0, u64::saturating_add),
        act,
        wstash,
        input,
        output: units[r.end - 1].output_bytes,
        scratch: us.iter().map(|u| u.scratch_bytes).max().unwrap_or(0),
    }
}

fn scale(bytes: u64, factor: f64) -> u64 {
    let v = (bytes as f64 * factor).ceil();
    if v >= u64::MAX as f64 {
        u64::MAX
    } else {
        v as u64
    }
}

/// Each stage's memory for `parts` under the order `replay` (validated), with `recv` receive buffers per stage.
fn memory_of(
    parts: &[PartBytes],
    replay: &Schedule,
    recv: &[u32],
    memory: &MemoryModel,
    weight_copies: u32,
) -> Vec<StageMemory> {
    let placement = &replay.placement;
    let num_parts = placement.num_parts();
    (0..replay.stages())
        .map(|s| {
            let held: Vec<u32> = (0..placement.chunks()).filter_map(|c| placement.part(s, c)).collect();
            let params = held
                .iter()
                .map(|&k| parts[k as usize].params)
                .fold(0, u64::saturating_add);
            // Replay the list: + at F, - at B; I trades the activation for the weight-gradient stash, W frees it.
            let (mut now, mut peak) = (0i128, 0i128);
            for a in &replay.actions[s as usize] {
                let Some(k) = placement.part(s, a.chunk) else {
                    continue;
                };
                let pb = &parts[k as usize];
                let (act, w) = (i128::from(pb.act), i128::from(pb.wstash));
                match a.op {
                    Op::F => now += act,
                    Op::B => now -= act,
                    Op::I => now += w - act,
                    Op::W => now -= w,
                }
                peak = peak.max(now);
            }
            // The largest message into the stage: an activation into a part whose predecessor is elsewhere, or a
            // gradient into a part whose successor is elsewhere.
            let other = |k: u32| placement.owner(k).is_some_and(|(os, _)| os != s);
            let largest = held
                .iter()
                .map(|&k| {
                    let pb = &parts[k as usize];
                    let input = if k > 0 && other(k - 1) { pb.input } else { 0 };
                    let output = if k + 1 < num_parts && other(k + 1) {
                        pb.output
                    } else {
                        0
                    };
                    input.max(output)
                })
                .max()
                .unwrap_or(0);
            StageMemory {
                params_bytes: params.saturating_mul(u64::from(weight_copies.max(1))),
                grads_bytes: scale(params, memory.grads_per_param),
                optimizer_bytes: scale(
                    params,
                    memory.optimizer_per_param / f64::from(memory.optimizer_shards.max(1)),
                ),
                stash_bytes: peak.max(0).min(i128::from(u64::MAX)) as u64,
                receive_bytes: u64::from(recv.get(s as usize).copied().unwrap_or(0)).saturating_mul(largest),
                scratch_bytes: held.iter().map(|&k| parts[k as usize].scratch).max().unwrap_or(0),
                reserve_bytes: memory.reserve_bytes,
            }
        })
        .collect()
}

/// Each stage's peak memory when `units` are split into `ranges` (one per part of `schedule`) and `schedule`'s
/// order runs (for PipeDream-2BW pass its stream: it holds what a window's order alone would not), with
/// `weight_copies` versions of the weights per stage (2BW: 2).
///
/// # Errors
/// Ranges that do not cover the units in order, one per part; whatever [`crate::peak_receive_buffers`] reports.
pub fn stage_memory(
    units: &[UnitProfile],
    ranges: &[Range<usize>],
    schedule: &Schedule,
    memory: &MemoryModel,
    recompute: bool,
    weight_copies: u32,
) -> Result<Vec<StageMemory>, ScheduleError> {
    check_ranges(ranges, units.len(), schedule.placement.num_parts())?;
    let recv = peak_receive_buffers(schedule)?;
    let parts: Vec<PartBytes> = ranges.iter().map(|r| part_bytes(units, r, recompute)).collect();
    Ok(memory_of(&parts, schedule, &recv, memory, weight_copies))
}

fn check_ranges(ranges: &[Range<usize>], units: usize, parts: u32) -> Result<(), ScheduleError> {
    if ranges.len() != parts as usize {
        return Err(ScheduleError::Planner(format!(
            "{} unit ranges for {parts} parts",
            ranges.len()
        )));
    }
    let mut next = 0;
    for (k, r) in ranges.iter().enumerate() {
        if r.start != next || r.end <= r.start {
            return Err(ScheduleError::Planner(format!(
                "part {k} holds units {}..{}; parts must be non-empty and contiguous, part {k} starting at unit {next}",
                r.start, r.end
            )));
        }
        next = r.end;
    }
    if next != units {
        return Err(ScheduleError::Planner(format!(
            "the parts end at unit {next} but the model has {units} units"
        )));
    }
    Ok(())
}

fn check_units(units: &[UnitProfile], latency: f64) -> Result<(), ScheduleError> {
    if units.is_empty() || units.len() > PLAN_UNITS_MAX {
        return Err(ScheduleError::Planner(format!(
            "{} units; the planner takes 1..={PLAN_UNITS_MAX}",
            units.len()
        )));
    }
    for (u, unit) in units.iter().enumerate() {
        if let Some((k, v)) = unit.costs.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0) {
            return Err(ScheduleError::Planner(format!(
                "unit {u}: {} cost {v}; costs must be finite and >= 0",
                Op::ALL[k]
            )));
        }
    }
    if !latency.is_finite() || latency < 0.0 {
        return Err(ScheduleError::Planner(format!(
            "latency {latency}; it must be finite and >= 0"
        )));
    }
    Ok(())
}

/// Simulates one given split under `candidate` on `stages` stages and counts its stages' memory: the reference
/// the partitioner's search agrees with (it simulates the same way, faster).
///
/// # Errors
/// Ranges that are not one contiguous, non-empty range per part covering every unit; shapes the family cannot
/// serve; invalid costs.
pub fn evaluate_split(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    ranges: &[Range<usize>],
    memory: &MemoryModel,
) -> Result<Evaluation, ScheduleError> {
    check_units(units, latency)?;
    memory.check()?;
    let (p, m, v) = (stages, candidate.microbatches, candidate.chunks);
    check_ranges(ranges, units.len(), candidate.parts(p))?;
    let costs = part_costs(units, ranges, latency, candidate.recompute);
    if candidate.kind == ScheduleKind::TwoBw {
        let schedule = two_bw(p, m, v)?;
        let report = simulate_two_bw(p, m, &costs, PLAN_TWO_BW_WINDOWS)?;
        let stream = two_bw_stream(p, m, PLAN_TWO_BW_WINDOWS)?;
        let mem = stage_memory(units, ranges, &stream, memory, candidate.recompute, report.delay + 1)?;
        return Ok(Evaluation {
            schedule,
            step_time: report.window_time,
            bubble: report.bubble,
            sim: report.stream,
            stream: Some(stream),
            memory: mem,
        });
    }
    let schedule = if candidate.list {
        list_schedule(&candidate.placement(p), m, &costs, candidate.list_options(p))?
    } else {
        generate(candidate.kind, p, m, v)?
    };
    let sim = simulate(&schedule, &costs)?;
    let mem = stage_memory(units, ranges, &schedule, memory, candidate.recompute, 1)?;
    Ok(Evaluation {
        step_time: sim.makespan,
        bubble: sim.bubble,
        sim,
        schedule,
        stream: None,
        memory: mem,
    })
}

/// The longest-path pass of [`crate::simulate`] over a fixed order, prepared once and run for many costs with
/// the same arithmetic (so the same bits).
struct Timeline {
    /// Per position in run order: the op index and the part.
    nodes: Vec<(usize, usize)>,
    /// `preds[pred_start[i]..pred_start[i + 1]]`: position of each predecessor and whether its data crosses stages.
    pred_start: Vec<u32>,
    preds: Vec<(u32, bool)>,
    /// Stage 0's positions in list order with their op and micro-batch (2BW's window ends).
    stage0: Vec<(u32, Op, u32)>,
    /// Scratch: end time per position.
    end: Vec<f64>,
}

impl Timeline {
    fn new(schedule: &Schedule) -> Result<Self, ScheduleError> {
        let graph = DepGraph::build(schedule)?;
        let order = graph.run_order()?;
        let mut position = vec![0u32; graph.nodes.len()];
        for (i, &id) in order.iter().enumerate() {
            position[id as usize] = i as u32;
        }
        let mut nodes = Vec::with_capacity(order.len());
        let mut pred_start = Vec::with_capacity(order.len() + 1);
        let mut preds = Vec::with_capacity(order.len() * 2);
        for &id in &order {
            let node = &graph.nodes[id as usize];
            let op = Op::ALL.iter().position(|&o| o == node.action.op).unwrap_or(F);
            nodes.push((op, node.part as usize));
            pred_start.push(preds.len() as u32);
            for &(pred, kind) in node.preds() {
                let crosses = kind == EdgeKind::Data && graph.nodes[pred as usize].stage != node.stage;
                preds.push((position[pred as usize], crosses));
            }
        }
        pred_start.push(preds.len() as u32);
        let stage0 = (graph.stage_start[0]..graph.stage_start[1])
            .map(|id| {
                let node = &graph.nodes[id as usize];
                (position[id as usize], node.action.op, node.action.mb)
            })
            .collect();
        let end = vec![0.0; order.len()];
        Ok(Timeline {
            nodes,
            pred_start,
            preds,
            stage0,
            end,
        })
    }

    /// End time of every action under `costs` (checked by the caller), as [`crate::simulate`] computes them.
    fn run(&mut self, costs: &Costs) {
        let table = [
            &costs.forward,
            &costs.backward,
            &costs.backward_input,
            &costs.backward_weight,
        ];
        for (i, &(op, part)) in self.nodes.iter().enumerate() {
            let mut ready = 0.0f64;
            for &(pred, crosses) in &self.preds[self.pred_start[i] as usize..self.pred_start[i + 1] as usize] {
                let arrive = self.end[pred as usize] + if crosses { costs.latency } else { 0.0 };
                ready = ready.max(arrive);
            }
            self.end[i] = ready + table[op][part];
        }
    }

    fn makespan(&mut self, costs: &Costs) -> f64 {
        self.run(costs);
        self.end.iter().copied().fold(0.0, f64::max)
    }

    /// [`crate::simulate_two_bw`]'s steady window time of a stream of `windows` windows of `m`.
    fn window_time(&mut self, costs: &Costs, m: u32, windows: u32) -> f64 {
        self.run(costs);
        let mut window_end = vec![0.0f64; windows as usize];
        for &(pos, op, mb) in &self.stage0 {
            if op.is_input_grad() || op == Op::W {
                let w = (mb / m) as usize;
                window_end[w] = window_end[w].max(self.end[pos as usize]);
            }
        }
        let last = windows as usize - 2;
        (window_end[last] - window_end[0]) / last as f64
    }
}

/// The fixed order of a generated candidate, prepared for the search.
struct Fixed {
    timeline: Timeline,
    /// The order whose memory is replayed (2BW: the stream).
    replay: Schedule,
    recv: Vec<u32>,
    /// Per part: the most of its micro-batches stashed at once (a lower bound on its stage's stash).
    part_peak: Vec<u64>,
    weight_copies: u32,
}

/// What the search minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Objective {
    /// Simulated step time under the budget.
    Time,
    /// The largest stage's memory (for saying how far the model is from fitting).
    Memory,
}

/// The best complete split so far: its objective value and split points.
struct Best {
    value: f64,
    cuts: Vec<usize>,
}

/// One partitioner search.
struct Search<'a> {
    units: &'a [UnitProfile],
    latency: f64,
    stages: u32,
    candidate: Candidate,
    memory: &'a MemoryModel,
    limits: SearchLimits,
    objective: Objective,
    n: usize,
    parts: usize,
    /// Prefix sums over units of F, X (B or I) and the whole work per micro-batch (effective costs).
    pre_f: Vec<f64>,
    pre_x: Vec<f64>,
    pre_t: Vec<f64>,
    stage_of: Vec<usize>,
    /// Per stage: its parts, ascending.
    stage_parts: Vec<Vec<usize>>,
    /// Per part: latency × stage changes from part 0 to it.
    hop: Vec<f64>,
    /// Per stage: the coefficient of its work in the bound (m; 2BW: its steady-window share).
    coef: Vec<f64>,
    fixed: Option<Fixed>,
    /// One micro-batch's chain forward through every part and back (0 for 2BW's steady window): no split is faster.
    chain: f64,
    /// Only splits at or below this time are wanted.
    cutoff: f64,
    best: Option<Best>,
    evaluations: u64,
    nodes: u64,
    stopped: bool,
    /// Scratch for the bounds.
    work_t: Vec<f64>,
    work_fx: Vec<f64>,
    head: Vec<f64>,
    tail: Vec<f64>,
    levels: Vec<(f64, f64)>,
}

impl<'a> Search<'a> {
    fn new(
        units: &'a [UnitProfile],
        latency: f64,
        stages: u32,
        candidate: Candidate,
        memory: &'a MemoryModel,
        limits: SearchLimits,
        objective: Objective,
    ) -> Result<Self, ScheduleError> {
        let p = stages;
        let m = candidate.microbatches;
        let placement = candidate.placement(p);
        let parts = placement.num_parts() as usize;
        let n = units.len();
        let split = candidate.split_backward();
        let eff: Vec<[f64; 4]> = units.iter().map(|u| u.effective_costs(candidate.recompute)).collect();
        let prefix = |f: &dyn Fn(&[f64; 4]) -> f64| {
            let mut out = Vec::with_capacity(n + 1);
            let mut acc = 0.0;
            out.push(0.0);
            for c in &eff {
                acc += f(c);
                out.push(acc);
            }
            out
        };
        let pre_f = prefix(&|c| c[F]);
        let pre_x = prefix(&|c| if split { c[I] } else { c[B] });
        let pre_t = prefix(&|c| if split { c[F] + c[I] + c[W] } else { c[F] + c[B] });
        let stage_of: Vec<usize> = (0..parts as u32)
            .map(|k| placement.owner(k).map_or(0, |(s, _)| s as usize))
            .collect();
        let mut stage_parts = vec![Vec::new(); p as usize];
        for (k, &s) in stage_of.iter().enumerate() {
            stage_parts[s].push(k);
        }
        let mut hop = vec![0.0; parts];
        let mut changes = 0u32;
        for k in 1..parts {
            if stage_of[k] != stage_of[k - 1] {
                changes += 1;
            }
            hop[k] = latency * f64::from(changes);
        }
        let is_two_bw = candidate.kind == ScheduleKind::TwoBw;
        let coef: Vec<f64> = (0..p)
            .map(|s| {
                if is_two_bw {
                    let gaps = f64::from(PLAN_TWO_BW_WINDOWS - 2);
                    ((gaps * f64::from(m) - f64::from(s)) / gaps).max(0.0)
                } else {
                    f64::from(m)
                }
            })
            .collect();
        let fixed = if candidate.list {
            None
        } else {
            let (order, replay, copies) = if is_two_bw {
                two_bw(p, m, candidate.chunks)?;
                let stream = two_bw_stream(p, m, PLAN_TWO_BW_WINDOWS)?;
                (stream.clone(), stream, two_bw_delay(p, m)? + 1)
            } else {
                let s = generate(candidate.kind, p, m, candidate.chunks)?;
                (s.clone(), s, 1)
            };
            let timeline = Timeline::new(&order)?;
            let recv = peak_receive_buffers(&replay)?;
            let part_peak = part_peaks(&replay);
            Some(Fixed {
                timeline,
                replay,
                recv,
                part_peak,
                weight_copies: copies,
            })
        };
        let chain = if is_two_bw {
            0.0
        } else {
            pre_f[n] + pre_x[n] + 2.0 * hop[parts - 1]
        };
        Ok(Search {
            units,
            latency,
            stages,
            candidate,
            memory,
            limits,
            objective,
            n,
            parts,
            pre_f,
            pre_x,
            pre_t,
            stage_of,
            stage_parts,
            hop,
            coef,
            fixed,
            chain,
            cutoff: f64::INFINITY,
            best: None,
            evaluations: 0,
            nodes: 0,
            stopped: false,
            work_t: vec![0.0; p as usize],
            work_fx: vec![0.0; p as usize],
            head: vec![f64::NAN; p as usize],
            tail: vec![0.0; p as usize],
            levels: Vec::with_capacity(p as usize),
        })
    }

    fn ranges(cuts: &[usize]) -> Vec<Range<usize>> {
        let mut start = 0;
        cuts.iter()
            .map(|&end| {
                let r = start..end;
                start = end;
                r
            })
            .collect()
    }

    /// Offers a complete split: simulates it if it fits and keeps it if it is better.
    fn leaf(&mut self, cuts: &[usize]) -> Result<(), ScheduleError> {
        if self.evaluations >= self.limits.evaluations_max {
            self.stopped = true;
            return Ok(());
        }
        self.evaluations += 1;
        let ranges = Self::ranges(cuts);
        let bytes: Vec<PartBytes> = ranges
            .iter()
            .map(|r| part_bytes(self.units, r, self.candidate.recompute))
            .collect();
        let costs = part_costs(self.units, &ranges, self.latency, self.candidate.recompute);
        let p = self.stages;
        let m = self.candidate.microbatches;
        let (mem, time) = match &mut self.fixed {
            Some(fixed) => {
                let mem = memory_of(&bytes, &fixed.replay, &fixed.recv, self.memory, fixed.weight_copies);
                let fits = mem.iter().all(|s| s.total_bytes() <= self.memory.budget_bytes);
                let time = match (self.objective, fits) {
                    (Objective::Time, true) if self.candidate.kind == ScheduleKind::TwoBw => {
                        fixed.timeline.window_time(&costs, m, PLAN_TWO_BW_WINDOWS)
                    }
                    (Objective::Time, true) => fixed.timeline.makespan(&costs),
                    _ => f64::NAN,
                };
                (mem, time)
            }
            None => {
                let schedule = list_schedule(&self.candidate.placement(p), m, &costs, self.candidate.list_options(p))?;
                let recv = peak_receive_buffers(&schedule)?;
                let mem = memory_of(&bytes, &schedule, &recv, self.memory, 1);
                let fits = mem.iter().all(|s| s.total_bytes() <= self.memory.budget_bytes);
                let time = if self.objective == Objective::Time && fits {
                    simulate(&schedule, &costs)?.makespan
                } else {
                    f64::NAN
                };
                (mem, time)
            }
        };
        let value = match self.objective {
            Objective::Time if time.is_nan() || time > self.cutoff => return Ok(()),
            Objective::Time => time,
            Objective::Memory => peak_of(&mem).1 as f64,
        };
        let better = match &self.best {
            None => true,
            Some(b) => value < b.value || (value == b.value && cuts < b.cuts.as_slice()),
        };
        if better {
            self.best = Some(Best {
                value,
                cuts: cuts.to_vec(),
            });
        }
        Ok(())
    }

    /// A lower bound on the largest memory of the stages holding the fixed parts `cuts` (every completion holds at
    /// least this on some stage), non-decreasing as the last part grows; 0 when nothing needs it.
    fn memory_bound(&self, cuts: &[usize]) -> u64 {
        if self.memory.budget_bytes == u64::MAX && self.objective == Objective::Time {
            return 0;
        }
        let p = self.stages as usize;
        let mut params = vec![0u64; p];
        let mut stash = vec![0u64; p];
        let mut scratch = vec![0u64; p];
        let mut start = 0;
        for (k, &end) in cuts.iter().enumerate() {
            let pb = part_bytes(self.units, &(start..end), self.candidate.recompute);
            let s = self.stage_of[k];
            params[s] = params[s].saturating_add(pb.params);
            let peak = self.fixed.as_ref().map_or(1, |f| f.part_peak[k]);
            stash[s] = stash[s].max(pb.act.saturating_mul(peak));
            scratch[s] = scratch[s].max(pb.scratch);
            start = end;
        }
        let mem = self.memory;
        let copies = u64::from(self.fixed.as_ref().map_or(1, |f| f.weight_copies));
        (0..p)
            .map(|s| {
                params[s]
                    .saturating_mul(copies)
                    .saturating_add(scale(params[s], mem.grads_per_param))
                    .saturating_add(scale(
                        params[s],
                        mem.optimizer_per_param / f64::from(mem.optimizer_shards.max(1)),
                    ))
                    .saturating_add(stash[s])
                    .saturating_add(scratch[s])
                    .saturating_add(mem.reserve_bytes)
            })
            .max()
            .unwrap_or(0)
    }

    /// A lower bound on the step time of every completion of the fixed parts `cuts` (see the module docs).
    fn time_bound(&mut self, cuts: &[usize]) -> f64 {
        let p = self.stages as usize;
        let fixed = cuts.len();
        let cut = cuts.last().copied().unwrap_or(0);
        self.work_t.iter_mut().for_each(|w| *w = 0.0);
        self.work_fx.iter_mut().for_each(|w| *w = 0.0);
        self.head.iter_mut().for_each(|h| *h = f64::NAN);
        let mut start = 0;
        for (k, &end) in cuts.iter().enumerate() {
            let s = self.stage_of[k];
            self.work_t[s] += self.pre_t[end] - self.pre_t[start];
            self.work_fx[s] += (self.pre_f[end] - self.pre_f[start]) + (self.pre_x[end] - self.pre_x[start]);
            if self.head[s].is_nan() {
                self.head[s] = self.pre_f[start] + self.hop[k];
                self.tail[s] = self.pre_x[start] + self.hop[k];
            }
            start = end;
        }
        let two_bw = self.candidate.kind == ScheduleKind::TwoBw;
        let mut lb = self.chain;
        self.levels.clear();
        for s in 0..p {
            let c = self.coef[s];
            let known = !self.head[s].is_nan();
            let base = if two_bw {
                0.0
            } else if known {
                self.head[s]
            } else {
                // Its parts all start at or after the cut.
                self.stage_parts[s]
                    .iter()
                    .find(|&&k| k >= fixed)
                    .map_or(0.0, |&k| self.pre_f[cut] + self.hop[k])
            };
            let level = base + c * self.work_t[s];
            lb = lb.max(level);
            if known && !two_bw {
                lb = lb.max(self.head[s] + c * self.work_fx[s] + self.tail[s]);
            }
            if self.stage_parts[s].last().is_some_and(|&k| k >= fixed) && c > 0.0 {
                self.levels.push((level, c));
            }
        }
        if fixed < self.parts {
            let rest = self.pre_t[self.n] - self.pre_t[cut];
            lb = lb.max(water_level(&mut self.levels, rest));
        }
        lb
    }

    /// True when nothing below the fixed parts `cuts` can fit the budget, or win (or tie) against the best so
    /// far. `memory` is [`Search::memory_bound`] of `cuts`.
    fn prune(&mut self, cuts: &[usize], memory: u64) -> bool {
        if memory > self.memory.budget_bytes {
            return true;
        }
        let best = self.best.as_ref().map(|b| b.value);
        match self.objective {
            // Strictly above the best and the cutoff (with a margin for rounding in the bound): nothing there can
            // win or tie.
            Objective::Time => {
                let limit = best.map_or(self.cutoff, |b| b.min(self.cutoff));
                limit.is_finite() && self.time_bound(cuts) * (1.0 - 1e-9) > limit
            }
            // Only the least value is wanted, not the first split reaching it.
            Objective::Memory => best.is_some_and(|b| memory as f64 >= b),
        }
    }

    fn dfs(&mut self, cuts: &mut Vec<usize>) -> Result<(), ScheduleError> {
        let j = cuts.len();
        let start = cuts.last().copied().unwrap_or(0);
        if j + 1 == self.parts {
            cuts.push(self.n);
            let memory = self.memory_bound(cuts);
            if !self.prune(cuts, memory) {
                self.leaf(cuts)?;
            }
            cuts.pop();
            return Ok(());
        }
        let last = self.n - (self.parts - 1 - j);
        for end in start + 1..=last {
            if self.nodes >= self.limits.nodes_max {
                self.stopped = true;
                return Ok(());
            }
            self.nodes += 1;
            cuts.push(end);
            let memory = self.memory_bound(cuts);
            // The part only grows with `end`: once its stages do not fit, no larger end does.
            if memory > self.memory.budget_bytes {
                cuts.pop();
                break;
            }
            if !self.prune(cuts, memory) {
                self.dfs(cuts)?;
            }
            cuts.pop();
            if self.stopped {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The even split (earlier parts one unit longer) and the split that balances each part's work.
    fn seeds(&self) -> Vec<Vec<usize>> {
        let (n, parts) = (self.n, self.parts);
        let mut even = Vec::with_capacity(parts);
        let mut at = 0;
        for k in 0..parts {
            at += n / parts + usize::from(k < n % parts);
            even.push(at);
        }
        let total = self.pre_t[n];
        let mut balanced = Vec::with_capacity(parts);
        let mut prev = 0;
        for k in 0..parts {
            let lo = prev + 1;
            let hi = n - (parts - 1 - k);
            let target = total * (k + 1) as f64 / parts as f64;
            let mut end = lo;
            while end < hi && self.pre_t[end] < target {
                end += 1;
            }
            if k + 1 == parts {
                end = n;
            }
            balanced.push(end);
            prev = end;
        }
        if balanced == even {
            vec![even]
        } else {
            vec![even, balanced]
        }
    }

    fn run(&mut self) -> Result<(), ScheduleError> {
        if self.objective == Objective::Time {
            for seed in self.seeds() {
                self.leaf(&seed)?;
            }
        }
        let mut cuts = Vec::with_capacity(self.parts);
        self.dfs(&mut cuts)
    }
}

/// Per part of a validated order: the most of its micro-batches' activations stashed at once.
fn part_peaks(schedule: &Schedule) -> Vec<u64> {
    let placement = &schedule.placement;
    let mut peak = vec![0u64; placement.num_parts() as usize];
    for (s, list) in schedule.actions.iter().enumerate() {
        let mut now = vec![0u64; placement.chunks() as usize];
        for a in list {
            let c = a.chunk as usize;
            match a.op {
                Op::F => now[c] += 1,
                Op::B | Op::I => now[c] = now[c].saturating_sub(1),
                Op::W => {}
            }
            if let Some(k) = placement.part(s as u32, a.chunk) {
                peak[k as usize] = peak[k as usize].max(now[c]);
            }
        }
    }
    peak
}

/// The least `h >= max(levels)` with `sum over levels of (h - level) / coef = amount` when it exceeds every level
/// (each `(level, coef)`, `coef > 0`): spreading `amount` of work over stages at those levels as evenly as possible.
fn water_level(levels: &mut [(f64, f64)], amount: f64) -> f64 {
    if levels.is_empty() {
        return 0.0;
    }
    levels.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut inv, mut acc) = (0.0f64, 0.0f64);
    for i in 0..levels.len() {
        let (level, coef) = levels[i];
        inv += 1.0 / coef;
        acc += level / coef;
        let h = (amount + acc) / inv;
        if i + 1 == levels.len() || h <= levels[i + 1].0 {
            return h.max(level);
        }
    }
    // The loop returns at its last level.
    levels[levels.len() - 1].0
}

/// Checks the shape of a candidate on `stages` stages for `units` units.
fn check_shape(units: usize, stages: u32, candidate: &Candidate) -> Result<(), ScheduleError> {
    let unsupported = |reason: String| ScheduleError::Unsupported {
        kind: candidate.kind.name(),
        stages,
        microbatches: candidate.microbatches,
        chunks: candidate.chunks,
        reason,
    };
    if stages == 0 || stages > STAGES_MAX {
        return Err(unsupported(format!("stages must be in 1..={STAGES_MAX}")));
    }
    if candidate.microbatches == 0 || candidate.microbatches > MICROBATCHES_MAX {
        return Err(unsupported(format!("microbatches must be in 1..={MICROBATCHES_MAX}")));
    }
    if candidate.chunks == 0 || candidate.chunks > CHUNKS_MAX {
        return Err(unsupported(format!("chunks must be in 1..={CHUNKS_MAX}")));
    }
    let parts = candidate.parts(stages) as usize;
    if parts > units {
        return Err(unsupported(format!(
            "{parts} parts (stages × chunks) but the model has {units} units: every part needs at least one"
        )));
    }
    if candidate.list && candidate.kind == ScheduleKind::TwoBw {
        return Err(unsupported(
            "2BW's stream is 1F1B's order; it has no list-scheduled variant".into(),
        ));
    }
    if candidate.list && candidate.kind == ScheduleKind::Interleaved && candidate.chunks < 2 {
        return Err(unsupported("interleaving needs chunks >= 2".into()));
    }
    if candidate.kind == ScheduleKind::Custom {
        return Err(unsupported("a custom schedule is imported, not planned".into()));
    }
    Ok(())
}

/// The split of `units` (per-micro-batch profiles in pipeline order) into `candidate.chunks × stages` contiguous
/// parts that minimises the simulated step time of `candidate` on `stages` stages with per-hop `latency`, such
/// that every stage fits `memory`'s budget; see the module docs for the search and why it is exact.
///
/// # Errors
/// [`ScheduleError::MemoryBudget`] when no split fits, naming the split needing least memory (its largest stage
/// and its bytes); [`ScheduleError::Unsupported`] for shapes the family (or the model: fewer units than parts)
/// cannot serve; [`ScheduleError::Planner`] for invalid profiles or memory models, or a search that reached its
/// limits before any split fitting the budget.
pub fn partition(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    memory: &MemoryModel,
    limits: &SearchLimits,
) -> Result<Partition, ScheduleError> {
    match partition_below(units, latency, stages, candidate, memory, limits, f64::INFINITY)? {
        Some(found) => Ok(found),
        None => Err(no_fit(units, latency, stages, candidate, memory, limits)),
    }
}

/// [`partition`], looking only for splits whose step time is at most `cutoff` (branches whose bound is above it
/// are cut): `None` when no split fitting the budget is that fast (with an infinite cutoff: when none fits). How
/// [`plan`] skips candidates that cannot beat the runner-up.
///
/// # Errors
/// As [`partition`], except that a budget nothing fits is `Ok(None)`.
pub fn partition_below(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    memory: &MemoryModel,
    limits: &SearchLimits,
    cutoff: f64,
) -> Result<Option<Partition>, ScheduleError> {
    check_units(units, latency)?;
    memory.check()?;
    check_shape(units.len(), stages, candidate)?;
    let mut search = Search::new(units, latency, stages, *candidate, memory, *limits, Objective::Time)?;
    search.cutoff = cutoff;
    search.run()?;
    let (evaluations, nodes, exact) = (search.evaluations, search.nodes, !search.stopped);
    let Some(best) = search.best.take() else {
        if search.stopped {
            return Err(ScheduleError::Planner(format!(
                "{candidate}: the search stopped at its limits ({evaluations} splits simulated, {nodes} visited) \
                 before it found a split fitting {} per stage",
                bytes_text(memory.budget_bytes)
            )));
        }
        return Ok(None);
    };
    let ranges = Search::ranges(&best.cuts);
    let evaluation = evaluate_split(units, latency, stages, candidate, &ranges, memory)?;
    debug_assert_eq!(
        evaluation.step_time.to_bits(),
        best.value.to_bits(),
        "the search simulates as simulate() does"
    );
    Ok(Some(Partition {
        candidate: *candidate,
        ranges,
        evaluation,
        exact,
        evaluations,
        nodes,
    }))
}

/// A lower bound on the step time of every split of `units` under `candidate` (the search's bound before any
/// part is fixed), and the time of the better of its two seed splits (the even one and the balanced one) among
/// those that fit (infinite when neither does): what [`plan`] orders its candidates by and cuts off with.
fn bounds(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    memory: &MemoryModel,
    limits: &SearchLimits,
) -> Result<(f64, f64), ScheduleError> {
    check_shape(units.len(), stages, candidate)?;
    let mut search = Search::new(units, latency, stages, *candidate, memory, *limits, Objective::Time)?;
    let root = search.time_bound(&[]);
    for seed in search.seeds() {
        search.leaf(&seed)?;
    }
    Ok((root, search.best.map_or(f64::INFINITY, |b| b.value)))
}

/// The split with the smallest largest-stage memory and that memory, over every split (`None` when the search
/// could not tell).
fn least_memory(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    memory: &MemoryModel,
    limits: &SearchLimits,
) -> Option<(Vec<usize>, u64)> {
    let unlimited = MemoryModel {
        budget_bytes: u64::MAX,
        ..memory.clone()
    };
    let mut s = Search::new(
        units,
        latency,
        stages,
        *candidate,
        &unlimited,
        *limits,
        Objective::Memory,
    )
    .ok()?;
    s.run().ok()?;
    s.best.map(|b| (b.cuts, b.value as u64))
}

/// The error for a candidate no split of which fits: the split needing least memory, its largest stage and bytes.
fn no_fit(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    memory: &MemoryModel,
    limits: &SearchLimits,
) -> ScheduleError {
    let unlimited = MemoryModel {
        budget_bytes: u64::MAX,
        ..memory.clone()
    };
    let evaluated = least_memory(units, latency, stages, candidate, memory, limits).and_then(|(cuts, _)| {
        evaluate_split(units, latency, stages, candidate, &Search::ranges(&cuts), &unlimited).ok()
    });
    let (stage, needed_bytes, split) = match evaluated {
        Some(e) => {
            let (s, b) = e.peak_memory();
            let r = &e.memory[s as usize];
            (
                s,
                b,
                format!(
                    "parameters {}, gradients {}, optimizer {}, stash {}, receive buffers {}, scratch {}, reserved {}",
                    bytes_text(r.params_bytes),
                    bytes_text(r.grads_bytes),
                    bytes_text(r.optimizer_bytes),
                    bytes_text(r.stash_bytes),
                    bytes_text(r.receive_bytes),
                    bytes_text(r.scratch_bytes),
                    bytes_text(r.reserve_bytes)
                ),
            )
        }
        None => (0, u64::MAX, "unknown".into()),
    };
    ScheduleError::MemoryBudget {
        what: candidate.label(),
        stage,
        needed_bytes,
        budget_bytes: memory.budget_bytes,
        detail: split,
    }
}

/// `123456 bytes (0.1 MiB)`.
fn bytes_text(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The profiles of one micro-batch count: a micro-batch's size sets its costs and bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShapeProfile {
    /// Micro-batches per step.
    pub microbatches: u32,
    /// Per unit, in pipeline order, for one micro-batch of this size.
    pub units: Vec<UnitProfile>,
    /// Per-hop transfer latency of one activation or gradient of this size.
    pub latency: f64,
}

/// Which candidates [`plan`] considers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanSpace {
    /// Schedule families, in tie-break order.
    pub kinds: Vec<ScheduleKind>,
    /// Chunk counts tried for interleaved 1F1B.
    pub interleaved_chunks: Vec<u32>,
    /// Recomputation settings tried, in tie-break order.
    pub recompute: Vec<bool>,
    /// Also try the list scheduler's cost-aware order for 1F1B, ZB-H1, interleaved and ZB-V.
    pub list_orders: bool,
}

impl Default for PlanSpace {
    /// Every generated family, interleaved with 2 and 3 chunks, recomputation off and on, list orders too.
    fn default() -> Self {
        PlanSpace {
            kinds: ScheduleKind::GENERATED.to_vec(),
            interleaved_chunks: INTERLEAVED_CHUNKS_DEFAULT.to_vec(),
            recompute: vec![false, true],
            list_orders: true,
        }
    }
}

impl PlanSpace {
    /// The candidates for micro-batch count `m`, in tie-break order.
    pub fn candidates(&self, m: u32) -> Vec<Candidate> {
        let mut out = Vec::new();
        for &kind in &self.kinds {
            let chunk_options: Vec<u32> = match kind {
                ScheduleKind::Interleaved => self.interleaved_chunks.clone(),
                ScheduleKind::ZbV => vec![2],
                _ => vec![1],
            };
            let list_too = self.list_orders
                && matches!(
                    kind,
                    ScheduleKind::OneFOneB | ScheduleKind::ZbH1 | ScheduleKind::Interleaved | ScheduleKind::ZbV
                );
            for &chunks in &chunk_options {
                for &recompute in &self.recompute {
                    for list in [false, true] {
                        if list && !list_too {
                            continue;
                        }
                        out.push(Candidate {
                            kind,
                            chunks,
                            microbatches: m,
                            recompute,
                            list,
                        });
                    }
                }
            }
        }
        out
    }
}

/// What the planner is asked.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInput {
    /// Pipeline stages (devices).
    pub stages: u32,
    /// One profile per micro-batch count to consider, in tie-break order.
    pub shapes: Vec<ShapeProfile>,
    /// Memory accounting and the per-stage budget.
    pub memory: MemoryModel,
    /// Candidates per micro-batch count.
    pub space: PlanSpace,
    /// Limits of each candidate's search.
    pub limits: SearchLimits,
}

/// What became of one candidate.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Its best split fits.
    Fits {
        /// Simulated step time of its best split.
        step_time: f64,
        /// Its bubble.
        bubble: f64,
        /// Its largest stage and that stage's bytes.
        peak: (u32, u64),
        /// Its search finished.
        exact: bool,
    },
    /// No split fits the budget.
    TooBig {
        /// Which stage needs how much at the split needing least memory.
        error: ScheduleError,
        /// Without the budget (computed when the budget is finite): its best step time and that split's largest
        /// stage and bytes.
        unconstrained: Option<(f64, u32, u64)>,
    },
    /// No split that fits is as fast as the runner-up found before it (`cutoff`): searched no further.
    Slower {
        /// The step time it could not reach.
        cutoff: f64,
    },
    /// The family or the model cannot serve this shape.
    Unsupported(String),
}

/// One candidate and what became of it.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateOutcome {
    /// The candidate.
    pub candidate: Candidate,
    /// Its outcome.
    pub outcome: Outcome,
}

/// Why the runner-up lost to the chosen plan.
#[derive(Clone, Debug, PartialEq)]
pub enum LostBy {
    /// It fits and is slower by this much (in the costs' unit).
    Time {
        /// Its step time minus the chosen plan's.
        behind: f64,
    },
    /// It fits and ties; the chosen plan comes first in the tie-break order.
    Tie,
    /// It would be faster, but no split of it fits: at its fastest split this stage needs these bytes.
    Memory {
        /// Its largest stage at its fastest split.
        stage: u32,
        /// That stage's bytes.
        needed_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
}

/// The second-best candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct RunnerUp {
    /// The candidate.
    pub candidate: Candidate,
    /// Its step time (for [`LostBy::Memory`]: without the budget).
    pub step_time: f64,
    /// Why it lost.
    pub lost_by: LostBy,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The fastest candidate that fits, at its best split.
    pub best: Partition,
    /// The next best (see [`RunnerUp`]), if any other candidate was served.
    pub runner_up: Option<RunnerUp>,
    /// Every candidate considered, in tie-break order.
    pub candidates: Vec<CandidateOutcome>,
}

/// Partitions every candidate of `input.space` for every micro-batch count and picks the fastest that fits (see
/// the module docs for the order of ties and the runner-up).
///
/// Candidates are searched in the order of their lower bounds (most promising first), each only for splits at
/// least as fast as the runner-up so far ([`partition_below`]): one that cannot be is [`Outcome::Slower`], which
/// changes neither the choice nor the runner-up (both are what searching every candidate fully would give).
///
/// # Errors
/// When no candidate fits: the [`ScheduleError::MemoryBudget`] of the one closest to fitting. When no candidate
/// can be served at all, or the input is invalid: [`ScheduleError::Planner`].
pub fn plan(input: &PlanInput) -> Result<Plan, ScheduleError> {
    let p = input.stages;
    let mut all: Vec<(Candidate, usize)> = Vec::new();
    for (shape_index, shape) in input.shapes.iter().enumerate() {
        check_units(&shape.units, shape.latency)?;
        for c in input.space.candidates(shape.microbatches) {
            all.push((c, shape_index));
        }
    }
    input.memory.check()?;
    if all.is_empty() {
        return Err(ScheduleError::Planner(
            "no candidates: give at least one micro-batch count and one schedule family".into(),
        ));
    }
    if all.len() > PLAN_CANDIDATES_MAX {
        return Err(ScheduleError::Planner(format!(
            "{} candidates; at most {PLAN_CANDIDATES_MAX} (fewer micro-batch counts or families)",
            all.len()
        )));
    }
    let (memory, limits) = (&input.memory, &input.limits);
    let free = MemoryModel {
        budget_bytes: u64::MAX,
        ..memory.clone()
    };
    let mut outcomes: Vec<Option<Outcome>> = vec![None; all.len()];
    // (seed time, root bound, index): candidates whose seeds are fast first.
    let mut order: Vec<(f64, f64, usize)> = Vec::with_capacity(all.len());
    for (index, &(candidate, shape_index)) in all.iter().enumerate() {
        let shape = &input.shapes[shape_index];
        match bounds(&shape.units, shape.latency, p, &candidate, memory, limits) {
            Ok((root, seed)) => order.push((seed, root, index)),
            Err(e @ (ScheduleError::Unsupported { .. } | ScheduleError::Planner(_))) => {
                outcomes[index] = Some(Outcome::Unsupported(e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    // Each candidate's best is at most its seed time, so the runner-up's is at most the second seed time.
    let seeded = order.get(1).map_or(f64::INFINITY, |o| o.0);
    // The best and the runner-up so far among those that fit: (time, index).
    let mut best: Option<(f64, usize, Partition)> = None;
    let mut second: Option<(f64, usize)> = None;
    for &(_, _, index) in &order {
        let (candidate, shape_index) = all[index];
        let shape = &input.shapes[shape_index];
        let cutoff = second.map_or(seeded, |(t, _)| t.min(seeded));
        let found = partition_below(&shape.units, shape.latency, p, &candidate, memory, limits, cutoff);
        let outcome = match found {
            Ok(Some(part)) => {
                let e = &part.evaluation;
                let key = (e.step_time, index);
                let outcome = Outcome::Fits {
                    step_time: e.step_time,
                    bubble: e.bubble,
                    peak: e.peak_memory(),
                    exact: part.exact,
                };
                let before = |a: (f64, usize), b: (f64, usize)| a.0 < b.0 || (a.0 == b.0 && a.1 < b.1);
                match &best {
                    Some((t, i, _)) if !before(key, (*t, *i)) => {
                        if second.is_none_or(|s| before(key, s)) {
                            second = Some(key);
                        }
                    }
                    _ => {
                        second = best.as_ref().map(|(t, i, _)| (*t, *i));
                        best = Some((key.0, key.1, part));
                    }
                }
                outcome
            }
            Ok(None) => {
                // Nothing as fast as the cutoff fits: slower, or too big for the budget at any speed.
                let fits = cutoff.is_finite()
                    && (memory.budget_bytes == u64::MAX
                        || least_memory(&shape.units, shape.latency, p, &candidate, memory, limits)
                            .is_some_and(|(_, peak)| peak <= memory.budget_bytes));
                if fits {
                    Outcome::Slower { cutoff }
                } else {
                    too_big(&shape.units, shape.latency, p, &candidate, memory, &free, limits, &best)
                }
            }
            Err(e @ (ScheduleError::Unsupported { .. } | ScheduleError::Planner(_))) => {
                Outcome::Unsupported(e.to_string())
            }
            Err(e) => return Err(e),
        };
        outcomes[index] = Some(outcome);
    }
    let outcomes: Vec<CandidateOutcome> = all
        .iter()
        .zip(outcomes)
        .map(|(&(candidate, _), outcome)| CandidateOutcome {
            candidate,
            outcome: outcome.unwrap_or_else(|| Outcome::Unsupported("not considered".into())),
        })
        .collect();
    let Some((t, best_index, best)) = best else {
        let closest = outcomes
            .iter()
            .filter_map(|o| match &o.outcome {
                Outcome::TooBig {
                    error: e @ ScheduleError::MemoryBudget { needed_bytes, .. },
                    ..
                } => Some((*needed_bytes, e)),
                _ => None,
            })
            .min_by_key(|(b, _)| *b);
        return Err(match closest {
            Some((_, e)) => e.clone(),
            None => ScheduleError::Planner(format!(
                "no candidate can run {p} stages: {}",
                outcomes
                    .iter()
                    .find_map(|o| match &o.outcome {
                        Outcome::Unsupported(why) => Some(why.clone()),
                        _ => None,
                    })
                    .unwrap_or_default()
            )),
        });
    };
    let mut runner: Option<(f64, usize, RunnerUp)> = None;
    for (index, o) in outcomes.iter().enumerate() {
        if index == best_index {
            continue;
        }
        let entry = match &o.outcome {
            Outcome::Fits { step_time, .. } => Some(RunnerUp {
                candidate: o.candidate,
                step_time: *step_time,
                lost_by: if *step_time == t {
                    LostBy::Tie
                } else {
                    LostBy::Time { behind: step_time - t }
                },
            }),
            Outcome::TooBig {
                unconstrained: Some((time, stage, bytes)),
                ..
            } if *time < t => Some(RunnerUp {
                candidate: o.candidate,
                step_time: *time,
                lost_by: LostBy::Memory {
                    stage: *stage,
                    needed_bytes: *bytes,
                    budget_bytes: memory.budget_bytes,
                },
            }),
            _ => None,
        };
        if let Some(r) = entry {
            if runner.as_ref().is_none_or(|(rt, _, _)| r.step_time < *rt) {
                runner = Some((r.step_time, index, r));
            }
        }
    }
    Ok(Plan {
        best,
        runner_up: runner.map(|(_, _, r)| r),
        candidates: outcomes,
    })
}

/// The outcome of a candidate no split of which fits the budget: the split needing least memory, and (with a
/// finite budget) its fastest split without the budget when that beats the best so far.
#[allow(clippy::too_many_arguments)]
fn too_big(
    units: &[UnitProfile],
    latency: f64,
    stages: u32,
    candidate: &Candidate,
    memory: &MemoryModel,
    free: &MemoryModel,
    limits: &SearchLimits,
    best: &Option<(f64, usize, Partition)>,
) -> Outcome {
    let error = no_fit(units, latency, stages, candidate, memory, limits);
    let faster_than = best.as_ref().map_or(f64::INFINITY, |(t, _, _)| *t);
    let unconstrained = if memory.budget_bytes == u64::MAX {
        None
    } else {
        partition_below(units, latency, stages, candidate, free, limits, faster_than)
            .ok()
            .flatten()
            .map(|part| {
                let (s, b) = part.evaluation.peak_memory();
                (part.evaluation.step_time, s, b)
            })
    };
    Outcome::TooBig { error, unconstrained }
}
