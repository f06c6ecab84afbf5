//! `fork()` support: the child has only the forking thread, so readers
//! registered by other threads are released, grace-period state is reset,
//! and the callback thread restarts on next use (liburcu's
//! `urcu_memb_after_fork_child`, installed automatically).

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};

thread_local! {
    /// Prepare handlers of ours that have run on this thread for the fork
    /// in progress. Our handlers may be registered twice (see
    /// `register_handlers`): only the first prepare and the last parent or
    /// child handler of a fork do the work. Per thread, as two threads may
    /// fork at once.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

extern "C" fn prepare() {
    let depth = DEPTH.get();
    DEPTH.set(depth + 1);
    if depth > 0 {
        return;
    }
    // The handlers run, so they are registered in this process and in the
    // child (see `register_handlers`).
    HANDLERS.store(REGISTERED, Ordering::SeqCst);
    crate::fence::before_fork();
    crate::registry::before_fork();
}

/// Whether this is the last parent or child handler of the fork.
fn last_after_fork() -> bool {
    let depth = DEPTH.get().saturating_sub(1);
    DEPTH.set(depth);
    depth == 0
}

extern "C" fn parent() {
    if !last_after_fork() {
        return;
    }
    crate::fence::after_fork();
    crate::registry::after_fork_parent();
}

extern "C" fn child() {
    if !last_after_fork() {
        return;
    }
    crate::fence::after_fork();
    crate::grace::after_fork_child();
    // Repairs the callback queues before the registry's handler pushes the
    // bags of the threads that did not survive the fork onto them.
    crate::callback::after_fork_child();
    crate::bag::after_fork_child();
    crate::registry::after_fork_child();
    crate::callback::recount_after_fork();
}

/// Installs the handlers when the program starts (or, for a library
/// loaded at run time, when it is loaded): glibc calls the functions in
/// `.init_array` before `main`, while the process has one thread. (A
/// library loaded with `dlopen` runs them at load time, while other
/// threads may run: see `install` for what that leaves open.)
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

/// Whether the handlers are installed: `NONE`, `REGISTERED`, or the pid
/// of the process in which a thread is installing them now.
static HANDLERS: AtomicI64 = AtomicI64::new(NONE);
const NONE: i64 = -1;
const REGISTERED: i64 = -2;

/// Installs the handlers unless they are.
///
/// The start-up constructor does it while nothing else runs. Where it
/// could not (`pthread_atfork` out of memory at start-up) or ran late (a
/// library loaded with `dlopen` while other threads fork), a thread
/// installs them on first use, and a fork may copy the process while it
/// does: the child then finds the pid of its parent here, an installation
/// it cannot wait for, and installs the handlers itself. If the parent's
/// had in fact completed, the child has them twice, which `DEPTH` makes
/// harmless.
///
/// What that fallback cannot cover: a fork that had begun (its prepare
/// handlers running) before the installation runs none of our handlers,
/// and if a thread uses RCU before that fork copies the process, the
/// child inherits the state it left, unrepaired. Only the start-up
/// constructor closes that window; with it, the fallback never runs.
fn install() -> Result<(), libc::c_int> {
    loop {
        let state = HANDLERS.load(Ordering::SeqCst);
        if state == REGISTERED {
            return Ok(());
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
            return Err(rc);
        }
        HANDLERS.store(REGISTERED, Ordering::SeqCst);
        return Ok(());
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A child that took over an installation its parent had in fact
    /// completed has the handlers twice: a fork then runs two prepare
    /// handlers and two child (or parent) handlers of ours, of which one
    /// each must do the work (a second prepare would wait for the locks the
    /// first holds, forever).
    #[test]
    fn handlers_registered_twice_do_their_work_once() {
        crate::synchronize();
        // SAFETY: registers our handlers once more, as the takeover would.
        let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        assert_eq!(rc, 0);
        // SAFETY: the child only uses RCU and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            drop(crate::read_lock());
            crate::synchronize();
            crate::barrier();
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        let start = Instant::now();
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child, without blocking.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                break;
            }
            if start.elapsed() > Duration::from_secs(5) {
                // SAFETY: our own child; reaped at once.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("the child hung");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        // And the parent's handlers left nothing held.
        crate::synchronize();
        crate::barrier();
        assert_eq!(DEPTH.get(), 0);
    }
}
