//! Stage-to-stage movement: the [`Transport`] seam and its in-process implementation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use crate::backend::{Backend, PoolStats, RecvPool};
use crate::error::{EngineError, Result};
use crate::executor::CopySpan;

/// How often a blocked receive wakes to look at the abort flag.
pub const RECV_POLL_MS: u64 = 20;

/// What a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A forward activation into a part.
    Activation,
    /// A backward input gradient into a part.
    Gradient,
}

/// Names one message of a step: what it is, the part that consumes it, and the micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageKey {
    /// Activation or gradient.
    pub kind: MessageKind,
    /// The consuming part.
    pub part: u32,
    /// The micro-batch.
    pub mb: u32,
}

impl std::fmt::Display for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            MessageKind::Activation => "activation",
            MessageKind::Gradient => "gradient",
        };
        write!(f, "the {what} of part {} micro-batch {}", self.part, self.mb)
    }
}

/// The endpoints a [`Transport`] opened for one step: `(stage, endpoint)` for each stage this process hosts.
pub type Endpoints<B> = Vec<(usize, Box<dyn Endpoint<B>>)>;

/// Moves activations and gradients between the stages of one pipeline replica. Semantics every implementation
/// keeps: **push** (a send never blocks and never waits for the receiver: each stage's inbox holds every message
/// it can receive in a step), messages land in the receiving stage's receive pool (sized from the schedule), and
/// every wait can be woken by the step's abort flag and gives up at a deadline.
pub trait Transport<B: Backend>: Send + Sync {
    /// Stages this transport connects.
    fn stages(&self) -> usize;
    /// Opens one step: the endpoints of the stages this process hosts, as `(stage, endpoint)`. `inbox[s]` is the
    /// most messages stage `s` can receive in the step (the executor computes it from the schedule).
    fn open(&self, inbox: &[usize]) -> Result<Endpoints<B>>;
    /// Moves `buf` from stage `from` to stage `to` outside a step (evaluation, sampling) and returns it there.
    fn relay(&self, from: usize, to: usize, buf: B::Buf) -> Result<B::Buf>;
    /// [`Transport::relay`] as every process calls it when stages live in several: `buf` is `Some` where this
    /// process holds stage `from`; the result is `Some` where it holds stage `to`. Every process of the replica
    /// makes the same calls in the same order. The default (every stage in this process) is `relay`.
    fn relay_hosted(&self, from: usize, to: usize, buf: Option<B::Buf>) -> Result<Option<B::Buf>> {
        match buf {
            Some(b) => self.relay(from, to, b).map(Some),
            None => Err(EngineError::Invariant {
                stage: from as u32,
                what: format!("a relay from stage {from} to stage {to} without a buffer in a single process"),
            }),
        }
    }
    /// Per stage: the receive pool's counters (empty where the transport keeps none).
    fn pool_stats(&self) -> Vec<PoolStats>;
}

/// One stage's end of a [`Transport`] for one step.
pub trait Endpoint<B: Backend>: Send {
    /// Pushes `buf` to stage `to` as message `key`. Never blocks.
    fn send(&mut self, to: usize, key: MessageKey, buf: B::Buf) -> Result<()>;
    /// Waits for message `key` (messages for other keys that arrive first are kept for later), until it arrives,
    /// `abort` is set ([`EngineError::Aborted`]) or `deadline` passes ([`EngineError::Comm`]).
    fn recv(&mut self, key: MessageKey, abort: &AtomicBool, deadline: Instant) -> Result<B::Buf>;
    /// This endpoint's sends as [`CopySpan`]s, in seconds since the step began on the destination's clock:
    /// `base[s]` is stage `s`'s mark taken when the step began. Empty where copies are not timed.
    fn copy_spans(&mut self, base: &[B::Mark]) -> Result<Vec<CopySpan>>;
}

