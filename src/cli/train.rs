//! `baton train`: train a GPT split into pipeline stages on the embedded corpus (or `--data`),
//! with a progress bar, `metrics.jsonl`, periodic validation, checkpoints and an optional
//! Chrome/Perfetto trace. Every setting has a default; `--config FILE.toml` and flags override.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::CliError;
use crate::engine::backend::{Backend, Cuda, Precision};
use crate::engine::checkpoint::{self, Checkpoint};
use crate::engine::data::{default_corpus, load_tokens, DataLoader, Split, Tokenizer};
use crate::engine::executor::FailurePoint;
use crate::engine::pipeline::{NonFinitePolicy, TensorMap};
use crate::engine::{Cpu, GptConfig, OptimizerConfig, Pipeline, PipelineConfig, StageSplit, StepReport};
use crate::schedules::{simulate, Costs, Op, ScheduleKind};

/// Environment variable that injects a failure: `stage:2,action:7,kind:panic|error|stall|hang|nan[,step:5]`.
pub const FAIL_AT_ENV: &str = "BATON_FAIL_AT";

/// Most steps a trace records (each step adds one span per action).
pub const TRACE_STEPS_MAX: u64 = 20;

/// Every setting of a training run. The TOML file uses these field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Run name (the default output directory is `runs/<run_name>`).
    pub run_name: String,
    /// Output directory.
    pub out: Option<PathBuf>,
    /// Training data: a UTF-8 text file or an llm.c `.bin` token shard; the embedded corpus if absent.
    pub data: Option<PathBuf>,
    /// `bytes` or `gpt2`.
    pub tokenizer: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Channels.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Context length (tokens per sequence).
    pub seq: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Pipeline stages.
    pub stages: u32,
    /// Schedule: gpipe, 1f1b, interleaved, zb-h1, zb-v.
    pub schedule: String,
    /// Micro-batches per step.
    pub microbatches: u32,
    /// Chunks per stage (default: 2 for interleaved and zb-v, else 1).
    pub chunks: Option<u32>,
    /// Explicit split `0..2,2..4,...` over global layers (0 = embedding, 1..=L blocks, L+1 head).
    pub split: Option<String>,
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f32,
    /// Warmup steps.
    pub warmup: u64,
    /// Weight decay.
    pub weight_decay: f32,
    /// Gradient clipping norm (0 = off).
    pub grad_clip: f32,
    /// Seed for weights and data order.
    pub seed: u64,
    /// Recompute activations in backward (stash only each part's input).
    pub recompute: bool,
    /// Validate every this many steps (0 = only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// Write `trace.json` (Chrome/Perfetto) for the first steps.
    pub trace: bool,
    /// Start from a Hugging Face GPT-2 directory (config.json + model.safetensors).
    pub init_from: Option<PathBuf>,
    /// Device: `cpu`, `cuda` or `auto`.
    pub device: String,
    /// Resume from `latest` (the newest complete checkpoint under `<out>/checkpoints`) or a
    /// checkpoint directory; `steps` stays the run's total.
    pub resume: Option<String>,
    /// Keep only the newest K checkpoints (0 keeps all).
    pub keep_last: usize,
    /// Restarts from the latest good checkpoint after a failed step, at most this many.
    pub max_restarts: u32,
    /// What a non-finite loss or gradient norm does: `skip` or `abort`.
    pub on_nonfinite: String,
    /// Consecutive skipped steps that abort the run.
    pub max_skips: u32,
    /// Stop (saving a checkpoint) once this step is reached, although `steps` is the run's
    /// total: for interrupting a run on purpose and resuming it later.
    pub stop_at: Option<u64>,
    /// Peak FLOP rate of the device in TFLOP/s (e.g. its measured bf16 GEMM rate); when set,
    /// metrics and the progress bar report MFU against it.
    pub peak_tflops: f64,
    /// Precision on a GPU: `bf16` (bf16 activations, weights and gradients; fp32 master weights
    /// and moments), `f32`, or `auto` (bf16 on a GPU; the CPU always computes in f32).
    pub precision: String,
    /// Copy bandwidth between devices in GB/s, for the layout prediction printed at the end of
    /// a run (0: transfers are free).
    pub copy_gbps: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            run_name: "default".into(),
            out: None,
            data: None,
            tokenizer: "bytes".into(),
            layers: 4,
            d_model: 128,
            heads: 4,
            seq: 128,
            batch: 16,
            stages: 4,
            schedule: "1f1b".into(),
            microbatches: 8,
            chunks: None,
            split: None,
            steps: 300,
            lr: 3e-3,
            warmup: 10,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            recompute: false,
            eval_every: 50,
            eval_batches: 8,
            save_every: 0,
            trace: false,
            init_from: None,
            device: "auto".into(),
            resume: None,
            keep_last: 3,
            max_restarts: 0,
            on_nonfinite: "skip".into(),
            max_skips: 3,
            stop_at: None,
            peak_tflops: 0.0,
            precision: "auto".into(),
            copy_gbps: 0.0,
        }
    }
}

