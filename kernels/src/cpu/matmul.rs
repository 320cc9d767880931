//! Fully connected layer, llm.c layout: `out = inp @ weight^T + bias` with `weight` (OC, C).

use super::Float;

fn check_shapes(inp_len: usize, weight_len: usize, n: usize, c: usize, oc: usize, op: &str, inp_name: &str) {
    assert_eq!(inp_len, n * c, "{op}: {inp_name} must have n*c elements");
    assert_eq!(weight_len, oc * c, "{op}: weight must have oc*c elements");
}

/// `out = inp @ weight^T + bias`.
///
/// Shapes: `out` (N, OC), `inp` (N, C), `weight` (OC, C), `bias` (OC) if present.
pub fn matmul_forward<T: Float>(
    out: &mut [T],
    inp: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    n: usize,
    c: usize,
    oc: usize,
) {
    check_shapes(inp.len(), weight.len(), n, c, oc, "matmul_forward", "inp");
    assert_eq!(out.len(), n * oc, "matmul_forward: out must have n*oc elements");
    let beta = match bias {
        Some(bias) => {
            assert_eq!(bias.len(), oc, "matmul_forward: bias must have oc elements");
            for i in 0..n {
                out[i * oc..(i + 1) * oc].copy_from_slice(bias);
            }
            T::one()
        }
        None => T::zero(),
    };
    // weight^T is the (C, OC) matrix with row stride 1 and column stride C.
    T::gemm(n, c, oc, T::one(), inp, c, 1, weight, 1, c, beta, out, oc, 1);
}

/// Backward of [`matmul_forward`] with respect to its input: accumulates `dout @ weight` into `dinp`.
///
/// Shapes: `dinp` (N, C), `dout` (N, OC), `weight` (OC, C).
pub fn matmul_backward_input<T: Float>(dinp: &mut [T], dout: &[T], weight: &[T], n: usize, c: usize, oc: usize) {
    check_shapes(dinp.len(), weight.len(), n, c, oc, "matmul_backward_input", "dinp");
    assert_eq!(
        dout.len(),
        n * oc,
        "matmul_backward_input: dout must have n*oc elements"
    );
    T::gemm(n, oc, c, T::one(), dout, oc, 1, weight, c, 1, T::one(), dinp, c, 1);
}

/// Backward of [`matmul_forward`] with respect to its parameters: accumulates `dout^T @ inp` into `dweight`
/// and, if given, the column sums of `dout` into `dbias`.
///
/// Shapes: `dweight` (OC, C), `dbias` (OC), `dout` (N, OC), `inp` (N, C).
pub fn matmul_backward_weight<T: Float>(
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
    dout: &[T],
    inp: &[T],
    n: usize,
    c: usize,
    oc: usize,
) {
    check_shapes(inp.len(), dweight.len(), n, c, oc, "matmul_backward_weight", "inp");
    assert_eq!(
        dout.len(),
        n * oc,
        "matmul_backward_weight: dout must have n*oc elements"
    );
    // dout^T is the (OC, N) matrix with row stride 1 and column stride OC.
    T::gemm(oc, n, c, T::one(), dout, 1, oc, inp, c, 1, T::one(), dweight, c, 1);
    if let Some(dbias) = dbias {
        assert_eq!(dbias.len(), oc, "matmul_backward_weight: dbias must have oc elements");
        for i in 0..n {
            for (db, &d) in dbias.iter_mut().zip(&dout[i * oc..(i + 1) * oc]) {
                *db += d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_rel_close, check_op, OpCase, Rng};
    use super::*;

    struct Case {
        n: usize,
        c: usize,
        oc: usize,
        bias: bool,
    }

    impl OpCase for Case {
        fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, g: &mut [Vec<T>]) -> Vec<T> {
            let (n, c, oc) = (self.n, self.c, self.oc);
            let mut out = vec![T::zero(); n * oc];
            matmul_forward(&mut out, &x[0], &x[1], self.bias.then_some(&x[2][..]), n, c, oc);
            if let Some(dout) = dout {
                let (gi, gw) = g.split_at_mut(1);
                let (gw, gb) = gw.split_at_mut(1);
                matmul_backward_input(&mut gi[0], dout, &x[1], n, c, oc);
                matmul_backward_weight(&mut gw[0], self.bias.then_some(&mut gb[0][..]), dout, &x[0], n, c, oc);
            }
            out
        }
    }

    #[test]
    fn gradients() {
        for (n, c, oc, bias) in [(10, 8, 24, true), (6, 7, 5, false), (9, 13, 11, true), (1, 3, 1, true)] {
            let mut rng = Rng::new((n * 100 + c * 10 + oc) as u64);
            let x = [rng.vec(n * c), rng.vec(oc * c), rng.vec(oc)];
            let diff: &[usize] = if bias { &[0, 1, 2] } else { &[0, 1] };
            check_op(
                &format!("matmul n={n} c={c} oc={oc} bias={bias}"),
                &Case { n, c, oc, bias },
                &x,
                diff,
                1e-5,
            );
        }
    }

    #[test]
    fn forward_matches_naive() {
        let (n, c, oc) = (5, 7, 3);
        let mut rng = Rng::new(9);
        let (inp, w, b) = (rng.vec(n * c), rng.vec(oc * c), rng.vec(oc));
        let mut out = vec![f64::NAN; n * oc]; // overwritten, never read
        matmul_forward(&mut out, &inp, &w, Some(&b), n, c, oc);
        let want: Vec<f64> = (0..n * oc)
            .map(|i| b[i % oc] + (0..c).map(|k| inp[i / oc * c + k] * w[i % oc * c + k]).sum::<f64>())
            .collect();
        assert_rel_close("matmul forward", &out, &want, 1e-14);
        matmul_forward(&mut out, &inp, &w, None, n, c, oc);
        let want: Vec<f64> = want.iter().enumerate().map(|(i, v)| v - b[i % oc]).collect();
        assert_rel_close("matmul forward without bias", &out, &want, 1e-14);
    }

    #[test]
    #[should_panic(expected = "matmul_forward: weight")]
    fn rejects_wrong_weight_length() {
        let mut out = [0.0f32; 4];
        matmul_forward(&mut out, &[0.0; 6], &[0.0; 5], None, 2, 3, 2);
    }
}
