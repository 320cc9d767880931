//! `baton train`'s view of the loop: the progress bar on a terminal (plain lines every N steps or ~10 s
//! otherwise) with the time left, `metrics.jsonl`, TensorBoard scalars, the trace of the first steps, and the
//! end-of-run summary.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::TrainConfig;
use crate::cli::tensorboard::EventWriter;
use crate::cli::CliError;
use crate::engine::backend::Backend;
use crate::engine::memory::{self, MemoryEstimate};
use crate::engine::trainer::{self, CheckpointEvent, EvalEvent, RestartEvent, StartEvent, StepEvent, Warning};
use crate::engine::Pipeline;
use crate::schedules::{to_svg_with, SimReport, Span, SvgOptions};

/// Without a terminal and without `--log-every`: seconds between two progress lines.
pub const PLAIN_LINE_EVERY_S: f64 = 10.0;

/// `baton train`'s view of the loop (see the module docs).
pub(super) struct CliObserver {
    bar: ProgressBar,
    pub(super) metrics: BufWriter<File>,
    pub(super) trace: Option<crate::cli::trace::Trace>,
    pub(super) tensorboard: Option<EventWriter>,
    /// The first failure to write the metrics (reported when the run ends).
    pub(super) error: Option<CliError>,
    total_steps: u64,
    log_every: u64,
    /// When this run's first step began, and at which step it started.
    started: Instant,
    first_step: u64,
    last_line: Instant,
    last_val: Option<f32>,
    warnings: Vec<String>,
    /// Steps the trace covers, and the last of them (set at the start).
    trace_steps: u64,
    trace_until: u64,
    /// The data-parallel encodings of the last step (a change is logged).
    last_compress: Vec<Vec<crate::engine::Compression>>,
}

/// `1:02:03` or `4:05`.
pub fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// `1.25M`, `830k`, `512`.
pub fn count(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.0}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

impl CliObserver {
    pub(super) fn new(
        c: &TrainConfig,
        _stages: usize,
        metrics: BufWriter<File>,
        tensorboard: Option<EventWriter>,
    ) -> Self {
        let bar = ProgressBar::new(c.steps);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} elapsed, {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        CliObserver {
            bar,
            metrics,
            trace: c.trace.then(crate::cli::trace::Trace::default),
            tensorboard,
            error: None,
            total_steps: c.steps,
            log_every: c.log_every,
            started: Instant::now(),
            first_step: 0,
            last_line: Instant::now(),
            last_val: None,
            warnings: Vec::new(),
            trace_steps: c.trace_steps,
            trace_until: 0,
            last_compress: Vec::new(),
        }
    }

    /// Ends the bar (leaving its last state on the terminal).
    pub(super) fn finish(&self) {
        self.bar.finish();
    }

    /// Prints a line above the progress bar, or to stderr when the bar is hidden (not a terminal).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn write_line(&mut self, line: &serde_json::Value) {
        // Each line reaches the file at once: a run killed later keeps every step it reported, which a resume
        // (that keeps the lines up to its checkpoint) relies on.
        if let Err(e) = writeln!(self.metrics, "{line}").and_then(|()| self.metrics.flush()) {
            self.error
                .get_or_insert(CliError::failure(format!("writing metrics.jsonl: {e}")));
        }
    }

    fn scalar(&mut self, step: u64, tag: &str, value: f64) {
        if let Some(tb) = self.tensorboard.as_mut() {
            if let Err(e) = tb.scalar(tag, step as i64, value as f32) {
                self.error
                    .get_or_insert(CliError::failure(format!("writing TensorBoard events: {e}")));
            }
        }
    }

    /// Seconds left at the mean step time of this run so far.
    fn eta_s(&self, step: u64) -> Option<f64> {
        let done = step.saturating_sub(self.first_step);
        (done > 0)
            .then(|| self.started.elapsed().as_secs_f64() / done as f64 * self.total_steps.saturating_sub(step) as f64)
    }
}

