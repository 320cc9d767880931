//! PyTorch pipelining's text formats, both ways: action strings and the per-rank CSV layout
//! (one row per rank, one action per cell, empty cell = idle).
//!
//! Every action PyTorch 2.15's `_Action.from_str` reads is understood: compute (`0F3`, `1I0`,
//! `2W5`, `3B1`: `B` is PyTorch's full backward), transfers (`1RECV_F3`, `0SEND_B2`), the waits
//! that retire a send (`0WAIT_SEND_F3`), FSDP and data-parallel housekeeping (`0UNSHARD`,
//! `0RESHARD`, `0REDUCE_GRAD`, `0WAIT_REDUCE_GRAD`) and the overlapped pair
//! `(0F1;3I0)OVERLAP_F_B`.
//!
//! In an action string the leading number is the *model part* (PyTorch calls it the stage
//! index; with one chunk per stage it equals our stage). For a comm action it is the local
//! part: `1RECV_F3` is part 1 receiving micro-batch 3's activation from part 0.
//!
//! [`schedule_from_csv`](crate::schedule_from_csv) and
//! [`lower_with_comms`](crate::lower_with_comms) (in `torch.rs`) turn these rows into a
//! [`Schedule`] and back.

use std::fmt;
use std::str::FromStr;

use crate::error::ScheduleError;
use crate::ir::{Op, Placement, Schedule};
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

/// Parameter and gradient housekeeping that PyTorch's runtime runs around the compute: FSDP's
/// all-gather and release of a part's weights, and the data-parallel gradient reduction once a
/// part's last backward is done. Baton's executor needs none of them: an import accepts and
/// ignores them, the comms export writes them where PyTorch's own lowering would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamOp {
    /// `UNSHARD`: gather the part's FSDP-sharded weights.
    Unshard,
    /// `RESHARD`: release the gathered weights.
    Reshard,
    /// `REDUCE_GRAD`: start the reduction of the part's accumulated gradients.
    ReduceGrad,
    /// `WAIT_REDUCE_GRAD`: wait for that reduction.
    WaitReduceGrad,
}

impl ParamOp {
    /// Every housekeeping op.
    pub const ALL: [ParamOp; 4] = [
        ParamOp::Unshard,
        ParamOp::Reshard,
        ParamOp::ReduceGrad,
        ParamOp::WaitReduceGrad,
    ];

    /// PyTorch's name.
    pub fn name(self) -> &'static str {
        match self {
            ParamOp::Unshard => "UNSHARD",
            ParamOp::Reshard => "RESHARD",
            ParamOp::ReduceGrad => "REDUCE_GRAD",
            ParamOp::WaitReduceGrad => "WAIT_REDUCE_GRAD",
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
    /// `WAIT_SEND_F` / `WAIT_SEND_B`: wait until the earlier send of `part`'s micro-batch `mb`
    /// has gone (PyTorch's runtime retires a send only here).
    WaitSend {
        /// The send waited for: [`CommOp::SendF`] or [`CommOp::SendB`].
        send: CommOp,
        /// The sending part.
        part: u32,
        /// Micro-batch.
        mb: u32,
    },
    /// FSDP / data-parallel housekeeping on `part` (no micro-batch).
    Param {
        /// Which one.
        op: ParamOp,
        /// The part it applies to.
        part: u32,
    },
    /// `(a;b)OVERLAP_F_B`: actions PyTorch runs as one step, in this order.
    Overlap(Vec<PipeAction>),
}

impl fmt::Display for PipeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipeAction::Compute { part, op, mb } => write!(f, "{part}{op}{mb}"),
            PipeAction::Comm { op, part, mb } => write!(f, "{part}{}{mb}", op.name()),
            PipeAction::WaitSend { send, part, mb } => write!(f, "{part}WAIT_{}{mb}", send.name()),
            PipeAction::Param { op, part } => write!(f, "{part}{}", op.name()),
            PipeAction::Overlap(subs) => {
                f.write_str("(")?;
                for (i, sub) in subs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(";")?;
                    }
                    write!(f, "{sub}")?;
                }
                f.write_str(")OVERLAP_F_B")
            }
        }
    }
}

/// Every action name PyTorch 2.15 writes after the part number, for error messages.
const ACTION_NAMES: &str = "F, I, W, B, SEND_F, RECV_F, SEND_B, RECV_B, WAIT_SEND_F, WAIT_SEND_B, \
                            UNSHARD, RESHARD, REDUCE_GRAD, WAIT_REDUCE_GRAD, or `(a;b)OVERLAP_F_B`";

