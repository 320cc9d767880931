//! The process-wide thread pool every fast op runs on, and the shape-based partition of work.
//!
//! One pool for the process, shared by all stage threads: a stage thread that calls an op hands its chunks to
//! the pool and waits, so however many stages run at once, at most [`threads`] threads compute. Optionally
//! ([`set_stage_threads`]) each pipeline stage gets a pool of its own instead, so stages behave like separate
//! devices (a waiting stage's threads do not serve another); a stage thread binds itself with [`bind_stage`].
//! Work is cut by shape only, so results are the same either way.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rayon::prelude::*;

/// Most threads the pool may have.
pub const THREADS_MAX: usize = 256;

/// Most chunks one op is cut into: the parallelism one op can use (more threads help when stages run at once).
pub const CHUNKS_MAX: usize = 16;

static POOL: OnceLock<RwLock<Arc<rayon::ThreadPool>>> = OnceLock::new();

fn build(threads: usize) -> Arc<rayon::ThreadPool> {
    let threads = threads.clamp(1, THREADS_MAX);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("baton-cpu-{i}"))
        .build();
    match pool {
        Ok(p) => Arc::new(p),
        // Spawning worker threads failed (resource limits): one thread still computes everything, in the caller.
        Err(_) => Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .use_current_thread()
                .build()
                .unwrap_or_else(|e| panic!("cannot build even a one-thread pool: {e}")),
        ),
    }
}

fn cell() -> &'static RwLock<Arc<rayon::ThreadPool>> {
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        RwLock::new(build(n))
    })
}

thread_local! {
    /// The pool of the stage this thread runs, when stage pools are on and the thread bound itself.
    static BOUND: RefCell<Option<Arc<rayon::ThreadPool>>> = const { RefCell::new(None) };
}

/// Threads per stage pool (0: stages share the process pool), and the pools made so far.
static STAGE_POOLS: Mutex<(usize, Vec<Arc<rayon::ThreadPool>>)> = Mutex::new((0, Vec::new()));

/// The pool ops run on: the calling thread's stage pool if it bound one, else the process pool.
pub fn pool() -> Arc<rayon::ThreadPool> {
    if let Some(p) = BOUND.with(|b| b.borrow().clone()) {
        return p;
    }
    Arc::clone(&cell().read().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Gives every pipeline stage a pool of `threads` threads of its own (1..=[`THREADS_MAX`]), or, with 0, makes
/// the stages share the process pool again (the default). Takes effect for stage threads that bind after it.
pub fn set_stage_threads(threads: usize) {
    let mut pools = STAGE_POOLS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let threads = threads.min(THREADS_MAX);
    if pools.0 != threads {
        *pools = (threads, Vec::new());
    }
}

/// Threads per stage pool (0: shared).
pub fn stage_threads() -> usize {
    STAGE_POOLS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0
}

/// Binds the calling thread to stage `stage`'s pool when stage pools are on (made on first use), else to none.
pub fn bind_stage(stage: usize) {
    let pool = {
        let mut pools = STAGE_POOLS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let threads = pools.0;
        if threads == 0 {
            None
        } else {
            while pools.1.len() <= stage {
                pools.1.push(build(threads));
            }
            Some(Arc::clone(&pools.1[stage]))
        }
    };
    BOUND.with(|b| *b.borrow_mut() = pool);
}

/// Sets the number of compute threads (1..=[`THREADS_MAX`]; default: the machine's cores). Ops already running
/// finish on the old pool. Results do not depend on it.
pub fn set_threads(threads: usize) {
    let new = build(threads);
    *cell().write().unwrap_or_else(std::sync::PoisonError::into_inner) = new;
}

/// The number of compute threads.
pub fn threads() -> usize {
    pool().current_num_threads()
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

/// Calls `f(start, chunk)` for consecutive chunks of `per` elements of `out` (the last one may be shorter), where
/// `start` is the chunk's offset; chunks run in parallel on the pool.
pub fn for_chunks<T: Send>(out: &mut [T], per: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let per = per.max(1);
    if out.len() <= per {
        f(0, out);
        return;
    }
    pool().install(|| {
        out.par_chunks_mut(per)
            .enumerate()
            .for_each(|(i, chunk)| f(i * per, chunk))
    });
}

/// Runs `f(i)` for `i in 0..count` on the pool (each index once, any order): for work whose outputs the caller
/// has already split.
pub fn for_each(count: usize, f: impl Fn(usize) + Sync + Send) {
    if count <= 1 {
        (0..count).for_each(f);
        return;
    }
    pool().install(|| (0..count).into_par_iter().for_each(f));
}

#[cfg(test)]
mod tests {
    use super::*;

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
