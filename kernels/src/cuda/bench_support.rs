//! Bench cases of the memory-bound kernels, for `benches/kernels.rs`: each case owns its (random, never zero)
//! inputs on the device and a closure that launches the kernel once; the bench times it with CUDA events and
//! reports GB/s from [`MemCase::bytes`], the fewest bytes the kernel must move (each input read once, each output
//! written once), against the measured copy bandwidth. The bf16 variants are timed (the training-path precision).

use cudarc::driver::CudaSlice;
use half::bf16;

use super::attention::AttentionShape;
use super::device::Device;
use super::embedding::Tokens;
use super::error::Result;
use super::{adamw, attention, bias, classifier, elementwise, embedding, layernorm, norm};
use crate::cpu::AdamW;

/// GPT-2 124M: channels.
pub const C: usize = 768;
/// GPT-2 124M: heads.
pub const NH: usize = 12;
/// GPT-2 124M: sequence length.
pub const T: usize = 1024;
/// GPT-2 vocabulary padded to a multiple of 128 (llm.c's layout; keeps the classifier's 16-byte path).
pub const V: usize = 50_304;
/// GPT-2 124M parameter count (AdamW, norm and cast cases).
pub const PARAMS: usize = 124_475_904;

/// One timed kernel: name, shape, bytes moved per run, and the launch.
pub struct MemCase {
    /// The kernel (entry point family).
    pub kernel: &'static str,
    /// The shape, as text (`B=16_T=1024_C=768`: no spaces, the SUMMARY lines are space-separated).
    pub shape: String,
    /// Fewest bytes one run must move through device memory.
    pub bytes: f64,
    /// Launches the kernel once (on the device's stream; no synchronisation).
    pub run: Box<dyn FnMut() -> Result<()>>,
}

/// Deterministic non-zero pseudo-random values in [-1, 1) (xorshift; the seed varies per buffer).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Elements generated on the host per buffer; larger buffers repeat this chunk (device-to-device copies).
const CHUNK_ELEMS: usize = 1 << 20;

/// A device buffer of `n` values from `values(.., seed)`, tiled from one host-generated chunk.
fn tiled<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    dev: &Device,
    n: usize,
    seed: u64,
    conv: impl Fn(f32) -> T,
) -> Result<CudaSlice<T>> {
    let chunk: Vec<T> = values(n.min(CHUNK_ELEMS), seed).into_iter().map(conv).collect();
    let src = dev.upload(&chunk)?;
    let mut buf = dev.zeros::<T>(n)?;
    let mut off = 0;
    while off < n {
        let len = chunk.len().min(n - off);
        let mut dst = buf.slice_mut(off..off + len);
        dev.stream()
            .memcpy_dtod(&src.slice(0..len), &mut dst)
            .map_err(|e| super::CudaError::driver("tiling a bench input", e))?;
        off += len;
    }
    Ok(buf)
}

fn bf(dev: &Device, n: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    tiled(dev, n, seed, bf16::from_f32)
}

fn f32s(dev: &Device, n: usize, seed: u64) -> Result<CudaSlice<f32>> {
    tiled(dev, n, seed, |x| x)
}

