//! A thread whose registration (first `read_lock`) is interrupted by
//! a signal handler that itself takes a read lock is registered twice
//! (std's lazy thread-local initialisation is re-entrant: the inner
//! `Registration` is dropped when the outer one is stored). Dropping the
//! inner one unregisters the thread, so the outer slot, which publishes the
//! thread's `LOCAL`, is never released: at thread exit `unregister` returns
//! early (`UNREGISTERED` is already set) and the backstop finds `CURRENT`
//! null. Every later grace period then dereferences the dead thread's
//! thread-local memory (here: unmapped, so it crashes).
//!
//! To make the interleaving deterministic, the test blocks the thread's
//! registration on the backstop key lock, which the crate's fork prepare
//! handler holds across `fork`; a prepare handler of ours, registered
//! before the crate's (so run after it), delivers the signal meanwhile.

mod child;
mod registration;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

static ARMED: AtomicBool = AtomicBool::new(false);
static GO: AtomicBool = AtomicBool::new(false);
static TID: AtomicU64 = AtomicU64::new(0);

/// Runs after the crate's prepare handler (registered before it), while
/// the crate holds its registry and backstop-key locks.
extern "C" fn slow_prepare() {
    if !ARMED.load(Ordering::SeqCst) {
        return;
    }
    GO.store(true, Ordering::SeqCst);
    // The thread reaches the backstop key lock and blocks on it.
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: TID is a live, joinable thread of this process.
    unsafe { libc::pthread_kill(TID.load(Ordering::SeqCst) as libc::pthread_t, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(100));
}

extern "C" fn install_before_the_crate() {
    // SAFETY: a handler that lives for the whole program.
    unsafe { libc::pthread_atfork(Some(slow_prepare), None, None) };
}

// SAFETY: `.preinit_array` entries take the C start-up arguments; this
// one ignores them. Runs before every `.init_array` entry (the crate's).
#[used]
#[unsafe(link_section = ".preinit_array")]
static PREINIT: extern "C" fn() = install_before_the_crate;

const SCENARIO: &str = "VMTASK_RCU_SIGNAL_FIRST_USE_SCENARIO";

/// In a fresh process (see `registration::run_in_fresh_process`).
#[test]
fn a_signal_handler_reading_during_registration_leaves_no_dangling_reader() {
    registration::run_in_fresh_process(
        "a_signal_handler_reading_during_registration_leaves_no_dangling_reader",
        SCENARIO,
        scenario,
    );
}

fn scenario() {
    registration::install_reading_handler();
    vmtask_rcu::synchronize(); // the fence mode is chosen
    let before = vmtask_rcu::stats().readers;

    // A big stack, past glibc's stack cache: unmapped when joined, with the
    // thread's static TLS (its `LOCAL`) in it.
    let t = std::thread::Builder::new()
        .stack_size(128 << 20)
        .spawn(|| {
            // SAFETY: pthread_self has no preconditions.
            TID.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
            while !GO.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            drop(vmtask_rcu::read_lock()); // first use: registers
        })
        .unwrap();
    while TID.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    ARMED.store(true, Ordering::SeqCst);
    // SAFETY: the child only exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    ARMED.store(false, Ordering::SeqCst);
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    t.join().unwrap();
    registration::assert_no_reader_left(before);
}
