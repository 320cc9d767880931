//! Where a CPU step's time goes, op by op (opt-in): while [`set_enabled`] is on, every op of the CPU backend adds
//! its wall time and one call to its op's entry; [`take`] returns the entries and starts afresh.
//!
//! The times are summed over the threads that call ops (stage threads), so with several stages running at once
//! they add up to more than the step's wall time; an op's time includes its pool threads' work (it returns when
//! they are done). An op that calls another (`duplicate` uploads) is counted once, as the outer op. Off, an op
//! pays one relaxed atomic load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// One op's total since the last [`take`].
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The backend op (`matmul_forward`, `attention_backward`, …).
    pub op: &'static str,
    /// Wall seconds inside the op, summed over calls and calling threads.
    pub seconds: f64,
    /// Calls.
    pub calls: u64,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

thread_local! {
    /// True while this thread is inside a timed op (inner ops are not timed again).
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Turns the per-op timing on or off for the process.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The per-op totals since the last call (largest time first), which starts the next totals from zero.
pub fn take() -> Vec<OpTime> {
    let mut times = std::mem::take(&mut *TIMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    times.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    times
}

/// Times one op from [`Timer::start`] to its drop (nothing when timing is off or the op runs inside another).
pub(crate) struct Timer(Option<(&'static str, Instant)>);

impl Timer {
    pub(crate) fn start(op: &'static str) -> Timer {
        if !ENABLED.load(Ordering::Relaxed) || INSIDE.with(|i| i.replace(true)) {
            return Timer(None);
        }
        Timer(Some((op, Instant::now())))
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some((op, start)) = self.0 else { return };
        let seconds = start.elapsed().as_secs_f64();
        INSIDE.with(|i| i.set(false));
        let mut times = TIMES.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match times.iter_mut().find(|t| t.op == op) {
            Some(t) => {
                t.seconds += seconds;
                t.calls += 1;
            }
            None => times.push(OpTime { op, seconds, calls: 1 }),
        }
    }
}
