//! The four experiments, and what they share: a task, CPU placement,
//! `/proc/self/status`.
//!
//! Every `run` takes its parameters and a [`Tick`] callback, called once
//! per step (each module's `Params::steps` says how many), so the binary
//! can drive a progress bar and tests can pass `&|| ()`.

pub mod balance;
pub mod memory;
pub mod rcu_free;
pub mod spawn_cost;

use std::hint::black_box;

use corosensei::{Coroutine, CoroutineResult};

use crate::Error;

/// Called once per finished step of an experiment, from any thread.
pub type Tick<'a> = &'a (dyn Fn() + Sync);

/// Spawns a task on `stack`, runs it to its exit and hands the stack back,
/// as a runtime's worker would before freeing it (the kernel's
/// `finish_task_switch` for a dead task).
///
/// The task is a leaf closure: it uses a few hundred bytes at the top of
/// the stack, which is all the stack cost experiments need.
pub fn run_task<S: corosensei::stack::Stack + 'static>(stack: S) -> S {
    let mut task = Coroutine::with_stack(stack, |_yielder, x: u64| black_box(x).wrapping_mul(3));
    match task.resume(black_box(7)) {
        CoroutineResult::Return(v) => {
            black_box(v);
        }
        CoroutineResult::Yield(()) => unreachable!("the task never suspends"),
    }
    task.into_stack()
}

pub use vmtask_percpu::allowed_cpus;

/// Spawns a storm makes at the least: where its workers get no CPU for the
/// run's duration (a loaded machine), it goes on, for at most 10 s more,
/// until they have made these, so the rates are not those of a cold start.
const MIN_SPAWNS: u64 = 1024;

/// Waits out a storm that began at `start`: `duration`, and longer while
/// the workers have made fewer than `MIN_SPAWNS` spawns (`progress`), for
/// at most 10 s more; returns early once `finished` says a worker ended.
pub fn wait_out_storm(
    start: std::time::Instant,
    duration: std::time::Duration,
    progress: &std::sync::atomic::AtomicU64,
    finished: impl Fn() -> bool,
) {
    use std::time::Duration;
    while (start.elapsed() < duration
        || (progress.load(std::sync::atomic::Ordering::Relaxed) < MIN_SPAWNS
            && start.elapsed() < duration + Duration::from_secs(10)))
        && !finished()
    {
        std::thread::sleep(Duration::from_millis(5).min(duration));
    }
}

/// Pins the calling thread to `cpu`, naming the CPU on failure.
pub fn pin(cpu: usize) -> Result<(), Error> {
    vmtask_percpu::pin_current_thread(cpu).map_err(|source| Error::Pin { cpu, source })
}

/// Resident memory and page tables of this process, from `/proc/self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmPTE`, KiB.
    pub pte_kib: u64,
}

impl Resident {
    /// Reads `VmRSS` and `VmPTE` now.
    pub fn now() -> Result<Resident, Error> {
        let text = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| Error::ProcStatus(e.to_string()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| Error::ProcStatus(format!("no {name} line")))
        };
        Ok(Resident {
            rss_kib: field("VmRSS:")?,
            pte_kib: field("VmPTE:")?,
        })
    }

    /// What grew (or shrank, negative) since `before`, KiB: `(rss, pte)`.
    pub fn since(&self, before: &Resident) -> (i64, i64) {
        (
            self.rss_kib as i64 - before.rss_kib as i64,
            self.pte_kib as i64 - before.pte_kib as i64,
        )
    }
}

/// Where a run's allocations were served from.
///
/// Misses come from the pool's counters, which count every slow-path
/// allocation exactly (atomics); local cache hits are the spawns the
/// experiment made minus those misses. The pool's own per-CPU hit counter
/// is deliberately lossy (a plain load and store on the fast path), so
/// it is not used for the rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUse {
    /// Stacks allocated (tasks spawned).
    pub allocs: u64,
    /// Served by the current CPU's cache.
    pub cache_hits: u64,
    /// Served by the shared depot (warm stacks another cache gave up).
    pub depot_hits: u64,
    /// Served by a freshly carved slot or one whose memory was given back.
    pub cold: u64,
}

impl CacheUse {
    /// Splits `spawns` allocations by what `stats` says missed the cache.
    pub fn new(spawns: u64, stats: &vmtask_stack::PoolStats) -> CacheUse {
        let slow = stats.allocs.saturating_sub(stats.cache_hits).min(spawns);
        let depot_hits = stats.depot_hits.min(slow);
        CacheUse {
            allocs: spawns,
            cache_hits: spawns - slow,
            depot_hits,
            cold: slow - depot_hits,
        }
    }

    /// Share of allocations served by the current CPU's cache.
    pub fn cache_hit_rate(&self) -> f64 {
        ratio(self.cache_hits, self.allocs)
    }

    /// Share of allocations served by the depot.
    pub fn depot_hit_rate(&self) -> f64 {
        ratio(self.depot_hits, self.allocs)
    }

    /// Share served by the cache or the depot: by a warm stack.
    pub fn warm_hit_rate(&self) -> f64 {
        ratio(self.cache_hits + self.depot_hits, self.allocs)
    }
}

/// `part / whole`, 0 when `whole` is 0.
pub fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The median of `samples` (sorted in place); 0 for none.
pub fn median(samples: &mut [f64]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let mid = samples.len() / 2;
    if samples.len() % 2 == 1 {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2.0
    }
}

/// Serializes the tests that measure: storms on every CPU would skew
/// timings and `VmRSS` readings of tests running beside them.
#[cfg(test)]
pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn proc_status_has_rss_and_pte() {
        let now = Resident::now().unwrap();
        assert!(now.rss_kib > 0);
    }

    #[test]
    fn this_thread_may_run_somewhere() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn task_runs_on_a_pool_stack_and_gives_it_back() {
        let pool = vmtask_stack::StackPool::new(vmtask_stack::Config::default()).unwrap();
        let stack = run_task(pool.alloc().unwrap());
        drop(stack);
        assert_eq!(pool.stats().live, 0);
    }
}
