//! Statistics: event counters and the [`SlabStats`] snapshot.
//!
//! The fast path must not write a shared cache line, and must not pay for
//! finding the current CPU a second time (the magazine's restartable
//! sequence already read it, and a `cpu()` read plus a bounds-checked row
//! index measured 2 ns of an 8 ns alloc+free). So there are two kinds of
//! rows, and an event is the sum over both:
//!
//! - **Per thread** ([`Counters::bump`], fast-path events). Each thread that
//!   counts an event of a cache gets its own cache-padded row for that
//!   cache, registered with the cache. Only that thread writes the row, so
//!   a relaxed load and store is an exact increment; `stats()` reads the
//!   rows with relaxed loads (a snapshot). The thread finds its row through
//!   a small direct-mapped memo in a constant-initialised thread-local
//!   (cache id → row address): on the fast path, one `%fs`-relative load,
//!   a compare, and the increment.
//! - **Per CPU** ([`Counters::add`], slow-path events, and fast-path events
//!   of a thread whose thread-locals are already destroyed): atomic adds on
//!   the current CPU's row.
//!
//! Lifetime of the per-thread rows. A row is an `Arc` held by the cache's
//! registry and by the thread's list of rows (`THREAD_ROWS`). The memo
//! points only to rows that the thread's list holds: the list clears the
//! memo's entries before it lets a row go (when its cache is gone, or when
//! the thread exits), so the memo never dangles. Cache ids are never
//! reused, so a memo entry of a dropped cache never matches another cache.
//! A thread that exits folds its rows into each cache's `exited` row and
//! takes them out of the registries, so a cache keeps one row per running
//! thread, not per thread that ever allocated.
//!
//! These are statistics; the object counts in [`SlabStats`] come from the
//! slab layer and the magazines, not from these counters.

use crossbeam_utils::CachePadded;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::Bytes;

/// Events counted.
#[derive(Clone, Copy)]
pub(crate) enum Event {
    /// An allocation served by the CPU's magazine.
    AllocHit,
    /// An allocation that went to the depot or the slabs.
    AllocMiss,
    /// A free that moved a magazine to the depot.
    FreeMiss,
    /// A magazine with objects taken from the depot.
    DepotGet,
    /// A magazine with objects given to the depot.
    DepotPut,
    /// Objects taken from slabs.
    SlabOut,
    /// Objects returned to slabs.
    SlabIn,
    /// Objects freed with `free_rcu`.
    RcuFree,
    /// RCU magazines handed to `call_intrusive`.
    RcuSubmit,
}

const EVENTS: usize = 9;

type Row = CachePadded<[AtomicU64; EVENTS]>;

fn new_row() -> Row {
    CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0)))
}

/// Entries of the per-thread memo; caches are numbered in creation order,
/// so up to this many caches created one after another never collide.
const MEMO_WAYS: usize = 8;

/// A memo entry: a cache id (0: none) and this thread's row for it.
type MemoEntry = Cell<(u64, *const Row)>;

/// The ids of caches; 0 marks an empty memo entry.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A cache's per-thread rows, shared by the cache and those threads.
struct Registry {
    /// The rows of threads that still run.
    rows: Mutex<Vec<Arc<Row>>>,
    /// What exited threads counted.
    exited: Row,
    /// Set when the cache is dropped: threads then let go of their rows.
    dropped: AtomicBool,
}

impl Registry {
    fn rows(&self) -> MutexGuard<'_, Vec<Arc<Row>>> {
        self.rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One of this thread's rows: the cache's id and registry, and the row.
struct ThreadRow {
    id: u64,
    registry: Arc<Registry>,
    row: Arc<Row>,
}

impl ThreadRow {
    /// Whether the cache is gone. Not "this list holds the last reference
    /// to its registry": every thread that counted for the cache holds one,
    /// so with two long-lived threads that count never drops to one.
    fn is_orphaned(&self) -> bool {
        self.registry.dropped.load(Ordering::Relaxed)
    }
}

/// This thread's rows.
struct ThreadRows(Vec<ThreadRow>);

impl Drop for ThreadRows {
    fn drop(&mut self) {
        // The rows go with this list: forget them first.
        let _ = MEMO.try_with(|memo| memo.iter().for_each(|entry| entry.set((0, ptr::null()))));
        // Fold each row into its cache's `exited` row and take it out of
        // the registry under one lock, so `sum` counts it exactly once; a
        // long-lived cache does not keep a row per thread that ever used it.
        for thread_row in self.0.drain(..) {
            let mut rows = thread_row.registry.rows();
            let counts = thread_row.row.iter();
            for (exited, counted) in thread_row.registry.exited.iter().zip(counts) {
                exited.fetch_add(counted.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            rows.retain(|row| !Arc::ptr_eq(row, &thread_row.row));
        }
    }
}

thread_local! {
    /// Constant-initialised and without a destructor, so reading it is a
    /// plain `%fs`-relative load with no lazy-initialisation check.
    static MEMO: [MemoEntry; MEMO_WAYS] = const { [const { Cell::new((0, ptr::null())) }; MEMO_WAYS] };
    static THREAD_ROWS: RefCell<ThreadRows> = const { RefCell::new(ThreadRows(Vec::new())) };
}

pub(crate) struct Counters {
    id: u64,
    cpus: Box<[Row]>,
    registry: Arc<Registry>,
}

impl Drop for Counters {
    fn drop(&mut self) {
        self.registry.dropped.store(true, Ordering::Relaxed);
    }
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cpus: (0..vmtask_percpu::possible_cpus())
                .map(|_| new_row())
                .collect(),
            registry: Arc::new(Registry {
                rows: Mutex::new(Vec::new()),
                exited: new_row(),
                dropped: AtomicBool::new(false),
            }),
        }
    }

