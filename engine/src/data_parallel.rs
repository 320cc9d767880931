//! Data parallelism: `D` replicas of a pipeline, each training on its own shard of the global batch, whose
//! gradients are summed across replicas before the optimizer step.
//!
//! - **Groups.** One data-parallel group per stage: member `r` is stage `s` of replica `r` (worker `r·p + s`).
//! - **Order.** Every tensor's sum over replicas is taken in replica order, `((g0 + g1) + g2) + …`, through the
//!   group's [`Collective`]: the bits of a step depend only on (global batch, micro-batch size, `D`), never on
//!   timing, overlap, the transport or where the workers run.
//! - **Buckets.** A stage's gradients are cut into buckets of at most `bucket_mib` in the order they become final
//!   (a part's gradients are final when the stage's last `B` or `W` on it ends; within a part, last layer first).
//!   With overlap, a bucket is reduced by the stage's reducer thread as soon as every replica's parts in it are
//!   final, while the stages' remaining actions run (1F1B's cool-down, ZB's W tail, the other parts of
//!   interleaved stages); without, all buckets are reduced after the schedule (the same sums, so the same bits).
//! - **ZeRO-1.** Each tensor of a stage has one owner replica (whole tensors, largest first to the least-loaded
//!   replica, as PyTorch's `ZeroRedundancyOptimizer` partitions; the copies of a tied group share an owner). Only
//!   the owner holds the tensor's AdamW moments, receives its reduced gradient (`reduce` to the owner) and steps
//!   it; the new values are then broadcast. AdamW is elementwise and the norm is taken per whole tensor, so a
//!   ZeRO-1 run is bitwise equal to the unsharded one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};

use baton_schedules::{Op, Schedule};

use crate::backend::Backend;
use crate::comm::Collective;
use crate::compress::{reduce_bucket as reduce_compressed, CompressState, Compression, Side, TensorInfo};
use crate::error::{EngineError, Result};
use crate::local_sgd::SyncMode;

/// DDP's default bucket size, MiB.
pub const BUCKET_MIB_DEFAULT: f64 = 25.0;

/// How a pipeline is replicated for data parallelism.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataParallel {
    /// Replicas of the pipeline (`D`); the global batch is split evenly among them.
    pub replicas: u32,
    /// Reduce each bucket as soon as its gradients are final, while the schedule still runs.
    pub overlap: bool,
    /// Largest gradient bucket, MiB (a larger tensor gets a bucket of its own).
    pub bucket_mib: f64,
    /// ZeRO stage 1: AdamW moments sharded across the replicas of each stage.
    pub zero: bool,
    /// How gradients (or, under local SGD, the outer deltas) are encoded for the reduction.
    #[serde(default)]
    pub compress: Compression,
    /// When replicas synchronise: every step, or every `H` steps (DiLoCo).
    #[serde(default)]
    pub sync: SyncMode,
    /// `auto` compression: the bandwidth between replicas, Gbit/s (`None`: measured from the reductions).
    #[serde(default)]
    pub link_gbps: Option<f64>,
}

impl Default for DataParallel {
    fn default() -> Self {
        DataParallel {
            replicas: 1,
            overlap: true,
            bucket_mib: BUCKET_MIB_DEFAULT,
            zero: false,
            compress: Compression::None,
            sync: SyncMode::Bsp,
            link_gbps: None,
        }
    }
}

impl DataParallel {
    /// `d` replicas with the defaults (overlap, 25 MiB buckets, no ZeRO).
    pub fn replicas(d: u32) -> Self {
        DataParallel {
            replicas: d,
            ..DataParallel::default()
        }
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        if self.replicas == 0 {
            return Err(EngineError::config("data_parallel", 0, "needs at least one replica"));
        }
        if !(self.bucket_mib.is_finite() && self.bucket_mib > 0.0) {
            return Err(EngineError::config(
                "bucket_mib",
                self.bucket_mib,
                "must be a positive number of MiB",
            ));
        }
        self.compress.validate()?;
        self.sync.validate()?;
        if self.sync.is_local() && self.zero {
            return Err(EngineError::config(
                "zero",
                1,
                format!(
                    "ZeRO-1 shards one shared optimizer state, but under {} every replica steps its own: use --zero 0",
                    self.sync
                ),
            ));
        }
        if let Some(g) = self.link_gbps {
            if !(g.is_finite() && g > 0.0) {
                return Err(EngineError::config(
                    "link_gbps",
                    g,
                    "must be a positive number of Gbit/s",
                ));
            }
        }
        Ok(())
    }

