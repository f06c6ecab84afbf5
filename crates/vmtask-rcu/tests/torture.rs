//! rcutorture over the membarrier path (or the fence path on kernels
//! without membarrier). `VMTASK_TORTURE_SECS=60` for a long run.
mod common;

#[test]
fn torture_readers_never_see_a_grace_period_end_under_them() {
    common::torture_all("default barrier");
}
