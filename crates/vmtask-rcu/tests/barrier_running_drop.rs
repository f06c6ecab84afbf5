//! `barrier()` waits for a deferred drop that its owner thread is running
//! inside `defer_drop` (taken from its draining bag). No other test fails
//! when that wait (`runs_in_progress` in `barrier`) is removed:
//! `barrier_bags.rs` does not get its owner to run its own bag.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

thread_local! {
    static IS_OWNER: Cell<bool> = const { Cell::new(false) };
}
static ENTERED: AtomicBool = AtomicBool::new(false);
static RELEASE: AtomicBool = AtomicBool::new(false);
static FINISHED: AtomicBool = AtomicBool::new(false);

/// Blocks in its drop, once, when its owner runs it.
struct Gate;
impl Drop for Gate {
    fn drop(&mut self) {
        if IS_OWNER.with(Cell::get) && !ENTERED.swap(true, Ordering::SeqCst) {
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            FINISHED.store(true, Ordering::SeqCst);
        }
    }
}

#[test]
fn barrier_waits_for_a_drop_its_owner_is_running() {
    let owner = std::thread::spawn(|| {
        IS_OWNER.with(|c| c.set(true));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ENTERED.load(Ordering::SeqCst) && Instant::now() < deadline {
            vmtask_rcu::defer_drop(Box::new(Gate));
        }
    });
    let start = Instant::now();
    while !ENTERED.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "setup: owner never ran its own drop"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The owner sits inside a drop deferred before this barrier.
    let barrier = std::thread::spawn(|| {
        vmtask_rcu::barrier();
        FINISHED.load(Ordering::SeqCst)
    });
    std::thread::sleep(Duration::from_millis(300));
    let returned_early = barrier.is_finished();
    RELEASE.store(true, Ordering::SeqCst);
    let finished_when_returned = barrier.join().unwrap();
    owner.join().unwrap();
    assert!(
        !returned_early && finished_when_returned,
        "barrier returned while a drop deferred before it was still running"
    );
}
