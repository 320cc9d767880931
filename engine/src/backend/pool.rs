//! Per-stage pools of receive buffers: the memory that activations and gradients from other stages land in.
//!
//! A stage's pool is sized once from the schedule ([`baton_schedules::peak_receive_buffers`]: the most messages
//! that can be alive on the stage at once in any execution). A transfer into the stage **leases** a buffer from
//! the pool; the buffer is a [`Homed`] value that goes back to the pool when it is dropped (by the layer that
//! consumed it, whenever that is), instead of being freed. So after the first step every receive is served from
//! memory the pool already owns: no allocation in the steady state, on any backend.
//!
//! Invariants (asserted): `free ≤ owned`; `owned ≤ capacity` unless the capacity was lowered while buffers were
//! lent (the surplus is freed as it comes back); a lease that finds the pool empty and at capacity is a **miss**
//! (served by a plain allocation, counted, never an error): a correct capacity makes misses impossible, which
//! the tests assert.
//!
//! Stream order on a GPU: a returned buffer may still be read by queued kernels of the consuming stage's compute
//! stream. The next lease writes it from a copy on that stage's copy stream, which first waits on the buffer's
//! read events (cudarc's events on buffers, recorded by every kernel that read it), so reuse never races a
//! pending read; the buffer was allocated on the copy stream, so its memory is never another stream's.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// A value a pool can hold: leases are matched on its key (storage kind and length).
pub trait Pooled: Send + Sync + 'static {
    /// What must match for a pooled value to serve a lease.
    type Key: Copy + Eq + fmt::Debug + Send;
    /// This value's key.
    fn key(&self) -> Self::Key;
}

impl Pooled for Vec<f32> {
    type Key = usize;
    fn key(&self) -> usize {
        self.len()
    }
}

/// A pool's counters (cumulative since it was made).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// Buffers the pool may own (from the schedule).
    pub capacity: usize,
    /// Buffers the pool owns now (free or lent).
    pub owned: usize,
    /// Of those, free now.
    pub free: usize,
    /// Leases served by a free buffer.
    pub hits: u64,
    /// Leases that allocated a new buffer for the pool (below capacity: warm-up).
    pub grown: u64,
    /// Leases that freed a free buffer of the wrong shape to allocate one of the right shape.
    pub reshaped: u64,
    /// Leases that found the pool empty and at capacity (a plain allocation, not pooled).
    pub misses: u64,
}

impl PoolStats {
    /// Leases that allocated device or host memory (anything but a hit).
    pub fn allocations(&self) -> u64 {
        self.grown + self.reshaped + self.misses
    }
}

struct State<T: Pooled> {
    free: Vec<T>,
    stats: PoolStats,
}

/// A pool of receive buffers for one stage (see the module docs). Shared by `Arc` with the buffers it lent.
pub struct RecvPool<T: Pooled> {
    state: Mutex<State<T>>,
}

impl<T: Pooled> fmt::Debug for RecvPool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecvPool({:?})", self.stats())
    }
}

impl<T: Pooled> Default for RecvPool<T> {
    fn default() -> Self {
        RecvPool {
            state: Mutex::new(State {
                free: Vec::new(),
                stats: PoolStats::default(),
            }),
        }
    }
}

