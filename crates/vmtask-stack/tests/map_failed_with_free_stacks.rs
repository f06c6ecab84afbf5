//! When the kernel refuses more address space (RLIMIT_AS) or mappings
//! (vm.max_map_count with mprotect guards), a pool that still holds free
//! stacks (parked on another live thread, or in another CPU's magazine)
//! must hand them out instead of failing with `MapFailed`.

mod common;

use std::sync::{Arc, Barrier, Mutex};

use common::{
    alloc_until_error, assert_enomem, limit_address_space, membarrier_available, rerun_in_child,
};
use vmtask_stack::{Config, GuardMode, Stack, StackPool};

fn run(mode: GuardMode) {
    if !membarrier_available() {
        // One of the two free stacks is parked on a live thread.
        eprintln!("skipped: a stack parked on a live thread is taken only with membarrier");
        println!("CHILD DONE");
        return;
    }
    let pool = Arc::new(
        StackPool::new(Config {
            stack_size: 1 << 20,
            guard_mode: mode,
            max_stacks: common::max_stacks_past_kernel_limits(1 << 20),
            ..Config::default()
        })
        .unwrap(),
    );
    // The helper thread (its own stack) and the hand-over vector are
    // made before the limit; the 64 MiB of headroom below leaves room for
    // the vector of held stacks.
    let handover: Arc<Mutex<Vec<Stack>>> = Arc::new(Mutex::new(Vec::with_capacity(4)));
    let given = Arc::new(Barrier::new(2));
    let dropped = Arc::new(Barrier::new(2));
    let finished = Arc::new(Barrier::new(2));
    let helper = {
        let (handover, given, dropped, finished) = (
            handover.clone(),
            given.clone(),
            dropped.clone(),
            finished.clone(),
        );
        let pool = pool.clone();
        std::thread::spawn(move || {
            // This thread uses the pool, so a stack it frees is parked on
            // it for its next allocation.
            let warm = pool.alloc().unwrap();
            given.wait();
            let mut two = std::mem::take(&mut *handover.lock().unwrap());
            // The first is parked on this (live) thread, the second goes
            // to the magazine of the CPU it runs on.
            drop(two.pop());
            drop(two.pop());
            dropped.wait();
            // Stay alive, with a stack parked, while the main thread
            // allocates.
            finished.wait();
            drop(warm);
        })
    };
    // The helper's warm stack is out before the limit.
    while pool.stats().live == 0 {
        std::thread::yield_now();
    }
    limit_address_space(64 << 20);
    let (mut stacks, err) = alloc_until_error(&pool, 4096);
    assert_enomem(&err);
    let held = stacks.len();
    {
        let mut h = handover.lock().unwrap();
        h.push(stacks.pop().unwrap());
        h.push(stacks.pop().unwrap());
    }
    given.wait();
    dropped.wait();
    // Two stacks are free now; both must be handed out again.
    let again: Vec<_> = (0..2).map(|_| pool.alloc()).collect();
    finished.wait();
    helper.join().unwrap();
    let stats = pool.stats();
    let ok = again.iter().filter(|r| r.is_ok()).count();
    let errors: Vec<String> = again
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert_eq!(
        ok, 2,
        "{mode:?}: after {held} stacks the limit was hit; 2 were freed on another live thread, \
         but alloc failed: {errors:?}\n{stats}"
    );
    std::mem::forget(stacks);
    std::mem::forget(again);
    println!("CHILD DONE");
}

#[test]
fn free_stacks_are_handed_out_when_the_kernel_refuses_a_carve_markers() {
    const ENV: &str = "VMTASK_TEST_MAPFAIL_MARKERS";
    if std::env::var_os(ENV).is_none() {
        return rerun_in_child(
            "free_stacks_are_handed_out_when_the_kernel_refuses_a_carve_markers",
            ENV,
        );
    }
    run(GuardMode::Auto);
}

#[test]
fn free_stacks_are_handed_out_when_the_kernel_refuses_a_carve_mprotect() {
    const ENV: &str = "VMTASK_TEST_MAPFAIL_MPROTECT";
    if std::env::var_os(ENV).is_none() {
        return rerun_in_child(
            "free_stacks_are_handed_out_when_the_kernel_refuses_a_carve_mprotect",
            ENV,
        );
    }
    run(GuardMode::Mprotect);
}
