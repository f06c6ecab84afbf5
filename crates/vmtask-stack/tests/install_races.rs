//! Races at the handler's installation, made deterministic by interposing
//! `sigaction` for this test binary: the interposer runs "another thread's"
//! action at the moment `install_handler` has queried the previous action
//! and not yet installed its own.
use std::process::Output;
use std::sync::atomic::{AtomicU8, Ordering};
use vmtask_stack::{Config, StackPool};

mod common;
use common::{in_child, run_child};

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

type SigactionFn =
    unsafe extern "C" fn(libc::c_int, *const libc::sigaction, *mut libc::sigaction) -> libc::c_int;

fn real_sigaction() -> SigactionFn {
    // SAFETY: dlsym with RTLD_NEXT only looks the symbol up; the non-null
    // result (asserted) is libc's own sigaction, whose C signature is
    // `SigactionFn`.
    unsafe {
        let p = libc::dlsym(libc::RTLD_NEXT, c"sigaction".as_ptr());
        assert!(!p.is_null());
        std::mem::transmute::<*mut libc::c_void, SigactionFn>(p)
    }
}

const NONE: u8 = 0;
/// Install `theirs` for SIGSEGV right after the next SIGSEGV query.
const INSTALL_THEIRS: u8 = 1;
/// Fork from another thread right after the next SIGSEGV query.
const FORK_NOW: u8 = 2;
static RACE: AtomicU8 = AtomicU8::new(NONE);
static FORK_GO: AtomicU8 = AtomicU8::new(0);

/// Interposes libc's `sigaction` for the whole test binary.
///
/// # Safety
/// As libc's `sigaction`: `act` and `old` null or valid.
// SAFETY (of the attribute): nothing else in this test binary defines
// `sigaction`; the interposer has libc's signature and forwards to libc's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(
    sig: libc::c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> libc::c_int {
    let real = real_sigaction();
    // SAFETY: forwarding the caller's arguments.
    let rc = unsafe { real(sig, act, old) };
    if sig == libc::SIGSEGV && act.is_null() && !old.is_null() {
        match RACE.swap(NONE, Ordering::SeqCst) {
            INSTALL_THEIRS => {
                // Another thread installs its crash handler just now.
                // SAFETY: an all-zero sigaction is a valid value to fill in.
                let mut a: libc::sigaction = unsafe { std::mem::zeroed() };
                a.sa_sigaction = theirs as *const () as usize;
                a.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                // SAFETY: `theirs` has the SA_SIGINFO signature and only
                // writes and exits.
                unsafe { real(libc::SIGSEGV, &a, std::ptr::null_mut()) };
            }
            FORK_NOW => {
                // Another thread forks just now; wait until it has.
                FORK_GO.store(1, Ordering::SeqCst);
                while FORK_GO.load(Ordering::SeqCst) != 2 {
                    std::hint::spin_loop();
                }
            }
            _ => {}
        }
    }
    rc
}

extern "C" fn theirs(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let msg = b"THEIRS\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(42);
    }
}

/// A handler another thread installs while the first pool installs ours is
/// neither chained nor left installed: it is lost for good.
#[test]
fn a_handler_installed_during_install_handler_is_not_lost() {
    if in_child() {
        RACE.store(INSTALL_THEIRS, Ordering::SeqCst);
        let pool = StackPool::new(Config::default()).unwrap();
        drop(pool.alloc().unwrap());
        // SAFETY: deliberately not: a plain bad write, for the crash handler.
        unsafe { std::ptr::write_volatile(16 as *mut u8, 1) };
        unreachable!();
    }
    let out = run_child("a_handler_installed_during_install_handler_is_not_lost");
    assert_eq!(out.status.code(), Some(42), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("THEIRS"),
        "{}",
        show(&out)
    );
}

/// A fork from another thread while the first pool installs the handler:
/// the child's first pool must not hang.
#[test]
fn a_fork_during_install_handler_leaves_a_working_child() {
    if in_child() {
        RACE.store(FORK_NOW, Ordering::SeqCst);
        let forker = std::thread::spawn(|| {
            while FORK_GO.load(Ordering::SeqCst) != 1 {
                std::hint::spin_loop();
            }
            // SAFETY: the child creates a pool and leaves with _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let pool = StackPool::new(Config::default()).unwrap();
                drop(pool.alloc().unwrap());
                // SAFETY: ends the fork child at once.
                unsafe { libc::_exit(0) };
            }
            FORK_GO.store(2, Ordering::SeqCst);
            pid
        });
        let pool = StackPool::new(Config::default()).unwrap();
        drop(pool.alloc().unwrap());
        let pid = forker.join().unwrap();
        report_child(pid);
        return;
    }
    let out = run_child("a_fork_during_install_handler_leaves_a_working_child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CHILD EXITED 0"), "{}", show(&out));
}

