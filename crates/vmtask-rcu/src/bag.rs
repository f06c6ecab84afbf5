//! Deferred-drop bags: `defer_drop` without an allocation per object,
//! without an atomic read-modify-write, and with the frees run by the
//! thread that made the garbage.
//!
//! Each registered thread owns, in its reader slot, a `current` bag of
//! (pointer, drop function) pairs and a FIFO of full bags `waiting` for
//! their grace period, each tagged with the grace-period snapshot taken
//! when it filled. When a bag fills, the owner asks for a grace period
//! (the callback thread runs it, lazily; once 32 bags wait, the owner
//! tries to run it itself, see `callback::bag_filled`) and makes the
//! oldest waiting bag
//! whose grace period has completed its *draining* bag; each later
//! `defer_drop` runs one entry of it. The frees run on the owner's thread,
//! so memory goes back to its own allocator caches, as the kernel runs RCU
//! callbacks on the CPU that queued them, and one at a time, so each
//! allocation that follows reuses the chunk just freed instead of taking
//! the allocator's slow path after a burst of frees. At most `MAX_WAITING`
//! bags wait; past that the owner waits for the oldest bag's grace period
//! itself and runs it whole, or, where it may neither wait nor run drops
//! (inside a read-side section, on the callback thread), queues the bags
//! past the bound on the shared callback queues (`hand_over_surplus`).
//!
//! Bags of a thread that has stopped deferring are taken by *flushers*
//! and go through the shared callback queues: the callback thread takes
//! idle threads' bags each cycle, `barrier` takes everyone's, and a thread
//! hands over its own when it exits.
//!
//! Owner/flusher protocol (`handoff.rs`; the asymmetric Dekker of RCU
//! itself):
//! - owner: `busy = 1`; compiler barrier; if `steal` is set, clear `busy`
//!   and take the slow path (a node per object); otherwise touch the bags;
//!   `busy = 0` (release).
//! - flusher (one at a time, `FLUSH_LOCK`): `steal = 1` on the chosen
//!   slots; heavy barrier (`membarrier`); for each, wait while `busy`,
//!   take the bags, `steal = 0` (release).
//!
//! The heavy barrier runs a full fence on every CPU running one of our
//! threads: an owner whose `steal` load comes after it sees `steal = 1`;
//! an owner whose load came before it has its `busy = 1` store made
//! visible by it, so the flusher waits for that owner to finish. In the
//! fence fallback the owner issues the SeqCst fence itself.

// Bags are boxed on purpose, also inside vectors: each becomes an
// intrusive callback node whose address must not change.
#![allow(clippy::vec_box)]

use crate::sync::Mutex;
use crossbeam_utils::CachePadded;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::callback::{RcuHead, INVOKED};
use crate::grace;
use crate::handoff::Handoff;

pub(crate) const BAG_CAPACITY: usize = 126;
/// Full bags a thread keeps waiting for their grace period.
const MAX_WAITING: usize = 64;

/// A deferred drop: the object and the function that drops it.
pub(crate) type DropEntry = (*mut (), unsafe fn(*mut ()));

/// A callback node carrying many deferred drops (about 2 KiB).
#[repr(C)]
pub(crate) struct Bag {
    pub(crate) head: RcuHead,
    pub(crate) len: usize,
    /// Entries before `start` have run (a bag its owner drains one entry
    /// at a time, see `LocalBag::push`).
    start: usize,
    entries: [DropEntry; BAG_CAPACITY],
}

/// The filler of unused entries: does nothing.
///
/// # Safety
/// None needed: it ignores its argument. `unsafe` only to have the type of
/// a drop function.
unsafe fn no_drop(_: *mut ()) {}

impl Bag {
    #[cold]
    #[inline(never)]
    fn new() -> Box<Bag> {
        Box::new(Bag {
            head: RcuHead::new(),
            len: 0,
            start: 0,
            entries: [(std::ptr::null_mut(), no_drop as unsafe fn(*mut ())); BAG_CAPACITY],
        })
    }

    /// Entries not run yet.
    pub(crate) fn remaining(&self) -> usize {
        self.len - self.start
    }

