//! The dependency graph of a schedule: one node per compute action, edges for the stage's own
//! order and for the data each action needs. Used by the validator and the simulator.

use crate::error::ScheduleError;
use crate::ir::{Action, Op, Schedule};

/// No node.
const NONE: u32 = u32::MAX;

/// Why one node waits on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EdgeKind {
    /// The previous action in the same stage's list.
    StageOrder,
    /// Data produced by another action (activation, gradient, or I's stash for W).
    Data,
}

/// One action in the graph.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node {
    pub stage: u32,
    pub action: Action,
    pub part: u32,
    /// Up to three predecessors: stage order, and up to two data dependencies.
    pub preds: [(u32, EdgeKind); 3],
    pub npreds: u8,
}

impl Node {
    pub fn preds(&self) -> &[(u32, EdgeKind)] {
        &self.preds[..self.npreds as usize]
    }
}

/// The graph, with nodes numbered stage by stage in list order.
pub(crate) struct DepGraph {
    pub nodes: Vec<Node>,
    /// `stage_start[s]..stage_start[s+1]` are stage s's nodes.
    pub stage_start: Vec<u32>,
    /// Per node: the action on the neighbouring part that consumes its output (`NONE` if none).
    consumer: Vec<u32>,
}

impl DepGraph {
    /// Builds the graph, checking ranges and that every (part, micro-batch) has exactly one F
    /// and either one B, or one I and one W, on the stage that holds the part.
    pub fn build(schedule: &Schedule) -> Result<Self, ScheduleError> {
        let m = schedule.microbatches;
        let placement = &schedule.placement;
        let parts = placement.num_parts();
        if m == 0 {
            return Err(ScheduleError::Coverage {
                part: 0,
                mb: 0,
                reason: "the schedule has zero micro-batches".into(),
            });
        }
        if schedule.actions.len() != placement.stages() as usize {
            return Err(ScheduleError::Placement(format!(
                "{} action lists for {} stages",
                schedule.actions.len(),
                placement.stages()
            )));
        }
        let slots = parts as usize * m as usize;
        let (mut fwd, mut bwd, mut inp, mut wgt) = (
            vec![NONE; slots],
            vec![NONE; slots],
            vec![NONE; slots],
            vec![NONE; slots],
        );
        let total = schedule.num_actions();
        if total > u32::MAX as usize - 1 {
            return Err(ScheduleError::Placement(format!(
                "{total} actions is more than the graph can index"
            )));
        }
        let mut nodes = Vec::with_capacity(total);
        let mut stage_start = Vec::with_capacity(schedule.actions.len() + 1);
        for (s, list) in schedule.actions.iter().enumerate() {
            stage_start.push(nodes.len() as u32);
            for (index, action) in list.iter().enumerate() {
                let bad = |reason: String| ScheduleError::BadAction {
                    stage: s as u32,
                    index,
                    action: action.to_string(),
                    reason,
                };
                let Some(part) = placement.part(s as u32, action.chunk) else {
                    return Err(bad(format!(
                        "chunk {} is out of range (the stage holds {})",
                        action.chunk,
                        placement.chunks()
                    )));
                };
                if action.mb >= m {
                    return Err(bad(format!(
                        "micro-batch {} is out of range (the schedule has {m})",
                        action.mb
                    )));
                }
                let slot = part as usize * m as usize + action.mb as usize;
                let table = match action.op {
                    Op::F => &mut fwd,
                    Op::B => &mut bwd,
                    Op::I => &mut inp,
                    Op::W => &mut wgt,
                };
                if table[slot] != NONE {
                    return Err(ScheduleError::Coverage {
                        part,
                        mb: action.mb,
                        reason: format!("{} appears twice", action.op),
                    });
                }
                table[slot] = nodes.len() as u32;
                nodes.push(Node {
                    stage: s as u32,
                    action: *action,
                    part,
                    preds: [(NONE, EdgeKind::Data); 3],
                    npreds: 0,
                });
            }
        }
        stage_start.push(nodes.len() as u32);

        // Coverage, then edges.
        for part in 0..parts {
            for mb in 0..m {
                let slot = part as usize * m as usize + mb as usize;
                let coverage = |reason: &str| {
                    Err(ScheduleError::Coverage {
                        part,
                        mb,
                        reason: reason.into(),
                    })
                };
                if fwd[slot] == NONE {
                    return coverage("has no F");
                }
                match (bwd[slot] != NONE, inp[slot] != NONE, wgt[slot] != NONE) {
                    (true, false, false) | (false, true, true) => {}
                    (false, false, false) => return coverage("has no backward (neither B nor I+W)"),
                    (true, _, _) => return coverage("has both B and a split backward (I/W)"),
                    (false, true, false) => return coverage("has I but no W"),
                    (false, false, true) => return coverage("has W but no I"),
                }
            }
        }
        let back = |slot: usize| if bwd[slot] != NONE { bwd[slot] } else { inp[slot] };
        for s in 0..schedule.actions.len() {
            for id in stage_start[s]..stage_start[s + 1] {
                let node = nodes[id as usize];
                let slot = node.part as usize * m as usize + node.action.mb as usize;
                let mut preds = [(NONE, EdgeKind::Data); 3];
                let mut n = 0usize;
                let mut add = |pred: u32, kind: EdgeKind| {
                    debug_assert!(pred != NONE && n < 3);
                    preds[n] = (pred, kind);
                    n += 1;
                };
                if id > stage_start[s] {
                    add(id - 1, EdgeKind::StageOrder);
                }
                match node.action.op {
                    Op::F => {
                        if node.part > 0 {
                            add(fwd[slot - m as usize], EdgeKind::Data);
                        }
                    }
                    Op::B | Op::I => {
                        add(fwd[slot], EdgeKind::Data);
                        if node.part + 1 < parts {
                            add(back(slot + m as usize), EdgeKind::Data);
                        }
                    }
                    Op::W => add(inp[slot], EdgeKind::Data),
                }
                nodes[id as usize].preds = preds;
                nodes[id as usize].npreds = n as u8;
            }
        }
        // F(k) feeds F(k+1); B/I(k) feeds B/I(k-1). Same-part consumers sit on the same stage.
        let mut consumer = vec![NONE; nodes.len()];
        for (id, node) in nodes.iter().enumerate() {
            let slot = node.part as usize * m as usize + node.action.mb as usize;
            consumer[id] = match node.action.op {
                Op::F if node.part + 1 < parts => fwd[slot + m as usize],
                Op::B | Op::I if node.part > 0 => back(slot - m as usize),
                _ => NONE,
            };
        }
        Ok(DepGraph {
            nodes,
            stage_start,
            consumer,
        })
    }

