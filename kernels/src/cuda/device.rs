//! One CUDA device as the launchers see it: its context, a stream, and the [`KernelLibrary`] that compiles
//! (through the NVRTC cache) and loads each registered source once per context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits};
use cudarc::nvrtc::Ptx;

use super::error::{CudaError, Result};
use super::nvrtc::{compile, Arch, BuildOptions};
use super::registry::KernelSource;

/// `Ok` when the CUDA driver library can be loaded; [`CudaError::NoCudaDevice`] otherwise. Checked once per
/// process; every driver call of this crate goes through it first (cudarc panics when it loads a missing library).
pub fn driver_available() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the candidate library names; it calls nothing in them.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        Err(CudaError::NoCudaDevice(
            "the CUDA driver library (libcuda.so) is not installed".into(),
        ))
    }
}

/// `Ok` when the cuBLAS library can be loaded; [`CudaError::CublasMissing`] otherwise.
pub fn cublas_available() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `driver_available`: only dlopen attempts.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::cublas::sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        Err(CudaError::CublasMissing(
            "libcublas.so is not on the library search path".into(),
        ))
    }
}

/// `Ok` when the cuBLASLt library can be loaded; [`CudaError::CublasMissing`] otherwise.
pub fn cublaslt_available() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `driver_available`: only dlopen attempts.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::cublaslt::sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        Err(CudaError::CublasMissing(
            "libcublasLt.so is not on the library search path".into(),
        ))
    }
}

/// The number of CUDA devices; an error (never a panic) when the driver is missing.
pub fn device_count() -> Result<usize> {
    driver_available()?;
    let n = CudaContext::device_count().map_err(|e| CudaError::NoCudaDevice(format!("cuDeviceGetCount: {e}")))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The compiled kernel sources of one context: each [`KernelSource`] is compiled for the context's architecture
/// (or taken from the NVRTC disk cache) and loaded the first time one of its kernels is asked for, then kept.
///
/// Usage (any source of [`super::registry::SOURCES`], including other helpers' entries):
/// ```no_run
/// # use baton_kernels::cuda::{Device, registry};
/// # fn f(dev: &Device) -> baton_kernels::cuda::Result<()> {
/// let func = dev.library().function(&registry::GELU, "gelu_forward_f32")?;
/// # Ok(()) }
/// ```
pub struct KernelLibrary {
    ctx: Arc<CudaContext>,
    arch: Arch,
    options: BuildOptions,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
}

impl std::fmt::Debug for KernelLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLibrary")
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl KernelLibrary {
    /// A library for `ctx`, compiling for the device's own compute capability.
    pub fn new(ctx: Arc<CudaContext>, options: BuildOptions) -> Result<Self> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("reading the compute capability", e))?;
        let arch = Arch {
            major: u32::try_from(major).unwrap_or(0),
            minor: u32::try_from(minor).unwrap_or(0),
        };
        Ok(KernelLibrary {
            ctx,
            arch,
            options,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The architecture the library compiles for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The loaded module of `source`, compiling and loading it on first use.
    pub fn module(&self, source: &'static KernelSource) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(source.name) {
            return Ok(m.clone());
        }
        let compiled = compile(source, self.arch, &self.options)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin))
            .map_err(|e| CudaError::driver(format!("loading the {} cubin for {}", source.name, self.arch), e))?;
        modules.insert(source.name, module.clone());
        Ok(module)
    }

    /// The kernel `kernel` of `source` (which must list it in [`KernelSource::kernels`]).
    pub fn function(&self, source: &'static KernelSource, kernel: &str) -> Result<CudaFunction> {
        if !source.kernels.contains(&kernel) {
            return Err(CudaError::shape(
                "KernelLibrary::function",
                format!("{kernel} is not registered for source {}", source.name),
            ));
        }
        let key = (source.name, kernel.to_string());
        if let Some(f) = self.functions.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(f.clone());
        }
        let module = self.module(source)?;
        let f = module
            .load_function(kernel)
            .map_err(|e| CudaError::driver(format!("looking up {kernel} in {}", source.name), e))?;
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }
}

/// One device for the launchers: a context, the stream every launch goes to (in order), and the kernel library.
/// Cheap to clone (shared handles).
#[derive(Clone, Debug)]
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    library: Arc<KernelLibrary>,
}

