//! When the callback thread cannot be spawned, `call` says so with a
//! panic naming the cause, nothing is lost, and the next caller starts it
//! once threads can be made again.

use std::sync::atomic::{AtomicBool, Ordering};

mod child;
use child::in_child;

static RAN: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicBool = AtomicBool::new(false);

struct Flagged;
impl Drop for Flagged {
    fn drop(&mut self) {
        DROPPED.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_failed_start_of_the_callback_thread_is_reported_and_retried() {
    // Installs the fork handlers and starts the thread in the parent.
    vmtask_rcu::barrier();
    let code = in_child(|| {
        // SAFETY: alarm only arms a timer; a hang kills the child.
        unsafe { libc::alarm(20) };
        // No thread can be made by an unprivileged user with a zero
        // process limit. Needs root to change user: skip otherwise.
        // SAFETY: plain system calls on this process.
        if unsafe { libc::setgid(65534) } != 0 || unsafe { libc::setuid(65534) } != 0 {
            return 77;
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut limit) };
        let hard = limit.rlim_max;
        limit.rlim_cur = 0;
        // SAFETY: a valid rlimit; lowering the soft limit is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &limit) } != 0 {
            return 77;
        }
        if std::thread::Builder::new().spawn(|| {}).is_ok() {
            return 77; // the limit does not bite here
        }
        let refused = std::panic::catch_unwind(|| {
            vmtask_rcu::call(|| RAN.store(true, Ordering::SeqCst));
        });
        let message = match refused {
            Ok(()) => return 1, // no error reported
            Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
        };
        if !message.contains("cannot start the callback thread") {
            return 2;
        }
        // A cell dropped while a panic unwinds defers its value, and may
        // not panic again there, which would abort the process (review
        // finding): its value waits for the thread like the callback.
        let unwound = std::panic::catch_unwind(|| {
            let _cell = vmtask_rcu::RcuCell::new(Some(Box::new(Flagged)));
            panic!("on the way out");
        });
        if unwound.is_ok() {
            return 4;
        }
        // Threads can be made again: the next caller starts it, and the
        // callback queued above was kept.
        limit.rlim_cur = hard;
        // SAFETY: a valid rlimit; raising the soft limit up to the hard one
        // is allowed.
        unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &limit) };
        vmtask_rcu::barrier();
        if !RAN.load(Ordering::SeqCst) {
            return 3;
        }
        if !DROPPED.load(Ordering::SeqCst) {
            return 5;
        }
        0
    });
    match code {
        0 => {}
        77 => println!("skipped: cannot make thread creation fail here (needs root)"),
        1 => panic!("call did not report the failed spawn"),
        2 => panic!("the panic message does not name the failed spawn"),
        3 => panic!("the callback queued while the thread could not start was lost"),
        4 => unreachable!("the unwinding closure returned"),
        5 => panic!("the value of the cell dropped while unwinding was lost"),
        c => panic!("child exited with {c}"),
    }
}
