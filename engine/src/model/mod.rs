//! The GPT-2 model: configuration, deterministic initialisation, and layers.

pub mod config;
pub mod init;
pub mod layers;

pub use config::{GptConfig, LayerKind};
pub use layers::{build_layer, Block, Embedding, Forward, Head, Layer, MicroBatch, Param, Saved};
