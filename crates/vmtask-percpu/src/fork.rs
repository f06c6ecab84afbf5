//! Registering `pthread_atfork` handlers once per process, in a way a
//! `fork` cannot break.

use std::sync::atomic::{AtomicU64, Ordering};

/// A `pthread_atfork` handler.
pub type ForkHandler = extern "C" fn();

/// Registers `pthread_atfork(prepare, parent, child)` once per process.
/// Returns false if `pthread_atfork` failed (the next call tries again),
/// true if the handlers are registered or another thread of this process
/// is registering them now (which may yet fail: then a later call tries
/// again).
///
/// `state` is the caller's own static, zero at first: 0, none; the pid +
/// 1 of a process registering now; `u64::MAX`, done. A flag, not a
/// `Once`: a fork while another thread registers would leave the child a
/// `Once` that never completes. A thread that finds this process
/// registering goes on without waiting; a child that finds its parent was
/// registering at the fork registers again, as its parent's call may not
/// have been made: the handlers must tolerate running twice.
///
/// ```
/// use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
///
/// static FORKS: AtomicUsize = AtomicUsize::new(0);
/// extern "C" fn child() {
///     FORKS.fetch_add(1, Ordering::Relaxed);
/// }
/// static STATE: AtomicU64 = AtomicU64::new(0);
/// assert!(vmtask_percpu::register_fork_handlers(&STATE, None, None, Some(child)));
/// assert!(vmtask_percpu::register_fork_handlers(&STATE, None, None, Some(child))); // once
/// ```
pub fn register_fork_handlers(
    state: &AtomicU64,
    prepare: Option<ForkHandler>,
    parent: Option<ForkHandler>,
    child: Option<ForkHandler>,
) -> bool {
    const DONE: u64 = u64::MAX;
    let seen = state.load(Ordering::Acquire);
    if seen == DONE {
        return true;
    }
    // SAFETY: getpid has no preconditions.
    let me = u64::from(unsafe { libc::getpid() } as u32) + 1;
    if seen == me {
        return true;
    }
    if state
        .compare_exchange(seen, me, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return true;
    }
    let widen = |f: Option<ForkHandler>| f.map(|f| f as unsafe extern "C" fn());
    // SAFETY: registers `extern "C"` handlers with no arguments that live
    // for the whole program.
    let rc = unsafe { libc::pthread_atfork(widen(prepare), widen(parent), widen(child)) };
    state.store(if rc == 0 { DONE } else { 0 }, Ordering::Release);
    rc == 0
}
