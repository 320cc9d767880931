//! Measuring what each unit of a model costs on a backend, for the planner ([`baton_schedules::plan`]): per unit
//! and micro-batch, the forward, full-backward, input-gradient and weight-gradient times, the bytes its stash,
//! weight-gradient stash, output activation and parameters take, and the stage-to-stage transfer time of one
//! activation; cached in a JSON file keyed by the model, the backend, the micro-batch shape and the thread count.
//!
//! **Times** come from the engine itself: a one-stage pipeline whose parts are single units (a [`StageSplit`] of
//! one unit per part, one chunk per part on the stage), running a hand-built order in which each micro-batch goes
//! forward through every part and then back — half of the micro-batches with a full `B`, half with `I` then `W` —
//! for a few warm-up steps and then a few timed ones. The executor's per-action spans (device time on a GPU, wall
//! time on the CPU) are the samples; each (unit, op) takes their median. A model with more units than
//! [`baton_schedules::CHUNKS_MAX`] is profiled in that many even parts, each part's time shared evenly by its units.
//!
//! **Sharing a device.** Stages that will share one device (the CPU's one thread pool serves every stage) are
//! profiled as they will run: [`ProfileOptions::concurrent`] copies of the profile pipeline step at once, each on
//! its own thread, so every sample includes the contention of that many stages computing together.
//!
//! **Bytes** come from running each unit's layer once forward and backward on one micro-batch and reading what it
//! holds ([`crate::model::Saved::bytes`], [`Backend::bytes`]). Scratch is not measured (0); a caller that knows
//! it (GPT-2: [`crate::memory::gpt2_unit_bytes`]) fills [`UnitProfile::scratch_bytes`] in.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use baton_schedules::{validate, Action, Op, Placement, Schedule, ScheduleKind, UnitProfile, CHUNKS_MAX};

use crate::backend::Backend;
use crate::data::Batch;
use crate::error::{EngineError, Result};
use crate::model::{even_ranges, MicroBatch, Model};
use crate::pipeline::{Pipeline, TrainOptions};
use crate::split::StageSplit;

/// Version of the cache file's layout; a file of another version is profiled again.
pub const PROFILE_FORMAT: u32 = 1;

/// Default whole steps run before any is timed (allocations, pools, caches).
pub const PROFILE_WARMUP_STEPS_DEFAULT: u32 = 1;

/// Default timed steps.
pub const PROFILE_TIMED_STEPS_DEFAULT: u32 = 2;

/// Default micro-batches per timed step for each backward form (full `B`, and `I` + `W`).
pub const PROFILE_MICROBATCHES_DEFAULT: u32 = 2;

/// Most steps (warm-up and timed together) one profile runs.
pub const PROFILE_STEPS_MAX: u32 = 64;

/// Most micro-batches per backward form in one profile step.
pub const PROFILE_MICROBATCHES_MAX: u32 = 64;

/// Most pipelines profiled at once ([`ProfileOptions::concurrent`]).
pub const PROFILE_CONCURRENT_MAX: u32 = 64;

/// Transfers timed for the per-hop latency (the median is kept).
pub const PROFILE_TRANSFER_REPEATS: u32 = 7;

/// What a profile was measured for: a cached profile is used only for exactly this.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileKey {
    /// The model's architecture ([`Model::kind`]).
    pub model_kind: String,
    /// Its configuration ([`Model::describe`]).
    pub model: serde_json::Value,
    /// The backend ([`Backend::name`]; with the precision where it has one, e.g. `cuda:0 bf16`).
    pub backend: String,
    /// Sequences per micro-batch.
    pub microbatch_seqs: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Compute threads (the CPU's pool; 0 where it does not apply).
    pub threads: usize,
    /// Pipelines profiled at once (stages sharing the device).
    pub concurrent: u32,
}

impl ProfileKey {
    /// `profile-<16 hex digits of the key's SHA-256>.json`.
    pub fn file_name(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        let digest = Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("profile-{hex}.json")
    }
}

