//! `baton train`: arguments → configuration → the engine's [`Trainer`] → summary. The progress bar,
//! `metrics.jsonl` and the optional Chrome/Perfetto trace are an [`Observer`] of the loop.

mod args;

use std::fs::File;
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
use crate::engine::trainer::{self, CheckpointEvent, EvalEvent, RestartEvent, StartEvent, StepEvent, Warning};
use crate::engine::{Cpu, Pipeline, PipelineConfig, SplitData, Trainer, TrainerConfig};
use crate::schedules::Schedule;

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

/// `baton train`'s view of the loop: a progress bar, one `metrics.jsonl` line per step (and per restart), the
/// trace of the first steps.
struct CliObserver {
    bar: ProgressBar,
    metrics: BufWriter<File>,
    trace: Option<super::trace::Trace>,
    /// The first failure to write the metrics (reported when the run ends).
    error: Option<CliError>,
}

impl CliObserver {
    /// Prints a line above the progress bar, or to stderr when the bar is hidden (not a terminal).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn write_line(&mut self, line: &serde_json::Value) {
        if let Err(e) = writeln!(self.metrics, "{line}") {
            self.error
                .get_or_insert(CliError::failure(format!("writing metrics.jsonl: {e}")));
        }
    }
}

impl trainer::Observer for CliObserver {
    fn on_start(&mut self, e: &StartEvent) {
        self.bar.set_position(e.first_step);
        if e.peak_measured {
            self.say(format!(
                "MFU against the measured bf16 GEMM rate of stage 0's device: {:.0} TFLOP/s",
                e.peak_tflops
            ));
        }
    }

    fn on_step(&mut self, e: &StepEvent<'_>) {
        let r = e.report;
        let mut line = serde_json::json!({
            "step": r.step,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": e.tokens_per_s,
            "bubble": r.bubble,
            "step_s": r.elapsed_s,
            "busy": e.busy,
            "host_us_per_action": r.host_per_action_s.iter().map(|h| h * 1e6).collect::<Vec<_>>(),
            "peak_mem_bytes": r.peak_stash_bytes,
            "skipped": r.skipped,
            "skipped_total": e.skipped_total,
            "restarts": e.restarts,
            "flops_per_token": e.flops_per_token,
        });
        if let Some(mfu) = e.mfu {
            line["mfu"] = serde_json::json!(mfu);
        }
        if let Some(val) = e.val_loss {
            line["val_loss"] = serde_json::json!(val);
        }
        if let Some(stall) = e.save_stall_s {
            line["save_stall_s"] = serde_json::json!(stall);
        }
        self.write_line(&line);
        if e.traced {
            if let Some(trace) = self.trace.as_mut() {
                trace.add_step(r.step, e.started_s, r);
            }
        }
        let mfu_text = e.mfu.map_or(String::new(), |m| format!(" | MFU {:.1}%", m * 100.0));
        self.bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s{mfu_text} | bubble {:.1}%",
            r.loss,
            e.tokens_per_s,
            r.bubble * 100.0
        ));
        self.bar.set_position(r.step);
    }

    fn on_eval(&mut self, e: &EvalEvent) {
        self.say(format!(
            "step {:>5}: train loss {:.4}, val loss {:.4}",
            e.step, e.train_loss, e.val_loss
        ));
    }

    fn on_checkpoint(&mut self, _e: &CheckpointEvent) {}

    fn on_restart(&mut self, e: &RestartEvent) {
        self.say(format!(
            "restart {}/{}: step {} failed: {}; resuming from {}",
            e.restarts,
            e.max_restarts,
            e.failed_step,
            e.cause,
            e.from.as_ref().map_or("the start".into(), |d| format!(
                "{} (step {})",
                d.display(),
                e.resumed_step
            ))
        ));
        let event = serde_json::json!({
            "event": "restart",
            "restarts": e.restarts,
            "failed_step": e.failed_step,
            "cause": e.cause,
            "resumed_step": e.resumed_step,
        });
        self.write_line(&event);
        self.bar.set_position(e.resumed_step);
    }

    fn on_warning(&mut self, w: &Warning) {
        let text = match w {
            Warning::Straggler {
                stage, busy, others, ..
            } => format!(
                "warning: stage {stage} busy {:.0}% vs {:.0}% on the others (recent steps): a neighbour is straggling",
                busy * 100.0,
                others * 100.0
            ),
            Warning::Skipped { step, what, stage } => format!(
                "step {step}: non-finite {what} (first seen on stage {}); optimizer step skipped",
                stage.map_or("?".into(), |s| s.to_string())
            ),
            Warning::PeakUnavailable(why) => {
                format!("warning: measuring the bf16 GEMM rate failed ({why}); MFU not reported")
            }
            Warning::DropErrors(list) => format!("warning: errors while releasing resources: {}", list.join("; ")),
        };
        self.say(text);
    }
}

fn summary<B: Backend>(
    seq: usize,
    copy_gbps: f64,
    model: &crate::engine::GptConfig,
    pipeline: &Pipeline<B>,
    report: &crate::engine::StepReport,
    run: &trainer::RunSummary,
) {
    eprintln!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); val loss {} -> {}",
        pipeline.step(),
        run.elapsed_s,
        run.tokens as f64 / run.elapsed_s.max(1e-9),
        run.first_val.map_or("-".into(), |v| format!("{v:.4}")),
        run.last_val.map_or("-".into(), |v| format!("{v:.4}"))
    );
    let predicted = trainer::predicted_bubble(pipeline, report);
    eprintln!(
        "last step: measured bubble {:.1}%, simulated from measured action costs {}",
        report.bubble * 100.0,
        predicted.map_or("-".into(), |b| format!("{:.1}%", b * 100.0))
    );
    // What the same schedule would do with one stage per device (transfers as free as here).
    let schedule = pipeline.schedule();
    if let Some(costs) = trainer::measured_costs(pipeline, report) {
        let units = crate::engine::predict::unit_costs(model, seq, pipeline.ranges(), &costs);
        let elem = pipeline.backends().first().map_or(4, Backend::activation_elem_bytes);
        let act_bytes = (report.tokens / schedule.microbatches as usize * model.d_model * elem) as f64;
        if let Ok(preds) = crate::engine::predict::predict(
            model,
            &units,
            schedule.kind,
            schedule.microbatches,
            schedule.chunks(),
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
            if !text.is_empty() {
                eprintln!(
                    "predicted with one stage per device from these costs ({link}): {}",
                    text.join("; ")
                );
            }
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
