//! MPI between processes and hosts (cargo feature `mpi`): the world of ranks ([`MpiWorld`]), the rank map that
//! places workers on ranks ([`RankMap`]), a [`Transport`] for the stages of one replica spread over ranks
//! ([`MpiTransport`]) and order-fixed [`Collective`]s over groups of workers on any ranks ([`MpiCollectives`]).
//!
//! **Threads.** MPI is initialised with `MPI_THREAD_MULTIPLE` (refused otherwise): stage threads, data-parallel
//! reducers and the optimizer phase all call MPI concurrently, each on its own communicator or tags.
//!
//! **Push, never rendezvous.** Every send is nonblocking (`MPI_Isend` of a buffer the request owns until
//! `MPI_Test` says it is done), and every receive polls a matched probe for one tag from one source, so no pair
//! of ranks can deadlock on send/recv ordering; every wait can be woken by an abort flag and gives up at a
//! deadline with an error naming the peer's rank, replica and stage.
//!
//! **Order.** A collective's sum is the member-order sum `((x0 + x1) + x2) + …` in f32, the bits of
//! [`super::LocalGroup`] on the CPU, so the result never depends on the number of processes or on timing. The
//! all-reduce moves ring-like bytes: each member sends shard `j` of its buffer to shard `j`'s owner (member `j`),
//! the owner adds the contributions in member order, and sends the summed shard to every process of the group.
//!
//! **Communicators.** Each transport and each group is split from the world over its ranks when it is made
//! (`split_by_color_with_key`; a rank outside it gets none), so tags never collide between them; every process
//! makes them in the same order (the pipeline's build is the same on every rank). Limits: [`TAG_UB`] (the MPI standard's smallest tag bound) caps parts × micro-batches of a
//! transport at `TAG_UB / 2` and a group at [`GROUP_MEMBERS_MAX`] members.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::ffi;
use mpi::point_to_point::Source;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use baton_schedules::{Placement, Schedule};

use super::collective::{hosted_order, Collective, Collectives, Local, Workers};
use super::nccl::shard_ranges;
use super::transport::{Endpoint, Endpoints, MessageKey, MessageKind, Transport};
use crate::backend::{Backend, PoolStats};
use crate::error::{EngineError, Result};
use crate::executor::CopySpan;

/// The largest tag every MPI implementation accepts (the standard's lower bound for `MPI_TAG_UB`).
pub const TAG_UB: i32 = 32767;

/// Most members of one collective group (its tags encode phase × member × shard below [`TAG_UB`]).
pub const GROUP_MEMBERS_MAX: usize = 100;

/// A communicator that any thread may use, addressed by **world** rank: `members[i]` is the world rank of its
/// rank `i` (the split communicators of groups and transports hold only their members).
struct Comm {
    raw: SimpleCommunicator,
    members: Vec<usize>,
    me: usize,
}

// SAFETY: `MpiWorld::init` refuses to run unless MPI provides `MPI_THREAD_MULTIPLE`, under which any thread may
// call MPI on any communicator at any time; the handle is never mutated after creation.
unsafe impl Send for Comm {}
// SAFETY: as for `Send`: concurrent MPI calls on one communicator are allowed under `MPI_THREAD_MULTIPLE`.
unsafe impl Sync for Comm {}

impl Comm {
    /// A communicator over every rank of the world.
    fn world(raw: SimpleCommunicator) -> Comm {
        let n = raw.size() as usize;
        let me = raw.rank() as usize;
        Comm {
            raw,
            members: (0..n).collect(),
            me,
        }
    }

    /// This process's world rank.
    fn rank(&self) -> usize {
        self.me
    }

    /// The communicator's rank of world rank `world`.
    fn local(&self, world: usize) -> Result<i32> {
        self.members
            .iter()
            .position(|&r| r == world)
            .map(|i| i as i32)
            .ok_or_else(|| EngineError::Comm {
                seam: "mpi",
                stage: 0,
                reason: format!("rank {world} is not in this communicator ({:?})", self.members),
            })
    }

    /// Posts a nonblocking send of `data` to `dest` with `tag`; the returned request owns the bytes.
    fn isend(&self, dest: usize, tag: i32, data: Vec<u8>) -> Result<Outgoing> {
        let count = i32::try_from(data.len()).map_err(|_| EngineError::Comm {
            seam: "mpi",
            stage: 0,
            reason: format!("a message of {} bytes exceeds MPI's count limit", data.len()),
        })?;
        let world_dest = dest;
        let dest = self.local(dest)?;
        // SAFETY: MPI_REQUEST_NULL is a valid initial handle; MPI_Isend overwrites it.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `data` is moved into the returned `Outgoing`, which keeps it alive and unmoved (a Vec's heap buffer
        // does not move with the Vec) until MPI_Test reports the send complete or, if dropped earlier, leaks it; the
        // count and datatype describe exactly that buffer; the communicator is valid for the world's lifetime.
        let rc = unsafe {
            ffi::MPI_Isend(
                data.as_ptr() as *const c_void,
                count,
                ffi::RSMPI_UINT8_T,
                dest,
                tag,
                mpi::raw::AsRaw::as_raw(&self.raw),
                &mut req,
            )
        };
        if rc != 0 {
            return Err(EngineError::Comm {
                seam: "mpi",
                stage: 0,
                reason: format!("MPI_Isend to rank {dest} failed with code {rc}"),
            });
        }
        Ok(Outgoing {
            data,
            req,
            done: false,
            dest: world_dest,
        })
    }

    /// The message with `tag` from `src`, if one has arrived.
    fn try_recv(&self, src: usize, tag: i32) -> Option<Vec<u8>> {
        let process = self.raw.process_at_rank(self.local(src).ok()?);
        let (msg, status) = process.immediate_matched_probe_with_tag(tag)?;
        let n = status.count(u8::equivalent_datatype()).max(0) as usize;
        let mut buf = vec![0u8; n];
        msg.matched_receive_into(&mut buf[..]);
        Some(buf)
    }
}

