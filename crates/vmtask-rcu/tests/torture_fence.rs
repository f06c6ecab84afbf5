//! rcutorture over the SeqCst-fence fallback, forced before first use.
mod common;

#[test]
fn torture_fence_fallback_readers_never_see_a_grace_period_end_under_them() {
    vmtask_rcu::force_fence_fallback().expect("nothing used RCU before this test");
    assert_eq!(vmtask_rcu::stats().mode, vmtask_rcu::BarrierMode::Fence);
    common::torture_all("fence fallback");
}
