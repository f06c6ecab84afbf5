//! rcutorture-style stress, shared by the membarrier and fence-fallback
//! test binaries.
//!
//! The writer publishes elements through an `RcuCell` and retires the one
//! it replaced in one of three ways: `RcuCell::replace` + `Retired::wait`
//! (synchronize), `Retired::defer` (call), or dropping the `Retired` (the
//! old handle goes through `defer_drop` and its `Drop` re-defers itself).
//!
//! Elements live in a leaked pool and are never deallocated, so a reader
//! that holds an element across its "free" reads valid memory and can
//! report the bug instead of crashing. The writer publishes elements; on
//! removal an element's pipe count becomes 1, and each grace period that
//! passes afterwards adds 1; at `PIPE_FREE` it is marked freed and goes
//! back to the free list (its generation changes on reuse). A reader that
//! sees a pipe count of 2 or more, a freed element, or a generation change
//! during its section has seen a grace period end under it.

#![allow(dead_code)]

#[path = "../../../../test-support/knobs.rs"]
mod knobs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POOL: usize = 4096;
const PIPE_FREE: usize = 3;
/// Reads the readers of one torture scenario must make, at the least.
const MIN_READS: u64 = 100;
/// Updates the writer must make, at the least.
const MIN_UPDATES: u64 = 10;

pub struct Elem {
    pipe: AtomicUsize,
    freed: AtomicBool,
    generation: AtomicU64,
}

pub struct Shared {
    pool: &'static [Elem],
    free: Mutex<Vec<usize>>,
    current: vmtask_rcu::RcuCell<Handle>,
    stop: AtomicBool,
    max_pipe_seen: AtomicUsize,
    freed_seen: AtomicU64,
    reads: AtomicU64,
    updates: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
pub enum Wait {
    Synchronize,
    Call,
    DeferDrop,
}

/// Seconds per torture run: `VMTASK_TORTURE_SECS`, default 1.
pub fn torture_duration() -> Duration {
    knobs::seconds("VMTASK_TORTURE_SECS", 1.0)
}

impl Shared {
    fn index(&self, e: *const Elem) -> usize {
        (e as usize - self.pool.as_ptr() as usize) / std::mem::size_of::<Elem>()
    }

    fn alloc(&self) -> Option<&'static Elem> {
        let idx = self.free.lock().unwrap().pop()?;
        let e = &self.pool[idx];
        e.pipe.store(0, Ordering::Relaxed);
        e.freed.store(false, Ordering::Relaxed);
        e.generation.fetch_add(1, Ordering::Relaxed);
        Some(e)
    }

    /// One grace period passed for `e`; returns true when freed.
    fn advance(&self, e: &Elem) -> bool {
        let pipe = e.pipe.fetch_add(1, Ordering::Relaxed) + 1;
        if pipe >= PIPE_FREE {
            e.freed.store(true, Ordering::Release);
            self.free.lock().unwrap().push(self.index(e));
            true
        } else {
            false
        }
    }
}

/// What the cell publishes: a pointer into the pool. In `DeferDrop` mode
/// dropping it (a grace period after it was replaced) advances its element.
pub struct Handle {
    elem: &'static Elem,
    shared: Option<Arc<Shared>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            if !shared.advance(self.elem) {
                vmtask_rcu::defer_drop(Box::new(Handle {
                    elem: self.elem,
                    shared: Some(shared),
                }));
            }
        }
    }
}

fn retire_by_call(shared: Arc<Shared>, elem: &'static Elem) {
    vmtask_rcu::call(move || {
        if !shared.advance(elem) {
            retire_by_call(shared, elem);
        }
    });
}

pub struct Report {
    pub reads: u64,
    pub updates: u64,
    pub max_pipe_seen: usize,
    pub freed_seen: u64,
}

/// Runs readers against one writer for `duration`, retiring through `wait`.
pub fn torture(wait: Wait, readers: usize, duration: Duration) -> Report {
    torture_paced(wait, readers, duration, 0)
}

