//! Baton's engine: the `Backend` seam (CPU today), the GPT model and its layers, stage splits,
//! the pipeline executor that replays a validated schedule with one thread per stage, the
//! optimizer, and the data layer.

#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod error;
pub mod executor;
pub mod export;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod predict;
pub mod split;
pub mod trainer;

pub use backend::{Backend, Cpu};
pub use comm::{Collective, Collectives, Endpoint, LocalCollectives, LocalTransport, Transport};
pub use error::{EngineError, Result};
pub use model::{Gpt2, GptConfig, Layer, Model, TiedGroup};
pub use optim::OptimizerConfig;
pub use pipeline::{Pipeline, PipelineBuilder, PipelineConfig, StepReport, TrainOptions};
pub use split::StageSplit;
pub use trainer::{Observer, RunSummary, SplitData, TrainData, Trainer, TrainerConfig};
