//! The CPU backend's scratch cache: buffers that ops and layers drop go back to free lists by length, and the next
//! request of that length takes one, so the steady state of a training step allocates nothing (every step asks for
//! the same lengths in the same pattern). Free buffers are bounded by [`SCRATCH_FREE_BYTES_MAX`]; a buffer that
//! would go past it is freed instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::pool::{Home, Homed};

/// Most bytes of free buffers the cache keeps.
pub const SCRATCH_FREE_BYTES_MAX: usize = 4 << 30;

/// The cache's counters (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchStats {
    /// Requests served by a free buffer.
    pub hits: u64,
    /// Requests that allocated.
    pub allocations: u64,
    /// Bytes of free buffers held now.
    pub free_bytes: usize,
}

#[derive(Default)]
struct Lists {
    free: BTreeMap<usize, Vec<Vec<f32>>>,
    stats: ScratchStats,
}

/// Free lists by length (see the module docs).
#[derive(Default)]
pub struct Scratch {
    lists: Mutex<Lists>,
}

impl Scratch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lists> {
        // Every update is a single statement, so a poisoned lock still holds consistent lists.
        self.lists.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A buffer of `len` elements with unspecified contents (a reused one, or fresh zeros).
    pub fn take(self: &Arc<Self>, len: usize) -> Homed<Vec<f32>> {
        let reused = {
            let mut l = self.lock();
            let found = l.free.get_mut(&len).and_then(Vec::pop);
            match &found {
                Some(_) => {
                    l.stats.hits += 1;
                    l.stats.free_bytes -= len * 4;
                }
                None => l.stats.allocations += 1,
            }
            found
        };
        let value = reused.unwrap_or_else(|| vec![0.0; len]);
        Homed::in_pool(value, Arc::clone(self) as Arc<dyn Home<Vec<f32>>>)
    }

    /// The counters now.
    pub fn stats(&self) -> ScratchStats {
        self.lock().stats
    }
}

impl Home<Vec<f32>> for Scratch {
    fn give_back(&self, value: Vec<f32>) {
        let bytes = value.len() * 4;
        let surplus = {
            let mut l = self.lock();
            if value.is_empty() || l.stats.free_bytes + bytes > SCRATCH_FREE_BYTES_MAX {
                Some(value)
            } else {
                l.stats.free_bytes += bytes;
                l.free.entry(value.len()).or_default().push(value);
                None
            }
        };
        drop(surplus); // outside the lock
    }
    fn release(&self) {}
}

/// The process's scratch cache (shared by every CPU stage).
pub fn scratch() -> &'static Arc<Scratch> {
    static SCRATCH: OnceLock<Arc<Scratch>> = OnceLock::new();
    SCRATCH.get_or_init(|| Arc::new(Scratch::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_buffers_serve_the_next_request_of_their_length() {
        let cache = Arc::new(Scratch::default());
        let a = cache.take(1000);
        let ptr = a.as_ptr();
        drop(a);
        let b = cache.take(1000);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer was reused");
        let c = cache.take(999);
        let s = cache.stats();
        assert_eq!((s.hits, s.allocations), (1, 2));
        drop((b, c));
        assert_eq!(cache.stats().free_bytes, (1000 + 999) * 4);
    }
}
