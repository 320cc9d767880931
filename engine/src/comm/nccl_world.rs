//! NCCL between GPUs of different processes and hosts: our thin communicator wrapper over cudarc's `sys`/`result`
//! NCCL layers ([`NcclComm`]: non-blocking init, async-error polling, a watchdog that aborts, split), the job's
//! world of ranks ([`NcclWorld`], its 128-byte id broadcast from rank 0 over any [`Cohort`], e.g. MPI), a
//! [`Transport`] between one replica's stages on different processes ([`NcclTransport`]) and order-fixed
//! [`Collective`]s over workers on any ranks ([`NcclWorldCollectives`]).
//!
//! **Why our own wrapper.** cudarc's safe `Comm` is `!Send`, aborts only in `Drop` (with `expect`), never polls
//! `ncclCommGetAsyncError` and has no split. Here, as in PyTorch's `ProcessGroupNCCL`: every communicator is
//! created **non-blocking** (`ncclCommInitRankConfig` with `blocking = 0`), so no NCCL call ever blocks the host;
//! after init, split and every enqueue the host polls `ncclCommGetAsyncError` until `ncclSuccess`, giving up at a
//! deadline; every enqueued operation is recorded as an event with a deadline, and a **watchdog** thread (one per
//! process, polling every [`WATCHDOG_POLL_MS`]) aborts a communicator (`ncclCommAbort`) whose async error is set
//! or whose oldest operation has not completed by its deadline. Once aborted, a communicator answers every call
//! with the [`EngineError::Comm`] (seam `nccl`) that says what failed and on which peer rank / stage. `Drop`
//! never panics: it waits (bounded) for the communicator's work, finalises and destroys it, or aborts; errors go to
//! [`record_drop_error`].
//!
//! **One GPU per rank.** NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU detected");
//! [`shared_gpus`] finds such ranks first so that the caller can say so (the CLI then falls back to MPI's
//! host-staged transport).
//!
//! **Transport.** Push semantics over NCCL's matched send/recv: every directed pair of stages of the replica that
//! exchanges messages and lives on two processes gets a **channel** — its own two-rank communicator (split from
//! the world, rank 0 the sender) and its own stream at each end — so a send waiting for its receiver never holds
//! up the sender's compute stream or any other pair (one communicator per direction: a blocked activation send
//! cannot hold up the gradient coming back). A send enqueues a 40-byte header (kind, part, micro-batch, element
//! type, length) and the payload on the channel's stream and returns (the buffers stay alive until their event
//! completes); the receiver drains its channel in the sender's order (NCCL matches send and recv per peer in
//! issue order): it receives a header, allocates the payload, posts its receive, and keeps messages that came
//! before the one asked for. The consumer's compute stream waits on the receive through cudarc's buffer events.
//! Stages on the same process keep the backend's copies ([`Backend::transfer`]: a peer copy between GPUs), as
//! [`super::LocalTransport`] does. Every channel is connected at construction (a one-byte exchange over all of a
//! rank's channels in one group), so no lazy connection can make a first send wait for its peer.
//!
//! **Collectives.** The order-fixed all-reduce of [`super::NcclGroup`], across processes: the group's
//! communicator is split from the world (one rank per process that hosts a member, in rank order); every
//! member's slice of shard `j` moves to shard `j`'s owner (member `j`) — NCCL send/recv between processes, a
//! device copy inside one —, the owner adds the slots in member order with the backend's own `add_assign` (the
//! bits of [`super::LocalGroup`] and `NcclGroup`), and every summed shard moves to every member. Broadcast and
//! all-gather are the same moves without the sum; host values travel as bytes.
//!
//! **What has been run.** On the 2-core development machine (no GPU, no NCCL): compiled and the CPU-side pieces
//! tested (config layout, id bytes, channel planning). The GPU tests (`#[ignore = "needs a CUDA device"]`, run by
//! `scripts/gpu-check.sh`) cover init, split, a send/recv round trip, the watchdog's abort of a receive that never
//! matches, and collectives against the host sum; the cross-process paths need two GPUs (a 2-GPU machine has not
//! been lent yet).

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use baton_kernels::cuda::cudarc::driver::sys::CUdeviceptr;
use baton_kernels::cuda::cudarc::driver::{
    result as driver, CudaContext, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop,
};
use baton_kernels::cuda::cudarc::nccl::{result as nccl, sys as nccl_sys};
use baton_schedules::Placement;
use crossbeam_channel::{bounded, Receiver, Sender};

use super::collective::{gather_host, hosted_order, Collective, Collectives, Local, Workers};
use super::nccl::{nccl_available, shard_ranges};
use super::transport::{wait_inbox, Endpoint, Endpoints, MessageKey, MessageKind, Msg, Transport};
use super::Cohort;
use crate::backend::{Backend, Cuda, CudaBuf, CudaData, PoolStats, Storage};
use crate::error::{record_drop_error, EngineError, Result};
use crate::executor::CopySpan;

/// `ncclConfig_t::magic` (NCCL's `NCCL_CONFIG_INITIALIZER`).
pub const NCCL_CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `ncclConfig_t::version`: `NCCL_VERSION(2, 30, 0)`, the layout cudarc 0.19 binds (`nccl-02030`); a newer
/// library reads the fields this version has and defaults the rest.
pub const NCCL_CONFIG_VERSION: u32 = 2 * 10_000 + 30 * 100;
/// An unset integer field of `ncclConfig_t` (`NCCL_CONFIG_UNDEF_INT`).
pub const NCCL_CONFIG_UNDEF_INT: c_int = i32::MIN;
/// The color of a rank that takes no part in a split (`NCCL_SPLIT_NOCOLOR`).
pub const NCCL_SPLIT_NOCOLOR: c_int = -1;
/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;
/// How often the watchdog looks at every communicator.
pub const WATCHDOG_POLL_MS: u64 = 50;
/// How often a host wait polls NCCL's state or an event, in microseconds.
pub const READY_POLL_US: u64 = 200;
/// How long `Drop` waits for a communicator's queued work before it aborts it.
pub const DROP_WAIT_MS: u64 = 10_000;
/// Bytes of a transport message's header: kind, part, micro-batch, element type, length (five `u64`).
pub const HEADER_BYTES: usize = 40;

fn comm_err(stage: usize, reason: String) -> EngineError {
    EngineError::Comm {
        seam: "nccl",
        stage: stage as u32,
        reason,
    }
}

fn nccl_text(r: nccl_sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for every result code.
    let text = unsafe { CStr::from_ptr(nccl_sys::ncclGetErrorString(r)) }.to_string_lossy();
    format!("{r:?} ({text})")
}

fn nccl_err(stage: usize, what: &str, e: &nccl::NcclError) -> EngineError {
    comm_err(stage, format!("{what}: {}", nccl_text(e.0)))
}

/// A non-blocking communicator configuration: every field unset (NCCL's defaults) but `blocking = 0`. cudarc has
/// no initializer for the struct; this is `NCCL_CONFIG_INITIALIZER` for the layout it binds.
pub fn nonblocking_config() -> nccl_sys::ncclConfig_t {
    let undef = NCCL_CONFIG_UNDEF_INT;
    nccl_sys::ncclConfig_t {
        size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
        magic: NCCL_CONFIG_MAGIC,
        version: NCCL_CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: undef,
        minCTAs: undef,
        maxCTAs: undef,
        netName: std::ptr::null(),
        splitShare: undef,
        trafficClass: undef,
        commName: std::ptr::null(),
        collnetEnable: undef,
        CTAPolicy: undef,
        shrinkShare: undef,
        nvlsCTAs: undef,
        nChannelsPerNetPeer: undef,
        nvlinkCentricSched: undef,
        graphUsageMode: undef,
        numRmaCtx: undef,
        maxP2pPeers: undef,
    }
}

