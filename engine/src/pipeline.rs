//! The `Pipeline`: a GPT split into stages, a validated schedule, and the training step
//! (executor → tied-gradient sum → global norm → clip → AdamW).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use baton_kernels::cpu::AdamW;
use baton_schedules::{generate, peak_receive_buffers, validate, Schedule, ScheduleKind, Validation};

use crate::backend::{Backend, PoolStats};
use crate::comm::{Collective, Collectives, LocalCollectives, LocalTransport, Transport};
use crate::data::Batch;
use crate::error::{EngineError, Result};
use crate::executor::{run_step, ActionSpan, CopySpan, ExecConfig, FailurePoint, Part, Stage};
use crate::model::{Gpt2, GptConfig, Layer, MicroBatch, Model, Param};
use crate::optim::OptimizerConfig;
use crate::split::StageSplit;

/// A tensor on the host: shape (row-major) and data.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f32>,
}

/// Tensors by global parameter name.
pub type TensorMap = BTreeMap<String, HostTensor>;

/// Default deadline for one blocking receive inside a step.
pub const RECV_TIMEOUT_MS_DEFAULT: u64 = 60_000;

/// How a pipeline trains, whatever the model and schedule: optimizer, recomputation, deadlines and the
/// non-finite policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Keep only part inputs between forward and backward and recompute.
    pub recompute: bool,
    /// Longest wait for one input inside a step, and longest one action may compute before
    /// the watchdog declares its stage stalled, in milliseconds.
    pub recv_timeout_ms: u64,
    /// What a non-finite loss or gradient norm does.
    #[serde(default)]
    pub nonfinite: NonFinitePolicy,
    /// With `NonFinitePolicy::Skip`: this many consecutive skipped steps abort the run.
    #[serde(default = "default_max_skips")]
    pub max_consecutive_skips: u32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            optimizer: OptimizerConfig::default(),
            recompute: false,
            recv_timeout_ms: RECV_TIMEOUT_MS_DEFAULT,
            nonfinite: NonFinitePolicy::Skip,
            max_consecutive_skips: MAX_CONSECUTIVE_SKIPS_DEFAULT,
        }
    }
}

impl TrainOptions {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        if self.recv_timeout_ms == 0 {
            return Err(EngineError::config("recv_timeout_ms", 0, "must be >= 1"));
        }
        if self.max_consecutive_skips == 0 {
            return Err(EngineError::config("max_consecutive_skips", 0, "must be >= 1"));
        }
        Ok(())
    }
}

/// A GPT-2 pipeline described by value (what `baton train` builds and checkpoints record): the model's sizes,
/// a generated schedule, the split and the training options. [`Pipeline::new`] builds it; models of your own and
/// schedules from elsewhere go through [`Pipeline::builder`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// The model.
    pub model: GptConfig,
    /// Pipeline stages.
    pub stages: u32,
    /// Schedule family.
    pub schedule: ScheduleKind,
    /// Micro-batches per step; must divide the batch.
    pub microbatches: u32,
    /// Chunks per stage (interleaved: ≥ 2, ZB-V: 2, others: 1).
    pub chunks: u32,
    /// How layers are divided among the parts.
    pub split: StageSplit,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Keep only part inputs between forward and backward and recompute.
    pub recompute: bool,
    /// Seed of the initial weights.
    pub seed: u64,
    /// Longest wait for one input inside a step, and longest one action may compute before
    /// the watchdog declares its stage stalled, in milliseconds.
    pub recv_timeout_ms: u64,
    /// What a non-finite loss or gradient norm does.
    #[serde(default)]
    pub nonfinite: NonFinitePolicy,
    /// With `NonFinitePolicy::Skip`: this many consecutive skipped steps abort the run.
    #[serde(default = "default_max_skips")]
    pub max_consecutive_skips: u32,
}

fn default_max_skips() -> u32 {
    MAX_CONSECUTIVE_SKIPS_DEFAULT
}

/// Default limit of consecutive skipped steps.
pub const MAX_CONSECUTIVE_SKIPS_DEFAULT: u32 = 3;

/// What a step with a non-finite loss or gradient norm does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Skip the optimizer step (gradients dropped), log it, and carry on.
    #[default]
    Skip,
    /// Fail the step with [`EngineError::NonFinite`].
    Abort,
}

impl PipelineConfig {
    /// A config with the schedule family's natural chunk count and default optimizer.
    pub fn new(model: GptConfig, stages: u32, schedule: ScheduleKind, microbatches: u32) -> Self {
        let chunks = match schedule {
            ScheduleKind::Interleaved | ScheduleKind::ZbV => 2,
            _ => 1,
        };
        let o = TrainOptions::default();
        PipelineConfig {
            model,
            stages,
            schedule,
            microbatches,
            chunks,
            split: StageSplit::Uniform,
            optimizer: o.optimizer,
            recompute: o.recompute,
            seed: 1337,
            recv_timeout_ms: o.recv_timeout_ms,
            nonfinite: o.nonfinite,
            max_consecutive_skips: o.max_consecutive_skips,
        }
    }

