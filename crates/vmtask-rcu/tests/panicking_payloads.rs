//! A callback or deferred drop that panics with a payload whose own drop
//! panics: the second panic is contained too, so reclamation goes on
//! (review finding: it killed the callback thread for good, or left the
//! deferring thread's bag marked as running, and every later `barrier`
//! hung). Each scenario runs in a forked child with a 120 s watchdog.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod child;
use child::in_child;

struct Bomb;

impl Drop for Bomb {
    fn drop(&mut self) {
        panic!("the payload's drop panics too");
    }
}

/// Runs `scenario` in a child that exits with 3 if it takes over 120 s.
/// (A hang is forever; the scenario takes well under a second of CPU, but
/// on a loaded machine its two panics, backtraces and all, took over 10 s.)
fn bounded(scenario: fn() -> i32) -> i32 {
    in_child(move || {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(120));
            // SAFETY: ends the (hung) child at once.
            unsafe { libc::_exit(3) };
        });
        scenario()
    })
}

#[test]
fn a_callback_whose_panic_payload_panics_on_drop_leaves_the_callback_thread_running() {
    let code = bounded(|| {
        vmtask_rcu::call(|| std::panic::panic_any(Bomb));
        vmtask_rcu::barrier();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        vmtask_rcu::call(move || flag.store(true, Ordering::SeqCst));
        vmtask_rcu::barrier();
        if ran.load(Ordering::SeqCst) {
            0
        } else {
            4
        }
    });
    assert_eq!(
        code, 0,
        "3: barrier hung (the callback thread died); 4: a later callback never ran"
    );
}

#[test]
fn a_deferred_drop_whose_panic_payload_panics_on_drop_does_not_wedge_barrier() {
    let code = bounded(|| {
        struct Defused;
        impl Drop for Defused {
            fn drop(&mut self) {
                std::panic::panic_any(Bomb);
            }
        }
        // Enough drops after it that the deferring thread runs it itself.
        let result = std::panic::catch_unwind(|| {
            vmtask_rcu::defer_drop(Box::new(Defused));
            for i in 0..200_000u64 {
                vmtask_rcu::defer_drop(Box::new(i));
            }
        });
        if let Err(payload) = result {
            std::mem::forget(payload);
        }
        match std::thread::spawn(vmtask_rcu::barrier).join() {
            Ok(()) => 0,
            Err(_) => 5,
        }
    });
    assert_eq!(code, 0, "3: barrier hung; 5: barrier panicked");
}