    /// Largest bucket in bytes.
    pub fn bucket_bytes(&self) -> usize {
        (self.bucket_mib * 1024.0 * 1024.0).max(1.0) as usize
    }
}

pub(crate) use crate::executor::Slot;

/// One reduction bucket of a stage: tensors in the order their gradients become final.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Bucket {
    /// The tensors.
    pub items: Vec<Slot>,
    /// The chunks whose final gradients the bucket waits for.
    pub chunks: Vec<usize>,
    /// Gradient bytes.
    pub bytes: usize,
}

/// Per chunk of stage `stage`: the index in its action list of the last `B` or `W` on that chunk (after it the
/// chunk's gradients are final for the step).
pub(crate) fn last_weight_actions(schedule: &Schedule, stage: usize) -> Vec<Option<usize>> {
    let mut last = vec![None; schedule.chunks() as usize];
    for (i, a) in schedule.actions[stage].iter().enumerate() {
        if matches!(a.op, Op::B | Op::W) {
            last[a.chunk as usize] = Some(i);
        }
    }
    last
}

/// The buckets of a stage: `sizes[chunk][layer][param]` gradient bytes, chunks taken in the order their last
/// weight-gradient action runs, layers last first; a bucket closes before the tensor that would take it over
/// `bucket_bytes`.
pub(crate) fn plan_buckets(last: &[Option<usize>], sizes: &[Vec<Vec<usize>>], bucket_bytes: usize) -> Vec<Bucket> {
    let mut chunks: Vec<usize> = (0..sizes.len()).collect();
    chunks.sort_by_key(|&c| (last.get(c).copied().flatten(), c));
    let mut buckets = Vec::new();
    let mut cur = Bucket {
        items: Vec::new(),
        chunks: Vec::new(),
        bytes: 0,
    };
    for c in chunks {
        for (l, layer) in sizes[c].iter().enumerate().rev() {
            for (pi, &bytes) in layer.iter().enumerate() {
                if !cur.items.is_empty() && cur.bytes + bytes > bucket_bytes {
                    buckets.push(std::mem::replace(
                        &mut cur,
                        Bucket {
                            items: Vec::new(),
                            chunks: Vec::new(),
                            bytes: 0,
                        },
                    ));
                }
                cur.items.push((c, l, pi));
                cur.bytes += bytes;
                if cur.chunks.last() != Some(&c) {
                    cur.chunks.push(c);
                }
            }
        }
    }
    if !cur.items.is_empty() {
        buckets.push(cur);
    }
    buckets
}

