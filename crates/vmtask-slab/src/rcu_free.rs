//! `free_rcu`: frees that wait for a grace period and still feed the cache.
//!
//! Freeing each object with its own RCU callback is what made the seeds'
//! per-CPU cache useless: the frees arrive as one large batch per grace
//! period, long after the allocations that needed them, and flood the cache.
//! Here deferred frees collect in a per-CPU *RCU magazine*. A full one goes
//! through a single `call_intrusive` (its `RcuHead` is embedded, so nothing
//! is allocated) and, after the grace period, lands in the depot whole:
//! a full magazine, ready for the next CPU whose magazine runs empty.
//!
//! Protocol: each CPU's RCU magazine is a second `CpuCache` (the same
//! restartable-sequence push as the allocation fast path, capacity one
//! magazine). `free_rcu` pushes the object onto it; a push that finds it full
//! (or busy) drains it into a spare magazine, adds the object, and submits
//! that magazine. The objects in a CPU's RCU magazine are freed but not yet
//! submitted: nobody allocates them, and only `flush_rcu` (and the cache's
//! `Drop`) drain them otherwise. The callback runs on the RCU thread, after
//! every reader that might have seen the objects has finished, and gives
//! the magazine to the depot (`Magazines::put_returned`), which is safe from
//! any thread. The cache's `Drop` waits (`vmtask_rcu::barrier`) for
//! magazines in flight, since the callback reaches the cache through a raw
//! pointer; where it cannot wait (inside a read-side section, or on the
//! callback thread itself) it leaks the cache instead of freeing it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmtask_percpu::CpuCache;
use vmtask_rcu::RcuHead;

use crate::boxed::SlabBox;
use crate::cache::{Shared, SlabCache};
use crate::magazine::{CpuMagazines, Magazine};
use crate::stats::Event;

/// The per-CPU RCU magazines of one cache.
pub(crate) struct RcuMagazines {
    pending: CpuCache,
    in_flight: AtomicU64,
    /// Objects in the magazines in flight.
    in_flight_objects: AtomicU64,
    used: AtomicBool,
}

impl RcuMagazines {
    /// Around `pending`, a cache of `magazine_size` pointers per CPU.
    pub(crate) fn new(pending: CpuCache) -> Self {
        RcuMagazines {
            pending,
            in_flight: AtomicU64::new(0),
            in_flight_objects: AtomicU64::new(0),
            used: AtomicBool::new(false),
        }
    }

    /// Magazines submitted and not yet back.
    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Objects freed with `free_rcu` whose grace period has not ended (or
    /// not begun: in a CPU's RCU magazine).
    pub(crate) fn waiting_objects(&self) -> u64 {
        self.pending.total_len() as u64 + self.in_flight_objects.load(Ordering::Relaxed)
    }

    /// Whether `free_rcu` was ever called (then dropping the cache waits
    /// for RCU).
    pub(crate) fn used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }
}

