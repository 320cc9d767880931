//! Interchange with PyTorch 2.15's `torch.distributed.pipelining`, both ways.
//!
//! **Import** ([`schedule_from_csv`]): one row per rank, as `_dump_csv` writes it, either the
//! compute-only order (`format="compute_only"`, idle cells empty) or the lowered one
//! (`format="compute_comms"`: `SEND_*` / `RECV_*`, `WAIT_SEND_*`, `UNSHARD` / `RESHARD`,
//! `REDUCE_GRAD` / `WAIT_REDUCE_GRAD`). The compute actions make the schedule; the number of
//! rows is the stage count and the parts each row computes, in ascending order, are its chunks
//! (PyTorch's looped placement for interleaved schedules, the V for ZB-V). A lowered file's
//! comms are re-derived from the compute order and checked against it: every cross-rank
//! activation or gradient has one send after the action producing it and one receive before the
//! action consuming it, each on the rank holding the part it names; nothing is sent between
//! parts on the same rank; every send has a wait after it (when the file uses waits at all);
//! receives between two ranks are posted in the order the sends were; and the whole order runs
//! without a deadlock under the rule PyTorch's own `_simulate_comms_compute` applies (a receive
//! completes once its send is posted, a wait once its receive is). Housekeeping actions must
//! name a part their rank holds and reductions pair up as PyTorch's loader requires; Baton's
//! executor ignores them.
//!
//! **Export** ([`lower_with_comms`]): the same lowering PyTorch's `_PipelineScheduleRuntime`
//! runs on a compute-only schedule with its defaults, so `_load_csv(format="compute_comms")`
//! accepts the result and, for a compute order PyTorch also generates, the file is the one
//! PyTorch dumps, cell for cell.

use std::collections::HashMap;
use std::fmt;

use crate::error::ScheduleError;
use crate::ir::{Action, Op, Placement, Schedule, ScheduleKind, CHUNKS_MAX, MICROBATCHES_MAX, STAGES_MAX};
use crate::text::{from_csv, CommOp, ParamOp, PipeAction};
use crate::validate::validate;

/// How many parts PyTorch's runtime keeps unsharded per rank by default (`max_active_stages`).
const MAX_ACTIVE_PARTS: usize = 3;

/// No node.
const NONE: u32 = u32::MAX;

/// Builds a schedule from a PyTorch (or Baton) per-rank CSV; see the module doc. The result has
/// kind [`ScheduleKind::Custom`] and has passed [`validate`]; anything wrong is an error naming
/// the rank, the cell and the action.
pub fn schedule_from_csv(text: &str) -> Result<Schedule, ScheduleError> {
    schedule_from_rows(&from_csv(text)?)
}

/// [`schedule_from_csv`] on parsed rows (row = rank, `None` = idle cell).
pub(crate) fn schedule_from_rows(rows: &[Vec<Option<PipeAction>>]) -> Result<Schedule, ScheduleError> {
    let events = flatten(rows)?;
    let schedule = compute_schedule(&events)?;
    validate(&schedule)?;
    check_housekeeping(&schedule.placement, &events)?;
    if events
        .iter()
        .flatten()
        .any(|e| matches!(e.action, PipeAction::Comm { .. } | PipeAction::WaitSend { .. }))
    {
        check_lowered(&schedule.placement, &events)?;
    }
    Ok(schedule)
}

/// Checks the comm actions of lowered rows against the compute actions in them, as an import
/// does (see the module doc), for a known placement.
pub(crate) fn check_lowered_rows(placement: &Placement, rows: &[Vec<Option<PipeAction>>]) -> Result<(), ScheduleError> {
    let events = flatten(rows)?;
    if events.len() != placement.stages() as usize {
        return Err(ScheduleError::Comm(format!(
            "{} rank rows for a placement of {} stages",
            events.len(),
            placement.stages()
        )));
    }
    for (r, list) in events.iter().enumerate() {
        for e in list {
            if let PipeAction::Compute { part, .. } = e.action {
                if placement.owner(*part).map(|o| o.0) != Some(r as u32) {
                    return Err(ScheduleError::Comm(format!(
                        "{} `{}`: rank {r} does not hold part {part}",
                        e.loc, e.action
                    )));
                }
            }
        }
    }
    check_lowered(placement, &events)
}

/// Where a cell sits in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    rank: u32,
    col: usize,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} (row {}), column {}", self.rank, self.rank + 1, self.col + 1)
    }
}

/// One action of a rank's list, overlapped pairs expanded; never [`PipeAction::Overlap`].
struct Event<'a> {
    loc: Loc,
    action: &'a PipeAction,
}

