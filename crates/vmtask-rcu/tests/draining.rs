//! The draining bag: a drop its owner runs inside `defer_drop` (`running`)
//! must not leave anyone waiting forever. Each scenario runs in a forked
//! child, so a hang is reported as an exit code instead of stalling the
//! harness.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmtask_rcu::*;

mod child;
use child::in_child;

fn wait_for(flag: &AtomicBool, timeout: Duration) -> bool {
    let start = Instant::now();
    while !flag.load(Ordering::SeqCst) {
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

thread_local! {
    static IS_OWNER: Cell<bool> = const { Cell::new(false) };
}

static ARM: AtomicBool = AtomicBool::new(false);
static ENTERED: AtomicBool = AtomicBool::new(false);
static RELEASE: AtomicBool = AtomicBool::new(false);

/// Blocks in its drop, once, when run by its owner thread (so from the
/// owner's draining bag, with `running` set).
struct Gate;
impl Drop for Gate {
    fn drop(&mut self) {
        if ARM.load(Ordering::SeqCst)
            && IS_OWNER.with(|c| c.get())
            && !ENTERED.swap(true, Ordering::SeqCst)
        {
            while !RELEASE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// A thread that was running one of its own deferred drops when another
/// thread forked leaves a run in progress on its slot; in the child that
/// run is over (the thread is gone), so `barrier()` there must not wait
/// for it, and the slot's next owner must run its drops.
#[test]
fn fork_while_a_thread_runs_a_deferred_drop_does_not_hang_barrier_in_the_child() {
    let code = in_child(|| {
        let owner = std::thread::spawn(|| {
            IS_OWNER.with(|c| c.set(true));
            while !ENTERED.load(Ordering::SeqCst) {
                defer_drop(Box::new(Gate));
            }
        });
        ARM.store(true, Ordering::SeqCst);
        if !wait_for(&ENTERED, Duration::from_secs(20)) {
            return 10; // setup failed: the owner never ran its own drop
        }
        // The owner now sits inside a drop it took from its draining bag.
        let grandchild = in_child(|| {
            // New threads of the child take the dead owner's free slot.
            let hold = std::sync::Arc::new(AtomicBool::new(false));
            let (deferred_tx, deferred) = std::sync::mpsc::channel();
            let threads: Vec<_> = (0..16)
                .map(|_| {
                    let (hold, deferred_tx) = (hold.clone(), deferred_tx.clone());
                    std::thread::spawn(move || {
                        defer_drop(Box::new(0u8));
                        deferred_tx.send(()).unwrap();
                        while !hold.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                })
                .collect();
            // All 16 have taken a slot (not a 50 ms sleep for it).
            deferred.iter().take(16).for_each(drop);
            static DONE: AtomicBool = AtomicBool::new(false);
            std::thread::spawn(|| {
                barrier();
                DONE.store(true, Ordering::SeqCst);
            });
            let ok = wait_for(&DONE, Duration::from_secs(60));
            hold.store(true, Ordering::SeqCst);
            if !ok {
                return 2; // barrier hung
            }
            for t in threads {
                t.join().unwrap();
            }
            0
        });
        RELEASE.store(true, Ordering::SeqCst);
        owner.join().unwrap();
        grandchild
    });
    assert_eq!(
        code, 0,
        "exit code {code}: 2 = barrier() hung in the fork child"
    );
}

static CALLED: AtomicBool = AtomicBool::new(false);
static PANICKED: AtomicBool = AtomicBool::new(false);

/// Calls `barrier()` from its drop, once, when run by its owner thread.
struct BarrierInDrop;
impl Drop for BarrierInDrop {
    fn drop(&mut self) {
        if IS_OWNER.with(|c| c.get()) && !CALLED.swap(true, Ordering::SeqCst) {
            let err = std::panic::catch_unwind(barrier).expect_err("barrier must refuse");
            let msg = err
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| err.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            assert!(msg.contains("from a deferred drop"), "message: {msg}");
            PANICKED.store(true, Ordering::SeqCst);
        }
    }
}

/// A deferred drop run by its own thread (inside `defer_drop`) that calls
/// `barrier()` would wait for itself; it gets a panic naming the misuse,
/// as a callback on the callback thread does, and the thread goes on.
#[test]
fn barrier_called_from_a_drop_run_inside_defer_drop_panics() {
    let code = in_child(|| {
        let owner = std::thread::spawn(|| {
            IS_OWNER.with(|c| c.set(true));
            while !CALLED.load(Ordering::SeqCst) {
                defer_drop(Box::new(BarrierInDrop));
            }
            // The thread survives and keeps working.
            defer_drop(Box::new(0u8));
        });
        if !wait_for(&CALLED, Duration::from_secs(20)) {
            return 10;
        }
        if !wait_for(&PANICKED, Duration::from_secs(5)) {
            return 3; // the barrier inside the drop neither panicked nor returned
        }
        owner.join().unwrap();
        barrier();
        0
    });
    assert_eq!(
        code, 0,
        "exit code {code}: 3 = barrier() inside a deferred drop hung"
    );
}

static COUNTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

struct Counted;
impl Drop for Counted {
    fn drop(&mut self) {
        COUNTED.fetch_add(1, Ordering::SeqCst);
    }
}

/// The callback thread takes the bags of a thread that has stopped
/// deferring; a `barrier` racing with it must still wait for them (the
/// flusher queues what it took before the barrier can look).
#[test]
fn barrier_waits_for_bags_the_idle_flush_took() {
    let code = in_child(|| {
        for round in 1..=1500usize {
            // The first entry of an empty bag wakes the callback thread,
            // which takes the bags of a thread that has filled none for a
            // while (this one, after the first rounds) just as the barrier
            // below looks for them.
            for _ in 0..10 {
                defer_drop(Box::new(Counted));
            }
            barrier();
            let counted = COUNTED.load(Ordering::SeqCst);
            if counted != round * 10 {
                eprintln!("round {round}: {counted} of {} drops ran", round * 10);
                return 4;
            }
            // Meet the callback thread's 1 ms cycle at varying phases.
            std::thread::sleep(Duration::from_micros(round as u64 % 7 * 150));
        }
        0
    });
    assert_eq!(code, 0, "barrier returned before every earlier drop ran");
}
