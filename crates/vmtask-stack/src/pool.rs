//! `StackPool`: per-CPU magazines in front of a shared depot in front of the
//! arenas.
//!
//! Allocation: take the calling thread's parked stack (the last one it
//! freed to this pool, see [`crate::tally`]); else pop the current CPU's
//! magazine ([`CpuCache`]); on a miss take up to a magazine's worth of
//! stacks from the depot, keep one and refill the local magazine with the
//! rest; failing that take back the stacks parked on threads that have
//! exited (warm; the ones not handed out go to the depot); failing that
//! reuse a slot whose memory was given back; failing that carve a fresh
//! slot; failing that (every slot carved, or the kernel refused a new
//! one) take a free stack from any CPU's magazine, or one parked on a live
//! thread (with a `membarrier`, see [`crate::park`]); failing that,
//! [`StackError::Exhausted`] (or the kernel's refusal). Stacks
//! that another thread holds between two of these places at that moment
//! (a magazine on its way to the depot, a depot batch on its way to a
//! magazine, a trim) are waited for, for at most a second: each such
//! in-transit section is counted (`Transit`), on slow paths only. The
//! search is not a snapshot: a stack that another thread's fast path
//! moves, with no section, into a place already searched (it pops on one
//! CPU, migrates, and pushes on another) can be missed. Free: park
//! the stack on the calling thread if its place is empty, else push on the
//! current CPU's magazine; when that is full, the whole magazine goes to
//! the depot, so stacks freed on another CPU than the one that allocated
//! them flow back through the depot instead of piling up.
//!
//! Why a parked stack in front of the per-CPU magazine: a thread that
//! creates and ends one coroutine at a time reuses the same stack with a
//! pointer load and store (about 1 ns), where even an rseq magazine pop
//! and push cost 3–5 ns: more than 20% of a whole corosensei coroutine
//! round trip. One stack per thread and pool is the most that can sit
//! outside the magazines; the thread finds it whichever pool it used last,
//! `trim` takes back every thread's, the pool's drop the calling thread's,
//! an exited thread's is taken back before any carve, and a live thread's
//! when every slot is carved.
//!
//! Memory: the fast paths make no system call, and a fresh slot costs
//! nothing until touched. With `populate_top` (off by default), a freshly
//! carved or released slot gets its top page, which its user writes first,
//! with `MADV_POPULATE_WRITE` before `alloc` returns it (with guard
//! markers, fresh slots eight at a time): cheaper than the page fault it
//! replaces (the dynamic kernel stacks RFC, seed 003,
//! proposed mapping a new thread's top page only). A magazine on its way to the
//! depot has each stack's pages below `keep_resident` released
//! (`MADV_DONTNEED`), one batch per magazine; when the depot is full
//! (`depot_size`), further stacks lose all their pages and wait on the
//! `released` list for reuse. [`StackPool::trim`] does the same for every
//! cached stack, on demand.
//!
//! Locks: the depot is a spin lock held for a few pointer moves, never
//! across a system call; the arenas sit behind a mutex taken only to carve.
//! A `Stack` points at its pool without counting references (a counted
//! reference would cost two atomic read-modify-writes per stack), so the
//! free path's last access to the pool is the publishing store: the park
//! in the thread's record, the magazine push, or the depot lock's release.
//! A pool dropped while stacks are out is orphaned rather than unmapped
//! under a running stack: its memory still comes back, each stack's as it
//! is freed (`free_orphaned`), and the free of its last stack destroys it
//! (or, after the one race described on [`StackPool`], the next pool
//! creation or drop: `reap_orphans`).

use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crossbeam_utils::Backoff;
use vmtask_percpu::CpuCache;

use crate::arena::Arenas;
use crate::config::{Config, GuardMode, Layout};
use crate::error::StackError;
use crate::stack::Stack;
use crate::tally::{self, Tallies};
use crate::transit::{Transit, Transits};
use crate::{fork, overflow, sys};

/// A test-and-test-and-set lock whose release is a single store, so a
/// thread that publishes into the depot touches the pool no later than that
/// store (see the module docs).
struct SpinLock<T> {
    locked: AtomicBool,
    value: std::cell::UnsafeCell<T>,
}

// SAFETY: the value is only reached through a guard, which holds the lock.
unsafe impl<T: Send> Sync for SpinLock<T> {}

struct SpinGuard<'a, T>(&'a SpinLock<T>);

impl<T> SpinLock<T> {
    fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: std::cell::UnsafeCell::new(value),
        }
    }

    fn lock(&self) -> SpinGuard<'_, T> {
        let backoff = Backoff::new();
        while self.locked.load(Ordering::Relaxed) || self.locked.swap(true, Ordering::Acquire) {
            if backoff.is_completed() {
                // The holder may be preempted; let it run.
                std::thread::yield_now();
            } else {
                backoff.snooze();
            }
        }
        SpinGuard(self)
    }
}

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock.
        unsafe { &*self.0.value.get() }
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard holds the lock, and `&mut self` makes this the
        // only use.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.0.locked.store(false, Ordering::Release);
    }
}

/// Free stacks shared by all CPUs, by their tops.
struct Depot {
    /// Warm stacks (top `keep_resident` bytes may be resident), at most
    /// `depot_size`.
    stacks: Vec<NonNull<u8>>,
    /// Slots whose memory was given back entirely.
    released: Vec<NonNull<u8>>,
    /// The drop of an orphaned pool has added its last stacks to
    /// `released` and touches the pool no more: only from then on may a
    /// free that completes the list destroy the pool.
    sealed: bool,
}

impl Depot {
    /// Grows both lists, before a carve, to hold `carved` stacks (the
    /// depot at most `depot_size`): every list a free puts a stack on then
    /// has room, so no free grows one (its other allocations are a
    /// magazine's worth of scratch space). A free cannot fail, and an
    /// allocation that fails in one aborts the process: it did when a pool
    /// had taken the last mapping `vm.max_map_count` allows and the released
    /// list, 8 bytes a stack, had to grow (review finding). Here, a failure
    /// is the carve's error.
    fn make_room(&mut self, carved: usize, depot_size: usize) -> Result<(), StackError> {
        let grow = |list: &mut Vec<NonNull<u8>>, want: usize| {
            list.try_reserve(want.saturating_sub(list.len()))
                .map_err(|_| StackError::MapFailed {
                    what: "grow the pool's lists of free stacks (malloc)",
                    bytes: want.saturating_mul(std::mem::size_of::<NonNull<u8>>()),
                    errno: libc::ENOMEM,
                })
        };
        grow(&mut self.released, carved)?;
        grow(&mut self.stacks, carved.min(depot_size))
    }
}

// SAFETY: the pointers are addresses of free stacks that the depot owns;
// it never dereferences them.
unsafe impl Send for Depot {}

