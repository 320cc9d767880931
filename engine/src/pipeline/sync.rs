//! The pipeline's communication-reduction state: which encoding each bucket gets this step (fixed, PowerSGD's
//! warm-up, or `auto`'s plan), DiLoCo's outer step, and the state both carry across steps and checkpoints.

use std::sync::Arc;
use std::time::Instant;

use super::{host, reduce_stages, HostTensor, Pipeline, ReplicaViews, TensorMap};
use crate::backend::Backend;
use crate::compress::{payload_bytes, plan_auto, Compression, TensorInfo};
use crate::data_parallel::{last_weight_actions, CommSpan, Slot};
use crate::error::{EngineError, Result};
use crate::executor::ActionSpan;
use crate::local_sgd::{nesterov, Outer, SyncMode};

/// `auto` re-plans when the schedule time or the bandwidth moved by more than this share since the last plan.
pub const AUTO_REPLAN_SHARE: f64 = 0.10;
/// `auto` lets the reductions run this share of the schedule time past its end before it compresses harder.
pub const AUTO_SLACK_SHARE: f64 = 0.05;

/// Checkpoint names of the state beyond parameters and moments.
const EF_PREFIX: &str = "ef.";
const POWERSGD_Q_PREFIX: &str = "powersgd_q.";
const ANCHOR_PREFIX: &str = "diloco.anchor.";
const MOMENTUM_PREFIX: &str = "diloco.momentum.";
const REPLICA_PREFIX: &str = "replica.";

/// One stage's outer deltas, `(slot, anchor − θ)` in parameter order.
type StageDeltas<B> = Vec<(Slot, <B as Backend>::Buf)>;

