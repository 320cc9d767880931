//! The training loop as a library: [`Trainer`] owns the steps, the learning-rate schedule (through the pipeline's
//! optimizer config), evaluation cadence, asynchronous checkpoints, resume, recovery after a failed step
//! (`max_restarts`), the non-finite policy (through the pipeline), straggler detection, MFU and the trace window,
//! and reports everything through an [`Observer`]. `baton train` is one observer (progress bar and
//! `metrics.jsonl`); a model author embeds the same loop.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use baton_schedules::{simulate, simulate_data_parallel, Costs, DpCosts, DpReport, Op, ScheduleKind};

use crate::backend::Backend;
use crate::checkpoint::{self, AsyncSaver, Checkpoint};
use crate::data::{Batch, DataLoader, LoaderState, Split, TokenizerKind};
use crate::error::{EngineError, Result};
use crate::pipeline::{Pipeline, StepReport, TensorMap};

/// Weight of the newest step in the moving average of busy shares the straggler warning reads.
pub const BUSY_AVG_WEIGHT: f64 = 0.1;
/// Steps averaged before the straggler warning may fire.
pub const BUSY_AVG_STEPS: u32 = 20;
/// Steps between two straggler warnings for one stage.
pub const STRAGGLER_WARN_EVERY_STEPS: u64 = 50;

/// Where training batches come from, and the validation batches. Resumable: [`TrainData::state`] goes into
/// checkpoints and [`TrainData::restore`] puts the source back there.
pub trait TrainData {
    /// The next training batch.
    fn next_batch(&mut self) -> Batch;
    /// Where the source stands (saved in checkpoints), if it can say.
    fn state(&self) -> Option<LoaderState>;
    /// Puts the source back at `state` (`None`: the start).
    fn restore(&mut self, state: Option<LoaderState>) -> Result<()>;
    /// Up to `max` validation batches (the same ones every time).
    fn eval_batches(&self, max: usize) -> Vec<Batch>;
}

/// A [`Split`] of a token stream: the seeded, resumable train loader over its training part and fixed batches
/// of its validation part.
pub struct SplitData {
    split: Split,
    seed: u64,
    loader: DataLoader,
}

impl SplitData {
    /// Batches from `split`, shuffled with `seed`.
    pub fn new(split: Split, seed: u64) -> Result<Self> {
        let loader = split.train_loader(seed)?;
        Ok(SplitData { split, seed, loader })
    }

    /// The split.
    pub fn split(&self) -> &Split {
        &self.split
    }
}

impl TrainData for SplitData {
    fn next_batch(&mut self) -> Batch {
        self.loader.next_batch()
    }
    fn state(&self) -> Option<LoaderState> {
        Some(self.loader.state())
    }
    fn restore(&mut self, state: Option<LoaderState>) -> Result<()> {
        self.loader = match state {
            Some(s) => self.split.resume_train_loader(s)?,
            None => self.split.train_loader(self.seed)?,
        };
        Ok(())
    }
    fn eval_batches(&self, max: usize) -> Vec<Batch> {
        self.split.eval_batches(max).collect()
    }
}

/// What the loop does besides stepping. Every field has a default ([`TrainerConfig::default`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerConfig {
    /// Total optimizer steps of the run (a resumed run continues to this step).
    pub steps: u64,
    /// Stop (with a checkpoint) once this step is reached, although `steps` is the run's total.
    pub stop_at: Option<u64>,
    /// Validate every this many steps (0: only after the first step and at the end).
    pub eval_every: u64,
    /// Validation batches per evaluation (≥ 1).
    pub eval_batches: usize,
    /// Where checkpoints go (`None`: no checkpoints, and a restart starts from the beginning).
    pub checkpoint_dir: Option<PathBuf>,
    /// Save every this many steps (0: only at the end).
    pub save_every: u64,
    /// Keep only the newest K checkpoints (0 keeps all).
    pub keep_last: usize,
    /// Reload the latest good checkpoint after a failed step, at most this many times.
    pub max_restarts: u32,
    /// Steps (from the first of this run) whose action spans the observer is told to trace.
    pub trace_steps: u64,
    /// Peak FLOP rate for MFU in TFLOP/s; 0 asks the first stage's backend to measure one (a GPU's bf16 GEMM
    /// rate; nothing on the CPU, where MFU is then not reported).
    pub peak_tflops: f64,
    /// Tokenizer recorded in checkpoints.
    pub tokenizer: TokenizerKind,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            steps: 300,
            stop_at: None,
            eval_every: 50,
            eval_batches: 8,
            checkpoint_dir: None,
            save_every: 0,
            keep_last: 3,
            max_restarts: 0,
            trace_steps: 0,
            peak_tflops: 0.0,
            tokenizer: TokenizerKind::Bytes,
        }
    }
}

