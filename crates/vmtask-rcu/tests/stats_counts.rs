//! `stats()` counts the user's callbacks: not barrier markers, and a batch
//! of deferred drops as its entries. Alone in its binary, in one test: the
//! counters are process-wide.

#[test]
fn stats_count_user_callbacks() {
    vmtask_rcu::barrier();
    let before = vmtask_rcu::stats();
    vmtask_rcu::call(|| {});
    vmtask_rcu::defer_drop(Box::new(7u64));
    vmtask_rcu::barrier();
    vmtask_rcu::barrier();
    let after = vmtask_rcu::stats();
    assert_eq!(
        after.callbacks_queued - before.callbacks_queued,
        2,
        "{after}"
    );
    assert_eq!(
        after.callbacks_invoked - before.callbacks_invoked,
        2,
        "{after}"
    );
    assert_eq!(after.callbacks_queued, after.callbacks_invoked, "{after}");

    for i in 0..10u64 {
        vmtask_rcu::defer_drop(Box::new(i));
    }
    vmtask_rcu::barrier();
    let last = vmtask_rcu::stats();
    assert_eq!(
        last.callbacks_invoked - after.callbacks_invoked,
        10,
        "{last}"
    );
    assert!(
        last.largest_batch >= 10,
        "a batch of 10 drops counts as 10: {last}"
    );
}
