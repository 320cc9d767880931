//! Vectorised elementwise maths and the instruction-set dispatch.
//!
//! A kernel is written once as plain scalar code over slices (branch-free, explicit `mul_add`) and compiled
//! three times by [`multiversion!`]: for AVX-512, for AVX2 + FMA, and portable. The compiler vectorises the
//! loops for each target; since it never reorders or contracts floating-point operations by itself and every
//! multiply-add is an explicit fused one, the three builds give bitwise the same results (tested).

/// An instruction set a kernel can be run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 (F, VL) with FMA.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Whatever the build targets (x86-64 baseline: SSE2; fused multiply-adds through libm).
    Portable,
}

/// What this CPU runs, detected once for the process: (AVX-512 F + VL + FMA, AVX2 + FMA).
fn detected() -> (bool, bool) {
    static FEATURES: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    *FEATURES.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            (
                has!("avx512f") && has!("avx512vl") && has!("fma"),
                has!("avx2") && has!("fma"),
            )
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (false, false)
        }
    })
}

impl Isa {
    /// The best instruction set this CPU has (detected once; every op asks).
    pub fn best() -> Isa {
        match detected() {
            (true, _) => Isa::Avx512,
            (false, true) => Isa::Avx2,
            _ => Isa::Portable,
        }
    }

    /// Every instruction set this CPU can run, best first (always ends with [`Isa::Portable`]).
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    /// True when this CPU can run `self` (an instruction set it lacks is run as [`Isa::Portable`]).
    pub fn supported(self) -> bool {
        let (avx512, avx2) = detected();
        match self {
            Isa::Avx512 => avx512,
            Isa::Avx2 => avx2,
            Isa::Portable => true,
        }
    }
}

/// Defines `fn name(isa: Isa, args…)` that runs `body` compiled for `isa` (falling back to the portable build when
/// the CPU lacks it).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::fast::vector::Isa, $($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) { inner($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) { inner($($arg),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `supported()` checked that this CPU executes AVX-512F, AVX-512VL and FMA.
                $crate::fast::vector::Isa::Avx512 if isa.supported() => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `supported()` checked that this CPU executes AVX2 and FMA.
                $crate::fast::vector::Isa::Avx2 if isa.supported() => unsafe { avx2($($arg),*) },
                _ => inner($($arg),*),
            }
        }
    };
}
pub(crate) use multiversion;

/// `e^x` for `x` in `[-87, 88]` (clamped outside), within 2 ulp: `x = n·ln2 + r`, `|r| ≤ ln2/2`, a degree-6
/// polynomial for `e^r`, and `2^n` put into the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest without a branch: adding 1.5 · 2^23 leaves the integer in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x.mul_add(LOG2E, SHIFTER);
    let n = shifted - SHIFTER;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    // Taylor coefficients 1/k!, evaluated by Horner's rule.
    let mut p = 1.0 / 720.0f32;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // `2^n` from the integer already in `shifted`'s low mantissa bits (`shifted = 1.5·2^23 + n` exactly, `n` in
    // [-126, 127]), not from `n as i32`: Rust's saturating float-to-int cast does not vectorise.
    let biased = shifted.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// Lanes of the fixed reduction pattern of every row sum and maximum: element `j` goes to accumulator
/// `j mod LANES`, and the accumulators combine pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1). The pattern depends on
/// nothing but the row, so a reduction gives the same bits on every instruction set and thread count.
pub const LANES: usize = 16;

/// The lanes of a row sum combined pairwise, in the fixed order of [`LANES`].
#[inline(always)]
pub fn lane_combine(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0]
}

/// `Σ f(x_j)` in the fixed lane pattern of [`LANES`].
#[inline(always)]
pub fn lane_sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut groups = x.chunks_exact(LANES);
    for g in &mut groups {
        for (a, &v) in acc.iter_mut().zip(g) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(groups.remainder()) {
        *a += f(v);
    }
    lane_combine(acc)
}

/// `Σ x_j` in the fixed lane pattern of [`LANES`].
#[inline(always)]
pub fn lane_sum(x: &[f32]) -> f32 {
    lane_sum_of(x, |v| v)
}

/// `max x_j` (−∞ for an empty row), by lanes as [`lane_sum`] (the maximum is exact in any order).
#[inline(always)]
pub fn lane_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut groups = x.chunks_exact(LANES);
    for g in &mut groups {
        for (a, &v) in m.iter_mut().zip(g) {
            *a = a.max(v);
        }
    }
    for (a, &v) in m.iter_mut().zip(groups.remainder()) {
        *a = a.max(v);
    }
    m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

multiversion! {
    /// `out[i] = exp(inp[i])` (tests of [`exp`] on every instruction set).
    pub fn exp_slice(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = exp(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (-20_000..=20_000).map(|i| i as f32 * 1e-3).collect();
        v.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            1e-8,
            50.0,
            -50.0,
            88.0,
            -87.0,
            f32::MIN_POSITIVE,
        ]);
        v
    }

    #[test]
    fn exp_is_within_two_ulp() {
        for x in (-8_700..=8_800).map(|i| i as f32 * 0.01) {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= 2.0 * ulp as f64 + f64::from(f32::MIN_POSITIVE),
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let inp = inputs();
        let mut want = vec![f32::NAN; inp.len()];
        exp_slice(Isa::Portable, &mut want, &inp);
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; inp.len()];
            exp_slice(isa, &mut got, &inp);
            let diff = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(diff.is_none(), "{isa:?} differs from portable at {diff:?}");
        }
    }
}