impl TrainerConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(EngineError::config("steps", 0, "must be >= 1"));
        }
        if self.eval_batches == 0 {
            return Err(EngineError::config("eval_batches", 0, "must be >= 1"));
        }
        if !self.peak_tflops.is_finite() || self.peak_tflops < 0.0 {
            return Err(EngineError::config(
                "peak_tflops",
                self.peak_tflops,
                "must be finite and >= 0",
            ));
        }
        Ok(())
    }
}

/// The run is starting.
#[derive(Clone, Debug)]
pub struct StartEvent {
    /// The step the run starts from (0, or the resumed checkpoint's).
    pub first_step: u64,
    /// The step it stops at.
    pub stop_step: u64,
    /// The peak MFU is reported against, TFLOP/s (0: not reported), and whether it was measured here.
    pub peak_tflops: f64,
    /// True when `peak_tflops` was measured on the device at start.
    pub peak_measured: bool,
}

/// One optimizer step is done (evaluation and checkpointing for it included).
#[derive(Clone, Debug)]
pub struct StepEvent<'a> {
    /// What the pipeline measured.
    pub report: &'a StepReport,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
    /// Per stage: busy time / pipeline time.
    pub busy: Vec<f64>,
    /// Model FLOP utilisation, when a peak is known.
    pub mfu: Option<f64>,
    /// Training FLOPs per token (0 when the model does not say).
    pub flops_per_token: f64,
    /// Validation loss, when this step evaluated.
    pub val_loss: Option<f32>,
    /// Host stall of the checkpoint snapshot, when this step saved.
    pub save_stall_s: Option<f64>,
    /// Skipped steps so far in this run.
    pub skipped_total: u64,
    /// Restarts so far in this run.
    pub restarts: u32,
    /// Seconds since the run started when this step began.
    pub started_s: f64,
    /// Seconds since the run started when the step's optimizer phase (gradient reduction, clipping, AdamW) began:
    /// `started_s + report.pipeline_s`; it ends at `started_s + report.elapsed_s`.
    pub optimizer_started_s: f64,
    /// Unix time (seconds) when the step finished.
    pub unix_time_s: f64,
    /// Tokens trained on from step 0 to this step (a resumed run counts the steps before it too).
    pub tokens_seen: u64,
    /// True while inside the trace window ([`TrainerConfig::trace_steps`]).
    pub traced: bool,
}

/// Unix time now, seconds (0 if the clock is before 1970).
pub fn unix_time_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A validation pass finished.
#[derive(Clone, Copy, Debug)]
pub struct EvalEvent {
    /// After this step.
    pub step: u64,
    /// The step's training loss.
    pub train_loss: f32,
    /// Mean validation loss.
    pub val_loss: f32,
    /// Seconds since the run started when the pass began.
    pub started_s: f64,
    /// How long it took, seconds.
    pub elapsed_s: f64,
}

/// A checkpoint was handed to the background writer, or a write completed.
#[derive(Clone, Debug)]
pub struct CheckpointEvent {
    /// The step saved.
    pub step: u64,
    /// The host stall of taking the snapshot, seconds.
    pub stall_s: f64,
    /// A previous write that completed meanwhile.
    pub completed: Option<PathBuf>,
}

/// A step failed and the run went back to the latest good checkpoint.
#[derive(Clone, Debug)]
pub struct RestartEvent {
    /// Restarts so far (1-based).
    pub restarts: u32,
    /// The most allowed.
    pub max_restarts: u32,
    /// The step that failed.
    pub failed_step: u64,
    /// Why.
    pub cause: String,
    /// The checkpoint resumed from (`None`: the start).
    pub from: Option<PathBuf>,
    /// The step resumed at.
    pub resumed_step: u64,
}

