//! `fork()` support: the child has only the forking thread, so readers
//! registered by other threads are released, grace-period state is reset,
//! and the callback thread restarts on next use (liburcu's
//! `urcu_memb_after_fork_child`, installed automatically).

use std::sync::Once;

extern "C" fn prepare() {
    crate::registry::before_fork();
}

extern "C" fn parent() {
    crate::registry::after_fork_parent();
}

extern "C" fn child() {
    crate::grace::after_fork_child();
    // Repairs the callback queues before the registry's handler pushes the
    // bags of the threads that did not survive the fork onto them.
    crate::callback::after_fork_child();
    crate::bag::after_fork_child();
    crate::registry::after_fork_child();
}

/// Installs the handlers once per process.
pub(crate) fn register_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handlers are `extern "C"` functions with no arguments
        // that live for the whole program.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        assert_eq!(rc, 0, "vmtask_rcu: pthread_atfork failed ({rc})");
    });
}
