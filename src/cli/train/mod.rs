//! `baton train`: arguments → configuration → memory check → the engine's [`Trainer`] → summary and report. The
//! progress bar (or plain lines without a terminal), `metrics.jsonl`, TensorBoard scalars and the optional
//! Chrome/Perfetto trace are an [`Observer`] of the loop; SIGINT / SIGTERM stop it after the current step with a
//! complete checkpoint.

mod args;
mod dist;
mod progress;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub use args::{
    check, defaults_for_help, pipeline_config, TrainArgs, TrainConfig, LR_DEFAULT, SAVE_EVERY_DEFAULT,
    TRACE_STEPS_DEFAULT, TRACE_STEPS_MAX, WARMUP_DEFAULT,
};

use super::CliError;
use crate::engine::backend::{Backend, Cuda, Precision};
use crate::engine::checkpoint::{self, Checkpoint};
use crate::engine::data::{default_corpus, load_tokens, Split, Tokenizer};
use crate::engine::executor::FailurePoint;
use crate::engine::memory::{self, MemoryEstimate};
use crate::engine::pipeline::{NonFinitePolicy, TensorMap};
use crate::engine::{Collectives, Cpu, Pipeline, PipelineConfig, SplitData, Trainer, TrainerConfig};
use crate::schedules::{validate, Schedule};
use progress::{summary, CliObserver};

/// Environment variable that injects a failure: `stage:2,action:7,kind:panic|error|stall|hang|nan[,step:5]`.
pub const FAIL_AT_ENV: &str = "BATON_FAIL_AT";

/// Environment variable that overrides the memory the check believes available, bytes (for tests).
pub const MEM_AVAILABLE_ENV: &str = "BATON_MEM_AVAILABLE";

