//! Scale on paper: the step time, bubble, data-parallel communication share and memory per GPU of every
//! `D × P` layout of a model on `N` GPUs of a [`Cluster`], predicted from per-unit costs on the target device.
//!
//! **Model.** [`ScaleModel`] gives, for a micro-batch of `n` sequences, each unit's F, B, I, W seconds and bytes
//! ([`UnitProfile`], what the planner takes), and the global batch (sequences per optimizer step over every
//! replica, fixed whatever the layout) and sequence length.
//!
//! **Layouts.** Every `P` dividing `N` with `P` at most the model's units is a layout `D = N / P`; one whose `D`
//! does not divide the global batch is [`LayoutOutcome::Unsupported`]. Workers are placed by the cluster's rank
//! map ([`crate::cluster`]): stages of one pipeline inside one node while they fit, replicas across nodes.
//!
//! **One layout** ([`predict_layout`]):
//! 1. Per micro-batch count `m` (every divisor of the batch per replica, or the counts given, at most
//!    [`SCALE_MICROBATCH_COUNTS_MAX`]): the units at micro-batches of `batch / (D·m)` sequences, and the per-hop
//!    transfer time `latency + message / bandwidth` of the slowest link a hop of the layout crosses, the message
//!    being the largest unit output (activation out, gradient back). The simulator has one hop time for every
//!    hop, so a pipeline that straddles nodes is timed as if every hop crossed nodes (conservative).
//! 2. The existing choice code ([`crate::plan`]) picks the split, schedule, chunks, recomputation and `m` with the
//!    least simulated pipeline time under the per-GPU memory budget (ZeRO-1 shards the optimizer state over `D`
//!    when asked). No fitting choice: [`LayoutOutcome::TooBig`].
//! 3. The data-parallel step on that choice ([`crate::data_parallel_from_sim`]): each stage's gradients
//!    (`param_bytes × grad_bytes_per_param_byte` per part) are reduced over its `D` copies with a ring-equivalent
//!    all-reduce, `2·(D−1)/D · bytes / bandwidth + buckets · 2·(D−1) · latency`, on the slowest link one stage's
//!    group uses, in buckets of `max(bucket_bytes, D · bucket_bytes_per_replica)`; with overlap each part's
//!    reduction starts when its last backward ends, without it after the flush.
//!    `step = max(pipeline makespan, last reduction end)`; the **communication share** is the exposed part of the
//!    reductions over the step.
//!
//! The choice in step 2 weighs the pipeline alone (its time does not depend on `D`'s reduction except through
//! `m`); the reduction is then added. What is not modelled: tensor parallelism, the optimizer step, gradient
//! clipping's global norm, contention between a node's GPUs on its switch, and NCCL's tree or NVLS algorithms
//! (the ring's `2·(D−1)` latency terms make large `D` pessimistic).

use std::ops::Range;

use serde::Serialize;

use crate::cluster::{Cluster, LinkKind};
use crate::data_parallel::{data_parallel_from_sim, DpCosts, REPLICAS_MAX};
use crate::error::ScheduleError;
use crate::ir::{MICROBATCHES_MAX, STAGES_MAX};
use crate::plan::{plan, Candidate, MemoryModel, PlanInput, PlanSpace, SearchLimits, ShapeProfile, UnitProfile};

/// Most micro-batch counts one layout considers (each is a separate shape for the planner).
pub const SCALE_MICROBATCH_COUNTS_MAX: usize = 16;

/// Most GPUs a scale prediction may name.
pub const SCALE_GPUS_MAX: u32 = 1 << 20;

/// Per-unit profiles for a micro-batch of the given number of sequences, on the target device.
pub type UnitsAt<'a> = dyn Fn(u32) -> Result<Vec<UnitProfile>, ScheduleError> + 'a;

