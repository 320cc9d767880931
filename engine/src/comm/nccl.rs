//! NCCL collectives among the GPUs of one process ([`NcclCollectives`], [`NcclGroup`]), with the same fixed
//! reduction order as [`super::LocalGroup`]: member order, `((x0 + x1) + x2) + …`, whatever algorithm NCCL would
//! have picked (its ring and tree sum in different orders, NCCL#2360).
//!
//! **Ranks.** A group's members live on stages, and stages on devices; NCCL allows one rank per device in a
//! communicator, so a group has one rank per *distinct* device, numbered in order of first appearance in member
//! order (fixed: it depends on nothing but the group's stages). The communicators are created once, when the group
//! is made (`ncclCommInitAll` over those devices, from this one thread), and destroyed with it. Each rank issues its
//! work on the compute stream of its first member (its **home**): the optimizer phase that calls the collectives
//! reads the results on that same stream right after, so in the usual layout (one member per device) no event is
//! needed, and NCCL's kernels queue behind the backward's last writes in stream order. A dedicated comm stream would
//! only pay off when a collective overlaps compute, which the seam's callers (after the schedule's last action) do
//! not do. Members that share a device with the home are ordered by cudarc's buffer events: every pointer handed to
//! NCCL or to a copy is taken through `device_ptr(_mut)` on the rank's stream (waiting on the buffer's last write,
//! and reads for a write) and its event is recorded only after `ncclGroupEnd` has enqueued the work.
//!
//! **Order-fixed all-reduce** = reduce-scatter + all-gather, in point-to-point moves:
//! 1. the `L` elements are cut into one shard per member ([`shard_ranges`]: the first `L mod M` shards have one
//!    element more); shard `j` is owned by member `j`, on its device;
//! 2. scatter: every member `m` moves its slice of shard `j` into staging slot `(j, m)` on the owner's device —
//!    NCCL send/recv between devices (all in one `ncclGroupStart/End`, so no rendezvous can deadlock), a
//!    device-to-device copy on the same device;
//! 3. sum: the owner adds its slots in member order with the backend's own `add_assign` (a plain element-wise add
//!    in the buffer's type, as `LocalGroup` uses), slot 0 becoming the shard of the sum;
//! 4. gather: every summed shard is moved into every member's buffer (a pure copy: order is irrelevant).
//!
//! So the bits depend only on the member order. `reduce_scatter` is steps 1–3 (equal shards, the length must be a
//! multiple of the member count); `broadcast` is `ncclBroadcast` among the ranks plus copies to the other members
//! of each device; `all_gather` is `ncclAllGather` when every member has a device of its own, else the same moves;
//! `all_gather_host` collects host values (in-process); `barrier` synchronises every member's stream.
//!
//! **Loading.** cudarc loads libnccl at run time and panics when it cannot; [`nccl_available`] probes first and
//! returns an [`EngineError::Comm`] (seam `nccl`) that says how to fix it (PyPI's `nvidia-nccl-cu13` ships only
//! `libnccl.so.2`, a name cudarc does not try: a folder holding a `libnccl.so -> libnccl.so.2` link on
//! `LD_LIBRARY_PATH` fixes it).
//!
//! Staging takes `L` elements per device per all-reduce (the slots of the shards that device's members own),
//! from the stream-ordered pool like every other scratch buffer.

use std::ffi::{c_int, c_void, CStr};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use baton_kernels::cuda::cudarc::driver::sys::CUdeviceptr;
use baton_kernels::cuda::cudarc::driver::{result as driver, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use baton_kernels::cuda::cudarc::nccl::{result as nccl, sys as nccl_sys};

use super::collective::{gather_host, member_order, Collective, Collectives, Local, Workers};
use crate::backend::{Backend, Cuda, CudaBuf, CudaData, Storage};
use crate::error::{record_drop_error, EngineError, Result};

/// Serialises the enqueueing of NCCL work in this process: a group's work on all its devices is enqueued as one
/// unit, so two groups (two threads) can never interleave their kernels in different orders on different devices
/// (a cross-device deadlock). Held for the whole call of a collective; uncontended in a pipeline (one optimizer
/// thread).
static LAUNCH: Mutex<()> = Mutex::new(());

fn launch_lock() -> MutexGuard<'static, ()> {
    LAUNCH.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How to make NCCL loadable, for the error of [`nccl_available`]: `so2_found` says whether `libnccl.so.2` itself
/// loads (the PyPI wheel's only name).
pub fn nccl_missing_message(so2_found: bool) -> String {
    if so2_found {
        "libnccl.so.2 loads, but cudarc only opens libnccl.so (or libnccl.so.13): make a folder holding a link \
         `ln -s /path/to/libnccl.so.2 DIR/libnccl.so` and put DIR on LD_LIBRARY_PATH"
            .into()
    } else {
        "libnccl is not on the library search path: install NCCL (e.g. `pip install nvidia-nccl-cu13`, which ships \
         only libnccl.so.2, under site-packages/nvidia), then put a folder holding a link \
         `libnccl.so -> libnccl.so.2` on LD_LIBRARY_PATH"
            .into()
    }
}

/// `Ok` when cudarc can load libnccl (checked once per process); otherwise what to do about it
/// ([`nccl_missing_message`]). Every NCCL entry point of this module goes through it first: cudarc panics when it
/// loads a missing library.
pub fn nccl_available() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: `is_culib_present` only tries to dlopen the names cudarc's loader will try; it calls nothing.
            if unsafe { nccl_sys::is_culib_present() } {
                return Ok(());
            }
            // SAFETY: dlopen of NCCL runs only its library initialisers; nothing in it is called, and the handle is
            // closed again at once.
            let so2 = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
            Err(nccl_missing_message(so2))
        })
        .clone()
}

/// The loaded NCCL's version code (`23203` for 2.32.3); an error when it cannot be loaded.
pub fn nccl_version() -> Result<i32> {
    nccl_available().map_err(|reason| comm_err(0, reason))?;
    nccl::get_nccl_version().map_err(|e| nccl_err(0, "ncclGetVersion", &e))
}

