//! The process-wide thread pool every fast op runs on, and the shape-based partition of work.
//!
//! One pool for the process, shared by all stage threads. A pool of `n` threads is `n − 1` workers plus the
//! thread that calls an op: the caller publishes the op's tasks, takes tasks itself beside the workers, and
//! returns once every task has finished, so a lone stage computes on exactly `n` threads and an op costs no
//! hand-over to another thread and back (workers spin briefly between ops, then sleep). A thread computes only
//! while it holds one of the pool's `n` compute tokens, so however many stages call ops at once, at most `n`
//! threads compute: two stages on a pool of two each run their ops on their own thread, and the worker helps
//! whichever has tasks left when the other waits. Optionally ([`set_stage_threads`]) each
//! pipeline stage gets a pool of its own instead, so stages behave like separate devices; a stage thread binds
//! itself with [`bind_stage`]. Work is cut by shape only and any thread may run any task, so results are the same
//! either way.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// Most threads the pool may have.
pub const THREADS_MAX: usize = 256;

/// Most chunks one op is cut into: the parallelism one op can use (more threads help when stages run at once).
pub const CHUNKS_MAX: usize = 16;

/// How long an idle worker (or a caller waiting for the workers' last tasks) spins before it sleeps: long enough
/// to bridge the stage thread's bookkeeping between two ops, short enough not to steal a core for long.
const SPIN_US: u64 = 200;

/// Pure spins (`spin_loop` hints) before a spinning thread starts yielding its core between checks.
const SPINS_BEFORE_YIELD: u32 = 256;

/// One op's tasks `0..count`: the caller takes them from the front, workers from the back, so with two threads
/// the caller runs the first part of every op and the worker the last part — rows 0.. of a product and of the
/// layer norm after it on the same core, whose cache still holds them (measured: see BENCHMARKS.md).
struct Job {
    /// The op's task. Its lifetime is erased: the caller that owns it does not return before every thread that
    /// saw the job has left it (`visitors`), see [`Pool::run`].
    task: *const (dyn Fn(usize) + Sync + 'static),
    /// The tasks not handed out yet, `front..back`, packed as `front << 32 | back`.
    span: AtomicU64,
    /// Workers that may still read the job: incremented under the pool's lock when a worker takes the job from
    /// the list, decremented as the worker's last access.
    visitors: AtomicUsize,
    /// Set when a task panicked (on any thread); the caller re-raises the first panic, kept in `payload`.
    panicked: AtomicBool,
    payload: Mutex<Option<Box<dyn Any + Send>>>,
    /// The caller, woken when the last visitor leaves.
    owner: Thread,
}

/// `front..back` packed for [`Job::span`].
fn pack_span(front: usize, back: usize) -> u64 {
    ((front as u64) << 32) | back as u64
}

impl Job {
    /// Whether tasks are left to hand out.
    fn open(&self) -> bool {
        let span = self.span.load(Ordering::Relaxed);
        (span >> 32) < (span & u64::from(u32::MAX))
    }

    /// Claims the next task from the front (the caller) or the back (workers).
    fn claim(&self, from_back: bool) -> Option<usize> {
        let mut span = self.span.load(Ordering::Relaxed);
        loop {
            let (front, back) = ((span >> 32) as usize, (span & u64::from(u32::MAX)) as usize);
            if front >= back {
                return None;
            }
            let (next, task) = if from_back {
                (pack_span(front, back - 1), back - 1)
            } else {
                (pack_span(front + 1, back), front)
            };
            match self
                .span
                .compare_exchange_weak(span, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(task),
                Err(now) => span = now,
            }
        }
    }

