//! Shared helpers for the engine's integration tests: a tiny model and deterministic batches.

#![allow(dead_code)]

use baton_engine::data::Batch;
use baton_engine::GptConfig;

/// Sequences per batch.
pub const BATCH: usize = 8;
/// Tokens per sequence.
pub const SEQ: usize = 8;
/// Vocabulary.
pub const VOCAB: usize = 29;

/// A 6-block model: 8 layer units, enough for 4 stages × 2 chunks.
pub fn tiny_model() -> GptConfig {
    GptConfig {
        vocab_size: VOCAB,
        max_seq: SEQ,
        layers: 6,
        d_model: 16,
        heads: 2,
    }
}

/// `n` deterministic pseudo-random batches (xorshift), different per step.
pub fn batches(n: usize) -> Vec<Batch> {
    batches_with(n, BATCH, SEQ, VOCAB, 0x9e37_79b9_7f4a_7c15)
}

/// `n` batches of `batch` sequences of `seq` tokens below `vocab`, from a xorshift seeded by `seed`.
pub fn batches_with(n: usize, batch: usize, seq: usize, vocab: usize, seed: u64) -> Vec<Batch> {
    let mut state = seed;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % vocab as u64) as u32
    };
    (0..n)
        .map(|_| {
            let stream: Vec<u32> = (0..batch * (seq + 1)).map(|_| next()).collect();
            let mut inputs = Vec::new();
            let mut targets = Vec::new();
            for row in stream.chunks(seq + 1) {
                inputs.extend_from_slice(&row[..seq]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch {
                inputs,
                targets,
                batch,
                seq,
            }
        })
        .collect()
}

/// Where a backend-generic suite runs: the stages' backends, and how results of two layouts are compared.
pub trait Device {
    /// The backend.
    type B: baton_engine::Backend;
    /// `p` backends, one per stage.
    fn stages(&self, p: u32) -> Vec<Self::B>;
    /// `None`: runs of different layouts must agree bit for bit (the CPU). `Some(tol)`: their losses and
    /// parameters must agree within this relative error (a GPU, whose reductions may be grouped differently).
    fn tolerance(&self) -> Option<f64>;
}

/// The CPU backend: bitwise.
pub struct OnCpu;

impl Device for OnCpu {
    type B = baton_engine::Cpu;
    fn stages(&self, p: u32) -> Vec<baton_engine::Cpu> {
        vec![baton_engine::Cpu; p as usize]
    }
    fn tolerance(&self) -> Option<f64> {
        None
    }
}

/// The CUDA backend in fp32 on GPU 0, one stream per stage (needs a CUDA device).
pub struct OnCuda;

impl Device for OnCuda {
    type B = baton_engine::backend::Cuda;
    fn stages(&self, p: u32) -> Vec<baton_engine::backend::Cuda> {
        use baton_engine::backend::{Cuda, Precision};
        let first = Cuda::with_precision(0, Precision::F32).expect("a CUDA device");
        let mut all = vec![first.clone()];
        for _ in 1..p {
            all.push(first.with_new_stream().expect("a second stream"));
        }
        all
    }
    fn tolerance(&self) -> Option<f64> {
        Some(1e-4)
    }
}

/// Relative norm error `‖got − want‖ / ‖want‖` (0 when both are zero).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(*g) - f64::from(*w)).powi(2);
        den += f64::from(*w).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Instantiates each listed test `fn name(d: &impl Device)` once per backend: `cpu::name` (run by CI) and
/// `cuda::name` (ignored: needs a CUDA device; run by `scripts/gpu-check.sh` with `--ignored cuda::`).
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod cpu {
            $( #[test] fn $name() { super::$name(&super::common::OnCpu) } )*
        }
        mod cuda {
            $( #[test] #[ignore = "needs a CUDA device"] fn $name() { super::$name(&super::common::OnCuda) } )*
        }
    };
}
