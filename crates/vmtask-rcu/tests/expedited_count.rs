//! `Stats::expedited` counts the grace periods the soft backlog limit
//! started early, not the checks that found the backlog above it: with a
//! soft limit under 4096 every `call` is checked, and 200 calls made while
//! one grace period is held up by a reader used to report 199 of them.
//! Alone in its binary: it sets the process-wide limits.

use std::sync::mpsc;
use std::time::Duration;

#[test]
fn expedited_counts_grace_periods_started_not_calls_over_the_soft_limit() {
    vmtask_rcu::barrier();
    vmtask_rcu::set_backlog_limits(1, 1_000_000);
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let _guard = vmtask_rcu::read_lock();
        entered_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(20));
    });
    entered.recv().unwrap();
    let before = vmtask_rcu::stats();
    for _ in 0..200 {
        vmtask_rcu::call(|| {});
    }
    let during = vmtask_rcu::stats();
    release.send(()).unwrap();
    reader.join().unwrap();
    vmtask_rcu::barrier();
    let expedited = during.expedited - before.expedited;
    // The reader holds every grace period off: at most the one the
    // callback thread is waiting in, and one more asked for behind it.
    assert!(
        expedited <= 4,
        "{expedited} grace periods reported started early while one waited for a reader\n{during}"
    );
    assert!(
        expedited >= 1,
        "the soft limit never asked for a grace period\n{during}"
    );
}