/// A model to scale: its units' costs at any micro-batch size, and the fixed global batch.
pub struct ScaleModel<'a> {
    /// Name, for reports.
    pub name: String,
    /// Sequences per optimizer step over every replica (fixed for every layout).
    pub global_batch_seqs: u32,
    /// Tokens per sequence.
    pub seq_tokens: u32,
    /// Number of units (`units_at` returns this many).
    pub units: usize,
    /// Per unit, for one micro-batch of `n` sequences (`n >= 1`).
    pub units_at: &'a UnitsAt<'a>,
}

/// How layouts are searched and timed.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleOptions {
    /// The GPUs and their links.
    pub cluster: Cluster,
    /// Memory accounting and the per-GPU budget ([`MemoryModel::optimizer_shards`] is set per layout).
    pub memory: MemoryModel,
    /// Shard the optimizer state over the `D` replicas (ZeRO-1).
    pub zero1: bool,
    /// The candidates the planner considers per micro-batch count.
    pub space: PlanSpace,
    /// Limits of each candidate's split search.
    pub limits: SearchLimits,
    /// Micro-batch counts to consider (`None`: divisors of the batch per replica, thinned to
    /// [`SCALE_MICROBATCH_COUNTS_MAX`]); a count that does not divide the batch per replica is skipped.
    pub microbatches: Option<Vec<u32>>,
    /// Gradient bytes reduced per parameter byte (fp32 gradients of bf16 parameters: 2).
    pub grad_bytes_per_param_byte: f64,
    /// Largest all-reduce bucket, bytes, at least (> 0; infinite: one per part).
    pub bucket_bytes: f64,
    /// Bucket bytes per replica: a layout of `D` replicas reduces in buckets of
    /// `max(bucket_bytes, D · bucket_bytes_per_replica)` (Megatron-Core's default rule, `max(40M, 1M·D)`
    /// parameters, keeps large groups from being latency-bound); 0 for a fixed bucket.
    pub bucket_bytes_per_replica: f64,
    /// Reduce each part as soon as its gradients are final (`true`) or after the flush.
    pub overlap: bool,
}

/// A data-parallel × pipeline-parallel layout: `replicas · stages` GPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    /// Data-parallel replicas `D`.
    pub replicas: u32,
    /// Pipeline stages `P`.
    pub stages: u32,
}

/// The prediction for one layout that fits.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayoutReport {
    /// The layout.
    pub layout: Layout,
    /// The link pipeline hops use (the slowest one any hop crosses).
    pub hop_link: LinkKind,
    /// The link the data-parallel groups use (the slowest any group crosses).
    pub dp_link: LinkKind,
    /// Seconds one activation (or gradient) takes across a hop: latency + message / bandwidth.
    pub hop_s: f64,
    /// The planner's choice: schedule family, chunks, micro-batches, recomputation.
    pub candidate: Candidate,
    /// Sequences per micro-batch.
    pub microbatch_seqs: u32,
    /// Unit ranges per part.
    pub ranges: Vec<Range<usize>>,
    /// Predicted step time, seconds: `max(pipeline makespan, last reduction end)`.
    pub step_s: f64,
    /// The pipeline's makespan alone, seconds.
    pub pipeline_s: f64,
    /// The pipeline bubble: idle over `stages · makespan`.
    pub bubble: f64,
    /// Seconds the reductions add past the makespan.
    pub exposed_comm_s: f64,
    /// `exposed_comm_s / step_s`.
    pub comm_share: f64,
    /// The longest one stage's link spends reducing, seconds (the reduction not overlapped).
    pub allreduce_s: f64,
    /// Gradient bytes one replica reduces per step.
    pub grad_bytes: f64,
    /// Tokens per second over the whole layout: `global batch · seq / step_s`.
    pub tokens_per_s: f64,
    /// The stage with the most memory and its bytes.
    pub peak_memory: (u32, u64),
    /// The planner's split search finished (not stopped at its limits).
    pub exact: bool,
}

