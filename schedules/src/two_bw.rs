//! PipeDream-2BW (Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training", 2021): the
//! micro-batch stream runs in 1F1B order without a flush, the weights are updated once per window
//! of `m` micro-batches, and each stage holds at most two weight versions.
//!
//! Version k is the stage's weights after k updates (W_0 the initial ones); the update producing
//! W_{k+1} applies the gradient of window k (micro-batches `k*m .. k*m+m-1`) to W_k. Window w reads
//! version `max(w - d, 0)`, where the delay d is 0 (plain, flushing semantics) or 1 (2BW's
//! `W(t+1) = W(t) - lr * grad f(W(t-1))`). Every action of a micro-batch on a stage reads the same
//! version, so a backward sees the weights its forward saw.
//!
//! In 1F1B stage s keeps `p-1-s` forwards ahead of its backwards, so window w's first forward on
//! stage s, `F(w*m)`, comes right after `B(w*m-(p-s))`. Delay 0 needs `B(w*m-1)` before it:
//! `p - s <= 1` on every stage, i.e. `p = 1`. Delay 1 needs `B((w-1)*m-1)` before it: `m >= p-1-s`
//! on every stage, i.e. `m >= p - 1`; then the in-flight micro-batches of a stage span at most two
//! windows and the versions alive never exceed two. [`weight_versions`] checks any stream action by
//! action; the generators refuse shapes outside that closed form, and the tests check both agree.

use serde::Serialize;

use crate::error::ScheduleError;
use crate::generate::{check_one_chunk, one_f_one_b, unsupported};
use crate::ir::{Op, Schedule, ScheduleKind, MICROBATCHES_MAX};
use crate::simulate::{simulate, Costs, SimReport};
use crate::validate::validate;

/// Most weight versions a 2BW stage may hold at once (the "two buffered weights").
pub const WEIGHT_VERSIONS_MAX: u32 = 2;

/// Largest delay, in windows, between the version a window reads and the newest one (2BW's 1).
pub const DELAY_MAX: u32 = 1;

/// Windows in the stream [`two_bw_delay`] checks: windows 0 and 1 both read W_0, window 2 is the
/// first to read an updated version, and from there on every window repeats window 2's pattern.
pub const DELAY_CHECK_WINDOWS: u32 = 3;

/// Fewest windows [`simulate_two_bw`] measures a steady state over: the fill's window, one window
/// after it, and the drain's.
pub const STEADY_WINDOWS_MIN: u32 = 3;

/// What a flush-free stream reads: the delay it runs with and, per stage and action, the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightVersions {
    /// The smallest delay in `0..=DELAY_MAX` (windows) the stream runs with, holding at most
    /// [`WEIGHT_VERSIONS_MAX`] versions per stage.
    pub delay: u32,
    /// Micro-batches per window (per optimizer step).
    pub window: u32,
    /// `reads[stage][i]`: the weight version (updates applied) action `i` of the stage's list reads.
    pub reads: Vec<Vec<u32>>,
    /// Per stage: the most weight versions alive at once (read by an in-flight micro-batch, or the
    /// newest produced), between any two actions of the stage's list.
    pub peak_alive: Vec<u32>,
}

/// The per-window order of PipeDream-2BW: 1F1B's order over one window of `m` micro-batches, which
/// is what the engine runs per optimizer step (the versions come from [`two_bw_delay`]). Refuses
/// `chunks != 1` and `m < p - 1` (the stream's forwards would then read weights not yet produced).
pub fn two_bw(p: u32, m: u32, v: u32) -> Result<Schedule, ScheduleError> {
    check_one_chunk(ScheduleKind::TwoBw, p, m, v)?;
    check_two_versions(p, m)?;
    let mut schedule = one_f_one_b(p, m, 1)?;
    schedule.kind = ScheduleKind::TwoBw;
    Ok(schedule)
}

