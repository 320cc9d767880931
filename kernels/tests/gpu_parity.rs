//! GPU parity suite for the memory-bound kernels: every kernel against the CPU reference (`baton_kernels::cpu`, or
//! an f64 host loop where the reference has no twin) on fresh random inputs (seeded by the clock; the seed is
//! printed), outputs poisoned with NaN before each launch, several shapes including ones that are not multiples of
//! the 16-byte packs or block sizes. Tolerance: relative-norm error ‖gpu − ref‖ / ‖ref‖ ≤ 1e-5 for fp32 and ≤ 1e-2
//! for bf16 (the reference runs on the bf16-rounded inputs in f32); a NaN never passes. Plus determinism: the same
//! inputs twice give bitwise equal outputs.
//!
//! Run on a GPU machine: `cargo test --release -p baton-kernels --test gpu_parity -- --ignored --test-threads 1`.

use baton_kernels::cpu;
use baton_kernels::cuda::attention::{self as att, AttentionShape};
use baton_kernels::cuda::cudarc::driver::CudaSlice;
use baton_kernels::cuda::{adamw, bias, classifier, elementwise as ew, embedding, layernorm, norm};
use baton_kernels::cuda::{Device, Elem, Tokens};
use half::bf16;

// ---------------------------------------------------------------------------------------------------------------
// Harness

struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        println!("seed {seed:#x}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * self.uniform()).collect()
    }
    fn ints(&mut self, n: usize, below: u32) -> Vec<u32> {
        (0..n).map(|_| (self.next() % u64::from(below)) as u32).collect()
    }
}

