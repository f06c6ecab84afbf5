//! Backlog limits smaller than the 256-callback step at which the limits
//! are normally checked are still enforced: `call` past a hard limit of 8
//! waits (review finding: such limits were never looked at, and 200 calls
//! went through with a hard limit of 8).
//!
//! Alone in its binary: it sets the process-wide limits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[test]
fn a_small_hard_limit_throttles_call() {
    vmtask_rcu::set_backlog_limits(1, 8);
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    // A reader holds every grace period off, so nothing queued below can
    // be invoked meanwhile and the backlog only grows, until `call` has
    // been throttled (or has queued everything without waiting: the bug).
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let guard = vmtask_rcu::read_lock();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            while vmtask_rcu::stats().throttled == 0
                && !done.load(Ordering::Acquire)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(guard);
        })
    };
    rx.recv().unwrap();
    for _ in 0..200 {
        vmtask_rcu::call(|| {});
    }
    done.store(true, Ordering::Release);
    reader.join().unwrap();
    vmtask_rcu::barrier();
    let stats = vmtask_rcu::stats();
    assert!(
        stats.throttled > 0,
        "200 callbacks were queued past a hard limit of 8 without waiting\n{stats}"
    );
    assert!(
        stats.backlog_high_water <= 9,
        "the backlog reached {} with a hard limit of 8\n{stats}",
        stats.backlog_high_water
    );
}
