//! A fork while another thread runs a `collect` (a batch of its deferred
//! drops taken out of its bags): the child salvages that thread's slot,
//! and a thread of the child that takes the slot over and forks must not
//! pass the lost run on to its own child's recount (review finding: that
//! grandchild's statistics never balanced).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod child;
use child::{stats_balance, wait_exit_code};

static IN_BLOCKER: AtomicBool = AtomicBool::new(false);
static FORKED: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicBool = AtomicBool::new(false);

/// Blocks (on the worker thread, inside `collect`) until the fork is done.
struct Blocker;

impl Drop for Blocker {
    fn drop(&mut self) {
        if !ARMED.swap(false, Ordering::SeqCst) {
            return;
        }
        IN_BLOCKER.store(true, Ordering::SeqCst);
        while !FORKED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn defer_plain(n: usize) {
    for i in 0..n {
        vmtask_rcu::defer_drop(Box::new(i as u64));
    }
}

#[test]
fn a_grandchild_balances_after_a_fork_during_another_threads_collect() {
    // The worker registers first (the test thread never touches RCU in
    // the parent), so its slot is the first one a child reuses.
    let worker = std::thread::spawn(|| {
        // As in tests/fork_from_drops.rs: bag A ends with the Blocker and
        // becomes the draining bag.
        defer_plain(126 * 4);
        vmtask_rcu::barrier();
        ARMED.store(true, Ordering::SeqCst);
        defer_plain(125);
        vmtask_rcu::defer_drop(Box::new(Blocker));
        vmtask_rcu::synchronize();
        defer_plain(126);
        {
            let _guard = vmtask_rcu::read_lock();
            defer_plain(125);
        }
        // Runs A's first entry and fills C: `collect` runs the rest of A,
        // the Blocker last.
        defer_plain(1);
    });
    while !IN_BLOCKER.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: the child only uses RCU, forks, and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: a hang kills the child.
        unsafe { libc::alarm(20) };
        // Registers: takes the worker's old slot.
        vmtask_rcu::defer_drop(Box::new(0u64));
        vmtask_rcu::barrier();
        let s = vmtask_rcu::stats();
        let child_ok = s.callbacks_queued == s.callbacks_invoked;
        if !child_ok {
            println!(
                "child: queued {} invoked {}",
                s.callbacks_queued, s.callbacks_invoked
            );
        }
        // SAFETY: as above.
        let gpid = unsafe { libc::fork() };
        if gpid == 0 {
            vmtask_rcu::defer_drop(Box::new(0u64));
            vmtask_rcu::barrier();
            let ok = stats_balance("grandchild");
            // SAFETY: ends the grandchild.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let g = wait_exit_code(gpid);
        // SAFETY: ends the child.
        unsafe { libc::_exit(if !child_ok { 2 } else { g }) };
    }
    FORKED.store(true, Ordering::SeqCst);
    worker.join().unwrap();
    let code = wait_exit_code(pid);
    vmtask_rcu::barrier();
    assert_eq!(
        code, 0,
        "1: the grandchild's statistics do not balance; 2: the child's"
    );
}
