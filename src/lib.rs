//! Baton: a pipeline-parallel training engine for transformer language models.
//!
//! This facade re-exports the public API of the workspace crates and hosts the `baton` CLI.
//! Today it exposes the schedule crate ([`schedules`]): the schedule IR, generators,
//! validator, simulator and text formats.

#![warn(missing_docs)]

pub use baton_engine as engine;
pub use baton_kernels as kernels;
pub use baton_schedules as schedules;

pub mod cli;