    /// Runs tasks until none is left, claiming from the front or the back; false when one of them panicked.
    fn work(&self, from_back: bool) -> bool {
        let mut ok = true;
        loop {
            let Some(i) = self.claim(from_back) else {
                return ok;
            };
            // SAFETY: `task` points to the caller's closure, alive until the caller returns from `Pool::run`, which
            // waits for every visitor (and runs its own tasks) first; the closure is `Sync`.
            let task = unsafe { &*self.task };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| task(i))) {
                self.panicked.store(true, Ordering::Relaxed);
                self.payload
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(payload);
                ok = false;
            }
        }
    }
}

/// A published job, as the pool's list holds it.
#[derive(Clone, Copy)]
struct JobRef(*const Job);
// SAFETY: a `JobRef` is only dereferenced by a worker that registered as a visitor under the pool's lock, while
// the job is in the list; the caller keeps the job alive until the list no longer holds it and no visitor is left.
// `Job`'s own fields are atomics, a `Sync` closure and a `Thread` handle, all safe to share.
unsafe impl Send for JobRef {}

struct State {
    jobs: Vec<JobRef>,
    sleepers: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Bumped whenever a job is published or a compute token returned: what spinning workers watch.
    epoch: AtomicU64,
    /// Compute tokens left (the pool's thread count when nothing computes).
    tokens: AtomicUsize,
}

thread_local! {
    /// Whether this thread holds a compute token (of any pool): an op called from inside a task computes with it.
    static HOLDS_TOKEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How long a thread that waits for a token (or for a task) sleeps between checks once it stopped spinning.
const WAIT_SLICE_US: u64 = 50;

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a compute token if one is left.
    fn try_acquire(&self) -> bool {
        let mut left = self.tokens.load(Ordering::Relaxed);
        while left > 0 {
            match self
                .tokens
                .compare_exchange_weak(left, left - 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => {
                    HOLDS_TOKEN.with(|h| h.set(true));
                    return true;
                }
                Err(now) => left = now,
            }
        }
        false
    }

    /// Takes a compute token, waiting for one.
    fn acquire(&self) {
        while !self.try_acquire() {
            if !spin_until(|| self.tokens.load(Ordering::Relaxed) > 0) {
                std::thread::park_timeout(Duration::from_micros(WAIT_SLICE_US));
            }
        }
    }

    /// Returns a token and wakes a sleeping worker if some job has tasks left for it.
    fn release(&self) {
        HOLDS_TOKEN.with(|h| h.set(false));
        self.tokens.fetch_add(1, Ordering::Release);
        self.epoch.fetch_add(1, Ordering::Release);
        // Under the lock, so a worker deciding to sleep either sees the token or is counted as a sleeper here.
        let state = self.lock();
        if state.sleepers > 0 && open(&state) {
            self.wake.notify_one();
        }
    }

    /// Takes the first job with tasks left, registered as its visitor.
    fn take(state: &State) -> Option<JobRef> {
        state.jobs.iter().copied().find(|j| {
            // SAFETY: jobs in the list are alive (see `JobRef`); we hold the lock.
            let job = unsafe { &*j.0 };
            if job.open() {
                job.visitors.fetch_add(1, Ordering::Relaxed);
                true
            } else {
                false
            }
        })
    }
}

/// Whether some published job has tasks left.
fn open(state: &State) -> bool {
    state.jobs.iter().any(|j| {
        // SAFETY: jobs in the list are alive (see `JobRef`); the caller holds the lock `state` came from.
        let job = unsafe { &*j.0 };
        job.open()
    })
}

/// Leaves a job as its visitor: the last access of a worker to it.
fn leave(job: JobRef) {
    // SAFETY: we registered as a visitor, so the job is alive until our decrement below.
    let job = unsafe { &*job.0 };
    let owner = job.owner.clone();
    if job.visitors.fetch_sub(1, Ordering::AcqRel) == 1 {
        owner.unpark();
    }
}

