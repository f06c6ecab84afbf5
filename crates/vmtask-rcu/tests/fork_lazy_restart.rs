//! After `fork`, the child's callback thread restarts lazily, on next use,
//! and any `defer_drop` is a use, not only the first entry of a bag: a
//! child whose forking thread had a partial bag at the fork, and that then
//! keeps deferring, gets its drops run by the idle flush as the parent
//! does (they used to wait until the bag filled, as no thread ran).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod child;
use child::in_child;

static DROPPED: AtomicUsize = AtomicUsize::new(0);

struct Counted;
impl Drop for Counted {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

fn wait_dropped(n: usize, limit: Duration) -> bool {
    let start = Instant::now();
    while DROPPED.load(Ordering::SeqCst) < n {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn a_child_that_keeps_deferring_gets_its_drops_run() {
    // The parent: the thread's idle partial bag is flushed on its own.
    vmtask_rcu::defer_drop(Box::new(Counted));
    assert!(
        wait_dropped(1, Duration::from_secs(10)),
        "setup: the parent's idle bag was not flushed"
    );
    // A partial bag at the fork.
    vmtask_rcu::defer_drop(Box::new(Counted));
    let code = in_child(|| {
        // SAFETY: alarm only arms a timer; a hang kills the child.
        unsafe { libc::alarm(30) };
        // More drops in the child, as a server would retire objects; none
        // is the first entry of the bag.
        for _ in 0..10 {
            vmtask_rcu::defer_drop(Box::new(Counted));
        }
        // The parent's idle flush takes ~5 ms; give the child 3 s.
        if wait_dropped(12, Duration::from_secs(3)) {
            0
        } else {
            println!(
                "child: {} of 12 dropped after 3 s",
                DROPPED.load(Ordering::SeqCst)
            );
            1
        }
    });
    assert_eq!(
        code, 0,
        "the child's deferred drops never ran (its callback thread was never restarted)"
    );
    vmtask_rcu::barrier();
}
