//! The `Pipeline`: a GPT split into stages, a validated schedule, and the training step
//! (executor → tied-gradient sum → global norm → clip → AdamW).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use baton_kernels::cpu::AdamW;
use baton_schedules::{
    generate, peak_receive_buffers, peak_receive_buffers_batched, validate, Schedule, ScheduleKind, Validation,
};

use crate::backend::{Backend, PoolStats};
use crate::comm::{Cohort, Collective, Collectives, LocalCollectives, LocalTransport, Transport, Workers};
use crate::compress::{CompressState, Compression, TensorInfo};
use crate::data::Batch;
use crate::data_parallel::{
    assign_owners, last_weight_actions, pick, plan_buckets, Bucket, Codec, CommSpan, DataParallel, ReadyPart, Reducer,
    Slot, StageGrads,
};
use crate::local_sgd::Outer;

mod sync;
mod two_bw;
use crate::error::{EngineError, Result};
use crate::executor::{run_step, ActionSpan, CopySpan, ExecConfig, FailurePoint, GradSink, Part, Stage, StepRun};
use crate::model::{Gpt2, GptConfig, Layer, MicroBatch, Model, Param};
use crate::optim::OptimizerConfig;
use crate::split::StageSplit;
pub use sync::{AUTO_REPLAN_SHARE, AUTO_SLACK_SHARE};
pub use two_bw::WINDOWS_MAX;

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
    /// Batched weight gradients: each part keeps the weight-gradient halves of its micro-batches until the last
    /// one of the step, then computes every weight's gradient in one product over all their tokens. Each weight
    /// and weight gradient is then read once per step instead of once per micro-batch (on the CPU, where that
    /// traffic dominates small micro-batches, the step is faster), and on the CPU backend the gradients — so the
    /// trained weights — are the same bits for any micro-batch count, as one micro-batch of the whole batch gives.
    /// The cost: every micro-batch's weight-gradient stash is held until the part's last one (as GPipe holds its
    /// activations), whatever the schedule.
    #[serde(default)]
    pub batch_weight_grads: bool,
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
            batch_weight_grads: false,
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
    /// Batched weight gradients ([`TrainOptions::batch_weight_grads`]).
    #[serde(default)]
    pub batch_weight_grads: bool,
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
    /// Data-parallel replicas of the pipeline (and ZeRO-1, overlap, buckets).
    #[serde(default)]
    pub data_parallel: DataParallel,
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
            batch_weight_grads: o.batch_weight_grads,
            seed: 1337,
            recv_timeout_ms: o.recv_timeout_ms,
            nonfinite: o.nonfinite,
            max_consecutive_skips: o.max_consecutive_skips,
            data_parallel: DataParallel::default(),
        }
    }

    /// The training options.
    pub fn options(&self) -> TrainOptions {
        TrainOptions {
            optimizer: self.optimizer.clone(),
            recompute: self.recompute,
            batch_weight_grads: self.batch_weight_grads,
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
    /// PipeDream-2BW: per stage, the weight version each action read (empty for other schedules; with a stream of
    /// windows, on the last window's report).
    #[serde(skip)]
    pub weight_versions: Vec<Vec<u64>>,
    /// Per replica, per stage: seconds spent computing actions (`busy_s` is replica 0's).
    pub replica_busy_s: Vec<Vec<f64>>,
    /// Per replica: when its last action ended, seconds since the step began (its pipelined part).
    pub replica_pipeline_s: Vec<f64>,
    /// Per stage: seconds its data-parallel group spent reducing gradients (0 with one replica).
    pub comm_s: Vec<f64>,
    /// Per stage: seconds of gradient reduction after the last replica's schedule ended (what overlap did not
    /// hide).
    pub exposed_comm_s: Vec<f64>,
    /// Payload bytes each replica put into the data-parallel reduction this step (compressed size; under DiLoCo
    /// the outer step's, 0 on inner steps).
    pub reduced_bytes: usize,
    /// Per stage: each bucket's encoding this step (empty with one replica).
    pub compress: Vec<Vec<Compression>>,
    /// DiLoCo: this step ended with an outer step.
    pub outer_step: bool,
    /// Every bucket's reduction (seconds since the step began).
    #[serde(skip)]
    pub comm: Vec<CommSpan>,
    /// The optimizer step was skipped because the loss or gradient norm was not finite.
    pub skipped: bool,
    /// Stage where a non-finite value first appeared (when `skipped`).
    pub nonfinite_stage: Option<u32>,
}

/// Keeps `e` as the failure to report unless one is kept already: a real failure beats a worker that merely
/// stopped because of it (an abort).
pub(crate) fn prefer(failure: &mut Option<EngineError>, e: EngineError) {
    if failure.as_ref().is_none_or(|f| f.is_abort() && !e.is_abort()) {
        *failure = Some(e);
    }
}

/// Runs one job per replica: replica 0's on the calling thread, the others on threads of `scope`; a driver thread
/// that panicked is a failed run with none of its `p` stages back.
pub(crate) fn drive_replicas<'scope, B: Backend, F>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    jobs: Vec<F>,
    p: usize,
) -> Vec<StepRun<B>>
where
    F: FnOnce() -> StepRun<B> + Send + 'scope,
    StepRun<B>: Send + 'scope,
{
    let mut jobs = jobs.into_iter();
    let first = jobs.next();
    let others: Vec<_> = jobs.map(|job| scope.spawn(job)).collect();
    let mut runs = Vec::with_capacity(others.len() + 1);
    if let Some(job) = first {
        runs.push(job());
    }
    for h in others {
        runs.push(h.join().unwrap_or_else(|_| StepRun {
            stages: (0..p).map(|_| None).collect(),
            result: Err(EngineError::Invariant {
                stage: 0,
                what: "a replica's driver thread panicked".into(),
            }),
        }));
    }
    runs
}

/// One replica's buffers to reduce, `[stage]` of `(slot, buffer)`.
pub(crate) type ReplicaViews<'a, B> = Vec<Vec<(Slot, &'a mut <B as Backend>::Buf)>>;

