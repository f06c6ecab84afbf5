//! Magazines and the depot: how free objects move between a CPU, the shared
//! depot and the slabs.
//!
//! Protocol. Each CPU owns a bounded LIFO of free objects, its *magazine*
//! ([`CpuMagazines`], `vmtask_percpu::CpuCache` in production). Allocation
//! pops from the current CPU's magazine and freeing pushes onto it; neither
//! writes a shared cache line. Only when a pop finds the magazine empty, or a
//! push finds it full (or held by another thread on the same CPU), does the
//! slow path run, and it moves objects in whole magazines:
//!
//! - *Empty on alloc*: take a magazine of objects from the depot (else fill
//!   one from the slabs), keep one object, push the rest onto the CPU's
//!   magazine; what does not fit goes back to the depot whole.
//! - *Full on free*: drain the CPU's magazine into a spare magazine, push
//!   the freed object onto the now empty CPU magazine, and give the drained
//!   magazine to the depot.
//! - *RCU magazine after its grace period* ([`Magazines::put_returned`]):
//!   goes to the depot whole, ready for the next empty-on-alloc.
//!
//! The depot holds magazines of objects and spare empty magazines. Both are
//! bounded by `depot_magazines`: past it, a magazine drained from a full CPU
//! magazine returns its objects to their slabs. Returning RCU magazines are
//! exempt. All of a grace period's deferred frees come back at once, and
//! flushing them to the slabs would turn each magazine move into single
//! frees under the slab lock, and the next allocations into slab refills:
//! the flood that made the seeds' cache useless. Their number is bounded by
//! what was in flight (the free rate times the grace-period latency, which
//! `vmtask_rcu`'s backlog limit bounds); the objects are the working set of
//! the last grace period and stay resident either way, and `shrink()`
//! empties the depot. Its lists sit behind one mutex held for
//! a push or pop of a magazine pointer: every object crosses it at most once
//! per magazine, never one by one.
//!
//! Ownership is the invariant: at every moment an object is in exactly one
//! place (a CPU magazine, a magazine owned by one thread, the depot, a slab
//! free list, or a user's hands). Each step above moves objects between
//! places under the lock of both or by a single owner; the loom model
//! `loom_magazine_hand_off_conserves_objects` checks it.

use std::ptr::NonNull;

use vmtask_percpu::CacheMode;
use vmtask_rcu::RcuHead;

use crate::error::SlabError;
use crate::stats::{Counters, Event};
use crate::sync::{lock, Mutex};

/// A magazine of free objects (also an RCU magazine: `head` lets it travel
/// through `call_intrusive` without an allocation).
#[repr(C)]
pub(crate) struct Magazine {
    /// First field, so a `*mut RcuHead` is also a `*mut Magazine`.
    head: RcuHead,
    /// The cache the magazine returns to after its grace period.
    owner: *const (),
    pub(crate) objects: Vec<NonNull<u8>>,
}

// SAFETY: a magazine holds pointers to free objects that whoever holds the
// magazine owns; `owner` is only dereferenced by the cache's RCU callback,
// whose safety argument lives there.
unsafe impl Send for Magazine {}

impl Magazine {
    pub(crate) fn new(size: usize) -> Box<Self> {
        Box::new(Magazine {
            head: RcuHead::new(),
            owner: std::ptr::null(),
            objects: Vec::with_capacity(size),
        })
    }

    /// Gives up the box for `call_intrusive`, remembering `owner`.
    pub(crate) fn into_head(mut self: Box<Self>, owner: *const ()) -> *mut RcuHead {
        self.owner = owner;
        // `head` is the first field of a `repr(C)` struct.
        Box::into_raw(self).cast::<RcuHead>()
    }

    /// The magazine and owner given to [`into_head`](Self::into_head).
    ///
    /// # Safety
    /// `head` must come from `into_head` and not have been passed here
    /// before.
    pub(crate) unsafe fn from_head(head: *mut RcuHead) -> (Box<Self>, *const ()) {
        // SAFETY: `head` is the start of a boxed Magazine given up by
        // `into_head` (caller's contract), so this takes that box back.
        let magazine = unsafe { Box::from_raw(head.cast::<Magazine>()) };
        let owner = magazine.owner;
        (magazine, owner)
    }
}