/// A posted send and the bytes it reads.
struct Outgoing {
    data: Vec<u8>,
    req: ffi::MPI_Request,
    done: bool,
    /// The receiving rank.
    dest: usize,
}

// SAFETY: the request handle is owned by this value and used by one thread at a time (through `&mut self`); MPI
// allows any thread to test a request under `MPI_THREAD_MULTIPLE`.
unsafe impl Send for Outgoing {}

impl Outgoing {
    /// True once the send has completed (its bytes may be reused).
    fn test(&mut self) -> bool {
        if self.done {
            return true;
        }
        let mut flag = 0;
        // SAFETY: `req` is the live request MPI_Isend returned (MPI_Test sets it to MPI_REQUEST_NULL when done, and
        // `done` stops further calls); the status is ignored.
        unsafe { ffi::MPI_Test(&mut self.req, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        self.done = flag != 0;
        self.done
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if !self.test() {
            // Still in flight (a peer was lost or the step failed): let MPI finish it in the background and leak the
            // bytes it may still read, rather than free them under it.
            // SAFETY: `req` is a live request; MPI_Request_free lets the operation complete on its own.
            unsafe { ffi::MPI_Request_free(&mut self.req) };
            std::mem::forget(std::mem::take(&mut self.data));
        }
    }
}

/// Why a wait ended without its message.
enum Missed {
    Aborted,
    Deadline,
}

/// Waits for the message with `tag` from `src` on `comm`, testing `pending` sends while it waits (so this rank's
/// own sends progress), until it arrives, `abort` is set, or `deadline` passes.
fn wait_recv(
    comm: &Comm,
    src: usize,
    tag: i32,
    abort: Option<&AtomicBool>,
    deadline: Instant,
    pending: &mut Vec<Outgoing>,
) -> std::result::Result<Vec<u8>, Missed> {
    let mut spins = 0u32;
    loop {
        if let Some(buf) = comm.try_recv(src, tag) {
            return Ok(buf);
        }
        pending.retain_mut(|o| !o.test());
        if abort.is_some_and(|a| a.load(Ordering::SeqCst)) {
            return Err(Missed::Aborted);
        }
        if Instant::now() >= deadline {
            return Err(Missed::Deadline);
        }
        // Spin briefly (a message is often just behind), then back off to at most 1 ms between polls.
        spins = spins.saturating_add(1);
        if spins < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(u64::from(spins.min(1000))));
        }
    }
}

/// Waits until every send in `pending` has completed or `deadline` passes; returns whether all completed.
fn flush(pending: &mut Vec<Outgoing>, deadline: Instant) -> bool {
    loop {
        pending.retain_mut(|o| !o.test());
        if pending.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(x).to_vec()
}

/// The f32 values of a message (a trailing partial value, which no sender makes, is dropped).
fn bytes_f32(b: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; b.len() / 4];
    let n = v.len() * 4;
    bytemuck::cast_slice_mut::<f32, u8>(&mut v).copy_from_slice(&b[..n]);
    v
}

fn f64_bytes(x: &[f64]) -> Vec<u8> {
    bytemuck::cast_slice(x).to_vec()
}

/// The f64 values of a message.
fn bytes_f64(b: &[u8]) -> Vec<f64> {
    let mut v = vec![0f64; b.len() / 8];
    let n = v.len() * 8;
    bytemuck::cast_slice_mut::<f64, u8>(&mut v).copy_from_slice(&b[..n]);
    v
}

/// This process's place among the ranks of an MPI job: initialises MPI (once per process) and finalises it when
/// the last reference drops. A binary started without `mpirun`/`srun` is a world of one rank.
pub struct MpiWorld {
    world: Comm,
    /// The cohort's own communicator (host-side gathers for checkpoints), made at start.
    cohort: Comm,
    cohort_lock: std::sync::Mutex<()>,
    rank: usize,
    size: usize,
    local_rank: usize,
    host: String,
    _universe: mpi::environment::Universe,
}