/// What became of one layout.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum LayoutOutcome {
    /// It fits; its prediction.
    Predicted(Box<LayoutReport>),
    /// No choice of split, schedule and micro-batches fits the per-GPU budget.
    TooBig {
        /// What the closest candidate needs, in words.
        reason: String,
        /// Its largest stage's bytes.
        needed_bytes: u64,
        /// The budget.
        budget_bytes: u64,
    },
    /// The layout cannot run this model or batch.
    Unsupported(String),
}

/// Every layout of one GPU count, fastest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ScaleReport {
    /// GPUs `N`.
    pub gpus: u32,
    /// Every layout `D × P = N`: those that fit by step time (ties: fewer stages first), then those too big, then
    /// those that cannot run.
    pub layouts: Vec<(Layout, LayoutOutcome)>,
}

impl ScaleReport {
    /// The fastest layout that fits.
    pub fn best(&self) -> Option<&LayoutReport> {
        self.layouts.iter().find_map(|(_, o)| match o {
            LayoutOutcome::Predicted(r) => Some(r.as_ref()),
            _ => None,
        })
    }
}

/// Every layout `D × P = gpus` with `P` at most `units` (and [`STAGES_MAX`]), by increasing `P`.
pub fn layouts(gpus: u32, units: usize) -> Vec<Layout> {
    let top = u64::from(gpus).min(units as u64).min(u64::from(STAGES_MAX)) as u32;
    (1..=top)
        .filter(|p| gpus % p == 0)
        .map(|p| Layout {
            replicas: gpus / p,
            stages: p,
        })
        .collect()
}

/// The micro-batch counts for a batch of `per_replica` sequences: the divisors (at most [`MICROBATCHES_MAX`]),
/// thinned evenly to [`SCALE_MICROBATCH_COUNTS_MAX`] keeping the smallest and the largest.
fn microbatch_counts(per_replica: u32, given: Option<&[u32]>) -> Vec<u32> {
    if let Some(list) = given {
        return list
            .iter()
            .copied()
            .filter(|&m| m > 0 && per_replica % m == 0)
            .take(SCALE_MICROBATCH_COUNTS_MAX)
            .collect();
    }
    let all: Vec<u32> = (1..=per_replica.min(MICROBATCHES_MAX))
        .filter(|m| per_replica % m == 0)
        .collect();
    if all.len() <= SCALE_MICROBATCH_COUNTS_MAX {
        return all;
    }
    let (n, k) = (all.len() - 1, SCALE_MICROBATCH_COUNTS_MAX - 1);
    let mut out: Vec<u32> = (0..=k).map(|i| all[i * n / k]).collect();
    out.dedup();
    out
}

fn check(model: &ScaleModel, options: &ScaleOptions) -> Result<(), ScheduleError> {
    options.cluster.check()?;
    if model.global_batch_seqs == 0 || model.seq_tokens == 0 {
        return Err(ScheduleError::Planner(format!(
            "scale: global batch {} sequences of {} tokens; both must be >= 1",
            model.global_batch_seqs, model.seq_tokens
        )));
    }
    if model.units == 0 {
        return Err(ScheduleError::Planner(format!(
            "scale: model `{}` has no units",
            model.name
        )));
    }
    let g = options.grad_bytes_per_param_byte;
    if !g.is_finite() || g < 0.0 {
        return Err(ScheduleError::Costs(format!(
            "scale: grad_bytes_per_param_byte is {g}; it must be finite and >= 0"
        )));
    }
    if options.bucket_bytes.is_nan() || options.bucket_bytes <= 0.0 {
        return Err(ScheduleError::Costs(format!(
            "scale: bucket size is {} bytes; it must be > 0 (infinite: one bucket per part)",
            options.bucket_bytes
        )));
    }
    let per = options.bucket_bytes_per_replica;
    if !per.is_finite() || per < 0.0 {
        return Err(ScheduleError::Costs(format!(
            "scale: bucket_bytes_per_replica is {per}; it must be finite and >= 0"
        )));
    }
    Ok(())
}

