//! `baton generate`: sample text from a checkpoint.

use std::path::PathBuf;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::CliError;
use crate::engine::checkpoint;
use crate::engine::data::Tokenizer;
use crate::engine::{Cpu, Pipeline, PipelineConfig};
use crate::schedules::ScheduleKind;

/// Most tokens one call may generate.
pub const GENERATE_TOKENS_MAX: usize = 100_000;

/// Arguments of `baton generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (or a run's `checkpoints/` folder: the newest complete one is used).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Picks a token from `logits` with temperature and top-k; greedy when `temperature` is 0.
pub fn sample(logits: &[f32], temperature: f32, top_k: usize, rng: &mut ChaCha8Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Descending by logit, ties by index: deterministic.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature <= 0.0 {
        return order[0] as u32;
    }
    let k = if top_k == 0 {
        order.len()
    } else {
        top_k.min(order.len())
    };
    let top = &order[..k];
    let max = logits[top[0]];
    let weights: Vec<f64> = top
        .iter()
        .map(|&i| f64::from((logits[i] - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (&i, w) in top.iter().zip(&weights) {
        if x < *w {
            return i as u32;
        }
        x -= w;
    }
    top[k - 1] as u32
}

/// Runs `baton generate`.
pub fn run(args: &GenerateArgs) -> Result<(), CliError> {
    if args.tokens > GENERATE_TOKENS_MAX {
        return Err(CliError::usage(format!(
            "--tokens {} exceeds the limit of {GENERATE_TOKENS_MAX}",
            args.tokens
        )));
    }
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        return Err(CliError::usage(format!(
            "--temperature {} must be finite and >= 0",
            args.temperature
        )));
    }
    let ckpt = checkpoint::load(&args.checkpoint).map_err(|e| CliError::failure(e.to_string()))?;
    let tokenizer = Tokenizer::new(ckpt.manifest.tokenizer).map_err(|e| CliError::failure(e.to_string()))?;
    let model = ckpt
        .manifest
        .gpt2()
        .map_err(|e| CliError::failure(e.to_string()))?
        .config;
    let mut pipeline = Pipeline::new(
        PipelineConfig::new(model.clone(), 1, ScheduleKind::OneFOneB, 1),
        vec![Cpu],
    )
    .map_err(|e| CliError::failure(e.to_string()))?;
    pipeline
        .load(&ckpt.params, None)
        .map_err(|e| CliError::failure(e.to_string()))?;
    let mut tokens = tokenizer.encode(&args.prompt);
    if tokens.is_empty() {
        return Err(CliError::usage("--prompt must not be empty"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    for _ in 0..args.tokens {
        let start = tokens.len().saturating_sub(model.max_seq);
        let window = &tokens[start..];
        let logits = pipeline.logits(window).map_err(|e| CliError::failure(e.to_string()))?;
        let last = &logits[(window.len() - 1) * model.vocab_size..];
        tokens.push(sample(last, args.temperature, args.top_k, &mut rng));
    }
    let text = tokenizer
        .decode(&tokens)
        .map_err(|e| CliError::failure(e.to_string()))?;
    println!("{text}");
    Ok(())
}