impl<B: Backend> Pipeline<B> {
    /// Per stage, per bucket: the encoding this step.
    pub(super) fn step_modes(&self) -> Vec<Vec<Compression>> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(s, b)| match self.dp.compress {
                Compression::Auto => self
                    .auto_plan
                    .get(s)
                    .cloned()
                    .unwrap_or_else(|| vec![Compression::None; b.len()]),
                c => vec![c.at_step(self.step); b.len()],
            })
            .collect()
    }

    /// `auto`: re-plans every stage's buckets from this step's measurements when they moved (see
    /// [`AUTO_REPLAN_SHARE`]): when each bucket became final (replica 0's spans), when the schedule ended, and the
    /// bandwidth between replicas (given, or measured from this step's fp32 buckets).
    pub(super) fn replan(&mut self, spans: &[&[ActionSpan]], pipeline_s: f64, comm: &[CommSpan]) {
        let (bytes, secs) = comm
            .iter()
            .filter(|c| c.mode == Compression::None)
            .fold((0usize, 0.0f64), |(b, t), c| (b + c.bytes, t + (c.end_s - c.start_s)));
        let measured = (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs);
        let bandwidth = match (self.dp.link_gbps, measured, self.auto_basis) {
            (Some(g), ..) => g * 1e9 / 8.0,
            (None, Some(m), _) => m,
            (None, None, Some((_, bw))) => bw,
            (None, None, None) => return,
        };
        if let Some((t, bw)) = self.auto_basis {
            let moved = |a: f64, b: f64| (a - b).abs() > AUTO_REPLAN_SHARE * b.abs().max(f64::MIN_POSITIVE);
            if !moved(pipeline_s, t) && !moved(bandwidth, bw) {
                return;
            }
        }
        let d = self.replicas.len() as f64;
        let deadline = pipeline_s * (1.0 + AUTO_SLACK_SHARE);
        let mut plan = Vec::with_capacity(self.buckets.len());
        for (s, buckets) in self.buckets.iter().enumerate() {
            let last = last_weight_actions(&self.schedule, s);
            let stage_spans = spans.get(s).copied().unwrap_or_default();
            let ends: Vec<Option<f64>> = last
                .iter()
                .map(|i| {
                    let action = self.schedule.actions[s].get((*i)?)?;
                    stage_spans.iter().find(|sp| sp.action == *action).map(|sp| sp.end_s)
                })
                .collect();
            let ready: Vec<f64> = buckets
                .iter()
                .map(|b| {
                    b.chunks
                        .iter()
                        .map(|&c| ends.get(c).copied().flatten().unwrap_or(pipeline_s))
                        .fold(0.0, f64::max)
                })
                .collect();
            let infos: Vec<Vec<&TensorInfo>> = buckets
                .iter()
                .map(|b| b.items.iter().filter_map(|slot| self.infos[s].get(slot)).collect())
                .collect();
            let seconds = |i: usize, mode: Compression| {
                // A ring all-reduce moves 2(D−1)/D of the payload per replica; top-k's all-gather (D−1) payloads.
                let factor = match mode {
                    Compression::TopK { .. } => d - 1.0,
                    _ => 2.0 * (d - 1.0) / d,
                };
                payload_bytes(mode, &infos[i]) as f64 * factor / bandwidth
            };
            plan.push(plan_auto(&ready, deadline, seconds));
        }
        self.auto_plan = plan;
        self.auto_basis = Some((pipeline_s, bandwidth));
    }

    /// DiLoCo's anchor: every replica's current parameters, with zero outer momentum.
    pub(super) fn anchor_here(&self) -> Result<Outer<B>> {
        let mut anchor = Vec::with_capacity(self.replicas.len());
        let mut momentum = Vec::with_capacity(self.replicas.len());
        for rep in &self.replicas {
            let mut a = Vec::with_capacity(rep.stages.len());
            let mut m = Vec::with_capacity(rep.stages.len());
            for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
                a.push(
                    stage
                        .params()
                        .map(|(_, p)| be.duplicate(&p.value))
                        .collect::<Result<Vec<_>>>()?,
                );
                m.push(
                    stage
                        .params()
                        .map(|(_, p)| be.zeros(p.len()))
                        .collect::<Result<Vec<_>>>()?,
                );
            }
            anchor.push(a);
            momentum.push(m);
        }
        Ok(Outer { anchor, momentum })
    }

    /// DiLoCo's outer step: every replica's delta `anchor − θ` summed across replicas bucket by bucket (in replica
    /// order, compressed as configured), then the Nesterov step on every replica (identical, so the replicas leave
    /// it bitwise equal).
    pub(super) fn outer_step(&mut self, t0: Instant, modes: &[Vec<Compression>]) -> Result<Vec<CommSpan>> {
        let SyncMode::DiLoCo { outer_lr, momentum, .. } = self.dp.sync else {
            return Ok(Vec::new());
        };
        let d = self.replicas.len();
        let Pipeline {
            replicas,
            dp_groups,
            buckets,
            codecs,
            infos,
            outer,
            hosted,
            ..
        } = self;
        let outer = outer.as_mut().ok_or_else(|| EngineError::Invariant {
            stage: 0,
            what: "DiLoCo's outer step ran before its anchor was taken".into(),
        })?;
        // deltas[r][s]: (slot, anchor − θ) in parameter order.
        let mut deltas: Vec<Vec<StageDeltas<B>>> = Vec::with_capacity(d);
        for (r, rep) in replicas.iter().enumerate() {
            let mut per_stage = Vec::with_capacity(rep.stages.len());
            for (s, (stage, be)) in rep.stages.iter().zip(rep.backends.iter()).enumerate() {
                let mut v = Vec::new();
                for (i, (slot, p)) in stage.params().enumerate() {
                    let mut delta = be.duplicate(&p.value)?;
                    be.scale(&mut delta, -1.0)?;
                    be.add_assign(&mut delta, &outer.anchor[r][s][i])?;
                    v.push((slot, delta));
                }
                per_stage.push(v);
            }
            deltas.push(per_stage);
        }
        let spans = if d > 1 {
            let backends: Vec<Arc<Vec<B>>> = replicas.iter().map(|r| Arc::clone(&r.backends)).collect();
            let mut views: Vec<ReplicaViews<'_, B>> = deltas
                .iter_mut()
                .map(|rep| {
                    rep.iter_mut()
                        .map(|st| st.iter_mut().map(|(k, v)| (*k, v)).collect())
                        .collect()
                })
                .collect();
            reduce_stages(
                &mut views, buckets, codecs, infos, modes, &backends, dp_groups, None, hosted, t0,
            )?
        } else {
            Vec::new()
        };
        for (r, (rep, rep_deltas)) in replicas.iter_mut().zip(deltas).enumerate() {
            let backends = Arc::clone(&rep.backends);
            for (s, (stage, stage_deltas)) in rep.stages.iter_mut().zip(rep_deltas).enumerate() {
                let be = &backends[s];
                for (i, ((_, p), (_, g))) in stage.params_mut().zip(stage_deltas).enumerate() {
                    nesterov(
                        be,
                        &mut p.value,
                        &mut outer.anchor[r][s][i],
                        &mut outer.momentum[r][s][i],
                        g,
                        d,
                        outer_lr,
                        momentum,
                    )?;
                }
            }
        }
        Ok(spans)
    }

    /// What the replicas carry beyond the parameters and replica 0's moments, for checkpoints: compression
    /// residuals (`ef.{replica}.{name}`), PowerSGD's `Q` (`powersgd_q.{name}`), and under DiLoCo the anchor and outer
    /// momentum (`diloco.anchor.{name}`, `diloco.momentum.{name}`) and every other replica's own parameters and
    /// moments (`replica.{r}.{name}`, with `.adam_m` / `.adam_v`).
    pub fn sync_state(&self) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        for (s, state) in self.codecs.iter().enumerate() {
            for (r, errors) in state.error.iter().enumerate() {
                for (slot, e) in errors {
                    if let Some(info) = self.infos[s].get(slot) {
                        out.insert(
                            format!("{EF_PREFIX}{r}.{}", info.name),
                            HostTensor {
                                shape: info.shape.clone(),
                                data: e.clone(),
                            },
                        );
                    }
                }
            }
            for (slot, q) in &state.q {
                if let Some(info) = self.infos[s].get(slot) {
                    let rows = info.shape[1..].iter().product::<usize>().max(1);
                    out.insert(
                        format!("{POWERSGD_Q_PREFIX}{}", info.name),
                        HostTensor {
                            shape: vec![rows, q.len() / rows],
                            data: q.clone(),
                        },
                    );
                }
            }
        }
        self.two_bw_state(&mut out)?;
        if self.dp.sync.is_local() {
            if let Some(outer) = &self.outer {
                let rep = &self.replicas[0];
                for (s, (stage, be)) in rep.stages.iter().zip(rep.backends.iter()).enumerate() {
                    for (i, (_, p)) in stage.params().enumerate() {
                        out.insert(
                            format!("{ANCHOR_PREFIX}{}", p.name),
                            host(p, be, &outer.anchor[0][s][i])?,
                        );
                        out.insert(
                            format!("{MOMENTUM_PREFIX}{}", p.name),
                            host(p, be, &outer.momentum[0][s][i])?,
                        );
                    }
                }
            }
            for (r, rep) in self.replicas.iter().enumerate().skip(1) {
                for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
                    for (_, p) in stage.params() {
                        let base = format!("{REPLICA_PREFIX}{r}.{}", p.name);
                        out.insert(format!("{base}.adam_m"), host(p, be, &p.m)?);
                        out.insert(format!("{base}.adam_v"), host(p, be, &p.v)?);
                        out.insert(base, host(p, be, &p.value)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Restores what [`Pipeline::sync_state`] saved (after [`Pipeline::load`]). Entries for replicas this pipeline
    /// does not have are ignored; replicas the checkpoint does not cover keep replica 0's state. A tensor whose
    /// shape does not match is an error naming it.
    pub fn load_sync_state(&mut self, state: &TensorMap) -> Result<()> {
        let check = |name: &str, t: &HostTensor, len: usize| {
            if t.data.len() == len {
                Ok(())
            } else {
                Err(EngineError::Model(format!(
                    "checkpoint state `{name}` holds {} values, the pipeline expects {len}",
                    t.data.len()
                )))
            }
        };
        let d = self.replicas.len();
        for (s, codec) in self.codecs.iter_mut().enumerate() {
            for (slot, info) in &self.infos[s] {
                let len = info.shape.iter().product::<usize>();
                for (r, errors) in codec.error.iter_mut().enumerate() {
                    let name = format!("{EF_PREFIX}{r}.{}", info.name);
                    if let Some(t) = state.get(&name) {
                        check(&name, t, len)?;
                        errors.insert(*slot, t.data.clone());
                    }
                }
                let name = format!("{POWERSGD_Q_PREFIX}{}", info.name);
                if let Some(t) = state.get(&name) {
                    codec.q.insert(*slot, t.data.clone());
                }
            }
        }
        self.load_two_bw_state(state)?;
        if !self.dp.sync.is_local() {
            return Ok(());
        }
        for (r, rep) in self.replicas.iter_mut().enumerate().skip(1) {
            let backends = Arc::clone(&rep.backends);
            for (stage, be) in rep.stages.iter_mut().zip(backends.iter()) {
                for (_, p) in stage.params_mut() {
                    let base = format!("{REPLICA_PREFIX}{r}.{}", p.name);
                    for (suffix, which) in [("", 0), (".adam_m", 1), (".adam_v", 2)] {
                        let name = format!("{base}{suffix}");
                        if let Some(t) = state.get(&name) {
                            check(&name, t, p.len())?;
                            let buf = be.upload(&t.data)?;
                            match which {
                                0 => p.value = buf,
                                1 => p.m = buf,
                                _ => p.v = buf,
                            }
                        }
                    }
                }
            }
        }
        let has_anchor = state.keys().any(|k| k.starts_with(ANCHOR_PREFIX));
        if has_anchor {
            let mut outer = Outer {
                anchor: Vec::with_capacity(d),
                momentum: Vec::with_capacity(d),
            };
            for rep in &self.replicas {
                let (mut a, mut m) = (Vec::new(), Vec::new());
                for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
                    let (mut sa, mut sm) = (Vec::new(), Vec::new());
                    for (_, p) in stage.params() {
                        for (prefix, into) in [(ANCHOR_PREFIX, &mut sa), (MOMENTUM_PREFIX, &mut sm)] {
                            let name = format!("{prefix}{}", p.name);
                            let t = state.get(&name).ok_or_else(|| {
                                EngineError::Model(format!("checkpoint state has DiLoCo's anchor but no `{name}`"))
                            })?;
                            check(&name, t, p.len())?;
                            into.push(be.upload(&t.data)?);
                        }
                    }
                    a.push(sa);
                    m.push(sm);
                }
                outer.anchor.push(a);
                outer.momentum.push(m);
            }
            self.outer = Some(outer);
        }
        Ok(())
    }
}
