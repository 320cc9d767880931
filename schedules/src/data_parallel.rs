//! Data parallelism in the cost model: `D` replicas of one pipeline run the same schedule, and each
//! stage's gradients are reduced across its `D` copies while, or after, the pipeline drains.
//!
//! The model is that of the engine's data parallelism:
//! - **Replicas.** The `D` replicas run the same schedule on the same costs, so their per-stage
//!   timelines are identical: one [`simulate`] gives every replica's compute.
//! - **Groups and links.** Each stage forms one data-parallel group with its `D` copies, on a link
//!   of its own (bandwidth `link_bytes_per_s`, latency `link_latency_s`). A stage's reductions run
//!   one after another on that link: one FIFO communication queue per stage, and stages never
//!   share a link.
//! - **One reduction.** A bucket of `n` bytes is reduced with an order-fixed reduce-scatter
//!   followed by an all-gather, whose cost is that of a ring all-reduce:
//!   `2·(D−1)/D · n / bandwidth + 2·(D−1) · latency` ([`DpCosts::reduce_time_s`]).
//! - **Buckets.** A part's `n` gradient bytes travel in `ceil(n / bucket_bytes)` buckets (one if
//!   `bucket_bytes` is infinite, none if `n = 0` or `D = 1`); buckets never span two parts. A
//!   part's buckets are queued together, so only their number matters (the bandwidth term is
//!   linear in bytes; each bucket pays the latency term once).
//! - **With overlap.** A part's gradients are final when the stage's last `B` or `W` on that part
//!   ends (the one for the last micro-batch to touch it). Its buckets start no earlier than that;
//!   the stage's parts are queued in the order their gradients become final (ties by part
//!   number). This is conservative: gradients inside one part are not released layer by layer.
//! - **Without overlap.** Every reduction waits for the flush: the end of the whole pipeline (the
//!   compute makespan over all stages), as DeepSpeed's pipeline engine and Baton's step (run the
//!   schedule, then reduce) do; then each stage's buckets run on its own link.
//!
//! The step ends when the last stage's computation and the last reduction have both ended:
//! `step_time = max(compute makespan, last reduction end)`. **Exposed communication** is what the
//! reductions add to the step, `step_time − makespan`; per stage, the part of its reductions
//! past the makespan. Overlap is never slower: each bucket is ready no later than the flush and
//! the queue is FIFO, so every stage's last end is at most `makespan + its total reduction time`,
//! the end without overlap. With `D = 1` nothing is communicated and the step is the makespan.
//!
//! Times are in seconds, like the [`Costs`] given with them (the engine feeds measured seconds);
//! bytes are bytes. Any other time unit works if the costs, the link's bandwidth (bytes per that
//! unit) and its latency share it: `baton schedule` uses milliseconds. One pass over the
//! simulation's spans: linear in the number of actions, like [`simulate`].

use serde::Serialize;

use crate::error::ScheduleError;
use crate::ir::{Op, Schedule};
use crate::simulate::{simulate, Costs, SimReport};

/// Most replicas a data-parallel cost model may name.
pub const REPLICAS_MAX: u32 = 1 << 16;

/// PyTorch DDP's default bucket size, 25 MiB.
pub const BUCKET_BYTES_DEFAULT: f64 = 25.0 * 1024.0 * 1024.0;

/// The data-parallel part of the cost model: how many replicas, how many gradient bytes each
/// part reduces, and the link they cross.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DpCosts {
    /// Number of data-parallel replicas `D` (1..=[`REPLICAS_MAX`]); 1 means no reduction.
    pub replicas: u32,
    /// Per part: gradient bytes one replica reduces each step (finite, >= 0).
    pub grad_bytes: Vec<f64>,
    /// Bandwidth of each stage's link, bytes per second (finite, > 0).
    pub link_bytes_per_s: f64,
    /// Latency of one message on a link, seconds (finite, >= 0); a bucket pays it `2·(D−1)` times.
    pub link_latency_s: f64,
    /// Largest bucket, bytes (> 0; infinite: one bucket per part).
    pub bucket_bytes: f64,
    /// Whether a part's reduction starts as soon as its gradients are final (`true`) or only
    /// after the whole pipeline has flushed (`false`).
    pub overlap: bool,
}