/// Something the user should know that does not stop the run.
#[derive(Clone, Debug, PartialEq)]
pub enum Warning {
    /// A stage is much less busy than the others: a neighbour is straggling.
    Straggler {
        /// The step.
        step: u64,
        /// The stage.
        stage: usize,
        /// Its averaged busy share.
        busy: f64,
        /// The others' mean busy share.
        others: f64,
    },
    /// A data-parallel replica takes much longer than the others for its schedule: every replica waits for it at
    /// the gradient reduction.
    SlowReplica {
        /// The step.
        step: u64,
        /// The replica.
        replica: usize,
        /// Its averaged schedule time, seconds.
        seconds: f64,
        /// The others' mean, seconds.
        others: f64,
    },
    /// A step's loss or gradient norm was not finite; the optimizer step was skipped.
    Skipped {
        /// The step that was skipped (1-based: the step it would have been).
        step: u64,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The stage where it first appeared, if known.
        stage: Option<u32>,
    },
    /// Measuring the device's peak rate failed; MFU is not reported.
    PeakUnavailable(String),
    /// Errors recorded where they could not be returned (in `Drop`).
    DropErrors(Vec<String>),
    /// A background checkpoint write failed (reported as soon as the writer finished; the previous checkpoint is
    /// intact). With restarts left the run goes back to the latest good checkpoint, else it stops with the error.
    CheckpointFailed {
        /// The step whose checkpoint failed.
        step: u64,
        /// Why.
        cause: String,
    },
}

