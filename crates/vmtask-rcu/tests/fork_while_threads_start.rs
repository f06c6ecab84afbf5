//! Forks taken while another thread of the parent starts or exits: the
//! child restarts the callback thread and its `barrier` returns.
//!
//! std's thread start-up and exit take a process-wide lock of std's own;
//! a fork that copies it held leaves it held in the child for good, and a
//! callback thread spawned there by std blocked on it forever (a rare hang
//! of `fork_from_drops` in CI). The child now starts the thread with
//! `pthread_create` directly. The window is a few instructions of the
//! other thread's start or exit, so this test forks many times, with a
//! thread starting and exiting without pause on the same CPU. Before the
//! fix, one fork in several thousand hung: 2 s of this test (about 3,000
//! forks) failed one run in three. `VMTASK_FORK_CHURN_SECS` (default 2)
//! sets how long it forks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[path = "../../../test-support/knobs.rs"]
mod knobs;

/// Children running at once: the parent forks on while they finish, so
/// that more forks land in the window.
const IN_FLIGHT: usize = 8;

/// The child: one deferred drop and a `barrier`, which needs the callback
/// thread; the alarm turns a hang into a death by SIGALRM.
fn child(cpus: &libc::cpu_set_t) -> ! {
    // SAFETY: alarm only arms a timer.
    unsafe { libc::alarm(10) };
    // Off the parent's one CPU, so that the children do not queue there.
    // SAFETY: a valid mask for this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), cpus) };
    vmtask_rcu::defer_drop(Box::new(0_u64));
    vmtask_rcu::barrier();
    // SAFETY: ends the child at once, without the parent's destructors.
    unsafe { libc::_exit(0) };
}

#[test]
fn a_fork_while_another_thread_starts_or_exits_restarts_the_callback_thread() {
    let limit = knobs::seconds("VMTASK_FORK_CHURN_SECS", 2.0);
    // The callback thread runs in the parent, so each child must start
    // its own.
    vmtask_rcu::defer_drop(Box::new(0_u64));
    vmtask_rcu::barrier();
    // SAFETY: an all-zero cpu_set_t is a valid empty mask, filled by the
    // kernel below.
    let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads this thread's mask into a mask of the size given.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&cpus), &mut cpus) };
    assert_eq!(rc, 0, "sched_getaffinity");
    // One CPU for this thread and the churning one (which inherits the
    // mask), so that forks land inside its starts and exits. Where the
    // mask cannot be set, the test still runs, with fewer hits.
    let _ = vmtask_percpu::pin_current_thread(vmtask_percpu::cpu());
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut started = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                std::thread::spawn(|| {}).join().unwrap();
                started += 1;
            }
            started
        })
    };
    let start = Instant::now();
    let mut forks = 0_u64;
    let mut running = 0;
    let mut failure = None;
    // Reaps one child; records the first that failed.
    let mut reap = |running: &mut usize| {
        let mut status = 0;
        // SAFETY: waiting for any child of ours: this test binary runs
        // this one test, and it forks them all.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        assert!(pid > 0, "waitpid");
        *running -= 1;
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            failure.get_or_insert(status);
        }
    };
    while start.elapsed() < limit {
        if running == IN_FLIGHT {
            reap(&mut running);
        }
        // SAFETY: the child only defers, waits and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            child(&cpus);
        }
        forks += 1;
        running += 1;
    }
    while running > 0 {
        reap(&mut running);
    }
    stop.store(true, Ordering::Relaxed);
    let started = churn.join().unwrap();
    println!("{forks} forks while {started} threads started and exited");
    if let Some(status) = failure {
        panic!(
            "of {forks} fork children, one did not finish its barrier (status {status:#x}; \
             SIGALRM, 0xe, is a hang: its callback thread never started)"
        );
    }
    assert!(forks > 0 && started > 0, "the test did not run");
}
