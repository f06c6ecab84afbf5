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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ARMED: AtomicBool = AtomicBool::new(false);
static HANDLED: AtomicBool = AtomicBool::new(false);

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

extern "C" fn on_signal(_: libc::c_int) {
    drop(vmtask_rcu::read_lock());
    HANDLED.store(true, Ordering::SeqCst);
}

const SCENARIO: &str = "REV_REGISTRATION_WINDOW_SCENARIO";

#[test]
fn a_signal_just_before_the_mask_leaves_no_dangling_reader() {
    if std::env::var_os(SCENARIO).is_some() {
        scenario();
        println!("SCENARIO OK");
        return;
    }
    let out = child::rerun_test(
        "a_signal_just_before_the_mask_leaves_no_dangling_reader",
        SCENARIO,
        "1",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    let clean = out.status.success() && stdout.contains("SCENARIO OK");
    let loud = out.status.signal() == Some(libc::SIGABRT) && stderr.contains("vmtask_rcu: ");
    assert!(
        clean || loud,
        "status {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

fn scenario() {
    // SAFETY: installs a handler that only takes and drops a read lock.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
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
    assert!(HANDLED.load(Ordering::SeqCst), "the handler ran");

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        drop(vmtask_rcu::read_lock());
        let _ = rx.recv();
    });
    let start = Instant::now();
    vmtask_rcu::synchronize();
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(tx);
    other.join().unwrap();
    let after = vmtask_rcu::stats().readers;
    eprintln!("registered readers: {before} before, {after} after the thread exited");
    assert_eq!(
        after, before,
        "the exited thread is still published as a reader ({after} vs {before})"
    );
}
