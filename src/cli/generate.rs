//! `baton generate`: sample text from a checkpoint — temperature, top-k and top-p (nucleus) sampling, or greedy
//! decoding (`--temperature 0`); generation stops at a stop sequence, at GPT-2's end-of-text token, or after
//! `--tokens`.

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
    /// Text to continue (the embedded corpus writes speakers as `KING HENRY.` on a line of their own).
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// Most tokens to generate (1..=100000).
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Stop once the generated text contains this (repeatable; `\n` is a newline). Default with
    /// --temperature 0: two blank lines, where greedy decoding of a small model starts to repeat itself.
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Sample only from the most likely tokens whose probabilities sum to P (1 = all).
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
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

/// Greedy decoding's default stop sequence: two blank lines.
pub const GREEDY_STOP: &str = "\n\n\n";

/// Picks a token from `logits` with temperature, top-k and top-p; greedy when `temperature` is 0.
pub fn sample(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, rng: &mut ChaCha8Rng) -> u32 {
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
    let mut weights: Vec<f64> = top
        .iter()
        .map(|&i| f64::from((logits[i] - max) / temperature).exp())
        .collect();
    // Nucleus: the fewest most likely tokens whose probability reaches `top_p` (at least one).
    if top_p < 1.0 {
        let sum: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut keep = weights.len();
        for (n, w) in weights.iter().enumerate() {
            acc += w / sum;
            if acc >= f64::from(top_p) {
                keep = n + 1;
                break;
            }
        }
        weights.truncate(keep);
    }
    let k = weights.len();
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
    if args.tokens == 0 || args.tokens > GENERATE_TOKENS_MAX {
        return Err(CliError::usage(format!(
            "--tokens {} must be in 1..={GENERATE_TOKENS_MAX}",
            args.tokens
        )));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(CliError::usage(format!("--top-p {} must be in (0, 1]", args.top_p)));
    }
    let stops: Vec<String> = if args.stop.is_empty() && args.temperature == 0.0 {
        vec![GREEDY_STOP.to_string()]
    } else {
        args.stop.iter().map(|s| s.replace("\\n", "\n")).collect()
    };
    if stops.iter().any(String::is_empty) {
        return Err(CliError::usage("--stop must not be empty"));
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
    let prompt_len = tokens.len();
    let mut stopped = None;
    for _ in 0..args.tokens {
        let start = tokens.len().saturating_sub(model.max_seq);
        let window = &tokens[start..];
        let logits = pipeline.logits(window).map_err(|e| CliError::failure(e.to_string()))?;
        let last = &logits[(window.len() - 1) * model.vocab_size..];
        let next = sample(last, args.temperature, args.top_k, args.top_p, &mut rng);
        if tokenizer.eot() == Some(next) {
            stopped = Some("end of text".to_string());
            break;
        }
        tokens.push(next);
        // Decoding the tail is enough to see a stop sequence (a byte tokenizer may split a character: lossy).
        let tail_start = tokens.len().saturating_sub(64).max(prompt_len);
        let tail = tokenizer.decode(&tokens[tail_start..]).unwrap_or_default();
        if let Some(stop) = stops.iter().find(|s| tail.contains(s.as_str())) {
            stopped = Some(format!("stop sequence {stop:?}"));
            break;
        }
    }
    let prompt = tokenizer
        .decode(&tokens[..prompt_len])
        .map_err(|e| CliError::failure(e.to_string()))?;
    let mut generated = tokenizer
        .decode(&tokens[prompt_len..])
        .map_err(|e| CliError::failure(e.to_string()))?;
    for stop in &stops {
        if let Some(at) = generated.find(stop.as_str()) {
            generated.truncate(at);
        }
    }
    println!("{prompt}{}", generated.trim_end());
    eprintln!(
        "generated {} tokens; stopped at {}",
        tokens.len() - prompt_len,
        stopped.unwrap_or_else(|| format!("--tokens {}", args.tokens))
    );
    Ok(())
}
