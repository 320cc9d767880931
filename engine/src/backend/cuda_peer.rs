//! The driver-level pieces of the CUDA backend that cudarc's safe layer does not cover: peer access between
//! devices, the pinned-host fallback of a transfer where peer access is impossible, and the stream-ordered memory
//! pool's release threshold. Each raw driver call is wrapped once here, in a function returning `Result`.
//!
//! **Routes.** A transfer between two [`super::Cuda`]s takes one [`CopyRoute`], decided once per ordered pair of
//! devices (source, destination) and cached for the process:
//! - [`CopyRoute::SameDevice`]: a plain device-to-device copy (`cuMemcpyDtoDAsync`).
//! - [`CopyRoute::Peer`]: `cuDeviceCanAccessPeer` said the destination can read the source's memory, so the
//!   destination's context enables peer access to the source's (`cuCtxEnablePeerAccess`;
//!   `CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED` counts as success) and the source's default memory pool grants the
//!   destination device read/write access (`cuMemPoolSetAccess`: pool allocations are not covered by
//!   `cuCtxEnablePeerAccess`); the copy is `cuMemcpyPeerAsync` on the destination's stream.
//! - [`CopyRoute::PinnedHost`]: no peer access (or enabling it failed): the copy goes through a page-locked,
//!   portable host buffer — device→pinned on the **source** stream, pinned→device on the **destination** stream,
//!   the second waiting on an event recorded after the first; the next use of the same staging buffer waits (on
//!   the device) for an event recorded after the pinned→device copy. No host synchronisation, except when a larger
//!   transfer than any before makes the staging buffer grow (it then waits for the old buffer's last copy before
//!   freeing it: warm-up only, since a training step's transfer sizes repeat).
//!
//! **Memory pool.** Every buffer of the backend comes from cudarc's stream-ordered allocator (`cuMemAllocAsync`
//! on the device's default memory pool) and goes back to it with `cuMemFreeAsync`. [`keep_pool_memory`] sets the
//! pool's `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` to `u64::MAX`, so memory freed into the pool is never returned to
//! the driver at a synchronisation point: once a step has run, the pool holds the step's peak footprint and every
//! later allocation of the same sizes is served from it. "No allocation in the steady state" holds in that sense:
//! no `cuMemAlloc` / `cuMemFree` (no driver reservation or release) after the first step; the per-op
//! `cuMemAllocAsync` / `cuMemFreeAsync` calls remain, as cheap stream-ordered pool operations.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use baton_kernels::cuda::cudarc::driver::sys::{
    self, CUdevice, CUdeviceptr, CUmemPool_attribute, CUmemoryPool, CUresult, CUstream,
};
use baton_kernels::cuda::cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};

/// How a transfer between two devices moves its bytes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyRoute {
    /// Both ends on one device: a device-to-device copy.
    SameDevice,
    /// Different devices with peer access enabled: `cuMemcpyPeerAsync`.
    Peer,
    /// Different devices without peer access: through pinned host memory, ordered by events.
    PinnedHost,
}

impl CopyRoute {
    /// A short name for messages and bench output.
    pub fn name(self) -> &'static str {
        match self {
            CopyRoute::SameDevice => "same-device",
            CopyRoute::Peer => "peer",
            CopyRoute::PinnedHost => "pinned-host",
        }
    }
}

/// `Ok` for `CUDA_SUCCESS`, the driver's error otherwise.
fn check(r: CUresult) -> Result<(), DriverError> {
    r.result()
}

/// `cuDeviceCanAccessPeer`: whether `dev` can access memory of `peer`.
fn can_access_peer(dev: CUdevice, peer: CUdevice) -> Result<bool, DriverError> {
    let mut can: std::ffi::c_int = 0;
    // SAFETY: `can` is a valid out-pointer for the call's duration; device handles come from live contexts.
    check(unsafe { sys::cuDeviceCanAccessPeer(&mut can, dev, peer) })?;
    Ok(can != 0)
}

/// `cuCtxEnablePeerAccess` from `ctx` (made current on this thread) to `peer`; already enabled is success.
fn enable_peer_access(ctx: &Arc<CudaContext>, peer: &Arc<CudaContext>) -> Result<(), DriverError> {
    ctx.bind_to_thread()?;
    // SAFETY: both contexts are alive (held by the `Arc`s); flags must be 0.
    match unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) } {
        CUresult::CUDA_SUCCESS | CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        other => Err(DriverError(other)),
    }
}