/// The shards of an order-fixed reduction of `len` elements over `members` (≥ 1): contiguous, covering `0..len` in
/// member order, the first `len % members` one element longer than the rest (so at most one apart; empty ones when
/// `len < members`). With `len` a multiple of `members` they are the equal shards of `reduce_scatter`.
pub fn shard_ranges(len: usize, members: usize) -> Vec<Range<usize>> {
    assert!(members > 0, "shards over no member");
    let (base, extra) = (len / members, len % members);
    let mut start = 0;
    (0..members)
        .map(|j| {
            let n = base + usize::from(j < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

/// The ranks of a group whose member `i` is on device `ordinals[i]`: one rank per distinct device, numbered in order
/// of first appearance. Returns each member's rank, each rank's device, and each rank's home (its first member).
pub fn assign_ranks(ordinals: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let (mut rank_of, mut devices, mut homes) = (Vec::with_capacity(ordinals.len()), Vec::new(), Vec::new());
    for (m, &d) in ordinals.iter().enumerate() {
        let r = devices.iter().position(|&x| x == d).unwrap_or_else(|| {
            devices.push(d);
            homes.push(m);
            devices.len() - 1
        });
        rank_of.push(r);
    }
    (rank_of, devices, homes)
}

fn comm_err(stage: usize, reason: String) -> EngineError {
    EngineError::Comm {
        seam: "nccl",
        stage: stage as u32,
        reason,
    }
}

fn nccl_err(stage: usize, what: &str, e: &nccl::NcclError) -> EngineError {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for every result code.
    let text = unsafe { CStr::from_ptr(nccl_sys::ncclGetErrorString(e.0)) }.to_string_lossy();
    comm_err(stage, format!("{what}: {:?} ({text})", e.0))
}

/// The element type of one plane of a buffer (a parameter has two: its fp32 master and bf16 working copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elt {
    F32,
    Bf16,
}

impl Elt {
    fn bytes(self) -> usize {
        match self {
            Elt::F32 => 4,
            Elt::Bf16 => 2,
        }
    }

    fn nccl(self) -> nccl_sys::ncclDataType_t {
        match self {
            Elt::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
            Elt::Bf16 => nccl_sys::ncclDataType_t::ncclBfloat16,
        }
    }
}

/// The planes of `d` read on `stream` (which waits on their last writes); the read events, recorded when the
/// guards pushed onto `guards` drop, must be dropped after the work using the pointers is enqueued.
fn planes<'a>(d: &'a CudaData, stream: &'a CudaStream, guards: &mut Vec<SyncOnDrop<'a>>) -> Vec<(CUdeviceptr, Elt)> {
    let mut one = |p: (CUdeviceptr, SyncOnDrop<'a>), e| {
        guards.push(p.1);
        (p.0, e)
    };
    match d {
        CudaData::F32(s) => vec![one(s.device_ptr(stream), Elt::F32)],
        CudaData::Bf16(s) => vec![one(s.device_ptr(stream), Elt::Bf16)],
        CudaData::Param { master, working } => vec![
            one(master.device_ptr(stream), Elt::F32),
            one(working.device_ptr(stream), Elt::Bf16),
        ],
    }
}

/// As [`planes`], for writing (the stream waits on the last reads and writes; write events recorded on drop).
fn planes_mut<'a>(
    d: &'a mut CudaData,
    stream: &'a CudaStream,
    guards: &mut Vec<SyncOnDrop<'a>>,
) -> Vec<(CUdeviceptr, Elt)> {
    let mut one = |p: (CUdeviceptr, SyncOnDrop<'a>), e| {
        guards.push(p.1);
        (p.0, e)
    };
    match d {
        CudaData::F32(s) => vec![one(s.device_ptr_mut(stream), Elt::F32)],
        CudaData::Bf16(s) => vec![one(s.device_ptr_mut(stream), Elt::Bf16)],
        CudaData::Param { master, working } => vec![
            one(master.device_ptr_mut(stream), Elt::F32),
            one(working.device_ptr_mut(stream), Elt::Bf16),
        ],
    }
}

/// One move of `len` elements of type `elt` from `src` (on rank `from`) to `dst` (on rank `to`): a copy on the
/// rank's stream when `from == to`, an NCCL send/recv pair otherwise.
#[derive(Clone, Copy, Debug)]
struct Move {
    from: usize,
    to: usize,
    src: CUdeviceptr,
    dst: CUdeviceptr,
    len: usize,
    elt: Elt,
}

/// A device pointer `elems` elements of `elt` past `p`.
fn offset(p: CUdeviceptr, elems: usize, elt: Elt) -> CUdeviceptr {
    p + (elems * elt.bytes()) as u64
}

/// An NCCL communicator handle, destroyed with its group.
struct RawComm(nccl_sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; every use of one here happens
// under `LAUNCH`, and it is destroyed once, in `Drop`, when nothing else holds it.
unsafe impl Send for RawComm {}
// SAFETY: as for `Send`: shared references only reach NCCL under `LAUNCH`.
unsafe impl Sync for RawComm {}

/// One device of a group: its communicator, and the stream its work runs on (its home member's compute stream).
struct Rank {
    comm: RawComm,
    stream: Arc<CudaStream>,
    home: usize,
    ordinal: usize,
}

/// Makes [`NcclGroup`]s over the workers of one process, each a [`Cuda`] backend (the NCCL twin of
/// [`super::LocalCollectives`]).
pub struct NcclCollectives {
    workers: Workers<Cuda>,
}

impl NcclCollectives {
    /// Groups over `backends` (one per stage: one replica); an [`EngineError::Comm`] (seam `nccl`) when libnccl
    /// cannot be loaded, saying how to fix it.
    pub fn new(backends: Arc<Vec<Cuda>>) -> Result<Self> {
        NcclCollectives::over(Workers::new(vec![backends])?)
    }

    /// Groups over every worker of several replicas (worker `r·p + s` runs stage `s` of replica `r`); errors as
    /// [`NcclCollectives::new`].
    pub fn over(workers: Workers<Cuda>) -> Result<Self> {
        nccl_available().map_err(|reason| comm_err(0, reason))?;
        Ok(NcclCollectives { workers })
    }
}

impl Collectives<Cuda> for NcclCollectives {
    fn group(&self, workers: &[usize]) -> Result<Box<dyn Collective<Cuda>>> {
        Ok(Box::new(NcclGroup::on(self.workers.clone(), workers.to_vec())?))
    }
}

/// A group of members on workers of this process, reduced through NCCL in member order (see the module docs): one
/// communicator per distinct device, created once, when the group is made, in a fixed order.
pub struct NcclGroup {
    workers: Workers<Cuda>,
    /// Member `i` lives on worker `stages[i]`.
    stages: Vec<usize>,
    rank_of: Vec<usize>,
    ranks: Vec<Rank>,
}

impl NcclGroup {
    /// A group whose member `i` lives on stage `stages[i]` of `backends` (one replica); see [`NcclGroup::on`].
    pub fn new(backends: Arc<Vec<Cuda>>, stages: Vec<usize>) -> Result<Self> {
        NcclGroup::on(Workers::new(vec![backends])?, stages)
    }

    /// A group whose member `i` lives on worker `workers[i]`; creates its communicators (one rank per distinct
    /// device, in order of first appearance).
    pub fn on(all: Workers<Cuda>, workers: Vec<usize>) -> Result<Self> {
        let first = *workers
            .first()
            .ok_or_else(|| comm_err(0, "a group needs at least one member".into()))?;
        if let Some(&w) = workers.iter().find(|&&w| w >= all.len()) {
            return Err(comm_err(
                w,
                format!("a group member on worker {w}, but there are {} workers", all.len()),
            ));
        }
        nccl_available().map_err(|reason| comm_err(first, reason))?;
        let be = |w: usize| all.get(w).expect("checked above");
        let ordinals: Vec<usize> = workers.iter().map(|&w| be(w).device().context().ordinal()).collect();
        let (rank_of, devices, homes) = assign_ranks(&ordinals);
        let n = c_int::try_from(devices.len()).map_err(|_| comm_err(first, "too many devices".into()))?;
        let devlist = devices
            .iter()
            .map(|&d| c_int::try_from(d).map_err(|_| comm_err(first, format!("device ordinal {d}"))))
            .collect::<Result<Vec<c_int>>>()?;
        let mut raw = vec![std::ptr::null_mut(); devices.len()];
        {
            let _launch = launch_lock();
            // SAFETY: `raw` has room for `n` communicators and `devlist` names `n` devices of this process.
            unsafe { nccl::comm_init_all(raw.as_mut_ptr(), n, devlist.as_ptr()) }
                .map_err(|e| nccl_err(first, &format!("ncclCommInitAll over devices {devices:?}"), &e))?;
        }
        let ranks = raw
            .into_iter()
            .zip(devices.iter().zip(&homes))
            .map(|(comm, (&ordinal, &home))| Rank {
                comm: RawComm(comm),
                stream: Arc::clone(be(workers[home]).device().stream()),
                home,
                ordinal,
            })
            .collect();
        Ok(NcclGroup {
            workers: all,
            stages: workers,
            rank_of,
            ranks,
        })
    }

    /// The devices of the group's ranks, in rank order (first appearance in member order).
    pub fn devices(&self) -> Vec<usize> {
        self.ranks.iter().map(|r| r.ordinal).collect()
    }

    /// Each member's rank (the index of its device in [`NcclGroup::devices`]).
    pub fn ranks_of_members(&self) -> &[usize] {
        &self.rank_of
    }

    fn be(&self, member: usize) -> &Cuda {
        self.workers.get(self.stages[member]).expect("checked in `on`")
    }

    fn stream(&self, rank: usize) -> &CudaStream {
        &self.ranks[rank].stream
    }

    fn comm(&self, rank: usize) -> nccl_sys::ncclComm_t {
        self.ranks[rank].comm.0
    }

    /// Every member on a device of its own: rank `i` is member `i`.
    fn one_per_device(&self) -> bool {
        self.ranks.len() == self.stages.len()
    }

    /// Checks that `members` names each member exactly once and returns their positions in member order.
    fn order(&self, members: impl Iterator<Item = usize>) -> Result<Vec<usize>> {
        member_order("nccl", &self.stages, members)
    }

    fn check(&self, member: usize, d: &CudaData, storage: Storage, len: usize, what: &str) -> Result<()> {
        if d.storage() != storage {
            return Err(comm_err(
                self.stages[member],
                format!(
                    "{what} of member {member} is {:?}, expected {storage:?}: one element type per call",
                    d.storage()
                ),
            ));
        }
        if d.len() != len {
            return Err(comm_err(
                self.stages[member],
                format!("{what} of member {member} holds {} elements, expected {len}", d.len()),
            ));
        }
        Ok(())
    }

    /// The element type of a reduction over buffers stored as `storage` (fp32 or bf16; parameters are not summed).
    fn reduce_elt(&self, storage: Storage) -> Result<Elt> {
        match storage {
            Storage::F32 => Ok(Elt::F32),
            Storage::Bf16 => Ok(Elt::Bf16),
            Storage::Param => Err(comm_err(
                self.stages[0],
                "a reduction over parameters (master + working copy): reduce their gradients".into(),
            )),
        }
    }

    /// Runs `issue` (NCCL calls) between `ncclGroupStart` and `ncclGroupEnd`; the group is always closed.
    fn grouped(&self, what: &str, issue: impl FnOnce() -> Result<()>) -> Result<()> {
        let stage = self.stages[0];
        nccl::group_start().map_err(|e| nccl_err(stage, "ncclGroupStart", &e))?;
        let issued = issue();
        let ended = nccl::group_end().map_err(|e| nccl_err(stage, &format!("ncclGroupEnd ({what})"), &e));
        issued.and(ended).map(drop)
    }

    /// Enqueues `moves`: the same-device ones as copies on their rank's stream, then every other one as an NCCL
    /// send on `from` and recv on `to`, all in one group and in list order (so each pair of ranks matches its sends
    /// and receives in the same order).
    fn run_moves(&self, what: &str, moves: &[Move]) -> Result<()> {
        for mv in moves.iter().filter(|mv| mv.from == mv.to && mv.len > 0) {
            let stream = self.stream(mv.to);
            let stage = self.stages[self.ranks[mv.to].home];
            let fail = |e| {
                comm_err(
                    stage,
                    format!("{what}: copy on device {}: {e}", self.ranks[mv.to].ordinal),
                )
            };
            stream.context().bind_to_thread().map_err(fail)?;
            // SAFETY: `src` and `dst` point into live buffers of this device holding `len` elements from there on
            // (the callers derive them from the buffers' lengths), taken for this stream through `device_ptr(_mut)`
            // whose guards outlive this call; `src` and `dst` never overlap (different buffers).
            unsafe { driver::memcpy_dtod_async(mv.dst, mv.src, mv.len * mv.elt.bytes(), stream.cu_stream()) }
                .map_err(fail)?;
        }
        let remote: Vec<&Move> = moves.iter().filter(|mv| mv.from != mv.to && mv.len > 0).collect();
        if remote.is_empty() {
            return Ok(());
        }
        self.grouped(what, || {
            for mv in remote {
                let (from, to) = (
                    self.stages[self.ranks[mv.from].home],
                    self.stages[self.ranks[mv.to].home],
                );
                // SAFETY: as for the copies: `src` holds `len` elements on rank `from`'s device, `dst` room for
                // `len` on rank `to`'s, both taken for the rank's stream with guards that outlive `ncclGroupEnd`;
                // peers are rank indices of this communicator.
                unsafe {
                    nccl::send(
                        mv.src as *const c_void,
                        mv.len,
                        mv.elt.nccl(),
                        mv.to as c_int,
                        self.comm(mv.from),
                        self.stream(mv.from).cu_stream() as nccl_sys::cudaStream_t,
                    )
                }
                .map_err(|e| {
                    nccl_err(
                        from,
                        &format!("{what}: ncclSend to device {}", self.ranks[mv.to].ordinal),
                        &e,
                    )
                })?;
                // SAFETY: see the send above.
                unsafe {
                    nccl::recv(
                        mv.dst as *mut c_void,
                        mv.len,
                        mv.elt.nccl(),
                        mv.from as c_int,
                        self.comm(mv.to),
                        self.stream(mv.to).cu_stream() as nccl_sys::cudaStream_t,
                    )
                }
                .map_err(|e| {
                    nccl_err(
                        to,
                        &format!("{what}: ncclRecv from device {}", self.ranks[mv.from].ordinal),
                        &e,
                    )
                })?;
            }
            Ok(())
        })
    }

    /// An uninitialised staging buffer of `len` elements of `elt` on rank `rank`'s stream.
    fn staging(&self, rank: usize, elt: Elt, len: usize) -> Result<CudaBuf> {
        let stream = &self.ranks[rank].stream;
        let stage = self.stages[self.ranks[rank].home];
        let fail = |e| comm_err(stage, format!("allocating {len} staging elements: {e}"));
        // SAFETY: every staging slot is written in full by the scatter's move into it before anything reads it
        // (the sum's reads wait on the slot's write event, recorded after the move is enqueued).
        let data = unsafe {
            match elt {
                Elt::F32 => CudaData::F32(stream.alloc::<f32>(len).map_err(fail)?),
                Elt::Bf16 => CudaData::Bf16(stream.alloc::<half::bf16>(len).map_err(fail)?),
            }
        };
        Ok(CudaBuf::new(data))
    }

    /// Steps 1–3 of the module docs: every member's slice of shard `j` moved to owner `j`'s device, then summed
    /// there in member order. Returns the summed shard of each owner (`None` for an empty shard).
    fn reduce_shards(&self, ins: &[&CudaData], shards: &[Range<usize>], elt: Elt) -> Result<Vec<Option<CudaBuf>>> {
        let members = self.stages.len();
        let mut slots: Vec<Option<Vec<CudaBuf>>> = shards
            .iter()
            .enumerate()
            .map(|(j, r)| {
                (!r.is_empty())
                    .then(|| {
                        (0..members)
                            .map(|_| self.staging(self.rank_of[j], elt, r.len()))
                            .collect()
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        {
            let mut guards = Vec::new();
            let src: Vec<CUdeviceptr> = ins
                .iter()
                .enumerate()
                .map(|(m, d)| planes(d, self.stream(self.rank_of[m]), &mut guards)[0].0)
                .collect();
            let mut moves = Vec::new();
            for (j, row) in slots.iter_mut().enumerate() {
                let Some(row) = row else { continue };
                for (m, slot) in row.iter_mut().enumerate() {
                    let dst = planes_mut(slot, self.stream(self.rank_of[j]), &mut guards)[0].0;
                    moves.push(Move {
                        from: self.rank_of[m],
                        to: self.rank_of[j],
                        src: offset(src[m], shards[j].start, elt),
                        dst,
                        len: shards[j].len(),
                        elt,
                    });
                }
            }
            self.run_moves("reduce-scatter", &moves)?;
            drop(guards);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(j, row)| {
                row.map(|row| {
                    let mut row = row.into_iter();
                    let mut acc = row.next().expect("a group has members");
                    for x in row {
                        self.be(j).add_assign(&mut acc, &x)?;
                    }
                    Ok(acc)
                })
                .transpose()
            })
            .collect()
    }

    /// Step 4: summed shard `j` (on owner `j`'s device) moved into every member's buffer at `shards[j]` (only the
    /// root's for a `reduce`: `only = Some(root)`).
    fn gather_shards(
        &self,
        sums: &[Option<CudaBuf>],
        shards: &[Range<usize>],
        outs: Vec<&mut CudaData>,
        elt: Elt,
        only: Option<usize>,
    ) -> Result<()> {
        let mut guards = Vec::new();
        let src: Vec<Option<CUdeviceptr>> = sums
            .iter()
            .enumerate()
            .map(|(j, s)| {
                s.as_ref()
                    .map(|s| planes(s, self.stream(self.rank_of[j]), &mut guards)[0].0)
            })
            .collect();
        let mut moves = Vec::new();
        for (m, out) in outs.into_iter().enumerate() {
            if only.is_some_and(|root| root != m) {
                continue;
            }
            let dst = planes_mut(out, self.stream(self.rank_of[m]), &mut guards)[0].0;
            for (j, src) in src.iter().enumerate() {
                let Some(src) = *src else { continue };
                moves.push(Move {
                    from: self.rank_of[j],
                    to: self.rank_of[m],
                    src,
                    dst: offset(dst, shards[j].start, elt),
                    len: shards[j].len(),
                    elt,
                });
            }
        }
        self.run_moves("all-gather", &moves)?;
        drop(guards);
        Ok(())
    }

    /// The order-fixed all-reduce (module docs); the sum is gathered into every member, or only `only`'s.
    fn all_reduce_into(&self, bufs: &mut [Local<'_, &mut CudaBuf>], only: Option<usize>) -> Result<()> {
        let order = self.order(bufs.iter().map(|(m, _)| *m))?;
        let (storage, len) = (bufs[order[0]].1.storage(), bufs[order[0]].1.len());
        let elt = self.reduce_elt(storage)?;
        for (m, &pos) in order.iter().enumerate() {
            self.check(m, bufs[pos].1, storage, len, "the buffer")?;
        }
        if len == 0 || self.members() == 1 {
            return Ok(());
        }
        let shards = shard_ranges(len, self.members());
        let _launch = launch_lock();
        let sums = {
            let ins: Vec<&CudaData> = order.iter().map(|&pos| &**bufs[pos].1).collect();
            self.reduce_shards(&ins, &shards, elt)?
        };
        self.gather_shards(&sums, &shards, by_member_mut(bufs), elt, only)
    }
}

/// The buffers of `bufs` (whose members `order` validated) in member order.
fn by_member_mut<'s>(bufs: &'s mut [Local<'_, &mut CudaBuf>]) -> Vec<&'s mut CudaData> {
    let mut v: Vec<(usize, &mut CudaData)> = bufs.iter_mut().map(|(m, b)| (*m, &mut ***b)).collect();
    v.sort_by_key(|(m, _)| *m);
    v.into_iter().map(|(_, d)| d).collect()
}

impl Collective<Cuda> for NcclGroup {
    fn members(&self) -> usize {
        self.stages.len()
    }

    fn all_reduce(&self, bufs: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        self.all_reduce_into(bufs, None)
    }

    fn reduce(&self, root: usize, bufs: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        if root >= self.members() {
            return Err(comm_err(
                self.stages[0],
                format!("reduce to member {root} of a group of {}", self.members()),
            ));
        }
        self.all_reduce_into(bufs, Some(root))
    }

    fn broadcast(&self, root: usize, bufs: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        let order = self.order(bufs.iter().map(|(m, _)| *m))?;
        let root_pos = *order.get(root).ok_or_else(|| {
            comm_err(
                self.stages[0],
                format!("broadcast from member {root} of a group of {}", order.len()),
            )
        })?;
        let (storage, len) = (bufs[root_pos].1.storage(), bufs[root_pos].1.len());
        for (m, &pos) in order.iter().enumerate() {
            self.check(m, bufs[pos].1, storage, len, "the buffer")?;
        }
        if len == 0 || self.members() == 1 {
            return Ok(());
        }
        let root_rank = self.rank_of[root];
        // Each rank's receiver: the root on its own device, the home elsewhere; the others copy from it.
        let rep = |r: usize| if r == root_rank { root } else { self.ranks[r].home };
        let _launch = launch_lock();
        let mut guards = Vec::new();
        let ptrs: Vec<Vec<(CUdeviceptr, Elt)>> = by_member_mut(bufs)
            .into_iter()
            .enumerate()
            .map(|(m, d)| planes_mut(d, self.stream(self.rank_of[m]), &mut guards))
            .collect();
        self.grouped("broadcast", || {
            for r in 0..self.ranks.len() {
                for &(p, elt) in &ptrs[rep(r)] {
                    // SAFETY: `p` is a plane of `len` elements of member `rep(r)`, on rank `r`'s device, taken for
                    // rank `r`'s stream; on the root rank it is both source and destination (in place), elsewhere
                    // the source is ignored; the guards outlive `ncclGroupEnd`.
                    unsafe {
                        nccl::broadcast(
                            p as *const c_void,
                            p as *mut c_void,
                            len,
                            elt.nccl(),
                            root_rank as c_int,
                            self.comm(r),
                            self.stream(r).cu_stream() as nccl_sys::cudaStream_t,
                        )
                    }
                    .map_err(|e| nccl_err(self.stages[rep(r)], "ncclBroadcast", &e))?;
                }
            }
            Ok(())
        })?;
        let mut copies = Vec::new();
        for (m, planes) in ptrs.iter().enumerate() {
            let r = self.rank_of[m];
            if m != rep(r) {
                for (&(dst, elt), &(src, _)) in planes.iter().zip(&ptrs[rep(r)]) {
                    copies.push(Move {
                        from: r,
                        to: r,
                        src,
                        dst,
                        len,
                        elt,
                    });
                }
            }
        }
        self.run_moves("broadcast", &copies)?;
        drop(guards);
        Ok(())
    }

    fn reduce_scatter(&self, input: &[Local<'_, &CudaBuf>], out: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        let members = self.members();
        let ins = self.order(input.iter().map(|(m, _)| *m))?;
        let outs = self.order(out.iter().map(|(m, _)| *m))?;
        let (storage, total) = (input[ins[0]].1.storage(), input[ins[0]].1.len());
        let elt = self.reduce_elt(storage)?;
        if total % members != 0 {
            return Err(comm_err(
                self.stages[0],
                format!("reduce-scatter of {total} elements over {members} members: not a multiple"),
            ));
        }
        let shard = total / members;
        for (m, &pos) in ins.iter().enumerate() {
            self.check(m, input[pos].1, storage, total, "the input")?;
        }
        for (m, &pos) in outs.iter().enumerate() {
            self.check(m, out[pos].1, storage, shard, "the output shard")?;
        }
        if shard == 0 {
            return Ok(());
        }
        let shards = shard_ranges(total, members);
        let _launch = launch_lock();
        let data: Vec<&CudaData> = ins.iter().map(|&pos| &**input[pos].1).collect();
        let sums = self.reduce_shards(&data, &shards, elt)?;
        for (m, (sum, &pos)) in sums.iter().zip(&outs).enumerate() {
            let sum = sum.as_ref().expect("equal shards are not empty");
            self.be(m).copy(out[pos].1, sum)?;
        }
        Ok(())
    }

    fn all_gather(&self, shards: &[Local<'_, &CudaBuf>], out: &mut [Local<'_, &mut CudaBuf>]) -> Result<()> {
        let members = self.members();
        let ins = self.order(shards.iter().map(|(m, _)| *m))?;
        let outs = self.order(out.iter().map(|(m, _)| *m))?;
        let (storage, n) = (shards[ins[0]].1.storage(), shards[ins[0]].1.len());
        for (m, &pos) in ins.iter().enumerate() {
            self.check(m, shards[pos].1, storage, n, "the shard")?;
        }
        for (m, &pos) in outs.iter().enumerate() {
            self.check(m, out[pos].1, storage, n * members, "the output")?;
        }
        if n == 0 {
            return Ok(());
        }
        let _launch = launch_lock();
        let mut guards = Vec::new();
        let src: Vec<Vec<(CUdeviceptr, Elt)>> = ins
            .iter()
            .enumerate()
            .map(|(m, &pos)| planes(shards[pos].1, self.stream(self.rank_of[m]), &mut guards))
            .collect();
        let dst: Vec<Vec<(CUdeviceptr, Elt)>> = by_member_mut(out)
            .into_iter()
            .enumerate()
            .map(|(m, d)| planes_mut(d, self.stream(self.rank_of[m]), &mut guards))
            .collect();
        if self.one_per_device() {
            // Rank r is member r: NCCL's own all-gather (a pure copy, so its algorithm cannot change the bits).
            self.grouped("all-gather", || {
                for r in 0..self.ranks.len() {
                    for (&(s, elt), &(d, _)) in src[r].iter().zip(&dst[r]) {
                        // SAFETY: `s` holds `n` elements and `d` `n · members` of `elt` on rank `r`'s device, taken
                        // for rank `r`'s stream with guards that outlive `ncclGroupEnd`.
                        unsafe {
                            nccl::all_gather(
                                s as *const c_void,
                                d as *mut c_void,
                                n,
                                elt.nccl(),
                                self.comm(r),
                                self.stream(r).cu_stream() as nccl_sys::cudaStream_t,
                            )
                        }
                        .map_err(|e| nccl_err(self.stages[r], "ncclAllGather", &e))?;
                    }
                }
                Ok(())
            })?;
        } else {
            let mut moves = Vec::new();
            for (m, dst) in dst.iter().enumerate() {
                for (j, src) in src.iter().enumerate() {
                    for (&(d, elt), &(s, _)) in dst.iter().zip(src) {
                        moves.push(Move {
                            from: self.rank_of[j],
                            to: self.rank_of[m],
                            src: s,
                            dst: offset(d, j * n, elt),
                            len: n,
                            elt,
                        });
                    }
                }
            }
            self.run_moves("all-gather", &moves)?;
        }
        drop(guards);
        Ok(())
    }

    fn all_gather_host(&self, values: &[Local<'_, Vec<f64>>]) -> Result<Vec<Vec<f64>>> {
        let order = self.order(values.iter().map(|(m, _)| *m))?;
        Ok(gather_host(values, &order))
    }

    fn barrier(&self) -> Result<()> {
        for m in 0..self.members() {
            self.be(m).synchronize()?;
        }
        Ok(())
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        let _launch = launch_lock();
        for rank in &self.ranks {
            // Nothing of this group may still be queued when its communicators go.
            if let Err(e) = rank.stream.synchronize() {
                record_drop_error("NcclGroup: synchronising before ncclCommDestroy", e);
            }
        }
        for rank in &self.ranks {
            // SAFETY: the communicator was made by `ncclCommInitAll`, its streams are idle, and it is destroyed
            // once: `RawComm` is owned by this group only.
            if let Err(e) = unsafe { nccl::comm_destroy(rank.comm.0) } {
                record_drop_error(
                    "ncclCommDestroy",
                    nccl_err(self.stages[rank.home], &format!("device {}", rank.ordinal), &e),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::comm::LocalGroup;

    #[test]
    fn shards_cover_the_buffer_in_member_order_longest_first() {
        for members in 1..=7 {
            for len in 0..40 {
                let shards = shard_ranges(len, members);
                assert_eq!(shards.len(), members);
                let mut at = 0;
                for (j, r) in shards.iter().enumerate() {
                    assert_eq!(r.start, at, "len {len}, members {members}: shard {j} not contiguous");
                    let want = len / members + usize::from(j < len % members);
                    assert_eq!(r.len(), want, "len {len}, members {members}, shard {j}");
                    at = r.end;
                }
                assert_eq!(at, len);
                let (lo, hi) = (
                    shards.iter().map(|r| r.len()).min(),
                    shards.iter().map(|r| r.len()).max(),
                );
                assert!(hi.unwrap() - lo.unwrap() <= 1);
            }
        }
        assert_eq!(shard_ranges(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(shard_ranges(2, 3), vec![0..1, 1..2, 2..2]);
        // A multiple: the equal shards of reduce_scatter.
        assert_eq!(shard_ranges(12, 3), vec![0..4, 4..8, 8..12]);
    }

    #[test]
    fn ranks_are_devices_in_order_of_first_appearance() {
        let (rank_of, devices, homes) = assign_ranks(&[0, 0, 1, 0, 2]);
        assert_eq!(rank_of, vec![0, 0, 1, 0, 2]);
        assert_eq!(devices, vec![0, 1, 2]);
        assert_eq!(homes, vec![0, 2, 4]);
        let (rank_of, devices, homes) = assign_ranks(&[3, 1, 3]);
        assert_eq!(rank_of, vec![0, 1, 0]);
        assert_eq!(devices, vec![3, 1]);
        assert_eq!(homes, vec![0, 1]);
        assert_eq!(assign_ranks(&[5]), (vec![0], vec![5], vec![0]));
    }

    /// The GPU path's steps on host vectors: shards, one staging slot per (owner, member), the owner's sum in
    /// member order, the gather.
    fn host_order_fixed_all_reduce(xs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let (members, len) = (xs.len(), xs[0].len());
        let shards = shard_ranges(len, members);
        let sums: Vec<Vec<f32>> = shards
            .iter()
            .map(|r| {
                let slots: Vec<&[f32]> = xs.iter().map(|x| &x[r.clone()]).collect();
                let mut acc = slots[0].to_vec();
                for s in &slots[1..] {
                    acc.iter_mut().zip(*s).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        (0..members)
            .map(|_| {
                let mut out = vec![f32::NAN; len];
                for (r, s) in shards.iter().zip(&sums) {
                    out[r.clone()].copy_from_slice(s);
                }
                out
            })
            .collect()
    }

    #[test]
    fn sharded_sum_in_member_order_is_bitwise_the_local_groups_for_uneven_lengths() {
        let be = Cpu;
        // Magnitudes from 1e-3 to 1e8: sums of these depend on the order of the adds.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let scale = [1e8f32, 1.0, 1e-3][(seed % 3) as usize];
            ((seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        };
        for members in [1usize, 2, 3, 5] {
            for len in [1usize, 2, 7, 13, 64, 101] {
                let xs: Vec<Vec<f32>> = (0..members).map(|_| (0..len).map(|_| next()).collect()).collect();
                let got = host_order_fixed_all_reduce(&xs);
                let g = LocalGroup::new(Arc::new(vec![Cpu; members]), (0..members).collect()).unwrap();
                let mut bufs: Vec<_> = xs.iter().map(|x| be.upload(x).unwrap()).collect();
                let mut views: Vec<(usize, &mut _)> = bufs.iter_mut().enumerate().collect();
                g.all_reduce(&mut views).unwrap();
                for (m, (b, o)) in bufs.iter().zip(&got).enumerate() {
                    let want: Vec<u32> = be.download(b).unwrap().iter().map(|v| v.to_bits()).collect();
                    let o: Vec<u32> = o.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(o, want, "{members} members, {len} elements, member {m}");
                }
            }
        }
        // The order matters in these values (so the test could fail): ((a + b) + c) ≠ ((c + b) + a).
        let (a, b, c) = (1e8f32, -1e8f32, 1.0f32);
        assert_ne!(((a + b) + c).to_bits(), ((c + b) + a).to_bits());
        let got = host_order_fixed_all_reduce(&[vec![a], vec![b], vec![c]]);
        assert_eq!(got[2][0], (a + b) + c);
    }

    #[test]
    fn a_missing_nccl_is_an_error_that_says_how_to_fix_it() {
        let link = nccl_missing_message(true);
        assert!(
            link.contains("libnccl.so.2") && link.contains("LD_LIBRARY_PATH") && link.contains("ln -s"),
            "{link}"
        );
        let none = nccl_missing_message(false);
        assert!(
            none.contains("nvidia-nccl-cu13") && none.contains("LD_LIBRARY_PATH"),
            "{none}"
        );
        // On a machine without NCCL (CI) this is the error; on one with it, a version. Never a panic.
        match nccl_version() {
            Ok(v) => assert!(v > 0, "NCCL version {v}"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.starts_with("nccl on stage 0:") && text.contains("LD_LIBRARY_PATH"),
                    "{text}"
                );
            }
        }
    }

    /// GPU tests: the NCCL group against `LocalGroup` over the same backends, bitwise.
    mod gpu {
        use super::*;
        use crate::backend::Precision;

        /// Fresh pseudo-random values in [-1, 1) (xorshift) from a seed drawn from the clock and printed.
        struct Fresh(u64);

        impl Fresh {
            fn new(what: &str) -> Self {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64;
                println!("seed {seed} {what}");
                Fresh(seed | 1)
            }

            fn values(&mut self, n: usize) -> Vec<f32> {
                (0..n)
                    .map(|_| {
                        self.0 ^= self.0 << 13;
                        self.0 ^= self.0 >> 7;
                        self.0 ^= self.0 << 17;
                        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                    })
                    .collect()
            }
        }

        /// A buffer of `be`'s precision holding `x` (rounded to bf16 in bf16 mode).
        fn buf(be: &Cuda, x: &[f32]) -> CudaBuf {
            let exact = be.upload(x).unwrap();
            let mut b = be.zeros(x.len()).unwrap();
            be.copy(&mut b, &exact).unwrap();
            b
        }

        fn bits(be: &Cuda, b: &CudaBuf) -> Vec<u32> {
            be.download(b).unwrap().iter().map(|v| v.to_bits()).collect()
        }

        /// Backends for members on `devices` (a device named twice gets a second stream).
        fn backends(devices: &[usize], precision: Precision) -> Arc<Vec<Cuda>> {
            let mut out: Vec<Cuda> = Vec::new();
            for &d in devices {
                let be = match out.iter().find(|b| b.device().context().ordinal() == d) {
                    Some(b) => b.with_new_stream().unwrap(),
                    None => Cuda::with_precision(d, precision).unwrap(),
                };
                out.push(be);
            }
            Arc::new(out)
        }

        /// Every collective of an `NcclGroup` over members on `devices` equals `LocalGroup`'s, bitwise, on fresh
        /// inputs with poisoned outputs.
        fn check_layout(devices: &[usize], precision: Precision) {
            let members = devices.len();
            let what = format!("devices {devices:?}, {precision}");
            let bes = backends(devices, precision);
            let stages: Vec<usize> = (0..members).collect();
            let nccl = NcclCollectives::new(Arc::clone(&bes)).unwrap().group(&stages).unwrap();
            let local = LocalGroup::new(Arc::clone(&bes), stages.clone()).unwrap();
            let mut fresh = Fresh::new(&what);

            // all_reduce, an uneven length (shards one apart), members given out of order.
            let len = 1000 * members + 3;
            let xs: Vec<Vec<f32>> = (0..members).map(|_| fresh.values(len)).collect();
            let mut a: Vec<CudaBuf> = xs.iter().zip(bes.iter()).map(|(x, be)| buf(be, x)).collect();
            let mut b: Vec<CudaBuf> = xs.iter().zip(bes.iter()).map(|(x, be)| buf(be, x)).collect();
            let mut va: Vec<(usize, &mut CudaBuf)> = a.iter_mut().enumerate().rev().collect();
            nccl.all_reduce(&mut va).unwrap();
            let mut vb: Vec<(usize, &mut CudaBuf)> = b.iter_mut().enumerate().collect();
            local.all_reduce(&mut vb).unwrap();
            for m in 0..members {
                assert_eq!(
                    bits(&bes[m], &a[m]),
                    bits(&bes[m], &b[m]),
                    "all_reduce, {what}, member {m}"
                );
            }
            if precision == Precision::F32 {
                let want: Vec<u32> = (0..len)
                    .map(|i| xs.iter().skip(1).fold(xs[0][i], |s, x| s + x[i]).to_bits())
                    .collect();
                assert_eq!(bits(&bes[0], &a[0]), want, "all_reduce against the host, {what}");
            }
            println!("all_reduce bitwise equal to LocalGroup: {what}, {len} elements");

            // reduce_scatter (fp32: LocalGroup sums on the host in f32; bf16 would round only once there).
            let n = 517;
            let ins: Vec<CudaBuf> = (0..members).map(|m| buf(&bes[m], &fresh.values(n * members))).collect();
            if precision == Precision::F32 {
                let poison = vec![f32::NAN; n];
                let mut oa: Vec<CudaBuf> = bes.iter().map(|be| buf(be, &poison)).collect();
                let mut ob: Vec<CudaBuf> = bes.iter().map(|be| buf(be, &poison)).collect();
                let iv: Vec<(usize, &CudaBuf)> = ins.iter().enumerate().collect();
                let mut va: Vec<(usize, &mut CudaBuf)> = oa.iter_mut().enumerate().collect();
                nccl.reduce_scatter(&iv, &mut va).unwrap();
                let mut vb: Vec<(usize, &mut CudaBuf)> = ob.iter_mut().enumerate().collect();
                local.reduce_scatter(&iv, &mut vb).unwrap();
                for m in 0..members {
                    assert_eq!(
                        bits(&bes[m], &oa[m]),
                        bits(&bes[m], &ob[m]),
                        "reduce_scatter, {what}, member {m}"
                    );
                }
                println!("reduce_scatter bitwise equal to LocalGroup: {what}");
            }

            // all_gather (a copy: any precision).
            let poison = vec![f32::NAN; n * members];
            let mut oa: Vec<CudaBuf> = bes.iter().map(|be| buf(be, &poison)).collect();
            let mut ob: Vec<CudaBuf> = bes.iter().map(|be| buf(be, &poison)).collect();
            let shards: Vec<CudaBuf> = (0..members).map(|m| buf(&bes[m], &fresh.values(n))).collect();
            let sv: Vec<(usize, &CudaBuf)> = shards.iter().enumerate().rev().collect();
            let mut va: Vec<(usize, &mut CudaBuf)> = oa.iter_mut().enumerate().collect();
            nccl.all_gather(&sv, &mut va).unwrap();
            let mut vb: Vec<(usize, &mut CudaBuf)> = ob.iter_mut().enumerate().collect();
            local.all_gather(&sv, &mut vb).unwrap();
            for m in 0..members {
                assert_eq!(
                    bits(&bes[m], &oa[m]),
                    bits(&bes[m], &ob[m]),
                    "all_gather, {what}, member {m}"
                );
            }
            println!("all_gather bitwise equal to LocalGroup: {what}");

            // broadcast from the last member into poisoned buffers.
            let root = members - 1;
            let x = fresh.values(777);
            let mut bb: Vec<CudaBuf> = (0..members)
                .map(|m| buf(&bes[m], &if m == root { x.clone() } else { vec![f32::NAN; 777] }))
                .collect();
            let want = bits(&bes[root], &bb[root]);
            let mut vb: Vec<(usize, &mut CudaBuf)> = bb.iter_mut().enumerate().collect();
            nccl.broadcast(root, &mut vb).unwrap();
            for m in 0..members {
                assert_eq!(bits(&bes[m], &bb[m]), want, "broadcast, {what}, member {m}");
            }
            nccl.barrier().unwrap();
            println!("broadcast and barrier: {what}");

            // Shapes are checked, naming the member.
            let mut short: Vec<CudaBuf> = (0..members).map(|m| buf(&bes[m], &vec![1.0; 8 + m])).collect();
            if members > 1 {
                let mut v: Vec<(usize, &mut CudaBuf)> = short.iter_mut().enumerate().collect();
                let err = nccl.all_reduce(&mut v).unwrap_err().to_string();
                assert!(err.contains("member 1"), "{err}");
                let odd: Vec<CudaBuf> = (0..members).map(|m| buf(&bes[m], &vec![1.0; members + 1])).collect();
                let iv: Vec<(usize, &CudaBuf)> = odd.iter().enumerate().collect();
                let mut ov: Vec<CudaBuf> = (0..members).map(|m| buf(&bes[m], &[0.0])).collect();
                let mut v: Vec<(usize, &mut CudaBuf)> = ov.iter_mut().enumerate().collect();
                assert!(nccl.reduce_scatter(&iv, &mut v).is_err());
            }
        }

        fn gpus() -> usize {
            baton_kernels::cuda::device_count().unwrap_or(0)
        }

        #[test]
        #[ignore = "needs a CUDA device"]
        fn one_gpu_groups_match_the_local_group_bitwise() {
            println!("NCCL {}", nccl_version().unwrap());
            assert!(gpus() >= 1, "no CUDA device");
            for precision in Precision::ALL {
                // One member: a communicator of one rank (NCCL's broadcast and all-gather run).
                check_layout(&[0], precision);
                // Three members on one device (three streams): one rank, copies only.
                check_layout(&[0, 0, 0], precision);
            }
        }

        #[test]
        #[ignore = "needs a CUDA device"]
        fn multi_gpu_groups_match_the_local_group_bitwise() {
            let n = gpus();
            if n < 2 {
                println!("SKIPPED: multi-GPU NCCL groups need 2 or more GPUs, this machine has {n}");
                return;
            }
            for precision in Precision::ALL {
                // One member per device: NCCL send/recv for the reduction, ncclAllGather, ncclBroadcast.
                check_layout(&(0..n).collect::<Vec<_>>(), precision);
                // Shared and separate devices mixed: members 0 and 2 on device 0 (reversed device order too).
                check_layout(&[1, 0, 1], precision);
            }
        }
    }
}