    /// The training options.
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            optimizer: self.optimizer.clone(),
            recompute: self.recompute,
            recv_timeout_ms: self.recv_timeout_ms,
            nonfinite: self.nonfinite,
            max_consecutive_skips: self.max_consecutive_skips,
        }
    }

    /// The schedule it describes, generated.
    pub fn generate_schedule(&self) -> Result<Schedule> {
        Ok(generate(self.schedule, self.stages, self.microbatches, self.chunks)?)
    }

    /// The GPT-2 model it describes.
    pub fn gpt2(&self) -> Result<Gpt2> {
        Gpt2::new(self.model.clone(), self.seed)
    }
}

/// What one training step measured.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Optimizer steps taken so far (1 after the first step).
    pub step: u64,
    /// Mean token loss over the batch.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping (tied weight counted once).
    pub grad_norm: f32,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Wall time of the whole step, seconds.
    pub elapsed_s: f64,
    /// Wall time of the pipelined part (executor), seconds.
    pub pipeline_s: f64,
    /// Per stage: seconds spent computing actions.
    pub busy_s: Vec<f64>,
    /// Per stage: `pipeline_s - busy_s`.
    pub idle_s: Vec<f64>,
    /// Measured bubble: idle / (stages × pipeline_s).
    pub bubble: f64,
    /// Per stage: mean host time per action, excluding waits for inputs (on a GPU: the host
    /// overhead of queueing an action's work; on the CPU: the action's compute).
    pub host_per_action_s: Vec<f64>,
    /// Per stage: most activation stashes held at once.
    pub peak_stashed: Vec<u32>,
    /// Per stage: most stash bytes held at once.
    pub peak_stash_bytes: Vec<usize>,
    /// Per stage: when each action ran.
    #[serde(skip)]
    pub spans: Vec<Vec<ActionSpan>>,
    /// Every transfer between stages (on the destination queue's clock).
    #[serde(skip)]
    pub copies: Vec<CopySpan>,
    /// The optimizer step was skipped because the loss or gradient norm was not finite.
    pub skipped: bool,
    /// Stage where a non-finite value first appeared (when `skipped`).
    pub nonfinite_stage: Option<u32>,
}

/// Where a parameter lives: (stage, chunk, layer in the part, parameter in the layer).
type ParamAt = (usize, usize, usize, usize);

/// A tied group as the pipeline holds it: the collective over the stages of its copies, and where each is.
struct TiedCopies<B: Backend> {
    names: Vec<String>,
    at: Vec<ParamAt>,
    group: Box<dyn Collective<B>>,
}

/// A model split into pipeline stages on backend `B`, trained with a validated schedule: one replica's stages on
/// this process's workers. A step runs the schedule (activations and gradients through the [`Transport`]), then
/// reduces gradients (tied groups; data parallelism plugs in here), clips by the global norm (through the stage
/// group's [`Collective`]) and steps AdamW.
pub struct Pipeline<B: Backend> {
    model: Arc<dyn Model<B>>,
    options: TrainOptions,
    schedule: Arc<Schedule>,
    validation: Validation,
    ranges: Vec<std::ops::Range<usize>>,
    backends: Arc<Vec<B>>,
    transport: Arc<dyn Transport<B>>,
    /// Every stage of the replica: the global gradient norm.
    stage_group: Box<dyn Collective<B>>,
    tied: Vec<TiedCopies<B>>,
    /// Each non-primary copy of a tied parameter → its group's primary (not counted again in the gradient norm;
    /// where a checkpoint without the copy loads it from).
    primaries: BTreeMap<String, String>,
    stages: Vec<Stage<B>>,
    step: u64,
    /// Set when a failure took some stage's state with it; every later step fails.
    lost: Option<String>,
    /// A failure to inject (see [`FailurePoint`]); cleared once it fires.
    fail: Option<FailurePoint>,
    consecutive_skips: u32,
}

/// Builds a [`Pipeline`] from a model, a schedule and the stages' backends; the split, options and the
/// communication seams have defaults (uniform split, default options, in-process transport and collectives).
pub struct PipelineBuilder<B: Backend> {
    model: Arc<dyn Model<B>>,
    schedule: Option<Schedule>,
    split: StageSplit,
    options: TrainOptions,
    transport: Option<Arc<dyn Transport<B>>>,
    collectives: Option<Arc<dyn Collectives<B>>>,
}

