//! A grace period with a reader outside its section issues one heavy
//! barrier (`membarrier`, an interrupt of every CPU running one of our
//! threads), not liburcu's two: the closing one is replaced by the slots'
//! release stores and the updater's acquire loads (see `gp.rs`). Each
//! barrier cost 19–24 µs on the project's machine with a reader running
//! on the other CPU, so the count is the cost. (With a reader that runs
//! sections back to back, grace periods may issue none: see
//! tests/fast_grace_periods.rs.)

use std::sync::mpsc;

#[test]
fn a_grace_period_with_an_idle_reader_issues_one_heavy_barrier() {
    // A registered reader, idle (outside any section) for the test.
    let (registered, wait_registered) = mpsc::channel();
    let (stop, wait_stop) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        drop(vmtask_rcu::read_lock());
        registered.send(()).unwrap();
        let _ = wait_stop.recv();
    });
    wait_registered.recv().unwrap();
    vmtask_rcu::synchronize();
    let before = vmtask_rcu::stats();
    const ROUNDS: u64 = 100;
    for _ in 0..ROUNDS {
        vmtask_rcu::synchronize();
    }
    let after = vmtask_rcu::stats();
    stop.send(()).unwrap();
    reader.join().unwrap();
    let grace_periods = after.grace_periods - before.grace_periods;
    let barriers = after.heavy_barriers - before.heavy_barriers;
    // Nothing else runs grace periods here (no callbacks were queued), so
    // each call ran its own.
    assert_eq!(grace_periods, ROUNDS, "{after}");
    assert_eq!(
        barriers, grace_periods,
        "{barriers} heavy barriers for {grace_periods} grace periods"
    );
    // An idle reader never shows a section begun after the flip, so the
    // fast path gives up every time (tests/fast_grace_periods.rs has the
    // busy reader it needs).
    assert_eq!(
        after.fast_grace_periods, before.fast_grace_periods,
        "{after}"
    );
}
