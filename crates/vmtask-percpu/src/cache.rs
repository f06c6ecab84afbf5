//! `CpuCache`: per-CPU bounded stacks of pointers, the fast path of a
//! magazine allocator (the kernel's per-CPU stack cache, SLUB's sheaves).
//!
//! Each possible CPU owns an array of `capacity` pointer slots and a length.
//! [`CpuCache::pop`] and [`CpuCache::push`] work on the current CPU's array;
//! they fail (empty, full, or contended) instead of waiting, and the caller
//! moves whole batches to and from its shared depot on its slow path.
//! [`CpuCache::drain`] empties any CPU's array, for depot refills, trimming
//! and teardown.
//!
//! Protocol (baseline): each CPU's array sits in a [`PerCpu`] slot behind its
//! try-lock. A push or pop holds the lock for a few instructions; a thread
//! that finds the lock taken reports failure, so nothing ever waits on a
//! preempted holder.

use std::ptr::NonNull;

use crate::slots::PerCpu;

struct Magazine {
    items: Box<[*mut u8]>,
    len: usize,
}

/// Per-CPU bounded LIFO stacks of non-null pointers.
///
/// The cache stores pointers and never dereferences them; what they point
/// to, and who owns it, is the caller's business.
pub struct CpuCache {
    cpus: PerCpu<Magazine>,
    capacity: usize,
}

// SAFETY: the cache only stores pointer values (it never dereferences them);
// its internal state is protected by the per-CPU locks.
unsafe impl Send for CpuCache {}
// SAFETY: as above.
unsafe impl Sync for CpuCache {}

impl CpuCache {
    /// A cache holding up to `capacity` pointers per CPU.
    ///
    /// # Panics
    /// If `capacity` is 0.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "CpuCache capacity must be at least 1");
        CpuCache {
            cpus: PerCpu::new(|_| Magazine {
                items: vec![std::ptr::null_mut(); capacity].into_boxed_slice(),
                len: 0,
            }),
            capacity,
        }
    }

    /// Pointers each CPU can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number of CPU arrays (the possible CPUs).
    pub fn cpus(&self) -> usize {
        self.cpus.len()
    }

    /// Takes the most recently pushed pointer from the current CPU's array.
    /// `None` if it is empty or another thread is using it right now.
    #[inline]
    pub fn pop(&self) -> Option<NonNull<u8>> {
        let mut mag = self.cpus.try_current().ok()?;
        if mag.len == 0 {
            return None;
        }
        mag.len -= 1;
        let item = mag.items[mag.len];
        // Every stored item came from a NonNull in `push`.
        NonNull::new(item)
    }

    /// Puts `item` on the current CPU's array; gives it back if the array is
    /// full or another thread is using it right now.
    #[inline]
    pub fn push(&self, item: NonNull<u8>) -> Result<(), NonNull<u8>> {
        let Ok(mut mag) = self.cpus.try_current() else {
            return Err(item);
        };
        if mag.len == mag.items.len() {
            return Err(item);
        }
        let len = mag.len;
        mag.items[len] = item.as_ptr();
        mag.len = len + 1;
        Ok(())
    }

    /// Moves up to `max` pointers from `cpu`'s array (most recent first)
    /// into `out`, waiting for the array if another thread holds it.
    /// Returns how many moved.
    ///
    /// # Panics
    /// If `cpu >= self.cpus()`.
    pub fn drain(&self, cpu: usize, max: usize, out: &mut Vec<NonNull<u8>>) -> usize {
        let mut mag = self.cpus.lock(cpu);
        let take = max.min(mag.len);
        for _ in 0..take {
            mag.len -= 1;
            let item = mag.items[mag.len];
            out.extend(NonNull::new(item));
        }
        take
    }

    /// The number of pointers in `cpu`'s array now (a snapshot).
    ///
    /// # Panics
    /// If `cpu >= self.cpus()`.
    pub fn len(&self, cpu: usize) -> usize {
        self.cpus.lock(cpu).len
    }

    /// Pointers held over all CPUs now (a snapshot).
    pub fn total_len(&self) -> usize {
        (0..self.cpus()).map(|cpu| self.len(cpu)).sum()
    }
}

impl std::fmt::Debug for CpuCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuCache")
            .field("capacity", &self.capacity)
            .field("cpus", &self.cpus())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    fn ptr(n: usize) -> NonNull<u8> {
        NonNull::new((n * 16) as *mut u8).unwrap()
    }

    #[test]
    fn pop_returns_last_push_on_same_cpu() {
        let cache = CpuCache::new(4);
        crate::pin_current_thread(crate::cpu()).unwrap();
        cache.push(ptr(1)).unwrap();
        cache.push(ptr(2)).unwrap();
        assert_eq!(cache.pop(), Some(ptr(2)));
        assert_eq!(cache.pop(), Some(ptr(1)));
        assert_eq!(cache.pop(), None);
    }

    #[test]
    fn push_refuses_when_full() {
        let cache = CpuCache::new(2);
        std::thread::spawn(move || {
            crate::pin_current_thread(0).unwrap();
            cache.push(ptr(1)).unwrap();
            cache.push(ptr(2)).unwrap();
            assert_eq!(cache.push(ptr(3)), Err(ptr(3)));
            let mut out = Vec::new();
            assert_eq!(cache.drain(0, 10, &mut out), 2);
            assert_eq!(out, vec![ptr(2), ptr(1)]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn no_pointer_is_lost_or_duplicated_across_threads() {
        let cache = Arc::new(CpuCache::new(8));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    // Each thread owns a range of pointers; whatever it pops it
                    // keeps, whatever it cannot push it keeps.
                    let mut held: Vec<NonNull<u8>> = (0..64).map(|i| ptr(1 + t * 1000 + i)).collect();
                    for round in 0..20_000 {
                        if round % 2 == 0 {
                            if let Some(p) = held.pop() {
                                if let Err(p) = cache.push(p) {
                                    held.push(p);
                                }
                            }
                        } else if let Some(p) = cache.pop() {
                            held.push(p);
                        }
                    }
                    held.into_iter().map(|p| p.as_ptr() as usize).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<usize> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let mut drained = Vec::new();
        for cpu in 0..cache.cpus() {
            cache.drain(cpu, usize::MAX, &mut drained);
        }
        all.extend(drained.iter().map(|p| p.as_ptr() as usize));
        let unique: HashSet<_> = all.iter().copied().collect();
        assert_eq!(all.len(), 4 * 64, "pointers lost or duplicated");
        assert_eq!(unique.len(), 4 * 64);
    }
}