impl<B: Backend> PipelineBuilder<B> {
    /// The schedule to run: from a generator, a CSV ([`baton_schedules::schedule_from_csv`]) or built by hand. It is
    /// validated when the pipeline is built; its stage count must equal the number of backends.
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = Some(schedule);
        self
    }

    /// How the model's units are divided among the schedule's parts (default: [`StageSplit::Uniform`]).
    pub fn split(mut self, split: StageSplit) -> Self {
        self.split = split;
        self
    }

    /// Optimizer, recomputation, deadlines, non-finite policy.
    pub fn options(mut self, options: TrainOptions) -> Self {
        self.options = options;
        self
    }

    /// Moves activations and gradients between stages (default: [`LocalTransport`] with receive pools sized from
    /// the schedule).
    pub fn transport(mut self, transport: Arc<dyn Transport<B>>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Makes the groups the optimizer phase reduces over (default: [`LocalCollectives`]).
    pub fn collectives(mut self, collectives: Arc<dyn Collectives<B>>) -> Self {
        self.collectives = Some(collectives);
        self
    }

    /// Validates the schedule, splits the model and builds every stage's units on its backend (`backends[s]` for
    /// stage `s`).
    pub fn build(self, backends: Vec<B>) -> Result<Pipeline<B>> {
        let schedule = self
            .schedule
            .ok_or_else(|| EngineError::config("schedule", "none", "the builder was given no schedule"))?;
        Pipeline::assemble(
            self.model,
            schedule,
            &self.split,
            self.options,
            backends,
            self.transport,
            self.collectives,
        )
    }
}

impl<B: Backend> Pipeline<B> {
    /// The GPT-2 pipeline `config` describes: generates its schedule and builds every stage on its backend
    /// (`backends[s]` for stage s).
    pub fn new(config: PipelineConfig, backends: Vec<B>) -> Result<Self> {
        let model = config.gpt2()?;
        let schedule = config.generate_schedule()?;
        Pipeline::assemble(
            Arc::new(model),
            schedule,
            &config.split,
            config.options(),
            backends,
            None,
            None,
        )
    }

    /// A builder for `model` (any [`Model`]: GPT-2 or your own).
    pub fn builder(model: Arc<dyn Model<B>>) -> PipelineBuilder<B> {
        PipelineBuilder {
            model,
            schedule: None,
            split: StageSplit::Uniform,
            options: TrainOptions::default(),
            transport: None,
            collectives: None,
        }
    }