#[derive(Default)]
struct Counters {
    depot_hits: AtomicU64,
    depot_transfers: AtomicU64,
    released_reuses: AtomicU64,
    failures: AtomicU64,
    stacks_released: AtomicU64,
    pages_trimmed: AtomicU64,
    /// In-transit sections (see `take_any_free_after_transits`).
    transits: Transits,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// `PoolInner::free_id` of a pool whose frees take the cold path: an id
/// no pool has ([`Tallies`] count up from 1).
const COLD_FREE: u64 = u64::MAX;

/// An orphaned pool, as registered in [`ORPHANS`].
struct Orphan(NonNull<PoolInner>);

// SAFETY: a pointer to a `Sync` pool, used only under `ORPHANS`' lock,
// which `PoolInner::destroy` takes to unregister the pool before it frees
// it.
unsafe impl Send for Orphan {}

/// Orphaned pools not yet destroyed. A free racing a pool's drop can
/// publish its stack (park it, or push it on a magazine) after the drop's
/// last sweep, with no later free of that pool to find it; the pool would
/// then wait for that stack for good. So later pool creations and drops
/// sweep these pools again (`reap_orphans`), and destroy one whose
/// released list that completes. Taken only inside a fork section; before
/// a pool's depot lock when both are held.
static ORPHANS: Mutex<Vec<Orphan>> = Mutex::new(Vec::new());

/// Sweeps every registered orphaned pool that holds a cached or parked
/// stack (the only ones a racing free can have left behind), and destroys
/// those this completes.
fn reap_orphans() {
    let _section = fork::section();
    let mut orphans = ORPHANS.lock().unwrap_or_else(|e| e.into_inner());
    let mut destroy = Vec::new();
    orphans.retain(|orphan| {
        // SAFETY: registered, so not destroyed: `destroy` unregisters under
        // this lock first.
        let inner = unsafe { orphan.0.as_ref() };
        let cached = (0..inner.cache.cpus()).any(|cpu| inner.cache.len(cpu) > 0);
        if !cached && inner.hits.parked() == 0 {
            return true;
        }
        let mut free = Vec::new();
        inner.sweep_orphans(&mut free);
        if free.is_empty() || !inner.release_orphans(free, false) {
            return true;
        }
        destroy.push(orphan.0);
        false
    });
    drop(orphans);
    for pool in destroy {
        // This sweep completed the sealed released list: every carved stack
        // is back, no `Stack` and no free can reach the pool, the drop is
        // done with it (the seal), and no other sweep can reach it.
        // SAFETY: as just said; and it is no longer registered.
        unsafe { PoolInner::destroy_unregistered(pool) };
    }
}

pub(crate) struct PoolInner {
    pub(crate) layout: Layout,
    markers: bool,
    cache: CpuCache,
    /// Cache hits, per thread (see [`crate::tally`]).
    hits: Tallies,
    depot: SpinLock<Depot>,
    arenas: Mutex<Arenas>,
    counters: Counters,
    /// The pool's tally id (`Tallies::id`) while frees take the usual
    /// path, or [`COLD_FREE`] once they take the cold one (`free_cold`):
    /// `zero_on_reuse`, or the pool is orphaned. The free path loads it
    /// once, and compares it with the thread's cached pool id: a match
    /// parks the stack, so the common free checks for the cold path and
    /// for the thread's cache with one compare.
    free_id: AtomicU64,
    /// The `StackPool` was dropped while stacks were out (see its `Drop`):
    /// each stack that comes back gives back all its memory, and the one
    /// that completes the released list destroys the pool.
    orphaned: AtomicBool,
    /// Slots carved when the pool was orphaned (published by `orphaned`).
    orphan_carved: AtomicUsize,
}

impl PoolInner {
    /// The fast path: a pop from this CPU's magazine and a plain increment
    /// of this thread's hit tally. A thread reaches the slow paths, which
    /// prepare it for overflow reports, before its first stack: a miss goes
    /// to `alloc_slow`, and a hit on a pool the thread has not counted
    /// before to `first_hit`.
    #[inline(always)]
    fn alloc(&self) -> Result<NonNull<u8>, StackError> {
        if let Some(top) = self.hits.unpark() {
            return Ok(top);
        }
        match self.cache.pop() {
            Some(top) if self.hits.hit() => Ok(top),
            Some(top) => {
                self.first_hit();
                Ok(top)
            }
            None => self.alloc_slow(),
        }
    }

    /// A cache hit on a thread whose tally cache holds another pool (or
    /// none yet).
    #[cold]
    fn first_hit(&self) {
        overflow::prepare_thread_once();
        let _section = fork::section();
        self.hits.hit_slow();
    }

    #[cold]
    fn alloc_slow(&self) -> Result<NonNull<u8>, StackError> {
        overflow::prepare_thread_once();
        // Every path that takes a lock of the pool, drains a magazine or
        // opens a transit runs in a section (see `fork.rs`); preparing the
        // thread does none of those (it has fork-safe locks of its own) and
        // calls into libc, which could wait on a fork: outside.
        let _section = fork::section();
        // The thread may have a stack of this pool parked while its cache
        // pointed at another pool: make this pool the cached one, and take
        // that stack.
        if self.hits.select() {
            if let Some(top) = self.hits.unpark() {
                return Ok(top);
            }
        }
        // No allocation unless the depot has stacks: a carve should cost
        // its guard and nothing else.
        let (mut batch, transit) = {
            let mut depot = self.depot.lock();
            let n = depot.stacks.len();
            let take = n.min(self.layout.cache_size);
            // The stacks beyond the one handed out travel to the magazine.
            let transit = (take > 1).then(|| self.counters.transits.begin());
            (depot.stacks.split_off(n - take), transit)
        };
        if let Some(top) = batch.pop() {
            bump(&self.counters.depot_hits, 1);
            bump(&self.counters.depot_transfers, 1);
            let leftover: Vec<_> = batch
                .into_iter()
                .filter_map(|p| self.cache.push(p).err())
                .collect();
            if !leftover.is_empty() {
                // The depot may have filled since: `stash` keeps its bound.
                self.stash(leftover, false, transit);
            } else {
                drop(transit);
            }
            return Ok(top);
        }
        // Warm stacks parked on threads that have exited, before cold
        // released slots; those not handed out go to the depot as any
        // stack does, their pages below `keep_resident` released.
        let (mut orphans, transit) = self.hits.reclaim_exited(|| self.counters.transits.begin());
        if let Some(top) = orphans.pop() {
            if !orphans.is_empty() {
                self.to_depot(orphans, transit);
            } else {
                drop(transit);
            }
            bump(&self.counters.depot_hits, 1);
            return Ok(top);
        }
        drop(transit);
        let released = self.depot.lock().released.pop();
        if let Some(top) = released {
            bump(&self.counters.released_reuses, 1);
            self.populate_top(top);
            return Ok(top);
        }
        let carved = {
            let mut depot = self.depot.lock();
            let mut arenas = self.arenas.lock().unwrap_or_else(|e| e.into_inner());
            match depot.make_room(arenas.carved() + 1, self.layout.depot_size) {
                Ok(()) => arenas.carve(&self.layout, self.markers),
                Err(e) => Err(e),
            }
        };
        match carved {
            Ok((top, populate)) => {
                if let Some(pages) = populate {
                    sys::populate_tops(&pages);
                }
                Ok(NonNull::new(top as *mut u8).expect("a slot's top is never null"))
            }
            // Every slot carved, or the kernel refused a new one (no
            // address space or mappings left): a free stack elsewhere in
            // the pool (another CPU's magazine, parked on a live thread)
            // still serves, rather than an error while the pool has one.
            Err(e) => match self.take_any_free_after_transits() {
                Some(top) => Ok(top),
                None => {
                    bump(&self.counters.failures, 1);
                    Err(e)
                }
            },
        }
    }