    /// Runs every drop not run yet (the caller counts them).
    fn run(&self) {
        for &(data, drop_fn) in &self.entries[self.start..self.len] {
            // SAFETY: each entry was pushed by `defer_raw`, whose contract
            // is that `drop_fn(data)` is valid after a grace period, which
            // every caller of `run` has waited for.
            crate::callback::contain_panic(|| unsafe { drop_fn(data) });
        }
    }
}

/// The callback of a bag queued on the shared queues.
///
/// # Safety
/// `head` is the head of a leaked `Box<Bag>` whose grace period passed.
pub(crate) unsafe fn run_bag(head: *mut RcuHead) {
    // SAFETY: the caller's contract; `head` is the first field.
    let bag = unsafe { Box::from_raw(head.cast::<Bag>()) };
    // The node counts as its entries.
    crate::callback::set_node_weight(bag.remaining() as u64);
    bag.run();
}

/// Empty bags a thread keeps for reuse. Recycling matters: a bag is a
/// 2 KiB allocation, and in glibc a request that size first consolidates
/// every small free chunk, which would cost more than the drops.
const MAX_SPARE: usize = 4;

/// What the owner keeps; touched only under the protocol.
struct Owned {
    current: Option<Box<Bag>>,
    waiting: VecDeque<(u64, Box<Bag>)>,
    /// A bag whose grace period has passed, drained one entry per push
    /// (see `LocalBag::push`).
    draining: Option<Box<Bag>>,
    spare: Vec<Box<Bag>>,
}

impl Owned {
    fn empty() -> Owned {
        Owned {
            current: None,
            waiting: VecDeque::new(),
            draining: None,
            spare: Vec::new(),
        }
    }

    /// Keeps an emptied bag for reuse, up to `MAX_SPARE`.
    fn recycle(&mut self, mut bag: Box<Bag>) {
        if self.spare.len() < MAX_SPARE {
            bag.len = 0;
            bag.start = 0;
            self.spare.push(bag);
        }
    }

    /// Hands every bag holding entries to `give`: the draining one (see
    /// `take_draining`), the current one, and those waiting.
    fn take_all(&mut self, give: &mut impl FnMut(Box<Bag>)) {
        self.take_draining().into_iter().for_each(&mut *give);
        self.current
            .take()
            .filter(|bag| bag.len > 0)
            .into_iter()
            .for_each(&mut *give);
        self.waiting.drain(..).for_each(|(_, bag)| give(bag));
    }

    /// The draining bag, if entries remain in it. Its entries that already
    /// ran are counted as invoked here: the bag now goes to the shared
    /// queues, whose invocation counts only the rest.
    fn take_draining(&mut self) -> Option<Box<Bag>> {
        let bag = self.draining.take()?;
        INVOKED.fetch_add(bag.start as u64, Ordering::Release);
        if bag.remaining() > 0 {
            Some(bag)
        } else {
            self.recycle(bag);
            None
        }
    }
}

/// A thread's bags and the flags of the protocol above.
pub(crate) struct LocalBag {
    handoff: Handoff,
    /// A hint for the callback thread: this thread holds entries.
    has_entries: AtomicBool,
    /// Bags filled so far; a flusher treats an unchanged count as idle.
    filled: AtomicU64,
    /// The owner is running a bag it took out of `waiting`, or an entry of
    /// its draining bag (outside the hand-off), and `runs` counts the runs
    /// it has finished: `barrier` waits for a run it saw in progress.
    /// Also keeps the owner from starting a run inside one (a drop that
    /// defers more), which would nest without bound.
    running: AtomicBool,
    runs: AtomicU64,
    /// Entries of the bag `collect` is running (taken out of the owner's
    /// bags), counted as invoked once it is done; owner only.
    collecting: AtomicU64,
    owned: UnsafeCell<Owned>,
}

// SAFETY: `owned` is touched only by the owner between `busy = 1` and
// `busy = 0` while `steal` is clear, or by the single flusher after it has
// seen `busy = 0` with `steal` set (see the module header).
unsafe impl Sync for LocalBag {}
// SAFETY: the entries were handed over by `defer_raw` as sendable.
unsafe impl Send for LocalBag {}

