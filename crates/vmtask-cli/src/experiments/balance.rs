//! Experiment 4: cache balance when tasks exit on another CPU than the one
//! that spawned them.
//!
//! The seed (dynamic kernel stacks): a thread that sleeps with extra stack
//! pages and wakes on another CPU returns them to that CPU's cache, so one
//! cache drains while another fills. vmtask's answer is a full magazine
//! going to the shared depot whole, and an empty one refilled from it.
//!
//! Two workers, pinned to two CPUs, spawn bursts of tasks. In the
//! [`Exit::Local`] run each worker frees its own stacks; in the
//! [`Exit::Remote`] run every stack goes through a bounded channel and is
//! freed by the other worker, so one CPU's allocations are the other's
//! frees. The pool's counters show the depot traffic, the hit rate, and
//! (at the end) that free stacks stay bounded by the caches and the depot.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use vmtask_stack::{Config, PoolStats, Stack, StackPool};

use super::{allowed_cpus, pin, ratio, run_task, wait_out_storm, CacheUse, Tick};
use crate::Error;

/// Tasks a worker has live at once before they exit.
pub const BURST: usize = 8;

/// Where tasks exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// On the CPU that spawned them.
    Local,
    /// On the other worker's CPU.
    Remote,
}

impl Exit {
    /// Both, in table order.
    pub const ALL: [Exit; 2] = [Exit::Local, Exit::Remote];
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exit::Local => "exit on the spawning CPU",
            Exit::Remote => "exit on the other CPU",
        })
    }
}

/// Parameters of [`run`].
#[derive(Debug, Clone)]
pub struct Params {
    /// How long each run lasts.
    pub duration: Duration,
    /// The per-CPU cache size.
    pub cache_size: usize,
}

impl Params {
    /// Progress steps [`run`] ticks: one per run.
    pub fn steps(&self) -> u64 {
        Exit::ALL.len() as u64
    }
}

/// One run's result.
#[derive(Debug, Clone)]
pub struct Row {
    /// Where tasks exited.
    pub exit: Exit,
    /// The two CPUs (the same one twice if only one is allowed).
    pub cpus: (usize, usize),
    /// Tasks spawned in all.
    pub spawns: u64,
    /// Mean ns per spawn and exit, per worker.
    pub ns_per_spawn: f64,
    /// The pool's counters at the end.
    pub stats: PoolStats,
    /// The pool's depot capacity (`Config::depot_size`).
    pub depot_size: usize,
    /// The per-CPU cache size.
    pub cache_size: usize,
}

impl Row {
    /// Where the spawns' stacks came from.
    pub fn cache_use(&self) -> CacheUse {
        CacheUse::new(self.spawns, &self.stats)
    }

    /// Share of spawns served by the local cache.
    pub fn cache_hit_rate(&self) -> f64 {
        self.cache_use().cache_hit_rate()
    }

    /// Share of spawns served by the depot.
    pub fn depot_hit_rate(&self) -> f64 {
        self.cache_use().depot_hit_rate()
    }

    /// Magazines moved to or from the depot per 1000 spawns.
    pub fn depot_transfers_per_1k(&self) -> f64 {
        1000.0 * ratio(self.stats.depot_transfers, self.spawns)
    }

    /// Checks that nothing piled up: no stack is live, free stacks are all
    /// accounted for, and the caches and the depot hold no more than their
    /// capacity.
    pub fn check_bounded(&self) -> Result<(), Error> {
        let s = &self.stats;
        let cpus = vmtask_percpu::possible_cpus() as u64;
        let problems = [
            (s.live == 0, "stacks still live"),
            (
                s.cached + s.in_depot + s.released == s.slots_carved,
                "free stacks unaccounted for",
            ),
            (
                // The per-CPU magazines, plus the one stack each worker
                // thread may keep parked for its next allocation.
                s.cached <= self.cache_size as u64 * cpus + 2,
                "caches over capacity",
            ),
            (s.in_depot <= self.depot_size as u64, "depot over capacity"),
        ];
        match problems.iter().find(|(ok, _)| !ok) {
            None => Ok(()),
            Some((_, what)) => Err(Error::Invariant(format!(
                "balance ({}): {what}: {s}",
                self.exit
            ))),
        }
    }
}

/// The result of [`run`].
#[derive(Debug, Clone)]
pub struct Balance {
    /// One row per [`Exit`], in order.
    pub rows: Vec<Row>,
}

impl Balance {
    /// The row of `exit`.
    pub fn row(&self, exit: Exit) -> &Row {
        self.rows
            .iter()
            .find(|row| row.exit == exit)
            .expect("every exit has a row")
    }
}