/// Arguments of `baton train`; each overrides the TOML file, which overrides the defaults.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML file with any of the settings below (field names as in `TrainConfig`, snake_case).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Run name.
    #[arg(long)]
    pub run_name: Option<String>,
    /// Output directory (default `runs/<run-name>`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Text file or llm.c `.bin` shard (default: the embedded Shakespeare corpus).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Tokenizer: bytes or gpt2.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Transformer blocks.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Channels.
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Context length.
    #[arg(long)]
    pub seq: Option<usize>,
    /// Sequences per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Pipeline stages.
    #[arg(long)]
    pub stages: Option<u32>,
    /// Schedule: gpipe, 1f1b, interleaved, zb-h1, zb-v.
    #[arg(long)]
    pub schedule: Option<String>,
    /// Micro-batches per step.
    #[arg(long)]
    pub microbatches: Option<u32>,
    /// Chunks per stage.
    #[arg(long)]
    pub chunks: Option<u32>,
    /// Split over global layers, e.g. `0..2,2..3,3..5,5..6`.
    #[arg(long)]
    pub split: Option<String>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Warmup steps.
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute activations in backward.
    #[arg(long)]
    pub recompute: bool,
    /// Validate every N steps.
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Save a checkpoint every N steps.
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Write a Chrome/Perfetto trace (trace.json).
    #[arg(long)]
    pub trace: bool,
    /// Start from a Hugging Face GPT-2 directory.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// Device: cpu, cuda or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// Resume: `latest` (newest complete checkpoint under <out>/checkpoints) or a checkpoint directory.
    #[arg(long, value_name = "latest|DIR")]
    pub resume: Option<String>,
    /// Keep only the newest K checkpoints (0 keeps all).
    #[arg(long, value_name = "K")]
    pub keep_last: Option<usize>,
    /// Restart from the latest good checkpoint after a failed step, at most N times.
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// Non-finite loss or gradient norm: skip the step or abort.
    #[arg(long, value_name = "skip|abort")]
    pub on_nonfinite: Option<String>,
    /// Consecutive skipped steps that abort the run.
    #[arg(long, value_name = "K")]
    pub max_skips: Option<u32>,
    /// Stop (with a checkpoint) at this step although --steps is the run's total.
    #[arg(long, value_name = "STEP")]
    pub stop_at: Option<u64>,
    /// Device peak in TFLOP/s for MFU (FLOPs per token = 6N + 6·L·C·T). Default on a GPU: its bf16 GEMM rate,
    /// measured at start (an 8192³ cuBLASLt GEMM); on the CPU MFU is not reported without it.
    #[arg(long, value_name = "TFLOPS")]
    pub peak_tflops: Option<f64>,
    /// GPU precision: bf16 (fp32 master weights), f32, or auto (bf16 on a GPU).
    #[arg(long, value_name = "bf16|f32|auto")]
    pub precision: Option<String>,
    /// Copy bandwidth between devices in GB/s for the end-of-run layout prediction (0: free).
    #[arg(long, value_name = "GBPS")]
    pub copy_gbps: Option<f64>,
}

impl TrainArgs {
    /// The effective configuration: defaults, then the TOML file, then flags.
    pub fn resolve(&self) -> Result<TrainConfig, CliError> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| CliError::usage(format!("--config {}: {e}", path.display())))?;
                toml::from_str::<TrainConfig>(&text).map_err(|e| {
                    CliError::usage(format!(
                        "--config {}: {}",
                        path.display(),
                        e.to_string().replace('\n', " ")
                    ))
                })?
            }
            None => TrainConfig::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        over!(
            run_name,
            tokenizer,
            layers,
            d_model,
            heads,
            seq,
            batch,
            stages,
            schedule,
            microbatches,
            steps,
            lr,
            warmup,
            seed,
            eval_every,
            save_every,
            device,
            keep_last,
            max_restarts,
            on_nonfinite,
            max_skips
        );
        if self.resume.is_some() {
            c.resume = self.resume.clone();
        }
        if self.stop_at.is_some() {
            c.stop_at = self.stop_at;
        }
        if let Some(peak) = self.peak_tflops {
            c.peak_tflops = peak;
        }
        if let Some(precision) = &self.precision {
            c.precision = precision.clone();
        }
        if let Some(gbps) = self.copy_gbps {
            c.copy_gbps = gbps;
        }
        if self.out.is_some() {
            c.out = self.out.clone();
        }
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        if self.chunks.is_some() {
            c.chunks = self.chunks;
        }
        if self.split.is_some() {
            c.split = self.split.clone();
        }
        if self.init_from.is_some() {
            c.init_from = self.init_from.clone();
        }
        c.recompute |= self.recompute;
        c.trace |= self.trace;
        Ok(c)
    }
}

