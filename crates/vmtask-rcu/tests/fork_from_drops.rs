//! A fork from inside a deferred drop that `defer_drop` runs on the
//! deferring thread: the child's statistics still balance (review
//! findings: a bag filled by the push that ran the drop was not counted
//! yet, and a bag `collect` was running was counted twice).

use std::sync::Mutex;

mod child;
use child::{stats_balance, wait_exit_code, Forker};

static SERIAL: Mutex<()> = Mutex::new(());

fn child_checks() -> ! {
    // SAFETY: alarm only arms a timer; a hang kills the child.
    unsafe { libc::alarm(10) };
    vmtask_rcu::barrier();
    let balanced = stats_balance("child");
    // SAFETY: ends the child at once.
    unsafe { libc::_exit(if balanced { 0 } else { 1 }) };
}

/// Waits for the child and returns its exit code.
fn wait_child() -> i32 {
    wait_exit_code(Forker::take_child())
}

/// Defers `n` drops that do nothing; in the child, goes to the checks.
fn defer_plain(n: usize) {
    for i in 0..n {
        vmtask_rcu::defer_drop(Box::new(i as u64));
        if Forker::in_child() {
            child_checks();
        }
    }
}

/// Bag A holds 125 plain drops and the Forker; after its grace period,
/// bag B fills and A becomes the draining bag.
fn a_draining_bag_ending_with_the_forker() {
    Forker::own_this_thread();
    defer_plain(126 * 4);
    vmtask_rcu::barrier();
    Forker::arm();
    defer_plain(125);
    vmtask_rcu::defer_drop(Box::new(Forker));
    vmtask_rcu::synchronize();
    defer_plain(126);
}

#[test]
fn a_fork_from_a_drop_run_by_the_push_that_fills_a_bag() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    a_draining_bag_ending_with_the_forker();
    // The 126th push runs A's last entry, the Forker, and fills bag C.
    defer_plain(126);
    let code = wait_child();
    vmtask_rcu::barrier();
    assert_eq!(code, 0, "the child's statistics do not balance");
}

#[test]
fn a_fork_from_a_drop_run_by_collect() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    a_draining_bag_ending_with_the_forker();
    {
        // No entry of A runs inside a section.
        let _guard = vmtask_rcu::read_lock();
        defer_plain(125);
    }
    // Runs A's first entry and fills C: `collect` runs the rest of A,
    // the Forker last.
    defer_plain(1);
    let code = wait_child();
    vmtask_rcu::barrier();
    assert_eq!(code, 0, "the child's statistics do not balance");
}
