//! `baton plan --gpus N --model gpt2-124m|gpt2-1.5b|gpt2-7b`: scale on paper. Every `D × P` layout of the model
//! on `N` GPUs of an H200 cluster ([`crate::schedules::Cluster::hgx_h200`]) is planned and timed by
//! [`crate::schedules::scale`], and the best few are printed with their step time, tokens/s, bubble,
//! communication share and memory per GPU, and every assumption behind them.
//!
//! **Per-unit costs.** Without `--device`: *predicted* H200 costs, not measured: each GPT-2 unit's FLOPs (the
//! counts of [`GptConfig::flops_per_token`], split per unit as the engine's `predict` module does) at
//! [`MATMUL_FRACTION`] of the H200's dense bf16 peak, its weight and elementwise bytes at [`HBM_FRACTION`] of its
//! HBM bandwidth (a matrix product takes the longer of its FLOP and weight-byte times), plus [`OP_OVERHEAD_S`] per
//! op; the tensors a unit keeps are the engine's ([`gpt2_unit_bytes`]) in bf16. With `--device cpu` (or `cuda`):
//! the costs measured by the engine's profiler ([`crate::engine::profile`]) on a one-block model of the same
//! width (every block costs what that block costs), for micro-batches of one sequence, scaled linearly to larger
//! micro-batches.

use super::plan::{parse_bytes, parse_kinds, PlanArgs};
use super::train::TrainConfig;
use super::CliError;
use crate::engine::memory::{gpt2_unit_bytes, human_bytes};
use crate::engine::GptConfig;
use crate::schedules::{
    scale, Cluster, LayoutOutcome, LayoutReport, MemoryModel, PlanSpace, ScaleModel, ScaleOptions, ScaleReport,
    ScheduleError, SearchLimits, UnitProfile, INTERLEAVED_CHUNKS_DEFAULT,
};

/// The H200 SXM's dense bf16 tensor-core peak, FLOP/s (vendor datasheet: 989 TFLOP/s without sparsity).
pub const H200_BF16_FLOPS: f64 = 989e12;

/// The H200's HBM3e bandwidth, bytes/s (vendor datasheet: 4.8 TB/s).
pub const H200_HBM_BYTES_PER_S: f64 = 4.8e12;

/// The H200's memory, bytes (vendor datasheet: 141 GB): the default budget per GPU.
pub const H200_MEMORY_BYTES: u64 = 141_000_000_000;

/// Assumed achieved fraction of [`H200_BF16_FLOPS`] in matrix products and attention (a large GEMM on random data
/// measured ~790 TFLOP/s here, 80%; model-sized products reach less).
pub const MATMUL_FRACTION: f64 = 0.6;

/// Assumed achieved fraction of [`H200_HBM_BYTES_PER_S`] in memory-bound ops (a device copy measured ~4.3 TB/s
/// here, 90%).
pub const HBM_FRACTION: f64 = 0.7;

/// Assumed fixed cost of one op (F, I or W) of one unit, seconds: kernel launches and tails of its ~10 kernels.
pub const OP_OVERHEAD_S: f64 = 20e-6;

/// Assumed elements each token moves through the memory-bound ops of one block's forward, per channel (layer
/// norms, residual adds, GELU, attention inputs and outputs: 22·C); the backward moves twice as many.
pub const BLOCK_ELEMENTWISE_PER_CHANNEL: f64 = 22.0;

/// Bytes per bf16 element.
const BF16_BYTES: f64 = 2.0;

/// Bytes per fp32 element.
const F32_BYTES: f64 = 4.0;

/// Memory each GPU keeps for the runtime (CUDA context, cuBLAS workspace, allocator slack), bytes.
pub const GPU_RESERVE_BYTES: u64 = 2 << 30;

/// Parameters per all-reduce bucket at least (Megatron-Core's default bucket is `max(40M, 1M·D)` parameters).
pub const BUCKET_PARAMS_MIN: f64 = 40e6;

/// Parameters per all-reduce bucket per data-parallel replica (Megatron-Core's rule, see [`BUCKET_PARAMS_MIN`]).
pub const BUCKET_PARAMS_PER_REPLICA: f64 = 1e6;

/// Most GPU counts one `--gpus` list may hold.
pub const SCALE_GPU_COUNTS_MAX: usize = 8;

