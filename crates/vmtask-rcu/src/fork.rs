//! `fork()` support: the child has only the forking thread, so readers
//! registered by other threads are released, grace-period state is reset,
//! and the callback thread restarts on next use (liburcu's
//! `urcu_memb_after_fork_child`, installed automatically).

use std::sync::atomic::{AtomicI64, Ordering};

extern "C" fn prepare() {
    // The handlers run, so they are registered: a child must not find the
    // registration still in progress (see `register_handlers`).
    HANDLERS.store(REGISTERED, Ordering::SeqCst);
    crate::fence::before_fork();
    crate::registry::before_fork();
}

extern "C" fn parent() {
    crate::fence::after_fork();
    crate::registry::after_fork_parent();
}

extern "C" fn child() {
    crate::fence::after_fork();
    crate::grace::after_fork_child();
    // Repairs the callback queues before the registry's handler pushes the
    // bags of the threads that did not survive the fork onto them.
    crate::callback::after_fork_child();
    crate::bag::after_fork_child();
    crate::registry::after_fork_child();
}

/// Whether the handlers are installed: `NONE`, `REGISTERED`, or the pid of
/// the process in which a thread is installing them now.
static HANDLERS: AtomicI64 = AtomicI64::new(NONE);
const NONE: i64 = -1;
const REGISTERED: i64 = -2;

/// Installs the handlers once per process.
///
/// Not a `Once`: glibc's `fork` holds its handler lock from the prepare
/// handlers to the child's, so a `pthread_atfork` either completes before
/// a fork (and then `prepare` marks the handlers registered in the child
/// too) or waits for it to end, in which case the child is left with a
/// registration "in progress" by a thread it does not have, and a `Once`
/// would wait for that thread forever. The pid tells the two cases apart:
/// an installation in progress in another process (the parent) is taken
/// over.
pub(crate) fn register_handlers() {
    loop {
        let state = HANDLERS.load(Ordering::SeqCst);
        if state == REGISTERED {
            return;
        }
        // SAFETY: getpid has no preconditions.
        let me = i64::from(unsafe { libc::getpid() });
        if state == me {
            // Another thread of this process is installing them.
            std::thread::yield_now();
            continue;
        }
        if HANDLERS
            .compare_exchange(state, me, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            continue;
        }
        // SAFETY: the handlers are `extern "C"` functions with no arguments
        // that live for the whole program.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        if rc != 0 {
            HANDLERS.store(NONE, Ordering::SeqCst);
            panic!("vmtask_rcu: pthread_atfork failed ({rc})");
        }
        HANDLERS.store(REGISTERED, Ordering::SeqCst);
        return;
    }
}
