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
        Ok(DepGraph { nodes, stage_start })
    }

    /// A topological order of the nodes, or the cycle that makes the schedule deadlock.
    pub fn topo_order(&self) -> Result<Vec<u32>, ScheduleError> {
        let n = self.nodes.len();
        // Successor lists in compressed form.
        let mut indegree = vec![0u8; n];
        let mut offsets = vec![0u32; n + 1];
        for node in &self.nodes {
            for &(p, _) in node.preds() {
                offsets[p as usize + 1] += 1;
            }
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut fill = offsets.clone();
        let mut succ = vec![0u32; offsets[n] as usize];
        for (id, node) in self.nodes.iter().enumerate() {
            indegree[id] = node.npreds;
            for &(p, _) in node.preds() {
                succ[fill[p as usize] as usize] = id as u32;
                fill[p as usize] += 1;
            }
        }
        let mut order: Vec<u32> = (0..n as u32).filter(|&i| indegree[i as usize] == 0).collect();
        let mut head = 0;
        while head < order.len() {
            let id = order[head] as usize;
            head += 1;
            for &next in &succ[offsets[id] as usize..offsets[id + 1] as usize] {
                indegree[next as usize] -= 1;
                if indegree[next as usize] == 0 {
                    order.push(next);
                }
            }
        }
        if order.len() == n {
            return Ok(order);
        }
        // Every node left over has a predecessor left over; walking back must revisit a node.
        let start = (0..n).find(|&i| indegree[i] > 0).expect("a node is left over");
        let mut seen = vec![u32::MAX; n];
        let mut path = Vec::new();
        let mut cur = start as u32;
        while seen[cur as usize] == u32::MAX {
            seen[cur as usize] = path.len() as u32;
            path.push(cur);
            let node = &self.nodes[cur as usize];
            cur = node
                .preds()
                .iter()
                .map(|&(p, _)| p)
                .find(|&p| indegree[p as usize] > 0)
                .expect("a left-over node has a left-over predecessor");
        }
        let mut cycle: Vec<String> = path[seen[cur as usize] as usize..]
            .iter()
            .map(|&id| self.describe(id))
            .collect();
        cycle.reverse();
        Err(ScheduleError::Deadlock { cycle })
    }

    /// `stage S: F3 (part 2)` for error messages.
    pub fn describe(&self, id: u32) -> String {
        let node = &self.nodes[id as usize];
        format!("stage {} {} (part {})", node.stage, node.action, node.part)
    }
}