impl MpiWorld {
    /// Initialises MPI with `MPI_THREAD_MULTIPLE`. Errors when MPI was initialised before in this process or does
    /// not provide that thread level.
    pub fn init() -> Result<Arc<MpiWorld>> {
        let (universe, threading) =
            mpi::initialize_with_threading(Threading::Multiple).ok_or_else(|| EngineError::Comm {
                seam: "mpi",
                stage: 0,
                reason: "MPI is already initialised in this process (MPI_Init runs once per process)".into(),
            })?;
        if threading != Threading::Multiple {
            return Err(EngineError::Comm {
                seam: "mpi",
                stage: 0,
                reason: format!(
                    "the MPI library provides thread level {threading:?}; Baton's stage threads need Multiple"
                ),
            });
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        let host = mpi::environment::processor_name().unwrap_or_else(|_| "?".into());
        let cohort = Comm::world(world.duplicate());
        Ok(Arc::new(MpiWorld {
            cohort,
            cohort_lock: std::sync::Mutex::new(()),
            world: Comm::world(world),
            rank,
            size,
            local_rank,
            host,
            _universe: universe,
        }))
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the job.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's rank among the ranks on its host.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The host's name as MPI reports it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Ends this rank at once with exit status `code`, without finalising MPI (which would wait for ranks that may
    /// be lost or stalled); the launcher (mpirun, srun) then ends the job's other ranks. Not `MPI_Abort`: Open MPI's
    /// abort can signal the caller's whole process group, which may hold more than the job.
    pub fn exit_now(&self, code: i32) -> ! {
        use std::io::Write;
        let _ = std::io::stderr().flush();
        std::process::exit(code)
    }

    /// A fresh communicator over every rank (collective: every rank calls this in the same order).
    fn duplicate(&self) -> Comm {
        Comm::world(self.world.raw.duplicate())
    }

    /// A communicator over the world ranks `members` (ascending), split from the world (collective: every rank
    /// calls this in the same order, members or not); `None` on a rank that is not a member.
    fn split(&self, members: &[usize]) -> Option<Comm> {
        let here = members.contains(&self.rank);
        let color = if here {
            mpi::topology::Color::with_value(0)
        } else {
            mpi::topology::Color::undefined()
        };
        let raw = self.world.raw.split_by_color_with_key(color, self.rank as i32)?;
        here.then(|| Comm {
            raw,
            members: members.to_vec(),
            me: self.rank,
        })
    }

    /// Every rank's host name, in rank order (collective).
    pub fn hosts(&self, timeout: Duration) -> Result<Vec<String>> {
        let comm = self.duplicate();
        let got = exchange_all(
            &comm,
            self.size,
            1,
            self.host.as_bytes().to_vec(),
            timeout,
            "host names",
        )?;
        Ok(got
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect())
    }

    /// Waits until every rank has arrived (collective), or errors after `timeout` naming a missing rank.
    pub fn barrier(&self, timeout: Duration) -> Result<()> {
        let comm = self.duplicate();
        exchange_all(&comm, self.size, 2, Vec::new(), timeout, "a barrier").map(|_| ())
    }

    /// Every rank's `value`, in rank order (collective): small host data such as losses or flags.
    pub fn all_gather_f64(&self, values: &[f64], timeout: Duration) -> Result<Vec<Vec<f64>>> {
        let comm = self.duplicate();
        let got = exchange_all(&comm, self.size, 3, f64_bytes(values), timeout, "host values")?;
        Ok(got.iter().map(|b| bytes_f64(b)).collect())
    }
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MpiWorld {{ rank: {}, size: {}, host: {} }}",
            self.rank, self.size, self.host
        )
    }
}

/// How long a host-side gather of the cohort waits for a rank (a checkpoint's files can take a while).
pub const COHORT_TIMEOUT: Duration = Duration::from_secs(600);

impl super::Cohort for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let _one = self.cohort_lock.lock().unwrap_or_else(|e| e.into_inner());
        exchange_all(
            &self.cohort,
            self.size,
            4,
            mine.to_vec(),
            COHORT_TIMEOUT,
            "a checkpoint's gather",
        )
    }
}

/// Sends `mine` to every other rank of `comm` and returns every rank's bytes in rank order.
fn exchange_all(
    comm: &Comm,
    size: usize,
    tag: i32,
    mine: Vec<u8>,
    timeout: Duration,
    what: &str,
) -> Result<Vec<Vec<u8>>> {
    let me = comm.rank();
    let deadline = Instant::now() + timeout;
    let mut pending = Vec::with_capacity(size);
    for r in (0..size).filter(|&r| r != me) {
        pending.push(comm.isend(r, tag, mine.clone())?);
    }
    let mut out = Vec::with_capacity(size);
    for r in 0..size {
        if r == me {
            out.push(mine.clone());
            continue;
        }
        match wait_recv(comm, r, tag, None, deadline, &mut pending) {
            Ok(b) => out.push(b),
            Err(_) => {
                return Err(EngineError::Comm {
                    seam: "mpi",
                    stage: 0,
                    reason: format!("rank {r} did not arrive at {what} within {timeout:?}; it is lost or stalled"),
                })
            }
        }
    }
    if !flush(&mut pending, deadline) {
        return Err(EngineError::Comm {
            seam: "mpi",
            stage: 0,
            reason: format!(
                "{what}: rank {} took no delivery for {timeout:?}; it is lost or stalled",
                pending.first().map_or(0, |o| o.dest)
            ),
        });
    }
    Ok(out)
}

/// Where every worker (replica, stage) of a job runs: `workers = replicas × stages` spread over `ranks` processes,
/// each rank hosting `workers / ranks` consecutive stages of one replica (worker `w = replica·stages + stage` on
/// rank `w / per_rank`). With the launcher's default placement (consecutive ranks fill a host's slots first),
/// the stages of one pipeline share a host where it has the slots, and replicas spread across hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankMap {
    replicas: usize,
    stages: usize,
    ranks: usize,
    per_rank: usize,
}

impl RankMap {
    /// The map of `replicas × stages` workers on `ranks` ranks; the ranks must divide the workers and each rank's
    /// share must divide the stages (a rank never holds stages of two replicas).
    pub fn new(replicas: usize, stages: usize, ranks: usize) -> Result<Self> {
        let workers = replicas * stages;
        if ranks == 0 || workers == 0 || workers % ranks != 0 || stages % (workers / ranks) != 0 {
            return Err(EngineError::config(
                "ranks",
                ranks,
                format!(
                    "{replicas} replicas × {stages} stages = {workers} workers cannot be spread evenly over {ranks} \
                     ranks with each rank inside one replica; use a rank count that divides {workers} and is a \
                     multiple of {replicas}"
                ),
            ));
        }
        Ok(RankMap {
            replicas,
            stages,
            ranks,
            per_rank: workers / ranks,
        })
    }

    /// Ranks in the job.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Stages per replica.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Replicas.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// The rank running worker `worker` (`replica·stages + stage`).
    pub fn rank_of_worker(&self, worker: usize) -> usize {
        worker / self.per_rank
    }

    /// The rank running stage `stage` of replica `replica`.
    pub fn rank_of(&self, replica: usize, stage: usize) -> usize {
        self.rank_of_worker(replica * self.stages + stage)
    }

    /// The workers rank `rank` hosts (consecutive stages of one replica).
    pub fn workers_of(&self, rank: usize) -> Range<usize> {
        rank * self.per_rank..(rank + 1) * self.per_rank
    }

    /// `(replica, stage)` of a worker.
    pub fn worker(&self, worker: usize) -> (usize, usize) {
        (worker / self.stages, worker % self.stages)
    }