/// Receives the loop's events. Every method has an empty default.
pub trait Observer {
    /// The run starts.
    fn on_start(&mut self, _event: &StartEvent) {}
    /// A step finished.
    fn on_step(&mut self, _event: &StepEvent<'_>) {}
    /// A validation pass finished (before the step's [`Observer::on_step`]).
    fn on_eval(&mut self, _event: &EvalEvent) {}
    /// A checkpoint was taken.
    fn on_checkpoint(&mut self, _event: &CheckpointEvent) {}
    /// The run restarted from a checkpoint.
    fn on_restart(&mut self, _event: &RestartEvent) {}
    /// A warning.
    fn on_warning(&mut self, _warning: &Warning) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The step the run ended at.
    pub step: u64,
    /// Steps taken in this run (restarts re-take some).
    pub steps_run: u64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Tokens trained on in this run.
    pub tokens: usize,
    /// Payload bytes each replica put into the data-parallel reductions of this run.
    pub comm_bytes: u64,
    /// First and last validation loss of the run.
    pub first_val: Option<f32>,
    /// See `first_val`.
    pub last_val: Option<f32>,
    /// The last step's report.
    pub last: Option<StepReport>,
    /// Restarts.
    pub restarts: u32,
    /// Skipped steps.
    pub skipped: u64,
    /// Host stalls of the checkpoints taken, seconds.
    pub save_stalls_s: Vec<f64>,
    /// The newest checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// The step the run started from (0, or the resumed checkpoint's).
    pub first_step: u64,
    /// True when the stop flag ([`Trainer::set_stop_flag`]) ended the run early (after a complete step, with a
    /// checkpoint when a directory is configured).
    pub interrupted: bool,
}

/// The simulator's data-parallel step for `report`'s layout: the measured action costs, the pipeline's gradient
/// bytes per part, and a link whose bandwidth is the reduction's measured rate this step (wire bytes over
/// reduction seconds); `None` with one replica or nothing measured. Its `step_time` is comparable with the
/// measured schedule time plus exposed communication.
pub fn predicted_data_parallel<B: Backend>(pipeline: &Pipeline<B>, report: &StepReport) -> Option<DpReport> {
    let d = pipeline.num_replicas() as u32;
    let comm_s: f64 = report.comm_s.iter().sum();
    if d < 2 || comm_s <= 0.0 {
        return None;
    }
    let wire = 2.0 * f64::from(d - 1) / f64::from(d) * report.reduced_bytes as f64;
    predicted_on_link(pipeline, report, wire / comm_s)
}

/// The simulator's data-parallel step for `report`'s layout on a link of `link_bytes_per_s` between replicas: the
/// measured action costs, and every part's gradient payload shrunk by the step's measured compression ratio.
pub fn predicted_on_link<B: Backend>(
    pipeline: &Pipeline<B>,
    report: &StepReport,
    link_bytes_per_s: f64,
) -> Option<DpReport> {
    let d = pipeline.num_replicas() as u32;
    if d < 2 || report.reduced_bytes == 0 || link_bytes_per_s.is_nan() || link_bytes_per_s <= 0.0 {
        return None;
    }
    let costs = measured_costs(pipeline, report)?;
    let dp = pipeline.data_parallel();
    // Compression shrinks every part's payload by the step's measured ratio.
    let ratio = report.reduced_bytes as f64 / pipeline.dense_reduce_bytes().max(1) as f64;
    let model = DpCosts {
        replicas: d,
        grad_bytes: pipeline
            .grad_bytes_per_part()
            .iter()
            .map(|&b| b as f64 * ratio)
            .collect(),
        link_bytes_per_s,
        link_latency_s: 0.0,
        bucket_bytes: dp.bucket_bytes() as f64,
        overlap: dp.overlap,
    };
    simulate_data_parallel(pipeline.schedule(), &costs, &model).ok()
}

/// Folds `new` into the moving averages `avg` (weight [`BUSY_AVG_WEIGHT`] for the newest value; `first`: start
/// from it).
fn moving_average(avg: &mut [f64], new: &[f64], first: bool) {
    for (a, &x) in avg.iter_mut().zip(new) {
        *a = if first {
            x
        } else {
            (1.0 - BUSY_AVG_WEIGHT) * *a + BUSY_AVG_WEIGHT * x
        };
    }
}

/// Whether a warning last given at `warned_at` may be given again at `step` (every
/// [`STRAGGLER_WARN_EVERY_STEPS`] at most); records `step` when it may.
fn warning_due(warned_at: &mut Option<u64>, step: u64) -> bool {
    let due = warned_at.is_none_or(|at| step >= at + STRAGGLER_WARN_EVERY_STEPS);
    if due {
        *warned_at = Some(step);
    }
    due
}

/// Replicas whose schedule time is more than 25% above the mean of the others (the rest wait for them).
pub fn slow_replicas(seconds: &[f64]) -> Vec<usize> {
    let d = seconds.len();
    if d < 2 {
        return Vec::new();
    }
    let total: f64 = seconds.iter().sum();
    (0..d)
        .filter(|&r| {
            let others = (total - seconds[r]) / (d - 1) as f64;
            seconds[r] > 1.25 * others
        })
        .collect()
}

/// Stages whose busy share is 20% below the mean of the others (they wait on a straggler).
pub fn lagging_stages(busy_fraction: &[f64]) -> Vec<usize> {
    let p = busy_fraction.len();
    if p < 2 {
        return Vec::new();
    }
    let total: f64 = busy_fraction.iter().sum();
    (0..p)
        .filter(|&s| {
            let others = (total - busy_fraction[s]) / (p - 1) as f64;
            busy_fraction[s] < 0.8 * others
        })
        .collect()
}

/// Mean measured time of each op per part in `report` (0 where the op did not run), as simulator costs.
pub fn measured_costs<B: Backend>(pipeline: &Pipeline<B>, report: &StepReport) -> Option<Costs> {
    let schedule = pipeline.schedule();
    let parts = schedule.placement.num_parts() as usize;
    let mut sums = vec![[0.0f64; 4]; parts];
    let mut counts = vec![[0usize; 4]; parts];
    for (s, spans) in report.spans.iter().enumerate() {
        for span in spans {
            let part = schedule.part_of(s as u32, &span.action)? as usize;
            let k = Op::ALL.iter().position(|&o| o == span.action.op)?;
            sums[part][k] += span.end_s - span.start_s;
            counts[part][k] += 1;
        }
    }
    let mean = |part: usize, k: usize| {
        if counts[part][k] > 0 {
            sums[part][k] / counts[part][k] as f64
        } else {
            0.0
        }
    };
    Some(Costs {
        forward: (0..parts).map(|p| mean(p, 0)).collect(),
        backward: (0..parts).map(|p| mean(p, 1)).collect(),
        backward_input: (0..parts).map(|p| mean(p, 2)).collect(),
        backward_weight: (0..parts).map(|p| mean(p, 3)).collect(),
        latency: 0.0,
    })
}

/// The simulator's bubble for this schedule with the per-action costs measured in `report`.
pub fn predicted_bubble<B: Backend>(pipeline: &Pipeline<B>, report: &StepReport) -> Option<f64> {
    simulate(pipeline.schedule(), &measured_costs(pipeline, report)?)
        .ok()
        .map(|r| r.bubble)
}

/// Mean validation loss over `batches`.
pub fn evaluate<B: Backend>(pipeline: &mut Pipeline<B>, batches: &[Batch]) -> Result<f32> {
    let mut sum = 0.0f64;
    for batch in batches {
        sum += f64::from(pipeline.eval_loss(batch)?);
    }
    Ok((sum / batches.len().max(1) as f64) as f32)
}

/// A function that builds a fresh pipeline (at the start, and again after a failure that lost a stage).
pub type BuildPipeline<'a, B> = Box<dyn FnMut() -> Result<Pipeline<B>> + 'a>;

/// The training loop (see the module docs). Build it with a function that makes the pipeline, optionally
/// [`Trainer::resume`] or [`Trainer::init_from`], then [`Trainer::run`].
pub struct Trainer<'a, B: Backend> {
    config: TrainerConfig,
    build: BuildPipeline<'a, B>,
    pipeline: Pipeline<B>,
    resumed: Option<PathBuf>,
    /// Initial weights given by [`Trainer::init_from`], applied again when a restart starts from the beginning.
    init: Option<TensorMap>,
    /// Set from outside (a signal handler) to stop after the current step.
    stop: Option<Arc<AtomicBool>>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// A trainer whose pipeline `build` makes (called now, and again to recover from a failed step).
    pub fn new(config: TrainerConfig, mut build: impl FnMut() -> Result<Pipeline<B>> + 'a) -> Result<Self> {
        config.validate()?;
        let pipeline = build()?;
        Ok(Trainer {
            config,
            build: Box::new(build),
            pipeline,
            resumed: None,
            init: None,
            stop: None,
        })
    }

