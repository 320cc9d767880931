//! The pipeline executor: one OS thread per stage replays the stage's action list from the
//! validated schedule. Activations go forward and gradients backward as pushes into the
//! consumer's inbox (a bounded channel whose capacity is the number of messages the stage can
//! ever receive in a step, so a send never blocks). Every blocking receive polls an abort flag
//! and a deadline, so a failure anywhere ends the step with an error instead of a hang.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use serde::Serialize;

use baton_schedules::{Action, Op, Schedule};

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::model::{Layer, MicroBatch, Saved};

/// How often a blocked receive wakes to look at the abort flag.
const RECV_POLL: Duration = Duration::from_millis(20);

/// A contiguous run of global layers held by one (stage, chunk).
pub struct Part<B: Backend> {
    /// Part index in pipeline order.
    pub index: u32,
    /// Global layer units it holds.
    pub units: std::ops::Range<usize>,
    /// The layers, in order.
    pub layers: Vec<Box<dyn Layer<B>>>,
}

/// A stage's model state: its parts by chunk.
pub struct Stage<B: Backend> {
    /// Stage index.
    pub index: u32,
    /// `parts[chunk]`.
    pub parts: Vec<Part<B>>,
}

/// Executor settings.
#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// Keep only each part's input between F and B/I, recomputing the forward at backward time.
    pub recompute: bool,
    /// Longest a stage may wait for one input before the step fails.
    pub recv_timeout: Duration,
}

/// When one action ran, in seconds since the step started.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ActionSpan {
    /// The action.
    pub action: Action,
    /// Start, seconds since the step began.
    pub start_s: f64,
    /// End, seconds since the step began.
    pub end_s: f64,
}

/// What one stage reports after a step.
#[derive(Debug, Default)]
pub struct StageOutcome {
    /// Every action's span, in list order.
    pub spans: Vec<ActionSpan>,
    /// `(micro-batch, summed token loss)` from the stage holding the head.
    pub losses: Vec<(u32, f64)>,
    /// Most activation stashes held at once (F done, B/I not yet).
    pub peak_stashed: u32,
    /// Most stash bytes held at once (activation and weight-gradient stashes together).
    pub peak_stash_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Activation,
    Gradient,
}

struct Msg<B: Backend> {
    kind: Kind,
    part: u32,
    mb: u32,
    buf: B::Buf,
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

/// Runs one step's actions on every stage; returns each stage's outcome or the first failure.
pub fn run_step<B: Backend>(
    stages: &mut [Stage<B>],
    backends: &[B],
    schedule: &Schedule,
    mbs: &[Vec<MicroBatch<B>>],
    cfg: &ExecConfig,
) -> Result<Vec<StageOutcome>> {
    let p = stages.len();
    debug_assert_eq!(p, schedule.actions.len());
    debug_assert_eq!(p, backends.len());
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
    let mut senders: Vec<Sender<Msg<B>>> = Vec::with_capacity(p);
    let mut receivers: Vec<Receiver<Msg<B>>> = Vec::with_capacity(p);
    for &c in &capacity {
        let (tx, rx) = bounded(c.max(1));
        senders.push(tx);
        receivers.push(rx);
    }
    let abort = AtomicBool::new(false);
    let t0 = Instant::now();
    let results: Vec<std::result::Result<StageOutcome, WorkerError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = stages
            .iter_mut()
            .zip(receivers)
            .enumerate()
            .map(|(s, (stage, rx))| {
                let senders = senders.clone();
                let abort = &abort;
                let list = &schedule.actions[s];
                let mbs = &mbs[s];
                std::thread::Builder::new()
                    .name(format!("baton-stage-{s}"))
                    .spawn_scoped(scope, move || {
                        let mut worker = Worker {
                            s,
                            stage,
                            backends,
                            schedule,
                            mbs,
                            rx,
                            senders,
                            abort,
                            cfg,
                            t0,
                            mailbox: HashMap::new(),
                            current: 0,
                        };
                        let out = catch_unwind(AssertUnwindSafe(|| worker.run(list)));
                        let out = match out {
                            Ok(r) => r,
                            Err(panic) => {
                                let msg = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_else(|| "unknown panic".into());
                                let index = worker.current;
                                let action = list.get(index).map(ToString::to_string).unwrap_or_default();
                                Err(WorkerError::Failed {
                                    index,
                                    action,
                                    cause: format!("panic: {msg}"),
                                })
                            }
                        };
                        if out.is_err() {
                            abort.store(true, Ordering::SeqCst);
                        }
                        out
                    })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(s, h)| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(WorkerError::Failed {
                        index: 0,
                        action: String::new(),
                        cause: format!("stage {s} thread died"),
                    })
                }),
                Err(e) => Err(WorkerError::Failed {
                    index: 0,
                    action: String::new(),
                    cause: format!("spawning stage {s}: {e}"),
                }),
            })
            .collect()
    });
    // Report the first real failure (not a stage that merely stopped because of it).
    let mut outcomes = Vec::with_capacity(p);
    let mut aborted = None;
    for (s, r) in results.into_iter().enumerate() {
        match r {
            Ok(o) => outcomes.push(o),
            Err(WorkerError::Failed { index, action, cause }) => {
                return Err(EngineError::StageFailed {
                    stage: s as u32,
                    index,
                    action,
                    cause,
                })
            }
            Err(WorkerError::Aborted) => aborted = aborted.or(Some(s)),
        }
    }
    if let Some(s) = aborted {
        return Err(EngineError::StageFailed {
            stage: s as u32,
            index: 0,
            action: String::new(),
            cause: "aborted".into(),
        });
    }
    Ok(outcomes)
}

