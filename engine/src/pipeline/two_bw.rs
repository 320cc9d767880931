//! PipeDream-2BW (Narayanan et al. 2021) on the executor: windows of `m` micro-batches streamed through the
//! pipeline without a flush between them, weights updated once per window, every micro-batch's forward and
//! backward on a stage reading the same weight version, at most two versions per stage.
//!
//! Version `k` is the weights after `k` updates; window `w` (optimizer step `w`) reads version `max(w − d, 0)`
//! with the schedule's delay `d` ([`baton_schedules::two_bw_delay`]: 1 for pipelines, 0 with one stage), and its
//! gradient makes `W_{w+1} = W_w − AdamW(∇f_w(W_{w−d}))`. The updater thread takes each window's gradients from
//! every stage as soon as the stage's last backward of the window is done, sums the tied copies, takes the global
//! norm, clips, steps AdamW on its copy of the newest weights and sends the new version to the stages that will
//! read it, while they run the next window. The numbers depend only on the windows, never on how many are
//! streamed at once: a stream of `K` windows equals `K` streams of one (which flush after every window).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_kernels::cpu::AdamW;
use baton_schedules::{two_bw_delay, two_bw_stream, ScheduleKind};

use super::{host, Pipeline, StepReport, TensorMap};
use crate::backend::Backend;
use crate::data::Batch;
use crate::error::{EngineError, Result};
use crate::executor::{run_step, ExecConfig, Stage, StageValues, StageVersions, WindowGrads};
use crate::model::MicroBatch;
use crate::pipeline::NonFinitePolicy;

/// Most windows one stream runs (each window's micro-batches are uploaded before the stream starts).
pub const WINDOWS_MAX: usize = 64;

/// Checkpoint name prefix of the older weight version.
pub(super) const PREV_PREFIX: &str = "2bw.prev.";

/// What the updater decided for one window.
struct WindowUpdate {
    grad_norm: f32,
    lr: f32,
    skipped: bool,
}

/// Where each parameter of a stage sits and how it counts: `(chunk, layer, param, unit, counted in the norm,
/// weight decay)`.
type ParamPlan = Vec<(usize, usize, usize, usize, bool, bool)>;