fn worker(shared: Arc<Shared>) {
    loop {
        let seen = shared.epoch.load(Ordering::Acquire);
        if shared.try_acquire() {
            let job = Shared::take(&shared.lock());
            if let Some(job) = job {
                // SAFETY: registered as a visitor by `take`.
                unsafe { &*job.0 }.work(true);
                leave(job);
                shared.release();
                continue;
            }
            // Nothing to do: give the token back quietly.
            HOLDS_TOKEN.with(|h| h.set(false));
            shared.tokens.fetch_add(1, Ordering::Release);
        }
        if spin_until(|| shared.epoch.load(Ordering::Acquire) != seen) {
            continue;
        }
        let mut state = shared.lock();
        loop {
            if state.shutdown {
                return;
            }
            if open(&state) && shared.tokens.load(Ordering::Acquire) > 0 {
                break;
            }
            state.sleepers += 1;
            // The timeout only bounds a wake-up this logic would miss; none is known.
            state = shared
                .wake
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.sleepers -= 1;
        }
    }
}

/// Spins (then yields) for up to [`SPIN_US`] until `done()`; returns whether it became true.
fn spin_until(done: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if done() {
            return true;
        }
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
        } else {
            if start.elapsed() > Duration::from_micros(SPIN_US) {
                return false;
            }
            std::thread::yield_now();
        }
    }
}

/// A pool of `threads − 1` workers; the thread that calls [`Pool::run`] is the last one.
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    /// A pool computing on `threads` threads (clamped to 1..=[`THREADS_MAX`]): `threads − 1` workers are spawned
    /// (fewer if the system refuses; the caller still computes everything then).
    fn new(threads: usize) -> Pool {
        let threads = threads.clamp(1, THREADS_MAX);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                jobs: Vec::with_capacity(THREADS_MAX),
                sleepers: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
            tokens: AtomicUsize::new(threads),
        });
        let workers: Vec<JoinHandle<()>> = (1..threads)
            .map_while(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("baton-cpu-{i}"))
                    .spawn(move || worker(shared))
                    .ok()
            })
            .collect();
        // As many tokens as threads could actually be started.
        shared.tokens.store(workers.len() + 1, Ordering::Release);
        Pool {
            shared,
            threads: workers.len() + 1,
            workers,
        }
    }

    /// Threads that compute an op: the workers and the caller.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(i)` for every `i in 0..count`, each once, on the caller and the workers; returns when all have
    /// finished. A panicking task is re-raised here after the others finished.
    fn run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        // A thread already computing (an op called from inside a task) goes on with its token.
        let nested = HOLDS_TOKEN.with(|h| h.get());
        if count <= 1 || self.workers.is_empty() {
            if nested {
                (0..count).for_each(task);
            } else {
                self.shared.acquire();
                let result = catch_unwind(AssertUnwindSafe(|| (0..count).for_each(task)));
                self.shared.release();
                if let Err(payload) = result {
                    resume_unwind(payload);
                }
            }
            return;
        }
        assert!(u32::try_from(count).is_ok(), "an op of {count} tasks: at most 2^32 − 1");
        // SAFETY: only the lifetime is changed; this function does not return (or unwind) before no worker can
        // reach the job any more: it is removed from the list below and every visitor has left.
        let task: &(dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task) };
        let job = Job {
            task,
            span: AtomicU64::new(pack_span(0, count)),
            visitors: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            payload: Mutex::new(None),
            owner: std::thread::current(),
        };
        let me = JobRef(&job);
        {
            let mut state = self.shared.lock();
            state.jobs.push(me);
            self.shared.epoch.fetch_add(1, Ordering::Release);
            for _ in 0..state.sleepers.min(count - 1) {
                self.shared.wake.notify_one();
            }
        }
        let mut ok = true;
        let tasks_left = || job.open();
        if nested {
            ok = job.work(false);
        }
        while tasks_left() {
            if self.shared.try_acquire() {
                ok &= job.work(false);
                self.shared.release();
            } else if !spin_until(|| !tasks_left() || self.shared.tokens.load(Ordering::Relaxed) > 0) {
                std::thread::park_timeout(Duration::from_micros(WAIT_SLICE_US));
            }
        }
        self.shared.lock().jobs.retain(|j| !std::ptr::eq(j.0, me.0));
        // No worker can find the job now; wait for those that did.
        while job.visitors.load(Ordering::Acquire) != 0 {
            if !spin_until(|| job.visitors.load(Ordering::Acquire) == 0) {
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
        if !ok || job.panicked.load(Ordering::Relaxed) {
            let payload = job.payload.lock().unwrap_or_else(PoisonError::into_inner).take();
            resume_unwind(payload.unwrap_or_else(|| Box::new("a task of a CPU op panicked")));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            // A worker that panicked has nothing left to clean up.
            let _ = w.join();
        }
    }
}

