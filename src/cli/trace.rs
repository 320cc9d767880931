//! Chrome / Perfetto trace (`trace.json`): one track per stage, one span per action.

use serde_json::{json, Value};

use crate::engine::StepReport;

/// Collected trace events.
#[derive(Default)]
pub struct Trace {
    events: Vec<Value>,
}

impl Trace {
    /// Adds one step's spans; `offset_s` is when the step started, in seconds since the run began.
    pub fn add_step(&mut self, step: u64, offset_s: f64, report: &StepReport) {
        for (stage, spans) in report.spans.iter().enumerate() {
            if step == 1 {
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