/// An NCCL unique id: the 128 bytes every rank of a new communicator must hold.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; NCCL_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}…)", &self.0[..8])
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`; needs libnccl, not a GPU).
    pub fn new() -> Result<Self> {
        nccl_available().map_err(|reason| comm_err(0, reason))?;
        let raw = nccl::get_uniqueid().map_err(|e| nccl_err(0, "ncclGetUniqueId", &e))?;
        Ok(NcclId(raw.internal.map(|c| c as u8)))
    }

    /// The id's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; NCCL_ID_BYTES] {
        &self.0
    }

    /// The id from its bytes; an error unless there are exactly [`NCCL_ID_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
            comm_err(
                0,
                format!("an NCCL id of {} bytes, expected {NCCL_ID_BYTES}", bytes.len()),
            )
        })?;
        Ok(NcclId(arr))
    }

    fn raw(&self) -> nccl_sys::ncclUniqueId {
        nccl_sys::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

/// The id made by rank 0 of `cohort`, on every rank (collective: rank 0 makes it, every rank gathers rank 0's 128
/// bytes through [`Cohort::all_gather_bytes`], e.g. over MPI).
pub fn broadcast_id(cohort: &dyn Cohort) -> Result<NcclId> {
    let mine = if cohort.rank() == 0 {
        NcclId::new()?.as_bytes().to_vec()
    } else {
        Vec::new()
    };
    let all = cohort.all_gather_bytes(&mine)?;
    let first = all
        .first()
        .ok_or_else(|| comm_err(0, "the cohort gathered nothing for the NCCL id".into()))?;
    NcclId::from_bytes(first)
}

/// The pairs of ranks of `cohort` that would use the same GPU (by the device's UUID), `(lower, higher)`, given
/// this rank's `ordinal` (collective). NCCL refuses such ranks in one communicator.
pub fn shared_gpus(cohort: &dyn Cohort, ordinal: usize) -> Result<Vec<(usize, usize)>> {
    let ctx = CudaContext::new(ordinal).map_err(|e| comm_err(0, format!("opening CUDA device {ordinal}: {e}")))?;
    let uuid = ctx
        .uuid()
        .map_err(|e| comm_err(0, format!("the UUID of CUDA device {ordinal}: {e}")))?;
    let mine: Vec<u8> = uuid.bytes.iter().map(|&b| b as u8).collect();
    let all = cohort.all_gather_bytes(&mine)?;
    let mut pairs = Vec::new();
    for a in 0..all.len() {
        for b in a + 1..all.len() {
            if all[a] == all[b] {
                pairs.push((a, b));
            }
        }
    }
    Ok(pairs)
}

/// An operation enqueued on a communicator, watched until its event completes.
struct Watched {
    event: CudaEvent,
    deadline: Instant,
    what: String,
}

struct CommState {
    /// Null once aborted or destroyed.
    comm: nccl_sys::ncclComm_t,
    failed: Option<String>,
    watched: Vec<Watched>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every use of the handle happens
// under the `Mutex` that holds this state, and the handle is destroyed or aborted exactly once (then nulled).
unsafe impl Send for CommState {}

/// One NCCL communicator of ours: non-blocking, watched, aborted on error or deadline (see the module docs).
/// Every NCCL call on it is made under its lock, so it may be shared between threads.
pub struct NcclComm {
    state: Mutex<CommState>,
    rank: usize,
    size: usize,
    ctx: Arc<CudaContext>,
    /// What the communicator connects, for errors ("the world", "channel stage 1 → stage 2").
    label: String,
    /// Each comm rank's description for errors ("rank 3 (stage 2)").
    peers: Vec<String>,
    /// The stage errors are reported on (this process's first stage involved).
    stage: usize,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm {{ {}: rank {} of {} }}", self.label, self.rank, self.size)
    }
}

impl NcclComm {
    /// Rank `rank` of a new communicator of `size` ranks on the device of `ctx`, all holding `id`
    /// (`ncclCommInitRankConfig`, non-blocking; waits until it is ready, at most `timeout`). `peers[r]` names comm
    /// rank `r` in errors; `stage` is the stage errors are reported on.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        id: &NcclId,
        rank: usize,
        size: usize,
        ctx: &Arc<CudaContext>,
        label: String,
        peers: Vec<String>,
        stage: usize,
        timeout: Duration,
    ) -> Result<Arc<NcclComm>> {
        nccl_available().map_err(|reason| comm_err(stage, reason))?;
        if rank >= size || peers.len() != size {
            return Err(comm_err(
                stage,
                format!("{label}: rank {rank} of {size} with {} peer names", peers.len()),
            ));
        }
        let n = c_int::try_from(size).map_err(|_| comm_err(stage, format!("{label}: {size} ranks")))?;
        ctx.bind_to_thread()
            .map_err(|e| comm_err(stage, format!("{label}: binding CUDA device {}: {e}", ctx.ordinal())))?;
        let mut config = nonblocking_config();
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer, `config` a fully initialised config of the bound layout that NCCL
        // reads during the call, the id is 128 bytes every rank shares, and the device's context is current.
        let started = unsafe { nccl::comm_init_rank_config(&mut raw, n, id.raw(), rank as c_int, &mut config) };
        let comm = Arc::new(NcclComm {
            state: Mutex::new(CommState {
                comm: raw,
                failed: None,
                watched: Vec::new(),
            }),
            rank,
            size,
            ctx: Arc::clone(ctx),
            label,
            peers,
            stage,
        });
        if let Err(e) = started {
            let reason = format!("ncclCommInitRankConfig: {}", nccl_text(e.0));
            return Err(comm.abort(reason));
        }
        comm.wait_ready(Instant::now() + timeout, "ncclCommInitRankConfig")?;
        watchdog_register(&comm)?;
        Ok(comm)
    }

    /// This process's rank in the communicator.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The CUDA context of its device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn lock(&self) -> MutexGuard<'_, CommState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failure_text(&self, reason: &str) -> String {
        format!("{} (rank {} of {}): {reason}", self.label, self.rank, self.size)
    }

    /// The error of a communicator that failed.
    fn failed_err(&self, reason: &str) -> EngineError {
        comm_err(self.stage, self.failure_text(reason))
    }

    /// Aborts the communicator (idempotent) and returns the error that names why.
    pub fn abort(&self, reason: String) -> EngineError {
        let mut st = self.lock();
        self.abort_locked(&mut st, reason)
    }

    fn abort_locked(&self, st: &mut CommState, reason: String) -> EngineError {
        if let Some(first) = &st.failed {
            return self.failed_err(first);
        }
        if !st.comm.is_null() {
            // The context must be current for NCCL to tear down its device state.
            let _ = self.ctx.bind_to_thread();
            // SAFETY: the handle is live (not null), this is its only teardown (it is nulled right after), and no
            // other thread can use it meanwhile: we hold its lock.
            if let Err(e) = unsafe { nccl::comm_abort(st.comm) } {
                record_drop_error("ncclCommAbort", self.failed_err(&nccl_text(e.0)));
            }
            st.comm = std::ptr::null_mut();
        }
        st.watched.clear();
        st.failed = Some(reason.clone());
        self.failed_err(&reason)
    }

    /// `Ok` unless the communicator failed (then its error).
    pub fn check(&self) -> Result<()> {
        match &self.lock().failed {
            Some(r) => Err(self.failed_err(r)),
            None => Ok(()),
        }
    }

    /// The async error of a live communicator.
    fn async_error(&self, st: &CommState) -> nccl_sys::ncclResult_t {
        let mut r = nccl_sys::ncclResult_t::ncclSuccess;
        // SAFETY: the handle is live (callers check it is not null) and used under its lock; `r` is an out-pointer.
        let call = unsafe { nccl_sys::ncclCommGetAsyncError(st.comm, &mut r) };
        if call != nccl_sys::ncclResult_t::ncclSuccess {
            return call;
        }
        r
    }

    /// Polls `ncclCommGetAsyncError` until `ncclSuccess` (the last init, split or enqueue is done), aborting on an
    /// error or at `deadline`.
    pub fn wait_ready(&self, deadline: Instant, what: &str) -> Result<()> {
        loop {
            {
                let mut st = self.lock();
                if let Some(r) = &st.failed {
                    return Err(self.failed_err(r));
                }
                if st.comm.is_null() {
                    return Err(self.failed_err("used after it was destroyed"));
                }
                match self.async_error(&st) {
                    nccl_sys::ncclResult_t::ncclSuccess => return Ok(()),
                    nccl_sys::ncclResult_t::ncclInProgress => {
                        if Instant::now() >= deadline {
                            let reason = format!(
                                "{what} still in progress at its deadline; a peer ({}) is lost or stalled",
                                self.others()
                            );
                            return Err(self.abort_locked(&mut st, reason));
                        }
                    }
                    other => {
                        let reason = format!("{what}: {}", nccl_text(other));
                        return Err(self.abort_locked(&mut st, reason));
                    }
                }
            }
            std::thread::sleep(Duration::from_micros(READY_POLL_US));
        }
    }

    /// The other ranks, for messages.
    fn others(&self) -> String {
        self.peers
            .iter()
            .enumerate()
            .filter(|(r, _)| *r != self.rank)
            .map(|(_, p)| p.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Comm rank `r`'s description.
    pub fn peer(&self, r: usize) -> &str {
        self.peers.get(r).map_or("?", String::as_str)
    }

    /// Runs `issue` with the live handle under the lock (the NCCL calls of one enqueue).
    fn with_handle<T>(&self, issue: impl FnOnce(nccl_sys::ncclComm_t) -> Result<T>) -> Result<T> {
        let st = self.lock();
        if let Some(r) = &st.failed {
            return Err(self.failed_err(r));
        }
        issue(st.comm)
    }

    /// A new communicator of the ranks that pass the same `color` (`None`: this rank takes no part and gets
    /// `None`), ordered by `key` (`ncclCommSplit`, non-blocking; collective over this communicator: every rank
    /// calls it, in the same order). `peers` names the new communicator's ranks.
    pub fn split(
        &self,
        color: Option<usize>,
        key: usize,
        label: String,
        peers: Vec<String>,
        stage: usize,
        timeout: Duration,
    ) -> Result<Option<Arc<NcclComm>>> {
        let deadline = Instant::now() + timeout;
        let color_c = match color {
            Some(c) => c_int::try_from(c).map_err(|_| comm_err(stage, format!("{label}: split color {c}")))?,
            None => NCCL_SPLIT_NOCOLOR,
        };
        let key_c = c_int::try_from(key).map_err(|_| comm_err(stage, format!("{label}: split key {key}")))?;
        let mut config = nonblocking_config();
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        self.ctx.bind_to_thread().map_err(|e| {
            comm_err(
                stage,
                format!("{label}: binding CUDA device {}: {e}", self.ctx.ordinal()),
            )
        })?;
        let started = self.with_handle(|parent| {
            // SAFETY: `parent` is live under its lock, `raw` a valid out-pointer, `config` fully initialised.
            let r = unsafe { nccl_sys::ncclCommSplit(parent, color_c, key_c, &mut raw, &mut config) };
            Ok(r)
        })?;
        match started {
            nccl_sys::ncclResult_t::ncclSuccess | nccl_sys::ncclResult_t::ncclInProgress => {}
            other => return Err(self.abort(format!("ncclCommSplit for {label}: {}", nccl_text(other)))),
        }
        self.wait_ready(deadline, &format!("ncclCommSplit for {label}"))?;
        if color.is_none() || raw.is_null() {
            return Ok(None);
        }
        let size = peers.len();
        let child = Arc::new(NcclComm {
            state: Mutex::new(CommState {
                comm: raw,
                failed: None,
                watched: Vec::new(),
            }),
            rank: key.min(size.saturating_sub(1)),
            size,
            ctx: Arc::clone(&self.ctx),
            label,
            peers,
            stage,
        });
        child.wait_ready(deadline, "ncclCommSplit (the new communicator)")?;
        // The ranks of the new communicator are ordered by key; check that the caller's view agrees.
        let (rank, count) = child
            .with_handle(|c| {
                let (mut rank, mut count) = (0 as c_int, 0 as c_int);
                // SAFETY: `c` is live under its lock; both are out-pointers.
                let a = unsafe { nccl_sys::ncclCommUserRank(c, &mut rank) };
                // SAFETY: as above.
                let b = unsafe { nccl_sys::ncclCommCount(c, &mut count) };
                Ok((a, b, rank, count))
            })
            .map(|(a, b, rank, count)| {
                if a == nccl_sys::ncclResult_t::ncclSuccess && b == nccl_sys::ncclResult_t::ncclSuccess {
                    (rank as usize, count as usize)
                } else {
                    (usize::MAX, usize::MAX)
                }
            })?;
        if rank != child.rank || count != child.size {
            return Err(child.abort(format!(
                "the split made rank {rank} of {count}, expected rank {} of {}",
                child.rank, child.size
            )));
        }
        watchdog_register(&child)?;
        Ok(Some(child))
    }

    /// Watches the work queued on `stream` so far as `what` (its peer is named on failure): the watchdog aborts
    /// the communicator if it has not completed by `deadline`.
    pub fn watch(&self, stream: &CudaStream, deadline: Instant, what: String) -> Result<()> {
        let event = stream
            .record_event(None)
            .map_err(|e| self.failed_err(&format!("recording an event after {what}: {e}")))?;
        let mut st = self.lock();
        if let Some(r) = &st.failed {
            return Err(self.failed_err(r));
        }
        st.watched.retain(|w| !w.event.is_complete());
        st.watched.push(Watched { event, deadline, what });
        Ok(())
    }

    /// One look by the watchdog: aborts on an async error or an operation past its deadline. Skips a
    /// communicator whose lock another thread holds (it is enqueueing; the next poll sees it).
    fn poll(&self) {
        let Ok(mut st) = self.state.try_lock() else { return };
        if st.failed.is_some() || st.comm.is_null() {
            return;
        }
        match self.async_error(&st) {
            nccl_sys::ncclResult_t::ncclSuccess | nccl_sys::ncclResult_t::ncclInProgress => {}
            other => {
                let reason = format!(
                    "asynchronous error {}; a peer ({}) failed or was lost",
                    nccl_text(other),
                    self.others()
                );
                let _ = self.abort_locked(&mut st, reason);
                return;
            }
        }
        st.watched.retain(|w| !w.event.is_complete());
        let now = Instant::now();
        if let Some(late) = st.watched.iter().find(|w| w.deadline <= now) {
            let reason = format!(
                "{} did not complete by its deadline; a peer ({}) is lost or stalled",
                late.what,
                self.others()
            );
            let _ = self.abort_locked(&mut st, reason);
        }
    }

    /// Waits until every watched operation has completed, aborting at `deadline` (the watchdog's reason if it
    /// fired first).
    pub fn flush(&self, deadline: Instant, what: &str) -> Result<()> {
        loop {
            {
                let mut st = self.lock();
                if let Some(r) = &st.failed {
                    return Err(self.failed_err(r));
                }
                st.watched.retain(|w| !w.event.is_complete());
                if st.watched.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let reason = format!(
                        "{what}: {} still running at the deadline; a peer ({}) is lost or stalled",
                        st.watched[0].what,
                        self.others()
                    );
                    return Err(self.abort_locked(&mut st, reason));
                }
            }
            std::thread::sleep(Duration::from_micros(READY_POLL_US));
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(DROP_WAIT_MS);
        if self.flush(deadline, "dropping the communicator").is_err() {
            // Aborted (by flush, the watchdog or earlier): nothing left to destroy.
            return;
        }
        let mut st = self.lock();
        if st.comm.is_null() {
            return;
        }
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the handle is live, idle (every watched operation completed) and ours alone (we are in `Drop`).
        let finalized = unsafe { nccl::comm_finalize(st.comm) };
        let mut ready = finalized.is_ok();
        while ready {
            match self.async_error(&st) {
                nccl_sys::ncclResult_t::ncclSuccess => break,
                nccl_sys::ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(READY_POLL_US));
                }
                _ => ready = false,
            }
        }
        if !ready {
            let e = self.abort_locked(&mut st, "finalising at drop failed or timed out".into());
            record_drop_error("ncclCommFinalize", e);
            return;
        }
        // SAFETY: finalised, and destroyed exactly once (nulled below).
        if let Err(e) = unsafe { nccl::comm_destroy(st.comm) } {
            record_drop_error("ncclCommDestroy", self.failed_err(&nccl_text(e.0)));
        }
        st.comm = std::ptr::null_mut();
    }
}