    /// `take_any_free`, and if it finds nothing while an in-transit
    /// section runs ([`Transit`]: a `trim`, a magazine on its way to the
    /// depot, and the like, which hold free stacks outside the pool's
    /// lists, some while they release pages with system calls), waits for
    /// it and looks again; also looks again after any section ends. Stacks
    /// in transit must not make a pool with a free stack report itself
    /// exhausted. Sections that never stop overlapping could keep it
    /// waiting on a pool that is really full: it gives up after
    /// `TRANSIT_WAIT`, long enough for a trim that releases the pages of many
    /// stacks on a busy machine (50 ms was not, under the test suite's
    /// load). So an alloc from a full pool may wait that long while other
    /// threads trim without pause. (A full pool's other exhausted allocs
    /// do not hold it up: a look begins a section only where a length
    /// hint or a parked place shows a stack, and abandons it if it then
    /// takes nothing.)
    #[cold]
    fn take_any_free_after_transits(&self) -> Option<NonNull<u8>> {
        const TRANSIT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
        let mut deadline = None;
        self.counters.transits.search(
            || self.take_any_free(),
            || {
                let deadline =
                    *deadline.get_or_insert_with(|| std::time::Instant::now() + TRANSIT_WAIT);
                std::time::Instant::now() >= deadline
            },
        )
    }

    /// Every slot is carved, or the kernel refused a new one: before
    /// reporting the pool exhausted (or the kernel's refusal), takes a
    /// free stack wherever one is, in the other CPUs' magazines (stacks
    /// freed on another CPU wait there), or in the depot and the released
    /// list, which other threads may have filled since this one looked.
    /// The magazines' other stacks go to the depot. Last, the stacks
    /// parked on live threads (one per thread at most), taken from them
    /// with a `membarrier` (see `park`). What it takes and does not hand
    /// out travels in a [`Transit`], begun only when there is something
    /// to take.
    #[cold]
    fn take_any_free(&self) -> Option<NonNull<u8>> {
        let mut free = Vec::new();
        let mut transit = None;
        for cpu in 0..self.cache.cpus() {
            if self.cache.len(cpu) != 0 {
                transit.get_or_insert_with(|| self.counters.transits.begin());
                self.cache.drain(cpu, usize::MAX, &mut free);
            }
        }
        if let Some(top) = free.pop() {
            if !free.is_empty() {
                self.to_depot(free, transit);
            } else {
                drop(transit);
            }
            bump(&self.counters.depot_hits, 1);
            return Some(top);
        }
        if let Some(transit) = transit {
            transit.abandon();
        }
        let (stack, released) = {
            let mut depot = self.depot.lock();
            match depot.stacks.pop() {
                Some(top) => (Some(top), None),
                None => (None, depot.released.pop()),
            }
        };
        if let Some(top) = stack {
            bump(&self.counters.depot_hits, 1);
            return Some(top);
        }
        if let Some(top) = released {
            bump(&self.counters.released_reuses, 1);
            self.populate_top(top);
            return Some(top);
        }
        let (mut parked, transit) = self.hits.steal_parked(|| self.counters.transits.begin());
        let Some(top) = parked.pop() else {
            if let Some(transit) = transit {
                transit.abandon();
            }
            return None;
        };
        if !parked.is_empty() {
            self.to_depot(parked, transit);
        } else {
            drop(transit);
        }
        bump(&self.counters.depot_hits, 1);
        Some(top)
    }

    /// `populate_top`: faults in the top page of a released slot, which
    /// its user is about to write, with one system call instead of a page
    /// fault. Outside every lock. (Fresh slots have theirs populated in
    /// batches, see `arena::TopPages`.)
    fn populate_top(&self, top: NonNull<u8>) {
        if self.layout.populate_top {
            let page = sys::page_size();
            sys::populate_hint(top.as_ptr() as usize - page, page);
        }
    }

    /// Frees the stack whose top is `top`. Nothing may use it afterwards.
    /// A raw pointer, not `&self`: the last stack of an orphaned pool
    /// destroys it here.
    ///
    /// # Safety
    /// `pool` is the stack's pool, valid until this call (a `Stack` keeps
    /// its pool alive; see `StackPool`'s `Drop`).
    #[inline]
    pub(crate) unsafe fn free(pool: NonNull<PoolInner>, top: NonNull<u8>) {
        // SAFETY: the caller's contract.
        let this = unsafe { pool.as_ref() };
        let id = this.free_id.load(Ordering::Relaxed);
        // Never parks on a cold pool: no thread caches `COLD_FREE`.
        if tally::park_as(id, top) {
            return;
        }
        // SAFETY: the caller's contract; `this` is not used after.
        if id == COLD_FREE && unsafe { PoolInner::free_cold(pool, top) } {
            return;
        }
        if let Err(top) = this.cache.push(top) {
            // SAFETY: the caller's contract; `this` is not used after.
            unsafe { PoolInner::free_slow_or_destroy(pool, top) };
        }
    }

