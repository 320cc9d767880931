//! Baton's engine. The public API a model author uses:
//! - [`Model`] and [`Layer`] (with [`model::Param`], [`model::Saved`], [`model::MicroBatch`]): bring your own
//!   network; [`Gpt2`] is one implementation.
//! - [`Pipeline`] ([`Pipeline::builder`]: a model, any validated schedule, a [`StageSplit`], [`TrainOptions`],
//!   one [`Backend`] per stage — [`Cpu`], or `backend::Cuda`) and its `train_step`, `eval_loss`, `logits`,
//!   `parameters`, `load`.
//! - [`Trainer`] ([`TrainerConfig`], [`TrainData`], [`Observer`]): the training loop with evaluation,
//!   checkpoints, resume and recovery.
//! - The communication seams [`Transport`] (stage to stage) and [`Collective`]/[`Collectives`] (reductions over
//!   groups), with in-process implementations.
//! - [`checkpoint`], [`export`], [`data`], [`EngineError`].

#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod compress;
pub mod data;
pub mod data_parallel;
pub mod error;
pub mod executor;
pub mod export;
pub mod local_sgd;
pub mod memory;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod predict;
pub mod profile;
pub mod split;
pub mod trainer;

pub use backend::{Backend, Cpu};
pub use comm::{Collective, Collectives, Endpoint, LocalCollectives, LocalTransport, Transport};
pub use compress::Compression;
pub use data_parallel::DataParallel;
pub use error::{EngineError, Result};
pub use local_sgd::SyncMode;
pub use model::{Gpt2, GptConfig, Layer, Model, TiedGroup};
pub use optim::OptimizerConfig;
pub use pipeline::{Hosting, MakeTransports, Pipeline, PipelineBuilder, PipelineConfig, StepReport, TrainOptions};
pub use split::StageSplit;
pub use trainer::{Observer, RunSummary, SplitData, TrainData, Trainer, TrainerConfig};