/// Exit status after SIGINT (128 + 2), as shells report an interrupted command.
pub const EXIT_SIGINT: u8 = 130;
/// Exit status after SIGTERM (128 + 15).
pub const EXIT_SIGTERM: u8 = 143;

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
    /// The memory estimate (set once the data is known).
    estimate: Option<MemoryEstimate>,
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
    let m = schedule.microbatches as usize * c.data_parallel.max(1) as usize;
    if c.batch % m != 0 {
        return Err(CliError::usage(format!(
            "--batch {}: the schedule in {} has {} micro-batches{}, which must divide the batch",
            c.batch,
            path.display(),
            schedule.microbatches,
            if c.data_parallel > 1 {
                format!(" per replica × {} replicas", c.data_parallel)
            } else {
                String::new()
            }
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
        Some("latest") => {
            for (dir, why) in checkpoint::skipped_newer(ckpt_root).map_err(engine_err)? {
                eprintln!(
                    "warning: skipping {} (newer than the latest complete checkpoint): {why}",
                    dir.display()
                );
            }
            Some(checkpoint::load(ckpt_root).map_err(|e| {
                CliError::failure(format!(
                    "{e} (pass --resume DIR to continue from an older checkpoint under {})",
                    ckpt_root.display()
                ))
            })?)
        }
        Some(dir) => Some(checkpoint::load(Path::new(dir)).map_err(engine_err)?),
    };
    // Printed once every flag is checked (an error must stay the only line).
    let mut lr_warning = None;
    if let Some(ck) = &resume {
        let at = ck.manifest.step;
        if at >= c.steps {
            return Err(CliError::usage(format!(
                "--steps {}: {} is already at step {at}; nothing to train (give a --steps above {at} to continue; \
                 the checkpoint is left as it is)",
                c.steps,
                ck.dir.display()
            )));
        }
        if let Some(newer) = checkpoint::latest(ckpt_root)
            .map_err(engine_err)?
            .filter(|p| !p.ends_with(checkpoint::step_dir_name(at)) && *p != ck.dir)
        {
            let newer_step = checkpoint::load(&newer).map(|n| n.manifest.step).unwrap_or(u64::MAX);
            if newer_step > at {
                return Err(CliError::usage(format!(
                    "--resume {}: {} holds a newer checkpoint ({}); resuming the older one there would mix two runs \
                     (use --resume latest, or another --out)",
                    ck.dir.display(),
                    ckpt_root.display(),
                    newer.display()
                )));
            }
        }
        let saved_total = ck.manifest.options.optimizer.total_steps;
        if saved_total != c.steps {
            lr_warning = Some(format!(
                "warning: the checkpoint's run was {saved_total} steps; training to --steps {} changes the learning-rate \
                 schedule (warm-up and cosine decay now span {} steps) from step {at} on",
                c.steps, c.steps
            ));
        }
    }
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
        None => {
            let s = pcfg.generate_schedule().map_err(|e| CliError::usage(e.to_string()))?;
            if c.split.is_none() {
                parts_fit(&pcfg)?;
            }
            s
        }
    };
    if let Some(w) = lr_warning {
        eprintln!("{w}");
    }
    Ok(Setup {
        tokenizer,
        pcfg,
        schedule,
        init,
        resume,
        estimate: None,
    })
}

/// `--dry-run`: the resolved configuration, split, schedule, simulated step and memory estimate.
fn dry_run(
    c: &TrainConfig,
    setup: &Setup,
    est: &MemoryEstimate,
    available: Option<u64>,
    out: &Path,
) -> Result<(), CliError> {
    use crate::schedules::{simulate, to_text, Costs};
    let model = crate::engine::Gpt2::new(setup.pcfg.model.clone(), setup.pcfg.seed).map_err(engine_err)?;
    let parts = setup.schedule.placement.num_parts();
    let ranges = setup
        .pcfg
        .split
        .resolve::<Cpu>(&model, parts as usize)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let m = &setup.pcfg.model;
    let mut text = String::new();
    let _ = std::fmt::Write::write_fmt(
        &mut text,
        format_args!(
            "configuration (defaults < --config file < flags):\n{}\n",
            toml::to_string(c).unwrap_or_default()
        ),
    );
    text.push_str(&format!(
        "model: GPT-2, {} parameters ({} layers, d_model {}, {} heads, context {}, vocabulary {} ({}))\n",
        m.num_params(),
        m.layers,
        m.d_model,
        m.heads,
        c.seq,
        m.vocab_size,
        setup.tokenizer.name()
    ));
    text.push_str("split (units: 0 embedding, 1..=L blocks, L+1 head):\n");
    for (part, r) in ranges.iter().enumerate() {
        let holder = (0..setup.schedule.stages())
            .flat_map(|s| (0..setup.schedule.chunks()).map(move |ch| (s, ch)))
            .find(|&(s, ch)| setup.schedule.placement.part(s, ch) == Some(part as u32));
        let names: Vec<String> = r
            .clone()
            .map(|u| crate::engine::Model::<Cpu>::unit_name(&model, u))
            .collect();
        text.push_str(&format!(
            "  part {part}: units {}..{} ({}){}\n",
            r.start,
            r.end,
            names.join(", "),
            holder.map_or(String::new(), |(s, ch)| format!(" on stage {s}, chunk {ch}"))
        ));
    }
    // One step with F = 1, B = 2, I = W = 1 per block-equivalent part: the shape of the step, not its time.
    let costs = Costs::uniform(parts, 1.0, 2.0, 1.0, 1.0, 0.0);
    if let Ok(sim) = simulate(&setup.schedule, &costs) {
        text.push_str(&format!(
            "schedule: simulated step (F = 1, B = 2, I = W = 1 per part):\n{}",
            to_text(&setup.schedule, &sim)
        ));
    }
    text.push_str(&format!(
        "memory estimate: {} in all — parameters {}, gradients {}, AdamW moments {}, stashed activations {} (per \
         stage: {}), receive buffers {}, scratch {}, data {}, checkpoint snapshot {}, process {}\n",
        memory::human_bytes(est.total_bytes()),
        memory::human_bytes(est.params_bytes),
        memory::human_bytes(est.grads_bytes),
        memory::human_bytes(est.adam_bytes),
        memory::human_bytes(est.stash_bytes.iter().sum()),
        est.stash_bytes
            .iter()
            .map(|b| memory::human_bytes(*b))
            .collect::<Vec<_>>()
            .join(", "),
        memory::human_bytes(est.receive_bytes.iter().sum()),
        memory::human_bytes(est.scratch_bytes),
        memory::human_bytes(est.data_bytes),
        memory::human_bytes(est.checkpoint_bytes),
        memory::human_bytes(est.base_bytes),
    ));
    text.push_str(&match available {
        Some(a) if est.total_bytes() > a => format!(
            "available memory: {} — this run would be refused\n",
            memory::human_bytes(a)
        ),
        Some(a) => format!("available memory: {} — fits\n", memory::human_bytes(a)),
        None => "available memory: unknown\n".into(),
    });
    text.push_str(&format!(
        "output: {} (nothing was written; drop --dry-run to train)\n",
        out.display()
    ));
    super::write_output(None, &text)
}

/// Refuses a generated schedule whose parts (stages × chunks) outnumber the model's units, saying what would fit.
fn parts_fit(p: &PipelineConfig) -> Result<(), CliError> {
    let parts = p.stages as usize * p.chunks as usize;
    let units = p.model.num_units();
    if parts <= units {
        return Ok(());
    }
    let per_stage = if p.chunks > 1 {
        format!("{} needs {} parts per stage: ", p.schedule.name(), p.chunks)
    } else {
        String::new()
    };
    let fit_stages = units / p.chunks as usize;
    let stages_hint = if fit_stages >= 1 {
        format!(" or --stages {fit_stages}")
    } else {
        String::new()
    };
    Err(CliError::usage(format!(
        "{per_stage}{parts} parts for {} stages; the model has {units} units (embedding, {} blocks, head): \
         use --layers {}{stages_hint}",
        p.stages,
        p.model.layers,
        parts - 2
    )))
}

/// Checks a `BATON_FAIL_AT` value against the schedule: its numbers fit their types (no wrap-around), the stage
/// and action exist, the step is one this run takes.
fn check_fail_at(text: &str, fail: &FailurePoint, schedule: &Schedule, steps: u64) -> Result<(), CliError> {
    for field in text.split(',') {
        if let Some((key, value)) = field.split_once(':') {
            let key = key.trim();
            if matches!(key, "stage" | "action") && value.trim().parse::<u32>().is_err() {
                return Err(CliError::usage(format!(
                    "{FAIL_AT_ENV}: {key} = `{}` is out of range",
                    value.trim()
                )));
            }
        }
    }
    let stages = schedule.stages();
    if fail.stage >= stages {
        return Err(CliError::usage(format!(
            "{FAIL_AT_ENV}: stage {} does not exist; the schedule has stages 0..={}",
            fail.stage,
            stages - 1
        )));
    }
    let actions = schedule.actions[fail.stage as usize].len();
    if fail.action >= actions {
        return Err(CliError::usage(format!(
            "{FAIL_AT_ENV}: stage {} has actions 0..={} per step; action {} does not exist",
            fail.stage,
            actions.saturating_sub(1),
            fail.action
        )));
    }
    if let Some(step) = fail.step.filter(|&s| s == 0 || s > steps) {
        return Err(CliError::usage(format!(
            "{FAIL_AT_ENV}: step {step} is not one of this run's steps 1..={steps}"
        )));
    }
    Ok(())
}

/// The memory the configuration needs, from the schedule and split, before anything is allocated.
fn estimate(c: &TrainConfig, setup: &Setup, data_tokens: usize) -> Result<MemoryEstimate, CliError> {
    let model = crate::engine::Gpt2::new(setup.pcfg.model.clone(), setup.pcfg.seed).map_err(engine_err)?;
    let parts = setup.schedule.placement.num_parts() as usize;
    let ranges = setup
        .pcfg
        .split
        .resolve::<Cpu>(&model, parts)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let d = c.data_parallel.max(1);
    let mb_seqs = c.batch / (setup.schedule.microbatches.max(1) * d) as usize;
    Ok(memory::estimate_gpt2(
        &setup.pcfg.model,
        &setup.schedule,
        &ranges,
        mb_seqs,
        c.seq,
        memory::StashPolicy {
            recompute: c.recompute,
            batch_weight_grads: c.batch_weight_grads,
        },
        data_tokens,
    )
    .replicated(u64::from(d), c.zero == 1, !c.no_overlap))
}

/// The memory a run may use: [`MEM_AVAILABLE_ENV`] if set, else what the machine says.
fn available_memory() -> Option<u64> {
    std::env::var(MEM_AVAILABLE_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .or_else(memory::available_bytes)
}

/// The resolved run, for `--dry-run` and `config.json`.
fn resolved_json(
    c: &TrainConfig,
    pcfg: &PipelineConfig,
    schedule: &Schedule,
    tokenizer: &str,
    est: &MemoryEstimate,
    ranges: &[std::ops::Range<usize>],
) -> serde_json::Value {
    serde_json::json!({
        "config": c,
        "model": pcfg.model,
        "params": pcfg.model.num_params(),
        "schedule": {
            "kind": schedule.kind.name(),
            "stages": schedule.stages(),
            "microbatches": schedule.microbatches,
            "chunks": schedule.chunks(),
        },
        "split": ranges.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
        "memory_estimate": est,
        "memory_estimate_bytes": est.total_bytes(),
        "tokenizer": tokenizer,
    })
}

/// The command that resumes this run: the same arguments with `--resume latest` (and `--steps steps` when given).
pub(crate) fn resume_command(steps: Option<u64>) -> String {
    let mut out = vec!["baton".to_string()];
    let mut args = std::env::args().skip(1).peekable();
    while let Some(a) = args.next() {
        if a == "--resume" || (steps.is_some() && a == "--steps") {
            args.next();
            continue;
        }
        if a.starts_with("--resume=") || a == "--dry-run" || (steps.is_some() && a.starts_with("--steps=")) {
            continue;
        }
        out.push(
            if a.is_empty() || a.contains(|ch: char| ch.is_whitespace() || ch == '"' || ch == '\'') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            },
        );
    }
    out.push("--resume".into());
    out.push("latest".into());
    if let Some(n) = steps {
        out.push("--steps".into());
        out.push(n.to_string());
    }
    out.join(" ")
}

/// Runs `baton train`.
pub fn run(args: &TrainArgs) -> Result<(), CliError> {
    let mut c = args.resolve()?;
    set_cpu_threads(&c)?;
    // Under mpirun / srun: this process runs its rank's workers (see `dist`).
    let dist = dist::detect(&c)?;
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
    let fail_text = std::env::var(FAIL_AT_ENV).ok();
    let fail_at: Option<FailurePoint> = match &fail_text {
        Some(text) => Some(
            text.parse()
                .map_err(|e: crate::engine::EngineError| CliError::usage(format!("{FAIL_AT_ENV}: {e}")))?,
        ),
        None => None,
    };
    // `--plan auto` chooses the schedule, micro-batches, chunks, recomputation and split before they are read.
    let given = [
        ("--schedule", args.schedule.is_some()),
        ("--microbatches", args.microbatches.is_some()),
        ("--chunks", args.chunks.is_some()),
        ("--split", args.split.is_some()),
        ("--recompute", args.recompute),
    ];
    let mut planned = super::plan::plan_for_train(&mut c, &given, &device, &out)?;
    let mut setup = setup(args, &mut c, &ckpt_root)?;
    if let Some(p) = &planned {
        setup.schedule = p.schedule().clone();
    } else if c.memory_budget.is_some() {
        super::plan::check_budget(&c, &setup.pcfg, &setup.schedule)?;
    }
    if let (Some(text), Some(fail)) = (&fail_text, &fail_at) {
        check_fail_at(text, fail, &setup.schedule, c.steps)?;
    }
    validate(&setup.schedule).map_err(|e| CliError::usage(e.to_string()))?;
    let tokens = match &c.data {
        Some(path) => load_tokens(path, &setup.tokenizer).map_err(engine_err)?,
        None => setup.tokenizer.encode(default_corpus()),
    };
    let token_count = tokens.len();
    let est = estimate(&c, &setup, token_count)?.with_process_now();
    let available = available_memory();
    if let Some(p) = &planned {
        eprintln!("plan: {}", super::plan::choice_line(p));
        eprintln!("plan: {}", super::plan::runner_up_line(p));
    }
    if args.dry_run {
        return dry_run(&c, &setup, &est, available, &out);
    }
    if let Some(avail) = available.filter(|&a| est.total_bytes() > a) {
        return Err(CliError::failure(format!(
            "this configuration needs about {} ({} parameters, gradients and AdamW state, {} stashed activations, \
             {} receive buffers, {} scratch); the machine has {} available: use a smaller --batch, --seq, \
             --d-model or --layers, more --microbatches, or --recompute (see --dry-run)",
            memory::human_bytes(est.total_bytes()),
            memory::human_bytes(est.params_bytes + est.grads_bytes + est.adam_bytes),
            memory::human_bytes(est.stash_bytes.iter().sum()),
            memory::human_bytes(est.receive_bytes.iter().sum()),
            memory::human_bytes(est.scratch_bytes),
            memory::human_bytes(avail)
        )));
    }
    let split = Split::new(&tokens, Split::DEFAULT_VAL_FRACTION, c.batch, c.seq).map_err(engine_err)?;
    drop(tokens);
    if let Some(p) = planned.as_mut() {
        p.store_profiles()?;
    }
    let setup = Setup {
        estimate: Some(est),
        ..setup
    };
    let result = match device {
        Device::Cpu => {
            let names = vec!["cpu".to_string(); (c.stages * c.data_parallel) as usize];
            train_on(
                &c,
                setup,
                split,
                token_count,
                &out,
                fail_at,
                &names,
                None,
                dist.as_ref(),
                &|| Ok(vec![Cpu; (c.stages * c.data_parallel) as usize]),
            )
        }
        Device::Cuda(count) if dist.is_some() => match dist.as_ref().map(|d| dist::cuda_for_rank(d, count)) {
            // Every worker of this rank on its GPU (its local rank's); NCCL between ranks where each has its own.
            Some(Ok(gpu)) => {
                let workers = (c.stages * c.data_parallel) as usize;
                let names = vec![format!("cuda:{gpu}"); workers];
                train_on(
                    &c,
                    setup,
                    split,
                    token_count,
                    &out,
                    fail_at,
                    &names,
                    None,
                    dist.as_ref(),
                    &|| (0..workers).map(|_| Cuda::with_precision(gpu, precision)).collect(),
                )
            }
            Some(Err(e)) => Err(e),
            None => Err(CliError::failure("a multi-rank run without its MPI world")),
        },
        Device::Cuda(count) => {
            let make = || -> crate::engine::Result<Vec<Cuda>> {
                // Workers (replica-major) round-robin over the GPUs; workers sharing a GPU get a stream each.
                (0..(c.stages * c.data_parallel) as usize)
                    .map(|w| Cuda::with_precision(w % count, precision))
                    .collect()
            };
            let names: Vec<String> = (0..(c.stages * c.data_parallel) as usize)
                .map(|w| format!("cuda:{}", w % count))
                .collect();
            // Replicas spread over several GPUs reduce through NCCL (communicators created once, in worker order;
            // the sums still taken in replica order); on one GPU the device copies of the local groups do.
            let wanted = c.data_parallel > 1 && count > 1;
            let nccl = wanted
                && match crate::engine::comm::nccl_available() {
                    Ok(()) => true,
                    Err(why) => {
                        eprintln!("warning: {why}; the replicas reduce through device copies instead of NCCL");
                        false
                    }
                };
            let collectives: Option<CollectivesFor<Cuda>> = nccl.then(|| {
                let f: CollectivesFor<Cuda> = |w| Ok(Arc::new(crate::engine::comm::NcclCollectives::over(w.clone())?));
                f
            });
            train_on(
                &c,
                setup,
                split,
                token_count,
                &out,
                fail_at,
                &names,
                collectives,
                None,
                &make,
            )
        }
    };
    #[cfg(feature = "mpi")]
    if let (Some(d), Err(e)) = (&dist, &result) {
        // A failed rank ends the job at once: finalising MPI would wait for the rank that was lost or stalled.
        eprintln!("baton: rank {}: {}", d.rank(), e.message);
        d.world.exit_now(i32::from(e.code));
    }
    if let (Ok(()), Some(p)) = (&result, &planned) {
        if let Some(line) = super::plan::predicted_vs_measured(p, &out.join("metrics.jsonl")) {
            eprintln!("{line}");
        }
    }
    result
}

/// Which stage of which replica runs where, one line per replica (worker `r·p + s` on `devices[r·p + s]`).
fn device_map(c: &TrainConfig, devices: &[String]) -> String {
    let p = c.stages as usize;
    let mut out =
        format!(
        "data parallel: {} replicas × {} stages, {} sequences per replica in {} micro-batches, gradients summed in \
         replica order ({}{}, buckets of {} MiB{}{}){}",
        c.data_parallel,
        p,
        c.batch / c.data_parallel as usize,
        c.microbatches,
        if c.no_overlap { "after the schedule" } else { "overlapped with the schedule" },
        if c.zero == 1 { ", ZeRO-1" } else { "" },
        c.bucket_mib,
        if c.compress == "none" { String::new() } else { format!(", compressed: {}", c.compress) },
        if c.sync == "bsp" { String::new() } else { format!(", synchronised by {}", c.sync) },
        "\ndevice map:"
    );
    for (r, workers) in devices.chunks(p.max(1)).enumerate() {
        let stages: Vec<String> = workers
            .iter()
            .enumerate()
            .map(|(s, d)| format!("stage {s} → {d}"))
            .collect();
        out.push_str(&format!("\n  replica {r}: {}", stages.join(", ")));
    }
    out
}

/// Makes the collectives over a pipeline's workers (a plain function: the trainer builds a pipeline again after
/// a failure).
type CollectivesFor<B> = fn(&crate::engine::comm::Workers<B>) -> crate::engine::Result<Arc<dyn Collectives<B>>>;

/// Where a run trains.
pub(crate) enum Device {
    /// The CPU backend.
    Cpu,
    /// CUDA with this many GPUs.
    Cuda(usize),
}

/// `cpu`, `cuda` (an error without a GPU) or `auto` (CUDA when a GPU is present).
pub(crate) fn device(name: &str) -> Result<Device, CliError> {
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

/// SIGINT and SIGTERM: the first sets the stop flag (and records which signal came), a second while the flag is
/// set exits at once with the conventional status.
fn install_signal_handlers() -> Result<(Arc<AtomicBool>, Arc<AtomicUsize>), CliError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let which = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM] {
        let status = if sig == SIGINT { EXIT_SIGINT } else { EXIT_SIGTERM };
        // Registered first, so it sees the flag as the earlier signal left it: set means "second signal".
        signal_hook::flag::register_conditional_shutdown(sig, i32::from(status), Arc::clone(&stop))
            .and_then(|_| signal_hook::flag::register_usize(sig, Arc::clone(&which), sig as usize))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(&stop)))
            .map_err(|e| CliError::failure(format!("installing the signal handlers: {e}")))?;
    }
    Ok((stop, which))
}

