//! Experiment 1: stack cost per spawn.
//!
//! The seed: vmalloc'd kernel stacks cost about 1.5 µs more per fork than
//! kmalloc'd ones, and a per-CPU cache of two stacks turned the loss into a
//! gain. Here a spawn is: get a stack, create a coroutine on it, run it to
//! its exit, free the stack. Three ways to get the stack:
//! - [`StackKind::Heap`] ("kmalloc"): `Box<[u128]>` from the allocator, no
//!   guard page;
//! - [`StackKind::Mmap`] ("vmalloc"): `corosensei::DefaultStack`, a fresh
//!   `mmap` + `mprotect` guard per stack and `munmap` at exit;
//! - [`StackKind::Pool`]: a [`StackPool`] with its per-CPU cache.
//!
//! The kinds take turns, repetition by repetition, on one thread pinned to
//! one CPU, so drift (frequency, other load) hits them alike; the result is
//! the median over repetitions of the mean cost per spawn.

use std::fmt;
use std::mem::MaybeUninit;
use std::time::Instant;

use corosensei::stack::{DefaultStack, StackPointer};
use vmtask_stack::{Config, PoolStats, StackPool};

use super::{allowed_cpus, median, pin, run_task, Tick};
use crate::Error;

/// Parameters of [`run`].
#[derive(Debug, Clone)]
pub struct Params {
    /// Spawns per repetition and kind.
    pub count: usize,
    /// Repetitions per kind (the median is taken over these).
    pub reps: usize,
    /// Usable bytes per stack; at least 16 KiB.
    pub stack_size: usize,
}

impl Params {
    /// Progress steps [`run`] ticks.
    pub fn steps(&self) -> u64 {
        (3 * self.reps.max(1)) as u64
    }
}

/// Where a spawn's stack comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    /// The heap, no guard page (the kernel's old kmalloc'd stacks).
    Heap,
    /// A fresh mapping with a guard page per stack (vmalloc).
    Mmap,
    /// A [`StackPool`]'s per-CPU cache.
    Pool,
}

impl StackKind {
    /// Every kind, in table order.
    pub const ALL: [StackKind; 3] = [StackKind::Heap, StackKind::Mmap, StackKind::Pool];
}

impl fmt::Display for StackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StackKind::Heap => "heap, no guard (kmalloc)",
            StackKind::Mmap => "fresh mmap + guard (vmalloc)",
            StackKind::Pool => "StackPool (thread's parked stack)",
        })
    }
}

/// One kind's cost.
#[derive(Debug, Clone)]
pub struct Row {
    /// The kind.
    pub kind: StackKind,
    /// Median over repetitions of ns per spawn.
    pub median_ns: f64,
    /// Fastest repetition, ns per spawn.
    pub min_ns: f64,
    /// Slowest repetition, ns per spawn.
    pub max_ns: f64,
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct SpawnCost {
    /// One row per [`StackKind`], in [`StackKind::ALL`] order.
    pub rows: Vec<Row>,
    /// Usable bytes per stack.
    pub stack_size: usize,
    /// The CPU the spawns ran on.
    pub cpu: usize,
    /// The pool's counters at the end.
    pub pool_stats: PoolStats,
}

impl SpawnCost {
    /// The row of `kind`.
    pub fn row(&self, kind: StackKind) -> &Row {
        self.rows
            .iter()
            .find(|row| row.kind == kind)
            .expect("every kind has a row")
    }
}

/// A stack from the heap with no guard page: the "kmalloc" baseline.
struct HeapStack {
    memory: Box<[MaybeUninit<u128>]>,
}

impl HeapStack {
    const MIN_SIZE: usize = 16 * 1024;

    fn new(size: usize) -> HeapStack {
        debug_assert!(size >= Self::MIN_SIZE);
        HeapStack {
            memory: Box::new_uninit_slice(size / std::mem::size_of::<u128>()),
        }
    }
}

/// # Safety
/// corosensei asks for a guard page, and a heap stack has none: that is
/// the kmalloc baseline this experiment measures, and like a kmalloc'd
/// kernel stack an overflow would corrupt the heap. It cannot overflow
/// here: the only code that ever runs on a `HeapStack` is [`run_task`]'s
/// leaf closure (a few hundred bytes) on at least 16 KiB. The bounds are
/// `u128`-aligned, which satisfies `STACK_ALIGNMENT` (16).
// SAFETY: see the `# Safety` section above.
unsafe impl corosensei::stack::Stack for HeapStack {
    fn base(&self) -> StackPointer {
        StackPointer::new(self.memory.as_ptr_range().end as usize)
            .expect("heap pointer is non-null")
    }