impl FromStr for PipeAction {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        let fail = |reason: String| ScheduleError::Parse {
            location: format!("`{s}`"),
            reason,
        };
        let Some(inner) = s.strip_prefix('(') else {
            return parse_single(s).map_err(fail);
        };
        let Some((list, tail)) = inner.split_once(')') else {
            return Err(fail("an overlapped action list `(a;b)` is missing its `)`".into()));
        };
        if tail != "OVERLAP_F_B" {
            return Err(fail(format!(
                "a bracketed action list must be followed by OVERLAP_F_B, not `{tail}`"
            )));
        }
        let subs = list
            .split(';')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| parse_single(t).map_err(|reason| fail(format!("in `{t}`: {reason}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if subs.is_empty() {
            return Err(fail("OVERLAP_F_B holds no action".into()));
        }
        Ok(PipeAction::Overlap(subs))
    }
}

/// Parses one action without brackets; the error is the reason only.
fn parse_single(s: &str) -> Result<PipeAction, String> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("an action starts with the part (stage index) number, as in `0F3`".into());
    }
    let part: u32 = s[..digits]
        .parse()
        .map_err(|_| "part number does not fit in 32 bits".to_string())?;
    let rest = &s[digits..];
    let name_len = rest.bytes().take_while(|b| !b.is_ascii_digit()).count();
    let (name, mb_text) = rest.split_at(name_len);
    if let Some(op) = ParamOp::ALL.into_iter().find(|op| op.name() == name) {
        if !mb_text.is_empty() {
            return Err(format!("{name} applies to a whole part and takes no micro-batch"));
        }
        return Ok(PipeAction::Param { op, part });
    }
    enum Kind {
        Compute(Op),
        Comm(CommOp),
        Wait(CommOp),
    }
    let kind = match name {
        "F" => Kind::Compute(Op::F),
        "I" => Kind::Compute(Op::I),
        "W" => Kind::Compute(Op::W),
        "B" => Kind::Compute(Op::B),
        "SEND_F" => Kind::Comm(CommOp::SendF),
        "RECV_F" => Kind::Comm(CommOp::RecvF),
        "SEND_B" => Kind::Comm(CommOp::SendB),
        "RECV_B" => Kind::Comm(CommOp::RecvB),
        "WAIT_SEND_F" => Kind::Wait(CommOp::SendF),
        "WAIT_SEND_B" => Kind::Wait(CommOp::SendB),
        "" => return Err("missing action name after the part number".into()),
        other => return Err(format!("unknown action `{other}`: expected {ACTION_NAMES}")),
    };
    if mb_text.is_empty() {
        return Err(format!("missing micro-batch number after the action name {name}"));
    }
    if let Some(bad) = mb_text.chars().find(|c| !c.is_ascii_digit()) {
        return Err(format!("unexpected `{bad}` in the micro-batch number `{mb_text}`"));
    }
    let mb: u32 = mb_text
        .parse()
        .map_err(|_| "micro-batch must be a 32-bit number".to_string())?;
    Ok(match kind {
        Kind::Compute(op) => PipeAction::Compute { part, op, mb },
        Kind::Comm(op) => PipeAction::Comm { op, part, mb },
        Kind::Wait(send) => PipeAction::WaitSend { send, part, mb },
    })
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

/// Builds a schedule from per-rank PyTorch actions, checking that there are `stages` rows;
/// otherwise the same as [`schedule_from_csv`](crate::schedule_from_csv) on parsed rows
/// (compute-only or lowered, placement inferred, validated).
pub fn schedule_from_rank_actions(rows: &[Vec<Option<PipeAction>>], stages: u32) -> Result<Schedule, ScheduleError> {
    if rows.len() != stages as usize {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: format!("{} rank rows, but --stages is {stages}", rows.len()),
        });
    }
    crate::torch::schedule_from_rows(rows)
}

/// Checks lowered rows' comm actions against their compute actions under `placement`: every
/// cross-rank activation or gradient has exactly one send on the rank holding the sending part,
/// after the action producing it, and one receive on the rank holding the peer part, before the
/// action consuming it; waits (if any) follow their sends; receives between two ranks follow the
/// sends' order; and the rows run without a deadlock. See the `torch` module doc.
pub fn check_comms(placement: &Placement, rows: &[Vec<Option<PipeAction>>]) -> Result<(), ScheduleError> {
    crate::torch::check_lowered_rows(placement, rows)
}
