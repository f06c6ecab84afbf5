//! `PerCpu<T>`: one cache-padded slot per possible CPU, each behind a
//! try-lock.
//!
//! Protocol: a slot's `locked` flag is taken with an acquire swap and given
//! back with a release store, so everything done to the value under one
//! holder happens-before the next holder's access. The fast path
//! ([`PerCpu::try_current`]) never waits: a taken flag means another thread
//! is on that CPU's slot right now (it was preempted there, or we migrated),
//! and the caller is better served by its shared slow path than by spinning.
//! Drains that must reach a particular slot ([`PerCpu::lock`]) spin with
//! backoff; holders only keep a slot for a bounded amount of work.

use crossbeam_utils::{Backoff, CachePadded};
use std::cell::UnsafeCell;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cpu::{cpu, possible_cpus};

struct Slot<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

/// One `T` per possible CPU, each on its own cache line(s).
///
/// Shared between threads only for `T: Send` (each value is reached by one
/// thread at a time, as in a `Mutex`):
///
/// ```compile_fail,E0277
/// fn sync<T: Sync>(_: &T) {}
/// sync(&vmtask_percpu::PerCpu::new(|_| std::rc::Rc::new(0u64)));
/// ```
pub struct PerCpu<T> {
    slots: Box<[CachePadded<Slot<T>>]>,
}

// SAFETY: a slot's value is reached only through a SlotGuard, which holds the
// slot's lock; so at most one thread touches a `T` at a time (`T: Send`
// suffices, as for `Mutex<T>`).
unsafe impl<T: Send> Sync for PerCpu<T> {}
// SAFETY: moving the container moves the `T`s, which are `Send`.
unsafe impl<T: Send> Send for PerCpu<T> {}

/// The current CPU's slot was held by another thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contended {
    /// The CPU whose slot was busy.
    pub cpu: usize,
}

impl fmt::Display for Contended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "per-CPU slot of CPU {} is held by another thread",
            self.cpu
        )
    }
}

impl std::error::Error for Contended {}

impl<T> PerCpu<T> {
    /// Builds one value per possible CPU with `init(cpu)`.
    pub fn new(mut init: impl FnMut(usize) -> T) -> Self {
        let slots = (0..possible_cpus())
            .map(|cpu| {
                CachePadded::new(Slot {
                    locked: AtomicBool::new(false),
                    value: UnsafeCell::new(init(cpu)),
                })
            })
            .collect();
        PerCpu { slots }
    }

    /// The number of slots (the possible CPUs).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Exclusive use of the current CPU's slot, or [`Contended`] if another
    /// thread holds it. Never waits.
    #[inline]
    pub fn try_current(&self) -> Result<SlotGuard<'_, T>, Contended> {
        let cpu = cpu();
        self.try_lock(cpu).ok_or(Contended { cpu })
    }

    /// Exclusive use of `cpu`'s slot if it is free now.
    ///
    /// # Panics
    /// If `cpu >= self.len()`.
    #[inline]
    pub fn try_lock(&self, cpu: usize) -> Option<SlotGuard<'_, T>> {
        let Some(slot) = self.slots.get(cpu) else {
            out_of_range(cpu, self.slots.len())
        };
        // Test before the read-modify-write: a busy slot costs a shared load,
        // not a cache-line steal.
        if slot.locked.load(Ordering::Relaxed) || slot.locked.swap(true, Ordering::Acquire) {
            return None;
        }
        Some(SlotGuard { slot, cpu })
    }

    /// Exclusive use of `cpu`'s slot, spinning (with backoff, then
    /// yielding) until its holder lets go. For drains and statistics.
    ///
    /// # Deadlocks
    /// Like [`std::sync::Mutex::lock`], it waits forever if the calling
    /// thread itself holds the slot (a [`SlotGuard`] of it still alive),
    /// and so from a signal handler whose interrupted code holds it. Use
    /// [`try_lock`](Self::try_lock) where that can happen.
    ///
    /// # Panics
    /// If `cpu >= self.len()`.
    pub fn lock(&self, cpu: usize) -> SlotGuard<'_, T> {
        let backoff = Backoff::new();
        loop {
            if let Some(guard) = self.try_lock(cpu) {
                return guard;
            }
            if backoff.is_completed() {
                std::thread::yield_now();
            } else {
                backoff.snooze();
            }
        }
    }

    /// Mutable access to every slot, without locking (`&mut self` proves
    /// nobody else holds one).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().map(|slot| slot.value.get_mut())
    }
}

impl<T: fmt::Debug> fmt::Debug for PerCpu<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerCpu")
            .field("cpus", &self.len())
            .finish_non_exhaustive()
    }
}

/// Exclusive access to one CPU's slot; unlocks on drop.
///
/// It stays on the thread that took it (`!Send`), like a `MutexGuard`:
///
/// ```compile_fail,E0277
/// let slots = vmtask_percpu::PerCpu::new(|_| 0u64);
/// let guard = slots.lock(0);
/// std::thread::scope(|s| {
///     s.spawn(move || drop(guard));
/// });
/// ```
pub struct SlotGuard<'a, T> {
    slot: &'a Slot<T>,
    cpu: usize,
}

impl<T> SlotGuard<'_, T> {
    /// The CPU whose slot this is.
    pub fn cpu(&self) -> usize {
        self.cpu
    }
}

impl<T> Deref for SlotGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the slot's lock, so no other reference to
        // the value exists.
        unsafe { &*self.slot.value.get() }
    }
}

impl<T> DerefMut for SlotGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only use.
        unsafe { &mut *self.slot.value.get() }
    }
}

impl<T> Drop for SlotGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.slot.locked.store(false, Ordering::Release);
    }
}

/// The panic of an index past the slots, naming the misuse.
#[cold]
#[inline(never)]
#[track_caller]
fn out_of_range(cpu: usize, len: usize) -> ! {
    panic!("PerCpu: CPU {cpu} out of range: there are {len} slots, one per possible CPU")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    #[should_panic(expected = "PerCpu: CPU 999 out of range")]
    fn a_cpu_past_the_slots_panics_naming_it() {
        let slots = PerCpu::new(|cpu| cpu);
        let _ = slots.lock(999);
    }

    #[test]
    fn current_slot_is_exclusive() {
        let slots = PerCpu::new(|cpu| cpu);
        let cpu;
        {
            let guard = slots.try_current().expect("uncontended");
            cpu = guard.cpu();
            assert_eq!(*guard, cpu);
            assert!(slots.try_lock(cpu).is_none(), "slot must be held");
        }
        assert!(slots.try_lock(cpu).is_some(), "slot must be free again");
    }

    #[test]
    fn counts_are_not_lost_across_threads() {
        let slots = Arc::new(PerCpu::new(|_| 0u64));
        let fallback = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let slots = slots.clone();
                let fallback = fallback.clone();
                std::thread::spawn(move || {
                    for _ in 0..100_000 {
                        match slots.try_current() {
                            Ok(mut s) => *s += 1,
                            Err(_) => {
                                fallback.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = (0..slots.len()).map(|c| *slots.lock(c)).sum();
        assert_eq!(total + fallback.load(Ordering::Relaxed), 400_000);
    }
}
