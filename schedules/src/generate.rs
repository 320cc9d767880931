//! Schedule generators: GPipe, 1F1B, interleaved 1F1B, ZB-H1 and ZB-V.
//!
//! Each generator is a pure function of (stages p, micro-batches m, chunks v). Shapes a
//! family cannot serve get a [`ScheduleError::Unsupported`] naming the constraint and what
//! would work. Every generated schedule keeps each part's weight-gradient accumulation in
//! micro-batch order 0, 1, 2, ... so pipelined training can be bitwise equal to unpipelined.

use crate::error::ScheduleError;
use crate::ir::{Action, Op, Placement, Schedule, ScheduleKind, CHUNKS_MAX, MICROBATCHES_MAX, STAGES_MAX};
use crate::list::{interleaved_stash_cap, list_schedule, ListOptions};
use crate::simulate::Costs;

/// Generates a schedule of the given family.
pub fn generate(kind: ScheduleKind, stages: u32, microbatches: u32, chunks: u32) -> Result<Schedule, ScheduleError> {
    match kind {
        ScheduleKind::GPipe => gpipe(stages, microbatches, chunks),
        ScheduleKind::OneFOneB => one_f_one_b(stages, microbatches, chunks),
        ScheduleKind::Interleaved => interleaved(stages, microbatches, chunks),
        ScheduleKind::ZbH1 => zb_h1(stages, microbatches, chunks),
        ScheduleKind::ZbV => zb_v(stages, microbatches, chunks),
        ScheduleKind::TwoBw => crate::two_bw::two_bw(stages, microbatches, chunks),
        ScheduleKind::Custom => Err(unsupported(
            kind,
            stages,
            microbatches,
            chunks,
            "a custom schedule is imported (from CSV or action strings), not generated".into(),
        )),
    }
}

pub(crate) fn unsupported(
    kind: ScheduleKind,
    stages: u32,
    microbatches: u32,
    chunks: u32,
    reason: String,
) -> ScheduleError {
    ScheduleError::Unsupported {
        kind: kind.name(),
        stages,
        microbatches,
        chunks,
        reason,
    }
}

/// Checks the limits every family shares.
fn check_common(kind: ScheduleKind, p: u32, m: u32, v: u32) -> Result<(), ScheduleError> {
    let fail = |reason: String| Err(unsupported(kind, p, m, v, reason));
    if p == 0 || p > STAGES_MAX {
        return fail(format!("stages must be in 1..={STAGES_MAX}"));
    }
    if m == 0 || m > MICROBATCHES_MAX {
        return fail(format!("microbatches must be in 1..={MICROBATCHES_MAX}"));
    }
    if v == 0 || v > CHUNKS_MAX {
        return fail(format!("chunks must be in 1..={CHUNKS_MAX}"));
    }
    Ok(())
}

pub(crate) fn check_one_chunk(kind: ScheduleKind, p: u32, m: u32, v: u32) -> Result<(), ScheduleError> {
    check_common(kind, p, m, v)?;
    if v != 1 {
        return Err(unsupported(
            kind,
            p,
            m,
            v,
            "it runs one chunk per stage: use --chunks 1, or the interleaved schedule (chunks >= 2) or zb-v (chunks = 2)".into(),
        ));
    }
    Ok(())
}

fn build(kind: ScheduleKind, m: u32, placement: Placement, actions: Vec<Vec<Action>>) -> Schedule {
    debug_assert_eq!(actions.len() as u32, placement.stages());
    Schedule {
        kind,
        microbatches: m,
        placement,
        actions,
    }
}

/// GPipe: every stage runs all forwards, then all backwards in micro-batch order.
/// Peak in-flight activations: m on every stage.
pub fn gpipe(p: u32, m: u32, v: u32) -> Result<Schedule, ScheduleError> {
    check_one_chunk(ScheduleKind::GPipe, p, m, v)?;
    let per_stage: Vec<Action> = (0..m)
        .map(|mb| Action::new(Op::F, mb, 0))
        .chain((0..m).map(|mb| Action::new(Op::B, mb, 0)))
        .collect();
    Ok(build(
        ScheduleKind::GPipe,
        m,
        Placement::linear(p),
        vec![per_stage; p as usize],
    ))
}