static POOL: OnceLock<RwLock<Arc<Pool>>> = OnceLock::new();

fn cell() -> &'static RwLock<Arc<Pool>> {
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        RwLock::new(Arc::new(Pool::new(n)))
    })
}

thread_local! {
    /// The pool of the stage this thread runs, when stage pools are on and the thread bound itself.
    static BOUND: RefCell<Option<Arc<Pool>>> = const { RefCell::new(None) };
}

/// Threads per stage pool (0: stages share the process pool), and the pools made so far.
static STAGE_POOLS: Mutex<(usize, Vec<Arc<Pool>>)> = Mutex::new((0, Vec::new()));

/// The pool ops run on: the calling thread's stage pool if it bound one, else the process pool.
pub fn pool() -> Arc<Pool> {
    if let Some(p) = BOUND.with(|b| b.borrow().clone()) {
        return p;
    }
    Arc::clone(&cell().read().unwrap_or_else(PoisonError::into_inner))
}

/// Gives every pipeline stage a pool of `threads` threads of its own (1..=[`THREADS_MAX`]), or, with 0, makes
/// the stages share the process pool again (the default). Takes effect for stage threads that bind after it.
pub fn set_stage_threads(threads: usize) {
    let mut pools = STAGE_POOLS.lock().unwrap_or_else(PoisonError::into_inner);
    let threads = threads.min(THREADS_MAX);
    if pools.0 != threads {
        *pools = (threads, Vec::new());
    }
}

/// Threads per stage pool (0: shared).
pub fn stage_threads() -> usize {
    STAGE_POOLS.lock().unwrap_or_else(PoisonError::into_inner).0
}

/// Binds the calling thread to stage `stage`'s pool when stage pools are on (made on first use), else to none.
pub fn bind_stage(stage: usize) {
    let pool = {
        let mut pools = STAGE_POOLS.lock().unwrap_or_else(PoisonError::into_inner);
        let threads = pools.0;
        if threads == 0 {
            None
        } else {
            while pools.1.len() <= stage {
                pools.1.push(Arc::new(Pool::new(threads)));
            }
            Some(Arc::clone(&pools.1[stage]))
        }
    };
    BOUND.with(|b| *b.borrow_mut() = pool);
}

/// Sets the number of compute threads (1..=[`THREADS_MAX`]; default: the machine's cores). Ops already running
/// finish on the old pool. Results do not depend on it.
pub fn set_threads(threads: usize) {
    let new = Arc::new(Pool::new(threads));
    let old = std::mem::replace(&mut *cell().write().unwrap_or_else(PoisonError::into_inner), new);
    // Joins the old workers here (outside the lock) unless an op still runs on the old pool.
    drop(old);
}

/// The number of compute threads.
pub fn threads() -> usize {
    pool().threads()
}