/// ZeRO-1 owners: `owners[stage][(chunk, layer, param)]` is the replica that steps the tensor. `sizes[stage]` are
/// the tensors' element counts, `tied` lists each tied group's copies as `(stage, slot)`. Tied groups are placed
/// first (as one item: the copies share an owner so their sum can be taken on one replica), then every stage's
/// other tensors, largest first, each to the replica owning the fewest elements of that stage (ties to the lower
/// replica). Deterministic; depends only on the shapes.
pub(crate) fn assign_owners(
    replicas: usize,
    sizes: &[Vec<(Slot, usize)>],
    tied: &[Vec<(usize, Slot)>],
) -> Vec<BTreeMap<Slot, usize>> {
    let mut load = vec![vec![0usize; replicas]; sizes.len()];
    let mut owners: Vec<BTreeMap<Slot, usize>> = vec![BTreeMap::new(); sizes.len()];
    let size_of = |stage: usize, slot: Slot| sizes[stage].iter().find(|(s, _)| *s == slot).map_or(0, |(_, n)| *n);
    let mut groups: Vec<&Vec<(usize, Slot)>> = tied.iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse(g.iter().map(|&(s, slot)| size_of(s, slot)).sum::<usize>()));
    for group in groups {
        let total = |r: usize| group.iter().map(|&(s, _)| load[s][r]).sum::<usize>();
        let r = (0..replicas).min_by_key(|&r| (total(r), r)).unwrap_or(0);
        for &(s, slot) in group {
            load[s][r] += size_of(s, slot);
            owners[s].insert(slot, r);
        }
    }
    for (s, tensors) in sizes.iter().enumerate() {
        let mut rest: Vec<&(Slot, usize)> = tensors
            .iter()
            .filter(|(slot, _)| !owners[s].contains_key(slot))
            .collect();
        rest.sort_by_key(|&&(slot, n)| (std::cmp::Reverse(n), slot));
        for &(slot, n) in rest {
            let r = (0..replicas).min_by_key(|&r| (load[s][r], r)).unwrap_or(0);
            load[s][r] += n;
            owners[s].insert(slot, r);
        }
    }
    owners
}

/// One bucket's reduction, for the trace: on the reducing stage's communication track.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CommSpan {
    /// Stage whose data-parallel group reduced it.
    pub stage: u32,
    /// Bucket index in the stage's readiness order.
    pub bucket: u32,
    /// Payload bytes per replica (fp32 gradients: 4 per element; less when compressed).
    pub bytes: usize,
    /// How the bucket was encoded.
    pub mode: Compression,
    /// Start, seconds since the step began.
    pub start_s: f64,
    /// End, seconds since the step began.
    pub end_s: f64,
}

/// Sums one tensor over the replicas through the stage's group: to every replica, or (ZeRO-1) to its owner.
pub(crate) fn reduce_tensor<B: Backend>(
    group: &dyn Collective<B>,
    owner: Option<usize>,
    views: &mut [(usize, &mut B::Buf)],
) -> Result<()> {
    match owner {
        Some(root) => group.reduce(root, views),
        None => group.all_reduce(views),
    }
}

/// A part's final gradients from one replica: `grads[layer][param]` copies, sent by the stage's worker to the
/// stage's reducer.
pub(crate) struct ReadyPart<B: Backend> {
    /// Replica that produced them.
    pub replica: usize,
    /// Chunk of the stage.
    pub chunk: usize,
    /// Copies of the gradients.
    pub grads: PartGrads<B>,
}

/// Every replica's gradients of one stage after reduction: `[replica][chunk][layer][param]`.
pub(crate) type StageGrads<B> = Vec<Vec<Vec<Vec<<B as Backend>::Buf>>>>;

/// One chunk's gradients, `[layer][param]`.
type PartGrads<B> = Vec<Vec<<B as Backend>::Buf>>;

/// What a reducer has received so far: `[replica][chunk]`.
type Arrived<B> = Vec<Vec<Option<PartGrads<B>>>>;

/// What a stage's reducer needs.
pub(crate) struct Reducer<'a, B: Backend> {
    /// The stage.
    pub stage: usize,
    /// Its data-parallel group.
    pub group: &'a dyn Collective<B>,
    /// Its buckets.
    pub buckets: &'a [Bucket],
    /// ZeRO-1 owners of its tensors (`None`: every replica gets every sum).
    pub owners: Option<&'a BTreeMap<Slot, usize>>,
    /// Replicas.
    pub replicas: usize,
    /// Per replica: whether this process runs its copy of the stage (the reducer waits only for those).
    pub here: Vec<bool>,
    /// Chunks of the stage.
    pub chunks: usize,
    /// When the step began.
    pub t0: Instant,
    /// Compression of the stage's buckets this step, and what it carries between steps.
    pub codec: Codec<'a, B>,
}