/// The flush-free stream of PipeDream-2BW: continuous 1F1B over `windows * m` micro-batches on
/// `p` stages (window w = micro-batches `w*m .. w*m+m-1`), kind [`ScheduleKind::TwoBw`].
/// Refuses what [`two_bw`] refuses, `windows = 0`, and streams over [`MICROBATCHES_MAX`].
pub fn two_bw_stream(p: u32, m: u32, windows: u32) -> Result<Schedule, ScheduleError> {
    check_one_chunk(ScheduleKind::TwoBw, p, m, 1)?;
    let total = u64::from(m) * u64::from(windows);
    if windows == 0 || total > u64::from(MICROBATCHES_MAX) {
        return Err(unsupported(
            ScheduleKind::TwoBw,
            p,
            m,
            1,
            format!(
                "the stream needs 1 or more windows and at most {MICROBATCHES_MAX} micro-batches in all; \
                 {windows} windows of {m} make {total}"
            ),
        ));
    }
    check_two_versions(p, m)?;
    let mut schedule = one_f_one_b(p, total as u32, 1)?;
    schedule.kind = ScheduleKind::TwoBw;
    Ok(schedule)
}

/// The closed form of the module doc: 1F1B's stream fits two versions when `m >= p - 1`.
fn check_two_versions(p: u32, m: u32) -> Result<(), ScheduleError> {
    if m + 1 < p {
        return Err(unsupported(
            ScheduleKind::TwoBw,
            p,
            m,
            1,
            format!(
                "stage 0 runs {} forwards ahead of its backwards, so with windows of {m} micro-batches a forward \
                 would read weights its stage has not produced yet (a delay of 2 windows would need a third weight \
                 version): use microbatches >= stages - 1 = {} (PipeDream-2BW's paper uses microbatches >= stages)",
                p - 1,
                p - 1
            ),
        ));
    }
    Ok(())
}

/// The delay PipeDream-2BW runs with on `p` stages and windows of `m` micro-batches: 0 for one stage
/// (2BW is then plain 1F1B), 1 otherwise. Found by [`weight_versions`] on a stream of
/// [`DELAY_CHECK_WINDOWS`] windows; refuses the shapes [`two_bw`] refuses.
pub fn two_bw_delay(p: u32, m: u32) -> Result<u32, ScheduleError> {
    let stream = two_bw_stream(p, m, DELAY_CHECK_WINDOWS)?;
    Ok(weight_versions(&stream, m)?.delay)
}

/// Which weight version every action of a flush-free `stream` reads when weights are updated every
/// `window` micro-batches (the last window may be shorter), with the smallest delay in
/// `0..=DELAY_MAX` under which every action finds its version on its stage and no stage holds more
/// than [`WEIGHT_VERSIONS_MAX`] versions.
///
/// Version k+1 appears on stage s right after the later of: stage s's last B or W of window k (its
/// gradient is complete), and version k's appearance (updates apply in order). A micro-batch holds
/// its version from its first action on a stage to its last; with in-order updates at most
/// `delay + 1` versions are then alive, so a delay that every action can serve is the answer.
/// Validates `stream` first; an action that would read a version its stage has not produced yet
/// under delay 1 is a [`ScheduleError::WeightVersion`] naming it.
pub fn weight_versions(stream: &Schedule, window: u32) -> Result<WeightVersions, ScheduleError> {
    validate(stream)?;
    let n = stream.microbatches;
    if window == 0 || window > n {
        return Err(unsupported(
            stream.kind,
            stream.stages(),
            n,
            stream.chunks(),
            format!("the window must hold 1..={n} micro-batches (the stream's), not {window}"),
        ));
    }
    // The smallest delay that works: 0 first (it fails on every pipeline of 2 or more stages), then 1.
    let (delay, (reads, peak_alive)) = match versions_with_delay(stream, window, 0) {
        Ok(found) => (0, found),
        Err(_) => (DELAY_MAX, versions_with_delay(stream, window, DELAY_MAX)?),
    };
    Ok(WeightVersions {
        delay,
        window,
        reads,
        peak_alive,
    })
}