/// How a profile is measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProfileOptions {
    /// Whole steps run before timing.
    pub warmup_steps: u32,
    /// Timed steps.
    pub timed_steps: u32,
    /// Micro-batches per step for each backward form (full `B`, and `I` + `W`).
    pub microbatches: u32,
    /// Pipelines stepping at once, each on its own thread (the stages that will share the device), 1 or more.
    pub concurrent: u32,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            warmup_steps: PROFILE_WARMUP_STEPS_DEFAULT,
            timed_steps: PROFILE_TIMED_STEPS_DEFAULT,
            microbatches: PROFILE_MICROBATCHES_DEFAULT,
            concurrent: 1,
        }
    }
}

impl ProfileOptions {
    fn check(&self) -> Result<()> {
        if self.timed_steps == 0 || self.warmup_steps + self.timed_steps > PROFILE_STEPS_MAX {
            return Err(EngineError::config(
                "timed_steps",
                self.timed_steps,
                format!("needs 1 or more timed steps and at most {PROFILE_STEPS_MAX} steps with the warm-up"),
            ));
        }
        if self.microbatches == 0 || self.microbatches > PROFILE_MICROBATCHES_MAX {
            return Err(EngineError::config(
                "microbatches",
                self.microbatches,
                format!("must be in 1..={PROFILE_MICROBATCHES_MAX}"),
            ));
        }
        if self.concurrent == 0 || self.concurrent > PROFILE_CONCURRENT_MAX {
            return Err(EngineError::config(
                "concurrent",
                self.concurrent,
                format!("must be in 1..={PROFILE_CONCURRENT_MAX}"),
            ));
        }
        Ok(())
    }
}

/// A model's measured profile: one [`UnitProfile`] per unit for one micro-batch of the key's shape, and the
/// transfer time of one activation between two backends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    /// [`PROFILE_FORMAT`].
    pub format: u32,
    /// What it was measured for.
    pub key: ProfileKey,
    /// How.
    pub options: ProfileOptions,
    /// Unit names, in pipeline order.
    pub unit_names: Vec<String>,
    /// Per unit: seconds of F, B, I, W per micro-batch and its bytes.
    pub units: Vec<UnitProfile>,
    /// Seconds to move one unit output (the largest) from one backend to another.
    pub hop_latency_s: f64,
    /// Timed samples behind each (unit, op) median.
    pub samples_per_op: u32,
}

/// The one-stage order of the profile: micro-batch by micro-batch, forwards through every part, then back — the
/// first `half` with `B`, the next `half` with `I` and `W` per part.
fn profile_schedule(parts: u32, half: u32) -> Result<Schedule> {
    let mut list = Vec::with_capacity((parts * half * 5) as usize);
    for mb in 0..2 * half {
        list.extend((0..parts).map(|c| Action::new(Op::F, mb, c)));
        for c in (0..parts).rev() {
            if mb < half {
                list.push(Action::new(Op::B, mb, c));
            } else {
                list.push(Action::new(Op::I, mb, c));
                list.push(Action::new(Op::W, mb, c));
            }
        }
    }
    let schedule = Schedule {
        kind: ScheduleKind::Custom,
        microbatches: 2 * half,
        placement: Placement::looped(1, parts),
        actions: vec![list],
    };
    validate(&schedule)?;
    Ok(schedule)
}

/// A batch of `rows` sequences of `seq` tokens below `vocab` (a fixed pattern: the times do not depend on it).
fn profile_batch(rows: usize, seq: usize, vocab: usize) -> Batch {
    let n = rows * seq;
    let vocab = vocab.max(1);
    Batch {
        inputs: (0..n).map(|i| ((i * 7 + 3) % vocab) as u32).collect(),
        targets: (0..n).map(|i| ((i * 7 + 10) % vocab) as u32).collect(),
        batch: rows,
        seq,
    }
}

fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        0.5 * (samples[n / 2 - 1] + samples[n / 2])
    }
}

