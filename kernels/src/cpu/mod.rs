//! CPU reference ops of a GPT-2 model, each with a forward and a backward.
//!
//! Conventions shared by every op:
//! - Tensors are flat row-major slices; shapes are named `b` (batch), `t` (sequence), `c` (channels),
//!   `oc` (out channels), `nh` (heads), `v` (vocabulary) and `n` (rows, usually `b * t`).
//! - Forward functions overwrite their outputs. Backward functions **accumulate** (`+=`) into their gradient
//!   outputs; the caller zeroes them.
//! - Slice lengths are preconditions checked with `assert!` (a violation is a programming error).
//! - Everything is single-threaded with fixed loop orders, so results are bitwise reproducible on a machine.
//! - Matrix products go through [`Float::gemm`] (the `matrixmultiply` crate, without threading).

mod adamw;
mod attention;
mod crossentropy;
mod embedding;
mod gelu;
mod layernorm;
mod matmul;
mod residual;
#[cfg(test)]
mod testutil;

pub use adamw::{adamw_step, AdamW};
pub use attention::{attention_backward, attention_forward};
pub use crossentropy::{softmax_cross_entropy_backward, softmax_cross_entropy_forward};
pub use embedding::{embedding_backward, embedding_forward};
pub use gelu::{gelu_backward, gelu_forward, gelu_grad_scalar, gelu_scalar};
pub use layernorm::{layernorm_backward_input, layernorm_backward_weight, layernorm_forward, LAYERNORM_EPS};
pub use matmul::{matmul_backward_input, matmul_backward_weight, matmul_forward};
pub use residual::{residual_backward, residual_forward};

use std::fmt::Debug;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// The element type of the CPU ops: implemented for `f32` (training) and `f64` (gradient checks) only.
pub trait Float:
    num_traits::Float
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Default
    + Debug
    + Send
    + Sync
    + 'static
    + sealed::Sealed
{
    /// Converts an `f64` constant to this type (rounding to nearest for `f32`).
    fn of_f64(x: f64) -> Self;

    /// Converts a count (a dimension) to this type.
    fn of_usize(x: usize) -> Self;

    /// General matrix product `C = alpha * A @ B + beta * C` with `A` (m, k), `B` (k, n), `C` (m, n).
    ///
    /// Each matrix is given by its slice (starting at element (0, 0)) and its row and column strides, so
    /// transposes are expressed by swapping strides. When `beta` is zero, `C` is overwritten without being
    /// read. Panics if a matrix does not fit in its slice or if the strides of `C` could alias elements.
    #[allow(clippy::too_many_arguments)] // BLAS signature: three dims, two scalars, three strided matrices.
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        rsa: usize,
        csa: usize,
        b: &[Self],
        rsb: usize,
        csb: usize,
        beta: Self,
        c: &mut [Self],
        rsc: usize,
        csc: usize,
    );
}

/// Number of elements spanned by a (rows, cols) matrix with the given strides (0 when it is empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
        .and_then(|e| e.checked_add(1))
        .unwrap_or(usize::MAX)
}

/// Whether the strides place the elements of an (m, n) matrix at distinct offsets (a sufficient test:
/// row-major-like or column-major-like layouts).
fn non_aliasing(m: usize, n: usize, rs: usize, cs: usize) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    match (m == 1, n == 1) {
        (true, true) => true,
        (true, false) => cs >= 1,
        (false, true) => rs >= 1,
        (false, false) => (cs >= 1 && rs >= n.saturating_mul(cs)) || (rs >= 1 && cs >= m.saturating_mul(rs)),
    }
}

/// Checks the [`Float::gemm`] preconditions that make the raw-pointer call sound; returns the strides as
/// `isize` (all lengths of live slices fit in `isize`, and unused strides are clamped to 0).
fn check_gemm(
    (m, k, n): (usize, usize, usize),
    (a_len, rsa, csa): (usize, usize, usize),
    (b_len, rsb, csb): (usize, usize, usize),
    (c_len, rsc, csc): (usize, usize, usize),
) -> [isize; 6] {
    assert!(
        extent(m, k, rsa, csa) <= a_len,
        "gemm: A ({m}x{k}, strides {rsa},{csa}) exceeds its slice ({a_len})"
    );
    assert!(
        extent(k, n, rsb, csb) <= b_len,
        "gemm: B ({k}x{n}, strides {rsb},{csb}) exceeds its slice ({b_len})"
    );
    assert!(
        extent(m, n, rsc, csc) <= c_len,
        "gemm: C ({m}x{n}, strides {rsc},{csc}) exceeds its slice ({c_len})"
    );
    assert!(
        non_aliasing(m, n, rsc, csc),
        "gemm: strides {rsc},{csc} of C ({m}x{n}) alias elements"
    );
    // A stride only matters when its dimension is > 1 and no dimension is 0; then it is bounded by a slice
    // length, so it fits in isize. Unused strides are passed as 0.
    let s = |dim: usize, stride: usize| {
        if dim > 1 {
            isize::try_from(stride).unwrap_or(0)
        } else {
            0
        }
    };
    [s(m, rsa), s(k, csa), s(k, rsb), s(n, csb), s(m, rsc), s(n, csc)]
}

