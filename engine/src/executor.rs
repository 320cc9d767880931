//! The pipeline executor: one OS thread per stage replays the stage's action list from the
//! validated schedule. Activations go forward and gradients backward as pushes into the
//! consumer's inbox (a bounded channel whose capacity is the number of messages the stage can
//! ever receive in a step, so a send never blocks). Every blocking receive polls an abort flag
//! and a deadline, so a failure anywhere ends the step with an error instead of a hang.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use baton_schedules::{Action, Op, Schedule};

use crate::backend::Backend;
use crate::comm::{Endpoint, MessageKey, MessageKind, Transport};
use crate::error::{EngineError, Result};
use crate::model::{Layer, MicroBatch, Param, Saved};

/// Receives a part's final gradients during the step (data-parallel overlap): `(stage, chunk, grads[layer][param])`,
/// copies the stage's worker made right after the stage's last `B`/`W` on the part.
pub(crate) type GradSink<B> = Arc<dyn Fn(usize, usize, Vec<Vec<<B as Backend>::Buf>>) -> Result<()> + Send + Sync>;

/// How often an injected stall looks at the abort flag.
const STALL_POLL: Duration = Duration::from_millis(20);

/// A contiguous run of global layers held by one (stage, chunk).
pub(crate) struct Part<B: Backend> {
    /// Part index in pipeline order.
    pub index: u32,
    /// Global layer units it holds.
    pub units: std::ops::Range<usize>,
    /// The layers, in order.
    pub layers: Vec<Box<dyn Layer<B>>>,
}

/// A stage's model state: its parts by chunk.
pub(crate) struct Stage<B: Backend> {
    /// Stage index.
    pub index: u32,
    /// `parts[chunk]`.
    pub parts: Vec<Part<B>>,
}

/// Where a parameter is inside one stage: (chunk, layer in the part, parameter in the layer).
pub(crate) type Slot = (usize, usize, usize);

impl<B: Backend> Stage<B> {
    /// Every parameter with its slot, in (chunk, layer, parameter) order.
    pub fn params(&self) -> impl Iterator<Item = (Slot, &Param<B>)> + '_ {
        self.parts.iter().enumerate().flat_map(|(c, part)| {
            part.layers
                .iter()
                .enumerate()
                .flat_map(move |(l, layer)| layer.params().iter().enumerate().map(move |(pi, p)| ((c, l, pi), p)))
        })
    }

    /// Every parameter with its slot, mutable, in (chunk, layer, parameter) order.
    pub fn params_mut(&mut self) -> impl Iterator<Item = (Slot, &mut Param<B>)> + '_ {
        self.parts.iter_mut().enumerate().flat_map(|(c, part)| {
            part.layers.iter_mut().enumerate().flat_map(move |(l, layer)| {
                layer
                    .params_mut()
                    .iter_mut()
                    .enumerate()
                    .map(move |(pi, p)| ((c, l, pi), p))
            })
        })
    }

    /// The parameter at `slot` (which must exist: slots come from [`Stage::params`] of the same model).
    pub fn param(&self, (c, l, pi): Slot) -> &Param<B> {
        &self.parts[c].layers[l].params()[pi]
    }

    /// The parameter at `slot`, mutable (which must exist, as for [`Stage::param`]).
    pub fn param_mut(&mut self, (c, l, pi): Slot) -> &mut Param<B> {
        &mut self.parts[c].layers[l].params_mut()[pi]
    }
}

/// Executor settings.
#[derive(Clone, Debug)]
pub(crate) struct ExecConfig {
    /// Keep only each part's input between F and B/I, recomputing the forward at backward time.
    pub recompute: bool,
    /// Keep each part's weight-gradient halves until all the step's micro-batches (a 2BW window's, with weight
    /// versions) have reached them, then run them at once ([`crate::Layer::backward_weight_batched`]).
    pub batch_weight_grads: bool,
    /// Longest a stage may wait for one input, and longest one action may compute, before the
    /// step fails (the watchdog deadline).
    pub recv_timeout: Duration,
    /// A failure to inject this step.
    pub fail: Option<FailurePoint>,
    /// Per stage: whether this process runs it (empty: every stage). A stage run elsewhere is handed back as it
    /// came, with an empty outcome; the transport opens endpoints only for the stages run here.
    pub hosted: Vec<bool>,
}

impl ExecConfig {
    /// Whether this process runs stage `s`.
    pub fn hosts(&self, s: usize) -> bool {
        self.hosted.get(s).copied().unwrap_or(true)
    }
}

/// What an injected failure does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureKind {
    /// The stage thread panics.
    Panic,
    /// The action returns an error.
    Error,
    /// The stage stops making progress until the step is aborted (the watchdog must notice).
    Stall,
    /// The stage sleeps forever and ignores the abort flag (the executor must detach it).
    Hang,
    /// The action's output (activation, gradient or loss) becomes NaN.
    Nan,
}

/// Where to inject a failure: `stage:2,action:7,kind:panic[,step:5]` (the `BATON_FAIL_AT` format).
/// `action` is the index in the stage's action list; `step` (1-based) limits it to one step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FailurePoint {
    /// Stage that fails.
    pub stage: u32,
    /// Index of the action in the stage's list.
    pub action: usize,
    /// What happens.
    pub kind: FailureKind,
    /// Only at this training step (1-based); every step when absent.
    pub step: Option<u64>,
}