/// Layouts printed per GPU count by default.
pub const SCALE_TOP_DEFAULT: usize = 5;

/// Most evaluated splits per candidate in a scale plan (each layout runs a plan; [`SearchLimits`] in the plan).
pub const SCALE_EVALUATIONS_MAX: u64 = 500;

/// Most visited partial splits per candidate in a scale plan.
pub const SCALE_NODES_MAX: u64 = 50_000;

/// A model `--model` names: its configuration and its fixed global batch, sequences.
struct Shape {
    name: &'static str,
    config: GptConfig,
    batch: u32,
}

/// The shapes `--model` knows: GPT-2 124M and 1.5B as published, and a 7B of the same architecture (LLaMA-7B's
/// width and depth); context 1024 and the GPT-2 vocabulary for all three.
fn shape_of(name: &str) -> Result<Shape, CliError> {
    let config = |layers, d_model, heads| GptConfig {
        vocab_size: 50257,
        max_seq: 1024,
        layers,
        d_model,
        heads,
    };
    let (config, batch) = match name {
        // 0.5M tokens per step, GPT-2's and llm.c's.
        "gpt2-124m" => (config(12, 768, 12), 512),
        // 1M tokens per step, llm.c's GPT-2 1.5B run.
        "gpt2-1.5b" => (config(48, 1600, 25), 1024),
        // 4M tokens per step, LLaMA-7B's.
        "gpt2-7b" => (config(32, 4096, 32), 4096),
        other => {
            return Err(CliError::usage(format!(
                "--model `{other}`: expected gpt2-124m, gpt2-1.5b or gpt2-7b"
            )))
        }
    };
    let name = match name {
        "gpt2-124m" => "gpt2-124m",
        "gpt2-1.5b" => "gpt2-1.5b",
        _ => "gpt2-7b",
    };
    Ok(Shape { name, config, batch })
}

/// Parameters of unit `u` (the head counts its own copy of the tied `wte`, as the engine holds it).
fn unit_params(m: &GptConfig, u: usize) -> f64 {
    let (v, t, c) = (m.vocab_size as f64, m.max_seq as f64, m.d_model as f64);
    if u == 0 {
        v * c + t * c
    } else if u <= m.layers {
        12.0 * c * c + 13.0 * c
    } else {
        v * c + 2.0 * c
    }
}

/// Predicted H200 costs and bf16 bytes of every GPT-2 unit for one micro-batch of `mb` sequences of `seq` tokens
/// (see the module docs; not measured).
fn predicted_units(m: &GptConfig, mb: u32, seq: usize) -> Vec<UnitProfile> {
    let flops = MATMUL_FRACTION * H200_BF16_FLOPS;
    let bw = HBM_FRACTION * H200_HBM_BYTES_PER_S;
    let tokens = f64::from(mb) * seq as f64;
    let (c, v) = (m.d_model as f64, m.vocab_size as f64);
    let n = m.num_units();
    (0..n)
        .map(|u| {
            let params = unit_params(m, u);
            // A matrix product: the longer of its FLOPs at the achieved rate and its weight bytes at the achieved
            // bandwidth.
            let mm = |f: f64, weight_bytes: f64| (f / flops).max(weight_bytes / bw);
            let (fwd, input, weight) = if u == 0 {
                // Gather of wte and wpe rows and their sum (bf16); the weight gradient a scatter-add into fp32.
                let f = 3.0 * tokens * c * BF16_BYTES / bw;
                let w = tokens * c * (BF16_BYTES + 2.0 * F32_BYTES) / bw;
                (f, 0.0, w)
            } else if u <= m.layers {
                let mm_flops = 24.0 * c * c * tokens;
                let att_flops = 2.0 * c * seq as f64 * tokens;
                let ew = BLOCK_ELEMENTWISE_PER_CHANNEL * c * tokens * BF16_BYTES / bw;
                let f = mm(mm_flops, params * BF16_BYTES) + att_flops / flops + ew;
                let i = mm(mm_flops, params * BF16_BYTES) + 2.0 * att_flops / flops + 2.0 * ew;
                // Weight gradients accumulate into fp32: read and write 4 bytes per parameter.
                let w = mm(mm_flops, params * 2.0 * F32_BYTES);
                (f, i, w)
            } else {
                // Final layer norm, the tied head's product and the cross-entropy over the logits.
                let mm_flops = 2.0 * v * c * tokens;
                let ew_f = (2.0 * v + 4.0 * c) * tokens * BF16_BYTES / bw;
                let ew_i = (3.0 * v + 4.0 * c) * tokens * BF16_BYTES / bw;
                let f = mm(mm_flops, params * BF16_BYTES) + ew_f;
                let i = mm(mm_flops, params * BF16_BYTES) + ew_i;
                let w = mm(mm_flops, params * 2.0 * F32_BYTES);
                (f, i, w)
            };
            let (f, i, w) = (fwd + OP_OVERHEAD_S, input + OP_OVERHEAD_S, weight + OP_OVERHEAD_S);
            // The engine's kept tensors, counted in f32 elements on the CPU: half the bytes in bf16.
            let (act, wstash, scratch) = gpt2_unit_bytes(m, u, mb as usize, seq);
            UnitProfile {
                costs: [f, i + w, i, w],
                activation_bytes: act / 2,
                weight_stash_bytes: wstash / 2,
                output_bytes: if u + 1 < n { (tokens * c * BF16_BYTES) as u64 } else { 0 },
                param_bytes: (params * BF16_BYTES) as u64,
                scratch_bytes: scratch / 2,
            }
        })
        .collect()
}

