//! `peak_receive_buffers` against a brute force: every reachable global state is enumerated, and the messages
//! alive in it counted per stage. A stage's position is a half-step: `2j` before its action `j`, `2j+1` while
//! `j` runs after sending its outputs (its releases still pending); an action may start once every action it
//! needs has sent. The
//! closed-form pass must equal the worst state exactly: never less (a pool sized from it would run dry), never
//! more (it would hold memory no execution uses). The same holds for `peak_receive_buffers_batched`, where every
//! message into a part is released at the part's last `B`/`W` (batched weight gradients).

use std::collections::{HashMap, HashSet};

use baton_schedules::{
    generate, peak_receive_buffers, peak_receive_buffers_batched, validate, Op, Schedule, ScheduleKind,
};

/// Where each (op, part, mb) sits: (stage, index in the stage's list).
type Positions = HashMap<(Op, u32, u32), (usize, usize)>;

fn positions(s: &Schedule) -> Positions {
    let mut at = HashMap::new();
    for (stage, list) in s.actions.iter().enumerate() {
        for (i, a) in list.iter().enumerate() {
            let part = s.part_of(stage as u32, a).unwrap();
            assert!(at.insert((a.op, part, a.mb), (stage, i)).is_none());
        }
    }
    at
}

/// The actions a node waits on (data only; the list order is the prefix itself).
fn deps(at: &Positions, op: Op, part: u32, mb: u32, parts: u32) -> Vec<(usize, usize)> {
    let back = |part: u32| {
        at.get(&(Op::B, part, mb))
            .or_else(|| at.get(&(Op::I, part, mb)))
            .copied()
    };
    let mut d = Vec::new();
    match op {
        Op::F if part > 0 => d.push(at[&(Op::F, part - 1, mb)]),
        Op::F => {}
        Op::B | Op::I => {
            d.push(at[&(Op::F, part, mb)]);
            if part + 1 < parts {
                d.push(back(part + 1).unwrap());
            }
        }
        Op::W => d.push(at[&(Op::I, part, mb)]),
    }
    d
}

/// One message into a stage: its sender's position and the receiving stage's release index.
struct Message {
    sender: (usize, usize),
    to: usize,
    release: usize,
}

/// The messages into every stage; `batched`: each is released at its part's last `B`/`W` on the stage.
fn messages(s: &Schedule, at: &Positions, batched: bool) -> Vec<Message> {
    let parts = s.placement.num_parts();
    let last_weight = |part: u32| {
        at.iter()
            .filter(|((op, q, _), _)| *q == part && matches!(op, Op::B | Op::W))
            .map(|(_, &(_, i))| i)
            .max()
            .unwrap()
    };
    let mut out = Vec::new();
    for (stage, list) in s.actions.iter().enumerate() {
        for a in list {
            let part = s.part_of(stage as u32, a).unwrap();
            let sender = match a.op {
                Op::F if part > 0 => Some(at[&(Op::F, part - 1, a.mb)]),
                Op::B | Op::I if part + 1 < parts => deps(at, a.op, part, a.mb, parts).get(1).copied(),
                _ => None,
            };
            let Some(sender) = sender.filter(|&(t, _)| t != stage) else {
                continue;
            };
            let release = at
                .get(&(Op::B, part, a.mb))
                .or_else(|| at.get(&(Op::W, part, a.mb)))
                .unwrap();
            assert_eq!(release.0, stage);
            out.push(Message {
                sender,
                to: stage,
                release: if batched { last_weight(part) } else { release.1 },
            });
        }
    }
    out
}

/// The worst count per stage over every reachable state, and the number of states visited.
/// `pos[t]`: stage t's half-step position.
fn brute_force(s: &Schedule, batched: bool) -> (Vec<u32>, usize) {
    let at = positions(s);
    let parts = s.placement.num_parts();
    let msgs = messages(s, &at, batched);
    let p = s.actions.len();
    let mut worst = vec![0u32; p];
    let mut seen = HashSet::new();
    let sent = |pos: &[usize], (t, k): (usize, usize)| pos[t] > 2 * k;
    let mut todo = vec![vec![0usize; p]];
    while let Some(pos) = todo.pop() {
        if !seen.insert(pos.clone()) {
            continue;
        }
        for (stage, w) in worst.iter_mut().enumerate() {
            let live = msgs
                .iter()
                .filter(|m| m.to == stage && sent(&pos, m.sender) && pos[stage] <= 2 * m.release + 1)
                .count();
            *w = (*w).max(live as u32);
        }
        for t in 0..p {
            let at_half = pos[t] % 2 == 1;
            let Some(a) = s.actions[t].get(pos[t] / 2) else {
                continue;
            };
            let part = s.part_of(t as u32, a).unwrap();
            if at_half || deps(&at, a.op, part, a.mb, parts).iter().all(|&d| sent(&pos, d)) {
                let mut next = pos.clone();
                next[t] += 1;
                todo.push(next);
            }
        }
    }
    (worst, seen.len())
}