/// The communicators the watchdog looks at.
static WATCHED: Mutex<Vec<Weak<NcclComm>>> = Mutex::new(Vec::new());

/// Adds `comm` to the watchdog's list, starting the watchdog thread on first use.
fn watchdog_register(comm: &Arc<NcclComm>) -> Result<()> {
    static STARTED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("nccl-watchdog".into())
                .spawn(|| loop {
                    std::thread::sleep(Duration::from_millis(WATCHDOG_POLL_MS));
                    let live: Vec<Arc<NcclComm>> = {
                        let mut list = WATCHED.lock().unwrap_or_else(PoisonError::into_inner);
                        list.retain(|w| w.strong_count() > 0);
                        list.iter().filter_map(Weak::upgrade).collect()
                    };
                    for c in &live {
                        c.poll();
                    }
                })
                .map(drop)
                .map_err(|e| format!("starting the NCCL watchdog thread: {e}"))
        })
        .clone()
        .map_err(|reason| comm_err(comm.stage, reason))?;
    WATCHED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Arc::downgrade(comm));
    Ok(())
}

/// Runs `issue` between `ncclGroupStart` and `ncclGroupEnd` holding every communicator's lock (always closing the
/// group), handing it the live handles in the order of `comms`; then waits until each is ready. Any failure
/// aborts them all.
fn grouped(
    comms: &[&NcclComm],
    what: &str,
    deadline: Instant,
    issue: impl FnOnce(&[nccl_sys::ncclComm_t]) -> Result<()>,
) -> Result<()> {
    {
        let mut guards = Vec::with_capacity(comms.len());
        for c in comms {
            let g = c.lock();
            if let Some(r) = &g.failed {
                return Err(c.failed_err(r));
            }
            guards.push(g);
        }
        let handles: Vec<nccl_sys::ncclComm_t> = guards.iter().map(|g| g.comm).collect();
        let stage = comms.first().map_or(0, |c| c.stage);
        nccl::group_start().map_err(|e| nccl_err(stage, "ncclGroupStart", &e))?;
        let issued = issue(&handles);
        let ended = nccl::group_end().map_err(|e| nccl_err(stage, &format!("ncclGroupEnd ({what})"), &e));
        if let Err(e) = issued.and(ended) {
            for (c, mut g) in comms.iter().zip(guards) {
                let _ = c.abort_locked(&mut g, format!("{what}: {e}"));
            }
            return Err(e);
        }
    }
    for c in comms {
        c.wait_ready(deadline, what)?;
    }
    Ok(())
}

/// Enqueues a send of `bytes` bytes at `ptr` to comm rank `peer` of `comm` (live handle `handle`) on `stream`.
///
/// # Safety
/// `ptr` must hold `bytes` readable bytes on the communicator's device, ordered on `stream` (taken through
/// `device_ptr` for it) and alive until the operation completes; `handle` must be `comm`'s live handle, used
/// under its lock (inside [`grouped`]).
unsafe fn send_bytes(
    comm: &NcclComm,
    handle: nccl_sys::ncclComm_t,
    ptr: CUdeviceptr,
    bytes: usize,
    peer: usize,
    stream: &CudaStream,
) -> Result<()> {
    nccl::send(
        ptr as *const c_void,
        bytes,
        nccl_sys::ncclDataType_t::ncclUint8,
        peer as c_int,
        handle,
        stream.cu_stream() as nccl_sys::cudaStream_t,
    )
    .map(drop)
    .map_err(|e| {
        nccl_err(
            comm.stage,
            &format!("ncclSend of {bytes} bytes to {}", comm.peer(peer)),
            &e,
        )
    })
}

/// Enqueues a receive of `bytes` bytes into `ptr` from comm rank `peer` on `stream`.
///
/// # Safety
/// As [`send_bytes`], for `bytes` writable bytes.
unsafe fn recv_bytes(
    comm: &NcclComm,
    handle: nccl_sys::ncclComm_t,
    ptr: CUdeviceptr,
    bytes: usize,
    peer: usize,
    stream: &CudaStream,
) -> Result<()> {
    nccl::recv(
        ptr as *mut c_void,
        bytes,
        nccl_sys::ncclDataType_t::ncclUint8,
        peer as c_int,
        handle,
        stream.cu_stream() as nccl_sys::cudaStream_t,
    )
    .map(drop)
    .map_err(|e| {
        nccl_err(
            comm.stage,
            &format!("ncclRecv of {bytes} bytes from {}", comm.peer(peer)),
            &e,
        )
    })
}

/// The NCCL world of a job: one communicator over every rank (one GPU each), from which the transports' channels
/// and the collectives' groups are split.
pub struct NcclWorld {
    comm: Arc<NcclComm>,
    /// Rank of each worker (`replica·stages + stage`).
    rank_of_worker: Vec<usize>,
    stages: usize,
    timeout: Duration,
}

impl std::fmt::Debug for NcclWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclWorld {{ rank {} of {} }}", self.comm.rank(), self.comm.size())
    }
}

impl NcclWorld {
    /// The world over the ranks of `cohort` (collective), this rank on CUDA device `ordinal`: checks that no two
    /// ranks share a GPU ([`shared_gpus`]), broadcasts rank 0's id ([`broadcast_id`]) and creates the
    /// communicator. `rank_of_worker[w]` is the rank running worker `w = replica·stages + stage`; every wait gives
    /// up after `timeout`.
    pub fn init(
        cohort: &dyn Cohort,
        ordinal: usize,
        rank_of_worker: Vec<usize>,
        stages: usize,
        timeout: Duration,
    ) -> Result<Arc<NcclWorld>> {
        nccl_available().map_err(|reason| comm_err(0, reason))?;
        let (rank, size) = (cohort.rank(), cohort.size());
        if stages == 0 || rank_of_worker.len() % stages != 0 || rank_of_worker.iter().any(|&r| r >= size) {
            return Err(comm_err(
                0,
                format!(
                    "a rank map of {} workers in replicas of {stages} stages over {size} ranks",
                    rank_of_worker.len()
                ),
            ));
        }
        if let Some(&(a, b)) = shared_gpus(cohort, ordinal)?.first() {
            return Err(comm_err(
                0,
                format!("ranks {a} and {b} use the same GPU; NCCL needs one GPU per rank (give each rank its own)"),
            ));
        }
        let id = broadcast_id(cohort)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| comm_err(0, format!("opening CUDA device {ordinal}: {e}")))?;
        let peers = (0..size).map(|r| format!("rank {r}")).collect();
        let stage = rank_of_worker.iter().position(|&r| r == rank).map_or(0, |w| w % stages);
        let comm = NcclComm::init(&id, rank, size, &ctx, "the NCCL world".into(), peers, stage, timeout)?;
        Ok(Arc::new(NcclWorld {
            comm,
            rank_of_worker,
            stages,
            timeout,
        }))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The world communicator.
    pub fn comm(&self) -> &Arc<NcclComm> {
        &self.comm
    }

    /// `rank R (replica r, stage s)` for the first worker of rank `r`, for messages.
    fn describe(&self, rank: usize, worker: Option<usize>) -> String {
        match worker.or_else(|| self.rank_of_worker.iter().position(|&x| x == rank)) {
            Some(w) => format!("rank {rank} (replica {}, stage {})", w / self.stages, w % self.stages),
            None => format!("rank {rank}"),
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Buffers as NCCL sees them.

/// The device planes of `d` read on `stream` and their bytes; the read events are recorded when the guards pushed
/// onto `guards` drop (after the work using the pointers is enqueued).
fn planes<'a>(d: &'a CudaData, stream: &'a CudaStream, guards: &mut Vec<SyncOnDrop<'a>>) -> Vec<(CUdeviceptr, usize)> {
    let mut one = |p: (CUdeviceptr, SyncOnDrop<'a>), bytes| {
        guards.push(p.1);
        (p.0, bytes)
    };
    match d {
        CudaData::F32(s) => vec![one(s.device_ptr(stream), s.len() * 4)],
        CudaData::Bf16(s) => vec![one(s.device_ptr(stream), s.len() * 2)],
        CudaData::Param { master, working } => vec![
            one(master.device_ptr(stream), master.len() * 4),
            one(working.device_ptr(stream), working.len() * 2),
        ],
    }
}

/// As [`planes`], for writing.
fn planes_mut<'a>(
    d: &'a mut CudaData,
    stream: &'a CudaStream,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> Vec<(CUdeviceptr, usize)> {
    let mut one = |p: (CUdeviceptr, SyncOnDrop<'a>), bytes| {
        guards.push(p.1);
        (p.0, bytes)
    };
    match d {
        CudaData::F32(s) => {
            let n = s.len() * 4;
            vec![one(s.device_ptr_mut(stream), n)]
        }
        CudaData::Bf16(s) => {
            let n = s.len() * 2;
            vec![one(s.device_ptr_mut(stream), n)]
        }
        CudaData::Param { master, working } => {
            let (a, b) = (master.len() * 4, working.len() * 2);
            vec![
                one(master.device_ptr_mut(stream), a),
                one(working.device_ptr_mut(stream), b),
            ]
        }
    }
}

/// Bytes of one element of a reducible storage.
fn elem_bytes(storage: Storage) -> Option<usize> {
    match storage {
        Storage::F32 => Some(4),
        Storage::Bf16 => Some(2),
        Storage::Param => None,
    }
}

/// An uninitialised buffer of `len` elements of `storage` on `stream`.
///
/// # Safety
/// The caller writes every element (a receive or a copy into all of it) before anything reads it.
unsafe fn uninit(stream: &Arc<CudaStream>, storage: Storage, len: usize) -> std::result::Result<CudaBuf, String> {
    let data = match storage {
        Storage::F32 => CudaData::F32(stream.alloc::<f32>(len).map_err(|e| e.to_string())?),
        Storage::Bf16 => CudaData::Bf16(stream.alloc::<half::bf16>(len).map_err(|e| e.to_string())?),
        Storage::Param => return Err("a parameter buffer is never staged".into()),
    };
    Ok(CudaBuf::new(data))
}

/// One move of `bytes` bytes from process `from` to process `to` (indices of the group's processes): `src` is
/// known only where `from` is this process, `dst` only where `to` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Move {
    from: usize,
    to: usize,
    src: Option<CUdeviceptr>,
    dst: Option<CUdeviceptr>,
    bytes: usize,
}