/// The measured source: the profile of a one-block model of `shape`'s width on `device` for micro-batches of one
/// sequence, its block repeated for every block.
fn measured_units(
    shape: &Shape,
    seq: usize,
    device_name: &str,
    args: &PlanArgs,
) -> Result<(Vec<UnitProfile>, String), CliError> {
    let c = TrainConfig {
        tokenizer: "gpt2".into(),
        layers: 1,
        d_model: shape.config.d_model,
        heads: shape.config.heads,
        seq,
        batch: 1,
        stages: 1,
        data_parallel: 1,
        device: device_name.to_string(),
        threads: args.threads.unwrap_or(0),
        ..TrainConfig::default()
    };
    super::train::set_cpu_threads(&c)?;
    let device = super::train::device(&c.device)?;
    let model = super::plan::model_of(&c)?;
    let cache = args.profile_cache.clone().or_else(|| args.out.clone());
    let (profile, cached) = super::plan::profile_on(&model, &device, &c, 1, cache.as_deref())?;
    if let (Some(dir), false) = (&cache, cached) {
        crate::engine::profile::store(dir, &profile).map_err(|e| CliError::failure(e.to_string()))?;
    }
    if profile.units.len() != 3 {
        return Err(CliError::failure(format!(
            "profiling a one-block model gave {} units; expected embedding, block and head",
            profile.units.len()
        )));
    }
    let mut units = vec![profile.units[0].clone()];
    units.extend(std::iter::repeat_n(profile.units[1].clone(), shape.config.layers));
    units.push(profile.units[2].clone());
    let how = format!(
        "measured on {} (a one-block model of this width, micro-batches of 1 sequence{}), scaled linearly with the \
         micro-batch",
        profile.key.backend,
        if cached { ", from the cache" } else { "" }
    );
    Ok((units, how))
}

/// `base` (one sequence per micro-batch) for micro-batches of `mb` sequences: times and activation bytes times
/// `mb`, parameters unchanged.
fn scaled(base: &[UnitProfile], mb: u32) -> Vec<UnitProfile> {
    let k = u64::from(mb);
    base.iter()
        .map(|u| UnitProfile {
            costs: u.costs.map(|t| t * f64::from(mb)),
            activation_bytes: u.activation_bytes.saturating_mul(k),
            weight_stash_bytes: u.weight_stash_bytes.saturating_mul(k),
            output_bytes: u.output_bytes.saturating_mul(k),
            param_bytes: u.param_bytes,
            scratch_bytes: u.scratch_bytes.saturating_mul(k),
        })
        .collect()
}