    fn assemble(
        model: Arc<dyn Model<B>>,
        schedule: Schedule,
        split: &StageSplit,
        options: TrainOptions,
        backends: Vec<B>,
        transport: Option<Arc<dyn Transport<B>>>,
        collectives: Option<Arc<dyn Collectives<B>>>,
    ) -> Result<Self> {
        options.validate()?;
        let p = schedule.stages();
        if backends.len() != p as usize {
            return Err(EngineError::config(
                "stages",
                p,
                format!(
                    "the schedule has {p} stages but {} backends (devices) were given",
                    backends.len()
                ),
            ));
        }
        let validation = validate(&schedule)?;
        let parts = schedule.placement.num_parts() as usize;
        let ranges = split.resolve(model.as_ref(), parts)?;
        let mut stages = Vec::with_capacity(p as usize);
        for (s, be) in backends.iter().enumerate() {
            let mut chunk_parts = Vec::new();
            for chunk in 0..schedule.chunks() {
                let index = schedule.placement.part(s as u32, chunk).ok_or_else(|| {
                    EngineError::Schedule(baton_schedules::ScheduleError::Placement(format!(
                        "the placement gives stage {s} no part for chunk {chunk}"
                    )))
                })?;
                let units = ranges[index as usize].clone();
                let layers = units
                    .clone()
                    .map(|u| model.build_unit(u, be))
                    .collect::<Result<Vec<_>>>()?;
                chunk_parts.push(Part { index, units, layers });
            }
            stages.push(Stage {
                index: s as u32,
                parts: chunk_parts,
            });
        }
        let backends = Arc::new(backends);
        let transport = match transport {
            Some(t) => t,
            None => Arc::new(LocalTransport::new(
                Arc::clone(&backends),
                &peak_receive_buffers(&schedule)?,
            )?),
        };
        if transport.stages() != p as usize {
            return Err(EngineError::config(
                "transport",
                transport.stages(),
                format!(
                    "the transport connects {} stages, the schedule has {p}",
                    transport.stages()
                ),
            ));
        }
        let collectives = collectives.unwrap_or_else(|| Arc::new(LocalCollectives::new(Arc::clone(&backends))));
        let stage_group = collectives.group(&(0..p as usize).collect::<Vec<_>>())?;
        let mut pipeline = Pipeline {
            model,
            options,
            schedule: Arc::new(schedule),
            validation,
            ranges,
            backends,
            transport,
            stage_group,
            tied: Vec::new(),
            primaries: BTreeMap::new(),
            stages,
            step: 0,
            lost: None,
            fail: None,
            consecutive_skips: 0,
        };
        pipeline.check_names()?;
        for group in pipeline.model.tied_groups() {
            if group.names.len() < 2 {
                return Err(EngineError::Model(format!(
                    "a tied group needs at least two parameters: {:?}",
                    group.names
                )));
            }
            let at = group
                .names
                .iter()
                .map(|n| {
                    pipeline.locate(n).ok_or_else(|| {
                        EngineError::Model(format!("tied group {:?}: no unit holds a parameter `{n}`", group.names))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let len = pipeline.param(at[0]).len();
            if let Some(&bad) = at.iter().find(|&&a| pipeline.param(a).len() != len) {
                return Err(EngineError::Model(format!(
                    "tied group {:?}: `{}` has shape {:?}, `{}` has {:?}",
                    group.names,
                    group.names[0],
                    pipeline.param(at[0]).shape,
                    pipeline.param(bad).name,
                    pipeline.param(bad).shape
                )));
            }
            let stages_of: Vec<usize> = at.iter().map(|a| a.0).collect();
            let coll = collectives.group(&stages_of)?;
            pipeline
                .primaries
                .extend(group.names[1..].iter().map(|n| (n.clone(), group.names[0].clone())));
            pipeline.tied.push(TiedCopies {
                names: group.names,
                at,
                group: coll,
            });
        }
        Ok(pipeline)
    }

    /// Checks the model's contract that parameter names are unique.
    fn check_names(&self) -> Result<()> {
        let mut seen = std::collections::BTreeMap::new();
        for stage in &self.stages {
            for part in &stage.parts {
                for layer in &part.layers {
                    for p in layer.params() {
                        if let Some(other) = seen.insert(p.name.clone(), layer.name()) {
                            return Err(EngineError::Model(format!(
                                "parameter `{}` is held by both `{other}` and `{}`; names must be unique",
                                p.name,
                                layer.name()
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The model.
    pub fn model(&self) -> &dyn Model<B> {
        self.model.as_ref()
    }

    /// The training options.
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// Number of stages.
    pub fn num_stages(&self) -> usize {
        self.backends.len()
    }

    /// Micro-batches per step (the schedule's).
    pub fn microbatches(&self) -> u32 {
        self.schedule.microbatches
    }

    /// The validated schedule being executed.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// What the validator predicted (peak stashed activations per stage).
    pub fn validation(&self) -> &Validation {
        &self.validation
    }

    /// The backends, one per stage.
    pub fn backends(&self) -> &[B] {
        &self.backends
    }

    /// Per stage: the counters of its receive pool (capacity from the schedule, buffers owned, leases served
    /// from the pool and allocations). After the first step, `allocations()` stays flat and `misses` is 0.
    pub fn receive_pools(&self) -> Vec<PoolStats> {
        self.transport.pool_stats()
    }

    /// Global layer units per part, in pipeline order.
    pub fn ranges(&self) -> &[std::ops::Range<usize>] {
        &self.ranges
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Fails with [`EngineError::Lost`] when a stage's state was lost to a failure.
    fn check_whole(&self) -> Result<()> {
        match &self.lost {
            Some(why) => Err(EngineError::Lost(why.clone())),
            None => Ok(()),
        }
    }

    /// Sets the optimizer step counter (when resuming).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Checks a batch against the model and splits it into per-stage micro-batches.
    fn micro_batches(&self, batch: &Batch) -> Result<Vec<Vec<MicroBatch<B>>>> {
        let m = self.schedule.microbatches as usize;
        let (b, t) = (batch.batch, batch.seq);
        if b == 0 || t == 0 {
            return Err(EngineError::batch(format!("empty batch ({b} sequences of {t} tokens)")));
        }
        if b % m != 0 {
            return Err(EngineError::batch(format!(
                "{m} micro-batches do not divide the batch of {b} sequences; use a batch that is a multiple of {m}"
            )));
        }
        if t > self.model.max_seq() {
            return Err(EngineError::batch(format!(
                "sequence length {t} exceeds the model's context {}",
                self.model.max_seq()
            )));
        }
        if batch.inputs.len() != b * t || batch.targets.len() != b * t {
            return Err(EngineError::batch(format!(
                "batch holds {} inputs / {} targets, expected {}",
                batch.inputs.len(),
                batch.targets.len(),
                b * t
            )));
        }
        let vocab = self.model.vocab_size();
        if let Some((i, tok)) = batch
            .inputs
            .iter()
            .chain(&batch.targets)
            .enumerate()
            .find(|(_, &tok)| tok as usize >= vocab)
        {
            return Err(EngineError::batch(format!(
                "token {tok} at position {i} is outside the vocabulary of {vocab}"
            )));
        }
        let mb_b = b / m;
        let per = mb_b * t;
        let last = self.schedule.placement.num_parts() - 1;
        let loss_scale = 1.0 / (b * t) as f32;
        self.backends
            .iter()
            .zip(&self.stages)
            .map(|(be, stage)| {
                let first_here = stage.parts.iter().any(|p| p.index == 0);
                let last_here = stage.parts.iter().any(|p| p.index == last);
                (0..m)
                    .map(|i| {
                        let range = i * per..(i + 1) * per;
                        Ok(MicroBatch {
                            inputs: if first_here {
                                Some(be.upload_tokens(&batch.inputs[range.clone()])?)
                            } else {
                                None
                            },
                            targets: if last_here {
                                Some(be.upload_tokens(&batch.targets[range])?)
                            } else {
                                None
                            },
                            b: mb_b,
                            t,
                            loss_scale,
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Injects a failure (tests and `BATON_FAIL_AT`); it fires once, at its step or the next.
    pub fn set_failure(&mut self, point: Option<FailurePoint>) {
        self.fail = point;
    }

    /// One training step on `batch` (split into the configured micro-batches).
    ///
    /// On failure the step's partial gradients are dropped and the parameters and optimizer
    /// state are as before the step; if a stage's thread did not come back, the pipeline is
    /// lost and every later call fails with [`EngineError::Lost`].
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepReport> {
        if let Some(why) = &self.lost {
            return Err(EngineError::Lost(why.clone()));
        }
        let started = Instant::now();
        let mbs = self.micro_batches(batch)?;
        let step_no = self.step + 1;
        let fail = match &self.fail {
            Some(f) if f.step.is_none_or(|s| s == step_no) => self.fail.take(),
            _ => None,
        };
        let exec = ExecConfig {
            recompute: self.options.recompute,
            recv_timeout: Duration::from_millis(self.options.recv_timeout_ms),
            fail,
        };
        let stages = std::mem::take(&mut self.stages);
        let run = run_step(
            stages,
            Arc::clone(&self.backends),
            Arc::clone(&self.schedule),
            self.transport.as_ref(),
            mbs,
            &exec,
        );
        let complete = run.stages.iter().all(Option::is_some);
        self.stages = run.stages.into_iter().flatten().collect();
        let outcomes = match run.result {
            Ok(o) => o,
            Err(e) => {
                if complete {
                    self.zero_grads()?;
                } else {
                    self.lost = Some(e.to_string());
                }
                return Err(e);
            }
        };
        let pipeline_s = outcomes
            .iter()
            .flat_map(|o| o.spans.last())
            .map(|s| s.end_s)
            .fold(0.0, f64::max);
        // Loss: per micro-batch sums in micro-batch order, over all tokens.
        let mut losses: Vec<(u32, f64)> = outcomes.iter().flat_map(|o| o.losses.iter().copied()).collect();
        losses.sort_by_key(|&(mb, _)| mb);
        debug_assert_eq!(losses.len(), self.schedule.microbatches as usize);
        let tokens = batch.batch * batch.seq;
        let loss = (losses.iter().map(|&(_, l)| l).sum::<f64>() / tokens as f64) as f32;

        let lr = self.options.optimizer.lr_at(self.step);
        // Reduce gradients (tied copies; data-parallel replicas plug in here), then the global norm for clipping.
        self.reduce_gradients()?;
        let grad_norm = self.grad_norm()?;
        let mut skipped = false;
        let mut nonfinite_stage = None;
        if !loss.is_finite() || !grad_norm.is_finite() {
            self.zero_grads()?;
            self.consecutive_skips += 1;
            let first = outcomes
                .iter()
                .enumerate()
                .filter_map(|(s, o)| o.nonfinite.map(|n| (s, n)))
                .min_by(|a, b| a.1.at_s.total_cmp(&b.1.at_s));
            nonfinite_stage = first.map(|(s, _)| s as u32);
            let what = if loss.is_finite() { "gradient norm" } else { "loss" };
            let error = |policy: String| EngineError::NonFinite {
                what,
                step: step_no,
                stage: first.map(|(s, _)| s as u32),
                action: first.map(|(_, n)| n.action.to_string()).unwrap_or_default(),
                policy,
            };
            match self.options.nonfinite {
                NonFinitePolicy::Abort => return Err(error("aborting (policy: abort)".into())),
                NonFinitePolicy::Skip if self.consecutive_skips >= self.options.max_consecutive_skips => {
                    return Err(error(format!(
                        "{} consecutive skipped steps reach the limit of {}",
                        self.consecutive_skips, self.options.max_consecutive_skips
                    )))
                }
                NonFinitePolicy::Skip => skipped = true,
            }
        } else {
            self.consecutive_skips = 0;
            self.apply_optimizer(lr, grad_norm)?;
            self.step += 1;
        }

        let busy_s: Vec<f64> = outcomes
            .iter()
            .map(|o| o.spans.iter().map(|s| s.end_s - s.start_s).sum())
            .collect();
        let idle_s: Vec<f64> = busy_s.iter().map(|b| (pipeline_s - b).max(0.0)).collect();
        let bubble = if pipeline_s > 0.0 {
            idle_s.iter().sum::<f64>() / (idle_s.len() as f64 * pipeline_s)
        } else {
            0.0
        };
        Ok(StepReport {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens,
            elapsed_s: started.elapsed().as_secs_f64(),
            pipeline_s,
            busy_s,
            idle_s,
            bubble,
            host_per_action_s: outcomes
                .iter()
                .map(|o| o.spans.iter().map(|s| s.host_s).sum::<f64>() / o.spans.len().max(1) as f64)
                .collect(),
            peak_stashed: outcomes.iter().map(|o| o.peak_stashed).collect(),
            peak_stash_bytes: outcomes.iter().map(|o| o.peak_stash_bytes).collect(),
            copies: outcomes.iter().flat_map(|o| o.copies.iter().copied()).collect(),
            spans: outcomes.into_iter().map(|o| o.spans).collect(),
            skipped,
            nonfinite_stage,
        })
    }

    /// Global gradient norm: per-tensor sums of squares added in global (layer, parameter)
    /// order, the tied LM head counted once (through `wte`) — the same for every split. One
    /// read-back per stage.
    fn grad_norm(&self) -> Result<f32> {
        // Each stage contributes `(unit, parameter, sum of squares)` triples (exact in f64 for indices < 2^53)
        // through the stage group, so the norm is the same however stages are spread over processes.
        let mut local: Vec<(usize, Vec<f64>)> = Vec::with_capacity(self.stages.len());
        for (stage, be) in self.stages.iter().zip(self.backends.iter()) {
            let mut keys = Vec::new();
            let mut grads = Vec::new();
            for part in &stage.parts {
                for (unit, layer) in part.units.clone().zip(&part.layers) {
                    for (pi, p) in layer.params().iter().enumerate() {
                        if !self.primaries.contains_key(&p.name) {
                            keys.push((unit, pi));
                            grads.push(&p.grad);
                        }
                    }
                }
            }
            let sums = be.sum_squares_many(&grads)?;
            debug_assert_eq!(sums.len(), keys.len());
            let triples = keys
                .into_iter()
                .zip(sums)
                .flat_map(|((unit, pi), sq)| [unit as f64, pi as f64, sq])
                .collect();
            local.push((stage.index as usize, triples));
        }
        let mut squares: Vec<((u64, u64), f64)> = self
            .stage_group
            .all_gather_host(&local)?
            .iter()
            .flat_map(|v| v.chunks_exact(3).map(|t| ((t[0] as u64, t[1] as u64), t[2])))
            .collect();
        squares.sort_by_key(|&(k, _)| k);
        Ok(squares.iter().map(|&(_, s)| s).sum::<f64>().sqrt() as f32)
    }

    /// Clipping and AdamW for every parameter, then zeroed gradients.
    fn apply_optimizer(&mut self, lr: f32, norm: f32) -> Result<()> {
        let clip = self.options.optimizer.grad_clip;
        let scale = if clip > 0.0 && norm > clip {
            Some((f64::from(clip) / (f64::from(norm) + 1e-6)) as f32)
        } else {
            None
        };
        let o = &self.options.optimizer;
        let step =
            u32::try_from(self.step + 1).map_err(|_| EngineError::config("steps", self.step + 1, "too many steps"))?;
        for (stage, be) in self.stages.iter_mut().zip(self.backends.iter()) {
            for part in &mut stage.parts {
                for layer in &mut part.layers {
                    for p in layer.params_mut() {
                        let cfg = AdamW {
                            lr,
                            beta1: o.beta1,
                            beta2: o.beta2,
                            eps: o.eps,
                            weight_decay: if p.decay { o.weight_decay } else { 0.0 },
                        };
                        be.optimizer_step(&cfg, &mut p.value, &mut p.grad, &mut p.m, &mut p.v, step, scale)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        for (stage, be) in self.stages.iter_mut().zip(self.backends.iter()) {
            for part in &mut stage.parts {
                for layer in &mut part.layers {
                    for p in layer.params_mut() {
                        be.fill_zero(&mut p.grad)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Where a named parameter lives: (stage, chunk, layer, param).
    fn locate(&self, name: &str) -> Option<ParamAt> {
        for (s, stage) in self.stages.iter().enumerate() {
            for (c, part) in stage.parts.iter().enumerate() {
                for (l, layer) in part.layers.iter().enumerate() {
                    if let Some(pi) = layer.params().iter().position(|p| p.name == name) {
                        return Some((s, c, l, pi));
                    }
                }
            }
        }
        None
    }

    fn param(&self, at: ParamAt) -> &Param<B> {
        &self.stages[at.0].parts[at.1].layers[at.2].params()[at.3]
    }

    /// Sums every tied group's gradients into all its copies, in the group's order (`wte + lm_head` for GPT-2),
    /// through the group's collective, so the copies take identical AdamW steps and stay bitwise equal.
    fn reduce_gradients(&mut self) -> Result<()> {
        let Pipeline { tied, stages, .. } = self;
        for tied in tied.iter() {
            // One walk hands out `&mut` to each copy's gradient (the locations are distinct).
            let mut views: Vec<(usize, &mut B::Buf)> = Vec::with_capacity(tied.at.len());
            for (s, stage) in stages.iter_mut().enumerate() {
                for (c, part) in stage.parts.iter_mut().enumerate() {
                    for (l, layer) in part.layers.iter_mut().enumerate() {
                        for (pi, p) in layer.params_mut().iter_mut().enumerate() {
                            if let Some(m) = tied.at.iter().position(|&a| a == (s, c, l, pi)) {
                                views.push((m, &mut p.grad));
                            }
                        }
                    }
                }
            }
            tied.group.all_reduce(&mut views).map_err(|e| match e {
                EngineError::Comm { seam, stage, reason } => EngineError::Comm {
                    seam,
                    stage,
                    reason: format!("summing the tied group {:?}: {reason}", tied.names),
                },
                other => other,
            })?;
        }
        Ok(())
    }

    /// Runs every part in pipeline order, one stage after another on the calling thread,
    /// moving the activation between stages. `step` runs one layer on its stage's backend with
    /// the stage's micro-batch (`mb(stage)`) and returns the next activation. Returns the last
    /// activation and the stage holding it.
    fn sequential<'a>(
        &'a self,
        mb: impl Fn(usize) -> &'a MicroBatch<B>,
        mut step: impl FnMut(&dyn Layer<B>, &B, Option<B::Buf>, &MicroBatch<B>) -> Result<Option<B::Buf>>,
    ) -> Result<(Option<B::Buf>, usize)> {
        let mut x: Option<B::Buf> = None;
        let mut at = 0usize; // stage holding x
        for part in 0..self.schedule.placement.num_parts() {
            let (s, c) = self
                .schedule
                .placement
                .owner(part)
                .ok_or_else(|| EngineError::Invariant {
                    stage: at as u32,
                    what: format!("the placement does not hold part {part}"),
                })?;
            let (s, c) = (s as usize, c as usize);
            if let Some(buf) = x.take() {
                x = Some(self.transport.relay(at, s, buf)?);
            }
            at = s;
            let mb = mb(s);
            for layer in &self.stages[s].parts[c].layers {
                x = step(layer.as_ref(), &self.backends[s], x, mb)?;
            }
        }
        Ok((x, at))
    }

    /// Mean token loss of `batch` without training (forward only, stage by stage).
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f32> {
        self.check_whole()?;
        let mbs = self.micro_batches(batch)?;
        let mut total = 0.0f64;
        (0..self.schedule.microbatches as usize).try_for_each(|i| {
            self.sequential(
                |s| &mbs[s][i],
                |layer, be, x, mb| {
                    let f = layer.forward(be, x, mb)?;
                    if let Some(losses) = &f.losses {
                        total += be.sum(losses)?;
                    }
                    Ok(f.out)
                },
            )
            .map(drop)
        })?;
        Ok((total / (batch.batch * batch.seq) as f64) as f32)
    }

    /// Logits `(t, V)` for one sequence of `t` tokens (for sampling).
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_whole()?;
        let t = tokens.len();
        if t == 0 || t > self.model.max_seq() {
            return Err(EngineError::batch(format!(
                "a prompt of {t} tokens; it must hold 1..={} tokens",
                self.model.max_seq()
            )));
        }
        if let Some(&tok) = tokens.iter().find(|&&tok| tok as usize >= self.model.vocab_size()) {
            return Err(EngineError::batch(format!(
                "token {tok} is outside the vocabulary of {}",
                self.model.vocab_size()
            )));
        }
        // The tokens go only to the stage holding the embedding.
        let first = self.schedule.placement.owner(0).expect("part 0 exists").0 as usize;
        let mbs: Vec<MicroBatch<B>> = self
            .backends
            .iter()
            .enumerate()
            .map(|(s, be)| {
                Ok(MicroBatch {
                    inputs: if s == first {
                        Some(be.upload_tokens(tokens)?)
                    } else {
                        None
                    },
                    targets: None,
                    b: 1,
                    t,
                    loss_scale: 0.0,
                })
            })
            .collect::<Result<_>>()?;
        let (x, at) = self.sequential(|s| &mbs[s], |layer, be, x, mb| layer.infer(be, x, mb).map(Some))?;
        let logits = x.ok_or_else(|| EngineError::Model("the last unit produced no logits".into()))?;
        self.backends[at].download(&logits)
    }

    /// Every parameter on the host, by global name (the tied LM head appears as
    /// `lm_head.weight` beside `wte`).
    pub fn parameters(&self) -> Result<TensorMap> {
        self.check_whole()?;
        self.collect(|p| &p.value)
    }

    /// Every parameter's global name and shape, in pipeline order (stage, chunk, layer), tied copies included.
    pub fn parameter_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        self.check_whole()?;
        let mut parts: Vec<&Part<B>> = self.stages.iter().flat_map(|s| &s.parts).collect();
        parts.sort_by_key(|p| p.index);
        Ok(parts
            .iter()
            .flat_map(|part| &part.layers)
            .flat_map(|layer| layer.params())
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect())
    }

    /// AdamW moments by global name: `(m, v)`.
    pub fn optimizer_state(&self) -> Result<(TensorMap, TensorMap)> {
        self.check_whole()?;
        Ok((self.collect(|p| &p.m)?, self.collect(|p| &p.v)?))
    }

    /// Stage `stage`'s tensors by global name: `(values, adam m, adam v)`; the tied LM head is
    /// included as `lm_head.weight` where the stage holds it.
    pub fn stage_tensors(&self, stage: usize) -> Result<(TensorMap, TensorMap, TensorMap)> {
        self.check_whole()?;
        let be = self.backends.get(stage).ok_or_else(|| {
            EngineError::config(
                "stage",
                stage,
                format!("the pipeline has {} stages", self.backends.len()),
            )
        })?;
        let mut maps = (TensorMap::new(), TensorMap::new(), TensorMap::new());
        for part in &self.stages[stage].parts {
            for layer in &part.layers {
                for p in layer.params() {
                    let t = |b: &B::Buf| -> Result<HostTensor> {
                        Ok(HostTensor {
                            shape: p.shape.clone(),
                            data: be.download(b)?,
                        })
                    };
                    maps.0.insert(p.name.clone(), t(&p.value)?);
                    maps.1.insert(p.name.clone(), t(&p.m)?);
                    maps.2.insert(p.name.clone(), t(&p.v)?);
                }
            }
        }
        Ok(maps)
    }

    fn collect(&self, pick: impl Fn(&Param<B>) -> &B::Buf) -> Result<TensorMap> {
        let mut out = BTreeMap::new();
        for (stage, be) in self.stages.iter().zip(self.backends.iter()) {
            for part in &stage.parts {
                for layer in &part.layers {
                    for p in layer.params() {
                        out.insert(
                            p.name.clone(),
                            HostTensor {
                                shape: p.shape.clone(),
                                data: be.download(pick(p))?,
                            },
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    /// Loads parameters (and optionally AdamW moments) by global name, checking that every
    /// parameter is present with its shape before changing anything. The tied LM head is
    /// loaded from `wte` when `lm_head.weight` is absent.
    pub fn load(&mut self, values: &TensorMap, moments: Option<(&TensorMap, &TensorMap)>) -> Result<()> {
        self.check_whole()?;
        let primaries = &self.primaries;
        let lookup = |map: &TensorMap, p: &Param<B>, what: &str| -> Result<()> {
            let HostTensor { shape, data } =
                stored(primaries, map, &p.name).ok_or_else(|| EngineError::Checkpoint {
                    path: what.into(),
                    reason: format!("missing tensor `{}`", p.name),
                })?;
            if shape != &p.shape || data.len() != p.len() {
                return Err(EngineError::Checkpoint {
                    path: what.into(),
                    reason: format!(
                        "tensor `{}` has shape {shape:?}, the model expects {:?}",
                        p.name, p.shape
                    ),
                });
            }
            Ok(())
        };
        // Check everything first: nothing changes unless all of it fits.
        for stage in &self.stages {
            for part in &stage.parts {
                for layer in &part.layers {
                    for p in layer.params() {
                        lookup(values, p, "parameters")?;
                        if let Some((m, v)) = moments {
                            lookup(m, p, "adam m")?;
                            lookup(v, p, "adam v")?;
                        }
                    }
                }
            }
        }
        for (stage, be) in self.stages.iter_mut().zip(self.backends.iter()) {
            for part in &mut stage.parts {
                for layer in &mut part.layers {
                    for p in layer.params_mut() {
                        let get = |map: &TensorMap| stored(primaries, map, &p.name).map(|h| h.data.clone());
                        let value = get(values).expect("checked above");
                        p.value = be.upload_param(&value)?;
                        if let Some((m, v)) = moments {
                            p.m = be.upload(&get(m).expect("checked above"))?;
                            p.v = be.upload(&get(v).expect("checked above"))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tensor `map` holds for parameter `name`: its own entry, else (for a tied copy) its group's primary's.
fn stored<'m>(primaries: &BTreeMap<String, String>, map: &'m TensorMap, name: &str) -> Option<&'m HostTensor> {
    map.get(name)
        .or_else(|| primaries.get(name).and_then(|primary| map.get(primary)))
}