macro_rules! impl_float {
    ($t:ty, $gemm:path) => {
        impl Float for $t {
            #[inline]
            fn of_f64(x: f64) -> Self {
                x as $t
            }

            #[inline]
            fn of_usize(x: usize) -> Self {
                x as $t
            }

            #[allow(clippy::too_many_arguments)]
            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                rsa: usize,
                csa: usize,
                b: &[Self],
                rsb: usize,
                csb: usize,
                beta: Self,
                c: &mut [Self],
                rsc: usize,
                csc: usize,
            ) {
                let [rsa, csa, rsb, csb, rsc, csc] = check_gemm(
                    (m, k, n),
                    (a.len(), rsa, csa),
                    (b.len(), rsb, csb),
                    (c.len(), rsc, csc),
                );
                if m == 0 || n == 0 {
                    return;
                }
                // SAFETY: `check_gemm` proved that every element of A, B and C addressed by (m, k, n) and the
                // strides lies inside its slice, and that C's elements are distinct; `c` is a unique borrow,
                // so it does not overlap `a` or `b`. Without the `threading` feature this runs on this thread.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        rsc,
                        csc,
                    )
                }
            }
        }
    };
}

impl_float!(f32, matrixmultiply::sgemm);
impl_float!(f64, matrixmultiply::dgemm);

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn gemm_matches_naive_with_transposed_strides() {
        let mut rng = testutil::Rng::new(1);
        let (m, k, n) = (7, 5, 3);
        let a = rng.vec(m * k);
        let bt = rng.vec(n * k); // B stored transposed: (n, k)
        let b: Vec<f64> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
        let init = rng.vec(m * n);
        let mut c = init.clone();
        f64::gemm(m, k, n, 2.0, &a, k, 1, &bt, 1, k, 1.0, &mut c, n, 1);
        let want: Vec<f64> = naive(m, k, n, &a, &b)
            .iter()
            .zip(&init)
            .map(|(p, c0)| 2.0 * p + c0)
            .collect();
        testutil::assert_rel_close("gemm", &c, &want, 1e-14);
        // beta = 0 overwrites, even NaN.
        let mut c = vec![f64::NAN; m * n];
        f64::gemm(m, k, n, 1.0, &a, k, 1, &bt, 1, k, 0.0, &mut c, n, 1);
        testutil::assert_rel_close("gemm beta=0", &c, &naive(m, k, n, &a, &b), 1e-14);
    }

    proptest::proptest! {
        /// Any shape (including empty ones), either storage order for A and B, and a row stride of C wider
        /// than its row: f64 and f32 agree with the naive product.
        #[test]
        fn gemm_any_shape(m in 0usize..9, k in 0usize..9, n in 0usize..9, ta: bool, tb: bool, pad in 0usize..3, seed: u64) {
            let mut rng = testutil::Rng::new(seed);
            let (a, b, init) = (rng.vec(m * k), rng.vec(k * n), rng.vec(m * (n + pad)));
            let (at, bt): (Vec<f64>, Vec<f64>) =
                ((0..m * k).map(|i| a[(i % m) * k + i / m]).collect(), (0..k * n).map(|i| b[(i % k) * n + i / k]).collect());
            let (a_s, rsa, csa) = if ta { (&at, 1, m) } else { (&a, k, 1) };
            let (b_s, rsb, csb) = if tb { (&bt, 1, k) } else { (&b, n, 1) };
            let mut c = init.clone();
            f64::gemm(m, k, n, 0.5, a_s, rsa, csa, b_s, rsb, csb, 1.0, &mut c, n + pad, 1);
            let prod = naive(m, k, n, &a, &b);
            let mut want = init.clone();
            for i in 0..m {
                for j in 0..n {
                    want[i * (n + pad) + j] += 0.5 * prod[i * n + j];
                }
            }
            testutil::assert_rel_close("gemm f64", &c, &want, 1e-14);
            let mut c32: Vec<f32> = testutil::cast(&init);
            f32::gemm(m, k, n, 0.5, &testutil::cast::<f32>(a_s), rsa, csa, &testutil::cast::<f32>(b_s), rsb, csb, 1.0, &mut c32, n + pad, 1);
            let c32: Vec<f64> = c32.iter().map(|&x| f64::from(x)).collect();
            testutil::assert_rel_close("gemm f32", &c32, &want, 1e-6);
        }
    }

    #[test]
    #[should_panic(expected = "gemm: A")]
    fn gemm_rejects_short_slice() {
        let mut c = vec![0.0f32; 4];
        f32::gemm(2, 3, 2, 1.0, &[0.0; 5], 3, 1, &[0.0; 6], 2, 1, 0.0, &mut c, 2, 1);
    }

    #[test]
    #[should_panic(expected = "alias")]
    fn gemm_rejects_aliasing_output() {
        let mut c = vec![0.0f32; 4];
        f32::gemm(2, 1, 2, 1.0, &[0.0; 2], 1, 1, &[0.0; 2], 2, 1, 0.0, &mut c, 1, 1);
    }
}
