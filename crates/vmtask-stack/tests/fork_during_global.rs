//! A fork while another thread creates `StackPool::global()` leaves the
//! child a working global pool (review finding: with a `OnceLock`, the
//! child inherited the initialisation as running, by a thread it does not
//! have, and its first `global()` waited for ever: 19 hangs in 24 runs).
//!
//! Each round runs in a fresh process (this binary re-run on this test),
//! where the global pool does not exist yet; rounds fork at different
//! delays after the creating thread starts.

use std::sync::{Arc, Barrier};

mod common;
use common::{in_child, spin_ns, CHILD};

const TEST: &str = "a_fork_during_the_global_pools_creation_leaves_the_child_a_pool";

/// The exit code of a child killed by the alarm below: it hung.
const HUNG: i32 = 128 + libc::SIGALRM;

/// In a fresh process: one thread creates the global pool while this one
/// forks after `delay_ns`; the child allocates from the global pool.
/// Returns the child's exit code (0: it got a stack).
fn round(delay_ns: u64) -> i32 {
    let barrier = Arc::new(Barrier::new(2));
    let creator = {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            barrier.wait();
            vmtask_stack::StackPool::global();
        })
    };
    barrier.wait();
    spin_ns(delay_ns);
    // SAFETY: the child only allocates, frees and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: alarm only arms a timer; a hang kills the child.
        unsafe { libc::alarm(10) };
        let ok = vmtask_stack::StackPool::global().alloc().is_ok();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    creator.join().unwrap();
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

#[test]
fn a_fork_during_the_global_pools_creation_leaves_the_child_a_pool() {
    if in_child() {
        let delay: u64 = std::env::var("VMTASK_GLOBAL_FORK_DELAY_NS")
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        println!("CHILD CODE {}", round(delay));
        return;
    }
    for delay_ns in [0, 5_000, 10_000, 20_000, 30_000, 50_000, 80_000, 120_000] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, TEST)
            .env("VMTASK_GLOBAL_FORK_DELAY_NS", delay_ns.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let code: i32 = stdout
            .lines()
            .find_map(|l| {
                l.split_once("CHILD CODE ")
                    .map(|(_, c)| c.trim().parse().unwrap())
            })
            .unwrap_or_else(|| {
                panic!(
                    "round at {delay_ns} ns did not finish: {:?}\n{stdout}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert_ne!(
            code, HUNG,
            "fork {delay_ns} ns into the global pool's creation: the child's global() hung"
        );
        assert_eq!(
            code, 0,
            "fork {delay_ns} ns in: the child's allocation failed"
        );
    }
}
