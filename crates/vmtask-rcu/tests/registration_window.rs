//! `Registration::new` blocks signals only once it runs, but
//! std's lazy thread-local initialisation has begun by then (the
//! `REGISTRATION` slot is still `Initial`). A signal that lands in between
//! (std's init, the call, `sigfillset`/`sigdelset`, up to the
//! `pthread_sigmask` system call) runs a handler whose `read_lock` makes a
//! full nested registration; the outer one then registers a second slot,
//! std drops the nested `Registration` when it stores the outer one, which
//! unregisters the thread, and the outer slot stays published with the
//! thread's `LOCAL` after it exits: the bug `signal_during_registration`
//! covers, through a narrower window.
//!
//! The window is hit deterministically: this executable interposes
//! `sigfillset` (the crate's call binds to it), and on the armed thread it
//! sends itself the signal before filling the set, exactly as an
//! asynchronous signal arriving at that instruction would.

mod child;
mod registration;
use std::sync::atomic::{AtomicBool, Ordering};

static ARMED: AtomicBool = AtomicBool::new(false);

/// Interposes libc's `sigfillset`: once armed, the first call (the one
/// `SignalsBlocked` makes) signals this thread before it fills the set.
///
/// # Safety
/// As `sigfillset(3)`: `set` points to a writable `sigset_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigfillset(set: *mut libc::sigset_t) -> libc::c_int {
    if ARMED.swap(false, Ordering::SeqCst) {
        // SAFETY: signals this thread; delivered on return from the call,
        // the signal not being blocked yet.
        unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGUSR1) };
    }
    // SAFETY: `set` is the caller's sigset_t; all ones is every signal
    // (glibc's pthread_sigmask keeps its internal ones unblocked).
    unsafe {
        std::ptr::write_bytes(
            set.cast::<u8>(),
            0xff,
            std::mem::size_of::<libc::sigset_t>(),
        )
    };
    0
}

const SCENARIO: &str = "VMTASK_RCU_REGISTRATION_WINDOW_SCENARIO";

/// In a fresh process (see `registration::run_in_fresh_process`).
#[test]
fn a_signal_just_before_the_mask_leaves_no_dangling_reader() {
    registration::run_in_fresh_process(
        "a_signal_just_before_the_mask_leaves_no_dangling_reader",
        SCENARIO,
        scenario,
    );
}

fn scenario() {
    registration::install_reading_handler();
    vmtask_rcu::synchronize();
    let before = vmtask_rcu::stats().readers;
    // A big stack, past glibc's stack cache: unmapped when joined, with the
    // thread's static TLS (its `LOCAL`) in it.
    std::thread::Builder::new()
        .stack_size(128 << 20)
        .spawn(|| {
            ARMED.store(true, Ordering::SeqCst);
            drop(vmtask_rcu::read_lock()); // first use: registers
        })
        .unwrap()
        .join()
        .unwrap();
    registration::assert_no_reader_left(before);
}