    /// Runs the stages' lists as far as their inputs allow and returns the order in which the
    /// actions ran (a topological order), or the cycle of waiting stages that makes the
    /// schedule deadlock.
    ///
    /// Each stage advances its pointer while its next action's inputs are done. Finishing an
    /// action wakes at most one other stage (the consumer of the activation or gradient it
    /// produced), so the pass is linear in the number of actions and walks each stage's list
    /// sequentially (cache-friendly).
    pub fn run_order(&self) -> Result<Vec<u32>, ScheduleError> {
        let stages = self.stage_start.len() - 1;
        let mut done = vec![false; self.nodes.len()];
        let mut next: Vec<u32> = self.stage_start[..stages].to_vec();
        let mut order = Vec::with_capacity(self.nodes.len());
        let mut queued = vec![true; stages];
        let mut work: Vec<usize> = (0..stages).rev().collect();
        while let Some(s) = work.pop() {
            queued[s] = false;
            let end = self.stage_start[s + 1];
            while next[s] < end {
                let id = next[s];
                let node = &self.nodes[id as usize];
                if !node.preds().iter().all(|&(p, _)| done[p as usize]) {
                    break;
                }
                done[id as usize] = true;
                order.push(id);
                next[s] += 1;
                // Wake the stage that consumes what this action produced, if it is waiting.
                let consumer = self.consumer[id as usize];
                if consumer != NONE {
                    let cs = self.nodes[consumer as usize].stage as usize;
                    if cs != s && next[cs] == consumer && !queued[cs] {
                        queued[cs] = true;
                        work.push(cs);
                    }
                }
            }
        }
        if order.len() == self.nodes.len() {
            return Ok(order);
        }
        // Every unfinished stage waits on one action of one stage: follow the waits to a cycle.
        let waiting = |s: usize| -> (u32, u32) {
            let id = next[s];
            let node = &self.nodes[id as usize];
            let (pred, _) = *node
                .preds()
                .iter()
                .find(|&&(p, _)| !done[p as usize])
                .expect("a blocked action has an unmet input");
            (id, pred)
        };
        let mut seen = vec![usize::MAX; stages];
        let mut path: Vec<(u32, u32)> = Vec::new();
        let mut s = (0..stages)
            .find(|&s| next[s] < self.stage_start[s + 1])
            .expect("an unfinished stage");
        while seen[s] == usize::MAX {
            seen[s] = path.len();
            let (id, pred) = waiting(s);
            path.push((id, pred));
            s = self.nodes[pred as usize].stage as usize;
        }
        let cycle = path[seen[s]..]
            .iter()
            .map(|&(id, pred)| format!("{} waits for {}", self.describe(id), self.describe(pred)))
            .collect();
        Err(ScheduleError::Deadlock { cycle })
    }

    /// `stage S: F3 (part 2)` for error messages.
    pub fn describe(&self, id: u32) -> String {
        let node = &self.nodes[id as usize];
        format!("stage {} {} (part {})", node.stage, node.action, node.part)
    }
}
