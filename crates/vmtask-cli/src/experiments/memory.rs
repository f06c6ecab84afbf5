//! Experiment 3: resident memory per task for a realistic mix of stack
//! depths, stacks fully populated against demand-paged and trimmed.
//!
//! The seed (dynamic kernel stacks): most threads use a few KiB of a 16 KiB
//! stack, so map only what is used and give pages back when they are no
//! longer needed. vmtask's arena is demand-paged and `trim` returns what
//! free stacks no longer need.
//!
//! The mix, deterministic: 70% of tasks use 4–8 KiB of stack, 25% use
//! 32 KiB, 5% use 100–112 KiB, on 128 KiB stacks. A task makes its depth
//! resident with `vmtask_stack::ensure` (the pages a call chain that deep
//! would touch), then suspends, so all tasks are live at once when memory
//! is read. Memory is `VmRSS + VmPTE` growth over the phase's start,
//! divided by the tasks:
//! 1. **populated**: every page of every stack is touched first, as with a
//!    fixed, fully committed stack;
//! 2. **demand-paged**: only what each task uses is resident;
//! 3. **demand-paged, reused after trim**: the first wave exits, the pool
//!    is trimmed, a second wave reuses those stacks;
//! 4. **idle after trim**: the second wave exits and the pool is trimmed;
//!    what stays resident is charged to the tasks that left.

use std::hint::black_box;

use corosensei::{Coroutine, CoroutineResult, Yielder};
use vmtask_stack::{Config, PoolStats, Stack, StackError, StackPool};

use super::{Resident, Tick};
use crate::Error;

/// Usable bytes per stack in this experiment (the pool default).
pub const STACK_SIZE: usize = 128 * 1024;

/// Parameters of [`run`].
#[derive(Debug, Clone)]
pub struct Params {
    /// Tasks live at once.
    pub tasks: usize,
}

impl Params {
    /// Progress steps [`run`] ticks: one per phase.
    pub fn steps(&self) -> u64 {
        4
    }
}

/// A phase of the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Live tasks, whole stacks resident.
    Populated,
    /// Live tasks, only the depth each uses resident.
    DemandPaged,
    /// Live tasks on stacks reused after an exit and a trim.
    ReusedAfterTrim,
    /// No live tasks; the pool trimmed.
    IdleAfterTrim,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Populated => "populated (live)",
            Phase::DemandPaged => "demand-paged (live)",
            Phase::ReusedAfterTrim => "demand-paged, reused after trim (live)",
            Phase::IdleAfterTrim => "all exited, trimmed (idle)",
        })
    }
}

