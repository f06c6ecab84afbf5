//! The owner/flusher hand-off of a thread's bags (see `bag.rs`), as flags
//! only, so that loom can check it.
//!
//! - owner: `busy = 1`; barrier (compiler-only with membarrier); if
//!   `steal`: `busy = 0`, refuse; else own the data until `busy = 0`
//!   (release).
//! - flusher: `steal = 1`; heavy barrier (membarrier: a full fence on every
//!   CPU running the owner); wait while `busy` (acquire); own the data
//!   until `steal = 0` (release).
//!
//! Only the owner sets `busy`, and it is clear whenever the owner is
//! outside: an owner that finds it set has re-entered itself, from a
//! signal handler that interrupted its push (`defer_drop` is not
//! async-signal-safe). Going on would hand it a second `&mut` to the bags
//! and clear `busy` under the interrupted push (review finding: a bag's
//! length ran past its capacity, then glibc reported a corrupted heap), so
//! it aborts with a message instead, for the price of one load.

use crate::gp::{reader_barrier, FenceMode};
use crate::sync::{AtomicBool, Ordering};

pub(crate) struct Handoff {
    busy: AtomicBool,
    steal: AtomicBool,
}

impl Handoff {
    pub(crate) fn new() -> Self {
        Handoff {
            busy: AtomicBool::new(false),
            steal: AtomicBool::new(false),
        }
    }

    /// Owner: tries to take the data. On `true` the owner must call
    /// `owner_exit` when done.
    #[inline(always)]
    pub(crate) fn owner_enter(&self, mode: FenceMode) -> bool {
        if self.busy.load(Ordering::Relaxed) {
            reentered();
        }
        self.busy.store(true, Ordering::Relaxed);
        reader_barrier(mode);
        if self.steal.load(Ordering::Acquire) {
            self.busy.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Owner: gives the data back.
    #[inline(always)]
    pub(crate) fn owner_exit(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// Owner: waits until no flusher holds the data.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn owner_wait_for_flusher(&self) {
        while self.steal.load(Ordering::Acquire) {
            crate::sync::spin();
        }
    }

    /// Flusher, step 1 (before the heavy barrier).
    pub(crate) fn flusher_mark(&self) {
        self.steal.store(true, Ordering::Relaxed);
    }

    /// Flusher, step 2 (after the heavy barrier): waits out an owner
    /// inside; the data is the flusher's until `flusher_release`.
    pub(crate) fn flusher_acquire(&self) {
        while self.busy.load(Ordering::Acquire) {
            crate::sync::spin();
        }
    }

    /// Flusher, step 3.
    pub(crate) fn flusher_release(&self) {
        self.steal.store(false, Ordering::Release);
    }

    /// In the fork child: whether the owner, now gone, was inside (between
    /// `owner_enter` and `owner_exit`) at the fork. The child's memory is a
    /// cut of the owner's program order at the fork, so if not, the data is
    /// whole.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn owner_was_inside(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn reset(&self) {
        self.busy.store(false, Ordering::Relaxed);
        self.steal.store(false, Ordering::Relaxed);
    }
}

/// An owner found its own `busy` set (see the module header).
#[cold]
#[inline(never)]
fn reentered() -> ! {
    crate::sync::warn(format_args!(
        "vmtask_rcu: defer_drop (or defer_raw, or an RcuCell write) re-entered on one thread, \
         from a signal handler that interrupted it: they are not async-signal-safe; aborting"
    ));
    std::process::abort();
}

#[cfg(all(loom, test))]
mod loom_model {
    //! The owner pushes while a flusher steals; loom's `UnsafeCell` fails
    //! the model on any unsynchronised access to the data.
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    fn run(mode: FenceMode) {
        loom::model(move || {
            let handoff = Arc::new(Handoff::new());
            let data = Arc::new(UnsafeCell::new(0u32));
            let (h, d) = (handoff.clone(), data.clone());
            let owner = loom::thread::spawn(move || {
                let mut pushed = 0;
                for _ in 0..2 {
                    if h.owner_enter(mode) {
                        // SAFETY: the protocol gives the owner the data.
                        d.with_mut(|v| unsafe { *v += 1 });
                        h.owner_exit();
                        pushed += 1;
                    }
                }
                pushed
            });
            handoff.flusher_mark();
            crate::sync::fence(Ordering::SeqCst); // the heavy barrier
            handoff.flusher_acquire();
            // SAFETY: the protocol gives the flusher the data.
            let stolen = data.with_mut(|v| unsafe { std::mem::take(&mut *v) });
            handoff.flusher_release();
            let pushed = owner.join().unwrap();
            // SAFETY: both threads are done.
            let left = data.with(|v| unsafe { *v });
            assert_eq!(stolen + left, pushed, "a push was lost or counted twice");
        });
    }

    #[test]
    fn loom_flusher_and_owner_never_touch_the_bag_at_once_membarrier() {
        run(FenceMode::Membarrier);
    }

    #[test]
    fn loom_flusher_and_owner_never_touch_the_bag_at_once_fence() {
        run(FenceMode::SeqCst);
    }
}