/// A part's forward: each layer's stash, the output activation, and the loss (head only).
type PartForward<B> = (Vec<Saved<B>>, Option<<B as Backend>::Buf>, Option<f64>);

struct Worker<'a, B: Backend> {
    s: usize,
    stage: &'a mut Stage<B>,
    backends: &'a [B],
    schedule: &'a Schedule,
    mbs: &'a [MicroBatch<B>],
    rx: Receiver<Msg<B>>,
    senders: Vec<Sender<Msg<B>>>,
    abort: &'a AtomicBool,
    cfg: &'a ExecConfig,
    t0: Instant,
    mailbox: HashMap<(Kind, u32, u32), B::Buf>,
    current: usize,
}

impl<B: Backend> Worker<'_, B> {
    fn run(&mut self, list: &[Action]) -> std::result::Result<StageOutcome, WorkerError> {
        let m = self.schedule.microbatches as usize;
        let chunks = self.stage.parts.len();
        let mut act_stash: Vec<Option<PartStash<B>>> = (0..chunks * m).map(|_| None).collect();
        let mut w_stash: Vec<Option<PartStash<B>>> = (0..chunks * m).map(|_| None).collect();
        let mut out = StageOutcome {
            spans: Vec::with_capacity(list.len()),
            ..StageOutcome::default()
        };
        let (mut stashed, mut bytes) = (0u32, 0usize);
        for (index, &action) in list.iter().enumerate() {
            self.current = index;
            let fail = |e: EngineError| match e {
                EngineError::StageFailed { cause, .. } if cause == "aborted" => WorkerError::Aborted,
                other => WorkerError::Failed {
                    index,
                    action: action.to_string(),
                    cause: other.to_string(),
                },
            };
            let start = self.t0.elapsed().as_secs_f64();
            let slot = action.chunk as usize * m + action.mb as usize;
            match action.op {
                Op::F => {
                    debug_assert!(act_stash[slot].is_none(), "stash slot filled twice");
                    let (stash, loss) = self.forward(action).map_err(fail)?;
                    if let Some(loss) = loss {
                        out.losses.push((action.mb, loss));
                    }
                    stashed += 1;
                    bytes += stash.bytes;
                    act_stash[slot] = Some(stash);
                }
                Op::B | Op::I => {
                    let stash = act_stash[slot]
                        .take()
                        .ok_or_else(|| fail(EngineError::Batch("no stash: B/I before F".into())))?;
                    stashed -= 1;
                    bytes -= stash.bytes;
                    let rest = self.backward_input(action, stash).map_err(fail)?;
                    if action.op == Op::B {
                        self.backward_weight(action, rest).map_err(fail)?;
                    } else {
                        bytes += rest.bytes;
                        debug_assert!(w_stash[slot].is_none());
                        w_stash[slot] = Some(rest);
                    }
                }
                Op::W => {
                    let stash = w_stash[slot]
                        .take()
                        .ok_or_else(|| fail(EngineError::Batch("no stash: W before I".into())))?;
                    bytes -= stash.bytes;
                    self.backward_weight(action, stash).map_err(fail)?;
                }
            }
            out.peak_stashed = out.peak_stashed.max(stashed);
            out.peak_stash_bytes = out.peak_stash_bytes.max(bytes);
            out.spans.push(ActionSpan {
                action,
                start_s: start,
                end_s: self.t0.elapsed().as_secs_f64(),
            });
        }
        debug_assert_eq!(stashed, 0, "every activation stash was consumed");
        Ok(out)
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
            loss = loss.or(f.loss_sum);
        }
        Ok((saved, x, loss))
    }

    fn forward(&mut self, a: Action) -> Result<(PartStash<B>, Option<f64>)> {
        let part = self.part_index(a);
        let mb = &self.mbs[a.mb as usize];
        let x = if part == 0 {
            None
        } else {
            Some(self.recv(Kind::Activation, part, a.mb)?)
        };
        let be = self.be();
        let input = match (&x, self.cfg.recompute) {
            (Some(x), true) => Some(be.duplicate(x)?),
            _ => None,
        };
        let (saved, out, loss) = self.run_forward(a.chunk as usize, x, mb)?;
        let stash = if self.cfg.recompute {
            let bytes = input.as_ref().map_or(0, |b| be.len(b) * 4);
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
            let out = out.ok_or_else(|| EngineError::Batch(format!("part {part} produced no activation")))?;
            self.send(Kind::Activation, part + 1, a.mb, out)?;
        }
        Ok((stash, loss))
    }

    /// Input-gradient half: returns what the weight-gradient half needs.
    fn backward_input(&mut self, a: Action, mut stash: PartStash<B>) -> Result<PartStash<B>> {
        let part = self.part_index(a);
        let last = self.schedule.placement.num_parts() - 1;
        let mb = &self.mbs[a.mb as usize];
        let mut dout = if part == last {
            None
        } else {
            Some(self.recv(Kind::Gradient, part, a.mb)?)
        };
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
            let dx = dout.ok_or_else(|| EngineError::Batch(format!("part {part} produced no input gradient")))?;
            self.send(Kind::Gradient, part - 1, a.mb, dx)?;
        }
        let bytes = stash.saved.iter().map(|s| s.bytes(self.be())).sum();
        Ok(PartStash {
            input: None,
            saved: stash.saved,
            bytes,
        })
    }

    fn backward_weight(&mut self, a: Action, stash: PartStash<B>) -> Result<()> {
        let be = &self.backends[self.s];
        let mb = &self.mbs[a.mb as usize];
        let layers = &mut self.stage.parts[a.chunk as usize].layers;
        for (layer, saved) in layers.iter_mut().zip(stash.saved).rev() {
            layer.backward_weight(be, saved, mb)?;
        }
        Ok(())
    }

    fn send(&mut self, kind: Kind, part: u32, mb: u32, buf: B::Buf) -> Result<()> {
        let (dst, _) = self.schedule.placement.owner(part).expect("part in range");
        let dst = dst as usize;
        if dst == self.s {
            let prev = self.mailbox.insert((kind, part, mb), buf);
            debug_assert!(prev.is_none(), "a message was delivered twice");
            return Ok(());
        }
        let buf = self.backends[self.s].transfer(buf, &self.backends[dst])?;
        // The inbox can hold every message of the step: this never blocks.
        self.senders[dst].try_send(Msg { kind, part, mb, buf }).map_err(|e| {
            EngineError::Batch(format!(
                "inbox of stage {dst} refused a message ({}): capacity is sized from the schedule",
                if e.is_full() { "full" } else { "closed" }
            ))
        })
    }

    fn recv(&mut self, kind: Kind, part: u32, mb: u32) -> Result<B::Buf> {
        if let Some(buf) = self.mailbox.remove(&(kind, part, mb)) {
            return Ok(buf);
        }
        let deadline = Instant::now() + self.cfg.recv_timeout;
        loop {
            match self.rx.recv_timeout(RECV_POLL) {
                Ok(msg) if (msg.kind, msg.part, msg.mb) == (kind, part, mb) => return Ok(msg.buf),
                Ok(msg) => {
                    let prev = self.mailbox.insert((msg.kind, msg.part, msg.mb), msg.buf);
                    debug_assert!(prev.is_none(), "a message was delivered twice");
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.abort.load(Ordering::SeqCst) {
                        return Err(EngineError::StageFailed {
                            stage: self.s as u32,
                            index: 0,
                            action: String::new(),
                            cause: "aborted".into(),
                        });
                    }
                    if Instant::now() >= deadline {
                        return Err(EngineError::Batch(format!(
                            "waited {:?} for the {} of part {part} micro-batch {mb}; the producing stage is stalled",
                            self.cfg.recv_timeout,
                            if kind == Kind::Activation {
                                "activation"
                            } else {
                                "gradient"
                            }
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(EngineError::Batch("inbox disconnected while waiting".into()));
                }
            }
        }
    }
}