/// The memory-bound cases at batch `b` (B·T tokens of GPT-2 124M). Allocates a few GB at b = 64.
pub fn memory_bound_cases(dev: &Device, b: usize) -> Result<Vec<MemCase>> {
    let n = b * T;
    let s = 2.0; // bytes per bf16
    let nc = (n * C) as f64;
    let shape = format!("B={b}_T={T}_C={C}");
    let mut cases = Vec::new();

    let ids: Vec<u32> = values(n, 1)
        .iter()
        .map(|v| ((v + 1.0) * 25_000.0) as u32 % 50_257)
        .collect();
    let tokens = Tokens::upload(dev, &ids)?;
    {
        let (d, tokens2) = (dev.clone(), Tokens::upload(dev, &ids)?);
        let (wte, wpe, mut out) = (bf(dev, V * C, 2)?, bf(dev, T * C, 3)?, dev.zeros::<bf16>(n * C)?);
        cases.push(MemCase {
            kernel: "embedding_forward",
            shape: shape.clone(),
            bytes: 2.0 * nc * s + 4.0 * n as f64,
            run: Box::new(move || embedding::embedding_forward(&d, &mut out, &tokens2, &wte, &wpe, b, T, C)),
        });
    }
    {
        let d = dev.clone();
        let (mut dwte, mut dwpe, dout) = (bf(dev, V * C, 4)?, bf(dev, T * C, 5)?, bf(dev, n * C, 6)?);
        let tokens2 = Tokens::upload(dev, &ids)?;
        cases.push(MemCase {
            kernel: "embedding_backward",
            shape: shape.clone(),
            bytes: nc * s + 2.0 * 2.0 * (T * C) as f64 * s,
            run: Box::new(move || embedding::embedding_backward(&d, &mut dwte, &mut dwpe, &dout, &tokens2, b, T, C)),
        });
    }
    drop(tokens);
    {
        let d = dev.clone();
        let (inp, w, bb) = (bf(dev, n * C, 7)?, bf(dev, C, 8)?, bf(dev, C, 9)?);
        let (mut out, mut mean, mut rstd) = (dev.zeros::<bf16>(n * C)?, dev.zeros::<f32>(n)?, dev.zeros::<f32>(n)?);
        cases.push(MemCase {
            kernel: "layernorm_forward",
            shape: shape.clone(),
            bytes: 2.0 * nc * s + 8.0 * n as f64,
            run: Box::new(move || {
                layernorm::layernorm_forward(&d, &mut out, &mut mean, &mut rstd, &inp, &w, &bb, n, C)
            }),
        });
    }
    {
        let d = dev.clone();
        let (a, x, w, bb) = (
            bf(dev, n * C, 10)?,
            bf(dev, n * C, 11)?,
            bf(dev, C, 12)?,
            bf(dev, C, 13)?,
        );
        let (mut resid, mut out) = (dev.zeros::<bf16>(n * C)?, dev.zeros::<bf16>(n * C)?);
        let (mut mean, mut rstd) = (dev.zeros::<f32>(n)?, dev.zeros::<f32>(n)?);
        cases.push(MemCase {
            kernel: "residual_layernorm_forward",
            shape: shape.clone(),
            bytes: 4.0 * nc * s + 8.0 * n as f64,
            run: Box::new(move || {
                layernorm::residual_layernorm_forward(
                    &d, &mut resid, &mut out, &mut mean, &mut rstd, &a, &x, &w, &bb, n, C,
                )
            }),
        });
    }
    {
        let d = dev.clone();
        let (dout, inp, w) = (bf(dev, n * C, 14)?, bf(dev, n * C, 15)?, bf(dev, C, 16)?);
        let (mean, rstd) = (f32s(dev, n, 17)?, tiled(dev, n, 99, |x| 1.0 + 0.1 * x)?);
        let mut dinp = bf(dev, n * C, 18)?;
        let (mut dw, mut db) = (bf(dev, C, 19)?, bf(dev, C, 20)?);
        let d2 = dev.clone();
        let (dout2, inp2) = (bf(dev, n * C, 14)?, bf(dev, n * C, 15)?);
        let (mean2, rstd2) = (f32s(dev, n, 17)?, tiled(dev, n, 99, |x| 1.0 + 0.1 * x)?);
        cases.push(MemCase {
            kernel: "layernorm_backward_input",
            shape: shape.clone(),
            bytes: 4.0 * nc * s + 8.0 * n as f64,
            run: Box::new(move || {
                layernorm::layernorm_backward_input(&d, &mut dinp, &dout, &inp, &w, &mean, &rstd, n, C)
            }),
        });
        cases.push(MemCase {
            kernel: "layernorm_backward_weight",
            shape: shape.clone(),
            bytes: 2.0 * nc * s + 8.0 * n as f64,
            run: Box::new(move || {
                layernorm::layernorm_backward_weight(&d2, &mut dw, &mut db, &dout2, &inp2, &mean2, &rstd2, n, C)
            }),
        });
    }
    {
        let d = dev.clone();
        let d2 = dev.clone();
        let (inp, mut out) = (bf(dev, 4 * n * C, 21)?, dev.zeros::<bf16>(4 * n * C)?);
        let (inp2, dout, mut dinp) = (
            bf(dev, 4 * n * C, 21)?,
            bf(dev, 4 * n * C, 22)?,
            bf(dev, 4 * n * C, 23)?,
        );
        cases.push(MemCase {
            kernel: "gelu_forward",
            shape: format!("B={b}_T={T}_4C={}", 4 * C),
            bytes: 2.0 * 4.0 * nc * s,
            run: Box::new(move || elementwise::gelu_forward(&d, &mut out, &inp)),
        });
        cases.push(MemCase {
            kernel: "gelu_backward",
            shape: format!("B={b}_T={T}_4C={}", 4 * C),
            bytes: 4.0 * 4.0 * nc * s,
            run: Box::new(move || elementwise::gelu_backward(&d2, &mut dinp, &inp2, &dout)),
        });
    }
    {
        let d = dev.clone();
        let (a, x, mut out) = (bf(dev, n * C, 24)?, bf(dev, n * C, 25)?, dev.zeros::<bf16>(n * C)?);
        cases.push(MemCase {
            kernel: "residual_forward",
            shape: shape.clone(),
            bytes: 3.0 * nc * s,
            run: Box::new(move || elementwise::residual_forward(&d, &mut out, &a, &x)),
        });
    }
    {
        let d = dev.clone();
        let (dout, mut dbias) = (bf(dev, n * 3 * C, 26)?, bf(dev, 3 * C, 27)?);
        cases.push(MemCase {
            kernel: "bias_backward",
            shape: format!("B={b}_T={T}_OC={}", 3 * C),
            bytes: 3.0 * nc * s,
            run: Box::new(move || bias::bias_backward(&d, &mut dbias, &dout, n, 3 * C)),
        });
    }
    {
        let d = dev.clone();
        let targets = Tokens::upload(dev, &ids)?;
        let (mut logits, mut losses) = (bf(dev, n * V, 28)?, dev.zeros::<f32>(n)?);
        cases.push(MemCase {
            kernel: "classifier_fused",
            shape: format!("B={b}_T={T}_V={V}"),
            bytes: 2.0 * (n * V) as f64 * s,
            run: Box::new(move || {
                classifier::classifier_fused(&d, &mut logits, &mut losses, &targets, 1.0 / n as f32, n, V)
            }),
        });
    }
    {
        let sh = AttentionShape {
            b,
            t: T,
            nh: NH,
            hs: C / NH,
        };
        let (d, d2, d3, d4) = (dev.clone(), dev.clone(), dev.clone(), dev.clone());
        let qkv = bf(dev, 3 * n * C, 29)?;
        let (mut q, mut k, mut v) = (
            dev.zeros::<bf16>(n * C)?,
            dev.zeros::<bf16>(n * C)?,
            dev.zeros::<bf16>(n * C)?,
        );
        let (y, mut out) = (bf(dev, n * C, 30)?, dev.zeros::<bf16>(n * C)?);
        cases.push(MemCase {
            kernel: "attention_permute",
            shape: format!("B={b}_T={T}_NH={NH}_HS={}", C / NH),
            bytes: 6.0 * nc * s,
            run: Box::new(move || attention::attention_permute(&d, &mut q, &mut k, &mut v, &qkv, sh)),
        });
        cases.push(MemCase {
            kernel: "attention_unpermute",
            shape: format!("B={b}_T={T}_NH={NH}_HS={}", C / NH),
            bytes: 2.0 * nc * s,
            run: Box::new(move || attention::attention_unpermute(&d2, &mut out, &y, sh)),
        });
        let scores = sh.score_elems();
        let (pre, mut att) = (bf(dev, scores, 31)?, dev.zeros::<bf16>(scores)?);
        let (att2, datt, mut dpre) = (bf(dev, scores, 32)?, bf(dev, scores, 33)?, dev.zeros::<bf16>(scores)?);
        let scale = 1.0 / ((C / NH) as f32).sqrt();
        cases.push(MemCase {
            kernel: "causal_softmax_forward",
            shape: format!("B={b}_NH={NH}_T={T}"),
            // Reads the causal half of the scores, writes all of them.
            bytes: 1.5 * scores as f64 * s,
            run: Box::new(move || attention::causal_softmax_forward(&d3, &mut att, &pre, scale, b * NH * T, T)),
        });
        cases.push(MemCase {
            kernel: "causal_softmax_backward",
            shape: format!("B={b}_NH={NH}_T={T}"),
            bytes: 2.0 * scores as f64 * s,
            run: Box::new(move || {
                attention::causal_softmax_backward(&d4, &mut dpre, &datt, &att2, scale, b * NH * T, T)
            }),
        });
    }
    Ok(cases)
}