impl trainer::Observer for CliObserver {
    fn on_start(&mut self, e: &StartEvent) {
        self.first_step = e.first_step;
        self.trace_until = e.first_step + self.trace_steps;
        self.total_steps = e.stop_step;
        self.bar.set_length(e.stop_step);
        self.bar.set_position(e.first_step);
        self.bar.set_message("time left: measuring]");
        self.started = Instant::now();
        self.last_line = Instant::now();
        if e.peak_measured {
            self.say(format!(
                "MFU against the measured bf16 GEMM rate of stage 0's device: {:.0} TFLOP/s",
                e.peak_tflops
            ));
        }
    }

    fn on_step(&mut self, e: &StepEvent<'_>) {
        let r = e.report;
        let mut line = serde_json::json!({
            "step": r.step,
            "time": e.unix_time_s,
            "elapsed_s": e.started_s + r.elapsed_s,
            "tokens_seen": e.tokens_seen,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": e.tokens_per_s,
            "bubble": r.bubble,
            "step_s": r.elapsed_s,
            "optimizer_s": r.elapsed_s - r.pipeline_s,
            "busy": e.busy,
            "host_us_per_action": r.host_per_action_s.iter().map(|h| h * 1e6).collect::<Vec<_>>(),
            "peak_mem_bytes": r.peak_stash_bytes,
            "skipped": r.skipped,
            "skipped_total": e.skipped_total,
            "restarts": e.restarts,
            "flops_per_token": e.flops_per_token,
        });
        if let Some(mfu) = e.mfu {
            line["mfu"] = serde_json::json!(mfu);
        }
        // Bytes each replica put into the data-parallel reduction (0 with one replica).
        line["comm_bytes"] = serde_json::json!(r.reduced_bytes);
        if r.replica_busy_s.len() > 1 {
            line["data_parallel"] = serde_json::json!({
                "replicas": r.replica_busy_s.len(),
                "comm_s": r.comm_s,
                "exposed_comm_s": r.exposed_comm_s,
                "buckets": r.comm.len(),
                "replica_busy_s": r.replica_busy_s,
                "replica_pipeline_s": r.replica_pipeline_s,
            });
            if r.compress
                .iter()
                .flatten()
                .any(|m| *m != crate::engine::Compression::None)
            {
                line["data_parallel"]["compress"] = serde_json::json!(r.compress);
            }
            if !self.last_compress.is_empty() && !r.compress.is_empty() && r.compress != self.last_compress {
                let stages: Vec<String> = r
                    .compress
                    .iter()
                    .enumerate()
                    .map(|(s, modes)| {
                        let names: Vec<String> = modes.iter().map(ToString::to_string).collect();
                        format!("stage {s}: {}", names.join(", "))
                    })
                    .collect();
                self.say(format!(
                    "step {}: gradient buckets now encoded as {}",
                    r.step,
                    stages.join("; ")
                ));
            }
            if !r.compress.is_empty() {
                self.last_compress = r.compress.clone();
            }
            if r.outer_step {
                line["data_parallel"]["outer_step"] = serde_json::json!(true);
            }
        }
        if let Some(val) = e.val_loss {
            line["val_loss"] = serde_json::json!(val);
            self.last_val = Some(val);
        }
        if let Some(stall) = e.save_stall_s {
            line["save_stall_s"] = serde_json::json!(stall);
        }
        self.write_line(&line);
        for (tag, v) in [
            ("train/loss", f64::from(r.loss)),
            ("train/lr", f64::from(r.lr)),
            ("train/grad_norm", f64::from(r.grad_norm)),
            ("train/tokens_per_s", e.tokens_per_s),
            ("pipeline/bubble", r.bubble),
            ("train/step_s", r.elapsed_s),
        ] {
            self.scalar(r.step, tag, v);
        }
        if let Some(val) = e.val_loss {
            self.scalar(r.step, "val/loss", f64::from(val));
        }
        if e.traced {
            if let Some(trace) = self.trace.as_mut() {
                trace.add_step(r.step, e.started_s, e.optimizer_started_s, r);
            }
        }
        let eta = self.eta_s(r.step).map_or("measuring".into(), clock);
        let mfu_text = e.mfu.map_or(String::new(), |m| format!(" | MFU {:.1}%", m * 100.0));
        let text = format!(
            "loss {:.4}{} | {:.0} tok/s | {} tokens{mfu_text} | bubble {:.1}%",
            r.loss,
            self.last_val.map_or(String::new(), |v| format!(" (val {v:.4})")),
            e.tokens_per_s,
            count(e.tokens_seen as f64),
            r.bubble * 100.0
        );
        self.bar.set_message(format!("{eta} left] {text}"));
        self.bar.set_position(r.step);
        if self.bar.is_hidden() {
            let due = if self.log_every > 0 {
                r.step % self.log_every == 0
            } else {
                self.last_line.elapsed() >= Duration::from_secs_f64(PLAIN_LINE_EVERY_S)
            };
            if due || r.step == self.total_steps {
                self.last_line = Instant::now();
                let pct = r.step as f64 / self.total_steps.max(1) as f64 * 100.0;
                eprintln!(
                    "step {}/{} ({pct:.0}%) | {text} | elapsed {} | ETA {eta}",
                    r.step,
                    self.total_steps,
                    clock(self.started.elapsed().as_secs_f64())
                );
            }
        }
    }

