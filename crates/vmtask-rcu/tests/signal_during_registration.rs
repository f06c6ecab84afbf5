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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

static ARMED: AtomicBool = AtomicBool::new(false);
static GO: AtomicBool = AtomicBool::new(false);
static TID: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    drop(vmtask_rcu::read_lock());
    HANDLED.store(true, Ordering::SeqCst);
}

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

const SCENARIO: &str = "AUD_SIGNAL_FIRST_USE_SCENARIO";

/// The scenario runs in a fresh process (this binary re-run on this test):
/// it passes if that process finished cleanly, or stopped loudly (an abort
/// with a `vmtask_rcu:` message); a crash (SIGSEGV from the dangling
/// reader) or the leaked registration fails it.
#[test]
fn a_signal_handler_reading_during_registration_leaves_no_dangling_reader() {
    if std::env::var_os(SCENARIO).is_some() {
        scenario();
        println!("SCENARIO OK");
        return;
    }
    let out = child::rerun_test(
        "a_signal_handler_reading_during_registration_leaves_no_dangling_reader",
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
    assert!(HANDLED.load(Ordering::SeqCst), "the handler ran");

    // And a grace period with another reader registered scans every slot.
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