    /// One line per rank: its host and the replica and stages it runs.
    pub fn describe(&self, hosts: &[String]) -> Vec<String> {
        (0..self.ranks)
            .map(|rank| {
                let w = self.workers_of(rank);
                let (r, s0) = self.worker(w.start);
                let s1 = s0 + w.len() - 1;
                let host = hosts.get(rank).map_or("?", String::as_str);
                let stages = if s0 == s1 {
                    format!("stage {s0}")
                } else {
                    format!("stages {s0}-{s1}")
                };
                format!("rank {rank} on {host}: replica {r}, {stages}")
            })
            .collect()
    }
}

/// What [`crate::PipelineBuilder::hosting`] needs to run this rank's workers of `map` over MPI: the workers, one
/// [`MpiTransport`] per replica and the world as the checkpoints' cohort. Every rank builds the same pipeline
/// with it (and [`MpiCollectives`] through `collectives_for`).
pub fn hosting<B: Backend>(world: &Arc<MpiWorld>, map: &RankMap, schedule: &Schedule) -> crate::Hosting<B> {
    let (w, m, schedule) = (Arc::clone(world), map.clone(), schedule.clone());
    crate::Hosting {
        workers: map.workers_of(world.rank()).collect(),
        transports: Box::new(move |backends| {
            backends
                .iter()
                .enumerate()
                .map(|(r, b)| {
                    let t: Arc<dyn Transport<B>> = Arc::new(MpiTransport::new(&w, &m, r, Arc::clone(b), &schedule)?);
                    Ok(t)
                })
                .collect()
        }),
        cohort: Arc::clone(world) as Arc<dyn super::Cohort>,
    }
}

/// Activations and gradients between the stages of replica `replica` over MPI: a stage hosted on this rank sends
/// to the rank hosting the consumer with a nonblocking send and receives by polling for its message's tag from
/// the producer's rank. One duplicated communicator per transport keeps replicas' tags apart.
pub struct MpiTransport<B: Backend> {
    /// Split from the world over this replica's ranks (`None` on the other ranks, which never use it).
    comm: Option<Arc<Comm>>,
    route: Arc<MpiRoute>,
    backends: Arc<Vec<B>>,
    /// Keeps MPI initialised while the transport lives.
    _world: Arc<MpiWorld>,
}

impl<B: Backend> MpiTransport<B> {
    /// The transport of `replica` (collective: every rank makes every replica's transport, in replica order).
    /// `backends[s]` computes stage `s` where this rank hosts it (other entries are never used).
    pub fn new(
        world: &Arc<MpiWorld>,
        map: &RankMap,
        replica: usize,
        backends: Arc<Vec<B>>,
        schedule: &Schedule,
    ) -> Result<Self> {
        let parts = schedule.placement.num_parts();
        let most = 2 * u64::from(parts) * u64::from(schedule.microbatches);
        if most > TAG_UB as u64 {
            return Err(EngineError::config(
                "microbatches",
                schedule.microbatches,
                format!(
                    "{parts} parts × {} micro-batches need more MPI tags than {TAG_UB}",
                    schedule.microbatches
                ),
            ));
        }
        if backends.len() != map.stages() || world.size() != map.ranks() {
            return Err(EngineError::config(
                "ranks",
                world.size(),
                format!(
                    "the rank map is for {} ranks of {} stages; the job has {} ranks and {} backends",
                    map.ranks(),
                    map.stages(),
                    world.size(),
                    backends.len()
                ),
            ));
        }
        let mut ranks: Vec<usize> = (0..map.stages()).map(|s| map.rank_of(replica, s)).collect();
        ranks.dedup();
        Ok(MpiTransport {
            comm: world.split(&ranks).map(Arc::new),
            route: Arc::new(MpiRoute {
                map: map.clone(),
                replica,
                placement: schedule.placement.clone(),
                parts,
            }),
            backends,
            _world: Arc::clone(world),
        })
    }
}

impl<B: Backend> MpiTransport<B> {
    fn comm(&self) -> Result<&Arc<Comm>> {
        self.comm.as_ref().ok_or_else(|| EngineError::Invariant {
            stage: 0,
            what: format!(
                "rank {} runs no stage of replica {}",
                self._world.rank(),
                self.route.replica
            ),
        })
    }
}

impl<B: Backend> Transport<B> for MpiTransport<B> {
    fn stages(&self) -> usize {
        self.route.map.stages()
    }

    fn open(&self, _inbox: &[usize]) -> Result<Endpoints<B>> {
        let me = self._world.rank();
        let route = &self.route;
        let hosted: Vec<usize> = (0..route.map.stages())
            .filter(|&s| route.map.rank_of(route.replica, s) == me)
            .collect();
        hosted
            .into_iter()
            .map(|s| {
                let end: Box<dyn Endpoint<B>> = Box::new(MpiEndpoint {
                    stage: s,
                    comm: Arc::clone(self.comm()?),
                    route: Arc::clone(&self.route),
                    backends: Arc::clone(&self.backends),
                    pending: Vec::new(),
                });
                Ok((s, end))
            })
            .collect()
    }

    fn relay(&self, from: usize, to: usize, buf: B::Buf) -> Result<B::Buf> {
        let me = self._world.rank();
        let route = &self.route;
        let (rf, rt) = (
            route.map.rank_of(route.replica, from),
            route.map.rank_of(route.replica, to),
        );
        if rf == me && rt == me {
            return self.backends[from].transfer(buf, &self.backends[to]);
        }
        Err(EngineError::Comm {
            seam: "transport",
            stage: from as u32,
            reason: format!(
                "moving a buffer from stage {from} (rank {rf}) to stage {to} (rank {rt}) outside a step is not done \
                 across processes"
            ),
        })
    }

