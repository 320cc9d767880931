//! The list scheduler: a discrete-event greedy that builds a schedule for any stage count,
//! micro-batch count, chunk count and placement under a cost model.
//!
//! Time is simulated. Whenever a stage is free it picks, among the actions whose inputs have
//! arrived, by priority: a forward if the stage's caps allow it, then an input gradient (`B`,
//! or `I` when the backward is split), then a weight gradient `W` (which fills the waits). A
//! stage at its activation cap therefore alternates forwards and backwards as 1F1B does, and
//! below the cap it keeps the pipeline fed; input gradients go highest part first (the longest
//! way back), then lowest micro-batch. The greedy does not start an action if one it ranks
//! higher arrives before it would end (the stage waits instead: a filler must not delay the
//! critical path). Forwards ready together are ranked two ways, and the shorter of the two
//! schedules is kept: depth-first (lowest micro-batch, then lowest part) and in rounds of
//! `stages` micro-batches (lowest round, then lowest part, then micro-batch: Megatron's
//! interleaved order). Measured under unit costs this meets ZB-H1's and 1F1B's closed forms
//! and matches Megatron's interleaved order and ZB-V at their own memory; ranking input
//! gradients above forwards (the zero-bubble paper's critical-path rule without a cap
//! schedule) loses to 1F1B on interleaved shapes, and so does either forward ranking alone.
//!
//! Each part runs its `F`s, its `B`/`I`s and its `W`s in micro-batch order 0, 1, 2, ..., so
//! weight gradients accumulate in the order an unpipelined run uses
//! ([`ScheduleKind::keeps_accumulation_order`]).
//!
//! **Memory.** A stage's activation stash is counted as [`crate::peak_inflight`] counts it (+1
//! at `F`, -1 at `B` or `I`, per micro-batch and chunk), its weight-gradient stash as
//! [`crate::peak_weight_stash`] counts it (+1 at `I`, -1 at `W`); each has a cap per stage.
//!
//! **No deadlock, by construction.** A stage is *safe* when, taking the micro-batches it has
//! started but not finished in micro-batch order, each one's remaining forwards on the stage
//! fit into the activation slots left free once every earlier one has finished (a finished
//! micro-batch frees all its slots). The lowest unfinished micro-batch never needs anything
//! from a later one, so in a safe state its next action is always allowed: the greedy can
//! always progress (a full weight-gradient stash only makes an `I` wait for a `W`, which needs
//! nothing from other stages; a wait for an arrival ends when it arrives). Input gradients keep
//! a stage safe and forwards are only taken when they do, so every state is safe when every
//! activation cap is at least the stage's chunk count. The recorded order is an execution the
//! greedy ran, so the schedule it returns has no deadlock either.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use crate::error::ScheduleError;
use crate::ir::{Action, Op, Placement, Schedule, ScheduleKind, CHUNKS_MAX, MICROBATCHES_MAX, STAGES_MAX};
use crate::simulate::Costs;

/// How the list scheduler runs; see [`list_schedule`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListOptions {
    /// Split each backward into `I` (input gradient) and `W` (weight gradient, deferred into
    /// idle time), as the zero-bubble schedules do; otherwise one `B` per (part, micro-batch).
    pub split_backward: bool,
    /// Per stage: the most activation stashes (micro-batch × chunk, counted as
    /// [`crate::peak_inflight`] counts them) held at once. Each must be at least the stage's
    /// chunk count (else one micro-batch could not pass through it). `None`: 1F1B's memory in
    /// chunk units, [`one_f_one_b_stash_cap`].
    pub stash_cap: Option<Vec<u32>>,
    /// Per stage, with a split backward: the most weight-gradient stashes (`I` run, `W` not
    /// yet, counted as [`crate::peak_weight_stash`] counts them) held at once; at least 1. A
    /// stage at its cap runs a `W` before its next `I`. `None`: ZB-H1's,
    /// [`zb_h1_weight_stash_cap`]. Ignored without a split backward.
    pub weight_stash_cap: Option<Vec<u32>>,
    /// The family stamped on the result.
    pub kind: ScheduleKind,
}

impl ListOptions {
    /// Options with the default caps: 1F1B's activation memory, ZB-H1's weight-gradient stashes.
    pub fn new(kind: ScheduleKind, split_backward: bool) -> Self {
        ListOptions {
            split_backward,
            stash_cap: None,
            weight_stash_cap: None,
            kind,
        }
    }
}

