//! Layer normalization over the last axis.

use super::Float;

/// The epsilon added to the variance (GPT-2 / PyTorch default).
pub const LAYERNORM_EPS: f64 = 1e-5;

fn check_stats<T>(mean: &[T], rstd: &[T], n: usize, op: &str) {
    assert_eq!(mean.len(), n, "{op}: mean must have n elements");
    assert_eq!(rstd.len(), n, "{op}: rstd must have n elements");
}

/// `out[i, :] = (inp[i, :] - mean_i) * rstd_i * weight + bias`, with `rstd_i = 1 / sqrt(var_i + eps)` and the
/// biased variance; stashes `mean_i` and `rstd_i` for the backward.
///
/// Shapes: `out`, `inp` (N, C); `mean`, `rstd` (N); `weight`, `bias` (C).
#[inline(always)]
pub fn layernorm_forward<T: Float>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: &[T],
    n: usize,
    c: usize,
) {
    assert!(c > 0, "layernorm_forward: c must be positive");
    assert_eq!(out.len(), n * c, "layernorm_forward: out must have n*c elements");
    assert_eq!(inp.len(), n * c, "layernorm_forward: inp must have n*c elements");
    assert_eq!(weight.len(), c, "layernorm_forward: weight must have c elements");
    assert_eq!(bias.len(), c, "layernorm_forward: bias must have c elements");
    check_stats(mean, rstd, n, "layernorm_forward");
    let cf = T::of_usize(c);
    let eps = T::of_f64(LAYERNORM_EPS);
    for (i, (x, o)) in inp.chunks_exact(c).zip(out.chunks_exact_mut(c)).enumerate() {
        let m = x.iter().fold(T::zero(), |s, &v| s + v) / cf;
        let var = x.iter().fold(T::zero(), |s, &v| s + (v - m) * (v - m)) / cf;
        let r = T::one() / (var + eps).sqrt();
        for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(weight).zip(bias) {
            *o = (v - m) * r * w + b;
        }
        mean[i] = m;
        rstd[i] = r;
    }
}

/// Backward of [`layernorm_forward`] with respect to its input: accumulates into `dinp`
/// `rstd * (g - mean(g) - xhat * mean(g * xhat))` per row, where `g = dout * weight` and `xhat` is the
/// normalized input.
///
/// Shapes: `dinp`, `dout`, `inp` (N, C); `weight` (C); `mean`, `rstd` (N) from the forward.
#[inline(always)]
pub fn layernorm_backward_input<T: Float>(
    dinp: &mut [T],
    dout: &[T],
    inp: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    n: usize,
    c: usize,
) {
    assert!(c > 0, "layernorm_backward_input: c must be positive");
    assert_eq!(
        dinp.len(),
        n * c,
        "layernorm_backward_input: dinp must have n*c elements"
    );
    assert_eq!(
        dout.len(),
        n * c,
        "layernorm_backward_input: dout must have n*c elements"
    );
    assert_eq!(inp.len(), n * c, "layernorm_backward_input: inp must have n*c elements");
    assert_eq!(weight.len(), c, "layernorm_backward_input: weight must have c elements");
    check_stats(mean, rstd, n, "layernorm_backward_input");
    let cf = T::of_usize(c);
    for i in 0..n {
        let (x, d, di) = (
            &inp[i * c..(i + 1) * c],
            &dout[i * c..(i + 1) * c],
            &mut dinp[i * c..(i + 1) * c],
        );
        let (m, r) = (mean[i], rstd[i]);
        // Two reductions over the row: mean(g) and mean(g * xhat).
        let (mut g_mean, mut gx_mean) = (T::zero(), T::zero());
        for ((&v, &dv), &w) in x.iter().zip(d).zip(weight) {
            let g = dv * w;
            g_mean += g;
            gx_mean += g * (v - m) * r;
        }
        g_mean /= cf;
        gx_mean /= cf;
        for (((o, &v), &dv), &w) in di.iter_mut().zip(x).zip(d).zip(weight) {
            *o += (dv * w - g_mean - (v - m) * r * gx_mean) * r;
        }
    }
}