    /// The cold part of `free`: an orphaned pool takes the stack (true),
    /// and the free that brings its last stack back destroys it; a
    /// `zero_on_reuse` pool clears the stack and parks it (true), or
    /// leaves it to the magazine (false) if the thread's place is taken.
    ///
    /// # Safety
    /// As `free`.
    #[cold]
    #[inline(never)]
    unsafe fn free_cold(pool: NonNull<PoolInner>, top: NonNull<u8>) -> bool {
        // Pairs with the drop's release store of `free_id`, which the
        // caller's relaxed load read: the `orphaned` stored before it is
        // seen below.
        std::sync::atomic::fence(Ordering::Acquire);
        let (last, _section) = {
            // SAFETY: the caller's contract.
            let this = unsafe { pool.as_ref() };
            if !this.orphaned.load(Ordering::Acquire) {
                if this.layout.zero_on_reuse {
                    this.clear(top);
                }
                // The clear is a system call: a drop may have orphaned the
                // pool and swept it meanwhile, and a stack published now
                // would keep it alive (review finding: a third of the
                // `zero_on_reuse` pools raced so were never destroyed).
                if !this.orphaned.load(Ordering::Acquire) {
                    // The usual free of a cleared stack, from its park.
                    return this.hits.park(top);
                }
            }
            // One section from the choice of this free as the destroyer
            // to the destroy: a fork between the two would leave the child
            // a finished pool that no thread of its own destroys (review
            // finding: `reap_orphans` skips it, holding nothing, for good).
            let section = fork::section();
            (this.free_orphaned(top), section)
        };
        #[cfg(all(test, not(loom)))]
        if last {
            tests::chosen_to_destroy();
        }
        if last {
            // SAFETY: every carved stack is back on the released list: no
            // `Stack` and no other free can reach the pool
            // (`release_orphans`), and no reference to it is left here.
            unsafe { PoolInner::destroy(pool) };
        }
        true
    }

    /// `free_slow`, and the pool's destruction if the magazine it handed
    /// over completed an orphaned pool's released list (`stash`).
    ///
    /// # Safety
    /// As `free`.
    #[cold]
    #[inline(never)]
    unsafe fn free_slow_or_destroy(pool: NonNull<PoolInner>, top: NonNull<u8>) {
        // Through the destroy, as in `free_cold`.
        let _section = fork::section();
        // SAFETY: the caller's contract.
        if unsafe { pool.as_ref() }.free_slow(top) {
            // SAFETY: as in `free_cold`.
            unsafe { PoolInner::destroy(pool) };
        }
    }

    /// Unmaps the arenas and frees the pool.
    ///
    /// # Safety
    /// Every carved stack is free, no `Stack` refers to the pool, and no
    /// thread will touch it again; `pool` came from `Box::leak` in `new`.
    unsafe fn destroy(pool: NonNull<PoolInner>) {
        // SAFETY: the caller's contract.
        if unsafe { pool.as_ref() }.orphaned.load(Ordering::Acquire) {
            // Waits out a sweep of `reap_orphans` in progress on it.
            let _section = fork::section();
            ORPHANS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|orphan| orphan.0 != pool);
        }
        // SAFETY: the caller's contract.
        unsafe { PoolInner::destroy_unregistered(pool) };
    }

    /// `destroy` of a pool not in `ORPHANS`.
    ///
    /// # Safety
    /// As `destroy`, and the pool is not registered in `ORPHANS`.
    unsafe fn destroy_unregistered(pool: NonNull<PoolInner>) {
        // SAFETY: the caller's contract.
        let mut inner = unsafe { Box::from_raw(pool.as_ptr()) };
        #[cfg(all(test, not(loom)))]
        tests::DESTROYED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(inner.hits.id());
        let layout = inner.layout.clone();
        let arenas = inner.arenas.get_mut().unwrap_or_else(|e| e.into_inner());
        // SAFETY: no stack of these arenas is in use (the caller's
        // contract).
        unsafe { arenas.unmap_all(&layout) };
    }

    /// A stack that came back after its pool was dropped. Nothing will
    /// allocate from the pool again: the stack gives back all its memory.
    /// So do stacks that a free racing the pool's drop put in a magazine or
    /// parked after the drop had taken them, and the stack this thread
    /// parked if the drop could not take it. Returns true if this completed
    /// the released list (see `release_orphans`).
    fn free_orphaned(&self, top: NonNull<u8>) -> bool {
        let _section = fork::section();
        let mut free = vec![top];
        self.sweep_orphans(&mut free);
        self.release_orphans(free, false)
    }

    /// Adds to `free` the free stacks of an orphaned pool still parked or
    /// cached: this thread's parked stack, exited threads', live threads'
    /// (taken with a membarrier), and the magazines'.
    fn sweep_orphans(&self, free: &mut Vec<NonNull<u8>>) {
        free.extend(self.hits.take_own_parked());
        free.extend(self.hits.reclaim_exited(|| ()).0);
        free.extend(self.hits.steal_parked(|| ()).0);
        for cpu in 0..self.cache.cpus() {
            if self.cache.len(cpu) > 0 {
                self.cache.drain(cpu, usize::MAX, free);
            }
        }
    }

    /// Gives back all the memory of `free` stacks of an orphaned pool and
    /// keeps them on the released list, where nothing takes them again;
    /// `seal` for the pool's drop, whose last access to the pool this is.
    /// Returns true if the caller is to destroy the pool: the list now holds
    /// every carved stack, so no `Stack` is left and every free that
    /// published a stack (the publishing store, a free's last access to
    /// the pool) has been seen to do so, and the drop is done with the pool
    /// (the seal; if the list was complete before it, the drop destroys).
    /// True for one caller at most: the list only grows and is sealed
    /// once, under the depot lock.
    fn release_orphans(&self, free: Vec<NonNull<u8>>, seal: bool) -> bool {
        let whole: Vec<_> = free.iter().map(|&top| self.whole_range(top)).collect();
        let _ = sys::release_many(&whole);
        let mut depot = self.depot.lock();
        let had = depot.released.len();
        depot.released.extend(free);
        self.completes(&mut depot, had, seal)
    }

    /// See `release_orphans`; `had`: the list's length before the caller's
    /// stacks were added.
    fn completes(&self, depot: &mut Depot, had: usize, seal: bool) -> bool {
        let carved = self.orphan_carved.load(Ordering::Relaxed);
        if seal {
            depot.sealed = true;
            depot.released.len() == carved
        } else {
            depot.sealed && had < carved && depot.released.len() == carved
        }
    }

    /// `zero_on_reuse`: gives every page of the stack back, so its next
    /// user reads zeros, or, where the kernel keeps the pages (a stack the
    /// user locked in memory), zeroes them. Every free stack has been
    /// through here, wherever it waits afterwards. Out of line, to keep the
    /// default free path short.
    #[cold]
    fn clear(&self, top: NonNull<u8>) {
        let (limit, size) = self.whole_range(top);
        if !sys::release(limit, size) {
            // SAFETY: the stack is free and ours: `[limit, top)` is its
            // usable range, mapped read-write, and nothing else uses it.
            unsafe { std::ptr::write_bytes(limit as *mut u8, 0, self.layout.stack_size) };
        }
    }