/// Reads and peak alive versions per stage under one delay, or the first action at fault.
fn versions_with_delay(stream: &Schedule, window: u32, delay: u32) -> Result<(Vec<Vec<u32>>, Vec<u32>), ScheduleError> {
    let n = stream.microbatches as usize;
    let windows = (stream.microbatches as usize).div_ceil(window as usize);
    let window_of = |mb: u32| (mb / window) as usize;
    let read_of = |mb: u32| (window_of(mb) as u32).saturating_sub(delay);
    // Per micro-batch of the current stage: its first and last action's index (reused per stage).
    let (mut first, mut last) = (vec![usize::MAX; n], vec![0usize; n]);
    let mut reads = Vec::with_capacity(stream.actions.len());
    let mut peaks = Vec::with_capacity(stream.actions.len());
    for (s, list) in stream.actions.iter().enumerate() {
        let fault = |i: usize, reason: String| ScheduleError::WeightVersion {
            stage: s as u32,
            index: i,
            action: list[i].to_string(),
            reason,
        };
        // last_grad[w]: index of the stage's last B or W of window w (validated: every window has one).
        let mut last_grad = vec![None::<usize>; windows];
        for (i, a) in list.iter().enumerate() {
            let mb = a.mb as usize;
            first[mb] = first[mb].min(i);
            last[mb] = i;
            if matches!(a.op, Op::B | Op::W) {
                last_grad[window_of(a.mb)] = Some(i);
            }
        }
        // appears[k]: index after which version k exists on the stage (None for W_0: always).
        let mut appears: Vec<Option<usize>> = Vec::with_capacity(windows + 1);
        appears.push(None);
        for k in 0..windows {
            let grad = last_grad[k].ok_or_else(|| {
                fault(
                    list.len().saturating_sub(1),
                    format!(
                        "window {k} has no backward on this stage, so version {} never appears",
                        k + 1
                    ),
                )
            })?;
            let previous = appears[k].unwrap_or(0);
            appears.push(Some(grad.max(previous)));
        }
        // Versions read by in-flight micro-batches: how many read each, and how many are read at all.
        let mut inflight = vec![0u32; windows + 1];
        let mut read_versions = 0u32;
        let mut newest = 0usize;
        let mut peak = 1u32;
        let mut stage_reads = Vec::with_capacity(list.len());
        for (i, a) in list.iter().enumerate() {
            let version = read_of(a.mb);
            let v = version as usize;
            if let Some(at) = appears[v].filter(|&at| at >= i) {
                return Err(fault(
                    i,
                    format!(
                        "micro-batch {} (window {}) reads weight version {version} with delay {delay}, but the stage \
                         produces it only after its action #{at} `{}`",
                        a.mb,
                        window_of(a.mb),
                        list[at]
                    ),
                ));
            }
            stage_reads.push(version);
            let mb = a.mb as usize;
            if first[mb] == i && last[mb] != i {
                inflight[v] += 1;
                read_versions += u32::from(inflight[v] == 1);
            }
            if last[mb] == i && first[mb] != i {
                inflight[v] -= 1;
                read_versions -= u32::from(inflight[v] == 0);
            }
            while newest < windows && appears[newest + 1].is_some_and(|at| at <= i) {
                newest += 1;
            }
            let alive = read_versions + u32::from(inflight[newest] == 0);
            // At most delay + 1 <= 2, by construction: let a be the oldest version an in-flight micro-batch reads,
            // from window w (a = max(w - delay, 0), so w <= a + delay). Window w is incomplete, so version w + 1
            // has not appeared (updates apply in order) and the newest is at most w; every version read has
            // appeared (checked above). So all alive versions lie in a..=a+delay.
            debug_assert!(
                alive <= WEIGHT_VERSIONS_MAX,
                "stage {s} action #{i}: {alive} weight versions alive with delay {delay}"
            );
            peak = peak.max(alive);
        }
        for a in list {
            first[a.mb as usize] = usize::MAX;
        }
        reads.push(stage_reads);
        peaks.push(peak);
    }
    Ok((reads, peaks))
}