    fn relay_hosted(&self, from: usize, to: usize, buf: Option<B::Buf>) -> Result<Option<B::Buf>> {
        let me = self._world.rank();
        let route = &self.route;
        if from >= route.map.stages() || to >= route.map.stages() {
            return Err(EngineError::Comm {
                seam: "transport",
                stage: from as u32,
                reason: format!(
                    "relay from stage {from} to stage {to}: there are {} stages",
                    route.map.stages()
                ),
            });
        }
        let (rf, rt) = (
            route.map.rank_of(route.replica, from),
            route.map.rank_of(route.replica, to),
        );
        let deadline = Instant::now() + RELAY_TIMEOUT;
        match (rf == me, rt == me, buf) {
            (true, true, Some(b)) => self.backends[from].transfer(b, &self.backends[to]).map(Some),
            (true, false, Some(b)) => {
                let data = f32_bytes(&self.backends[from].download(&b)?);
                let mut pending = vec![self.comm()?.isend(rt, RELAY_TAG, data)?];
                if flush(&mut pending, deadline) {
                    Ok(None)
                } else {
                    Err(EngineError::Comm {
                        seam: "transport",
                        stage: from as u32,
                        reason: format!("relay to stage {to} (rank {rt}): not delivered within {RELAY_TIMEOUT:?}"),
                    })
                }
            }
            (false, true, None) => match wait_recv(self.comm()?, rf, RELAY_TAG, None, deadline, &mut Vec::new()) {
                Ok(bytes) => self.backends[to].upload(&bytes_f32(&bytes)).map(Some),
                Err(_) => Err(EngineError::Comm {
                    seam: "transport",
                    stage: to as u32,
                    reason: format!(
                        "relay from stage {from} (rank {rf}): nothing within {RELAY_TIMEOUT:?}; that rank is lost or                          stalled"
                    ),
                }),
            },
            (false, false, None) => Ok(None),
            (held, _, b) => Err(EngineError::Invariant {
                stage: from as u32,
                what: format!(
                    "a relay from stage {from} with{} a buffer on rank {me}, which {} that stage",
                    if b.is_some() { "" } else { "out" },
                    if held { "holds" } else { "does not hold" }
                ),
            }),
        }
    }

    fn pool_stats(&self) -> Vec<PoolStats> {
        Vec::new()
    }
}

/// The tag of relays outside a step (above every message tag of a step).
const RELAY_TAG: i32 = TAG_UB;

/// How long a relay outside a step waits for its peer.
const RELAY_TIMEOUT: Duration = Duration::from_secs(120);

/// What an endpoint needs to name and route messages.
struct MpiRoute {
    map: RankMap,
    replica: usize,
    placement: Placement,
    parts: u32,
}

impl MpiRoute {
    fn tag(&self, key: MessageKey) -> i32 {
        let kind = i32::from(key.kind == MessageKind::Gradient);
        kind + 2 * (key.part as i32 + self.parts as i32 * key.mb as i32)
    }

    fn producer(&self, key: MessageKey) -> Option<usize> {
        let part = match key.kind {
            MessageKind::Activation => key.part.checked_sub(1)?,
            MessageKind::Gradient => key.part + 1,
        };
        self.placement.owner(part).map(|(s, _)| s as usize)
    }
}

/// One hosted stage's end of an [`MpiTransport`] for one step.
struct MpiEndpoint<B: Backend> {
    stage: usize,
    comm: Arc<Comm>,
    route: Arc<MpiRoute>,
    backends: Arc<Vec<B>>,
    pending: Vec<Outgoing>,
}

/// How long an endpoint waits at the end of a step for its last sends to complete.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

impl<B: Backend> Endpoint<B> for MpiEndpoint<B> {
    fn send(&mut self, to: usize, key: MessageKey, buf: B::Buf) -> Result<()> {
        let route = &self.route;
        if to >= route.map.stages() {
            return Err(EngineError::Comm {
                seam: "transport",
                stage: self.stage as u32,
                reason: format!("send of {key} to stage {to}: there are {} stages", route.map.stages()),
            });
        }
        let dest = route.map.rank_of(route.replica, to);
        let data = f32_bytes(&self.backends[self.stage].download(&buf)?);
        let tag = route.tag(key);
        self.pending.push(self.comm.isend(dest, tag, data)?);
        self.pending.retain_mut(|o| !o.test());
        Ok(())
    }

    fn recv(&mut self, key: MessageKey, abort: &AtomicBool, deadline: Instant) -> Result<B::Buf> {
        let route = &self.route;
        let stage = self.stage as u32;
        let from = route.producer(key).ok_or_else(|| EngineError::Invariant {
            stage,
            what: format!("{key} has no producing stage"),
        })?;
        let src = route.map.rank_of(route.replica, from);
        match wait_recv(
            &self.comm,
            src,
            route.tag(key),
            Some(abort),
            deadline,
            &mut self.pending,
        ) {
            Ok(bytes) => self.backends[self.stage].upload(&bytes_f32(&bytes)),
            Err(Missed::Aborted) => Err(EngineError::Aborted { stage }),
            Err(Missed::Deadline) => Err(EngineError::Comm {
                seam: "transport",
                stage,
                reason: format!(
                    "waited past the deadline for {key} from rank {src} (replica {}, stage {from}); that rank is \
                     lost or stalled",
                    route.replica
                ),
            }),
        }
    }

    fn copy_spans(&mut self, _base: &[B::Mark]) -> Result<Vec<CopySpan>> {
        // The step's sends must be out before the step ends (their bytes live here).
        if !flush(&mut self.pending, Instant::now() + FLUSH_TIMEOUT) {
            let dest = self.pending.first().map_or(0, |o| o.dest);
            return Err(EngineError::Comm {
                seam: "transport",
                stage: self.stage as u32,
                reason: format!(
                    "rank {dest} took no delivery for {FLUSH_TIMEOUT:?} after the stage's last action; that rank is \
                     lost or stalled"
                ),
            });
        }
        Ok(Vec::new())
    }
}