impl<T> SlabCache<T> {
    /// Frees `object` after a grace period: readers inside
    /// `vmtask_rcu::read_lock` that found it may keep reading it until they
    /// leave. The object joins the current CPU's RCU magazine; a full
    /// magazine passes one grace period and returns to the depot whole.
    ///
    /// Until its magazine fills, an object waits; [`flush_rcu`](Self::flush_rcu)
    /// sends partly filled magazines on their way.
    ///
    /// ```
    /// use vmtask_slab::{Config, SlabCache};
    ///
    /// let cache = SlabCache::new(Config::new("nodes"), || [0u64; 8])?;
    /// let node = cache.alloc()?;
    /// // ... unlink `node` from a structure readers walk under read_lock ...
    /// cache.free_rcu(node);
    /// assert_eq!(cache.stats().rcu_objects_waiting, 1);
    /// cache.flush_rcu(); // send the partly filled magazine on its way
    /// vmtask_rcu::barrier(); // its grace period has passed
    /// assert_eq!(cache.stats().rcu_objects_waiting, 0);
    /// # Ok::<(), vmtask_slab::SlabError>(())
    /// ```
    ///
    /// # Panics
    /// If `object` belongs to another cache.
    pub fn free_rcu(&self, object: SlabBox<'_, T>) {
        let cache = SlabBox::cache(&object);
        assert!(
            std::ptr::eq(cache, self),
            "object of slab cache `{}` passed to free_rcu of cache `{}`",
            cache.name(),
            self.name()
        );
        let (_, slot) = SlabBox::into_slot(object);
        let shared = &*self.shared;
        if !shared.rcu.used.load(Ordering::Relaxed) {
            shared.rcu.used.store(true, Ordering::Relaxed);
        }
        shared.magazines.counters.bump(Event::RcuFree);
        if let Err(object) = shared.rcu.pending.push(slot.cast()) {
            let mut magazine = shared.magazines.empty_magazine();
            // Pops, not `drain`: no membarrier on this path (see
            // `CpuMagazines::drain_current`).
            shared
                .rcu
                .pending
                .drain_current(shared.magazines.size(), &mut magazine.objects);
            if let Err(object) = shared.rcu.pending.push(object) {
                // Busy (being flushed): the object travels with the drained
                // ones; a magazine may hold one object more than its size.
                magazine.objects.push(object);
            }
            self.submit(magazine);
        }
    }

    /// Sends every partly filled RCU magazine through its grace period now;
    /// after a following `vmtask_rcu::barrier()` all objects freed with
    /// `free_rcu` before this call are back in the cache.
    pub fn flush_rcu(&self) {
        let shared = &*self.shared;
        if !shared.rcu.used() {
            return;
        }
        for cpu in 0..shared.rcu.pending.cpus() {
            let mut magazine = shared.magazines.empty_magazine();
            shared
                .rcu
                .pending
                .drain(cpu, usize::MAX, &mut magazine.objects);
            if magazine.objects.is_empty() {
                shared.magazines.put_returned(magazine, &shared.slabs);
            } else {
                self.submit(magazine);
            }
        }
    }

    fn submit(&self, magazine: Box<Magazine>) {
        let shared: &Shared<T> = &self.shared;
        shared.rcu.in_flight.fetch_add(1, Ordering::Relaxed);
        shared
            .rcu
            .in_flight_objects
            .fetch_add(magazine.objects.len() as u64, Ordering::Relaxed);
        shared.magazines.counters.add(Event::RcuSubmit, 1);
        let head = magazine.into_head((shared as *const Shared<T>).cast());
        // SAFETY: `head` is the embedded head of a magazine we own and give
        // up here; `rcu_magazine_done::<T>` matches its owner's type.
        unsafe { vmtask_rcu::call_intrusive(head, rcu_magazine_done::<T>) };
    }
}

/// The RCU callback of a magazine: into the depot.
///
/// # Safety
/// `head` comes from `Magazine::into_head` with a `Shared<T>` owner that is
/// still alive (the cache's `Drop` waits for callbacks with `barrier`, and
/// leaks the owner where it cannot).
unsafe fn rcu_magazine_done<T>(head: *mut RcuHead) {
    // SAFETY: given up by `submit` and handed back once by RCU.
    let (magazine, owner) = unsafe { Magazine::from_head(head) };
    // SAFETY: the owner is freed only after `barrier` in its `Drop`
    // returned, which waits for this callback; a `Drop` that cannot call
    // `barrier` (or whose `barrier` panics) leaks it instead.
    let shared = unsafe { &*owner.cast::<Shared<T>>() };
    let objects = magazine.objects.len() as u64;
    shared.magazines.put_returned(magazine, &shared.slabs);
    shared
        .rcu
        .in_flight_objects
        .fetch_sub(objects, Ordering::Relaxed);
    // Last touch of `shared`.
    shared.rcu.in_flight.fetch_sub(1, Ordering::Relaxed);
}
