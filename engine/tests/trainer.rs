//! The training loop as a library: `Trainer` with checkpoints, resume on another layout, recovery from a failed
//! step (including one that loses a stage's thread) and the observer's events. Every recovered or resumed run
//! must end bitwise where the uninterrupted run ends.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use baton_engine::checkpoint;
use baton_engine::data::{Batch, LoaderState};
use baton_engine::executor::{FailureKind, FailurePoint};
use baton_engine::trainer::{
    CheckpointEvent, EvalEvent, Observer, RestartEvent, StartEvent, StepEvent, TrainData, Warning,
};
use baton_engine::{Cpu, EngineError, Gpt2, Pipeline, Result, StageSplit, TrainOptions, Trainer, TrainerConfig};
use baton_schedules::{generate, ScheduleKind};

const STEPS: u64 = 6;

/// A fixed list of batches, resumable by position (the loader state's `cursor`).
struct Fixed {
    batches: Vec<Batch>,
    next: usize,
}

impl Fixed {
    fn new() -> Self {
        Fixed {
            batches: common::batches(STEPS as usize + 2),
            next: 0,
        }
    }
}

impl TrainData for Fixed {
    fn next_batch(&mut self) -> Batch {
        let b = self.batches[self.next % self.batches.len()].clone();
        self.next += 1;
        b
    }
    fn state(&self) -> Option<LoaderState> {
        Some(LoaderState {
            seed: 0,
            epoch: 0,
            cursor: self.next as u64,
        })
    }
    fn restore(&mut self, state: Option<LoaderState>) -> Result<()> {
        self.next = state.map_or(0, |s| s.cursor as usize);
        Ok(())
    }
    fn eval_batches(&self, max: usize) -> Vec<Batch> {
        self.batches.iter().take(max).cloned().collect()
    }
}

/// A fresh path `…/{name}` inside a temporary directory that is removed when the guard drops.
fn tmp(name: &str) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::Builder::new().prefix("baton-trainer-").tempdir().unwrap();
    let dir = root.path().join(name);
    (root, dir)
}

/// A trainer over the tiny GPT with `kind` on `p` stages; `built` counts pipeline constructions.
fn trainer(config: TrainerConfig, kind: ScheduleKind, p: u32, built: Arc<AtomicUsize>) -> Trainer<'static, Cpu> {
    let model = Arc::new(Gpt2::new(common::tiny_model(), 7).unwrap());
    let mut options = TrainOptions {
        recv_timeout_ms: 300,
        ..TrainOptions::default()
    };
    options.optimizer.warmup_steps = 2;
    options.optimizer.total_steps = STEPS;
    Trainer::new(config, move || {
        built.fetch_add(1, Ordering::SeqCst);
        Pipeline::builder(model.clone())
            .schedule(generate(kind, p, 4, 1)?)
            .split(StageSplit::Uniform)
            .options(options.clone())
            .build(vec![Cpu; p as usize])
    })
    .unwrap()
}

fn config(dir: Option<PathBuf>) -> TrainerConfig {
    TrainerConfig {
        steps: STEPS,
        eval_every: 2,
        eval_batches: 2,
        checkpoint_dir: dir,
        save_every: 2,
        keep_last: 0,
        ..TrainerConfig::default()
    }
}