static KEY_FORK: AtomicU8 = AtomicU8::new(0);

type KeyCreateFn = unsafe extern "C" fn(
    *mut libc::pthread_key_t,
    Option<unsafe extern "C" fn(*mut libc::c_void)>,
) -> libc::c_int;

/// Interposes `pthread_key_create`: with `KEY_FORK` set, another thread
/// forks while this one is inside it.
///
/// # Safety
/// As libc's `pthread_key_create`: `key` valid for a write.
// SAFETY (of the attribute): nothing else in this test binary defines
// `pthread_key_create`; the interposer has libc's signature and forwards
// to libc's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_key_create(
    key: *mut libc::pthread_key_t,
    dtor: Option<unsafe extern "C" fn(*mut libc::c_void)>,
) -> libc::c_int {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name only looks
    // the symbol up.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"pthread_key_create".as_ptr()) };
    assert!(!p.is_null(), "libc's pthread_key_create not found");
    // SAFETY: `p` is libc's own pthread_key_create, whose C signature is
    // `KeyCreateFn`.
    let real = unsafe { std::mem::transmute::<*mut libc::c_void, KeyCreateFn>(p) };
    if KEY_FORK.swap(0, Ordering::SeqCst) == 1 {
        FORK_GO.store(1, Ordering::SeqCst);
        while FORK_GO.load(Ordering::SeqCst) != 2 {
            std::hint::spin_loop();
        }
    }
    // SAFETY: forwarding the caller's arguments.
    unsafe { real(key, dtor) }
}

extern "C" fn raw_thread_alloc(_: *mut libc::c_void) -> *mut libc::c_void {
    // A raw pthread has no alternate stack: its first allocation creates
    // the exit key.
    let pool: &'static StackPool = Box::leak(Box::new(StackPool::new(Config::default()).unwrap()));
    drop(pool.alloc().unwrap());
    std::ptr::null_mut()
}

fn on_raw_thread() {
    let mut t: libc::pthread_t = 0;
    // SAFETY: a start routine that takes no argument.
    let rc = unsafe {
        libc::pthread_create(
            &mut t,
            std::ptr::null(),
            raw_thread_alloc,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: joining it once.
    assert_eq!(unsafe { libc::pthread_join(t, std::ptr::null_mut()) }, 0);
}

/// A fork from another thread while the first raw thread creates the
/// alternate-stack exit key: the child's raw threads must not hang.
#[test]
fn a_fork_during_exit_key_creation_leaves_a_working_child() {
    if in_child() {
        drop(StackPool::new(Config::default()).unwrap()); // handler installed
        KEY_FORK.store(1, Ordering::SeqCst);
        let forker = std::thread::spawn(|| {
            while FORK_GO.load(Ordering::SeqCst) != 1 {
                std::hint::spin_loop();
            }
            // SAFETY: the child runs a raw thread and leaves with _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                on_raw_thread();
                // SAFETY: ends the fork child at once.
                unsafe { libc::_exit(0) };
            }
            FORK_GO.store(2, Ordering::SeqCst);
            pid
        });
        on_raw_thread();
        let pid = forker.join().unwrap();
        report_child(pid);
        return;
    }
    let out = run_child("a_fork_during_exit_key_creation_leaves_a_working_child");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CHILD EXITED 0"),
        "{}",
        show(&out)
    );
}

/// Waits up to 10 s for the fork child `pid` and prints `CHILD EXITED n`
/// or `CHILD KILLED BY SIGNAL n`, or kills it and prints `CHILD HUNG`.
fn report_child(pid: libc::pid_t) {
    let mut status = 0;
    for _ in 0..1000 {
        // SAFETY: reaping our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            // A child killed by a signal has no exit status (WEXITSTATUS
            // reads 0): it must not pass for one that exited with 0.
            if libc::WIFEXITED(status) {
                println!("CHILD EXITED {}", libc::WEXITSTATUS(status));
            } else {
                println!("CHILD KILLED BY SIGNAL {}", libc::WTERMSIG(status));
            }
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: our own child, hung.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    println!("CHILD HUNG");
}
