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

impl Isa {
    /// The best instruction set this CPU has.
    pub fn best() -> Isa {
        Isa::available()[0]
    }

    /// Every instruction set this CPU can run, best first (always ends with [`Isa::Portable`]).
    pub fn available() -> Vec<Isa> {
        let mut out = Vec::with_capacity(3);
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("fma")
            {
                out.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                out.push(Isa::Avx2);
            }
        }
        out.push(Isa::Portable);
        out
    }

    /// True when this CPU can run `self` (an instruction set it lacks is run as [`Isa::Portable`]).
    pub fn supported(self) -> bool {
        Isa::available().contains(&self)
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
    let n = x.mul_add(LOG2E, SHIFTER) - SHIFTER;
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
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// `tanh(x)`, within 2e-7 absolute: `sign(x) · (1 − 2 / (e^{2|x|} + 1))`, with `|x|` capped at 9 (where `tanh` is
/// 1 in f32).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs().min(9.0);
    let e = exp(2.0 * a);
    let t = 1.0 - 2.0 / (e + 1.0);
    t.copysign(x)
}

multiversion! {
    /// `out[i] = tanh(inp[i])` (for tests and benches of [`tanh`]).
    pub fn tanh_slice(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            *o = tanh(x);
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
    fn tanh_is_within_2e7_of_libm() {
        for x in inputs() {
            let got = tanh(x);
            let want = x.tanh();
            assert!((got - want).abs() <= 2e-7, "tanh({x}) = {got}, libm {want}");
            assert_eq!(got.is_sign_negative(), x.is_sign_negative(), "sign of tanh({x})");
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let inp = inputs();
        let mut want = vec![f32::NAN; inp.len()];
        tanh_slice(Isa::Portable, &mut want, &inp);
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; inp.len()];
            tanh_slice(isa, &mut got, &inp);
            let diff = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(diff.is_none(), "{isa:?} differs from portable at {diff:?}");
        }
    }
}