    /// A flag checked between steps: once it is set (from a signal handler, another thread), the run finishes the
    /// step in progress, evaluates, writes its final checkpoint as at a normal end and returns a summary with
    /// [`RunSummary::interrupted`] set. A resumed run continues bitwise from that checkpoint.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// The pipeline (to inspect or sample from it; after [`Trainer::run`]: the trained model).
    pub fn pipeline(&self) -> &Pipeline<B> {
        &self.pipeline
    }

    /// The pipeline, mutable (to inject a failure, evaluate or sample).
    pub fn pipeline_mut(&mut self) -> &mut Pipeline<B> {
        &mut self.pipeline
    }

    /// The loop's settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// Starts from initial weights (e.g. imported from Hugging Face) instead of the model's initialisation.
    pub fn init_from(&mut self, params: TensorMap) -> Result<()> {
        self.pipeline.load(&params, None)?;
        self.init = Some(params);
        Ok(())
    }

    /// Continues from `ck` (saved with this or any other split, stage count or schedule): weights, AdamW moments,
    /// step and the data source's position.
    pub fn resume(&mut self, ck: &Checkpoint, data: &mut dyn TrainData) -> Result<()> {
        restore(&mut self.pipeline, ck, data)?;
        self.resumed = Some(ck.dir.clone());
        Ok(())
    }