/// Per rank, the actions in row order with idle cells dropped and `OVERLAP_F_B` expanded into
/// its actions (PyTorch runs them in that order).
fn flatten(rows: &[Vec<Option<PipeAction>>]) -> Result<Vec<Vec<Event<'_>>>, ScheduleError> {
    if rows.is_empty() {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: "no rows: a schedule CSV holds one row per rank".into(),
        });
    }
    if rows.len() > STAGES_MAX as usize {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: format!("{} rank rows; at most {STAGES_MAX} are supported", rows.len()),
        });
    }
    let mut out = Vec::with_capacity(rows.len());
    for (r, row) in rows.iter().enumerate() {
        let mut list = Vec::with_capacity(row.len());
        for (col, cell) in row.iter().enumerate() {
            let loc = Loc { rank: r as u32, col };
            match cell {
                None => {}
                Some(PipeAction::Overlap(subs)) => {
                    for sub in subs {
                        if let PipeAction::Overlap(_) = sub {
                            return Err(ScheduleError::Parse {
                                location: loc.to_string(),
                                reason: "OVERLAP_F_B inside OVERLAP_F_B".into(),
                            });
                        }
                        list.push(Event { loc, action: sub });
                    }
                }
                Some(action) => list.push(Event { loc, action }),
            }
        }
        out.push(list);
    }
    Ok(out)
}

/// The compute schedule of the rows: placement inferred from the parts each rank computes
/// (ascending part = ascending chunk), micro-batches from the largest index.
fn compute_schedule(events: &[Vec<Event<'_>>]) -> Result<Schedule, ScheduleError> {
    // part -> the first cell computing it.
    let mut home: HashMap<u32, (Loc, &PipeAction)> = HashMap::new();
    let mut parts: Vec<Vec<u32>> = vec![Vec::new(); events.len()];
    let mut max_mb = 0u32;
    let mut computes = 0usize;
    for (r, list) in events.iter().enumerate() {
        for e in list {
            let PipeAction::Compute { part, mb, .. } = e.action else {
                continue;
            };
            computes += 1;
            if *mb >= MICROBATCHES_MAX {
                return Err(ScheduleError::Parse {
                    location: format!("{} (`{}`)", e.loc, e.action),
                    reason: format!("micro-batch {mb} is out of range: at most {MICROBATCHES_MAX} are supported"),
                });
            }
            max_mb = max_mb.max(*mb);
            match home.get(part) {
                Some((first, action)) if first.rank != r as u32 => {
                    return Err(ScheduleError::Placement(format!(
                        "part {part} is held twice: by rank {} (`{action}` at {first}) and by rank {r} (`{}` at {})",
                        first.rank, e.action, e.loc
                    )));
                }
                Some(_) => {}
                None => {
                    home.insert(*part, (e.loc, e.action));
                    parts[r].push(*part);
                }
            }
        }
    }
    if computes == 0 {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: "no compute action (F, I, W or B)".into(),
        });
    }
    if let Some(r) = parts.iter().position(Vec::is_empty) {
        return Err(ScheduleError::Placement(format!(
            "rank {r} (row {}) computes nothing: every rank must hold at least one part",
            r + 1
        )));
    }
    for list in &mut parts {
        list.sort_unstable();
    }
    let chunks = parts[0].len();
    if let Some(r) = parts.iter().position(|p| p.len() != chunks) {
        return Err(ScheduleError::Placement(format!(
            "rank {r} computes parts {:?} but rank 0 computes {:?}: every rank must hold the same number of parts",
            parts[r], parts[0]
        )));
    }
    if chunks > CHUNKS_MAX as usize {
        return Err(ScheduleError::Placement(format!(
            "each rank computes {chunks} parts; at most {CHUNKS_MAX} per rank are supported"
        )));
    }
    let total = events.len() * chunks;
    if let Some(&part) = parts.iter().flatten().filter(|&&p| p as usize >= total).min() {
        let (loc, action) = home[&part];
        return Err(ScheduleError::Placement(format!(
            "part {part} (`{action}` at {loc}) is out of range: {} ranks holding {chunks} parts each make parts 0..{total}",
            events.len()
        )));
    }
    let microbatches = max_mb + 1;
    // Each (part, micro-batch) needs at least two compute actions; refusing a file far short of
    // that bounds what validation allocates by the size of the file.
    if total.saturating_mul(microbatches as usize) > computes {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: format!(
                "{computes} compute actions cannot cover {total} parts x {microbatches} micro-batches \
                 (an F and a B, or an F, I and W, for each)"
            ),
        });
    }
    let placement = Placement::new(parts)?;
    let mut actions = Vec::with_capacity(events.len());
    for list in events {
        let mut stage = Vec::with_capacity(list.len());
        for e in list {
            if let PipeAction::Compute { part, op, mb } = e.action {
                let Some((_, chunk)) = placement.owner(*part) else {
                    return Err(ScheduleError::Placement(format!("part {part} has no owner")));
                };
                stage.push(Action::new(*op, *mb, chunk));
            }
        }
        actions.push(stage);
    }
    Ok(Schedule {
        kind: ScheduleKind::Custom,
        microbatches,
        placement,
        actions,
    })
}

