//! CUDA: the kernel sources (`kernels/cuda/*.cu`, see [`registry`]), their run-time build with NVRTC and an
//! on-disk cache ([`nvrtc`]), the per-context [`KernelLibrary`] and [`Device`], and one typed launcher per kernel
//! (the modules named after the kernel families).
//!
//! Nothing here needs CUDA at build time: the driver, NVRTC and cuBLAS are loaded at run time (cudarc's
//! `dynamic-loading`), and every entry point returns [`CudaError::NoCudaDevice`] / [`CudaError::NvrtcMissing`]
//! instead of panicking when they are absent.
//!
//! Adding a kernel family: add a [`KernelSource`] to [`registry::SOURCES`] (CI compiles every entry for sm_90 and
//! sm_80 and fails on spills); at run time get its kernels with `device.library().function(&MY_SOURCE, "entry")`
//! and launch with `device.stream().launch_builder(&func)`, mapping errors to [`CudaError::Launch`].

pub mod adamw;
pub mod attention;
pub mod bench_support;
pub mod bias;
pub mod blaslt;
pub mod classifier;
pub mod device;
pub mod elementwise;
pub mod embedding;
pub mod error;
pub mod flash_attention;
pub mod gemm;
pub mod layernorm;
pub mod norm;
pub mod nvrtc;
pub mod peak;
pub mod registry;

pub use cudarc;
pub use device::{cublas_available, cublaslt_available, device_count, driver_available, Device, Elem, KernelLibrary};
pub use embedding::Tokens;
pub use error::{CudaError, Result};
pub use nvrtc::{compile, nvrtc_available, nvrtc_version, Arch, BuildOptions, Compiled, KernelResources};
pub use registry::{KernelSource, SOURCES};
