//! Batches the callback thread holds at a `fork`, as the child sees them
//! (review findings): a batch waiting for its grace period at the fork
//! was lost in the child, and a fork from inside a callback left the
//! child with two callback threads.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

mod child;
use child::{in_child, stats_balance, wait_exit_code};

/// The tests read the process's statistics: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Waits for the child `pid` forked by a callback (published in `child`)
/// and returns whether it exited with 0.
fn wait_for_child_of_callback(child: &AtomicI32) -> bool {
    // Not `barrier`: its thread could run the callback itself.
    let mut waited = Duration::ZERO;
    while child.load(Ordering::SeqCst) == 0 && waited < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
        waited += Duration::from_millis(1);
    }
    let pid = child.load(Ordering::SeqCst);
    assert!(pid > 0, "fork failed, or the callback did not run");
    wait_exit_code(pid) == 0
}

/// Callback threads of this process, by name ("vmtask-rcu-callbacks",
/// cut to the kernel's 15 characters).
fn callback_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == "vmtask-rcu-call")
        .count()
}

#[test]
fn a_callback_waiting_for_its_grace_period_at_the_fork_runs_in_the_child() {
    static RAN: AtomicBool = AtomicBool::new(false);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    vmtask_rcu::barrier();
    let (locked, release) = (Barrier::new(2), Barrier::new(2));
    std::thread::scope(|s| {
        s.spawn(|| {
            let guard = vmtask_rcu::read_lock();
            locked.wait();
            release.wait();
            drop(guard);
        });
        locked.wait();
        vmtask_rcu::call(|| RAN.store(true, Ordering::SeqCst));
        // The callback thread splices it and waits for the reader above.
        std::thread::sleep(Duration::from_millis(100));
        let code = in_child(|| {
            // SAFETY: alarm only arms a timer; a hang kills the child.
            unsafe { libc::alarm(10) };
            vmtask_rcu::barrier();
            if !stats_balance("child") {
                return 2;
            }
            if RAN.load(Ordering::SeqCst) {
                0
            } else {
                println!("child: the callback never ran");
                1
            }
        });
        release.wait();
        assert_eq!(
            code, 0,
            "a callback queued before the fork was lost in the child"
        );
    });
    vmtask_rcu::barrier();
    assert!(RAN.load(Ordering::SeqCst));
}

#[test]
fn a_fork_from_a_callback_leaves_one_callback_thread_in_the_child() {
    static CHILD: AtomicI32 = AtomicI32::new(0);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    vmtask_rcu::barrier();
    vmtask_rcu::call(|| {
        // SAFETY: the child runs the checks below and _exits.
        let pid = unsafe { libc::fork() };
        if pid != 0 {
            CHILD.store(pid, Ordering::SeqCst);
            return;
        }
        // SAFETY: alarm only arms a timer; a hang kills the child.
        unsafe { libc::alarm(10) };
        // In the child, this callback returns and its thread goes on as
        // the callback thread; a new thread checks that it serves.
        // (Named: a thread otherwise takes its creator's name.)
        let checker = std::thread::Builder::new().name("checker".into());
        checker
            .spawn(|| {
                vmtask_rcu::call(|| {});
                vmtask_rcu::barrier();
                let threads = callback_threads();
                let code = if threads != 1 {
                    println!("child: {threads} callback threads");
                    1
                } else if !stats_balance("child") {
                    // The rest of the batch the callback forked from,
                    // counted twice.
                    2
                } else {
                    0
                };
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(code) };
            })
            .expect("spawn in the child");
    });
    // More callbacks, likely in the same batch as the one that forks.
    for _ in 0..10 {
        vmtask_rcu::call(|| {});
    }
    assert!(
        wait_for_child_of_callback(&CHILD),
        "the child failed or hung (see its output)"
    );
    vmtask_rcu::barrier();
}

/// The forking thread's own batches of deferred drops were counted as
/// queued when they filled: the child runs them and counts them once
/// (review finding: they were counted twice).
#[test]
fn the_forking_threads_own_batches_are_counted_once_in_the_child() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    vmtask_rcu::barrier();
    for i in 0..126 * 10 {
        vmtask_rcu::defer_drop(Box::new(i as u64));
    }
    let code = in_child(|| {
        // SAFETY: alarm only arms a timer; a hang kills the child.
        unsafe { libc::alarm(10) };
        vmtask_rcu::barrier();
        if stats_balance("child") {
            0
        } else {
            1
        }
    });
    vmtask_rcu::barrier();
    assert_eq!(
        code, 0,
        "the child's counts do not balance (see its output)"
    );
}