/// What a push did.
pub(crate) enum Pushed {
    /// Stored; `first` if the thread held no entries before.
    Stored { first: bool },
    /// Stored, and the bag filled: it now waits for a grace period.
    Filled,
    /// A flusher holds the bags: use the slow path.
    Busy,
}

impl LocalBag {
    pub(crate) fn new() -> CachePadded<Self> {
        CachePadded::new(LocalBag {
            handoff: Handoff::new(),
            has_entries: AtomicBool::new(false),
            filled: AtomicU64::new(0),
            running: AtomicBool::new(false),
            runs: AtomicU64::new(0),
            collecting: AtomicU64::new(0),
            owned: UnsafeCell::new(Owned::empty()),
        })
    }

    /// Owner only: runs `f` on the bags, or returns `None` if a flusher
    /// holds them.
    #[inline(always)]
    fn with_owned<R>(&self, f: impl FnOnce(&mut Owned) -> R) -> Option<R> {
        if !self.handoff.owner_enter(crate::fence::reader_mode()) {
            return None;
        }
        // SAFETY: the hand-off gives the owner exclusive use until
        // `owner_exit`. `f` cannot re-enter (it runs no user code).
        let result = f(unsafe { &mut *self.owned.get() });
        self.handoff.owner_exit();
        Some(result)
    }

