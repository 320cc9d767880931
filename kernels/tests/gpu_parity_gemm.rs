//! GPU parity of the matrix products against the f32 CPU reference (`cpu::matmul_*`, `cpu::gelu_*`): the
//! hand-written tensor-core GEMM (`cuda::gemm`) and the cuBLASLt wrapper (`cuda::blaslt`), on fresh random
//! inputs, NaN-poisoned outputs, and shapes that are not multiples of the 128 x 128 x 32 tile.
//! Run by `scripts/gpu-check.sh` (`cargo test --release -p baton-kernels --test gpu_parity_gemm -- --ignored`).
//!
//! Tolerances (relative-norm error; NaN never passes):
//! - bf16 output: ≤ 1e-2 (one bf16 rounding of each output);
//! - fp32 output (bf16 or f32 operands, fp32 accumulation, no TF32): ≤ 1e-5. The CPU sees the same
//!   bf16-rounded operands, so only the summation order differs.

use baton_kernels::cpu;
use baton_kernels::cuda::blaslt::{Accumulate, BatchedShape, Blaslt};
use baton_kernels::cuda::gemm::gemm_forward;
use baton_kernels::cuda::Device;
use cudarc::driver::CudaSlice;
use half::bf16;

const TOL_BF16: f64 = 1e-2;
const TOL_F32: f64 = 1e-5;
/// fp32 outputs of cuBLASLt's GELU / DGELU epilogues: the library may evaluate tanh with the hardware
/// approximation (`tanh.approx.f32`, about 2^-11 relative), so these get a looser bound than plain fp32.
const TOL_F32_LT_GELU: f64 = 1e-3;

/// SplitMix64 with a Box–Muller normal.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
    /// Normal values times `scale`, rounded to bf16 (the CPU then sees exactly the GPU's operands).
    fn bf16_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| bf16::from_f64(self.normal() * scale).to_f32()).collect()
    }
    fn f32_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflowed)", got[i]);
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    eprintln!("  {what}: rel err {e:.2e}");
}

fn device() -> Device {
    Device::new(0).expect("a CUDA device")
}

fn up_bf16(dev: &Device, x: &[f32]) -> CudaSlice<bf16> {
    let v: Vec<bf16> = x.iter().map(|&f| bf16::from_f32(f)).collect();
    dev.upload(&v).expect("upload")
}

fn down_bf16(dev: &Device, x: &CudaSlice<bf16>) -> Vec<f32> {
    dev.download(x).expect("download").iter().map(|v| v.to_f32()).collect()
}

/// CPU reference of the forward: (out, pre-activation).
fn forward_ref(
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    gelu: bool,
    n: usize,
    c: usize,
    oc: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut pre = vec![0.0f32; n * oc];
    cpu::matmul_forward(&mut pre, inp, w, bias, n, c, oc);
    let mut out = pre.clone();
    if gelu {
        cpu::gelu_forward(&mut out, &pre);
    }
    (out, pre)
}

/// Ragged and GPT-2 shapes (N, C, OC): C is the contracted dimension and must be a multiple of 8.
const SHAPES: [(usize, usize, usize); 6] = [
    (128, 32, 128),
    (1000, 40, 77),
    (257, 768, 300),
    (77, 136, 2304),
    (1, 8, 1),
    (512, 3072, 768),
];

