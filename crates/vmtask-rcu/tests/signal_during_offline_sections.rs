//! A signal handler that takes a read lock on a thread that is past its
//! registration (running its thread-local destructors), while that thread
//! opens and closes sections in temporary slots: such a section takes the
//! registry lock, and a handler that interrupted it there waited for that
//! lock forever (review finding). Signals are now held back around it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

static HANDLER_RUNS: AtomicU64 = AtomicU64::new(0);
static TID: AtomicU64 = AtomicU64::new(0);
static IN_DESTRUCTOR: AtomicBool = AtomicBool::new(false);
static DESTRUCTOR_DONE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    drop(vmtask_rcu::read_lock());
    HANDLER_RUNS.fetch_add(1, Ordering::Relaxed);
}

/// Opens and closes sections for a second from a thread-local destructor
/// that runs after the thread's RCU registration has ended.
struct Late;

impl Drop for Late {
    fn drop(&mut self) {
        IN_DESTRUCTOR.store(true, Ordering::SeqCst);
        let start = Instant::now();
        let mut sections = 0_u64;
        while start.elapsed() < Duration::from_secs(1) {
            drop(vmtask_rcu::read_lock());
            sections += 1;
        }
        assert!(sections > 0);
        DESTRUCTOR_DONE.store(true, Ordering::SeqCst);
    }
}

thread_local! {
    static LATE: Late = const { Late };
}

#[test]
fn a_handler_read_lock_during_a_temporary_section_does_not_deadlock() {
    // A hang cannot fail the test by itself: end the process instead.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(30));
        eprintln!("the handler or the destructor hung for 30 s");
        std::process::exit(3);
    });
    // SAFETY: installs a handler that only takes and drops a read lock and
    // bumps an atomic; the struct is fully initialised.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_usr1 as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
    let worker = std::thread::spawn(|| {
        // First, so that std destroys it last, after the registration.
        LATE.with(|_| {});
        drop(vmtask_rcu::read_lock());
        // SAFETY: pthread_self has no preconditions.
        TID.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
    });
    while !IN_DESTRUCTOR.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let tid = TID.load(Ordering::SeqCst) as libc::pthread_t;
    while !DESTRUCTOR_DONE.load(Ordering::SeqCst) {
        // SAFETY: the worker thread is alive until its destructor is done
        // (it sets the flag last), and SIGUSR1 has our handler.
        unsafe { libc::pthread_kill(tid, libc::SIGUSR1) };
        std::thread::sleep(Duration::from_micros(20));
    }
    worker.join().unwrap();
    assert!(HANDLER_RUNS.load(Ordering::Relaxed) > 0, "no signal landed");
}
