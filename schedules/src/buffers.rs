//! How many receive buffers each stage needs: the most activations and gradients from other stages that can be
//! alive on the stage at once, over **every** execution the schedule admits (any relative speed of the stages).
//!
//! A message from another stage occupies one of the consumer's receive buffers from the moment its producer
//! finishes the action that sends it until the consumer finishes the action that releases it: for an activation
//! received by `F` of (part, mb), and for a gradient received by `B`/`I` of (part, mb), the release is the
//! stage's `B` of (part, mb), or its `W` when the backward is split (the weight-gradient half may still read the
//! received buffers). Releasing earlier (a recomputing stage drops its input after `F`) only lowers the count, so
//! the figure is an upper bound for every executor that frees no later than that.
//!
//! **The bound is exact over executions.** An action makes its outputs visible (sends) before it finishes and
//! releases what it held: a `B` sends its input gradient, then computes its weight gradients, then drops its
//! stash. So a stage's state is "action `j` running, outputs sent, releases pending" (the worst moment of `j`),
//! and a global state is a consistent choice of such positions. Fix stage `s` at action `j` in that state. A
//! message with release index `r ≥ j` is alive iff its sending action `x` has sent; since the releases all sit on
//! stage `s`, the count only grows as the other stages advance, so the worst state for this `j` lets every action
//! run that needs nothing from stage `s` beyond action `j`'s outputs: `x` has sent iff `last_s(x) ≤ j`, where
//! `last_s(x)` is the highest index of a stage-`s` action that `x` depends on (−1 if none). A message is therefore
//! alive at the `j` with `max(last_s(x), 0) ≤ j ≤ r`, and the stage's peak is the most overlapping such ranges:
//! one pass over a topological order per stage, `O(p · actions)`.

use crate::error::ScheduleError;
use crate::graph::{DepGraph, EdgeKind};
use crate::ir::{Op, Schedule};

/// Per stage: the receive buffers the stage needs so that no execution of `schedule` ever finds them all in use
/// (see the module docs). Zero for a stage that receives nothing from another stage.
///
/// `O(stages · actions)`, so it is not part of [`crate::validate`] (linear); the engine calls it once per
/// pipeline.
///
/// # Errors
/// Whatever [`crate::validate`] reports for an invalid schedule.
pub fn peak_receive_buffers(schedule: &Schedule) -> Result<Vec<u32>, ScheduleError> {
    let graph = DepGraph::build(schedule)?;
    let order = graph.run_order()?;
    Ok(receive_peaks(schedule, &graph, &order, false))
}

/// [`peak_receive_buffers`] for an executor that batches the weight gradients: a part's weight-gradient halves
/// all run at its last `B`/`W` of the step, and they may read the received buffers, so every message into
/// (part, mb) is released there instead of at the `B`/`W` of (part, mb). Never below [`peak_receive_buffers`].
///
/// # Errors
/// Whatever [`crate::validate`] reports for an invalid schedule.
pub fn peak_receive_buffers_batched(schedule: &Schedule) -> Result<Vec<u32>, ScheduleError> {
    let graph = DepGraph::build(schedule)?;
    let order = graph.run_order()?;
    Ok(receive_peaks(schedule, &graph, &order, true))
}

/// [`peak_receive_buffers`] on an already built and checked graph (`order` is a topological order of it);
/// `batched`: releases at each part's last `B`/`W` ([`peak_receive_buffers_batched`]).
fn receive_peaks(schedule: &Schedule, graph: &DepGraph, order: &[u32], batched: bool) -> Vec<u32> {
    let stages = schedule.actions.len();
    let m = schedule.microbatches as usize;
    let slots = schedule.placement.num_parts() as usize * m;
    let mut peaks = Vec::with_capacity(stages);
    let mut last = vec![-1i64; graph.nodes.len()];
    let mut release = vec![u32::MAX; slots];
    for s in 0..stages {
        let (start, end) = (graph.stage_start[s], graph.stage_start[s + 1]);
        // Release index of each (part, mb) the stage holds: its B, else its W.
        for id in start..end {
            let node = &graph.nodes[id as usize];
            if matches!(node.action.op, Op::B | Op::W) {
                release[node.part as usize * m + node.action.mb as usize] = id - start;
            }
        }
        if batched {
            // Every micro-batch of a part held by this stage is released at the part's last B/W.
            for part in release.chunks_mut(m) {
                let mine = part.iter().copied().filter(|&r| r != u32::MAX);
                if let Some(last_weight) = mine.max() {
                    for r in part.iter_mut().filter(|r| **r != u32::MAX) {
                        *r = last_weight;
                    }
                }
            }
        }
        // last_s for every node, in topological order.
        for &id in order {
            let node = &graph.nodes[id as usize];
            let mut l = node.preds().iter().map(|&(p, _)| last[p as usize]).max().unwrap_or(-1);
            if node.stage as usize == s {
                l = l.max(i64::from(id - start));
            }
            last[id as usize] = l;
        }
        // Each message alive at j in [max(last_s(sender), 0), release]: a difference array over j.
        let len = (end - start) as usize;
        let mut delta = vec![0i64; len + 1];
        for id in start..end {
            let node = &graph.nodes[id as usize];
            for &(pred, kind) in node.preds() {
                let sender = &graph.nodes[pred as usize];
                if kind != EdgeKind::Data || sender.stage as usize == s {
                    continue;
                }
                let r = release[node.part as usize * m + node.action.mb as usize];
                debug_assert!(
                    r != u32::MAX && r >= id - start,
                    "a received message is released after its use"
                );
                let from = last[pred as usize].max(0) as usize;
                debug_assert!(
                    from < (id - start) as usize || from == 0,
                    "the sender ran before its consumer"
                );
                delta[from] += 1;
                delta[r as usize + 1] -= 1;
            }
        }
        let (mut live, mut peak) = (0i64, 0i64);
        for d in &delta {
            live += d;
            peak = peak.max(live);
        }
        debug_assert_eq!(live, 0, "every message is released");
        peaks.push(peak as u32);
    }
    peaks
}
