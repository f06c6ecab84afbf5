//! The overflow handler's judgement: a stray write into a pool guard is
//! not an overflow, a frame bigger than the guard still is, two reports at
//! once do not interleave, and a fork while a thread files its alternate
//! stack as a spare leaves the child a working lock. Each test runs its
//! case in a child process.
use std::os::unix::process::ExitStatusExt;
use std::process::Output;

use corosensei::Coroutine;
use vmtask_stack::{Config, StackPool};

mod common;
use common::{in_child, recurse, run_child};

fn show(out: &Output) -> String {
    format!(
        "status {:?} sig {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// In a child: writes through a stray pointer, from the thread's own
/// stack, into the guard of a pool stack that nothing runs on (freed first
/// with `free_first`). Without the library's handler the process dies of
/// SIGSEGV; it must not be reported as an overflow.
fn stray_write_into_a_guard(test: &str, free_first: bool) {
    if in_child() {
        let pool: &'static StackPool =
            Box::leak(Box::new(StackPool::new(Config::default()).unwrap()));
        let stack = pool.alloc().unwrap();
        let guard = stack.limit() as usize - 8;
        if free_first {
            drop(stack);
        } else {
            std::mem::forget(stack);
        }
        // SAFETY: deliberately not: a stray pointer into the guard.
        unsafe { std::ptr::write_volatile(guard as *mut u64, 1) };
        unreachable!();
    }
    let out = run_child(test);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{}", show(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("stack overflow"),
        "{}",
        show(&out)
    );
}

/// A stray write into the guard of a stack that was freed (the slot is
/// still the pool's, its guard still installed).
#[test]
fn stray_write_into_a_freed_stacks_guard_is_not_an_overflow() {
    stray_write_into_a_guard(
        "stray_write_into_a_freed_stacks_guard_is_not_an_overflow",
        true,
    );
}

/// The same into the guard of a live stack that nothing runs on.
#[test]
fn stray_write_into_an_idle_live_stacks_guard_is_not_an_overflow() {
    stray_write_into_a_guard(
        "stray_write_into_an_idle_live_stacks_guard_is_not_an_overflow",
        false,
    );
}

/// A frame bigger than the guard (C built without stack-clash protection,
/// or `alloca`) moves the stack pointer past the guard, into the slot
/// below, before its first store hits the guard: still this stack's
/// overflow.
#[test]
fn big_frame_overflow_past_the_guard_is_reported() {
    if in_child() {
        let page = common::page();
        let pool: &'static StackPool =
            Box::leak(Box::new(StackPool::new(Config::default()).unwrap()));
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        // Adjacent slots: the stack pointer lands in the lower one.
        let (upper, lower) = if a.limit() > b.limit() {
            (a, b)
        } else {
            (b, a)
        };
        let limit = upper.limit() as usize;
        let mut co = Coroutine::with_stack(upper, move |_: &corosensei::Yielder<(), ()>, ()| {
            // `sub rsp, N` for a frame two pages bigger than the guard,
            // then the first store, near the top of the frame, hits the
            // guard.
            let low_sp = limit - 3 * page;
            let target = limit - 64;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: deliberately not: this store faults in the guard and
            // never comes back; the stack pointer is restored otherwise.
            unsafe {
                std::arch::asm!(
                    "mov r11, rsp",
                    "mov rsp, {low}",
                    "mov qword ptr [{t}], 0",
                    "mov rsp, r11",
                    low = in(reg) low_sp,
                    t = in(reg) target,
                    out("r11") _,
                )
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (low_sp, target);
                std::process::exit(77);
            }
        });
        co.resume(());
        std::mem::forget(lower);
        unreachable!();
    }
    let out = run_child("big_frame_overflow_past_the_guard_is_reported");
    if out.status.code() == Some(77) {
        return; // the probe is x86_64 assembly
    }
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stack overflow"),
        "{}",
        show(&out)
    );
}

fn hex(mut v: usize, out: &mut [u8]) -> usize {
    let mut d = [0u8; 16];
    let mut i = 16;
    loop {
        i -= 1;
        d[i] = b"0123456789abcdef"[v & 15];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out[..2].copy_from_slice(b"0x");
    out[2..2 + 16 - i].copy_from_slice(&d[i..]);
    2 + 16 - i
}

/// A slow label hook (it reads the task's name from somewhere slow, say):
/// sleeps 300 ms, then labels the stack with its own base.
fn slow_label(base: *mut u8, out: &mut [u8]) -> usize {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 300_000_000,
    };
    // SAFETY: nanosleep is async-signal-safe.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    out[..5].copy_from_slice(b"base=");
    5 + hex(base as usize, &mut out[5..])
}