/// The per-CPU magazines (see the module documentation).
pub(crate) trait CpuMagazines {
    /// Pops from the current CPU's magazine; `None` if empty or busy.
    fn pop(&self) -> Option<NonNull<u8>>;
    /// Pushes onto the current CPU's magazine; gives `object` back if full
    /// or busy.
    fn push(&self, object: NonNull<u8>) -> Result<(), NonNull<u8>>;
    /// Moves up to `max` objects from the current CPU's magazine to `out`.
    fn drain_current(&self, max: usize, out: &mut Vec<NonNull<u8>>);
    /// Moves every object of every CPU's magazine to `out`.
    fn drain_all(&self, out: &mut Vec<NonNull<u8>>);
    /// Objects in all CPU magazines now.
    fn total_len(&self) -> usize;
    /// Whether push and pop are restartable sequences.
    fn is_rseq(&self) -> bool;
}

/// `CpuCache::pop` and `push` hold both modes' code. Inlined whole, the
/// try-lock half made `SlabBox`'s drop glue too large for the compiler to
/// inline into a caller with many drops, and the call cost about as much as
/// the free itself. So the fast paths test the mode here, where inlining
/// `CpuCache`'s own test of the same field folds it away, and reach the
/// try-lock mode through a call (it costs two atomic swaps anyway).
impl CpuMagazines for vmtask_percpu::CpuCache {
    #[inline(always)]
    fn pop(&self) -> Option<NonNull<u8>> {
        if self.mode() == CacheMode::Rseq {
            vmtask_percpu::CpuCache::pop(self)
        } else {
            pop_out_of_line(self)
        }
    }

    #[inline(always)]
    fn push(&self, object: NonNull<u8>) -> Result<(), NonNull<u8>> {
        if self.mode() == CacheMode::Rseq {
            vmtask_percpu::CpuCache::push(self, object)
        } else {
            push_out_of_line(self, object)
        }
    }

    /// Pops one by one rather than calling `CpuCache::drain`: a drain stops
    /// the area with a `membarrier` system call (an IPI to the CPU), which
    /// costs microseconds; a pop costs nanoseconds. A migration midway only
    /// means some objects come from another CPU's magazine.
    fn drain_current(&self, max: usize, out: &mut Vec<NonNull<u8>>) {
        for _ in 0..max {
            match vmtask_percpu::CpuCache::pop(self) {
                Some(object) => out.push(object),
                None => break,
            }
        }
    }

    fn drain_all(&self, out: &mut Vec<NonNull<u8>>) {
        for cpu in 0..self.cpus() {
            self.drain(cpu, usize::MAX, out);
        }
    }

    fn total_len(&self) -> usize {
        vmtask_percpu::CpuCache::total_len(self)
    }

    fn is_rseq(&self) -> bool {
        self.mode() == vmtask_percpu::CacheMode::Rseq
    }
}

#[inline(never)]
fn pop_out_of_line(cache: &vmtask_percpu::CpuCache) -> Option<NonNull<u8>> {
    cache.pop()
}

#[inline(never)]
fn push_out_of_line(
    cache: &vmtask_percpu::CpuCache,
    object: NonNull<u8>,
) -> Result<(), NonNull<u8>> {
    cache.push(object)
}

/// Where objects come from when the depot is empty and go when it is full:
/// the slabs.
pub(crate) trait Backing {
    /// Moves up to `max` (at least one) objects into `out`.
    fn take(&self, max: usize, out: &mut Vec<NonNull<u8>>) -> Result<usize, SlabError>;
    /// Takes objects back.
    fn give_back(&self, objects: &[NonNull<u8>]);
}

/// Magazines stay boxed: an RCU magazine's embedded head needs a stable
/// address, and moving a magazine between lists moves one pointer.
#[allow(clippy::vec_box)]
struct DepotLists {
    full: Vec<Box<Magazine>>,
    empty: Vec<Box<Magazine>>,
    /// Objects in `full`.
    objects: usize,
}

/// The shared depot ("barn") of magazines.
struct Depot {
    lists: Mutex<DepotLists>,
    max_magazines: usize,
}

impl Depot {
    fn take_full(&self) -> Option<Box<Magazine>> {
        let mut lists = lock(&self.lists);
        let magazine = lists.full.pop()?;
        lists.objects -= magazine.objects.len();
        Some(magazine)
    }

    /// Adds a magazine of objects; refuses it at the bound unless
    /// `bounded` is false.
    fn try_put_full(&self, magazine: Box<Magazine>, bounded: bool) -> Result<(), Box<Magazine>> {
        let mut lists = lock(&self.lists);
        if bounded && lists.full.len() >= self.max_magazines {
            return Err(magazine);
        }
        lists.objects += magazine.objects.len();
        lists.full.push(magazine);
        Ok(())
    }