    fn on_eval(&mut self, e: &EvalEvent) {
        self.say(format!(
            "step {:>5}: train loss {:.4}, val loss {:.4}",
            e.step, e.train_loss, e.val_loss
        ));
        if let Some(trace) = self.trace.as_mut().filter(|_| e.step <= self.trace_until) {
            trace.add_eval(e.step, e.started_s, e.elapsed_s);
        }
    }

    fn on_checkpoint(&mut self, _e: &CheckpointEvent) {}

    fn on_restart(&mut self, e: &RestartEvent) {
        self.say(format!(
            "restart {}/{}: step {} failed: {}; resuming from {}",
            e.restarts,
            e.max_restarts,
            e.failed_step,
            e.cause,
            e.from.as_ref().map_or("the start".into(), |d| format!(
                "{} (step {})",
                d.display(),
                e.resumed_step
            ))
        ));
        let event = serde_json::json!({
            "event": "restart",
            "time": trainer::unix_time_s(),
            "restarts": e.restarts,
            "failed_step": e.failed_step,
            "cause": e.cause,
            "resumed_step": e.resumed_step,
        });
        self.write_line(&event);
        self.bar.set_position(e.resumed_step);
    }

    fn on_warning(&mut self, w: &Warning) {
        let text = match w {
            Warning::Straggler {
                stage, busy, others, ..
            } => format!(
                "warning: stage {stage} busy {:.0}% vs {:.0}% on the others (recent steps): a neighbour is straggling",
                busy * 100.0,
                others * 100.0
            ),
            Warning::SlowReplica {
                replica,
                seconds,
                others,
                ..
            } => format!(
                "warning: replica {replica} takes {:.1} ms per schedule vs {:.1} ms on the others (recent steps): \
                 every replica waits for it at the gradient reduction",
                seconds * 1e3,
                others * 1e3
            ),
            Warning::Skipped { step, what, stage } => format!(
                "step {step}: non-finite {what} (first seen on stage {}); optimizer step skipped",
                stage.map_or("?".into(), |s| s.to_string())
            ),
            Warning::PeakUnavailable(why) => {
                format!("warning: measuring the bf16 GEMM rate failed ({why}); MFU not reported")
            }
            Warning::DropErrors(list) => format!("warning: errors while releasing resources: {}", list.join("; ")),
            Warning::CheckpointFailed { step, cause } => format!(
                "error: the checkpoint of step {step} failed to write: {cause} (the previous checkpoint is intact)"
            ),
        };
        self.warnings.push(text.clone());
        self.say(text);
    }
}

