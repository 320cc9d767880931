//! GPU parity of the fused flash attention against the f32 CPU reference (`cpu::attention_forward` /
//! `cpu::attention_backward`), on fresh random inputs, with NaN-poisoned outputs. Run by `scripts/gpu-check.sh`
//! (`cargo test --release -p baton-kernels --test gpu_parity_attention -- --ignored`).
//!
//! Tolerance: relative-norm error ≤ 1e-2 (bf16 storage of q, k, v, O, dO and of P inside the kernel, fp32
//! accumulation); the row logsumexp is fp32 end to end and must match to 1e-5. NaN never passes.

use baton_kernels::cpu;
use baton_kernels::cuda::flash_attention::{flash_attention_backward, flash_attention_forward, AttentionDims};
use baton_kernels::cuda::Device;
use half::bf16;

/// bf16 tolerance (relative norm), see the module docs.
const TOL_BF16: f64 = 1e-2;
/// The fp32 row statistics' tolerance.
const TOL_F32: f64 = 1e-5;

/// SplitMix64 with a Box–Muller normal: enough randomness for test inputs, no extra dependency.
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
    /// `n` normal values times `scale`, rounded to bf16 so that the CPU sees exactly what the GPU sees.
    fn bf16_vec(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| bf16::from_f64(self.normal() * scale).to_f32()).collect()
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn rel_err(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflowed)", got[i]);
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(what, got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    eprintln!("  {what}: rel err {e:.2e}");
}

/// Part `part` (0 = q, 1 = k, 2 = v) of a (B, T, 3C) tensor as (B, NH, T, HS).
fn permute_in(x: &[f32], part: usize, d: AttentionDims) -> Vec<f32> {
    let (c, c3) = (d.nh * d.hs, 3 * d.nh * d.hs);
    let mut out = vec![0.0; d.qkv_len()];
    for b in 0..d.b {
        for h in 0..d.nh {
            for t in 0..d.t {
                for e in 0..d.hs {
                    out[((b * d.nh + h) * d.t + t) * d.hs + e] = x[(b * d.t + t) * c3 + part * c + h * d.hs + e];
                }
            }
        }
    }
    out
}

/// A (B, NH, T, HS) tensor as (B, T, C).
fn unpermute(x: &[f32], d: AttentionDims) -> Vec<f32> {
    let c = d.nh * d.hs;
    let mut out = vec![0.0; d.b * d.t * c];
    for b in 0..d.b {
        for h in 0..d.nh {
            for t in 0..d.t {
                for e in 0..d.hs {
                    out[(b * d.t + t) * c + h * d.hs + e] = x[((b * d.nh + h) * d.t + t) * d.hs + e];
                }
            }
        }
    }
    out
}

/// Part `part` of a (B, T, 3C) gradient as (B, T, C).
fn qkv_part(x: &[f32], part: usize, d: AttentionDims) -> Vec<f32> {
    let (c, c3) = (d.nh * d.hs, 3 * d.nh * d.hs);
    (0..d.b * d.t)
        .flat_map(|r| x[r * c3 + part * c..r * c3 + (part + 1) * c].iter().copied())
        .collect()
}

/// The row logsumexp of the scaled causal scores, in f64, as (B, NH, T).
fn reference_lse(qkv: &[f32], d: AttentionDims) -> Vec<f32> {
    let (c, c3) = (d.nh * d.hs, 3 * d.nh * d.hs);
    let scale = 1.0 / (d.hs as f64).sqrt();
    let mut out = vec![0.0; d.rows_len()];
    for b in 0..d.b {
        for h in 0..d.nh {
            for i in 0..d.t {
                let q = &qkv[(b * d.t + i) * c3 + h * d.hs..][..d.hs];
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let k = &qkv[(b * d.t + j) * c3 + c + h * d.hs..][..d.hs];
                        scale * q.iter().zip(k).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum::<f64>()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                out[(b * d.nh + h) * d.t + i] = (m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln()) as f32;
            }
        }
    }
    out
}

fn up(dev: &Device, x: &[f32]) -> cudarc::driver::CudaSlice<bf16> {
    let v: Vec<bf16> = x.iter().map(|&f| bf16::from_f32(f)).collect();
    dev.upload(&v).expect("upload")
}

fn down(dev: &Device, x: &cudarc::driver::CudaSlice<bf16>) -> Vec<f32> {
    dev.download(x).expect("download").iter().map(|v| v.to_f32()).collect()
}

fn poisoned_bf16(dev: &Device, n: usize) -> cudarc::driver::CudaSlice<bf16> {
    dev.upload(&vec![bf16::NAN; n]).expect("upload")
}

fn poisoned_f32(dev: &Device, n: usize) -> cudarc::driver::CudaSlice<f32> {
    dev.upload(&vec![f32::NAN; n]).expect("upload")
}