/// Memory of one phase.
#[derive(Debug, Clone)]
pub struct Row {
    /// The phase.
    pub phase: Phase,
    /// `VmRSS` growth, KiB.
    pub rss_kib: i64,
    /// `VmPTE` growth, KiB.
    pub pte_kib: i64,
    /// `(rss + pte) / tasks`, KiB.
    pub kib_per_task: f64,
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct Memory {
    /// Tasks per wave.
    pub tasks: usize,
    /// Stack depth each task of a wave makes resident, bytes.
    pub mean_depth: usize,
    /// One row per [`Phase`], in order.
    pub rows: Vec<Row>,
    /// Bytes the final `trim` released.
    pub trimmed_bytes: usize,
    /// The demand-paged pool's counters at the end.
    pub pool_stats: PoolStats,
}

impl Memory {
    /// The row of `phase`.
    pub fn row(&self, phase: Phase) -> &Row {
        self.rows
            .iter()
            .find(|row| row.phase == phase)
            .expect("every phase has a row")
    }
}

/// The stack depth of task `i`: the mix above, from a fixed-seed hash.
pub fn depth(i: usize) -> usize {
    // splitmix64: deterministic and spread out.
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let kib = match z % 100 {
        0..70 => 4 + (z >> 8) % 5,
        70..95 => 32,
        _ => 100 + (z >> 8) % 13,
    };
    kib as usize * 1024
}

type Task = Coroutine<(), (), Result<(), StackError>, Stack>;

/// Spawns a task that makes `depth` bytes of its stack resident and
/// suspends, so it stays live.
fn spawn(stack: Stack, depth: usize) -> Result<Task, Error> {
    let mut task = Coroutine::with_stack(stack, move |yielder: &Yielder<(), ()>, ()| {
        vmtask_stack::ensure(black_box(depth))?;
        yielder.suspend(());
        Ok(())
    });
    match task.resume(()) {
        CoroutineResult::Yield(()) => Ok(task),
        CoroutineResult::Return(result) => Err(result.err().map_or_else(
            || Error::Invariant("a memory task exited before suspending".into()),
            Error::Stack,
        )),
    }
}

/// Lets every task exit; their stacks go back to the pool.
fn exit_all(tasks: &mut Vec<Task>) -> Result<(), Error> {
    for mut task in tasks.drain(..) {
        match task.resume(()) {
            CoroutineResult::Return(result) => result?,
            CoroutineResult::Yield(()) => {
                return Err(Error::Invariant("a memory task suspended twice".into()))
            }
        }
    }
    Ok(())
}

fn row(phase: Phase, before: &Resident, tasks: usize) -> Result<Row, Error> {
    let (rss_kib, pte_kib) = Resident::now()?.since(before);
    Ok(Row {
        phase,
        rss_kib,
        pte_kib,
        kib_per_task: (rss_kib + pte_kib) as f64 / tasks.max(1) as f64,
    })
}

/// One wave of `count` live tasks of the mix; `populate` touches every
/// page of each stack first.
fn wave(
    pool: &StackPool,
    count: usize,
    populate: bool,
    tasks: &mut Vec<Task>,
) -> Result<(), Error> {
    for i in 0..count {
        let stack = pool.alloc()?;
        if populate {
            let page = 4096;
            let mut addr = stack.limit();
            while addr < stack.base() {
                // SAFETY: `[limit, base)` is the usable memory of a stack we
                // own and nothing runs on yet.
                unsafe { std::ptr::write_volatile(addr, 0) };
                addr = addr.wrapping_add(page);
            }
        }
        tasks.push(spawn(stack, depth(i))?);
    }
    Ok(())
}

/// Runs the four phases with `params.tasks` tasks per wave.
pub fn run(params: &Params, tick: Tick<'_>) -> Result<Memory, Error> {
    let count = params.tasks.max(1);
    let config = Config {
        stack_size: STACK_SIZE,
        ..Config::default()
    };
    let mut tasks = Vec::with_capacity(count);
    let mut rows = Vec::with_capacity(4);

    {
        let pool = StackPool::new(config.clone())?;
        let before = Resident::now()?;
        wave(&pool, count, true, &mut tasks)?;
        rows.push(row(Phase::Populated, &before, count)?);
        exit_all(&mut tasks)?;
        tick();
        // Dropping the pool unmaps its arenas: the next phase starts clean.
    }

    let pool = StackPool::new(config)?;
    let before = Resident::now()?;
    wave(&pool, count, false, &mut tasks)?;
    rows.push(row(Phase::DemandPaged, &before, count)?);
    exit_all(&mut tasks)?;
    pool.trim();
    tick();

    let reused = Resident::now()?;
    wave(&pool, count, false, &mut tasks)?;
    let mut second = row(Phase::ReusedAfterTrim, &reused, count)?;
    // Charge what stayed resident after the first wave's trim as well.
    let (rss, pte) = reused.since(&before);
    second.rss_kib += rss;
    second.pte_kib += pte;
    second.kib_per_task = (second.rss_kib + second.pte_kib) as f64 / count as f64;
    rows.push(second);
    exit_all(&mut tasks)?;
    tick();

    let trimmed_bytes = pool.trim();
    rows.push(row(Phase::IdleAfterTrim, &before, count)?);
    tick();

    Ok(Memory {
        tasks: count,
        mean_depth: (0..count).map(depth).sum::<usize>() / count,
        rows,
        trimmed_bytes,
        pool_stats: pool.stats(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_mix_is_mostly_shallow() {
        let depths: Vec<usize> = (0..10_000).map(depth).collect();
        let shallow = depths.iter().filter(|&&d| d <= 8 * 1024).count();
        let deep = depths.iter().filter(|&&d| d >= 100 * 1024).count();
        assert!((6500..7500).contains(&shallow), "{shallow}");
        assert!((300..700).contains(&deep), "{deep}");
        assert!(depths.iter().all(|&d| d < STACK_SIZE - 8 * 1024));
    }

    #[test]
    fn demand_paged_tasks_cost_less_than_populated_ones() {
        let _serial = super::super::serial();
        let result = run(&Params { tasks: 300 }, &|| ()).unwrap();
        let populated = result.row(Phase::Populated).kib_per_task;
        let demand = result.row(Phase::DemandPaged).kib_per_task;
        let idle = result.row(Phase::IdleAfterTrim).kib_per_task;
        assert!(
            populated > 100.0,
            "a populated 128 KiB stack is resident: {populated:.1} KiB"
        );
        assert!(
            demand < populated / 2.0,
            "demand {demand:.1} vs populated {populated:.1}"
        );
        assert!(idle < demand, "idle {idle:.1} vs demand {demand:.1}");
        assert_eq!(result.pool_stats.live, 0);
    }
}
