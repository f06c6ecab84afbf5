//! A global allocator that, like jemalloc, registers `pthread_atfork`
//! handlers that take its lock, after the crate registered its own at
//! start-up. Prepare handlers run in the reverse order of registration, so
//! the allocator's would run before the fork gate's start-up one and hold
//! the allocator while the gate waits for a slow path that allocates
//! inside its section (here `Arenas::grow` pushing the new arena): the
//! parent deadlocked in `fork` (then, with the gate's wait bounded, went
//! ahead after 2 s with a warning, and the child could inherit a held
//! lock). The gate's handlers are registered again when the first pool is
//! made, which puts one of its prepares ahead of the allocator's. An
//! interposed `madvise` (grow's `MADV_NOHUGEPAGE`, inside the section)
//! holds the slow path until the fork has begun.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmtask_stack::{Config, StackPool};

static LOCK: AtomicBool = AtomicBool::new(false);

fn lock() {
    while LOCK.swap(true, Ordering::Acquire) {
        std::hint::spin_loop();
    }
}

fn unlock() {
    LOCK.store(false, Ordering::Release);
}

/// The system allocator behind one spin lock.
struct Locked;

// SAFETY: forwards every call to `System`, which upholds `GlobalAlloc`;
// the lock only serialises the calls.
unsafe impl GlobalAlloc for Locked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        lock();
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc(layout) };
        unlock();
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        lock();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(p, layout) };
        unlock();
    }
}

#[global_allocator]
static ALLOCATOR: Locked = Locked;

extern "C" fn prepare() {
    lock();
}

/// Registered last, so it runs first: the fork has begun.
extern "C" fn fork_began() {
    FORKING.store(true, Ordering::SeqCst);
}

extern "C" fn after() {
    unlock();
}

static ARMED: AtomicBool = AtomicBool::new(false);
static IN_GROW: AtomicBool = AtomicBool::new(false);
static FORKING: AtomicBool = AtomicBool::new(false);

fn wait_for(flag: &AtomicBool, limit: Duration) {
    let start = Instant::now();
    while !flag.load(Ordering::SeqCst) && start.elapsed() < limit {
        std::thread::yield_now();
    }
}

/// Interposes libc's `madvise`: once armed, the pool's first
/// `MADV_NOHUGEPAGE` (in `Arenas::grow`, inside a section) waits until a
/// fork has begun (or 3 s).
///
/// # Safety
/// As `madvise(2)`; forwarded to the system call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn madvise(
    addr: *mut libc::c_void,
    len: libc::size_t,
    advice: libc::c_int,
) -> libc::c_int {
    if advice == libc::MADV_NOHUGEPAGE && ARMED.swap(false, Ordering::SeqCst) {
        IN_GROW.store(true, Ordering::SeqCst);
        wait_for(&FORKING, Duration::from_secs(3));
        // The gate's prepare is waiting meanwhile.
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: the caller's arguments, to the system call madvise wraps.
    unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as libc::c_int }
}

/// The scenario, in a fork child of the test (a process of its own, with
/// no other test's pool): ends with `_exit(0)` unless it deadlocks.
fn scenario() -> ! {
    // SAFETY: registers `extern "C"` handlers that live for the whole
    // program.
    unsafe { libc::pthread_atfork(Some(prepare), Some(after), Some(after)) };
    let pool = StackPool::new(Config {
        stack_size: 16 * 1024,
        ..Config::default()
    })
    .unwrap();
    let pool: &'static StackPool = Box::leak(Box::new(pool));
    // SAFETY: as above.
    unsafe { libc::pthread_atfork(Some(fork_began), None, None) };
    ARMED.store(true, Ordering::SeqCst);
    // The first carve grows the pool's arenas.
    let t = std::thread::spawn(move || drop(pool.alloc().unwrap()));
    wait_for(&IN_GROW, Duration::from_secs(3));
    // SAFETY: the child leaves at once with `_exit`.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: as above.
        unsafe { libc::_exit(0) }
    }
    t.join().unwrap();
    // SAFETY: leaves the scenario process without the test harness.
    unsafe { libc::_exit(0) }
}

#[test]
fn fork_does_not_deadlock_with_an_allocator_that_locks_in_its_prepare_handler() {
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the child runs the scenario, which ends in `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the scenario's stderr becomes the pipe, which the
        // parent reads for the gate's warning.
        unsafe { libc::dup2(pipe[1], 2) };
        scenario();
    }
    // SAFETY: our copy of the write end; the child holds its own.
    unsafe { libc::close(pipe[1]) };
    let start = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: polling our own child.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!(
                "fork deadlocked: the gate waited for a section that waited for the allocator \
                 an earlier prepare handler held"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stderr = String::new();
    // SAFETY: the read end, ours; the File closes it.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    std::io::Read::read_to_string(&mut file, &mut stderr).unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status}\n{stderr}"
    );
    assert!(
        !stderr.contains("fork waited"),
        "the fork's prepare gave up waiting for a section:\n{stderr}"
    );
}