/// Forward and backward on the GPU: (out, lse, dq, dk, dv), all as f32 in the kernel layout.
type GpuResult = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn run_gpu(dev: &Device, d: AttentionDims, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> GpuResult {
    let (q, k, v, dout) = (up(dev, q), up(dev, k), up(dev, v), up(dev, dout));
    let mut out = poisoned_bf16(dev, d.qkv_len());
    let mut lse = poisoned_f32(dev, d.rows_len());
    flash_attention_forward(dev, &mut out, &mut lse, &q, &k, &v, d).expect("forward");
    let (mut dq, mut dk, mut dv) = (
        poisoned_bf16(dev, d.qkv_len()),
        poisoned_bf16(dev, d.qkv_len()),
        poisoned_bf16(dev, d.qkv_len()),
    );
    let mut delta = poisoned_f32(dev, d.rows_len());
    flash_attention_backward(
        dev, &mut dq, &mut dk, &mut dv, &mut delta, &dout, &q, &k, &v, &out, &lse, d,
    )
    .expect("backward");
    dev.synchronize().expect("synchronize");
    (
        down(dev, &out),
        dev.download(&lse).expect("download"),
        down(dev, &dq),
        down(dev, &dk),
        down(dev, &dv),
    )
}

fn parity(dev: &Device, d: AttentionDims, seed: u64) {
    eprintln!("flash attention {d:?}, seed {seed}");
    let mut rng = Rng(seed);
    let c = d.nh * d.hs;
    let qkv = rng.bf16_vec(d.b * d.t * 3 * c, 1.0);
    let dout_btc = rng.bf16_vec(d.b * d.t * c, 1.0);
    let (q, k, v) = (permute_in(&qkv, 0, d), permute_in(&qkv, 1, d), permute_in(&qkv, 2, d));
    let dout = {
        // dO in (B, NH, T, HS): the same permutation as a one-part "qkv".
        let mut out = vec![0.0; d.qkv_len()];
        for b in 0..d.b {
            for h in 0..d.nh {
                for t in 0..d.t {
                    for e in 0..d.hs {
                        out[((b * d.nh + h) * d.t + t) * d.hs + e] = dout_btc[(b * d.t + t) * c + h * d.hs + e];
                    }
                }
            }
        }
        out
    };

    let mut out_ref = vec![0.0f32; d.b * d.t * c];
    let mut att = vec![0.0f32; d.b * d.nh * d.t * d.t];
    cpu::attention_forward(&mut out_ref, &mut att, &qkv, d.b, d.t, c, d.nh);
    let mut dqkv = vec![0.0f32; qkv.len()];
    cpu::attention_backward(&mut dqkv, &dout_btc, &qkv, &att, d.b, d.t, c, d.nh);

    let (out, lse, dq, dk, dv) = run_gpu(dev, d, &q, &k, &v, &dout);
    check("out", &unpermute(&out, d), &out_ref, TOL_BF16);
    check("lse", &lse, &reference_lse(&qkv, d), TOL_F32);
    check("dq", &unpermute(&dq, d), &qkv_part(&dqkv, 0, d), TOL_BF16);
    check("dk", &unpermute(&dk, d), &qkv_part(&dqkv, 1, d), TOL_BF16);
    check("dv", &unpermute(&dv, d), &qkv_part(&dqkv, 2, d), TOL_BF16);
}

fn device() -> Device {
    Device::new(0).expect("a CUDA device")
}

#[test]
#[ignore = "needs a CUDA device"]
fn head_size_64_matches_the_cpu_reference() {
    let dev = device();
    let s = seed();
    for (i, (b, nh, t)) in [
        (1, 4, 1024),
        (2, 3, 1000),
        (3, 2, 130),
        (1, 2, 77),
        (2, 1, 1),
        (1, 1, 64),
    ]
    .into_iter()
    .enumerate()
    {
        parity(&dev, AttentionDims { b, nh, t, hs: 64 }, s.wrapping_add(i as u64));
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn head_size_128_matches_the_cpu_reference() {
    let dev = device();
    let s = seed();
    for (i, (b, nh, t)) in [(1, 2, 1024), (2, 2, 1000), (1, 3, 77), (1, 1, 17)]
        .into_iter()
        .enumerate()
    {
        parity(
            &dev,
            AttentionDims { b, nh, t, hs: 128 },
            s.wrapping_add(100 + i as u64),
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn forward_and_backward_are_bitwise_deterministic() {
    let dev = device();
    for hs in [64, 128] {
        let d = AttentionDims {
            b: 2,
            nh: 3,
            t: 1000,
            hs,
        };
        let mut rng = Rng(seed());
        let (q, k, v, dout) = (
            rng.bf16_vec(d.qkv_len(), 1.0),
            rng.bf16_vec(d.qkv_len(), 1.0),
            rng.bf16_vec(d.qkv_len(), 1.0),
            rng.bf16_vec(d.qkv_len(), 1.0),
        );
        let first = run_gpu(&dev, d, &q, &k, &v, &dout);
        let second = run_gpu(&dev, d, &q, &k, &v, &dout);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (name, a, b) in [
            ("out", &first.0, &second.0),
            ("lse", &first.1, &second.1),
            ("dq", &first.2, &second.2),
            ("dk", &first.3, &second.3),
            ("dv", &first.4, &second.4),
        ] {
            assert!(bits(a) == bits(b), "hs={hs}: {name} differs between two identical runs");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn wrong_lengths_are_errors() {
    let dev = device();
    let d = AttentionDims {
        b: 1,
        nh: 1,
        t: 16,
        hs: 64,
    };
    let q = dev.zeros::<bf16>(d.qkv_len()).expect("alloc");
    let mut out = dev.zeros::<bf16>(d.qkv_len() - 1).expect("alloc");
    let mut lse = dev.zeros::<f32>(d.rows_len()).expect("alloc");
    assert!(flash_attention_forward(&dev, &mut out, &mut lse, &q, &q, &q, d).is_err());
}
