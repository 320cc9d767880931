//! Chrome / Perfetto trace (`trace.json`): per stage, a compute track (one span per action) and a
//! copy track (one span per activation or gradient it received).

use serde_json::{json, Value};

use crate::engine::StepReport;

/// Track ids of the copy tracks: `COPY_TRACK_BASE + stage`.
pub const COPY_TRACK_BASE: usize = 1000;

/// Collected trace events.
#[derive(Default)]
pub struct Trace {
    events: Vec<Value>,
    /// Tracks already named.
    named: std::collections::BTreeSet<usize>,
}

impl Trace {
    /// Adds one step's spans; `offset_s` is when the step started, in seconds since the run began.
    pub fn add_step(&mut self, step: u64, offset_s: f64, report: &StepReport) {
        for copy in &report.copies {
            let tid = COPY_TRACK_BASE + copy.to_stage as usize;
            if self.named.insert(tid) {
                self.events.push(json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": format!("stage {} copies", copy.to_stage)}}));
            }
            self.events.push(json!({
                "name": format!("{}{}", if copy.activation { "act" } else { "grad" }, copy.mb),
                "cat": "copy",
                "ph": "X",
                "pid": 0,
                "tid": tid,
                "ts": (offset_s + copy.start_s) * 1e6,
                "dur": (copy.end_s - copy.start_s).max(0.0) * 1e6,
                "args": {"step": step, "part": copy.part, "mb": copy.mb},
            }));
        }
        for (stage, spans) in report.spans.iter().enumerate() {
            if self.named.insert(stage) {
                self.events.push(json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": stage, "args": {"name": format!("stage {stage}")}}));
            }
            for span in spans {
                let a = span.action;
                self.events.push(json!({
                    "name": format!("{}{}", a.op, a.mb),
                    "cat": a.op.to_string(),
                    "ph": "X",
                    "pid": 0,
                    "tid": stage,
                    "ts": (offset_s + span.start_s) * 1e6,
                    "dur": (span.end_s - span.start_s) * 1e6,
                    "args": {"step": step, "mb": a.mb, "chunk": a.chunk},
                }));
            }
        }
    }

    /// The trace file's contents.
    pub fn to_json(&self) -> String {
        json!({"traceEvents": self.events, "displayTimeUnit": "ms"}).to_string()
    }
}