fn engine_err(e: impl std::fmt::Display) -> CliError {
    CliError::failure(e.to_string())
}

/// Builds the pipeline configuration a `TrainConfig` describes.
pub fn pipeline_config(c: &TrainConfig, vocab_size: usize) -> Result<PipelineConfig, CliError> {
    let kind = ScheduleKind::from_name(&c.schedule).map_err(|e| CliError::usage(e.to_string()))?;
    if kind == ScheduleKind::Custom {
        return Err(CliError::usage(
            "--schedule custom cannot be trained; use gpipe, 1f1b, interleaved, zb-h1 or zb-v",
        ));
    }
    let model = GptConfig {
        vocab_size,
        max_seq: c.seq,
        layers: c.layers,
        d_model: c.d_model,
        heads: c.heads,
    };
    let mut p = PipelineConfig::new(model, c.stages, kind, c.microbatches);
    if let Some(chunks) = c.chunks {
        p.chunks = chunks;
    }
    if let Some(split) = &c.split {
        p.split = StageSplit::parse(split).map_err(|e| CliError::usage(e.to_string()))?;
    }
    p.optimizer = OptimizerConfig {
        lr: c.lr,
        min_lr: c.lr / 10.0,
        warmup_steps: c.warmup.min(c.steps),
        total_steps: c.steps,
        weight_decay: c.weight_decay,
        grad_clip: c.grad_clip,
        ..OptimizerConfig::default()
    };
    p.recompute = c.recompute;
    p.seed = c.seed;
    Ok(p)
}

/// Checks the settings the engine does not see.
fn check(c: &TrainConfig) -> Result<(), CliError> {
    if c.steps == 0 {
        return Err(CliError::usage("--steps must be >= 1"));
    }
    if c.batch == 0 {
        return Err(CliError::usage("--batch must be >= 1"));
    }
    if c.microbatches == 0 || c.batch % c.microbatches as usize != 0 {
        return Err(CliError::usage(format!(
            "--microbatches {} must divide --batch {} (each micro-batch holds batch / microbatches sequences)",
            c.microbatches, c.batch
        )));
    }
    if !c.copy_gbps.is_finite() || c.copy_gbps < 0.0 {
        return Err(CliError::usage(format!(
            "--copy-gbps {} must be finite and >= 0",
            c.copy_gbps
        )));
    }
    if !c.peak_tflops.is_finite() || c.peak_tflops < 0.0 {
        return Err(CliError::usage(format!(
            "--peak-tflops {} must be finite and >= 0",
            c.peak_tflops
        )));
    }
    if c.eval_batches == 0 {
        return Err(CliError::usage("eval_batches must be >= 1"));
    }
    Ok(())
}

/// The model a run trains, its tokenizer, and (when resuming) the checkpoint it continues.
struct Setup {
    tokenizer: Tokenizer,
    pcfg: PipelineConfig,
    init: Option<TensorMap>,
    resume: Option<Checkpoint>,
}

/// Resolves the tokenizer, model and starting point. A resumed run takes its model and
/// tokenizer from the checkpoint; a flag that contradicts them is an error.
fn setup(args: &TrainArgs, c: &TrainConfig, ckpt_root: &Path) -> Result<Setup, CliError> {
    let resume = match c.resume.as_deref() {
        None => None,
        Some("latest") => Some(checkpoint::load(ckpt_root).map_err(engine_err)?),
        Some(dir) => Some(checkpoint::load(Path::new(dir)).map_err(engine_err)?),
    };
    if resume.is_none() {
        if let Some(existing) = checkpoint::latest(ckpt_root).map_err(engine_err)? {
            return Err(CliError::usage(format!(
                "{} already holds checkpoints ({}); pass --resume latest to continue it, or choose another --out",
                ckpt_root.display(),
                existing.display()
            )));
        }
    }
    let tokenizer = match &resume {
        Some(ck) => {
            if let Some(t) = args.tokenizer.as_deref().filter(|t| *t != ck.manifest.tokenizer.name()) {
                return Err(CliError::usage(format!(
                    "--tokenizer {t}: the checkpoint was trained with {}",
                    ck.manifest.tokenizer.name()
                )));
            }
            Tokenizer::new(ck.manifest.tokenizer).map_err(engine_err)?
        }
        None => Tokenizer::from_name(&c.tokenizer).map_err(|e| CliError::usage(e.to_string()))?,
    };
    let mut pcfg = pipeline_config(c, tokenizer.vocab_size())?;
    let mut init = None;
    if let Some(ck) = &resume {
        let m = &ck.manifest.config.model;
        for (flag, given, saved) in [
            ("--layers", args.layers, m.layers),
            ("--d-model", args.d_model, m.d_model),
            ("--heads", args.heads, m.heads),
            ("--seq", args.seq, m.max_seq),
        ] {
            if let Some(v) = given.filter(|&v| v != saved) {
                return Err(CliError::usage(format!(
                    "{flag} {v}: the checkpoint's model has {saved}"
                )));
            }
        }
        pcfg.model = m.clone();
    } else if let Some(dir) = &c.init_from {
        let (model, params) = crate::engine::export::import_hf(dir).map_err(engine_err)?;
        if model.vocab_size != tokenizer.vocab_size() {
            return Err(CliError::usage(format!(
                "--init-from {}: the model's vocabulary is {} but tokenizer `{}` has {}; use --tokenizer gpt2",
                dir.display(),
                model.vocab_size,
                tokenizer.name(),
                tokenizer.vocab_size()
            )));
        }
        pcfg.model = model;
        init = Some(params);
    }
    if c.seq > pcfg.model.max_seq {
        return Err(CliError::usage(format!(
            "--seq {} exceeds the model's context {}",
            c.seq, pcfg.model.max_seq
        )));
    }
    pcfg.nonfinite = match c.on_nonfinite.as_str() {
        "skip" => NonFinitePolicy::Skip,
        "abort" => NonFinitePolicy::Abort,
        other => {
            return Err(CliError::usage(format!(
                "--on-nonfinite `{other}`: expected skip or abort"
            )))
        }
    };
    if c.max_skips == 0 {
        return Err(CliError::usage("--max-skips must be >= 1"));
    }
    pcfg.max_consecutive_skips = c.max_skips;
    // Check the configuration before any data is read.
    pcfg.model.validate().map_err(|e| CliError::usage(e.to_string()))?;
    pcfg.optimizer.validate().map_err(|e| CliError::usage(e.to_string()))?;
    Ok(Setup {
        tokenizer,
        pcfg,
        init,
        resume,
    })
}

