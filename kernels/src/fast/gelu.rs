//! GELU (GPT-2's tanh form), vectorised and threaded. The same function as [`crate::cpu::gelu`], written as
//! `gelu(x) = x·σ(2u)` with `u = √(2/π)(x + 0.044715x³)` (since `½(1 + tanh u) = σ(2u)`), and
//! `gelu'(x) = σ(2u) + 2x·σ(2u)(1 − σ(2u))·u'`, with σ evaluated without cancellation on either side
//! (`σ(z) = 1/(1+e^{−z})` for `z ≥ 0`, `e^{z}/(1+e^{z})` below): within a few ulp everywhere, where
//! `½(1 + tanh u)` loses the tail to rounding (tested against the reference in f64).

use super::pool::{chunk_rows, for_chunks};
use super::vector::{exp, multiversion, Isa};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF: f32 = 0.044_715;

/// Elements per row of the partition (GELU is elementwise: rows are just chunks of the flat slice).
const ROW: usize = 1024;

/// `(σ(z), 1 − σ(z))` without cancellation.
#[inline(always)]
fn sigmoid_pair(z: f32) -> (f32, f32) {
    let e = exp(-z.abs());
    let inv = 1.0 / (1.0 + e);
    if z >= 0.0 {
        (inv, e * inv)
    } else {
        (e * inv, inv)
    }
}

multiversion! {
    /// `out = gelu(inp)` on one chunk.
    pub(crate) fn forward_chunk(out: &mut [f32], inp: &[f32]) {
        for (o, &x) in out.iter_mut().zip(inp) {
            let u = SQRT_2_OVER_PI * (GELU_COEF * x * x).mul_add(x, x);
            *o = x * sigmoid_pair(2.0 * u).0;
        }
    }
}

/// `gelu'(x)` = `σ(2u) + 2x·σ(2u)(1 − σ(2u))·u'`.
#[inline(always)]
fn grad(x: f32) -> f32 {
    let x2 = x * x;
    let u = SQRT_2_OVER_PI * (GELU_COEF * x2).mul_add(x, x);
    let du = SQRT_2_OVER_PI * (3.0 * GELU_COEF).mul_add(x2, 1.0);
    let (s, s1) = sigmoid_pair(2.0 * u);
    (2.0 * x * s * s1).mul_add(du, s)
}

multiversion! {
    /// `dinp += gelu'(inp) · dout` on one chunk.
    fn backward_chunk(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        for ((d, &x), &g) in dinp.iter_mut().zip(inp).zip(dout) {
            *d = grad(x).mul_add(g, *d);
        }
    }
}

multiversion! {
    /// `d = gelu'(inp) · d` on one chunk (as `backward_chunk` from a zeroed `dinp`, bit for bit).
    pub(crate) fn backward_in_place_chunk(d: &mut [f32], inp: &[f32]) {
        for (d, &x) in d.iter_mut().zip(inp) {
            *d = grad(x).mul_add(*d, 0.0);
        }
    }
}

/// Elements per chunk for `n` elements of `cost` work units each (shape only).
fn per_chunk(n: usize, cost: usize) -> usize {
    chunk_rows(n.div_ceil(ROW), ROW * cost, 1, 1) * ROW
}

/// `out = gelu(inp)` with instruction set `isa`.
pub fn gelu_forward_with(isa: Isa, out: &mut [f32], inp: &[f32]) {
    assert_eq!(inp.len(), out.len(), "gelu_forward: inp must have the length of out");
    for_chunks(out, per_chunk(inp.len(), 16), |start, o| {
        forward_chunk(isa, o, &inp[start..start + o.len()])
    });
}

/// `out = gelu(inp)`.
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    gelu_forward_with(Isa::best(), out, inp)
}