/// The step's start mark for stage `s`'s clock: the first stage's mark among those that share its clock, so
/// stages on one device share a time origin.
pub(crate) fn clock_base<'a, B: Backend>(backends: &[B], base: &'a [B::Mark], s: usize) -> &'a B::Mark {
    let r = (0..s)
        .find(|&r| backends[r].shares_clock_with(&backends[s]))
        .unwrap_or(s);
    &base[r]
}

/// Every stage in this process: crossbeam inboxes, and the backend's copies into the receiver's pool
/// ([`Backend::transfer_pooled`]: a move on the CPU, a copy on the receiver's copy stream on a GPU).
pub struct LocalTransport<B: Backend> {
    backends: Arc<Vec<B>>,
    pools: Arc<Vec<Arc<RecvPool<B::Recv>>>>,
}

impl<B: Backend> LocalTransport<B> {
    /// A transport between `backends` (one per stage) whose stage `s` keeps a receive pool of
    /// `receive_buffers[s]` buffers (the schedule's [`baton_schedules::peak_receive_buffers`]).
    pub fn new(backends: Arc<Vec<B>>, receive_buffers: &[u32]) -> Result<Self> {
        if receive_buffers.len() != backends.len() {
            return Err(EngineError::config(
                "stages",
                backends.len(),
                format!(
                    "{} receive-pool sizes for {} stages",
                    receive_buffers.len(),
                    backends.len()
                ),
            ));
        }
        let pools = receive_buffers
            .iter()
            .map(|&n| RecvPool::with_capacity(n as usize))
            .collect();
        Ok(LocalTransport {
            backends,
            pools: Arc::new(pools),
        })
    }
}

/// A message in an in-process inbox.
pub(crate) struct Msg<B: Backend> {
    pub key: MessageKey,
    pub buf: B::Buf,
}

