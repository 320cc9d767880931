//! GELU activation, GPT-2's tanh approximation.

use super::Float;

/// `sqrt(2 / pi)`.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_COEF: f64 = 0.044715;

/// `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`.
pub fn gelu_scalar<T: Float>(x: T) -> T {
    let half = T::of_f64(0.5);
    let u = T::of_f64(SQRT_2_OVER_PI) * (x + T::of_f64(GELU_COEF) * x * x * x);
    half * x * (T::one() + u.tanh())
}

/// Derivative of [`gelu_scalar`] with respect to `x`.
pub fn gelu_grad_scalar<T: Float>(x: T) -> T {
    let half = T::of_f64(0.5);
    let s = T::of_f64(SQRT_2_OVER_PI);
    let k = T::of_f64(GELU_COEF);
    let th = (s * (x + k * x * x * x)).tanh();
    let du = s * (T::one() + T::of_f64(3.0) * k * x * x);
    half * (T::one() + th) + half * x * (T::one() - th * th) * du
}

/// `out = gelu(inp)`, elementwise; both slices have the same length (any shape).
pub fn gelu_forward<T: Float>(out: &mut [T], inp: &[T]) {
    assert_eq!(inp.len(), out.len(), "gelu_forward: inp must have the length of out");
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = gelu_scalar(x);
    }
}

/// Backward of [`gelu_forward`]: accumulates `gelu'(inp) * dout` into `dinp` (all the same length).
pub fn gelu_backward<T: Float>(dinp: &mut [T], inp: &[T], dout: &[T]) {
    assert_eq!(inp.len(), dinp.len(), "gelu_backward: inp must have the length of dinp");
    assert_eq!(
        dout.len(),
        dinp.len(),
        "gelu_backward: dout must have the length of dinp"
    );
    for ((d, &x), &g) in dinp.iter_mut().zip(inp).zip(dout) {
        *d += gelu_grad_scalar(x) * g;
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
            gelu_forward(&mut out, &x[0]);
            if let Some(dout) = dout {
                gelu_backward(&mut g[0], &x[0], dout);
            }
            out
        }
    }

    #[test]
    fn gradients() {
        let mut rng = Rng::new(3);
        let x: Vec<f64> = rng.vec(70).iter().map(|v| 4.0 * v).collect(); // covers the tails too
        check_op("gelu", &Case, &[x], &[0], 1e-6);
    }

    #[test]
    fn known_values() {
        assert_eq!(gelu_scalar(0.0f64), 0.0);
        // PyTorch: gelu(1.0, approximate="tanh") = 0.8411919906082768
        assert!((gelu_scalar(1.0f64) - 0.841_191_990_608_276_8).abs() < 1e-15);
        assert!((gelu_scalar(-10.0f64)).abs() < 1e-15 && (gelu_scalar(10.0f64) - 10.0).abs() < 1e-15);
    }
}
