//! Work of other threads in flight at a `fork`, as the child sees it. An
//! audit found two bugs here:
//! - a thread stopped by the fork between a queue's tail swap and its link
//!   store left a link that is never written, and the child's callback
//!   machinery waited for it forever (`barrier` hung);
//! - the bags of threads that did not survive the fork stayed in their
//!   slots, where the child's `barrier` did not look.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;

mod child;
use child::in_child;

static STOP: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicUsize = AtomicUsize::new(0);

struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn the_child_finishes_what_other_threads_left_in_flight() {
    vmtask_rcu::barrier();

    // Forks while another thread queues callbacks without pause: some
    // forks catch it half-way through a push.
    const FORKS: usize = 400;
    let failed = std::thread::scope(|s| {
        s.spawn(|| {
            while !STOP.load(Ordering::Relaxed) {
                vmtask_rcu::call(|| {});
            }
        });
        // The caller stops whatever happens, so a failure cannot leave
        // the scope waiting for it.
        let failed = std::panic::catch_unwind(|| {
            (0..FORKS).find(|_| {
                let code = in_child(|| {
                    // SAFETY: alarm only arms a timer; a hang kills the
                    // child (in_child then panics: it did not exit).
                    unsafe { libc::alarm(10) };
                    vmtask_rcu::barrier();
                    vmtask_rcu::call(|| {});
                    vmtask_rcu::barrier();
                    // What the fork cut off or another thread was running
                    // is not pending in the child, nor counted twice.
                    let stats = vmtask_rcu::stats();
                    if stats.callbacks_queued != stats.callbacks_invoked {
                        println!("child: {stats}");
                        return 1;
                    }
                    0
                });
                code != 0
            })
        });
        STOP.store(true, Ordering::Relaxed);
        failed
    });
    match failed {
        Ok(None) => {}
        Ok(Some(fork)) => panic!("the child of fork {fork} failed"),
        Err(_) => panic!("a child hung in barrier (killed by its alarm) or crashed"),
    }
    vmtask_rcu::barrier();

    // A thread with deferred drops in its own bag, alive (and idle) at
    // the fork: the child's barrier drops them all.
    const DEFERRED: usize = 300;
    let (deferred, forked) = (Barrier::new(2), Barrier::new(2));
    std::thread::scope(|s| {
        s.spawn(|| {
            for _ in 0..DEFERRED {
                vmtask_rcu::defer_drop(Box::new(Counted));
            }
            deferred.wait();
            forked.wait();
        });
        deferred.wait();
        let code = in_child(|| {
            // SAFETY: alarm only arms a timer; a hang kills the child.
            unsafe { libc::alarm(10) };
            vmtask_rcu::barrier();
            let dropped = DROPPED.load(Ordering::Relaxed);
            if dropped == DEFERRED {
                0
            } else {
                println!(
                    "the child's barrier left {} of {DEFERRED} undropped",
                    DEFERRED - dropped
                );
                1
            }
        });
        forked.wait();
        assert_eq!(
            code, 0,
            "deferred drops of a thread that did not survive the fork"
        );
    });
    vmtask_rcu::barrier();
    assert_eq!(DROPPED.load(Ordering::Relaxed), DEFERRED);
}