/// Groups of workers on any ranks of an MPI job. Every rank must make the same groups in the same order.
pub struct MpiCollectives<B: Backend> {
    world: Arc<MpiWorld>,
    map: RankMap,
    workers: Workers<B>,
    timeout: Duration,
}

impl<B: Backend> MpiCollectives<B> {
    /// Groups over the workers of `map` (this rank's backends in `workers`; the other entries are never used);
    /// every wait gives up after `timeout`.
    pub fn new(world: &Arc<MpiWorld>, map: &RankMap, workers: Workers<B>, timeout: Duration) -> Self {
        MpiCollectives {
            world: Arc::clone(world),
            map: map.clone(),
            workers,
            timeout,
        }
    }
}

impl<B: Backend> Collectives<B> for MpiCollectives<B> {
    fn group(&self, workers: &[usize]) -> Result<Box<dyn Collective<B>>> {
        if workers.is_empty() || workers.len() > GROUP_MEMBERS_MAX {
            return Err(EngineError::config(
                "group",
                workers.len(),
                format!("a group over MPI holds 1 to {GROUP_MEMBERS_MAX} members"),
            ));
        }
        if let Some(&w) = workers.iter().find(|&&w| w >= self.map.replicas() * self.map.stages()) {
            return Err(EngineError::config("group", w, "a member beyond the job's workers"));
        }
        let ranks: Vec<usize> = workers.iter().map(|&w| self.map.rank_of_worker(w)).collect();
        let mut procs = ranks.clone();
        procs.sort_unstable();
        procs.dedup();
        let comm = self.world.split(&procs);
        let me = self.world.rank();
        if let Some(&w) = workers
            .iter()
            .find(|&&w| self.map.rank_of_worker(w) == me && self.workers.get(w).is_none())
        {
            return Err(EngineError::config(
                "group",
                w,
                "this rank hosts the worker but has no backend for it",
            ));
        }
        Ok(Box::new(MpiGroup {
            comm,
            workers: workers.to_vec(),
            ranks,
            procs,
            backends: self.workers.clone(),
            map: self.map.clone(),
            timeout: self.timeout,
            _world: Arc::clone(&self.world),
        }))
    }
}

/// A group of workers on several ranks: member `m` is worker `workers[m]` on rank `ranks[m]`.
struct MpiGroup<B: Backend> {
    /// Split from the world over the group's ranks (`None` on the other ranks, which never call the group).
    comm: Option<Comm>,
    workers: Vec<usize>,
    ranks: Vec<usize>,
    /// The distinct ranks of the group, ascending.
    procs: Vec<usize>,
    /// The backends of every worker (only this rank's members' are used).
    backends: Workers<B>,
    map: RankMap,
    timeout: Duration,
    _world: Arc<MpiWorld>,
}

/// Phases of a group operation (distinct tags).
const PHASE_SCATTER: i32 = 0;
const PHASE_GATHER: i32 = 1;
const PHASE_HOST: i32 = 2;
const PHASE_BROADCAST: i32 = 3;

impl<B: Backend> MpiGroup<B> {
    fn n(&self) -> usize {
        self.workers.len()
    }

    fn me(&self) -> usize {
        self._world.rank()
    }

    fn comm(&self) -> Result<&Comm> {
        self.comm.as_ref().ok_or_else(|| EngineError::Invariant {
            stage: 0,
            what: format!("rank {} holds no member of this group", self.me()),
        })
    }

    fn here(&self, m: usize) -> bool {
        self.ranks[m] == self.me()
    }

    fn be(&self, m: usize) -> Result<&B> {
        if !self.here(m) {
            return Err(EngineError::Invariant {
                stage: m as u32,
                what: format!("member {m} of the group is on rank {}, not here", self.ranks[m]),
            });
        }
        self.backends
            .get(self.workers[m])
            .ok_or_else(|| EngineError::Invariant {
                stage: m as u32,
                what: format!("no backend for worker {}", self.workers[m]),
            })
    }

    fn tag(&self, phase: i32, a: usize, b: usize) -> i32 {
        let n = self.n() as i32;
        phase * n * n + a as i32 * n + b as i32
    }

    /// Writes host `values` into member `m`'s buffer `buf`, which must hold exactly as many; `what(len)` names a
    /// buffer of `len` elements that does not.
    fn store(&self, m: usize, buf: &mut B::Buf, values: &[f32], what: impl FnOnce(usize) -> String) -> Result<()> {
        let be = self.be(m)?;
        let len = be.len(buf);
        if len != values.len() {
            return Err(self.err(m, what(len)));
        }
        let x = be.upload(values)?;
        be.copy(buf, &x)
    }

    fn err(&self, m: usize, reason: String) -> EngineError {
        EngineError::Comm {
            seam: "collective",
            stage: self.map.worker(self.workers[m]).1 as u32,
            reason,
        }
    }

    /// The positions in `given` of this rank's members, in member order; every local member exactly once and no
    /// member from elsewhere.
    fn local_order(&self, given: impl Iterator<Item = usize>) -> Result<Vec<(usize, usize)>> {
        let who = format!("rank {}", self.me());
        hosted_order(self.n(), |m| self.here(m), given, &who, |m, r| self.err(m, r))
    }

    fn wait(
        &self,
        m_from: usize,
        tag: i32,
        deadline: Instant,
        pending: &mut Vec<Outgoing>,
        what: &str,
    ) -> Result<Vec<u8>> {
        let src = self.ranks[m_from];
        wait_recv(self.comm()?, src, tag, None, deadline, pending).map_err(|_| {
            let (r, s) = self.map.worker(self.workers[m_from]);
            self.err(
                m_from,
                format!(
                    "{what}: waited {:?} for member {m_from} (rank {src}, replica {r}, stage {s}); that rank is lost \
                     or stalled",
                    self.timeout
                ),
            )
        })
    }

