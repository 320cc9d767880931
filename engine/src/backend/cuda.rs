//! The CUDA backend: [`CudaBuf`] buffers on one device with a compute and a copy stream, the kernels of
//! `baton_kernels::cuda`, cuBLASLt for the forward matrix products (bias fused into the epilogue; in bf16 the
//! MLP's GELU too, forward and backward: GELU_AUX_BIAS / DGELU; `BATON_CUDA_GEMM=cublas` or a missing libcublasLt:
//! cuBLAS + separate bias and GELU kernels) and cuBLAS for the other backward products. Attention runs the fused
//! **flash** kernels in bf16 when the head size is 64 or 128 (stash: the row logsumexp, (b, nh, t) fp32;
//! deterministic backward), and otherwise (fp32, other head sizes, or `BATON_CUDA_ATTENTION=simple`) the
//! materialised path: permute, strided batched GEMM, causal softmax, GEMM, unpermute (stash: the (b, nh, t, t)
//! attention matrix); either way the stash has [`Backend::attention_stash_len`] elements. Two [`Precision`]s:
//! - **fp32** ([`Cuda::new`]): every buffer fp32, fp32 kernels, `cublasSgemm`; tracks the CPU within 1e-4.
//! - **bf16 mixed precision** ([`Cuda::with_precision`]): activations, weights and gradients bf16 (bf16 kernels,
//!   fp32 math inside them); parameters keep an fp32 master copy beside the bf16 working copy the ops read
//!   ([`crate::Backend::upload_param`]); AdamW moments ([`crate::Backend::zeros_state`]), layer-norm statistics
//!   and per-token losses are fp32; every GEMM is `cublasGemmEx` with bf16 operands and fp32 accumulation
//!   (`CUBLAS_COMPUTE_32F`), including the attention scores and `att · V` (bf16 `att`); `sum` / `sum_squares`
//!   accumulate in fp64 in a fixed order; AdamW updates the fp32 master and moments and rewrites the bf16 copy.
//!
//! How each op gets its operands in the element type it computes in (and the casts taken when a buffer's storage
//! differs, which a consistent run never hits) is described in `cuda_buf.rs`. `upload` always makes an exact fp32
//! buffer (so `Pipeline::load`'s weights and moments lose nothing; a weight loaded that way is promoted to master +
//! working copy by its first AdamW step); `zeros` makes a buffer of the backend's precision; `download` returns
//! fp32 (a parameter's master).
//!
//! Ops are queued on the backend's stream in call order and return before they finish; `download`, `sum`,
//! `sum_squares` and `synchronize` wait. Buffers carry cudarc's read/write events, so a buffer used on another
//! stream (another stage's `Cuda`) is waited for automatically.
//!
//! Each `Cuda` has two streams: the **compute** stream every op runs on, and a **copy** stream that incoming
//! transfers run on, so a copy neither queues behind the receiving stage's compute nor holds it up (a copy queued
//! on the consumer's compute stream from the producer's thread would make the consumer's unrelated work wait for
//! the producer). `transfer` to another `Cuda` takes the route `cuda_peer.rs` decides once per pair of devices
//! ([`CopyRoute`]):
//! - **same device** (e.g. two stages sharing the one GPU): a device-to-device copy on the **destination's** copy
//!   stream, after waiting on the source buffer's last write (cudarc's write event);
//! - **peer** (different devices, peer access enabled once per pair with `cuCtxEnablePeerAccess` and the source
//!   pool's `cuMemPoolSetAccess`): `cuMemcpyPeerAsync` on the destination's copy stream, after an event recorded on
//!   the source stream;
//! - **pinned host** (different devices without peer access): device→pinned on the **source's** copy stream (after
//!   the buffer's last write), pinned→device on the destination's copy stream after an event recorded behind the
//!   first copy; no host synchronisation in the steady state.
//!
//! The source stream then waits on an event recorded after the copy before the source buffer is freed, so the
//! free cannot overtake the copy. Every storage kind is copied as is (a parameter: both copies). The received
//! buffer is allocated on the copy stream that writes it, and its write event (recorded after the copy) orders
//! the destination's consumers after the copy; a pooled receive buffer's read events order the next copy into it
//! after its last reader.
//!
//! **Memory.** Buffers come from the stream-ordered allocator (`cuMemAllocAsync` on the device's default memory
//! pool) per op. At creation the backend sets that pool's release threshold to `u64::MAX` (`cuda_peer.rs`), so
//! freed memory stays in the pool: after the first training step every allocation is served from memory the pool
//! already holds, i.e. no `cuMemAlloc` / `cuMemFree` (no driver reservation or release) in the steady state. The
//! per-op pool calls themselves remain for scratch and stashes; received activations and gradients come from the
//! stage's receive pool (`pool.rs`), filled on the first step.

use std::sync::{Arc, Mutex};

use baton_kernels::cpu::AdamW;
use baton_kernels::cuda::blaslt::{Accumulate, Blaslt};
use baton_kernels::cuda::cudarc::cublas::sys::cublasOperation_t;
use baton_kernels::cuda::cudarc::cublas::{CudaBlas, GemmConfig};
use baton_kernels::cuda::cudarc::driver::sys::CUevent_flags;
use baton_kernels::cuda::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use baton_kernels::cuda::flash_attention::AttentionDims;
use baton_kernels::cuda::{self as kc, attention::AttentionShape, cublas_available, CudaError, Device, Elem, Tokens};
use half::bf16;

use super::cuda_buf::{read_plan, write_plan, In, Mode, Out, ReadPlan, Stored, WritePlan};
use super::cuda_buf::{CudaBuf, CudaData, Precision};
use super::cuda_peer::{self as peer, CopyRoute};
use super::pool::{Pooled, RecvPool};
use super::{unfused, Backend};
use crate::error::{EngineError, Result};

/// The CUDA backend on one device: its context, a compute stream, the loaded kernel library, a cuBLAS handle
/// bound to the stream, and the [`Precision`] of its buffers. Cheap to clone (shared handles, same stream).
#[derive(Clone)]
pub struct Cuda {
    ordinal: usize,
    dev: Device,
    /// The stage's copy stream: incoming transfers run here, so a copy neither waits behind the stage's compute
    /// nor holds it up; the buffers' cudarc events order the copy before its readers.
    copy: Arc<CudaStream>,
    /// Attention runs the fused flash kernels where they apply (see [`Cuda::uses_flash`]).
    flash: bool,
    /// cuBLASLt for the forward matrix products (bias fused into the epilogue); `None` where libcublasLt is
    /// missing or it is switched off (then cuBLAS and a bias kernel). A lock because a handle is not `Sync`
    /// (one stage thread uses it; uncontended).
    lt: Option<Arc<Mutex<Blaslt>>>,
    blas: Arc<CudaBlas>,
    precision: Precision,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.ordinal)
            .field("arch", &self.dev.arch())
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

/// Environment variable that selects the attention path: `simple` for the materialised one (permute, GEMM,
/// softmax, GEMM), anything else or unset for the fused flash kernels where they apply.
pub const ATTENTION_ENV: &str = "BATON_CUDA_ATTENTION";

/// Environment variable that selects the forward matrix products: `cublas` for cuBLAS + a bias kernel, anything
/// else or unset for cuBLASLt with the bias fused into its epilogue (where libcublasLt loads).
pub const GEMM_ENV: &str = "BATON_CUDA_GEMM";

const T_OP: cublasOperation_t = cublasOperation_t::CUBLAS_OP_T;
const N_OP: cublasOperation_t = cublasOperation_t::CUBLAS_OP_N;

/// One column-major GEMM of a strided batch: `C = alpha · op(A) · op(B) + beta · C`, `op(A)` (m, k).
#[derive(Clone, Copy)]
struct Gemm3 {
    transa: cublasOperation_t,
    transb: cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    /// Elements between consecutive matrices of the batch (A, B, C).
    strides: (usize, usize, usize),
    batch: usize,
    beta: f32,
}

/// Elements a column-major operand spans: `ld · (cols − 1) + rows`, for `op` applied to a (rows, cols) result.
fn span(trans: cublasOperation_t, rows: usize, cols: usize, ld: usize) -> usize {
    let (r, c) = if trans == N_OP { (rows, cols) } else { (cols, rows) };
    if r == 0 || c == 0 {
        0
    } else {
        ld * (c - 1) + r
    }
}