    fn limit(&self) -> StackPointer {
        StackPointer::new(self.memory.as_ptr() as usize).expect("heap pointer is non-null")
    }
}

/// Runs `count` spawns of `kind`; returns the nanoseconds they took.
fn spawns(
    kind: StackKind,
    count: usize,
    stack_size: usize,
    pool: &StackPool,
) -> Result<f64, Error> {
    let start = Instant::now();
    for _ in 0..count {
        match kind {
            StackKind::Heap => drop(run_task(HeapStack::new(stack_size))),
            StackKind::Mmap => drop(run_task(
                DefaultStack::new(stack_size).map_err(Error::MapStack)?,
            )),
            StackKind::Pool => drop(run_task(pool.alloc()?)),
        }
    }
    Ok(start.elapsed().as_nanos() as f64)
}

/// Measures the cost per spawn of each [`StackKind`].
pub fn run(params: &Params, tick: Tick<'_>) -> Result<SpawnCost, Error> {
    // Page-rounded, as the pool and DefaultStack round it: all three
    // kinds get the same usable size, the one the table prints.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let stack_size = params
        .stack_size
        .max(HeapStack::MIN_SIZE)
        .next_multiple_of(page);
    let count = params.count.max(1);
    let pool = StackPool::new(Config {
        stack_size,
        ..Config::default()
    })?;
    let cpu = allowed_cpus()[0];
    let samples = std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpu)?;
            // Warm up: carve the pool's first stacks, fault in the code.
            for kind in StackKind::ALL {
                spawns(kind, count.min(1000), stack_size, &pool)?;
            }
            let mut samples = vec![Vec::with_capacity(params.reps); StackKind::ALL.len()];
            for _ in 0..params.reps.max(1) {
                for (i, kind) in StackKind::ALL.into_iter().enumerate() {
                    samples[i].push(spawns(kind, count, stack_size, &pool)? / count as f64);
                    tick();
                }
            }
            Ok::<_, Error>(samples)
        })
        .join()
        .expect("spawn-cost thread panicked")
    })?;
    let rows = StackKind::ALL
        .into_iter()
        .zip(samples)
        .map(|(kind, mut ns)| Row {
            kind,
            median_ns: median(&mut ns),
            min_ns: ns.first().copied().unwrap_or(0.0),
            max_ns: ns.last().copied().unwrap_or(0.0),
        })
        .collect();
    Ok(SpawnCost {
        rows,
        stack_size,
        cpu,
        pool_stats: pool.stats(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_measured_and_the_pool_is_balanced() {
        let _serial = super::super::serial();
        let result = run(
            &Params {
                count: 100,
                reps: 3,
                stack_size: 16 * 1024,
            },
            &|| (),
        )
        .unwrap();
        for row in &result.rows {
            assert!(row.median_ns > 0.0, "{row:?}");
            assert!(
                row.min_ns <= row.median_ns && row.median_ns <= row.max_ns,
                "{row:?}"
            );
        }
        let stats = &result.pool_stats;
        assert_eq!(stats.live, 0);
        assert_eq!(stats.allocs, stats.frees);
        assert!(
            stats.slots_carved <= 4,
            "one CPU reuses its own stacks: {stats}"
        );
    }

    #[test]
    fn pool_spawn_beats_a_fresh_mapping() {
        let _serial = super::super::serial();
        let result = run(
            &Params {
                count: 2000,
                reps: 5,
                stack_size: 16 * 1024,
            },
            &|| (),
        )
        .unwrap();
        let pool = result.row(StackKind::Pool).median_ns;
        let mmap = result.row(StackKind::Mmap).median_ns;
        assert!(pool < mmap, "pool {pool:.0} ns vs mmap {mmap:.0} ns");
    }
}