    fn take_empty(&self) -> Option<Box<Magazine>> {
        lock(&self.lists).empty.pop()
    }

    fn put_empty(&self, magazine: Box<Magazine>) {
        debug_assert!(magazine.objects.is_empty());
        let mut lists = lock(&self.lists);
        if lists.empty.len() < self.max_magazines {
            lists.empty.push(magazine);
        }
    }
}

/// Per-CPU magazines in front of a depot.
pub(crate) struct Magazines<C: CpuMagazines> {
    cpu: C,
    /// Per-CPU spare empty magazines (boxed `Magazine` pointers), so that
    /// the hand-off of a magazine's container does not take the depot lock:
    /// a refill leaves one behind, an overflow or an RCU magazine needs one.
    spares: C,
    depot: Depot,
    size: usize,
    pub(crate) counters: Counters,
}

/// Where the free objects outside the slabs are (a snapshot).
pub(crate) struct MagazineCounts {
    pub(crate) cpu_objects: usize,
    pub(crate) depot_objects: usize,
    pub(crate) depot_magazines: usize,
}

impl<C: CpuMagazines> Magazines<C> {
    /// `cpu` holds at most `size` objects per CPU; the depot keeps at most
    /// `max_magazines` magazines of objects.
    pub(crate) fn new(cpu: C, spares: C, size: usize, max_magazines: usize) -> Self {
        Magazines {
            cpu,
            spares,
            depot: Depot {
                lists: Mutex::new(DepotLists {
                    full: Vec::new(),
                    empty: Vec::new(),
                    objects: 0,
                }),
                max_magazines,
            },
            size,
            counters: Counters::new(),
        }
    }

    /// An object, from the current CPU's magazine if it has one.
    #[inline(always)]
    pub(crate) fn alloc(&self, backing: &impl Backing) -> Result<NonNull<u8>, SlabError> {
        if let Some(object) = self.cpu.pop() {
            self.counters.bump(Event::AllocHit);
            return Ok(object);
        }
        self.alloc_slow(backing)
    }

    #[cold]
    fn alloc_slow(&self, backing: &impl Backing) -> Result<NonNull<u8>, SlabError> {
        let mut magazine = match self.depot.take_full() {
            Some(magazine) => {
                self.counters.add(Event::DepotGet, 1);
                magazine
            }
            None => {
                let mut magazine = self.empty_magazine();
                match backing.take(self.size, &mut magazine.objects) {
                    Ok(taken) => self.counters.add(Event::SlabOut, taken as u64),
                    Err(error) => {
                        // No new slab (the limit, or the system refused
                        // one), but free objects may sit in the depot (put
                        // there since we looked) or in other CPUs'
                        // magazines: take them before failing. Off the hot
                        // path, so the drain's membarriers are affordable.
                        if let Some(full) = self.depot.take_full() {
                            self.counters.add(Event::DepotGet, 1);
                            self.put_empty(std::mem::replace(&mut magazine, full));
                        } else {
                            self.cpu.drain_all(&mut magazine.objects);
                            if magazine.objects.is_empty() {
                                self.put_empty(magazine);
                                return Err(error);
                            }
                        }
                    }
                }
                magazine
            }
        };
        let object = magazine
            .objects
            .pop()
            .expect("magazines in the depot and from the slabs hold objects");
        while let Some(extra) = magazine.objects.pop() {
            if let Err(extra) = self.cpu.push(extra) {
                magazine.objects.push(extra);
                break;
            }
        }
        self.put_full(magazine, true, backing);
        // Counted once the allocation succeeded: a failed one is no allocation.
        self.counters.add(Event::AllocMiss, 1);
        Ok(object)
    }

    /// Returns `object`, to the current CPU's magazine if it has room.
    #[inline(always)]
    pub(crate) fn free(&self, object: NonNull<u8>, backing: &impl Backing) {
        // Not counted: frees are derived from allocations and occupancy,
        // which keeps the fast path to one counter per alloc+free pair.
        if let Err(object) = self.cpu.push(object) {
            self.free_slow(object, backing);
        }
    }

