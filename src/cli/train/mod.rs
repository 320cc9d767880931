//! `baton train`: arguments → configuration → the engine's [`Trainer`] → summary. The progress bar,
//! `metrics.jsonl` and the optional Chrome/Perfetto trace are an [`Observer`] of the loop.

mod args;
mod progress;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};

pub use args::{check, pipeline_config, TrainArgs, TrainConfig};

use super::CliError;
use crate::engine::backend::{Backend, Cuda, Precision};
use crate::engine::checkpoint::{self, Checkpoint};
use crate::engine::data::{default_corpus, load_tokens, Split, Tokenizer};
use crate::engine::executor::FailurePoint;
use crate::engine::pipeline::{NonFinitePolicy, TensorMap};
use crate::engine::{Cpu, Pipeline, PipelineConfig, SplitData, Trainer, TrainerConfig};
use crate::schedules::Schedule;
use progress::{summary, CliObserver};

/// Environment variable that injects a failure: `stage:2,action:7,kind:panic|error|stall|hang|nan[,step:5]`.
pub const FAIL_AT_ENV: &str = "BATON_FAIL_AT";

/// Most steps a trace records (each step adds one span per action).
pub const TRACE_STEPS_MAX: u64 = 20;

fn engine_err(e: impl std::fmt::Display) -> CliError {
    CliError::failure(e.to_string())
}

/// The model a run trains, its tokenizer, its schedule, and (when resuming) the checkpoint it continues.
struct Setup {
    tokenizer: Tokenizer,
    pcfg: PipelineConfig,
    schedule: Schedule,
    init: Option<TensorMap>,
    resume: Option<Checkpoint>,
}

/// Reads `--schedule-csv`: the schedule, checked against the flags that would contradict it.
fn schedule_from_file(path: &Path, c: &TrainConfig, args: &TrainArgs) -> Result<Schedule, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("--schedule-csv {}: {e}", path.display())))?;
    let schedule = crate::schedules::schedule_from_csv(&text)
        .map_err(|e| CliError::usage(format!("--schedule-csv {}: {e}", path.display())))?;
    if let Some(p) = args.stages.filter(|&p| p != schedule.stages()) {
        return Err(CliError::usage(format!(
            "--stages {p}: the schedule in {} has {} stages (leave --stages out to take the file's)",
            path.display(),
            schedule.stages()
        )));
    }
    let m = schedule.microbatches as usize;
    if c.batch % m != 0 {
        return Err(CliError::usage(format!(
            "--batch {}: the schedule in {} has {m} micro-batches, which must divide the batch",
            c.batch,
            path.display()
        )));
    }
    Ok(schedule)
}

/// Resolves the tokenizer, model, schedule and starting point. A resumed run takes its model and tokenizer from
/// the checkpoint; a flag that contradicts them is an error.
fn setup(args: &TrainArgs, c: &mut TrainConfig, ckpt_root: &Path) -> Result<Setup, CliError> {
    let schedule_csv = match &c.schedule_csv {
        Some(path) => {
            let s = schedule_from_file(path, c, args)?;
            c.stages = s.stages();
            c.microbatches = s.microbatches;
            c.chunks = Some(s.chunks());
            Some(s)
        }
        None => None,
    };
    check(c)?;
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
        let m = ck.manifest.gpt2().map_err(engine_err)?.config;
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
        pcfg.model = m;
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
    let schedule = match schedule_csv {
        Some(s) => s,
        None => pcfg.generate_schedule().map_err(|e| CliError::usage(e.to_string()))?,
    };
    Ok(Setup {
        tokenizer,
        pcfg,
        schedule,
        init,
        resume,
    })
}