/// `torture` with readers that spin `outside` times between sections, so
/// that a grace period can often finish without waiting: the deferring
/// writer then runs its own (`stats().owner_grace_periods`), where readers
/// that never leave their sections for long make it give them up.
pub fn torture_paced(wait: Wait, readers: usize, duration: Duration, outside: usize) -> Report {
    let pool: &'static [Elem] = Box::leak(
        (0..POOL)
            .map(|_| Elem {
                pipe: AtomicUsize::new(0),
                freed: AtomicBool::new(false),
                generation: AtomicU64::new(0),
            })
            .collect(),
    );
    let shared = Arc::new(Shared {
        pool,
        free: Mutex::new((1..POOL).collect()),
        current: vmtask_rcu::RcuCell::new(Some(Box::new(Handle {
            elem: &pool[0],
            shared: None,
        }))),
        stop: AtomicBool::new(false),
        max_pipe_seen: AtomicUsize::new(0),
        freed_seen: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        updates: AtomicU64::new(0),
    });
    let reader_threads: Vec<_> = (0..readers)
        .map(|r| {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !shared.stop.load(Ordering::Relaxed) {
                    let guard = vmtask_rcu::read_lock();
                    // Nest sometimes: nesting must not end the section early.
                    let inner = (reads % 7 == 0).then(vmtask_rcu::read_lock);
                    let e = shared.current.load(&guard).expect("always published").elem;
                    let generation = e.generation.load(Ordering::Relaxed);
                    drop(inner);
                    // Stay in the section a little, sometimes longer.
                    let spins = if reads % 1024 == r as u64 { 20_000 } else { 50 };
                    for _ in 0..spins {
                        std::hint::spin_loop();
                    }
                    let pipe = e.pipe.load(Ordering::Relaxed);
                    let freed = e.freed.load(Ordering::Acquire);
                    let same = e.generation.load(Ordering::Relaxed) == generation;
                    drop(guard);
                    for _ in 0..outside {
                        std::hint::spin_loop();
                    }
                    shared.max_pipe_seen.fetch_max(pipe, Ordering::Relaxed);
                    if freed || !same {
                        shared.freed_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    reads += 1;
                    // Published as it goes, for the writer's progress check.
                    if reads % 64 == 0 {
                        shared.reads.fetch_add(64, Ordering::Relaxed);
                    }
                }
                shared.reads.fetch_add(reads % 64, Ordering::Relaxed);
            })
        })
        .collect();

    // The readers must get going: on a loaded machine a new thread may
    // wait a long time for a CPU, so the run goes on (for at most 10 s
    // more) until they have made some progress (CI once saw 0 reads in
    // the 250 ms of one scenario). Likewise the writer, whose grace periods
    // wait for readers that may be preempted inside their sections.
    let start = Instant::now();
    while start.elapsed() < duration
        || ((shared.reads.load(Ordering::Relaxed) < MIN_READS
            || shared.updates.load(Ordering::Relaxed) <= MIN_UPDATES)
            && start.elapsed() < duration + Duration::from_secs(10))
    {
        let Some(new) = shared.alloc() else {
            // Everything is in flight: let the callbacks catch up.
            vmtask_rcu::barrier();
            continue;
        };
        // The single writer reads what it is about to replace.
        let old: &'static Elem = {
            let guard = vmtask_rcu::read_lock();
            shared.current.load(&guard).expect("always published").elem
        };
        let owner = matches!(wait, Wait::DeferDrop).then(|| shared.clone());
        let retired = shared
            .current
            .replace(Some(Box::new(Handle {
                elem: new,
                shared: owner,
            })))
            .expect("always published");
        old.pipe.store(1, Ordering::Relaxed);
        shared.updates.fetch_add(1, Ordering::Relaxed);
        match wait {
            Wait::Synchronize => {
                drop(retired.wait());
                while !shared.advance(old) {
                    vmtask_rcu::synchronize();
                }
            }
            Wait::Call => {
                let shared = shared.clone();
                retired.defer(move |_handle| {
                    if !shared.advance(old) {
                        retire_by_call(shared, old);
                    }
                });
            }
            // Dropped a grace period from now; its `Drop` advances `old`.
            Wait::DeferDrop => drop(retired),
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in reader_threads {
        t.join().unwrap();
    }
    // Retired elements re-queue themselves until freed: a few barriers.
    for _ in 0..PIPE_FREE + 1 {
        vmtask_rcu::barrier();
    }
    Report {
        reads: shared.reads.load(Ordering::Relaxed),
        updates: shared.updates.load(Ordering::Relaxed),
        max_pipe_seen: shared.max_pipe_seen.load(Ordering::Relaxed),
        freed_seen: shared.freed_seen.load(Ordering::Relaxed),
    }
}

/// Runs all three ways of waiting and asserts no reader saw a grace
/// period end under it.
pub fn torture_all(label: &str) {
    let duration = torture_duration() / 4;
    let runs = [
        // One reader beside the writer, on a two-CPU machine each on its
        // own CPU: with membarrier, many grace periods take the fast path
        // (the reader is seen to begin a section after the flip); the
        // run prints how many.
        (Wait::Synchronize, 1, 0),
        (Wait::Synchronize, 2, 0),
        // More busy threads than CPUs: a descheduled reader looks idle or
        // stays in an old section, so fast attempts mostly give up and the
        // full protocol takes over, with the values they proved.
        (Wait::Synchronize, 4, 0),
        // Readers that pause between sections, each seen busy, idle or
        // in an old section by turns.
        (Wait::Synchronize, 3, 2_000),
        (Wait::Call, 2, 0),
        (Wait::DeferDrop, 2, 0),
        // One reader that pauses between sections: the writer's own grace
        // periods finish as often as they are given up.
        (Wait::DeferDrop, 1, 2_000),
    ];
    for (wait, readers, outside) in runs {
        let before = vmtask_rcu::stats();
        let report = torture_paced(wait, readers, duration, outside);
        let after = vmtask_rcu::stats();
        eprintln!(
            "torture[{label}, {wait:?}, {readers} reader threads, {outside} spins between sections]: {} reads, {} \
             updates, max pipe seen {}, freed seen {}; writer's own grace periods {} finished, \
             {} given up; {} of {} grace periods by the fast path",
            report.reads,
            report.updates,
            report.max_pipe_seen,
            report.freed_seen,
            after.owner_grace_periods - before.owner_grace_periods,
            after.owner_grace_periods_given_up - before.owner_grace_periods_given_up,
            after.fast_grace_periods - before.fast_grace_periods,
            after.grace_periods - before.grace_periods
        );
        assert!(
            report.updates > MIN_UPDATES,
            "writer made no progress with {wait:?}"
        );
        assert!(
            report.reads >= MIN_READS,
            "readers made no progress with {wait:?}"
        );
        assert!(
            report.max_pipe_seen <= 1,
            "{label}/{wait:?}: a reader saw pipe count {} (a grace period ended under it)",
            report.max_pipe_seen
        );
        assert_eq!(
            report.freed_seen, 0,
            "{label}/{wait:?}: readers saw freed elements"
        );
    }
    eprintln!("{}", vmtask_rcu::stats());
}