/// A pipeline and loader positioned at a checkpoint (or at the start).
fn start<B: Backend>(
    c: &TrainConfig,
    setup: &Setup,
    split: &Split,
    from: Option<&Checkpoint>,
    make: &dyn Fn() -> Result<Vec<B>, CliError>,
) -> Result<(Pipeline<B>, DataLoader), CliError> {
    let mut pipeline = Pipeline::new(setup.pcfg.clone(), make()?).map_err(engine_err)?;
    let loader = match from {
        Some(ck) => {
            pipeline
                .load(&ck.params, Some((&ck.adam_m, &ck.adam_v)))
                .map_err(engine_err)?;
            pipeline.set_step(ck.manifest.step);
            match ck.manifest.loader {
                Some(state) => split.resume_train_loader(state).map_err(engine_err)?,
                None => split.train_loader(c.seed).map_err(engine_err)?,
            }
        }
        None => {
            if let Some(params) = &setup.init {
                pipeline.load(params, None).map_err(engine_err)?;
            }
            split.train_loader(c.seed).map_err(engine_err)?
        }
    };
    Ok((pipeline, loader))
}

/// Weight of the newest step in the moving average of busy shares the straggler warning reads.
const BUSY_AVG_WEIGHT: f64 = 0.1;
/// Steps averaged before the straggler warning may fire.
const BUSY_AVG_STEPS: u32 = 20;

/// Stages whose busy share is 20% below the mean of the others (they wait on a straggler).
pub fn lagging_stages(busy_fraction: &[f64]) -> Vec<usize> {
    let p = busy_fraction.len();
    if p < 2 {
        return Vec::new();
    }
    let total: f64 = busy_fraction.iter().sum();
    (0..p)
        .filter(|&s| {
            let others = (total - busy_fraction[s]) / (p - 1) as f64;
            busy_fraction[s] < 0.8 * others
        })
        .collect()
}

/// Prints a line above the progress bar, or to stderr when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn write_line(metrics: &mut BufWriter<File>, line: &serde_json::Value) -> Result<(), CliError> {
    writeln!(metrics, "{line}").map_err(|e| CliError::failure(format!("writing metrics.jsonl: {e}")))
}

/// Runs `baton train`.
pub fn run(args: &TrainArgs) -> Result<(), CliError> {
    let c = args.resolve()?;
    check(&c)?;
    let device = device(&c.device)?;
    let precision = match (c.precision.as_str(), &device) {
        ("auto", Device::Cpu) | ("f32", _) | ("fp32", _) => Precision::F32,
        ("auto", Device::Cuda(_)) | ("bf16", Device::Cuda(_)) => Precision::Bf16,
        ("bf16", Device::Cpu) => {
            return Err(CliError::usage(
                "--precision bf16 needs a GPU: the CPU backend computes in f32",
            ))
        }
        (other, _) => {
            return Err(CliError::usage(format!(
                "--precision `{other}`: expected bf16, f32 or auto"
            )))
        }
    };
    let out = c.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(&c.run_name));
    let ckpt_root = out.join("checkpoints");
    let fail_at: Option<FailurePoint> = match std::env::var(FAIL_AT_ENV) {
        Ok(text) => Some(
            text.parse()
                .map_err(|e: crate::engine::EngineError| CliError::usage(format!("{FAIL_AT_ENV}: {e}")))?,
        ),
        Err(_) => None,
    };
    let setup = setup(args, &c, &ckpt_root)?;
    let tokens = match &c.data {
        Some(path) => load_tokens(path, &setup.tokenizer).map_err(engine_err)?,
        None => setup.tokenizer.encode(default_corpus()),
    };
    let split = Split::new(&tokens, Split::DEFAULT_VAL_FRACTION, c.batch, c.seq).map_err(engine_err)?;
    match device {
        Device::Cpu => train_on(&c, &setup, &split, tokens.len(), &out, fail_at, &|| {
            Ok(vec![Cpu; c.stages as usize])
        }),
        Device::Cuda(count) => {
            let make = || -> Result<Vec<Cuda>, CliError> {
                // Stages round-robin over the GPUs; stages sharing a GPU get a stream each.
                (0..c.stages as usize)
                    .map(|s| Cuda::with_precision(s % count, precision).map_err(engine_err))
                    .collect()
            };
            train_on(&c, &setup, &split, tokens.len(), &out, fail_at, &make)
        }
    }
}