    /// Trains to [`TrainerConfig::steps`] (or `stop_at`), evaluating, checkpointing and recovering as configured,
    /// telling `observer` everything. Ends with a checkpoint when a directory is configured.
    pub fn run(&mut self, data: &mut dyn TrainData, observer: &mut dyn Observer) -> Result<RunSummary> {
        let c = self.config.clone();
        let (peak_tflops, peak_measured) = if c.peak_tflops > 0.0 {
            (c.peak_tflops, false)
        } else {
            match self.pipeline.backends().first().map(Backend::measure_peak_tflops) {
                Some(Ok(Some(t))) => (t, true),
                Some(Err(e)) => {
                    observer.on_warning(&Warning::PeakUnavailable(e.to_string()));
                    (0.0, false)
                }
                _ => (0.0, false),
            }
        };
        let first_step = self.pipeline.step();
        let stop = c.stop_at.map_or(c.steps, |s| s.min(c.steps));
        observer.on_start(&StartEvent {
            first_step,
            stop_step: stop,
            peak_tflops,
            peak_measured,
        });
        let eval_set = data.eval_batches(c.eval_batches);
        let started = Instant::now();
        let mut summary = RunSummary {
            step: first_step,
            steps_run: 0,
            elapsed_s: 0.0,
            tokens: 0,
            comm_bytes: 0,
            first_val: None,
            last_val: None,
            last: None,
            restarts: 0,
            skipped: 0,
            save_stalls_s: Vec::new(),
            checkpoint: None,
            first_step,
            interrupted: false,
        };
        let mut saver = AsyncSaver::default();
        let p = self.pipeline.num_stages();
        let mut straggler_warned_at: Vec<Option<u64>> = vec![None; p];
        // Busy shares averaged over recent steps (one step's are noisy), and how many steps fed them.
        let mut busy_avg = vec![0.0f64; p];
        let mut busy_steps = 0u32;
        let d = self.pipeline.num_replicas();
        let mut replica_avg = vec![0.0f64; d];
        let mut replica_warned_at: Vec<Option<u64>> = vec![None; d];
        let stop_requested = |flag: &Option<Arc<AtomicBool>>| flag.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        // PipeDream-2BW: windows run in streams (no flush between them) up to the next evaluation, checkpoint or
        // stop; their reports are then taken one per iteration.
        let mut streamed: std::collections::VecDeque<StepReport> = std::collections::VecDeque::new();
        let mut stream_seq = 0usize;
        while self.pipeline.step() < stop || !streamed.is_empty() {
            if streamed.is_empty() && stop_requested(&self.stop) {
                summary.interrupted = true;
                break;
            }
            let step_started = started.elapsed().as_secs_f64();
            let two_bw = self.pipeline.schedule().kind == ScheduleKind::TwoBw;
            let mut stream_failed = None;
            if streamed.is_empty() && two_bw {
                let at = self.pipeline.step();
                let next_event = |every: u64| at.checked_div(every).map_or(u64::MAX, |n| (n + 1) * every);
                let until = stop.min(next_event(c.eval_every)).min(next_event(c.save_every));
                let k = until.saturating_sub(at).clamp(1, STREAM_WINDOWS);
                let batches: Vec<Batch> = (0..k).map(|_| data.next_batch()).collect();
                stream_seq = batches[0].seq;
                match self.pipeline.train_windows(&batches) {
                    Ok(reports) => streamed.extend(reports),
                    Err(e) => stream_failed = Some(e),
                }
            }
            let batch = (!two_bw).then(|| data.next_batch());
            let seq = batch.as_ref().map_or(stream_seq, |b| b.seq);
            let mut run = |pipeline: &mut Pipeline<B>| -> std::result::Result<StepReport, (u64, EngineError)> {
                let failed_at = pipeline.step() + 1;
                if let Some(e) = stream_failed.take() {
                    return Err((failed_at, e));
                }
                match &batch {
                    Some(b) => pipeline.train_step(b).map_err(|e| (failed_at, e)),
                    None => streamed.pop_front().ok_or_else(|| {
                        (
                            failed_at,
                            EngineError::Invariant {
                                stage: 0,
                                what: "a 2BW stream returned fewer reports than windows".into(),
                            },
                        )
                    }),
                }
            };
            let flops_per_token = self.pipeline.model().flops_per_token(seq);
            // A failed step, or a background checkpoint write that failed meanwhile: both go back to the latest
            // good checkpoint while restarts are left.
            let outcome = match saver.poll() {
                Some(Err(e)) => {
                    let step = self.pipeline.step();
                    observer.on_warning(&Warning::CheckpointFailed {
                        step,
                        cause: e.to_string(),
                    });
                    Err((step, e))
                }
                Some(Ok(dir)) => {
                    summary.checkpoint = Some(dir);
                    run(&mut self.pipeline)
                }
                None => run(&mut self.pipeline),
            };
            let report = match outcome {
                Ok(r) => r,
                Err((failed_step, e)) if summary.restarts < c.max_restarts => {
                    summary.restarts += 1;
                    streamed.clear();
                    // The write in flight must finish before we look for the latest good checkpoint.
                    match saver.wait() {
                        Ok(Some(dir)) => summary.checkpoint = Some(dir),
                        Ok(None) => {}
                        Err(e) => observer.on_warning(&Warning::CheckpointFailed {
                            step: self.pipeline.step(),
                            cause: e.to_string(),
                        }),
                    }
                    let from = match &c.checkpoint_dir {
                        Some(root) => checkpoint::latest(root)?,
                        None => None,
                    };
                    self.pipeline = (self.build)()?;
                    match &from {
                        Some(dir) => restore(&mut self.pipeline, &checkpoint::load(dir)?, data)?,
                        None => {
                            if let Some(init) = &self.init {
                                self.pipeline.load(init, None)?;
                            }
                            data.restore(None)?
                        }
                    }
                    summary.checkpoint = from.clone();
                    observer.on_restart(&RestartEvent {
                        restarts: summary.restarts,
                        max_restarts: c.max_restarts,
                        failed_step,
                        cause: e.to_string(),
                        from,
                        resumed_step: self.pipeline.step(),
                    });
                    continue;
                }
                Err((_, e)) => return Err(e),
            };
            let step = report.step;
            summary.steps_run += 1;
            summary.tokens += report.tokens;
            summary.comm_bytes += report.reduced_bytes as u64;
            let tokens_per_s = report.tokens as f64 / report.elapsed_s.max(1e-9);
            let busy: Vec<f64> = report
                .busy_s
                .iter()
                .map(|b| {
                    if report.pipeline_s > 0.0 {
                        b / report.pipeline_s
                    } else {
                        0.0
                    }
                })
                .collect();
            if report.skipped {
                summary.skipped += 1;
                observer.on_warning(&Warning::Skipped {
                    step: step + 1,
                    what: if report.loss.is_finite() {
                        "gradient norm"
                    } else {
                        "loss"
                    },
                    stage: report.nonfinite_stage,
                });
            }
            moving_average(&mut busy_avg, &busy, busy_steps == 0);
            moving_average(&mut replica_avg, &report.replica_pipeline_s, busy_steps == 0);
            busy_steps += 1;
            if busy_steps >= BUSY_AVG_STEPS {
                for r in slow_replicas(&replica_avg) {
                    if warning_due(&mut replica_warned_at[r], step) {
                        observer.on_warning(&Warning::SlowReplica {
                            step,
                            replica: r,
                            seconds: replica_avg[r],
                            others: (replica_avg.iter().sum::<f64>() - replica_avg[r]) / (d - 1) as f64,
                        });
                    }
                }
                for s in lagging_stages(&busy_avg) {
                    if warning_due(&mut straggler_warned_at[s], step) {
                        observer.on_warning(&Warning::Straggler {
                            step,
                            stage: s,
                            busy: busy_avg[s],
                            others: (busy_avg.iter().sum::<f64>() - busy_avg[s]) / (p - 1) as f64,
                        });
                    }
                }
            }
            let mut val_loss = None;
            let interrupted_here = stop_requested(&self.stop);
            let eval_now = (c.eval_every > 0 && step % c.eval_every == 0)
                || step == c.steps
                || step == first_step + 1
                || interrupted_here;
            if !report.skipped && eval_now {
                let eval_started = started.elapsed().as_secs_f64();
                let val = evaluate(&mut self.pipeline, &eval_set)?;
                summary.first_val.get_or_insert(val);
                summary.last_val = Some(val);
                val_loss = Some(val);
                observer.on_eval(&EvalEvent {
                    step,
                    train_loss: report.loss,
                    val_loss: val,
                    started_s: eval_started,
                    elapsed_s: started.elapsed().as_secs_f64() - eval_started,
                });
            }
            let mut save_stall_s = None;
            if let Some(root) = c.checkpoint_dir.as_ref() {
                if !report.skipped && c.save_every > 0 && step % c.save_every == 0 && step != c.steps {
                    let t = Instant::now();
                    let snap = checkpoint::snapshot(&self.pipeline, c.tokenizer, data.state())?;
                    let stall = t.elapsed().as_secs_f64();
                    summary.save_stalls_s.push(stall);
                    save_stall_s = Some(stall);
                    let completed = saver.submit(root.clone(), snap, c.keep_last)?;
                    if let Some(dir) = &completed {
                        summary.checkpoint = Some(dir.clone());
                    }
                    observer.on_checkpoint(&CheckpointEvent {
                        step,
                        stall_s: stall,
                        completed,
                    });
                }
            }
            let mfu = (peak_tflops > 0.0 && flops_per_token > 0.0)
                .then(|| tokens_per_s * flops_per_token / (peak_tflops * 1e12));
            observer.on_step(&StepEvent {
                report: &report,
                tokens_per_s,
                busy,
                mfu,
                flops_per_token,
                val_loss,
                save_stall_s,
                skipped_total: summary.skipped,
                restarts: summary.restarts,
                started_s: step_started,
                optimizer_started_s: step_started + report.pipeline_s,
                unix_time_s: unix_time_s(),
                tokens_seen: step * report.tokens as u64,
                traced: step <= first_step + c.trace_steps,
            });
            summary.last = Some(report);
        }
        if let Some(dir) = saver.wait()? {
            summary.checkpoint = Some(dir);
        }
        if stop_requested(&self.stop) && self.pipeline.step() < stop {
            summary.interrupted = true;
        }
        if let Some(root) = c.checkpoint_dir.as_ref() {
            let step = self.pipeline.step();
            let done = summary
                .checkpoint
                .as_ref()
                .is_some_and(|d| d.ends_with(checkpoint::step_dir_name(step)));
            if !done && (step > first_step || self.resumed.is_none()) {
                let t = Instant::now();
                let snap = checkpoint::snapshot(&self.pipeline, c.tokenizer, data.state())?;
                let stall = t.elapsed().as_secs_f64();
                saver.submit(root.clone(), snap, c.keep_last)?;
                summary.checkpoint = saver.wait()?.or(summary.checkpoint);
                observer.on_checkpoint(&CheckpointEvent {
                    step,
                    stall_s: stall,
                    completed: summary.checkpoint.clone(),
                });
            }
        }
        let (dropped, more) = crate::error::take_drop_errors();
        if !dropped.is_empty() {
            let mut list = dropped;
            if more > 0 {
                list.push(format!("… and {more} more"));
            }
            observer.on_warning(&Warning::DropErrors(list));
        }
        summary.step = self.pipeline.step();
        summary.elapsed_s = started.elapsed().as_secs_f64();
        Ok(summary)
    }
}