    fn finish(&self, pending: &mut Vec<Outgoing>, deadline: Instant, what: &str) -> Result<()> {
        if flush(pending, deadline) {
            return Ok(());
        }
        // The first member on a rank that did not take its message.
        let dest = pending.first().map_or(0, |o| o.dest);
        let m = self.ranks.iter().position(|&r| r == dest).unwrap_or(0);
        let (r, s) = self.map.worker(self.workers[m]);
        Err(self.err(
            m,
            format!(
                "{what}: rank {dest} (replica {r}, stage {s}) took no delivery for {:?}; that rank is lost or stalled",
                self.timeout
            ),
        ))
    }

    /// Steps 1–2 of the all-reduce: every member's shard `j` to its owner `j`, each owner adding the contributions
    /// in member order. Returns the summed shards this rank owns, `(j, values)`.
    fn scatter_sum(
        &self,
        local: &[(usize, Vec<f32>)],
        shards: &[Range<usize>],
        deadline: Instant,
        pending: &mut Vec<Outgoing>,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        let n = self.n();
        for (m, x) in local {
            for (j, r) in shards.iter().enumerate() {
                if !self.here(j) {
                    pending.push(self.comm()?.isend(
                        self.ranks[j],
                        self.tag(PHASE_SCATTER, *m, j),
                        f32_bytes(&x[r.clone()]),
                    )?);
                }
            }
        }
        let mut owned = Vec::new();
        for j in (0..n).filter(|&j| self.here(j)) {
            let r = shards[j].clone();
            let mut sum: Vec<f32> = Vec::new();
            for m in 0..n {
                let part = if self.here(m) {
                    let x = &local
                        .iter()
                        .find(|(lm, _)| *lm == m)
                        .ok_or_else(|| self.err(m, "missing".into()))?
                        .1;
                    x[r.clone()].to_vec()
                } else {
                    bytes_f32(&self.wait(m, self.tag(PHASE_SCATTER, m, j), deadline, pending, "all-reduce")?)
                };
                if part.len() != r.len() {
                    return Err(self.err(m, format!("sent {} elements for a shard of {}", part.len(), r.len())));
                }
                if m == 0 {
                    sum = part;
                } else {
                    sum.iter_mut().zip(&part).for_each(|(s, v)| *s += v);
                }
            }
            owned.push((j, sum));
        }
        Ok(owned)
    }

    /// Sends each owned shard to every other rank of the group and returns every shard, `[j]`.
    fn gather_shards(
        &self,
        owned: Vec<(usize, Vec<f32>)>,
        deadline: Instant,
        pending: &mut Vec<Outgoing>,
        what: &str,
    ) -> Result<Vec<Vec<f32>>> {
        let me = self.me();
        let n = self.n();
        for (j, x) in &owned {
            for &r in self.procs.iter().filter(|&&r| r != me) {
                pending.push(self.comm()?.isend(r, self.tag(PHASE_GATHER, *j, 0), f32_bytes(x))?);
            }
        }
        let mut all: Vec<Option<Vec<f32>>> = (0..n).map(|_| None).collect();
        for (j, x) in owned {
            all[j] = Some(x);
        }
        for (j, slot) in all.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = Some(bytes_f32(&self.wait(
                    j,
                    self.tag(PHASE_GATHER, j, 0),
                    deadline,
                    pending,
                    what,
                )?));
            }
        }
        Ok(all.into_iter().flatten().collect())
    }
}

impl<B: Backend> Collective<B> for MpiGroup<B> {
    fn members(&self) -> usize {
        self.n()
    }

    fn all_reduce(&self, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let order = self.local_order(bufs.iter().map(|(m, _)| *m))?;
        let deadline = Instant::now() + self.timeout;
        let mut local = Vec::with_capacity(order.len());
        for &(m, pos) in &order {
            local.push((m, self.be(m)?.download(bufs[pos].1)?));
        }
        let len = local.first().map_or(0, |(_, x)| x.len());
        if let Some((m, x)) = local.iter().find(|(_, x)| x.len() != len) {
            return Err(self.err(*m, format!("a buffer of {} elements among buffers of {len}", x.len())));
        }
        let shards = shard_ranges(len, self.n());
        let mut pending = Vec::new();
        let owned = self.scatter_sum(&local, &shards, deadline, &mut pending)?;
        let all = self.gather_shards(owned, deadline, &mut pending, "all-reduce")?;
        let sum: Vec<f32> = all.concat();
        if sum.len() != len {
            return Err(self.err(0, format!("the summed shards hold {} elements, not {len}", sum.len())));
        }
        for &(m, pos) in &order {
            self.store(m, bufs[pos].1, &sum, |n| format!("a buffer of {n} for a sum of {len}"))?;
        }
        self.finish(&mut pending, deadline, "all-reduce")
    }

    fn broadcast(&self, root: usize, bufs: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        if root >= self.n() {
            return Err(self.err(0, format!("broadcast from member {root} of a group of {}", self.n())));
        }
        let order = self.local_order(bufs.iter().map(|(m, _)| *m))?;
        let deadline = Instant::now() + self.timeout;
        let mut pending = Vec::new();
        let values = if self.here(root) {
            let pos = order
                .iter()
                .find(|(m, _)| *m == root)
                .map(|&(_, p)| p)
                .ok_or_else(|| self.err(root, "the root is hosted here but was not given".into()))?;
            let v = self.be(root)?.download(bufs[pos].1)?;
            for &r in self.procs.iter().filter(|&&r| r != self.me()) {
                pending.push(
                    self.comm()?
                        .isend(r, self.tag(PHASE_BROADCAST, root, 0), f32_bytes(&v))?,
                );
            }
            v
        } else {
            bytes_f32(&self.wait(
                root,
                self.tag(PHASE_BROADCAST, root, 0),
                deadline,
                &mut pending,
                "broadcast",
            )?)
        };
        for &(m, pos) in &order {
            if m != root {
                self.store(m, bufs[pos].1, &values, |n| {
                    format!("a buffer of {n} for a broadcast of {}", values.len())
                })?;
            }
        }
        self.finish(&mut pending, deadline, "broadcast")
    }