    /// The local magazine is full (or busy): hand it to the depot whole,
    /// in transit meanwhile (it ends under the depot lock: the lock's
    /// release stays the last access to the pool). True if the pool was
    /// orphaned meanwhile and these were its last stacks out (`stash`).
    #[cold]
    fn free_slow(&self, top: NonNull<u8>) -> bool {
        let _section = fork::section();
        let transit = self.counters.transits.begin();
        let mut magazine = Vec::with_capacity(self.layout.cache_size + 1);
        self.cache
            .drain(vmtask_percpu::cpu(), self.layout.cache_size, &mut magazine);
        magazine.push(top);
        bump(&self.counters.depot_transfers, 1);
        self.to_depot(magazine, Some(transit))
    }

    /// Sends free stacks to the depot: their pages below `keep_resident`
    /// released in one batch (already gone with `zero_on_reuse`), then
    /// `stash`, which ends `transit` (and returns its `last`).
    fn to_depot(&self, stacks: Vec<NonNull<u8>>, transit: Option<Transit<'_>>) -> bool {
        if !self.layout.zero_on_reuse {
            let deep: Vec<_> = stacks.iter().map(|&top| self.deep_range(top)).collect();
            // Pages the kernel keeps (locked) merely stay resident.
            let _ = sys::release_many(&deep);
        }
        self.stash(stacks, false, transit).1
    }

    /// Every page of a stack, as `(addr, len)`.
    fn whole_range(&self, top: NonNull<u8>) -> (usize, usize) {
        let size = self.layout.stack_size;
        (top.as_ptr() as usize - size, size)
    }

    /// The pages of a free stack below `keep_resident`, as `(addr, len)`.
    fn deep_range(&self, top: NonNull<u8>) -> (usize, usize) {
        let limit = top.as_ptr() as usize - self.layout.stack_size;
        (limit, self.layout.stack_size - self.layout.keep_resident)
    }

    /// Puts free, trimmed stacks in the depot; what does not fit loses all
    /// its memory and goes on the released list. With `count`, returns the
    /// resident pages given back. Ends `transit` once every stack is in a
    /// list, under the depot lock: the last access to the pool is the
    /// depot lock's release.
    ///
    /// A free that began before its pool was orphaned may get here after:
    /// then every stack goes to the released list (the depot is no longer
    /// swept), and the second value tells whether that completed it, as
    /// `release_orphans` does.
    fn stash(
        &self,
        mut stacks: Vec<NonNull<u8>>,
        count: bool,
        transit: Option<Transit<'_>>,
    ) -> (usize, bool) {
        {
            let mut depot = self.depot.lock();
            // Under the lock that the drop takes after orphaning the pool,
            // to empty the depot one last time.
            let room = if self.orphaned.load(Ordering::Acquire) {
                0
            } else {
                self.layout.depot_size.saturating_sub(depot.stacks.len())
            };
            let fits = room.min(stacks.len());
            depot.stacks.extend(stacks.drain(..fits));
            if stacks.is_empty() {
                drop(transit);
                drop(depot);
                return (0, false);
            }
        }
        let whole: Vec<_> = stacks.iter().map(|&top| self.whole_range(top)).collect();
        let resident: Vec<_> = if count {
            whole
                .iter()
                .map(|&(addr, len)| sys::resident_pages(addr, len))
                .collect()
        } else {
            Vec::new()
        };
        let pages = released_pages(&resident, &sys::release_many(&whole));
        bump(&self.counters.stacks_released, stacks.len() as u64);
        let mut depot = self.depot.lock();
        let had = depot.released.len();
        depot.released.extend(stacks);
        // Acquire: `orphan_carved`, stored before, is read in `completes`.
        let last = self.orphaned.load(Ordering::Acquire) && self.completes(&mut depot, had, false);
        drop(transit);
        drop(depot);
        (pages, last)
    }
}

/// Of the ranges whose resident pages were counted (`resident`, empty if
/// none were), the pages of those the kernel released.
fn released_pages(resident: &[usize], released: &[bool]) -> usize {
    resident
        .iter()
        .zip(released)
        .filter(|(_, &done)| done)
        .map(|(&pages, _)| pages)
        .sum()
}

/// A pool of virtually mapped stacks. See the [crate docs](crate).
///
/// `Send + Sync`; share it by reference or `Arc`. Dropping the pool unmaps
/// its arenas if every stack has been freed. Otherwise the pool is
/// *orphaned* (better than unmapping a stack under a running task): the
/// free stacks' pages are given back at once, each stack still out gives
/// back all of its pages when it is dropped, and the drop of the last one
/// unmaps the arenas and frees the pool's records.
///
/// One race needs a later event: a stack dropped on another thread at the
/// very moment of the pool's drop (between its free's one check of the
/// pool and the store that parks or caches it, a few instructions) can
/// land in the orphaned pool's caches after the drop's last sweep, with
/// no later free of that pool to find it. The next creation or drop of
/// any pool sweeps the orphaned pools again and destroys those it
/// completes (closing the race on the free path itself would cost every
/// free a handshake with the drop). A stack parked on a live thread is
/// taken only where the kernel has `membarrier`; elsewhere it waits for
/// that thread to exit. Until then that stack keeps its
/// pages; if no pool is created or dropped again, until the process
/// exits. Dropping a pool after the threads that use its stacks are done
/// with them never meets it.
pub struct StackPool {
    inner: NonNull<PoolInner>,
}

// SAFETY: PoolInner's shared state is behind per-CPU slots, the depot spin
// lock, the arenas mutex and atomics; the raw pointers it holds are
// addresses of free stacks it owns.
unsafe impl Send for StackPool {}
// SAFETY: as above; every method takes `&self` and synchronises internally.
unsafe impl Sync for StackPool {}

impl StackPool {
    /// Creates a pool. Reserves nothing until the first allocation; installs
    /// the process's overflow handler the first time any pool is created.
    ///
    /// Fails on an invalid `config`, or with
    /// [`StackError::GuardMarkersUnsupported`] when
    /// [`GuardMode::GuardMarker`] is asked of a kernel without it. The
    /// first pool with `Auto` or `GuardMarker` probes the kernel on a
    /// two-page scratch mapping; if even that cannot be had (no memory or
    /// address space left), `new` fails with [`StackError::MapFailed`]
    /// rather than guess, and the next call probes again.
    pub fn new(config: Config) -> Result<StackPool, StackError> {
        let layout = Layout::new(&config)?;
        reap_orphans();
        let probe = || {
            sys::guard_markers_supported().map_err(|errno| StackError::MapFailed {
                what: "probe for MADV_GUARD_INSTALL on a scratch mapping",
                bytes: 2 * sys::page_size(),
                errno,
            })
        };
        let markers = match config.guard_mode {
            GuardMode::Auto => probe()?,
            GuardMode::GuardMarker if probe()? => true,
            GuardMode::GuardMarker => return Err(StackError::GuardMarkersUnsupported),
            GuardMode::Mprotect => false,
        };
        overflow::install_handler();
        crate::park::install_fork_handlers();
        crate::fork::install_handlers_again();
        let hits = Tallies::new();
        let free_id = if layout.zero_on_reuse {
            COLD_FREE
        } else {
            hits.id()
        };
        let inner = Box::new(PoolInner {
            cache: CpuCache::try_new(layout.cache_size).map_err(|e| StackError::MapFailed {
                what: "allocate the per-CPU magazines",
                bytes: e.bytes.unwrap_or(usize::MAX),
                errno: libc::ENOMEM,
            })?,
            hits,
            depot: SpinLock::new(Depot {
                stacks: Vec::new(),
                released: Vec::new(),
                sealed: false,
            }),
            arenas: Mutex::new(Arenas::new()),
            counters: Counters::default(),
            free_id: AtomicU64::new(free_id),
            orphaned: AtomicBool::new(false),
            orphan_carved: AtomicUsize::new(0),
            layout,
            markers,
        });
        Ok(StackPool {
            inner: NonNull::from(Box::leak(inner)),
        })
    }