    /// Owner only: adds an entry and, with `may_run`, takes one entry of
    /// the draining bag for the caller to run with `run_one`. `filled`
    /// runs when the entry fills the bag, before the bag is released to
    /// flushers: it counts the bag's entries as queued, which must come
    /// before anyone can run them and count them invoked (review finding:
    /// counted after the hand-off, a flusher that took and ran the bag in
    /// between showed `stats()` with invoked above queued by a bag).
    ///
    /// Why one at a time: running a whole bag frees 126 objects at once,
    /// more than the allocator's per-thread cache holds (glibc's tcache
    /// keeps 7 per size), and the allocations that follow then take the
    /// allocator's slow path. Freeing one object per object retired keeps
    /// the two in step, so each allocation reuses the chunk just freed.
    #[inline]
    pub(crate) fn push(
        &self,
        entry: DropEntry,
        may_run: bool,
        filled: impl FnOnce(),
    ) -> (Pushed, Option<DropEntry>) {
        let mut ready = None;
        let pushed = self.with_owned(|owned| {
            if may_run && !self.running.load(Ordering::Relaxed) {
                if let Some(bag) = &mut owned.draining {
                    if bag.start < bag.len {
                        // No bounds check on the path every `defer_drop`
                        // takes: `len` grows only below, one past an entry
                        // stored while it was under the capacity.
                        debug_assert!(bag.len <= BAG_CAPACITY);
                        // SAFETY: `start < len <= BAG_CAPACITY` (above).
                        ready = Some(*unsafe { bag.entries.get_unchecked(bag.start) });
                        // Counted as invoked when the bag leaves
                        // `draining` (`take_draining`).
                        bag.start += 1;
                        // Published by the hand-off's release, as in
                        // `collect`.
                        self.running.store(true, Ordering::Relaxed);
                    }
                }
            }
            let bag = match &mut owned.current {
                Some(bag) => bag,
                empty => empty.insert(owned.spare.pop().unwrap_or_else(Bag::new)),
            };
            debug_assert!(bag.len < BAG_CAPACITY);
            // SAFETY: the current bag is never full: the push that fills it
            // takes it out of `current` (below), and a bag put back there
            // is new or emptied (`recycle`).
            *unsafe { bag.entries.get_unchecked_mut(bag.len) } = entry;
            bag.len += 1;
            if bag.len == BAG_CAPACITY {
                let full = owned.current.take();
                // Snapshots must not decrease along the queue (`collect`
                // relies on it), and a grace period given up rolls the
                // sequence back, so one taken while it ran can exceed the
                // next: take the larger, which only waits longer.
                let snap = grace::snapshot().max(owned.waiting.back().map_or(0, |&(s, _)| s));
                owned.waiting.extend(full.map(|bag| (snap, bag)));
                filled();
                Pushed::Filled
            } else {
                Pushed::Stored {
                    first: bag.len == 1 && owned.waiting.is_empty(),
                }
            }
        });
        match pushed {
            Some(Pushed::Stored { first: true }) => self.has_entries.store(true, Ordering::Relaxed),
            Some(Pushed::Filled) => {
                self.has_entries.store(true, Ordering::Relaxed);
                self.filled.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        (pushed.unwrap_or(Pushed::Busy), ready)
    }

    /// Owner only: runs the entry `push` took.
    #[inline]
    pub(crate) fn run_one(&self, (data, drop_fn): DropEntry) {
        // SAFETY: the entry comes from the draining bag, whose grace
        // period has passed (see `Bag::run`), and `push` handed it out
        // once.
        crate::callback::contain_panic(|| unsafe { drop_fn(data) });
        self.end_run();
    }

    /// Ends a run started under the hand-off (`running` set).
    fn end_run(&self) {
        // `running` clears before `runs` counts the run (both released): a
        // flusher that reads `runs` and then sees `running` set knows the
        // count has not moved yet. `runs` has one writer: a plain
        // increment.
        self.running.store(false, Ordering::Release);
        self.runs
            .store(self.runs.load(Ordering::Relaxed) + 1, Ordering::Release);
    }

    /// Owner only, after `Pushed::Filled`: finishes the draining bag if
    /// pushes have not drained it yet, makes the oldest waiting bag whose
    /// grace period has completed the next draining bag, and bounds how
    /// many wait (running the oldest at once past `MAX_WAITING`). Returns
    /// how many waiting bags still need a grace period and the newest of
    /// their snapshots (the one that makes them all ready). Does nothing
    /// inside a run (a drop that defers more).
    pub(crate) fn collect(&self, may_wait: bool) -> (usize, Option<u64>) {
        enum Step {
            /// Run this bag now, after the grace period of the snapshot.
            Run(Option<u64>, Box<Bag>),
            Done(usize, Option<u64>),
        }
        if self.running.load(Ordering::Relaxed) {
            // The bag that filled waits; ask for its grace period.
            return (1, None);
        }
        let mut done: Option<Box<Bag>> = None;
        loop {
            let step = self.with_owned(|owned| {
                if let Some(bag) = done.take() {
                    owned.recycle(bag);
                }
                let start_run = |bag| {
                    // Published by the hand-off's release: a flusher that
                    // takes the bags after us sees this run in progress.
                    self.running.store(true, Ordering::Relaxed);
                    bag
                };
                if let Some(bag) = owned.take_draining() {
                    // Behind: run the rest now.
                    return Step::Run(None, start_run(bag));
                }
                // Past the bound, wait (sharing grace periods with
                // everyone else) rather than let garbage pile up.
                if may_wait && owned.waiting.len() > MAX_WAITING {
                    let (snap, bag) = owned.waiting.pop_front().expect("non-empty");
                    return Step::Run(Some(snap), start_run(bag));
                }
                if let Some(&(snap, _)) = owned.waiting.front() {
                    if grace::done(snap) {
                        owned.draining = owned.waiting.pop_front().map(|(_, bag)| bag);
                    }
                }
                // Snapshots grow along the queue: the ready bags lead it.
                let ready = owned
                    .waiting
                    .partition_point(|&(snap, _)| grace::done(snap));
                let left = owned.waiting.len() - ready;
                Step::Done(
                    left,
                    owned
                        .waiting
                        .back()
                        .filter(|_| left > 0)
                        .map(|&(snap, _)| snap),
                )
            });
            match step {
                Some(Step::Run(snap, bag)) => {
                    if let Some(snap) = snap {
                        grace::wait(snap);
                    }
                    // For a fork from one of these drops: the child's
                    // recount finds the bag here, out of the thread's bags.
                    self.collecting
                        .store(bag.remaining() as u64, Ordering::Relaxed);
                    bag.run();
                    self.collecting.store(0, Ordering::Relaxed);
                    INVOKED.fetch_add(bag.remaining() as u64, Ordering::Release);
                    self.end_run();
                    done = Some(bag);
                }
                Some(Step::Done(left, oldest)) => return (left, oldest),
                None => return (0, None),
            }
        }
    }

    /// Owner only, after the grace period of the waiting bags completed
    /// (`callback::bag_filled`): makes the oldest ready bag the draining
    /// one, unless a draining bag still has entries (those keep running
    /// one per push; `collect` would run them all at once).
    pub(crate) fn start_draining(&self) {
        if self.running.load(Ordering::Relaxed) {
            return;
        }
        self.with_owned(|owned| {
            if owned
                .draining
                .as_ref()
                .is_some_and(|bag| bag.remaining() > 0)
            {
                return;
            }
            // Counts and recycles a drained bag; none with entries is left.
            let _ = owned.take_draining();
            if let Some(&(snap, _)) = owned.waiting.front() {
                if grace::done(snap) {
                    owned.draining = owned.waiting.pop_front().map(|(_, bag)| bag);
                }
            }
        });
    }

    /// Owner only, where it may neither run drops nor wait (inside a
    /// read-side section, or on the callback thread): hands the oldest
    /// waiting bags past `MAX_WAITING` to `give` (the shared callback
    /// queues), so a thread that retires objects only inside read-side
    /// sections still gets them freed, by the callback thread, instead of
    /// piling up bags until it stops. Queued while the hand-off is held,
    /// as in `hand_over_own`. Returns how many it handed over (none while
    /// a flusher holds the bags: it is taking them all anyway).
    pub(crate) fn hand_over_surplus(&self, mut give: impl FnMut(Box<Bag>)) -> usize {
        self.with_owned(|owned| {
            let surplus = owned.waiting.len().saturating_sub(MAX_WAITING);
            owned
                .waiting
                .drain(..surplus)
                .for_each(|(_, bag)| give(bag));
            surplus
        })
        .unwrap_or(0)
    }

    /// Owner only (thread exit): hands every bag to `give` while still
    /// holding the hand-off, so a `barrier` either finds the bags here or
    /// after `give` has queued them (before its own callbacks).
    pub(crate) fn hand_over_own(&self, mut give: impl FnMut(Box<Bag>)) {
        loop {
            let taken = self.with_owned(|owned| owned.take_all(&mut give));
            if taken.is_some() {
                self.has_entries.store(false, Ordering::Relaxed);
                return;
            }
            self.handoff.owner_wait_for_flusher();
        }
    }

    /// In the fork child, for the forking thread's own slot: the entries
    /// of its bags that were counted as queued when they filled (waiting
    /// bags, and the draining one, whose entries already run are counted
    /// as invoked only when it leaves `draining`) and have not been counted
    /// as invoked, with those of a bag `collect` is running (the fork came
    /// from one of its drops).
    ///
    /// # Safety
    /// Only in the fork child's handler, on the thread that owns the slot:
    /// no one else can touch the bags, and the owner is not inside a push.
    pub(crate) unsafe fn counted_pending_after_fork(&self) -> u64 {
        // SAFETY: the caller's contract.
        let owned = unsafe { &*self.owned.get() };
        let waiting: usize = owned.waiting.iter().map(|(_, bag)| bag.len).sum();
        (waiting + owned.draining.as_ref().map_or(0, |bag| bag.len)) as u64
            + self.collecting.load(Ordering::Relaxed)
    }

    /// Bags the owner has finished running (see `running`).
    pub(crate) fn runs(&self) -> u64 {
        self.runs.load(Ordering::Acquire)
    }

    /// In the fork child, for a slot whose owner did not survive the fork:
    /// hands its bags to `give` (the callback queues), so the child's
    /// `barrier` finds them and the slot's next owner starts empty. If the
    /// owner was inside the hand-off at the fork, it may have been stopped
    /// half-way through changing them: they are leaked instead, and their
    /// drops lost in the child, like other work in flight at a fork. Then
    /// resets the protocol (`reset_after_fork`).
    pub(crate) fn salvage_after_fork(&self, mut give: impl FnMut(Box<Bag>)) {
        // SAFETY: the only thread in the child, and the owner is gone: no
        // one else can touch the bags.
        let owned = unsafe { &mut *self.owned.get() };
        if self.handoff.owner_was_inside() {
            std::mem::forget(std::mem::replace(owned, Owned::empty()));
        } else {
            owned.take_all(&mut give);
        }
        self.has_entries.store(false, Ordering::Relaxed);
        self.reset_after_fork();
    }

    /// In the fork child, for a slot whose owner did not survive the fork:
    /// it may have been stopped inside a push.
    fn reset_after_fork(&self) {
        self.handoff.reset();
        // A `collect` run the owner had in progress is lost with it.
        self.collecting.store(0, Ordering::Relaxed);
        // A run the owner had in progress never ends in the child (its
        // entry is lost, like other work in flight at a fork): end it, or a
        // `barrier` would wait for it forever and the slot's next owner
        // could never run its drops. Always, not only if `running` is
        // still set: an owner stopped inside `end_run`, between its two
        // stores, left `running` clear and the run uncounted, and a
        // `barrier` that saw the run in progress (one that forked from a
        // callback it helped run) waited for the count for good (review
        // finding, forced with gdb). A count too many is harmless: a
        // barrier waits for the count to pass the one it read.
        self.end_run();
    }

    /// The owner is running one of its drops (see `running`).
    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub(crate) fn has_entries(&self) -> bool {
        self.has_entries.load(Ordering::Relaxed)
    }

    pub(crate) fn filled(&self) -> u64 {
        self.filled.load(Ordering::Relaxed)
    }
}

static FLUSH_LOCK: CachePadded<Mutex<()>> = CachePadded::new(Mutex::new(()));

/// A run of a thread's own bag that a flusher saw in progress: done once
/// `slot.bag.runs()` exceeds the count.
pub(crate) type RunInProgress = (&'static crate::registry::Slot, u64);

/// Takes the bags of every registered thread for which `choose` says yes
/// (a flusher, see the module header) and gives each to `queue` before
/// letting the next flusher in, so that a `barrier` that finds nothing to
/// steal knows that whatever an earlier flusher took is already on the
/// queues, ahead of its markers. With `in_progress`, also reports the
/// chosen threads' own runs in progress, which a `barrier` must wait for.
pub(crate) fn steal(
    mut queue: impl FnMut(Box<Bag>),
    mut in_progress: Option<&mut Vec<RunInProgress>>,
    mut choose: impl FnMut(&crate::registry::Slot) -> bool,
) {
    let _flusher = FLUSH_LOCK.lock();
    let mut slots = Vec::new();
    crate::registry::snapshot(&mut slots);
    let want_runs = in_progress.is_some();
    slots.retain(|slot| {
        let bag = &slot.bag;
        (bag.has_entries() || (want_runs && bag.running.load(Ordering::Relaxed))) && choose(slot)
    });
    if slots.is_empty() {
        return;
    }
    for slot in &slots {
        slot.bag.handoff.flusher_mark();
    }
    crate::fence::heavy_barrier();
    for slot in &slots {
        let bag = &slot.bag;
        bag.handoff.flusher_acquire();
        // SAFETY: marked before the heavy barrier, and the owner has left:
        // the hand-off gives us the bags until `flusher_release`.
        let owned = unsafe { &mut *bag.owned.get() };
        owned.take_all(&mut queue);
        bag.has_entries.store(false, Ordering::Relaxed);
        if let Some(runs) = in_progress.as_deref_mut() {
            // `runs` first: if `running` is then still set, the run in
            // progress has not been counted in what we read.
            let done = bag.runs.load(Ordering::Acquire);
            if bag.running.load(Ordering::Acquire) {
                runs.push((*slot, done));
            }
        }
        bag.handoff.flusher_release();
    }
}

/// Before `fork`: no flusher may be half-way through a thread's bags.
pub(crate) fn before_fork() {
    std::mem::forget(FLUSH_LOCK.lock());
}

/// In the parent after `fork`.
pub(crate) fn after_fork_parent() {
    // SAFETY: `before_fork` locked it on this thread and leaked the guard.
    unsafe { FLUSH_LOCK.force_unlock() };
}

/// In the fork child: `before_fork` held the lock across the fork.
pub(crate) fn after_fork_child() {
    // SAFETY: `before_fork` locked it on the forking thread, the only
    // thread of the child, and leaked the guard.
    unsafe { FLUSH_LOCK.force_unlock() };
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Fills one bag of entries that count their runs in `RUNS`; none run
    /// during the pushes.
    fn fill(bag: &LocalBag) {
        for _ in 0..BAG_CAPACITY {
            let (_, ready) = bag.push((std::ptr::null_mut(), count_run), false, || {});
            assert!(ready.is_none());
        }
    }

    static RUNS: AtomicUsize = AtomicUsize::new(0);

    /// # Safety
    /// None needed: it ignores its argument. `unsafe` only to have the
    /// type of a drop function.
    unsafe fn count_run(_: *mut ()) {
        RUNS.fetch_add(1, Ordering::Relaxed);
    }

    /// The test's own view of the bags.
    fn owned(bag: &LocalBag) -> &Owned {
        // SAFETY: the bag is the test's own; no flusher knows of it (it is
        // not in the registry), and the test thread does not push while it
        // holds this reference.
        unsafe { &*bag.owned.get() }
    }

    #[test]
    fn snapshots_never_decrease_along_the_waiting_queue() {
        let bag = LocalBag::new();
        {
            // A bag that fills while a grace period runs that is then
            // given up waits for two grace periods; the next bag, filled
            // after the roll-back, would wait for one if it took its own
            // snapshot, putting a smaller snapshot behind a larger one.
            let _running = grace::given_up_grace_period();
            fill(&bag);
        }
        fill(&bag);
        let snaps: Vec<u64> = owned(&bag).waiting.iter().map(|&(s, _)| s).collect();
        assert_eq!(snaps.len(), 2);
        assert!(snaps[0] <= snaps[1], "snapshots out of order: {snaps:?}");
        // After one grace period the queue still says what it waits for:
        // with the order broken, `collect` found nothing waiting and asked
        // for no grace period.
        crate::synchronize();
        let (left, newest) = bag.collect(false);
        let not_done = snaps.iter().filter(|&&s| !grace::done(s)).count();
        assert!(
            left >= not_done,
            "{left} bags reported waiting, {not_done} are"
        );
        if left > 0 {
            assert_eq!(newest, Some(snaps[1]));
        }
    }

    #[test]
    fn starting_to_drain_runs_no_entry() {
        let bag = LocalBag::new();
        fill(&bag);
        fill(&bag);
        // One grace period is not always enough: a bag filled while the
        // other test holds a given-up grace period waits for two (late,
        // never early). Run them until both bags are due.
        while owned(&bag).waiting.iter().any(|&(s, _)| !grace::done(s)) {
            crate::synchronize();
        }
        let before = RUNS.load(Ordering::Relaxed);
        // The first ready bag becomes the draining one ...
        let (left, _) = bag.collect(true);
        assert_eq!(left, 0);
        assert_eq!(
            owned(&bag).draining.as_ref().map(|b| b.remaining()),
            Some(BAG_CAPACITY)
        );
        // ... and starting to drain again leaves it as it is (`collect`
        // would run all its entries at once).
        bag.start_draining();
        assert_eq!(
            owned(&bag).draining.as_ref().map(|b| b.remaining()),
            Some(BAG_CAPACITY)
        );
        assert_eq!(owned(&bag).waiting.len(), 1);
        // Pushes run its entries one each (and fill a third bag, which
        // waits); once it is empty, the next ready bag takes its place.
        for _ in 0..BAG_CAPACITY {
            let (_, ready) = bag.push((std::ptr::null_mut(), count_run), true, || {});
            bag.run_one(ready.expect("an entry of the draining bag"));
        }
        bag.start_draining();
        assert_eq!(
            owned(&bag).draining.as_ref().map(|b| b.remaining()),
            Some(BAG_CAPACITY)
        );
        assert_eq!(owned(&bag).waiting.len(), 1);
        assert!(RUNS.load(Ordering::Relaxed) - before >= BAG_CAPACITY);
    }

    /// The child's reset of a slot whose owner the fork stopped inside
    /// `end_run`, with `running` cleared and the run not yet counted,
    /// counts the run: a barrier that saw it in progress returns.
    #[test]
    fn a_run_cut_between_its_two_end_stores_is_counted_in_the_child() {
        let bag = LocalBag::new();
        bag.running.store(true, Ordering::Relaxed);
        let done = bag.runs();
        // The owner's `end_run`, stopped after its first store.
        bag.running.store(false, Ordering::Release);
        bag.reset_after_fork();
        assert!(
            bag.runs() > done,
            "the cut run was never counted: a barrier waiting for it hangs"
        );
        assert!(!bag.running());
    }
}
