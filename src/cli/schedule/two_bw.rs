//! `baton schedule --schedule 2bw`: PipeDream-2BW's flush-free stream of `--windows` windows (one optimizer step
//! of `--microbatches` each), its weight versions, and its steady state against 1F1B with a flush (see
//! `baton_schedules::simulate_two_bw`).

use std::fmt::Write as _;

use super::CliError;
use crate::schedules::{generate, simulate_two_bw, two_bw_stream, Costs, Schedule, ScheduleKind, TwoBwReport};

/// Windows drawn and simulated when `--windows` is not given.
pub const WINDOWS_DEFAULT: u32 = 4;

/// Fewest windows `--windows` accepts: the steady state is measured between windows 0 and N-2.
pub const WINDOWS_MIN: u32 = crate::schedules::STEADY_WINDOWS_MIN;

/// Checks `--windows` against the schedule asked for: it applies to 2bw only, and needs 3 or more windows.
pub fn windows(kind: Option<ScheduleKind>, windows: Option<u32>) -> Result<u32, CliError> {
    match (kind, windows) {
        (Some(ScheduleKind::TwoBw), None) => Ok(WINDOWS_DEFAULT),
        (Some(ScheduleKind::TwoBw), Some(n)) if n >= WINDOWS_MIN => Ok(n),
        (Some(ScheduleKind::TwoBw), Some(n)) => Err(CliError::usage(format!(
            "--windows {n}: the steady state is measured between window ends, so give {WINDOWS_MIN} or more"
        ))),
        (_, None) => Ok(1),
        (_, Some(_)) => Err(CliError::usage("--windows only applies to --schedule 2bw")),
    }
}

/// The stream of `windows` windows of `m` micro-batches on `p` stages; a shape 2BW cannot serve (chunks other
/// than 1, too few micro-batches per window) is refused with the per-window generator's message.
pub fn stream(p: u32, m: u32, v: u32, windows: u32) -> Result<Schedule, CliError> {
    generate(ScheduleKind::TwoBw, p, m, v).map_err(|e| CliError::usage(e.to_string()))?;
    two_bw_stream(p, m, windows).map_err(|e| CliError::usage(e.to_string()))
}

/// Simulates the stream of `windows` windows of `m` micro-batches and 1F1B with a flush; `None` for every other
/// schedule.
pub fn report(schedule: &Schedule, m: u32, windows: u32, costs: &Costs) -> Result<Option<TwoBwReport>, CliError> {
    if schedule.kind != ScheduleKind::TwoBw {
        return Ok(None);
    }
    simulate_two_bw(schedule.stages(), m, costs, windows)
        .map(Some)
        .map_err(|e| CliError::failure(e.to_string()))
}

/// `a, b, c` for a list of numbers.
fn list<T: ToString>(values: &[T]) -> String {
    values.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The lines the text output appends: windows, delay, weight versions, steady state against 1F1B.
pub fn text(r: &TwoBwReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "2bw: {} windows of {} micro-batches (one optimizer step each), no flush; delay {} (window w reads the \
         weights after max(w - {}, 0) updates)",
        r.windows, r.window, r.delay, r.delay
    );
    let ends: Vec<String> = r.window_ends.iter().map(|t| format!("{t:.4}")).collect();
    let _ = writeln!(
        out,
        "  window ends (stage 0's last backward of each window): {}",
        ends.join(", ")
    );
    let _ = writeln!(
        out,
        "  peak weight versions per stage: {} (1f1b with a flush: 1); weight copies {} vs {}",
        list(&r.peak_weight_versions),
        r.weight_copies,
        r.flush_weight_copies
    );
    let _ = writeln!(
        out,
        "  steady state per window: 2bw {:.4}, 1f1b with a flush {:.4}; ratio {:.4}x",
        r.window_time, r.flush_window_time, r.speedup
    );
    let _ = writeln!(
        out,
        "  bubble: 2bw {:.2}% (steady state), 1f1b with a flush {:.2}%",
        r.bubble * 100.0,
        r.flush_bubble * 100.0
    );
    let _ = writeln!(
        out,
        "  peak stashed activations per stage: 2bw {}; 1f1b with a flush {}",
        list(&r.peak_inflight),
        list(&r.flush_peak_inflight)
    );
    out
}

/// The SVG title: the stream's shape and the comparison with 1F1B.
pub fn svg_title(r: &TwoBwReport) -> String {
    format!(
        "2bw — {} stages, {} windows of {} micro-batches, no flush, delay {}; {:.2} per window vs {:.2} for 1f1b with \
         a flush ({:.2}x); weight versions per stage {}",
        r.stages,
        r.windows,
        r.window,
        r.delay,
        r.window_time,
        r.flush_window_time,
        r.speedup,
        list(&r.peak_weight_versions)
    )
}

/// The JSON object `--format json` adds under `two_bw`.
pub fn json(r: &TwoBwReport) -> Result<serde_json::Value, CliError> {
    serde_json::to_value(r).map_err(|e| CliError::failure(e.to_string()))
}