/// The per-parameter cases (independent of the batch): AdamW (bf16 working copy), the gradient norm, casts.
pub fn parameter_cases(dev: &Device) -> Result<Vec<MemCase>> {
    let p = PARAMS;
    let shape = format!("params={p}");
    let mut cases = Vec::new();
    let cfg = AdamW {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    {
        let d = dev.clone();
        let (mut master, mut m, mut v) = (
            f32s(dev, p, 40)?,
            f32s(dev, p, 41)?,
            tiled(dev, p, 98, |x| 0.01 + 0.005 * x)?,
        );
        let (mut work, grads) = (dev.zeros::<bf16>(p)?, bf(dev, p, 42)?);
        let mut step = 0u32;
        cases.push(MemCase {
            kernel: "adamw_bf16",
            shape: shape.clone(),
            bytes: 28.0 * p as f64,
            run: Box::new(move || {
                step += 1;
                adamw::adamw_bf16(&d, &cfg, &mut master, &mut work, &grads, &mut m, &mut v, step)
            }),
        });
    }
    {
        let d = dev.clone();
        let grads = bf(dev, p, 43)?;
        let mut out = dev.zeros::<f64>(1)?;
        cases.push(MemCase {
            kernel: "sum_squares_bf16",
            shape: shape.clone(),
            bytes: 2.0 * p as f64,
            run: Box::new(move || norm::sum_squares_into(&d, &grads, &mut out.as_view_mut())),
        });
    }
    {
        let (d, d2) = (dev.clone(), dev.clone());
        let (src, mut dst) = (f32s(dev, p, 44)?, dev.zeros::<bf16>(p)?);
        let (src2, mut dst2) = (bf(dev, p, 45)?, dev.zeros::<f32>(p)?);
        cases.push(MemCase {
            kernel: "cast_f32_to_bf16",
            shape: shape.clone(),
            bytes: 6.0 * p as f64,
            run: Box::new(move || elementwise::cast_f32_to_bf16(&d, &mut dst, &src)),
        });
        cases.push(MemCase {
            kernel: "cast_bf16_to_f32",
            shape,
            bytes: 6.0 * p as f64,
            run: Box::new(move || elementwise::cast_bf16_to_f32(&d2, &mut dst2, &src2)),
        });
    }
    Ok(cases)
}
