//! `baton plan` and `baton train --plan auto`: profile the model's units on the chosen device (cached), then let
//! the planner ([`crate::schedules::plan`]) choose the split, schedule, micro-batch count, chunks and
//! recomputation that minimise the simulated step time under a per-stage memory budget; print the choice, its
//! prediction, the runner-up and why it lost, and draw its timeline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use super::train::{Device, TrainConfig};
use super::CliError;
use crate::engine::backend::{Cuda, Precision};
use crate::engine::data::Tokenizer;
use crate::engine::memory::{gpt2_unit_bytes, human_bytes};
use crate::engine::profile::{self, ModelProfile, ProfileKey, ProfileOptions};
use crate::engine::{Cpu, Gpt2, GptConfig, Model, PipelineConfig};
use crate::schedules::{
    plan, stage_memory, to_svg, LostBy, MemoryModel, Outcome, Plan, PlanInput, PlanSpace, Schedule, ScheduleKind,
    SearchLimits, ShapeProfile, UnitProfile, MICROBATCHES_MAX,
};

/// Most micro-batch counts one plan considers (each is profiled).
pub const PLAN_MICROBATCH_COUNTS_MAX: usize = 16;

/// Most stage counts one `baton plan --stages` list may hold.
pub const PLAN_STAGE_COUNTS_MAX: usize = 8;

/// The schedule families `--plan auto` and `baton plan` consider by default: every one that trains bitwise like
/// an unpipelined run (PipeDream-2BW's stale weights change the arithmetic: ask for it with `--schedules`).
pub const PLAN_SCHEDULES_DEFAULT: &str = "gpipe,1f1b,interleaved,zb-h1,zb-v";

/// Arguments of `baton plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// TOML file of `baton train` settings (the model, batch, stages, device, budget and threads are read from it).
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Tokenizer (sets the vocabulary): bytes or gpt2.
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
    /// Sequences per step (global, with --data-parallel).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Pipeline stages, or a list (`2,4`): one plan each.
    #[arg(long, value_name = "P[,P...]")]
    pub stages: Option<String>,
    /// Memory per stage (device): bytes, or with a unit (`2GiB`, `512MiB`, `1.5GB`; K/M/G/T are binary).
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// Device: cpu, cuda or auto.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU compute threads shared by all stages (0: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// CPU threads of each stage's own pool (0: shared); the profile is then taken with that many threads.
    #[arg(long, value_name = "N")]
    pub stage_threads: Option<usize>,
    /// Data-parallel replicas (the budget is per device; ZeRO-1 shards the optimizer state over them).
    #[arg(long, value_name = "D")]
    pub data_parallel: Option<u32>,
    /// ZeRO stage: 0 or 1.
    #[arg(long, value_name = "0|1")]
    pub zero: Option<u32>,
    /// Micro-batch counts to consider (default: every divisor of the batch per replica).
    #[arg(long, value_name = "M[,M...]")]
    pub microbatches: Option<String>,
    /// Schedule families to consider (`all` adds 2bw, whose stale weights change the arithmetic).
    #[arg(long, value_name = "LIST", default_value = PLAN_SCHEDULES_DEFAULT)]
    pub schedules: String,
    /// Recomputation settings to consider: off, on or both.
    #[arg(long, value_name = "off|on|both", default_value = "both")]
    pub recompute: String,
    /// Write the chosen plan's SVG timeline here (default: `<out>/plan.svg` when --out is given).
    #[arg(long, value_name = "FILE.svg")]
    pub svg: Option<PathBuf>,
    /// Directory for the SVG and the profile cache.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Directory of cached profiles (default: --out; without either nothing is cached).
    #[arg(long, value_name = "DIR")]
    pub profile_cache: Option<PathBuf>,
    /// Print every candidate the planner considered.
    #[arg(long)]
    pub candidates: bool,
    /// Scale on paper: GPU counts (`8,64`) whose every data-parallel × pipeline layout of --model is predicted.
    #[arg(long, value_name = "N[,N...]")]
    pub gpus: Option<String>,
    /// With --gpus: the model shape, gpt2-124m, gpt2-1.5b or gpt2-7b.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// With --gpus: GPUs per node (pipelines stay inside a node while they fit).
    #[arg(long, value_name = "G", default_value_t = crate::schedules::GPUS_PER_NODE_DEFAULT)]
    pub gpus_per_node: u32,
    /// With --gpus: layouts printed per GPU count.
    #[arg(long, value_name = "K", default_value_t = super::plan_scale::SCALE_TOP_DEFAULT)]
    pub top: usize,
    /// With --gpus: reduce gradients only after the pipeline flush (default: overlapped with the backward).
    #[arg(long)]
    pub no_overlap: bool,
}

