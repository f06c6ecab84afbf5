//! `barrier` waits for the deferred drops of a bag its thread is draining
//! itself, one entry per `defer_drop` (the bag is taken from the thread
//! and run to the end). A drop in progress on the owner while `barrier`
//! runs is `barrier_running_drop.rs`'s case.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static DROPPED: AtomicU64 = AtomicU64::new(0);
static DEFERRED: AtomicU64 = AtomicU64::new(0);

/// Slow to drop if `.0`: the first bag takes its thread a while to run,
/// the second bag is quick.
struct Slow(bool);
impl Drop for Slow {
    fn drop(&mut self) {
        if self.0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn barrier_waits_for_a_bag_its_own_thread_is_draining() {
    let deferrer = std::thread::spawn(|| {
        for round in 0..2 {
            for _ in 0..126 {
                vmtask_rcu::defer_drop(Box::new(Slow(round == 0)));
                DEFERRED.fetch_add(1, Ordering::SeqCst);
            }
            if round == 0 {
                // Let the first bag's grace period pass (but not so long that the
                // callback thread takes the bag as idle, 5 ms): the next bag to
                // fill makes this thread run it (slowly). A grace period, not
                // a 3 ms sleep, which on a loaded machine may last past 5 ms.
                vmtask_rcu::synchronize();
            }
        }
    });
    // Wait until the first of its objects has been dropped (by the
    // callback thread or by the owner).
    while DROPPED.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_micros(100));
    }
    let deferred = DEFERRED.load(Ordering::SeqCst);
    vmtask_rcu::barrier();
    let dropped = DROPPED.load(Ordering::SeqCst);
    assert!(
        dropped >= deferred,
        "barrier returned with {dropped} of the {deferred} objects deferred before it dropped"
    );
    deferrer.join().unwrap();
    vmtask_rcu::barrier();
    assert_eq!(DROPPED.load(Ordering::SeqCst), 252);
}
