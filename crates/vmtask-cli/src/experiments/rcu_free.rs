//! Experiment 2: the per-CPU cache's hit rate when stacks are freed after
//! an RCU grace period, against freeing them synchronously at exit.
//!
//! The seed: "I implemented a percpu cache, and it's useless." A dead
//! task's stack was freed with its `task_struct`, after a grace period, so
//! frees arrived in batches: the cache was empty when forks wanted stacks,
//! then flooded with more than it could hold. The fix was to free the
//! stack synchronously at exit and keep only the `task_struct` under RCU.
//!
//! The storm: one worker per allowed CPU, pinned, spawns tasks and lets
//! them exit as fast as it can for a fixed time. At exit a task's stack is
//! either dropped at once ([`FreeMode::Sync`], what vmtask does) or handed
//! to [`vmtask_rcu::call`] and dropped on RCU's callback thread after a
//! grace period ([`FreeMode::Rcu`], what Linux did in 2016). A worker
//! stops spawning while `max_deferred` of its tasks wait for their grace
//! period, as a fork storm is bounded by memory; without that the backlog
//! would only be bounded by RCU's own limits.
//!
//! As in the kernel of 2016, the deferred frees arrive in batches, one per
//! grace period; unlike it, they run on one callback thread rather than on
//! the CPU that queued them, so they land in that thread's CPU cache and
//! overflow into the shared depot, whose refills the table counts apart.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmtask_stack::{Config, PoolStats, StackPool};

use super::{allowed_cpus, pin, run_task, wait_out_storm, CacheUse, Tick};
use crate::Error;

/// When a dead task's stack is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeMode {
    /// At exit, to the current CPU's cache.
    Sync,
    /// After an RCU grace period, on RCU's callback thread.
    Rcu,
}

impl FreeMode {
    /// Both modes, in table order.
    pub const ALL: [FreeMode; 2] = [FreeMode::Sync, FreeMode::Rcu];
}

impl fmt::Display for FreeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FreeMode::Sync => "synchronous",
            FreeMode::Rcu => "after grace period",
        })
    }
}

/// Parameters of [`run`].
#[derive(Debug, Clone)]
pub struct Params {
    /// How long each storm lasts.
    pub duration: Duration,
    /// Per-CPU cache sizes to try (`Config::cache_size`).
    pub cache_sizes: Vec<usize>,
    /// Tasks per worker that may wait for a grace period before the worker
    /// waits for them.
    pub max_deferred: usize,
}

impl Params {
    /// Progress steps [`run`] ticks: one per storm.
    pub fn steps(&self) -> u64 {
        (self.cache_sizes.len() * FreeMode::ALL.len()) as u64
    }
}

/// One storm's result.
#[derive(Debug, Clone)]
pub struct Row {
    /// When stacks were freed.
    pub mode: FreeMode,
    /// The per-CPU cache size.
    pub cache_size: usize,
    /// Workers (one per allowed CPU).
    pub workers: usize,
    /// Tasks spawned in all.
    pub spawns: u64,
    /// Mean ns per spawn and exit, per worker.
    pub ns_per_spawn: f64,
    /// The pool's counters after the storm and every deferred free.
    pub stats: PoolStats,
}

impl Row {
    /// Where the spawns' stacks came from.
    pub fn cache_use(&self) -> CacheUse {
        CacheUse::new(self.spawns, &self.stats)
    }

    /// Share of spawns whose stack came from the current CPU's cache: the
    /// number the seed's per-CPU cache was judged by.
    pub fn cache_hit_rate(&self) -> f64 {
        self.cache_use().cache_hit_rate()
    }