// ------------------------------------------------------------------------------------------------------------
// Collectives.

/// Groups of workers on any ranks of the job, reduced through NCCL in member order (module docs). Every rank makes
/// the same groups in the same order (each is a split of the world).
pub struct NcclWorldCollectives {
    world: Arc<NcclWorld>,
    workers: Workers<Cuda>,
}

impl NcclWorldCollectives {
    /// Groups over the job's workers; `workers` holds this rank's backends (the other entries are never used).
    pub fn new(world: &Arc<NcclWorld>, workers: Workers<Cuda>) -> Self {
        NcclWorldCollectives {
            world: Arc::clone(world),
            workers,
        }
    }
}

impl Collectives<Cuda> for NcclWorldCollectives {
    fn group(&self, workers: &[usize]) -> Result<Box<dyn Collective<Cuda>>> {
        let w = &self.world;
        let first = *workers
            .first()
            .ok_or_else(|| comm_err(0, "a group needs at least one member".into()))?;
        if let Some(&bad) = workers.iter().find(|&&x| x >= w.rank_of_worker.len()) {
            return Err(comm_err(
                bad % w.stages,
                format!("a member on worker {bad}, but the job has {}", w.rank_of_worker.len()),
            ));
        }
        let ranks: Vec<usize> = workers.iter().map(|&x| w.rank_of_worker[x]).collect();
        let mut procs = ranks.clone();
        procs.sort_unstable();
        procs.dedup();
        let me = procs.iter().position(|&r| r == w.rank());
        let member_proc: Vec<usize> = ranks
            .iter()
            .map(|r| procs.iter().position(|p| p == r).unwrap_or(0))
            .collect();
        let peers: Vec<String> = procs.iter().map(|&r| w.describe(r, None)).collect();
        let label = format!("the group of workers {workers:?}");
        let stage = first % w.stages;
        let comm = w
            .comm
            .split(me.map(|_| 0), me.unwrap_or(0), label, peers, stage, w.timeout)?;
        // This rank's members: one device, the first one's stream is the group's home here.
        let local: Vec<usize> = (0..workers.len()).filter(|&m| Some(member_proc[m]) == me).collect();
        let mut home: Option<(usize, Arc<CudaStream>)> = None;
        for &m in &local {
            let be = self.workers.get(workers[m]).ok_or_else(|| {
                comm_err(
                    stage,
                    format!("this rank hosts worker {} but has no backend for it", workers[m]),
                )
            })?;
            let ordinal = be.device().context().ordinal();
            match &home {
                None => home = Some((m, Arc::clone(be.device().stream()))),
                Some((h, _)) => {
                    let hd = self.workers.get(workers[*h]).map(|b| b.device().context().ordinal());
                    if hd != Some(ordinal) {
                        return Err(comm_err(
                            stage,
                            format!("members of one rank on two GPUs ({hd:?} and {ordinal}); NCCL takes one per rank"),
                        ));
                    }
                }
            }
        }
        Ok(Box::new(NcclWorldGroup {
            comm,
            workers: workers.to_vec(),
            member_proc,
            me,
            backends: self.workers.clone(),
            home,
            stages: w.stages,
            timeout: w.timeout,
        }))
    }
}

/// A group of workers on several ranks: member `m` is worker `workers[m]` on the group's process `member_proc[m]`
/// (an index into the group's ranks, ascending).
struct NcclWorldGroup {
    /// `None` where this rank hosts no member.
    comm: Option<Arc<NcclComm>>,
    workers: Vec<usize>,
    member_proc: Vec<usize>,
    me: Option<usize>,
    backends: Workers<Cuda>,
    /// The first local member and its compute stream (where this rank's share of every operation runs).
    home: Option<(usize, Arc<CudaStream>)>,
    stages: usize,
    timeout: Duration,
}

impl NcclWorldGroup {
    fn n(&self) -> usize {
        self.workers.len()
    }

    fn here(&self, m: usize) -> bool {
        Some(self.member_proc[m]) == self.me
    }

    fn err(&self, m: usize, reason: String) -> EngineError {
        comm_err(self.workers[m.min(self.n() - 1)] % self.stages, reason)
    }

    fn be(&self, m: usize) -> Result<&Cuda> {
        self.backends
            .get(self.workers[m])
            .filter(|_| self.here(m))
            .ok_or_else(|| self.err(m, format!("member {m} is not hosted by this rank")))
    }

    fn home(&self) -> Result<&Arc<CudaStream>> {
        self.home
            .as_ref()
            .map(|(_, s)| s)
            .ok_or_else(|| self.err(0, "this rank hosts no member of the group".into()))
    }

    fn comm(&self) -> Result<&Arc<NcclComm>> {
        self.comm
            .as_ref()
            .ok_or_else(|| self.err(0, "this rank hosts no member of the group".into()))
    }

    /// `(member, position in given)` of this rank's members, in member order: each local member exactly once.
    fn local_order(&self, given: impl Iterator<Item = usize>) -> Result<Vec<(usize, usize)>> {
        hosted_order(self.n(), |m| self.here(m), given, "this rank", |m, r| self.err(m, r))
    }

    /// Enqueues this rank's share of `moves` (copies for moves inside it, NCCL send/recv otherwise, in list
    /// order) on the home stream, and has the watchdog watch it.
    fn run_moves(&self, what: &str, moves: &[Move]) -> Result<()> {
        let Some(me) = self.me else { return Ok(()) };
        let stream = self.home()?;
        let comm = self.comm()?;
        let stage = self.workers[self.home.as_ref().map_or(0, |h| h.0)] % self.stages;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| comm_err(stage, format!("{what}: binding the device: {e}")))?;
        let missing = || comm_err(stage, format!("{what}: a move without its local pointer"));
        for mv in moves.iter().filter(|mv| mv.from == me && mv.to == me && mv.bytes > 0) {
            let (src, dst) = (mv.src.ok_or_else(missing)?, mv.dst.ok_or_else(missing)?);
            // SAFETY: both pointers point into live buffers of this rank's device holding `bytes` from there on
            // (derived from the buffers' lengths), taken for this stream with guards that outlive the call, and
            // never overlap (different buffers).
            unsafe { driver::memcpy_dtod_async(dst, src, mv.bytes, stream.cu_stream()) }
                .map_err(|e| comm_err(stage, format!("{what}: device copy: {e}")))?;
        }
        let remote: Vec<&Move> = moves
            .iter()
            .filter(|mv| mv.bytes > 0 && mv.from != mv.to && (mv.from == me || mv.to == me))
            .collect();
        if remote.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        grouped(&[comm], what, deadline, |h| {
            for mv in remote {
                if mv.from == me {
                    // SAFETY: `src` holds `bytes` on this device, taken for `stream` with guards that outlive the
                    // group; the peer is a rank of this communicator (processes are its ranks, in order).
                    unsafe { send_bytes(comm, h[0], mv.src.ok_or_else(missing)?, mv.bytes, mv.to, stream) }?;
                } else {
                    // SAFETY: as for the send, `dst` has room for `bytes`.
                    unsafe { recv_bytes(comm, h[0], mv.dst.ok_or_else(missing)?, mv.bytes, mv.from, stream) }?;
                }
            }
            Ok(())
        })?;
        comm.watch(stream, deadline, what.to_string())
    }

    /// Scatter + member-order sum: every member's slice of shard `j` into staging on owner `j`'s rank, then the
    /// owner's sum. Returns each shard's sum where this rank owns it.
    fn reduce_shards(
        &self,
        local: &[(usize, &CudaData)],
        storage: Storage,
        shards: &[Range<usize>],
    ) -> Result<Vec<Option<CudaBuf>>> {
        let n = self.n();
        let eb = elem_bytes(storage).ok_or_else(|| {
            self.err(
                0,
                "a reduction over parameters (master + working copy): reduce their gradients".into(),
            )
        })?;
        let stream = Arc::clone(self.home()?);
        let mut slots: Vec<Option<Vec<CudaBuf>>> = Vec::with_capacity(n);
        for (j, r) in shards.iter().enumerate() {
            if self.here(j) && !r.is_empty() {
                // SAFETY: every slot is written in full by its move before the sum reads it.
                let row = (0..n)
                    .map(|_| unsafe { uninit(&stream, storage, r.len()) })
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| self.err(j, format!("allocating staging: {e}")))?;
                slots.push(Some(row));
            } else {
                slots.push(None);
            }
        }
        {
            let mut guards = Vec::new();
            let mut src: Vec<Option<CUdeviceptr>> = vec![None; n];
            for &(m, d) in local {
                src[m] = Some(planes(d, &stream, &mut guards)[0].0);
            }
            let mut dst: Vec<Vec<Option<CUdeviceptr>>> = vec![vec![None; n]; n];
            for (j, row) in slots.iter_mut().enumerate() {
                if let Some(row) = row {
                    for (m, slot) in row.iter_mut().enumerate() {
                        dst[j][m] = Some(planes_mut(slot, &stream, &mut guards)[0].0);
                    }
                }
            }
            let mut moves = Vec::with_capacity(n * n);
            for (j, r) in shards.iter().enumerate() {
                for m in 0..n {
                    moves.push(Move {
                        from: self.member_proc[m],
                        to: self.member_proc[j],
                        src: src[m].map(|p| p + (r.start * eb) as u64),
                        dst: dst[j][m],
                        bytes: r.len() * eb,
                    });
                }
            }
            self.run_moves("all-reduce (scatter)", &moves)?;
            drop(guards);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(j, row)| {
                row.map(|row| {
                    let mut row = row.into_iter();
                    let mut acc = row.next().ok_or_else(|| self.err(j, "an empty staging row".into()))?;
                    for x in row {
                        self.be(j)?.add_assign(&mut acc, &x)?;
                    }
                    Ok(acc)
                })
                .transpose()
            })
            .collect()
    }

    /// Moves summed shard `j` (where owned here) into every member's buffer at `shards[j]` (only `only`'s).
    fn gather_shards(
        &self,
        sums: &[Option<CudaBuf>],
        shards: &[Range<usize>],
        eb: usize,
        outs: &mut [(usize, &mut CudaData)],
        only: Option<usize>,
    ) -> Result<()> {
        let n = self.n();
        let stream = Arc::clone(self.home()?);
        let mut guards = Vec::new();
        let src: Vec<Option<CUdeviceptr>> = sums
            .iter()
            .map(|s| s.as_ref().map(|s| planes(s, &stream, &mut guards)[0].0))
            .collect();
        let mut dst: Vec<Option<CUdeviceptr>> = vec![None; n];
        for (m, d) in outs.iter_mut() {
            dst[*m] = Some(planes_mut(d, &stream, &mut guards)[0].0);
        }
        let mut moves = Vec::new();
        for (j, r) in shards.iter().enumerate() {
            for m in (0..n).filter(|&m| only.is_none_or(|o| o == m)) {
                moves.push(Move {
                    from: self.member_proc[j],
                    to: self.member_proc[m],
                    src: src[j],
                    dst: dst[m].map(|p| p + (r.start * eb) as u64),
                    bytes: r.len() * eb,
                });
            }
        }
        self.run_moves("all-reduce (gather)", &moves)?;
        drop(guards);
        Ok(())
    }

    fn all_reduce_into(&self, bufs: &mut [Local<'_, &mut CudaBuf>], only: Option<usize>) -> Result<()> {
        let order = self.local_order(bufs.iter().map(|(m, _)| *m))?;
        let Some(&(m0, p0)) = order.first() else { return Ok(()) };
        let (storage, len) = (bufs[p0].1.storage(), bufs[p0].1.len());
        for &(m, p) in &order {
            if bufs[p].1.storage() != storage || bufs[p].1.len() != len {
                return Err(self.err(
                    m,
                    format!(
                        "member {m}: {:?} × {} among {storage:?} × {len} (member {m0})",
                        bufs[p].1.storage(),
                        bufs[p].1.len()
                    ),
                ));
            }
        }
        let eb = elem_bytes(storage).ok_or_else(|| {
            self.err(
                m0,
                "a reduction over parameters (master + working copy): reduce their gradients".into(),
            )
        })?;
        if len == 0 || self.n() == 1 {
            return Ok(());
        }
        let shards = shard_ranges(len, self.n());
        let sums = {
            let local: Vec<(usize, &CudaData)> = order.iter().map(|&(m, p)| (m, &**bufs[p].1)).collect();
            self.reduce_shards(&local, storage, &shards)?
        };
        let mut outs: Vec<(usize, &mut CudaData)> = bufs.iter_mut().map(|(m, b)| (*m, &mut ***b)).collect();
        self.gather_shards(&sums, &shards, eb, &mut outs, only)
    }

    /// Every member's host bytes, in member order (lengths first, then the bytes, both as NCCL moves).
    fn gather_bytes(&self, local: &[(usize, Vec<u8>)], what: &str) -> Result<Vec<Vec<u8>>> {
        let n = self.n();
        let stream = Arc::clone(self.home()?);
        let comm = Arc::clone(self.comm()?);
        let procs = self.member_proc.iter().max().map_or(0, |&p| p + 1);
        let stage = self.workers[0] % self.stages;
        let fail = |e: baton_kernels::cuda::cudarc::driver::DriverError| comm_err(stage, format!("{what}: {e}"));
        // Phase 1: lengths (one u64 per member).
        let mut lens: Vec<u64> = vec![0; n];
        for (m, b) in local {
            lens[*m] = b.len() as u64;
        }
        let mut len_dev = stream.clone_htod(&lens).map_err(fail)?;
        self.spread(&mut len_dev, |m| (m * 8, 8), procs, &format!("{what} (lengths)"))?;
        comm.flush(Instant::now() + self.timeout, what)?;
        let lens = stream.clone_dtoh(&len_dev).map_err(fail)?;
        // Phase 2: the bytes, laid out member after member.
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0usize, |at, &l| {
                let o = *at;
                *at += l as usize;
                Some(o)
            })
            .collect();
        let total: usize = lens.iter().map(|&l| l as usize).sum();
        let mut host = vec![0u8; total.max(1)];
        for (m, b) in local {
            host[offsets[*m]..offsets[*m] + b.len()].copy_from_slice(b);
        }
        let mut dev = stream.clone_htod(&host).map_err(fail)?;
        self.spread(&mut dev, |m| (offsets[m], lens[m] as usize), procs, what)?;
        comm.flush(Instant::now() + self.timeout, what)?;
        let host = stream.clone_dtoh(&dev).map_err(fail)?;
        Ok((0..n)
            .map(|m| host[offsets[m]..offsets[m] + lens[m] as usize].to_vec())
            .collect())
    }

    /// Sends each member's range `at(m)` of `buf` from its process to every other process of the group (the same
    /// range there).
    fn spread<T>(
        &self,
        buf: &mut baton_kernels::cuda::cudarc::driver::CudaSlice<T>,
        at: impl Fn(usize) -> (usize, usize),
        procs: usize,
        what: &str,
    ) -> Result<()> {
        let stream = Arc::clone(self.home()?);
        let (ptr, guard) = buf.device_ptr_mut(&stream);
        let mut moves = Vec::new();
        for m in 0..self.n() {
            let (off, bytes) = at(m);
            for q in (0..procs).filter(|&q| q != self.member_proc[m]) {
                moves.push(Move {
                    from: self.member_proc[m],
                    to: q,
                    src: Some(ptr + off as u64),
                    dst: Some(ptr + off as u64),
                    bytes,
                });
            }
        }
        self.run_moves(what, &moves)?;
        drop(guard);
        Ok(())
    }
}

