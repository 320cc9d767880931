//! GPT-2 as a [`Model`]: token + position embedding (unit 0), `layers` pre-LN transformer blocks (units
//! 1..=L, named `h.0` … `h.{L-1}`), and the head (unit L+1: final layer norm, LM head tied to `wte`,
//! cross-entropy).

use std::ops::Range;

use crate::backend::Backend;
use crate::error::Result;
use crate::model::{build_layer, GptConfig, Layer, Model, TiedGroup};

/// GPT-2 with its configuration and the seed of its initial weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt2 {
    /// Sizes.
    pub config: GptConfig,
    /// Seed of the initial weights (each parameter's values are keyed by its name and this seed).
    pub seed: u64,
}

impl Gpt2 {
    /// GPT-2 of `config`, weights from `seed`; the configuration is checked.
    pub fn new(config: GptConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Gpt2 { config, seed })
    }
}

impl<B: Backend> Model<B> for Gpt2 {
    fn kind(&self) -> String {
        "gpt2".into()
    }
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "config": self.config, "seed": self.seed })
    }
    fn num_units(&self) -> usize {
        self.config.num_units()
    }
    fn unit_name(&self, unit: usize) -> String {
        match self.config.layer_kind(unit) {
            crate::model::LayerKind::Embedding => "embedding".into(),
            crate::model::LayerKind::Block(i) => format!("h.{i}"),
            crate::model::LayerKind::Head => "head".into(),
        }
    }
    fn build_unit(&self, unit: usize, be: &B) -> Result<Box<dyn Layer<B>>> {
        build_layer(&self.config, unit, be, self.seed)
    }
    fn tied_groups(&self) -> Vec<TiedGroup> {
        vec![TiedGroup::new(["wte", "lm_head.weight"])]
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn max_seq(&self) -> usize {
        self.config.max_seq
    }
    /// Blocks spread evenly (earlier parts take the extra ones); the embedding joins the first part and the head
    /// the last. With more parts than blocks, units are spread evenly.
    fn uniform_split(&self, parts: usize) -> Vec<Range<usize>> {
        let blocks = self.config.layers;
        if parts == 0 {
            return Vec::new();
        }
        if parts > blocks {
            return crate::model::even_ranges(blocks + 2, parts);
        }
        let mut sizes: Vec<usize> = crate::model::even_ranges(blocks, parts)
            .iter()
            .map(|r| r.len())
            .collect();
        sizes[0] += 1; // embedding
        sizes[parts - 1] += 1; // head
        let mut start = 0;
        sizes
            .into_iter()
            .map(|n| {
                let r = start..start + n;
                start += n;
                r
            })
            .collect()
    }
    fn flops_per_token(&self, seq: usize) -> f64 {
        self.config.flops_per_token(seq)
    }
    fn num_params(&self) -> usize {
        self.config.num_params()
    }
}
