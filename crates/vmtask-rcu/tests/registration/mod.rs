//! What the tests of a signal handler reading during a thread's
//! registration share (`signal_during_registration.rs`,
//! `registration_window.rs`): the handler, the scenario run in a fresh
//! process, and the check that the exited thread left no reader behind.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set once the handler has run.
pub static HANDLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    drop(vmtask_rcu::read_lock());
    HANDLED.store(true, Ordering::SeqCst);
}

/// Installs, for SIGUSR1, a handler that takes and drops a read lock.
pub fn install_reading_handler() {
    // SAFETY: installs a handler that only takes and drops a read lock.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Runs `scenario` in a fresh process (the test binary re-run on `test`
/// with `key` set): the test passes if that process finished cleanly, or
/// stopped loudly (an abort with a `vmtask_rcu:` message); a crash (SIGSEGV
/// from a dangling reader) or a leaked registration fails it.
pub fn run_in_fresh_process(test: &str, key: &str, scenario: fn()) {
    if std::env::var_os(key).is_some() {
        scenario();
        println!("SCENARIO OK");
        return;
    }
    let out = crate::child::rerun_test(test, key, "1");
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

/// After a thread that registered under the handler has exited: the
/// handler ran, a grace period with another reader registered (which
/// scans every slot) completes, and as many readers are registered as
/// `before`.
pub fn assert_no_reader_left(before: usize) {
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
