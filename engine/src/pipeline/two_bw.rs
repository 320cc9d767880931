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

use super::{drive_replicas, host, prefer, Pipeline, StepReport, TensorMap, Timing};
use crate::backend::Backend;
use crate::data::Batch;
use crate::error::{EngineError, Result};
use crate::executor::{run_step, Stage, StageValues, StageVersions, WindowGrads};
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
    /// Per stage: seconds summing the window's gradients over the replicas.
    comm_s: Vec<f64>,
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
        if self.sharded() || self.dp.sync.is_local() || self.dp.compress != crate::compress::Compression::None {
            return Err(EngineError::config(
                "data_parallel",
                self.replicas.len(),
                "PipeDream-2BW sums the replicas' window gradients in fp32 every window: no ZeRO-1, compression or \
                 local SGD with it",
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
        let d = self.replicas.len();
        let m = self.schedule.microbatches;
        let k = batches.len();
        let delay = u64::from(two_bw_delay(p as u32, m)?);
        let stream = Arc::new(two_bw_stream(p as u32, m, k as u32)?);
        // Every window's micro-batches, per replica and stage, in stream order.
        let mut mbs: Vec<Vec<Vec<MicroBatch<B>>>> = (0..d)
            .map(|_| (0..p).map(|_| Vec::with_capacity(k * m as usize)).collect())
            .collect();
        let mut tokens = Vec::with_capacity(k);
        for batch in batches {
            tokens.push(batch.batch * batch.seq);
            for (r, stages) in self.micro_batches(batch)?.into_iter().enumerate() {
                for (s, list) in stages.into_iter().enumerate() {
                    mbs[r][s].extend(list);
                }
            }
        }
        let k0 = self.step;
        let fail = self
            .fail
            .take()
            .filter(|(_, f)| f.step.is_none_or(|s| s > k0 && s <= k0 + k as u64));
        let exec = self.exec_configs(fail.as_ref());
        // The updater's copies (every replica holds the same weights and moments): the newest weights and the
        // moments, moved out of the stages for the stream, and what to restore if the stream fails.
        let mut newest: Vec<StageValues<B>> = Vec::with_capacity(p);
        let mut moments: Vec<(StageValues<B>, StageValues<B>)> = Vec::with_capacity(p);
        let mut plans: Vec<ParamPlan> = Vec::with_capacity(p);
        for (r, rep) in self.replicas.iter_mut().enumerate() {
            let backends = Arc::clone(&rep.backends);
            for (stage, be) in rep.stages.iter_mut().zip(backends.iter()) {
                if r == 0 {
                    newest.push(values_of(stage, be, |p| &p.value)?);
                }
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
                if r == 0 {
                    moments.push((sm, sv));
                    plans.push(plan);
                }
            }
        }
        let backends: Vec<Arc<Vec<B>>> = self.replicas.iter().map(|r| Arc::clone(&r.backends)).collect();
        let backup_moments: Vec<(StageValues<B>, StageValues<B>)> = moments
            .iter()
            .zip(backends[0].iter())
            .map(|((m, v), be)| Ok((dup(m, be)?, dup(v, be)?)))
            .collect::<Result<_>>()?;
        let start_values: Vec<StageValues<B>> = newest
            .iter()
            .zip(backends[0].iter())
            .map(|(v, be)| dup(v, be))
            .collect::<Result<_>>()?;
        let prev_at_start = self.two_bw_prev.take();
        // Channels: new versions to each worker, window gradients to the updater.
        let (gtx, grx) = crossbeam_channel::unbounded::<WindowGrads<B>>();
        let mut vtx = Vec::with_capacity(d * p);
        let mut versions: Vec<Vec<StageVersions<B>>> = Vec::with_capacity(d);
        for (r, bes) in backends.iter().enumerate() {
            let mut per = Vec::with_capacity(p);
            for (s, be) in bes.iter().enumerate() {
                let (tx, rx) = crossbeam_channel::unbounded();
                vtx.push(tx);
                let spare = match &prev_at_start {
                    Some(prev) if k0 > 0 => Some((k0 - 1, dup(&prev[s], be)?)),
                    _ => None,
                };
                per.push(StageVersions {
                    worker: r * p + s,
                    window: m,
                    delay,
                    first_window: k0,
                    installed: k0,
                    spare,
                    rx,
                    tx: gtx.clone(),
                });
            }
            versions.push(per);
        }
        drop(gtx);
        let stage_sets: Vec<Vec<Stage<B>>> = self
            .replicas
            .iter_mut()
            .map(|r| std::mem::take(&mut r.stages))
            .collect();
        let abort = AtomicBool::new(false);
        let timeout = Duration::from_millis(self.options.recv_timeout_ms) * 4;
        let this = &*self;
        let (runs, updated) = std::thread::scope(|scope| {
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
                    started,
                );
                if out.is_err() {
                    abort.store(true, Ordering::SeqCst);
                }
                drop(vtx);
                out.map(|(updates, prev)| (updates, prev, newest, moments))
            });
            let mut jobs = Vec::with_capacity(d);
            for (r, ((stages, mbs), versions)) in stage_sets.into_iter().zip(mbs).zip(versions).enumerate() {
                let transport = Arc::clone(&this.replicas[r].transport);
                let bes = Arc::clone(&backends[r]);
                let stream = Arc::clone(&stream);
                let exec = &exec[r];
                let abort = &abort;
                jobs.push(move || {
                    let run = run_step(stages, bes, stream, transport.as_ref(), mbs, exec, None, Some(versions));
                    if run.result.is_err() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    run
                });
            }
            let runs = drive_replicas(scope, jobs, p);
            let updated = updater.join().unwrap_or_else(|_| {
                Err(EngineError::Invariant {
                    stage: 0,
                    what: "the 2BW updater panicked".into(),
                })
            });
            (runs, updated)
        });
        let (complete, outcomes, mut failure) = self.take_back(runs);
        let (updates, prev, newest, moments) = match updated {
            Ok(u) if failure.is_none() => u,
            Ok(_) => (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            Err(e) => {
                prefer(&mut failure, e);
                (Vec::new(), Vec::new(), Vec::new(), Vec::new())
            }
        };
        if let Some(e) = failure {
            if !complete {
                self.lost = Some(e.to_string());
                return Err(e);
            }
            // Back to the state before the stream.
            self.install(start_values, backup_moments)?;
            self.two_bw_prev = prev_at_start;
            return Err(e);
        }
        self.install(newest, moments)?;
        self.two_bw_prev = Some(prev);
        let taken = updates.iter().filter(|u| !u.skipped).count() as u64;
        self.step += taken;
        if taken > 0 {
            self.consecutive_skips = 0;
        }
        // One report per window; the stream's timing is shared evenly, its spans go with the last window.
        let elapsed = started.elapsed().as_secs_f64();
        let Timing {
            replica_pipeline_s,
            pipeline_s,
            replica_busy_s: replica_busy,
            busy_s: busy,
            idle_s: idle,
            bubble,
        } = Timing::of(&outcomes);
        let mut losses = vec![0.0f64; k];
        // Per window: (replica, micro-batch) order, the global micro-batch order.
        let mut per_window: Vec<Vec<(usize, u32, f64)>> = vec![Vec::new(); k];
        for (r, o) in outcomes.iter().enumerate() {
            for stage in o {
                for &(mb, l) in &stage.losses {
                    per_window[(mb / m) as usize].push((r, mb, l));
                }
            }
        }
        for (j, mut list) in per_window.into_iter().enumerate() {
            list.sort_by_key(|&(r, mb, _)| (r, mb));
            losses[j] = list.iter().map(|&(_, _, l)| l).sum();
        }
        let share = 1.0 / k as f64;
        let dense = self.dense_reduce_bytes();
        let mut step = k0;
        let mut reports = Vec::with_capacity(k);
        let mut outcomes = outcomes.into_iter();
        let mut last_outcome = outcomes.next();
        for (j, u) in updates.into_iter().enumerate() {
            if !u.skipped {
                step += 1;
            }
            let o = if j + 1 == k {
                last_outcome.take().unwrap_or_default()
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
                replica_busy_s: replica_busy
                    .iter()
                    .map(|b| b.iter().map(|x| x * share).collect())
                    .collect(),
                replica_pipeline_s: replica_pipeline_s.iter().map(|x| x * share).collect(),
                comm_s: u.comm_s.clone(),
                exposed_comm_s: vec![0.0; p],
                reduced_bytes: dense,
                compress: if d > 1 {
                    self.buckets
                        .iter()
                        .map(|b| vec![crate::compress::Compression::None; b.len()])
                        .collect()
                } else {
                    Vec::new()
                },
                outer_step: false,
                comm: Vec::new(),
                skipped: u.skipped,
                nonfinite_stage: None,
            });
        }
        Ok(reports)
    }

    /// Puts weights and moments (`[stage]`, each `[chunk][layer][param]`) into every replica's stages (copies for
    /// all but the last), with zero gradients.
    fn install(&mut self, values: Vec<StageValues<B>>, moments: Vec<(StageValues<B>, StageValues<B>)>) -> Result<()> {
        let d = self.replicas.len();
        let mut values = Some(values);
        let mut moments = Some(moments);
        for (r, rep) in self.replicas.iter_mut().enumerate() {
            let backends = Arc::clone(&rep.backends);
            let (vals, moms) = if r + 1 == d {
                (values.take().unwrap_or_default(), moments.take().unwrap_or_default())
            } else {
                let v = values.as_ref().map_or(Ok(Vec::new()), |v| {
                    v.iter()
                        .zip(backends.iter())
                        .map(|(x, be)| dup(x, be))
                        .collect::<Result<Vec<_>>>()
                })?;
                let m = moments.as_ref().map_or(Ok(Vec::new()), |m| {
                    m.iter()
                        .zip(backends.iter())
                        .map(|((a, b), be)| Ok((dup(a, be)?, dup(b, be)?)))
                        .collect::<Result<Vec<_>>>()
                })?;
                (v, m)
            };
            if vals.len() != rep.stages.len() || moms.len() != rep.stages.len() {
                return Err(EngineError::Invariant {
                    stage: 0,
                    what: format!("2BW installs {} stages' weights into {}", vals.len(), rep.stages.len()),
                });
            }
            for (((stage, be), values), (m, v)) in rep.stages.iter_mut().zip(backends.iter()).zip(vals).zip(moms) {
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
        backends: &[Arc<Vec<B>>],
        plans: &[ParamPlan],
        newest: &mut [StageValues<B>],
        moments: &mut [(StageValues<B>, StageValues<B>)],
        k0: u64,
        k: usize,
        delay: u64,
        abort: &AtomicBool,
        timeout: Duration,
        started: Instant,
    ) -> Result<(Vec<WindowUpdate>, Vec<StageValues<B>>)> {
        let p = plans.len();
        let workers = vtx.len();
        let d = workers / p.max(1);
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
                    Ok((w, win, g)) => {
                        let slot = arrived
                            .entry(win)
                            .or_insert_with(|| (0..workers).map(|_| None).collect());
                        if w >= workers || slot[w].replace(g).is_some() {
                            return Err(updater_err(
                                w % p.max(1),
                                format!("worker {w} sent window {win}'s gradients twice"),
                            ));
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
                            missing % p.max(1),
                            format!(
                                "window {j}'s gradients did not arrive from replica {}, stage {}",
                                missing / p.max(1),
                                missing % p.max(1)
                            ),
                        ));
                    }
                }
            }
            // `all[r·p + s]`: worker gradients; replica 0's stages carry the sums afterwards.
            let mut all: Vec<StageValues<B>> = arrived.remove(&j).unwrap_or_default().into_iter().flatten().collect();
            let mut comm_s = vec![0.0; p];
            if d > 1 {
                // Every tensor summed over the replicas in replica order, through the stage's group.
                let mut by_replica: Vec<Vec<StageValues<B>>> = Vec::with_capacity(d);
                let mut it = all.into_iter();
                for _ in 0..d {
                    by_replica.push(it.by_ref().take(p).collect());
                }
                for (s, c_s) in comm_s.iter_mut().enumerate() {
                    let t = started.elapsed().as_secs_f64();
                    for &(c, l, pi, ..) in &plans[s] {
                        let mut views: Vec<(usize, &mut B::Buf)> = by_replica
                            .iter_mut()
                            .enumerate()
                            .map(|(r, rep)| (r, &mut rep[s][c][l][pi]))
                            .collect();
                        self.dp_groups[s].all_reduce(&mut views)?;
                    }
                    *c_s = started.elapsed().as_secs_f64() - t;
                }
                all = by_replica.into_iter().next().unwrap_or_default();
            }
            let mut grads = all;
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
                let sums = backends[0][s].sum_squares_many(&bufs)?;
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
            if j + 1 == k {
                // The version before the stream's last update: what the next stream's first window reads.
                prev = newest
                    .iter()
                    .zip(backends[0].iter())
                    .map(|(v, be)| dup(v, be))
                    .collect::<Result<Vec<_>>>()?;
            }
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
                    let be = &backends[0][s];
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
                comm_s,
            });
            // Version k0 + j + 1 is read by window j + 1 + delay.
            if (j as u64 + 1 + delay) < k as u64 {
                for (w, tx) in vtx.iter().enumerate() {
                    let (r, s) = (w / p, w % p);
                    let copy = dup(&newest[s], &backends[r][s])?;
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
