//! The CPU backend's fast f32 ops: the same maths as the reference ops of [`crate::cpu`], run on one process-wide
//! thread pool ([`pool`]) and vectorised where the compiler does not do it by itself ([`vector`]).
//!
//! **Determinism.** Work is cut by the problem's shape — fixed row (or column) chunks computed from the sizes
//! alone, never from the number of threads — and every element is computed by one thread with the same
//! operations in the same order as with one thread. So the results are bitwise identical for any thread count
//! and any number of stages sharing the pool. Products are computed chunk by chunk with the single-threaded
//! `matrixmultiply` kernel, whose per-element accumulation order does not depend on how the rows or columns of
//! the output are cut, so a chunked product is bitwise the unchunked one. The vectorised paths (AVX-512,
//! AVX2 + FMA, portable) run the same scalar code compiled for each target, with explicit fused multiply-adds,
//! so they are bitwise identical to each other too.
//!
//! Agreement with the reference ops: bitwise where the arithmetic is the same (products, layer norm, residual,
//! embedding, AdamW); within a few ulp of the reference in f64 where it is not (GELU, cross-entropy, the fused
//! attention: vectorised [`vector::exp`], fixed-lane sums).

pub mod flash;
pub mod gelu;
pub mod gemm;
pub mod ops;
pub mod pool;
#[cfg(test)]
mod testutil;
pub mod vector;

pub use pool::{bind_stage, set_stage_threads, set_threads, stage_threads, threads, THREADS_MAX};
