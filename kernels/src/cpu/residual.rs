//! Residual connection (elementwise sum).

use super::Float;

/// `out = a + b`, elementwise; all three slices have the same length.
#[inline(always)]
pub fn residual_forward<T: Float>(out: &mut [T], a: &[T], b: &[T]) {
    assert_eq!(a.len(), out.len(), "residual_forward: a must have the length of out");
    assert_eq!(b.len(), out.len(), "residual_forward: b must have the length of out");
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// Backward of [`residual_forward`]: accumulates `dout` into both `da` and `db` (all the same length).
pub fn residual_backward<T: Float>(da: &mut [T], db: &mut [T], dout: &[T]) {
    assert_eq!(
        da.len(),
        dout.len(),
        "residual_backward: da must have the length of dout"
    );
    assert_eq!(
        db.len(),
        dout.len(),
        "residual_backward: db must have the length of dout"
    );
    for ((x, y), &d) in da.iter_mut().zip(db.iter_mut()).zip(dout) {
        *x += d;
        *y += d;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{check_op, OpCase, Rng};
    use super::*;

    struct Case;

    impl OpCase for Case {
        fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, g: &mut [Vec<T>]) -> Vec<T> {
            let mut out = vec![T::zero(); x[0].len()];
            residual_forward(&mut out, &x[0], &x[1]);
            if let Some(dout) = dout {
                let (da, db) = g.split_at_mut(1);
                residual_backward(&mut da[0], &mut db[0], dout);
            }
            out
        }
    }

    #[test]
    fn gradients() {
        let mut rng = Rng::new(5);
        check_op(
            "residual",
            &Case,
            &[rng.vec(2 * 5 * 7), rng.vec(2 * 5 * 7)],
            &[0, 1],
            1e-6,
        );
    }
}