/// Predicts one layout of `model` (see the module docs).
///
/// # Errors
/// Invalid options or links, a `units_at` that fails or returns the wrong number of units, and whatever the
/// planner or the data-parallel model report other than "does not fit" and "cannot serve" (those are outcomes).
pub fn predict_layout(
    model: &ScaleModel,
    options: &ScaleOptions,
    layout: Layout,
) -> Result<LayoutOutcome, ScheduleError> {
    check(model, options)?;
    let Layout { replicas: d, stages: p } = layout;
    if d == 0 || p == 0 || d > REPLICAS_MAX || p > STAGES_MAX {
        return Ok(LayoutOutcome::Unsupported(format!(
            "{d} replicas × {p} stages: replicas must be in 1..={REPLICAS_MAX}, stages in 1..={STAGES_MAX}"
        )));
    }
    let batch = model.global_batch_seqs;
    if batch % d != 0 {
        return Ok(LayoutOutcome::Unsupported(format!(
            "{d} replicas do not divide the global batch of {batch} sequences"
        )));
    }
    if p as usize > model.units {
        return Ok(LayoutOutcome::Unsupported(format!(
            "{p} stages but the model has {} units",
            model.units
        )));
    }
    let per_replica = batch / d;
    let counts = microbatch_counts(per_replica, options.microbatches.as_deref());
    if counts.is_empty() {
        return Ok(LayoutOutcome::Unsupported(format!(
            "none of the micro-batch counts divides the {per_replica} sequences per replica"
        )));
    }
    let cluster = &options.cluster;
    let hop_link = cluster.hop_link(d, p);
    let dp_link = cluster.dp_link(d, p);
    let mut shapes = Vec::with_capacity(counts.len());
    for &m in &counts {
        let mb = per_replica / m;
        let units = (model.units_at)(mb)?;
        if units.len() != model.units {
            return Err(ScheduleError::Planner(format!(
                "scale: model `{}` gave {} units for micro-batches of {mb} sequences; it has {}",
                model.name,
                units.len(),
                model.units
            )));
        }
        let message = units[..units.len() - 1]
            .iter()
            .map(|u| u.output_bytes)
            .max()
            .unwrap_or(0) as f64;
        let latency = cluster.link(hop_link).map_or(0.0, |l| l.transfer_s(message));
        shapes.push(ShapeProfile {
            microbatches: m,
            units,
            latency,
        });
    }
    let memory = MemoryModel {
        optimizer_shards: if options.zero1 { d } else { 1 },
        ..options.memory.clone()
    };
    let input = PlanInput {
        stages: p,
        shapes,
        memory,
        space: options.space.clone(),
        limits: options.limits,
    };
    let chosen = match plan(&input) {
        Ok(chosen) => chosen,
        Err(ScheduleError::MemoryBudget {
            what,
            stage,
            needed_bytes,
            budget_bytes,
            detail,
        }) => {
            return Ok(LayoutOutcome::TooBig {
                reason: format!("closest: {what} needs {needed_bytes} bytes on stage {stage} ({detail})"),
                needed_bytes,
                budget_bytes,
            })
        }
        Err(e @ (ScheduleError::Planner(_) | ScheduleError::Unsupported { .. })) => {
            return Ok(LayoutOutcome::Unsupported(e.to_string()))
        }
        Err(e) => return Err(e),
    };
    let best = chosen.best;
    let e = &best.evaluation;
    if e.stream.is_some() {
        return Ok(LayoutOutcome::Unsupported(format!(
            "{}: a flush-free stream has no per-step reduction to time; leave 2bw out",
            best.candidate
        )));
    }
    let shape = input
        .shapes
        .iter()
        .find(|s| s.microbatches == best.candidate.microbatches)
        .ok_or_else(|| ScheduleError::Planner("scale: the plan chose a micro-batch count not asked for".into()))?;
    let grad_bytes: Vec<f64> = best
        .ranges
        .iter()
        .map(|r| {
            shape.units[r.clone()].iter().map(|u| u.param_bytes as f64).sum::<f64>() * options.grad_bytes_per_param_byte
        })
        .collect();
    let link = cluster.link(dp_link).unwrap_or(cluster.intra);
    let dp = DpCosts {
        replicas: d,
        grad_bytes,
        link_bytes_per_s: link.bytes_per_s,
        link_latency_s: link.latency_s,
        bucket_bytes: options
            .bucket_bytes
            .max(f64::from(d) * options.bucket_bytes_per_replica),
        overlap: options.overlap,
    };
    let r = data_parallel_from_sim(&e.schedule, &e.sim, &dp)?;
    let tokens = f64::from(batch) * f64::from(model.seq_tokens);
    let hop_s = shape.latency;
    Ok(LayoutOutcome::Predicted(Box::new(LayoutReport {
        layout,
        hop_link,
        dp_link,
        hop_s,
        candidate: best.candidate,
        microbatch_seqs: per_replica / best.candidate.microbatches,
        ranges: best.ranges.clone(),
        step_s: r.step_time,
        pipeline_s: r.compute_makespan,
        bubble: r.bubble,
        exposed_comm_s: r.exposed_comm,
        comm_share: r.exposed_share,
        allreduce_s: r.stages.iter().map(|s| s.busy).fold(0.0, f64::max),
        grad_bytes: r.grad_bytes,
        tokens_per_s: if r.step_time > 0.0 { tokens / r.step_time } else { 0.0 },
        peak_memory: e.peak_memory(),
        exact: best.exact,
    })))
}