    #[cold]
    fn free_slow(&self, object: NonNull<u8>, backing: &impl Backing) {
        self.counters.add(Event::FreeMiss, 1);
        let mut magazine = self.empty_magazine();
        self.cpu.drain_current(self.size, &mut magazine.objects);
        if let Err(object) = self.cpu.push(object) {
            // Another thread on this CPU holds its magazine right now.
            if magazine.objects.len() < self.size {
                magazine.objects.push(object);
            } else {
                backing.give_back(&[object]);
                self.counters.add(Event::SlabIn, 1);
            }
        }
        self.put_full(magazine, true, backing);
    }

    /// Gives an RCU magazine, back from its grace period, to the depot
    /// whole (exempt from the bound; see the module documentation).
    pub(crate) fn put_returned(&self, magazine: Box<Magazine>, backing: &impl Backing) {
        self.put_full(magazine, false, backing);
    }

    /// Gives a magazine of objects to the depot, or its objects to the slabs
    /// if the depot is at its bound; keeps the empty magazine as a spare.
    fn put_full(&self, mut magazine: Box<Magazine>, bounded: bool, backing: &impl Backing) {
        if magazine.objects.is_empty() {
            self.put_empty(magazine);
            return;
        }
        match self.depot.try_put_full(magazine, bounded) {
            Ok(()) => self.counters.add(Event::DepotPut, 1),
            Err(returned) => {
                magazine = returned;
                backing.give_back(&magazine.objects);
                self.counters
                    .add(Event::SlabIn, magazine.objects.len() as u64);
                magazine.objects.clear();
                self.put_empty(magazine);
            }
        }
    }

    /// A spare empty magazine: this CPU's, else the depot's, else a new one.
    pub(crate) fn empty_magazine(&self) -> Box<Magazine> {
        if let Some(spare) = self.spares.pop() {
            // SAFETY: `spares` holds only pointers from `Box::leak` in
            // `put_empty`, each popped once.
            return unsafe { Box::from_raw(spare.cast::<Magazine>().as_ptr()) };
        }
        self.depot
            .take_empty()
            .unwrap_or_else(|| Magazine::new(self.size))
    }

    /// Keeps an empty magazine as a spare: on this CPU, else in the depot.
    fn put_empty(&self, magazine: Box<Magazine>) {
        debug_assert!(magazine.objects.is_empty());
        let spare = NonNull::from(Box::leak(magazine)).cast::<u8>();
        if let Err(spare) = self.spares.push(spare) {
            // SAFETY: leaked just above and stored nowhere.
            let magazine = unsafe { Box::from_raw(spare.cast::<Magazine>().as_ptr()) };
            self.depot.put_empty(magazine);
        }
    }

    /// Returns every object in the CPU magazines and the depot to the slabs,
    /// and frees the spare magazines. Returns how many objects moved.
    pub(crate) fn drain_all(&self, backing: &impl Backing) -> usize {
        let mut objects = Vec::new();
        self.cpu.drain_all(&mut objects);
        let (full, empty) = {
            let mut lists = lock(&self.depot.lists);
            lists.objects = 0;
            (
                std::mem::take(&mut lists.full),
                std::mem::take(&mut lists.empty),
            )
        };
        drop(empty);
        for magazine in full {
            objects.extend_from_slice(&magazine.objects);
        }
        backing.give_back(&objects);
        self.counters.add(Event::SlabIn, objects.len() as u64);
        objects.len()
    }

    pub(crate) fn size(&self) -> usize {
        self.size
    }

    pub(crate) fn is_rseq(&self) -> bool {
        self.cpu.is_rseq()
    }

    pub(crate) fn counts(&self) -> MagazineCounts {
        let cpu_objects = self.cpu.total_len();
        let lists = lock(&self.depot.lists);
        MagazineCounts {
            cpu_objects,
            depot_objects: lists.objects,
            depot_magazines: lists.full.len(),
        }
    }
}