/// `cuDeviceGetDefaultMemPool` of `dev`.
fn default_pool(dev: CUdevice) -> Result<CUmemoryPool, DriverError> {
    let mut pool: CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer; `dev` is a device handle of a live context.
    check(unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, dev) })?;
    Ok(pool)
}

/// `cuMemPoolSetAttribute` for one of the `u64`-valued attributes (thresholds, watermarks).
fn pool_set_u64(pool: CUmemoryPool, attr: CUmemPool_attribute, mut value: u64) -> Result<(), DriverError> {
    // SAFETY: the attributes passed here take a `cuuint64_t`, which `value` is; the pool is a device's default
    // pool, which lives as long as the device's primary context.
    check(unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut value as *mut u64).cast::<c_void>()) })
}

/// `cuMemPoolGetAttribute` for one of the `u64`-valued attributes.
fn pool_get_u64(pool: CUmemoryPool, attr: CUmemPool_attribute) -> Result<u64, DriverError> {
    let mut value = 0u64;
    // SAFETY: as in `pool_set_u64`; `value` is a valid `cuuint64_t` out-pointer.
    check(unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast::<c_void>()) })?;
    Ok(value)
}

/// `cuMemPoolSetAccess`: device `ordinal` may read and write allocations of `pool`.
fn pool_grant_access(pool: CUmemoryPool, ordinal: usize) -> Result<(), DriverError> {
    let desc = sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: std::ffi::c_int::try_from(ordinal).unwrap_or(std::ffi::c_int::MAX),
        },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: `desc` is one valid descriptor, alive for the call.
    check(unsafe { sys::cuMemPoolSetAccess(pool, &desc, 1) })
}

/// `cuMemHostAlloc` with `CU_MEMHOSTALLOC_PORTABLE` (pinned for every context); `ctx` is made current.
fn host_alloc_portable(ctx: &Arc<CudaContext>, bytes: usize) -> Result<*mut c_void, DriverError> {
    ctx.bind_to_thread()?;
    let mut ptr: *mut c_void = std::ptr::null_mut();
    // SAFETY: `ptr` is a valid out-pointer; the memory is only ever used as the target / source of async copies.
    check(unsafe { sys::cuMemHostAlloc(&mut ptr, bytes.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) })?;
    Ok(ptr)
}

/// `cuMemFreeHost`. The caller guarantees no queued copy still uses `ptr`.
fn host_free(ptr: *mut c_void) -> Result<(), DriverError> {
    // SAFETY: `ptr` came from `host_alloc_portable` and is freed once (the caller's contract covers pending use).
    check(unsafe { sys::cuMemFreeHost(ptr) })
}

/// `cuMemcpyDtoHAsync` of `bytes` from `src` into the pinned `dst` on `stream`.
fn copy_dtoh_async(dst: *mut c_void, src: CUdeviceptr, bytes: usize, stream: CUstream) -> Result<(), DriverError> {
    // SAFETY: the caller passes a pinned buffer of at least `bytes` and a device range of `bytes` that stays
    // alive until the copy has run (its free is stream-ordered after it).
    check(unsafe { sys::cuMemcpyDtoHAsync_v2(dst, src, bytes, stream) })
}

/// `cuMemcpyHtoDAsync` of `bytes` from the pinned `src` into `dst` on `stream`.
fn copy_htod_async(dst: CUdeviceptr, src: *const c_void, bytes: usize, stream: CUstream) -> Result<(), DriverError> {
    // SAFETY: as in `copy_dtoh_async`, the other way round.
    check(unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, bytes, stream) })
}