#[test]
fn matches_the_worst_reachable_state_for_every_generator() {
    let (mut checked, mut grew) = (0, false);
    for kind in [
        ScheduleKind::GPipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZbH1,
        ScheduleKind::ZbV,
    ] {
        for p in 1..=4u32 {
            for m in 1..=4u32 {
                for v in [1u32, 2] {
                    let Ok(s) = generate(kind, p, m, v) else { continue };
                    if s.num_actions() > 64 {
                        continue; // the state space grows as (actions per stage)^p
                    }
                    let fast = peak_receive_buffers(&s).unwrap();
                    let (slow, states) = brute_force(&s, false);
                    assert_eq!(fast, slow, "{kind} p={p} m={m} v={v} ({states} states)");
                    let batched = peak_receive_buffers_batched(&s).unwrap();
                    let (slow, states) = brute_force(&s, true);
                    assert_eq!(batched, slow, "batched {kind} p={p} m={m} v={v} ({states} states)");
                    assert!(
                        batched.iter().zip(&fast).all(|(b, f)| b >= f),
                        "{kind} p={p} m={m} v={v}"
                    );
                    grew |= batched != fast;
                    validate(&s).unwrap();
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 40, "only {checked} schedules checked");
    assert!(grew, "batching never held a receive buffer longer");
}

#[test]
fn known_figures() {
    // One stage: nothing is ever received.
    assert_eq!(
        peak_receive_buffers(&generate(ScheduleKind::OneFOneB, 1, 8, 1).unwrap()).unwrap(),
        [0]
    );
    // GPipe p=2: stage 1 can hold all m activations, and stage 0 all m gradients (its B's wait for all F's).
    let g = generate(ScheduleKind::GPipe, 2, 6, 1).unwrap();
    assert_eq!(peak_receive_buffers(&g).unwrap(), [6, 6]);
    // 1F1B bounds it by the warm-up depth: stage 0 of 4 has gradients from stage 1 only after its own
    // backward chain returns; stage 3 receives at most what stage 2 can run ahead.
    let f = generate(ScheduleKind::OneFOneB, 4, 8, 1).unwrap();
    let peaks = peak_receive_buffers(&f).unwrap();
    let g8 = peak_receive_buffers(&generate(ScheduleKind::GPipe, 4, 8, 1).unwrap()).unwrap();
    for (s, (&a, &b)) in peaks.iter().zip(&g8).enumerate() {
        assert!(a <= b, "stage {s}: 1F1B needs {a} > GPipe's {b}");
        assert!(a >= 1, "stage {s} receives something");
    }
    assert!(peaks.iter().sum::<u32>() < g8.iter().sum::<u32>());
}

/// Random legal orders, not just the generators': a random topological order of the whole dependency graph
/// (linear placement; full backward or split I/W), projected onto the stages, is a valid schedule. The fast pass
/// must equal the brute force on every one.
#[test]
fn matches_the_brute_force_on_random_orders() {
    use baton_schedules::{Action, Placement};
    let mut rng = 0x853c_49e6_748f_ea9bu64;
    let mut next = move |n: usize| -> usize {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut checked = 0;
    for case in 0..300 {
        let p = 2 + case % 2; // 2 or 3 stages
        let m = 1 + (case / 2) % 3; // 1..=3 micro-batches
        let split = case % 5 == 0;
        // Nodes: (op, part, mb); dependencies as the validator defines them.
        let mut nodes: Vec<(Op, u32, u32)> = Vec::new();
        for part in 0..p as u32 {
            for mb in 0..m as u32 {
                nodes.push((Op::F, part, mb));
                if split {
                    nodes.push((Op::I, part, mb));
                    nodes.push((Op::W, part, mb));
                } else {
                    nodes.push((Op::B, part, mb));
                }
            }
        }
        let back = if split { Op::I } else { Op::B };
        let deps = |&(op, part, mb): &(Op, u32, u32)| -> Vec<(Op, u32, u32)> {
            match op {
                Op::F if part > 0 => vec![(Op::F, part - 1, mb)],
                Op::F => vec![],
                Op::B | Op::I if part + 1 < p as u32 => vec![(Op::F, part, mb), (back, part + 1, mb)],
                Op::B | Op::I => vec![(Op::F, part, mb)],
                Op::W => vec![(Op::I, part, mb)],
            }
        };
        let mut done: HashSet<(Op, u32, u32)> = HashSet::new();
        let mut actions: Vec<Vec<Action>> = vec![Vec::new(); p];
        while done.len() < nodes.len() {
            let ready: Vec<_> = nodes
                .iter()
                .filter(|n| !done.contains(n) && deps(n).iter().all(|d| done.contains(d)))
                .copied()
                .collect();
            let (op, part, mb) = ready[next(ready.len())];
            actions[part as usize].push(Action::new(op, mb, 0));
            done.insert((op, part, mb));
        }
        let s = Schedule {
            kind: ScheduleKind::Custom,
            microbatches: m as u32,
            placement: Placement::linear(p as u32),
            actions,
        };
        validate(&s).unwrap_or_else(|e| panic!("case {case}: a topological order is valid: {e}"));
        for batched in [false, true] {
            let (slow, states) = brute_force(&s, batched);
            let fast = if batched {
                peak_receive_buffers_batched(&s).unwrap()
            } else {
                peak_receive_buffers(&s).unwrap()
            };
            assert_eq!(
                fast, slow,
                "case {case} batched={batched} ({states} states): {:?}",
                s.actions
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 300);
}

/// An invalid schedule gets the validator's error, never a figure or a panic.
#[test]
fn invalid_schedules_are_errors() {
    let mut s = generate(ScheduleKind::OneFOneB, 2, 2, 1).unwrap();
    s.actions[1].retain(|a| !(a.op == Op::B && a.mb == 1));
    let e = peak_receive_buffers(&s).unwrap_err();
    assert!(e.to_string().contains("no backward"), "{e}");
    // Stage 1's list reversed: its backwards come before the forwards they need, a deadlock.
    let mut s = generate(ScheduleKind::GPipe, 2, 2, 1).unwrap();
    s.actions[1].reverse();
    let e = peak_receive_buffers(&s).unwrap_err();
    assert!(matches!(e, baton_schedules::ScheduleError::Deadlock { .. }), "{e}");
}