    /// The process-wide pool with the default [`Config`].
    ///
    /// Fork-safe: a child forked while another thread was creating it
    /// creates its own. (Not a `OnceLock`, whose initialisation, copied
    /// mid-way by a fork, would keep the child waiting for a thread it
    /// does not have.) Threads that race to create it each build a pool;
    /// one is kept, and the others are dropped at once.
    ///
    /// # Panics
    /// If the default pool cannot be created (see [`StackPool::new`]: no
    /// memory or address space for its probe mapping or its magazines, or
    /// a broken kernel).
    pub fn global() -> &'static StackPool {
        static GLOBAL: AtomicPtr<StackPool> = AtomicPtr::new(ptr::null_mut());
        let current = GLOBAL.load(Ordering::Acquire);
        // SAFETY: a non-null GLOBAL is a leaked box, never freed.
        if let Some(pool) = unsafe { current.as_ref() } {
            return pool;
        }
        let built = match StackPool::new(Config::default()) {
            Ok(pool) => Box::into_raw(Box::new(pool)),
            Err(err) => {
                // Another thread's pool may have been published meanwhile.
                // SAFETY: as above.
                if let Some(pool) = unsafe { GLOBAL.load(Ordering::Acquire).as_ref() } {
                    return pool;
                }
                panic!("cannot create the global stack pool: {err}");
            }
        };
        match GLOBAL.compare_exchange(ptr::null_mut(), built, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: ours, now published and never freed.
            Ok(_) => unsafe { &*built },
            Err(winner) => {
                // SAFETY: ours, never published: no stack was allocated
                // from it. The winner is a leaked box, never freed.
                unsafe {
                    drop(Box::from_raw(built));
                    &*winner
                }
            }
        }
    }

    fn inner(&self) -> &PoolInner {
        // SAFETY: `inner` came from Box::leak in `new` and is freed only in
        // `drop`, which needs `&mut self`.
        unsafe { self.inner.as_ref() }
    }

    /// Allocates a stack: the one this thread parked (the last it freed),
    /// else one from the current CPU's magazine, else the depot, else a
    /// stack parked on an exited thread, else a released slot, else a fresh
    /// slot, else (every slot carved, or the kernel refuses the address
    /// space or mappings for a new one) a free stack wherever it waits: in
    /// another CPU's magazine or parked on another thread. Also makes sure
    /// this thread has an alternate signal stack, so an overflow on the new
    /// stack can be reported.
    ///
    /// ```
    /// use vmtask_stack::{Config, StackError, StackPool};
    ///
    /// let pool = StackPool::new(Config { max_stacks: 2, ..Config::default() })?;
    /// let a = pool.alloc()?;
    /// let b = pool.alloc()?;
    /// assert!(matches!(pool.alloc(), Err(StackError::Exhausted { max_stacks: 2, .. })));
    /// drop(a); // freed at once, into this thread's place or CPU's magazine
    /// let c = pool.alloc()?; // the same slot, warm
    /// assert_eq!(pool.stats().live, 2);
    /// # drop((b, c));
    /// # Ok::<(), StackError>(())
    /// ```
    #[inline]
    pub fn alloc(&self) -> Result<Stack, StackError> {
        let top = self.inner().alloc()?;
        // SAFETY: `top` is a free stack of this pool, now owned by the new
        // Stack; the pool outlives it (see `Drop`).
        Ok(unsafe { Stack::from_raw(top, self.inner) })
    }

    /// Gives back memory held by free stacks: every per-CPU magazine is
    /// emptied into the depot with its stacks' pages below `keep_resident`
    /// released; stacks that do not fit in the depot give back everything.
    /// The stack each thread keeps parked (the last it freed) is trimmed
    /// too: the calling thread's and exited threads' directly, other live
    /// threads' taken from them with one `membarrier` (where the kernel
    /// has none, those stay parked). Returns the bytes that were resident
    /// and are now released.
    pub fn trim(&self) -> usize {
        let _section = fork::section();
        let inner = self.inner();
        // Before it takes any stack (see `take_any_free_after_transits`).
        let _transit = inner.counters.transits.begin();
        self.trim_free_stacks()
    }

    /// `trim`, between its begun and ended counts.
    fn trim_free_stacks(&self) -> usize {
        let inner = self.inner();
        let (mut free, _) = inner.hits.reclaim_exited(|| ());
        free.extend(inner.hits.take_own_parked());
        free.extend(inner.hits.steal_parked(|| ()).0);
        for cpu in 0..inner.cache.cpus() {
            inner.cache.drain(cpu, usize::MAX, &mut free);
        }
        let deep: Vec<_> = free.iter().map(|&top| inner.deep_range(top)).collect();
        let resident: Vec<_> = deep
            .iter()
            .map(|&(addr, len)| sys::resident_pages(addr, len))
            .collect();
        let mut pages = released_pages(&resident, &sys::release_many(&deep));
        pages += inner.stash(free, true, None).0;
        bump(&inner.counters.pages_trimmed, pages as u64);
        pages * sys::page_size()
    }

    /// A snapshot of the pool's counters. Exact when no thread is using the
    /// pool; approximate while it is in use.
    pub fn stats(&self) -> PoolStats {
        let _section = fork::section();
        let inner = self.inner();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (carved, arenas, mappings, reserved_bytes) = {
            let a = inner.arenas.lock().unwrap_or_else(|e| e.into_inner());
            (
                a.carved() as u64,
                a.count(),
                a.mappings(inner.markers),
                a.reserved_bytes(&inner.layout),
            )
        };
        let (in_depot, released) = {
            let d = inner.depot.lock();
            (d.stacks.len() as u64, d.released.len() as u64)
        };
        let cached = (inner.cache.total_len() + inner.hits.parked()) as u64;
        let cache_hits = inner.hits.total();
        let depot_hits = load(&inner.counters.depot_hits);
        let released_reuses = load(&inner.counters.released_reuses);
        let allocs = cache_hits + depot_hits + released_reuses + carved;
        let live = carved.saturating_sub(cached + in_depot + released);
        PoolStats {
            allocs,
            frees: allocs.saturating_sub(live),
            cache_hits,
            cache_misses: allocs - cache_hits,
            depot_hits,
            depot_transfers: load(&inner.counters.depot_transfers),
            slots_carved: carved,
            live,
            cached,
            in_depot,
            released,
            stacks_released: load(&inner.counters.stacks_released),
            pages_trimmed: load(&inner.counters.pages_trimmed),
            failures: load(&inner.counters.failures),
            guard_mode: if inner.markers {
                GuardMode::GuardMarker
            } else {
                GuardMode::Mprotect
            },
            arenas,
            mappings,
            reserved_bytes,
            stack_size: inner.layout.stack_size,
        }
    }

    /// The guard mode in use ([`GuardMode::Auto`] resolved).
    pub fn guard_mode(&self) -> GuardMode {
        if self.inner().markers {
            GuardMode::GuardMarker
        } else {
            GuardMode::Mprotect
        }
    }

    /// Usable bytes per stack (page-rounded `stack_size`).
    pub fn stack_size(&self) -> usize {
        self.inner().layout.stack_size
    }
}

