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
    /// A batch does not fit the pipeline (size, sequence length, token ids).
    #[error("batch: {reason}")]
    Batch {
        /// What is wrong with the batch and how to fix it.
        reason: String,
    },
    /// The model supplied to the pipeline breaks its contract (a tied group naming a parameter no unit holds,
    /// a unit with no output, a parameter name used twice, ...).
    #[error("model: {0}")]
    Model(String),
    /// A layer was called without what its op needs (an input activation, an output gradient, tokens on this
    /// stage, a filled stash slot).
    #[error("layer `{layer}`: {reason}")]
    Layer {
        /// The layer's name (`block 3`).
        layer: String,
        /// What was missing.
        reason: String,
    },
    /// An internal rule of the executor was broken (a backward before its forward, an inbox that refused a
    /// message). Always a bug, never bad input.
    #[error("executor invariant broken on stage {stage}: {what}")]
    Invariant {
        /// The stage that noticed it.
        stage: u32,
        /// Which rule.
        what: String,
    },
    /// The step was aborted because another stage failed first; this stage stopped waiting.
    #[error("stage {stage} aborted: another stage failed")]
    Aborted {
        /// The stage that stopped.
        stage: u32,
    },
    /// A transport or collective could not deliver (a disconnected endpoint, a deadline passed, a peer lost).
    #[error("{seam} on stage {stage}: {reason}")]
    Comm {
        /// `transport` or `collective`.
        seam: &'static str,
        /// The local stage (or group member).
        stage: u32,
        /// What happened.
        reason: String,
    },
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
        /// The device library's typed error, where there is one (a CUDA driver, NVRTC or cuBLAS error).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
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
    /// Profiling a model for the planner failed.
    #[error("profile of {what}: {reason}")]
    Profile {
        /// The model and backend.
        what: String,
        /// What went wrong.
        reason: String,
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
    /// A backend error without a typed source (a shape mismatch found before calling the device).
    pub fn backend(backend: impl Into<String>, op: &'static str, reason: impl Into<String>) -> Self {
        EngineError::Backend {
            backend: backend.into(),
            op,
            reason: reason.into(),
            source: None,
        }
    }

    /// A layer error.
    pub fn layer(layer: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::Layer {
            layer: layer.into(),
            reason: reason.into(),
        }
    }

    /// A batch error.
    pub fn batch(reason: impl Into<String>) -> Self {
        EngineError::Batch { reason: reason.into() }
    }

    /// True for [`EngineError::Aborted`]: the stage stopped because another failed (not a failure of its own).
    pub fn is_abort(&self) -> bool {
        matches!(self, EngineError::Aborted { .. })
    }

    /// The same error, saying which data-parallel replica it happened on (stage failures and communication errors;
    /// other kinds are returned as they are).
    pub fn in_replica(self, replica: usize) -> Self {
        match self {
            EngineError::StageFailed {
                stage,
                index,
                action,
                cause,
            } => EngineError::StageFailed {
                stage,
                index,
                action,
                cause: format!("replica {replica}: {cause}"),
            },
            EngineError::Comm { seam, stage, reason } => EngineError::Comm {
                seam,
                stage,
                reason: format!("replica {replica}: {reason}"),
            },
            other => other,
        }
    }

    /// A configuration error.
    pub fn config(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        EngineError::Config {
            field,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The process's recorder of errors raised in `Drop` (shared with the kernels crate): record with
/// [`record_drop_error`], collect with [`take_drop_errors`] (the trainer reports them as a warning).
pub use baton_kernels::cuda::error::{record_drop_error, take_drop_errors, DROP_ERRORS_MAX};