/// What the planner is to consider besides the training configuration.
pub(crate) struct PlanChoices {
    /// Micro-batch counts (`None`: every divisor of the batch per replica).
    pub microbatches: Option<Vec<u32>>,
    /// Schedule families.
    pub kinds: Vec<ScheduleKind>,
    /// Recomputation settings.
    pub recompute: Vec<bool>,
    /// Where profiles are cached (`None`: nowhere).
    pub cache: Option<PathBuf>,
}

/// A plan and what it was made from.
pub(crate) struct Planned {
    /// The planner's answer.
    pub plan: Plan,
    /// The profile of each micro-batch count considered, whether it came from the cache, and its cache file.
    pub profiles: Vec<(ModelProfile, bool, Option<PathBuf>)>,
    /// Unit names in pipeline order.
    pub unit_names: Vec<String>,
    /// The per-stage budget, bytes (`None`: none).
    pub budget: Option<u64>,
    /// Seconds spent profiling (0 when every profile was cached).
    pub profile_s: f64,
    /// Where the profiles are cached (`None`: nowhere).
    pub cache: Option<PathBuf>,
}

impl Planned {
    /// The schedule the plan trains with.
    pub fn schedule(&self) -> &Schedule {
        &self.plan.best.evaluation.schedule
    }

    /// `0..3,3..6`: the split as `--split` takes it.
    pub fn split_text(&self) -> String {
        self.plan
            .best
            .ranges
            .iter()
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Writes every profile measured in this run to its cache file (once the run goes ahead: a failing plan or
    /// a dry run leaves nothing behind).
    pub fn store_profiles(&mut self) -> Result<(), CliError> {
        let Some(dir) = self.cache.clone() else {
            return Ok(());
        };
        for (p, cached, path) in &mut self.profiles {
            if !*cached && path.is_none() {
                *path = Some(profile::store(&dir, p).map_err(|e| CliError::failure(e.to_string()))?);
            }
        }
        Ok(())
    }
}

/// Parses a size: bytes, or a number with a unit (B, KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB and K/M/G/T binary).
pub(crate) fn parse_bytes(flag: &str, text: &str) -> Result<u64, CliError> {
    let bad = || {
        CliError::usage(format!(
            "{flag} `{text}`: expected a size such as 2GiB, 512MiB, 1.5GB or 1000000 (bytes), above 0"
        ))
    };
    let t = text.trim();
    let split = t
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (value * scale).floor();
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses a comma-separated list of positive numbers.
fn parse_list(flag: &str, text: &str, max: usize) -> Result<Vec<u32>, CliError> {
    let values: Vec<u32> = text
        .split(',')
        .map(|v| v.trim().parse::<u32>().ok().filter(|&v| v > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| CliError::usage(format!("{flag} `{text}`: expected positive whole numbers such as 2,4")))?;
    if values.is_empty() || values.len() > max {
        return Err(CliError::usage(format!("{flag} `{text}`: give 1 to {max} values")));
    }
    Ok(values)
}

/// Parses `--schedules`: family names, or `all`.
pub(crate) fn parse_kinds(text: &str) -> Result<Vec<ScheduleKind>, CliError> {
    if text.trim() == "all" {
        return Ok(ScheduleKind::GENERATED.to_vec());
    }
    let mut kinds = Vec::new();
    for name in text.split(',').map(str::trim) {
        let kind = ScheduleKind::from_name(name).map_err(|e| CliError::usage(format!("--schedules: {e}")))?;
        if kind == ScheduleKind::Custom {
            return Err(CliError::usage(
                "--schedules: custom schedules are imported, not planned",
            ));
        }
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

/// Parses `--recompute off|on|both` for the planner.
fn parse_recompute(text: &str) -> Result<Vec<bool>, CliError> {
    match text {
        "off" => Ok(vec![false]),
        "on" => Ok(vec![true]),
        "both" => Ok(vec![false, true]),
        other => Err(CliError::usage(format!(
            "--recompute `{other}`: expected off, on or both"
        ))),
    }
}

/// The precision a CUDA run uses for `c.precision` (the CPU computes in f32).
fn cuda_precision(c: &TrainConfig) -> Precision {
    match c.precision.as_str() {
        "f32" | "fp32" => Precision::F32,
        _ => Precision::Bf16,
    }
}

/// The model a configuration describes, with the tokenizer's vocabulary.
pub(crate) fn model_of(c: &TrainConfig) -> Result<Gpt2, CliError> {
    let tokenizer = Tokenizer::from_name(&c.tokenizer).map_err(|e| CliError::usage(e.to_string()))?;
    let cfg = GptConfig {
        vocab_size: tokenizer.vocab_size(),
        max_seq: c.seq,
        layers: c.layers,
        d_model: c.d_model,
        heads: c.heads,
    };
    cfg.validate().map_err(|e| CliError::usage(e.to_string()))?;
    Gpt2::new(cfg, c.seed).map_err(|e| CliError::usage(e.to_string()))
}

/// Profiles `model` for micro-batches of `mb_seqs × seq` on `device` (or reads the cache).
pub(crate) fn profile_on(
    model: &Gpt2,
    device: &Device,
    c: &TrainConfig,
    mb_seqs: usize,
    cache: Option<&Path>,
) -> Result<(ModelProfile, bool), CliError> {
    let workers = (c.stages * c.data_parallel.max(1)) as usize;
    let fail = |e: crate::engine::EngineError| CliError::failure(format!("profiling the model: {e}"));
    let (backend, threads, concurrent) = match device {
        // Every stage thread shares the one pool: profile that many at once; with stage pools, one at a time on a
        // stage pool's threads.
        Device::Cpu if c.stage_threads > 0 => (format!("cpu ({} per stage)", c.stage_threads), c.stage_threads, 1),
        Device::Cpu => ("cpu".to_string(), crate::kernels::fast::threads(), workers as u32),
        Device::Cuda(count) => {
            let precision = cuda_precision(c);
            let name = format!("cuda:0 {}", if precision == Precision::Bf16 { "bf16" } else { "f32" });
            (name, 0, workers.div_ceil((*count).max(1)) as u32)
        }
    };
    let key = ProfileKey {
        model_kind: Model::<Cpu>::kind(model),
        model: Model::<Cpu>::describe(model),
        backend: backend.clone(),
        microbatch_seqs: mb_seqs,
        seq: c.seq,
        threads,
        concurrent,
    };
    if let Some(found) = cache.and_then(|dir| profile::load_cached(dir, &key)) {
        return Ok((found, true));
    }
    let options = ProfileOptions {
        concurrent,
        ..ProfileOptions::default()
    };
    let mut measured = match device {
        Device::Cpu => {
            let m: Arc<dyn Model<Cpu>> = Arc::new(model.clone());
            profile::profile(m, &|| Ok(Cpu), &backend, threads, mb_seqs, c.seq, &options).map_err(fail)?
        }
        Device::Cuda(_) => {
            let precision = cuda_precision(c);
            let m: Arc<dyn Model<Cuda>> = Arc::new(model.clone());
            profile::profile(
                m,
                &|| Cuda::with_precision(0, precision),
                &backend,
                threads,
                mb_seqs,
                c.seq,
                &options,
            )
            .map_err(fail)?
        }
    };
    if matches!(device, Device::Cpu) {
        // The CPU backend's scratch, as the memory estimate counts it.
        for (u, unit) in measured.units.iter_mut().enumerate() {
            unit.scratch_bytes = gpt2_unit_bytes(&model.config, u, mb_seqs, c.seq).2;
        }
    }
    Ok((measured, false))
}

/// Profiles the model of `c` for every micro-batch count and plans `c.stages` stages under `budget`.
pub(crate) fn plan_config(
    c: &TrainConfig,
    device: &Device,
    budget: Option<u64>,
    choices: &PlanChoices,
) -> Result<Planned, CliError> {
    if c.stages == 0 {
        return Err(CliError::usage("--stages must be >= 1"));
    }
    if c.batch == 0 {
        return Err(CliError::usage("--batch must be >= 1"));
    }
    let d = c.data_parallel.max(1) as usize;
    if c.batch % d != 0 {
        return Err(CliError::usage(format!(
            "--data-parallel {d} must divide --batch {}",
            c.batch
        )));
    }
    let per_replica = c.batch / d;
    let counts: Vec<u32> = match &choices.microbatches {
        Some(list) => {
            if let Some(m) = list.iter().find(|&&m| per_replica % m as usize != 0) {
                return Err(CliError::usage(format!(
                    "--microbatches {m} does not divide the batch of {per_replica} sequences per replica"
                )));
            }
            list.clone()
        }
        None => (1..=per_replica.min(MICROBATCHES_MAX as usize))
            .filter(|m| per_replica % m == 0)
            .map(|m| m as u32)
            .collect(),
    };
    if counts.len() > PLAN_MICROBATCH_COUNTS_MAX {
        return Err(CliError::usage(format!(
            "the batch of {per_replica} sequences per replica has {} divisors; the planner profiles at most \
             {PLAN_MICROBATCH_COUNTS_MAX} micro-batch counts: choose some with --microbatches",
            counts.len()
        )));
    }
    let model = model_of(c)?;
    let started = Instant::now();
    let mut profiles = Vec::with_capacity(counts.len());
    let mut shapes = Vec::with_capacity(counts.len());
    for &m in &counts {
        let mb_seqs = per_replica / m as usize;
        let (p, cached) = profile_on(&model, device, c, mb_seqs, choices.cache.as_deref())?;
        shapes.push(ShapeProfile {
            microbatches: m,
            units: p.units.clone(),
            latency: p.hop_latency_s,
        });
        profiles.push((p, cached, None));
    }
    let profile_s = if profiles.iter().all(|(_, cached, _)| *cached) {
        0.0
    } else {
        started.elapsed().as_secs_f64()
    };
    let input = PlanInput {
        stages: c.stages,
        shapes,
        memory: memory_model(c, budget),
        space: PlanSpace {
            kinds: choices.kinds.clone(),
            recompute: choices.recompute.clone(),
            ..PlanSpace::default()
        },
        limits: SearchLimits::default(),
    };
    let plan = plan(&input).map_err(|e| CliError::usage(e.to_string()))?;
    let unit_names = profiles
        .first()
        .map(|(p, _, _)| p.unit_names.clone())
        .unwrap_or_default();
    Ok(Planned {
        plan,
        profiles,
        unit_names,
        budget,
        profile_s,
        cache: choices.cache.clone(),
    })
}

/// How a stage's memory is counted for `c`: AdamW in fp32 (moments sharded over the replicas under ZeRO-1), and
/// with data parallelism and overlap a copy of each gradient held for the reducer.
fn memory_model(c: &TrainConfig, budget: Option<u64>) -> MemoryModel {
    let d = c.data_parallel.max(1);
    MemoryModel {
        budget_bytes: budget.unwrap_or(u64::MAX),
        grads_per_param: if d > 1 && !c.no_overlap { 2.0 } else { 1.0 },
        optimizer_per_param: 2.0,
        optimizer_shards: if c.zero == 1 { d } else { 1 },
        reserve_bytes: 0,
    }
}

/// GPT-2's units for one micro-batch of `mb_seqs × seq` on the CPU, bytes only (no times): parameters from the
/// configuration (the head holds its own copy of the tied `wte`), stashes and scratch as the memory estimate
/// counts them.
fn analytic_units(m: &GptConfig, mb_seqs: usize, seq: usize) -> Vec<UnitProfile> {
    let (v, t, c) = (m.vocab_size as u64, m.max_seq as u64, m.d_model as u64);
    let elem = crate::engine::memory::CPU_ELEM_BYTES as u64;
    let n = m.num_units();
    (0..n)
        .map(|u| {
            let params = if u == 0 {
                v * c + t * c
            } else if u + 1 < n {
                12 * c * c + 13 * c
            } else {
                2 * c + v * c
            };
            let (act, wstash, scratch) = gpt2_unit_bytes(m, u, mb_seqs, seq);
            UnitProfile {
                costs: [0.0; 4],
                activation_bytes: act,
                weight_stash_bytes: wstash,
                output_bytes: if u + 1 < n {
                    (mb_seqs * seq) as u64 * c * elem
                } else {
                    0
                },
                param_bytes: params * elem,
                scratch_bytes: scratch,
            }
        })
        .collect()
}

/// `--memory-budget` without `--plan`: refuses a layout one of whose stages needs more than the budget, naming
/// the stage and its bytes.
pub(crate) fn check_budget(c: &TrainConfig, pcfg: &PipelineConfig, schedule: &Schedule) -> Result<(), CliError> {
    if c.batch_weight_grads {
        return Err(CliError::usage(
            "--memory-budget does not model --batch-weight-grads yet (the planner's memory model frees each \
             micro-batch's weight-gradient stash at its own W): leave out one of them",
        ));
    }
    let Some(text) = c.memory_budget.as_deref() else {
        return Ok(());
    };
    let budget = parse_bytes("--memory-budget", text)?;
    let model = pcfg.gpt2().map_err(|e| CliError::usage(e.to_string()))?;
    let parts = schedule.placement.num_parts() as usize;
    let ranges = pcfg
        .split
        .resolve::<Cpu>(&model, parts)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let d = c.data_parallel.max(1);
    let mb_seqs = c.batch / (schedule.microbatches.max(1) * d) as usize;
    let units = analytic_units(&pcfg.model, mb_seqs, c.seq);
    let copies = if schedule.kind == ScheduleKind::TwoBw { 2 } else { 1 };
    let memory = memory_model(c, Some(budget));
    let stages = stage_memory(&units, &ranges, schedule, &memory, c.recompute, copies)
        .map_err(|e| CliError::usage(e.to_string()))?;
    match stages.iter().enumerate().find(|(_, m)| m.total_bytes() > budget) {
        None => Ok(()),
        Some((s, m)) => Err(CliError::usage(format!(
            "--memory-budget {text}: stage {s} needs {} with this layout (parameters {}, gradients {}, optimizer {}, \
             stash {}, receive buffers {}, scratch {}); try --plan auto, more --microbatches, --recompute or more \
             --stages",
            human_bytes(m.total_bytes()),
            human_bytes(m.params_bytes),
            human_bytes(m.grads_bytes),
            human_bytes(m.optimizer_bytes),
            human_bytes(m.stash_bytes),
            human_bytes(m.receive_bytes),
            human_bytes(m.scratch_bytes)
        ))),
    }
}

fn ms(seconds: f64) -> String {
    format!("{:.2} ms", seconds * 1e3)
}

/// One line for the chosen plan: schedule, micro-batches, chunks, recomputation, split and prediction.
pub(crate) fn choice_line(planned: &Planned) -> String {
    let best = &planned.plan.best;
    let c = &best.candidate;
    format!(
        "{}{}, {} micro-batches, {} chunk{}{}, split {}: predicted {} per step (schedule), bubble {:.1}%",
        c.kind.name(),
        if c.list { " (list-scheduled)" } else { "" },
        c.microbatches,
        c.chunks,
        if c.chunks == 1 { "" } else { "s" },
        if c.recompute { ", recomputation" } else { "" },
        planned.split_text(),
        ms(best.evaluation.step_time),
        best.evaluation.bubble * 100.0
    )
}

/// The runner-up and why it lost, in words.
pub(crate) fn runner_up_line(planned: &Planned) -> String {
    let Some(r) = &planned.plan.runner_up else {
        return "runner-up: none (no other candidate could run)".into();
    };
    let t = planned.plan.best.evaluation.step_time;
    let why = match r.lost_by {
        LostBy::Time { behind } => format!(
            "{} per step, {} ({:.1}%) slower",
            ms(r.step_time),
            ms(behind),
            100.0 * behind / t.max(1e-12)
        ),
        LostBy::Tie => format!("{} per step, a tie (the chosen one comes first)", ms(r.step_time)),
        LostBy::Memory {
            stage,
            needed_bytes,
            budget_bytes,
        } => format!(
            "would take {} per step ({:.1}% faster) but needs {} on stage {stage}, over the budget of {}",
            ms(r.step_time),
            100.0 * (t - r.step_time) / t.max(1e-12),
            human_bytes(needed_bytes),
            human_bytes(budget_bytes)
        ),
    };
    format!("runner-up: {}: {why}", r.candidate)
}

/// The full report `baton plan` prints.
fn report(planned: &Planned, c: &TrainConfig, device_name: &str, svg: Option<&Path>, all: bool) -> String {
    let best = &planned.plan.best;
    let e = &best.evaluation;
    let mut out = String::new();
    let push = |out: &mut String, line: String| {
        out.push_str(&line);
        out.push('\n');
    };
    push(
        &mut out,
        format!(
            "plan for {} stages: {} layers, d_model {}, {} heads, context {}, batch {}{} on {device_name}, budget {}",
            c.stages,
            c.layers,
            c.d_model,
            c.heads,
            c.seq,
            c.batch,
            if c.data_parallel > 1 {
                format!(" over {} replicas", c.data_parallel)
            } else {
                String::new()
            },
            planned
                .budget
                .map_or("none".to_string(), |b| format!("{} per stage", human_bytes(b)))
        ),
    );
    for (p, cached, path) in &planned.profiles {
        push(
            &mut out,
            format!(
                "profile: micro-batches of {} sequences: {}{}, hop {:.1} µs",
                p.key.microbatch_seqs,
                if *cached { "from the cache" } else { "measured" },
                match (cached, path) {
                    (false, Some(p)) => format!(", cached in {}", p.display()),
                    (false, None) => ", not cached (give --out or --profile-cache)".to_string(),
                    (true, _) => String::new(),
                },
                p.hop_latency_s * 1e6
            ),
        );
    }
    if planned.profile_s > 0.0 {
        push(&mut out, format!("profiling took {:.1} s", planned.profile_s));
    }
    push(&mut out, format!("chosen: {}", choice_line(planned)));
    push(
        &mut out,
        format!(
            "search: {} ({} splits simulated)",
            if best.exact {
                "exact"
            } else {
                "stopped at its limits (the best split found)"
            },
            best.evaluations
        ),
    );
    push(&mut out, "split (units: 0 embedding, 1..=L blocks, L+1 head):".into());
    let placement = &e.schedule.placement;
    for (part, r) in best.ranges.iter().enumerate() {
        let (s, ch) = placement.owner(part as u32).unwrap_or((0, 0));
        let names: Vec<&str> = r
            .clone()
            .filter_map(|u| planned.unit_names.get(u).map(String::as_str))
            .collect();
        push(
            &mut out,
            format!(
                "  stage {s} chunk {ch}: part {part}, units {}..{} ({})",
                r.start,
                r.end,
                names.join(", ")
            ),
        );
    }
    push(
        &mut out,
        format!(
            "predicted step: {} (schedule phase), bubble {:.1}%",
            ms(e.step_time),
            e.bubble * 100.0
        ),
    );
    push(&mut out, "peak memory per stage:".into());
    for (s, m) in e.memory.iter().enumerate() {
        push(
            &mut out,
            format!(
                "  stage {s}: {} (parameters {}, gradients {}, optimizer {}, stash {}, receive buffers {}, scratch {})",
                human_bytes(m.total_bytes()),
                human_bytes(m.params_bytes),
                human_bytes(m.grads_bytes),
                human_bytes(m.optimizer_bytes),
                human_bytes(m.stash_bytes),
                human_bytes(m.receive_bytes),
                human_bytes(m.scratch_bytes)
            ),
        );
    }
    push(&mut out, runner_up_line(planned));
    let (mut fit, mut slower, mut big, mut unsupported) = (0, 0, 0, 0);
    for o in &planned.plan.candidates {
        match &o.outcome {
            Outcome::Fits { .. } => fit += 1,
            Outcome::Slower { .. } => slower += 1,
            Outcome::TooBig { .. } => big += 1,
            Outcome::Unsupported(_) => unsupported += 1,
        }
    }
    push(
        &mut out,
        format!(
            "candidates: {} considered, {fit} timed, {slower} proven slower than the runner-up, {big} need more memory \
             than the budget, {unsupported} cannot run this shape{}",
            planned.plan.candidates.len(),
            if all { ":" } else { " (--candidates lists them)" }
        ),
    );
    if all {
        for o in &planned.plan.candidates {
            let what = match &o.outcome {
                Outcome::Fits {
                    step_time,
                    bubble,
                    peak,
                    exact,
                } => format!(
                    "{}, bubble {:.1}%, peak {} on stage {}{}",
                    ms(*step_time),
                    bubble * 100.0,
                    human_bytes(peak.1),
                    peak.0,
                    if *exact { "" } else { " (search stopped at its limits)" }
                ),
                Outcome::Slower { cutoff } => format!("slower than {} (searched no further)", ms(*cutoff)),
                Outcome::TooBig { error, .. } => format!("does not fit: {error}"),
                Outcome::Unsupported(why) => format!("cannot run: {why}"),
            };
            push(&mut out, format!("  {}: {what}", o.candidate));
        }
    }
    if let Some(path) = svg {
        push(&mut out, format!("timeline: {}", path.display()));
    }
    out
}

/// The training configuration `baton plan`'s flags describe (defaults, the TOML file, then flags).
fn config_of(args: &PlanArgs) -> Result<TrainConfig, CliError> {
    let mut c = match &args.config {
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
        ($($f:ident),*) => { $( if let Some(v) = &args.$f { c.$f = v.clone(); } )* };
    }
    over!(
        tokenizer,
        layers,
        d_model,
        heads,
        seq,
        batch,
        device,
        threads,
        stage_threads,
        data_parallel,
        zero
    );
    if args.memory_budget.is_some() {
        c.memory_budget = args.memory_budget.clone();
    }
    if args.out.is_some() {
        c.out = args.out.clone();
    }
    if args.profile_cache.is_some() {
        c.profile_cache = args.profile_cache.clone();
    }
    Ok(c)
}

/// Runs `baton plan`.
pub fn run(args: &PlanArgs) -> Result<(), CliError> {
    if let Some(gpus) = &args.gpus {
        return super::plan_scale::run(args, gpus);
    }
    if args.model.is_some() {
        return Err(CliError::usage(
            "--model names a shape for --gpus: give --gpus N as well",
        ));
    }
    let mut c = config_of(args)?;
    let stage_counts = match &args.stages {
        Some(text) => parse_list("--stages", text, PLAN_STAGE_COUNTS_MAX)?,
        None => vec![c.stages],
    };
    let budget = c
        .memory_budget
        .as_deref()
        .map(|t| parse_bytes("--memory-budget", t))
        .transpose()?;
    let choices = PlanChoices {
        microbatches: args
            .microbatches
            .as_deref()
            .map(|t| parse_list("--microbatches", t, PLAN_MICROBATCH_COUNTS_MAX))
            .transpose()?,
        kinds: parse_kinds(&args.schedules)?,
        recompute: parse_recompute(&args.recompute)?,
        cache: c.profile_cache.clone().or_else(|| c.out.clone()),
    };
    if c.zero > 1 {
        return Err(CliError::usage(format!("--zero {}: only 0 and 1 exist", c.zero)));
    }
    if c.data_parallel == 0 {
        return Err(CliError::usage("--data-parallel must be >= 1"));
    }
    super::train::set_cpu_threads(&c)?;
    let device = super::train::device(&c.device)?;
    let device_name = match device {
        Device::Cpu => format!("cpu ({} threads)", crate::kernels::fast::threads()),
        Device::Cuda(n) => format!("cuda ({n} GPUs)"),
    };
    let mut text = String::new();
    let mut planned_all = Vec::with_capacity(stage_counts.len());
    for &p in &stage_counts {
        c.stages = p;
        let planned = plan_config(&c, &device, budget, &choices)?;
        planned_all.push((p, planned));
    }
    // Nothing is written until every plan succeeded.
    for (p, planned) in &mut planned_all {
        planned.store_profiles()?;
        let svg = match (&args.svg, &c.out) {
            (Some(path), _) if stage_counts.len() == 1 => Some(path.clone()),
            (Some(path), _) => Some(with_suffix(path, *p)),
            (None, Some(dir)) if stage_counts.len() == 1 => Some(dir.join("plan.svg")),
            (None, Some(dir)) => Some(dir.join(format!("plan-p{p}.svg"))),
            (None, None) => None,
        };
        if let Some(path) = &svg {
            if let Some(parent) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| CliError::failure(format!("creating {}: {e}", parent.display())))?;
            }
            let e = &planned.plan.best.evaluation;
            super::write_output(Some(path), &to_svg(e.timeline(), &e.sim))?;
        }
        c.stages = *p;
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&report(planned, &c, &device_name, svg.as_deref(), args.candidates));
    }
    super::write_output(None, &text)
}

/// `plan.svg` → `plan-p4.svg`.
fn with_suffix(path: &Path, p: u32) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or("plan".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or("svg".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-p{p}.{ext}"))
}

/// `baton train --plan auto`: plans the configuration's stages (keeping them), sets the schedule, micro-batches,
/// chunks, recomputation and split it chose, and returns the plan (its schedule is the one to train with). The
/// flags the plan chooses may not be given beside it. `None` without `--plan`.
pub(crate) fn plan_for_train(
    c: &mut TrainConfig,
    given: &[(&str, bool)],
    device: &Device,
    out: &Path,
) -> Result<Option<Planned>, CliError> {
    let Some(mode) = c.plan.as_deref() else {
        return Ok(None);
    };
    if mode != "auto" {
        return Err(CliError::usage(format!("--plan `{mode}`: expected auto")));
    }
    if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
        return Err(CliError::usage(format!(
            "--plan auto chooses the schedule, micro-batches, chunks, split and recomputation: leave out {flag}"
        )));
    }
    if c.batch_weight_grads {
        return Err(CliError::usage(
            "--plan auto does not model --batch-weight-grads yet (its profiles and memory model run each \
             micro-batch's weight gradients on their own): leave out one of them",
        ));
    }
    if c.schedule_csv.is_some() || c.init_from.is_some() {
        return Err(CliError::usage(
            "--plan auto plans the model the flags describe with a generated schedule: it cannot be combined with \
             --schedule-csv or --init-from",
        ));
    }
    let budget = c
        .memory_budget
        .as_deref()
        .map(|t| parse_bytes("--memory-budget", t))
        .transpose()?;
    let choices = PlanChoices {
        microbatches: None,
        kinds: parse_kinds(PLAN_SCHEDULES_DEFAULT)?,
        recompute: vec![false, true],
        cache: Some(c.profile_cache.clone().unwrap_or_else(|| out.to_path_buf())),
    };
    let planned = plan_config(c, device, budget, &choices)?;
    let best = &planned.plan.best;
    c.schedule = best.candidate.kind.name().to_string();
    c.microbatches = best.candidate.microbatches;
    c.chunks = Some(best.candidate.chunks);
    c.recompute = best.candidate.recompute;
    c.split = Some(planned.split_text());
    Ok(Some(planned))
}

/// After a planned run: the plan's predicted schedule time beside the median measured one (steps after the
/// first, from `metrics.jsonl`), as one line.
pub(crate) fn predicted_vs_measured(planned: &Planned, metrics: &Path) -> Option<String> {
    let text = std::fs::read_to_string(metrics).ok()?;
    let mut measured: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("step").and_then(serde_json::Value::as_u64).is_some_and(|s| s > 1))
        .filter_map(|v| Some(v.get("step_s")?.as_f64()? - v.get("optimizer_s")?.as_f64()?))
        .collect();
    if measured.is_empty() {
        return None;
    }
    measured.sort_by(f64::total_cmp);
    let median = measured[measured.len() / 2];
    let predicted = planned.plan.best.evaluation.step_time;
    Some(format!(
        "plan: predicted {} per step (schedule phase), measured {} (median of {} steps after the first): {:+.1}%",
        ms(predicted),
        ms(median),
        measured.len(),
        100.0 * (median - predicted) / predicted.max(1e-12)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("--memory-budget", "2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("--memory-budget", "512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("--memory-budget", "1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("--memory-budget", "1000").unwrap(), 1000);
        assert_eq!(parse_bytes("--memory-budget", "4g").unwrap(), 4 << 30);
        for bad in ["", "GiB", "2XB", "-1GiB", "0", "0.1", "1e3"] {
            assert!(parse_bytes("--memory-budget", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn schedule_lists_parse() {
        assert_eq!(parse_kinds("all").unwrap().len(), ScheduleKind::GENERATED.len());
        assert_eq!(
            parse_kinds("1f1b, zb-h1,1f1b").unwrap(),
            [ScheduleKind::OneFOneB, ScheduleKind::ZbH1]
        );
        assert!(parse_kinds("1f1b,nope").is_err());
        assert!(parse_kinds(PLAN_SCHEDULES_DEFAULT)
            .unwrap()
            .iter()
            .all(|k| *k != ScheduleKind::TwoBw));
    }
}
