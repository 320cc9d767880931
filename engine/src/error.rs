//! The engine's error type.

use thiserror::Error;

use crate::data::DataError;
use baton_schedules::ScheduleError;

/// Everything the engine can report. Variants name the stage, the op and the value at fault.
#[derive(Debug, Error)]
pub enum EngineError {
    /// A configuration field is out of range.
    #[error("config: {field} = {value}: {reason}")]
    Config {
        /// The field's name as the CLI and TOML spell it.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// The stage split drops, repeats or reorders layers, or has an empty or surplus stage.
    #[error("split: {0}")]
    Split(String),
    /// The schedule cannot serve the configuration.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// Data could not be loaded.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A batch does not fit the pipeline.
    #[error("batch: {0}")]
    Batch(String),
    /// A stage failed while running an action of the schedule.
    #[error("stage {stage} failed at action #{index} `{action}`: {cause}")]
    StageFailed {
        /// The failing stage.
        stage: u32,
        /// Position of the action in the stage's list.
        index: usize,
        /// The action, as text.
        action: String,
        /// What went wrong.
        cause: String,
    },
    /// A backend op was given buffers that do not match its shapes, or the device failed.
    #[error("backend {backend}: {op}: {reason}")]
    Backend {
        /// Backend name.
        backend: String,
        /// The op.
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The step produced a non-finite loss or gradient norm (first seen at `stage`/`action`).
    #[error("non-finite {what} at step {step}{}; {policy}", match (stage, action.as_str()) { (Some(s), "") => format!(" (first seen on stage {s})"), (Some(s), a) => format!(" (first seen on stage {s} at `{a}`)"), _ => String::new() })]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// Training step (1-based).
        step: u64,
        /// Stage where a non-finite value first appeared, if known.
        stage: Option<u32>,
        /// The action that produced it, if known.
        action: String,
        /// What the policy did (`aborting`, `3 consecutive skips, the limit`).
        policy: String,
    },
    /// An earlier failure left the pipeline without some stage's state; rebuild it from a checkpoint.
    #[error("the pipeline lost its state: {0}; rebuild it from a checkpoint")]
    Lost(String),
    /// No usable CUDA device: the driver (or cuBLAS) is not installed, or there is no device with that ordinal.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A checkpoint is missing, incomplete, corrupt or does not match the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Shorthand result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// A configuration error.
    pub fn config(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        EngineError::Config {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