impl<C: CpuMagazines> Drop for Magazines<C> {
    fn drop(&mut self) {
        let mut spares = Vec::new();
        self.spares.drain_all(&mut spares);
        for spare in spares {
            // SAFETY: `spares` holds only pointers from `Box::leak` in
            // `put_empty`; draining took each out once.
            drop(unsafe { Box::from_raw(spare.cast::<Magazine>().as_ptr()) });
        }
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// One CPU's magazine shared by every thread, as when threads share a
    /// CPU or migrate: a try-locked bounded stack, like `CpuCache`.
    struct OneCpu {
        stack: Mutex<Vec<NonNull<u8>>>,
        capacity: usize,
    }

    impl CpuMagazines for OneCpu {
        fn pop(&self) -> Option<NonNull<u8>> {
            self.stack.try_lock().ok()?.pop()
        }
        fn push(&self, object: NonNull<u8>) -> Result<(), NonNull<u8>> {
            let Ok(mut stack) = self.stack.try_lock() else {
                return Err(object);
            };
            if stack.len() == self.capacity {
                return Err(object);
            }
            stack.push(object);
            Ok(())
        }
        fn drain_current(&self, max: usize, out: &mut Vec<NonNull<u8>>) {
            let mut stack = lock(&self.stack);
            let keep = stack.len().saturating_sub(max);
            out.extend(stack.drain(keep..).rev());
        }
        fn drain_all(&self, out: &mut Vec<NonNull<u8>>) {
            self.drain_current(usize::MAX, out);
        }
        fn total_len(&self) -> usize {
            lock(&self.stack).len()
        }
        fn is_rseq(&self) -> bool {
            false
        }
    }

    struct Slabs(Mutex<Vec<NonNull<u8>>>);

    impl Backing for Slabs {
        fn take(&self, max: usize, out: &mut Vec<NonNull<u8>>) -> Result<usize, SlabError> {
            let mut free = lock(&self.0);
            let take = max.min(free.len());
            assert!(take > 0, "the model never exhausts its slabs");
            let keep = free.len() - take;
            out.extend(free.drain(keep..));
            Ok(take)
        }
        fn give_back(&self, objects: &[NonNull<u8>]) {
            lock(&self.0).extend_from_slice(objects);
        }
    }

    struct World {
        magazines: Magazines<OneCpu>,
        slabs: Slabs,
    }

    // SAFETY: the model's pointers are fake addresses that are never
    // dereferenced; they are only counted.
    unsafe impl Send for World {}
    // SAFETY: as above.
    unsafe impl Sync for World {}

    const OBJECTS: usize = 6;

    fn object(n: usize) -> NonNull<u8> {
        NonNull::new((16 * (n + 1)) as *mut u8).unwrap()
    }

    fn world() -> Arc<World> {
        Arc::new(World {
            // Magazines of 2 and a depot of 1: every path (depot refill,
            // slab refill, drain on full, depot overflow) is a step or two
            // away.
            magazines: Magazines::new(
                OneCpu {
                    stack: Mutex::new(Vec::new()),
                    capacity: 2,
                },
                OneCpu {
                    stack: Mutex::new(Vec::new()),
                    capacity: 1,
                },
                2,
                1,
            ),
            slabs: Slabs(Mutex::new((0..OBJECTS).map(object).collect())),
        })
    }

    /// Every object is found exactly once after the model's threads finish.
    fn assert_conserved(world: &World, held: Vec<NonNull<u8>>) {
        let mut all = held;
        world.magazines.drain_all(&world.slabs);
        all.extend(lock(&world.slabs.0).iter().copied());
        all.sort();
        let expected: Vec<_> = (0..OBJECTS).map(object).collect();
        assert_eq!(all, expected, "objects lost or duplicated");
    }

    /// Two threads allocate and free through one CPU magazine, the depot
    /// and the slabs at once.
    #[test]
    fn loom_magazine_hand_off_conserves_objects() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(|| {
            let world = world();
            let other = {
                let world = world.clone();
                thread::spawn(move || {
                    let a = world.magazines.alloc(&world.slabs).unwrap();
                    let b = world.magazines.alloc(&world.slabs).unwrap();
                    world.magazines.free(a, &world.slabs);
                    world.magazines.free(b, &world.slabs);
                })
            };
            let c = world.magazines.alloc(&world.slabs).unwrap();
            world.magazines.free(c, &world.slabs);
            let d = world.magazines.alloc(&world.slabs).unwrap();
            other.join().unwrap();
            assert_conserved(&world, vec![d]);
        });
    }

    /// An RCU magazine returns to the depot (on the callback thread) while
    /// another thread allocates from it.
    #[test]
    fn loom_rcu_magazine_return_races_alloc() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(|| {
            let world = world();
            // Two objects were freed through an RCU magazine.
            let mut rcu = Magazine::new(2);
            world.slabs.take(2, &mut rcu.objects).unwrap();
            let callback = {
                let world = world.clone();
                thread::spawn(move || world.magazines.put_returned(rcu, &world.slabs))
            };
            let a = world.magazines.alloc(&world.slabs).unwrap();
            let b = world.magazines.alloc(&world.slabs).unwrap();
            world.magazines.free(a, &world.slabs);
            callback.join().unwrap();
            assert_conserved(&world, vec![b]);
        });
    }
}
