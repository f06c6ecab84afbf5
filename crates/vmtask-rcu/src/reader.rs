//! `read_lock()` and `ReadGuard`: the read side.

use std::marker::PhantomData;

use crate::gp::ReaderCtr;
use crate::grace::GP;
use crate::registry::{self, LOCAL};

/// Proof that the current thread is in a read-side critical section;
/// ends the section (or one nesting level) when dropped.
///
/// Neither `Send` nor `Sync`: the section belongs to the thread.
///
/// ```compile_fail,E0277
/// fn send<T: Send>(_: T) {}
/// send(vmtask_rcu::read_lock());
/// ```
///
/// ```compile_fail,E0277
/// fn sync<T: Sync>(_: &T) {}
/// sync(&vmtask_rcu::read_lock());
/// ```
///
/// Guards
/// count: the section ends when the last guard of the thread is dropped,
/// in whatever order they go. The guard itself is empty; the section's
/// state is in the thread's reader.
///
/// A guard that is never dropped (leaked with `mem::forget`, or alive in
/// a coroutine that is never resumed) keeps its thread in the section
/// (unless a signal handler took it: see [`read_lock`]):
/// every later grace period waits for it, forever, so `synchronize`,
/// `barrier` and the deferred frees stop. A grace period that has waited
/// a second says so on stderr, once per process.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct ReadGuard {
    /// A raw pointer, so the guard is `!Send` and `!Sync`.
    _thread_bound: PhantomData<*const ()>,
}

/// Enters a read-side critical section (`rcu_read_lock`). Nestable.
///
/// Two loads (the thread's own thread-local slot and the global
/// grace-period word) and a store to the slot; the first call on a thread
/// registers it as a reader.
///
/// A signal handler may take a read lock on a thread that has already
/// used RCU: that path is a few loads and stores, no lock. The handler
/// must drop the guard before it returns: the code it interrupted may be
/// between its own check of the thread's section and its store to the
/// slot, and that store then ends (or opens anew) the section the
/// handler's guard counts on. A guard the handler keeps (leaks, or stores
/// for the thread's later use) may then hold no section at all
/// (review finding, reproduced by single-stepping). Registration is
/// not async-signal-safe (it takes the registry lock), so take one read
/// lock on a thread before its signal handlers may. Signals are held back
/// while the thread registers and unregisters, and while a thread past
/// its registration (in its thread-local destructors) opens or closes a
/// section in a temporary slot, which takes the registry lock: a handler
/// that interrupts any of these runs once it is done. On such a thread,
/// past its registration, a handler's read lock takes the registry lock
/// too: it deadlocks if it interrupts that thread inside `synchronize`,
/// `barrier` or a deferral (which take that lock without blocking
/// signals), so do not take read locks in signal handlers of threads that
/// call those from their thread-local destructors.
#[inline]
pub fn read_lock() -> ReadGuard {
    LOCAL.with(|local| {
        if local.active() {
            lock_slow(local);
        } else {
            local.begin(&GP);
        }
    });
    ReadGuard {
        _thread_bound: PhantomData,
    }
}

/// A nested lock, or a thread whose reader is not registered.
#[cold]
#[inline(never)]
fn lock_slow(local: &ReaderCtr) {
    if ReaderCtr::offline_state(local.state()) {
        registry::lock_offline();
    } else {
        local.lock_nested();
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        LOCAL.with(|local| {
            let state = local.state();
            if state != 0 {
                return unlock_slow(local, state);
            }
            if local.end(&GP) {
                crate::grace::wake_updater();
            }
        })
    }
}

/// Nested guards, SeqCst mode, and threads whose reader is not
/// registered.
#[cold]
#[inline(never)]
fn unlock_slow(local: &ReaderCtr, state: usize) {
    if ReaderCtr::offline_state(state) {
        return registry::unlock_offline();
    }
    if let Some(ended) = local.unlock_slow(&GP, state) {
        if ended.wake {
            crate::grace::wake_updater();
        }
        debug_assert!(!ended.release, "a registered reader is never detached");
    }
}

impl std::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard").finish_non_exhaustive()
    }
}

/// Whether the calling thread is inside a read-side section. Code that
/// must not block inside one (context switches, `synchronize`) asserts on
/// this.
#[inline]
pub fn in_read_section() -> bool {
    registry::in_read_section()
}
