//! `stats()` counts the user's callbacks only. Alone in its binary: the
//! counters are process-wide.

#[test]
fn stats_count_user_callbacks_not_barrier_markers() {
    vmtask_rcu::barrier();
    let before = vmtask_rcu::stats();
    vmtask_rcu::call(|| {});
    vmtask_rcu::defer_drop(Box::new(7u64));
    vmtask_rcu::barrier();
    vmtask_rcu::barrier();
    let after = vmtask_rcu::stats();
    assert_eq!(after.callbacks_queued - before.callbacks_queued, 2, "{after}");
    assert_eq!(after.callbacks_invoked - before.callbacks_invoked, 2, "{after}");
    assert_eq!(after.callbacks_queued, after.callbacks_invoked, "{after}");
}