/// Backward of [`layernorm_forward`] with respect to its parameters: accumulates
/// `sum_i dout[i, :] * xhat[i, :]` into `dweight` and `sum_i dout[i, :]` into `dbias`.
///
/// Shapes: `dweight`, `dbias` (C); `dout`, `inp` (N, C); `mean`, `rstd` (N) from the forward.
#[inline(always)]
pub fn layernorm_backward_weight<T: Float>(
    dweight: &mut [T],
    dbias: &mut [T],
    dout: &[T],
    inp: &[T],
    mean: &[T],
    rstd: &[T],
    n: usize,
    c: usize,
) {
    assert!(c > 0, "layernorm_backward_weight: c must be positive");
    assert_eq!(
        dweight.len(),
        c,
        "layernorm_backward_weight: dweight must have c elements"
    );
    assert_eq!(dbias.len(), c, "layernorm_backward_weight: dbias must have c elements");
    assert_eq!(
        dout.len(),
        n * c,
        "layernorm_backward_weight: dout must have n*c elements"
    );
    assert_eq!(
        inp.len(),
        n * c,
        "layernorm_backward_weight: inp must have n*c elements"
    );
    check_stats(mean, rstd, n, "layernorm_backward_weight");
    for i in 0..n {
        let (x, d) = (&inp[i * c..(i + 1) * c], &dout[i * c..(i + 1) * c]);
        for (((dw, db), &v), &dv) in dweight.iter_mut().zip(dbias.iter_mut()).zip(x).zip(d) {
            *dw += dv * (v - mean[i]) * rstd[i];
            *db += dv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_op, OpCase, Rng};
    use super::*;

    struct Case {
        n: usize,
        c: usize,
    }

    impl OpCase for Case {
        fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, g: &mut [Vec<T>]) -> Vec<T> {
            let (n, c) = (self.n, self.c);
            let (mut out, mut mean, mut rstd) = (vec![T::zero(); n * c], vec![T::zero(); n], vec![T::zero(); n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, &x[0], &x[1], &x[2], n, c);
            if let Some(dout) = dout {
                let (gi, gw) = g.split_at_mut(1);
                let (gw, gb) = gw.split_at_mut(1);
                layernorm_backward_input(&mut gi[0], dout, &x[0], &x[1], &mean, &rstd, n, c);
                layernorm_backward_weight(&mut gw[0], &mut gb[0], dout, &x[0], &mean, &rstd, n, c);
            }
            out
        }
    }

    #[test]
    fn gradients() {
        for (n, c) in [(10, 8), (6, 13)] {
            let mut rng = Rng::new(7 + c as u64);
            let x = [rng.vec(n * c), rng.vec(c), rng.vec(c)];
            check_op(&format!("layernorm n={n} c={c}"), &Case { n, c }, &x, &[0, 1, 2], 1e-5);
        }
    }

    #[test]
    fn normalizes_rows() {
        let (n, c) = (4, 9);
        let mut rng = Rng::new(2);
        let inp: Vec<f64> = rng.vec(n * c).iter().map(|v| 3.0 * v + 5.0).collect();
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &[1.0; 9], &[0.0; 9], n, c);
        for (i, row) in out.chunks(c).enumerate() {
            let m = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
            assert!(m.abs() < 1e-12, "row {i}: mean {m}");
            // var(out) = var / (var + eps), slightly below 1.
            assert!((var - 1.0).abs() < 1e-4, "row {i}: variance {var}");
            let in_mean = inp[i * c..(i + 1) * c].iter().sum::<f64>() / c as f64;
            assert!((mean[i] - in_mean).abs() < 1e-12);
        }
    }

    #[test]
    #[should_panic(expected = "layernorm_forward: weight")]
    fn rejects_wrong_weight_length() {
        let (mut out, mut mean, mut rstd) = ([0.0f32; 6], [0.0f32; 2], [0.0f32; 2]);
        layernorm_forward(&mut out, &mut mean, &mut rstd, &[0.0; 6], &[1.0; 2], &[0.0; 3], 2, 3);
    }
}