/// 1F1B's activation memory in chunk units: stage s of p holds `min(p - s, m)` micro-batches'
/// activations of the whole stage, that is `chunks * min(p - s, m)` chunk stashes.
pub fn one_f_one_b_stash_cap(stages: u32, chunks: u32, microbatches: u32) -> Vec<u32> {
    (0..stages)
        .map(|s| chunks.saturating_mul((stages - s).min(microbatches)))
        .collect()
}

/// The activation memory of Megatron's interleaved order in chunk units: stage s of p warms up
/// with `2(p-s-1) + (v-1)p` forwards and holds one more in its steady state, at most `v * m`.
pub fn interleaved_stash_cap(stages: u32, chunks: u32, microbatches: u32) -> Vec<u32> {
    let (p, v) = (stages, chunks);
    (0..p)
        .map(|s| {
            let warmup = 2 * (p - s - 1) + v.saturating_sub(1) * p;
            (warmup + 1).min(v.saturating_mul(microbatches))
        })
        .collect()
}

/// ZB-H1's weight-gradient stashes in chunk units: stage s holds `min(s + 1, m)` micro-batches
/// between their `I` and their `W`, that is `chunks * min(s + 1, m)` chunk stashes.
pub fn zb_h1_weight_stash_cap(stages: u32, chunks: u32, microbatches: u32) -> Vec<u32> {
    (0..stages)
        .map(|s| chunks.saturating_mul((s + 1).min(microbatches)))
        .collect()
}

/// A simulated time; costs are finite and non-negative (checked), so the order is total.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Time(f64);

impl Eq for Time {}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Not dispatched yet.
const PENDING: f64 = f64::INFINITY;

// Ranks of the greedy's choices, best first.
/// A forward the caps allow.
const RANK_F: u8 = 0;
/// A `W` that frees a weight-gradient stash for a ready `I` held back by the cap.
const RANK_W_FOR_I: u8 = 1;
/// An input gradient (`B` or `I`).
const RANK_B: u8 = 2;
/// A `W` filling a wait.
const RANK_W: u8 = 3;

/// A ready action's rank (lower is better): the rank class, then its tie-break keys.
type RankKey = (u8, u32, u32, u32);

/// The best ready action found so far on a stage.
#[derive(Clone, Copy, Debug)]
struct Choice {
    key: RankKey,
    op: Op,
    mb: u32,
    chunk: u32,
}

/// How forwards that are ready at once are ranked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ForwardOrder {
    /// Lowest micro-batch, then lowest part: one micro-batch goes deep before the next.
    DepthFirst,
    /// Lowest round of `stages` micro-batches, then lowest part, then micro-batch.
    Rounds,
}

/// A micro-batch that a stage has started (run at least one forward of) and not finished
/// (not run all its input gradients).
#[derive(Clone, Copy, Debug)]
struct Started {
    /// Forwards run on the stage, one per chunk at most.
    forwards: u32,
    /// Input gradients (`B` or `I`) run on the stage.
    backwards: u32,
}

/// One stage's state during the greedy.
struct StageState {
    /// When the action it runs ends (free at or after this time).
    busy_until: f64,
    /// Per chunk: the next micro-batch to forward, to input-gradient, to weight-gradient.
    next_f: Vec<u32>,
    next_b: Vec<u32>,
    next_w: Vec<u32>,
    /// Activation stashes held (+1 at F, -1 at B/I), and their cap.
    stash: u32,
    cap: u32,
    /// Weight-gradient stashes held (+1 at I, -1 at W), and their cap.
    weight_stash: u32,
    weight_cap: u32,
    /// Started, unfinished micro-batches `first_started..first_started + started.len()`.
    /// A stage starts micro-batches in order (its lowest part forwards them in order) and
    /// finishes them in order (its lowest part input-gradients them in order).
    first_started: u32,
    started: VecDeque<Started>,
    /// The stage's action list, in the order the greedy ran it.
    actions: Vec<Action>,
}

impl StageState {
    /// True when the stage may forward micro-batch `mb` now: the stash stays within the cap
    /// and the stage stays safe (see the module doc).
    fn may_forward(&self, mb: u32, chunks: u32) -> bool {
        if self.stash >= self.cap {
            return false;
        }
        // Free slots after the forward.
        let mut free = self.cap - self.stash - 1;
        let index = (mb - self.first_started) as usize;
        debug_assert!(index <= self.started.len(), "micro-batches start in order");
        let joining = (index == self.started.len()).then_some(Started {
            forwards: 0,
            backwards: 0,
        });
        for (j, mut state) in self.started.iter().copied().chain(joining).enumerate() {
            // A started micro-batch needs at most `chunks - 1` more slots, and `free` only grows.
            if free + 1 >= chunks {
                return true;
            }
            if j == index {
                state.forwards += 1;
            }
            if chunks - state.forwards > free {
                return false;
            }
            // Once it finishes, the slots it holds come back.
            free += state.forwards - state.backwards;
        }
        true
    }
}