impl Device {
    /// Device `ordinal` with a new stream. The context and the [`KernelLibrary`] (built with
    /// [`BuildOptions::from_env`]) are shared by every `Device` of that ordinal in the process, so each source is
    /// compiled and loaded once per device. [`CudaError::NoCudaDevice`] when the driver is missing or has no such
    /// device; never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        type Shared = (Arc<CudaContext>, Arc<KernelLibrary>);
        static SHARED: OnceLock<Mutex<HashMap<usize, Shared>>> = OnceLock::new();
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoCudaDevice(format!(
                "device {ordinal} requested, the driver reports {count}"
            )));
        }
        let mut shared = SHARED
            .get_or_init(|| Mutex::new(HashMap::new()))
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (ctx, library) = match shared.get(&ordinal) {
            Some(s) => s.clone(),
            None => {
                let ctx =
                    CudaContext::new(ordinal).map_err(|e| CudaError::NoCudaDevice(format!("cuCtxCreate: {e}")))?;
                let library = Arc::new(KernelLibrary::new(ctx.clone(), BuildOptions::from_env())?);
                shared.insert(ordinal, (ctx.clone(), library.clone()));
                (ctx, library)
            }
        };
        drop(shared);
        // A created stream also puts the context in cudarc's multi-stream mode: every buffer then records read and
        // write events, and an op on another stream (or a free) waits for them.
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::driver("creating a stream", e))?;
        Ok(Device { ctx, stream, library })
    }

    /// A device over an existing context, stream and library (e.g. a second stream sharing one library).
    pub fn from_parts(ctx: Arc<CudaContext>, stream: Arc<CudaStream>, library: Arc<KernelLibrary>) -> Self {
        Device { ctx, stream, library }
    }

    /// A second handle on the same context and library with its own new stream.
    pub fn with_new_stream(&self) -> Result<Self> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| CudaError::driver("creating a stream", e))?;
        Ok(Device::from_parts(self.ctx.clone(), stream, self.library.clone()))
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launcher enqueues on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel library.
    pub fn library(&self) -> &Arc<KernelLibrary> {
        &self.library
    }

    /// The device's architecture.
    pub fn arch(&self) -> Arch {
        self.library.arch()
    }

    /// Waits for every op queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("synchronising the stream", e))
    }

    /// A zero-filled device buffer of `len` elements (stream-ordered).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<cudarc::driver::CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(|e| CudaError::driver(format!("allocating {len} elements"), e))
    }

    /// A device copy of `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<cudarc::driver::CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(|e| CudaError::driver(format!("uploading {} elements", data.len()), e))
    }

    /// The buffer's contents on the host (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, buf: &cudarc::driver::CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .map_err(|e| CudaError::driver(format!("downloading {} elements", buf.len()), e))
    }
}

/// The storage types of the kernels: `f32` and `bf16`. Picks the entry point of a kernel family.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static + sealed::Sealed {
    /// Index into a `[f32 name, bf16 name]` pair.
    const INDEX: usize;
    /// The entry point for this type out of `[f32 name, bf16 name]`.
    fn pick(names: [&'static str; 2]) -> &'static str {
        names[Self::INDEX]
    }
}

impl Elem for f32 {
    const INDEX: usize = 0;
}
impl Elem for half::bf16 {
    const INDEX: usize = 1;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Threads per block of the 1-D launches of this crate.
pub(crate) const BLOCK_1D: u32 = 256;
/// The largest grid.x the driver accepts.
pub(crate) const GRID_X_MAX: u64 = (1 << 31) - 1;
/// The largest grid.y / grid.z the driver accepts.
pub(crate) const GRID_YZ_MAX: u64 = 65_535;

/// A launch of `threads` threads in blocks of `block` (grid.x = ceil(threads / block)); `None` when there is
/// nothing to do. Errors when the grid would exceed the driver's limit.
pub(crate) fn grid_1d(op: &'static str, threads: u64, block: u32) -> Result<Option<LaunchConfig>> {
    assert!(
        block > 0 && block <= 1024 && block % 32 == 0,
        "{op}: block size {block}"
    );
    if threads == 0 {
        return Ok(None);
    }
    let blocks = threads.div_ceil(u64::from(block));
    if blocks > GRID_X_MAX {
        return Err(CudaError::shape(op, format!("{threads} threads exceed the grid limit")));
    }
    Ok(Some(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }))
}

/// The launch of an element-wise kernel over `n` elements of `T`: one thread per 16-byte pack, plus one per
/// element of the `n % pack` tail (the kernels' indexing).
pub(crate) fn elementwise_cfg<T>(op: &'static str, n: usize) -> Result<Option<LaunchConfig>> {
    let pack = (16 / std::mem::size_of::<T>()) as u64;
    let n = n as u64;
    grid_1d(op, n / pack + n % pack, BLOCK_1D)
}

/// Elements of `T` per 16-byte pack (4 for f32, 8 for bf16): rows whose length is a multiple of it take the
/// kernels' vector path.
pub(crate) fn pack_len<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// Launches `kernel` of `source` on `dev`'s stream with the argument list `[a, b, ...]` (each a reference:
/// `&CudaSlice`, `&mut CudaSlice`, or `&scalar`), mapping a failure to [`CudaError::Launch`]. Evaluates to
/// `Result<()>`. The caller states, in a `// SAFETY:` comment above the invocation, why the argument list matches
/// the kernel's C signature (count, order, types) and why every buffer covers what the kernel indexes.
macro_rules! launch_kernel {
    ($dev:expr, $source:expr, $kernel:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use cudarc::driver::PushKernelArg as _;
        let kernel: &'static str = $kernel;
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        let func = $dev.library().function(&$source, kernel)?;
        let mut builder = $dev.stream().launch_builder(&func);
        $( builder.arg($arg); )*
        // SAFETY: the argument list and buffer sizes are justified at the invocation (see the macro's contract).
        unsafe { builder.launch(cfg) }
            .map(|_| ())
            .map_err(|source| $crate::cuda::CudaError::Launch { kernel, cfg, source })
    }};
}
pub(crate) use launch_kernel;

/// A dimension as the `u32` the kernels take, or a shape error.
pub(crate) fn dim_u32(op: &'static str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| CudaError::shape(op, format!("{what} = {v} exceeds u32")))
}