/// `UNSHARD`, `RESHARD`, `REDUCE_GRAD`, `WAIT_REDUCE_GRAD`: each names a part its rank holds,
/// and (as PyTorch's `compute_comms` loader requires) each reduction is waited for by a
/// `WAIT_REDUCE_GRAD` of the same part before the rank starts another.
fn check_housekeeping(placement: &Placement, events: &[Vec<Event<'_>>]) -> Result<(), ScheduleError> {
    for (r, list) in events.iter().enumerate() {
        let mut pending: Option<(u32, &Event<'_>)> = None;
        for e in list {
            let PipeAction::Param { op, part } = e.action else {
                continue;
            };
            check_owner(placement, r, e, *part)?;
            match op {
                ParamOp::Unshard | ParamOp::Reshard => {}
                ParamOp::ReduceGrad => {
                    if let Some((_, p)) = pending {
                        return Err(ScheduleError::Comm(format!(
                            "{} `{}`: rank {r} starts a reduction while `{}` at {} is not yet waited for",
                            e.loc, e.action, p.action, p.loc
                        )));
                    }
                    pending = Some((*part, e));
                }
                ParamOp::WaitReduceGrad => match pending {
                    Some((p, _)) if p == *part => pending = None,
                    Some((_, p)) => {
                        return Err(ScheduleError::Comm(format!(
                            "{} `{}` waits for part {part}'s reduction, but the pending one is `{}` at {}",
                            e.loc, e.action, p.action, p.loc
                        )))
                    }
                    None => {
                        return Err(ScheduleError::Comm(format!(
                            "{} `{}` has no `{part}REDUCE_GRAD` before it",
                            e.loc, e.action
                        )))
                    }
                },
            }
        }
        if let Some((part, p)) = pending {
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} is never waited for: rank {r} has no `{part}WAIT_REDUCE_GRAD` after it",
                p.action, p.loc
            )));
        }
    }
    Ok(())
}

/// The cell names `part`, which must be one its rank holds.
fn check_owner(placement: &Placement, rank: usize, e: &Event<'_>, part: u32) -> Result<(), ScheduleError> {
    match placement.owner(part) {
        Some((owner, _)) if owner as usize == rank => Ok(()),
        Some((owner, _)) => Err(ScheduleError::Comm(format!(
            "{} `{}` names part {part}, but part {part} is on rank {owner}, not rank {rank}",
            e.loc, e.action
        ))),
        None => Err(ScheduleError::Comm(format!(
            "{} `{}` names part {part}, which no rank computes (parts are 0..{})",
            e.loc,
            e.action,
            placement.num_parts()
        ))),
    }
}

/// Direction of a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Dir {
    /// An activation, from part k to part k + 1.
    Fwd,
    /// An input gradient, from part k to part k - 1.
    Bwd,
}

/// One cross-rank transfer: the sending part, the direction and the micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Transfer {
    dir: Dir,
    from: u32,
    mb: u32,
}

impl Transfer {
    /// The receiving part (callers only build transfers whose receiver exists).
    fn to(self) -> u32 {
        match self.dir {
            Dir::Fwd => self.from + 1,
            Dir::Bwd => self.from - 1,
        }
    }

    fn send(self) -> PipeAction {
        let op = match self.dir {
            Dir::Fwd => CommOp::SendF,
            Dir::Bwd => CommOp::SendB,
        };
        PipeAction::Comm {
            op,
            part: self.from,
            mb: self.mb,
        }
    }

    fn recv(self) -> PipeAction {
        let op = match self.dir {
            Dir::Fwd => CommOp::RecvF,
            Dir::Bwd => CommOp::RecvB,
        };
        PipeAction::Comm {
            op,
            part: self.to(),
            mb: self.mb,
        }
    }

    fn wait(self) -> PipeAction {
        let send = match self.dir {
            Dir::Fwd => CommOp::SendF,
            Dir::Bwd => CommOp::SendB,
        };
        PipeAction::WaitSend {
            send,
            part: self.from,
            mb: self.mb,
        }
    }
}

/// What a lowered cell does to a transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Send,
    Recv,
    Wait,
}

