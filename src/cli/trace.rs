//! Chrome / Perfetto trace (`trace.json`): one process per stage (named `stage N`) with a compute thread (one
//! span per action), a copy thread (one span per activation or gradient it received), a communication thread
//! with data parallelism (one span per gradient bucket its replicas' group reduced) and the optimizer step; and a
//! `trainer` process with the evaluation passes.

use serde_json::{json, Value};

use crate::engine::StepReport;

/// Thread id of a stage's compute track.
pub const COMPUTE_TID: usize = 0;
/// Thread id of a stage's copy track.
pub const COPY_TID: usize = 1;
/// Thread id of a stage's optimizer track.
pub const OPTIMIZER_TID: usize = 2;
/// Thread id of a stage's data-parallel communication track.
pub const COMM_TID: usize = 3;
/// Process id of the trainer's own track (evaluation): after every stage's.
pub const TRAINER_PID: usize = 100_000;

/// Collected trace events.
#[derive(Default)]
pub struct Trace {
    events: Vec<Value>,
    /// (pid, tid) already named.
    named: std::collections::BTreeSet<(usize, usize)>,
}

impl Trace {
    fn name(&mut self, pid: usize, tid: usize, process: &str, thread: &str) {
        if self.named.insert((pid, usize::MAX)) {
            self.events
                .push(json!({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": process}}));
            self.events.push(
                json!({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}),
            );
        }
        if self.named.insert((pid, tid)) {
            self.events
                .push(json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": thread}}));
            self.events.push(
                json!({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}}),
            );
        }
    }

    /// Adds one step's spans; `offset_s` is when the step started and `optimizer_s` when its optimizer phase
    /// started, in seconds since the run began.
    pub fn add_step(&mut self, step: u64, offset_s: f64, optimizer_s: f64, report: &StepReport) {
        for copy in &report.copies {
            let pid = copy.to_stage as usize;
            self.name(pid, COPY_TID, &format!("stage {pid}"), "copies in");
            self.events.push(json!({
                "name": format!("{}{}", if copy.activation { "act" } else { "grad" }, copy.mb),
                "cat": "copy",
                "ph": "X",
                "pid": pid,
                "tid": COPY_TID,
                "ts": (offset_s + copy.start_s) * 1e6,
                "dur": (copy.end_s - copy.start_s).max(0.0) * 1e6,
                "args": {"step": step, "part": copy.part, "mb": copy.mb},
            }));
        }
        for c in &report.comm {
            let pid = c.stage as usize;
            self.name(pid, COMM_TID, &format!("stage {pid}"), "gradient reduction");
            self.events.push(json!({
                "name": format!("bucket {}", c.bucket),
                "cat": "comm",
                "ph": "X",
                "pid": pid,
                "tid": COMM_TID,
                "ts": (offset_s + c.start_s) * 1e6,
                "dur": (c.end_s - c.start_s).max(0.0) * 1e6,
                "args": {"step": step, "bytes": c.bytes},
            }));
        }
        let end_s = offset_s + report.elapsed_s;
        for (stage, spans) in report.spans.iter().enumerate() {
            self.name(stage, COMPUTE_TID, &format!("stage {stage}"), "compute");
            for span in spans {
                let a = span.action;
                self.events.push(json!({
                    "name": format!("{}{}", a.op, a.mb),
                    "cat": a.op.to_string(),
                    "ph": "X",
                    "pid": stage,
                    "tid": COMPUTE_TID,
                    "ts": (offset_s + span.start_s) * 1e6,
                    "dur": (span.end_s - span.start_s) * 1e6,
                    "args": {"step": step, "mb": a.mb, "chunk": a.chunk},
                }));
            }
            // The optimizer phase (gradient reduction, clipping, AdamW) runs for every stage at once after the
            // pipeline.
            self.name(stage, OPTIMIZER_TID, &format!("stage {stage}"), "optimizer");
            self.events.push(json!({
                "name": "optimizer step",
                "cat": "optimizer",
                "ph": "X",
                "pid": stage,
                "tid": OPTIMIZER_TID,
                "ts": optimizer_s * 1e6,
                "dur": (end_s - optimizer_s).max(0.0) * 1e6,
                "args": {"step": step, "lr": report.lr, "grad_norm": report.grad_norm},
            }));
        }
    }

    /// Adds an evaluation pass (seconds since the run began).
    pub fn add_eval(&mut self, step: u64, start_s: f64, elapsed_s: f64) {
        self.name(TRAINER_PID, 0, "trainer", "evaluation");
        self.events.push(json!({
            "name": "evaluation",
            "cat": "eval",
            "ph": "X",
            "pid": TRAINER_PID,
            "tid": 0,
            "ts": start_s * 1e6,
            "dur": elapsed_s * 1e6,
            "args": {"after_step": step},
        }));
    }

    /// The trace file's contents.
    pub fn to_json(&self) -> String {
        json!({"traceEvents": self.events, "displayTimeUnit": "ms"}).to_string()
    }
}