/// The run on backend `B` (`make` builds one backend per stage, again after a restart).
fn train_on<B: Backend>(
    c: &TrainConfig,
    setup: Setup,
    split: Split,
    token_count: usize,
    out: &Path,
    fail_at: Option<FailurePoint>,
    devices: &[String],
    collectives: Option<CollectivesFor<B>>,
    dist: Option<&dist::Dist>,
    make: &dyn Fn() -> crate::engine::Result<Vec<B>>,
) -> Result<(), CliError> {
    let model = Arc::new(setup.pcfg.gpt2().map_err(engine_err)?);
    #[cfg_attr(not(feature = "mpi"), allow(unused_mut))]
    let mut options = setup.pcfg.options();
    #[cfg(feature = "mpi")]
    if let Some(d) = dist {
        // Across processes a stage waiting on a lost or stalled rank gives up with the collectives' deadline.
        options.recv_timeout_ms = options.recv_timeout_ms.min(d.timeout.as_millis().max(1) as u64);
    }
    let build = || {
        let builder = Pipeline::builder(model.clone())
            .schedule(setup.schedule.clone())
            .split(setup.pcfg.split.clone())
            .options(options.clone())
            .data_parallel(setup.pcfg.data_parallel.clone());
        let builder = match collectives {
            Some(make) => builder.collectives_for(make),
            None => builder,
        };
        #[cfg(feature = "mpi")]
        let builder = match dist {
            Some(d) => builder
                .hosting(d.hosting(&setup.schedule))
                .collectives_for(d.collectives()),
            None => builder,
        };
        builder.build(make()?)
    };
    let rank0 = rank_of(dist) == 0;
    let tcfg = TrainerConfig {
        steps: c.steps,
        stop_at: c.stop_at,
        eval_every: c.eval_every,
        eval_batches: c.eval_batches,
        checkpoint_dir: Some(out.join("checkpoints")),
        save_every: c.save_every,
        keep_last: c.keep_last,
        // Across processes a failure ends the job: every rank would have to rebuild together (`baton launch`
        // restarts it from the last checkpoint).
        max_restarts: if dist.is_some() { 0 } else { c.max_restarts },
        trace_steps: if c.trace { c.trace_steps } else { 0 },
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
    let (stop, which_signal) = install_signal_handlers()?;
    trainer.set_stop_flag(Arc::clone(&stop));
    #[cfg(feature = "mpi")]
    let rank_map = dist.map(|d| d.describe()).transpose()?;
    #[cfg(not(feature = "mpi"))]
    let rank_map: Option<String> = None;
    if !rank0 {
        // Every rank but 0 trains without a word: rank 0 prints, writes the metrics, the report and the
        // checkpoints' manifests (each rank writes its own stages' files).
        let run = trainer.run(&mut data, &mut Quiet).map_err(engine_err)?;
        if run.interrupted {
            return Err(CliError {
                message: format!("interrupted at step {}", run.step),
                code: EXIT_SIGTERM,
            });
        }
        return Ok(());
    }

    std::fs::create_dir_all(out).map_err(|e| CliError::failure(format!("creating {}: {e}", out.display())))?;
    let ranges = trainer.pipeline().ranges().to_vec();
    if let Some(est) = &setup.estimate {
        let config_path = out.join(CONFIG_FILE);
        let mut doc = resolved_json(c, &setup.pcfg, &setup.schedule, setup.tokenizer.name(), est, &ranges);
        doc["started_unix_s"] = serde_json::json!(crate::engine::trainer::unix_time_s());
        doc["resumed_from"] = serde_json::json!(setup.resume.as_ref().map(|ck| ck.dir.display().to_string()));
        let text = serde_json::to_string_pretty(&doc).map_err(|e| CliError::failure(e.to_string()))? + "\n";
        super::write_output(Some(&config_path), &text).map_err(|e| CliError::failure(e.message))?;
    }
    let metrics_path = out.join("metrics.jsonl");
    if let Some(ck) = &setup.resume {
        trim_metrics(&metrics_path, ck.manifest.step)?;
    }
    let metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(setup.resume.is_some())
        .write(true)
        .truncate(setup.resume.is_none())
        .open(&metrics_path)
        .map_err(|e| CliError::failure(format!("{}: {e}", metrics_path.display())))?;
    let tensorboard = if c.tensorboard {
        let dir = out.join("tensorboard");
        Some(
            crate::cli::tensorboard::EventWriter::create(&dir)
                .map_err(|e| CliError::failure(format!("{}: {e}", dir.display())))?,
        )
    } else {
        None
    };
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
        c.batch / (c.microbatches * c.data_parallel) as usize,
        token_count,
        split.train().len(),
        split.val().len(),
        setup.tokenizer.name(),
        setup.resume.as_ref().map_or(String::new(), |ck| format!(", resuming {} at step {}", ck.dir.display(), ck.manifest.step))
    );
    if c.data_parallel > 1 {
        eprintln!("{}", device_map(c, devices));
    }
    if let Some(map) = &rank_map {
        eprintln!("{map}");
    }
    if c.trace {
        let first = trainer.pipeline().step() + 1;
        eprintln!(
            "trace: steps {first}..={} (--trace-steps {}) go to {}",
            (first + c.trace_steps - 1).min(c.steps),
            c.trace_steps,
            out.join("trace.json").display()
        );
    }
    let mut observer = CliObserver::new(
        c,
        setup.schedule.stages() as usize,
        BufWriter::new(metrics_file),
        tensorboard,
    );
    let result = trainer.run(&mut data, &mut observer);
    observer.finish();
    observer
        .metrics
        .flush()
        .map_err(|e| CliError::failure(format!("writing metrics.jsonl: {e}")))?;
    if let Some(tb) = observer.tensorboard.as_mut() {
        tb.flush()
            .map_err(|e| CliError::failure(format!("writing TensorBoard events: {e}")))?;
    }
    if let Some(e) = observer.error.take() {
        return Err(e);
    }
    let run = result.map_err(engine_err)?;
    if let Some(trace) = &observer.trace {
        let path = out.join("trace.json");
        super::write_output(Some(&path), &trace.to_json()).map_err(|e| CliError::failure(e.message))?;
    }
    if let Some(report) = &run.last {
        let svg = progress::measured_timeline_svg(trainer.pipeline(), report);
        super::write_output(Some(&out.join(crate::cli::report::TIMELINE_FILE)), &svg)
            .map_err(|e| CliError::failure(e.message))?;
    }
    let report_paths = crate::cli::report::write_report(out);
    let peak_rss = memory::peak_rss_bytes();
    summary(&progress::SummaryInputs {
        c,
        out,
        model: &setup.pcfg.model,
        pipeline: trainer.pipeline(),
        run: &run,
        report_html: report_paths.as_ref().ok().map(|(html, _)| html.clone()),
        report_error: report_paths.as_ref().err().map(|e| e.message.clone()),
        estimate: setup.estimate.as_ref(),
        peak_rss,
        resume_command: &resume_command(None),
        continue_command: &resume_command(Some(c.steps * 2)),
        trace: c.trace.then(|| out.join("trace.json")),
        metrics: &metrics_path,
    });
    if run.interrupted {
        let sig = which_signal.load(Ordering::SeqCst);
        let (name, code) = if sig == signal_hook::consts::SIGTERM as usize {
            ("SIGTERM", EXIT_SIGTERM)
        } else {
            ("SIGINT", EXIT_SIGINT)
        };
        return Err(CliError {
            message: format!(
                "interrupted by {name} at step {}; the checkpoint above is complete: resume with `{}`",
                run.step,
                resume_command(None)
            ),
            code,
        });
    }
    Ok(())
}

