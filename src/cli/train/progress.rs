//! `baton train`'s view of the loop: the progress bar, `metrics.jsonl`, the trace of the first steps, and the
//! end-of-run summary.

use std::fs::File;
use std::io::{BufWriter, Write};

use indicatif::ProgressBar;

use crate::cli::CliError;
use crate::engine::backend::Backend;
use crate::engine::trainer::{self, CheckpointEvent, EvalEvent, RestartEvent, StartEvent, StepEvent, Warning};
use crate::engine::Pipeline;

/// `baton train`'s view of the loop: a progress bar, one `metrics.jsonl` line per step (and per restart), the
/// trace of the first steps.
pub(super) struct CliObserver {
    pub(super) bar: ProgressBar,
    pub(super) metrics: BufWriter<File>,
    pub(super) trace: Option<crate::cli::trace::Trace>,
    /// The first failure to write the metrics (reported when the run ends).
    pub(super) error: Option<CliError>,
}

impl CliObserver {
    /// Prints a line above the progress bar, or to stderr when the bar is hidden (not a terminal).
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn write_line(&mut self, line: &serde_json::Value) {
        if let Err(e) = writeln!(self.metrics, "{line}") {
            self.error
                .get_or_insert(CliError::failure(format!("writing metrics.jsonl: {e}")));
        }
    }
}

impl trainer::Observer for CliObserver {
    fn on_start(&mut self, e: &StartEvent) {
        self.bar.set_position(e.first_step);
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
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens_per_s": e.tokens_per_s,
            "bubble": r.bubble,
            "step_s": r.elapsed_s,
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
        if let Some(val) = e.val_loss {
            line["val_loss"] = serde_json::json!(val);
        }
        if let Some(stall) = e.save_stall_s {
            line["save_stall_s"] = serde_json::json!(stall);
        }
        self.write_line(&line);
        if e.traced {
            if let Some(trace) = self.trace.as_mut() {
                trace.add_step(r.step, e.started_s, r);
            }
        }
        let mfu_text = e.mfu.map_or(String::new(), |m| format!(" | MFU {:.1}%", m * 100.0));
        self.bar.set_message(format!(
            "loss {:.4} | {:.0} tok/s{mfu_text} | bubble {:.1}%",
            r.loss,
            e.tokens_per_s,
            r.bubble * 100.0
        ));
        self.bar.set_position(r.step);
    }

    fn on_eval(&mut self, e: &EvalEvent) {
        self.say(format!(
            "step {:>5}: train loss {:.4}, val loss {:.4}",
            e.step, e.train_loss, e.val_loss
        ));
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
            Warning::Skipped { step, what, stage } => format!(
                "step {step}: non-finite {what} (first seen on stage {}); optimizer step skipped",
                stage.map_or("?".into(), |s| s.to_string())
            ),
            Warning::PeakUnavailable(why) => {
                format!("warning: measuring the bf16 GEMM rate failed ({why}); MFU not reported")
            }
            Warning::DropErrors(list) => format!("warning: errors while releasing resources: {}", list.join("; ")),
        };
        self.say(text);
    }
}

pub(super) fn summary<B: Backend>(
    seq: usize,
    copy_gbps: f64,
    model: &crate::engine::GptConfig,
    pipeline: &Pipeline<B>,
    report: &crate::engine::StepReport,
    run: &trainer::RunSummary,
) {
    eprintln!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); val loss {} -> {}",
        pipeline.step(),
        run.elapsed_s,
        run.tokens as f64 / run.elapsed_s.max(1e-9),
        run.first_val.map_or("-".into(), |v| format!("{v:.4}")),
        run.last_val.map_or("-".into(), |v| format!("{v:.4}"))
    );
    let predicted = trainer::predicted_bubble(pipeline, report);
    eprintln!(
        "last step: measured bubble {:.1}%, simulated from measured action costs {}",
        report.bubble * 100.0,
        predicted.map_or("-".into(), |b| format!("{:.1}%", b * 100.0))
    );
    // What the same schedule would do with one stage per device (transfers as free as here).
    let schedule = pipeline.schedule();
    if let Some(costs) = trainer::measured_costs(pipeline, report) {
        let units = crate::engine::predict::unit_costs(model, seq, pipeline.ranges(), &costs);
        let elem = pipeline.backends().first().map_or(4, Backend::activation_elem_bytes);
        let act_bytes = (report.tokens / schedule.microbatches as usize * model.d_model * elem) as f64;
        if let Ok(preds) = crate::engine::predict::predict(
            model,
            &units,
            schedule.kind,
            schedule.microbatches,
            schedule.chunks(),
            &[1, 2, 4, 8],
            act_bytes,
            if copy_gbps > 0.0 {
                copy_gbps * 1e9
            } else {
                f64::INFINITY
            },
        ) {
            let text: Vec<String> = preds
                .iter()
                .map(|p| {
                    format!(
                        "{} stage(s) {:.1} ms, bubble {:.1}%",
                        p.stages,
                        p.step_s * 1e3,
                        p.bubble * 100.0
                    )
                })
                .collect();
            let link = if copy_gbps > 0.0 {
                format!("{copy_gbps} GB/s copies")
            } else {
                "free transfers".into()
            };
            if !text.is_empty() {
                eprintln!(
                    "predicted with one stage per device from these costs ({link}): {}",
                    text.join("; ")
                );
            }
        }
    }
    let pools = pipeline.receive_pools();
    for (s, (busy, idle)) in report.busy_s.iter().zip(&report.idle_s).enumerate() {
        let total = busy + idle;
        let pool = pools.get(s).copied().unwrap_or_default();
        eprintln!(
            "  stage {s}: busy {:.1} ms ({:.0}%), idle {:.1} ms, host {:.1} µs/action, peak stashed activations {} \
             ({:.1} MiB), receive buffers {} (allocated {}, reused {}, misses {})",
            busy * 1e3,
            if total > 0.0 { busy / total * 100.0 } else { 0.0 },
            idle * 1e3,
            report.host_per_action_s.get(s).copied().unwrap_or(0.0) * 1e6,
            report.peak_stashed[s],
            report.peak_stash_bytes[s] as f64 / (1 << 20) as f64,
            pool.capacity,
            pool.allocations(),
            pool.hits,
            pool.misses
        );
    }
}