fn bits(t: &Trainer<'_, Cpu>) -> Vec<(String, Vec<u32>)> {
    t.pipeline()
        .parameters()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.data.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// Records every event.
#[derive(Default)]
struct Log {
    starts: Vec<u64>,
    steps: Vec<(u64, u32, bool)>,
    evals: Vec<u64>,
    checkpoints: Vec<u64>,
    restarts: Vec<RestartEvent>,
    warnings: Vec<Warning>,
}

impl Observer for Log {
    fn on_start(&mut self, e: &StartEvent) {
        self.starts.push(e.first_step);
    }
    fn on_step(&mut self, e: &StepEvent<'_>) {
        self.steps
            .push((e.report.step, e.report.loss.to_bits(), e.val_loss.is_some()));
    }
    fn on_eval(&mut self, e: &EvalEvent) {
        self.evals.push(e.step);
    }
    fn on_checkpoint(&mut self, e: &CheckpointEvent) {
        self.checkpoints.push(e.step);
    }
    fn on_restart(&mut self, e: &RestartEvent) {
        self.restarts.push(e.clone());
    }
    fn on_warning(&mut self, w: &Warning) {
        self.warnings.push(w.clone());
    }
}

fn reference() -> (Vec<(String, Vec<u32>)>, Log) {
    let mut t = trainer(config(None), ScheduleKind::OneFOneB, 4, Arc::default());
    let mut log = Log::default();
    let run = t.run(&mut Fixed::new(), &mut log).unwrap();
    assert_eq!(run.step, STEPS);
    (bits(&t), log)
}

#[test]
fn the_observer_sees_every_step_eval_and_checkpoint() {
    let (_root, dir) = tmp("events");
    let mut t = trainer(config(Some(dir.clone())), ScheduleKind::OneFOneB, 4, Arc::default());
    let mut log = Log::default();
    let run = t.run(&mut Fixed::new(), &mut log).unwrap();
    assert_eq!(log.starts, vec![0]);
    assert_eq!(
        log.steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>()
    );
    // After the first step, every 2 steps, and at the end.
    assert_eq!(log.evals, vec![1, 2, 4, 6]);
    assert_eq!(
        log.steps.iter().filter(|s| s.2).map(|s| s.0).collect::<Vec<_>>(),
        log.evals
    );
    // Every 2 steps but the last, then the final one.
    assert_eq!(log.checkpoints, vec![2, 4, 6]);
    assert!(log.restarts.is_empty() && log.warnings.is_empty(), "{:?}", log.warnings);
    assert!(run.first_val.unwrap().is_finite() && run.last_val.unwrap().is_finite());
    assert_eq!(checkpoint::load(&dir).unwrap().manifest.step, STEPS);
    assert_eq!(run.checkpoint.unwrap(), dir.join("step-00000006"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_on_another_layout_continues_bitwise() {
    let (want, want_log) = reference();
    let (_root, dir) = tmp("resume");
    let mut first = trainer(
        TrainerConfig {
            stop_at: Some(3),
            ..config(Some(dir.clone()))
        },
        ScheduleKind::OneFOneB,
        4,
        Arc::default(),
    );
    let mut data = Fixed::new();
    first.run(&mut data, &mut Log::default()).unwrap();
    let ck = checkpoint::load(&dir).unwrap();
    assert_eq!(ck.manifest.step, 3);
    // Resumed with 2 stages and ZB-H1, from a fresh data source put back by the checkpoint.
    let mut second = trainer(config(Some(dir.clone())), ScheduleKind::ZbH1, 2, Arc::default());
    let mut data = Fixed::new();
    second.resume(&ck, &mut data).unwrap();
    let mut log = Log::default();
    second.run(&mut data, &mut log).unwrap();
    assert_eq!(log.starts, vec![3]);
    assert_eq!(bits(&second), want, "resumed run differs from the uninterrupted one");
    assert_eq!(
        log.steps.iter().map(|s| s.1).collect::<Vec<_>>(),
        want_log.steps[3..].iter().map(|s| s.1).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_step_restarts_from_the_latest_checkpoint_and_ends_bitwise() {
    let (want, _) = reference();
    for kind in [FailureKind::Panic, FailureKind::Error, FailureKind::Hang] {
        let (_root, dir) = tmp(&format!("restart-{kind:?}"));
        let built = Arc::new(AtomicUsize::new(0));
        let mut t = trainer(
            TrainerConfig {
                max_restarts: 1,
                ..config(Some(dir.clone()))
            },
            ScheduleKind::OneFOneB,
            4,
            built.clone(),
        );
        t.pipeline_mut().set_failure(Some(FailurePoint {
            stage: 1,
            action: 3,
            kind,
            step: Some(5),
        }));
        let mut log = Log::default();
        let run = t.run(&mut Fixed::new(), &mut log).unwrap();
        assert_eq!(run.restarts, 1, "{kind:?}");
        let r = &log.restarts[0];
        assert_eq!((r.failed_step, r.resumed_step), (5, 4), "{kind:?}: {r:?}");
        assert!(r.cause.contains("stage 1"), "{kind:?}: {}", r.cause);
        assert_eq!(r.from.as_ref().unwrap(), &dir.join("step-00000004"));
        // Rebuilt once for the restart (a hung stage's thread is gone with its state).
        assert_eq!(built.load(Ordering::SeqCst), 2, "{kind:?}");
        assert_eq!(
            bits(&t),
            want,
            "{kind:?}: recovered run differs from the uninterrupted one"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn without_restarts_left_the_failure_is_returned() {
    let mut t = trainer(config(None), ScheduleKind::OneFOneB, 4, Arc::default());
    t.pipeline_mut().set_failure(Some(FailurePoint {
        stage: 2,
        action: 1,
        kind: FailureKind::Error,
        step: Some(2),
    }));
    match t.run(&mut Fixed::new(), &mut Log::default()) {
        Err(EngineError::StageFailed { stage: 2, index: 1, .. }) => {}
        other => panic!("expected stage 2's failure, got {:?}", other.map(|r| r.step)),
    }
}

#[test]
fn a_nan_step_is_skipped_and_reported_as_a_warning() {
    let mut t = trainer(config(None), ScheduleKind::OneFOneB, 4, Arc::default());
    t.pipeline_mut().set_failure(Some(FailurePoint {
        stage: 3,
        action: 0,
        kind: FailureKind::Nan,
        step: Some(2),
    }));
    let mut log = Log::default();
    let run = t.run(&mut Fixed::new(), &mut log).unwrap();
    assert_eq!(run.skipped, 1);
    assert_eq!(run.step, STEPS);
    assert!(
        log.warnings
            .iter()
            .any(|w| matches!(w, Warning::Skipped { step: 2, .. })),
        "{:?}",
        log.warnings
    );
}

#[test]
fn bad_trainer_settings_are_errors() {
    let model = Arc::new(Gpt2::new(common::tiny_model(), 7).unwrap());
    let build = || {
        Pipeline::builder(model.clone())
            .schedule(generate(ScheduleKind::OneFOneB, 2, 2, 1)?)
            .build(vec![Cpu; 2])
    };
    for bad in [
        TrainerConfig {
            steps: 0,
            ..TrainerConfig::default()
        },
        TrainerConfig {
            eval_batches: 0,
            ..TrainerConfig::default()
        },
        TrainerConfig {
            peak_tflops: f64::NAN,
            ..TrainerConfig::default()
        },
    ] {
        assert!(matches!(Trainer::new(bad, build), Err(EngineError::Config { .. })));
    }
}

/// Sets the stop flag once step `at` is done, as a signal handler would between steps.
struct StopAt {
    at: u64,
    flag: Arc<std::sync::atomic::AtomicBool>,
    log: Log,
    tokens_seen: Vec<u64>,
}

impl Observer for StopAt {
    fn on_step(&mut self, e: &StepEvent<'_>) {
        self.tokens_seen.push(e.tokens_seen);
        assert!(e.unix_time_s > 1.7e9, "a Unix timestamp: {}", e.unix_time_s);
        assert!(e.optimizer_started_s >= e.started_s);
        if e.report.step == self.at {
            self.flag.store(true, Ordering::SeqCst);
        }
        self.log.on_step(e);
    }
    fn on_eval(&mut self, e: &EvalEvent) {
        assert!(e.elapsed_s >= 0.0 && e.started_s >= 0.0);
        self.log.on_eval(e);
    }
    fn on_checkpoint(&mut self, e: &CheckpointEvent) {
        self.log.on_checkpoint(e);
    }
}

#[test]
fn the_stop_flag_ends_the_run_after_the_step_with_a_complete_checkpoint_that_resumes_bitwise() {
    let (want, _) = reference();
    let (_root, dir) = tmp("stop-flag");
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut first = trainer(
        TrainerConfig {
            save_every: 0,
            ..config(Some(dir.clone()))
        },
        ScheduleKind::OneFOneB,
        4,
        Arc::default(),
    );
    first.set_stop_flag(flag.clone());
    let mut obs = StopAt {
        at: 3,
        flag,
        log: Log::default(),
        tokens_seen: Vec::new(),
    };
    let mut data = Fixed::new();
    let run = first.run(&mut data, &mut obs).unwrap();
    assert!(run.interrupted);
    assert_eq!(run.step, 3);
    // Set after step 3 was reported: no further step, and that step is saved although save_every is 0.
    assert_eq!(obs.log.evals, vec![1, 2]);
    assert_eq!(obs.log.checkpoints, vec![3]);
    let per_step = common::batches(1)[0].inputs.len() as u64;
    assert_eq!(obs.tokens_seen, vec![per_step, 2 * per_step, 3 * per_step]);
    let ck = checkpoint::load(&dir).unwrap();
    assert_eq!(ck.manifest.step, 3);
    let mut second = trainer(config(Some(dir.clone())), ScheduleKind::OneFOneB, 4, Arc::default());
    let mut data = Fixed::new();
    second.resume(&ck, &mut data).unwrap();
    let run = second.run(&mut data, &mut Log::default()).unwrap();
    assert!(!run.interrupted);
    assert_eq!(
        bits(&second),
        want,
        "the interrupted and resumed run differs from the uninterrupted one"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Removes `blocker` when the run restarts (the fault is gone the second time).
struct Unblock {
    blocker: PathBuf,
    log: Log,
}

impl Observer for Unblock {
    fn on_step(&mut self, e: &StepEvent<'_>) {
        self.log.on_step(e);
    }
    fn on_restart(&mut self, e: &RestartEvent) {
        let _ = std::fs::remove_file(&self.blocker);
        self.log.on_restart(e);
    }
    fn on_warning(&mut self, w: &Warning) {
        self.log.on_warning(w);
    }
}

#[test]
fn a_failed_background_save_is_reported_when_it_happens_and_restarts_like_a_failed_step() {
    // A file where step 2's checkpoint directory would go: that write fails (a checkpoint is never rewritten).
    let run_with = |restarts: u32, name: &str| {
        let (root, dir) = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        let blocker = dir.join("step-00000002");
        std::fs::write(&blocker, "in the way").unwrap();
        let mut t = trainer(
            TrainerConfig {
                steps: STEPS,
                save_every: 2,
                max_restarts: restarts,
                ..config(Some(dir.clone()))
            },
            ScheduleKind::OneFOneB,
            2,
            Arc::default(),
        );
        let mut obs = Unblock {
            blocker,
            log: Log::default(),
        };
        let result = t.run(&mut Fixed::new(), &mut obs);
        (root, dir, result.map(|r| (r, bits(&t))), obs.log)
    };
    let (_root, dir, result, log) = run_with(0, "save-fails");
    let err = result.unwrap_err().to_string();
    assert!(err.contains("never rewritten"), "{err}");
    let failed_at = log
        .warnings
        .iter()
        .find_map(|w| match w {
            Warning::CheckpointFailed { step, cause } => Some((*step, cause.clone())),
            _ => None,
        })
        .expect("the failed write is reported as a warning");
    // Reported before the next save (step 4), not only when it would have been waited for.
    assert!(failed_at.0 < 4, "reported at step {}", failed_at.0);
    assert!(
        log.steps.len() < 4,
        "the run went on after the failure: {:?}",
        log.steps
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let (_root, dir, result, log) = run_with(1, "save-fails-restart");
    let (run, _) = result.unwrap();
    assert_eq!((run.step, run.restarts), (STEPS, 1));
    assert_eq!(log.restarts.len(), 1);
    assert!(
        log.restarts[0].cause.contains("never rewritten"),
        "{:?}",
        log.restarts[0]
    );
    assert_eq!(
        log.restarts[0].resumed_step, 0,
        "no good checkpoint before step 2: from the start"
    );
    assert_eq!(checkpoint::load(&dir).unwrap().manifest.step, STEPS);
    std::fs::remove_dir_all(&dir).unwrap();
}
