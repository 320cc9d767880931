//! The GPT-2 model configuration.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Most layers a model may have (a limit on everything).
pub const LAYERS_MAX: usize = 1024;
/// Largest channel width.
pub const D_MODEL_MAX: usize = 65_536;
/// Longest context.
pub const SEQ_MAX: usize = 65_536;
/// Largest vocabulary.
pub const VOCAB_MAX: usize = 1 << 20;

/// A GPT-2 style decoder: token + position embedding, `layers` pre-LN transformer blocks, final
/// layer norm, LM head tied to the token embedding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context length (positions in `wpe`).
    pub max_seq: usize,
    /// Number of transformer blocks.
    pub layers: usize,
    /// Channels.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub heads: usize,
}

impl GptConfig {
    /// The default small model of `baton train`: 4 layers, d_model 128, 4 heads, context 128, bytes.
    pub fn small(vocab_size: usize) -> Self {
        GptConfig {
            vocab_size,
            max_seq: 128,
            layers: 4,
            d_model: 128,
            heads: 4,
        }
    }

    /// GPT-2 124M.
    pub fn gpt2_124m() -> Self {
        GptConfig {
            vocab_size: 50257,
            max_seq: 1024,
            layers: 12,
            d_model: 768,
            heads: 12,
        }
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<()> {
        let range = |field: &'static str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(EngineError::config(field, v, format!("must be in 1..={max}")))
            } else {
                Ok(())
            }
        };
        range("vocab_size", self.vocab_size, VOCAB_MAX)?;
        range("max_seq", self.max_seq, SEQ_MAX)?;
        range("layers", self.layers, LAYERS_MAX)?;
        range("d_model", self.d_model, D_MODEL_MAX)?;
        range("heads", self.heads, self.d_model)?;
        if self.d_model % self.heads != 0 {
            return Err(EngineError::config(
                "heads",
                self.heads,
                format!("must divide d_model = {} (head size = d_model / heads)", self.d_model),
            ));
        }
        Ok(())
    }

    /// Number of layer units the split distributes: embedding, blocks, head.
    pub fn num_units(&self) -> usize {
        self.layers + 2
    }

    /// Training FLOPs per token at context `seq`: `6·N + 6·L·C·T` (weights: 2 forward + 4
    /// backward per parameter; attention scores and mixing: 6·L·C·T), as in the PaLM/llm.c MFU.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        6.0 * self.num_params() as f64 + 6.0 * (self.layers * self.d_model * seq) as f64
    }

    /// Parameter count with the LM head tied (counted once).
    pub fn num_params(&self) -> usize {
        let c = self.d_model;
        let block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c);
        self.vocab_size * c + self.max_seq * c + self.layers * block + 2 * c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_has_124m_parameters_and_the_known_flops_per_token() {
        let g = GptConfig::gpt2_124m();
        assert_eq!(g.num_params(), 124_439_808);
        // 6 · 124.44 M + 6 · 12 · 768 · 1024 = 0.803 GFLOP per token.
        assert_eq!(
            g.flops_per_token(1024),
            6.0 * 124_439_808.0 + 6.0 * 12.0 * 768.0 * 1024.0
        );
    }
}

/// What a global layer index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Token + position embedding (global layer 0).
    Embedding,
    /// Transformer block `i` (global layer i + 1).
    Block(usize),
    /// Final layer norm, tied LM head and loss (global layer `layers + 1`).
    Head,
}

impl GptConfig {
    /// The kind of global layer `unit`.
    pub fn layer_kind(&self, unit: usize) -> LayerKind {
        if unit == 0 {
            LayerKind::Embedding
        } else if unit <= self.layers {
            LayerKind::Block(unit - 1)
        } else {
            LayerKind::Head
        }
    }
}
