//! A fork from inside a deferred drop that an ordinary `defer_drop` runs
//! (not the bag's first entry, not the push that fills it): the child's
//! callback thread starts at once, and the drops pending in the child run
//! without any further call into the crate (review finding: the common
//! path checked for a running callback thread before the drop, so a child
//! forked from the drop waited for its next call).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod child;
use child::{wait_exit_code, Forker};

/// Counted objects deferred, and dropped.
static DEFERRED: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

/// In the child: waits, calling nothing of the crate, until every counted
/// object deferred before the fork has been dropped (exit 0), or 5 s
/// (exit 1).
fn child_waits() -> ! {
    let expected = DEFERRED.load(Ordering::SeqCst);
    let start = Instant::now();
    while DROPPED.load(Ordering::SeqCst) < expected {
        if start.elapsed() > Duration::from_secs(5) {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(1) };
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: ends the child at once.
    unsafe { libc::_exit(0) };
}

/// Defers `n` counted objects; in the child, goes to `child_waits`.
fn defer_counted(n: usize) {
    for _ in 0..n {
        DEFERRED.fetch_add(1, Ordering::SeqCst);
        vmtask_rcu::defer_drop(Box::new(Counted));
        if Forker::in_child() {
            child_waits();
        }
    }
}

#[test]
fn a_fork_from_a_drop_run_by_an_ordinary_push_restarts_the_callback_thread() {
    Forker::own_this_thread();
    // Whole bags, all run: the thread's current bag is empty.
    defer_counted(126 * 4);
    vmtask_rcu::barrier();
    // Bag A: 124 objects, the Forker, one more object. Once its grace
    // period has passed, bag B fills and A becomes the draining bag.
    Forker::arm();
    defer_counted(124);
    vmtask_rcu::defer_drop(Box::new(Forker));
    defer_counted(1);
    vmtask_rcu::synchronize();
    defer_counted(126);
    // Each push now runs one entry of A: the 125th runs the Forker, and
    // stores the 125th entry of bag C (neither its first nor its last).
    defer_counted(125);
    let code = wait_exit_code(Forker::take_child());
    vmtask_rcu::barrier();
    assert_eq!(
        code, 0,
        "the child's pending drops did not run without a further call"
    );
}