    fn reduce_scatter(&self, input: &[Local<'_, &B::Buf>], out: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let ins = self.local_order(input.iter().map(|(m, _)| *m))?;
        let outs = self.local_order(out.iter().map(|(m, _)| *m))?;
        let deadline = Instant::now() + self.timeout;
        let mut local = Vec::with_capacity(ins.len());
        for &(m, pos) in &ins {
            local.push((m, self.be(m)?.download(input[pos].1)?));
        }
        let total = local.first().map_or(0, |(_, x)| x.len());
        if total % self.n() != 0 || local.iter().any(|(_, x)| x.len() != total) {
            return Err(self.err(
                0,
                format!(
                    "reduce-scatter of {total} elements over {} members: not a multiple, or uneven inputs",
                    self.n()
                ),
            ));
        }
        let shard = total / self.n();
        let shards: Vec<Range<usize>> = (0..self.n()).map(|j| j * shard..(j + 1) * shard).collect();
        let mut pending = Vec::new();
        let owned = self.scatter_sum(&local, &shards, deadline, &mut pending)?;
        for (j, sum) in owned {
            let pos = outs
                .iter()
                .find(|(m, _)| *m == j)
                .map(|&(_, p)| p)
                .ok_or_else(|| self.err(j, "an owned shard's output was not given".into()))?;
            self.store(j, out[pos].1, &sum, |n| {
                format!("an output of {n} for a shard of {shard}")
            })?;
        }
        self.finish(&mut pending, deadline, "reduce-scatter")
    }

    fn all_gather(&self, shards: &[Local<'_, &B::Buf>], out: &mut [Local<'_, &mut B::Buf>]) -> Result<()> {
        let ins = self.local_order(shards.iter().map(|(m, _)| *m))?;
        let outs = self.local_order(out.iter().map(|(m, _)| *m))?;
        let deadline = Instant::now() + self.timeout;
        let mut owned = Vec::with_capacity(ins.len());
        for &(m, pos) in &ins {
            owned.push((m, self.be(m)?.download(shards[pos].1)?));
        }
        let mut pending = Vec::new();
        let all = self.gather_shards(owned, deadline, &mut pending, "all-gather")?;
        let shard = all.first().map_or(0, Vec::len);
        if let Some(j) = all.iter().position(|x| x.len() != shard) {
            return Err(self.err(j, format!("a shard of {} among shards of {shard}", all[j].len())));
        }
        let whole = all.concat();
        for &(m, pos) in &outs {
            self.store(m, out[pos].1, &whole, |n| {
                format!("an output of {n} for {} gathered elements", whole.len())
            })?;
        }
        self.finish(&mut pending, deadline, "all-gather")
    }

    fn all_gather_host(&self, values: &[Local<'_, Vec<f64>>]) -> Result<Vec<Vec<f64>>> {
        let order = self.local_order(values.iter().map(|(m, _)| *m))?;
        let deadline = Instant::now() + self.timeout;
        let me = self.me();
        let mut pending = Vec::new();
        for &(m, pos) in &order {
            for &r in self.procs.iter().filter(|&&r| r != me) {
                pending.push(
                    self.comm()?
                        .isend(r, self.tag(PHASE_HOST, m, 0), f64_bytes(&values[pos].1))?,
                );
            }
        }
        let mut out = Vec::with_capacity(self.n());
        for m in 0..self.n() {
            if let Some(&(_, pos)) = order.iter().find(|(lm, _)| *lm == m) {
                out.push(values[pos].1.clone());
            } else {
                out.push(bytes_f64(&self.wait(
                    m,
                    self.tag(PHASE_HOST, m, 0),
                    deadline,
                    &mut pending,
                    "gathering host values",
                )?));
            }
        }
        self.finish(&mut pending, deadline, "gathering host values")?;
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        for m in (0..self.n()).filter(|&m| self.here(m)) {
            self.be(m)?.synchronize()?;
        }
        let values: Vec<(usize, Vec<f64>)> = (0..self.n())
            .filter(|&m| self.here(m))
            .map(|m| (m, Vec::new()))
            .collect();
        self.all_gather_host(&values).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_map_keeps_a_rank_inside_one_replica() {
        let m = RankMap::new(2, 4, 4).unwrap();
        assert_eq!(m.rank_of(0, 0), 0);
        assert_eq!(m.rank_of(0, 1), 0);
        assert_eq!(m.rank_of(0, 2), 1);
        assert_eq!(m.rank_of(1, 3), 3);
        assert_eq!(m.workers_of(2), 4..6);
        assert_eq!(m.worker(5), (1, 1));
        let lines = m.describe(&["a".into(), "a".into(), "b".into(), "b".into()]);
        assert_eq!(lines[2], "rank 2 on b: replica 1, stages 0-1");
        assert_eq!(
            RankMap::new(1, 4, 4).unwrap().describe(&[])[3],
            "rank 3 on ?: replica 0, stage 3"
        );
        // 3 ranks cannot split 2 × 2 workers; 4 ranks of 1 replica × 2 stages leave ranks idle; a rank holding
        // stages of two replicas (2 × 3 workers on 2 ranks: 3 each, fine; 2 × 2 on 1 rank: 4 > 2 stages) is refused.
        assert!(RankMap::new(2, 2, 3).is_err());
        assert!(RankMap::new(1, 2, 4).is_err());
        assert!(RankMap::new(2, 2, 1).is_err());
        assert!(RankMap::new(2, 3, 2).is_ok());
        assert!(RankMap::new(0, 3, 2).is_err());
    }
}