impl<T: Pooled> RecvPool<T> {
    /// An empty pool of capacity 0 (every lease a miss until [`RecvPool::set_capacity`]).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty pool that may own `capacity` buffers (filled on the first lease).
    pub fn with_capacity(capacity: usize) -> Arc<Self> {
        let pool = Self::new();
        pool.set_capacity(capacity);
        pool
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while the lock is held leaves the counters and the free list consistent (every update is one
        // statement), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets how many buffers the pool may own. Lowering it frees surplus free buffers now and lent ones as they
    /// come back.
    pub fn set_capacity(&self, capacity: usize) {
        let surplus = {
            let mut st = self.lock();
            st.stats.capacity = capacity;
            let extra = st.stats.owned.saturating_sub(capacity).min(st.free.len());
            st.stats.owned -= extra;
            let keep = st.free.len() - extra;
            st.free.split_off(keep)
        };
        drop(surplus); // outside the lock: freeing device memory may take a while
    }

    /// The counters now.
    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        PoolStats {
            free: st.free.len(),
            ..st.stats
        }
    }

    /// A buffer of shape `key`: a free one of the pool; else, below capacity, one `alloc` makes, and the pool
    /// fills itself up to capacity with buffers of the same shape at the same time (so the first lease of a
    /// shape is the only one that allocates, whatever the timing of later ones); else one replacing a free
    /// buffer of another shape; else (empty and at capacity) a plain unpooled buffer, counted as a miss.
    ///
    /// # Errors
    /// Whatever `alloc` returns; the pool then owns only what it allocated before the error.
    pub fn lease<E>(self: &Arc<Self>, key: T::Key, mut alloc: impl FnMut() -> Result<T, E>) -> Result<Homed<T>, E> {
        let mut stale = None;
        let value = {
            let mut st = self.lock();
            debug_assert!(
                st.free.len() <= st.stats.owned,
                "free {} > owned {}",
                st.free.len(),
                st.stats.owned
            );
            if let Some(i) = st.free.iter().position(|b| b.key() == key) {
                st.stats.hits += 1;
                Some(st.free.swap_remove(i))
            } else if st.stats.owned < st.stats.capacity {
                // Warm-up: allocate under the lock, so no concurrent lease sees a half-filled pool.
                let value = alloc()?;
                st.stats.owned += 1;
                st.stats.grown += 1;
                while st.stats.owned < st.stats.capacity {
                    match alloc() {
                        Ok(spare) => {
                            st.free.push(spare);
                            st.stats.owned += 1;
                            st.stats.grown += 1;
                        }
                        Err(e) => {
                            st.free.push(value);
                            return Err(e);
                        }
                    }
                }
                Some(value)
            } else if let Some(old) = st.free.pop() {
                st.stats.reshaped += 1;
                stale = Some(old);
                let value = alloc();
                if value.is_err() {
                    st.stats.owned -= 1; // the stale buffer is gone either way
                }
                Some(value?)
            } else {
                st.stats.misses += 1;
                None
            }
        };
        drop(stale);
        match value {
            Some(value) => Ok(Homed::in_pool(value, Arc::clone(self) as Arc<dyn Home<T>>)),
            None => alloc().map(Homed::new),
        }
    }

    /// Takes back a lent buffer (called by [`Homed`]'s drop).
    fn give_back(&self, value: T) {
        let surplus = {
            let mut st = self.lock();
            if st.stats.owned > st.stats.capacity {
                st.stats.owned -= 1;
                Some(value)
            } else {
                st.free.push(value);
                debug_assert!(st.free.len() <= st.stats.owned, "more buffers came back than were lent");
                None
            }
        };
        drop(surplus);
    }

    /// Forgets a lent buffer that left the pool for good ([`Homed::into_inner`]).
    fn release(&self) {
        let mut st = self.lock();
        st.stats.owned = st.stats.owned.saturating_sub(1);
    }
}

/// Where a [`Homed`] buffer goes back to when it is dropped: a stage's [`RecvPool`], or the CPU backend's scratch
/// cache ([`super::scratch`]).
pub trait Home<T>: Send + Sync {
    /// Takes back a lent buffer.
    fn give_back(&self, value: T);
    /// Forgets a lent buffer that left for good ([`Homed::into_inner`]).
    fn release(&self);
}

impl<T: Pooled> Home<T> for RecvPool<T> {
    fn give_back(&self, value: T) {
        RecvPool::give_back(self, value)
    }
    fn release(&self) {
        RecvPool::release(self)
    }
}

/// A buffer that may belong to a pool: it derefs to the buffer, and goes back to its [`Home`] (if it has one)
/// when dropped.
pub struct Homed<T: Pooled> {
    value: ManuallyDrop<T>,
    home: Option<Arc<dyn Home<T>>>,
}

impl<T: Pooled> Homed<T> {
    /// A buffer of no pool (freed when dropped).
    pub fn new(value: T) -> Self {
        Homed {
            value: ManuallyDrop::new(value),
            home: None,
        }
    }

    /// A buffer that goes back to `home` when dropped.
    pub fn in_pool(value: T, home: Arc<dyn Home<T>>) -> Self {
        Homed {
            value: ManuallyDrop::new(value),
            home: Some(home),
        }
    }