/// `dinp += gelu'(inp) · dout` with instruction set `isa`.
pub fn gelu_backward_with(isa: Isa, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    assert_eq!(inp.len(), dinp.len(), "gelu_backward: inp must have the length of dinp");
    assert_eq!(
        dout.len(),
        dinp.len(),
        "gelu_backward: dout must have the length of dinp"
    );
    for_chunks(dinp, per_chunk(inp.len(), 24), |start, d| {
        let end = start + d.len();
        backward_chunk(isa, d, &inp[start..end], &dout[start..end])
    });
}

/// `dinp += gelu'(inp) · dout`.
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    gelu_backward_with(Isa::best(), dinp, inp, dout)
}

/// `d = gelu'(inp) · d` in place with instruction set `isa`: bitwise [`gelu_backward_with`] into a zeroed buffer
/// with `dout = d`.
pub fn gelu_backward_in_place_with(isa: Isa, d: &mut [f32], inp: &[f32]) {
    assert_eq!(
        inp.len(),
        d.len(),
        "gelu_backward_in_place: inp must have the length of d"
    );
    for_chunks(d, per_chunk(inp.len(), 24), |start, d| {
        backward_in_place_chunk(isa, d, &inp[start..start + d.len()])
    });
}

/// `d = gelu'(inp) · d` in place.
pub fn gelu_backward_in_place(d: &mut [f32], inp: &[f32]) {
    gelu_backward_in_place_with(Isa::best(), d, inp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu;

    fn inputs(n: usize) -> Vec<f32> {
        let mut s = 0x1234_5678u64;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s % 20_001) as f32 - 10_000.0) * 6e-4
            })
            .collect()
    }

    #[test]
    fn matches_the_reference_and_every_isa_gives_the_same_bits() {
        let n = 70_001; // several chunks and a ragged end
        let inp = inputs(n);
        let dout = inputs(n).iter().rev().copied().collect::<Vec<_>>();
        // The reference, in f64: the fast f32 forms must be within a few ulp of the true function.
        let inp64: Vec<f64> = inp.iter().map(|&x| f64::from(x)).collect();
        let dout64: Vec<f64> = dout.iter().map(|&x| f64::from(x)).collect();
        let mut want = vec![0.0f64; n];
        cpu::gelu_forward(&mut want, &inp64);
        let mut want_d = vec![0.25f64; n];
        cpu::gelu_backward(&mut want_d, &inp64, &dout64);
        let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; n];
            gelu_forward_with(isa, &mut out, &inp);
            let mut d = vec![0.25f32; n];
            gelu_backward_with(isa, &mut d, &inp, &dout);
            for i in 0..n {
                // Rounding `u` to f32 moves σ(2u) by about |2u|·ulp relative: the conditioning of the f32 input.
                let x = inp64[i];
                let z = (2.0 * 0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).abs();
                let (o, w) = (f64::from(out[i]), want[i]);
                assert!(
                    (o - w).abs() <= 3e-7 * (2.0 + z) * w.abs() + 1e-35,
                    "{isa:?} gelu({x}) = {o} vs {w}"
                );
                let (g, w) = (f64::from(d[i]), want_d[i]);
                let scale = w.abs() + 0.25 + dout64[i].abs();
                assert!(
                    (g - w).abs() <= 3e-7 * (2.0 + z) * scale,
                    "{isa:?} gelu'({x}): {g} vs {w}"
                );
            }
            // In place (the fused MLP backward's form) is bitwise the accumulation into zeros.
            let mut in_place = dout.clone();
            gelu_backward_in_place_with(isa, &mut in_place, &inp);
            let mut from_zero = vec![0.0f32; n];
            gelu_backward_with(isa, &mut from_zero, &inp, &dout);
            assert!(
                in_place.iter().zip(&from_zero).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} in place"
            );
            match &first {
                None => first = Some((out, d)),
                Some((o0, d0)) => {
                    assert!(
                        o0.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} forward bits"
                    );
                    assert!(
                        d0.iter().zip(&d).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} backward bits"
                    );
                }
            }
        }
    }
}
