//! Per-thread tallies of cache hits: the one counter on the allocation fast
//! path, kept without an atomic read-modify-write and without reading the
//! CPU number.
//!
//! A cache hit must be counted where it happens (the other counters are
//! bumped on slow paths, and `allocs`, `frees` and `live` are derived from
//! them in `stats()`). Counting per CPU needs the CPU number again after the
//! `CpuCache` pop, a second dependent load from the rseq area that made the
//! whole alloc+free several times slower than the pop+push alone here;
//! counting in one shared word would bounce its cache line between CPUs.
//! So every thread counts into a tally of its own.
//!
//! Protocol:
//! - Each pool has a [`Tallies`] with an id that is never reused, a
//!   registry of the tallies threads use with it, and a `retired` total.
//! - A thread caches `(pool id, &tally)` for the pool it used last in two
//!   const-initialised thread-locals without destructors, so the fast path
//!   is two `%fs` loads, a compare and a plain increment of a word only this
//!   thread writes ([`Tallies::hit`]). Readers (`stats()`) load it relaxed;
//!   a count is a single aligned word, so they see some recent value.
//! - On a mismatch (first use, another pool, or after the thread's
//!   thread-locals were destroyed) the slow path looks the pool up in the
//!   thread's list of owned tallies, registering a new one with the pool if
//!   needed. The thread holds an `Arc` to each tally it owns, the pool one
//!   to each registered tally: a tally whose pool side is the only owner
//!   belongs to an exited thread (the pool folds it into `retired`), and one
//!   whose thread side is the only owner belongs to a dropped pool (the
//!   thread forgets it). The id, not the pool's address, identifies a pool,
//!   so a new pool at a dropped pool's address never matches a stale cache.
//! - When the thread's list is destroyed at thread exit it clears the cache
//!   first; hits counted after that (from other thread-local destructors)
//!   go to `retired` with an atomic add.
//! - A thread whose first use of a pool comes from a pthread-key
//!   destructor is past its Rust thread-local destructors (glibc runs those
//!   first): the list's destructor would never run, and the pool would
//!   count the thread's parked stack as cached forever (review finding:
//!   20,000 such threads carved 20,000 slots). So registering a record
//!   also sets a pthread key, whose destructor ([`drop_owned_at_exit`])
//!   empties the list if its own destructor has not run, as vmtask-rcu's
//!   registration backstop does. Only a first use in glibc's last round of
//!   key destructors (the fourth) escapes it.
//!
//! The same per-thread record holds the thread's *parked* stack: the last
//! stack it freed to this pool, kept for its next allocation (plain loads
//! and stores, no CPU number, no rseq, no atomic read-modify-write). Only
//! the owning thread parks and unparks, through the thread cache; the pool
//! reads the pointer to count it as free, takes it back once the thread
//! has exited ([`Tallies::reclaim_exited`]), and takes it from a live
//! thread when the pool is exhausted or trimmed ([`Tallies::steal_parked`]).
//! A thread's parked stack of a dropped pool is never used again: the id
//! no longer matches any pool.
//!
//! Taking a live thread's parked stack: see [`crate::park`].

use std::cell::{Cell, RefCell};
use std::ptr;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_utils::CachePadded;

use crate::park::Parked;

/// One thread's hits on one pool and its parked stack. Written by that
/// thread only (the pool takes the stack back only after the thread exits).
#[derive(Default)]
struct Record {
    hits: AtomicU64,
    /// A free stack of this pool, parked for this thread's next `alloc`.
    parked: Parked,
}

type Tally = CachePadded<Record>;

/// Pool ids; 0 means "no pool" in the thread cache.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The id of the pool whose tally `CURRENT_TALLY` is, or 0.
    static CURRENT_ID: Cell<u64> = const { Cell::new(0) };
    /// This thread's tally for pool `CURRENT_ID`; kept alive by `OWNED`.
    static CURRENT_TALLY: Cell<*const Tally> = const { Cell::new(ptr::null()) };
    /// Every tally this thread owns, by pool id.
    static OWNED: Owned = const { Owned(RefCell::new(Vec::new())) };
}