/// The transfer a compute action sends (its output crosses to another rank), if any.
fn produced(placement: &Placement, rank: u32, part: u32, op: Op, mb: u32) -> Option<Transfer> {
    let remote = |p: u32| placement.owner(p).is_some_and(|(s, _)| s != rank);
    match op {
        Op::F if part + 1 < placement.num_parts() && remote(part + 1) => Some(Transfer {
            dir: Dir::Fwd,
            from: part,
            mb,
        }),
        Op::B | Op::I if part > 0 && remote(part - 1) => Some(Transfer {
            dir: Dir::Bwd,
            from: part,
            mb,
        }),
        _ => None,
    }
}

/// The transfer a compute action receives (its input comes from another rank), if any.
fn consumed(placement: &Placement, rank: u32, part: u32, op: Op, mb: u32) -> Option<Transfer> {
    let remote = |p: u32| placement.owner(p).is_some_and(|(s, _)| s != rank);
    match op {
        Op::F if part > 0 && remote(part - 1) => Some(Transfer {
            dir: Dir::Fwd,
            from: part - 1,
            mb,
        }),
        Op::B | Op::I if part + 1 < placement.num_parts() && remote(part + 1) => Some(Transfer {
            dir: Dir::Bwd,
            from: part + 1,
            mb,
        }),
        _ => None,
    }
}

/// The transfer a comm cell belongs to and its role, after checking that the cell names a part
/// its rank holds and a neighbour on another rank.
fn comm_of(placement: &Placement, rank: usize, e: &Event<'_>) -> Result<Option<(Transfer, Role)>, ScheduleError> {
    let (op, part, mb, role) = match *e.action {
        PipeAction::Comm { op, part, mb } => (
            op,
            part,
            mb,
            match op {
                CommOp::SendF | CommOp::SendB => Role::Send,
                CommOp::RecvF | CommOp::RecvB => Role::Recv,
            },
        ),
        PipeAction::WaitSend { send, part, mb } => {
            if matches!(send, CommOp::RecvF | CommOp::RecvB) {
                return Err(ScheduleError::Comm(format!(
                    "{} `{}`: only sends are waited for",
                    e.loc, e.action
                )));
            }
            (send, part, mb, Role::Wait)
        }
        _ => return Ok(None),
    };
    check_owner(placement, rank, e, part)?;
    let peer = op.peer_part(part).filter(|&p| p < placement.num_parts());
    let Some(peer) = peer else {
        return Err(ScheduleError::Comm(format!(
            "{} `{}`: part {part} has no neighbour that way (parts are 0..{})",
            e.loc,
            e.action,
            placement.num_parts()
        )));
    };
    if placement.owner(peer).map(|o| o.0) == Some(rank as u32) {
        return Err(ScheduleError::Comm(format!(
            "{} `{}`: parts {part} and {peer} are both on rank {rank}, which hands that {} over locally; \
             PyTorch writes no SEND, RECV or wait between them",
            e.loc,
            e.action,
            if matches!(op, CommOp::SendF | CommOp::RecvF) {
                "activation"
            } else {
                "gradient"
            }
        )));
    }
    let (dir, from) = match op {
        CommOp::SendF => (Dir::Fwd, part),
        CommOp::RecvF => (Dir::Fwd, peer),
        CommOp::SendB => (Dir::Bwd, part),
        CommOp::RecvB => (Dir::Bwd, peer),
    };
    Ok(Some((Transfer { dir, from, mb }, role)))
}

/// The cells taking part in one transfer, as global event ids.
#[derive(Clone, Copy, Debug)]
struct Slots {
    send: u32,
    recv: u32,
    wait: u32,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            send: NONE,
            recv: NONE,
            wait: NONE,
        }
    }
}

