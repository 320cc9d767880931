//! Models: the [`Model`] seam through which an author brings a network (its units in pipeline order, their
//! parameters and initialisation, the tied-parameter groups and the loss), the [`Layer`] trait a unit implements,
//! and GPT-2 as one implementation ([`Gpt2`], [`GptConfig`]).

pub mod config;
pub mod gpt2;
pub mod init;
pub mod layers;

use std::ops::Range;

pub use config::{GptConfig, LayerKind};
pub use gpt2::Gpt2;
pub use layers::{build_layer, Block, Embedding, Forward, Head, Layer, MicroBatch, Param, Saved};

use crate::backend::Backend;
use crate::error::Result;

/// Parameters that hold one logical tensor in several places (GPT-2's token embedding and LM head), possibly on
/// different stages. Their gradients are summed in the order of `names` (`((g0 + g1) + g2) …`) into every copy
/// before the optimizer step, so the copies take identical AdamW steps and stay bitwise equal; the gradient norm
/// counts the tensor once (through `names[0]`); a checkpoint that lacks a copy loads it from `names[0]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiedGroup {
    /// Global parameter names, at least two; the first is the primary copy.
    pub names: Vec<String>,
}

impl TiedGroup {
    /// A group of the given names (the first is the primary copy).
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        TiedGroup {
            names: names.into_iter().map(Into::into).collect(),
        }
    }
}

/// A model as the pipeline sees it: `num_units()` units (layers) in pipeline order, each built on the backend of
/// the stage that holds it. Contracts, checked when a pipeline is built or stepped:
/// - unit 0 reads the micro-batch's input tokens ([`MicroBatch::input_tokens`]) and every later unit the previous
///   unit's output activation;
/// - the last unit is the loss: its forward returns `Forward::losses` (one loss per token, left on the device) and
///   its `backward_input` starts from the loss (it is given no output gradient) and scales by
///   `MicroBatch::loss_scale`; its `infer` returns the logits;
/// - parameter names are unique across the model and the same whatever the split, and `build_unit` is
///   deterministic (every split must build bitwise the same initial weights), so checkpoints load into any split;
/// - every name in [`Model::tied_groups`] belongs to some unit.
///
/// Implement it for every backend (`impl<B: Backend> Model<B> for MyModel`), so the same model runs on the CPU
/// and on GPUs.
pub trait Model<B: Backend>: Send + Sync {
    /// Short name of the architecture, stored in checkpoints (`gpt2`).
    fn kind(&self) -> String;
    /// The model's configuration as JSON, stored in checkpoint manifests (what rebuilds it).
    fn describe(&self) -> serde_json::Value;
    /// Number of units.
    fn num_units(&self) -> usize;
    /// The name of unit `unit` (`embedding`, `h.3`, `head`): how a split names units.
    fn unit_name(&self, unit: usize) -> String;
    /// Builds unit `unit` on `be`, with its deterministic initial weights.
    fn build_unit(&self, unit: usize, be: &B) -> Result<Box<dyn Layer<B>>>;
    /// The tied-parameter groups (none by default).
    fn tied_groups(&self) -> Vec<TiedGroup> {
        Vec::new()
    }
    /// Token ids must be below this.
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model accepts.
    fn max_seq(&self) -> usize;
    /// The split [`crate::StageSplit::Uniform`] means for `parts` parts (`parts <= num_units()`): by default units
    /// spread evenly, earlier parts taking the extra ones.
    fn uniform_split(&self, parts: usize) -> Vec<Range<usize>> {
        even_ranges(self.num_units(), parts)
    }
    /// Training FLOPs per token at context `seq`, for MFU (0 when unknown).
    fn flops_per_token(&self, _seq: usize) -> f64 {
        0.0
    }
    /// Trainable parameters (tied copies counted once), for messages (0 when unknown).
    fn num_params(&self) -> usize {
        0
    }
}

/// `total` items in `parts` contiguous ranges, sizes differing by at most one, earlier ranges larger.
pub fn even_ranges(total: usize, parts: usize) -> Vec<Range<usize>> {
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let n = total / parts.max(1) + usize::from(i < total % parts.max(1));
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}