/// PipeDream-2BW against 1F1B with a flush under one cost model (see [`simulate_two_bw`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TwoBwReport {
    /// Pipeline stages.
    pub stages: u32,
    /// Micro-batches per window (per optimizer step).
    pub window: u32,
    /// Windows in the simulated stream.
    pub windows: u32,
    /// The delay the stream runs with, in windows (see [`WeightVersions::delay`]).
    pub delay: u32,
    /// Per stage: the most weight versions alive at once in the stream.
    pub peak_weight_versions: Vec<u32>,
    /// Per window: when stage 0's last backward of it ends (the window boundaries of the stream).
    pub window_ends: Vec<f64>,
    /// Steady-state time per window of the stream, in the costs' unit.
    pub window_time: f64,
    /// Time per window of 1F1B with a flush after every window (its makespan over `window` micro-batches).
    pub flush_window_time: f64,
    /// `flush_window_time / window_time` (1 when both are 0, infinite when only `window_time` is).
    pub speedup: f64,
    /// Steady-state bubble of the stream: `1 - (work of all stages per window) / (stages * window_time)`.
    pub bubble: f64,
    /// Bubble of 1F1B with a flush.
    pub flush_bubble: f64,
    /// Per stage: peak stashed activations of the stream.
    pub peak_inflight: Vec<u32>,
    /// Per stage: peak stashed activations of 1F1B with a flush.
    pub flush_peak_inflight: Vec<u32>,
    /// Copies of a stage's weights held at the peak (the most of `peak_weight_versions`): the crate has no
    /// parameter bytes, so memory is counted in weight copies.
    pub weight_copies: u32,
    /// Copies of a stage's weights 1F1B with a flush holds: 1.
    pub flush_weight_copies: u32,
    /// The stream's simulation (for the renderers; not serialised).
    #[serde(skip)]
    pub stream: SimReport,
}

/// Simulates PipeDream-2BW's stream of `windows` windows of `m` micro-batches on `p` stages under
/// `costs` (one part per stage), and 1F1B with a flush per window for comparison.
///
/// The steady-state time per window is the average gap between window ends, where a window ends at
/// stage 0's last backward of it (the end of its backward chain): `(end(windows-2) - end(0)) /
/// (windows-2)`. It leaves out the pipeline's fill (before window 0 ends) and the last window,
/// which ends in the drain (stage 0's last `p-1` backwards run with no forward between them, so it
/// ends early); windows `0..=windows-2` end exactly when they would in an endless stream, as no
/// action they wait on is part of any stage's drain (`m >= p-1`). Needs `windows >= 3`. When the
/// stream's period spans several micro-batches (latency: a cycle of p) and does not divide m,
/// consecutive gaps differ and the average is exact over a multiple of that many gaps. With uniform costs F, B and latency L the stream's cycle
/// through all p stages and back gives `m * (F + B) + 2 * m * (p-1) * L / p` per window, against
/// 1F1B's flush `(m + p - 1) * (F + B)` with no latency.
pub fn simulate_two_bw(p: u32, m: u32, costs: &Costs, windows: u32) -> Result<TwoBwReport, ScheduleError> {
    if windows < STEADY_WINDOWS_MIN {
        return Err(unsupported(
            ScheduleKind::TwoBw,
            p,
            m,
            1,
            format!(
                "the steady state is measured between the ends of windows 0 and windows-2: simulate \
                 {STEADY_WINDOWS_MIN} or more windows, not {windows}"
            ),
        ));
    }
    let stream = two_bw_stream(p, m, windows)?;
    let versions = weight_versions(&stream, m)?;
    let sim = simulate(&stream, costs)?;
    let flush = simulate(&one_f_one_b(p, m, 1)?, costs)?;
    // Stage 0's end of each window's last backward (its list holds every micro-batch: validated).
    let mut window_end = vec![0.0f64; windows as usize];
    for span in sim.spans.first().into_iter().flatten() {
        if span.action.op.is_input_grad() || span.action.op == Op::W {
            let w = (span.action.mb / m) as usize;
            window_end[w] = window_end[w].max(span.end);
        }
    }
    let last = windows as usize - 2;
    let window_time = (window_end[last] - window_end[0]) / last as f64;
    let work: f64 = sim.busy.iter().sum::<f64>() / f64::from(windows);
    let bubble = if window_time > 0.0 {
        (1.0 - work / (f64::from(p) * window_time)).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let speedup = match (flush.makespan > 0.0, window_time > 0.0) {
        (_, true) => flush.makespan / window_time,
        (true, false) => f64::INFINITY,
        (false, false) => 1.0,
    };
    let weight_copies = versions.peak_alive.iter().copied().max().unwrap_or(1);
    Ok(TwoBwReport {
        stages: p,
        window: m,
        windows,
        delay: versions.delay,
        peak_weight_versions: versions.peak_alive,
        window_ends: window_end,
        window_time,
        flush_window_time: flush.makespan,
        speedup,
        bubble,
        flush_bubble: flush.bubble,
        peak_inflight: sim.peak_inflight.clone(),
        flush_peak_inflight: flush.peak_inflight,
        weight_copies,
        flush_weight_copies: 1,
        stream: sim,
    })
}
