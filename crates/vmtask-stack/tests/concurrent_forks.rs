//! two threads forking at once. The fork gate (`src/fork.rs`)
//! is one CLOSED bit: the first fork's parent handler opens it while the
//! second fork has run its prepare handler but not yet copied the process
//! (glibc >= 2.36 lets go of its atfork lock around each handler, so the
//! two forks interleave). A third thread then enters a slow path and takes
//! the arenas lock, and the second fork's child inherits it held: its
//! first carve hangs.
//!
//! The interleaving is forced: a prepare handler of this test, registered
//! before the crate's (`.preinit_array`, so it runs after the crate's
//! prepare), orders the two forks; an interposed `mprotect` (which the
//! carve calls under the arenas lock in `Mprotect` mode) holds the third
//! thread inside that lock until the second fork is done. With a correct
//! gate the third thread cannot enter the slow path during the second
//! fork, the test's handler times out waiting for it, and the child
//! carves freely.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};
use vmtask_stack::{Config, GuardMode, StackPool};

static X_CLOSED: AtomicBool = AtomicBool::new(false);
static Y_PREPARED: AtomicBool = AtomicBool::new(false);
static X_DONE: AtomicBool = AtomicBool::new(false);
static C_HOLDS: AtomicBool = AtomicBool::new(false);
static Y_FORKED: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicBool = AtomicBool::new(false);

const NONE: u8 = 0;
const X: u8 = 1;
const Y: u8 = 2;
const C: u8 = 3;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(NONE) };
}
static ACTIVE: AtomicU8 = AtomicU8::new(0);

fn wait_for(flag: &AtomicBool, limit: Duration) -> bool {
    let start = Instant::now();
    while !flag.load(Ordering::SeqCst) {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// Interposes libc's `mprotect` for this executable (the crate's call
/// binds to it): the third thread, once armed, stays inside (inside the
/// pool's arenas lock) until the second fork has copied the process.
///
/// # Safety
/// As `mprotect(2)`; forwarded to the system call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mprotect(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
) -> libc::c_int {
    if ROLE.get() == C && ARMED.swap(false, Ordering::SeqCst) {
        C_HOLDS.store(true, Ordering::SeqCst);
        wait_for(&Y_FORKED, Duration::from_secs(5));
    }
    // SAFETY: the caller's own arguments, passed on to the system call.
    unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot) as libc::c_int }
}

/// Runs after the crate's prepare handler (the gate is closed by then).
extern "C" fn late_prepare() {
    if ACTIVE.load(Ordering::SeqCst) == 0 {
        return;
    }
    match ROLE.get() {
        X => {
            X_CLOSED.store(true, Ordering::SeqCst);
            // The second fork's prepare runs while this one's gate is
            // closed.
            wait_for(&Y_PREPARED, Duration::from_secs(2));
        }
        Y => {
            Y_PREPARED.store(true, Ordering::SeqCst);
            // Give the third thread the chance the gate should deny it.
            wait_for(&C_HOLDS, Duration::from_secs(1));
        }
        _ => {}
    }
}

extern "C" fn install_before_the_crate() {
    // SAFETY: a handler that lives for the whole program.
    unsafe { libc::pthread_atfork(Some(late_prepare), None, None) };
}

// SAFETY: `.preinit_array` entries take the C start-up arguments; this
// one ignores them. Runs before every `.init_array` entry (the crate's).
#[used]
#[unsafe(link_section = ".preinit_array")]
static PREINIT: extern "C" fn() = install_before_the_crate;

#[test]
fn a_second_concurrent_fork_keeps_the_gate_closed() {
    let pool = StackPool::new(Config {
        stack_size: 16 * 1024,
        max_stacks: 64,
        cache_size: 2,
        guard_mode: GuardMode::Mprotect,
        ..Config::default()
    })
    .unwrap();
    ACTIVE.store(1, Ordering::SeqCst);
    let status = std::thread::scope(|s| {
        let pool = &pool;
        let c = s.spawn(move || {
            ROLE.set(C);
            // Prepares the thread and carves slot 0, unarmed.
            let first = pool.alloc().unwrap();
            wait_for(&X_DONE, Duration::from_secs(10));
            ARMED.store(true, Ordering::SeqCst);
            let second = pool.alloc().unwrap(); // carves: mprotect
            drop((first, second));
        });
        let x = s.spawn(|| {
            ROLE.set(X);
            // SAFETY: the child only exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            X_DONE.store(true, Ordering::SeqCst);
            let mut st = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
        });
        let y = s.spawn(move || {
            ROLE.set(Y);
            assert!(wait_for(&X_CLOSED, Duration::from_secs(10)));
            // SAFETY: the child allocates (a carve) and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: a hang is killed by the alarm.
                unsafe { libc::alarm(5) };
                let ok = pool.alloc().is_ok();
                // SAFETY: ends the child without the parent's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 3 }) };
            }
            Y_FORKED.store(true, Ordering::SeqCst);
            let mut st = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            st
        });
        x.join().unwrap();
        c.join().unwrap();
        y.join().unwrap()
    });
    ACTIVE.store(0, Ordering::SeqCst);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the second fork's child hung or failed (wait status {status}; signal 14 = SIGALRM, a hang on the arenas lock its parent's other thread held)"
    );
}
