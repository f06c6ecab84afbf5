//! A `fork` while another thread registers a reader, or makes the
//! process's first RCU call, must leave the child able to use RCU. An
//! audit found the child hanging on three pieces of state the fork caught
//! half-way: the lock around the thread-exit backstop's pthread key, the
//! one-time installation of the fork handlers, and the one-time choice of
//! the fence mode.
//!
//! The children use a raw pthread, not `std::thread::spawn`, to register a
//! reader of their own: std's spawn can itself hang in a fork child of a
//! multithreaded process, on std's own locks.

mod child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Waits for `pid` up to `limit`; `None` (after killing it) if it hung.
fn wait_child(pid: libc::pid_t, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child, without blocking.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            return Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
        if start.elapsed() > limit {
            // SAFETY: our own child; reaped at once.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// In a fork child: registers a reader on a new raw pthread, reads, waits
/// for a grace period, and exits 0 (or hangs, which the parent reports).
fn child_reads_on_a_new_thread() -> ! {
    extern "C" fn reader(_: *mut libc::c_void) -> *mut libc::c_void {
        drop(vmtask_rcu::read_lock());
        std::ptr::null_mut()
    }
    let mut thread: libc::pthread_t = 0;
    // SAFETY: a raw thread running an `extern "C"` function with no
    // argument, joined before `_exit`.
    unsafe {
        if libc::pthread_create(&mut thread, std::ptr::null(), reader, std::ptr::null_mut()) != 0 {
            libc::_exit(3);
        }
        libc::pthread_join(thread, std::ptr::null_mut());
    }
    vmtask_rcu::synchronize();
    // SAFETY: ends the child without running the parent's exit handlers.
    unsafe { libc::_exit(0) }
}

#[test]
fn fork_while_other_threads_register_readers() {
    vmtask_rcu::synchronize();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // Each new thread registers (arming the backstop's key)
                    // and unregisters at exit.
                    std::thread::spawn(|| drop(vmtask_rcu::read_lock()))
                        .join()
                        .unwrap();
                }
            });
        }
        let result = std::panic::catch_unwind(|| {
            let start = Instant::now();
            let mut forks = 0;
            while forks < 300 && start.elapsed() < Duration::from_secs(3) {
                // SAFETY: the child runs only `child_reads_on_a_new_thread`.
                let pid = unsafe { libc::fork() };
                assert!(pid >= 0, "fork failed");
                if pid == 0 {
                    child_reads_on_a_new_thread();
                }
                forks += 1;
                let status = wait_child(pid, Duration::from_secs(5));
                assert_eq!(status, Some(0), "fork {forks}: the child hung or failed");
            }
        });
        stop.store(true, Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

const FIRST_USE_CHILD: &str = "VMTASK_RCU_FIRST_USE_DELAY_US";

/// Each run is a fresh process (this binary re-run on this test), whose
/// first RCU call, on a new thread, races with a fork from the main
/// thread at a different delay.
#[test]
fn fork_during_the_first_rcu_call() {
    if let Some(delay) = std::env::var_os(FIRST_USE_CHILD) {
        let delay: u64 = delay.to_str().unwrap().parse().unwrap();
        first_use_race(Duration::from_micros(delay));
        return;
    }
    for round in 0..3 {
        for delay in [0, 20, 50, 100, 200, 400, 800] {
            let out = child::rerun_test(
                "fork_during_the_first_rcu_call",
                FIRST_USE_CHILD,
                &delay.to_string(),
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("FORK CHILD OK"),
                "round {round}, delay {delay} µs: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn first_use_race(delay: Duration) {
    let first = std::thread::spawn(|| drop(vmtask_rcu::read_lock()));
    let start = Instant::now();
    while start.elapsed() < delay {
        std::hint::spin_loop();
    }
    // SAFETY: the child runs only `child_reads_on_a_new_thread`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        child_reads_on_a_new_thread();
    }
    first.join().unwrap();
    let status = wait_child(pid, Duration::from_secs(5));
    assert_eq!(status, Some(0), "the child hung or failed");
    println!("FORK CHILD OK");
}