/// Runs `exit`'s storm on two CPUs for `duration`.
pub fn storm(duration: Duration, cache_size: usize, exit: Exit) -> Result<Row, Error> {
    let config = Config {
        cache_size,
        ..Config::default()
    };
    let depot_size = config.depot_size;
    let pool = StackPool::new(config)?;
    let allowed = allowed_cpus();
    let cpus = (allowed[0], allowed[allowed.len().min(2) - 1]);
    // Bounded, so a descheduled worker cannot let stacks pile up in flight.
    let (to_b, from_a) = mpsc::sync_channel(4 * BURST);
    let (to_a, from_b) = mpsc::sync_channel(4 * BURST);
    let stop = AtomicBool::new(false);
    let progress = AtomicU64::new(0);
    let start = Instant::now();
    let spawns = std::thread::scope(|s| {
        let workers = [(cpus.0, to_b, from_b), (cpus.1, to_a, from_a)].map(|(cpu, tx, rx)| {
            let (pool, stop, progress) = (&pool, &stop, &progress);
            s.spawn(move || worker(pool, cpu, exit, tx, rx, stop, progress))
        });
        wait_out_storm(start, duration, &progress, || {
            workers.iter().any(|w| w.is_finished())
        });
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("balance worker panicked"))
            .sum::<Result<u64, Error>>()
    })?;
    Ok(Row {
        exit,
        cpus,
        spawns,
        ns_per_spawn: start.elapsed().as_nanos() as f64 * 2.0 / spawns.max(1) as f64,
        stats: pool.stats(),
        depot_size,
        cache_size,
    })
}

fn worker(
    pool: &StackPool,
    cpu: usize,
    exit: Exit,
    tx: SyncSender<Stack>,
    rx: Receiver<Stack>,
    stop: &AtomicBool,
    progress: &AtomicU64,
) -> Result<u64, Error> {
    let result = pin(cpu).and_then(|()| {
        let mut burst = Vec::with_capacity(BURST);
        let mut spawns = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..BURST {
                burst.push(run_task(pool.alloc()?));
            }
            spawns += BURST as u64;
            progress.fetch_add(BURST as u64, Ordering::Relaxed);
            for stack in burst.drain(..) {
                match exit {
                    Exit::Local => drop(stack),
                    Exit::Remote => send(stack, &tx, &rx),
                }
            }
            // The other CPU's dead tasks: free their stacks here.
            rx.try_iter().for_each(drop);
        }
        Ok(spawns)
    });
    // Whatever happened, hand back every stack in flight.
    drop(tx);
    rx.into_iter().for_each(drop);
    result
}

/// Sends `stack` to the other worker; while its channel is full, frees what
/// it sent us, so two full channels cannot deadlock.
fn send(mut stack: Stack, tx: &SyncSender<Stack>, rx: &Receiver<Stack>) {
    loop {
        match tx.try_send(stack) {
            Ok(()) => return,
            Err(TrySendError::Full(back)) => {
                stack = back;
                rx.try_iter().for_each(drop);
                std::thread::yield_now();
            }
            // The other worker failed and left: free the stack here.
            Err(TrySendError::Disconnected(back)) => return drop(back),
        }
    }
}

/// Runs both [`Exit`] storms and checks that nothing piled up.
pub fn run(params: &Params, tick: Tick<'_>) -> Result<Balance, Error> {
    let mut rows = Vec::new();
    for exit in Exit::ALL {
        let row = storm(params.duration, params.cache_size, exit)?;
        row.check_bounded()?;
        rows.push(row);
        tick();
    }
    Ok(Balance { rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_exits_stay_bounded_and_flow_through_the_depot() {
        let _serial = super::super::serial();
        let result = run(
            &Params {
                duration: Duration::from_millis(150),
                cache_size: 2,
            },
            &|| (),
        )
        .unwrap();
        for row in &result.rows {
            for rate in [row.cache_hit_rate(), row.depot_hit_rate()] {
                assert!((0.0..=1.0).contains(&rate), "{row:?}");
            }
            assert!(row.cache_hit_rate() + row.depot_hit_rate() <= 1.0 + 1e-9);
            assert!(row.spawns > 0);
            assert!(
                row.stats.slots_carved <= 1000,
                "{}: carving did not stay bounded: {}",
                row.exit,
                row.stats
            );
        }
        let local = result.row(Exit::Local);
        assert!(
            local.cache_hit_rate() + local.depot_hit_rate() > 0.9,
            "{}",
            local.stats
        );
        let remote = result.row(Exit::Remote);
        if remote.cpus.0 != remote.cpus.1 {
            assert!(remote.stats.depot_transfers > 0, "{}", remote.stats);
        }
    }
}