/// Where a run trains.
enum Device {
    Cpu,
    /// CUDA with this many GPUs.
    Cuda(usize),
}

/// `cpu`, `cuda` (an error without a GPU) or `auto` (CUDA when a GPU is present).
fn device(name: &str) -> Result<Device, CliError> {
    let cuda = || baton_kernels_device_count();
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => match cuda() {
            Ok(n) if n > 0 => Ok(Device::Cuda(n)),
            Ok(_) => Err(CliError::failure("--device cuda: no CUDA device found")),
            Err(why) => Err(CliError::failure(format!("--device cuda: {why}"))),
        },
        "auto" => Ok(match cuda() {
            Ok(n) if n > 0 => Device::Cuda(n),
            _ => Device::Cpu,
        }),
        other => Err(CliError::usage(format!(
            "--device `{other}`: expected cpu, cuda or auto"
        ))),
    }
}

/// Number of CUDA devices, or why there are none usable (no driver, no cuBLAS).
fn baton_kernels_device_count() -> Result<usize, String> {
    use crate::kernels::cuda as kc;
    kc::driver_available().map_err(|e| e.to_string())?;
    kc::device_count().map_err(|e| e.to_string())
}

/// The training loop on backend `B` (`make` builds one backend per stage, again after a restart).
#[allow(clippy::too_many_arguments)]
fn train_on<B: Backend>(
    c: &TrainConfig,
    setup: &Setup,
    split: &Split,
    token_count: usize,
    out: &Path,
    fail_at: Option<FailurePoint>,
    make: &dyn Fn() -> Result<Vec<B>, CliError>,
) -> Result<(), CliError> {
    let ckpt_root = out.join("checkpoints");
    let (mut pipeline, mut loader) = start(c, setup, split, setup.resume.as_ref(), make)?;
    pipeline.set_failure(fail_at);

    std::fs::create_dir_all(out).map_err(|e| CliError::failure(format!("creating {}: {e}", out.display())))?;
    let metrics_path = out.join("metrics.jsonl");
    let metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(setup.resume.is_some())
        .write(true)
        .truncate(setup.resume.is_none())
        .open(&metrics_path)
        .map_err(|e| CliError::failure(format!("{}: {e}", metrics_path.display())))?;
    let mut metrics = BufWriter::new(metrics_file);
    let mut trace = c.trace.then(super::trace::Trace::default);

    let m = &pipeline.config().model;
    eprintln!(
        "baton train: {} params ({} layers, d_model {}, {} heads, context {}), {} stages, {} with {} micro-batches × {} sequences, {} tokens ({} train / {} val), tokenizer {}{}",
        m.num_params(),
        m.layers,
        m.d_model,
        m.heads,
        c.seq,
        c.stages,
        c.schedule,
        c.microbatches,
        c.batch / c.microbatches as usize,
        token_count,
        split.train().len(),
        split.val().len(),
        setup.tokenizer.name(),
        setup.resume.as_ref().map_or(String::new(), |ck| format!(", resuming {} at step {}", ck.dir.display(), ck.manifest.step))
    );
    // MFU is against the device's measured bf16 GEMM rate: measured here unless given.
    let peak_tflops = if c.peak_tflops > 0.0 {
        c.peak_tflops
    } else {
        match pipeline.backends().first().map(Backend::measure_peak_tflops) {
            Some(Ok(Some(t))) => {
                eprintln!("MFU against the measured bf16 GEMM rate of stage 0's device: {t:.0} TFLOP/s");
                t
            }
            Some(Err(e)) => {
                eprintln!("warning: measuring the bf16 GEMM rate failed ({e}); MFU not reported");
                0.0
            }
            _ => 0.0,
        }
    };
    let first_step = pipeline.step();
    let bar = ProgressBar::new(c.steps);
    bar.set_position(first_step);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut first_val = None;
    let mut last_val = None;
    let mut last: Option<StepReport> = None;
    let mut saver = checkpoint::AsyncSaver::default();
    let mut saved_dir = None;
    let mut total_tokens = 0usize;
    let (mut restarts, mut skipped_total) = (0u32, 0u64);
    let mut stalls: Vec<f64> = Vec::new();
    let mut straggler_warned_at: Vec<Option<u64>> = vec![None; c.stages as usize];
    // Busy shares averaged over recent steps (one step's shares are noisy), and how many steps fed them.
    let mut busy_avg: Vec<f64> = vec![0.0; c.stages as usize];
    let mut busy_steps = 0u32;
    let flops_per_token = pipeline.config().model.flops_per_token(c.seq);
    let stop = c.stop_at.map_or(c.steps, |s| s.min(c.steps));
    while pipeline.step() < stop {
        let batch = loader.next_batch();
        let report = match pipeline.train_step(&batch) {
            Ok(r) => r,
            Err(e) if restarts < c.max_restarts => {
                restarts += 1;
                let failed_at = pipeline.step() + 1;
                // The write in flight must finish before we look for the latest good checkpoint.
                if let Some(dir) = saver.wait().map_err(engine_err)? {
                    saved_dir = Some(dir);
                }
                let from = checkpoint::latest(&ckpt_root).map_err(engine_err)?;
                let ck = match &from {
                    Some(dir) => Some(checkpoint::load(dir).map_err(engine_err)?),
                    None => None,
                };
                (pipeline, loader) = start(c, setup, split, ck.as_ref(), make)?;
                let resumed = pipeline.step();
                say(
                    &bar,
                    format!(
                        "restart {restarts}/{}: step {failed_at} failed: {e}; resuming from {}",
                        c.max_restarts,
                        from.as_ref()
                            .map_or("the start".into(), |d| format!("{} (step {resumed})", d.display()))
                    ),
                );
                let event = serde_json::json!({
                    "event": "restart",
                    "restarts": restarts,
                    "failed_step": failed_at,
                    "cause": e.to_string(),
                    "resumed_step": resumed,
                });
                write_line(&mut metrics, &event)?;
                bar.set_position(resumed);
                continue;
            }
            Err(e) => return Err(engine_err(e)),
        };
        let step = report.step;
        total_tokens += report.tokens;
        let tokens_per_s = report.tokens as f64 / report.elapsed_s.max(1e-9);
        let busy: Vec<f64> = report
            .busy_s
            .iter()
            .map(|b| {
                if report.pipeline_s > 0.0 {
                    b / report.pipeline_s
                } else {
                    0.0
                }
            })
            .collect();
        if report.skipped {
            skipped_total += 1;
            say(
                &bar,
                format!(
                    "step {}: non-finite {} (first seen on stage {}); optimizer step skipped",
                    step + 1,
                    if report.loss.is_finite() {
                        "gradient norm"
                    } else {
                        "loss"
                    },
                    report.nonfinite_stage.map_or("?".into(), |s| s.to_string())
                ),
            );
        }
        let mut line = serde_json::json!({
            "step": step,
            "loss": report.loss,
            "lr": report.lr,
            "grad_norm": report.grad_norm,
            "tokens_per_s": tokens_per_s,
            "bubble": report.bubble,
            "step_s": report.elapsed_s,
            "busy": busy,
            "host_us_per_action": report.host_per_action_s.iter().map(|h| h * 1e6).collect::<Vec<_>>(),
            "peak_mem_bytes": report.peak_stash_bytes,
            "skipped": report.skipped,
            "skipped_total": skipped_total,
            "restarts": restarts,
            "flops_per_token": flops_per_token,
        });
        let mfu = (peak_tflops > 0.0).then(|| tokens_per_s * flops_per_token / (peak_tflops * 1e12));
        if let Some(mfu) = mfu {
            line["mfu"] = serde_json::json!(mfu);
        }
        for (avg, b) in busy_avg.iter_mut().zip(&busy) {
            *avg = if busy_steps == 0 {
                *b
            } else {
                (1.0 - BUSY_AVG_WEIGHT) * *avg + BUSY_AVG_WEIGHT * b
            };
        }
        busy_steps += 1;
        let lagging = if busy_steps >= BUSY_AVG_STEPS {
            lagging_stages(&busy_avg)
        } else {
            Vec::new()
        };
        for s in lagging {
            if straggler_warned_at[s].is_none_or(|at| step >= at + 50) {
                straggler_warned_at[s] = Some(step);
                say(
                    &bar,
                    format!(
                        "warning: stage {s} busy {:.0}% vs {:.0}% on the others (recent steps): a neighbour is straggling",
                        busy_avg[s] * 100.0,
                        (busy_avg.iter().sum::<f64>() - busy_avg[s]) / (busy_avg.len() - 1) as f64 * 100.0
                    ),
                );
            }
        }
        let eval_now = (c.eval_every > 0 && step % c.eval_every == 0) || step == c.steps || step == first_step + 1;
        if !report.skipped && eval_now {
            let val = eval(&mut pipeline, split, c.eval_batches)?;
            line["val_loss"] = serde_json::json!(val);
            first_val.get_or_insert(val);
            last_val = Some(val);
            say(
                &bar,
                format!("step {step:>5}: train loss {:.4}, val loss {val:.4}", report.loss),
            );
        }
        if !report.skipped && c.save_every > 0 && step % c.save_every == 0 && step != c.steps {
            let t = Instant::now();
            let snap =
                checkpoint::snapshot(&pipeline, setup.tokenizer.kind(), Some(loader.state())).map_err(engine_err)?;
            let stall = t.elapsed().as_secs_f64();
            stalls.push(stall);
            line["save_stall_s"] = serde_json::json!(stall);
            if let Some(dir) = saver.submit(ckpt_root.clone(), snap, c.keep_last).map_err(engine_err)? {
                saved_dir = Some(dir);
            }
        }
        write_line(&mut metrics, &line)?;
        if let Some(trace) = trace.as_mut().filter(|_| step <= TRACE_STEPS_MAX) {
            trace.add_step(step, started.elapsed().as_secs_f64() - report.elapsed_s, &report);
        }
        let mfu_text = mfu.map_or(String::new(), |m| format!(" | MFU {:.1}%", m * 100.0));
        bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s{mfu_text} | bubble {:.1}%",
            report.loss,
            tokens_per_s,
            report.bubble * 100.0
        ));
        bar.set_position(step);
        last = Some(report);
    }
    bar.finish();
    metrics
        .flush()
        .map_err(|e| CliError::failure(format!("writing metrics.jsonl: {e}")))?;
    if let Some(dir) = saver.wait().map_err(engine_err)? {
        saved_dir = Some(dir);
    }
    if saved_dir
        .as_ref()
        .is_none_or(|d| !d.ends_with(checkpoint::step_dir_name(pipeline.step())))
    {
        let snap = checkpoint::snapshot(&pipeline, setup.tokenizer.kind(), Some(loader.state())).map_err(engine_err)?;
        saver.submit(ckpt_root.clone(), snap, c.keep_last).map_err(engine_err)?;
        saved_dir = saver.wait().map_err(engine_err)?.or(saved_dir);
    }
    if let Some(trace) = &trace {
        let path = out.join("trace.json");
        super::write_output(Some(&path), &trace.to_json()).map_err(|e| CliError::failure(e.message))?;
        eprintln!("trace: {}", path.display());
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(report) = &last {
        summary(
            c.seq,
            c.copy_gbps,
            &pipeline,
            report,
            elapsed,
            total_tokens,
            first_val,
            last_val,
        );
    }
    if !stalls.is_empty() {
        let mean = stalls.iter().sum::<f64>() / stalls.len() as f64;
        eprintln!(
            "checkpoint stall (host snapshot; the write runs in the background): mean {:.2} ms over {} saves",
            mean * 1e3,
            stalls.len()
        );
    }
    if restarts > 0 || skipped_total > 0 {
        eprintln!("restarts: {restarts}, skipped steps: {skipped_total}");
    }
    if let Some(dir) = saved_dir {
        eprintln!("checkpoint: {}", dir.display());
    }
    eprintln!("metrics: {}", metrics_path.display());
    Ok(())
}