/// The checked inputs of one greedy run.
struct Problem<'a> {
    placement: &'a Placement,
    m: u32,
    costs: &'a Costs,
    split: bool,
    caps: Vec<u32>,
    weight_caps: Vec<u32>,
}

/// One greedy run: the stage lists and the time the last action ends.
struct Run {
    actions: Vec<Vec<Action>>,
    makespan: f64,
}

/// Schedules `microbatches` micro-batches over `placement` greedily under `costs`; see the
/// module doc for the rule. Uneven per-part costs give stage-aware orders: each decision uses
/// the real durations and arrival times (with `costs.latency` between stages).
///
/// The result keeps each part's `F`, `B`/`I` and `W` in micro-batch order on its stage,
/// respects every stage's caps ([`crate::peak_inflight`] `<=` its stash cap,
/// [`crate::peak_weight_stash`] `<=` its weight-gradient stash cap) and passes
/// [`crate::validate`]. Errors: limits (`STAGES_MAX`, `MICROBATCHES_MAX`, `CHUNKS_MAX`), costs
/// that do not fit the placement, a cap list of the wrong length, an activation cap below the
/// stage's chunk count or a weight-gradient cap of 0.
pub fn list_schedule(
    placement: &Placement,
    microbatches: u32,
    costs: &Costs,
    opts: ListOptions,
) -> Result<Schedule, ScheduleError> {
    let (p, v, m) = (placement.stages(), placement.chunks(), microbatches);
    let kind = opts.kind;
    let fail = |reason: String| ScheduleError::Unsupported {
        kind: kind.name(),
        stages: p,
        microbatches: m,
        chunks: v,
        reason,
    };
    if p > STAGES_MAX {
        return Err(fail(format!("stages must be in 1..={STAGES_MAX}")));
    }
    if m == 0 || m > MICROBATCHES_MAX {
        return Err(fail(format!("microbatches must be in 1..={MICROBATCHES_MAX}")));
    }
    if v > CHUNKS_MAX {
        return Err(fail(format!("chunks must be in 1..={CHUNKS_MAX}")));
    }
    costs.check(placement.num_parts())?;
    let caps = opts.stash_cap.unwrap_or_else(|| one_f_one_b_stash_cap(p, v, m));
    let weight_caps = opts.weight_stash_cap.unwrap_or_else(|| zb_h1_weight_stash_cap(p, v, m));
    for (what, list) in [("stash", &caps), ("weight-gradient stash", &weight_caps)] {
        if list.len() != p as usize {
            return Err(ScheduleError::ListScheduler {
                stage: list.len().min(p as usize) as u32,
                reason: format!("{} {what} caps given for {p} stages", list.len()),
            });
        }
    }
    if let Some((s, &cap)) = caps.iter().enumerate().find(|(_, &cap)| cap < v) {
        return Err(ScheduleError::ListScheduler {
            stage: s as u32,
            reason: format!(
                "stash cap {cap} is below the stage's {v} chunks: a micro-batch holds a stash on every chunk \
                 before its backward can start; use a cap >= {v}"
            ),
        });
    }
    if let Some(s) = weight_caps.iter().position(|&cap| cap == 0) {
        if opts.split_backward {
            return Err(ScheduleError::ListScheduler {
                stage: s as u32,
                reason: "weight-gradient stash cap 0: no I could ever run; use a cap >= 1".into(),
            });
        }
    }
    let problem = Problem {
        placement,
        m,
        costs,
        split: opts.split_backward,
        caps,
        weight_caps,
    };
    let mut best = greedy(&problem, ForwardOrder::DepthFirst)?;
    // With one chunk a stage never holds two ready forwards: both rankings agree.
    if v > 1 {
        let rounds = greedy(&problem, ForwardOrder::Rounds)?;
        if rounds.makespan < best.makespan {
            best = rounds;
        }
    }
    let schedule = Schedule {
        kind,
        microbatches: m,
        placement: placement.clone(),
        actions: best.actions,
    };
    debug_assert!(keeps_order(&schedule), "each part's actions run in micro-batch order");
    debug_assert!(crate::validate(&schedule).is_ok(), "the greedy's order is an execution");
    Ok(schedule)
}