/// Waits on an in-process inbox for message `key` (messages for other keys that arrive first are kept in `early`
/// for later), until it arrives, `abort` is set ([`EngineError::Aborted`]) or `deadline` passes
/// ([`EngineError::Comm`]); `stage` is the receiving stage, for the errors.
pub(crate) fn wait_inbox<B: Backend>(
    rx: &Receiver<Msg<B>>,
    early: &mut HashMap<MessageKey, B::Buf>,
    key: MessageKey,
    stage: u32,
    abort: &AtomicBool,
    deadline: Instant,
) -> Result<B::Buf> {
    if let Some(buf) = early.remove(&key) {
        return Ok(buf);
    }
    loop {
        match rx.recv_timeout(Duration::from_millis(RECV_POLL_MS)) {
            Ok(msg) if msg.key == key => return Ok(msg.buf),
            Ok(msg) => {
                if early.insert(msg.key, msg.buf).is_some() {
                    return Err(EngineError::Invariant {
                        stage,
                        what: format!("{} was delivered twice", msg.key),
                    });
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if abort.load(Ordering::SeqCst) {
                    return Err(EngineError::Aborted { stage });
                }
                if Instant::now() >= deadline {
                    return Err(EngineError::Comm {
                        seam: "transport",
                        stage,
                        reason: format!("waited past the deadline for {key}; the producing stage is stalled"),
                    });
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(EngineError::Comm {
                    seam: "transport",
                    stage,
                    reason: format!("the inbox disconnected while waiting for {key}"),
                })
            }
        }
    }
}

/// A transfer whose marks are not resolved yet.
struct PendingCopy<B: Backend> {
    dst: usize,
    key: MessageKey,
    start: B::Mark,
    end: B::Mark,
}

struct LocalEndpoint<B: Backend> {
    stage: usize,
    backends: Arc<Vec<B>>,
    pools: Arc<Vec<Arc<RecvPool<B::Recv>>>>,
    rx: Receiver<Msg<B>>,
    senders: Vec<Sender<Msg<B>>>,
    /// Messages that arrived before they were asked for.
    early: HashMap<MessageKey, B::Buf>,
    copies: Vec<PendingCopy<B>>,
}

impl<B: Backend> Transport<B> for LocalTransport<B> {
    fn stages(&self) -> usize {
        self.backends.len()
    }

    fn open(&self, inbox: &[usize]) -> Result<Endpoints<B>> {
        let p = self.backends.len();
        if inbox.len() != p {
            return Err(EngineError::Invariant {
                stage: 0,
                what: format!("{} inbox sizes for {p} stages", inbox.len()),
            });
        }
        let (senders, receivers): (Vec<_>, Vec<_>) = inbox.iter().map(|&c| bounded::<Msg<B>>(c.max(1))).unzip();
        Ok(receivers
            .into_iter()
            .enumerate()
            .map(|(s, rx)| {
                let end: Box<dyn Endpoint<B>> = Box::new(LocalEndpoint {
                    stage: s,
                    backends: Arc::clone(&self.backends),
                    pools: Arc::clone(&self.pools),
                    rx,
                    senders: senders.clone(),
                    early: HashMap::new(),
                    copies: Vec::new(),
                });
                (s, end)
            })
            .collect())
    }

    fn relay(&self, from: usize, to: usize, buf: B::Buf) -> Result<B::Buf> {
        let p = self.backends.len();
        if from >= p || to >= p {
            return Err(EngineError::Comm {
                seam: "transport",
                stage: from as u32,
                reason: format!("relay from stage {from} to stage {to}: the pipeline has {p} stages"),
            });
        }
        if from == to {
            return Ok(buf);
        }
        self.backends[from].transfer(buf, &self.backends[to])
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        self.pools.iter().map(|p| p.stats()).collect()
    }
}

impl<B: Backend> Endpoint<B> for LocalEndpoint<B> {
    fn send(&mut self, to: usize, key: MessageKey, buf: B::Buf) -> Result<()> {
        let stage = self.stage as u32;
        let dst = self.senders.get(to).ok_or_else(|| EngineError::Comm {
            seam: "transport",
            stage,
            reason: format!("send of {key} to stage {to}: there are {} stages", self.senders.len()),
        })?;
        let (src_be, dst_be) = (&self.backends[self.stage], &self.backends[to]);
        // The copy can start once the producer's work is done (a mark on the source queue when it shares the
        // destination's clock; else the destination's copy queue as it was before the copy), and is done at a
        // mark on the destination's copy queue behind it.
        let start = if src_be.shares_clock_with(dst_be) {
            src_be.mark()?
        } else {
            dst_be.copy_mark()?
        };
        let buf = src_be.transfer_pooled(buf, dst_be, &self.pools[to])?;
        let end = dst_be.copy_mark()?;
        self.copies.push(PendingCopy {
            dst: to,
            key,
            start,
            end,
        });
        // The inbox holds every message of the step: this never blocks.
        dst.try_send(Msg { key, buf }).map_err(|e| EngineError::Invariant {
            stage,
            what: format!(
                "the inbox of stage {to} refused {key} ({}); its capacity is sized from the schedule",
                if e.is_full() { "full" } else { "closed" }
            ),
        })
    }

    fn recv(&mut self, key: MessageKey, abort: &AtomicBool, deadline: Instant) -> Result<B::Buf> {
        wait_inbox(&self.rx, &mut self.early, key, self.stage as u32, abort, deadline)
    }

    fn copy_spans(&mut self, base: &[B::Mark]) -> Result<Vec<CopySpan>> {
        let copies = std::mem::take(&mut self.copies);
        let mut spans = Vec::with_capacity(copies.len());
        for c in copies {
            let be = &self.backends[c.dst];
            let origin = clock_base(&self.backends, base, c.dst);
            spans.push(CopySpan {
                to_stage: c.dst as u32,
                part: c.key.part,
                mb: c.key.mb,
                activation: c.key.kind == MessageKind::Activation,
                start_s: be.seconds_between(origin, &c.start)?,
                end_s: be.seconds_between(origin, &c.end)?,
            });
        }
        Ok(spans)
    }
}