/// Predicts every layout of `model` on `gpus` GPUs ([`layouts`]), fastest first (see [`ScaleReport::layouts`]).
///
/// # Errors
/// `gpus` out of `1..=`[`SCALE_GPUS_MAX`], and whatever [`predict_layout`] reports.
pub fn scale(model: &ScaleModel, options: &ScaleOptions, gpus: u32) -> Result<ScaleReport, ScheduleError> {
    if gpus == 0 || gpus > SCALE_GPUS_MAX {
        return Err(ScheduleError::Planner(format!(
            "scale: {gpus} GPUs; give 1..={SCALE_GPUS_MAX}"
        )));
    }
    check(model, options)?;
    let mut out = Vec::new();
    for layout in layouts(gpus, model.units) {
        out.push((layout, predict_layout(model, options, layout)?));
    }
    let rank = |o: &LayoutOutcome| match o {
        LayoutOutcome::Predicted(_) => 0,
        LayoutOutcome::TooBig { .. } => 1,
        LayoutOutcome::Unsupported(_) => 2,
    };
    let time = |o: &LayoutOutcome| match o {
        LayoutOutcome::Predicted(r) => r.step_s,
        _ => 0.0,
    };
    // Stable sort: layouts come in increasing P, so ties go to fewer stages.
    out.sort_by(|a, b| rank(&a.1).cmp(&rank(&b.1)).then(time(&a.1).total_cmp(&time(&b.1))));
    Ok(ScaleReport { gpus, layouts: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batch_counts_are_divisors_thinned_to_the_limit() {
        assert_eq!(microbatch_counts(12, None), [1, 2, 3, 4, 6, 12]);
        let many = microbatch_counts(720_720, None);
        assert!(many.len() <= SCALE_MICROBATCH_COUNTS_MAX);
        assert_eq!((many[0], *many.last().unwrap()), (1, 720_720));
        assert!(many.iter().all(|m| 720_720 % m == 0));
        assert_eq!(microbatch_counts(12, Some(&[5, 4, 0, 12])), [4, 12]);
    }

    #[test]
    fn layouts_multiply_to_the_gpu_count_and_respect_the_units() {
        let all = layouts(64, 14);
        assert_eq!(all.iter().map(|l| l.stages).collect::<Vec<_>>(), [1, 2, 4, 8]);
        assert!(all.iter().all(|l| l.replicas * l.stages == 64));
        assert_eq!(layouts(12, 100).len(), 6);
    }
}