impl Drop for StackPool {
    fn drop(&mut self) {
        reap_orphans();
        let _section = fork::section();
        let inner = self.inner();
        let (mut free, _) = inner.hits.reclaim_exited(|| ());
        free.extend(inner.hits.take_own_parked());
        for cpu in 0..inner.cache.cpus() {
            inner.cache.drain(cpu, usize::MAX, &mut free);
        }
        // Stacks parked on other live threads are free too; those threads
        // never touch them again once the pool is gone (see `tally.rs`).
        let parked = inner.hits.parked();
        let (carved, all_free) = {
            let depot = inner.depot.lock();
            let arenas = inner.arenas.lock().unwrap_or_else(|e| e.into_inner());
            let carved = arenas.carved();
            (
                carved,
                carved == free.len() + parked + depot.stacks.len() + depot.released.len(),
            )
        };
        if !all_free {
            // Some Stack still points here, and a task may still run on
            // it: the pool is orphaned, not destroyed. Nothing will
            // allocate from it again, so its memory goes back: the free
            // stacks' now, those still out as they come back
            // (`free_orphaned`, which also catches a stack that a free
            // racing this drop published after the drains above). The
            // free that brings the last stack back destroys the pool.
            // Orphaned first, so that a free after the drains below finds
            // the flag.
            inner.orphan_carved.store(carved, Ordering::Relaxed);
            inner.orphaned.store(true, Ordering::Release);
            inner.free_id.store(COLD_FREE, Ordering::Release);
            inner.sweep_orphans(&mut free);
            free.append(&mut inner.depot.lock().stacks);
            // Registered before the seal, while no free can destroy the
            // pool yet; `destroy` unregisters it.
            ORPHANS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Orphan(self.inner));
            // Until this seal, a free that brings the last stack back
            // leaves the destroy to this drop, which still uses the pool.
            if !inner.release_orphans(free, true) {
                return;
            }
            // The stacks that were out came back during this drop.
        }
        // SAFETY: every carved stack is free and no `Stack` refers to the
        // pool, so nothing can reach `inner` or its arenas any more; `inner`
        // came from Box::leak in `new`.
        unsafe { PoolInner::destroy(self.inner) };
    }
}

