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
            child::rerun_test_ok(
                "fork_during_the_first_rcu_call",
                FIRST_USE_CHILD,
                &delay.to_string(),
                "FORK CHILD OK",
                &format!("round {round}, delay {delay} µs"),
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

const OTHER_PREPARE_CHILD: &str = "VMTASK_RCU_FIRST_USE_IN_OTHER_PREPARE";

/// Since glibc 2.36 `fork` lets go of its handler lock while it runs each
/// prepare handler, and runs only the handlers registered when it began.
/// Here the process's first RCU use (another thread) happens while the
/// fork sits in another library's prepare handler. Had the crate installed
/// its handlers on first use, none of them would run for this fork, and
/// the child would inherit that thread's reader, in a section, never
/// cleared: its `synchronize` would wait forever. The handlers are
/// installed at start-up instead.
#[test]
fn first_use_inside_another_librarys_prepare_handler() {
    if std::env::var_os(OTHER_PREPARE_CHILD).is_some() {
        first_use_in_prepare();
        return;
    }
    child::rerun_test_ok(
        "first_use_inside_another_librarys_prepare_handler",
        OTHER_PREPARE_CHILD,
        "1",
        "FORK CHILD OK",
        "a first use inside another library's prepare handler",
    );
}

static IN_PREPARE: AtomicBool = AtomicBool::new(false);
static READING: AtomicBool = AtomicBool::new(false);

/// Another library's prepare handler: it lets the reader thread make its
/// first RCU use while the fork waits here (up to half a second).
extern "C" fn other_librarys_prepare() {
    IN_PREPARE.store(true, Ordering::SeqCst);
    let start = Instant::now();
    while !READING.load(Ordering::SeqCst) && start.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn first_use_in_prepare() {
    // SAFETY: registers a handler that lives for the whole program.
    let rc = unsafe { libc::pthread_atfork(Some(other_librarys_prepare), None, None) };
    assert_eq!(rc, 0);
    let reader = std::thread::spawn(|| {
        while !IN_PREPARE.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        let guard = vmtask_rcu::read_lock();
        READING.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        drop(guard);
    });
    // SAFETY: the child only waits for a grace period and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        vmtask_rcu::synchronize();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    reader.join().unwrap();
    let status = wait_child(pid, Duration::from_secs(5));
    assert_eq!(status, Some(0), "the child hung or failed");
    println!("FORK CHILD OK");
}