/// The last step's measured timeline as an SVG (the schedule's renderer, fed measured spans, in milliseconds).
pub(super) fn measured_timeline_svg<B: Backend>(pipeline: &Pipeline<B>, report: &crate::engine::StepReport) -> String {
    let schedule = pipeline.schedule();
    let spans: Vec<Vec<Span>> = report
        .spans
        .iter()
        .enumerate()
        .map(|(s, list)| {
            list.iter()
                .map(|a| Span {
                    action: a.action,
                    part: schedule.part_of(s as u32, &a.action).unwrap_or(0),
                    start: a.start_s,
                    end: a.end_s,
                })
                .collect()
        })
        .collect();
    let makespan = spans.iter().flatten().map(|s| s.end).fold(0.0f64, f64::max);
    let busy: Vec<f64> = spans.iter().map(|l| l.iter().map(|s| s.end - s.start).sum()).collect();
    let idle: Vec<f64> = busy.iter().map(|b| (makespan - b).max(0.0)).collect();
    let sim = SimReport {
        makespan,
        bubble: if makespan > 0.0 {
            idle.iter().sum::<f64>() / (busy.len() as f64 * makespan)
        } else {
            0.0
        },
        busy,
        idle,
        peak_inflight: report.peak_stashed.clone(),
        peak_weight_stash: vec![0; spans.len()],
        spans,
    };
    let title = format!(
        "measured step {} — {}, {} stages, {} micro-batches, {} chunk(s); {:.1} ms, bubble {:.1}%",
        report.step,
        schedule.kind,
        schedule.stages(),
        schedule.microbatches,
        schedule.chunks(),
        makespan * 1e3,
        sim.bubble * 100.0
    );
    to_svg_with(
        schedule,
        &sim,
        &SvgOptions {
            title: Some(title),
            time_unit: "ms".into(),
            time_scale: 1e3,
        },
    )
}

/// What the end-of-run summary reads.
pub(super) struct SummaryInputs<'a, B: Backend> {
    pub(super) c: &'a TrainConfig,
    pub(super) out: &'a Path,
    pub(super) model: &'a crate::engine::GptConfig,
    pub(super) pipeline: &'a Pipeline<B>,
    pub(super) run: &'a trainer::RunSummary,
    pub(super) report_html: Option<PathBuf>,
    pub(super) report_error: Option<String>,
    pub(super) estimate: Option<&'a MemoryEstimate>,
    pub(super) peak_rss: Option<u64>,
    pub(super) resume_command: &'a str,
    pub(super) continue_command: &'a str,
    pub(super) trace: Option<PathBuf>,
    pub(super) metrics: &'a Path,
}

