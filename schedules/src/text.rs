//! PyTorch pipelining's text formats, both ways: action strings (`0F3`, `1I0`, `2W5`, `3B1`,
//! `1RECV_F3`, `0SEND_B2`) and the per-rank CSV layout (one row per rank, one action per cell,
//! empty cell = idle), plus the pass that lowers a compute-only schedule to compute + comm.
//!
//! In an action string the leading number is the *model part* (PyTorch calls it the stage
//! index; with one chunk per stage it equals our stage). For a comm action it is the local
//! part: `1RECV_F3` is part 1 receiving micro-batch 3's activation from part 0.

use std::fmt;
use std::str::FromStr;

use crate::error::ScheduleError;
use crate::ir::{Action, Op, Placement, Schedule, ScheduleKind};
use crate::simulate::{simulate, Costs};

/// Most cells a CSV row may hold (a limit on what an import will allocate).
pub const CSV_CELLS_MAX: usize = 1 << 24;

/// A communication action between neighbouring parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CommOp {
    /// Send a forward activation to part + 1.
    SendF,
    /// Receive a forward activation from part - 1.
    RecvF,
    /// Send an input gradient to part - 1.
    SendB,
    /// Receive an input gradient from part + 1.
    RecvB,
}

impl CommOp {
    /// PyTorch's name.
    pub fn name(self) -> &'static str {
        match self {
            CommOp::SendF => "SEND_F",
            CommOp::RecvF => "RECV_F",
            CommOp::SendB => "SEND_B",
            CommOp::RecvB => "RECV_B",
        }
    }

    /// The part at the other end of the transfer, if it exists.
    pub fn peer_part(self, part: u32) -> Option<u32> {
        match self {
            CommOp::SendF | CommOp::RecvB => part.checked_add(1),
            CommOp::RecvF | CommOp::SendB => part.checked_sub(1),
        }
    }

    /// The op on the other side of the transfer.
    pub fn matching(self) -> CommOp {
        match self {
            CommOp::SendF => CommOp::RecvF,
            CommOp::RecvF => CommOp::SendF,
            CommOp::SendB => CommOp::RecvB,
            CommOp::RecvB => CommOp::SendB,
        }
    }
}

/// One cell of a PyTorch-style per-rank schedule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PipeAction {
    /// A compute action on a model part.
    Compute {
        /// Model part (PyTorch's stage index).
        part: u32,
        /// What is computed.
        op: Op,
        /// Micro-batch.
        mb: u32,
    },
    /// A transfer between `part` and its neighbour (see [`CommOp::peer_part`]).
    Comm {
        /// Direction and kind.
        op: CommOp,
        /// The local part.
        part: u32,
        /// Micro-batch.
        mb: u32,
    },
    /// A PyTorch action Baton does not run (`UNSHARD`, `RESHARD`, `REDUCE_GRAD`); kept so a
    /// file round-trips, ignored when a schedule is built from it.
    Other(String),
}

impl fmt::Display for PipeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipeAction::Compute { part, op, mb } => write!(f, "{part}{op}{mb}"),
            PipeAction::Comm { op, part, mb } => write!(f, "{part}{}{mb}", op.name()),
            PipeAction::Other(s) => f.write_str(s),
        }
    }
}

impl FromStr for PipeAction {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        let fail = |reason: &str| ScheduleError::Parse {
            location: format!("`{s}`"),
            reason: reason.into(),
        };
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(fail("an action starts with the part (stage index) number, as in `0F3`"));
        }
        let part: u32 = s[..digits]
            .parse()
            .map_err(|_| fail("part number does not fit in 32 bits"))?;
        let rest = &s[digits..];
        let name_len = rest.bytes().take_while(|b| !b.is_ascii_digit()).count();
        let (name, mb_text) = rest.split_at(name_len);
        for other in ["UNSHARD", "RESHARD", "REDUCE_GRAD"] {
            if name == other && mb_text.is_empty() {
                return Ok(PipeAction::Other(s.to_string()));
            }
        }
        if mb_text.is_empty() {
            return Err(fail("missing micro-batch number after the action name"));
        }
        let mb: u32 = mb_text
            .parse()
            .map_err(|_| fail("micro-batch must be a 32-bit number"))?;
        if let Some(op) = name
            .chars()
            .next()
            .filter(|_| name.len() == 1)
            .and_then(Op::from_letter)
        {
            return Ok(PipeAction::Compute { part, op, mb });
        }
        let op = match name {
            "SEND_F" => CommOp::SendF,
            "RECV_F" => CommOp::RecvF,
            "SEND_B" => CommOp::SendB,
            "RECV_B" => CommOp::RecvB,
            _ => {
                return Err(fail(
                    "unknown action: expected F, B, I, W, SEND_F, RECV_F, SEND_B or RECV_B",
                ))
            }
        };
        Ok(PipeAction::Comm { op, part, mb })
    }
}