impl DpCosts {
    /// `replicas` replicas, `grad_bytes` bytes for every one of `parts` parts, the given link,
    /// [`BUCKET_BYTES_DEFAULT`] buckets, with overlap.
    pub fn uniform(parts: u32, replicas: u32, grad_bytes: f64, link_bytes_per_s: f64, link_latency_s: f64) -> Self {
        DpCosts {
            replicas,
            grad_bytes: vec![grad_bytes; parts as usize],
            link_bytes_per_s,
            link_latency_s,
            bucket_bytes: BUCKET_BYTES_DEFAULT,
            overlap: true,
        }
    }

    /// Buckets that carry `bytes` of one part: `ceil(bytes / bucket_bytes)`, at least one, and
    /// none when there is nothing to send (`bytes = 0` or a single replica).
    pub fn buckets(&self, bytes: f64) -> u64 {
        if self.replicas <= 1 || bytes <= 0.0 {
            return 0;
        }
        // Saturating conversion: an absurdly small bucket gives u64::MAX, never a wrap.
        ((bytes / self.bucket_bytes).ceil() as u64).max(1)
    }

    /// Bytes one replica sends (and receives) to reduce `bytes`: `2·(D−1)/D · bytes`.
    pub fn wire_bytes(&self, bytes: f64) -> f64 {
        let d = f64::from(self.replicas.max(1));
        2.0 * (d - 1.0) / d * bytes
    }

    /// Seconds to reduce `bytes` in `buckets` buckets over one link:
    /// `2·(D−1)/D · bytes / bandwidth + buckets · 2·(D−1) · latency`.
    pub fn reduce_time_s(&self, bytes: f64, buckets: u64) -> f64 {
        let hops = 2.0 * f64::from(self.replicas.max(1) - 1);
        self.wire_bytes(bytes) / self.link_bytes_per_s + buckets as f64 * hops * self.link_latency_s
    }

    fn check(&self, parts: u32) -> Result<(), ScheduleError> {
        let bad = |what: String| Err(ScheduleError::Costs(what));
        if self.replicas == 0 || self.replicas > REPLICAS_MAX {
            return bad(format!(
                "data-parallel replicas is {}; it must be in 1..={REPLICAS_MAX}",
                self.replicas
            ));
        }
        if self.grad_bytes.len() != parts as usize {
            return bad(format!(
                "gradient bytes list {} parts, the schedule has {parts}",
                self.grad_bytes.len()
            ));
        }
        if let Some((part, v)) = self
            .grad_bytes
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            return bad(format!(
                "gradient bytes of part {part} are {v}; they must be finite and >= 0"
            ));
        }
        if !self.link_bytes_per_s.is_finite() || self.link_bytes_per_s <= 0.0 {
            return bad(format!(
                "link bandwidth is {} bytes/s; it must be finite and > 0",
                self.link_bytes_per_s
            ));
        }
        if !self.link_latency_s.is_finite() || self.link_latency_s < 0.0 {
            return bad(format!(
                "link latency is {} s; it must be finite and >= 0",
                self.link_latency_s
            ));
        }
        if self.bucket_bytes.is_nan() || self.bucket_bytes <= 0.0 {
            return bad(format!(
                "bucket size is {} bytes; it must be > 0 (infinite: one bucket per part)",
                self.bucket_bytes
            ));
        }
        Ok(())
    }
}