/// Runs `baton train`.
pub fn run(args: &TrainArgs) -> Result<(), CliError> {
    let mut c = args.resolve()?;
    // Checked in `setup`, once a `--schedule-csv` has set the stages and micro-batches.
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
    let setup = setup(args, &mut c, &ckpt_root)?;
    let tokens = match &c.data {
        Some(path) => load_tokens(path, &setup.tokenizer).map_err(engine_err)?,
        None => setup.tokenizer.encode(default_corpus()),
    };
    let split = Split::new(&tokens, Split::DEFAULT_VAL_FRACTION, c.batch, c.seq).map_err(engine_err)?;
    let token_count = tokens.len();
    match device {
        Device::Cpu => train_on(&c, setup, split, token_count, &out, fail_at, &|| {
            Ok(vec![Cpu; c.stages as usize])
        }),
        Device::Cuda(count) => {
            let make = || -> crate::engine::Result<Vec<Cuda>> {
                // Stages round-robin over the GPUs; stages sharing a GPU get a stream each.
                (0..c.stages as usize)
                    .map(|s| Cuda::with_precision(s % count, precision))
                    .collect()
            };
            train_on(&c, setup, split, token_count, &out, fail_at, &make)
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
    let cuda = || -> Result<usize, String> {
        use crate::kernels::cuda as kc;
        kc::driver_available().map_err(|e| e.to_string())?;
        kc::device_count().map_err(|e| e.to_string())
    };
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

/// The run on backend `B` (`make` builds one backend per stage, again after a restart).
fn train_on<B: Backend>(
    c: &TrainConfig,
    setup: Setup,
    split: Split,
    token_count: usize,
    out: &Path,
    fail_at: Option<FailurePoint>,
    make: &dyn Fn() -> crate::engine::Result<Vec<B>>,
) -> Result<(), CliError> {
    let model = Arc::new(setup.pcfg.gpt2().map_err(engine_err)?);
    let build = || {
        Pipeline::builder(model.clone())
            .schedule(setup.schedule.clone())
            .split(setup.pcfg.split.clone())
            .options(setup.pcfg.options())
            .build(make()?)
    };
    let tcfg = TrainerConfig {
        steps: c.steps,
        stop_at: c.stop_at,
        eval_every: c.eval_every,
        eval_batches: c.eval_batches,
        checkpoint_dir: Some(out.join("checkpoints")),
        save_every: c.save_every,
        keep_last: c.keep_last,
        max_restarts: c.max_restarts,
        trace_steps: if c.trace { TRACE_STEPS_MAX } else { 0 },
        peak_tflops: c.peak_tflops,
        tokenizer: setup.tokenizer.kind(),
    };
    let mut trainer = Trainer::new(tcfg, build).map_err(engine_err)?;
    let mut data = SplitData::new(split, c.seed).map_err(engine_err)?;
    if let Some(ck) = &setup.resume {
        trainer.resume(ck, &mut data).map_err(engine_err)?;
    } else if let Some(params) = setup.init {
        trainer.init_from(params).map_err(engine_err)?;
    }
    trainer.pipeline_mut().set_failure(fail_at);

    std::fs::create_dir_all(out).map_err(|e| CliError::failure(format!("creating {}: {e}", out.display())))?;
    let metrics_path = out.join("metrics.jsonl");
    let metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(setup.resume.is_some())
        .write(true)
        .truncate(setup.resume.is_none())
        .open(&metrics_path)
        .map_err(|e| CliError::failure(format!("{}: {e}", metrics_path.display())))?;
    let m = &setup.pcfg.model;
    let split = data.split();
    eprintln!(
        "baton train: {} params ({} layers, d_model {}, {} heads, context {}), {} stages, {} with {} micro-batches × {} sequences, {} tokens ({} train / {} val), tokenizer {}{}",
        m.num_params(),
        m.layers,
        m.d_model,
        m.heads,
        c.seq,
        c.stages,
        c.schedule_csv
            .as_ref()
            .map_or(c.schedule.clone(), |p| format!("the schedule of {}", p.display())),
        c.microbatches,
        c.batch / c.microbatches as usize,
        token_count,
        split.train().len(),
        split.val().len(),
        setup.tokenizer.name(),
        setup.resume.as_ref().map_or(String::new(), |ck| format!(", resuming {} at step {}", ck.dir.display(), ck.manifest.step))
    );
    let mut observer = CliObserver {
        bar: ProgressBar::new(c.steps),
        metrics: BufWriter::new(metrics_file),
        trace: c.trace.then(super::trace::Trace::default),
        error: None,
    };
    observer.bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let result = trainer.run(&mut data, &mut observer);
    observer.bar.finish();
    observer
        .metrics
        .flush()
        .map_err(|e| CliError::failure(format!("writing metrics.jsonl: {e}")))?;
    if let Some(e) = observer.error.take() {
        return Err(e);
    }
    let run = result.map_err(engine_err)?;
    if let Some(trace) = &observer.trace {
        let path = out.join("trace.json");
        super::write_output(Some(&path), &trace.to_json()).map_err(|e| CliError::failure(e.message))?;
        eprintln!("trace: {}", path.display());
    }
    if let Some(report) = &run.last {
        summary(c.seq, c.copy_gbps, &setup.pcfg.model, trainer.pipeline(), report, &run);
    }
    if !run.save_stalls_s.is_empty() {
        let mean = run.save_stalls_s.iter().sum::<f64>() / run.save_stalls_s.len() as f64;
        eprintln!(
            "checkpoint stall (host snapshot; the write runs in the background): mean {:.2} ms over {} saves",
            mean * 1e3,
            run.save_stalls_s.len()
        );
    }
    if run.restarts > 0 || run.skipped > 0 {
        eprintln!("restarts: {}, skipped steps: {}", run.restarts, run.skipped);
    }
    if let Some(dir) = &run.checkpoint {
        eprintln!("checkpoint: {}", dir.display());
    }
    eprintln!("metrics: {}", metrics_path.display());
    Ok(())
}
