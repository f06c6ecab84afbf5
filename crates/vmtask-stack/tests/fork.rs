//! `fork` while other threads use a pool: the child may go on using it
//! (also with `VMTASK_PERCPU_NO_RSEQ=1`, the try-lock magazines).
//! Without the fork gate (`src/fork.rs`) a child forked while another
//! thread held one of the pool's locks (a trim holds the tally registry's
//! across a `membarrier`) or drained a magazine hung at its first trim or
//! slow-path alloc or free, every few forks.

#[path = "../../vmtask-percpu/tests/forking/mod.rs"]
mod forking;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vmtask_stack::{Config, StackPool};

/// In the child: trims, allocates and frees past a magazine's worth both
/// ways (depot refills and spills, which drain), and reads the stats; 0 if
/// all worked (a hang is killed by the alarm).
fn child_uses(pool: &StackPool) -> i32 {
    // SAFETY: alarm only arms a timer; a hang kills the child.
    unsafe { libc::alarm(10) };
    pool.trim();
    let stacks: Vec<_> = (0..64).map(|_| pool.alloc()).collect();
    let ok = stacks.iter().all(Result::is_ok);
    drop(stacks);
    pool.trim();
    let _ = pool.stats();
    if ok {
        0
    } else {
        3
    }
}

#[test]
fn a_child_forked_while_threads_trim_alloc_and_free_can_use_the_pool() {
    let pool = StackPool::new(Config {
        stack_size: 16 * 1024,
        cache_size: 4,
        depot_size: 8,
        ..Config::default()
    })
    .unwrap();
    let stop = AtomicBool::new(false);
    let forked = std::thread::scope(|s| {
        // A thread that keeps a stack parked, so trims steal it; and a
        // storm past the magazines, so frees spill to the depot (a drain).
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                drop(pool.alloc().unwrap());
                std::thread::yield_now();
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let held: Vec<_> = (0..12).map(|_| pool.alloc().unwrap()).collect();
                drop(held);
            }
        });
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                pool.trim();
                let _ = pool.stats();
            }
        });
        let forked =
            forking::fork_repeatedly("pool", 300, Duration::from_secs(3), || child_uses(&pool));
        stop.store(true, Ordering::Relaxed);
        forked
    });
    forked.unwrap_or_else(|e| panic!("{e}"));
}