    /// True when the buffer goes back to a pool when dropped.
    pub fn is_pooled(&self) -> bool {
        self.home.is_some()
    }

    /// The buffer itself, leaving its pool for good (the pool no longer counts it as owned).
    pub fn into_inner(mut self) -> T {
        if let Some(home) = self.home.take() {
            home.release();
        }
        // SAFETY: `self.value` is taken exactly once: `self` is forgotten right after, so `Drop` never sees it.
        let value = unsafe { ManuallyDrop::take(&mut self.value) };
        std::mem::forget(self);
        value
    }
}

impl<T: Pooled> From<T> for Homed<T> {
    fn from(value: T) -> Self {
        Homed::new(value)
    }
}

impl<T: Pooled> Deref for Homed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: Pooled> DerefMut for Homed<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: Pooled + fmt::Debug> fmt::Debug for Homed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T: Pooled> Drop for Homed<T> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and nothing reads `self.value` afterwards.
        let value = unsafe { ManuallyDrop::take(&mut self.value) };
        match self.home.take() {
            Some(home) => home.give_back(value),
            None => drop(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(len: usize) -> impl FnMut() -> Result<Vec<f32>, String> {
        move || Ok(vec![0.0; len])
    }

    #[test]
    fn grows_to_capacity_then_reuses() {
        let pool = RecvPool::<Vec<f32>>::with_capacity(2);
        let a = pool.lease(4, alloc(4)).unwrap();
        // The first lease filled the pool to capacity.
        assert_eq!((pool.stats().owned, pool.stats().free, pool.stats().grown), (2, 1, 2));
        let b = pool.lease(4, alloc(4)).unwrap();
        assert!(a.is_pooled() && b.is_pooled());
        let a_ptr = a.as_ptr();
        drop(a);
        let c = pool.lease(4, alloc(4)).unwrap();
        assert_eq!(c.as_ptr(), a_ptr, "the returned buffer is reused");
        let s = pool.stats();
        assert_eq!((s.owned, s.free, s.grown, s.hits, s.misses), (2, 0, 2, 2, 0));
        // At capacity with nothing free: a miss, served by an unpooled buffer.
        let d = pool.lease(4, alloc(4)).unwrap();
        assert!(!d.is_pooled());
        assert_eq!(pool.stats().misses, 1);
        drop((b, c, d));
        let s = pool.stats();
        assert_eq!((s.owned, s.free), (2, 2));
    }

    #[test]
    fn wrong_shape_is_replaced_and_lowering_capacity_frees() {
        let pool = RecvPool::<Vec<f32>>::with_capacity(1);
        drop(pool.lease(4, alloc(4)).unwrap());
        let big = pool.lease(8, alloc(8)).unwrap();
        assert_eq!(big.len(), 8);
        let s = pool.stats();
        assert_eq!((s.owned, s.reshaped, s.free), (1, 1, 0));
        pool.set_capacity(0);
        assert_eq!(pool.stats().owned, 1, "a lent buffer is freed when it comes back");
        drop(big);
        let s = pool.stats();
        assert_eq!((s.owned, s.free), (0, 0));
    }

    #[test]
    fn failed_allocation_is_not_counted_as_owned() {
        let pool = RecvPool::<Vec<f32>>::with_capacity(1);
        let e = pool.lease(4, || Err::<Vec<f32>, _>("out of memory")).unwrap_err();
        assert_eq!(e, "out of memory");
        assert_eq!(pool.stats().owned, 0);
        // Capacity 3, the third allocation fails: the pool keeps the one spare it made.
        pool.set_capacity(3);
        let mut n = 0;
        let e = pool
            .lease(4, || {
                n += 1;
                if n == 3 {
                    Err("out of memory")
                } else {
                    Ok(vec![0.0; 4])
                }
            })
            .unwrap_err();
        assert_eq!(e, "out of memory");
        let s = pool.stats();
        assert_eq!(
            (s.owned, s.free),
            (2, 2),
            "the leased buffer and one spare, both free after the error"
        );
        pool.set_capacity(1);
        let kept = pool.lease(4, alloc(4)).unwrap().into_inner();
        assert_eq!(kept.len(), 4);
        assert_eq!(pool.stats().owned, 0, "into_inner leaves the pool");
    }
}