fn eval<B: Backend>(pipeline: &mut Pipeline<B>, split: &Split, batches: usize) -> Result<f32, CliError> {
    let mut sum = 0.0f64;
    let mut n = 0usize;
    for batch in split.eval_batches(batches) {
        sum += f64::from(pipeline.eval_loss(&batch).map_err(engine_err)?);
        n += 1;
    }
    Ok((sum / n.max(1) as f64) as f32)
}

/// The simulator's bubble for this schedule with the per-action costs measured in `report`.
/// Mean measured time of each op per part in `report` (0 where the op did not run).
pub fn measured_costs<B: Backend>(pipeline: &Pipeline<B>, report: &StepReport) -> Option<Costs> {
    let schedule = pipeline.schedule();
    let parts = schedule.placement.num_parts() as usize;
    let mut sums = vec![[0.0f64; 4]; parts];
    let mut counts = vec![[0usize; 4]; parts];
    for (s, spans) in report.spans.iter().enumerate() {
        for span in spans {
            let part = schedule.part_of(s as u32, &span.action)? as usize;
            let k = Op::ALL.iter().position(|&o| o == span.action.op)?;
            sums[part][k] += span.end_s - span.start_s;
            counts[part][k] += 1;
        }
    }
    let mean = |part: usize, k: usize| {
        if counts[part][k] > 0 {
            sums[part][k] / counts[part][k] as f64
        } else {
            0.0
        }
    };
    let costs = Costs {
        forward: (0..parts).map(|p| mean(p, 0)).collect(),
        backward: (0..parts).map(|p| mean(p, 1)).collect(),
        backward_input: (0..parts).map(|p| mean(p, 2)).collect(),
        backward_weight: (0..parts).map(|p| mean(p, 3)).collect(),
        latency: 0.0,
    };
    Some(costs)
}