/// Most 2BW windows the trainer streams at once (fewer up to the next evaluation, checkpoint or stop).
pub const STREAM_WINDOWS: u64 = 8;

/// Loads `ck` into `pipeline` and puts `data` at the checkpoint's position.
fn restore<B: Backend>(pipeline: &mut Pipeline<B>, ck: &Checkpoint, data: &mut dyn TrainData) -> Result<()> {
    pipeline.load(&ck.params, Some((&ck.adam_m, &ck.adam_v)))?;
    pipeline.load_sync_state(&ck.state)?;
    pipeline.set_step(ck.manifest.step);
    data.restore(ck.manifest.loader)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_replica_or_a_starved_stage_is_named() {
        assert_eq!(slow_replicas(&[0.10, 0.10, 0.20, 0.11]), vec![2]);
        assert!(slow_replicas(&[0.10, 0.12, 0.11]).is_empty());
        assert!(slow_replicas(&[0.5]).is_empty());
        assert_eq!(lagging_stages(&[0.9, 0.5, 0.9]), vec![1]);
        assert!(lagging_stages(&[0.9, 0.85]).is_empty());
    }

    #[test]
    fn averages_start_from_the_first_value_and_warnings_are_spaced() {
        let mut avg = vec![0.0; 2];
        moving_average(&mut avg, &[1.0, 2.0], true);
        assert_eq!(avg, vec![1.0, 2.0]);
        moving_average(&mut avg, &[3.0, 2.0], false);
        assert!(
            (avg[0] - (1.0 + 2.0 * BUSY_AVG_WEIGHT)).abs() < 1e-12 && avg[1] == 2.0,
            "{avg:?}"
        );
        let mut at = None;
        assert!(warning_due(&mut at, 10));
        assert!(!warning_due(&mut at, 10 + STRAGGLER_WARN_EVERY_STEPS - 1));
        assert!(warning_due(&mut at, 10 + STRAGGLER_WARN_EVERY_STEPS));
        assert_eq!(at, Some(10 + STRAGGLER_WARN_EVERY_STEPS));
    }
}