    /// Counts one fast-path event on this thread's row (see the module
    /// documentation).
    #[inline(always)]
    pub(crate) fn bump(&self, event: Event) {
        let counted = MEMO.with(|memo| {
            let (id, row) = memo[self.id as usize % MEMO_WAYS].get();
            if id != self.id {
                return false;
            }
            // SAFETY: a memo entry with this cache's id points to this
            // thread's row for the cache, which this thread's list keeps
            // alive for as long as the entry exists (module documentation).
            let counter = &unsafe { &*row }[event as usize];
            // This thread is the row's only writer: no increment is lost.
            counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            true
        });
        if !counted {
            self.bump_slow(event);
        }
    }

    /// `bump` for a thread without a memo entry for this cache: finds or
    /// registers its row and remembers it.
    #[cold]
    #[inline(never)]
    fn bump_slow(&self, event: Event) {
        let row = THREAD_ROWS.try_with(|rows| {
            let mut rows = rows.borrow_mut();
            if let Some(found) = rows.0.iter().find(|row| row.id == self.id) {
                return Arc::as_ptr(&found.row);
            }
            // Let go of the rows of dropped caches, forgetting their memo
            // entries first.
            MEMO.with(|memo| {
                for orphan in rows.0.iter().filter(|row| row.is_orphaned()) {
                    let entry = &memo[orphan.id as usize % MEMO_WAYS];
                    if entry.get().0 == orphan.id {
                        entry.set((0, ptr::null()));
                    }
                }
            });
            rows.0.retain(|row| !row.is_orphaned());
            let row = Arc::new(new_row());
            self.registry.rows().push(row.clone());
            let ptr = Arc::as_ptr(&row);
            rows.0.push(ThreadRow {
                id: self.id,
                registry: self.registry.clone(),
                row,
            });
            ptr
        });
        match row {
            Ok(row) => {
                MEMO.with(|memo| memo[self.id as usize % MEMO_WAYS].set((self.id, row)));
                // SAFETY: `row` is held by this thread's list, just looked
                // up or inserted; only this thread writes it.
                let counter = &unsafe { &*row }[event as usize];
                counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            // This thread's thread-locals are being destroyed.
            Err(_) => self.add(event, 1),
        }
    }

    /// Counts `n` slow-path events exactly.
    pub(crate) fn add(&self, event: Event, n: u64) {
        self.cpus[vmtask_percpu::cpu()][event as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over CPUs, running threads and exited threads.
    pub(crate) fn sum(&self, event: Event) -> u64 {
        let threads = self.registry.rows();
        self.cpus
            .iter()
            .chain(std::iter::once(&self.registry.exited))
            .chain(threads.iter().map(|row| &**row))
            .map(|row| row[event as usize].load(Ordering::Relaxed))
            .sum()
    }
}

/// A snapshot of a cache's counters and occupancy; print it with `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlabStats {
    /// The cache's name.
    pub name: String,
    /// Bytes per object, including its header.
    pub object_bytes: usize,
    /// Objects per slab.
    pub objects_per_slab: usize,
    /// Whether the per-CPU magazines use restartable sequences (no atomic
    /// instruction on the fast path) rather than a per-CPU try-lock.
    pub rseq_fast_path: bool,
    /// Allocations.
    pub allocs: u64,
    /// Immediate frees (drops of `SlabBox` and of last `SlabArc`s): the
    /// allocations not in use and not freed with `free_rcu`.
    pub frees: u64,
    /// Frees that found the CPU's magazine full and moved it to the depot.
    pub free_misses: u64,
    /// Allocations served by the current CPU's magazine.
    pub magazine_hits: u64,
    /// Allocations that went to the depot or the slabs.
    pub magazine_misses: u64,
    /// Magazines of objects taken from the depot.
    pub depot_gets: u64,
    /// Magazines of objects given to the depot (from full CPU magazines and
    /// from RCU magazines after their grace period).
    pub depot_puts: u64,
    /// Magazines with objects in the depot now.
    pub depot_magazines: usize,
    /// Objects taken from slabs into magazines.
    pub slab_objects_out: u64,
    /// Objects returned from magazines to slabs (depot overflow, shrink).
    pub slab_objects_in: u64,
    /// Objects freed with `free_rcu`.
    pub rcu_frees: u64,
    /// RCU magazines sent through a grace period.
    pub rcu_magazines: u64,
    /// RCU magazines waiting for their grace period now.
    pub rcu_magazines_in_flight: u64,
    /// Objects freed with `free_rcu` and not back yet (in flight, or in a
    /// CPU's RCU magazine that is not full yet).
    pub rcu_objects_waiting: u64,
    /// Slabs mapped now.
    pub slabs: usize,
    /// Objects allocated and not freed now (including those waiting in RCU
    /// magazines for their grace period).
    pub objects_in_use: usize,
    /// Objects free in magazines, the depot and slabs now.
    pub objects_free: usize,
    /// Slab memory mapped now; every page of it is touched by the
    /// constructor, so this is also what the cache adds to `VmRSS`.
    pub resident_bytes: usize,
}

impl SlabStats {
    /// Allocations served by the current CPU's magazine, as a fraction.
    pub fn magazine_hit_rate(&self) -> f64 {
        ratio(self.magazine_hits, self.allocs)
    }

    /// Allocations served by an object that came back through the
    /// magazines (CPU magazine or depot) rather than out of a slab, as a
    /// fraction: the cache's hit rate in the seeds' sense.
    pub fn recycle_rate(&self) -> f64 {
        if self.allocs == 0 {
            return 0.0;
        }
        1.0 - ratio(self.slab_objects_out.min(self.allocs), self.allocs)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl fmt::Display for SlabStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "slab cache `{}`: {}-byte objects, {} per slab, {} fast path",
            self.name,
            self.object_bytes,
            self.objects_per_slab,
            if self.rseq_fast_path {
                "rseq"
            } else {
                "try-lock"
            }
        )?;
        writeln!(
            f,
            "  allocs {}  frees {} (misses {})  rcu frees {}",
            self.allocs, self.frees, self.free_misses, self.rcu_frees
        )?;
        writeln!(
            f,
            "  magazine hits {} misses {} (hit rate {:.1}%, recycled {:.1}%)",
            self.magazine_hits,
            self.magazine_misses,
            100.0 * self.magazine_hit_rate(),
            100.0 * self.recycle_rate()
        )?;
        writeln!(
            f,
            "  depot gets {} puts {} holding {}  slab objects out {} in {}",
            self.depot_gets,
            self.depot_puts,
            self.depot_magazines,
            self.slab_objects_out,
            self.slab_objects_in
        )?;
        writeln!(
            f,
            "  rcu magazines {} in flight {}  objects waiting {}",
            self.rcu_magazines, self.rcu_magazines_in_flight, self.rcu_objects_waiting
        )?;
        write!(
            f,
            "  slabs {}  objects in use {} free {}  resident {}",
            self.slabs,
            self.objects_in_use,
            self.objects_free,
            Bytes(self.resident_bytes)
        )
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{Counters, Event, THREAD_ROWS};
    use std::sync::{Arc, Barrier};

    /// Two long-lived threads count for caches that come and go: each
    /// thread lets go of a dropped cache's row (and its registry) at its
    /// next new cache, however many threads shared it. An audit found the
    /// rows kept for as long as a second thread that used the cache lived.
    #[test]
    fn rows_of_dropped_caches_are_released_by_every_thread() {
        const THREADS: usize = 2;
        let barrier = Barrier::new(THREADS + 1);
        let current: std::sync::Mutex<Option<Arc<Counters>>> = std::sync::Mutex::new(None);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        let mut most = 0;
                        for _ in 0..50 {
                            barrier.wait();
                            let counters = current.lock().unwrap().clone().unwrap();
                            counters.bump(Event::AllocHit);
                            drop(counters);
                            most = most.max(THREAD_ROWS.with(|rows| rows.borrow().0.len()));
                            barrier.wait();
                        }
                        most
                    })
                })
                .collect();
            for _ in 0..50 {
                *current.lock().unwrap() = Some(Arc::new(Counters::new()));
                barrier.wait();
                barrier.wait();
                // The last reference: the cache is dropped.
                *current.lock().unwrap() = None;
            }
            for worker in workers {
                let most = worker.join().unwrap();
                assert!(
                    most <= 2,
                    "a thread kept {most} rows for 50 caches, one live at a time"
                );
            }
        });
    }

    #[test]
    fn exited_threads_rows_are_folded_into_the_total_and_released() {
        let counters = Counters::new();
        for _ in 0..8 {
            std::thread::scope(|s| {
                s.spawn(|| (0..100).for_each(|_| counters.bump(Event::AllocHit)));
            });
        }
        counters.bump(Event::AllocHit);
        assert_eq!(counters.sum(Event::AllocHit), 801);
        // A scoped thread is joined when its closure returns; its
        // thread-local destructors (which fold its row) may run a moment
        // later, as the OS thread exits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while counters.registry.rows().len() > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            counters.registry.rows().len(),
            1,
            "only the running thread keeps a row"
        );
        assert_eq!(counters.sum(Event::AllocHit), 801);
    }
}
