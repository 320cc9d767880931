//! Shared helpers of the fast ops' tests.

/// `n` deterministic pseudo-random values in `[-1000, 1000] / divisor` (xorshift from `seed`).
pub fn values(n: usize, seed: u64, divisor: f32) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % 2001) as f32 - 1000.0) / divisor
        })
        .collect()
}

/// Bitwise equality of two slices (same length, same bits everywhere).
pub fn same(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Relative norm error of `got` against the f64 reference `want`: `‖got − want‖ / ‖want‖`.
pub fn rel(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Held by every test that resizes the process-wide pool, so no other such test resizes it meanwhile.
pub fn pool_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