#[test]
#[ignore = "needs a CUDA device"]
fn own_gemm_matches_the_cpu_reference() {
    let dev = device();
    let mut rng = Rng(seed());
    for (n, c, oc) in SHAPES {
        for (with_bias, gelu) in [(false, false), (true, false), (true, true), (false, true)] {
            eprintln!("gemm N={n} C={c} OC={oc} bias={with_bias} gelu={gelu}");
            let inp = rng.bf16_vec(n * c, 1.0);
            let w = rng.bf16_vec(oc * c, 1.0 / (c as f64).sqrt());
            let bias = rng.bf16_vec(oc, 1.0);
            let bias_ref = with_bias.then_some(bias.as_slice());
            let (out_ref, pre_ref) = forward_ref(&inp, &w, bias_ref, gelu, n, c, oc);
            let (di, dw, db) = (up_bf16(&dev, &inp), up_bf16(&dev, &w), up_bf16(&dev, &bias));
            let dbias = with_bias.then_some(&db);

            // fp32 output, with the pre-activation stash.
            let mut out = dev.upload(&vec![f32::NAN; n * oc]).expect("upload");
            let mut pre = dev.upload(&vec![f32::NAN; n * oc]).expect("upload");
            gemm_forward(&dev, &mut out, Some(&mut pre), &di, &dw, dbias, gelu, n, c, oc).expect("gemm f32");
            check("f32 out", &dev.download(&out).expect("download"), &out_ref, TOL_F32);
            check("f32 pre", &dev.download(&pre).expect("download"), &pre_ref, TOL_F32);

            // bf16 output, no stash.
            let mut out = dev.upload(&vec![bf16::NAN; n * oc]).expect("upload");
            gemm_forward(&dev, &mut out, None, &di, &dw, dbias, gelu, n, c, oc).expect("gemm bf16");
            check("bf16 out", &down_bf16(&dev, &out), &out_ref, TOL_BF16);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn own_gemm_is_bitwise_deterministic() {
    let dev = device();
    let mut rng = Rng(seed());
    let (n, c, oc) = (1000, 768, 3072);
    let (inp, w, bias) = (
        rng.bf16_vec(n * c, 1.0),
        rng.bf16_vec(oc * c, 0.05),
        rng.bf16_vec(oc, 1.0),
    );
    let (di, dw, db) = (up_bf16(&dev, &inp), up_bf16(&dev, &w), up_bf16(&dev, &bias));
    let run = || {
        let mut out = dev.upload(&vec![f32::NAN; n * oc]).expect("upload");
        gemm_forward(&dev, &mut out, None, &di, &dw, Some(&db), true, n, c, oc).expect("gemm");
        dev.download(&out)
            .expect("download")
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert!(run() == run(), "two identical GEMMs differ");
}

#[test]
#[ignore = "needs a CUDA device"]
fn blaslt_forward_matches_the_cpu_reference() {
    let dev = device();
    let lt = Blaslt::new(&dev).expect("cuBLASLt");
    let mut rng = Rng(seed());
    for (n, c, oc) in SHAPES {
        for (with_bias, gelu, stash) in [
            (false, false, false),
            (true, false, false),
            (true, true, true),
            (false, true, true),
            (true, true, false),
        ] {
            eprintln!("blaslt forward N={n} C={c} OC={oc} bias={with_bias} gelu={gelu} stash={stash}");
            // fp32 path (fp32 compute, no TF32).
            let (inp, w, bias) = (
                rng.f32_vec(n * c, 1.0),
                rng.f32_vec(oc * c, 1.0 / (c as f64).sqrt()),
                rng.f32_vec(oc, 1.0),
            );
            let (out_ref, pre_ref) = forward_ref(&inp, &w, with_bias.then_some(bias.as_slice()), gelu, n, c, oc);
            let (di, dw, db) = (
                dev.upload(&inp).expect("up"),
                dev.upload(&w).expect("up"),
                dev.upload(&bias).expect("up"),
            );
            let mut out = dev.upload(&vec![f32::NAN; n * oc]).expect("upload");
            let mut pre = dev.upload(&vec![f32::NAN; n * oc]).expect("upload");
            lt.matmul_forward(
                &mut out,
                stash.then_some(&mut pre),
                &di,
                &dw,
                with_bias.then_some(&db),
                gelu,
                n,
                c,
                oc,
            )
            .expect("blaslt f32");
            let tol = if gelu { TOL_F32_LT_GELU } else { TOL_F32 };
            check("f32 out", &dev.download(&out).expect("download"), &out_ref, tol);
            if stash {
                check("f32 pre", &dev.download(&pre).expect("download"), &pre_ref, TOL_F32);
            }
            // bf16 path.
            let (inp, w, bias) = (
                rng.bf16_vec(n * c, 1.0),
                rng.bf16_vec(oc * c, 1.0 / (c as f64).sqrt()),
                rng.bf16_vec(oc, 1.0),
            );
            let (out_ref, pre_ref) = forward_ref(&inp, &w, with_bias.then_some(bias.as_slice()), gelu, n, c, oc);
            let (di, dw, db) = (up_bf16(&dev, &inp), up_bf16(&dev, &w), up_bf16(&dev, &bias));
            let mut out = dev.upload(&vec![bf16::NAN; n * oc]).expect("upload");
            let mut pre = dev.upload(&vec![bf16::NAN; n * oc]).expect("upload");
            lt.matmul_forward(
                &mut out,
                stash.then_some(&mut pre),
                &di,
                &dw,
                with_bias.then_some(&db),
                gelu,
                n,
                c,
                oc,
            )
            .expect("blaslt bf16");
            check("bf16 out", &down_bf16(&dev, &out), &out_ref, TOL_BF16);
            if stash {
                check("bf16 pre", &down_bf16(&dev, &pre), &pre_ref, TOL_BF16);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn blaslt_backward_matches_the_cpu_reference() {
    let dev = device();
    let lt = Blaslt::new(&dev).expect("cuBLASLt");
    let mut rng = Rng(seed());
    for (n, c, oc) in SHAPES {
        eprintln!("blaslt backward N={n} C={c} OC={oc}");
        let (inp, w, dout) = (
            rng.f32_vec(n * c, 1.0),
            rng.f32_vec(oc * c, 0.1),
            rng.f32_vec(n * oc, 1.0),
        );
        let (di, dw, ddout) = (
            dev.upload(&inp).expect("up"),
            dev.upload(&w).expect("up"),
            dev.upload(&dout).expect("up"),
        );

        // dinp += dout · W (accumulating onto a random start).
        let dinp0 = rng.f32_vec(n * c, 1.0);
        let mut want = dinp0.clone();
        cpu::matmul_backward_input(&mut want, &dout, &w, n, c, oc);
        let mut got = dev.upload(&dinp0).expect("up");
        lt.matmul_backward_input(&mut got, &ddout, &dw, None, Accumulate::Add, n, c, oc)
            .expect("dinp");
        check("f32 dinp (+=)", &dev.download(&got).expect("download"), &want, TOL_F32);

        // dinp = (dout · W) ∘ gelu'(pre), the fused DGELU.
        let pre = rng.f32_vec(n * c, 1.0);
        let mut g = vec![0.0f32; n * c];
        cpu::matmul_backward_input(&mut g, &dout, &w, n, c, oc);
        let mut want = vec![0.0f32; n * c];
        cpu::gelu_backward(&mut want, &pre, &g);
        let dpre = dev.upload(&pre).expect("up");
        let mut got = dev.upload(&vec![f32::NAN; n * c]).expect("upload");
        lt.matmul_backward_input(&mut got, &ddout, &dw, Some(&dpre), Accumulate::Overwrite, n, c, oc)
            .expect("dgelu");
        check(
            "f32 dinp (dgelu)",
            &dev.download(&got).expect("download"),
            &want,
            TOL_F32,
        );

        // dW += doutᵀ · inp, dbias = column sums of dout.
        let dw0 = rng.f32_vec(oc * c, 1.0);
        let (mut want_w, mut want_b) = (dw0.clone(), vec![0.0f32; oc]);
        cpu::matmul_backward_weight(&mut want_w, Some(&mut want_b), &dout, &inp, n, c, oc);
        let mut got_w = dev.upload(&dw0).expect("up");
        let mut got_b = dev.upload(&vec![f32::NAN; oc]).expect("upload");
        lt.matmul_backward_weight(&mut got_w, Some(&mut got_b), &ddout, &di, Accumulate::Add, n, c, oc)
            .expect("dW");
        check(
            "f32 dweight (+=)",
            &dev.download(&got_w).expect("download"),
            &want_w,
            TOL_F32,
        );
        check(
            "f32 dbias (bgradb)",
            &dev.download(&got_b).expect("download"),
            &want_b,
            TOL_F32,
        );

        // The same three in bf16.
        let (inp, w, dout) = (
            rng.bf16_vec(n * c, 1.0),
            rng.bf16_vec(oc * c, 0.1),
            rng.bf16_vec(n * oc, 1.0),
        );
        let (di, dw, ddout) = (up_bf16(&dev, &inp), up_bf16(&dev, &w), up_bf16(&dev, &dout));
        let mut want = vec![0.0f32; n * c];
        cpu::matmul_backward_input(&mut want, &dout, &w, n, c, oc);
        let mut got = dev.upload(&vec![bf16::NAN; n * c]).expect("upload");
        lt.matmul_backward_input(&mut got, &ddout, &dw, None, Accumulate::Overwrite, n, c, oc)
            .expect("dinp bf16");
        check("bf16 dinp", &down_bf16(&dev, &got), &want, TOL_BF16);
        let (mut want_w, mut want_b) = (vec![0.0f32; oc * c], vec![0.0f32; oc]);
        cpu::matmul_backward_weight(&mut want_w, Some(&mut want_b), &dout, &inp, n, c, oc);
        let mut got_w = dev.upload(&vec![bf16::NAN; oc * c]).expect("upload");
        let mut got_b = dev.upload(&vec![bf16::NAN; oc]).expect("upload");
        lt.matmul_backward_weight(
            &mut got_w,
            Some(&mut got_b),
            &ddout,
            &di,
            Accumulate::Overwrite,
            n,
            c,
            oc,
        )
        .expect("dW bf16");
        check("bf16 dweight", &down_bf16(&dev, &got_w), &want_w, TOL_BF16);
        check("bf16 dbias", &down_bf16(&dev, &got_b), &want_b, TOL_BF16);
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn blaslt_strided_batched_matches_the_cpu_reference() {
    let dev = device();
    let lt = Blaslt::new(&dev).expect("cuBLASLt");
    let mut rng = Rng(seed());
    for (batch, m, n, k) in [(24, 77, 77, 64), (6, 1000, 64, 1000), (3, 5, 7, 9)] {
        for (a_trans, b_trans) in [(false, true), (false, false), (true, false), (true, true)] {
            eprintln!("blaslt batched {batch}x({m}x{k})·({k}x{n}) a_trans={a_trans} b_trans={b_trans}");
            let (a, b) = (rng.f32_vec(batch * m * k, 1.0), rng.f32_vec(batch * k * n, 1.0));
            let c0 = rng.f32_vec(batch * m * n, 1.0);
            let (alpha, beta) = (0.125f32, 0.5f32);
            let mut want = c0.clone();
            for i in 0..batch {
                let (ai, bi) = (&a[i * m * k..(i + 1) * m * k], &b[i * k * n..(i + 1) * k * n]);
                let (rsa, csa) = if a_trans { (1, m) } else { (k, 1) };
                let (rsb, csb) = if b_trans { (1, k) } else { (n, 1) };
                <f32 as cpu::Float>::gemm(
                    m,
                    k,
                    n,
                    alpha,
                    ai,
                    rsa,
                    csa,
                    bi,
                    rsb,
                    csb,
                    beta,
                    &mut want[i * m * n..(i + 1) * m * n],
                    n,
                    1,
                );
            }
            let (da, db) = (dev.upload(&a).expect("up"), dev.upload(&b).expect("up"));
            let mut dc = dev.upload(&c0).expect("up");
            let shape = BatchedShape {
                batch,
                m,
                n,
                k,
                a_trans,
                b_trans,
                alpha,
                beta,
            };
            lt.matmul_strided_batched(&mut dc, &da, &db, shape).expect("batched");
            check("f32 batched", &dev.download(&dc).expect("download"), &want, TOL_F32);
        }
    }
}
