//! The error type of the CUDA layer: every variant names what failed (the kernel, the source, the buffer).

use cudarc::driver::{DriverError, LaunchConfig};
use thiserror::Error;

/// Everything the CUDA layer can report. Nothing in `baton_kernels::cuda` panics on a missing library, a missing
/// device or a bad shape; it returns one of these.
#[derive(Debug, Error)]
pub enum CudaError {
    /// The CUDA driver library (`libcuda.so`) could not be loaded, or it reports no device with this ordinal.
    #[error("no CUDA device: {0}")]
    NoCudaDevice(String),
    /// The NVRTC library (`libnvrtc.so.13`) could not be loaded.
    #[error(
        "NVRTC not found ({0}); install it with `python3 -m pip install nvidia-cuda-nvrtc==13.0.88` and put \
         its nvidia/cu13/lib on LD_LIBRARY_PATH (scripts/test.sh does both)"
    )]
    NvrtcMissing(String),
    /// The cuBLAS (or cuBLASLt) library could not be loaded.
    #[error("cuBLAS not found: {0}")]
    CublasMissing(String),
    /// NVRTC rejected a source; `log` is its full program log.
    #[error("NVRTC: compiling {source_name} for {arch} failed: {reason}\n{log}")]
    Compile {
        /// The registry name of the source.
        source_name: String,
        /// The target (`sm_90`).
        arch: String,
        /// NVRTC's result code.
        reason: String,
        /// NVRTC's program log (compiler errors, ptxas report).
        log: String,
    },
    /// A CUDA driver call (allocation, copy, module load, synchronisation) failed.
    #[error("CUDA driver: {op}: {source}")]
    Driver {
        /// What was being done.
        op: String,
        /// The driver's error.
        source: DriverError,
    },
    /// A kernel launch failed.
    #[error("launching {kernel} with grid {:?}, block {:?}, {} bytes of shared memory: {source}", cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes)]
    Launch {
        /// The kernel's entry point.
        kernel: &'static str,
        /// The launch configuration.
        cfg: LaunchConfig,
        /// The driver's error.
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {op}: {reason}")]
    Cublas {
        /// The call.
        op: &'static str,
        /// The cuBLAS status.
        reason: String,
    },
    /// Buffers do not match the shapes given to an op (checked before any launch).
    #[error("{op}: {reason}")]
    Shape {
        /// The op (launcher) name.
        op: &'static str,
        /// What does not match.
        reason: String,
    },
    /// The kernel cache directory could not be read or written (a corrupt entry is not an error: it is rebuilt).
    #[error("kernel cache {path}: {source}")]
    Cache {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Shorthand result type of the CUDA layer.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl CudaError {
    /// A driver error with what was being done.
    pub fn driver(op: impl Into<String>, source: DriverError) -> Self {
        CudaError::Driver { op: op.into(), source }
    }

    /// A shape error of `op`.
    pub fn shape(op: &'static str, reason: impl Into<String>) -> Self {
        CudaError::Shape {
            op,
            reason: reason.into(),
        }
    }
}

/// Returns a [`CudaError::Shape`] unless `got == want`; `what` names the buffer or dimension.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaError::shape(
            op,
            format!("{what} holds {got} elements, expected {want}"),
        ))
    }
}

/// Errors raised where they cannot be returned (in `Drop`: destroying a cuBLASLt handle or an NVRTC program, the
/// engine's pinned staging buffers and checkpoint writer), kept for the caller to collect with
/// [`take_drop_errors`]. One recorder for the whole process; at most [`DROP_ERRORS_MAX`] are kept, later ones are
/// counted.
static DROP_ERRORS: std::sync::Mutex<(Vec<String>, u64)> = std::sync::Mutex::new((Vec::new(), 0));

/// Most errors from `Drop` kept between two [`take_drop_errors`] calls.
pub const DROP_ERRORS_MAX: usize = 64;

/// Records an error raised in a `Drop` implementation (`what` says which object).
pub fn record_drop_error(what: &str, error: impl std::fmt::Display) {
    let mut guard = DROP_ERRORS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.0.len() < DROP_ERRORS_MAX {
        guard.0.push(format!("{what}: {error}"));
    } else {
        guard.1 += 1;
    }
}

/// The errors recorded in `Drop` since the last call, and how many more were dropped past the limit.
pub fn take_drop_errors() -> (Vec<String>, u64) {
    let mut guard = DROP_ERRORS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    (std::mem::take(&mut guard.0), std::mem::take(&mut guard.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_errors_are_kept_up_to_the_limit_then_counted() {
        let _ = take_drop_errors();
        for i in 0..DROP_ERRORS_MAX + 3 {
            record_drop_error("a test object", format!("failure {i}"));
        }
        let (list, more) = take_drop_errors();
        assert_eq!(list.len(), DROP_ERRORS_MAX);
        assert_eq!(list[0], "a test object: failure 0");
        assert_eq!(more, 3);
        assert_eq!(take_drop_errors(), (Vec::new(), 0));
    }
}
