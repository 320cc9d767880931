//! Causal multi-head self-attention.
//!
//! `qkv` (B, T, 3C) holds `[q | k | v]` along its last axis, each of width C = NH * HS; head `h` uses
//! channels `h*HS..(h+1)*HS` of each. Per batch row and head, with `scale = 1/sqrt(HS)`:
//! `att = softmax_causal(scale * Q K^T)` (T, T) and `out_h = att @ V` (T, HS).

use super::Float;

fn check_shapes(qkv_len: usize, att_len: usize, b: usize, t: usize, c: usize, nh: usize, op: &str) -> usize {
    assert!(
        nh > 0 && c % nh == 0,
        "{op}: c ({c}) must be a positive multiple of nh ({nh})"
    );
    assert_eq!(qkv_len, b * t * 3 * c, "{op}: qkv must have b*t*3c elements");
    assert_eq!(att_len, b * nh * t * t, "{op}: att must have b*nh*t*t elements");
    c / nh
}

/// Forward: writes `out` (B, T, C) and the attention probabilities `att` (B, NH, T, T), stashed for the
/// backward; `att[b, h, t1, t2]` is 0 for `t2 > t1`.
///
/// Shapes: `out` (B, T, C), `att` (B, NH, T, T), `qkv` (B, T, 3C); `c` must be a multiple of `nh`.
pub fn attention_forward<T: Float>(out: &mut [T], att: &mut [T], qkv: &[T], b: usize, t: usize, c: usize, nh: usize) {
    let hs = check_shapes(qkv.len(), att.len(), b, t, c, nh, "attention_forward");
    assert_eq!(out.len(), b * t * c, "attention_forward: out must have b*t*c elements");
    if t == 0 {
        return;
    }
    let scale = T::one() / T::of_usize(hs).sqrt();
    let (c3, zero) = (3 * c, T::zero());
    for bi in 0..b {
        let x = &qkv[bi * t * c3..(bi + 1) * t * c3];
        for h in 0..nh {
            let (q, k, v) = (&x[h * hs..], &x[c + h * hs..], &x[2 * c + h * hs..]);
            let a = &mut att[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
            // Scores scale * Q K^T (the entries above the diagonal are computed and then discarded).
            T::gemm(t, hs, t, scale, q, c3, 1, k, 1, c3, zero, a, t, 1);
            for (t1, row) in a.chunks_exact_mut(t).enumerate() {
                let (past, future) = row.split_at_mut(t1 + 1);
                let max = past.iter().fold(T::neg_infinity(), |m, &s| m.max(s));
                let mut sum = zero;
                for s in past.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = T::one() / sum;
                for s in past.iter_mut() {
                    *s *= inv;
                }
                future.fill(zero);
            }
            let o = &mut out[bi * t * c + h * hs..];
            T::gemm(t, t, hs, T::one(), a, t, 1, v, c3, 1, zero, o, c, 1);
        }
    }
}

/// Backward of [`attention_forward`]: accumulates the gradients of `q`, `k` and `v` into `dqkv`, using the
/// probabilities `att` stashed by the forward. Allocates one (T, T) scratch matrix.
///
/// Shapes: `dqkv`, `qkv` (B, T, 3C), `dout` (B, T, C), `att` (B, NH, T, T).
pub fn attention_backward<T: Float>(
    dqkv: &mut [T],
    dout: &[T],
    qkv: &[T],
    att: &[T],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    let hs = check_shapes(qkv.len(), att.len(), b, t, c, nh, "attention_backward");
    assert_eq!(
        dqkv.len(),
        qkv.len(),
        "attention_backward: dqkv must have b*t*3c elements"
    );
    assert_eq!(
        dout.len(),
        b * t * c,
        "attention_backward: dout must have b*t*c elements"
    );
    if t == 0 {
        return;
    }
    let scale = T::one() / T::of_usize(hs).sqrt();
    let (c3, zero, one) = (3 * c, T::zero(), T::one());
    let mut dpre = vec![zero; t * t];
    for bi in 0..b {
        let x = &qkv[bi * t * c3..(bi + 1) * t * c3];
        let dx = &mut dqkv[bi * t * c3..(bi + 1) * t * c3];
        for h in 0..nh {
            let (q, k, v) = (&x[h * hs..], &x[c + h * hs..], &x[2 * c + h * hs..]);
            let a = &att[(bi * nh + h) * t * t..(bi * nh + h + 1) * t * t];
            let d = &dout[bi * t * c + h * hs..];
            // datt = dout_h @ V^T, and dV += att^T @ dout_h.
            T::gemm(t, hs, t, one, d, c, 1, v, 1, c3, zero, &mut dpre, t, 1);
            T::gemm(t, t, hs, one, a, 1, t, d, c, 1, one, &mut dx[2 * c + h * hs..], c3, 1);
            // Softmax backward in place: dpre = att * (datt - sum(att * datt)) on the causal part.
            for (t1, (drow, arow)) in dpre.chunks_exact_mut(t).zip(a.chunks_exact(t)).enumerate() {
                let dot = (0..=t1).fold(zero, |s, t2| s + arow[t2] * drow[t2]);
                for t2 in 0..=t1 {
                    drow[t2] = arow[t2] * (drow[t2] - dot);
                }
                drow[t1 + 1..].fill(zero);
            }
            // dQ += scale * dpre @ K, and dK += scale * dpre^T @ Q.
            T::gemm(t, t, hs, scale, &dpre, t, 1, k, c3, 1, one, &mut dx[h * hs..], c3, 1);
            T::gemm(
                t,
                t,
                hs,
                scale,
                &dpre,
                1,
                t,
                q,
                c3,
                1,
                one,
                &mut dx[c + h * hs..],
                c3,
                1,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_op, OpCase, Rng};
    use super::*;

    struct Case {
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    }

    impl OpCase for Case {
        fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, g: &mut [Vec<T>]) -> Vec<T> {
            let (b, t, c, nh) = (self.b, self.t, self.c, self.nh);
            let (mut out, mut att) = (vec![T::zero(); b * t * c], vec![T::zero(); b * nh * t * t]);
            attention_forward(&mut out, &mut att, &x[0], b, t, c, nh);
            if let Some(dout) = dout {
                attention_backward(&mut g[0], dout, &x[0], &att, b, t, c, nh);
            }
            out
        }
    }

    #[test]
    fn gradients() {
        for (b, t, c, nh) in [(2, 5, 8, 2), (1, 7, 9, 3), (2, 1, 4, 1)] {
            let mut rng = Rng::new((b * 1000 + t * 100 + c) as u64);
            let qkv: Vec<f64> = rng.vec(b * t * 3 * c).iter().map(|v| 2.0 * v).collect();
            check_op(
                &format!("attention b={b} t={t} c={c} nh={nh}"),
                &Case { b, t, c, nh },
                &[qkv],
                &[0],
                1e-5,
            );
        }
    }

    #[test]
    fn is_causal_and_normalized() {
        let (b, t, c, nh) = (2, 5, 8, 2);
        let mut rng = Rng::new(4);
        let qkv = rng.vec(b * t * 3 * c);
        let (mut out, mut att) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        attention_forward(&mut out, &mut att, &qkv, b, t, c, nh);
        for (r, row) in att.chunks(t).enumerate() {
            let t1 = r % t;
            assert!(
                (row.iter().sum::<f64>() - 1.0).abs() < 1e-14,
                "att row {r} does not sum to 1"
            );
            assert!(row[t1 + 1..].iter().all(|&p| p == 0.0) && row[..=t1].iter().all(|&p| p > 0.0));
        }
        // Changing the key and value of the last position of batch row 0 leaves earlier outputs unchanged.
        let mut qkv2 = qkv.clone();
        for ch in c..3 * c {
            qkv2[(t - 1) * 3 * c + ch] += 10.0;
        }
        let (mut out2, mut att2) = (vec![0.0; b * t * c], vec![0.0; b * nh * t * t]);
        attention_forward(&mut out2, &mut att2, &qkv2, b, t, c, nh);
        assert_eq!(
            out[..(t - 1) * c],
            out2[..(t - 1) * c],
            "earlier positions saw the future"
        );
        assert_ne!(
            out[(t - 1) * c..t * c],
            out2[(t - 1) * c..t * c],
            "the last position must change"
        );
        assert_eq!(out[t * c..], out2[t * c..], "the other batch row changed");
    }

    #[test]
    fn single_position_copies_value() {
        // With t = 1 the only probability is 1, so out = v.
        let qkv = [0.3f32, -0.2, 1.5, 2.0, 7.0, -8.0];
        let (mut out, mut att) = ([0.0f32; 2], [0.0f32; 2]);
        attention_forward(&mut out, &mut att, &qkv, 1, 1, 2, 2);
        assert_eq!((out, att), ([7.0, -8.0], [1.0, 1.0]));
    }

    #[test]
    #[should_panic(expected = "attention_forward: c (8) must be a positive multiple of nh (3)")]
    fn rejects_indivisible_heads() {
        let (mut out, mut att) = ([0.0f32; 8], [0.0f32; 3]);
        attention_forward(&mut out, &mut att, &[0.0; 24], 1, 1, 8, 3);
    }
}