fn ms(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// What holds the best layout back, in words.
fn limit_of(report: &ScaleReport, best: &LayoutReport, batch: u32) -> String {
    let mut why = Vec::new();
    let p = best.layout.stages;
    if best.comm_share >= best.bubble && best.comm_share > 0.05 {
        why.push(format!(
            "exposed all-reduce {} ({})",
            pct(best.comm_share),
            best.dp_link.name()
        ));
    } else if best.bubble > 0.05 {
        why.push(format!("bubble {}", pct(best.bubble)));
    } else {
        why.push(format!(
            "compute (bubble {}, exposed all-reduce {})",
            pct(best.bubble),
            pct(best.comm_share)
        ));
    }
    if best.microbatch_seqs == 1 && best.candidate.microbatches == batch / best.layout.replicas.max(1) && p > 1 {
        why.push("1 sequence per micro-batch".into());
    }
    let smaller_too_big = report
        .layouts
        .iter()
        .filter(|(l, o)| l.stages < p && matches!(o, LayoutOutcome::TooBig { .. }))
        .map(|(l, _)| l.stages)
        .max();
    if let Some(q) = smaller_too_big {
        why.push(format!("memory: P <= {q} does not fit"));
    }
    let batch_bound = report
        .layouts
        .iter()
        .any(|(l, o)| l.stages < p && matches!(o, LayoutOutcome::Unsupported(w) if w.contains("do not divide")));
    if batch_bound {
        why.push(format!("batch: D <= {batch}"));
    }
    why.join("; ")
}

/// Runs `baton plan --gpus ... --model ...`.
pub fn run(args: &PlanArgs, gpus_text: &str) -> Result<(), CliError> {
    let model_name = args
        .model
        .as_deref()
        .ok_or_else(|| CliError::usage("--gpus needs --model gpt2-124m, gpt2-1.5b or gpt2-7b"))?;
    let shape = shape_of(model_name)?;
    for (flag, set) in [
        ("--layers", args.layers.is_some()),
        ("--d-model", args.d_model.is_some()),
        ("--heads", args.heads.is_some()),
        ("--stages", args.stages.is_some()),
        ("--data-parallel", args.data_parallel.is_some()),
        ("--config", args.config.is_some()),
    ] {
        if set {
            return Err(CliError::usage(format!(
                "--gpus plans every D × P layout of --model: leave out {flag}"
            )));
        }
    }
    let counts: Vec<u32> = gpus_text
        .split(',')
        .map(|v| v.trim().parse::<u32>().ok().filter(|&v| v > 0))
        .collect::<Option<Vec<_>>>()
        .filter(|v| !v.is_empty() && v.len() <= SCALE_GPU_COUNTS_MAX)
        .ok_or_else(|| {
            CliError::usage(format!(
                "--gpus `{gpus_text}`: expected 1 to {SCALE_GPU_COUNTS_MAX} positive whole numbers such as 8,64"
            ))
        })?;
    let seq = args.seq.unwrap_or(shape.config.max_seq);
    if seq == 0 || seq > shape.config.max_seq {
        return Err(CliError::usage(format!(
            "--seq {seq}: must be in 1..={} for {}",
            shape.config.max_seq, shape.name
        )));
    }
    let batch = match args.batch {
        Some(b) => u32::try_from(b)
            .ok()
            .filter(|&b| b > 0)
            .ok_or_else(|| CliError::usage(format!("--batch {b}: must be in 1..={}", u32::MAX)))?,
        None => shape.batch,
    };
    let zero = args.zero.unwrap_or(1);
    if zero > 1 {
        return Err(CliError::usage(format!("--zero {zero}: only 0 and 1 exist")));
    }
    let gpus_per_node = args.gpus_per_node;
    if gpus_per_node == 0 {
        return Err(CliError::usage("--gpus-per-node must be >= 1"));
    }
    let recompute = match args.recompute.as_str() {
        "off" => vec![false],
        "on" => vec![true],
        "both" => vec![false, true],
        other => {
            return Err(CliError::usage(format!(
                "--recompute `{other}`: expected off, on or both"
            )))
        }
    };
    let microbatches = match &args.microbatches {
        Some(text) => Some(
            text.split(',')
                .map(|v| v.trim().parse::<u32>().ok().filter(|&v| v > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| CliError::usage(format!("--microbatches `{text}`: expected positive whole numbers")))?,
        ),
        None => None,
    };
    let device = args.device.as_deref().unwrap_or("h200");
    let measured = match device {
        "h200" => None,
        "cpu" | "cuda" => Some(measured_units(&shape, seq, device, args)?),
        other => {
            return Err(CliError::usage(format!(
                "--device `{other}` with --gpus: h200 (predicted costs, the default), cpu or cuda (measured)"
            )))
        }
    };
    let cfg = GptConfig {
        max_seq: seq,
        ..shape.config.clone()
    };
    // Bytes of one parameter as the units hold it: bf16 when predicted, f32 when measured.
    let param_elem_bytes = if measured.is_none() { BF16_BYTES } else { F32_BYTES };
    let (budget, grad_ratio, memory) = match &measured {
        None => {
            let budget = match &args.memory_budget {
                Some(t) => parse_bytes("--memory-budget", t)?,
                None => H200_MEMORY_BYTES,
            };
            // bf16 parameters; fp32 gradients (2× the parameter bytes); fp32 master weights and two fp32 moments
            // (6×).
            let memory = MemoryModel {
                budget_bytes: budget,
                grads_per_param: 2.0,
                optimizer_per_param: 6.0,
                optimizer_shards: 1,
                reserve_bytes: GPU_RESERVE_BYTES,
            };
            (Some(budget), 2.0, memory)
        }
        Some(_) => {
            let budget = args
                .memory_budget
                .as_deref()
                .map(|t| parse_bytes("--memory-budget", t))
                .transpose()?;
            let memory = MemoryModel {
                budget_bytes: budget.unwrap_or(u64::MAX),
                ..MemoryModel::default()
            };
            (budget, 1.0, memory)
        }
    };
    let units_at = |mb: u32| -> Result<Vec<UnitProfile>, ScheduleError> {
        Ok(match &measured {
            None => predicted_units(&cfg, mb, seq),
            Some((base, _)) => scaled(base, mb),
        })
    };
    let model = ScaleModel {
        name: shape.name.to_string(),
        global_batch_seqs: batch,
        seq_tokens: seq as u32,
        units: cfg.num_units(),
        units_at: &units_at,
    };
    let cluster = Cluster {
        gpus_per_node,
        ..Cluster::hgx_h200()
    };
    let options = ScaleOptions {
        cluster,
        memory: memory.clone(),
        zero1: zero == 1,
        space: PlanSpace {
            kinds: parse_kinds(&args.schedules)?,
            interleaved_chunks: INTERLEAVED_CHUNKS_DEFAULT.to_vec(),
            recompute,
            list_orders: false,
        },
        limits: SearchLimits {
            evaluations_max: SCALE_EVALUATIONS_MAX,
            nodes_max: SCALE_NODES_MAX,
        },
        microbatches,
        grad_bytes_per_param_byte: grad_ratio,
        bucket_bytes: BUCKET_PARAMS_MIN * grad_ratio * param_elem_bytes,
        bucket_bytes_per_replica: BUCKET_PARAMS_PER_REPLICA * grad_ratio * param_elem_bytes,
        overlap: !args.no_overlap,
    };
    let flops_per_token = cfg.flops_per_token(seq);
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "scale plan: {} ({} layers, d_model {}, {} heads, {:.2}B parameters), context {seq}, global batch {batch} \
         sequences ({} tokens) per step",
        shape.name,
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.num_params() as f64 / 1e9,
        u64::from(batch) * seq as u64
    ));
    line(match &measured {
        None => format!(
            "costs: predicted for the H200, not measured: matrix products and attention at {:.0}% of {:.0} TFLOP/s \
             dense bf16, memory-bound ops at {:.0}% of {:.1} TB/s HBM, {:.0} µs per op; activations in bf16",
            MATMUL_FRACTION * 100.0,
            H200_BF16_FLOPS / 1e12,
            HBM_FRACTION * 100.0,
            H200_HBM_BYTES_PER_S / 1e12,
            OP_OVERHEAD_S * 1e6
        ),
        Some((_, how)) => format!("costs: {how}"),
    });
    line(format!(
        "cluster: {gpus_per_node} GPUs per node; intra-node {:.0} GB/s per direction, {:.0} µs; inter-node {:.0} GB/s \
         ({:.0} Gbit/s) per GPU, {:.0} µs; ranks r·P + s (stages of a pipeline adjacent, replicas across nodes)",
        cluster.intra.bytes_per_s / 1e9,
        cluster.intra.latency_s * 1e6,
        cluster.inter.bytes_per_s / 1e9,
        cluster.inter.bytes_per_s * 8.0 / 1e9,
        cluster.inter.latency_s * 1e6
    ));
    line(format!(
        "memory: budget {} per GPU; {}; optimizer state {}; {} reserved",
        budget.map_or("none".to_string(), |b| format!("{:.1} GB", b as f64 / 1e9)),
        if measured.is_none() {
            "bf16 parameters, fp32 gradients (2×), fp32 master weights and AdamW moments (6×)"
        } else {
            "parameters, gradients and AdamW moments as measured (1×, 1×, 2×)"
        },
        if zero == 1 {
            "sharded over D (ZeRO-1)"
        } else {
            "not sharded"
        },
        human_bytes(memory.reserve_bytes)
    ));
    line(format!(
        "data parallel: ring all-reduce of {} gradients in buckets of max({:.0}M, {:.0}M·D) parameters \
         (Megatron-Core's default), 2(D-1)/D·bytes/bandwidth + 2(D-1)·latency per bucket, {}",
        if measured.is_none() { "fp32" } else { "f32" },
        BUCKET_PARAMS_MIN / 1e6,
        BUCKET_PARAMS_PER_REPLICA / 1e6,
        if options.overlap {
            "each stage's parts reduced once their last backward ends (overlapped)"
        } else {
            "after the pipeline flush (not overlapped)"
        }
    ));
    line(format!(
        "schedules: {} (recompute {}); per layout the planner picks split, schedule and micro-batches by simulated \
         pipeline time; optimizer step and tensor parallelism not modelled",
        args.schedules, args.recompute
    ));
    for &n in &counts {
        let report = scale(&model, &options, n).map_err(|e| CliError::usage(e.to_string()))?;
        line(String::new());
        let nodes = n.div_ceil(gpus_per_node);
        line(format!("{n} GPUs ({nodes} node{}):", if nodes == 1 { "" } else { "s" }));
        line(format!(
            "  {:>11}  {:<26} {:>4} {:>9} {:>12} {:>6} {:>7} {:>7} {:>10} {:>9} {:>10}",
            "D × P", "schedule", "mb", "step", "tokens/s", "MFU", "bubble", "comm", "all-reduce", "hop", "memory/GPU"
        ));
        let top = args.top.max(1);
        for (_, o) in report.layouts.iter().take(top) {
            if let LayoutOutcome::Predicted(r) = o {
                let mfu = r.tokens_per_s * flops_per_token / (f64::from(n) * H200_BF16_FLOPS);
                line(format!(
                    "  {:>11}  {:<26} {:>4} {:>9} {:>12.0} {:>6} {:>7} {:>7} {:>10} {:>9} {:>10}",
                    format!("{} × {}", r.layout.replicas, r.layout.stages),
                    r.candidate.label(),
                    r.microbatch_seqs,
                    ms(r.step_s),
                    r.tokens_per_s,
                    if measured.is_none() { pct(mfu) } else { "-".into() },
                    pct(r.bubble),
                    pct(r.comm_share),
                    ms(r.allreduce_s),
                    format!("{:.0} µs", r.hop_s * 1e6),
                    human_bytes(r.peak_memory.1)
                ));
            }
        }
        for (l, o) in &report.layouts {
            match o {
                LayoutOutcome::TooBig {
                    needed_bytes,
                    budget_bytes,
                    ..
                } => line(format!(
                    "  {} × {}: does not fit: needs {} per GPU at best, budget {}",
                    l.replicas,
                    l.stages,
                    human_bytes(*needed_bytes),
                    human_bytes(*budget_bytes)
                )),
                LayoutOutcome::Unsupported(why) => line(format!("  {} × {}: cannot run: {why}", l.replicas, l.stages)),
                LayoutOutcome::Predicted(_) => {}
            }
        }
        match report.best() {
            Some(best) => line(format!(
                "  best: {} × {} ({}), {} per step, {:.0} tokens/s; limited by {}",
                best.layout.replicas,
                best.layout.stages,
                best.candidate.label(),
                ms(best.step_s),
                best.tokens_per_s,
                limit_of(&report, best, batch)
            )),
            None => line("  best: none fits".into()),
        }
    }
    super::write_output(None, &out)
}