impl std::str::FromStr for FailurePoint {
    type Err = EngineError;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: String| EngineError::config("fail_at", text, why);
        let (mut stage, mut action, mut kind, mut step) = (None, None, None, None);
        for field in text.split(',') {
            let (key, value) = field
                .split_once(':')
                .ok_or_else(|| bad(format!("`{field}` is not key:value")))?;
            let number = |v: &str| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{key} = `{v}` is not a number")))
            };
            match key.trim() {
                "stage" => stage = Some(number(value)? as u32),
                "action" => action = Some(number(value)? as usize),
                "step" => step = Some(number(value)?),
                "kind" => {
                    kind = Some(match value.trim() {
                        "panic" => FailureKind::Panic,
                        "error" => FailureKind::Error,
                        "stall" => FailureKind::Stall,
                        "hang" => FailureKind::Hang,
                        "nan" => FailureKind::Nan,
                        other => {
                            return Err(bad(format!(
                                "kind `{other}`: expected panic, error, stall, hang or nan"
                            )))
                        }
                    })
                }
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}`: expected stage, action, kind, step"
                    )))
                }
            }
        }
        Ok(FailurePoint {
            stage: stage.ok_or_else(|| bad("missing stage:N".into()))?,
            action: action.ok_or_else(|| bad("missing action:N".into()))?,
            kind: kind.ok_or_else(|| bad("missing kind:panic|error|stall|hang|nan".into()))?,
            step,
        })
    }
}

/// The first non-finite output of a stage in a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonFinite {
    /// When it was produced, seconds since the step began.
    pub at_s: f64,
    /// Index of the action in the stage's list.
    pub index: usize,
    /// The action.
    pub action: Action,
}

/// When one action ran, in seconds since the step started.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ActionSpan {
    /// The action.
    pub action: Action,
    /// When the stage's queue started computing it (after its inputs arrived), seconds since the
    /// step began on that queue's clock: device time on a GPU (timing events), wall-clock on the CPU.
    pub start_s: f64,
    /// When the queue finished it, likewise.
    pub end_s: f64,
    /// Host time the stage thread spent on the action, excluding waits for its inputs: on a GPU
    /// the cost of queueing its work (the host overhead per action); on the CPU the compute itself.
    pub host_s: f64,
}

/// When one activation or gradient moved between stages, in seconds since the step began, on
/// the destination's queue clock (device time on a GPU: from the producer's work being done to
/// the copy being done; a move on the CPU).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CopySpan {
    /// Stage the data went to.
    pub to_stage: u32,
    /// Part that consumes it.
    pub part: u32,
    /// Micro-batch.
    pub mb: u32,
    /// True for an activation (forward), false for a gradient (backward).
    pub activation: bool,
    /// Start, seconds since the step began.
    pub start_s: f64,
    /// End, seconds since the step began.
    pub end_s: f64,
}

/// What one stage reports after a step.
#[derive(Debug, Default)]
pub(crate) struct StageOutcome {
    /// Every action's span, in list order.
    pub spans: Vec<ActionSpan>,
    /// `(micro-batch, summed token loss)` from the stage holding the head.
    pub losses: Vec<(u32, f64)>,
    /// Most activation stashes held at once (F done, B/I not yet).
    pub peak_stashed: u32,
    /// Most stash bytes held at once (activation and weight-gradient stashes together).
    pub peak_stash_bytes: usize,
    /// The first action whose output (activation, gradient or loss) was not finite.
    pub nonfinite: Option<NonFinite>,
    /// The transfers this stage sent.
    pub copies: Vec<CopySpan>,
    /// PipeDream-2BW: the weight version each action read, in list order (empty otherwise).
    pub versions: Vec<u64>,
}

/// One stage's gradients of one 2BW window, `[chunk][layer][param]`, moved out of the stage after its last
/// backward of the window: `(worker r·p + s, window in the stream, gradients)`.
pub(crate) type WindowGrads<B> = (usize, usize, Vec<Vec<Vec<<B as Backend>::Buf>>>);

/// A stage's parameter values, `[chunk][layer][param]`.
pub(crate) type StageValues<B> = Vec<Vec<Vec<<B as Backend>::Buf>>>;

/// What a stage needs to run a PipeDream-2BW stream of windows without a flush: window `j` (micro-batches
/// `j·window .. (j+1)·window`, optimizer step `first_window + j`) reads weight version
/// `max(first_window + j − delay, 0)`; version `k` is "the weights after `k` updates". The stage starts with
/// `installed` in its parameters and `spare` as the other copy; newer versions arrive on `rx`, in order, from the
/// pipeline's updater, to which the stage sends each window's gradients on `tx`.
pub(crate) struct StageVersions<B: Backend> {
    /// The worker (`replica·p + stage`) the gradients are sent as.
    pub worker: usize,
    /// Micro-batches per window.
    pub window: u32,
    /// Version delay (2BW: 1; one micro-batch in flight: 0).
    pub delay: u64,
    /// Optimizer step of the stream's first window.
    pub first_window: u64,
    /// The version in the stage's parameters at the start.
    pub installed: u64,
    /// The other version the stage holds, if any.
    pub spare: Option<(u64, StageValues<B>)>,
    /// New versions: `(version, values)`.
    pub rx: crossbeam_channel::Receiver<(u64, StageValues<B>)>,
    /// Each window's gradients.
    pub tx: crossbeam_channel::Sender<WindowGrads<B>>,
}

impl<B: Backend> StageVersions<B> {
    /// The version micro-batch `mb` of the stream reads.
    pub fn version_of(&self, mb: u32) -> u64 {
        (self.first_window + u64::from(mb / self.window)).saturating_sub(self.delay)
    }
}

/// What a part keeps for one micro-batch between F and B/I (and, split, between I and W).
struct PartStash<B: Backend> {
    input: Option<B::Buf>,
    saved: Vec<Saved<B>>,
    bytes: usize,
}

/// A failure inside a worker, before it is tied to its stage.
enum WorkerError {
    /// Another stage failed first; this one stopped waiting.
    Aborted,
    /// This stage failed.
    Failed {
        index: usize,
        action: String,
        cause: String,
    },
}

/// What a stage is doing, for the watchdog.
#[derive(Default)]
struct Progress {
    /// `COMPUTING`, `WAITING` or `DONE`.
    state: AtomicU8,
    /// When the state last changed, microseconds since the step began.
    since_us: AtomicU64,
    /// Index of the action being run.
    action: AtomicUsize,
}

const COMPUTING: u8 = 0;
const WAITING: u8 = 1;
const DONE: u8 = 2;

impl Progress {
    fn set(&self, state: u8, t0: Instant) {
        self.since_us.store(t0.elapsed().as_micros() as u64, Ordering::SeqCst);
        self.state.store(state, Ordering::SeqCst);
    }
}

/// How long the executor waits for the remaining stages after a failure before it gives up on
/// them (a stage that never notices the abort flag is detached and its state is lost).
pub const ABORT_GRACE: Duration = Duration::from_secs(2);

/// The result of one step: each stage's state handed back (`None` for a stage whose thread
/// did not come back and was detached), and the outcomes or the failure.
pub(crate) struct StepRun<B: Backend> {
    /// Per stage: its model state, if its thread returned.
    pub stages: Vec<Option<Stage<B>>>,
    /// Per-stage outcomes, or the first failure.
    pub result: Result<Vec<StageOutcome>>,
}

/// Runs one step's actions on every stage, one thread per stage. The stages move into their
/// threads and come back in [`StepRun::stages`]. A stage that errors or panics sets the abort
/// flag; a stage computing for longer than `cfg.recv_timeout` is declared stalled by the
/// watchdog; the failure reported is the stall, else the first real failure (not a stage that
/// merely stopped because of it).
pub(crate) fn run_step<B: Backend>(
    stages: Vec<Stage<B>>,
    backends: Arc<Vec<B>>,
    schedule: Arc<Schedule>,
    transport: &dyn Transport<B>,
    mbs: Vec<Vec<MicroBatch<B>>>,
    cfg: &ExecConfig,
    sink: Option<GradSink<B>>,
    versions: Option<Vec<StageVersions<B>>>,
) -> StepRun<B> {
    let p = stages.len();
    let mut versions = versions.map(|v| v.into_iter());
    assert_eq!(p, schedule.actions.len(), "one stage per action list");
    assert_eq!(p, backends.len(), "one backend per stage");
    assert_eq!(p, mbs.len(), "one micro-batch list per stage");
    assert_eq!(p, transport.stages(), "the transport connects every stage");
    let placement = &schedule.placement;
    let last_part = placement.num_parts() - 1;
    // Inbox capacity: every message a stage can receive this step.
    let mut capacity = vec![0usize; p];
    for (s, list) in schedule.actions.iter().enumerate() {
        for a in list {
            let part = placement.part(s as u32, a.chunk).expect("validated schedule");
            let producer = match a.op {
                Op::F if part > 0 => placement.owner(part - 1),
                Op::B | Op::I if part < last_part => placement.owner(part + 1),
                _ => None,
            };
            if producer.is_some_and(|(ps, _)| ps as usize != s) {
                capacity[s] += 1;
            }
        }
    }
    let here: Vec<usize> = (0..p).filter(|&s| cfg.hosts(s)).collect();
    let mut endpoints: Vec<Option<Box<dyn Endpoint<B>>>> = match transport.open(&capacity) {
        Ok(mut ends) => {
            ends.sort_by_key(|(s, _)| *s);
            if ends.len() != here.len() || ends.iter().zip(&here).any(|((s, _), h)| s != h) {
                return StepRun {
                    stages: stages.into_iter().map(Some).collect(),
                    result: Err(EngineError::Invariant {
                        stage: 0,
                        what: format!(
                            "the transport opened endpoints for stages {:?}; this process runs stages {here:?}",
                            ends.iter().map(|(s, _)| *s).collect::<Vec<_>>()
                        ),
                    }),
                };
            }
            let mut by_stage: Vec<Option<Box<dyn Endpoint<B>>>> = (0..p).map(|_| None).collect();
            for (s, e) in ends {
                by_stage[s] = Some(e);
            }
            by_stage
        }
        Err(e) => {
            return StepRun {
                stages: stages.into_iter().map(Some).collect(),
                result: Err(e),
            }
        }
    };
    let abort = Arc::new(AtomicBool::new(false));
    let progress: Vec<Arc<Progress>> = (0..p).map(|_| Arc::new(Progress::default())).collect();
    let t0 = Instant::now();
    // Each clock's start of the step, for action and copy spans: one mark per clock (the first
    // stage's queue on it), so stages sharing a device share a time origin.
    let base: Arc<Vec<B::Mark>> = match backends.iter().map(Backend::mark).collect::<Result<Vec<_>>>() {
        Ok(marks) => Arc::new(marks),
        Err(e) => {
            return StepRun {
                stages: stages.into_iter().map(Some).collect(),
                result: Err(e),
            }
        }
    };
    type Done<B> = (usize, Stage<B>, std::result::Result<StageOutcome, WorkerError>);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done<B>>();
    let mut handles = Vec::with_capacity(p);
    let mut spawn_error = None;
    let mut back: Vec<Option<Stage<B>>> = (0..p).map(|_| None).collect();
    let mut results: Vec<Option<std::result::Result<StageOutcome, WorkerError>>> = (0..p).map(|_| None).collect();
    for (s, (stage, mbs)) in stages.into_iter().zip(mbs).enumerate() {
        let Some(endpoint) = endpoints[s].take() else {
            // Run by another process: nothing to do here.
            back[s] = Some(stage);
            results[s] = Some(Ok(StageOutcome::default()));
            handles.push(None);
            progress[s].set(DONE, t0);
            continue;
        };
        let mut worker = Worker {
            s,
            stage,
            backends: Arc::clone(&backends),
            schedule: Arc::clone(&schedule),
            mbs: Arc::new(mbs),
            endpoint,
            abort: Arc::clone(&abort),
            progress: Arc::clone(&progress[s]),
            cfg: cfg.clone(),
            t0,
            mailbox: HashMap::new(),
            current: 0,
            poison: false,
            nonfinite: None,
            base: Arc::clone(&base),
            started: None,
            host_busy: 0.0,
            host_since: t0,
            done: Vec::new(),
            sink: sink.clone(),
            last_weight: crate::data_parallel::last_weight_actions(&schedule, s),
            versions: versions.as_mut().and_then(Iterator::next),
        };
        let done_tx = done_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("baton-stage-{s}"))
            .spawn(move || {
                worker.backends[s].bind_stage(s);
                let out = catch_unwind(AssertUnwindSafe(|| worker.run()));
                let out = match out {
                    Ok(r) => r,
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".into());
                        let index = worker.current;
                        let action = worker.schedule.actions[s]
                            .get(index)
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        Err(WorkerError::Failed {
                            index,
                            action,
                            cause: format!("panic: {msg}"),
                        })
                    }
                };
                if out.is_err() {
                    worker.abort.store(true, Ordering::SeqCst);
                }
                worker.progress.set(DONE, worker.t0);
                // The receiver outlives every worker unless the executor gave up on this one.
                let _ = done_tx.send((s, worker.stage, out));
            });
        match spawned {
            Ok(h) => handles.push(Some(h)),
            Err(e) => {
                abort.store(true, Ordering::SeqCst);
                spawn_error = Some(EngineError::StageFailed {
                    stage: s as u32,
                    index: 0,
                    action: String::new(),
                    cause: format!("spawning the stage thread: {e}"),
                });
                handles.push(None);
                break;
            }
        }
    }
    drop(done_tx);
    let spawned = handles.iter().filter(|h| h.is_some()).count();
    let mut first_failure: Option<(usize, Instant)> = None;
    let mut stalled: Option<(usize, usize)> = None;
    let mut arrived = 0usize;
    while arrived < spawned {
        match done_rx.recv_timeout(WATCHDOG_POLL) {
            Ok((s, stage, r)) => {
                if r.is_err() && first_failure.is_none() {
                    first_failure = Some((s, Instant::now()));
                }
                back[s] = Some(stage);
                results[s] = Some(r);
                arrived += 1;
            }
            Err(_) => {
                let now_us = t0.elapsed().as_micros() as u64;
                if stalled.is_none() && first_failure.is_none() {
                    // Watchdog: a stage computing one action for longer than the deadline is stalled.
                    // Stages waiting for inputs are only blamed when no stage computes at all.
                    let limit = cfg.recv_timeout.as_micros() as u64;
                    let over = |pr: &Progress| now_us.saturating_sub(pr.since_us.load(Ordering::SeqCst)) > limit;
                    let state = |pr: &Progress| pr.state.load(Ordering::SeqCst);
                    let computing = progress.iter().position(|pr| state(pr) == COMPUTING && over(pr));
                    let all_waiting = progress.iter().all(|pr| state(pr) != COMPUTING)
                        && progress.iter().any(|pr| state(pr) == WAITING && over(pr));
                    let culprit = computing.or_else(|| {
                        all_waiting
                            .then(|| progress.iter().position(|pr| state(pr) == WAITING))
                            .flatten()
                    });
                    if let Some(s) = culprit {
                        stalled = Some((s, progress[s].action.load(Ordering::SeqCst)));
                        abort.store(true, Ordering::SeqCst);
                        first_failure = Some((s, Instant::now()));
                    }
                }
                if first_failure.is_some_and(|(_, at)| at.elapsed() > ABORT_GRACE) {
                    break; // give up on the stages that did not come back
                }
            }
        }
    }
    // Join every thread that came back; detach the rest (their state is lost).
    for (s, h) in handles.into_iter().enumerate() {
        if let Some(h) = h {
            if results[s].is_some() {
                let _ = h.join();
            }
        }
    }
    let result = (|| {
        if let Some(e) = spawn_error {
            return Err(e);
        }
        if let Some((s, index)) = stalled {
            let action = schedule.actions[s]
                .get(index)
                .map(ToString::to_string)
                .unwrap_or_default();
            let what = if progress[s].state.load(Ordering::SeqCst) == WAITING {
                "waiting for an input that never came"
            } else {
                "stalled: no progress on one action"
            };
            let cause = format!(
                "{what} for more than {:?} (watchdog){}",
                cfg.recv_timeout,
                if back[s].is_none() {
                    "; the thread did not stop and was detached"
                } else {
                    ""
                }
            );
            return Err(EngineError::StageFailed {
                stage: s as u32,
                index,
                action,
                cause,
            });
        }
        if let Some(s) = (0..p).find(|&s| results[s].is_none()) {
            let index = progress[s].action.load(Ordering::SeqCst);
            let action = schedule.actions[s]
                .get(index)
                .map(ToString::to_string)
                .unwrap_or_default();
            return Err(EngineError::StageFailed {
                stage: s as u32,
                index,
                action,
                cause: "did not stop after the step was aborted; the thread was detached".into(),
            });
        }
        // The first real failure to arrive, else any.
        let order: Vec<usize> = first_failure.map(|(s, _)| s).into_iter().chain(0..p).collect();
        for s in order {
            if let Some(Err(WorkerError::Failed { index, action, cause })) = &results[s] {
                return Err(EngineError::StageFailed {
                    stage: s as u32,
                    index: *index,
                    action: action.clone(),
                    cause: cause.clone(),
                });
            }
        }
        if let Some(s) = (0..p).find(|&s| matches!(results[s], Some(Err(WorkerError::Aborted)))) {
            return Err(EngineError::Aborted { stage: s as u32 });
        }
        Ok(results
            .iter_mut()
            .map(|r| match r.take() {
                Some(Ok(o)) => o,
                _ => unreachable!("every result is Ok here"),
            })
            .collect())
    })();
    StepRun { stages: back, result }
}

/// How often the executor's watchdog looks at the stages.
const WATCHDOG_POLL: Duration = Duration::from_millis(10);

/// A part's forward: each layer's stash, the output activation, and the per-token losses (head only).
type PartForward<B> = (Vec<Saved<B>>, Option<<B as Backend>::Buf>, Option<<B as Backend>::Buf>);

struct Worker<B: Backend> {
    s: usize,
    stage: Stage<B>,
    backends: Arc<Vec<B>>,
    schedule: Arc<Schedule>,
    mbs: Arc<Vec<MicroBatch<B>>>,
    /// This stage's end of the transport: every message to or from another stage goes through it.
    endpoint: Box<dyn Endpoint<B>>,
    abort: Arc<AtomicBool>,
    progress: Arc<Progress>,
    cfg: ExecConfig,
    t0: Instant,
    /// Messages between two parts of this stage (ZB-V's turn of the V), which never leave it.
    mailbox: HashMap<MessageKey, B::Buf>,
    current: usize,
    /// A NaN was injected into the current action's output.
    poison: bool,
    nonfinite: Option<NonFinite>,
    /// Every queue's mark at the start of the step.
    base: Arc<Vec<B::Mark>>,
    /// The current action's start mark (taken once its inputs have arrived) and host time spent on
    /// it before the current wait.
    started: Option<B::Mark>,
    host_busy: f64,
    host_since: Instant,
    /// Actions done, resolved into [`ActionSpan`]s at the end of the step.
    done: Vec<PendingSpan<B>>,
    /// Where a part's final gradients go as soon as they are final (data-parallel overlap).
    sink: Option<GradSink<B>>,
    /// Per chunk: the index of the last `B`/`W` on it.
    last_weight: Vec<Option<usize>>,
    /// PipeDream-2BW: the weight versions of a stream of windows.
    versions: Option<StageVersions<B>>,
}

/// An action whose marks are not resolved yet.
struct PendingSpan<B: Backend> {
    action: Action,
    start: B::Mark,
    end: B::Mark,
    host_s: f64,
}

impl<B: Backend> Worker<B> {
    fn run(&mut self) -> std::result::Result<StageOutcome, WorkerError> {
        let schedule = Arc::clone(&self.schedule);
        let list = &schedule.actions[self.s];
        let m = self.schedule.microbatches as usize;
        let chunks = self.stage.parts.len();
        let mut act_stash: Vec<Option<PartStash<B>>> = (0..chunks * m).map(|_| None).collect();
        let mut pending_losses: Vec<(usize, Action, B::Buf)> = Vec::new();
        let mut w_stash: Vec<Option<PartStash<B>>> = (0..chunks * m).map(|_| None).collect();
        // Batched weight gradients: per chunk, the weight halves kept so far, `(micro-batch, stash)`.
        let mut held: Vec<Vec<(u32, PartStash<B>)>> = (0..chunks).map(|_| Vec::new()).collect();
        let mut out = StageOutcome {
            spans: Vec::with_capacity(list.len()),
            ..StageOutcome::default()
        };
        let (mut stashed, mut bytes) = (0u32, 0usize);
        for (index, &action) in list.iter().enumerate() {
            self.current = index;
            self.progress.action.store(index, Ordering::SeqCst);
            self.progress.set(COMPUTING, self.t0);
            self.poison = false;
            if let Some(point) = self
                .cfg
                .fail
                .clone()
                .filter(|f| f.stage as usize == self.s && f.action == index)
            {
                self.inject(point.kind, index, action)?;
            }
            let fail = |e: EngineError| match e {
                e if e.is_abort() => WorkerError::Aborted,
                other => WorkerError::Failed {
                    index,
                    action: action.to_string(),
                    cause: other.to_string(),
                },
            };
            self.started = None;
            self.host_busy = 0.0;
            self.host_since = Instant::now();
            if self.versions.is_some() {
                let v = self.use_version(action).map_err(fail)?;
                out.versions.push(v);
            }
            let slot = action.chunk as usize * m + action.mb as usize;
            match action.op {
                Op::F => {
                    debug_assert!(act_stash[slot].is_none(), "stash slot filled twice");
                    let (stash, losses) = self.forward(action).map_err(fail)?;
                    if let Some(mut losses) = losses {
                        if self.poison {
                            self.be().scale(&mut losses, f32::NAN).map_err(fail)?;
                        }
                        pending_losses.push((index, action, losses));
                    }
                    stashed += 1;
                    bytes += stash.bytes;
                    act_stash[slot] = Some(stash);
                }
                Op::B | Op::I => {
                    let stash = act_stash[slot].take().ok_or_else(|| {
                        fail(EngineError::Invariant {
                            stage: self.s as u32,
                            what: format!("`{action}` has no stash: a backward before its forward"),
                        })
                    })?;
                    stashed -= 1;
                    bytes -= stash.bytes;
                    let rest = self.backward_input(action, stash).map_err(fail)?;
                    if action.op == Op::B {
                        bytes += rest.bytes;
                        if self.cfg.batch_weight_grads {
                            // Every held stash is alive while the batch runs.
                            out.peak_stash_bytes = out.peak_stash_bytes.max(bytes);
                        }
                        bytes -= self.weight_grads(action, rest, &mut held).map_err(fail)?;
                    } else {
                        bytes += rest.bytes;
                        debug_assert!(w_stash[slot].is_none());
                        w_stash[slot] = Some(rest);
                    }
                }
                Op::W => {
                    let stash = w_stash[slot].take().ok_or_else(|| {
                        fail(EngineError::Invariant {
                            stage: self.s as u32,
                            what: format!("`{action}` has no stash: a W before its I"),
                        })
                    })?;
                    if self.cfg.batch_weight_grads {
                        out.peak_stash_bytes = out.peak_stash_bytes.max(bytes);
                    }
                    bytes -= self.weight_grads(action, stash, &mut held).map_err(fail)?;
                }
            }
            out.peak_stashed = out.peak_stashed.max(stashed);
            out.peak_stash_bytes = out.peak_stash_bytes.max(bytes);
            self.finish_action(action).map_err(fail)?;
            if self.last_weight.get(action.chunk as usize).copied().flatten() == Some(index) {
                self.hand_over(action.chunk as usize).map_err(fail)?;
            }
            if let Some(v) = &self.versions {
                // 2BW: after the stage's last weight-gradient action of a window, the window's gradients go to
                // the updater (one chunk: the last `B` on the window's last micro-batch).
                let w = v.window;
                if matches!(action.op, Op::B | Op::W) && (action.mb + 1) % w == 0 {
                    let window = (action.mb / w) as usize;
                    if held.iter().any(|h| !h.is_empty()) {
                        return Err(fail(EngineError::Invariant {
                            stage: self.s as u32,
                            what: format!("window {window} ends with batched weight gradients still to run"),
                        }));
                    }
                    self.send_window(window).map_err(fail)?;
                }
            }
        }
        debug_assert_eq!(stashed, 0, "every activation stash was consumed");
        if let Some(chunk) = held.iter().position(|h| !h.is_empty()) {
            return Err(WorkerError::Failed {
                index: list.len(),
                action: String::new(),
                cause: EngineError::Invariant {
                    stage: self.s as u32,
                    what: format!(
                        "chunk {chunk} ended the step with {} weight-gradient halves never run",
                        held[chunk].len()
                    ),
                }
                .to_string(),
            });
        }
        out.spans = self.action_spans().map_err(|e| WorkerError::Failed {
            index: list.len(),
            action: String::new(),
            cause: format!("timing the actions: {e}"),
        })?;
        // The micro-batch losses, read back once the stage has queued all its work (on a device: one wait at the
        // end of the step instead of one per forward).
        for (index, action, losses) in pending_losses {
            let loss = self.be().sum(&losses).map_err(|e| WorkerError::Failed {
                index,
                action: action.to_string(),
                cause: format!("reading the loss back: {e}"),
            })?;
            if !loss.is_finite() {
                let at_s = out.spans.get(index).map_or(0.0, |s| s.end_s);
                self.note_nonfinite_at(index, action, at_s);
            }
            out.losses.push((action.mb, loss));
        }
        out.nonfinite = self.nonfinite.take();
        out.copies = self.endpoint.copy_spans(&self.base).map_err(|e| WorkerError::Failed {
            index: list.len(),
            action: String::new(),
            cause: format!("timing the transfers: {e}"),
        })?;
        Ok(out)
    }

    /// 2BW: installs the weight version `action`'s micro-batch reads (swapping with the spare copy, or taking the
    /// next version from the updater, which then retires the oldest copy), and returns it.
    fn use_version(&mut self, action: Action) -> Result<u64> {
        let Some(v) = self.versions.as_mut() else {
            return Ok(0);
        };
        let want = v.version_of(action.mb);
        if want == v.installed {
            return Ok(want);
        }
        let stage = &mut self.stage;
        let swap = |stage: &mut Stage<B>, values: &mut StageValues<B>| {
            for (part, layers) in stage.parts.iter_mut().zip(values.iter_mut()) {
                for (layer, params) in part.layers.iter_mut().zip(layers.iter_mut()) {
                    for (p, value) in layer.params_mut().iter_mut().zip(params.iter_mut()) {
                        std::mem::swap(&mut p.value, value);
                    }
                }
            }
        };
        if let Some((k, spare)) = v.spare.as_mut() {
            if *k == want {
                swap(stage, spare);
                *k = v.installed;
                v.installed = want;
                return Ok(want);
            }
        }
        if want < v.installed {
            return Err(EngineError::Invariant {
                stage: self.s as u32,
                what: format!(
                    "`{action}` reads weight version {want}, which this stage no longer holds (it holds {} and {:?})",
                    v.installed,
                    v.spare.as_ref().map(|s| s.0)
                ),
            });
        }
        // A newer version: wait for the updater.
        self.host_busy += self.host_since.elapsed().as_secs_f64();
        self.progress.set(WAITING, self.t0);
        let deadline = Instant::now() + self.cfg.recv_timeout * 4 + ABORT_GRACE;
        let (k, mut values) = loop {
            match v.rx.recv_timeout(Duration::from_millis(5)) {
                Ok(got) => break got,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if self.abort.load(Ordering::SeqCst) {
                        return Err(EngineError::Aborted { stage: self.s as u32 });
                    }
                    if Instant::now() > deadline {
                        return Err(EngineError::Comm {
                            seam: "2bw",
                            stage: self.s as u32,
                            reason: format!("weight version {want} did not arrive from the updater"),
                        });
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(if self.abort.load(Ordering::SeqCst) {
                        EngineError::Aborted { stage: self.s as u32 }
                    } else {
                        EngineError::Comm {
                            seam: "2bw",
                            stage: self.s as u32,
                            reason: format!("the updater stopped before weight version {want}"),
                        }
                    });
                }
            }
        };
        self.progress.set(COMPUTING, self.t0);
        self.host_since = Instant::now();
        if k != want {
            return Err(EngineError::Invariant {
                stage: self.s as u32,
                what: format!("`{action}` reads weight version {want}, the updater sent {k}"),
            });
        }
        // The new version goes in and the older of the two held retires (every micro-batch that read it has
        // finished on this stage): first make the newer one the installed one, then it becomes the spare.
        if let Some((k, spare)) = v.spare.as_mut() {
            if *k > v.installed {
                swap(stage, spare);
                std::mem::swap(k, &mut v.installed);
            }
        }
        swap(stage, &mut values);
        v.spare = Some((v.installed, values));
        v.installed = want;
        Ok(want)
    }

    /// 2BW: moves the stage's gradients of `window` out (leaving zeros for the next window) to the updater.
    fn send_window(&mut self, window: usize) -> Result<()> {
        let be = &self.backends[self.s];
        let mut grads = Vec::with_capacity(self.stage.parts.len());
        for part in &mut self.stage.parts {
            let mut layers = Vec::with_capacity(part.layers.len());
            for layer in &mut part.layers {
                let mut params = Vec::new();
                for p in layer.params_mut().iter_mut() {
                    let len = be.len(&p.grad);
                    params.push(std::mem::replace(&mut p.grad, be.zeros(len)?));
                }
                layers.push(params);
            }
            grads.push(layers);
        }
        let Some(v) = &self.versions else {
            return Ok(());
        };
        v.tx.send((v.worker, window, grads)).map_err(|_| EngineError::Comm {
            seam: "2bw",
            stage: self.s as u32,
            reason: format!("the updater is gone before window {window}'s gradients"),
        })
    }

    /// Hands copies of chunk `chunk`'s final gradients to the sink, if there is one.
    fn hand_over(&mut self, chunk: usize) -> Result<()> {
        let Some(sink) = &self.sink else {
            return Ok(());
        };
        let be = &self.backends[self.s];
        let grads = self.stage.parts[chunk]
            .layers
            .iter()
            .map(|layer| layer.params().iter().map(|p| be.duplicate(&p.grad)).collect())
            .collect::<Result<Vec<Vec<_>>>>()?;
        sink(self.s, chunk, grads)
    }

    /// Marks the start of the current action's work on the stage's queue, once: called after its
    /// inputs arrived (and the queue was told to wait for them), so waiting is not counted as busy.
    fn begin(&mut self) -> Result<()> {
        if self.started.is_none() {
            let be = &self.backends[self.s];
            self.started = Some(be.mark()?);
        }
        Ok(())
    }

    /// Ends the current action: its end mark and host time.
    fn finish_action(&mut self, action: Action) -> Result<()> {
        self.begin()?;
        let end = self.backends[self.s].mark()?;
        let host_s = self.host_busy + self.host_since.elapsed().as_secs_f64();
        let start = self.started.take().expect("begin() set it");
        self.done.push(PendingSpan {
            action,
            start,
            end,
            host_s,
        });
        Ok(())
    }

    /// Resolves the action marks into spans on the stage's clock.
    fn action_spans(&mut self) -> Result<Vec<ActionSpan>> {
        let be = &self.backends[self.s];
        let base = crate::comm::clock_base(&self.backends, &self.base, self.s);
        self.done
            .iter()
            .map(|d| {
                Ok(ActionSpan {
                    action: d.action,
                    start_s: be.seconds_between(base, &d.start)?,
                    end_s: be.seconds_between(base, &d.end)?,
                    host_s: d.host_s,
                })
            })
            .collect()
    }

    /// Fires an injected failure at action `index`.
    fn inject(&mut self, kind: FailureKind, index: usize, action: Action) -> std::result::Result<(), WorkerError> {
        let here = format!("stage {} action #{index} `{action}`", self.s);
        match kind {
            FailureKind::Panic => panic!("injected panic at {here}"),
            FailureKind::Error => Err(WorkerError::Failed {
                index,
                action: action.to_string(),
                cause: format!("injected error at {here}"),
            }),
            FailureKind::Stall => {
                // Stuck until the step is aborted (as a device wait with a timeout would be).
                while !self.abort.load(Ordering::SeqCst) {
                    std::thread::sleep(STALL_POLL);
                }
                Err(WorkerError::Aborted)
            }
            FailureKind::Hang => loop {
                // Never returns and never looks at the abort flag: the executor must detach it.
                std::thread::sleep(Duration::from_secs(3600));
            },
            FailureKind::Nan => {
                self.poison = true;
                Ok(())
            }
        }
    }

    /// Remembers the first action whose output was not finite.
    fn note_nonfinite(&mut self, index: usize, action: Action) {
        let at_s = self.t0.elapsed().as_secs_f64();
        self.note_nonfinite_at(index, action, at_s);
    }

    /// Records a non-finite output of action `index` (finished at `at_s`), keeping the earliest action.
    fn note_nonfinite_at(&mut self, index: usize, action: Action, at_s: f64) {
        if self.nonfinite.as_ref().is_none_or(|n| n.index > index) {
            self.nonfinite = Some(NonFinite { at_s, index, action });
        }
    }

    /// Poisons `buf` if a NaN was injected, and records a non-finite output.
    fn check_output(&mut self, buf: &mut B::Buf, index: usize, action: Action) -> Result<()> {
        let be = &self.backends[self.s];
        if self.poison {
            be.scale(buf, f32::NAN)?;
            self.note_nonfinite(index, action);
        } else if be.host_reads_are_free() && !be.sum_squares(buf)?.is_finite() {
            self.note_nonfinite(index, action);
        }
        Ok(())
    }

    fn part_index(&self, action: Action) -> u32 {
        self.stage.parts[action.chunk as usize].index
    }

    fn be(&self) -> &B {
        &self.backends[self.s]
    }

    /// Runs the part's layers forward from `x`, collecting each layer's stash.
    fn run_forward(&self, chunk: usize, mut x: Option<B::Buf>, mb: &MicroBatch<B>) -> Result<PartForward<B>> {
        let be = self.be();
        let layers = &self.stage.parts[chunk].layers;
        let mut saved = Vec::with_capacity(layers.len());
        let mut loss = None;
        for layer in layers {
            let f = layer.forward(be, x, mb)?;
            saved.push(f.saved);
            x = f.out;
            loss = loss.or(f.losses);
        }
        Ok((saved, x, loss))
    }

    fn forward(&mut self, a: Action) -> Result<(PartStash<B>, Option<B::Buf>)> {
        let part = self.part_index(a);
        let mbs = Arc::clone(&self.mbs);
        let mb = &mbs[a.mb as usize];
        let x = if part == 0 {
            None
        } else {
            Some(self.recv(MessageKind::Activation, part, a.mb)?)
        };
        self.begin()?;
        let be = self.be();
        let input = match (&x, self.cfg.recompute) {
            (Some(x), true) => Some(be.duplicate(x)?),
            _ => None,
        };
        let (saved, out, loss) = self.run_forward(a.chunk as usize, x, mb)?;
        let stash = if self.cfg.recompute {
            let bytes = input.as_ref().map_or(0, |b| be.bytes(b));
            PartStash {
                input,
                saved: Vec::new(),
                bytes,
            }
        } else {
            let bytes = saved.iter().map(|s| s.bytes(be)).sum();
            PartStash {
                input: None,
                saved,
                bytes,
            }
        };
        if part < self.schedule.placement.num_parts() - 1 {
            let mut out = out.ok_or_else(|| EngineError::Model(format!("part {part} produced no activation")))?;
            self.check_output(&mut out, self.current, a)?;
            self.send(MessageKind::Activation, part + 1, a.mb, out)?;
        }
        Ok((stash, loss))
    }

    /// Input-gradient half: returns what the weight-gradient half needs.
    fn backward_input(&mut self, a: Action, mut stash: PartStash<B>) -> Result<PartStash<B>> {
        let part = self.part_index(a);
        let last = self.schedule.placement.num_parts() - 1;
        let mbs = Arc::clone(&self.mbs);
        let mb = &mbs[a.mb as usize];
        let mut dout = if part == last {
            None
        } else {
            Some(self.recv(MessageKind::Gradient, part, a.mb)?)
        };
        self.begin()?;
        if self.cfg.recompute {
            let (saved, _, _) = self.run_forward(a.chunk as usize, stash.input.take(), mb)?;
            stash.saved = saved;
        }
        let be = self.be();
        let layers = &self.stage.parts[a.chunk as usize].layers;
        debug_assert_eq!(layers.len(), stash.saved.len());
        for (layer, saved) in layers.iter().zip(stash.saved.iter_mut()).rev() {
            dout = layer.backward_input(be, saved, dout, mb)?;
        }
        if part > 0 {
            let mut dx = dout.ok_or_else(|| EngineError::Model(format!("part {part} produced no input gradient")))?;
            self.check_output(&mut dx, self.current, a)?;
            self.send(MessageKind::Gradient, part - 1, a.mb, dx)?;
        }
        let bytes = stash.saved.iter().map(|s| s.bytes(self.be())).sum();
        Ok(PartStash {
            input: None,
            saved: stash.saved,
            bytes,
        })
    }

    /// The weight-gradient half of `a`: run now, or with batched weight gradients kept in `held` until every
    /// micro-batch of the step on `a`'s chunk (of its 2BW window, with weight versions) has reached it, then run
    /// on all of them at once, in micro-batch order (so the schedule's order of them changes no bit). Returns the
    /// stash bytes freed: `stash`'s when it ran, every held stash's when they ran, 0 when `stash` was kept.
    fn weight_grads(&mut self, a: Action, stash: PartStash<B>, held: &mut [Vec<(u32, PartStash<B>)>]) -> Result<usize> {
        if !self.cfg.batch_weight_grads {
            let bytes = stash.bytes;
            self.backward_weight(a, stash)?;
            return Ok(bytes);
        }
        let group = match &self.versions {
            Some(v) => v.window,
            None => self.schedule.microbatches,
        } as usize;
        let chunk = a.chunk as usize;
        let list = held.get_mut(chunk).ok_or_else(|| EngineError::Invariant {
            stage: self.s as u32,
            what: format!("`{a}` names chunk {chunk}, which the stage does not hold"),
        })?;
        list.push((a.mb, stash));
        if list.len() < group {
            return Ok(0);
        }
        let mut batch = std::mem::take(list);
        batch.sort_by_key(|(mb, _)| *mb);
        let first = batch[0].0 as usize;
        if first % group != 0 || batch.iter().enumerate().any(|(i, (mb, _))| *mb as usize != first + i) {
            return Err(EngineError::Invariant {
                stage: self.s as u32,
                what: format!(
                    "chunk {chunk}'s batched weight gradients hold micro-batches {:?}, not one group of {group}",
                    batch.iter().map(|(mb, _)| *mb).collect::<Vec<_>>()
                ),
            });
        }
        let bytes = batch.iter().map(|(_, s)| s.bytes).sum();
        self.begin()?;
        let be = &self.backends[self.s];
        let mbs = Arc::clone(&self.mbs);
        let group_mbs: Vec<&MicroBatch<B>> = batch.iter().map(|(mb, _)| &mbs[*mb as usize]).collect();
        let layers = &mut self.stage.parts[chunk].layers;
        // Per layer (last first, as `backward_weight`), the stashes of every micro-batch.
        let mut per_layer: Vec<Vec<Saved<B>>> = (0..layers.len()).map(|_| Vec::with_capacity(group)).collect();
        for (_, part) in batch {
            if part.saved.len() != layers.len() {
                return Err(EngineError::Invariant {
                    stage: self.s as u32,
                    what: format!(
                        "a weight-gradient stash of chunk {chunk} holds {} layers, the part has {}",
                        part.saved.len(),
                        layers.len()
                    ),
                });
            }
            for (l, saved) in part.saved.into_iter().enumerate() {
                per_layer[l].push(saved);
            }
        }
        for (layer, saved) in layers.iter_mut().zip(per_layer).rev() {
            layer.backward_weight_batched(be, saved, &group_mbs)?;
        }
        Ok(bytes)
    }

    fn backward_weight(&mut self, a: Action, stash: PartStash<B>) -> Result<()> {
        self.begin()?;
        let be = &self.backends[self.s];
        let mbs = Arc::clone(&self.mbs);
        let mb = &mbs[a.mb as usize];
        let layers = &mut self.stage.parts[a.chunk as usize].layers;
        for (layer, saved) in layers.iter_mut().zip(stash.saved).rev() {
            layer.backward_weight(be, saved, mb)?;
        }
        Ok(())
    }

    fn send(&mut self, kind: MessageKind, part: u32, mb: u32, buf: B::Buf) -> Result<()> {
        let (dst, _) = self
            .schedule
            .placement
            .owner(part)
            .ok_or_else(|| EngineError::Invariant {
                stage: self.s as u32,
                what: format!("a message for part {part}, which the placement does not hold"),
            })?;
        let key = MessageKey { kind, part, mb };
        if dst as usize == self.s {
            if self.mailbox.insert(key, buf).is_some() {
                return Err(EngineError::Invariant {
                    stage: self.s as u32,
                    what: format!("{key} was delivered twice"),
                });
            }
            return Ok(());
        }
        self.endpoint.send(dst as usize, key, buf)
    }

    /// The (kind, part, mb) message: from the stage's own mailbox, else from the transport; the stage's queue is
    /// then told to wait for it ([`Backend::await_ready`]), so the action's start mark, taken next, excludes the
    /// wait. The host time spent waiting is not counted in the action's host time.
    fn recv(&mut self, kind: MessageKind, part: u32, mb: u32) -> Result<B::Buf> {
        let key = MessageKey { kind, part, mb };
        let buf = match self.mailbox.remove(&key) {
            Some(buf) => buf,
            None => {
                self.host_busy += self.host_since.elapsed().as_secs_f64();
                // The executor's watchdog enforces `recv_timeout`; this deadline only matters if it is gone.
                let deadline = Instant::now() + self.cfg.recv_timeout * 4 + ABORT_GRACE;
                self.progress.set(WAITING, self.t0);
                let got = self.endpoint.recv(key, &self.abort, deadline);
                self.progress.set(COMPUTING, self.t0);
                self.host_since = Instant::now();
                got?
            }
        };
        self.be().await_ready(&buf)?;
        Ok(buf)
    }
}
