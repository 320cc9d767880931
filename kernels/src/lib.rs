//! Baton compute kernels.
//!
//! [`cpu`] holds the f32 CPU reference implementation of every GPT-2 op (forward and backward), written once
//! over the [`cpu::Float`] trait so the same code also runs in f64 for finite-difference gradient checks.
//! The kernels work on flat row-major slices with explicit shape arguments, following llm.c.
//!
//! [`cuda`] holds the CUDA kernels (bf16 storage with fp32 accumulation, plus fp32 variants), their NVRTC build
//! with an on-disk cache, and typed launchers; it builds without CUDA and reports a missing driver or NVRTC as an
//! error at run time.
#![warn(missing_docs)]
// The kernels mirror llm.c's flat-slice signatures: outputs, stashes, inputs, weights, then the shape.

pub mod cpu;
pub mod cuda;
pub mod fast;