    /// Share of spawns served by the cache or the shared depot, that is by
    /// a warm stack.
    pub fn warm_hit_rate(&self) -> f64 {
        self.cache_use().warm_hit_rate()
    }
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct RcuFree {
    /// One row per cache size and mode, cache size major.
    pub rows: Vec<Row>,
}

impl RcuFree {
    /// The row for `mode` at `cache_size`, if it was run.
    pub fn row(&self, mode: FreeMode, cache_size: usize) -> Option<&Row> {
        self.rows
            .iter()
            .find(|row| row.mode == mode && row.cache_size == cache_size)
    }
}

/// Runs one storm.
pub fn storm(
    duration: Duration,
    cache_size: usize,
    mode: FreeMode,
    max_deferred: usize,
) -> Result<Row, Error> {
    let pool = StackPool::new(Config {
        cache_size,
        ..Config::default()
    })?;
    let cpus = allowed_cpus();
    let stop = AtomicBool::new(false);
    // Spawns made so far (see `wait_out_storm`).
    let progress = AtomicU64::new(0);
    let start = Instant::now();
    let spawns = std::thread::scope(|s| {
        let workers: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let (pool, stop, progress) = (&pool, &stop, &progress);
                s.spawn(move || worker(pool, cpu, mode, max_deferred, stop, progress))
            })
            .collect();
        wait_out_storm(start, duration, &progress, || {
            workers.iter().any(|w| w.is_finished())
        });
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("storm worker panicked"))
            .sum::<Result<u64, Error>>()
    });
    let elapsed = start.elapsed();
    // Every deferred free has run: the stacks are back before the pool goes.
    vmtask_rcu::barrier();
    let spawns = spawns?;
    Ok(Row {
        mode,
        cache_size,
        workers: cpus.len(),
        spawns,
        ns_per_spawn: elapsed.as_nanos() as f64 * cpus.len() as f64 / spawns.max(1) as f64,
        stats: pool.stats(),
    })
}

fn worker(
    pool: &StackPool,
    cpu: usize,
    mode: FreeMode,
    max_deferred: usize,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> Result<u64, Error> {
    pin(cpu)?;
    let deferred = Arc::new(AtomicUsize::new(0));
    let mut spawns = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            let stack = run_task(pool.alloc()?);
            spawns += 1;
            match mode {
                FreeMode::Sync => drop(stack),
                FreeMode::Rcu => {
                    deferred.fetch_add(1, Ordering::Relaxed);
                    let pending = Arc::clone(&deferred);
                    vmtask_rcu::call(move || {
                        drop(stack);
                        pending.fetch_sub(1, Ordering::Release);
                    });
                    while deferred.load(Ordering::Acquire) >= max_deferred
                        && !stop.load(Ordering::Relaxed)
                    {
                        std::thread::yield_now();
                    }
                }
            }
        }
        progress.fetch_add(64, Ordering::Relaxed);
    }
    Ok(spawns)
}

/// Runs a storm for every cache size and [`FreeMode`].
pub fn run(params: &Params, tick: Tick<'_>) -> Result<RcuFree, Error> {
    let mut rows = Vec::new();
    for &cache_size in &params.cache_sizes {
        for mode in FreeMode::ALL {
            rows.push(storm(
                params.duration,
                cache_size,
                mode,
                params.max_deferred.max(1),
            )?);
            tick();
        }
    }
    Ok(RcuFree { rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RcuFree {
        run(
            &Params {
                duration: Duration::from_millis(150),
                cache_sizes: vec![2, 16],
                max_deferred: 512,
            },
            &|| (),
        )
        .unwrap()
    }

    #[test]
    fn hit_rates_are_shares_and_every_stack_comes_back() {
        let _serial = super::super::serial();
        for row in tiny().rows {
            for rate in [row.cache_hit_rate(), row.warm_hit_rate()] {
                assert!((0.0..=1.0).contains(&rate), "{row:?}");
            }
            assert!(row.spawns > 0);
            assert_eq!(row.stats.live, 0, "{}", row.stats);
            assert_eq!(row.stats.frees, row.stats.allocs);
            let used = row.cache_use();
            assert_eq!(used.cache_hits + used.depot_hits + used.cold, row.spawns);
        }
    }

    #[test]
    fn synchronous_free_hits_the_cache_more_than_rcu_free() {
        let _serial = super::super::serial();
        let result = tiny();
        for cache_size in [2, 16] {
            let sync = result.row(FreeMode::Sync, cache_size).unwrap();
            let rcu = result.row(FreeMode::Rcu, cache_size).unwrap();
            assert!(
                sync.cache_hit_rate() >= rcu.cache_hit_rate(),
                "cache {cache_size}: sync {:.3} vs rcu {:.3}",
                sync.cache_hit_rate(),
                rcu.cache_hit_rate()
            );
        }
        let sync2 = result.row(FreeMode::Sync, 2).unwrap();
        let rcu2 = result.row(FreeMode::Rcu, 2).unwrap();
        assert!(sync2.warm_hit_rate() >= rcu2.warm_hit_rate());
    }
}