/// Rows per chunk for `rows` rows of `row_cost` work units each: at most [`CHUNKS_MAX`] chunks, each at least
/// `min_rows` rows and worth at least `MIN_CHUNK_WORK` units, rounded up to a multiple of `align` rows. A
/// function of the sizes only.
pub fn chunk_rows(rows: usize, row_cost: usize, min_rows: usize, align: usize) -> usize {
    /// Work below which a chunk is not worth a task (about 10 µs of arithmetic).
    const MIN_CHUNK_WORK: usize = 32 * 1024;
    let align = align.max(1);
    let by_count = rows.div_ceil(CHUNKS_MAX);
    let by_work = MIN_CHUNK_WORK.div_ceil(row_cost.max(1));
    let rows_per = by_count.max(by_work).max(min_rows).min(rows).max(1);
    rows_per.div_ceil(align) * align
}

/// A mutable slice cut into chunks of `per` elements (the last may be shorter) that pool tasks take by index.
pub struct Chunks<'a, T> {
    ptr: *mut T,
    len: usize,
    per: usize,
    _slice: PhantomData<&'a mut [T]>,
}

// SAFETY: a `Chunks` only hands out disjoint chunks of a slice it borrows mutably, one per task (see `get`); it is
// the `&mut [T]` split across threads, which needs `T: Send`.
unsafe impl<T: Send> Sync for Chunks<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Chunks<'_, T> {}

impl<'a, T> Chunks<'a, T> {
    /// `slice` in chunks of `per` elements (`per` ≥ 1).
    pub fn new(slice: &'a mut [T], per: usize) -> Self {
        Chunks {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            per: per.max(1),
            _slice: PhantomData,
        }
    }

    /// Number of chunks.
    pub fn count(&self) -> usize {
        self.len.div_ceil(self.per)
    }