impl fmt::Debug for StackPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = &self.inner().layout;
        f.debug_struct("StackPool")
            .field("stack_size", &layout.stack_size)
            .field("guard_size", &layout.guard_size)
            .field("max_stacks", &layout.max_stacks)
            .field("cache_size", &layout.cache_size)
            .field("guard_mode", &self.guard_mode())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`StackPool`], from [`StackPool::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// Stacks handed out.
    pub allocs: u64,
    /// Stacks given back.
    pub frees: u64,
    /// Allocations served by the thread's parked stack or the current
    /// CPU's magazine.
    pub cache_hits: u64,
    /// Allocations that missed both.
    pub cache_misses: u64,
    /// Misses served by an already-carved warm stack: from the depot, from
    /// another CPU's magazine, or parked on another thread (an exited one,
    /// or, when every slot is carved, a live one).
    pub depot_hits: u64,
    /// Batches moved to or from the depot: a full magazine handed over by
    /// a free, or up to a magazine's worth taken by an allocation that
    /// missed its magazine (one stack counts, when the depot holds one).
    pub depot_transfers: u64,
    /// Fresh slots carved from the arenas.
    pub slots_carved: u64,
    /// Stacks allocated and not yet freed.
    pub live: u64,
    /// Free stacks in the per-CPU magazines, and parked on threads (each
    /// thread keeps the last stack it freed for its next allocation).
    pub cached: u64,
    /// Free stacks in the depot.
    pub in_depot: u64,
    /// Free slots whose memory was given back entirely, awaiting reuse.
    pub released: u64,
    /// Stacks whose memory was given back entirely (depot full).
    pub stacks_released: u64,
    /// Resident pages given back by [`StackPool::trim`].
    pub pages_trimmed: u64,
    /// Allocations that failed.
    pub failures: u64,
    /// How guard pages are made.
    pub guard_mode: GuardMode,
    /// Arenas reserved.
    pub arenas: usize,
    /// Mappings the arenas use, as created.
    pub mappings: usize,
    /// Address space reserved.
    pub reserved_bytes: usize,
    /// Usable bytes per stack.
    pub stack_size: usize,
}

impl PoolStats {
    /// The cache+depot hit rate: the share of allocations served by a
    /// magazine or the depot, that is by a stack that was already carved and
    /// still warm. Not the magazine (cache) hit rate alone, which is
    /// `cache_hits / allocs`. 0.0 before the first allocation, like the
    /// slab's rates.
    pub fn hit_rate(&self) -> f64 {
        if self.allocs == 0 {
            return 0.0;
        }
        (self.cache_hits + self.depot_hits) as f64 / self.allocs as f64
    }
}

/// Address space in MiB, or in KiB below one MiB (a small pool's arena).
struct Reserved(usize);

impl fmt::Display for Reserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 1 << 20 {
            write!(f, "{} KiB", self.0.div_ceil(1 << 10))
        } else {
            write!(f, "{} MiB", self.0 >> 20)
        }
    }
}

impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stacks: {} allocs, {} frees, {} live ({} KiB each)",
            self.allocs,
            self.frees,
            self.live,
            self.stack_size / 1024
        )?;
        writeln!(
            f,
            "cache: {} hits, {} misses, {} depot hits ({:.2}% cache+depot hit rate), {} depot transfers",
            self.cache_hits,
            self.cache_misses,
            self.depot_hits,
            100.0 * self.hit_rate(),
            self.depot_transfers
        )?;
        writeln!(
            f,
            "free: {} cached, {} in depot, {} released; {} stacks released, {} pages trimmed",
            self.cached, self.in_depot, self.released, self.stacks_released, self.pages_trimmed
        )?;
        write!(
            f,
            "arenas: {} slots carved, {} arenas, {} mappings, {} reserved, guards by {}, {} failed allocs",
            self.slots_carved,
            self.arenas,
            self.mappings,
            Reserved(self.reserved_bytes),
            self.guard_mode,
            self.failures
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Ids of the pools destroyed so far (ids are never reused, where
    /// addresses are: a pool's `Box` and arenas are, at once).
    pub(super) static DESTROYED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

    thread_local! {
        /// Run by a free chosen to destroy its orphaned pool, just
        /// before the destroy (`free_cold`).
        static CHOSEN_TO_DESTROY: std::cell::Cell<Option<fn()>> =
            const { std::cell::Cell::new(None) };
    }

    pub(super) fn chosen_to_destroy() {
        if let Some(hook) = CHOSEN_TO_DESTROY.with(|h| h.take()) {
            hook();
        }
    }

    /// The lists a free puts stacks on have room for every carved stack
    /// before the free: none grows in a free, where an allocation failure
    /// aborts (see `Depot::make_room`).
    #[test]
    fn frees_find_room_on_the_lists() {
        let pool = StackPool::new(Config {
            stack_size: 16 << 10,
            cache_size: 2,
            depot_size: 5,
            ..Config::default()
        })
        .unwrap();
        let inner = pool.inner();
        let room = || {
            let depot = inner.depot.lock();
            (depot.released.capacity(), depot.stacks.capacity())
        };
        let mut stacks = Vec::new();
        for carved in 1..=300 {
            stacks.push(pool.alloc().unwrap());
            let (released, depot) = room();
            assert!(released >= carved, "{released} places for {carved} stacks");
            assert!(
                depot >= carved.min(5),
                "{depot} depot places, {carved} carved"
            );
        }
        let before = room();
        drop(stacks);
        let stats = pool.stats();
        assert_eq!(stats.live, 0, "{stats}");
        assert!(
            stats.stacks_released > 0,
            "no stack reached the released list"
        );
        assert_eq!(room(), before, "a free grew a list");
    }

    fn registered(id: u64) -> bool {
        let _section = fork::section();
        ORPHANS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            // SAFETY: registered, so not destroyed (see `ORPHANS`).
            .any(|orphan| unsafe { orphan.0.as_ref() }.hits.id() == id)
    }

    /// Waits (up to 10 s) until the pool `id` has been destroyed: by this
    /// test's sweep, or by another test's pool creation or drop, whose
    /// sweep may still be unmapping it.
    fn wait_destroyed(id: u64) {
        let start = Instant::now();
        // In a fork section, as `destroy` takes the lock: a fork (the
        // test below forks) waits for it, so no child inherits it held.
        let destroyed = || {
            let _section = fork::section();
            DESTROYED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id)
        };
        while !destroyed() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the orphaned pool {id} was not destroyed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!registered(id), "a destroyed pool is still registered");
    }

    /// A small pool, `before_drop` run on it, dropped while one stack is
    /// out: the pool's id, that stack's top and the orphaned pool.
    fn orphan_with_a_stack_out(
        before_drop: impl FnOnce(&StackPool),
    ) -> (u64, NonNull<u8>, NonNull<PoolInner>) {
        let pool = StackPool::new(Config {
            max_stacks: 4,
            ..Config::default()
        })
        .unwrap();
        let id = pool.inner().hits.id();
        let (top, inner) = pool.alloc().unwrap().into_raw();
        before_drop(&pool);
        drop(pool);
        assert!(registered(id), "the pool was not orphaned");
        (id, top, inner)
    }

    /// The race a review reproduced with a hardware breakpoint: the last
    /// stack's free read the pool's id before the drop orphaned it, and
    /// pushed the stack on a magazine after the drop's last sweep. Played
    /// here step by step: the pool waits for that stack, registered as an
    /// orphan, until a later sweep finds it and destroys the pool.
    #[test]
    fn a_stack_cached_after_the_drops_last_sweep_is_reaped_by_a_later_sweep() {
        let (id, top, inner) = orphan_with_a_stack_out(|_| ());
        // The racing free's publishing store, after the drop's sweep.
        // SAFETY: the pool lives on, orphaned, until the stack is back:
        // the stack is still out as far as it knows.
        assert!(unsafe { inner.as_ref() }.cache.push(top).is_ok());
        reap_orphans();
        wait_destroyed(id);
    }

    /// The same race, the late free parking its stack on its thread.
    #[test]
    fn a_stack_parked_after_the_drops_last_sweep_is_reaped_by_a_later_sweep() {
        let (id, top, _) = orphan_with_a_stack_out(|pool| assert!(pool.inner().hits.select()));
        // The racing free's park, with the id it read before the drop.
        assert!(tally::park_as(id, top));
        reap_orphans();
        wait_destroyed(id);
    }

    /// A fork while the free that brings an orphaned pool's last stack
    /// back is about to destroy it: the child must not get the pool
    /// undestroyed (review finding, forced with gdb: the free chose
    /// itself as the destroyer in one fork section and destroyed in
    /// another, and a fork in between left the child the finished pool
    /// for good, as `reap_orphans` skips a pool that holds nothing).
    #[test]
    fn a_fork_between_choosing_the_destroyer_and_the_destroy_waits_for_it() {
        use std::sync::atomic::AtomicBool;
        static CHOSEN: AtomicBool = AtomicBool::new(false);
        fn pause_chosen() {
            CHOSEN.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
        }
        let (id, top, inner) = orphan_with_a_stack_out(|_| ());
        let (top, inner) = (top.as_ptr() as usize, inner.as_ptr() as usize);
        let last_free = std::thread::spawn(move || {
            CHOSEN_TO_DESTROY.with(|h| h.set(Some(pause_chosen)));
            // SAFETY: the stack taken out by `orphan_with_a_stack_out`,
            // freed once, into its (orphaned) pool.
            unsafe {
                PoolInner::free(
                    NonNull::new(inner as *mut PoolInner).unwrap(),
                    NonNull::new(top as *mut u8).unwrap(),
                )
            };
        });
        while !CHOSEN.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // SAFETY: the child only reads a list and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: alarm only arms a timer; a hang kills the child.
            unsafe { libc::alarm(10) };
            let destroyed = DESTROYED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if destroyed { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        last_free.join().unwrap();
        wait_destroyed(id);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the fork child got the orphaned pool undestroyed (status {status:#x})"
        );
    }
}