/// The lowered-file checks of the module doc. The compute actions have been validated.
fn check_lowered(placement: &Placement, events: &[Vec<Event<'_>>]) -> Result<(), ScheduleError> {
    // Global ids: rank by rank, in row order.
    let mut start = Vec::with_capacity(events.len() + 1);
    let mut all: Vec<&Event<'_>> = Vec::new();
    let mut rank_of_id: Vec<u32> = Vec::new();
    for (r, list) in events.iter().enumerate() {
        start.push(all.len() as u32);
        all.extend(list.iter());
        rank_of_id.resize(all.len(), r as u32);
    }
    start.push(all.len() as u32);
    if all.len() >= NONE as usize {
        return Err(ScheduleError::Parse {
            location: "file".into(),
            reason: format!("{} actions is more than an import can index", all.len()),
        });
    }
    let at = |id: u32| all[id as usize];

    // The file's comms: each cell's transfer and role, and each transfer's cells.
    let mut comms: Vec<Option<(Transfer, Role)>> = Vec::with_capacity(all.len());
    let mut file: HashMap<Transfer, Slots> = HashMap::new();
    let mut has_waits = false;
    for (id, e) in all.iter().enumerate() {
        let comm = comm_of(placement, rank_of_id[id] as usize, e)?;
        comms.push(comm);
        let Some((t, role)) = comm else {
            continue;
        };
        let slots = file.entry(t).or_default();
        let slot = match role {
            Role::Send => &mut slots.send,
            Role::Recv => &mut slots.recv,
            Role::Wait => {
                has_waits = true;
                &mut slots.wait
            }
        };
        if *slot != NONE {
            return Err(ScheduleError::Comm(format!(
                "`{}` appears twice: at {} and at {}",
                e.action,
                at(*slot).loc,
                e.loc
            )));
        }
        *slot = id as u32;
    }

    // The comms the compute needs: producer and consumer of every cross-rank transfer.
    let mut needed: HashMap<Transfer, (u32, u32)> = HashMap::new();
    for (id, e) in all.iter().enumerate() {
        let PipeAction::Compute { part, op, mb } = *e.action else {
            continue;
        };
        let r = rank_of_id[id];
        if let Some(t) = produced(placement, r, part, op, mb) {
            needed.entry(t).or_insert((NONE, NONE)).0 = id as u32;
        }
        if let Some(t) = consumed(placement, r, part, op, mb) {
            needed.entry(t).or_insert((NONE, NONE)).1 = id as u32;
        }
    }
    let rank_of = |part: u32| placement.owner(part).map_or(0, |o| o.0);
    // Report the earliest problem in file order, whatever the hash order.
    let mut ordered: Vec<(Transfer, (u32, u32))> = needed.iter().map(|(t, ids)| (*t, *ids)).collect();
    ordered.sort_unstable_by_key(|&(_, (p, c))| (p.min(c), p.max(c)));
    for (t, (producer, consumer)) in ordered {
        if producer == NONE || consumer == NONE {
            let (have, want) = if producer == NONE {
                (consumer, "the action that produces it")
            } else {
                (producer, "the action that consumes it")
            };
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} has no counterpart: the file lacks {want}",
                at(have).action,
                at(have).loc
            )));
        }
        let slots = file.get(&t).copied().unwrap_or_default();
        let p = at(producer);
        if slots.send == NONE {
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} feeds part {} on rank {}, but rank {} has no `{}`",
                p.action,
                p.loc,
                t.to(),
                rank_of(t.to()),
                p.loc.rank,
                t.send()
            )));
        }
        let s = at(slots.send);
        if slots.recv == NONE {
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} has no matching `{}`: rank {} never receives it",
                s.action,
                s.loc,
                t.recv(),
                rank_of(t.to())
            )));
        }
        let (c, rv) = (at(consumer), at(slots.recv));
        if slots.send < producer {
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} comes before `{}` at {}, which computes what it sends",
                s.action, s.loc, p.action, p.loc
            )));
        }
        if slots.recv > consumer {
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} comes after `{}` at {}, which needs what it receives",
                rv.action, rv.loc, c.action, c.loc
            )));
        }
        if has_waits && slots.wait == NONE {
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} is never waited for: rank {} has no `{}` after it (the file waits for other sends, \
                 and PyTorch's compute_comms format retires every send with a wait)",
                s.action,
                s.loc,
                s.loc.rank,
                t.wait()
            )));
        }
        if slots.wait != NONE && slots.wait < slots.send {
            let w = at(slots.wait);
            return Err(ScheduleError::Comm(format!(
                "`{}` at {} comes before `{}` at {}, the send it waits for",
                w.action, w.loc, s.action, s.loc
            )));
        }
    }
    // Comms no compute asks for (a micro-batch out of range, say).
    if let Some((id, t)) = comms
        .iter()
        .enumerate()
        .find_map(|(id, c)| c.filter(|(t, _)| !needed.contains_key(t)).map(|(t, _)| (id, t)))
    {
        let e = all[id];
        return Err(ScheduleError::Comm(format!(
            "`{}` at {} matches no compute action: nothing computes part {}'s {} of micro-batch {} for another rank",
            e.action,
            e.loc,
            t.from,
            match t.dir {
                Dir::Fwd => "forward",
                Dir::Bwd => "backward",
            },
            t.mb
        )));
    }
    check_pair_order(placement, &all, &comms, &file)?;
    check_progress(&start, &rank_of_id, &all, &file)
}