    /// Chunk `i` (`i < count()`).
    ///
    /// # Safety
    /// No other reference to chunk `i` may be alive: call it once per index from the task [`for_each`] runs for
    /// that index, and keep the chunk within that task.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self, i: usize) -> &mut [T] {
        assert!(i < self.count(), "chunk {i} of {}", self.count());
        let start = i * self.per;
        let len = self.per.min(self.len - start);
        // SAFETY: `start + len ≤ self.len`, inside the borrowed slice; the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Calls `f(start, chunk)` for consecutive chunks of `per` elements of `out` (the last one may be shorter), where
/// `start` is the chunk's offset; chunks run in parallel on the pool.
pub fn for_chunks<T: Send>(out: &mut [T], per: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let per = per.max(1);
    if out.len() <= per {
        f(0, out);
        return;
    }
    let chunks = Chunks::new(out, per);
    // SAFETY: `for_each` runs each index once, and the chunk stays inside its task.
    for_each(chunks.count(), |i| f(i * per, unsafe { chunks.get(i) }));
}

/// Runs `f(i)` for `i in 0..count` on the pool (each index once, any order, any thread, the caller included): for
/// work whose outputs the caller has already split.
pub fn for_each(count: usize, f: impl Fn(usize) + Sync) {
    if count <= 1 {
        (0..count).for_each(f);
        return;
    }
    pool().run(count, &f);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller runs a prefix of an op's tasks and the workers the rest (the affinity that keeps an op's first
    /// rows on the caller's core from one op to the next); every task runs once.
    #[test]
    fn the_caller_runs_the_front_and_the_workers_the_back() {
        let _pool = crate::fast::testutil::pool_lock();
        set_threads(3);
        let caller = std::thread::current().id();
        for _ in 0..50 {
            let ran: Vec<Mutex<Option<bool>>> = (0..64).map(|_| Mutex::new(None)).collect();
            for_each(64, |i| {
                // Slow enough that the workers join in.
                std::thread::sleep(Duration::from_micros(20));
                let by_caller = std::thread::current().id() == caller;
                assert!(
                    ran[i].lock().expect("lock").replace(by_caller).is_none(),
                    "task {i} ran twice"
                );
            });
            let by_caller: Vec<bool> = ran.iter().map(|r| r.lock().expect("lock").expect("ran")).collect();
            // (On a loaded machine the workers may take every task before the caller gets to one: prefix 0.)
            let prefix = by_caller.iter().take_while(|&&c| c).count();
            assert!(
                by_caller[prefix..].iter().all(|&c| !c),
                "the caller's tasks are not a prefix: {by_caller:?}"
            );
        }
        set_threads(2);
    }

    #[test]
    fn a_bound_stage_runs_on_its_own_pool() {
        let _pool = crate::fast::testutil::pool_lock();
        set_threads(2);
        set_stage_threads(1);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                bind_stage(0);
                (threads(), Arc::as_ptr(&pool()) as usize)
            });
            let b = s.spawn(|| {
                bind_stage(1);
                (threads(), Arc::as_ptr(&pool()) as usize)
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!((a.0, b.0), (1, 1), "one thread per stage");
        assert_ne!(a.1, b.1, "a pool per stage");
        set_stage_threads(0);
        let shared = std::thread::spawn(|| {
            bind_stage(0);
            threads()
        })
        .join()
        .unwrap();
        assert_eq!(shared, 2, "back to the shared pool");
    }

    /// Several threads calling ops on one shared pool at once (as pipeline stages do): every index of every op
    /// runs exactly once, whichever thread takes it.
    #[test]
    fn concurrent_callers_run_every_index_once() {
        use std::sync::atomic::AtomicU32;
        let _pool = crate::fast::testutil::pool_lock();
        for threads in [1, 2, 3] {
            set_threads(threads);
            std::thread::scope(|s| {
                for caller in 0..4usize {
                    s.spawn(move || {
                        for round in 0..50usize {
                            let count = 1 + (caller * 7 + round * 13) % 40;
                            let hits: Vec<AtomicU32> = (0..count).map(|_| AtomicU32::new(0)).collect();
                            for_each(count, |i| {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            });
                            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{threads} threads");
                        }
                    });
                }
            });
        }
    }

    /// A task may itself run an op on the pool (the inner op's caller is a pool thread or the outer caller).
    #[test]
    fn nested_ops_complete() {
        let _pool = crate::fast::testutil::pool_lock();
        set_threads(3);
        let mut out = vec![0usize; 8 * 100];
        for_chunks(&mut out, 100, |start, chunk| {
            for_chunks(chunk, 7, |inner, c| {
                c.iter_mut().enumerate().for_each(|(j, x)| *x = start + inner + j)
            });
        });
        assert!(out.iter().enumerate().all(|(i, &x)| x == i));
    }

    /// A panicking task re-raises its panic in the caller once every other task has finished, and the pool keeps
    /// working afterwards.
    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others() {
        let _pool = crate::fast::testutil::pool_lock();
        set_threads(2);
        let done = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            for_each(64, |i| {
                if i == 17 {
                    panic!("task 17 fails");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        let payload = result.expect_err("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"task 17 fails"));
        assert_eq!(
            done.load(Ordering::Relaxed),
            63,
            "every other task ran before the caller returned"
        );
        let hits = AtomicUsize::new(0);
        for_each(10, |_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn chunks_depend_on_the_sizes_only_and_cover_every_row() {
        assert_eq!(chunk_rows(1024, 128, 1, 1), 256); // by work: 32 Ki / 128
        assert_eq!(chunk_rows(1024, 100_000, 1, 1), 64); // by count: 1024 / 16
        assert_eq!(chunk_rows(10, 1, 1, 4), 12); // one chunk, aligned
        let _pool = crate::fast::testutil::pool_lock();
        for n in [1, 3] {
            set_threads(n);
            let mut out = vec![0u32; 1000 * 3];
            for_chunks(&mut out, 7 * 3, |start, chunk| {
                for (i, row) in (start / 3..).zip(chunk.chunks_mut(3)) {
                    row.fill(i as u32);
                }
            });
            assert!(out.chunks(3).enumerate().all(|(i, r)| r.iter().all(|&x| x == i as u32)));
            assert_eq!(threads(), n);
        }
    }
}