/// Runs the greedy once with the given forward ranking.
fn greedy(problem: &Problem<'_>, order: ForwardOrder) -> Result<Run, ScheduleError> {
    let Problem {
        placement,
        m,
        costs,
        split,
        ..
    } = *problem;
    let (p, v) = (placement.stages(), placement.chunks());
    let parts = placement.num_parts();
    let m_us = m as usize;
    let per_part = if split { 3 } else { 2 };
    let backward_op = if split { Op::I } else { Op::B };
    // Stage of each part; end time of each (part, micro-batch)'s F and of its B or I.
    let stage_of: Vec<u32> = (0..parts)
        .map(|k| placement.owner(k).map_or(u32::MAX, |(s, _)| s))
        .collect();
    let mut f_end = vec![PENDING; parts as usize * m_us];
    let mut b_end = vec![PENDING; parts as usize * m_us];
    let mut stages: Vec<StageState> = problem
        .caps
        .iter()
        .zip(&problem.weight_caps)
        .map(|(&cap, &weight_cap)| StageState {
            busy_until: 0.0,
            next_f: vec![0; v as usize],
            next_b: vec![0; v as usize],
            next_w: vec![0; v as usize],
            stash: 0,
            // A cap above every stash the stage could hold changes nothing.
            cap: cap.min(v.saturating_mul(m)),
            weight_stash: 0,
            // Without a split backward nothing is stashed for W.
            weight_cap: if split { weight_cap } else { u32::MAX },
            first_started: 0,
            started: VecDeque::new(),
            actions: Vec::with_capacity(m_us * v as usize * per_part),
        })
        .collect();
    let total = parts as usize * m_us * per_part;
    let mut dispatched = 0usize;
    let mut makespan = 0.0f64;
    let latency = costs.latency;
    // When data from `from_part` is usable on `stage`: its end, plus the hop if it crosses.
    let arrival = |end: f64, from_part: u32, stage: u32| {
        if stage_of[from_part as usize] == stage {
            end
        } else {
            end + latency
        }
    };

    let mut events: BinaryHeap<Reverse<Time>> = BinaryHeap::new();
    events.push(Reverse(Time(0.0)));
    while let Some(Reverse(Time(now))) = events.pop() {
        while events.peek().is_some_and(|&Reverse(Time(t))| t == now) {
            events.pop();
        }
        // Dispatch rounds at `now`: a zero-cost action ends at once and may free its successors.
        loop {
            let mut ended_now = false;
            for s in 0..p {
                let st = &stages[s as usize];
                if st.busy_until > now {
                    continue;
                }
                let mut best: Option<Choice> = None;
                let mut offer = |key: RankKey, op: Op, mb: u32, chunk: u32| {
                    if best.is_none_or(|b| key < b.key) {
                        best = Some(Choice { key, op, mb, chunk });
                    }
                };
                // Per rank: the earliest arrival of an action not ready yet whose producer runs.
                let mut due = [f64::INFINITY; 4];
                let mut input_grad_held = false;
                for c in 0..v {
                    let Some(k) = placement.part(s, c) else {
                        continue;
                    };
                    let slot = |mb: u32| k as usize * m_us + mb as usize;
                    // Forward: the activation from part k-1 has arrived, the caps allow it.
                    let mb = st.next_f[c as usize];
                    if mb < m && st.may_forward(mb, v) {
                        let at = if k == 0 {
                            0.0
                        } else {
                            arrival(f_end[slot(mb) - m_us], k - 1, s)
                        };
                        if at <= now {
                            let key = match order {
                                ForwardOrder::DepthFirst => (RANK_F, mb, k, 0),
                                ForwardOrder::Rounds => (RANK_F, mb / p, k, mb),
                            };
                            offer(key, Op::F, mb, c);
                        } else {
                            due[RANK_F as usize] = due[RANK_F as usize].min(at);
                        }
                    }
                    // Input gradient: its forward done here, the gradient from part k+1 arrived.
                    let mb = st.next_b[c as usize];
                    if mb < st.next_f[c as usize] && f_end[slot(mb)] <= now {
                        let at = if k + 1 == parts {
                            now
                        } else {
                            arrival(b_end[slot(mb) + m_us], k + 1, s)
                        };
                        if st.weight_stash >= st.weight_cap {
                            input_grad_held |= at <= now;
                        } else if at <= now {
                            offer((RANK_B, parts - 1 - k, mb, 0), backward_op, mb, c);
                        } else {
                            due[RANK_B as usize] = due[RANK_B as usize].min(at);
                        }
                    }
                    // Weight gradient: its I done.
                    let mb = st.next_w[c as usize];
                    if split && mb < st.next_b[c as usize] && b_end[slot(mb)] <= now {
                        let rank = if input_grad_held { RANK_W_FOR_I } else { RANK_W };
                        offer((rank, mb, k, 0), Op::W, mb, c);
                    }
                }
                if input_grad_held {
                    // Every W ranks as making room, whichever chunk offered it first.
                    if let Some(b) = best.as_mut().filter(|b| b.key.0 == RANK_W) {
                        b.key.0 = RANK_W_FOR_I;
                    }
                }
                let Some(Choice {
                    key: (rank, ..),
                    op,
                    mb,
                    chunk: c,
                }) = best
                else {
                    continue;
                };
                // `part(s, c)` was `Some` for every offered chunk.
                let Some(k) = placement.part(s, c) else {
                    continue;
                };
                let end = now + costs.of(op, k);
                // Wait rather than delay a better-ranked action that arrives before this would end;
                // the event at its arrival wakes the stage.
                if due[..rank as usize].iter().any(|&at| at < end) {
                    continue;
                }
                let slot = k as usize * m_us + mb as usize;
                let st = &mut stages[s as usize];
                match op {
                    Op::F => {
                        f_end[slot] = end;
                        st.next_f[c as usize] += 1;
                        st.stash += 1;
                        let index = (mb - st.first_started) as usize;
                        if index == st.started.len() {
                            st.started.push_back(Started {
                                forwards: 0,
                                backwards: 0,
                            });
                        }
                        st.started[index].forwards += 1;
                    }
                    Op::B | Op::I => {
                        b_end[slot] = end;
                        st.next_b[c as usize] += 1;
                        st.stash -= 1;
                        if op == Op::I {
                            st.weight_stash += 1;
                        }
                        let index = (mb - st.first_started) as usize;
                        st.started[index].backwards += 1;
                        // Finished micro-batches leave the window from the front, in order.
                        while st.started.front().is_some_and(|f| f.backwards == v) {
                            st.started.pop_front();
                            st.first_started += 1;
                        }
                    }
                    Op::W => {
                        st.next_w[c as usize] += 1;
                        st.weight_stash -= 1;
                    }
                }
                debug_assert!(st.stash <= st.cap, "stage {s}: stash {} over cap {}", st.stash, st.cap);
                debug_assert!(st.weight_stash <= st.weight_cap, "stage {s}: weight stash over its cap");
                st.actions.push(Action::new(op, mb, c));
                st.busy_until = end;
                makespan = makespan.max(end);
                dispatched += 1;
                if end > now {
                    events.push(Reverse(Time(end)));
                    if latency > 0.0 {
                        events.push(Reverse(Time(end + latency)));
                    }
                } else {
                    ended_now = true;
                }
            }
            if !ended_now {
                break;
            }
        }
        if dispatched == total {
            break;
        }
    }
    if dispatched < total {
        // Unreachable while every cap is at least the chunk count (see the module doc); kept
        // as an error naming the state rather than a loop or a panic.
        let (s, st) = stages
            .iter()
            .enumerate()
            .find(|(_, st)| st.actions.len() < m_us * v as usize * per_part)
            .unwrap_or((0, &stages[0]));
        return Err(ScheduleError::ListScheduler {
            stage: s as u32,
            reason: format!(
                "the greedy stalled after {dispatched} of {total} actions: stash {} of cap {}, weight-gradient \
                 stash {} of cap {}, next F per chunk {:?}, next {backward_op} per chunk {:?}, next W per chunk {:?}",
                st.stash, st.cap, st.weight_stash, st.weight_cap, st.next_f, st.next_b, st.next_w
            ),
        });
    }
    Ok(Run {
        actions: stages.into_iter().map(|st| st.actions).collect(),
        makespan,
    })
}

/// True when every part's F, B/I and W run in micro-batch order on its stage.
fn keeps_order(schedule: &Schedule) -> bool {
    schedule.actions.iter().all(|list| {
        let mut next = std::collections::HashMap::new();
        list.iter().all(|a| {
            let class = match a.op {
                Op::F => 0,
                Op::B | Op::I => 1,
                Op::W => 2,
            };
            let n = next.entry((a.chunk, class)).or_insert(0u32);
            let ok = *n == a.mb;
            *n += 1;
            ok
        })
    })
}