/// Element types under test: conversion to/from f32 and the tolerance of the precision.
trait TestElem: Elem {
    const TOL: f64;
    const NAME: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl TestElem for f32 {
    const TOL: f64 = 1e-5;
    const NAME: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl TestElem for bf16 {
    const TOL: f64 = 1e-2;
    const NAME: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

fn dev() -> Device {
    Device::new(0).expect("a CUDA device")
}

/// Rounds host values to T (what the device will hold) and back.
fn round<T: TestElem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

fn up<T: TestElem>(d: &Device, v: &[f32]) -> CudaSlice<T> {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    d.upload(&t).unwrap()
}

fn poisoned<T: TestElem>(d: &Device, n: usize) -> CudaSlice<T> {
    up::<T>(d, &vec![f32::NAN; n])
}

fn down<T: TestElem>(d: &Device, s: &CudaSlice<T>) -> Vec<f32> {
    d.download(s).unwrap().into_iter().map(T::to_f32).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    println!("{what:<60} rel err {e:.2e} (tol {tol:.0e})");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

// ---------------------------------------------------------------------------------------------------------------
// Element-wise: GELU, residual, add_assign, scale, casts

const ELEMENTWISE_LENS: [usize; 5] = [1, 7, 1000, 4099, 1 << 20];

fn elementwise_case<T: TestElem>(d: &Device, rng: &mut Rng, n: usize) {
    let x = round::<T>(&rng.vec(n, 4.0));
    let y = round::<T>(&rng.vec(n, 1.0));
    let g0 = round::<T>(&rng.vec(n, 1.0));
    let (xd, yd) = (up::<T>(d, &x), up::<T>(d, &y));

    let mut out = poisoned::<T>(d, n);
    ew::gelu_forward(d, &mut out, &xd).unwrap();
    let mut want = vec![0.0; n];
    cpu::gelu_forward(&mut want, &x);
    check(
        &format!("gelu_forward {} n={n}", T::NAME),
        &down(d, &out),
        &want,
        T::TOL,
    );

    let mut dinp = up::<T>(d, &g0);
    ew::gelu_backward(d, &mut dinp, &xd, &yd).unwrap();
    let mut want = g0.clone();
    cpu::gelu_backward(&mut want, &x, &y);
    check(
        &format!("gelu_backward {} n={n}", T::NAME),
        &down(d, &dinp),
        &want,
        T::TOL,
    );

    let mut out = poisoned::<T>(d, n);
    ew::residual_forward(d, &mut out, &xd, &yd).unwrap();
    let mut want = vec![0.0; n];
    cpu::residual_forward(&mut want, &x, &y);
    check(
        &format!("residual_forward {} n={n}", T::NAME),
        &down(d, &out),
        &want,
        T::TOL,
    );

    let mut acc = up::<T>(d, &g0);
    ew::add_assign(d, &mut acc, &yd).unwrap();
    let want: Vec<f32> = g0.iter().zip(&y).map(|(a, b)| a + b).collect();
    check(&format!("add_assign {} n={n}", T::NAME), &down(d, &acc), &want, T::TOL);

    let mut s = up::<T>(d, &g0);
    ew::scale(d, &mut s, -0.37).unwrap();
    let want: Vec<f32> = g0.iter().map(|a| a * -0.37).collect();
    check(&format!("scale {} n={n}", T::NAME), &down(d, &s), &want, T::TOL);
}

#[test]
#[ignore = "needs a CUDA device"]
fn elementwise_matches_cpu() {
    let (d, mut rng) = (dev(), Rng::new());
    for n in ELEMENTWISE_LENS {
        elementwise_case::<f32>(&d, &mut rng, n);
        elementwise_case::<bf16>(&d, &mut rng, n);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn casts_round_to_nearest_even() {
    let (d, mut rng) = (dev(), Rng::new());
    for n in ELEMENTWISE_LENS {
        let x = rng.vec(n, 100.0);
        let xd = d.upload(&x).unwrap();
        let mut b = d.upload(&vec![bf16::NAN; n]).unwrap();
        ew::cast_f32_to_bf16(&d, &mut b, &xd).unwrap();
        let got = d.download(&b).unwrap();
        let want: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        assert!(
            got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
            "cast_f32_to_bf16 n={n}"
        );
        let mut back = d.upload(&vec![f32::NAN; n]).unwrap();
        ew::cast_bf16_to_f32(&d, &mut back, &b).unwrap();
        let got = d.download(&back).unwrap();
        assert!(
            got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_f32().to_bits()),
            "cast_bf16_to_f32 n={n}"
        );
        println!("casts n={n}: bitwise equal to half's round-to-nearest-even");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Embedding

fn embedding_case<T: TestElem>(d: &Device, rng: &mut Rng, (b, t, c, v): (usize, usize, usize, usize)) {
    let max_t = t + 3;
    let ids = rng.ints(b * t, v as u32);
    let (wte, wpe) = (round::<T>(&rng.vec(v * c, 1.0)), round::<T>(&rng.vec(max_t * c, 1.0)));
    let tokens = Tokens::upload(d, &ids).unwrap();
    let mut out = poisoned::<T>(d, b * t * c);
    embedding::embedding_forward(d, &mut out, &tokens, &up::<T>(d, &wte), &up::<T>(d, &wpe), b, t, c).unwrap();
    let mut want = vec![0.0; b * t * c];
    cpu::embedding_forward(&mut want, &ids, &wte, &wpe, b, t, c);
    let shape = format!("{} b={b} t={t} c={c} v={v}", T::NAME);
    check(&format!("embedding_forward {shape}"), &down(d, &out), &want, T::TOL);

    let dout = round::<T>(&rng.vec(b * t * c, 1.0));
    let (dwte0, dwpe0) = (round::<T>(&rng.vec(v * c, 1.0)), round::<T>(&rng.vec(max_t * c, 1.0)));
    let (mut dwte, mut dwpe) = (up::<T>(d, &dwte0), up::<T>(d, &dwpe0));
    embedding::embedding_backward(d, &mut dwte, &mut dwpe, &up::<T>(d, &dout), &tokens, b, t, c).unwrap();
    let (mut want_te, mut want_pe) = (dwte0.clone(), dwpe0.clone());
    cpu::embedding_backward(&mut want_te, &mut want_pe, &dout, &ids, b, t, c);
    check(
        &format!("embedding_backward dwte {shape}"),
        &down(d, &dwte),
        &want_te,
        T::TOL,
    );
    check(
        &format!("embedding_backward dwpe {shape}"),
        &down(d, &dwpe),
        &want_pe,
        T::TOL,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_matches_cpu() {
    let (d, mut rng) = (dev(), Rng::new());
    for shape in [(2, 7, 12, 50), (3, 33, 48, 17), (4, 64, 768, 1000), (1, 1, 5, 3)] {
        embedding_case::<f32>(&d, &mut rng, shape);
        embedding_case::<bf16>(&d, &mut rng, shape);
    }
    // Out-of-vocabulary ids are refused before any launch.
    let tokens = Tokens::upload(&d, &[0, 9]).unwrap();
    let (wte, wpe) = (d.zeros::<f32>(4 * 2).unwrap(), d.zeros::<f32>(2 * 2).unwrap());
    let mut out = d.zeros::<f32>(2 * 2).unwrap();
    assert!(embedding::embedding_forward(&d, &mut out, &tokens, &wte, &wpe, 1, 2, 2).is_err());
}

// ---------------------------------------------------------------------------------------------------------------
// Layer norm

fn layernorm_case<T: TestElem>(d: &Device, rng: &mut Rng, (n, c): (usize, usize)) {
    let shape = format!("{} n={n} c={c}", T::NAME);
    let x = round::<T>(&rng.vec(n * c, 2.0).iter().map(|v| v + 0.5).collect::<Vec<_>>());
    let (w, bia) = (round::<T>(&rng.vec(c, 1.0)), round::<T>(&rng.vec(c, 1.0)));
    let (xd, wd, bd) = (up::<T>(d, &x), up::<T>(d, &w), up::<T>(d, &bia));
    let mut out = poisoned::<T>(d, n * c);
    let mut mean = d.upload(&vec![f32::NAN; n]).unwrap();
    let mut rstd = d.upload(&vec![f32::NAN; n]).unwrap();
    layernorm::layernorm_forward(d, &mut out, &mut mean, &mut rstd, &xd, &wd, &bd, n, c).unwrap();
    let (mut want, mut wm, mut wr) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::layernorm_forward(&mut want, &mut wm, &mut wr, &x, &w, &bia, n, c);
    check(&format!("layernorm_forward out {shape}"), &down(d, &out), &want, T::TOL);
    check(
        &format!("layernorm_forward mean {shape}"),
        &d.download(&mean).unwrap(),
        &wm,
        1e-5,
    );
    check(
        &format!("layernorm_forward rstd {shape}"),
        &d.download(&rstd).unwrap(),
        &wr,
        1e-5,
    );

    // Fused residual: resid = x + y, then layer norm of the (T-rounded) sum.
    let y = round::<T>(&rng.vec(n * c, 1.0));
    let mut resid = poisoned::<T>(d, n * c);
    let mut out2 = poisoned::<T>(d, n * c);
    layernorm::residual_layernorm_forward(
        d,
        &mut resid,
        &mut out2,
        &mut mean,
        &mut rstd,
        &xd,
        &up::<T>(d, &y),
        &wd,
        &bd,
        n,
        c,
    )
    .unwrap();
    let mut want_resid = vec![0.0; n * c];
    cpu::residual_forward(&mut want_resid, &x, &y);
    let want_resid = round::<T>(&want_resid);
    cpu::layernorm_forward(&mut want, &mut wm, &mut wr, &want_resid, &w, &bia, n, c);
    check(
        &format!("residual_layernorm_forward resid {shape}"),
        &down(d, &resid),
        &want_resid,
        T::TOL,
    );
    check(
        &format!("residual_layernorm_forward out {shape}"),
        &down(d, &out2),
        &want,
        T::TOL,
    );

    // Backward, from the CPU's stats (so the check isolates the backward kernels).
    let (md, rd) = (d.upload(&wm).unwrap(), d.upload(&wr).unwrap());
    let dout = round::<T>(&rng.vec(n * c, 1.0));
    let doutd = up::<T>(d, &dout);
    let g0 = round::<T>(&rng.vec(n * c, 1.0));
    let mut dinp = up::<T>(d, &g0);
    layernorm::layernorm_backward_input(d, &mut dinp, &doutd, &up::<T>(d, &want_resid), &wd, &md, &rd, n, c).unwrap();
    let mut want = g0.clone();
    cpu::layernorm_backward_input(&mut want, &dout, &want_resid, &w, &wm, &wr, n, c);
    check(
        &format!("layernorm_backward_input {shape}"),
        &down(d, &dinp),
        &want,
        T::TOL,
    );

    let (dw0, db0) = (round::<T>(&rng.vec(c, 1.0)), round::<T>(&rng.vec(c, 1.0)));
    let (mut dw, mut db) = (up::<T>(d, &dw0), up::<T>(d, &db0));
    layernorm::layernorm_backward_weight(d, &mut dw, &mut db, &doutd, &up::<T>(d, &want_resid), &md, &rd, n, c)
        .unwrap();
    let (mut want_w, mut want_b) = (dw0.clone(), db0.clone());
    cpu::layernorm_backward_weight(&mut want_w, &mut want_b, &dout, &want_resid, &wm, &wr, n, c);
    check(
        &format!("layernorm_backward_weight dweight {shape}"),
        &down(d, &dw),
        &want_w,
        T::TOL,
    );
    check(
        &format!("layernorm_backward_weight dbias {shape}"),
        &down(d, &db),
        &want_b,
        T::TOL,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn layernorm_matches_cpu() {
    let (d, mut rng) = (dev(), Rng::new());
    for shape in [(5, 13), (37, 768), (1000, 64), (3, 1600), (4100, 24), (1, 1)] {
        layernorm_case::<f32>(&d, &mut rng, shape);
        layernorm_case::<bf16>(&d, &mut rng, shape);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Bias

fn bias_case<T: TestElem>(d: &Device, rng: &mut Rng, (n, oc): (usize, usize)) {
    let shape = format!("{} n={n} oc={oc}", T::NAME);
    let (x, bia) = (round::<T>(&rng.vec(n * oc, 1.0)), round::<T>(&rng.vec(oc, 1.0)));
    let mut out = up::<T>(d, &x);
    bias::bias_forward(d, &mut out, &up::<T>(d, &bia), n, oc).unwrap();
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + bia[i % oc]).collect();
    check(&format!("bias_forward {shape}"), &down(d, &out), &want, T::TOL);

    let db0 = round::<T>(&rng.vec(oc, 1.0));
    let mut db = up::<T>(d, &db0);
    bias::bias_backward(d, &mut db, &up::<T>(d, &x), n, oc).unwrap();
    let want: Vec<f32> = (0..oc)
        .map(|o| (f64::from(db0[o]) + (0..n).map(|r| f64::from(x[r * oc + o])).sum::<f64>()) as f32)
        .collect();
    check(&format!("bias_backward {shape}"), &down(d, &db), &want, T::TOL);
}

#[test]
#[ignore = "needs a CUDA device"]
fn bias_matches_host() {
    let (d, mut rng) = (dev(), Rng::new());
    for shape in [(3, 5), (100, 768), (4097, 33), (20000, 96)] {
        bias_case::<f32>(&d, &mut rng, shape);
        bias_case::<bf16>(&d, &mut rng, shape);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Classifier

fn classifier_case<T: TestElem>(d: &Device, rng: &mut Rng, (n, v): (usize, usize)) {
    let shape = format!("{} n={n} v={v}", T::NAME);
    let logits = round::<T>(&rng.vec(n * v, 6.0));
    let ids = rng.ints(n, v as u32);
    let targets = Tokens::upload(d, &ids).unwrap();
    let ld = up::<T>(d, &logits);
    let mut losses = d.upload(&vec![f32::NAN; n]).unwrap();
    classifier::cross_entropy_forward(d, &mut losses, &ld, &targets, n, v).unwrap();
    let mut want_loss = vec![0.0; n];
    cpu::softmax_cross_entropy_forward(&mut want_loss, &logits, &ids, n, v);
    check(
        &format!("cross_entropy_forward {shape}"),
        &d.download(&losses).unwrap(),
        &want_loss,
        1e-5,
    );

    let scale = 1.0 / n as f32;
    let g0 = round::<T>(&rng.vec(n * v, 0.01));
    let mut dl = up::<T>(d, &g0);
    classifier::cross_entropy_backward(d, &mut dl, &ld, &targets, scale, n, v).unwrap();
    let mut want = g0.clone();
    cpu::softmax_cross_entropy_backward(&mut want, &logits, &ids, &vec![scale; n], n, v);
    check(&format!("cross_entropy_backward {shape}"), &down(d, &dl), &want, T::TOL);

    let mut inplace = up::<T>(d, &logits);
    let mut losses = d.upload(&vec![f32::NAN; n]).unwrap();
    classifier::classifier_fused(d, &mut inplace, &mut losses, &targets, scale, n, v).unwrap();
    let mut want = vec![0.0; n * v];
    cpu::softmax_cross_entropy_backward(&mut want, &logits, &ids, &vec![scale; n], n, v);
    check(
        &format!("classifier_fused losses {shape}"),
        &d.download(&losses).unwrap(),
        &want_loss,
        1e-5,
    );
    check(
        &format!("classifier_fused dlogits {shape}"),
        &down(d, &inplace),
        &want,
        T::TOL,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn classifier_matches_cpu() {
    let (d, mut rng) = (dev(), Rng::new());
    for shape in [(3, 10), (64, 1000), (17, 50257), (5, 50304), (1, 1)] {
        classifier_case::<f32>(&d, &mut rng, shape);
        classifier_case::<bf16>(&d, &mut rng, shape);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Attention pieces

fn attention_case<T: TestElem>(d: &Device, rng: &mut Rng, s: AttentionShape) {
    let AttentionShape { b, t, nh, hs } = s;
    let c = nh * hs;
    let shape = format!("{} b={b} t={t} nh={nh} hs={hs}", T::NAME);
    let qkv = round::<T>(&rng.vec(3 * b * t * c, 1.0));
    let head = |bi: usize, h: usize, ti: usize, which: usize, dd: usize| ((bi * t + ti) * 3 + which) * c + h * hs + dd;
    let bhtd = |bi: usize, h: usize, ti: usize, dd: usize| ((bi * nh + h) * t + ti) * hs + dd;
    let n = s.head_elems();
    let (mut q, mut k, mut v) = (poisoned::<T>(d, n), poisoned::<T>(d, n), poisoned::<T>(d, n));
    att::attention_permute(d, &mut q, &mut k, &mut v, &up::<T>(d, &qkv), s).unwrap();
    let mut want = [vec![0.0; n], vec![0.0; n], vec![0.0; n]];
    for bi in 0..b {
        for h in 0..nh {
            for ti in 0..t {
                for dd in 0..hs {
                    for (which, w) in want.iter_mut().enumerate() {
                        w[bhtd(bi, h, ti, dd)] = qkv[head(bi, h, ti, which, dd)];
                    }
                }
            }
        }
    }
    for (got, w) in [q, k, v].iter().zip(&want) {
        check(&format!("attention_permute {shape}"), &down(d, got), w, 0.0);
    }
    // unpermute (exact) and its backward (exact), permute_backward (accumulates).
    let y = round::<T>(&rng.vec(n, 1.0));
    let mut out = poisoned::<T>(d, n);
    att::attention_unpermute(d, &mut out, &up::<T>(d, &y), s).unwrap();
    let mut want_out = vec![0.0; n];
    for bi in 0..b {
        for h in 0..nh {
            for ti in 0..t {
                for dd in 0..hs {
                    want_out[(bi * t + ti) * c + h * hs + dd] = y[bhtd(bi, h, ti, dd)];
                }
            }
        }
    }
    check(&format!("attention_unpermute {shape}"), &down(d, &out), &want_out, 0.0);
    let mut dy = poisoned::<T>(d, n);
    att::attention_unpermute_backward(d, &mut dy, &up::<T>(d, &want_out), s).unwrap();
    check(&format!("attention_unpermute_backward {shape}"), &down(d, &dy), &y, 0.0);
    let g0 = round::<T>(&rng.vec(3 * n, 1.0));
    let mut dqkv = up::<T>(d, &g0);
    let parts = [
        round::<T>(&rng.vec(n, 1.0)),
        round::<T>(&rng.vec(n, 1.0)),
        round::<T>(&rng.vec(n, 1.0)),
    ];
    let (pq, pk, pv) = (up::<T>(d, &parts[0]), up::<T>(d, &parts[1]), up::<T>(d, &parts[2]));
    att::attention_permute_backward(d, &mut dqkv, &pq, &pk, &pv, s).unwrap();
    let mut want = g0.clone();
    for bi in 0..b {
        for h in 0..nh {
            for ti in 0..t {
                for dd in 0..hs {
                    for (which, p) in parts.iter().enumerate() {
                        want[head(bi, h, ti, which, dd)] += p[bhtd(bi, h, ti, dd)];
                    }
                }
            }
        }
    }
    check(
        &format!("attention_permute_backward {shape}"),
        &down(d, &dqkv),
        &round::<T>(&want),
        T::TOL,
    );

    // Causal softmax forward/backward against f64 host loops.
    let rows = b * nh * t;
    let scale = 1.0 / (hs as f32).sqrt();
    let pre = round::<T>(&rng.vec(rows * t, 4.0));
    let mut a = poisoned::<T>(d, rows * t);
    att::causal_softmax_forward(d, &mut a, &up::<T>(d, &pre), scale, rows, t).unwrap();
    let mut want_a = vec![0.0f32; rows * t];
    for r in 0..rows {
        let ti = r % t;
        let x = &pre[r * t..r * t + ti + 1];
        let m = x
            .iter()
            .map(|&v| f64::from(v * scale))
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = x.iter().map(|&v| (f64::from(v * scale) - m).exp()).sum();
        for (j, &v) in x.iter().enumerate() {
            want_a[r * t + j] = ((f64::from(v * scale) - m).exp() / sum) as f32;
        }
    }
    check(
        &format!("causal_softmax_forward {shape}"),
        &down(d, &a),
        &want_a,
        T::TOL,
    );
    let att_r = round::<T>(&want_a);
    let datt = round::<T>(&rng.vec(rows * t, 1.0));
    let mut dpre = poisoned::<T>(d, rows * t);
    att::causal_softmax_backward(d, &mut dpre, &up::<T>(d, &datt), &up::<T>(d, &att_r), scale, rows, t).unwrap();
    let mut want_d = vec![0.0f32; rows * t];
    for r in 0..rows {
        let ti = r % t;
        let dot: f64 = (0..=ti)
            .map(|j| f64::from(att_r[r * t + j]) * f64::from(datt[r * t + j]))
            .sum();
        for j in 0..=ti {
            want_d[r * t + j] =
                (f64::from(scale) * f64::from(att_r[r * t + j]) * (f64::from(datt[r * t + j]) - dot)) as f32;
        }
    }
    check(
        &format!("causal_softmax_backward {shape}"),
        &down(d, &dpre),
        &want_d,
        T::TOL,
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn attention_pieces_match_host() {
    let (d, mut rng) = (dev(), Rng::new());
    for (b, t, nh, hs) in [
        (1, 5, 2, 3),
        (2, 64, 4, 64),
        (2, 100, 3, 24),
        (1, 1024, 2, 64),
        (3, 17, 1, 128),
    ] {
        let s = AttentionShape { b, t, nh, hs };
        attention_case::<f32>(&d, &mut rng, s);
        attention_case::<bf16>(&d, &mut rng, s);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// AdamW, norms

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_matches_cpu() {
    let (d, mut rng) = (dev(), Rng::new());
    let cfg = cpu::AdamW {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    for n in [1, 1000, 123_457] {
        let (p, g) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
        let (m, v) = (
            rng.vec(n, 0.1),
            rng.vec(n, 0.1).iter().map(|x| x.abs()).collect::<Vec<_>>(),
        );
        for step in [1, 7] {
            let (mut pd, gd, mut md, mut vd) = (
                d.upload(&p).unwrap(),
                d.upload(&g).unwrap(),
                d.upload(&m).unwrap(),
                d.upload(&v).unwrap(),
            );
            adamw::adamw_f32(&d, &cfg, &mut pd, &gd, &mut md, &mut vd, step).unwrap();
            let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
            cpu::adamw_step(&cfg, &mut wp, &g, &mut wm, &mut wv, step);
            check(
                &format!("adamw_f32 params n={n} step={step}"),
                &d.download(&pd).unwrap(),
                &wp,
                1e-5,
            );
            check(
                &format!("adamw_f32 m n={n} step={step}"),
                &d.download(&md).unwrap(),
                &wm,
                1e-5,
            );
            check(
                &format!("adamw_f32 v n={n} step={step}"),
                &d.download(&vd).unwrap(),
                &wv,
                1e-5,
            );

            // Mixed precision: bf16 gradients in, fp32 master + moments, bf16 working copy out.
            let g16 = round::<bf16>(&g);
            let (mut master, mut md, mut vd) = (d.upload(&p).unwrap(), d.upload(&m).unwrap(), d.upload(&v).unwrap());
            let mut work = poisoned::<bf16>(&d, n);
            adamw::adamw_bf16(
                &d,
                &cfg,
                &mut master,
                &mut work,
                &up::<bf16>(&d, &g16),
                &mut md,
                &mut vd,
                step,
            )
            .unwrap();
            let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
            cpu::adamw_step(&cfg, &mut wp, &g16, &mut wm, &mut wv, step);
            check(
                &format!("adamw_bf16 master n={n} step={step}"),
                &d.download(&master).unwrap(),
                &wp,
                1e-5,
            );
            check(
                &format!("adamw_bf16 working copy n={n} step={step}"),
                &down(&d, &work),
                &wp,
                1e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn norms_match_f64_host_sums() {
    let (d, mut rng) = (dev(), Rng::new());
    for n in [1usize, 513, 262_145, 3 << 20] {
        let x = rng.vec(n, 1.0);
        let xd = d.upload(&x).unwrap();
        let want_sq: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let want_sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
        let (sq, sum) = (norm::sum_squares(&d, &xd).unwrap(), norm::sum(&d, &xd).unwrap());
        println!("n={n}: sum_squares {sq} (host {want_sq}), sum {sum} (host {want_sum})");
        assert!((sq - want_sq).abs() <= 1e-9 * want_sq.max(1.0), "sum_squares n={n}");
        assert!((sum - want_sum).abs() <= 1e-9 * want_sq.sqrt().max(1.0), "sum n={n}");
        let x16 = round::<bf16>(&x);
        let want16: f64 = x16.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let sq16 = norm::sum_squares(&d, &up::<bf16>(&d, &x16)).unwrap();
        assert!(
            (sq16 - want16).abs() <= 1e-9 * want16.max(1.0),
            "sum_squares bf16 n={n}"
        );
    }
    let parts: Vec<Vec<f32>> = [10, 1000, 77_777].iter().map(|&n| rng.vec(n, 1.0)).collect();
    let bufs: Vec<CudaSlice<f32>> = parts.iter().map(|p| d.upload(p).unwrap()).collect();
    let refs: Vec<&CudaSlice<f32>> = bufs.iter().collect();
    let got = norm::global_norm(&d, &refs).unwrap();
    let want = parts
        .iter()
        .flatten()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    assert!((got - want).abs() <= 1e-9 * want, "global_norm {got} vs {want}");
    let nan = d.upload(&[1.0f32, f32::NAN]).unwrap();
    assert!(norm::sum(&d, &nan).unwrap().is_nan(), "a NaN must surface in the sum");
}

// ---------------------------------------------------------------------------------------------------------------
// Determinism

fn bits<T: TestElem>(d: &Device, s: &CudaSlice<T>) -> Vec<u32> {
    down(d, s).iter().map(|v| v.to_bits()).collect()
}

#[test]
#[ignore = "needs a CUDA device"]
fn reductions_are_bitwise_deterministic() {
    let (d, mut rng) = (dev(), Rng::new());
    let (b, t, c, v) = (8, 1024, 768, 50257);
    let n = b * t;
    let ids = rng.ints(n, 1000); // many repeats per token: long bucket sums
    let tokens = Tokens::upload(&d, &ids).unwrap();
    let dout = up::<f32>(&d, &rng.vec(n * c, 1.0));
    let x = up::<f32>(&d, &rng.vec(n * c, 1.0));
    let (mean, rstd) = (d.upload(&rng.vec(n, 1.0)).unwrap(), d.upload(&vec![1.3f32; n]).unwrap());
    let logits = up::<f32>(&d, &rng.vec(64 * v, 5.0));
    let targets = Tokens::upload(&d, &rng.ints(64, v as u32)).unwrap();
    let run = || {
        let (mut dwte, mut dwpe) = (d.zeros::<f32>(v * c).unwrap(), d.zeros::<f32>(t * c).unwrap());
        embedding::embedding_backward(&d, &mut dwte, &mut dwpe, &dout, &tokens, b, t, c).unwrap();
        let (mut dw, mut db) = (d.zeros::<f32>(c).unwrap(), d.zeros::<f32>(c).unwrap());
        layernorm::layernorm_backward_weight(&d, &mut dw, &mut db, &dout, &x, &mean, &rstd, n, c).unwrap();
        let mut dbias = d.zeros::<f32>(c).unwrap();
        bias::bias_backward(&d, &mut dbias, &dout, n, c).unwrap();
        let mut fused = logits.clone();
        let mut losses = d.zeros::<f32>(64).unwrap();
        classifier::classifier_fused(&d, &mut fused, &mut losses, &targets, 1.0 / 64.0, 64, v).unwrap();
        let norm = norm::sum_squares(&d, &dout).unwrap();
        (
            [
                bits(&d, &dwte),
                bits(&d, &dwpe),
                bits(&d, &dw),
                bits(&d, &db),
                bits(&d, &dbias),
                bits(&d, &fused),
            ],
            d.download(&losses)
                .unwrap()
                .iter()
                .map(|l| l.to_bits())
                .collect::<Vec<_>>(),
            norm.to_bits(),
        )
    };
    let first = run();
    let second = run();
    let names = ["dwte", "dwpe", "ln dweight", "ln dbias", "dbias", "dlogits"];
    for (i, name) in names.iter().enumerate() {
        assert!(
            first.0[i] == second.0[i],
            "{name} differs between two runs on the same inputs"
        );
    }
    assert_eq!(first.1, second.1, "losses differ between runs");
    assert_eq!(first.2, second.2, "sum_squares differs between runs");
    println!("determinism: embedding, layer norm and bias gradients, classifier, norm bitwise equal over two runs");
}