/// One stage's gradient reduction in a data-parallel step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageReduction {
    /// Gradient bytes the stage reduces (the sum over its parts).
    pub bytes: f64,
    /// Buckets it reduces them in.
    pub buckets: u64,
    /// When the stage's last action ends.
    pub compute_end: f64,
    /// When its first bucket starts (with nothing to send: when it could have).
    pub start: f64,
    /// When its last bucket ends (with nothing to send: `start`).
    pub end: f64,
    /// Time its link is busy reducing.
    pub busy: f64,
    /// Time its reductions run past the compute makespan: `max(0, end − makespan)`.
    pub exposed: f64,
}

/// The data-parallel step's prediction.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DpReport {
    /// Number of replicas `D`.
    pub replicas: u32,
    /// Whether reductions overlapped the pipeline's compute.
    pub overlap: bool,
    /// Predicted step time: `max(makespan, last reduction end)`.
    pub step_time: f64,
    /// The pipeline's compute makespan alone (the step time of one replica, `D = 1`).
    pub compute_makespan: f64,
    /// Communication the step waits for: `step_time − compute_makespan`.
    pub exposed_comm: f64,
    /// `exposed_comm / step_time` (0 for an empty step).
    pub exposed_share: f64,
    /// The pipeline bubble, as [`SimReport::bubble`] (idle over `stages · makespan`).
    pub bubble: f64,
    /// Compute idle over the whole step: `1 − Σ busy / (stages · step_time)`; the bubble plus the
    /// time stages wait for the reductions.
    pub step_idle: f64,
    /// Gradient bytes one replica reduces per step (all parts).
    pub grad_bytes: f64,
    /// Bytes one replica sends per step: `2·(D−1)/D · grad_bytes`.
    pub wire_bytes: f64,
    /// Per stage: its reduction.
    pub stages: Vec<StageReduction>,
}

/// Simulates `schedule` under `costs` (see [`simulate`]) and predicts the data-parallel step
/// under `dp`; times in the unit of `costs`: seconds, the unit of `dp`'s link.
pub fn simulate_data_parallel(schedule: &Schedule, costs: &Costs, dp: &DpCosts) -> Result<DpReport, ScheduleError> {
    dp.check(schedule.placement.num_parts())?;
    let sim = simulate(schedule, costs)?;
    data_parallel_from_sim(schedule, &sim, dp)
}

