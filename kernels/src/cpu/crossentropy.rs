//! Fused softmax + cross-entropy over the vocabulary.

use super::Float;

fn check_shapes<T>(logits: &[T], targets: &[u32], n: usize, v: usize, op: &str) {
    assert!(v > 0, "{op}: v must be positive");
    assert_eq!(logits.len(), n * v, "{op}: logits must have n*v elements");
    assert_eq!(targets.len(), n, "{op}: targets must have n elements");
    if let Some((i, &tgt)) = targets.iter().enumerate().find(|&(_, &tgt)| tgt as usize >= v) {
        panic!("{op}: target {tgt} of row {i} is out of the vocabulary ({v})");
    }
}

/// Returns the row's maximum and `sum_j exp(row[j] - max)`.
fn max_and_sum_exp<T: Float>(row: &[T]) -> (T, T) {
    let max = row.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
    (max, row.iter().fold(T::zero(), |s, &x| s + (x - max).exp()))
}

/// `losses[i] = logsumexp(logits[i, :]) - logits[i, targets[i]]`, computed with the row maximum subtracted.
///
/// Shapes: `losses` (N), `logits` (N, V), `targets` (N) with every target `< V`.
pub fn softmax_cross_entropy_forward<T: Float>(losses: &mut [T], logits: &[T], targets: &[u32], n: usize, v: usize) {
    check_shapes(logits, targets, n, v, "softmax_cross_entropy_forward");
    assert_eq!(
        losses.len(),
        n,
        "softmax_cross_entropy_forward: losses must have n elements"
    );
    for ((loss, row), &tgt) in losses.iter_mut().zip(logits.chunks_exact(v)).zip(targets) {
        let (max, sum) = max_and_sum_exp(row);
        // logsumexp - x[tgt] = ln(sum) - (x[tgt] - max): no cancellation between large terms.
        *loss = sum.ln() - (row[tgt as usize] - max);
    }
}

/// Backward of [`softmax_cross_entropy_forward`], recomputing the softmax from `logits`: accumulates
/// `dlosses[i] * (softmax(logits[i, :])[j] - [j == targets[i]])` into `dlogits[i, j]`.
///
/// Shapes: `dlogits`, `logits` (N, V), `targets`, `dlosses` (N).
pub fn softmax_cross_entropy_backward<T: Float>(
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    dlosses: &[T],
    n: usize,
    v: usize,
) {
    check_shapes(logits, targets, n, v, "softmax_cross_entropy_backward");
    assert_eq!(
        dlogits.len(),
        n * v,
        "softmax_cross_entropy_backward: dlogits must have n*v elements"
    );
    assert_eq!(
        dlosses.len(),
        n,
        "softmax_cross_entropy_backward: dlosses must have n elements"
    );
    for (i, (drow, row)) in dlogits.chunks_exact_mut(v).zip(logits.chunks_exact(v)).enumerate() {
        let (max, sum) = max_and_sum_exp(row);
        let (inv, dl, tgt) = (T::one() / sum, dlosses[i], targets[i] as usize);
        for (j, (d, &x)) in drow.iter_mut().zip(row).enumerate() {
            let p = (x - max).exp() * inv;
            let indicator = if j == tgt { T::one() } else { T::zero() };
            *d += dl * (p - indicator);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_op, OpCase, Rng};
    use super::*;

    struct Case {
        targets: Vec<u32>,
        n: usize,
        v: usize,
    }

    impl OpCase for Case {
        fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, g: &mut [Vec<T>]) -> Vec<T> {
            let mut losses = vec![T::zero(); self.n];
            softmax_cross_entropy_forward(&mut losses, &x[0], &self.targets, self.n, self.v);
            if let Some(dout) = dout {
                softmax_cross_entropy_backward(&mut g[0], &x[0], &self.targets, dout, self.n, self.v);
            }
            losses
        }
    }

    #[test]
    fn gradients() {
        for (n, v) in [(10, 11), (3, 2), (4, 1)] {
            let mut rng = Rng::new((n * 100 + v) as u64);
            let logits: Vec<f64> = rng.vec(n * v).iter().map(|x| 3.0 * x).collect();
            let case = Case {
                targets: rng.ints(n, v as u32),
                n,
                v,
            };
            if v == 1 {
                // A single class: the loss is identically 0 and so is its gradient (nothing to check by FD).
                let mut losses = [1.0f64; 4];
                softmax_cross_entropy_forward(&mut losses, &logits, &case.targets, n, v);
                assert_eq!(losses, [0.0; 4]);
                continue;
            }
            check_op(&format!("cross-entropy n={n} v={v}"), &case, &[logits], &[0], 1e-5);
        }
    }

    #[test]
    fn uniform_logits_give_ln_v() {
        let (n, v) = (3, 11);
        let mut losses = [0.0f64; 3];
        softmax_cross_entropy_forward(&mut losses, &vec![0.7; n * v], &[0, 5, 10], n, v);
        for l in losses {
            assert!((l - (v as f64).ln()).abs() < 1e-14, "loss {l}");
        }
    }

    #[test]
    fn stable_for_large_logits() {
        let mut losses = [0.0f32; 1];
        softmax_cross_entropy_forward(&mut losses, &[1000.0, 0.0, 1000.0], &[0], 1, 3);
        assert!((losses[0] - std::f32::consts::LN_2).abs() < 1e-6, "loss {}", losses[0]);
    }

    #[test]
    #[should_panic(expected = "softmax_cross_entropy_forward: target 3 of row 1")]
    fn rejects_out_of_vocabulary_target() {
        let mut losses = [0.0f32; 2];
        softmax_cross_entropy_forward(&mut losses, &[0.0; 6], &[0, 3], 2, 3);
    }
}