/// Runs one profile pipeline: warm-up steps, then timed ones (each started together with the other copies at
/// `barrier`); returns the samples per (part, op).
fn time_parts<B: Backend>(
    model: &Arc<dyn Model<B>>,
    backend: B,
    schedule: &Schedule,
    ranges: &[std::ops::Range<usize>],
    batch: &Batch,
    options: &ProfileOptions,
    barrier: &Barrier,
) -> Result<Vec<[Vec<f64>; 4]>> {
    let parts = ranges.len();
    let built = Pipeline::builder(Arc::clone(model))
        .schedule(schedule.clone())
        .split(StageSplit::Ranges(ranges.to_vec()))
        .options(TrainOptions::default())
        .build(vec![backend]);
    // Every copy reaches every barrier, whether it built or not, so no copy waits forever on a failed one.
    let mut pipeline = match built {
        Ok(p) => Some(p),
        Err(e) => {
            for _ in 0..options.warmup_steps + options.timed_steps {
                barrier.wait();
            }
            return Err(e);
        }
    };
    let mut samples: Vec<[Vec<f64>; 4]> = (0..parts).map(|_| Default::default()).collect();
    let mut failure = None;
    for step in 0..options.warmup_steps + options.timed_steps {
        barrier.wait();
        let Some(p) = pipeline.as_mut() else {
            continue;
        };
        match p.train_step(batch) {
            Ok(report) if step >= options.warmup_steps => {
                for span in report.spans.iter().flatten() {
                    let k = Op::ALL.iter().position(|&o| o == span.action.op).unwrap_or(0);
                    if let Some(part) = samples.get_mut(span.action.chunk as usize) {
                        part[k].push((span.end_s - span.start_s).max(0.0));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                failure = Some(e);
                pipeline = None;
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(samples),
    }
}

/// Bytes of each unit for one micro-batch of `b × t`: (parameters, activation stash, weight-gradient stash,
/// output), from one forward and backward of every layer on `be`.
fn unit_bytes<B: Backend>(model: &dyn Model<B>, be: &B, b: usize, t: usize) -> Result<Vec<[u64; 4]>> {
    let n = model.num_units();
    let batch = profile_batch(b, t, model.vocab_size());
    let mb = MicroBatch {
        inputs: Some(be.upload_tokens(&batch.inputs)?),
        targets: Some(be.upload_tokens(&batch.targets)?),
        b,
        t,
        loss_scale: 1.0 / (b * t) as f32,
    };
    let mut layers = Vec::with_capacity(n);
    for u in 0..n {
        layers.push(model.build_unit(u, be)?);
    }
    let mut out = vec![[0u64; 4]; n];
    let mut saved = Vec::with_capacity(n);
    let mut x = None;
    for (u, layer) in layers.iter().enumerate() {
        out[u][0] = layer.params().iter().map(|p| be.bytes(&p.value) as u64).sum();
        let f = layer.forward(be, x, &mb)?;
        out[u][1] = f.saved.bytes(be) as u64;
        out[u][3] = f.out.as_ref().map_or(0, |o| be.bytes(o) as u64);
        x = f.out;
        saved.push(f.saved);
    }
    drop(x);
    let mut dout = None;
    for (u, layer) in layers.iter().enumerate().rev() {
        dout = layer.backward_input(be, &mut saved[u], dout, &mb)?;
        out[u][2] = saved[u].bytes(be) as u64;
    }
    be.synchronize()?;
    Ok(out)
}

/// Seconds to move `bytes` (as f32 elements) from `from` to `to`: the median of [`PROFILE_TRANSFER_REPEATS`].
fn transfer_seconds<B: Backend>(from: &B, to: &B, bytes: u64) -> Result<f64> {
    let len = (bytes as usize / 4).max(1);
    let mut times = Vec::with_capacity(PROFILE_TRANSFER_REPEATS as usize);
    for _ in 0..PROFILE_TRANSFER_REPEATS {
        let buf = from.zeros(len)?;
        from.synchronize()?;
        let t0 = Instant::now();
        let moved = from.transfer(buf, to)?;
        to.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
        drop(moved);
    }
    Ok(median(&mut times))
}

/// Profiles `model` on backends made by `make` (called once per concurrent copy and twice more for the bytes and
/// the transfer) for micro-batches of `microbatch_seqs × seq`; `key_backend` and `threads` complete the cache key.
///
/// # Errors
/// Bad options or shapes, a model with no units, and whatever building or stepping the profile pipeline reports.
pub fn profile<B: Backend>(
    model: Arc<dyn Model<B>>,
    make: &(dyn Fn() -> Result<B> + Sync),
    key_backend: &str,
    threads: usize,
    microbatch_seqs: usize,
    seq: usize,
    options: &ProfileOptions,
) -> Result<ModelProfile> {
    options.check()?;
    let n = model.num_units();
    let what = || format!("{} on {key_backend}", model.kind());
    if n == 0 || microbatch_seqs == 0 || seq == 0 {
        return Err(EngineError::Profile {
            what: what(),
            reason: format!("{n} units, micro-batches of {microbatch_seqs} × {seq} tokens: nothing to time"),
        });
    }
    let parts = n.min(CHUNKS_MAX as usize);
    let ranges = even_ranges(n, parts);
    let schedule = profile_schedule(parts as u32, options.microbatches)?;
    let batch = profile_batch(
        2 * options.microbatches as usize * microbatch_seqs,
        seq,
        model.vocab_size(),
    );
    let copies = options.concurrent as usize;
    let barrier = Barrier::new(copies);
    let results: Vec<Result<Vec<[Vec<f64>; 4]>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..copies)
            .map(|_| {
                let (model, schedule, ranges, batch, barrier) = (&model, &schedule, &ranges, &batch, &barrier);
                scope.spawn(move || -> Result<Vec<[Vec<f64>; 4]>> {
                    match make() {
                        Ok(be) => time_parts(model, be, schedule, ranges, batch, options, barrier),
                        Err(e) => {
                            for _ in 0..options.warmup_steps + options.timed_steps {
                                barrier.wait();
                            }
                            Err(e)
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(EngineError::Profile {
                        what: what(),
                        reason: "a profile thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut samples: Vec<[Vec<f64>; 4]> = (0..parts).map(|_| Default::default()).collect();
    for result in results {
        for (part, ops) in result?.into_iter().enumerate() {
            for (k, mut list) in ops.into_iter().enumerate() {
                samples[part][k].append(&mut list);
            }
        }
    }
    let samples_per_op = samples
        .first()
        .map_or(0, |s| s.iter().map(Vec::len).min().unwrap_or(0) as u32);
    let be = make()?;
    let bytes = unit_bytes(model.as_ref(), &be, microbatch_seqs, seq)?;
    let mut units = vec![UnitProfile::default(); n];
    for (range, ops) in ranges.iter().zip(samples.iter_mut()) {
        let share = 1.0 / range.len() as f64;
        for (k, list) in ops.iter_mut().enumerate() {
            let t = median(list) * share;
            for unit in &mut units[range.clone()] {
                unit.costs[k] = t;
            }
        }
    }
    for (u, b) in bytes.iter().enumerate() {
        units[u].param_bytes = b[0];
        units[u].activation_bytes = b[1];
        units[u].weight_stash_bytes = b[2];
        units[u].output_bytes = b[3];
    }
    let largest = bytes.iter().map(|b| b[3]).max().unwrap_or(0);
    let other = make()?;
    let hop_latency_s = transfer_seconds(&be, &other, largest)?;
    Ok(ModelProfile {
        format: PROFILE_FORMAT,
        key: ProfileKey {
            model_kind: model.kind(),
            model: model.describe(),
            backend: key_backend.to_string(),
            microbatch_seqs,
            seq,
            threads,
            concurrent: options.concurrent,
        },
        options: options.clone(),
        unit_names: (0..n).map(|u| model.unit_name(u)).collect(),
        units,
        hop_latency_s,
        samples_per_op,
    })
}

/// Where the profile for `key` is cached under `dir`.
pub fn cache_path(dir: &Path, key: &ProfileKey) -> PathBuf {
    dir.join(key.file_name())
}

/// The cached profile for `key` under `dir`, if a file of this format and exactly this key is there (anything
/// else — absent, unreadable, another key or format — is `None`: profile again).
pub fn load_cached(dir: &Path, key: &ProfileKey) -> Option<ModelProfile> {
    let text = std::fs::read_to_string(cache_path(dir, key)).ok()?;
    let profile: ModelProfile = serde_json::from_str(&text).ok()?;
    (profile.format == PROFILE_FORMAT && profile.key == *key).then_some(profile)
}

/// Writes `profile` under `dir` (created if needed) at its key's file name, through a temporary file and a
/// rename; returns the path.
///
/// # Errors
/// [`EngineError::Io`] naming the file.
pub fn store(dir: &Path, profile: &ModelProfile) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| EngineError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = cache_path(dir, &profile.key);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(profile).map_err(|e| EngineError::Profile {
        what: profile.key.model_kind.clone(),
        reason: format!("serialising: {e}"),
    })? + "\n";
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::model::{Gpt2, GptConfig};

    fn tiny(vocab: usize) -> Arc<dyn Model<Cpu>> {
        let cfg = GptConfig {
            vocab_size: vocab,
            max_seq: 16,
            layers: 2,
            d_model: 16,
            heads: 2,
        };
        Arc::new(Gpt2::new(cfg, 1).unwrap())
    }

    #[test]
    fn the_profile_order_is_valid_and_times_every_op_of_every_unit() {
        let model = tiny(64);
        let opts = ProfileOptions {
            concurrent: 2,
            ..ProfileOptions::default()
        };
        let p = profile(model, &|| Ok(Cpu), "cpu", 1, 2, 16, &opts).unwrap();
        assert_eq!(p.units.len(), 4);
        assert_eq!(p.unit_names, ["embedding", "h.0", "h.1", "head"]);
        // Two copies × two timed steps × two micro-batches per backward form (twice as many forwards).
        assert_eq!(p.samples_per_op, 8);
        for (u, unit) in p.units.iter().enumerate() {
            assert!(
                unit.costs.iter().all(|c| c.is_finite() && *c > 0.0),
                "unit {u}: {:?}",
                unit.costs
            );
            assert!(unit.param_bytes > 0, "unit {u}");
        }
        // Blocks keep activations, pass (b·t·c) f32 on, and the head passes nothing.
        assert!(p.units[1].activation_bytes > p.units[0].activation_bytes);
        assert_eq!(p.units[1].output_bytes, 2 * 16 * 16 * 4);
        assert_eq!(p.units[3].output_bytes, 0);
        assert!(p.hop_latency_s.is_finite() && p.hop_latency_s >= 0.0);
    }

    #[test]
    fn a_wider_vocabulary_makes_a_costlier_and_larger_head() {
        let small = profile(tiny(64), &|| Ok(Cpu), "cpu", 1, 2, 16, &ProfileOptions::default()).unwrap();
        let wide = profile(tiny(4096), &|| Ok(Cpu), "cpu", 1, 2, 16, &ProfileOptions::default()).unwrap();
        assert!(wide.units[3].param_bytes > 10 * small.units[3].param_bytes);
        assert!(wide.units[3].costs[0] > small.units[3].costs[0]);
        assert!(wide.units[3].activation_bytes > small.units[3].activation_bytes);
    }

    #[test]
    fn the_cache_returns_only_a_profile_of_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = profile(tiny(64), &|| Ok(Cpu), "cpu", 1, 2, 16, &ProfileOptions::default()).unwrap();
        assert!(load_cached(dir.path(), &p.key).is_none());
        let path = store(dir.path(), &p).unwrap();
        assert!(path.file_name().unwrap().to_string_lossy().starts_with("profile-"));
        // JSON keeps every byte count and the times to within rounding of the last digit.
        let back = load_cached(dir.path(), &p.key).unwrap();
        assert_eq!((&back.key, &back.unit_names), (&p.key, &p.unit_names));
        for (a, b) in back.units.iter().zip(&p.units) {
            assert_eq!((a.activation_bytes, a.param_bytes), (b.activation_bytes, b.param_bytes));
            for (x, y) in a.costs.iter().zip(&b.costs) {
                assert!((x - y).abs() <= 1e-15 * y.abs().max(1e-9), "{x} {y}");
            }
        }
        for other in [
            ProfileKey {
                threads: 2,
                ..p.key.clone()
            },
            ProfileKey {
                microbatch_seqs: 4,
                ..p.key.clone()
            },
            ProfileKey {
                backend: "cuda:0 bf16".into(),
                ..p.key.clone()
            },
        ] {
            assert_ne!(other.file_name(), p.key.file_name());
            assert!(load_cached(dir.path(), &other).is_none());
        }
        // A file under the right name holding another key is not used.
        let mut forged = p.clone();
        forged.key.seq = 8;
        std::fs::write(cache_path(dir.path(), &p.key), serde_json::to_string(&forged).unwrap()).unwrap();
        assert!(load_cached(dir.path(), &p.key).is_none());
    }

    /// Embedding, 6 blocks, and a head about as costly as 5 or 6 blocks (a vocabulary of 64 × d_model): the uniform
    /// split of 2 stages puts 3 blocks and the head on the last stage, the balanced one the head alone or with one
    /// block.
    fn wide_head_model() -> Arc<dyn Model<Cpu>> {
        let cfg = GptConfig {
            vocab_size: 2048,
            max_seq: 16,
            layers: 6,
            d_model: 32,
            heads: 2,
        };
        Arc::new(Gpt2::new(cfg, 1).unwrap())
    }

    #[test]
    fn the_planned_split_of_a_measured_wide_head_beats_the_uniform_split() {
        use baton_schedules::{evaluate_split, partition, Candidate, MemoryModel, SearchLimits};
        let model = wide_head_model();
        let opts = ProfileOptions {
            concurrent: 2,
            ..ProfileOptions::default()
        };
        let p = profile(Arc::clone(&model), &|| Ok(Cpu), "cpu", 1, 2, 16, &opts).unwrap();
        let c = Candidate {
            kind: ScheduleKind::OneFOneB,
            chunks: 1,
            microbatches: 4,
            recompute: false,
            list: false,
        };
        let free = MemoryModel::default();
        let planned = partition(&p.units, p.hop_latency_s, 2, &c, &free, &SearchLimits::default()).unwrap();
        let uniform = even_ranges(p.units.len(), 2);
        let even = evaluate_split(&p.units, p.hop_latency_s, 2, &c, &uniform, &free).unwrap();
        // The measured head costs more than a block and the embedding together (nominally 5-6 blocks; a margin
        // the machine's load cannot close), so one block moved off its stage shortens the step.
        let cost = |u: usize| p.units[u].costs[0] + p.units[u].costs[1];
        let (embed, block, head) = (cost(0), cost(1), cost(7));
        assert!(
            head > block + embed,
            "head {head} s, block {block} s, embedding {embed} s"
        );
        assert!(planned.ranges[1].len() < uniform[1].len(), "{:?}", planned.ranges);
        assert!(
            planned.evaluation.step_time < even.step_time,
            "planned {:?} {} s vs uniform {}",
            planned.ranges,
            planned.evaluation.step_time,
            even.step_time
        );
        // And no other contiguous split of these measured costs is faster (the partitioner is exact).
        for cut in 1..p.units.len() {
            let split = [0..cut, cut..p.units.len()];
            let e = evaluate_split(&p.units, p.hop_latency_s, 2, &c, &split, &free).unwrap();
            assert!(
                planned.evaluation.step_time <= e.step_time + 1e-12,
                "{split:?}: {} s",
                e.step_time
            );
        }
    }

    #[test]
    fn bad_options_are_errors() {
        for opts in [
            ProfileOptions {
                timed_steps: 0,
                ..ProfileOptions::default()
            },
            ProfileOptions {
                concurrent: 0,
                ..ProfileOptions::default()
            },
            ProfileOptions {
                microbatches: PROFILE_MICROBATCHES_MAX + 1,
                ..ProfileOptions::default()
            },
        ] {
            assert!(profile(tiny(64), &|| Ok(Cpu), "cpu", 1, 2, 16, &opts).is_err());
        }
    }
}
