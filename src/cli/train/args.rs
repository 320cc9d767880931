//! The settings of `baton train`: every one has a default, a TOML key (`--config FILE.toml`) and a flag; flags
//! override the file, which overrides the defaults.

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli::CliError;
use crate::engine::{DataParallel, EngineError, GptConfig, OptimizerConfig, PipelineConfig, StageSplit};
use crate::schedules::ScheduleKind;

/// Default peak learning rate: with [`WARMUP_DEFAULT`] the default run's loss falls without a spike (3e-3 with 10
/// warm-up steps jumped to 7.37 at step 8, gradient norm 36 at steps 10 and 14).
pub const LR_DEFAULT: f32 = 2e-3;
/// Default warm-up steps.
pub const WARMUP_DEFAULT: u64 = 30;
/// Default checkpoint interval, steps (a Ctrl-C or a crash loses at most this many).
pub const SAVE_EVERY_DEFAULT: u64 = 100;
/// Default steps a trace covers.
pub const TRACE_STEPS_DEFAULT: u64 = 20;
/// Most steps a trace may cover (each step adds one span per action: 20 steps of the default run are ~2 MB).
pub const TRACE_STEPS_MAX: u64 = 1000;

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
    /// Train with the schedule in this CSV instead (Baton's or PyTorch's `_dump_csv`, compute-only or with
    /// comms); the stage count and micro-batches come from the file.
    pub schedule_csv: Option<PathBuf>,
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
    /// Batched weight gradients: one product per weight over all the step's micro-batches (faster with small
    /// micro-batches on the CPU; the same bits for any micro-batch count there; holds every micro-batch's
    /// weight-gradient stash until the part's last one).
    pub batch_weight_grads: bool,
    /// Validate every this many steps (0 = only at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// Write `trace.json` (Chrome/Perfetto) for the first `trace_steps` steps.
    pub trace: bool,
    /// Steps the trace covers, from the run's first (`--trace-steps N` turns the trace on).
    pub trace_steps: u64,
    /// Write TensorBoard scalar event files under `<out>/tensorboard`.
    pub tensorboard: bool,
    /// When stderr is not a terminal: print a progress line every this many steps (0: about every 10 s).
    pub log_every: u64,
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
    /// CPU compute threads, shared by all stages (0: one per core). Results do not depend on it.
    pub threads: usize,
    /// CPU threads of each stage's own pool (0: the stages share `threads`), so stages compute like separate
    /// devices. Results do not depend on it.
    pub stage_threads: usize,
    /// Data-parallel replicas of the pipeline; `batch` is the global batch, shared evenly among them, and
    /// `microbatches` is per replica.
    pub data_parallel: u32,
    /// ZeRO stage: 0 (off) or 1 (AdamW moments sharded across the replicas of each stage).
    pub zero: u32,
    /// Reduce the replicas' gradients after the schedule instead of while it runs (the same bits).
    pub no_overlap: bool,
    /// Largest gradient bucket of the data-parallel reduction, MiB.
    pub bucket_mib: f64,
    /// How the replicas' gradients (under DiLoCo: outer deltas) are encoded: none, bf16, powersgd:R[:WARMUP],
    /// topk:F or auto.
    pub compress: String,
    /// When the replicas synchronise: bsp (every step) or diloco:H[:OUTER_LR:MOMENTUM].
    pub sync: String,
    /// `--compress auto`: the bandwidth between replicas, Gbit/s (0: measured from the reductions).
    pub link_gbps: f64,
    /// `auto`: profile the model and let the planner choose the split, schedule, micro-batches, chunks and
    /// recomputation (the stages stay as given).
    pub plan: Option<String>,
    /// Memory per stage (device), e.g. `2GiB`: the planner's budget, and without a plan a check of the layout.
    pub memory_budget: Option<String>,
    /// Directory of the planner's cached profiles (default: the output directory).
    pub profile_cache: Option<PathBuf>,
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
            schedule_csv: None,
            microbatches: 8,
            chunks: None,
            split: None,
            // 800 steps: about 80 s of training on the 2-core development machine, where the default model
            // reaches validation loss below 2.0 and samples read like a play (BENCHMARKS.md, "The default run").
            steps: 800,
            lr: LR_DEFAULT,
            warmup: WARMUP_DEFAULT,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            recompute: false,
            batch_weight_grads: false,
            eval_every: 100,
            eval_batches: 8,
            save_every: SAVE_EVERY_DEFAULT,
            trace: false,
            trace_steps: TRACE_STEPS_DEFAULT,
            tensorboard: false,
            log_every: 0,
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
            threads: 0,
            stage_threads: 0,
            data_parallel: 1,
            zero: 0,
            no_overlap: false,
            bucket_mib: crate::engine::data_parallel::BUCKET_MIB_DEFAULT,
            compress: "none".into(),
            sync: "bsp".into(),
            link_gbps: 0.0,
            plan: None,
            memory_budget: None,
            profile_cache: None,
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
    /// Train with the schedule in this CSV (Baton's or PyTorch's `_dump_csv`; stages and micro-batches from the file).
    #[arg(long, value_name = "FILE.csv")]
    pub schedule_csv: Option<PathBuf>,
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
    /// Weight decay (AdamW, decoupled).
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Clip the global gradient norm to this (0: off).
    #[arg(long)]
    pub grad_clip: Option<f32>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute activations in backward.
    #[arg(long)]
    pub recompute: bool,
    /// Batch the weight gradients: each part computes them once per step, over all its micro-batches' tokens
    /// (faster with small micro-batches on the CPU, where the trained bits then do not depend on the micro-batch
    /// count; every micro-batch's weight-gradient stash is held until the part's last one).
    #[arg(long)]
    pub batch_weight_grads: bool,
    /// Validate every N steps.
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// Validation batches per evaluation.
    #[arg(long, value_name = "N")]
    pub eval_batches: Option<usize>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, value_name = "N")]
    pub save_every: Option<u64>,
    /// Write a Chrome/Perfetto trace (trace.json) of the first --trace-steps steps.
    #[arg(long)]
    pub trace: bool,
    /// Steps the trace covers (implies --trace).
    #[arg(long, value_name = "N")]
    pub trace_steps: Option<u64>,
    /// Write TensorBoard scalars under <out>/tensorboard (`tensorboard --logdir <out>`).
    #[arg(long)]
    pub tensorboard: bool,
    /// Without a terminal: a progress line every N steps (0: about every 10 s).
    #[arg(long, value_name = "N")]
    pub log_every: Option<u64>,
    /// Print the resolved configuration, split, schedule, simulated step and memory estimate; train nothing.
    #[arg(long)]
    pub dry_run: bool,
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
    /// CPU compute threads shared by all stages (0: one per core); the results are the same for any number.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Give each stage a CPU pool of N threads of its own instead (stages then compute like separate devices; the
    /// results are the same).
    #[arg(long, value_name = "N")]
    pub stage_threads: Option<usize>,
    /// Data-parallel replicas of the pipeline (D × stages workers); --batch is the global batch, split evenly
    /// among the replicas, --microbatches is per replica.
    #[arg(long, value_name = "D")]
    pub data_parallel: Option<u32>,
    /// ZeRO stage: 1 shards the AdamW moments across the replicas of each stage (bitwise the same run).
    #[arg(long, value_name = "0|1")]
    pub zero: Option<u32>,
    /// Reduce the replicas' gradients after the schedule instead of overlapping it (the same bits).
    #[arg(long)]
    pub no_overlap: bool,
    /// Largest gradient bucket of the data-parallel reduction, MiB.
    #[arg(long, value_name = "MIB")]
    pub bucket_mib: Option<f64>,
    /// Gradient compression between replicas: none, bf16, powersgd:RANK[:WARMUP] (error feedback), topk:FRACTION
    /// (error feedback), or auto (per bucket, the least lossy one whose reduction hides under the step).
    #[arg(long, value_name = "MODE")]
    pub compress: Option<String>,
    /// When replicas synchronise: bsp (every step) or diloco:H[:OUTER_LR:MOMENTUM] (local SGD: H inner AdamW
    /// steps, then an outer Nesterov step on the mean parameter delta; defaults 0.7 and 0.9).
    #[arg(long, value_name = "MODE")]
    pub sync: Option<String>,
    /// For --compress auto: the bandwidth between replicas in Gbit/s (default: measured).
    #[arg(long, value_name = "GBPS")]
    pub link_gbps: Option<f64>,
    /// `auto`: profile the model's units (cached) and train with the split, schedule, micro-batches, chunks and
    /// recomputation the planner finds fastest under --memory-budget (the stages stay as given).
    #[arg(long, value_name = "auto")]
    pub plan: Option<String>,
    /// Memory per stage (device): bytes or a size such as 2GiB, 512MiB, 1.5GB; with --plan auto the planner's
    /// budget, otherwise the configured layout is checked against it.
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// Directory of cached profiles for --plan auto (default: the output directory).
    #[arg(long, value_name = "DIR")]
    pub profile_cache: Option<PathBuf>,
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
            weight_decay,
            grad_clip,
            seed,
            eval_every,
            eval_batches,
            save_every,
            log_every,
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
        if let Some(n) = self.threads {
            c.threads = n;
        }
        if let Some(n) = self.stage_threads {
            c.stage_threads = n;
        }
        if let Some(d) = self.data_parallel {
            c.data_parallel = d;
        }
        if let Some(z) = self.zero {
            c.zero = z;
        }
        if let Some(b) = self.bucket_mib {
            c.bucket_mib = b;
        }
        c.no_overlap |= self.no_overlap;
        if let Some(m) = &self.compress {
            c.compress = m.clone();
        }
        if let Some(m) = &self.sync {
            c.sync = m.clone();
        }
        if let Some(g) = self.link_gbps {
            c.link_gbps = g;
        }
        if self.plan.is_some() {
            c.plan = self.plan.clone();
        }
        if self.memory_budget.is_some() {
            c.memory_budget = self.memory_budget.clone();
        }
        if self.profile_cache.is_some() {
            c.profile_cache = self.profile_cache.clone();
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
        if self.schedule_csv.is_some() {
            c.schedule_csv = self.schedule_csv.clone();
        }
        if let Some(n) = self.trace_steps {
            c.trace_steps = n;
            c.trace = true;
        }
        c.recompute |= self.recompute;
        c.batch_weight_grads |= self.batch_weight_grads;
        c.trace |= self.trace;
        c.tensorboard |= self.tensorboard;
        Ok(c)
    }
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
    p.batch_weight_grads = c.batch_weight_grads;
    p.seed = c.seed;
    p.data_parallel = DataParallel {
        replicas: c.data_parallel,
        overlap: !c.no_overlap,
        bucket_mib: c.bucket_mib,
        zero: c.zero == 1,
        compress: c
            .compress
            .parse()
            .map_err(|e: EngineError| CliError::usage(format!("--compress: {e}")))?,
        sync: c
            .sync
            .parse()
            .map_err(|e: EngineError| CliError::usage(format!("--sync: {e}")))?,
        link_gbps: (c.link_gbps > 0.0).then_some(c.link_gbps),
    };
    Ok(p)
}

