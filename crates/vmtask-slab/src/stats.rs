//! Statistics: per-CPU event counters and the [`SlabStats`] snapshot.
//!
//! The fast path must not write a shared cache line, so events are counted
//! in a cache-padded row per CPU. Fast-path events ([`Counters::bump`]) are
//! a relaxed load and store, not a read-modify-write: two threads on the
//! same CPU (one preempted mid-increment) can lose an increment. These are
//! statistics, not accounting; the object counts in [`SlabStats`] come from
//! the slab layer and the magazines, not from these counters.

use crossbeam_utils::CachePadded;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Bytes;

/// Events counted per CPU.
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

pub(crate) struct Counters {
    cpus: Box<[CachePadded<[AtomicU64; EVENTS]>]>,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            cpus: (0..vmtask_percpu::possible_cpus())
                .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Counts one fast-path event on the current CPU's row, without a
    /// read-modify-write (see the module documentation).
    #[inline]
    pub(crate) fn bump(&self, event: Event) {
        let counter = &self.cpus[vmtask_percpu::cpu()][event as usize];
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Counts `n` slow-path events exactly.
    pub(crate) fn add(&self, event: Event, n: u64) {
        self.cpus[vmtask_percpu::cpu()][event as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over CPUs.
    pub(crate) fn sum(&self, event: Event) -> u64 {
        self.cpus
            .iter()
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
