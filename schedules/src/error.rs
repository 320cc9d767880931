//! The error type of the schedule crate.

use thiserror::Error;

/// Everything that can go wrong while generating, validating, simulating or parsing a schedule.
/// Every variant says what was wrong and, where it can, what would work.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ScheduleError {
    /// A generator was asked for a shape it cannot serve.
    #[error("{kind} cannot serve stages={stages}, microbatches={microbatches}, chunks={chunks}: {reason}")]
    Unsupported {
        /// Schedule family name.
        kind: &'static str,
        /// Requested stages.
        stages: u32,
        /// Requested micro-batches.
        microbatches: u32,
        /// Requested chunks per stage.
        chunks: u32,
        /// Which constraint failed and what would work.
        reason: String,
    },
    /// An unknown schedule name.
    #[error("unknown schedule `{0}`; expected one of gpipe, 1f1b, interleaved, zb-h1, zb-v, 2bw")]
    UnknownKind(String),
    /// The placement is not a permutation of the parts.
    #[error("bad placement: {0}")]
    Placement(String),
    /// An action names a chunk or micro-batch out of range.
    #[error("stage {stage} action #{index} `{action}`: {reason}")]
    BadAction {
        /// Stage holding the action.
        stage: u32,
        /// Position in the stage's list.
        index: usize,
        /// The action, as text.
        action: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A (part, micro-batch) is missing an action or has too many.
    #[error("part {part} micro-batch {mb}: {reason}")]
    Coverage {
        /// Model part.
        part: u32,
        /// Micro-batch.
        mb: u32,
        /// What is missing or repeated.
        reason: String,
    },
    /// The per-stage orders admit no execution: the listed actions wait on each other in a cycle.
    #[error("deadlock: the actions wait on each other in a cycle: {}", cycle.join(" -> "))]
    Deadlock {
        /// The cycle, as `stage:action` strings.
        cycle: Vec<String>,
    },
    /// Cost model does not fit the schedule.
    #[error("bad costs: {0}")]
    Costs(String),
    /// Text (action string or CSV) could not be parsed.
    #[error("parse error at {location}: {reason}")]
    Parse {
        /// Where: `row R, column C` or the token.
        location: String,
        /// What was expected.
        reason: String,
    },
    /// A flush-free stream cannot run with PipeDream-2BW's weight versions: an action would read a
    /// version its stage has not produced yet.
    #[error("stage {stage} action #{index} `{action}`: {reason}")]
    WeightVersion {
        /// Stage holding the action.
        stage: u32,
        /// Position in the stage's list.
        index: usize,
        /// The action, as text.
        action: String,
        /// Which version it reads, with which delay, and after which action that version appears.
        reason: String,
    },
    /// A lowered (compute + comm) schedule is inconsistent.
    #[error("communication mismatch: {0}")]
    Comm(String),
    /// No split of the model fits the per-stage memory budget under this candidate.
    #[error(
        "{what}: no split fits the budget of {budget_bytes} bytes per stage; the split needing least memory still \
         needs {needed_bytes} bytes on stage {stage} ({detail})"
    )]
    MemoryBudget {
        /// The candidate (schedule, chunks, micro-batches, recomputation).
        what: String,
        /// The largest stage of the split needing least memory.
        stage: u32,
        /// That stage's bytes.
        needed_bytes: u64,
        /// The per-stage budget, bytes.
        budget_bytes: u64,
        /// What the stage's bytes are made of.
        detail: String,
    },
    /// The planner was given inputs it cannot use, or could not serve a candidate.
    #[error("planner: {0}")]
    Planner(String),
    /// The list scheduler was given options it cannot honour on a stage, or could not go on.
    #[error("list scheduler, stage {stage}: {reason}")]
    ListScheduler {
        /// The stage concerned.
        stage: u32,
        /// Which option or state, with its value, and what would work.
        reason: String,
    },
}