struct Owned(RefCell<Vec<(u64, Arc<Tally>)>>);

impl Drop for Owned {
    fn drop(&mut self) {
        // The tallies may die with this list; later hits must not use them.
        forget_current();
    }
}

/// Forgets the thread's cached pool: its next allocation or free of any
/// pool takes the path that selects the pool's tally again (and, for an
/// allocation, prepares the thread for overflow reports).
pub(crate) fn forget_current() {
    CURRENT_ID.set(0);
    CURRENT_TALLY.set(ptr::null());
}

/// The destructor of the pthread key that `Tallies::select` sets with each
/// record it registers (see the module header): empties the thread's list
/// of records, if it is still alive, as its own destructor would have.
/// After `Owned::drop` the list is gone and this does nothing.
extern "C" fn drop_owned_at_exit(_armed: *mut libc::c_void) {
    forget_current();
    let records = OWNED
        .try_with(|owned| {
            owned
                .0
                .try_borrow_mut()
                .map(|mut records| std::mem::take(&mut *records))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    // The pools see these threads' records as exited ones (only the pool
    // side holds them now) and take their parked stacks back.
    drop(records);
}

/// Sets the calling thread's value of the backstop key, so that
/// [`drop_owned_at_exit`] runs when it exits (after its thread-local
/// destructors, and in the next round of key destructors if this runs in
/// one). Without a key left the thread goes on as before: only a thread
/// whose first use of a pool is in a key destructor then keeps its
/// parked stack.
fn arm_backstop() {
    static KEY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if let Some(key) = crate::sys::lazy_key(&KEY, drop_owned_at_exit) {
        // Any non-null value: glibc calls the destructor only for those.
        // SAFETY: a key of ours; the value is never dereferenced.
        unsafe { libc::pthread_setspecific(key, ptr::dangling::<u8>().cast()) };
    }
}

/// A pool's cache-hit tallies.
pub(crate) struct Tallies {
    id: u64,
    /// Tallies of threads that used this pool (some may have exited).
    live: Mutex<Vec<Arc<Tally>>>,
    /// Hits of exited threads, and hits counted without a tally.
    retired: AtomicU64,
}

/// [`Tallies::park`] for the pool whose id is `id`: parks `top` if that
/// pool is the thread's cached one and its place is empty. `id` is a
/// pool's id or `u64::MAX`, which no pool has and which parks nothing
/// (`CURRENT_ID` holds a pool's id or 0). For a caller that has the id at
/// hand already (`PoolInner::free`).
#[inline(always)]
pub(crate) fn park_as(id: u64, top: NonNull<u8>) -> bool {
    debug_assert_ne!(id, 0, "0 is no pool's id");
    if CURRENT_ID.get() != id {
        return false;
    }
    // SAFETY: as in `Tallies::current`: CURRENT_ID is this pool's id (not
    // 0), so CURRENT_TALLY points into this thread's live OWNED list.
    unsafe { &*CURRENT_TALLY.get() }.parked.park(top.as_ptr())
}

/// Counts one hit in the calling thread's own record.
#[inline(always)]
fn count(tally: &Tally) {
    // Only this thread writes its record: no read-modify-write needed.
    tally
        .hits
        .store(tally.hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

impl Tallies {
    pub(crate) fn new() -> Tallies {
        Tallies {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            live: Mutex::new(Vec::new()),
            retired: AtomicU64::new(0),
        }
    }

    /// Counts one cache hit by the calling thread. Returns false, counting
    /// nothing, when this pool is not the thread's cached one: the caller
    /// then calls [`Tallies::hit_slow`] (after whatever else a first use on
    /// this thread needs).
    #[inline]
    pub(crate) fn hit(&self) -> bool {
        match self.current() {
            Some(tally) => {
                count(tally);
                true
            }
            None => false,
        }
    }

    /// This thread's record for this pool, if it is the cached one.
    #[inline(always)]
    fn current(&self) -> Option<&Tally> {
        if CURRENT_ID.get() != self.id {
            return None;
        }
        // Why this holds: CURRENT_TALLY is set together with CURRENT_ID to a
        // tally in this thread's OWNED list, which keeps it alive and is
        // only pruned of tallies of other (dropped) pools; both are cleared
        // before the list is destroyed.
        // SAFETY: CURRENT_TALLY points into this thread's live OWNED list.
        Some(unsafe { &*CURRENT_TALLY.get() })
    }

    /// Takes the calling thread's parked stack, counting a hit.
    #[inline]
    pub(crate) fn unpark(&self) -> Option<NonNull<u8>> {
        let tally = self.current()?;
        let top = NonNull::new(tally.parked.unpark())?;
        count(tally);
        Some(top)
    }

    /// Takes the stacks parked on live threads (for an exhausted pool and
    /// `trim`), with one `membarrier` (see [`crate::park`]). Takes nothing
    /// where membarrier is unavailable. `begin` runs, under the lock, before
    /// the first stack is marked (the owners then miss it) or taken, and
    /// only if a stack is parked (the caller abandons the section if none
    /// was taken): the caller's in-transit section.
    pub(crate) fn steal_parked<G>(
        &self,
        begin: impl FnOnce() -> G,
    ) -> (Vec<NonNull<u8>>, Option<G>) {
        // Held throughout: one taker at a time.
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let targets: Vec<&Tally> = live
            .iter()
            .filter(|tally| tally.parked.is_parked())
            .map(|tally| &**tally)
            .collect();
        // Marking makes the owners miss their stack until the steal ends:
        // not for nothing.
        if targets.is_empty() || !crate::sys::heavy_barrier_available() {
            return (Vec::new(), None);
        }
        let section = begin();
        targets.iter().for_each(|tally| tally.parked.mark());
        let barrier = crate::sys::heavy_barrier();
        let stacks = targets
            .iter()
            .filter_map(|tally| NonNull::new(tally.parked.take_marked(barrier)))
            .collect();
        (stacks, Some(section))
    }

    /// Takes the calling thread's parked stack without counting (for
    /// `trim` and the pool's drop), whichever pool is the cached one.
    pub(crate) fn take_own_parked(&self) -> Option<NonNull<u8>> {
        OWNED
            .try_with(|owned| {
                let owned = owned.0.borrow();
                let (_, tally) = owned.iter().find(|(id, _)| *id == self.id)?;
                NonNull::new(tally.parked.take())
            })
            .ok()
            .flatten()
    }

    /// Parks a free stack on the calling thread if its place is empty.
    /// Returns false (nothing done) otherwise. The store is the caller's
    /// last access to the pool's memory (the record belongs to the thread).
    #[inline]
    pub(crate) fn park(&self, top: NonNull<u8>) -> bool {
        park_as(self.id, top)
    }

    /// This pool's id: never 0 (no pool) nor `u64::MAX`.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Stacks parked on threads that have exited: the pool takes them back
    /// (their records are then folded like any exited thread's). `begin`
    /// runs, under the lock, before the first stack is taken, and only if
    /// one will be (an exited thread's place changes only under the lock):
    /// the caller's in-transit section.
    pub(crate) fn reclaim_exited<G>(
        &self,
        begin: impl FnOnce() -> G,
    ) -> (Vec<NonNull<u8>>, Option<G>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut stacks = Vec::new();
        let mut begin = Some(begin);
        let mut section = None;
        for tally in live.iter() {
            if Arc::strong_count(tally) == 1 {
                // See `fold_exited` for the fence.
                fence(Ordering::Acquire);
                if tally.parked.is_parked() {
                    if let Some(begin) = begin.take() {
                        section = Some(begin());
                    }
                    stacks.extend(NonNull::new(tally.parked.take()));
                }
            }
        }
        self.fold_exited(&mut live);
        (stacks, section)
    }

    /// Stacks parked on live threads now (a snapshot while threads run).
    pub(crate) fn parked(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.iter().filter(|tally| tally.parked.is_parked()).count()
    }

    /// Counts one cache hit after [`Tallies::hit`] missed the thread cache:
    /// finds or registers this thread's tally for the pool and caches it.
    #[cold]
    pub(crate) fn hit_slow(&self) {
        if !self.select() || !self.hit() {
            // The thread is exiting and its list is gone.
            self.retired.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Makes this pool the calling thread's cached one, finding or
    /// registering its record. Returns false when the thread is past its
    /// thread-local destructors (nothing cached).
    pub(crate) fn select(&self) -> bool {
        if CURRENT_ID.get() == self.id {
            return true;
        }
        OWNED
            .try_with(|owned| {
                let mut owned = owned.0.borrow_mut();
                // Forget tallies of dropped pools (the pool side is gone).
                owned.retain(|(_, tally)| Arc::strong_count(tally) > 1);
                let tally = match owned.iter().find(|(id, _)| *id == self.id) {
                    Some((_, tally)) => Arc::clone(tally),
                    None => {
                        let tally = Arc::new(Tally::default());
                        self.register(Arc::clone(&tally));
                        owned.push((self.id, Arc::clone(&tally)));
                        arm_backstop();
                        tally
                    }
                };
                CURRENT_TALLY.set(Arc::as_ptr(&tally));
                // Before the record can be unparked through the cache.
                crate::park::refresh_busy_mark();
                CURRENT_ID.set(self.id);
            })
            .is_ok()
    }

    fn register(&self, tally: Arc<Tally>) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        self.fold_exited(&mut live);
        live.push(tally);
    }

    /// Moves the counts of exited threads' tallies into `retired`.
    fn fold_exited(&self, live: &mut Vec<Arc<Tally>>) {
        live.retain(|tally| {
            if Arc::strong_count(tally) > 1 {
                return true;
            }
            // Only the pool holds it: its thread has exited and wrote its
            // last count before dropping its `Arc` (a release decrement);
            // the fence makes that count visible to the load below.
            fence(Ordering::Acquire);
            if tally.parked.is_parked() {
                // Its parked stack waits for `reclaim_exited`.
                return true;
            }
            self.retired
                .fetch_add(tally.hits.load(Ordering::Relaxed), Ordering::Relaxed);
            false
        });
    }

    /// Hits counted so far over all threads (a snapshot while threads run).
    pub(crate) fn total(&self) -> u64 {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        self.fold_exited(&mut live);
        self.retired.load(Ordering::Relaxed)
            + live
                .iter()
                .map(|tally| tally.hits.load(Ordering::Relaxed))
                .sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_of_exited_threads_are_kept() {
        let tallies = Tallies::new();
        std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        for _ in 0..1000 {
                            if !tallies.hit() {
                                tallies.hit_slow();
                            }
                        }
                    })
                })
                .collect();
            // An explicit join waits for the thread's locals to be
            // destroyed too; the scope's implicit wait does not.
            for thread in threads {
                thread.join().unwrap();
            }
        });
        assert_eq!(tallies.total(), 4000);
        assert!(
            tallies.live.lock().unwrap().is_empty(),
            "exited threads' tallies are folded"
        );
        assert_eq!(tallies.total(), 4000);
    }

    #[test]
    fn a_thread_switching_pools_counts_each_exactly() {
        let a = Tallies::new();
        let b = Tallies::new();
        for i in 0..100 {
            let t = if i % 3 == 0 { &a } else { &b };
            if !t.hit() {
                t.hit_slow();
            }
        }
        assert_eq!((a.total(), b.total()), (34, 66));
    }

    #[test]
    fn a_dropped_pools_tally_is_forgotten_by_the_thread() {
        let a = Tallies::new();
        if !a.hit() {
            a.hit_slow();
        }
        drop(a);
        let b = Tallies::new();
        if !b.hit() {
            b.hit_slow();
        }
        let owned = OWNED.with(|o| o.0.borrow().iter().map(|(id, _)| *id).collect::<Vec<_>>());
        assert_eq!(owned, vec![b.id]);
        assert_eq!(b.total(), 1);
    }
}