/// Between two ranks, receives are posted in the order the sends were: PyTorch's lowering
/// guarantees it, and NCCL matches point-to-point messages between a pair of ranks in posting
/// order, so a file that breaks it hands a receiver the wrong tensor.
fn check_pair_order(
    placement: &Placement,
    all: &[&Event<'_>],
    comms: &[Option<(Transfer, Role)>],
    file: &HashMap<Transfer, Slots>,
) -> Result<(), ScheduleError> {
    let rank_of = |part: u32| placement.owner(part).map_or(0, |o| o.0);
    // (sender rank, receiver rank) -> transfers in posting order, on each side.
    let mut sent: HashMap<(u32, u32), Vec<Transfer>> = HashMap::new();
    let mut received: HashMap<(u32, u32), Vec<Transfer>> = HashMap::new();
    for &(t, role) in comms.iter().flatten() {
        let pair = (rank_of(t.from), rank_of(t.to()));
        match role {
            Role::Send => sent.entry(pair).or_default().push(t),
            Role::Recv => received.entry(pair).or_default().push(t),
            Role::Wait => {}
        }
    }
    let mut pairs: Vec<(u32, u32)> = sent.keys().copied().collect();
    pairs.sort_unstable();
    for pair in pairs {
        let sends = &sent[&pair];
        let recvs = received.get(&pair).map_or(&[][..], Vec::as_slice);
        let Some(i) = sends.iter().zip(recvs).position(|(a, b)| a != b) else {
            continue;
        };
        let (Some(s), Some(got)) = (file.get(&sends[i]), file.get(&recvs[i])) else {
            continue;
        };
        let (s, got) = (all[s.send as usize], all[got.recv as usize]);
        return Err(ScheduleError::Comm(format!(
            "rank {} posts its receives from rank {} out of order: its receive #{n} is `{}` at {}, but rank {}'s \
             send #{n} is `{}` at {} (NCCL matches messages between two ranks in posting order, so the \
             receives must follow the sends)",
            pair.1,
            pair.0,
            got.action,
            got.loc,
            pair.0,
            s.action,
            s.loc,
            n = i + 1,
        )));
    }
    Ok(())
}

/// Runs the lowered order under the rule PyTorch's `_simulate_comms_compute` applies: a rank
/// works down its row; a receive completes once the peer has posted its send, a wait once the
/// peer has posted the receive. Whatever is left when nothing can move is a deadlock, reported
/// as the cycle of ranks blocked on each other.
fn check_progress(
    start: &[u32],
    rank_of_id: &[u32],
    all: &[&Event<'_>],
    file: &HashMap<Transfer, Slots>,
) -> Result<(), ScheduleError> {
    let n = all.len();
    let ranks = start.len() - 1;
    // The one cross-rank predecessor of each cell, if any, and the inverse.
    let mut cross_pred = vec![NONE; n];
    let mut cross_succ = vec![NONE; n];
    for slots in file.values() {
        if slots.send != NONE && slots.recv != NONE {
            cross_pred[slots.recv as usize] = slots.send;
            cross_succ[slots.send as usize] = slots.recv;
        }
        if slots.recv != NONE && slots.wait != NONE {
            cross_pred[slots.wait as usize] = slots.recv;
            cross_succ[slots.recv as usize] = slots.wait;
        }
    }
    let first = |id: usize| start[rank_of_id[id] as usize] == id as u32;
    let mut indeg: Vec<u8> = (0..n)
        .map(|id| u8::from(!first(id)) + u8::from(cross_pred[id] != NONE))
        .collect();
    let mut done = vec![false; n];
    let mut queue: Vec<u32> = (0..ranks)
        .filter(|&r| start[r] < start[r + 1] && indeg[start[r] as usize] == 0)
        .map(|r| start[r])
        .collect();
    let mut finished = 0usize;
    while let Some(id) = queue.pop() {
        done[id as usize] = true;
        finished += 1;
        let r = rank_of_id[id as usize] as usize;
        let row_next = (id + 1 < start[r + 1]).then_some(id + 1);
        let cross = Some(cross_succ[id as usize]).filter(|&c| c != NONE);
        for next in row_next.into_iter().chain(cross) {
            indeg[next as usize] -= 1;
            if indeg[next as usize] == 0 {
                queue.push(next);
            }
        }
    }
    if finished == n {
        return Ok(());
    }
    // The first cell each rank could not run waits on a cell of another rank, which itself
    // waits behind that rank's first blocked cell: follow until a rank repeats.
    let head = |r: usize| (start[r]..start[r + 1]).find(|&id| !done[id as usize]);
    let mut r = (0..ranks).find(|&r| head(r).is_some()).unwrap_or(0);
    let mut seen = vec![usize::MAX; ranks];
    let mut chain: Vec<String> = Vec::new();
    while seen[r] == usize::MAX {
        seen[r] = chain.len();
        let Some(h) = head(r) else {
            break;
        };
        let blocker = cross_pred[h as usize];
        if blocker == NONE {
            break;
        }
        let (he, be) = (all[h as usize], all[blocker as usize]);
        chain.push(format!(
            "{} `{}` (waits for `{}` at {})",
            he.loc, he.action, be.action, be.loc
        ));
        r = rank_of_id[blocker as usize] as usize;
    }
    let from = if seen[r] < chain.len() { seen[r] } else { 0 };
    Err(ScheduleError::Deadlock {
        cycle: chain.split_off(from),
    })
}

/// Lowers a validated compute schedule to PyTorch's `compute_comms` rows, exactly as
/// `_PipelineScheduleRuntime` lowers a compute-only schedule with its default settings
/// (`max_active_stages=3`, no deferred receives or reduction waits, no send budget):
///
/// 1. `UNSHARD` a part before the first of the next three distinct parts the rank computes
///    needs it, `RESHARD` it once it leaves that window, and the rest at the end;
/// 2. `REDUCE_GRAD` + `WAIT_REDUCE_GRAD` right after a part's last backward (B or W);
/// 3. ranks advance in lock step, rank 0 first: a rank runs its next action once its input is
///    there (received, or computed on the rank itself at the turn of a V); an action whose
///    output goes to another rank is followed by its `SEND_*`, and the receiver gets the
///    matching `RECV_*` at that moment, so receives between two ranks follow the sends' order;
/// 4. each `SEND_F` is waited for (`WAIT_SEND_F`) right after the local backward of the same
///    part and micro-batch, which proves the activation arrived; the other sends at the end.
pub fn lower_with_comms(schedule: &Schedule) -> Result<Vec<Vec<PipeAction>>, ScheduleError> {
    validate(schedule)?;
    let placement = &schedule.placement;
    let m = schedule.microbatches;
    let mut queues = Vec::with_capacity(schedule.actions.len());
    for (s, list) in schedule.actions.iter().enumerate() {
        let mut compute = Vec::with_capacity(list.len());
        for a in list {
            let Some(part) = schedule.part_of(s as u32, a) else {
                return Err(ScheduleError::Placement(format!("stage {s} has no chunk {}", a.chunk)));
            };
            compute.push(PipeAction::Compute {
                part,
                op: a.op,
                mb: a.mb,
            });
        }
        queues.push(add_reduce_grad(add_unshard_reshard(compute), m));
    }
    let rows = add_send_recv(placement, m, queues)?;
    Ok(rows.into_iter().map(add_wait_send).collect())
}

/// The part a compute action runs on.
fn compute_part(a: &PipeAction) -> Option<u32> {
    match a {
        PipeAction::Compute { part, .. } => Some(*part),
        _ => None,
    }
}

/// Step 1 of [`lower_with_comms`] for one rank.
fn add_unshard_reshard(compute: Vec<PipeAction>) -> Vec<PipeAction> {
    // window[i]: the first MAX_ACTIVE_PARTS distinct parts computed from position i on.
    let mut window: Vec<Vec<u32>> = vec![Vec::new(); compute.len() + 1];
    for i in (0..compute.len()).rev() {
        let mut w = Vec::with_capacity(MAX_ACTIVE_PARTS);
        if let Some(p) = compute_part(&compute[i]) {
            w.push(p);
        }
        for &p in &window[i + 1] {
            if w.len() == MAX_ACTIVE_PARTS {
                break;
            }
            if !w.contains(&p) {
                w.push(p);
            }
        }
        window[i] = w;
    }
    let mut active: Vec<u32> = Vec::new();
    let mut out = Vec::with_capacity(compute.len() + 2 * MAX_ACTIVE_PARTS);
    for (i, action) in compute.into_iter().enumerate() {
        let resident = &window[i];
        let fetch: Vec<u32> = resident.iter().copied().filter(|p| !active.contains(p)).collect();
        let evict: Vec<u32> = active.iter().copied().filter(|p| !resident.contains(p)).collect();
        for part in evict {
            active.retain(|&p| p != part);
            out.push(PipeAction::Param {
                op: ParamOp::Reshard,
                part,
            });
        }
        for part in fetch {
            active.push(part);
            out.push(PipeAction::Param {
                op: ParamOp::Unshard,
                part,
            });
        }
        out.push(action);
    }
    out.extend(active.into_iter().map(|part| PipeAction::Param {
        op: ParamOp::Reshard,
        part,
    }));
    out
}

/// Step 2 of [`lower_with_comms`] for one rank.
fn add_reduce_grad(actions: Vec<PipeAction>, m: u32) -> Vec<PipeAction> {
    let mut count: HashMap<u32, u32> = HashMap::new();
    let mut out = Vec::with_capacity(actions.len() + 4);
    for action in actions {
        let last_backward = match action {
            PipeAction::Compute {
                part,
                op: Op::B | Op::W,
                ..
            } => {
                let c = count.entry(part).or_insert(0);
                *c += 1;
                (*c == m).then_some(part)
            }
            _ => None,
        };
        out.push(action);
        if let Some(part) = last_backward {
            out.push(PipeAction::Param {
                op: ParamOp::ReduceGrad,
                part,
            });
            out.push(PipeAction::Param {
                op: ParamOp::WaitReduceGrad,
                part,
            });
        }
    }
    out
}

/// Step 3 of [`lower_with_comms`].
fn add_send_recv(
    placement: &Placement,
    m: u32,
    queues: Vec<Vec<PipeAction>>,
) -> Result<Vec<Vec<PipeAction>>, ScheduleError> {
    let parts = placement.num_parts();
    let slot = |part: u32, mb: u32| part as usize * m as usize + mb as usize;
    let slots = parts as usize * m as usize;
    // What each rank has in its lowered row so far, by (part, micro-batch).
    let (mut forward_done, mut backward_done) = (vec![false; slots], vec![false; slots]);
    let (mut recv_f, mut recv_b) = (vec![false; slots], vec![false; slots]);
    let mut rows: Vec<Vec<PipeAction>> = queues.iter().map(|q| Vec::with_capacity(q.len() * 2)).collect();
    let mut next = vec![0usize; queues.len()];
    loop {
        let mut progress = false;
        let mut pending = false;
        for r in 0..queues.len() {
            let Some(action) = queues[r].get(next[r]) else {
                continue;
            };
            pending = true;
            if let PipeAction::Compute { part, op, mb } = *action {
                let ready = match op {
                    Op::F if part > 0 => recv_f[slot(part, mb)] || forward_done[slot(part - 1, mb)],
                    Op::B | Op::I if part + 1 < parts => recv_b[slot(part, mb)] || backward_done[slot(part + 1, mb)],
                    _ => true,
                };
                if !ready {
                    continue;
                }
                match op {
                    Op::F => forward_done[slot(part, mb)] = true,
                    Op::B | Op::I => backward_done[slot(part, mb)] = true,
                    Op::W => {}
                }
                rows[r].push(action.clone());
                if let Some(t) = produced(placement, r as u32, part, op, mb) {
                    rows[r].push(t.send());
                    let to = t.to();
                    let Some((peer, _)) = placement.owner(to) else {
                        return Err(ScheduleError::Placement(format!("part {to} has no owner")));
                    };
                    match t.dir {
                        Dir::Fwd => recv_f[slot(to, mb)] = true,
                        Dir::Bwd => recv_b[slot(to, mb)] = true,
                    }
                    rows[peer as usize].push(t.recv());
                }
            } else {
                rows[r].push(action.clone());
            }
            next[r] += 1;
            progress = true;
        }
        if !pending {
            return Ok(rows);
        }
        if !progress {
            // A validated schedule always progresses; refuse rather than loop.
            let stuck: Vec<String> = (0..queues.len())
                .filter_map(|r| queues[r].get(next[r]).map(|a| format!("rank {r} at `{a}`")))
                .collect();
            return Err(ScheduleError::Comm(format!(
                "cannot place sends and receives: {}",
                stuck.join(", ")
            )));
        }
    }
}

/// Step 4 of [`lower_with_comms`] for one rank.
fn add_wait_send(row: Vec<PipeAction>) -> Vec<PipeAction> {
    // Sends not yet waited for, in send order (None once waited).
    let mut pending: Vec<Option<PipeAction>> = Vec::new();
    let mut index: HashMap<(CommOp, u32, u32), usize> = HashMap::new();
    let mut out = Vec::with_capacity(row.len() * 3 / 2);
    for action in row {
        let wait = match action {
            PipeAction::Comm {
                op: op @ (CommOp::SendF | CommOp::SendB),
                part,
                mb,
            } => {
                index.insert((op, part, mb), pending.len());
                pending.push(Some(PipeAction::WaitSend { send: op, part, mb }));
                None
            }
            PipeAction::Compute {
                part,
                op: Op::B | Op::I,
                mb,
            } => index.remove(&(CommOp::SendF, part, mb)).and_then(|i| pending[i].take()),
            _ => None,
        };
        out.push(action);
        out.extend(wait);
    }
    out.extend(pending.into_iter().flatten());
    out
}