/// Two tasks overflow at about the same time: every report line must carry
/// its own stack's label, not the other's.
#[test]
fn concurrent_overflow_reports_do_not_interleave() {
    if in_child() {
        // SAFETY: `slow_label` only sleeps and formats into `out`.
        unsafe { vmtask_stack::set_overflow_label_hook(Some(slow_label)) };
        let pool: &'static StackPool = Box::leak(Box::new(
            StackPool::new(Config {
                stack_size: 64 * 1024,
                ..Config::default()
            })
            .unwrap(),
        ));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                std::thread::spawn(move || {
                    let stack = pool.alloc().unwrap();
                    // The second one overflows while the first one's hook runs.
                    std::thread::sleep(std::time::Duration::from_millis(100 * i));
                    let mut co =
                        Coroutine::with_stack(stack, |_: &corosensei::Yielder<(), ()>, ()| {
                            recurse(0)
                        });
                    co.resume(());
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        unreachable!();
    }
    let out = run_child("concurrent_overflow_reports_do_not_interleave");
    assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("stack overflow"))
        .collect();
    assert!(!reports.is_empty(), "{}", show(&out));
    for line in reports {
        // Exactly one report per line, labelled with its own base.
        assert_eq!(line.matches("stack overflow").count(), 1, "{}", show(&out));
        let base = line
            .split("stack overflow: stack ")
            .nth(1)
            .unwrap()
            .split("..")
            .next()
            .unwrap();
        assert!(
            line.ends_with(&format!(": base={base}")),
            "mislabelled: {line:?}\n{}",
            show(&out)
        );
    }
}

mod fork_spares {
    use std::sync::atomic::{AtomicUsize, Ordering};
    pub static ALT: AtomicUsize = AtomicUsize::new(0);
    pub static GO: AtomicUsize = AtomicUsize::new(0);

    pub extern "C" fn exiting_thread(_: *mut libc::c_void) -> *mut libc::c_void {
        vmtask_stack::prepare_thread();
        // SAFETY: an all-zero stack_t is valid to query into.
        let mut st: libc::stack_t = unsafe { std::mem::zeroed() };
        // SAFETY: a query.
        unsafe { libc::sigaltstack(std::ptr::null(), &mut st) };
        ALT.store(st.ss_sp as usize, Ordering::SeqCst);
        while GO.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Exits: the pthread-key destructor makes the alternate stack a
        // spare, under the spares lock.
        std::ptr::null_mut()
    }
}

const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;

/// A fork while another thread holds the lock on the spare alternate
/// stacks (it exits and files its alternate stack as a spare): the child
/// must still be able to give a thread an alternate stack. The exiting
/// thread is held inside the lock deterministically by a userfaultfd on
/// the page the spare's link is written to.
#[test]
fn fork_while_a_thread_files_its_spare_alt_stack() {
    use std::sync::atomic::Ordering;
    if in_child() {
        let page = common::page();
        let _pool: &'static StackPool =
            Box::leak(Box::new(StackPool::new(Config::default()).unwrap()));
        let mut thread: libc::pthread_t = 0;
        // SAFETY: starting a raw thread (no Rust alternate stack) running
        // a function of the right signature, which ignores its argument.
        let created = unsafe {
            libc::pthread_create(
                &mut thread,
                std::ptr::null(),
                fork_spares::exiting_thread,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(created, 0);
        let alt = loop {
            let a = fork_spares::ALT.load(Ordering::SeqCst);
            if a != 0 {
                break a;
            }
            std::thread::yield_now();
        };
        // SAFETY: plain system calls on a userfaultfd of our own.
        let uffd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | 1,
            )
        } as i32;
        if uffd < 0 {
            println!("SKIP no userfaultfd: {}", std::io::Error::last_os_error());
            return;
        }
        let mut api = [0xAAu64, 0, 0];
        // SAFETY: UFFDIO_API takes a `struct uffdio_api` (three u64s), here
        // on our stack.
        let api_ok = unsafe { libc::ioctl(uffd, UFFDIO_API, api.as_mut_ptr()) };
        assert_eq!(api_ok, 0);
        let mut reg = [alt as u64, page as u64, 1, 0];
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register` (four
        // u64s), here on our stack, for the spare's link page.
        let registered = unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, reg.as_mut_ptr()) };
        assert_eq!(registered, 0, "{}", std::io::Error::last_os_error());
        fork_spares::GO.store(1, Ordering::SeqCst);
        // Wait until the thread faults on the link page, inside the lock.
        let mut pfd = libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling our descriptor, `pfd` on our stack.
        let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(ready, 1, "the exiting thread never faulted");
        // SAFETY: the child only makes system calls and calls
        // prepare_thread, then leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let off = libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: libc::SS_DISABLE,
                ss_size: 0,
            };
            // SAFETY: turning the thread's alternate stack off, then
            // asking for one of the library's.
            unsafe { libc::sigaltstack(&off, std::ptr::null_mut()) };
            vmtask_stack::prepare_thread();
            let msg = b"FORK CHILD GOT AN ALT STACK\n";
            // SAFETY: write and _exit.
            unsafe {
                libc::write(1, msg.as_ptr().cast(), msg.len());
                libc::_exit(0);
            }
        }
        let mut status = 0;
        let mut done = false;
        for _ in 0..300 {
            // SAFETY: waiting for our child.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                done = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if !done {
            println!("FORK CHILD HUNG");
            // SAFETY: our own child, by its pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
        }
        // Let the exiting thread go on.
        let mut zero = [alt as u64, page as u64, 0, 0];
        // SAFETY: a uffdio_zeropage on our stack, for the registered page.
        unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, zero.as_mut_ptr()) };
        // SAFETY: joining the thread created above, once.
        let joined = unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
        assert_eq!(joined, 0);
        println!("CHILD DONE");
        return;
    }
    let out = run_child("fork_while_a_thread_files_its_spare_alt_stack");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", show(&out));
    if stdout.contains("SKIP") {
        return;
    }
    assert!(stdout.contains("CHILD DONE"), "{}", show(&out));
    assert!(
        stdout.contains("FORK CHILD GOT AN ALT STACK"),
        "{}",
        show(&out)
    );
}