/// Before a resumed run appends to `metrics.jsonl`: keeps the lines of steps up to the checkpoint's `step` and
/// drops the rest — the steps after it, which the resumed run takes again (bitwise the same), and a last line a
/// killed run left half written — replacing the file atomically.
fn trim_metrics(path: &Path, step: u64) -> Result<(), CliError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // nothing written yet
    };
    let keep: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().is_some_and(|v| {
                v.get("step")
                    .and_then(serde_json::Value::as_u64)
                    .is_none_or(|s| s <= step)
            })
        })
        .collect();
    if keep.len() == text.lines().count() && text.ends_with('\n') || text.is_empty() {
        return Ok(());
    }
    let mut out = keep.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    super::write_output(Some(path), &out).map_err(|e| CliError::failure(e.message))
}

/// This process's rank (0 in a single-process run).
fn rank_of(dist: Option<&dist::Dist>) -> usize {
    #[cfg(feature = "mpi")]
    return dist.map_or(0, dist::Dist::rank);
    #[cfg(not(feature = "mpi"))]
    return dist.map_or(0, |d| match *d {});
}

/// The observer of ranks other than 0: nothing to show.
struct Quiet;

impl crate::engine::Observer for Quiet {}

/// The configuration file every run writes at its start.
pub const CONFIG_FILE: &str = "config.json";

/// Checks `--threads` and `--stage-threads` and sets the CPU pools to them.
pub(crate) fn set_cpu_threads(c: &TrainConfig) -> Result<(), CliError> {
    for (flag, n) in [("--threads", c.threads), ("--stage-threads", c.stage_threads)] {
        if n > crate::kernels::fast::THREADS_MAX {
            return Err(CliError::usage(format!(
                "{flag} {n}: at most {}",
                crate::kernels::fast::THREADS_MAX
            )));
        }
    }
    if c.threads > 0 {
        crate::kernels::fast::set_threads(c.threads);
    }
    crate::kernels::fast::set_stage_threads(c.stage_threads);
    Ok(())
}