/// The data-parallel step for a simulation already run: `sim` must be [`simulate`]'s report for
/// `schedule` (a report of another shape is refused); times in `sim`'s unit, seconds.
pub fn data_parallel_from_sim(schedule: &Schedule, sim: &SimReport, dp: &DpCosts) -> Result<DpReport, ScheduleError> {
    let parts = schedule.placement.num_parts();
    dp.check(parts)?;
    let rows = schedule.placement.as_rows();
    let foreign = sim.spans.len() != rows.len()
        || sim.busy.len() != rows.len()
        || sim.spans.iter().flatten().any(|span| span.part >= parts);
    if foreign {
        return Err(ScheduleError::Costs(format!(
            "the simulation report has {} stages and does not belong to this {}-stage schedule",
            sim.spans.len(),
            rows.len()
        )));
    }
    let makespan = sim.makespan;
    // When each part's gradients are final: the end of its last B or W (a stage runs one action at a time).
    let mut last_grad = vec![0.0f64; parts as usize];
    for span in sim.spans.iter().flatten() {
        if matches!(span.action.op, Op::B | Op::W) {
            let at = &mut last_grad[span.part as usize];
            *at = at.max(span.end);
        }
    }
    let stages: Vec<StageReduction> = rows
        .iter()
        .zip(&sim.spans)
        .map(|(held, spans)| {
            let compute_end = spans.iter().map(|sp| sp.end).fold(0.0, f64::max);
            // (ready, part): when each held part's gradients are final.
            let mut ready: Vec<(f64, u32)> = held
                .iter()
                .map(|&part| (if dp.overlap { last_grad[part as usize] } else { makespan }, part))
                .collect();
            ready.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let (mut bytes, mut buckets, mut busy) = (0.0, 0u64, 0.0);
            let (mut start, mut free) = (None, 0.0f64);
            for &(at, part) in &ready {
                let n = dp.grad_bytes[part as usize];
                let k = dp.buckets(n);
                bytes += n;
                if k == 0 {
                    continue;
                }
                let begin = free.max(at);
                let t = dp.reduce_time_s(n, k);
                start.get_or_insert(begin);
                free = begin + t;
                buckets = buckets.saturating_add(k);
                busy += t;
            }
            // Nothing sent: the window is empty, at the moment the first reduction could start.
            let start = start.unwrap_or_else(|| ready.first().map_or(compute_end, |r| r.0));
            let end = if buckets == 0 { start } else { free };
            StageReduction {
                bytes,
                buckets,
                compute_end,
                start,
                end,
                busy,
                exposed: (end - makespan).max(0.0),
            }
        })
        .collect();
    let step_time = stages.iter().map(|st| st.end).fold(makespan, f64::max);
    let exposed_comm = step_time - makespan;
    let busy: f64 = sim.busy.iter().sum();
    let grad_bytes: f64 = dp.grad_bytes.iter().sum();
    let (exposed_share, step_idle) = if step_time > 0.0 {
        (
            exposed_comm / step_time,
            (1.0 - busy / (rows.len() as f64 * step_time)).max(0.0),
        )
    } else {
        (0.0, 0.0)
    };
    Ok(DpReport {
        replicas: dp.replicas,
        overlap: dp.overlap,
        step_time,
        compute_makespan: makespan,
        exposed_comm,
        exposed_share,
        bubble: sim.bubble,
        step_idle,
        grad_bytes,
        wire_bytes: if dp.replicas > 1 {
            dp.wire_bytes(grad_bytes)
        } else {
            0.0
        },
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::generate;
    use crate::ir::ScheduleKind;

    const MIB: f64 = 1024.0 * 1024.0;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    fn one_f_one_b(p: u32, m: u32) -> Schedule {
        generate(ScheduleKind::OneFOneB, p, m, 1).unwrap()
    }

    #[test]
    fn one_replica_is_the_plain_simulation() {
        let s = one_f_one_b(4, 8);
        let costs = Costs::uniform(4, 1.0, 2.0, 1.0, 1.0, 0.1);
        let sim = simulate(&s, &costs).unwrap();
        for overlap in [true, false] {
            let dp = DpCosts {
                overlap,
                ..DpCosts::uniform(4, 1, 100.0 * MIB, 1e9, 1e-5)
            };
            let r = simulate_data_parallel(&s, &costs, &dp).unwrap();
            assert_eq!(r.step_time, sim.makespan);
            assert_eq!(r.compute_makespan, sim.makespan);
            assert_eq!(r.exposed_comm, 0.0);
            assert_eq!(r.bubble, sim.bubble);
            assert!(close(r.step_idle, sim.bubble));
            assert_eq!(r.wire_bytes, 0.0);
            assert!(r
                .stages
                .iter()
                .all(|st| st.buckets == 0 && st.busy == 0.0 && st.exposed == 0.0));
        }
    }

    #[test]
    fn one_stage_one_bucket_without_overlap_is_compute_plus_ring_time() {
        // 1 stage, 3 micro-batches of F = 1, B = 2: compute 9 s. 8 MiB over 4 replicas at 1 GB/s,
        // 1 ms latency: 2·3/4 · 8 MiB / 1e9 + 2·3 · 1e-3.
        let s = one_f_one_b(1, 3);
        let costs = Costs::uniform(1, 1.0, 2.0, 1.0, 1.0, 0.0);
        let dp = DpCosts {
            overlap: false,
            ..DpCosts::uniform(1, 4, 8.0 * MIB, 1e9, 1e-3)
        };
        let r = simulate_data_parallel(&s, &costs, &dp).unwrap();
        let ring = 1.5 * 8.0 * MIB / 1e9 + 6e-3;
        assert!(close(r.step_time, 9.0 + ring), "{r:?}");
        assert!(close(r.exposed_comm, ring));
        assert!(close(r.exposed_share, ring / (9.0 + ring)));
        assert_eq!(r.stages[0].buckets, 1);
        assert!(close(r.stages[0].busy, ring));
        assert_eq!((r.stages[0].start, r.stages[0].compute_end), (9.0, 9.0));
        assert!(close(r.wire_bytes, 1.5 * 8.0 * MIB));
        assert_eq!(r.grad_bytes, 8.0 * MIB);
        // One stage: its last backward is the flush, so overlap changes nothing.
        let with = simulate_data_parallel(&s, &costs, &DpCosts { overlap: true, ..dp }).unwrap();
        assert_eq!(with.step_time, r.step_time);
    }

    #[test]
    fn a_stage_that_finishes_early_hides_its_reduction() {
        // 1F1B, 2 stages, 4 micro-batches, F = B = 1: stage 1 ends at 9, stage 0 (the flush) at 10.
        let s = one_f_one_b(2, 4);
        let costs = Costs::uniform(2, 1.0, 1.0, 0.5, 0.5, 0.0);
        // Stage 0 reduces nothing, stage 1 reduces 1 s worth (2 replicas: wire bytes = bytes).
        let dp = DpCosts {
            grad_bytes: vec![0.0, 1e9],
            ..DpCosts::uniform(2, 2, 0.0, 1e9, 0.0)
        };
        let r = simulate_data_parallel(&s, &costs, &dp).unwrap();
        assert_eq!(r.compute_makespan, 10.0);
        assert_eq!(r.stages[1].compute_end, 9.0);
        assert!(close(r.step_time, 10.0), "{r:?}");
        assert_eq!(r.exposed_comm, 0.0);
        assert_eq!((r.stages[0].buckets, r.stages[0].busy), (0, 0.0));
        let flush = simulate_data_parallel(&s, &costs, &DpCosts { overlap: false, ..dp }).unwrap();
        assert!(close(flush.step_time, 11.0));
        assert!(close(flush.exposed_comm, 1.0));
        assert_eq!(flush.stages[1].start, 10.0);
    }

    #[test]
    fn parts_queue_fifo_in_the_order_their_gradients_become_final() {
        // Interleaved, 2 stages × 2 chunks: stage 0 holds parts 0 and 2; part 2's backwards run
        // before part 0's last one, so part 2 is reduced first.
        let s = generate(ScheduleKind::Interleaved, 2, 4, 2).unwrap();
        let costs = Costs::uniform(4, 1.0, 2.0, 1.0, 1.0, 0.0);
        let sim = simulate(&s, &costs).unwrap();
        let dp = DpCosts::uniform(4, 2, 1e9, 1e9, 0.0);
        let r = data_parallel_from_sim(&s, &sim, &dp).unwrap();
        let last_b = |stage: usize, part: u32| {
            sim.spans[stage]
                .iter()
                .filter(|sp| sp.part == part && sp.action.op == Op::B)
                .map(|sp| sp.end)
                .fold(0.0, f64::max)
        };
        let (p2, p0) = (last_b(0, 2), last_b(0, 0));
        assert!(p2 < p0);
        assert_eq!(r.stages[0].start, p2);
        // Each part takes 1 s; the second starts when both the first is done and its own are final.
        assert!(close(r.stages[0].end, (p2 + 1.0).max(p0) + 1.0));
        assert!(close(r.stages[0].busy, 2.0));
    }

    #[test]
    fn zero_bubble_weight_gradients_decide_when_a_part_is_final() {
        let s = generate(ScheduleKind::ZbH1, 2, 4, 1).unwrap();
        let costs = Costs::uniform(2, 1.0, 2.0, 1.0, 1.0, 0.0);
        let sim = simulate(&s, &costs).unwrap();
        let dp = DpCosts::uniform(2, 2, 0.5e9, 1e9, 0.0);
        let r = data_parallel_from_sim(&s, &sim, &dp).unwrap();
        for (st, red) in r.stages.iter().enumerate() {
            let last_w = sim.spans[st]
                .iter()
                .filter(|sp| sp.action.op == Op::W)
                .map(|sp| sp.end)
                .fold(0.0, f64::max);
            assert_eq!(red.start, last_w);
            assert!(close(red.end, last_w + 0.5));
        }
    }

    #[test]
    fn more_buckets_pay_more_latency() {
        let s = one_f_one_b(2, 4);
        let costs = Costs::uniform(2, 1.0, 1.0, 0.5, 0.5, 0.0);
        let one = DpCosts {
            overlap: false,
            bucket_bytes: f64::INFINITY,
            ..DpCosts::uniform(2, 8, 10.0 * MIB, 1e9, 1e-3)
        };
        let ten = DpCosts {
            bucket_bytes: 1.0 * MIB,
            ..one.clone()
        };
        let (a, b) = (
            simulate_data_parallel(&s, &costs, &one).unwrap(),
            simulate_data_parallel(&s, &costs, &ten).unwrap(),
        );
        assert_eq!((a.stages[0].buckets, b.stages[0].buckets), (1, 10));
        // Nine more buckets, each 2·(8−1) latencies.
        assert!(close(b.step_time - a.step_time, 9.0 * 14.0 * 1e-3), "{a:?} {b:?}");
        // A partial last bucket still counts: 10.5 MiB in 1 MiB buckets is 11.
        assert_eq!(ten.buckets(10.5 * MIB), 11);
        // Without latency the bucket size does not matter.
        let no_lat = |d: &DpCosts| DpCosts {
            link_latency_s: 0.0,
            ..d.clone()
        };
        assert_eq!(
            simulate_data_parallel(&s, &costs, &no_lat(&one)).unwrap().step_time,
            simulate_data_parallel(&s, &costs, &no_lat(&ten)).unwrap().step_time
        );
    }

    #[test]
    fn bad_data_parallel_costs_are_refused_naming_the_value() {
        let s = one_f_one_b(2, 4);
        let costs = Costs::unit(2);
        let good = DpCosts::uniform(2, 2, MIB, 1e9, 1e-6);
        let cases: Vec<(DpCosts, &str)> = vec![
            (
                DpCosts {
                    replicas: 0,
                    ..good.clone()
                },
                "replicas is 0",
            ),
            (
                DpCosts {
                    replicas: REPLICAS_MAX + 1,
                    ..good.clone()
                },
                "replicas",
            ),
            (
                DpCosts {
                    grad_bytes: vec![1.0],
                    ..good.clone()
                },
                "list 1 parts",
            ),
            (
                DpCosts {
                    grad_bytes: vec![1.0, -1.0],
                    ..good.clone()
                },
                "part 1",
            ),
            (
                DpCosts {
                    link_bytes_per_s: 0.0,
                    ..good.clone()
                },
                "bandwidth is 0",
            ),
            (
                DpCosts {
                    link_bytes_per_s: f64::NAN,
                    ..good.clone()
                },
                "bandwidth is NaN",
            ),
            (
                DpCosts {
                    link_latency_s: -1.0,
                    ..good.clone()
                },
                "latency is -1",
            ),
            (
                DpCosts {
                    bucket_bytes: 0.0,
                    ..good.clone()
                },
                "bucket size is 0",
            ),
        ];
        for (dp, needle) in cases {
            let err = simulate_data_parallel(&s, &costs, &dp).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // A report of another schedule is refused, not indexed out of range.
        let other = simulate(&one_f_one_b(3, 4), &Costs::unit(3)).unwrap();
        let err = data_parallel_from_sim(&s, &other, &good).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
    }
}