impl<B: Backend> Pipeline<B> {
    /// PipeDream-2BW: trains one window (optimizer step) per batch of `batches`, streamed without a flush between
    /// them; returns one report per window. Needs a 2BW schedule and one replica. A failure leaves the pipeline as
    /// before the call.
    pub fn train_windows(&mut self, batches: &[Batch]) -> Result<Vec<StepReport>> {
        if let Some(why) = &self.lost {
            return Err(EngineError::Lost(why.clone()));
        }
        if self.schedule.kind != ScheduleKind::TwoBw {
            return Err(EngineError::config(
                "schedule",
                self.schedule.kind,
                "streamed windows need the 2bw schedule",
            ));
        }
        if self.replicas.len() != 1 {
            return Err(EngineError::config(
                "data_parallel",
                self.replicas.len(),
                "PipeDream-2BW runs one replica here (its weight versions are per stage)",
            ));
        }
        if batches.is_empty() || batches.len() > WINDOWS_MAX {
            return Err(EngineError::config(
                "windows",
                batches.len(),
                format!("a 2BW stream runs 1..={WINDOWS_MAX} windows"),
            ));
        }
        let started = Instant::now();
        let p = self.num_stages();
        let m = self.schedule.microbatches;
        let k = batches.len();
        let delay = u64::from(two_bw_delay(p as u32, m)?);
        let stream = Arc::new(two_bw_stream(p as u32, m, k as u32)?);
        // Every window's micro-batches, per stage, in stream order.
        let mut mbs: Vec<Vec<MicroBatch<B>>> = (0..p).map(|_| Vec::with_capacity(k * m as usize)).collect();
        let mut tokens = Vec::with_capacity(k);
        for batch in batches {
            tokens.push(batch.batch * batch.seq);
            for (s, list) in self.micro_batches(batch)?.swap_remove(0).into_iter().enumerate() {
                mbs[s].extend(list);
            }
        }
        let k0 = self.step;
        let fail = self
            .fail
            .take()
            .filter(|(r, f)| *r == 0 && f.step.is_none_or(|s| s > k0 && s <= k0 + k as u64));
        let exec = ExecConfig {
            recompute: self.options.recompute,
            recv_timeout: Duration::from_millis(self.options.recv_timeout_ms),
            fail: fail.map(|(_, f)| f),
        };
        // The updater's copies: the newest weights and the moments (moved out of the stages for the stream), and
        // what to restore if the stream fails.
        let rep = &mut self.replicas[0];
        let backends = Arc::clone(&rep.backends);
        let mut newest: Vec<StageValues<B>> = Vec::with_capacity(p);
        let mut moments: Vec<(StageValues<B>, StageValues<B>)> = Vec::with_capacity(p);
        let mut plans: Vec<ParamPlan> = Vec::with_capacity(p);
        for (stage, be) in rep.stages.iter_mut().zip(backends.iter()) {
            newest.push(values_of(stage, be, |p| &p.value)?);
            let mut plan = Vec::new();
            let (mut sm, mut sv) = (Vec::new(), Vec::new());
            for (c, part) in stage.parts.iter_mut().enumerate() {
                let (mut lm, mut lv) = (Vec::new(), Vec::new());
                for (l, layer) in part.layers.iter_mut().enumerate() {
                    let (mut pm, mut pv) = (Vec::new(), Vec::new());
                    for (pi, prm) in layer.params_mut().iter_mut().enumerate() {
                        plan.push((
                            c,
                            l,
                            pi,
                            part.units.start + l,
                            !self.primaries.contains_key(&prm.name),
                            prm.decay,
                        ));
                        pm.push(std::mem::replace(&mut prm.m, be.zeros_state(0)?));
                        pv.push(std::mem::replace(&mut prm.v, be.zeros_state(0)?));
                    }
                    lm.push(pm);
                    lv.push(pv);
                }
                sm.push(lm);
                sv.push(lv);
            }
            moments.push((sm, sv));
            plans.push(plan);
        }
        let backup_moments: Vec<(StageValues<B>, StageValues<B>)> = moments
            .iter()
            .zip(backends.iter())
            .map(|((m, v), be)| Ok((dup(m, be)?, dup(v, be)?)))
            .collect::<Result<_>>()?;
        let start_values: Vec<StageValues<B>> = newest
            .iter()
            .zip(backends.iter())
            .map(|(v, be)| dup(v, be))
            .collect::<Result<_>>()?;
        let prev_at_start = self.two_bw_prev.take();
        // Channels: new versions to each stage, window gradients to the updater.
        let (gtx, grx) = crossbeam_channel::unbounded::<WindowGrads<B>>();
        let mut vtx = Vec::with_capacity(p);
        let mut versions = Vec::with_capacity(p);
        for s in 0..p {
            let (tx, rx) = crossbeam_channel::unbounded();
            vtx.push(tx);
            let spare = match &prev_at_start {
                Some(prev) if k0 > 0 => Some((k0 - 1, dup(&prev[s], &backends[s])?)),
                _ => None,
            };
            versions.push(StageVersions {
                window: m,
                delay,
                first_window: k0,
                installed: k0,
                spare,
                rx,
                tx: gtx.clone(),
            });
        }
        drop(gtx);
        let stages: Vec<Stage<B>> = std::mem::take(&mut self.replicas[0].stages);
        let abort = AtomicBool::new(false);
        let timeout = Duration::from_millis(self.options.recv_timeout_ms) * 4;
        let this = &*self;
        let (run, updated) = std::thread::scope(|scope| {
            let updater = scope.spawn(|| {
                let out = this.update_windows(
                    &grx,
                    &vtx,
                    &backends,
                    &plans,
                    &mut newest,
                    &mut moments,
                    k0,
                    k,
                    delay,
                    &abort,
                    timeout,
                );
                if out.is_err() {
                    abort.store(true, Ordering::SeqCst);
                }
                drop(vtx);
                out.map(|(updates, prev)| (updates, prev, newest, moments))
            });
            let transport = Arc::clone(&this.replicas[0].transport);
            let run = run_step(
                stages,
                Arc::clone(&backends),
                Arc::clone(&stream),
                transport.as_ref(),
                mbs,
                &exec,
                None,
                Some(versions),
            );
            if run.result.is_err() {
                abort.store(true, Ordering::SeqCst);
            }
            let updated = updater.join().unwrap_or_else(|_| {
                Err(EngineError::Invariant {
                    stage: 0,
                    what: "the 2BW updater panicked".into(),
                })
            });
            (run, updated)
        });
        let complete = run.stages.iter().all(Option::is_some);
        self.replicas[0].stages = run.stages.into_iter().flatten().collect();
        let failure = match (&run.result, &updated) {
            (Err(e), _) => Some(e.to_string()),
            (_, Err(e)) => Some(e.to_string()),
            _ => None,
        };
        if failure.is_some() {
            if !complete {
                let why = failure.unwrap_or_default();
                self.lost = Some(why.clone());
                return Err(run.result.err().unwrap_or(EngineError::Lost(why)));
            }
            // Back to the state before the stream.
            self.install(start_values, backup_moments)?;
            self.two_bw_prev = prev_at_start;
            return Err(match (run.result, updated) {
                (Err(e), _) => e,
                (_, Err(e)) => e,
                _ => EngineError::Invariant {
                    stage: 0,
                    what: "a failure without an error".into(),
                },
            });
        }
        let (outcomes, (updates, prev, newest, moments)) = match (run.result, updated) {
            (Ok(o), Ok(u)) => (o, u),
            _ => unreachable!("failures returned above"),
        };
        self.install(newest, moments)?;
        self.two_bw_prev = Some(prev);
        let taken = updates.iter().filter(|u| !u.skipped).count() as u64;
        self.step += taken;
        if updates.iter().any(|u| !u.skipped) {
            self.consecutive_skips = 0;
        }
        // One report per window; the stream's timing is shared evenly, its spans go with the last window.
        let elapsed = started.elapsed().as_secs_f64();
        let pipeline_s = outcomes
            .iter()
            .flat_map(|o| o.spans.last())
            .map(|s| s.end_s)
            .fold(0.0, f64::max);
        let busy: Vec<f64> = outcomes
            .iter()
            .map(|o| o.spans.iter().map(|s| s.end_s - s.start_s).sum())
            .collect();
        let idle: Vec<f64> = busy.iter().map(|b| (pipeline_s - b).max(0.0)).collect();
        let bubble = if pipeline_s > 0.0 {
            idle.iter().sum::<f64>() / (p as f64 * pipeline_s)
        } else {
            0.0
        };
        let mut losses = vec![0.0f64; k];
        for o in &outcomes {
            for &(mb, l) in &o.losses {
                losses[(mb / m) as usize] += l;
            }
        }
        let share = 1.0 / k as f64;
        let mut step = k0;
        let mut reports = Vec::with_capacity(k);
        let mut outcomes = Some(outcomes);
        for (j, u) in updates.into_iter().enumerate() {
            if !u.skipped {
                step += 1;
            }
            let last = j + 1 == k;
            let o = if last {
                outcomes.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            reports.push(StepReport {
                step,
                loss: (losses[j] / tokens[j] as f64) as f32,
                lr: u.lr,
                grad_norm: u.grad_norm,
                tokens: tokens[j],
                elapsed_s: elapsed * share,
                pipeline_s: pipeline_s * share,
                busy_s: busy.iter().map(|b| b * share).collect(),
                idle_s: idle.iter().map(|b| b * share).collect(),
                bubble,
                host_per_action_s: o
                    .iter()
                    .map(|o| o.spans.iter().map(|s| s.host_s).sum::<f64>() / o.spans.len().max(1) as f64)
                    .collect(),
                peak_stashed: o.iter().map(|o| o.peak_stashed).collect(),
                peak_stash_bytes: o.iter().map(|o| o.peak_stash_bytes).collect(),
                copies: o.iter().flat_map(|o| o.copies.iter().copied()).collect(),
                weight_versions: o.iter().map(|o| o.versions.clone()).collect(),
                spans: o.into_iter().map(|o| o.spans).collect(),
                replica_busy_s: vec![busy.iter().map(|b| b * share).collect()],
                replica_pipeline_s: vec![pipeline_s * share],
                comm_s: vec![0.0; p],
                exposed_comm_s: vec![0.0; p],
                reduced_bytes: 0,
                compress: Vec::new(),
                outer_step: false,
                comm: Vec::new(),
                skipped: u.skipped,
                nonfinite_stage: None,
            });
        }
        Ok(reports)
    }

    /// Puts weights and moments (`[stage]`, each `[chunk][layer][param]`) into replica 0's stages, with zero
    /// gradients.
    fn install(&mut self, values: Vec<StageValues<B>>, moments: Vec<(StageValues<B>, StageValues<B>)>) -> Result<()> {
        let rep = &mut self.replicas[0];
        let backends = Arc::clone(&rep.backends);
        for (((stage, be), values), (m, v)) in rep.stages.iter_mut().zip(backends.iter()).zip(values).zip(moments) {
            for (((part, vals), ms), vs) in stage.parts.iter_mut().zip(values).zip(m).zip(v) {
                for (((layer, vals), ms), vs) in part.layers.iter_mut().zip(vals).zip(ms).zip(vs) {
                    for (((prm, val), mm), vv) in layer.params_mut().iter_mut().zip(vals).zip(ms).zip(vs) {
                        prm.value = val;
                        prm.m = mm;
                        prm.v = vv;
                        be.fill_zero(&mut prm.grad)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The updater: for each window in order, every stage's gradients, the tied sums, the global norm, clipping and
    /// AdamW on `newest`; each new version goes to the stages that will read it in this stream. Returns each
    /// window's update and the version before the last one (the older copy the next stream starts with).
    #[allow(clippy::too_many_arguments)]
    fn update_windows(
        &self,
        grx: &crossbeam_channel::Receiver<WindowGrads<B>>,
        vtx: &[crossbeam_channel::Sender<(u64, StageValues<B>)>],
        backends: &[B],
        plans: &[ParamPlan],
        newest: &mut [StageValues<B>],
        moments: &mut [(StageValues<B>, StageValues<B>)],
        k0: u64,
        k: usize,
        delay: u64,
        abort: &AtomicBool,
        timeout: Duration,
    ) -> Result<(Vec<WindowUpdate>, Vec<StageValues<B>>)> {
        let p = plans.len();
        let o = &self.options.optimizer;
        let mut arrived: BTreeMap<usize, Vec<Option<StageValues<B>>>> = BTreeMap::new();
        let mut updates = Vec::with_capacity(k);
        let mut prev = Vec::new();
        let mut step = k0;
        let mut skips = self.consecutive_skips;
        for j in 0..k {
            let mut waited = Instant::now();
            while arrived.get(&j).is_none_or(|v| v.iter().any(Option::is_none)) {
                match grx.recv_timeout(Duration::from_millis(5)) {
                    Ok((s, w, g)) => {
                        let slot = arrived.entry(w).or_insert_with(|| (0..p).map(|_| None).collect());
                        if s >= p || slot[s].replace(g).is_some() {
                            return Err(updater_err(s, format!("stage {s} sent window {w}'s gradients twice")));
                        }
                        waited = Instant::now();
                    }
                    Err(_) if abort.load(Ordering::SeqCst) => return Err(EngineError::Aborted { stage: 0 }),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) if waited.elapsed() <= timeout => {}
                    Err(_) => {
                        let missing = arrived
                            .get(&j)
                            .map_or(0, |v| v.iter().position(Option::is_none).unwrap_or(0));
                        return Err(updater_err(
                            missing,
                            format!("window {j}'s gradients did not arrive from stage {missing}"),
                        ));
                    }
                }
            }
            let mut grads: Vec<StageValues<B>> = arrived.remove(&j).unwrap_or_default().into_iter().flatten().collect();
            // Tied copies: the sum into every copy, in the group's order.
            for tied in &self.replicas[0].tied {
                let mut views: Vec<(usize, &mut B::Buf)> = Vec::with_capacity(tied.at.len());
                for (s, stage) in grads.iter_mut().enumerate() {
                    for (c, part) in stage.iter_mut().enumerate() {
                        for (l, layer) in part.iter_mut().enumerate() {
                            for (pi, g) in layer.iter_mut().enumerate() {
                                if let Some(at) = tied.at.iter().position(|&a| a == (s, c, l, pi)) {
                                    views.push((at, g));
                                }
                            }
                        }
                    }
                }
                tied.group.all_reduce(&mut views)?;
            }
            // The global norm, in (unit, parameter) order like the flushing step's.
            let mut squares: Vec<((usize, usize), f64)> = Vec::new();
            for (s, plan) in plans.iter().enumerate() {
                let counted: Vec<&(usize, usize, usize, usize, bool, bool)> = plan.iter().filter(|x| x.4).collect();
                let bufs: Vec<&B::Buf> = counted.iter().map(|&&(c, l, pi, ..)| &grads[s][c][l][pi]).collect();
                let sums = backends[s].sum_squares_many(&bufs)?;
                squares.extend(
                    counted
                        .iter()
                        .zip(sums)
                        .map(|(&&(_, _, pi, unit, ..), sq)| ((unit, pi), sq)),
                );
            }
            squares.sort_by_key(|&(key, _)| key);
            let norm = squares.iter().map(|&(_, s)| s).sum::<f64>().sqrt() as f32;
            let lr = o.lr_at(step);
            prev = newest
                .iter()
                .zip(backends)
                .map(|(v, be)| dup(v, be))
                .collect::<Result<Vec<_>>>()?;
            let skipped = !norm.is_finite();
            if skipped {
                skips += 1;
                if self.options.nonfinite == NonFinitePolicy::Abort || skips >= self.options.max_consecutive_skips {
                    return Err(EngineError::NonFinite {
                        what: "gradient norm",
                        step: step + 1,
                        stage: None,
                        action: format!("window {j} of a 2BW stream"),
                        policy: if self.options.nonfinite == NonFinitePolicy::Abort {
                            "aborting (policy: abort)".into()
                        } else {
                            format!("{skips} consecutive skipped steps reach the limit")
                        },
                    });
                }
            } else {
                skips = 0;
                let clip = o.grad_clip;
                let scale = (clip > 0.0 && norm > clip).then(|| (f64::from(clip) / (f64::from(norm) + 1e-6)) as f32);
                let step_no =
                    u32::try_from(step + 1).map_err(|_| EngineError::config("steps", step + 1, "too many steps"))?;
                for (s, plan) in plans.iter().enumerate() {
                    let be = &backends[s];
                    let (ms, vs) = &mut moments[s];
                    for &(c, l, pi, _, _, decay) in plan {
                        let cfg = AdamW {
                            lr,
                            beta1: o.beta1,
                            beta2: o.beta2,
                            eps: o.eps,
                            weight_decay: if decay { o.weight_decay } else { 0.0 },
                        };
                        be.optimizer_step(
                            &cfg,
                            &mut newest[s][c][l][pi],
                            &mut grads[s][c][l][pi],
                            &mut ms[c][l][pi],
                            &mut vs[c][l][pi],
                            step_no,
                            scale,
                        )?;
                    }
                }
                step += 1;
            }
            updates.push(WindowUpdate {
                grad_norm: norm,
                lr,
                skipped,
            });
            // Version k0 + j + 1 is read by window j + 1 + delay.
            if (j as u64 + 1 + delay) < k as u64 {
                for (s, tx) in vtx.iter().enumerate() {
                    let copy = dup(&newest[s], &backends[s])?;
                    if tx.send((k0 + j as u64 + 1, copy)).is_err() && !abort.load(Ordering::SeqCst) {
                        return Err(updater_err(
                            s,
                            "the stage stopped before its next weight version".into(),
                        ));
                    }
                }
            }
        }
        Ok((updates, prev))
    }

    /// The older 2BW weight version, for checkpoints (`2bw.prev.{name}`).
    pub(super) fn two_bw_state(&self, out: &mut TensorMap) -> Result<()> {
        let Some(prev) = &self.two_bw_prev else {
            return Ok(());
        };
        let rep = &self.replicas[0];
        for ((stage, be), values) in rep.stages.iter().zip(rep.backends.iter()).zip(prev) {
            for (part, vals) in stage.parts.iter().zip(values) {
                for (layer, vals) in part.layers.iter().zip(vals) {
                    for (prm, val) in layer.params().iter().zip(vals) {
                        out.insert(format!("{PREV_PREFIX}{}", prm.name), host(prm, be, val)?);
                    }
                }
            }
        }
        Ok(())
    }

    /// Restores the older 2BW weight version from a checkpoint's state, when it holds one for every parameter.
    pub(super) fn load_two_bw_state(&mut self, state: &TensorMap) -> Result<()> {
        if self.schedule.kind != ScheduleKind::TwoBw || !state.keys().any(|k| k.starts_with(PREV_PREFIX)) {
            return Ok(());
        }
        let rep = &self.replicas[0];
        let mut prev = Vec::with_capacity(rep.stages.len());
        for (stage, be) in rep.stages.iter().zip(rep.backends.iter()) {
            // Shaped like the stage's parameters, then overwritten from the state.
            prev.push(values_of(stage, be, |p| &p.value)?);
            let slot = prev.last_mut().ok_or_else(|| updater_err(0, "no stage".into()))?;
            for (part, vals) in stage.parts.iter().zip(slot.iter_mut()) {
                for (layer, vals) in part.layers.iter().zip(vals.iter_mut()) {
                    for (prm, val) in layer.params().iter().zip(vals.iter_mut()) {
                        let name = format!("{PREV_PREFIX}{}", prm.name);
                        let t = state.get(&name).ok_or_else(|| {
                            EngineError::Model(format!("checkpoint state has 2BW's older weights but no `{name}`"))
                        })?;
                        if t.data.len() != prm.len() {
                            return Err(EngineError::Model(format!(
                                "checkpoint state `{name}` holds {} values, the parameter {}",
                                t.data.len(),
                                prm.len()
                            )));
                        }
                        *val = be.upload(&t.data)?;
                    }
                }
            }
        }
        self.two_bw_prev = Some(prev);
        Ok(())
    }
}

fn updater_err(stage: usize, reason: String) -> EngineError {
    EngineError::Comm {
        seam: "2bw",
        stage: stage as u32,
        reason,
    }
}

/// Copies of every parameter's `pick(param)` of a stage, `[chunk][layer][param]`.
fn values_of<B: Backend>(
    stage: &Stage<B>,
    be: &B,
    pick: impl Fn(&crate::model::Param<B>) -> &B::Buf,
) -> Result<StageValues<B>> {
    stage
        .parts
        .iter()
        .map(|part| {
            part.layers
                .iter()
                .map(|layer| layer.params().iter().map(|p| be.duplicate(pick(p))).collect())
                .collect()
        })
        .collect()
}

fn dup<B: Backend>(v: &StageValues<B>, be: &B) -> Result<StageValues<B>> {
    v.iter()
        .map(|part| {
            part.iter()
                .map(|layer| layer.iter().map(|b| be.duplicate(b)).collect())
                .collect()
        })
        .collect()
}