/// Sets the release threshold of `ctx`'s device's default memory pool to `u64::MAX` (once per device per
/// process), so freed memory stays in the pool. A device without memory pools is left alone.
pub(super) fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<(), DriverError> {
    static DONE: OnceLock<Mutex<Vec<usize>>> = OnceLock::new();
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut done = DONE
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if done.contains(&ctx.ordinal()) {
        return Ok(());
    }
    ctx.bind_to_thread()?;
    let pool = default_pool(ctx.cu_device())?;
    pool_set_u64(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
    done.push(ctx.ordinal());
    Ok(())
}

/// Bytes the device's default memory pool currently holds from the driver (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`);
/// 0 on a device without memory pools.
pub(super) fn pool_reserved_bytes(ctx: &Arc<CudaContext>) -> Result<u64, DriverError> {
    if !ctx.has_async_alloc() {
        return Ok(0);
    }
    ctx.bind_to_thread()?;
    let pool = default_pool(ctx.cu_device())?;
    pool_get_u64(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
}

/// The route from `src`'s device to `dst`'s, decided (and peer access enabled) once per ordered pair.
pub(super) fn route(src: &Arc<CudaContext>, dst: &Arc<CudaContext>) -> Result<CopyRoute, DriverError> {
    static ROUTES: OnceLock<Mutex<HashMap<(usize, usize), CopyRoute>>> = OnceLock::new();
    let key = (src.ordinal(), dst.ordinal());
    if key.0 == key.1 {
        return Ok(CopyRoute::SameDevice);
    }
    let mut routes = ROUTES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(&t) = routes.get(&key) {
        return Ok(t);
    }
    let t = if can_access_peer(dst.cu_device(), src.cu_device())? {
        // The copy runs on the destination's stream and reads the source's (pool) memory.
        let enabled = enable_peer_access(dst, src).and_then(|()| {
            src.bind_to_thread()?;
            pool_grant_access(default_pool(src.cu_device())?, dst.ordinal())
        });
        // Enabling can still fail (e.g. too many peers): the pinned path always works.
        if enabled.is_ok() {
            CopyRoute::Peer
        } else {
            CopyRoute::PinnedHost
        }
    } else {
        CopyRoute::PinnedHost
    };
    routes.insert(key, t);
    Ok(t)
}

/// A pinned staging buffer of one (source, destination) device pair and the two events that order its use.
struct Staging {
    ptr: *mut c_void,
    bytes: usize,
    /// Recorded on the source stream after the device→pinned copy (source context).
    filled: CudaEvent,
    /// Recorded on the destination stream after the pinned→device copy (destination context).
    drained: CudaEvent,
    /// Whether `drained` has been recorded at least once.
    used: bool,
}

// SAFETY: the raw pointer is page-locked host memory owned by this struct; every access is a driver copy queued
// while holding the staging map's mutex, and the device-side ordering is by `filled` / `drained`.
unsafe impl Send for Staging {}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.used {
            // The last pinned→device copy must have read the buffer before it is freed (a host wait; only on
            // growth and at process exit).
            if let Err(e) = self.drained.synchronize() {
                crate::error::record_drop_error("pinned staging buffer: waiting for its last copy", e);
            }
        }
        if let Err(e) = host_free(self.ptr) {
            crate::error::record_drop_error("pinned staging buffer: cuMemFreeHost", e);
        }
    }
}

fn staging_map() -> &'static Mutex<HashMap<(usize, usize), Staging>> {
    static MAP: OnceLock<Mutex<HashMap<(usize, usize), Staging>>> = OnceLock::new();
    MAP.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Copies `bytes` from device address `src` (read on `src_stream`) to `dst` (written on `dst_stream`) through a
/// pinned host buffer, with no host synchronisation (see the module docs). The caller has made `src_stream`
/// wait for the source's last write and keeps both device ranges alive until the copies have run (stream-ordered
/// frees), and orders later users of `dst` after `dst_stream`.
pub(super) fn copy_via_pinned_host(
    src: CUdeviceptr,
    src_stream: &Arc<CudaStream>,
    dst: CUdeviceptr,
    dst_stream: &Arc<CudaStream>,
    bytes: usize,
) -> Result<(), DriverError> {
    if bytes == 0 {
        return Ok(());
    }
    let (src_ctx, dst_ctx) = (src_stream.context(), dst_stream.context());
    let key = (src_ctx.ordinal(), dst_ctx.ordinal());
    let mut map = staging_map().lock().unwrap_or_else(|p| p.into_inner());
    if map.get(&key).is_some_and(|s| s.bytes < bytes) {
        // Grow: the old buffer is freed after its last copy (Drop waits for it).
        map.remove(&key);
    }
    let staging = match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let size = bytes.next_power_of_two();
            let flags = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
            let filled = src_ctx.new_event(flags)?;
            let drained = dst_ctx.new_event(flags)?;
            let ptr = host_alloc_portable(src_ctx, size)?;
            v.insert(Staging {
                ptr,
                bytes: size,
                filled,
                drained,
                used: false,
            })
        }
    };
    if staging.used {
        // The previous pinned→device copy out of this buffer must be done before it is overwritten.
        src_stream.wait(&staging.drained)?;
    }
    src_ctx.bind_to_thread()?;
    copy_dtoh_async(staging.ptr, src, bytes, src_stream.cu_stream())?;
    staging.filled.record(src_stream)?;
    dst_stream.wait(&staging.filled)?;
    dst_ctx.bind_to_thread()?;
    copy_htod_async(dst, staging.ptr, bytes, dst_stream.cu_stream())?;
    staging.drained.record(dst_stream)?;
    staging.used = true;
    Ok(())
}
