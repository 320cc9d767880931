//! Test helpers shared by the op tests: a seeded RNG, error measures, and [`check_op`], which runs the
//! finite-difference, accumulation, f32-vs-f64 and determinism checks on one op.

use super::Float;

/// xorshift64* generator: tiny, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }

    /// `n` integers uniform in `0..below`.
    pub fn ints(&mut self, n: usize, below: u32) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % u64::from(below)) as u32).collect()
    }
}

pub fn cast<T: Float>(x: &[f64]) -> Vec<T> {
    x.iter().map(|&v| T::of_f64(v)).collect()
}

fn to_f64<T: Float>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)).collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// `|got - want| / max(1e-8, |got| + |want|)` in the Euclidean norm over the whole vector.
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_err: lengths differ");
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    norm(&diff) / (norm(got) + norm(want)).max(1e-8)
}

pub fn assert_rel_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let err = rel_err(got, want);
    assert!(
        err <= tol,
        "{what}: relative error {err:e} > {tol:e}\n got  {got:?}\n want {want:?}"
    );
}

/// An op under test: float inputs (integer inputs such as tokens live in the case itself).
pub trait OpCase {
    /// Runs the forward on `x` and returns its output; if `dout` is given, also runs the backward with that
    /// output gradient, accumulating into `grads` (one vector per input, same lengths as `x`).
    fn run<T: Float>(&self, x: &[Vec<T>], dout: Option<&[T]>, grads: &mut [Vec<T>]) -> Vec<T>;
}

fn zeros_like<T: Float>(x: &[Vec<T>]) -> Vec<Vec<T>> {
    x.iter().map(|v| vec![T::zero(); v.len()]).collect()
}

/// Runs every generic check on `case` with inputs `x`; `diff` lists the inputs the op is differentiable in.
///
/// 1. f64 gradient check: `L = sum(out * R)` for a random `R`; the backward's gradients (accumulated into
///    zeros) must match central differences (h = 1e-6) on every element to a relative norm error of 1e-6,
///    elementwise to 1e-6 (scaled by the largest entry), and must not be all zero.
/// 2. Accumulation: the backward run on random initial gradients `G0` gives `G0 + grad`.
/// 3. f32: output and gradients agree with f64 to a relative norm error of `tol32`, and two f32 runs are
///    bitwise equal.
pub fn check_op<C: OpCase>(name: &str, case: &C, x: &[Vec<f64>], diff: &[usize], tol32: f64) {
    let mut rng = Rng::new(0xBA7);
    let out = case.run(x, None, &mut zeros_like(x));
    let r = rng.vec(out.len());

    // 1. Finite differences.
    let mut grads = zeros_like(x);
    let out2 = case.run(x, Some(&r), &mut grads);
    assert_eq!(out, out2, "{name}: forward changed when the backward ran");
    let h = 1e-6;
    let mut xp = x.to_vec();
    for &i in diff {
        let numeric: Vec<f64> = (0..x[i].len())
            .map(|j| {
                xp[i][j] = x[i][j] + h;
                let lp = dot(&case.run(&xp, None, &mut []), &r);
                xp[i][j] = x[i][j] - h;
                let lm = dot(&case.run(&xp, None, &mut []), &r);
                xp[i][j] = x[i][j];
                (lp - lm) / (2.0 * h)
            })
            .collect();
        let analytic = &grads[i];
        assert!(
            analytic.iter().any(|&g| g != 0.0),
            "{name}: gradient of input {i} is all zeros"
        );
        assert_rel_close(
            &format!("{name}: d input {i} vs finite differences"),
            analytic,
            &numeric,
            1e-6,
        );
        let scale = numeric.iter().fold(1.0f64, |m, g| m.max(g.abs()));
        let worst = analytic
            .iter()
            .zip(&numeric)
            .map(|(a, n)| (a - n).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-6 * scale,
            "{name}: d input {i}: elementwise error {worst:e}"
        );
    }
    for i in (0..x.len()).filter(|i| !diff.contains(i)) {
        assert!(
            grads[i].iter().all(|&g| g == 0.0),
            "{name}: input {i} is not differentiable but got a gradient"
        );
    }

    // 2. Accumulation.
    let g0: Vec<Vec<f64>> = x.iter().map(|v| rng.vec(v.len())).collect();
    let mut acc = g0.clone();
    case.run(x, Some(&r), &mut acc);
    for &i in diff {
        let added: Vec<f64> = acc[i].iter().zip(&g0[i]).map(|(a, b)| a - b).collect();
        assert_rel_close(
            &format!("{name}: accumulation into d input {i}"),
            &added,
            &grads[i],
            1e-12,
        );
    }

    // 3. f32 against f64, and determinism.
    let x32: Vec<Vec<f32>> = x.iter().map(|v| cast(v)).collect();
    let r32: Vec<f32> = cast(&r);
    let mut g32 = zeros_like(&x32);
    let out32 = case.run(&x32, Some(&r32), &mut g32);
    let mut g32b = zeros_like(&x32);
    let out32b = case.run(&x32, Some(&r32), &mut g32b);
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&out32),
        bits(&out32b),
        "{name}: f32 forward is not bitwise reproducible"
    );
    for (a, b) in g32.iter().zip(&g32b) {
        assert_eq!(bits(a), bits(b), "{name}: f32 backward is not bitwise reproducible");
    }
    assert_rel_close(&format!("{name}: f32 forward vs f64"), &to_f64(&out32), &out, tol32);
    for &i in diff {
        assert_rel_close(
            &format!("{name}: f32 d input {i} vs f64"),
            &to_f64(&g32[i]),
            &grads[i],
            tol32,
        );
    }
}