/// Sums every stage's buckets over the replicas, in bucket order, each through its stage's group (fp32 per tensor,
/// to the owner under ZeRO-1, or compressed): `views[r][s]` are replica `r`'s buffers of stage `s` by slot (its
/// gradients, or DiLoCo's outer deltas).
#[allow(clippy::too_many_arguments)]
fn reduce_stages<B: Backend>(
    views: &mut [ReplicaViews<'_, B>],
    buckets: &[Vec<Bucket>],
    codecs: &mut [CompressState],
    infos: &[BTreeMap<Slot, TensorInfo>],
    modes: &[Vec<Compression>],
    backends: &[Arc<Vec<B>>],
    groups: &[Box<dyn Collective<B>>],
    owners: Option<&[BTreeMap<Slot, usize>]>,
    hosted: &[Vec<bool>],
    t0: Instant,
) -> Result<Vec<CommSpan>> {
    let mut spans = Vec::new();
    for (s, (stage_buckets, state)) in buckets.iter().zip(codecs.iter_mut()).enumerate() {
        let mut codec = Codec {
            modes: &modes[s],
            infos: &infos[s],
            state,
            backends: backends.iter().map(|b| &b[s]).collect(),
        };
        if !hosted.iter().any(|h| h[s]) {
            continue; // no replica runs this stage here: its group is reduced by the processes that do
        }
        for (index, bucket) in stage_buckets.iter().enumerate() {
            let grads = views
                .iter_mut()
                .enumerate()
                .filter(|(r, _)| hosted[*r][s])
                .map(|(r, rep)| {
                    let all = rep[s].iter_mut().map(|(k, v)| (*k, &mut **v));
                    pick(all, &bucket.items)
                        .map(|g| (r, g))
                        .ok_or_else(|| EngineError::Invariant {
                            stage: s as u32,
                            what: format!("bucket {index} names a tensor the stage does not hold"),
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let owners = owners.map(|o| &o[s]);
            spans.push(codec.reduce_bucket(groups[s].as_ref(), s, index, bucket, owners, grads, t0)?);
        }
    }
    Ok(spans)
}

/// A step's timing from every replica's stage outcomes: when each replica's last action ended, the latest of those,
/// each stage's busy seconds, replica 0's busy and idle seconds and its bubble (idle / (stages × pipeline time)).
pub(crate) struct Timing {
    pub replica_pipeline_s: Vec<f64>,
    pub pipeline_s: f64,
    pub replica_busy_s: Vec<Vec<f64>>,
    pub busy_s: Vec<f64>,
    pub idle_s: Vec<f64>,
    pub bubble: f64,
}

impl Timing {
    pub(crate) fn of(outcomes: &[Vec<crate::executor::StageOutcome>]) -> Timing {
        let replica_pipeline_s: Vec<f64> = outcomes
            .iter()
            .map(|o| {
                o.iter()
                    .flat_map(|o| o.spans.last())
                    .map(|s| s.end_s)
                    .fold(0.0, f64::max)
            })
            .collect();
        let pipeline_s = replica_pipeline_s.iter().copied().fold(0.0, f64::max);
        let replica_busy_s: Vec<Vec<f64>> = outcomes
            .iter()
            .map(|o| {
                o.iter()
                    .map(|o| o.spans.iter().map(|s| s.end_s - s.start_s).sum())
                    .collect()
            })
            .collect();
        let busy_s = replica_busy_s.first().cloned().unwrap_or_default();
        let idle_s: Vec<f64> = busy_s.iter().map(|b| (pipeline_s - b).max(0.0)).collect();
        let bubble = if pipeline_s > 0.0 {
            idle_s.iter().sum::<f64>() / (idle_s.len() as f64 * pipeline_s)
        } else {
            0.0
        };
        Timing {
            replica_pipeline_s,
            pipeline_s,
            replica_busy_s,
            busy_s,
            idle_s,
            bubble,
        }
    }
}

/// Where a parameter lives: (stage, chunk, layer in the part, parameter in the layer).
type ParamAt = (usize, usize, usize, usize);

/// A tied group as one replica holds it: the collective over the workers of its copies, and where each is.
struct TiedCopies<B: Backend> {
    names: Vec<String>,
    at: Vec<ParamAt>,
    group: Box<dyn Collective<B>>,
}

/// One replica of the pipeline: its stages, their backends and its seams.
struct Replica<B: Backend> {
    backends: Arc<Vec<B>>,
    transport: Arc<dyn Transport<B>>,
    tied: Vec<TiedCopies<B>>,
    stages: Vec<Stage<B>>,
}

/// A model split into pipeline stages on backend `B`, trained with a validated schedule, in `D` data-parallel
/// replicas (one by default) on this process's workers. A step runs the schedule on every replica (activations and
/// gradients through each replica's [`Transport`]), sums the gradients across replicas in replica order (bucketed,
/// overlapped with the schedule; see [`crate::data_parallel`]), sums tied groups, clips by the global norm
/// (through the [`Collective`] over every worker) and steps AdamW (under ZeRO-1 each tensor on its owner, then
/// broadcast). Every replica holds the same parameters after every step, bit for bit.
pub struct Pipeline<B: Backend> {
    model: Arc<dyn Model<B>>,
    options: TrainOptions,
    dp: DataParallel,
    schedule: Arc<Schedule>,
    validation: Validation,
    ranges: Vec<std::ops::Range<usize>>,
    replicas: Vec<Replica<B>>,
    /// `[replica][stage]`: whether this process runs the worker (all true in one process). A worker run elsewhere
    /// keeps an empty stage here (its parts, no layers).
    hosted: Vec<Vec<bool>>,
    /// Per stage, per chunk, per layer: the parameters' names and sizes, known on every process.
    meta: Vec<Vec<MetaPart>>,
    /// The job's processes when workers run in several.
    cohort: Option<Arc<dyn Cohort>>,
    /// Every worker (`replica·p + stage`): the global gradient norm.
    world: Box<dyn Collective<B>>,
    /// Per stage: its group across the replicas (member `r` = replica `r`); empty with one replica.
    dp_groups: Vec<Box<dyn Collective<B>>>,
    /// Per stage: the gradient buckets, in readiness order.
    buckets: Vec<Vec<Bucket>>,
    /// Per stage: the replica that takes each tensor's norm and (ZeRO-1) holds its moments and steps it.
    owners: Vec<BTreeMap<Slot, usize>>,
    /// Each non-primary copy of a tied parameter → its group's primary (not counted again in the gradient norm;
    /// where a checkpoint without the copy loads it from).
    primaries: BTreeMap<String, String>,
    /// Per stage: every tensor's name and shape (for compression).
    infos: Vec<BTreeMap<Slot, TensorInfo>>,
    /// Per stage: what compression carries between steps (residuals, PowerSGD's `Q`).
    codecs: Vec<CompressState>,
    /// Per stage, per bucket: `auto`'s current choice.
    auto_plan: Vec<Vec<Compression>>,
    /// What `auto`'s plan was made from: (schedule seconds, bytes per second).
    auto_basis: Option<(f64, f64)>,
    /// DiLoCo's anchor and outer momentum (made at the first step).
    outer: Option<Outer<B>>,
    /// PipeDream-2BW: the older weight version (`[stage]`), which the next window reads.
    two_bw_prev: Option<Vec<crate::executor::StageValues<B>>>,
    step: u64,
    /// Set when a failure took some stage's state with it; every later step fails.
    lost: Option<String>,
    /// A failure to inject on a replica (see [`FailurePoint`]); cleared once it fires.
    fail: Option<(usize, FailurePoint)>,
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
    collectives: Option<CollectivesFor<B>>,
    data_parallel: DataParallel,
    hosting: Option<Hosting<B>>,
}

/// The workers this process runs when a pipeline is spread over processes.
pub struct Hosting<B: Backend> {
    /// Workers (`replica·p + stage`) run here.
    pub workers: Vec<usize>,
    /// One transport per replica, made from every replica's backends (e.g. MPI between processes).
    pub transports: MakeTransports<B>,
    /// The job's processes (checkpoints are written by all of them together).
    pub cohort: Arc<dyn Cohort>,
}

/// Makes one transport per replica from every replica's backends (`[replica]`, each one backend per stage).
pub type MakeTransports<B> = Box<dyn FnOnce(&[Arc<Vec<B>>]) -> Result<Vec<Arc<dyn Transport<B>>>>>;

/// A parameter's name and sizes.
#[derive(Clone, Debug)]
struct ParamMeta {
    name: String,
    shape: Vec<usize>,
    len: usize,
    grad_bytes: usize,
}

/// What every process knows about one part: each layer's name and parameters.
#[derive(Clone, Debug)]
struct MetaPart {
    layers: Vec<(String, Vec<ParamMeta>)>,
}

impl MetaPart {
    fn of<B: Backend>(layers: &[Box<dyn Layer<B>>], be: &B) -> MetaPart {
        MetaPart {
            layers: layers
                .iter()
                .map(|l| {
                    let params = l
                        .params()
                        .iter()
                        .map(|p| ParamMeta {
                            name: p.name.clone(),
                            shape: p.shape.clone(),
                            len: p.len(),
                            grad_bytes: be.bytes(&p.grad),
                        })
                        .collect();
                    (l.name(), params)
                })
                .collect(),
        }
    }

    /// Every parameter with its (layer, parameter) position.
    fn params(&self) -> impl Iterator<Item = ((usize, usize), &ParamMeta)> + '_ {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(l, (_, ps))| ps.iter().enumerate().map(move |(pi, p)| ((l, pi), p)))
    }
}

/// Makes the collectives for the workers a pipeline is built on (e.g. NCCL communicators over its GPUs).
pub type MakeCollectives<B> = Box<dyn FnOnce(&Workers<B>) -> Result<Arc<dyn Collectives<B>>>>;

/// The collectives a builder was given: made already, or made once the workers exist.
enum CollectivesFor<B: Backend> {
    Given(Arc<dyn Collectives<B>>),
    Make(MakeCollectives<B>),
}

impl<B: Backend> PipelineBuilder<B> {
    /// Data-parallel replicas (default: one): `build` then takes `replicas × stages` backends, replica-major
    /// (`backends[r·p + s]` runs stage `s` of replica `r`).
    pub fn data_parallel(mut self, dp: DataParallel) -> Self {
        self.data_parallel = dp;
        self
    }

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
    /// the schedule; one per replica). A transport given here serves one replica, so it needs `replicas == 1`.
    pub fn transport(mut self, transport: Arc<dyn Transport<B>>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Makes the groups the optimizer phase reduces over (default: [`LocalCollectives`] over every backend). Group
    /// members are named by worker: `replica·p + stage`.
    pub fn collectives(mut self, collectives: Arc<dyn Collectives<B>>) -> Self {
        self.collectives = Some(CollectivesFor::Given(collectives));
        self
    }

    /// Runs only some workers in this process (see [`Hosting`]); the others run in other processes, which build
    /// the same pipeline with theirs. `build` still takes every worker's backend; those of workers run elsewhere
    /// are never used. The collectives (see [`PipelineBuilder::collectives_for`]) must reach the other processes
    /// too.
    pub fn hosting(mut self, hosting: Hosting<B>) -> Self {
        self.hosting = Some(hosting);
        self
    }

    /// Makes the collectives from the workers once `build` has them (every replica's backends): for
    /// implementations that need the devices up front, such as NCCL communicators created in a fixed order.
    pub fn collectives_for(
        mut self,
        make: impl FnOnce(&Workers<B>) -> Result<Arc<dyn Collectives<B>>> + 'static,
    ) -> Self {
        self.collectives = Some(CollectivesFor::Make(Box::new(make)));
        self
    }

    /// Validates the schedule, splits the model and builds every stage's units on its backend (`backends[s]` for
    /// stage `s`; with `D` replicas, `backends[r·p + s]`).
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
            self.data_parallel,
            self.hosting,
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
            config.data_parallel.clone(),
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
            data_parallel: DataParallel::default(),
            hosting: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model: Arc<dyn Model<B>>,
        schedule: Schedule,
        split: &StageSplit,
        options: TrainOptions,
        backends: Vec<B>,
        transport: Option<Arc<dyn Transport<B>>>,
        collectives: Option<CollectivesFor<B>>,
        dp: DataParallel,
        hosting: Option<Hosting<B>>,
    ) -> Result<Self> {
        options.validate()?;
        dp.validate()?;
        let p = schedule.stages() as usize;
        let d = dp.replicas as usize;
        let (hosted, make_transports, cohort) = match hosting {
            None => (vec![vec![true; p]; d], None, None),
            Some(Hosting {
                workers,
                transports: make,
                cohort,
            }) => {
                let mut hosted = vec![vec![false; p]; d];
                for &w in &workers {
                    let slot = hosted.get_mut(w / p.max(1)).and_then(|r| r.get_mut(w % p.max(1)));
                    match slot {
                        Some(h) if !*h => *h = true,
                        _ => {
                            return Err(EngineError::config(
                                "hosting",
                                w,
                                format!("a worker given twice or beyond the {d} × {p} workers"),
                            ))
                        }
                    }
                }
                if workers.is_empty() {
                    return Err(EngineError::config("hosting", 0, "this process runs no worker"));
                }
                if transport.is_some() {
                    return Err(EngineError::config(
                        "transport",
                        "custom",
                        "a pipeline spread over processes takes its transports from `hosting`",
                    ));
                }
                let everywhere = workers.len() == d * p;
                if !everywhere && schedule.kind == ScheduleKind::TwoBw {
                    return Err(EngineError::config(
                        "schedule",
                        "2bw",
                        "PipeDream-2BW runs in one process (its updater thread holds every stage)",
                    ));
                }
                if !everywhere && dp.sync.is_local() {
                    return Err(EngineError::config(
                        "sync",
                        dp.sync.to_string(),
                        "local SGD (DiLoCo) runs in one process for now",
                    ));
                }
                if !everywhere && dp.compress != Compression::None {
                    return Err(EngineError::config(
                        "compress",
                        dp.compress.to_string(),
                        "compressed reductions run in one process for now",
                    ));
                }
                (hosted, Some(make), Some(cohort))
            }
        };
        if backends.len() != p * d {
            return Err(EngineError::config(
                "stages",
                p,
                if d == 1 {
                    format!(
                        "the schedule has {p} stages but {} backends (devices) were given",
                        backends.len()
                    )
                } else {
                    format!(
                        "{d} replicas of {p} stages need {} backends (devices), {} were given",
                        d * p,
                        backends.len()
                    )
                },
            ));
        }
        if transport.is_some() && d > 1 {
            return Err(EngineError::config(
                "transport",
                "custom",
                format!("a transport serves one replica; {d} replicas use one in-process transport each"),
            ));
        }
        let validation = validate(&schedule)?;
        let parts = schedule.placement.num_parts() as usize;
        let ranges = split.resolve(model.as_ref(), parts)?;
        // Batched weight gradients hold the received buffers their stashes read until each part's last B/W.
        let pools = if options.batch_weight_grads {
            peak_receive_buffers_batched(&schedule)?
        } else {
            peak_receive_buffers(&schedule)?
        };
        let mut replicas = Vec::with_capacity(d);
        let mut transport = transport;
        let mut given = backends.into_iter();
        let mut meta: Vec<Option<Vec<MetaPart>>> = vec![None; p];
        for hosted_r in &hosted {
            let backends: Vec<B> = given.by_ref().take(p).collect();
            let mut stages = Vec::with_capacity(p);
            for (s, be) in backends.iter().enumerate() {
                let mut chunk_parts = Vec::new();
                for chunk in 0..schedule.chunks() {
                    let index = schedule.placement.part(s as u32, chunk).ok_or_else(|| {
                        EngineError::Schedule(baton_schedules::ScheduleError::Placement(format!(
                            "the placement gives stage {s} no part for chunk {chunk}"
                        )))
                    })?;
                    let units = ranges[index as usize].clone();
                    let layers = if hosted_r[s] {
                        units
                            .clone()
                            .map(|u| model.build_unit(u, be))
                            .collect::<Result<Vec<_>>>()?
                    } else {
                        Vec::new()
                    };
                    chunk_parts.push(Part { index, units, layers });
                }
                if hosted_r[s] && meta[s].is_none() {
                    meta[s] = Some(chunk_parts.iter().map(|c| MetaPart::of(&c.layers, be)).collect());
                }
                stages.push(Stage {
                    index: s as u32,
                    parts: chunk_parts,
                });
            }
            replicas.push((backends, stages));
        }
        // Stages no replica runs here: their parameters' names and sizes from units built one at a time and dropped.
        let mut meta_of = Vec::with_capacity(p);
        for (s, m) in meta.into_iter().enumerate() {
            match m {
                Some(m) => meta_of.push(m),
                None => {
                    let be = &replicas[0].0[s];
                    let mut parts = Vec::new();
                    for part in &replicas[0].1[s].parts {
                        let mut layers = Vec::new();
                        for u in part.units.clone() {
                            let layer = model.build_unit(u, be)?;
                            layers.extend(MetaPart::of(std::slice::from_ref(&layer), be).layers);
                        }
                        parts.push(MetaPart { layers });
                    }
                    meta_of.push(parts);
                }
            }
        }
        let all_backends: Vec<Arc<Vec<B>>> = replicas.iter_mut().map(|(b, _)| Arc::new(std::mem::take(b))).collect();
        let mut transports: Vec<Arc<dyn Transport<B>>> = match make_transports {
            Some(make) => {
                let t = make(&all_backends)?;
                if t.len() != d {
                    return Err(EngineError::config(
                        "transport",
                        t.len(),
                        format!("{} transports for {d} replicas", t.len()),
                    ));
                }
                t
            }
            None => Vec::new(),
        };
        transports.reverse();
        let replicas: Vec<Replica<B>> = all_backends
            .into_iter()
            .zip(replicas)
            .map(|(backends, (_, stages))| {
                let transport: Arc<dyn Transport<B>> = match transports.pop().or_else(|| transport.take()) {
                    Some(t) => t,
                    None => Arc::new(LocalTransport::new(Arc::clone(&backends), &pools)?),
                };
                if transport.stages() != p {
                    return Err(EngineError::config(
                        "transport",
                        transport.stages(),
                        format!(
                            "the transport connects {} stages, the schedule has {p}",
                            transport.stages()
                        ),
                    ));
                }
                Ok(Replica {
                    backends,
                    transport,
                    tied: Vec::new(),
                    stages,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let workers = Workers::new(replicas.iter().map(|r| Arc::clone(&r.backends)).collect())?;
        let collectives: Arc<dyn Collectives<B>> = match collectives {
            Some(CollectivesFor::Given(c)) => c,
            Some(CollectivesFor::Make(make)) => make(&workers)?,
            None => Arc::new(LocalCollectives::over(workers)),
        };
        let world = collectives.group(&(0..p * d).collect::<Vec<_>>())?;
        let dp_groups = if d > 1 {
            (0..p)
                .map(|s| collectives.group(&(0..d).map(|r| r * p + s).collect::<Vec<_>>()))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let mut pipeline = Pipeline {
            model,
            options,
            dp,
            schedule: Arc::new(schedule),
            validation,
            ranges,
            replicas,
            hosted,
            meta: meta_of,
            cohort,
            world,
            dp_groups,
            buckets: Vec::new(),
            owners: Vec::new(),
            primaries: BTreeMap::new(),
            infos: Vec::new(),
            codecs: (0..p).map(|_| CompressState::new(d)).collect(),
            auto_plan: Vec::new(),
            auto_basis: None,
            outer: None,
            two_bw_prev: None,
            step: 0,
            lost: None,
            fail: None,
            consecutive_skips: 0,
        };
        pipeline.check_names()?;
        let mut tied_slots = Vec::new();
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
            let len = pipeline.param(at[0]).len;
            if let Some(&bad) = at.iter().find(|&&a| pipeline.param(a).len != len) {
                return Err(EngineError::Model(format!(
                    "tied group {:?}: `{}` has shape {:?}, `{}` has {:?}",
                    group.names,
                    group.names[0],
                    pipeline.param(at[0]).shape,
                    pipeline.param(bad).name,
                    pipeline.param(bad).shape
                )));
            }
            pipeline
                .primaries
                .extend(group.names[1..].iter().map(|n| (n.clone(), group.names[0].clone())));
            tied_slots.push(at.iter().map(|a| (a.0, (a.1, a.2, a.3))).collect::<Vec<_>>());
            for r in 0..d {
                let workers: Vec<usize> = at.iter().map(|a| r * p + a.0).collect();
                let coll = collectives.group(&workers)?;
                pipeline.replicas[r].tied.push(TiedCopies {
                    names: group.names.clone(),
                    at: at.clone(),
                    group: coll,
                });
            }
        }
        // Buckets and owners depend only on the shapes and the schedule: the same on every replica.
        let bucket_bytes = pipeline.dp.bucket_bytes();
        let mut sizes = Vec::with_capacity(p);
        for (s, parts) in pipeline.meta.iter().enumerate() {
            let grad_bytes: Vec<Vec<Vec<usize>>> = parts
                .iter()
                .map(|part| {
                    part.layers
                        .iter()
                        .map(|(_, ps)| ps.iter().map(|p| p.grad_bytes).collect())
                        .collect()
                })
                .collect();
            pipeline.buckets.push(plan_buckets(
                &last_weight_actions(&pipeline.schedule, s),
                &grad_bytes,
                bucket_bytes,
            ));
            let params = || {
                parts
                    .iter()
                    .enumerate()
                    .flat_map(|(c, part)| part.params().map(move |((l, pi), prm)| ((c, l, pi), prm)))
            };
            sizes.push(params().map(|(slot, prm)| (slot, prm.len)).collect::<Vec<_>>());
            pipeline.infos.push(
                params()
                    .map(|(slot, prm)| {
                        (
                            slot,
                            TensorInfo {
                                name: prm.name.clone(),
                                shape: prm.shape.clone(),
                            },
                        )
                    })
                    .collect(),
            );
        }
        pipeline.auto_plan = pipeline
            .buckets
            .iter()
            .map(|b| vec![Compression::None; b.len()])
            .collect();
        pipeline.owners = assign_owners(d, &sizes, &tied_slots);
        // ZeRO-1: only a tensor's owner keeps its moments.
        let sharded = pipeline.sharded();
        let Pipeline { replicas, owners, .. } = &mut pipeline;
        for (r, replica) in replicas.iter_mut().enumerate() {
            for (s, (stage, be)) in replica.stages.iter_mut().zip(replica.backends.iter()).enumerate() {
                for (slot, prm) in stage.params_mut() {
                    if !steps_on(owners, sharded, r, s, slot) {
                        prm.m = be.zeros_state(0)?;
                        prm.v = be.zeros_state(0)?;
                    }
                }
            }
        }
        Ok(pipeline)
    }

    /// Checks the model's contract that parameter names are unique.
    fn check_names(&self) -> Result<()> {
        let mut seen = std::collections::BTreeMap::new();
        for part in self.meta.iter().flatten() {
            for (layer, params) in &part.layers {
                for p in params {
                    if let Some(other) = seen.insert(p.name.clone(), layer.clone()) {
                        return Err(EngineError::Model(format!(
                            "parameter `{}` is held by both `{other}` and `{layer}`; names must be unique",
                            p.name
                        )));
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

    /// The data-parallel layout.
    pub fn data_parallel(&self) -> &DataParallel {
        &self.dp
    }

    /// Data-parallel replicas.
    pub fn num_replicas(&self) -> usize {
        self.replicas.len()
    }

    /// Whether ZeRO-1 shards the optimizer state (asked for, and more than one replica to shard it over).
    fn sharded(&self) -> bool {
        self.dp.zero && self.replicas.len() > 1
    }

    /// Number of stages (of one replica).
    pub fn num_stages(&self) -> usize {
        self.replicas[0].backends.len()
    }

    /// Micro-batches per step and replica (the schedule's).
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

    /// The backends of replica 0, one per stage.
    pub fn backends(&self) -> &[B] {
        &self.replicas[0].backends
    }

    /// The backends of replica `r`, one per stage.
    pub fn replica_backends(&self, r: usize) -> Option<&[B]> {
        self.replicas.get(r).map(|rep| rep.backends.as_slice())
    }

    /// Per stage of replica 0: the counters of its receive pool (capacity from the schedule, buffers owned, leases
    /// served from the pool and allocations). After the first step, `allocations()` stays flat and `misses` is 0.
    pub fn receive_pools(&self) -> Vec<PoolStats> {
        self.replicas[0].transport.pool_stats()
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

    /// The bytes one replica would put into each step's data-parallel reduction as fp32 (0 with one replica): what
    /// compression is measured against.
    pub fn dense_reduce_bytes(&self) -> usize {
        if self.replicas.len() > 1 {
            self.buckets.iter().flatten().map(|b| b.bytes).sum()
        } else {
            0
        }
    }

    /// Per part (pipeline order): the gradient bytes one replica puts into the data-parallel reduction.
    pub fn grad_bytes_per_part(&self) -> Vec<usize> {
        let mut out = vec![0usize; self.schedule.placement.num_parts() as usize];
        let rep = &self.replicas[0];
        for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
            for part in &stage.parts {
                out[part.index as usize] += part
                    .layers
                    .iter()
                    .flat_map(|l| l.params())
                    .map(|p| be.bytes(&p.grad))
                    .sum::<usize>();
            }
        }
        out
    }

    /// Per replica, per stage: bytes of AdamW moments it holds (halved per replica by ZeRO-1 with two replicas).
    /// A worker run by another process counts what it holds there: the moments (fp32, two per element) of the
    /// parameters it steps, from the shapes every process knows.
    pub fn optimizer_bytes(&self) -> Vec<Vec<usize>> {
        /// Bytes of both AdamW moments of one element (`zeros_state` is fp32 on every backend).
        const MOMENT_BYTES_PER_ELEMENT: usize = 2 * std::mem::size_of::<f32>();
        let sharded = self.sharded();
        self.replicas
            .iter()
            .enumerate()
            .map(|(r, rep)| {
                rep.stages
                    .iter()
                    .zip(rep.backends.iter())
                    .enumerate()
                    .map(|(s, (stage, be))| {
                        if self.hosted[r][s] {
                            return stage
                                .parts
                                .iter()
                                .flat_map(|part| &part.layers)
                                .flat_map(|l| l.params())
                                .map(|p| be.bytes(&p.m) + be.bytes(&p.v))
                                .sum();
                        }
                        self.meta[s]
                            .iter()
                            .enumerate()
                            .flat_map(|(c, part)| part.params().map(move |((l, pi), p)| ((c, l, pi), p)))
                            .filter(|&(slot, _)| steps_on(&self.owners, sharded, r, s, slot))
                            .map(|(_, p)| p.len * MOMENT_BYTES_PER_ELEMENT)
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }

    /// Checks a global batch against the model and splits it: each replica's shard (contiguous sequences, replica
    /// order), then each shard into per-stage micro-batches. `[replica][stage][micro-batch]`.
    fn micro_batches(&self, batch: &Batch) -> Result<Vec<Vec<Vec<MicroBatch<B>>>>> {
        self.check_batch(batch)?;
        let (m, d) = (self.schedule.microbatches as usize, self.replicas.len());
        let mb_b = batch.batch / (m * d);
        (0..d)
            .map(|r| self.upload_micro_batches(batch, r, r * m, m, mb_b))
            .collect()
    }

    /// Checks a global batch against the model and the layout: `replicas × micro-batches` divide it, the sequence
    /// fits the context, every token is in the vocabulary.
    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let m = self.schedule.microbatches as usize;
        let d = self.replicas.len();
        let (b, t) = (batch.batch, batch.seq);
        if b == 0 || t == 0 {
            return Err(EngineError::batch(format!("empty batch ({b} sequences of {t} tokens)")));
        }
        if b % (m * d) != 0 {
            return Err(EngineError::batch(if d == 1 {
                format!(
                    "{m} micro-batches do not divide the batch of {b} sequences; use a batch that is a multiple of {m}"
                )
            } else {
                format!(
                    "{d} replicas × {m} micro-batches do not divide the batch of {b} sequences; use a batch that is a \
                     multiple of {}",
                    d * m
                )
            }));
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
        Ok(())
    }

    /// Micro-batches `first..first + count` of `mb_b` sequences of `batch`, for every stage of replica `r`.
    fn upload_micro_batches(
        &self,
        batch: &Batch,
        r: usize,
        first: usize,
        count: usize,
        mb_b: usize,
    ) -> Result<Vec<Vec<MicroBatch<B>>>> {
        let t = batch.seq;
        let per = mb_b * t;
        let last = self.schedule.placement.num_parts() - 1;
        // Every micro-batch's loss is scaled by the global token count: the replicas' gradients add up to the mean.
        let loss_scale = 1.0 / (batch.batch * t) as f32;
        let rep = &self.replicas[r];
        rep.backends
            .iter()
            .zip(&rep.stages)
            .enumerate()
            .map(|(s, (be, stage))| {
                if !self.hosted[r][s] {
                    return Ok(Vec::new()); // run by another process
                }
                let first_here = stage.parts.iter().any(|p| p.index == 0);
                let last_here = stage.parts.iter().any(|p| p.index == last);
                (first..first + count)
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

    /// Injects a failure on replica 0 (tests and `BATON_FAIL_AT`); it fires once, at its step or the next.
    pub fn set_failure(&mut self, point: Option<FailurePoint>) {
        self.fail = point.map(|p| (0, p));
    }

    /// Injects a failure on replica `replica`; it fires once, at its step or the next.
    pub fn set_replica_failure(&mut self, replica: usize, point: FailurePoint) -> Result<()> {
        if replica >= self.replicas.len() {
            return Err(EngineError::config(
                "replica",
                replica,
                format!("the pipeline has {} replicas", self.replicas.len()),
            ));
        }
        self.fail = Some((replica, point));
        Ok(())
    }

    /// Runs the schedule on every replica at once (one thread per replica above its stage threads; replica 0 on
    /// the calling thread), with each stage's reducer thread summing buckets as they become final when overlap is
    /// on. Returns each replica's run and, with overlap, every stage's reduced gradients and bucket spans.
    #[allow(clippy::type_complexity)]
    fn run_replicas(
        &mut self,
        mbs: Vec<Vec<Vec<MicroBatch<B>>>>,
        exec: &[ExecConfig],
        t0: Instant,
        modes: &[Vec<Compression>],
    ) -> (Vec<StepRun<B>>, Option<Result<Vec<(StageGrads<B>, Vec<CommSpan>)>>>) {
        let d = self.replicas.len();
        let p = self.num_stages();
        let schedule = Arc::clone(&self.schedule);
        let overlap = d > 1 && self.dp.overlap && !self.dp.sync.is_local();
        let timeout = Duration::from_millis(self.options.recv_timeout_ms) * 4;
        let abort = AtomicBool::new(false);
        let sharded = self.sharded();
        let Pipeline {
            replicas,
            dp_groups,
            buckets,
            owners,
            codecs,
            infos,
            hosted,
            ..
        } = self;
        let hosted: &Vec<Vec<bool>> = hosted;
        let stage_sets: Vec<Vec<Stage<B>>> = replicas.iter_mut().map(|r| std::mem::take(&mut r.stages)).collect();
        let replicas: &Vec<Replica<B>> = replicas;
        let mut states = codecs.iter_mut();
        std::thread::scope(|scope| {
            let mut reducers = Vec::new();
            let mut senders = Vec::new();
            if overlap {
                for s in 0..p {
                    let Some(state) = states.next() else { break };
                    let (tx, rx) = crossbeam_channel::unbounded::<ReadyPart<B>>();
                    senders.push(tx);
                    let mut reducer = Reducer {
                        stage: s,
                        group: dp_groups[s].as_ref(),
                        buckets: &buckets[s],
                        owners: sharded.then(|| &owners[s]),
                        replicas: d,
                        here: hosted.iter().map(|h| h[s]).collect(),
                        chunks: schedule.chunks() as usize,
                        t0,
                        codec: Codec {
                            modes: &modes[s],
                            infos: &infos[s],
                            state,
                            backends: replicas.iter().map(|r| &r.backends[s]).collect(),
                        },
                    };
                    let abort = &abort;
                    reducers.push(scope.spawn(move || {
                        let out = reducer.run(&rx, abort, timeout);
                        if out.is_err() {
                            abort.store(true, Ordering::SeqCst);
                        }
                        out
                    }));
                }
            }
            let sink = |r: usize| -> Option<GradSink<B>> {
                overlap.then(|| {
                    let senders = senders.clone();
                    let sink: GradSink<B> = Arc::new(move |stage, chunk, grads| {
                        senders[stage]
                            .send(ReadyPart {
                                replica: r,
                                chunk,
                                grads,
                            })
                            // The reducer only goes away when the step failed elsewhere (its own error, or an
                            // abort it saw): this worker merely stops because of that failure, which is the one to
                            // report.
                            .map_err(|_| EngineError::Aborted { stage: stage as u32 })
                    });
                    sink
                })
            };
            let mut mbs = mbs.into_iter();
            let mut jobs = Vec::with_capacity(d);
            for (r, (rep, stages)) in replicas.iter().zip(stage_sets).enumerate() {
                let mbs = mbs.next().unwrap_or_default();
                let sink = sink(r);
                let backends = Arc::clone(&rep.backends);
                let schedule = Arc::clone(&schedule);
                let transport = Arc::clone(&rep.transport);
                let exec = &exec[r];
                let abort = &abort;
                jobs.push(move || {
                    let run = run_step(stages, backends, schedule, transport.as_ref(), mbs, exec, sink, None);
                    if run.result.is_err() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    run
                });
            }
            drop(senders);
            let runs = drive_replicas(scope, jobs, p);
            let reduced = overlap.then(|| {
                reducers
                    .into_iter()
                    .enumerate()
                    .map(|(s, h)| {
                        h.join().unwrap_or_else(|_| {
                            Err(EngineError::Invariant {
                                stage: s as u32,
                                what: "a data-parallel reducer panicked".into(),
                            })
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            });
            (runs, reduced)
        })
    }

    /// One training step on the global `batch`: each replica's shard split into the configured micro-batches.
    ///
    /// On failure the step's partial gradients are dropped and the parameters and optimizer
    /// state are as before the step; if a stage's thread did not come back, the pipeline is
    /// lost and every later call fails with [`EngineError::Lost`].
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepReport> {
        if let Some(why) = &self.lost {
            return Err(EngineError::Lost(why.clone()));
        }
        if self.schedule.kind == ScheduleKind::TwoBw {
            // One window, flushed; `train_windows` streams several.
            let mut reports = self.train_windows(std::slice::from_ref(batch))?;
            return reports.pop().ok_or_else(|| EngineError::Invariant {
                stage: 0,
                what: "a 2BW window without a report".into(),
            });
        }
        let started = Instant::now();
        let mbs = self.micro_batches(batch)?;
        let step_no = self.step + 1;
        let fail = match &self.fail {
            Some((_, f)) if f.step.is_none_or(|s| s == step_no) => self.fail.take(),
            _ => None,
        };
        let d = self.replicas.len();
        let exec = self.exec_configs(fail.as_ref());
        let local = self.dp.sync.is_local();
        if local && self.outer.is_none() {
            self.outer = Some(self.anchor_here()?);
        }
        let modes = self.step_modes();
        let (runs, reduced) = self.run_replicas(mbs, &exec, started, &modes);
        let (complete, outcomes, mut failure) = self.take_back(runs);
        let reduced = match reduced {
            Some(Err(e)) => {
                prefer(&mut failure, e);
                None
            }
            Some(Ok(r)) => Some(r),
            None => None,
        };
        if let Some(e) = failure {
            if complete {
                self.zero_grads()?;
            } else {
                self.lost = Some(e.to_string());
            }
            return Err(e);
        }
        let mut outcomes = outcomes;
        self.gather_outcomes(&mut outcomes)?;
        let timing = Timing::of(&outcomes);
        let pipeline_s = timing.pipeline_s;
        // Loss: per micro-batch sums in (replica, micro-batch) order — the global micro-batch order — over all
        // tokens.
        let mut losses = Self::losses_of(&outcomes);
        losses.sort_by_key(|&(r, mb, _)| (r, mb));
        debug_assert_eq!(losses.len(), d * self.schedule.microbatches as usize);
        let tokens = batch.batch * batch.seq;
        let loss = (losses.iter().map(|&(_, _, l)| l).sum::<f64>() / tokens as f64) as f32;

        let lr = self.options.optimizer.lr_at(self.step);
        // Across replicas (bucketed; already done during the schedule with overlap), then tied groups, then the
        // global norm for clipping.
        let p = self.num_stages();
        let mut comm = Vec::new();
        let after_schedule = started.elapsed().as_secs_f64();
        match reduced {
            Some(stages) => {
                for (s, (grads, spans)) in stages.into_iter().enumerate() {
                    self.install_grads(s, grads)?;
                    comm.extend(spans);
                }
            }
            None if d > 1 && !local => comm = self.reduce_replicas(started, &modes)?,
            None => {}
        }
        self.reduce_tied()?;
        let norms = self.grad_norms(local)?;
        let grad_norm = norms[0];
        let mut skipped = false;
        let mut outer_step = false;
        let mut nonfinite_stage = None;
        if !loss.is_finite() || norms.iter().any(|n| !n.is_finite()) {
            self.zero_grads()?;
            self.consecutive_skips += 1;
            let first = outcomes
                .iter()
                .flat_map(|o| o.iter().enumerate())
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
            self.apply_optimizer(lr, &norms)?;
            self.step += 1;
            if local && self.step % u64::from(self.dp.sync.period()) == 0 {
                comm.extend(self.outer_step(started, &modes)?);
                outer_step = true;
            }
        }
        let mut comm_s = vec![0.0; p];
        let mut exposed_comm_s = vec![0.0; p];
        for c in &comm {
            comm_s[c.stage as usize] += c.end_s - c.start_s;
            let hidden_until = c.start_s.max(after_schedule);
            exposed_comm_s[c.stage as usize] += (c.end_s - hidden_until).max(0.0);
        }
        let reduced_bytes = comm.iter().map(|c| c.bytes).sum();
        if d > 1 && !local && self.dp.compress == Compression::Auto {
            if let Some(first) = outcomes.first() {
                let spans: Vec<&[ActionSpan]> = first.iter().map(|o| o.spans.as_slice()).collect();
                self.replan(&spans, pipeline_s, &comm);
            }
        }

        let mut outcomes = outcomes.into_iter();
        let outcomes = outcomes.next().unwrap_or_default();
        let Timing {
            replica_pipeline_s,
            replica_busy_s,
            busy_s,
            idle_s,
            bubble,
            ..
        } = timing;
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
            weight_versions: Vec::new(),
            spans: outcomes.into_iter().map(|o| o.spans).collect(),
            replica_busy_s,
            replica_pipeline_s,
            comm_s,
            exposed_comm_s,
            reduced_bytes,
            compress: if d > 1 && (!local || outer_step) {
                modes
            } else {
                Vec::new()
            },
            outer_step,
            comm,
            skipped,
            nonfinite_stage,
        })
    }

    /// Every micro-batch's summed token loss as `(replica, micro-batch, loss)`, from the stages holding the head
    /// (across processes, [`Pipeline::gather_outcomes`] has brought them here).
    fn losses_of(outcomes: &[Vec<crate::executor::StageOutcome>]) -> Vec<(usize, u32, f64)> {
        outcomes
            .iter()
            .enumerate()
            .flat_map(|(r, o)| {
                o.iter()
                    .flat_map(move |o| o.losses.iter().map(move |&(mb, l)| (r, mb, l)))
            })
            .collect()
    }

    /// The job's processes, when this pipeline's workers run in several.
    pub fn cohort(&self) -> Option<&Arc<dyn Cohort>> {
        self.cohort.as_ref()
    }

    /// Fills the outcomes of workers run in other processes with their micro-batch losses, action spans and stash
    /// peaks (one gather through the group of every worker), so every process has the step's loss and reports
    /// every stage. Each process's spans are on its own clock,
    /// from when it began the step. Nothing to do in one process.
    fn gather_outcomes(&self, outcomes: &mut [Vec<crate::executor::StageOutcome>]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let p = self.num_stages();
        let mut mine: Vec<(usize, Vec<f64>)> = Vec::new();
        for (r, o) in outcomes.iter().enumerate() {
            for (s, o) in o.iter().enumerate().filter(|&(s, _)| self.hosted[r][s]) {
                // [peak stashed, peak bytes, first non-finite value (1, when, action index; or 0, 0, 0), losses n,
                //  (micro-batch, loss) × n, (start, end, host) per span]
                let nonfinite = o
                    .nonfinite
                    .as_ref()
                    .map_or([0.0, 0.0, 0.0], |n| [1.0, n.at_s, n.index as f64]);
                let mut v = vec![f64::from(o.peak_stashed), o.peak_stash_bytes as f64];
                v.extend(nonfinite);
                v.push(o.losses.len() as f64);
                v.extend(o.losses.iter().flat_map(|&(mb, l)| [f64::from(mb), l]));
                v.extend(o.spans.iter().flat_map(|sp| [sp.start_s, sp.end_s, sp.host_s]));
                mine.push((r * p + s, v));
            }
        }
        let all = self.world.all_gather_host(&mine)?;
        for (w, v) in all.into_iter().enumerate() {
            let (r, s) = (w / p, w % p);
            if self.hosted[r][s] {
                continue;
            }
            let short = || EngineError::Invariant {
                stage: s as u32,
                what: format!("worker {w}'s step report is missing or short"),
            };
            let (Some(o), [stashed, bytes, nf, nf_at, nf_index, n, rest @ ..]) =
                (outcomes.get_mut(r).and_then(|o| o.get_mut(s)), &v[..])
            else {
                return Err(short());
            };
            let (losses, spans) = rest.split_at_checked(2 * *n as usize).ok_or_else(short)?;
            o.peak_stashed = *stashed as u32;
            o.peak_stash_bytes = *bytes as usize;
            // The worker's first non-finite value, so every rank names the same stage (times are each process's
            // own clock since its step began: the earliest is approximate across processes).
            o.nonfinite = if *nf == 1.0 {
                let index = *nf_index as usize;
                let action = *self.schedule.actions[s].get(index).ok_or_else(short)?;
                Some(crate::executor::NonFinite {
                    at_s: *nf_at,
                    index,
                    action,
                })
            } else {
                None
            };
            o.losses = losses.chunks_exact(2).map(|t| (t[0] as u32, t[1])).collect();
            o.spans = self.schedule.actions[s]
                .iter()
                .zip(spans.chunks_exact(3))
                .map(|(a, t)| ActionSpan {
                    action: *a,
                    start_s: t[0],
                    end_s: t[1],
                    host_s: t[2],
                })
                .collect();
        }
        Ok(())
    }

    /// True when some workers of this pipeline run in other processes.
    pub fn is_distributed(&self) -> bool {
        self.hosted.iter().flatten().any(|h| !h)
    }

    /// Whether this process runs stage `stage` of replica `replica`.
    pub fn hosts(&self, replica: usize, stage: usize) -> bool {
        self.hosted
            .get(replica)
            .and_then(|r| r.get(stage))
            .copied()
            .unwrap_or(false)
    }

    /// Each replica's executor settings, with the failure to inject on its replica (tests, `BATON_FAIL_AT`).
    fn exec_configs(&self, fail: Option<&(usize, FailurePoint)>) -> Vec<ExecConfig> {
        (0..self.replicas.len())
            .map(|r| ExecConfig {
                recompute: self.options.recompute,
                batch_weight_grads: self.options.batch_weight_grads,
                recv_timeout: Duration::from_millis(self.options.recv_timeout_ms),
                fail: fail.filter(|(fr, _)| *fr == r).map(|(_, f)| f.clone()),
                hosted: self.hosted[r].clone(),
            })
            .collect()
    }

    /// Puts every replica's stages back from its run (a stage whose thread was lost stays missing) and returns
    /// whether all came back, the outcomes of the replicas that succeeded, and the failure to report.
    fn take_back(
        &mut self,
        runs: Vec<StepRun<B>>,
    ) -> (bool, Vec<Vec<crate::executor::StageOutcome>>, Option<EngineError>) {
        let d = self.replicas.len();
        let mut complete = true;
        let mut failure = None;
        let mut outcomes = Vec::with_capacity(d);
        for (r, run) in runs.into_iter().enumerate() {
            complete &= run.stages.iter().all(Option::is_some);
            self.replicas[r].stages = run.stages.into_iter().flatten().collect();
            match run.result {
                Ok(o) => outcomes.push(o),
                Err(e) => prefer(&mut failure, if d > 1 { e.in_replica(r) } else { e }),
            }
        }
        (complete, outcomes, failure)
    }

    /// Puts stage `s`'s reduced gradients (`[replica][chunk][layer][param]`, from its reducer) in place.
    fn install_grads(&mut self, s: usize, grads: StageGrads<B>) -> Result<()> {
        for (r, chunks) in grads.into_iter().enumerate() {
            let stage = &mut self.replicas[r].stages[s];
            for (part, layers) in stage.parts.iter_mut().zip(chunks) {
                if layers.len() != part.layers.len() {
                    return Err(EngineError::Invariant {
                        stage: s as u32,
                        what: format!(
                            "replica {r} returned gradients for {} layers of {}",
                            layers.len(),
                            part.layers.len()
                        ),
                    });
                }
                for (layer, params) in part.layers.iter_mut().zip(layers) {
                    for (prm, g) in layer.params_mut().iter_mut().zip(params) {
                        prm.grad = g;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sums every stage's gradients across the replicas, bucket by bucket, after the schedule (no overlap).
    fn reduce_replicas(&mut self, t0: Instant, modes: &[Vec<Compression>]) -> Result<Vec<CommSpan>> {
        let sharded = self.sharded();
        let Pipeline {
            replicas,
            dp_groups,
            buckets,
            owners,
            codecs,
            infos,
            hosted,
            ..
        } = self;
        let backends: Vec<Arc<Vec<B>>> = replicas.iter().map(|r| Arc::clone(&r.backends)).collect();
        let mut views: Vec<ReplicaViews<'_, B>> = replicas
            .iter_mut()
            .map(|rep| {
                rep.stages
                    .iter_mut()
                    .map(|st| st.params_mut().map(|(slot, p)| (slot, &mut p.grad)).collect())
                    .collect()
            })
            .collect();
        let owners = sharded.then_some(owners.as_slice());
        reduce_stages(
            &mut views, buckets, codecs, infos, modes, &backends, dp_groups, owners, hosted, t0,
        )
    }

    /// Global gradient norm: per-tensor sums of squares added in global (layer, parameter)
    /// order, the tied LM head counted once (through `wte`) — the same for every split and every number of
    /// replicas. Each tensor's square sum is taken once, by its owner replica; one read-back per worker. Under local
    /// SGD (`local`) the replicas have gradients of their own: one norm per replica, each over its own tensors.
    fn grad_norms(&self, local: bool) -> Result<Vec<f32>> {
        // Each worker contributes `(replica, unit, parameter, sum of squares)` tuples (exact in f64 for indices <
        // 2^53) through the group of every worker, so the norm is the same however workers are spread over
        // processes.
        let p = self.num_stages();
        let mut local_sums: Vec<(usize, Vec<f64>)> = Vec::with_capacity(p * self.replicas.len());
        for (r, rep) in self.replicas.iter().enumerate() {
            for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
                let s = stage.index as usize;
                if !self.hosted[r][s] {
                    continue;
                }
                let mut keys = Vec::new();
                let mut grads = Vec::new();
                for ((c, l, pi), prm) in stage.params() {
                    let mine = local || self.owners[s].get(&(c, l, pi)) == Some(&r);
                    if mine && !self.primaries.contains_key(&prm.name) {
                        keys.push((if local { r } else { 0 }, stage.parts[c].units.start + l, pi));
                        grads.push(&prm.grad);
                    }
                }
                let sums = be.sum_squares_many(&grads)?;
                debug_assert_eq!(sums.len(), keys.len());
                let tuples = keys
                    .into_iter()
                    .zip(sums)
                    .flat_map(|((rep, unit, pi), sq)| [rep as f64, unit as f64, pi as f64, sq])
                    .collect();
                local_sums.push((r * p + s, tuples));
            }
        }
        let mut squares: Vec<((u64, u64, u64), f64)> = self
            .world
            .all_gather_host(&local_sums)?
            .iter()
            .flat_map(|v| {
                v.chunks_exact(4)
                    .map(|t| ((t[0] as u64, t[1] as u64, t[2] as u64), t[3]))
            })
            .collect();
        squares.sort_by_key(|&(k, _)| k);
        let norms = if local { self.replicas.len() } else { 1 };
        let mut total = vec![0.0f64; norms];
        for ((r, _, _), sq) in squares {
            let at = (r as usize).min(norms - 1);
            total[at] += sq;
        }
        Ok(total.into_iter().map(|t| t.sqrt() as f32).collect())
    }

    /// Clipping and AdamW for every parameter (under ZeRO-1: on its owner, then broadcast to the other
    /// replicas), then zeroed gradients.
    fn apply_optimizer(&mut self, lr: f32, norms: &[f32]) -> Result<()> {
        let clip = self.options.optimizer.grad_clip;
        let scales: Vec<Option<f32>> = norms
            .iter()
            .map(|&norm| {
                if clip > 0.0 && norm > clip {
                    Some((f64::from(clip) / (f64::from(norm) + 1e-6)) as f32)
                } else {
                    None
                }
            })
            .collect();
        let step =
            u32::try_from(self.step + 1).map_err(|_| EngineError::config("steps", self.step + 1, "too many steps"))?;
        let sharded = self.sharded();
        let Pipeline {
            replicas,
            owners,
            dp_groups,
            options,
            hosted,
            ..
        } = self;
        let o = &options.optimizer;
        for (r, rep) in replicas.iter_mut().enumerate() {
            let scale = scales[r.min(scales.len() - 1)];
            for (s, (stage, be)) in rep.stages.iter_mut().zip(rep.backends.iter()).enumerate() {
                for (slot, p) in stage.params_mut() {
                    if !steps_on(owners, sharded, r, s, slot) {
                        be.fill_zero(&mut p.grad)?;
                        continue;
                    }
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
        if sharded {
            // Every tensor's new values from its owner to the other replicas.
            for (s, stage_owners) in owners.iter().enumerate() {
                for (&slot, &owner) in stage_owners {
                    let mut views: Vec<(usize, &mut B::Buf)> = replicas
                        .iter_mut()
                        .enumerate()
                        .filter(|(r, _)| hosted[*r][s])
                        .map(|(r, rep)| (r, &mut rep.stages[s].param_mut(slot).value))
                        .collect();
                    if views.is_empty() {
                        continue;
                    }
                    dp_groups[s].broadcast(owner, &mut views)?;
                }
            }
        }
        Ok(())
    }

    fn zero_grads(&mut self) -> Result<()> {
        for rep in &mut self.replicas {
            for (stage, be) in rep.stages.iter_mut().zip(rep.backends.iter()) {
                for (_, p) in stage.params_mut() {
                    be.fill_zero(&mut p.grad)?;
                }
            }
        }
        Ok(())
    }

    /// Where a named parameter lives in a replica: (stage, chunk, layer, param).
    fn locate(&self, name: &str) -> Option<ParamAt> {
        for (s, parts) in self.meta.iter().enumerate() {
            for (c, part) in parts.iter().enumerate() {
                if let Some(((l, pi), _)) = part.params().find(|(_, p)| p.name == name) {
                    return Some((s, c, l, pi));
                }
            }
        }
        None
    }

    fn param(&self, at: ParamAt) -> &ParamMeta {
        &self.meta[at.0][at.1].layers[at.2].1[at.3]
    }

    /// Sums every tied group's gradients into all its copies, in the group's order (`wte + lm_head` for GPT-2),
    /// through the group's collective, so the copies take identical AdamW steps and stay bitwise equal. Runs after
    /// the sum over replicas (so one replica's tied sum is `Σ_r wte_r + Σ_r head_r`, as a single replica over all
    /// micro-batches would take it); under ZeRO-1 only on the replica owning the group.
    fn reduce_tied(&mut self) -> Result<()> {
        let sharded = self.sharded();
        let Pipeline { replicas, owners, .. } = self;
        for (r, rep) in replicas.iter_mut().enumerate() {
            let Replica { tied, stages, .. } = rep;
            for tied in tied.iter() {
                let (s0, c0, l0, p0) = tied.at[0];
                if !steps_on(owners, sharded, r, s0, (c0, l0, p0)) {
                    continue;
                }
                // One walk hands out `&mut` to each copy's gradient (the locations are distinct).
                let mut views: Vec<(usize, &mut B::Buf)> = Vec::with_capacity(tied.at.len());
                for (s, stage) in stages.iter_mut().enumerate() {
                    for ((c, l, pi), p) in stage.params_mut() {
                        if let Some(m) = tied.at.iter().position(|&a| a == (s, c, l, pi)) {
                            views.push((m, &mut p.grad));
                        }
                    }
                }
                if views.is_empty() {
                    continue; // no copy lives in this process: the processes holding them sum it
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
        }
        Ok(())
    }

    /// Runs every part in pipeline order on replica 0, one stage after another on the calling thread,
    /// moving the activation between stages. `step` runs one layer on its stage's backend with
    /// the stage's micro-batch (`mb(stage)`) and returns the next activation. Returns the last
    /// activation and the stage holding it.
    fn sequential<'a>(
        &'a self,
        mb: impl Fn(usize) -> &'a MicroBatch<B>,
        mut step: impl FnMut(&dyn Layer<B>, &B, Option<B::Buf>, &MicroBatch<B>) -> Result<Option<B::Buf>>,
    ) -> Result<(Option<B::Buf>, usize)> {
        let rep = &self.replicas[0];
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
            if at != s {
                let held = x.take();
                if held.is_some() || !self.hosted[0][at] {
                    x = rep.transport.relay_hosted(at, s, held)?;
                }
            }
            at = s;
            if !self.hosted[0][s] {
                continue; // computed by the process running it
            }
            let mb = mb(s);
            for layer in &rep.stages[s].parts[c].layers {
                x = step(layer.as_ref(), &rep.backends[s], x, mb)?;
            }
        }
        Ok((x, at))
    }

    /// Mean token loss of `batch` without training (forward only, stage by stage, on replica 0).
    pub fn eval_loss(&mut self, batch: &Batch) -> Result<f32> {
        self.check_whole()?;
        // Evaluation runs on one replica: every micro-batch of the whole batch there.
        let m = self.schedule.microbatches as usize * self.replicas.len();
        let mbs = self.eval_batches(batch, m)?;
        let mut total = 0.0f64;
        (0..m).try_for_each(|i| {
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
        if self.is_distributed() {
            // The head's process has the sum: every process gets it (the others add zeros).
            let p = self.num_stages();
            let mut mine: Vec<(usize, Vec<f64>)> = Vec::new();
            for (r, h) in self.hosted.iter().enumerate() {
                for s in (0..p).filter(|&s| h[s]) {
                    mine.push((r * p + s, vec![if mine.is_empty() { total } else { 0.0 }]));
                }
            }
            total = self.world.all_gather_host(&mine)?.iter().flatten().sum();
        }
        Ok((total / (batch.batch * batch.seq) as f64) as f32)
    }

    /// `batch` as `m` micro-batches per stage of replica 0 (every shard's micro-batches, in order).
    fn eval_batches(&self, batch: &Batch, m: usize) -> Result<Vec<Vec<MicroBatch<B>>>> {
        self.check_batch(batch)?;
        self.upload_micro_batches(batch, 0, 0, m, batch.batch / m)
    }

    /// Logits `(t, V)` for one sequence of `t` tokens (for sampling).
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_whole()?;
        if self.is_distributed() {
            return Err(EngineError::config(
                "hosting",
                "distributed",
                "sampling runs in one process: sample from a checkpoint with `baton generate`",
            ));
        }
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
        let mbs: Vec<MicroBatch<B>> = self.replicas[0]
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
        self.replicas[0].backends[at].download(&logits)
    }

    /// Every parameter on the host, by global name (the tied LM head appears as
    /// `lm_head.weight` beside `wte`). Replica 0's (every replica holds the same).
    pub fn parameters(&self) -> Result<TensorMap> {
        self.replica_parameters(0)
    }

    /// Replica `r`'s parameters on the host, by global name.
    pub fn replica_parameters(&self, r: usize) -> Result<TensorMap> {
        self.check_whole()?;
        let rep = self.replicas.get(r).ok_or_else(|| {
            EngineError::config(
                "replica",
                r,
                format!("the pipeline has {} replicas", self.replicas.len()),
            )
        })?;
        let mut out = BTreeMap::new();
        for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
            for (_, p) in stage.params() {
                out.insert(p.name.clone(), host(p, be, &p.value)?);
            }
        }
        Ok(out)
    }

    /// Every parameter's global name and shape, in pipeline order (stage, chunk, layer), tied copies included.
    pub fn parameter_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        self.check_whole()?;
        let mut parts: Vec<(u32, &MetaPart)> = self.replicas[0]
            .stages
            .iter()
            .zip(&self.meta)
            .flat_map(|(stage, meta)| stage.parts.iter().map(|p| p.index).zip(meta))
            .collect();
        parts.sort_by_key(|(index, _)| *index);
        Ok(parts
            .iter()
            .flat_map(|(_, part)| part.params())
            .map(|(_, p)| (p.name.clone(), p.shape.clone()))
            .collect())
    }

    /// AdamW moments by global name: `(m, v)` (under ZeRO-1 gathered from their owners).
    pub fn optimizer_state(&self) -> Result<(TensorMap, TensorMap)> {
        self.check_whole()?;
        let (mut m, mut v) = (TensorMap::new(), TensorMap::new());
        for s in 0..self.num_stages() {
            let (sm, sv) = self.stage_moments(s)?;
            m.extend(sm);
            v.extend(sv);
        }
        Ok((m, v))
    }

    /// Stage `stage`'s tensors by global name: `(values, adam m, adam v)` (under ZeRO-1 the moments from their
    /// owners); the tied LM head is included as `lm_head.weight` where the stage holds it.
    pub fn stage_tensors(&self, stage: usize) -> Result<(TensorMap, TensorMap, TensorMap)> {
        let values = self.stage_values(stage)?;
        let (m, v) = self.stage_moments(stage)?;
        Ok((values, m, v))
    }

    /// Stage `stage`'s parameter values by global name (replica 0's copy, which must run here).
    pub fn stage_values(&self, stage: usize) -> Result<TensorMap> {
        self.check_whole()?;
        if stage >= self.num_stages() {
            return Err(EngineError::config(
                "stage",
                stage,
                format!("the pipeline has {} stages", self.num_stages()),
            ));
        }
        if !self.hosted[0][stage] {
            return Err(EngineError::config(
                "stage",
                stage,
                "replica 0's copy of this stage runs in another process, which holds its tensors",
            ));
        }
        let rep = &self.replicas[0];
        let mut values = TensorMap::new();
        for (_, p) in rep.stages[stage].params() {
            values.insert(p.name.clone(), host(p, &rep.backends[stage], &p.value)?);
        }
        Ok(values)
    }

    /// Under ZeRO-1 across processes, every stage's AdamW moments gathered from their owners (the replicas holding
    /// them, in other processes) through the stage's data-parallel group: `stage → (m, v)` for the stages whose
    /// replica-0 copy runs here. `None` unless the pipeline is both sharded and spread over processes. Collective:
    /// every process calls it (a checkpoint's snapshot does).
    pub fn moments_across_processes(&self) -> Result<Option<BTreeMap<usize, (TensorMap, TensorMap)>>> {
        self.check_whole()?;
        if !(self.sharded() && self.is_distributed()) {
            return Ok(None);
        }
        let (p, d) = (self.num_stages(), self.replicas.len());
        let mut out = BTreeMap::new();
        for s in 0..p {
            if !(0..d).any(|r| self.hosted[r][s]) {
                continue;
            }
            // Each replica run here sends the moments of the tensors it owns, in slot order: m then v per tensor.
            let mut mine = Vec::new();
            for r in (0..d).filter(|&r| self.hosted[r][s]) {
                let (stage, be) = (&self.replicas[r].stages[s], &self.replicas[r].backends[s]);
                let mut v = Vec::new();
                for (slot, prm) in stage.params() {
                    if self.owners[s].get(&slot) == Some(&r) {
                        v.extend(be.download(&prm.m)?.iter().map(|&x| f64::from(x)));
                        v.extend(be.download(&prm.v)?.iter().map(|&x| f64::from(x)));
                    }
                }
                mine.push((r, v));
            }
            let all = self.dp_groups[s].all_gather_host(&mine)?;
            if !self.hosted[0][s] {
                continue;
            }
            let (mut m, mut v) = (TensorMap::new(), TensorMap::new());
            let mut at = vec![0usize; d];
            for (slot, prm) in self.replicas[0].stages[s].params() {
                let r = self.owners[s].get(&slot).copied().unwrap_or(0);
                let n = prm.len();
                let got =
                    all.get(r)
                        .and_then(|x| x.get(at[r]..at[r] + 2 * n))
                        .ok_or_else(|| EngineError::Invariant {
                            stage: s as u32,
                            what: format!("replica {r} sent too few moments for `{}`", prm.name),
                        })?;
                at[r] += 2 * n;
                let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
                m.insert(
                    prm.name.clone(),
                    HostTensor {
                        shape: prm.shape.clone(),
                        data: f(&got[..n]),
                    },
                );
                v.insert(
                    prm.name.clone(),
                    HostTensor {
                        shape: prm.shape.clone(),
                        data: f(&got[n..]),
                    },
                );
            }
            out.insert(s, (m, v));
        }
        Ok(Some(out))
    }

    /// Stage `stage`'s AdamW moments by global name, each from the replica that holds it (its owner under ZeRO-1,
    /// else replica 0).
    fn stage_moments(&self, stage: usize) -> Result<(TensorMap, TensorMap)> {
        let sharded = self.sharded();
        let (mut m, mut v) = (TensorMap::new(), TensorMap::new());
        for (slot, p) in self.replicas[0].stages[stage].params() {
            let r = if sharded {
                self.owners[stage].get(&slot).copied().unwrap_or(0)
            } else {
                0
            };
            let rep = &self.replicas[r];
            let (held, be) = (rep.stages[stage].param(slot), &rep.backends[stage]);
            m.insert(p.name.clone(), host(held, be, &held.m)?);
            v.insert(p.name.clone(), host(held, be, &held.v)?);
        }
        Ok((m, v))
    }

    /// Loads parameters (and optionally AdamW moments) by global name into every replica, checking that every
    /// parameter is present with its shape before changing anything (under ZeRO-1 the moments go to each tensor's
    /// owner only). The tied LM head is loaded from `wte` when `lm_head.weight` is absent.
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
        for stage in &self.replicas[0].stages {
            for (_, p) in stage.params() {
                lookup(values, p, "parameters")?;
                if let Some((m, v)) = moments {
                    lookup(m, p, "adam m")?;
                    lookup(v, p, "adam v")?;
                }
            }
        }
        let sharded = self.sharded();
        let Pipeline { replicas, owners, .. } = self;
        for (r, rep) in replicas.iter_mut().enumerate() {
            for (s, (stage, be)) in rep.stages.iter_mut().zip(rep.backends.iter()).enumerate() {
                for (slot, p) in stage.params_mut() {
                    let get = |map: &TensorMap| stored(primaries, map, &p.name).map(|h| h.data.clone());
                    let value = get(values).expect("checked above");
                    p.value = be.upload_param(&value)?;
                    if let (Some((m, v)), true) = (moments, steps_on(owners, sharded, r, s, slot)) {
                        p.m = be.upload(&get(m).expect("checked above"))?;
                        p.v = be.upload(&get(v).expect("checked above"))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether replica `r` steps (and, under ZeRO-1, holds the moments of) the tensor at `slot` of stage `s`: its
/// owner when `sharded`, every replica otherwise.
fn steps_on(owners: &[BTreeMap<Slot, usize>], sharded: bool, r: usize, s: usize, slot: Slot) -> bool {
    !sharded || owners[s].get(&slot) == Some(&r)
}

/// `buf` (one of `p`'s tensors, on `be`) on the host with `p`'s shape.
fn host<B: Backend>(p: &Param<B>, be: &B, buf: &B::Buf) -> Result<HostTensor> {
    Ok(HostTensor {
        shape: p.shape.clone(),
        data: be.download(buf)?,
    })
}

/// The tensor `map` holds for parameter `name`: its own entry, else (for a tied copy) its group's primary's.
fn stored<'m>(primaries: &BTreeMap<String, String>, map: &'m TensorMap, name: &str) -> Option<&'m HostTensor> {
    map.get(name)
        .or_else(|| primaries.get(name).and_then(|primary| map.get(primary)))
}