impl Collective<Cuda> for NcclWorldGroup {
    fn members(&self) -> usize {
        self.n()
    }

    fn all_reduce(&self, bufs: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        self.all_reduce_into(bufs, None)
    }

    fn reduce(&self, root: usize, bufs: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        if root >= self.n() {
            return Err(self.err(0, format!("reduce to member {root} of a group of {}", self.n())));
        }
        self.all_reduce_into(bufs, Some(root))
    }

    fn broadcast(&self, root: usize, bufs: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        if root >= self.n() {
            return Err(self.err(0, format!("broadcast from member {root} of a group of {}", self.n())));
        }
        let order = self.local_order(bufs.iter().map(|(m, _)| *m))?;
        if order.is_empty() || self.n() == 1 {
            return Ok(());
        }
        let stream = Arc::clone(self.home()?);
        let mut guards = Vec::new();
        let mut ptrs: Vec<Option<Vec<(CUdeviceptr, usize)>>> = vec![None; self.n()];
        for (m, b) in bufs.iter_mut() {
            ptrs[*m] = Some(planes_mut(b, &stream, &mut guards));
        }
        let count = ptrs.iter().flatten().next().map_or(0, Vec::len);
        let mut moves = Vec::new();
        for plane in 0..count {
            for m in (0..self.n()).filter(|&m| m != root) {
                let of = |x: usize| ptrs[x].as_ref().and_then(|p| p.get(plane)).copied();
                let bytes = of(root).or(of(m)).map_or(0, |p| p.1);
                moves.push(Move {
                    from: self.member_proc[root],
                    to: self.member_proc[m],
                    src: of(root).map(|p| p.0),
                    dst: of(m).map(|p| p.0),
                    bytes,
                });
            }
        }
        self.run_moves("broadcast", &moves)?;
        drop(guards);
        Ok(())
    }

