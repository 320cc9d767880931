//! The process-wide thread pool every fast op runs on, and the shape-based partition of work.
//!
//! One pool for the process, shared by all stage threads: a stage thread that calls an op hands its chunks to
//! the pool and waits, so however many stages run at once, at most [`threads`] threads compute.

use std::sync::{Arc, OnceLock, RwLock};

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

/// The pool ops run on.
pub fn pool() -> Arc<rayon::ThreadPool> {
    Arc::clone(&cell().read().unwrap_or_else(std::sync::PoisonError::into_inner))
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