/// 1F1B (PipeDream-Flush): stage s warms up with `min(p-s-1, m)` forwards, then alternates
/// one forward and one backward, then drains the remaining backwards.
/// Peak in-flight activations on stage s: `min(p-s, m)`.
pub fn one_f_one_b(p: u32, m: u32, v: u32) -> Result<Schedule, ScheduleError> {
    check_one_chunk(ScheduleKind::OneFOneB, p, m, v)?;
    let actions = (0..p)
        .map(|s| {
            let warmup = (p - s - 1).min(m);
            let mut list = Vec::with_capacity(2 * m as usize);
            list.extend((0..warmup).map(|mb| Action::new(Op::F, mb, 0)));
            for i in 0..m - warmup {
                list.push(Action::new(Op::F, warmup + i, 0));
                list.push(Action::new(Op::B, i, 0));
            }
            list.extend((m - warmup..m).map(|mb| Action::new(Op::B, mb, 0)));
            list
        })
        .collect();
    Ok(build(ScheduleKind::OneFOneB, m, Placement::linear(p), actions))
}

/// Interleaved 1F1B in Megatron-LM's order over the looped placement (stage s chunk c holds
/// part `c*p + s`). Micro-batches go through the chunks in groups of p; stage s warms up with
/// `2(p-s-1) + (v-1)p` forwards. Needs v >= 2 and m >= p. When m is not a multiple of p,
/// Megatron's order does not exist (PyTorch refuses it too) and the order is the list
/// scheduler's ([`crate::list_schedule`], unit costs F = 1, B = 2) under Megatron's per-stage
/// activation memory ([`crate::interleaved_stash_cap`]).
pub fn interleaved(p: u32, m: u32, v: u32) -> Result<Schedule, ScheduleError> {
    let kind = ScheduleKind::Interleaved;
    check_common(kind, p, m, v)?;
    if v < 2 {
        return Err(unsupported(
            kind,
            p,
            m,
            v,
            "interleaving needs chunks >= 2; with one chunk use 1f1b".into(),
        ));
    }
    if m < p {
        return Err(unsupported(
            kind,
            p,
            m,
            v,
            format!("interleaving needs at least {p} micro-batches (one per stage) to fill its loop: try {p}, or 1f1b / zb-h1 for fewer"),
        ));
    }
    if m % p != 0 {
        // Megatron's order sends micro-batches in groups of `stages`; other counts get the list
        // scheduler, at the activation memory Megatron's order would hold.
        let opts = ListOptions {
            split_backward: false,
            stash_cap: Some(interleaved_stash_cap(p, v, m)),
            weight_stash_cap: None,
            kind,
        };
        return list_schedule(
            &Placement::looped(p, v),
            m,
            &Costs::uniform(p * v, 1.0, 2.0, 1.0, 1.0, 0.0),
            opts,
        );
    }
    let total = m * v;
    let group = p * v;
    let forward_at = |k: u32| Action::new(Op::F, (k / group) * p + k % p, (k / p) % v);
    let backward_at = |k: u32| Action::new(Op::B, (k / group) * p + k % p, v - 1 - (k / p) % v);
    let actions = (0..p)
        .map(|s| {
            let warmup = (2 * (p - s - 1) + (v - 1) * p).min(total);
            let mut list = Vec::with_capacity(2 * total as usize);
            list.extend((0..warmup).map(forward_at));
            for k in 0..total - warmup {
                list.push(forward_at(warmup + k));
                list.push(backward_at(k));
            }
            list.extend((total - warmup..total).map(backward_at));
            list
        })
        .collect();
    Ok(build(kind, m, Placement::looped(p, v), actions))
}

/// ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): the backward is split into I (input
/// gradient, on the critical path) and W (weight gradient, deferred). Stage s runs, for
/// x = 0, 1, ..., m+p-2, the triple `F(x)`, `I(x-(p-1-s))`, `W(x-(p-1))`, dropping entries
/// out of range. The warm-up is 1F1B's, so the peak of stashed activations is 1F1B's
/// (`min(p-s, m)`), while the W's fill the cool-down bubbles: with F = I = W the bubble is
/// about a third of 1F1B's.
pub fn zb_h1(p: u32, m: u32, v: u32) -> Result<Schedule, ScheduleError> {
    check_one_chunk(ScheduleKind::ZbH1, p, m, v)?;
    let (p, m64) = (i64::from(p), i64::from(m));
    let actions = (0..p)
        .map(|s| {
            let mut list = Vec::with_capacity(3 * m as usize);
            let mut push = |op, mb: i64| {
                if (0..m64).contains(&mb) {
                    list.push(Action::new(op, mb as u32, 0));
                }
            };
            for x in 0..m64 + p - 1 {
                push(Op::F, x);
                push(Op::I, x - (p - 1 - s));
                push(Op::W, x - (p - 1));
            }
            list
        })
        .collect();
    Ok(build(ScheduleKind::ZbH1, m, Placement::linear(p as u32), actions))
}

/// ZB-V: two chunks per stage in the V placement (stage s holds parts s and 2p-1-s), split
/// backward, and a hand-built order that keeps the peak of stashed chunk activations at 2p on
/// the first stage (the memory of 1F1B, since each chunk holds half a stage's layers) while the
/// bubble nearly vanishes. The order is built for `max(m, 2p-1)` micro-batches and the extra
/// ones are dropped: removing actions from a deadlock-free order keeps it deadlock-free.
pub fn zb_v(p: u32, m: u32, v: u32) -> Result<Schedule, ScheduleError> {
    let kind = ScheduleKind::ZbV;
    check_common(kind, p, m, v)?;
    if v != 2 {
        return Err(unsupported(
            kind,
            p,
            m,
            v,
            "the V placement holds exactly two chunks per stage: use --chunks 2".into(),
        ));
    }
    let full = m.max(2 * p - 1);
    let actions = (0..p)
        .map(|s| {
            let mut list = zb_v_stage(p, s, full);
            list.retain(|a| a.mb < m);
            list
        })
        .collect();
    Ok(build(kind, m, Placement::v_shape(p), actions))
}

/// One stage's ZB-V order for `m >= 2p-1` micro-batches.
fn zb_v_stage(p: u32, s: u32, m: u32) -> Vec<Action> {
    debug_assert!(m >= 2 * p - 1);
    // Next micro-batch per (op, chunk).
    let (mut f, mut i, mut w) = ([0u32; 2], [0u32; 2], [0u32; 2]);
    let mut list = Vec::with_capacity(6 * m as usize);
    let emit = |op: Op, chunk: usize, counter: &mut [u32; 2], list: &mut Vec<Action>| {
        list.push(Action::new(op, counter[chunk], chunk as u32));
        counter[chunk] += 1;
    };
    // Warm-up: fill the down-leg, then alternate legs, then start the up-leg's backwards.
    for _ in 0..2 * (p - s) - 1 {
        emit(Op::F, 0, &mut f, &mut list);
    }
    for _ in 0..s {
        emit(Op::F, 1, &mut f, &mut list);
        emit(Op::F, 0, &mut f, &mut list);
    }
    for _ in 0..p - s {
        emit(Op::F, 1, &mut f, &mut list);
        emit(Op::I, 1, &mut i, &mut list);
        emit(Op::W, 1, &mut w, &mut list);
    }
    // Steady state: one F, I, W per chunk.
    while f[1] < m {
        if f[0] < m {
            emit(Op::F, 0, &mut f, &mut list);
        }
        emit(Op::I, 0, &mut i, &mut list);
        emit(Op::W, 0, &mut w, &mut list);
        emit(Op::F, 1, &mut f, &mut list);
        emit(Op::I, 1, &mut i, &mut list);
        emit(Op::W, 1, &mut w, &mut list);
    }
    // Cool-down: the remaining input gradients first, weight gradients into the gaps.
    for _ in 0..s {
        emit(Op::I, 0, &mut i, &mut list);
        emit(Op::I, 1, &mut i, &mut list);
    }
    for _ in 0..p - s {
        emit(Op::I, 0, &mut i, &mut list);
        emit(Op::W, 0, &mut w, &mut list);
    }
    while w[1] < m {
        emit(Op::W, 1, &mut w, &mut list);
    }
    while w[0] < m {
        emit(Op::W, 0, &mut w, &mut list);
    }
    debug_assert_eq!((f, i, w), ([m; 2], [m; 2], [m; 2]));
    list
}