    fn reduce_scatter(&self, input: &[Local<'_, &CudaBuf>], out: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        let ins = self.local_order(input.iter().map(|(m, _)| *m))?;
        let outs = self.local_order(out.iter().map(|(m, _)| *m))?;
        let Some(&(_, p0)) = ins.first() else { return Ok(()) };
        let (storage, total) = (input[p0].1.storage(), input[p0].1.len());
        if total % self.n() != 0 {
            return Err(self.err(
                0,
                format!(
                    "reduce-scatter of {total} elements over {} members: not a multiple",
                    self.n()
                ),
            ));
        }
        let shard = total / self.n();
        let shards: Vec<Range<usize>> = (0..self.n()).map(|j| j * shard..(j + 1) * shard).collect();
        let local: Vec<(usize, &CudaData)> = ins.iter().map(|&(m, p)| (m, &**input[p].1)).collect();
        if local.iter().any(|(_, d)| d.len() != total || d.storage() != storage) {
            return Err(self.err(
                0,
                format!("reduce-scatter inputs of unequal type or length (expected {total})"),
            ));
        }
        let sums = self.reduce_shards(&local, storage, &shards)?;
        for &(m, p) in &outs {
            let sum = sums[m]
                .as_ref()
                .ok_or_else(|| self.err(m, "an owned shard without its sum".into()))?;
            if out[p].1.len() != shard {
                return Err(self.err(m, format!("an output of {} for a shard of {shard}", out[p].1.len())));
            }
            self.be(m)?.copy(out[p].1, sum)?;
        }
        Ok(())
    }

    fn all_gather(&self, shards: &[Local<'_, &CudaBuf>], out: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        let ins = self.local_order(shards.iter().map(|(m, _)| *m))?;
        let outs = self.local_order(out.iter().map(|(m, _)| *m))?;
        let Some(&(_, p0)) = ins.first() else { return Ok(()) };
        let n = shards[p0].1.len();
        for &(m, p) in &outs {
            if out[p].1.len() != n * self.n() {
                return Err(self.err(
                    m,
                    format!("an output of {} for {} shards of {n}", out[p].1.len(), self.n()),
                ));
            }
        }
        let stream = Arc::clone(self.home()?);
        let mut guards = Vec::new();
        let mut src: Vec<Option<Vec<(CUdeviceptr, usize)>>> = vec![None; self.n()];
        for &(m, p) in &ins {
            src[m] = Some(planes(shards[p].1, &stream, &mut guards));
        }
        let mut dst: Vec<Option<Vec<(CUdeviceptr, usize)>>> = vec![None; self.n()];
        for (m, b) in out.iter_mut() {
            dst[*m] = Some(planes_mut(b, &stream, &mut guards));
        }
        let count = src.iter().flatten().next().map_or(0, Vec::len);
        let mut moves = Vec::new();
        for plane in 0..count {
            for (j, sj) in src.iter().enumerate() {
                for (m, dm) in dst.iter().enumerate() {
                    let s = sj.as_ref().and_then(|p| p.get(plane)).copied();
                    let d = dm.as_ref().and_then(|p| p.get(plane)).copied();
                    // A shard's plane bytes: the source's where known, else the destination's share.
                    let bytes = s.map(|p| p.1).or(d.map(|p| p.1 / self.n())).unwrap_or(0);
                    moves.push(Move {
                        from: self.member_proc[j],
                        to: self.member_proc[m],
                        src: s.map(|p| p.0),
                        dst: d.map(|p| p.0 + (j * bytes) as u64),
                        bytes,
                    });
                }
            }
        }
        self.run_moves("all-gather", &moves)?;
        drop(guards);
        Ok(())
    }

    fn all_gather_host(&self, values: &[Local<'_, Vec<f64>>]) -> Result<Vec<Vec<f64>>> {
        let order = self.local_order(values.iter().map(|(m, _)| *m))?;
        if self.me.is_none() {
            return Ok(Vec::new());
        }
        if self.member_proc.iter().all(|&p| Some(p) == self.me) {
            let pos: Vec<usize> = order.iter().map(|&(_, p)| p).collect();
            return Ok(gather_host(values, &pos));
        }
        let local: Vec<(usize, Vec<u8>)> = order
            .iter()
            .map(|&(m, p)| (m, bytemuck::cast_slice(&values[p].1).to_vec()))
            .collect();
        let all = self.gather_bytes(&local, "gathering host values")?;
        Ok(all
            .iter()
            .map(|b| {
                b.chunks_exact(8)
                    .map(|c| f64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect()
            })
            .collect())
    }

    fn barrier(&self) -> Result<()> {
        let local: Vec<usize> = (0..self.n()).filter(|&m| self.here(m)).collect();
        for &m in &local {
            self.be(m)?.synchronize()?;
        }
        if local.is_empty() {
            return Ok(());
        }
        let empty: Vec<(usize, Vec<f64>)> = local.iter().map(|&m| (m, Vec::new())).collect();
        self.all_gather_host(&empty).map(drop)
    }
}

// ------------------------------------------------------------------------------------------------------------
// Transport.

/// The directed pairs of stages `(from, to)` that exchange messages and live on different ranks, in a fixed
/// order: for each part `k` with a successor, its activation `owner(k) → owner(k+1)` and the gradient coming
/// back. `owners[k]` is the stage of part `k`, `rank_of_stage[s]` the rank of stage `s`.
pub fn plan_channels(owners: &[usize], rank_of_stage: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for k in 0..owners.len().saturating_sub(1) {
        let (a, b) = (owners[k], owners[k + 1]);
        if rank_of_stage.get(a) != rank_of_stage.get(b) {
            for pair in [(a, b), (b, a)] {
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
        }
    }
    out
}

/// The wire code of a message kind (a relay outside a step is kind 2).
fn kind_code(kind: Option<MessageKind>) -> u64 {
    match kind {
        Some(MessageKind::Activation) => 0,
        Some(MessageKind::Gradient) => 1,
        None => 2,
    }
}

/// A message's identity on a channel: kind code, part, micro-batch.
type WireKey = (u64, u64, u64);

fn wire_key(key: MessageKey) -> WireKey {
    (kind_code(Some(key.kind)), u64::from(key.part), u64::from(key.mb))
}

const RELAY_KEY: WireKey = (2, 0, 0);

/// The header of a message: `[kind, part, micro-batch, storage (0 f32, 1 bf16), length in elements]`.
fn header(key: WireKey, storage: Storage, len: usize) -> Option<[u64; 5]> {
    let s = match storage {
        Storage::F32 => 0,
        Storage::Bf16 => 1,
        Storage::Param => return None,
    };
    Some([key.0, key.1, key.2, s, len as u64])
}

/// A send in flight: its buffers stay alive until its event completes.
struct InFlight {
    event: CudaEvent,
    _header: baton_kernels::cuda::cudarc::driver::CudaSlice<u64>,
    _payload: CudaBuf,
}

/// One end of a channel: the two-rank communicator (rank 0 sends, rank 1 receives) and this end's stream.
struct ChannelEnd {
    comm: Arc<NcclComm>,
    stream: Arc<CudaStream>,
    /// Sender: sends in flight. Receiver: messages received before they were asked for.
    sent: Mutex<Vec<InFlight>>,
    early: Mutex<HashMap<WireKey, CudaBuf>>,
}

struct Channel {
    from: usize,
    to: usize,
    /// `Some` where this rank is one of the ends.
    end: Option<ChannelEnd>,
}

struct NcclRoute {
    replica: usize,
    me: usize,
    rank_of_stage: Vec<usize>,
    placement: Placement,
    channels: Vec<Channel>,
    backends: Arc<Vec<Cuda>>,
    timeout: Duration,
}

/// Activations and gradients between the stages of one replica over NCCL where they live on different ranks,
/// the backend's copies where they share one (module docs). Every rank makes every replica's transport, in
/// replica order (each channel is a split of the world).
pub struct NcclTransport {
    route: Arc<NcclRoute>,
}

impl NcclTransport {
    /// The transport of `replica`, whose stage `s` runs on rank `world`'s map says; `backends[s]` computes stage
    /// `s` where this rank hosts it (the other entries are never used) and all of this rank's are on its GPU.
    pub fn new(
        world: &Arc<NcclWorld>,
        replica: usize,
        backends: Arc<Vec<Cuda>>,
        placement: &Placement,
    ) -> Result<Self> {
        let p = world.stages;
        if backends.len() != p || (replica + 1) * p > world.rank_of_worker.len() {
            return Err(comm_err(
                0,
                format!(
                    "replica {replica} of {p} stages with {} backends: beyond the rank map",
                    backends.len()
                ),
            ));
        }
        let rank_of_stage: Vec<usize> = (0..p).map(|s| world.rank_of_worker[replica * p + s]).collect();
        let owners = (0..placement.num_parts())
            .map(|k| {
                placement
                    .owner(k)
                    .map(|(s, _)| s as usize)
                    .ok_or_else(|| comm_err(0, format!("the placement does not hold part {k}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let me = world.rank();
        let mut channels = Vec::new();
        for (from, to) in plan_channels(&owners, &rank_of_stage) {
            let (rf, rt) = (rank_of_stage[from], rank_of_stage[to]);
            let key = if me == rf {
                Some(0)
            } else if me == rt {
                Some(1)
            } else {
                None
            };
            let label = format!("replica {replica}'s channel stage {from} → stage {to}");
            let peers = vec![
                world.describe(rf, Some(replica * p + from)),
                world.describe(rt, Some(replica * p + to)),
            ];
            let here = if key == Some(1) { to } else { from };
            let comm = world
                .comm
                .split(key.map(|_| 0), key.unwrap_or(0), label, peers, here, world.timeout)?;
            let end = match comm {
                Some(comm) => {
                    let stream = backends[here]
                        .device()
                        .context()
                        .new_stream()
                        .map_err(|e| comm_err(here, format!("a stream for the channel to stage {to}: {e}")))?;
                    Some(ChannelEnd {
                        comm,
                        stream,
                        sent: Mutex::new(Vec::new()),
                        early: Mutex::new(HashMap::new()),
                    })
                }
                None => None,
            };
            channels.push(Channel { from, to, end });
        }
        let route = NcclRoute {
            replica,
            me,
            rank_of_stage,
            placement: placement.clone(),
            channels,
            backends,
            timeout: world.timeout,
        };
        route.connect()?;
        Ok(NcclTransport { route: Arc::new(route) })
    }
}

impl NcclRoute {
    fn channel(&self, from: usize, to: usize) -> Result<&ChannelEnd> {
        self.channels
            .iter()
            .find(|c| c.from == from && c.to == to)
            .and_then(|c| c.end.as_ref())
            .ok_or_else(|| {
                comm_err(
                    from,
                    format!(
                        "no NCCL channel from stage {from} (rank {}) to stage {to} (rank {}): the placement never \
                         moves a message between them",
                        self.rank_of_stage[from], self.rank_of_stage[to]
                    ),
                )
            })
    }

    /// Connects every channel this rank is an end of: one byte each way, all in one group (NCCL connects a pair
    /// lazily, on its first operation, which would otherwise make a first send wait for its peer).
    fn connect(&self) -> Result<()> {
        let ends: Vec<(&Channel, &ChannelEnd)> = self
            .channels
            .iter()
            .filter_map(|c| c.end.as_ref().map(|e| (c, e)))
            .collect();
        if ends.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let mut bytes = Vec::with_capacity(ends.len());
        for (c, e) in &ends {
            let s = if e.comm.rank() == 0 { c.from } else { c.to };
            e.stream
                .context()
                .bind_to_thread()
                .map_err(|x| comm_err(s, format!("binding: {x}")))?;
            bytes.push(
                e.stream
                    .alloc_zeros::<u8>(1)
                    .map_err(|x| comm_err(s, format!("allocating: {x}")))?,
            );
        }
        {
            let mut guards = Vec::new();
            let ptrs: Vec<CUdeviceptr> = bytes
                .iter_mut()
                .zip(&ends)
                .map(|(b, (_, e))| {
                    let (p, g) = b.device_ptr_mut(&e.stream);
                    guards.push(g);
                    p
                })
                .collect();
            let comms: Vec<&NcclComm> = ends.iter().map(|(_, e)| &*e.comm).collect();
            grouped(&comms, "connecting the channels", deadline, |h| {
                for (i, (_, e)) in ends.iter().enumerate() {
                    if e.comm.rank() == 0 {
                        // SAFETY: a live one-byte buffer of this device, taken for the channel's stream; the
                        // guards outlive the group; peer 1 is the receiving end.
                        unsafe { send_bytes(&e.comm, h[i], ptrs[i], 1, 1, &e.stream) }?;
                    } else {
                        // SAFETY: as for the send; peer 0 is the sending end.
                        unsafe { recv_bytes(&e.comm, h[i], ptrs[i], 1, 0, &e.stream) }?;
                    }
                }
                Ok(())
            })?;
            drop(guards);
        }
        for (_, e) in &ends {
            e.comm.watch(&e.stream, deadline, "connecting the channel".into())?;
            e.comm.flush(deadline, "connecting the channel")?;
        }
        Ok(())
    }

    /// Sends `buf` (on stage `from`, this rank) to stage `to` (another rank) as `key`: header and payload on the
    /// channel's stream; returns once enqueued.
    fn push(&self, from: usize, to: usize, key: WireKey, buf: CudaBuf) -> Result<()> {
        let end = self.channel(from, to)?;
        let hdr = header(key, buf.storage(), buf.len())
            .ok_or_else(|| comm_err(from, format!("a parameter buffer sent to stage {to}: send its values")))?;
        let stream = &end.stream;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| comm_err(from, format!("binding: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        let head = stream
            .clone_htod(&hdr)
            .map_err(|e| comm_err(from, format!("staging a header: {e}")))?;
        {
            let mut guards = Vec::new();
            let (hp, hg) = head.device_ptr(stream);
            let payload = planes(&buf, stream, &mut guards);
            let (bp, bytes) = payload[0];
            grouped(&[&end.comm], "a send", deadline, |h| {
                // SAFETY: the header (40 bytes) and the payload (`bytes`) are live on this device, taken for the
                // channel's stream; both stay alive in `sent` until the send's event completes; peer 1 receives.
                unsafe { send_bytes(&end.comm, h[0], hp, HEADER_BYTES, 1, stream) }?;
                if bytes > 0 {
                    // SAFETY: as above.
                    unsafe { send_bytes(&end.comm, h[0], bp, bytes, 1, stream) }?;
                }
                Ok(())
            })?;
            drop(hg);
            drop(guards);
        }
        let what = format!("the send of message {key:?} to stage {to}");
        end.comm.watch(stream, deadline, what.clone())?;
        let event = stream
            .record_event(None)
            .map_err(|e| comm_err(from, format!("recording {what}: {e}")))?;
        let mut sent = end.sent.lock().unwrap_or_else(PoisonError::into_inner);
        sent.retain(|f| !f.event.is_complete());
        sent.push(InFlight {
            event,
            _header: head,
            _payload: buf,
        });
        Ok(())
    }

    /// Waits for message `want` on the channel `from → to` (this rank holds `to`), receiving the channel's
    /// messages in the sender's order and keeping the ones that came first.
    fn pull(
        &self,
        from: usize,
        to: usize,
        want: WireKey,
        abort: Option<&AtomicBool>,
        deadline: Instant,
    ) -> Result<CudaBuf> {
        let end = self.channel(from, to)?;
        let stream = &end.stream;
        let peer = end.comm.peer(0).to_string();
        loop {
            if let Some(b) = end.early.lock().unwrap_or_else(PoisonError::into_inner).remove(&want) {
                return Ok(b);
            }
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| comm_err(to, format!("binding: {e}")))?;
            // The next header.
            // SAFETY: the receive below writes all five words before the host reads them.
            let mut head = unsafe { stream.alloc::<u64>(5) }.map_err(|e| comm_err(to, format!("allocating: {e}")))?;
            {
                let (hp, hg) = head.device_ptr_mut(stream);
                grouped(&[&end.comm], "a header receive", deadline, |h| {
                    // SAFETY: a live 40-byte buffer of this device taken for the channel's stream; the guard
                    // outlives the group; peer 0 is the sending end.
                    unsafe { recv_bytes(&end.comm, h[0], hp, HEADER_BYTES, 0, stream) }
                })?;
                drop(hg);
            }
            let event = stream
                .record_event(None)
                .map_err(|e| comm_err(to, format!("recording a header receive: {e}")))?;
            loop {
                end.comm.check()?;
                if event.is_complete() {
                    break;
                }
                if abort.is_some_and(|a| a.load(Ordering::SeqCst)) {
                    // A posted receive cannot be taken back: the channel is unusable from here on.
                    let _ = end.comm.abort("the step was aborted while a receive was posted".into());
                    return Err(EngineError::Aborted { stage: to as u32 });
                }
                if Instant::now() >= deadline {
                    return Err(end.comm.abort(format!(
                        "stage {to} waited past the deadline for {want:?} from stage {from} on {peer}; that rank is \
                         lost or stalled"
                    )));
                }
                std::thread::sleep(Duration::from_micros(READY_POLL_US));
            }
            let h = stream
                .clone_dtoh(&head)
                .map_err(|e| comm_err(to, format!("reading a header: {e}")))?;
            let storage = match h[3] {
                0 => Storage::F32,
                1 => Storage::Bf16,
                other => {
                    return Err(end
                        .comm
                        .abort(format!("a header with element type {other} from {peer}: corrupt")));
                }
            };
            let len = usize::try_from(h[4]).map_err(|_| comm_err(to, format!("a message of {} elements", h[4])))?;
            // SAFETY: the payload receive writes every element before the consumer reads it (its stream waits on
            // the buffer's write event, recorded when the guard drops after the receive is enqueued).
            let mut buf =
                unsafe { uninit(stream, storage, len) }.map_err(|e| comm_err(to, format!("allocating: {e}")))?;
            {
                let mut guards = Vec::new();
                let (bp, bytes) = planes_mut(&mut buf, stream, &mut guards)[0];
                if bytes > 0 {
                    grouped(&[&end.comm], "a receive", deadline, |hd| {
                        // SAFETY: `bp` has room for `bytes` on this device, taken for the channel's stream; the
                        // guards outlive the group.
                        unsafe { recv_bytes(&end.comm, hd[0], bp, bytes, 0, stream) }
                    })?;
                }
                drop(guards);
            }
            end.comm.watch(
                stream,
                Instant::now() + self.timeout,
                format!("the receive of {want:?} from {peer}"),
            )?;
            let got = (h[0], h[1], h[2]);
            if got == want {
                return Ok(buf);
            }
            if end
                .early
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(got, buf)
                .is_some()
            {
                return Err(EngineError::Invariant {
                    stage: to as u32,
                    what: format!("message {got:?} from stage {from} was delivered twice"),
                });
            }
        }
    }

    /// Waits until stage `from`'s sends have completed (their buffers then go).
    fn flush_sends(&self, from: usize, deadline: Instant) -> Result<()> {
        for c in self.channels.iter().filter(|c| c.from == from) {
            if let Some(end) = &c.end {
                if end.comm.rank() == 0 {
                    end.comm.flush(deadline, "the stage's last sends")?;
                    end.sent
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|f| !f.event.is_complete());
                }
            }
        }
        Ok(())
    }

    fn producer(&self, key: MessageKey) -> Option<usize> {
        let part = match key.kind {
            MessageKind::Activation => key.part.checked_sub(1)?,
            MessageKind::Gradient => key.part + 1,
        };
        self.placement.owner(part).map(|(s, _)| s as usize)
    }
}

/// How long an endpoint waits at the end of a step for its last sends to complete.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// One hosted stage's end of an [`NcclTransport`] for one step.
struct NcclEndpoint {
    stage: usize,
    route: Arc<NcclRoute>,
    rx: Receiver<Msg<Cuda>>,
    /// Inboxes of the stages hosted here (`None` elsewhere).
    senders: Vec<Option<Sender<Msg<Cuda>>>>,
    early: HashMap<MessageKey, CudaBuf>,
}

impl Transport<Cuda> for NcclTransport {
    fn stages(&self) -> usize {
        self.route.rank_of_stage.len()
    }

    fn open(&self, inbox: &[usize]) -> Result<Endpoints<Cuda>> {
        let r = &self.route;
        let p = r.rank_of_stage.len();
        if inbox.len() != p {
            return Err(EngineError::Invariant {
                stage: 0,
                what: format!("{} inbox sizes for {p} stages", inbox.len()),
            });
        }
        let hosted: Vec<bool> = r.rank_of_stage.iter().map(|&x| x == r.me).collect();
        let mut senders = Vec::with_capacity(p);
        let mut receivers = Vec::with_capacity(p);
        for s in 0..p {
            if hosted[s] {
                let (tx, rx) = bounded::<Msg<Cuda>>(inbox[s].max(1));
                senders.push(Some(tx));
                receivers.push(Some(rx));
            } else {
                senders.push(None);
                receivers.push(None);
            }
        }
        Ok(receivers
            .into_iter()
            .enumerate()
            .filter_map(|(s, rx)| rx.map(|rx| (s, rx)))
            .map(|(s, rx)| {
                let end: Box<dyn Endpoint<Cuda>> = Box::new(NcclEndpoint {
                    stage: s,
                    route: Arc::clone(&self.route),
                    rx,
                    senders: senders.clone(),
                    early: HashMap::new(),
                });
                (s, end)
            })
            .collect())
    }

    fn relay(&self, from: usize, to: usize, buf: CudaBuf) -> Result<CudaBuf> {
        let r = &self.route;
        let p = r.rank_of_stage.len();
        if from >= p || to >= p {
            return Err(comm_err(
                from.min(p.saturating_sub(1)),
                format!("relay from stage {from} to stage {to}: {p} stages"),
            ));
        }
        if r.rank_of_stage[from] == r.me && r.rank_of_stage[to] == r.me {
            return if from == to {
                Ok(buf)
            } else {
                r.backends[from].transfer(buf, &r.backends[to])
            };
        }
        Err(comm_err(
            from,
            format!("relay from stage {from} to stage {to} across processes: every process calls relay_hosted"),
        ))
    }

    fn relay_hosted(&self, from: usize, to: usize, buf: Option<CudaBuf>) -> Result<Option<CudaBuf>> {
        let r = &self.route;
        let p = r.rank_of_stage.len();
        if from >= p || to >= p {
            return Err(comm_err(
                0,
                format!("relay from stage {from} to stage {to}: {p} stages"),
            ));
        }
        let (hf, ht) = (r.rank_of_stage[from] == r.me, r.rank_of_stage[to] == r.me);
        match (hf, ht, buf) {
            (true, true, Some(b)) => self.relay(from, to, b).map(Some),
            (true, false, Some(b)) => {
                r.push(from, to, RELAY_KEY, b)?;
                r.flush_sends(from, Instant::now() + r.timeout)?;
                Ok(None)
            }
            (false, true, None) => r.pull(from, to, RELAY_KEY, None, Instant::now() + r.timeout).map(Some),
            (false, false, None) => Ok(None),
            (held, _, b) => Err(EngineError::Invariant {
                stage: from as u32,
                what: format!(
                    "replica {}: a relay from stage {from} with{} a buffer on rank {}, which {} that stage",
                    r.replica,
                    if b.is_some() { "" } else { "out" },
                    r.me,
                    if held { "holds" } else { "does not hold" }
                ),
            }),
        }
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        Vec::new()
    }
}

impl Endpoint<Cuda> for NcclEndpoint {
    fn send(&mut self, to: usize, key: MessageKey, buf: CudaBuf) -> Result<()> {
        let r = &self.route;
        let stage = self.stage as u32;
        let Some(dst) = self.senders.get(to) else {
            return Err(EngineError::Comm {
                seam: "transport",
                stage,
                reason: format!("send of {key} to stage {to}: there are {} stages", self.senders.len()),
            });
        };
        match dst {
            Some(tx) => {
                let buf = if to == self.stage {
                    buf
                } else {
                    r.backends[self.stage].transfer(buf, &r.backends[to])?
                };
                tx.try_send(Msg { key, buf }).map_err(|e| EngineError::Invariant {
                    stage,
                    what: format!(
                        "the inbox of stage {to} refused {key} ({}); its capacity is sized from the schedule",
                        if e.is_full() { "full" } else { "closed" }
                    ),
                })
            }
            None => r.push(self.stage, to, wire_key(key), buf),
        }
    }

    fn recv(&mut self, key: MessageKey, abort: &AtomicBool, deadline: Instant) -> Result<CudaBuf> {
        let r = &self.route;
        let stage = self.stage as u32;
        if let Some(b) = self.early.remove(&key) {
            return Ok(b);
        }
        let from = r.producer(key).ok_or_else(|| EngineError::Invariant {
            stage,
            what: format!("{key} has no producing stage"),
        })?;
        if r.rank_of_stage[from] != r.me {
            return r.pull(from, self.stage, wire_key(key), Some(abort), deadline);
        }
        wait_inbox(&self.rx, &mut self.early, key, stage, abort, deadline)
    }

    fn copy_spans(&mut self, _base: &[CudaEvent]) -> Result<Vec<CopySpan>> {
        // The step's sends must be out before the step ends (their buffers live in the channels).
        self.route.flush_sends(self.stage, Instant::now() + FLUSH_TIMEOUT)?;
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_nccls_initializer_with_blocking_off() {
        let c = nonblocking_config();
        assert_eq!(c.size, std::mem::size_of::<nccl_sys::ncclConfig_t>());
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, 23000);
        assert_eq!(c.blocking, 0);
        assert_eq!(c.cgaClusterSize, i32::MIN);
        assert_eq!(c.maxP2pPeers, i32::MIN);
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn an_id_round_trips_through_its_bytes_and_refuses_other_lengths() {
        let mut b = [0u8; NCCL_ID_BYTES];
        b.iter_mut().enumerate().for_each(|(i, x)| *x = (i * 7 + 3) as u8);
        let id = NcclId::from_bytes(&b).unwrap();
        assert_eq!(id.as_bytes(), &b);
        assert_eq!(
            NcclId::from_bytes(id.raw().internal.map(|c| c as u8).as_slice()).unwrap(),
            id
        );
        let e = NcclId::from_bytes(&b[..127]).unwrap_err().to_string();
        assert!(e.contains("127 bytes") && e.contains("128"), "{e}");
    }

    #[test]
    fn channels_join_neighbouring_parts_on_different_ranks_both_ways() {
        // 4 stages, 2 per rank, 1F1B: only stage 1 ↔ stage 2 crosses ranks.
        assert_eq!(plan_channels(&[0, 1, 2, 3], &[0, 0, 1, 1]), vec![(1, 2), (2, 1)]);
        // One stage per rank: every neighbour pair, in part order.
        assert_eq!(
            plan_channels(&[0, 1, 2], &[0, 1, 2]),
            vec![(0, 1), (1, 0), (1, 2), (2, 1)]
        );
        // Interleaved, 2 stages × 2 chunks (parts 0..4 on stages 0,1,0,1): the pair once each way.
        assert_eq!(plan_channels(&[0, 1, 0, 1], &[0, 1]), vec![(0, 1), (1, 0)]);
        // Everything on one rank: no channel.
        assert!(plan_channels(&[0, 1, 2, 3], &[0, 0, 0, 0]).is_empty());
    }

    #[test]
    fn headers_carry_the_key_type_and_length_and_refuse_parameters() {
        let k = wire_key(MessageKey {
            kind: MessageKind::Gradient,
            part: 3,
            mb: 5,
        });
        assert_eq!(header(k, Storage::Bf16, 1024), Some([1, 3, 5, 1, 1024]));
        assert_eq!(header(RELAY_KEY, Storage::F32, 7), Some([2, 0, 0, 0, 7]));
        assert_eq!(header(k, Storage::Param, 8), None);
        assert_eq!(HEADER_BYTES, 5 * 8);
    }

    /// GPU tests (run by `scripts/gpu-check.sh`): the wrapper on one GPU, and two GPUs as two ranks (threads).
    mod gpu {
        use super::*;
        use crate::backend::Precision;
        use crate::comm::LocalGroup;
        use std::sync::Barrier;

        /// A cohort of one rank.
        #[derive(Debug)]
        struct Solo;

        impl Cohort for Solo {
            fn rank(&self) -> usize {
                0
            }
            fn size(&self) -> usize {
                1
            }
            fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
                Ok(vec![mine.to_vec()])
            }
        }

        /// Threads of one process as the ranks of a cohort.
        #[derive(Debug)]
        struct Threads {
            rank: usize,
            slots: Arc<Mutex<Vec<Vec<u8>>>>,
            barrier: Arc<Barrier>,
        }

        impl Threads {
            fn new(size: usize) -> Vec<Threads> {
                let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
                let barrier = Arc::new(Barrier::new(size));
                (0..size)
                    .map(|rank| Threads {
                        rank,
                        slots: Arc::clone(&slots),
                        barrier: Arc::clone(&barrier),
                    })
                    .collect()
            }
        }

        impl Cohort for Threads {
            fn rank(&self) -> usize {
                self.rank
            }
            fn size(&self) -> usize {
                self.slots.lock().unwrap().len()
            }
            fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
                self.slots.lock().unwrap()[self.rank] = mine.to_vec();
                self.barrier.wait();
                let all = self.slots.lock().unwrap().clone();
                self.barrier.wait();
                Ok(all)
            }
        }

        fn values(seed: u64, n: usize) -> Vec<f32> {
            let mut x = seed | 1;
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let scale = [1e6f32, 1.0, 1e-3][(x % 3) as usize];
                    ((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
                })
                .collect()
        }

        fn bits(be: &Cuda, b: &CudaBuf) -> Vec<u32> {
            be.download(b).unwrap().iter().map(|v| v.to_bits()).collect()
        }

        const T: Duration = Duration::from_secs(60);

        #[test]
        #[ignore = "needs a CUDA device"]
        fn a_one_rank_world_inits_splits_and_round_trips_a_send() {
            let world = NcclWorld::init(&Solo, 0, vec![0], 1, T).unwrap();
            println!("NCCL world: {world:?}");
            let comm = Arc::clone(world.comm());
            let none = comm.split(None, 0, "no color".into(), vec![], 0, T).unwrap();
            assert!(none.is_none());
            let sub = comm
                .split(Some(0), 0, "sub".into(), vec!["rank 0".into()], 0, T)
                .unwrap()
                .unwrap();
            assert_eq!((sub.rank(), sub.size()), (0, 1));
            // Send to self and receive from self in one group: the bytes come back unchanged.
            let be = Cuda::new(0).unwrap();
            let stream = Arc::clone(be.device().stream());
            let x = values(7, 1001);
            let src = be.upload(&x).unwrap();
            let mut dst = be.zeros(x.len()).unwrap();
            {
                let mut guards = Vec::new();
                let (sp, bytes) = planes(&src, &stream, &mut guards)[0];
                let (dp, _) = planes_mut(&mut dst, &stream, &mut guards)[0];
                grouped(&[&sub], "round trip", Instant::now() + T, |h| {
                    // SAFETY: live buffers of `bytes` on device 0 taken for `stream`; guards outlive the group.
                    unsafe { send_bytes(&sub, h[0], sp, bytes, 0, &stream) }?;
                    // SAFETY: as above.
                    unsafe { recv_bytes(&sub, h[0], dp, bytes, 0, &stream) }
                })
                .unwrap();
                drop(guards);
            }
            sub.watch(&stream, Instant::now() + T, "round trip".into()).unwrap();
            sub.flush(Instant::now() + T, "round trip").unwrap();
            assert_eq!(bits(&be, &dst), x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            println!("send/recv round trip bitwise: 1001 elements");
        }

        #[test]
        #[ignore = "needs a CUDA device"]
        fn the_watchdog_aborts_a_receive_that_never_matches() {
            let world = NcclWorld::init(&Solo, 0, vec![0], 1, T).unwrap();
            let comm = world
                .comm()
                .split(Some(0), 0, "lonely".into(), vec!["rank 0".into()], 0, T)
                .unwrap()
                .unwrap();
            let be = Cuda::new(0).unwrap();
            let stream = Arc::clone(be.device().stream());
            let mut dst = be.zeros(16).unwrap();
            let started = Instant::now();
            let posted = {
                let mut guards = Vec::new();
                let (dp, bytes) = planes_mut(&mut dst, &stream, &mut guards)[0];
                let r = grouped(
                    &[&comm],
                    "an unmatched receive",
                    Instant::now() + Duration::from_secs(2),
                    |h| {
                        // SAFETY: a live buffer of `bytes` on device 0 taken for `stream`.
                        unsafe { recv_bytes(&comm, h[0], dp, bytes, 0, &stream) }
                    },
                );
                drop(guards);
                r
            };
            let err = match posted {
                Err(e) => e.to_string(),
                Ok(()) => {
                    comm.watch(
                        &stream,
                        Instant::now() + Duration::from_secs(1),
                        "an unmatched receive".into(),
                    )
                    .unwrap();
                    loop {
                        if let Err(e) = comm.check() {
                            break e.to_string();
                        }
                        assert!(
                            started.elapsed() < Duration::from_secs(10),
                            "the watchdog never aborted"
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            };
            println!("aborted after {:?}: {err}", started.elapsed());
            assert!(err.contains("lonely"), "{err}");
            assert!(comm.check().is_err());
            std::mem::forget(dst); // its stream may still hold the aborted kernel's dependency
        }

        #[test]
        #[ignore = "needs a CUDA device"]
        fn one_rank_groups_match_the_host_sum_and_the_local_group_bitwise() {
            for precision in Precision::ALL {
                let first = Cuda::with_precision(0, precision).unwrap();
                let bes = Arc::new(vec![
                    first.with_new_stream().unwrap(),
                    first.with_new_stream().unwrap(),
                    first,
                ]);
                let world = NcclWorld::init(&Solo, 0, vec![0, 0, 0], 3, T).unwrap();
                let coll = NcclWorldCollectives::new(&world, Workers::new(vec![Arc::clone(&bes)]).unwrap());
                let g = coll.group(&[0, 1, 2]).unwrap();
                let local = LocalGroup::new(Arc::clone(&bes), vec![0, 1, 2]).unwrap();
                let len = 3000 + 2;
                let xs: Vec<Vec<f32>> = (0..3).map(|m| values(11 + m as u64, len)).collect();
                let mk = |m: usize| {
                    let exact = bes[m].upload(&xs[m]).unwrap();
                    let mut b = bes[m].zeros(len).unwrap();
                    bes[m].copy(&mut b, &exact).unwrap();
                    b
                };
                let mut a: Vec<CudaBuf> = (0..3).map(mk).collect();
                let mut b: Vec<CudaBuf> = (0..3).map(mk).collect();
                let mut va: Vec<(usize, &mut CudaBuf)> = a.iter_mut().enumerate().rev().collect();
                g.all_reduce(&mut va).unwrap();
                let mut vb: Vec<(usize, &mut CudaBuf)> = b.iter_mut().enumerate().collect();
                local.all_reduce(&mut vb).unwrap();
                for m in 0..3 {
                    assert_eq!(bits(&bes[m], &a[m]), bits(&bes[m], &b[m]), "{precision}, member {m}");
                }
                if precision == Precision::F32 {
                    let want: Vec<u32> = (0..len).map(|i| ((xs[0][i] + xs[1][i]) + xs[2][i]).to_bits()).collect();
                    assert_eq!(bits(&bes[0], &a[0]), want, "against the host sum");
                }
                let got = g
                    .all_gather_host(&[(1, vec![1.5]), (0, vec![]), (2, vec![2.0, 3.0])])
                    .unwrap();
                assert_eq!(got, vec![vec![], vec![1.5], vec![2.0, 3.0]]);
                g.barrier().unwrap();
                println!("one-rank group of 3 members bitwise equal to LocalGroup and the host sum: {precision}");
            }
        }

        #[test]
        #[ignore = "needs a CUDA device"]
        fn two_gpus_as_two_ranks_move_and_reduce_bitwise() {
            let n = baton_kernels::cuda::device_count().unwrap_or(0);
            if n < 2 {
                println!("SKIPPED: two ranks on two GPUs need 2 or more GPUs, this machine has {n}");
                return;
            }
            let len = 4097;
            let xs: Vec<Vec<f32>> = (0..2).map(|m| values(31 + m as u64, len)).collect();
            let want: Vec<u32> = (0..len).map(|i| (xs[0][i] + xs[1][i]).to_bits()).collect();
            let handles: Vec<_> = Threads::new(2)
                .into_iter()
                .map(|cohort| {
                    let (xs, want) = (xs.clone(), want.clone());
                    std::thread::spawn(move || {
                        let r = cohort.rank();
                        // Collectives: replicas 0 and 1 of a one-stage pipeline on ranks 0 and 1.
                        let world = NcclWorld::init(&cohort, r, vec![0, 1], 1, T).unwrap();
                        let be = Cuda::new(r).unwrap();
                        // Both workers' entries hold this rank's backend; only its own member is used.
                        let w = Workers::new(vec![Arc::new(vec![be.clone()]), Arc::new(vec![be.clone()])]).unwrap();
                        let g = NcclWorldCollectives::new(&world, w).group(&[0, 1]).unwrap();
                        let mut mine = be.upload(&xs[r]).unwrap();
                        g.all_reduce(&mut [(r, &mut mine)]).unwrap();
                        assert_eq!(bits(&be, &mine), want, "rank {r}: all-reduce against the host sum");
                        let host = g.all_gather_host(&[(r, vec![r as f64])]).unwrap();
                        assert_eq!(host, vec![vec![0.0], vec![1.0]]);
                        // Transport: stages 0 and 1 of one replica on ranks 0 and 1.
                        let world2 = NcclWorld::init(&cohort, r, vec![0, 1], 2, T).unwrap();
                        let placement = Placement::new(vec![vec![0], vec![1]]).unwrap();
                        let bes = Arc::new(vec![be.clone(), be.clone()]);
                        let t = NcclTransport::new(&world2, 0, bes, &placement).unwrap();
                        let mut ends = t.open(&[4, 4]).unwrap();
                        let (s, end) = &mut ends[0];
                        assert_eq!(*s, r);
                        let abort = AtomicBool::new(false);
                        let deadline = Instant::now() + T;
                        let act = |mb| MessageKey {
                            kind: MessageKind::Activation,
                            part: 1,
                            mb,
                        };
                        let grad = |mb| MessageKey {
                            kind: MessageKind::Gradient,
                            part: 0,
                            mb,
                        };
                        if r == 0 {
                            for mb in 0..3 {
                                end.send(
                                    1,
                                    act(mb),
                                    be.upload(&values(mb as u64 + 1, 100 + mb as usize)).unwrap(),
                                )
                                .unwrap();
                            }
                            // Out of order: mb 1 first (mb 0 is kept for later).
                            for mb in [1u32, 0] {
                                let got = end.recv(grad(mb), &abort, deadline).unwrap();
                                let x = values(mb as u64 + 10, 50);
                                assert_eq!(bits(&be, &got), x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                            }
                        } else {
                            for mb in [2u32, 0, 1] {
                                let got = end.recv(act(mb), &abort, deadline).unwrap();
                                let x = values(mb as u64 + 1, 100 + mb as usize);
                                assert_eq!(bits(&be, &got), x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                            }
                            for mb in 0..2 {
                                end.send(0, grad(mb), be.upload(&values(mb as u64 + 10, 50)).unwrap())
                                    .unwrap();
                            }
                        }
                        end.copy_spans(&[]).unwrap();
                        println!("rank {r}: all-reduce, host gather and transport bitwise");
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        }
    }
}
