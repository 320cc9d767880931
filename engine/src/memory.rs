//! What a GPT-2 training configuration needs in memory, computed before anything is allocated: parameters,
//! gradients and AdamW moments, the schedule's peak stashed activations per stage, receive pools, per-op scratch
//! and the data, so a run that cannot fit is refused with the figure instead of aborting mid-allocation.

use std::ops::Range;

use baton_schedules::{peak_receive_buffers, peak_receive_buffers_batched, Op, Schedule, ScheduleKind};

use crate::model::GptConfig;

/// Bytes of one element on the CPU backend (f32 everywhere).
pub const CPU_ELEM_BYTES: usize = 4;

/// Fixed cost of the process besides what is computed (the binary's code and data, the allocator, thread
/// stacks, the embedded corpus), bytes. A 2-block, d_model 16 run peaks at about 28 MiB resident, 12 MiB of it data.
pub const PROCESS_BASE_BYTES: u64 = 16 << 20;

/// A configuration's memory needs on the CPU backend, bytes, by what holds them.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    /// Parameter values (a tied group's copies counted once per copy; under 2BW, every weight copy it holds).
    pub params_bytes: u64,
    /// Their gradients.
    pub grads_bytes: u64,
    /// AdamW's two moments.
    pub adam_bytes: u64,
    /// Per stage: the most stash bytes held at once (activations between F and B/I, weight-gradient inputs
    /// between I and W).
    pub stash_bytes: Vec<u64>,
    /// Per stage: the receive pool (activations and gradients from other stages alive at once).
    pub receive_bytes: Vec<u64>,
    /// Temporaries of the largest op per stage (every stage computes at once), and the evaluation logits.
    pub scratch_bytes: u64,
    /// Tokens of the training data and the train / validation split.
    pub data_bytes: u64,
    /// A checkpoint being taken: the host snapshot of every parameter and both AdamW moments, and one stage file
    /// being serialised beside it (the stages' shares taken as even).
    pub checkpoint_bytes: u64,
    /// The process itself besides the above: [`PROCESS_BASE_BYTES`], or (raised by the caller with
    /// [`MemoryEstimate::with_process_now`]) what it holds when the estimate is made.
    pub base_bytes: u64,
}

impl MemoryEstimate {
    /// The estimate with its base raised to this process's resident memory now (the binary, its libraries,
    /// the thread pools and what is already loaded), where Linux says: a measured base instead of a guessed one.
    pub fn with_process_now(mut self) -> Self {
        if let Some(now) = current_rss_bytes() {
            self.base_bytes = self.base_bytes.max(now);
        }
        self
    }

    /// The estimate of one replica's pipeline scaled to `d` data-parallel replicas in this process: parameters,
    /// gradients, stashes, receive pools and scratch `d` times, plus one copy of each gradient per replica while
    /// the overlapped reduction holds it; AdamW's moments `d` times, or once in all under ZeRO-1 (each tensor's
    /// moments live on its owner only). Data, checkpoint snapshot and process base stay once.
    pub fn replicated(mut self, d: u64, zero: bool, overlap: bool) -> Self {
        if d <= 1 {
            return self;
        }
        self.params_bytes *= d;
        self.grads_bytes *= if overlap { 2 * d } else { d };
        if !zero {
            self.adam_bytes *= d;
        }
        self.stash_bytes.iter_mut().for_each(|b| *b *= d);
        self.receive_bytes.iter_mut().for_each(|b| *b *= d);
        self.scratch_bytes *= d;
        self
    }

    /// Everything together, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.params_bytes
            + self.grads_bytes
            + self.adam_bytes
            + self.stash_bytes.iter().sum::<u64>()
            + self.receive_bytes.iter().sum::<u64>()
            + self.scratch_bytes
            + self.data_bytes
            + self.checkpoint_bytes
            + self.base_bytes
    }
}

/// Per micro-batch elements a unit keeps: (activation stash F→B/I, weight-gradient stash I→W, largest scratch of
/// its backward). Unit 0 is the embedding, 1..=L the blocks, L+1 the head; `n` tokens per micro-batch.
fn unit_elems(m: &GptConfig, unit: usize, b: usize, t: usize) -> (u64, u64, u64) {
    let (n, c, v, nh) = (b * t, m.d_model, m.vocab_size, m.heads);
    let (act, w, scratch) = if unit == 0 {
        (0, n * c, n * c)
    } else if unit <= m.layers {
        // x, ln1, qkv (3c), atty, x2, ln2, fc (4c), gelu (4c): 16c per token; 4 row statistics; the attention's
        // stash, one log-sum-exp per row and head (the CPU's fused attention: b·nh·t, not the b·nh·t·t
        // probabilities). Between I and W: the inputs of the weight gradients and the output gradients. The
        // backward's scratch adds the fused attention's score blocks (two of 64 query rows per batch row).
        let att = b * nh * t;
        let blocks = b * 2 * baton_kernels::fast::flash::QUERY_BLOCK.min(t) * t;
        (n * 16 * c + 4 * n + att, n * 16 * c, n * 10 * c + blocks)
    } else {
        // x, lnf, statistics, logits; after I: lnf and the logits' gradient.
        (n * 2 * c + 2 * n + n * v, n * c + n * v, n * v + 2 * n * c)
    };
    (act as u64, w as u64, scratch as u64)
}

/// Bytes one micro-batch of `mb_seqs × seq` tokens makes GPT-2's unit `unit` hold on the CPU backend: (activation
/// stash from F to B / I, weight-gradient stash from I to W, the largest scratch of its backward) — the figures
/// [`estimate_gpt2`] adds up, for the planner's per-unit profile.
pub fn gpt2_unit_bytes(model: &GptConfig, unit: usize, mb_seqs: usize, seq: usize) -> (u64, u64, u64) {
    let elem = CPU_ELEM_BYTES as u64;
    let (a, w, s) = unit_elems(model, unit, mb_seqs, seq);
    (a * elem, w * elem, s * elem)
}