/// Checks the settings the engine does not see.
pub fn check(c: &TrainConfig) -> Result<(), CliError> {
    if c.steps == 0 {
        return Err(CliError::usage("--steps must be >= 1"));
    }
    if c.batch == 0 {
        return Err(CliError::usage("--batch must be >= 1"));
    }
    if c.data_parallel == 0 {
        return Err(CliError::usage("--data-parallel must be >= 1"));
    }
    if c.zero > 1 {
        return Err(CliError::usage(format!(
            "--zero {}: only ZeRO stage 0 (off) and 1 (sharded AdamW moments) exist",
            c.zero
        )));
    }
    if !(c.bucket_mib.is_finite() && c.bucket_mib > 0.0) {
        return Err(CliError::usage(format!(
            "--bucket-mib {} must be a positive number",
            c.bucket_mib
        )));
    }
    if !(c.link_gbps.is_finite() && c.link_gbps >= 0.0) {
        return Err(CliError::usage(format!(
            "--link-gbps {} must be a positive number of Gbit/s (0: measured)",
            c.link_gbps
        )));
    }
    let compress: crate::engine::Compression = c
        .compress
        .parse()
        .map_err(|e: EngineError| CliError::usage(format!("--compress: {e}")))?;
    let sync: crate::engine::SyncMode = c
        .sync
        .parse()
        .map_err(|e: EngineError| CliError::usage(format!("--sync: {e}")))?;
    if sync.is_local() && c.zero == 1 {
        return Err(CliError::usage(format!(
            "--zero 1 shards one shared optimizer state, but under --sync {sync} every replica steps its own: use \
             --zero 0"
        )));
    }
    if c.schedule == "2bw" && (c.zero == 1 || compress != crate::engine::Compression::None || sync.is_local()) {
        return Err(CliError::usage(
            "--schedule 2bw sums the replicas' gradients in fp32 every window: drop --zero 1, --compress and --sync \
             diloco with it",
        ));
    }
    if compress != crate::engine::Compression::None && c.data_parallel < 2 {
        return Err(CliError::usage(format!(
            "--compress {compress} compresses what replicas exchange; with one replica there is nothing to send: \
             add --data-parallel 2 or more"
        )));
    }
    let d = c.data_parallel as usize;
    if c.microbatches == 0 || c.batch % (c.microbatches as usize * d) != 0 {
        return Err(CliError::usage(if d == 1 {
            format!(
                "--microbatches {} must divide --batch {} (each micro-batch holds batch / microbatches sequences)",
                c.microbatches, c.batch
            )
        } else {
            format!(
                "--data-parallel {d} × --microbatches {} must divide --batch {} (the global batch: each replica \
                 takes batch / {d} sequences in {} micro-batches)",
                c.microbatches, c.batch, c.microbatches
            )
        }));
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
        return Err(CliError::usage("--eval-batches must be >= 1"));
    }
    if c.trace && (c.trace_steps == 0 || c.trace_steps > TRACE_STEPS_MAX) {
        return Err(CliError::usage(format!(
            "--trace-steps {} must be in 1..={TRACE_STEPS_MAX}",
            c.trace_steps
        )));
    }
    for (flag, v) in [
        ("--lr", c.lr),
        ("--weight-decay", c.weight_decay),
        ("--grad-clip", c.grad_clip),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(CliError::usage(format!("{flag} {v} must be finite and >= 0")));
        }
    }
    if c.lr == 0.0 {
        return Err(CliError::usage("--lr 0 trains nothing; give a positive learning rate"));
    }
    Ok(())
}

/// `baton train --help`'s defaults, by setting name (= flag id and TOML key): every setting with a value.
pub fn defaults_for_help() -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(TrainConfig::default()) {
        for (k, v) in map {
            let text = match v {
                // Absent settings and switches (`--recompute`) show no default.
                serde_json::Value::Null | serde_json::Value::Bool(_) => continue,
                serde_json::Value::String(s) => s,
                // f32 settings as they were written (0.003, not 0.003000000026077032).
                serde_json::Value::Number(n) if n.is_f64() => format!("{}", n.as_f64().unwrap_or(0.0) as f32),
                other => other.to_string(),
            };
            out.insert(k, text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