/// The end-of-run summary: first what a PyTorch user looks for (time, step time, tokens/s, loss, val loss, the
/// checkpoint, how to resume, generate and export), then a labelled detail section.
pub(super) fn summary<B: Backend>(i: &SummaryInputs<'_, B>) {
    let run = i.run;
    let pipeline = i.pipeline;
    let step_ms = if run.steps_run > 0 {
        run.elapsed_s / run.steps_run as f64 * 1e3
    } else {
        0.0
    };
    let last_loss = run.last.as_ref().map_or("-".into(), |r| format!("{:.4}", r.loss));
    eprintln!();
    eprintln!(
        "{} {} steps (to step {} of {}) in {} ({:.1} s): {step_ms:.1} ms/step, {:.0} tokens/s",
        if run.interrupted {
            "interrupted after"
        } else {
            "trained"
        },
        run.steps_run,
        run.step,
        i.c.steps,
        clock(run.elapsed_s),
        run.elapsed_s,
        run.tokens as f64 / run.elapsed_s.max(1e-9)
    );
    eprintln!(
        "loss {last_loss}; validation loss {} -> {}",
        run.first_val.map_or("-".into(), |v| format!("{v:.4}")),
        run.last_val.map_or("-".into(), |v| format!("{v:.4}"))
    );
    let ckpt_root = i.out.join("checkpoints");
    match &run.checkpoint {
        Some(dir) => eprintln!("checkpoint: {}", dir.display()),
        None => eprintln!("checkpoint: none written"),
    }
    match (&i.report_html, &i.report_error) {
        (Some(html), _) => eprintln!(
            "report:     {} (loss curve: {})",
            html.display(),
            i.out.join(crate::cli::report::LOSS_SVG).display()
        ),
        (None, Some(e)) => eprintln!("report:     not written: {e}"),
        _ => {}
    }
    eprintln!("next:");
    if run.step < i.c.steps {
        eprintln!("  resume:   {}", i.resume_command);
    } else {
        eprintln!(
            "  continue: {}   (the learning-rate schedule then spans the new total)",
            i.continue_command
        );
    }
    eprintln!(
        "  generate: baton generate --checkpoint {} --prompt \"KING HENRY.\" --tokens 200",
        ckpt_root.display()
    );
    eprintln!(
        "  export:   baton export --checkpoint {} --format hf --out {}",
        ckpt_root.display(),
        i.out.join("hf").display()
    );
    eprintln!("details:");
    eprintln!("  metrics:  {} (one JSON line per step)", i.metrics.display());
    if let Some(trace) = &i.trace {
        eprintln!(
            "  trace:    {} (open in ui.perfetto.dev or chrome://tracing)",
            trace.display()
        );
    }
    if let Some(tb) = i.c.tensorboard.then(|| i.out.join("tensorboard")) {
        eprintln!(
            "  tensorboard: {} (tensorboard --logdir {})",
            tb.display(),
            i.out.display()
        );
    }
    if !run.save_stalls_s.is_empty() {
        let mean = run.save_stalls_s.iter().sum::<f64>() / run.save_stalls_s.len() as f64;
        eprintln!(
            "  checkpoints: {} saved during the run; training paused {:.2} ms each on average to copy the weights \
             (the write runs in the background)",
            run.save_stalls_s.len(),
            mean * 1e3
        );
    }
    if run.restarts > 0 || run.skipped > 0 {
        eprintln!(
            "  recovery: {} restart(s), {} skipped step(s)",
            run.restarts, run.skipped
        );
    }
    match (i.peak_rss, i.estimate) {
        (Some(rss), Some(est)) => eprintln!(
            "  memory:   peak resident {} (estimated before the run: {})",
            memory::human_bytes(rss),
            memory::human_bytes(est.total_bytes())
        ),
        (None, Some(est)) => eprintln!("  memory:   estimated {}", memory::human_bytes(est.total_bytes())),
        _ => {}
    }
    let Some(report) = &run.last else {
        return;
    };
    let predicted = trainer::predicted_bubble(pipeline, report);
    let schedule = pipeline.schedule();
    eprintln!(
        "  pipeline: {} stages, {}, {} micro-batches; last step {:.1} ms ({:.1} ms in the pipeline, {:.1} ms \
         optimizer step)",
        schedule.stages(),
        schedule.kind,
        schedule.microbatches,
        report.elapsed_s * 1e3,
        report.pipeline_s * 1e3,
        (report.elapsed_s - report.pipeline_s) * 1e3
    );
    let sim_step = trainer::measured_costs(pipeline, report)
        .and_then(|costs| crate::schedules::simulate(schedule, &costs).ok())
        .map(|r| r.makespan);
    eprintln!(
        "  bubble (share of stage time spent waiting): measured {:.1}%, simulated {} from the measured action \
         times (simulated pipeline time {}, measured {:.1} ms)",
        report.bubble * 100.0,
        predicted.map_or("-".into(), |b| format!("{:.1}%", b * 100.0)),
        sim_step.map_or("-".into(), |t| format!("{:.1} ms", t * 1e3)),
        report.pipeline_s * 1e3
    );
    if pipeline.num_replicas() > 1 {
        let dp = pipeline.data_parallel();
        let comm: f64 = report.comm_s.iter().sum();
        let exposed = report.exposed_comm_s.iter().cloned().fold(0.0, f64::max);
        let moments: Vec<String> = pipeline
            .optimizer_bytes()
            .iter()
            .flatten()
            .map(|&b| memory::human_bytes(b as u64))
            .collect();
        eprintln!(
            "  data parallel: {} replicas, {} reduced per replica per step in {} buckets, {:.1} ms of reduction \
             ({:.1} ms exposed after the schedule, {}); AdamW moments per worker{}: {}",
            pipeline.num_replicas(),
            memory::human_bytes(report.reduced_bytes as u64),
            report.comm.len(),
            comm * 1e3,
            exposed * 1e3,
            if dp.overlap { "overlapped" } else { "not overlapped" },
            if dp.zero { " (ZeRO-1)" } else { "" },
            moments.join(", ")
        );
        let dense = pipeline.dense_reduce_bytes() as f64;
        let per_step = run.comm_bytes as f64 / run.steps_run.max(1) as f64;
        eprintln!(
            "  communication: --compress {} --sync {}: {} per replica per step on average over the run ({} as fp32 \
             every step: {:.1}× less)",
            dp.compress,
            dp.sync,
            memory::human_bytes(per_step as u64),
            memory::human_bytes(dense as u64),
            dense / per_step.max(1.0)
        );
        if let Some(gbps) = dp.link_gbps {
            let bw = gbps * 1e9 / 8.0;
            let d = pipeline.num_replicas() as f64;
            let compute_ms = trainer::measured_costs(pipeline, report)
                .and_then(|costs| crate::schedules::simulate(pipeline.schedule(), &costs).ok())
                .map(|r| r.makespan * 1e3);
            if dp.sync.is_local() {
                // The outer step's reduction runs after the optimizer: fully exposed, once per H steps.
                let comm_ms = per_step * 2.0 * (d - 1.0) / d / bw * 1e3;
                if let Some(c) = compute_ms {
                    eprintln!(
                        "  on a {gbps} Gbit/s link between replicas (simulated): {:.1} ms/step ({c:.1} ms schedule + \
                         {comm_ms:.1} ms of outer-step reduction per step on average)",
                        c + comm_ms
                    );
                }
            } else if let Some(sim) = trainer::predicted_on_link(pipeline, report, bw) {
                eprintln!(
                    "  on a {gbps} Gbit/s link between replicas (simulated): {:.1} ms/step ({:.1} ms schedule + \
                     {:.1} ms exposed reduction)",
                    sim.step_time * 1e3,
                    sim.compute_makespan * 1e3,
                    sim.exposed_comm * 1e3
                );
            }
        }
        if let Some(sim) = trainer::predicted_data_parallel(pipeline, report) {
            eprintln!(
                "  data parallel, simulated from the measured costs and reduction rate: step {:.1} ms (schedule \
                 {:.1} ms + {:.1} ms exposed) vs measured {:.1} ms + {:.1} ms",
                sim.step_time * 1e3,
                sim.compute_makespan * 1e3,
                sim.exposed_comm * 1e3,
                report.pipeline_s * 1e3,
                exposed * 1e3
            );
        }
    }
    // What the same schedule would do with one stage per device (transfers as free as here).
    if let Some(costs) = trainer::measured_costs(pipeline, report) {
        let units = crate::engine::predict::unit_costs(i.model, i.c.seq, pipeline.ranges(), &costs);
        let elem = pipeline.backends().first().map_or(4, Backend::activation_elem_bytes);
        let per_mb = report.tokens / (schedule.microbatches as usize * pipeline.num_replicas());
        let act_bytes = (per_mb * i.model.d_model * elem) as f64;
        if let Ok(preds) = crate::engine::predict::predict(
            i.model,
            &units,
            schedule.kind,
            schedule.microbatches,
            schedule.chunks(),
            &[1, 2, 4, 8],
            act_bytes,
            if i.c.copy_gbps > 0.0 {
                i.c.copy_gbps * 1e9
            } else {
                f64::INFINITY
            },
        ) {
            let text: Vec<String> = preds
                .iter()
                .map(|p| {
                    format!(
                        "{} device(s) {:.1} ms/step, bubble {:.1}%",
                        p.stages,
                        p.step_s * 1e3,
                        p.bubble * 100.0
                    )
                })
                .collect();
            let link = if i.c.copy_gbps > 0.0 {
                format!("{} GB/s copies", i.c.copy_gbps)
            } else {
                "free transfers".into()
            };
            if !text.is_empty() {
                eprintln!("  predicted with one stage per device ({link}): {}", text.join("; "));
            }
        }
    }
    eprintln!("  per stage (last step):");
    let pools = pipeline.receive_pools();
    for (s, (busy, idle)) in report.busy_s.iter().zip(&report.idle_s).enumerate() {
        let total = busy + idle;
        let pool = pools.get(s).copied().unwrap_or_default();
        eprintln!(
            "    stage {s}: computing {:.1} ms ({:.0}% of the step), waiting {:.1} ms; {:.0} µs of host time per \
             action; at most {} micro-batches' activations kept ({:.1} MiB); {} receive buffers (reused {} times, ran dry {} times)",
            busy * 1e3,
            if total > 0.0 { busy / total * 100.0 } else { 0.0 },
            idle * 1e3,
            report.host_per_action_s.get(s).copied().unwrap_or(0.0) * 1e6,
            report.peak_stashed[s],
            report.peak_stash_bytes[s] as f64 / (1 << 20) as f64,
            pool.capacity,
            pool.hits,
            pool.misses
        );
    }
}