/// What the executor keeps between a micro-batch's actions: the two [`crate::TrainOptions`] that change the
/// stash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StashPolicy {
    /// Only each part's input is kept from F to B / I, and the forward is recomputed.
    pub recompute: bool,
    /// Every micro-batch's weight-gradient stash is held until the part's last weight action of the step.
    pub batch_weight_grads: bool,
}

/// The estimate for `model` split into `ranges` (unit ranges per part, in part order) under `schedule`, with
/// micro-batches of `mb_seqs` sequences of `seq` tokens, the stash kept as `policy` says, and `data_tokens`
/// tokens of training data.
pub fn estimate_gpt2(
    model: &GptConfig,
    schedule: &Schedule,
    ranges: &[Range<usize>],
    mb_seqs: usize,
    seq: usize,
    policy: StashPolicy,
    data_tokens: usize,
) -> MemoryEstimate {
    let recompute = policy.recompute;
    let elem = CPU_ELEM_BYTES as u64;
    let (c, v) = (model.d_model as u64, model.vocab_size as u64);
    // The head keeps its own copy of the tied `wte`.
    let params = model.num_params() as u64 + v * c;
    let stages = schedule.stages() as usize;
    let receive = if policy.batch_weight_grads {
        peak_receive_buffers_batched(schedule)
    } else {
        peak_receive_buffers(schedule)
    }
    .unwrap_or_default();
    let mut stash = vec![0u64; stages];
    let mut receive_bytes = vec![0u64; stages];
    let mut scratch_max = vec![0u64; stages];
    // Per part: (activation stash, weight-gradient stash, largest scratch) per micro-batch, elements.
    let per_part: Vec<(u64, u64, u64)> = ranges
        .iter()
        .map(|range| {
            let (mut a, mut g, mut sc) = (0, 0, 0);
            for unit in range.clone() {
                let (ua, ug, us) = unit_elems(model, unit, mb_seqs, seq);
                a += ua;
                g += ug;
                sc = sc.max(us);
            }
            if recompute {
                // Only the part's input activation is kept (none for the part that starts at the embedding: its
                // input is the tokens); an I recomputes the forward, and what it recomputed waits for the W.
                g = g.max(a);
                a = if range.start == 0 {
                    0
                } else {
                    (mb_seqs * seq) as u64 * c
                };
            }
            (a, g, sc)
        })
        .collect();
    for s in 0..stages {
        // Replay the stage's list as the executor does: + at F, − at B or I; + the weight-gradient stash at I,
        // − at W. The peak of the running sum is the stage's stash. With batched weight gradients, a B or W adds
        // its weight-gradient stash instead, and the part's last one of the step frees all of them.
        let (mut now, mut peak) = (0i128, 0i128);
        let mut held = vec![0u32; per_part.len()];
        for action in &schedule.actions[s] {
            let Some((part, &(a, g, sc))) = schedule
                .part_of(s as u32, action)
                .and_then(|part| Some((part as usize, per_part.get(part as usize)?)))
            else {
                continue;
            };
            scratch_max[s] = scratch_max[s].max(sc);
            let (a, g) = (i128::from(a), i128::from(g));
            match action.op {
                Op::F => now += a,
                Op::I => now += g - a,
                Op::B if !policy.batch_weight_grads => now -= a,
                Op::W if !policy.batch_weight_grads => now -= g,
                Op::B | Op::W => {
                    if action.op == Op::B {
                        now += g - a;
                    }
                    peak = peak.max(now);
                    held[part] += 1;
                    if held[part] == schedule.microbatches {
                        now -= i128::from(held[part]) * g;
                        held[part] = 0;
                    }
                }
            }
            peak = peak.max(now);
        }
        stash[s] = peak.max(0) as u64 * elem;
        receive_bytes[s] = receive.get(s).copied().unwrap_or(0) as u64 * (mb_seqs * seq) as u64 * c * elem;
    }
    // Evaluation runs one micro-batch at a time through the stages: its logits are the largest buffer.
    let eval = (mb_seqs * seq) as u64 * v * elem;
    // PipeDream-2BW streams hold, beside the weights: each stage's second version, the updater's newest and previous
    // copies, one version in transit and the stream's starting weights (for the rollback) — five more copies — and
    // the starting moments (two more).
    let (weight_copies, moment_copies) = if schedule.kind == ScheduleKind::TwoBw {
        (6, 4)
    } else {
        (1, 2)
    };
    MemoryEstimate {
        params_bytes: weight_copies * params * elem,
        grads_bytes: params * elem,
        adam_bytes: moment_copies * params * elem,
        stash_bytes: stash,
        receive_bytes,
        scratch_bytes: scratch_max.iter().sum::<u64>() * elem + eval,
        // The tokens (u32), and the split's train and validation copies.
        data_bytes: 2 * data_tokens as u64 * 4,
        checkpoint_bytes: 3 * params * elem + (3 * params * elem).div_ceil(stages.max(1) as u64),
        base_bytes: PROCESS_BASE_BYTES,
    }
}

/// Memory this process may still allocate, bytes: the smaller of the kernel's `MemAvailable` and the cgroup's
/// limit minus its usage, where Linux says; `None` where nothing says.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// This process's peak resident memory so far (`VmHWM`), bytes, where Linux says.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Resident memory of this process now (`VmRSS`), bytes, where Linux says.
pub fn current_rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// A `/proc/self/status` field in kB, as bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// `bytes` for people: `812.4 MiB`, `64.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}