/// Writes per-rank rows as PyTorch's CSV: one row per rank, one action per cell, empty = idle.
pub fn to_csv(rows: &[Vec<Option<PipeAction>>]) -> String {
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .map(|c| c.as_ref().map(ToString::to_string).unwrap_or_default())
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Parses PyTorch's per-rank CSV. Blank lines are skipped; empty cells are idle slots.
pub fn from_csv(text: &str) -> Result<Vec<Vec<Option<PipeAction>>>, ScheduleError> {
    let mut rows = Vec::new();
    for (r, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut row = Vec::new();
        for (c, cell) in line.split(',').enumerate() {
            if c >= CSV_CELLS_MAX {
                return Err(ScheduleError::Parse {
                    location: format!("row {}", r + 1),
                    reason: format!("more than {CSV_CELLS_MAX} cells"),
                });
            }
            let cell = cell.trim().trim_matches('"');
            if cell.is_empty() {
                row.push(None);
            } else {
                let action = cell.parse().map_err(|e| match e {
                    ScheduleError::Parse { reason, .. } => ScheduleError::Parse {
                        location: format!("row {}, column {} (`{cell}`)", r + 1, c + 1),
                        reason,
                    },
                    other => other,
                })?;
                row.push(Some(action));
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The schedule's compute actions as per-rank PyTorch actions, with idle cells where the
/// unit-cost simulation (every op 1, no latency) leaves the stage idle, so the rows line up in
/// time as PyTorch's own dumps do.
pub fn to_rank_actions(schedule: &Schedule) -> Result<Vec<Vec<Option<PipeAction>>>, ScheduleError> {
    let report = simulate(schedule, &Costs::unit(schedule.placement.num_parts()))?;
    Ok(report
        .spans
        .iter()
        .map(|spans| {
            let mut row = Vec::with_capacity(spans.len());
            for span in spans {
                // Unit costs: every start is an integer slot.
                while (row.len() as f64) < span.start {
                    row.push(None);
                }
                row.push(Some(PipeAction::Compute {
                    part: span.part,
                    op: span.action.op,
                    mb: span.action.mb,
                }));
            }
            row
        })
        .collect())
}

/// Builds a schedule from per-rank PyTorch actions (compute-only or with comms). Idle cells and
/// `UNSHARD`/`RESHARD`/`REDUCE_GRAD` are skipped; comm actions, if present, must pair up (see
/// [`check_comms`]). The placement is inferred: each rank's parts in ascending order are its
/// chunks. The result is validated.
pub fn schedule_from_rank_actions(rows: &[Vec<Option<PipeAction>>], stages: u32) -> Result<Schedule, ScheduleError> {
    if rows.len() != stages as usize {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: format!("{} rank rows, but --stages is {stages}", rows.len()),
        });
    }
    let mut parts: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    let mut max_mb = None::<u32>;
    let mut has_comms = false;
    for (s, row) in rows.iter().enumerate() {
        for cell in row.iter().flatten() {
            match cell {
                PipeAction::Compute { part, mb, .. } => {
                    if !parts[s].contains(part) {
                        parts[s].push(*part);
                    }
                    max_mb = Some(max_mb.map_or(*mb, |x| x.max(*mb)));
                }
                PipeAction::Comm { .. } => has_comms = true,
                PipeAction::Other(_) => {}
            }
        }
        parts[s].sort_unstable();
    }
    let Some(max_mb) = max_mb else {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: "no compute action".into(),
        });
    };
    if let Some(s) = parts.iter().position(Vec::is_empty) {
        return Err(ScheduleError::Placement(format!("rank {s} computes nothing")));
    }
    let placement = Placement::new(parts)?;
    let mut actions = Vec::with_capacity(rows.len());
    for (s, row) in rows.iter().enumerate() {
        let mut list = Vec::new();
        for cell in row.iter().flatten() {
            if let PipeAction::Compute { part, op, mb } = cell {
                let (owner, chunk) = placement.owner(*part).expect("part was collected from this row");
                debug_assert_eq!(owner as usize, s);
                list.push(Action::new(*op, *mb, chunk));
            }
        }
        actions.push(list);
    }
    let schedule = Schedule {
        kind: ScheduleKind::Custom,
        microbatches: max_mb + 1,
        placement,
        actions,
    };
    if has_comms {
        check_comms(&schedule.placement, rows)?;
    }
    crate::validate::validate(&schedule)?;
    Ok(schedule)
}

/// Lowers a compute-only schedule to compute + comm per rank: after each F whose next part lives
/// on another stage, a `SEND_F`; before each F whose input comes from another stage, a `RECV_F`;
/// likewise `SEND_B` after and `RECV_B` before the B or I that produce or consume gradients
/// crossing stages. Neighbouring parts on the same stage (the turn of a V) exchange nothing.
pub fn lower_with_comms(schedule: &Schedule) -> Result<Vec<Vec<PipeAction>>, ScheduleError> {
    crate::validate::validate(schedule)?;
    let placement = &schedule.placement;
    let parts = placement.num_parts();
    let stage_of = |part: u32| placement.owner(part).map(|(s, _)| s);
    let mut rows = Vec::with_capacity(schedule.actions.len());
    for (s, list) in schedule.actions.iter().enumerate() {
        let s = s as u32;
        let mut row = Vec::with_capacity(list.len() * 3);
        for a in list {
            let part = schedule.part_of(s, a).expect("validated");
            let remote = |peer: Option<u32>| peer.and_then(stage_of).is_some_and(|ps| ps != s);
            let comm = |op, mb| PipeAction::Comm { op, part, mb };
            match a.op {
                Op::F if part > 0 && remote(Some(part - 1)) => row.push(comm(CommOp::RecvF, a.mb)),
                Op::B | Op::I if part + 1 < parts && remote(Some(part + 1)) => row.push(comm(CommOp::RecvB, a.mb)),
                _ => {}
            }
            row.push(PipeAction::Compute {
                part,
                op: a.op,
                mb: a.mb,
            });
            match a.op {
                Op::F if part + 1 < parts && remote(Some(part + 1)) => row.push(comm(CommOp::SendF, a.mb)),
                Op::B | Op::I if part > 0 && remote(Some(part - 1)) => row.push(comm(CommOp::SendB, a.mb)),
                _ => {}
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Checks that comm actions pair up: every send has exactly one matching receive on the stage
/// holding the peer part, each comm names a part its rank holds, and each (part, micro-batch)
/// transfer appears once.
pub fn check_comms(placement: &Placement, rows: &[Vec<Option<PipeAction>>]) -> Result<(), ScheduleError> {
    use std::collections::HashMap;
    let mut seen: HashMap<(u32, u32, CommOp), u32> = HashMap::new();
    for (s, row) in rows.iter().enumerate() {
        for cell in row.iter().flatten() {
            let PipeAction::Comm { op, part, mb } = cell else {
                continue;
            };
            let owner = placement.owner(*part).map(|(st, _)| st);
            if owner != Some(s as u32) {
                return Err(ScheduleError::Comm(format!(
                    "rank {s} runs `{cell}` but does not hold part {part}"
                )));
            }
            let Some(peer) = op.peer_part(*part).filter(|&p| p < placement.num_parts()) else {
                return Err(ScheduleError::Comm(format!(
                    "rank {s} runs `{cell}` but part {part} has no such neighbour"
                )));
            };
            if seen.insert((*part, *mb, *op), peer).is_some() {
                return Err(ScheduleError::Comm(format!("`{cell}` appears twice")));
            }
        }
    }
    for (&(part, mb, op), &peer) in &seen {
        if !seen.contains_key(&(peer, mb, op.matching())) {
            let other = PipeAction::Comm {
                op: op.matching(),
                part: peer,
                mb,
            };
            return Err(ScheduleError::Comm(format!(
                "`{}` has no matching `{other}`",
                PipeAction::Comm { op, part, mb }
            )));
        }
    }
    Ok(())
}
