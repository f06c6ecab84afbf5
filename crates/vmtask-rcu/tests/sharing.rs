//! Concurrent `synchronize` callers share grace periods. Alone in its
//! binary: other tests' grace periods would blur the count.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn concurrent_synchronize_callers_share_grace_periods() {
    // A reader holds a section while the callers arrive, so they all queue
    // behind the first grace period.
    let entered = Arc::new(AtomicBool::new(false));
    let reader = {
        let entered = entered.clone();
        std::thread::spawn(move || {
            let guard = vmtask_rcu::read_lock();
            entered.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            drop(guard);
        })
    };
    while !entered.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let before = vmtask_rcu::stats().grace_periods;
    let callers: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(vmtask_rcu::synchronize))
        .collect();
    for t in callers {
        t.join().unwrap();
    }
    reader.join().unwrap();
    let used = vmtask_rcu::stats().grace_periods - before;
    eprintln!("8 concurrent synchronize calls took {used} grace periods");
    // The first caller's grace period, and at most one more for everyone
    // who arrived while it ran.
    assert!(
        (1..=2).contains(&used),
        "8 callers took {used} grace periods"
    );
}