/// Calls `$self.$method::<T>(args)` with `T` the element type of `$p` (a [`Precision`]).
macro_rules! dispatch {
    ($p:expr, $self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match $p {
            Precision::F32 => $self.$method::<f32>($($arg),*),
            Precision::Bf16 => $self.$method::<bf16>($($arg),*),
        }
    };
}

impl Cuda {
    /// The fp32 backend on device `ordinal`, with a new stream. [`EngineError::NoCudaDevice`] when the CUDA driver
    /// or cuBLAS is not installed or there is no such device — never a panic.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Cuda::with_precision(ordinal, Precision::F32)
    }

    /// The backend on device `ordinal` in `precision`, with a new stream; errors as [`Cuda::new`].
    pub fn with_precision(ordinal: usize, precision: Precision) -> Result<Cuda> {
        let dev = Device::new(ordinal).map_err(|e| match e {
            CudaError::NoCudaDevice(why) => EngineError::NoCudaDevice(why),
            other => EngineError::NoCudaDevice(other.to_string()),
        })?;
        Cuda::on(ordinal, dev, precision)
    }

    /// A second backend on the same device (shared context and kernels) with its own stream and the same
    /// precision: e.g. two pipeline stages on one GPU.
    pub fn with_new_stream(&self) -> Result<Cuda> {
        let dev = self.dev.with_new_stream().map_err(|e| self.err("with_new_stream", e))?;
        Cuda::on(self.ordinal, dev, self.precision)
    }

    fn on(ordinal: usize, dev: Device, precision: Precision) -> Result<Cuda> {
        cublas_available().map_err(|e| EngineError::NoCudaDevice(e.to_string()))?;
        // Freed memory stays in the device's default pool: no driver allocation in the steady state.
        peer::keep_pool_memory(dev.context()).map_err(|e| EngineError::Backend {
            backend: format!("cuda:{ordinal}"),
            op: "memory pool",
            reason: format!("setting the release threshold: {e}"),
            source: Some(Box::new(e)),
        })?;
        let blas = CudaBlas::new(dev.stream().clone())
            .map_err(|e| EngineError::NoCudaDevice(format!("cublasCreate: {e:?}")))?;
        let copy = dev.context().new_stream().map_err(|e| EngineError::Backend {
            backend: format!("cuda:{ordinal}"),
            op: "copy stream",
            reason: format!("creating the copy stream: {e}"),
            source: Some(Box::new(e)),
        })?;
        // `BATON_CUDA_ATTENTION=simple` keeps the materialised attention path (to compare the two).
        let flash = !std::env::var(ATTENTION_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("simple"));
        // `BATON_CUDA_GEMM=cublas` keeps the forward products on cuBLAS + the bias kernel.
        let lt = if std::env::var(GEMM_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("cublas")) {
            None
        } else {
            Blaslt::new(&dev).ok().map(|lt| Arc::new(Mutex::new(lt)))
        };
        Ok(Cuda {
            ordinal,
            dev,
            copy,
            flash,
            lt,
            blas: Arc::new(blas),
            precision,
        })
    }

    /// This backend with the fused flash-attention kernels on (the default, where they apply: bf16, head size 64
    /// or 128) or off (the materialised path: permute, GEMM, softmax, GEMM).
    pub fn with_flash_attention(mut self, on: bool) -> Cuda {
        self.flash = on;
        self
    }

    /// This backend with its forward matrix products on cuBLASLt (bias in the epilogue; the default where
    /// libcublasLt loads) or on cuBLAS + a bias kernel.
    pub fn with_cublaslt(mut self, on: bool) -> Result<Cuda> {
        self.lt = if on {
            let lt = Blaslt::new(&self.dev).map_err(|e| self.err("with_cublaslt", e))?;
            Some(Arc::new(Mutex::new(lt)))
        } else {
            None
        };
        Ok(self)
    }

    /// Whether the forward matrix products run on cuBLASLt.
    pub fn uses_cublaslt(&self) -> bool {
        self.lt.is_some()
    }

    /// The precision of this backend's activations, weights and gradients.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The kernels' view of the device (context, stream, library), for callers that launch kernels directly.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// How [`Backend::transfer`] from this backend to `dst` moves its bytes (decided, and peer access enabled,
    /// once per pair of devices).
    pub fn route_to(&self, dst: &Cuda) -> Result<CopyRoute> {
        peer::route(self.dev.context(), dst.dev.context())
            .map_err(|e| self.err("transport_to", CudaError::driver("enabling peer access", e)))
    }

    /// [`Backend::transfer`] forced through pinned host memory whatever the devices (the fallback route where
    /// peer access is impossible): for tests and benches on one GPU.
    pub fn transfer_via_pinned_host(&self, buf: CudaBuf, dst: &Cuda) -> Result<CudaBuf> {
        self.transfer_by(buf, dst, CopyRoute::PinnedHost, None)
    }

    /// Bytes the device's default memory pool holds from the driver (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`): flat
    /// after the first step when nothing is allocated outside the pool in the steady state.
    pub fn pool_reserved_bytes(&self) -> Result<u64> {
        peer::pool_reserved_bytes(self.dev.context())
            .map_err(|e| self.err("pool_reserved_bytes", CudaError::driver("cuMemPoolGetAttribute", e)))
    }

    fn err(&self, op: &'static str, e: CudaError) -> EngineError {
        EngineError::Backend {
            backend: self.name(),
            op,
            reason: e.to_string(),
            source: Some(Box::new(e)),
        }
    }

    fn shape(&self, op: &'static str, reason: String) -> EngineError {
        EngineError::Backend {
            backend: self.name(),
            op,
            reason,
            source: None,
        }
    }

    fn check(&self, op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(self.shape(op, format!("{what} holds {got} elements, expected {want}")))
        }
    }

    /// Runs a strided-batched GEMM in `T` (fp32 accumulation) after checking every operand covers what cuBLAS will
    /// touch.
    fn gemm<T: Stored>(
        &self,
        op: &'static str,
        g: Gemm3,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        c: &mut CudaSlice<T>,
    ) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let last = g.batch - 1;
        let need_a = last * g.strides.0 + span(g.transa, g.m, g.k, g.lda);
        let need_b = last * g.strides.1 + span(g.transb, g.k, g.n, g.ldb);
        let need_c = last * g.strides.2 + span(N_OP, g.m, g.n, g.ldc);
        if a.len() < need_a || b.len() < need_b || c.len() < need_c {
            return Err(self.shape(
                op,
                format!(
                    "GEMM operands too short: A {} < {need_a}, B {} < {need_b} or C {} < {need_c}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| self.shape(op, format!("GEMM dimension {v} exceeds i32")));
        let long = |v: usize| i64::try_from(v).map_err(|_| self.shape(op, format!("GEMM stride {v} exceeds i64")));
        let cfg = GemmConfig {
            transa: g.transa,
            transb: g.transb,
            m: int(g.m)?,
            n: int(g.n)?,
            k: int(g.k)?,
            alpha: T::scalar(1.0),
            lda: int(g.lda.max(1))?,
            ldb: int(g.ldb.max(1))?,
            beta: T::scalar(g.beta),
            ldc: int(g.ldc.max(1))?,
        };
        let batch = if g.batch == 1 {
            None
        } else {
            Some((
                int(g.batch)?,
                long(g.strides.0)?,
                long(g.strides.1)?,
                long(g.strides.2)?,
            ))
        };
        // SAFETY: the spans of A, B and C that cuBLAS reads or writes for these (m, n, k, ld, op) were checked
        // against the buffer lengths above — for a batch, those of the last matrix (offset (batch − 1) · stride),
        // which bound all; all three buffers live on this backend's stream's device.
        unsafe { T::gemm(&self.blas, cfg, batch, a, b, c) }
            .map_err(|e| self.shape(op, format!("cuBLAS GEMM ({}) failed: {e}", T::PRECISION)))
    }

    fn scratch<T: Elem>(&self, op: &'static str, len: usize) -> Result<CudaSlice<T>> {
        self.dev.zeros::<T>(len).map_err(|e| self.err(op, e))
    }

    /// `buf` read as `T`: in place, or a cast scratch copy (see `cuda_buf.rs`).
    fn read<'a, T: Stored>(&self, op: &'static str, buf: &'a CudaBuf) -> Result<In<'a, T>> {
        if read_plan(buf.storage(), T::PRECISION) == ReadPlan::InPlace {
            if let Some(s) = T::view(buf) {
                return Ok(In::Borrowed(s));
            }
        }
        let src = <T::Other as Stored>::view(buf)
            .ok_or_else(|| self.shape(op, format!("{buf:?} holds neither element type")))?;
        let mut dst = self.scratch::<T>(op, src.len())?;
        T::cast_from(&self.dev, &mut dst, src).map_err(|e| self.err(op, e))?;
        Ok(In::Owned(dst))
    }

    /// `buf` written as `T` (see [`WritePlan`]); hand the result to [`Cuda::finish`].
    fn write<'a, T: Stored>(&self, op: &'static str, buf: &'a mut CudaBuf, mode: Mode) -> Result<Out<'a, T>> {
        match write_plan(buf.storage(), T::PRECISION, mode) {
            WritePlan::Retype => *buf = T::wrap(self.scratch::<T>(op, buf.len())?),
            WritePlan::CastBack => {
                let (other, _) = <T::Other as Stored>::view_mut(buf)
                    .ok_or_else(|| self.shape(op, "a cast-back output must be a plain buffer".into()))?;
                let mut tmp = self.scratch::<T>(op, other.len())?;
                T::cast_from(&self.dev, &mut tmp, other).map_err(|e| self.err(op, e))?;
                return Ok(Out::Scratch(tmp, other));
            }
            WritePlan::InPlace | WritePlan::InPlaceThenMirror => {}
        }
        let (slice, mirror) = T::view_mut(buf).ok_or_else(|| self.shape(op, "output storage mismatch".into()))?;
        Ok(Out::Direct(slice, mirror))
    }

    /// Completes a write: refreshes a parameter's other copy, or casts a scratch copy back.
    fn finish<T: Stored>(&self, op: &'static str, out: Out<'_, T>) -> Result<()> {
        match out {
            Out::Direct(_, None) => Ok(()),
            Out::Direct(s, Some(mirror)) => <T::Other as Stored>::cast_from(&self.dev, mirror, s),
            Out::Scratch(tmp, dst) => <T::Other as Stored>::cast_from(&self.dev, dst, &tmp),
        }
        .map_err(|e| self.err(op, e))
    }

    /// A buffer of `len` elements on `dst`'s **copy** stream whose contents are not initialised: only for a
    /// copy's target. Allocated on the stream that writes it, so the stream-ordered allocator never hands the copy
    /// memory that another stream's pending work still uses.
    fn uninit<T: Elem>(&self, op: &'static str, dst: &Cuda, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller overwrites the whole buffer with a copy queued on `dst`'s copy stream before
        // anything reads it (readers wait on the buffer's write event, recorded after the copy).
        unsafe { dst.copy.alloc::<T>(len) }
            .map_err(|e| self.err(op, CudaError::driver(format!("allocating {len} elements"), e)))
    }

    /// `src` copied into `out` (a buffer of `dst`) by `route`, on `dst`'s copy stream:
    /// - same device or peer access: a device-to-device copy (`cuMemcpyPeerAsync` when the devices differ), after
    ///   `src`'s last write (same context: src's write event; other device: an event recorded on src's stream);
    /// - pinned host: device→pinned on this backend's copy stream (after `src`'s last write), pinned→device on
    ///   `dst`'s copy stream, ordered by events (`cuda_peer.rs`).
    ///
    /// `out` may be a reused receive buffer: its own read/write events make the copy wait for its last readers,
    /// and its write event, recorded after the copy, makes every later reader wait for the copy.
    fn copy_by<T: Elem>(
        &self,
        op: &'static str,
        route: CopyRoute,
        src: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
        dst: &Cuda,
    ) -> Result<()> {
        if src.len() != out.len() {
            return Err(self.shape(op, format!("copy of {} elements into {}", src.len(), out.len())));
        }
        match route {
            CopyRoute::SameDevice | CopyRoute::Peer => dst
                .copy
                .memcpy_dtod(src, out)
                .map_err(|e| self.err(op, CudaError::driver("memcpy_dtod (peer)", e))),
            CopyRoute::PinnedHost => {
                let (src_stream, dst_stream) = (&self.copy, &dst.copy);
                let bytes = src.num_bytes();
                // `device_ptr` makes this copy stream wait on `src`'s last write and records its read event here
                // when the guard drops (after the device→pinned copy is queued), so `src`'s free waits for it;
                // `device_ptr_mut` makes dst's copy stream wait on `out`'s events and records its write event there
                // after the pinned→device copy.
                let (src_ptr, _read) = src.device_ptr(src_stream);
                let (dst_ptr, _write) = out.device_ptr_mut(dst_stream);
                peer::copy_via_pinned_host(src_ptr, src_stream, dst_ptr, dst_stream, bytes)
                    .map_err(|e| self.err(op, CudaError::driver("copy through pinned host memory", e)))
            }
        }
    }

    /// Uninitialised storage on `dst` of the same kind and length as `like` (a copy's target).
    fn alloc_like(&self, op: &'static str, like: &CudaData, dst: &Cuda) -> Result<CudaData> {
        Ok(match like {
            CudaData::F32(s) => CudaData::F32(self.uninit(op, dst, s.len())?),
            CudaData::Bf16(s) => CudaData::Bf16(self.uninit(op, dst, s.len())?),
            CudaData::Param { master, .. } => CudaData::Param {
                master: self.uninit(op, dst, master.len())?,
                working: self.uninit(op, dst, master.len())?,
            },
        })
    }

    /// The transfer of `buf` to `dst` by `route`, into a buffer leased from `pool` (else a new one).
    fn transfer_by(
        &self,
        buf: CudaBuf,
        dst: &Cuda,
        route: CopyRoute,
        pool: Option<&Arc<RecvPool<CudaData>>>,
    ) -> Result<CudaBuf> {
        let op = "transfer";
        let alloc = || self.alloc_like(op, &buf, dst);
        let mut out = match pool {
            Some(pool) => pool.lease(buf.key(), alloc)?,
            None => CudaBuf::new(alloc()?),
        };
        match (&*buf, &mut *out) {
            (CudaData::F32(s), CudaData::F32(o)) => self.copy_by(op, route, s, o, dst)?,
            (CudaData::Bf16(s), CudaData::Bf16(o)) => self.copy_by(op, route, s, o, dst)?,
            (
                CudaData::Param { master, working },
                CudaData::Param {
                    master: out_master,
                    working: out_working,
                },
            ) => {
                self.copy_by(op, route, master, out_master, dst)?;
                self.copy_by(op, route, working, out_working, dst)?;
            }
            (from, to) => {
                return Err(self.shape(
                    op,
                    format!("leased a {:?} buffer for a {:?} one", to.storage(), from.storage()),
                ))
            }
        }
        if route != CopyRoute::PinnedHost {
            // `buf` is freed on its own stream when dropped: make that stream wait for the copy first (across
            // devices cudarc records `buf`'s read event on the source stream, before the copy has run). The pinned
            // route's read event is recorded on this backend's copy stream after the device→pinned copy, and the
            // free waits on it.
            let copied = dst
                .copy
                .record_event(None)
                .map_err(|e| self.err(op, CudaError::driver("recording the copy's event", e)))?;
            self.dev
                .stream()
                .wait(&copied)
                .map_err(|e| self.err(op, CudaError::driver("waiting on the copy's event", e)))?;
        }
        drop(buf);
        Ok(out)
    }

    fn dup<T: Elem>(&self, s: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        self.dev
            .stream()
            .clone_dtod(s)
            .map_err(|e| self.err("duplicate", CudaError::driver("cuMemcpyDtoDAsync", e)))
    }

    fn memset<T: Elem>(&self, s: &mut CudaSlice<T>) -> Result<()> {
        self.dev
            .stream()
            .memset_zeros(s)
            .map_err(|e| self.err("fill_zero", CudaError::driver("cuMemsetD8Async", e)))
    }

    fn concat_t<T: Stored>(&self, parts: &[&CudaBuf]) -> Result<CudaBuf> {
        let op = "concat";
        let mut out = self.scratch::<T>(op, parts.iter().map(|p| p.len()).sum())?;
        let mut at = 0;
        for part in parts {
            let s = self.read::<T>(op, part)?;
            let mut dst = out.slice_mut(at..at + s.len());
            self.dev
                .stream()
                .memcpy_dtod(&*s, &mut dst)
                .map_err(|e| self.err(op, CudaError::driver("cuMemcpyDtoDAsync", e)))?;
            at += s.len();
        }
        Ok(T::wrap(out))
    }

    fn copy_t<T: Stored>(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        let op = "copy";
        let s = self.read::<T>(op, src)?;
        let mut o = self.write::<T>(op, dst, Mode::Overwrite)?;
        self.dev
            .stream()
            .memcpy_dtod(&*s, o.slice())
            .map_err(|e| self.err(op, CudaError::driver("cuMemcpyDtoDAsync", e)))?;
        self.finish(op, o)
    }

    fn add_assign_t<T: Stored>(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        let op = "add_assign";
        let s = self.read::<T>(op, src)?;
        let mut o = self.write::<T>(op, dst, Mode::Accumulate)?;
        kc::elementwise::add_assign(&self.dev, o.slice(), &s).map_err(|e| self.err(op, e))?;
        self.finish(op, o)
    }

    fn scale_t<T: Stored>(&self, buf: &mut CudaBuf, alpha: f32) -> Result<()> {
        let op = "scale";
        let mut o = self.write::<T>(op, buf, Mode::Accumulate)?;
        kc::elementwise::scale(&self.dev, o.slice(), alpha).map_err(|e| self.err(op, e))?;
        self.finish(op, o)
    }

    /// Turns `buf` into an fp32 buffer holding the same values (exact from bf16); a parameter keeps its master.
    fn to_f32_storage(&self, op: &'static str, buf: &mut CudaBuf) -> Result<()> {
        if let CudaData::Bf16(s) = &**buf {
            let mut wide = self.scratch::<f32>(op, s.len())?;
            kc::elementwise::cast_bf16_to_f32(&self.dev, &mut wide, s).map_err(|e| self.err(op, e))?;
            *buf = CudaBuf::new(CudaData::F32(wide));
        } else if let CudaData::Param { master, .. } = &**buf {
            *buf = CudaBuf::new(CudaData::F32(self.dup(master)?));
        }
        Ok(())
    }

    /// Turns `buf` into a parameter (fp32 master + bf16 working copy) holding the same values.
    fn to_param_storage(&self, op: &'static str, buf: &mut CudaBuf) -> Result<()> {
        let promoted = match &**buf {
            CudaData::Param { .. } => return Ok(()),
            CudaData::F32(master) => {
                let mut working = self.scratch::<bf16>(op, master.len())?;
                kc::elementwise::cast_f32_to_bf16(&self.dev, &mut working, master).map_err(|e| self.err(op, e))?;
                CudaData::Param {
                    master: self.dup(master)?,
                    working,
                }
            }
            CudaData::Bf16(working) => {
                let mut master = self.scratch::<f32>(op, working.len())?;
                kc::elementwise::cast_bf16_to_f32(&self.dev, &mut master, working).map_err(|e| self.err(op, e))?;
                CudaData::Param {
                    master,
                    working: self.dup(working)?,
                }
            }
        };
        *buf = CudaBuf::new(promoted);
        Ok(())
    }
}

/// The model's ops, generic over the element type `T` they compute in (the backend's precision).
impl Cuda {
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward_t<T: Stored>(
        &self,
        out: &mut CudaBuf,
        tokens: &Tokens,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "embedding_forward";
        let (wte, wpe) = (self.read::<T>(op, wte)?, self.read::<T>(op, wpe)?);
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        kc::embedding::embedding_forward(&self.dev, o.slice(), tokens, &wte, &wpe, b, t, c)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, o)
    }

    #[allow(clippy::too_many_arguments)]
    fn embedding_backward_t<T: Stored>(
        &self,
        dwte: &mut CudaBuf,
        dwpe: &mut CudaBuf,
        dout: &CudaBuf,
        tokens: &Tokens,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "embedding_backward";
        let dout = self.read::<T>(op, dout)?;
        let mut gte = self.write::<T>(op, dwte, Mode::Accumulate)?;
        let mut gpe = self.write::<T>(op, dwpe, Mode::Accumulate)?;
        kc::embedding::embedding_backward(&self.dev, gte.slice(), gpe.slice(), &dout, tokens, b, t, c)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, gte)?;
        self.finish(op, gpe)
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward_t<T: Stored>(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_forward";
        let (inp, weight, bias) = (
            self.read::<T>(op, inp)?,
            self.read::<T>(op, weight)?,
            self.read::<T>(op, bias)?,
        );
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        // The statistics are fp32 in both precisions (a bf16 buffer from `zeros` is retyped, once).
        let mut mu = self.write::<f32>(op, mean, Mode::Overwrite)?;
        let mut rs = self.write::<f32>(op, rstd, Mode::Overwrite)?;
        kc::layernorm::layernorm_forward(&self.dev, o.slice(), mu.slice(), rs.slice(), &inp, &weight, &bias, n, c)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, o)?;
        self.finish(op, mu)?;
        self.finish(op, rs)
    }

    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward_t<T: Stored>(
        &self,
        sum: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "residual_layernorm_forward";
        let (a, b, weight, bias) = (
            self.read::<T>(op, a)?,
            self.read::<T>(op, b)?,
            self.read::<T>(op, weight)?,
            self.read::<T>(op, bias)?,
        );
        let mut s = self.write::<T>(op, sum, Mode::Overwrite)?;
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        // The statistics are fp32 in both precisions, as in `layernorm_forward_t`.
        let mut mu = self.write::<f32>(op, mean, Mode::Overwrite)?;
        let mut rs = self.write::<f32>(op, rstd, Mode::Overwrite)?;
        kc::layernorm::residual_layernorm_forward(
            &self.dev,
            s.slice(),
            o.slice(),
            mu.slice(),
            rs.slice(),
            &a,
            &b,
            &weight,
            &bias,
            n,
            c,
        )
        .map_err(|e| self.err(op, e))?;
        self.finish(op, s)?;
        self.finish(op, o)?;
        self.finish(op, mu)?;
        self.finish(op, rs)
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_input_t<T: Stored>(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward_input";
        let (dout, inp, weight) = (
            self.read::<T>(op, dout)?,
            self.read::<T>(op, inp)?,
            self.read::<T>(op, weight)?,
        );
        let (mean, rstd) = (self.read::<f32>(op, mean)?, self.read::<f32>(op, rstd)?);
        let mut g = self.write::<T>(op, dinp, Mode::Accumulate)?;
        kc::layernorm::layernorm_backward_input(&self.dev, g.slice(), &dout, &inp, &weight, &mean, &rstd, n, c)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, g)
    }

    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_weight_t<T: Stored>(
        &self,
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "layernorm_backward_weight";
        let (dout, inp) = (self.read::<T>(op, dout)?, self.read::<T>(op, inp)?);
        let (mean, rstd) = (self.read::<f32>(op, mean)?, self.read::<f32>(op, rstd)?);
        let mut gw = self.write::<T>(op, dweight, Mode::Accumulate)?;
        let mut gb = self.write::<T>(op, dbias, Mode::Accumulate)?;
        kc::layernorm::layernorm_backward_weight(&self.dev, gw.slice(), gb.slice(), &dout, &inp, &mean, &rstd, n, c)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, gw)?;
        self.finish(op, gb)
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul_forward_t<T: Stored>(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_forward";
        self.check(op, "out", out.len(), n * oc)?;
        self.check(op, "inp", inp.len(), n * c)?;
        self.check(op, "weight", weight.len(), oc * c)?;
        let (inp, weight) = (self.read::<T>(op, inp)?, self.read::<T>(op, weight)?);
        let bias = bias.map(|b| self.read::<T>(op, b)).transpose()?;
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        if let Some(lt) = &self.lt {
            // The same column-major problem as below, with the bias added in cuBLASLt's epilogue.
            let lt = lt.lock().unwrap_or_else(|e| e.into_inner());
            lt.matmul_forward::<T>(o.slice(), None, &inp, &weight, bias.as_deref(), false, n, c, oc)
                .map_err(|e| self.err(op, e))?;
            return self.finish(op, o);
        }
        // Row-major out (n, oc) is column-major (oc, n) = Wᵀ-view · inp-view: W row-major (oc, c) read as
        // column-major (c, oc) and transposed; inp row-major (n, c) is column-major (c, n).
        let g = Gemm3 {
            transa: T_OP,
            transb: N_OP,
            m: oc,
            n,
            k: c,
            lda: c,
            ldb: c,
            ldc: oc,
            strides: (0, 0, 0),
            batch: 1,
            beta: 0.0,
        };
        self.gemm(op, g, &weight, &inp, o.slice())?;
        if let Some(bias) = bias {
            kc::bias::bias_forward(&self.dev, o.slice(), &bias, n, oc).map_err(|e| self.err(op, e))?;
        }
        self.finish(op, o)
    }

    /// [`Backend::matmul_gelu_forward`] through cuBLASLt's GELU_AUX_BIAS epilogue (one pass).
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_forward_t<T: Stored>(
        &self,
        lt: &Blaslt,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_gelu_forward";
        self.check(op, "out", out.len(), n * oc)?;
        self.check(op, "pre", pre.len(), n * oc)?;
        self.check(op, "inp", inp.len(), n * c)?;
        self.check(op, "weight", weight.len(), oc * c)?;
        let (inp, weight) = (self.read::<T>(op, inp)?, self.read::<T>(op, weight)?);
        let bias = bias.map(|b| self.read::<T>(op, b)).transpose()?;
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        let mut p = self.write::<T>(op, pre, Mode::Overwrite)?;
        lt.matmul_forward::<T>(
            o.slice(),
            Some(p.slice()),
            &inp,
            &weight,
            bias.as_deref(),
            true,
            n,
            c,
            oc,
        )
        .map_err(|e| self.err(op, e))?;
        self.finish(op, o)?;
        self.finish(op, p)
    }

    /// [`Backend::matmul_backward_input_gelu`] through cuBLASLt's DGELU epilogue (one pass).
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_input_gelu_t<T: Stored>(
        &self,
        lt: &Blaslt,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        weight: &CudaBuf,
        pre: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_input_gelu";
        self.check(op, "dinp", dinp.len(), n * c)?;
        self.check(op, "pre", pre.len(), n * c)?;
        self.check(op, "dout", dout.len(), n * oc)?;
        self.check(op, "weight", weight.len(), oc * c)?;
        let (dout, weight, pre) = (
            self.read::<T>(op, dout)?,
            self.read::<T>(op, weight)?,
            self.read::<T>(op, pre)?,
        );
        let mut d = self.write::<T>(op, dinp, Mode::Overwrite)?;
        lt.matmul_backward_input::<T>(d.slice(), &dout, &weight, Some(&pre), Accumulate::Overwrite, n, c, oc)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, d)
    }

    fn matmul_backward_input_t<T: Stored>(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_input";
        self.check(op, "dinp", dinp.len(), n * c)?;
        self.check(op, "dout", dout.len(), n * oc)?;
        self.check(op, "weight", weight.len(), oc * c)?;
        let (dout, weight) = (self.read::<T>(op, dout)?, self.read::<T>(op, weight)?);
        let mut g = self.write::<T>(op, dinp, Mode::Accumulate)?;
        // dinp (n, c) += dout (n, oc) · W (oc, c); column-major: dinpᵀ (c, n) += W-view (c, oc) · doutᵀ (oc, n).
        let cfg = Gemm3 {
            transa: N_OP,
            transb: N_OP,
            m: c,
            n,
            k: oc,
            lda: c,
            ldb: oc,
            ldc: c,
            strides: (0, 0, 0),
            batch: 1,
            beta: 1.0,
        };
        self.gemm(op, cfg, &weight, &dout, g.slice())?;
        self.finish(op, g)
    }

    #[allow(clippy::too_many_arguments)]
    fn matmul_backward_weight_t<T: Stored>(
        &self,
        dweight: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let op = "matmul_backward_weight";
        self.check(op, "dweight", dweight.len(), oc * c)?;
        self.check(op, "dout", dout.len(), n * oc)?;
        self.check(op, "inp", inp.len(), n * c)?;
        let (dout, inp) = (self.read::<T>(op, dout)?, self.read::<T>(op, inp)?);
        let mut gw = self.write::<T>(op, dweight, Mode::Accumulate)?;
        // dW (oc, c) += doutᵀ · inp; column-major: dWᵀ (c, oc) += inpᵀ (c, n) · dout (n, oc) (dout read transposed).
        let cfg = Gemm3 {
            transa: N_OP,
            transb: T_OP,
            m: c,
            n: oc,
            k: n,
            lda: c,
            ldb: oc,
            ldc: c,
            strides: (0, 0, 0),
            batch: 1,
            beta: 1.0,
        };
        self.gemm(op, cfg, &inp, &dout, gw.slice())?;
        self.finish(op, gw)?;
        if let Some(dbias) = dbias {
            let mut gb = self.write::<T>(op, dbias, Mode::Accumulate)?;
            kc::bias::bias_backward(&self.dev, gb.slice(), &dout, n, oc).map_err(|e| self.err(op, e))?;
            self.finish(op, gb)?;
        }
        Ok(())
    }

    /// Whether attention runs the fused flash kernels: bf16 precision, head size 64 or 128, and not switched
    /// off (`BATON_CUDA_ATTENTION=simple` keeps the materialised path, e.g. to compare the two).
    fn uses_flash(&self, c: usize, nh: usize) -> bool {
        self.flash && self.precision == Precision::Bf16 && nh > 0 && c % nh == 0 && matches!(c / nh, 64 | 128)
    }

    /// The shape of an attention forward, with its operands' lengths checked (`att` against the stash this
    /// backend keeps for that shape, [`Backend::attention_stash_len`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward_shape(
        &self,
        op: &'static str,
        out: &CudaBuf,
        att: &CudaBuf,
        qkv: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<AttentionShape> {
        let s = self.attention_shape(op, b, t, c, nh)?;
        self.check(op, "out", out.len(), b * t * c)?;
        self.check(op, "att", att.len(), self.attention_stash_len(b, t, c, nh))?;
        self.check(op, "qkv", qkv.len(), 3 * b * t * c)?;
        Ok(s)
    }

    /// The shape of an attention backward, with its operands' lengths checked as in
    /// [`Cuda::attention_forward_shape`].
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_shape(
        &self,
        op: &'static str,
        dqkv: &CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        att: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<AttentionShape> {
        let s = self.attention_shape(op, b, t, c, nh)?;
        self.check(op, "dqkv", dqkv.len(), 3 * b * t * c)?;
        self.check(op, "dout", dout.len(), b * t * c)?;
        self.check(op, "qkv", qkv.len(), 3 * b * t * c)?;
        self.check(op, "att", att.len(), self.attention_stash_len(b, t, c, nh))?;
        Ok(s)
    }

    /// `qkv (b, t, 3c)` split into `q`, `k`, `v` in head layout `(b, nh, t, hs)`.
    fn split_heads<T: Elem>(
        &self,
        op: &'static str,
        qkv: &CudaSlice<T>,
        s: AttentionShape,
    ) -> Result<(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)> {
        let (mut q, mut k, mut v) = (
            self.scratch::<T>(op, s.head_elems())?,
            self.scratch::<T>(op, s.head_elems())?,
            self.scratch::<T>(op, s.head_elems())?,
        );
        kc::attention::attention_permute(&self.dev, &mut q, &mut k, &mut v, qkv, s).map_err(|e| self.err(op, e))?;
        Ok((q, k, v))
    }

    /// The flash kernels' view of an attention shape.
    fn flash_dims(s: AttentionShape) -> AttentionDims {
        AttentionDims {
            b: s.b,
            nh: s.nh,
            t: s.t,
            hs: s.hs,
        }
    }

    /// Flash attention forward (bf16): `out` and the row logsumexp as the stash (`att`, retyped to fp32).
    #[allow(clippy::too_many_arguments)]
    fn flash_forward(
        &self,
        out: &mut CudaBuf,
        att: &mut CudaBuf,
        qkv: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_forward (flash)";
        let s = self.attention_forward_shape(op, out, att, qkv, b, t, c, nh)?;
        if s.head_elems() == 0 {
            return Ok(());
        }
        let qkv = self.read::<bf16>(op, qkv)?;
        let mut out = self.write::<bf16>(op, out, Mode::Overwrite)?;
        let mut lse = self.write::<f32>(op, att, Mode::Overwrite)?;
        let (q, k, v) = self.split_heads(op, &qkv, s)?;
        let mut y = self.scratch::<bf16>(op, s.head_elems())?;
        kc::flash_attention::flash_attention_forward(&self.dev, &mut y, lse.slice(), &q, &k, &v, Self::flash_dims(s))
            .map_err(|e| self.err(op, e))?;
        kc::attention::attention_unpermute(&self.dev, out.slice(), &y, s).map_err(|e| self.err(op, e))?;
        self.finish(op, out)?;
        self.finish(op, lse)
    }

    /// Flash attention backward (bf16, deterministic): `dqkv += ∂L/∂qkv` from the forward's `out` and logsumexp.
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        att: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_backward (flash)";
        let s = self.attention_backward_shape(op, dqkv, dout, qkv, att, b, t, c, nh)?;
        self.check(op, "out", out.len(), b * t * c)?;
        let dims = Self::flash_dims(s);
        if s.head_elems() == 0 {
            return Ok(());
        }
        let (dout, qkv, out) = (
            self.read::<bf16>(op, dout)?,
            self.read::<bf16>(op, qkv)?,
            self.read::<bf16>(op, out)?,
        );
        let lse = self.read::<f32>(op, att)?;
        let mut dqkv = self.write::<bf16>(op, dqkv, Mode::Accumulate)?;
        let (q, k, v) = self.split_heads(op, &qkv, s)?;
        let heads = || self.scratch::<bf16>(op, s.head_elems());
        // The forward's output and the incoming gradient in head layout (b, nh, t, hs).
        let (mut o, mut dy) = (heads()?, heads()?);
        kc::attention::attention_unpermute_backward(&self.dev, &mut o, &out, s).map_err(|e| self.err(op, e))?;
        kc::attention::attention_unpermute_backward(&self.dev, &mut dy, &dout, s).map_err(|e| self.err(op, e))?;
        let (mut dq, mut dk, mut dv) = (heads()?, heads()?, heads()?);
        let mut delta = self.scratch::<f32>(op, dims.rows_len())?;
        kc::flash_attention::flash_attention_backward(
            &self.dev, &mut dq, &mut dk, &mut dv, &mut delta, &dy, &q, &k, &v, &o, &lse, dims,
        )
        .map_err(|e| self.err(op, e))?;
        kc::attention::attention_permute_backward(&self.dev, dqkv.slice(), &dq, &dk, &dv, s)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, dqkv)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_forward_t<T: Stored>(
        &self,
        out: &mut CudaBuf,
        att: &mut CudaBuf,
        qkv: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_forward";
        let s = self.attention_forward_shape(op, out, att, qkv, b, t, c, nh)?;
        if s.head_elems() == 0 {
            return Ok(());
        }
        let qkv = self.read::<T>(op, qkv)?;
        let mut out = self.write::<T>(op, out, Mode::Overwrite)?;
        let mut att = self.write::<T>(op, att, Mode::Overwrite)?;
        let (hs, bh) = (s.hs, b * nh);
        let (q, k, v) = self.split_heads(op, &qkv, s)?;
        // preatt[t1][t2] = q[t1] · k[t2]: column-major (t2, t1) = kᵀ-view · q-view, per (b, h).
        let mut preatt = self.scratch::<T>(op, s.score_elems())?;
        let scores = Gemm3 {
            transa: T_OP,
            transb: N_OP,
            m: t,
            n: t,
            k: hs,
            lda: hs,
            ldb: hs,
            ldc: t,
            strides: (t * hs, t * hs, t * t),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, scores, &k, &q, &mut preatt)?;
        let scale = 1.0 / (hs as f32).sqrt();
        kc::attention::causal_softmax_forward(&self.dev, att.slice(), &preatt, scale, bh * t, t)
            .map_err(|e| self.err(op, e))?;
        // y[t1][d] = Σ_t2 att[t1][t2] v[t2][d]: column-major (d, t1) = v-view (d, t2) · att-view (t2, t1).
        let mut y = self.scratch::<T>(op, s.head_elems())?;
        let values = Gemm3 {
            transa: N_OP,
            transb: N_OP,
            m: hs,
            n: t,
            k: t,
            lda: hs,
            ldb: t,
            ldc: hs,
            strides: (t * hs, t * t, t * hs),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, values, &v, att.slice(), &mut y)?;
        kc::attention::attention_unpermute(&self.dev, out.slice(), &y, s).map_err(|e| self.err(op, e))?;
        self.finish(op, out)?;
        self.finish(op, att)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_backward_t<T: Stored>(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        att: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_backward";
        let s = self.attention_backward_shape(op, dqkv, dout, qkv, att, b, t, c, nh)?;
        if s.head_elems() == 0 {
            return Ok(());
        }
        let (dout, qkv, att) = (
            self.read::<T>(op, dout)?,
            self.read::<T>(op, qkv)?,
            self.read::<T>(op, att)?,
        );
        let mut dqkv = self.write::<T>(op, dqkv, Mode::Accumulate)?;
        let (hs, bh) = (s.hs, b * nh);
        let heads = |o: &'static str| self.scratch::<T>(o, s.head_elems());
        let (q, k, v) = self.split_heads(op, &qkv, s)?;
        let mut dy = heads(op)?;
        kc::attention::attention_unpermute_backward(&self.dev, &mut dy, &dout, s).map_err(|e| self.err(op, e))?;
        // datt[t1][t2] = dy[t1] · v[t2]: column-major (t2, t1) = vᵀ-view · dy-view.
        let mut datt = self.scratch::<T>(op, s.score_elems())?;
        let g_datt = Gemm3 {
            transa: T_OP,
            transb: N_OP,
            m: t,
            n: t,
            k: hs,
            lda: hs,
            ldb: hs,
            ldc: t,
            strides: (t * hs, t * hs, t * t),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, g_datt, &v, &dy, &mut datt)?;
        // dv[t2][d] = Σ_t1 att[t1][t2] dy[t1][d]: column-major (d, t2) = dy-view (d, t1) · (att-view)ᵀ (t1, t2).
        let mut dv = heads(op)?;
        let g_dv = Gemm3 {
            transa: N_OP,
            transb: T_OP,
            m: hs,
            n: t,
            k: t,
            lda: hs,
            ldb: t,
            ldc: hs,
            strides: (t * hs, t * t, t * hs),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, g_dv, &dy, &att, &mut dv)?;
        let scale = 1.0 / (hs as f32).sqrt();
        let mut dpre = self.scratch::<T>(op, s.score_elems())?;
        kc::attention::causal_softmax_backward(&self.dev, &mut dpre, &datt, &att, scale, bh * t, t)
            .map_err(|e| self.err(op, e))?;
        // dq[t1][d] = Σ_t2 dpre[t1][t2] k[t2][d]: column-major (d, t1) = k-view (d, t2) · dpre-view (t2, t1).
        let mut dq = heads(op)?;
        let g_dq = Gemm3 {
            transa: N_OP,
            transb: N_OP,
            m: hs,
            n: t,
            k: t,
            lda: hs,
            ldb: t,
            ldc: hs,
            strides: (t * hs, t * t, t * hs),
            batch: bh,
            beta: 0.0,
        };
        self.gemm(op, g_dq, &k, &dpre, &mut dq)?;
        // dk[t2][d] = Σ_t1 dpre[t1][t2] q[t1][d]: column-major (d, t2) = q-view (d, t1) · (dpre-view)ᵀ (t1, t2).
        let mut dk = heads(op)?;
        let g_dk = Gemm3 { transb: T_OP, ..g_dq };
        self.gemm(op, g_dk, &q, &dpre, &mut dk)?;
        kc::attention::attention_permute_backward(&self.dev, dqkv.slice(), &dq, &dk, &dv, s)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, dqkv)
    }

    fn gelu_forward_t<T: Stored>(&self, out: &mut CudaBuf, inp: &CudaBuf) -> Result<()> {
        let op = "gelu_forward";
        let inp = self.read::<T>(op, inp)?;
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        kc::elementwise::gelu_forward(&self.dev, o.slice(), &inp).map_err(|e| self.err(op, e))?;
        self.finish(op, o)
    }

    fn gelu_backward_t<T: Stored>(&self, dinp: &mut CudaBuf, inp: &CudaBuf, dout: &CudaBuf) -> Result<()> {
        let op = "gelu_backward";
        let (inp, dout) = (self.read::<T>(op, inp)?, self.read::<T>(op, dout)?);
        let mut g = self.write::<T>(op, dinp, Mode::Accumulate)?;
        kc::elementwise::gelu_backward(&self.dev, g.slice(), &inp, &dout).map_err(|e| self.err(op, e))?;
        self.finish(op, g)
    }

    fn residual_forward_t<T: Stored>(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        let op = "residual_forward";
        let (a, b) = (self.read::<T>(op, a)?, self.read::<T>(op, b)?);
        let mut o = self.write::<T>(op, out, Mode::Overwrite)?;
        kc::elementwise::residual_forward(&self.dev, o.slice(), &a, &b).map_err(|e| self.err(op, e))?;
        self.finish(op, o)
    }

    fn cross_entropy_forward_t<T: Stored>(
        &self,
        losses: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &Tokens,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let op = "cross_entropy_forward";
        let logits = self.read::<T>(op, logits)?;
        // Per-token losses are fp32 in both precisions.
        let mut l = self.write::<f32>(op, losses, Mode::Overwrite)?;
        kc::classifier::cross_entropy_forward(&self.dev, l.slice(), &logits, targets, n, v)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, l)
    }

    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_backward_t<T: Stored>(
        &self,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &Tokens,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        let op = "cross_entropy_backward";
        let logits = self.read::<T>(op, logits)?;
        let mut g = self.write::<T>(op, dlogits, Mode::Accumulate)?;
        kc::classifier::cross_entropy_backward(&self.dev, g.slice(), &logits, targets, scale, n, v)
            .map_err(|e| self.err(op, e))?;
        self.finish(op, g)
    }

    fn attention_shape(&self, op: &'static str, b: usize, t: usize, c: usize, nh: usize) -> Result<AttentionShape> {
        if nh == 0 || c % nh != 0 {
            return Err(self.shape(op, format!("c ({c}) must be a positive multiple of nh ({nh})")));
        }
        Ok(AttentionShape { b, t, nh, hs: c / nh })
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Tokens = Tokens;
    type Recv = CudaData;

    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }
    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        Ok(CudaBuf::new(match self.precision {
            Precision::F32 => CudaData::F32(self.scratch("zeros", len)?),
            Precision::Bf16 => CudaData::Bf16(self.scratch("zeros", len)?),
        }))
    }
    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        // Exact in both precisions (weights and moments loaded from a checkpoint lose nothing).
        Ok(CudaBuf::new(CudaData::F32(
            self.dev.upload(data).map_err(|e| self.err("upload", e))?,
        )))
    }
    fn upload_param(&self, data: &[f32]) -> Result<CudaBuf> {
        let op = "upload_param";
        let master = self.dev.upload(data).map_err(|e| self.err(op, e))?;
        match self.precision {
            Precision::F32 => Ok(CudaBuf::new(CudaData::F32(master))),
            Precision::Bf16 => {
                let mut working = self.scratch::<bf16>(op, master.len())?;
                kc::elementwise::cast_f32_to_bf16(&self.dev, &mut working, &master).map_err(|e| self.err(op, e))?;
                Ok(CudaBuf::new(CudaData::Param { master, working }))
            }
        }
    }
    fn zeros_state(&self, len: usize) -> Result<CudaBuf> {
        Ok(CudaBuf::new(CudaData::F32(self.scratch("zeros_state", len)?)))
    }
    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let op = "download";
        match &**buf {
            CudaData::F32(s) | CudaData::Param { master: s, .. } => self.dev.download(s).map_err(|e| self.err(op, e)),
            CudaData::Bf16(s) => Ok(self
                .dev
                .download(s)
                .map_err(|e| self.err(op, e))?
                .into_iter()
                .map(bf16::to_f32)
                .collect()),
        }
    }
    fn upload_tokens(&self, tokens: &[u32]) -> Result<Tokens> {
        Tokens::upload(&self.dev, tokens).map_err(|e| self.err("upload_tokens", e))
    }
    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }
    fn bytes(&self, buf: &CudaBuf) -> usize {
        buf.bytes()
    }
    fn activation_elem_bytes(&self) -> usize {
        self.precision.elem_bytes()
    }
    fn duplicate(&self, buf: &CudaBuf) -> Result<CudaBuf> {
        Ok(CudaBuf::new(match &**buf {
            CudaData::F32(s) => CudaData::F32(self.dup(s)?),
            CudaData::Bf16(s) => CudaData::Bf16(self.dup(s)?),
            CudaData::Param { master, working } => CudaData::Param {
                master: self.dup(master)?,
                working: self.dup(working)?,
            },
        }))
    }
    fn concat(&self, parts: &[&CudaBuf]) -> Result<CudaBuf> {
        let first = parts
            .first()
            .ok_or_else(|| self.shape("concat", "no parts to concatenate".into()))?;
        let native = first.storage().native();
        if let Some(other) = parts.iter().find(|p| p.storage().native() != native) {
            return Err(self.shape(
                "concat",
                format!(
                    "the parts mix storage types ({:?} and {:?})",
                    first.storage(),
                    other.storage()
                ),
            ));
        }
        dispatch!(native, self.concat_t(parts))
    }
    fn transfer(&self, buf: CudaBuf, dst: &Self) -> Result<CudaBuf> {
        let route = self.route_to(dst)?;
        self.transfer_by(buf, dst, route, None)
    }
    fn transfer_pooled(&self, buf: CudaBuf, dst: &Self, pool: &Arc<RecvPool<CudaData>>) -> Result<CudaBuf> {
        let route = self.route_to(dst)?;
        self.transfer_by(buf, dst, route, Some(pool))
    }
    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize().map_err(|e| self.err("synchronize", e))
    }
    type Mark = CudaEvent;
    fn mark(&self) -> Result<CudaEvent> {
        self.dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| self.err("mark", CudaError::driver("recording a timing event", e)))
    }
    fn measure_peak_tflops(&self) -> Result<Option<f64>> {
        kc::peak::measure_bf16_gemm_tflops(&self.dev, kc::peak::PEAK_GEMM_SIDE, 10)
            .map(Some)
            .map_err(|e| self.err("measure_peak_tflops", e))
    }
    fn await_ready(&self, buf: &CudaBuf) -> Result<()> {
        // `device_ptr` makes the compute stream wait on the slice's last write event (and records a read event
        // here, which only orders a later write of the buffer after this point: harmless).
        let stream = self.dev.stream();
        self.dev
            .context()
            .bind_to_thread()
            .map_err(|e| self.err("await_ready", CudaError::driver("binding", e)))?;
        match &**buf {
            CudaData::F32(s) => drop(s.device_ptr(stream)),
            CudaData::Bf16(s) => drop(s.device_ptr(stream)),
            CudaData::Param { master, working } => {
                drop(master.device_ptr(stream));
                drop(working.device_ptr(stream));
            }
        }
        Ok(())
    }
    fn copy_mark(&self) -> Result<CudaEvent> {
        self.copy
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| {
                self.err(
                    "copy_mark",
                    CudaError::driver("recording a timing event on the copy stream", e),
                )
            })
    }
    fn shares_clock_with(&self, other: &Self) -> bool {
        self.ordinal == other.ordinal
    }
    fn seconds_between(&self, from: &CudaEvent, to: &CudaEvent) -> Result<f64> {
        from.elapsed_ms(to)
            .map(|ms| f64::from(ms) / 1e3)
            .map_err(|e| self.err("seconds_between", CudaError::driver("cuEventElapsedTime", e)))
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        match &mut **buf {
            CudaData::F32(s) => self.memset(s),
            CudaData::Bf16(s) => self.memset(s),
            CudaData::Param { master, working } => {
                self.memset(master)?;
                self.memset(working)
            }
        }
    }
    fn copy(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        self.check("copy", "src", src.len(), dst.len())?;
        dispatch!(dst.storage().native(), self.copy_t(dst, src))
    }
    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        self.check("add_assign", "src", src.len(), dst.len())?;
        dispatch!(dst.storage().native(), self.add_assign_t(dst, src))
    }
    fn scale(&self, buf: &mut CudaBuf, alpha: f32) -> Result<()> {
        dispatch!(buf.storage().native(), self.scale_t(buf, alpha))
    }
    fn sum_squares(&self, buf: &CudaBuf) -> Result<f64> {
        match &**buf {
            CudaData::F32(s) | CudaData::Param { master: s, .. } => kc::norm::sum_squares(&self.dev, s),
            CudaData::Bf16(s) => kc::norm::sum_squares(&self.dev, s),
        }
        .map_err(|e| self.err("sum_squares", e))
    }
    fn sum_squares_many(&self, bufs: &[&CudaBuf]) -> Result<Vec<f64>> {
        let op = "sum_squares_many";
        if bufs.is_empty() {
            return Ok(Vec::new());
        }
        let mut sums = self.dev.zeros::<f64>(bufs.len()).map_err(|e| self.err(op, e))?;
        for (i, buf) in bufs.iter().enumerate() {
            let mut slot = sums.slice_mut(i..i + 1);
            match &***buf {
                CudaData::F32(s) | CudaData::Param { master: s, .. } => {
                    kc::norm::sum_squares_into(&self.dev, s, &mut slot)
                }
                CudaData::Bf16(s) => kc::norm::sum_squares_into(&self.dev, s, &mut slot),
            }
            .map_err(|e| self.err(op, e))?;
        }
        self.dev.download(&sums).map_err(|e| self.err(op, e))
    }
    fn sum(&self, buf: &CudaBuf) -> Result<f64> {
        match &**buf {
            CudaData::F32(s) | CudaData::Param { master: s, .. } => kc::norm::sum(&self.dev, s),
            CudaData::Bf16(s) => kc::norm::sum(&self.dev, s),
        }
        .map_err(|e| self.err("sum", e))
    }

    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        tokens: &Tokens,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        dispatch!(self.precision, self.embedding_forward_t(out, tokens, wte, wpe, b, t, c))
    }
    fn embedding_backward(
        &self,
        dwte: &mut CudaBuf,
        dwpe: &mut CudaBuf,
        dout: &CudaBuf,
        tokens: &Tokens,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.embedding_backward_t(dwte, dwpe, dout, tokens, b, t, c)
        )
    }
    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.layernorm_forward_t(out, mean, rstd, inp, weight, bias, n, c)
        )
    }
    fn residual_layernorm_forward(
        &self,
        sum: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        // One kernel: the residual sum and its layer norm in one pass over the inputs.
        dispatch!(
            self.precision,
            self.residual_layernorm_forward_t(sum, out, mean, rstd, a, b, weight, bias, n, c)
        )
    }
    fn layernorm_backward_input(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.layernorm_backward_input_t(dinp, dout, inp, weight, mean, rstd, n, c)
        )
    }
    fn layernorm_backward_weight(
        &self,
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
        dout: &CudaBuf,
        inp: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.layernorm_backward_weight_t(dweight, dbias, dout, inp, mean, rstd, n, c)
        )
    }
    fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        dispatch!(self.precision, self.matmul_forward_t(out, inp, weight, bias, n, c, oc))
    }
    fn matmul_gelu_forward(
        &self,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        // Fused in bf16 only: cuBLASLt's GELU epilogue may evaluate tanh approximately (≈1e-3 in fp32), above the
        // fp32 mode's 1e-4 parity bar.
        let (Some(lt), Precision::Bf16) = (&self.lt, self.precision) else {
            return unfused::matmul_gelu_forward(self, out, pre, inp, weight, bias, n, c, oc);
        };
        let lt = lt.lock().unwrap_or_else(|e| e.into_inner());
        self.matmul_gelu_forward_t::<bf16>(&lt, out, pre, inp, weight, bias, n, c, oc)
    }
    fn matmul_backward_input_gelu(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        weight: &CudaBuf,
        pre: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        // Fused in bf16 only, as `matmul_gelu_forward`.
        let (Some(lt), Precision::Bf16) = (&self.lt, self.precision) else {
            return unfused::matmul_backward_input_gelu(self, dinp, dout, weight, pre, n, c, oc);
        };
        let lt = lt.lock().unwrap_or_else(|e| e.into_inner());
        self.matmul_backward_input_gelu_t::<bf16>(&lt, dinp, dout, weight, pre, n, c, oc)
    }
    fn matmul_backward_input(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.matmul_backward_input_t(dinp, dout, weight, n, c, oc)
        )
    }
    fn matmul_backward_weight(
        &self,
        dweight: &mut CudaBuf,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.matmul_backward_weight_t(dweight, dbias, dout, inp, n, c, oc)
        )
    }
    fn attention_stash_len(&self, b: usize, t: usize, c: usize, nh: usize) -> usize {
        if self.uses_flash(c, nh) {
            b * nh * t
        } else {
            b * nh * t * t
        }
    }
    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        att: &mut CudaBuf,
        qkv: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        if self.uses_flash(c, nh) {
            return self.flash_forward(out, att, qkv, b, t, c, nh);
        }
        dispatch!(self.precision, self.attention_forward_t(out, att, qkv, b, t, c, nh))
    }
    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        att: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        if self.uses_flash(c, nh) {
            return self.flash_backward(dqkv, dout, qkv, out, att, b, t, c, nh);
        }
        dispatch!(
            self.precision,
            self.attention_backward_t(dqkv, dout, qkv, att, b, t, c, nh)
        )
    }
    fn gelu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf) -> Result<()> {
        dispatch!(self.precision, self.gelu_forward_t(out, inp))
    }
    fn gelu_backward(&self, dinp: &mut CudaBuf, inp: &CudaBuf, dout: &CudaBuf) -> Result<()> {
        dispatch!(self.precision, self.gelu_backward_t(dinp, inp, dout))
    }
    fn residual_forward(&self, out: &mut CudaBuf, a: &CudaBuf, b: &CudaBuf) -> Result<()> {
        dispatch!(self.precision, self.residual_forward_t(out, a, b))
    }
    fn cross_entropy_forward(
        &self,
        losses: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &Tokens,
        n: usize,
        v: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.cross_entropy_forward_t(losses, logits, targets, n, v)
        )
    }
    fn cross_entropy_backward(
        &self,
        dlogits: &mut CudaBuf,
        logits: &CudaBuf,
        targets: &Tokens,
        scale: f32,
        n: usize,
        v: usize,
    ) -> Result<()> {
        dispatch!(
            self.precision,
            self.cross_entropy_backward_t(dlogits, logits, targets, scale, n, v)
        )
    }
    fn adamw(
        &self,
        cfg: &AdamW,
        params: &mut CudaBuf,
        grads: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        step: u32,
    ) -> Result<()> {
        let op = "adamw";
        self.check(op, "grads", grads.len(), params.len())?;
        // The moments are fp32 in both precisions (a bf16 one, from a plain `zeros`, is widened exactly, once).
        self.to_f32_storage(op, m)?;
        self.to_f32_storage(op, v)?;
        let mut mo = self.write::<f32>(op, m, Mode::Accumulate)?;
        let mut vo = self.write::<f32>(op, v, Mode::Accumulate)?;
        match self.precision {
            Precision::F32 => {
                let grads = self.read::<f32>(op, grads)?;
                let mut p = self.write::<f32>(op, params, Mode::Accumulate)?;
                kc::adamw::adamw_f32(&self.dev, cfg, p.slice(), &grads, mo.slice(), vo.slice(), step)
                    .map_err(|e| self.err(op, e))?;
                self.finish(op, p)?;
            }
            Precision::Bf16 => {
                // fp32 master + bf16 working copy (a weight uploaded plainly, e.g. by a checkpoint load, is promoted
                // here: exactly, from fp32).
                self.to_param_storage(op, params)?;
                let grads = self.read::<bf16>(op, grads)?;
                let CudaData::Param { master, working } = &mut **params else {
                    return Err(self.shape(op, "parameter promotion failed".into()));
                };
                kc::adamw::adamw_bf16(&self.dev, cfg, master, working, &grads, mo.slice(), vo.slice(), step)
                    .map_err(|e| self.err(op, e))?;
            }
        }
        self.finish(op, mo)?;
        self.finish(op, vo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_spans() {
        // A (m=3, k=2) untransposed, ld 3: 3 + 3 = 6 elements; transposed with ld 2: (2, 3) stored, 2·2 + 2 = 6.
        assert_eq!(span(N_OP, 3, 2, 3), 6);
        assert_eq!(span(T_OP, 3, 2, 2), 6);
        assert_eq!(span(N_OP, 0, 2, 3), 0);
    }

    #[test]
    fn no_device_in_either_precision_is_an_error() {
        for p in Precision::ALL {
            match Cuda::with_precision(usize::MAX, p) {
                Err(EngineError::NoCudaDevice(why)) => assert!(!why.is_empty()),
                Err(other) => panic!("{p}: expected NoCudaDevice, got {other}"),
                Ok(_) => panic!("{p}: device usize::MAX cannot exist"),
            }
        }
    }
}