/// The simulator's bubble for this schedule with the per-action costs measured in `report`.
pub fn predicted_bubble<B: Backend>(pipeline: &Pipeline<B>, report: &StepReport) -> Option<f64> {
    simulate(pipeline.schedule(), &measured_costs(pipeline, report)?)
        .ok()
        .map(|r| r.bubble)
}

#[allow(clippy::too_many_arguments)]
fn summary<B: Backend>(
    seq: usize,
    copy_gbps: f64,
    pipeline: &Pipeline<B>,
    report: &StepReport,
    elapsed: f64,
    tokens: usize,
    first_val: Option<f32>,
    last_val: Option<f32>,
) {
    eprintln!(
        "trained {} steps in {elapsed:.1} s ({:.0} tokens/s); val loss {} -> {}",
        pipeline.step(),
        tokens as f64 / elapsed.max(1e-9),
        first_val.map_or("-".into(), |v| format!("{v:.4}")),
        last_val.map_or("-".into(), |v| format!("{v:.4}"))
    );
    let predicted = predicted_bubble(pipeline, report);
    eprintln!(
        "last step: measured bubble {:.1}%, simulated from measured action costs {}",
        report.bubble * 100.0,
        predicted.map_or("-".into(), |b| format!("{:.1}%", b * 100.0))
    );
    // What the same schedule would do with one stage per device (transfers as free as here).
    if let Some(costs) = measured_costs(pipeline, report) {
        let cfg = pipeline.config();
        let units = crate::engine::predict::unit_costs(&cfg.model, seq, pipeline.ranges(), &costs);
        let elem = pipeline.backends().first().map_or(4, Backend::activation_elem_bytes);
        let act_bytes = (report.tokens / cfg.microbatches as usize * cfg.model.d_model * elem) as f64;
        if let Ok(preds) = crate::engine::predict::predict(
            &cfg.model,
            &units,
            cfg.schedule,
            cfg.microbatches,
            cfg.chunks,
            &[1, 2, 4, 8],
            act_bytes,
            if copy_gbps > 0.0 {
                copy_gbps * 1e9
            } else {
                f64::INFINITY
            },
        ) {
            let text: Vec<String> = preds
                .iter()
                .map(|p| {
                    format!(
                        "{} stage(s) {:.1} ms, bubble {:.1}%",
                        p.stages,
                        p.step_s * 1e3,
                        p.bubble * 100.0
                    )
                })
                .collect();
            let link = if copy_gbps > 0.0 {
                format!("{copy_gbps} GB/s copies")
            } else {
                "free transfers".into()
            };
            eprintln!(
                "predicted with one stage per device from these costs ({link}): {}",
                text.join("; ")
            );
        }
    }
    let pools = pipeline.receive_pools();
    for (s, (busy, idle)) in report.busy_s.iter().zip(&report.idle_s).enumerate() {
        let total = busy + idle;
        let pool = pools.get(s).copied().unwrap_or_default();
        eprintln!(
            "  stage {s}: busy {:.1} ms ({:.0}%), idle {:.1} ms, host {:.1} µs/action, peak stashed activations {} \
             ({:.1} MiB), receive buffers {} (allocated {}, reused {}, misses {})",
            busy * 1e3,
            if total > 0.0 { busy / total * 100.0 } else { 0.0 },
            idle * 1e3,
            report.host_per_action_s.get(s).copied().unwrap_or(0.0) * 1e6,
            report.peak_stashed[s],
            report.peak_stash_bytes[s] as f64 / (1 << 20) as f64,
            pool.capacity,
            pool.allocations(),
            pool.hits,
            pool.misses
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_a_fifth_less_busy_than_the_others_is_flagged() {
        assert_eq!(lagging_stages(&[0.9, 0.9, 0.6, 0.9]), vec![2]);
        assert!(lagging_stages(&[0.9, 0.85, 0.8, 0.9]).is_empty());
        assert!(lagging_stages(&[0.5]).is_empty());
    }

    #[test]
    fn flags_override_the_toml_file_which_overrides_the_defaults() {
        let dir = std::env::temp_dir().join(format!("baton-train-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.toml");
        std::fs::write(&path, "layers = 6\nlr = 0.01\nschedule = \"zb-h1\"\n").unwrap();
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            args: TrainArgs,
        }
        let cmd = <Cmd as clap::Parser>::try_parse_from(["train", "--config", path.to_str().unwrap(), "--lr", "0.02"]);
        let c = cmd.unwrap().args.resolve().unwrap();
        assert_eq!(
            (c.layers, c.lr, c.schedule.as_str(), c.d_model),
            (6, 0.02, "zb-h1", 128)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