/// What a stage's compressed reduction needs: each bucket's setting this step (resolved: never `Auto`), the
/// tensors' names and shapes, the carried state, and every replica's backend for the stage.
pub(crate) struct Codec<'a, B: Backend> {
    /// Per bucket.
    pub modes: &'a [Compression],
    /// The stage's tensors.
    pub infos: &'a BTreeMap<Slot, TensorInfo>,
    /// Residuals and PowerSGD's `Q`.
    pub state: &'a mut CompressState,
    /// `backends[r]`: replica `r`'s backend for the stage.
    pub backends: Vec<&'a B>,
}

impl<B: Backend> Codec<'_, B> {
    /// True when bucket `index` takes the plain device path (fp32, nothing owed from earlier steps).
    pub fn plain(&self, index: usize, bucket: &Bucket) -> bool {
        self.modes.get(index).is_none_or(|m| *m == Compression::None) && !self.state.owes(&bucket.items)
    }

    /// Reduces `bucket` (index `index`) through compression; `grads` are `(replica, its gradients for the items in
    /// item order)` for the replicas this process runs. Returns the payload bytes per replica.
    pub fn reduce(
        &mut self,
        group: &dyn Collective<B>,
        stage: usize,
        index: usize,
        bucket: &Bucket,
        grads: Vec<(usize, Vec<&mut B::Buf>)>,
    ) -> Result<usize> {
        let mode = self.modes.get(index).copied().unwrap_or_default();
        let items = bucket
            .items
            .iter()
            .map(|slot| {
                self.infos
                    .get(slot)
                    .map(|i| (*slot, i))
                    .ok_or_else(|| EngineError::Invariant {
                        stage: stage as u32,
                        what: format!("bucket {index} holds {slot:?}, which the stage does not describe"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut sides: Vec<Side<'_, B>> = grads
            .into_iter()
            .map(|(r, bufs)| Side {
                member: r,
                backend: self.backends[r],
                bufs,
            })
            .collect();
        reduce_compressed(group, stage, mode, &items, &mut sides, self.state)
    }
}

impl<B: Backend> Codec<'_, B> {
    /// Sums bucket `index` of stage `stage` over the replicas — `grads` are `(replica, its buffers for the items in
    /// item order)` for the replicas this process runs — fp32 per tensor through the group (to the owner under ZeRO-1) or compressed, and
    /// returns its span (times since `t0`).
    #[allow(clippy::too_many_arguments)]
    pub fn reduce_bucket(
        &mut self,
        group: &dyn Collective<B>,
        stage: usize,
        index: usize,
        bucket: &Bucket,
        owners: Option<&BTreeMap<Slot, usize>>,
        grads: Vec<(usize, Vec<&mut B::Buf>)>,
        t0: Instant,
    ) -> Result<CommSpan> {
        let start_s = t0.elapsed().as_secs_f64();
        let (bytes, mode) = if self.plain(index, bucket) {
            let mut per_item: Vec<Vec<(usize, &mut B::Buf)>> = (0..bucket.items.len())
                .map(|_| Vec::with_capacity(grads.len()))
                .collect();
            for (r, g) in grads {
                for (i, buf) in g.into_iter().enumerate() {
                    per_item[i].push((r, buf));
                }
            }
            for (slot, mut views) in bucket.items.iter().zip(per_item) {
                let owner = owners.and_then(|o| o.get(slot).copied());
                reduce_tensor(group, owner, &mut views)?;
            }
            (bucket.bytes, Compression::None)
        } else {
            let bytes = self.reduce(group, stage, index, bucket, grads)?;
            (bytes, self.modes.get(index).copied().unwrap_or_default())
        };
        Ok(CommSpan {
            stage: stage as u32,
            bucket: index as u32,
            bytes,
            mode,
            start_s,
            end_s: t0.elapsed().as_secs_f64(),
        })
    }
}

/// The `&mut` entries of `all` for `items`, in item order (`None` when one is missing).
pub(crate) fn pick<'a, T: 'a>(all: impl Iterator<Item = (Slot, &'a mut T)>, items: &[Slot]) -> Option<Vec<&'a mut T>> {
    let mut out: Vec<Option<&'a mut T>> = (0..items.len()).map(|_| None).collect();
    for (slot, x) in all {
        if let Some(i) = items.iter().position(|s| *s == slot) {
            out[i] = Some(x);
        }
    }
    out.into_iter().collect()
}

impl<B: Backend> Reducer<'_, B> {
    /// Receives every replica's final parts of the stage and reduces each bucket as soon as its parts are in,
    /// in bucket order. Stops with [`EngineError::Aborted`] when `abort` is set (a replica failed) and with a
    /// [`EngineError::Comm`] when nothing arrives for `timeout`.
    pub fn run(
        &mut self,
        rx: &Receiver<ReadyPart<B>>,
        abort: &AtomicBool,
        timeout: Duration,
    ) -> Result<(StageGrads<B>, Vec<CommSpan>)> {
        let mut got: Arrived<B> = (0..self.replicas)
            .map(|_| (0..self.chunks).map(|_| None).collect())
            .collect();
        if !self.here.iter().any(|&h| h) {
            // No replica runs this stage in this process: its group is reduced elsewhere.
            let none = (0..self.replicas).map(|_| Vec::new()).collect();
            return Ok((none, Vec::new()));
        }
        let mut spans = Vec::with_capacity(self.buckets.len());
        let mut next = 0usize;
        let mut waited_since = Instant::now();
        while next < self.buckets.len() {
            let here = &self.here;
            let ready = |got: &Arrived<B>, b: &Bucket| {
                b.chunks
                    .iter()
                    .all(|&c| got.iter().enumerate().all(|(r, g)| !here[r] || g[c].is_some()))
            };
            if ready(&got, &self.buckets[next]) {
                spans.push(self.reduce_bucket(next, &mut got)?);
                next += 1;
                continue;
            }
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(part) => {
                    let slot = got
                        .get_mut(part.replica)
                        .and_then(|r| r.get_mut(part.chunk))
                        .ok_or_else(|| {
                            self.err(format!("gradients of replica {}, chunk {}", part.replica, part.chunk))
                        })?;
                    if slot.replace(part.grads).is_some() {
                        return Err(self.err(format!(
                            "replica {} delivered chunk {}'s gradients twice",
                            part.replica, part.chunk
                        )));
                    }
                    waited_since = Instant::now();
                }
                Err(RecvTimeoutError::Timeout) => {
                    if abort.load(Ordering::SeqCst) {
                        return Err(EngineError::Aborted {
                            stage: self.stage as u32,
                        });
                    }
                    if waited_since.elapsed() > timeout {
                        return Err(self.err(format!(
                            "bucket {next} waited more than {timeout:?} for the replicas' gradients"
                        )));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    if abort.load(Ordering::SeqCst) {
                        return Err(EngineError::Aborted {
                            stage: self.stage as u32,
                        });
                    }
                    return Err(self.err(format!("the workers stopped before bucket {next} was complete")));
                }
            }
        }
        let grads = got
            .into_iter()
            .map(|r| r.into_iter().map(|c| c.unwrap_or_default()).collect())
            .collect();
        Ok((grads, spans))
    }

    fn reduce_bucket(&mut self, index: usize, got: &mut Arrived<B>) -> Result<CommSpan> {
        let bucket = &self.buckets[index];
        let mut grads = Vec::with_capacity(self.replicas);
        for (r, parts) in got.iter_mut().enumerate().filter(|(r, _)| self.here[*r]) {
            let all = parts.iter_mut().enumerate().flat_map(|(c, part)| {
                part.iter_mut().flat_map(move |layers| {
                    layers
                        .iter_mut()
                        .enumerate()
                        .flat_map(move |(l, params)| params.iter_mut().enumerate().map(move |(pi, g)| ((c, l, pi), g)))
                })
            });
            grads.push((
                r,
                pick(all, &bucket.items)
                    .ok_or_else(|| self.err(format!("replica {r} sent no gradients for bucket {index}")))?,
            ));
        }
        self.codec
            .reduce_bucket(self.group, self.stage, index, bucket, self.owners, grads, self.t0)
    }

    fn err(&self, reason: String) -> EngineError {
        EngineError::Comm {
            seam: "data-parallel",
            stage: self.stage as u32,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_schedules::{generate, ScheduleKind};

    #[test]
    fn buckets_follow_readiness_and_respect_the_size() {
        // Two chunks; chunk 1 finishes first. Layers last first, parameters in order.
        let sizes = vec![vec![vec![4, 4], vec![8]], vec![vec![2], vec![2, 2]]];
        let last = vec![Some(9), Some(3)];
        let b = plan_buckets(&last, &sizes, 6);
        let items: Vec<Vec<Slot>> = b.iter().map(|b| b.items.clone()).collect();
        assert_eq!(
            items,
            vec![
                vec![(1, 1, 0), (1, 1, 1), (1, 0, 0)],
                vec![(0, 1, 0)],
                vec![(0, 0, 0)],
                vec![(0, 0, 1)]
            ]
        );
        assert_eq!(b[0].chunks, vec![1]);
        assert_eq!(b.iter().map(|b| b.bytes).collect::<Vec<_>>(), vec![6, 8, 4, 4]);
        // One big bucket holds everything, waiting for both chunks.
        let one = plan_buckets(&last, &sizes, 1 << 20);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].chunks, vec![1, 0]);
        assert_eq!(one[0].items.len(), 6);
    }

    #[test]
    fn last_weight_action_per_chunk() {
        let s = generate(ScheduleKind::OneFOneB, 2, 4, 1).unwrap();
        for stage in 0..2 {
            let last = last_weight_actions(&s, stage);
            assert_eq!(last, vec![Some(s.actions[stage].len() - 1)], "1F1B ends with a B");
        }
        let z = generate(ScheduleKind::ZbH1, 2, 4, 1).unwrap();
        let last = last_weight_actions(&z, 0)[0].unwrap();
        assert_eq!(z.actions[0][last].op, Op::W);
        let i = generate(ScheduleKind::Interleaved, 2, 4, 2).unwrap();
        let last = last_weight_actions(&i, 0);
        assert!(last.iter().all(Option::is_some));
        assert_ne!(last[0], last[1]);
    }

    #[test]
    fn owners_balance_whole_tensors_and_keep_tied_copies_together() {
        let sizes = vec![
            vec![((0, 0, 0), 100), ((0, 1, 0), 60), ((0, 1, 1), 50), ((0, 2, 0), 10)],
            vec![((0, 0, 0), 40), ((0, 1, 0), 100)],
        ];
        let tied = vec![vec![(0, (0, 0, 0)), (1, (0, 1, 0))]];
        let o = assign_owners(2, &sizes, &tied);
        assert_eq!(o[0][&(0, 0, 0)], o[1][&(0, 1, 0)], "tied copies share an owner");
        let r = o[0][&(0, 0, 0)];
        assert_eq!(r, 0);
        // Stage 0: 100 on replica 0, then 60 → 1, 50 → 1 (60 < 100), 10 → 0 (100 < 110).
        assert_eq!(o[0][&(0, 1, 0)], 1);
        assert_eq!(o[0][&(0, 1, 1)], 1);
        assert_eq!(o[0][&(0, 2, 0)], 0);
        assert_eq!(o[1][&(0, 0, 0)], 1);
        // Every tensor has exactly one owner; one replica owns everything.
        let one = assign_owners(1, &sizes, &tied);
        assert!(one.iter().flat_map(|m| m.values()).all(|&r| r == 0));
        assert_eq!(one[0].len(), 4);
    }

    #[test]
    fn options_are_checked() {
        assert!(DataParallel::replicas(0).validate().is_err());
        let bad = DataParallel {
            bucket_mib: 0.0,
            ..DataParallel::default()
        };
        assert!(bad.validate().is_err());
        assert!(DataParallel::replicas(4).validate().is_ok());
        assert_eq!(DataParallel::default().bucket_bytes(), 25 << 20);
    }
}
