//! `fork()` support: the child has only the forking thread, so readers
//! registered by other threads are released, grace-period state is reset,
//! and the callback thread restarts on next use (liburcu's
//! `urcu_memb_after_fork_child`, installed automatically).

use std::sync::atomic::{AtomicBool, Ordering};

extern "C" fn prepare() {
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

/// Installs the handlers when the program starts (or, for a library
/// loaded at run time, when it is loaded): glibc calls the functions in
/// `.init_array` before `main`, while the process has one thread.
///
/// Why not lazily, on first use: since glibc 2.36 `fork` lets go of its
/// handler lock while it runs each prepare handler and runs only the
/// handlers registered when it began. A first use racing with a fork
/// could then install the handlers, register a reader and take locks, all
/// before the fork copies the process, with none of the handlers running
/// for it: the child would inherit a reader it never clears, or a lock
/// held by a thread it does not have. Installed at start, the handlers
/// are there before any thread can use the crate.
// SAFETY: (of the attribute) `.init_array` holds pointers to functions
// that take the C start-up arguments; one that ignores them, as this one
// does, is called correctly under the C ABI.
#[used]
#[unsafe(link_section = ".init_array")]
static INSTALL_AT_START: extern "C" fn() = install_at_start;

extern "C" fn install_at_start() {
    // No panic here, before `main`: a failure is retried, and reported, on
    // first use.
    let _ = install();
}

/// Installs the handlers once per process, if the start-up constructor has
/// not already done it.
///
/// # Panics
/// If `pthread_atfork` fails (out of memory).
pub(crate) fn register_handlers() {
    // Every path that uses RCU comes here first: the reference keeps the
    // constructor above in the program, whichever parts of the crate the
    // linker keeps.
    std::hint::black_box(&INSTALL_AT_START);
    if let Err(rc) = install() {
        panic!("vmtask_rcu: pthread_atfork failed ({rc})");
    }
}

static INSTALLED: AtomicBool = AtomicBool::new(false);
static INSTALLING: crate::sync::Mutex<()> = crate::sync::Mutex::new(());

fn install() -> Result<(), libc::c_int> {
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let _installing = INSTALLING.lock();
    if INSTALLED.load(Ordering::Relaxed) {
        return Ok(());
    }
    // SAFETY: the handlers are `extern "C"` functions with no arguments
    // that live for the whole program.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        return Err(rc);
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}
