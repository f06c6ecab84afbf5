//! Overflow reports, checked in child processes: each test re-runs this
//! test binary on itself with `VMTASK_STACK_CHILD` set, the child does the
//! fatal thing, and the parent checks how it died and what it printed.

use std::os::unix::process::ExitStatusExt;
use std::process::Output;

use corosensei::Coroutine;
use vmtask_stack::{Config, GuardMode, StackPool};

mod common;
use common::{in_child, recurse, run_child};

/// The `base..limit` line the child prints before faulting.
fn bounds(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints "test <name> ... " on the same line first.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("BOUNDS "))
        .expect("child printed its stack bounds");
    line.1.to_string()
}

/// Prints the line `bounds` reads back in the parent.
fn print_bounds(stack: &vmtask_stack::Stack) {
    println!(
        "BOUNDS {:p}..{:p} of {} bytes",
        stack.base(),
        stack.limit(),
        stack.size()
    );
}

fn touch_below_limit(mode: GuardMode) {
    let pool = StackPool::new(Config {
        guard_mode: mode,
        ..Config::default()
    })
    .unwrap();
    let stack = pool.alloc().unwrap();
    print_bounds(&stack);
    let limit = stack.limit() as usize;
    // From code running on the stack: a write into the guard of a stack
    // nothing runs on is a stray pointer, not an overflow.
    let mut co = Coroutine::with_stack(stack, move |_: &corosensei::Yielder<(), ()>, ()| {
        // SAFETY: deliberately not: this writes the guard page to prove it
        // faults.
        unsafe { std::ptr::write_volatile((limit - 1) as *mut u8, 1) };
    });
    co.resume(());
    unreachable!("the guard page did not fault");
}

fn assert_overflow_report(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "status {:?}, stderr:\n{stderr}",
        out.status
    );
    let expected = format!("stack overflow: stack {}", bounds(out));
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in stderr:\n{stderr}"
    );
}

#[test]
fn touching_the_guard_page_aborts_with_overflow_message() {
    if in_child() {
        touch_below_limit(GuardMode::Auto);
    }
    assert_overflow_report(&run_child(
        "touching_the_guard_page_aborts_with_overflow_message",
    ));
}

#[test]
fn mprotect_guard_page_aborts_with_overflow_message() {
    if in_child() {
        touch_below_limit(GuardMode::Mprotect);
    }
    assert_overflow_report(&run_child(
        "mprotect_guard_page_aborts_with_overflow_message",
    ));
}

fn label_task(_base: *mut u8, out: &mut [u8]) -> usize {
    let label = b"task 7 (deep-recursion)";
    out[..label.len()].copy_from_slice(label);
    label.len()
}

/// A 64 KiB stack of a new pool, its bounds printed for the parent.
fn printed_pool_stack() -> (StackPool, vmtask_stack::Stack) {
    let pool = StackPool::new(Config {
        stack_size: 64 * 1024,
        ..Config::default()
    })
    .unwrap();
    let stack = pool.alloc().unwrap();
    print_bounds(&stack);
    (pool, stack)
}

/// Recurses on a [`printed_pool_stack`], in a coroutine, until it
/// overflows.
fn recurse_on_a_pool_stack() -> ! {
    let (_pool, stack) = printed_pool_stack();
    let mut co = Coroutine::with_stack(stack, |_: &corosensei::Yielder<(), ()>, ()| recurse(0));
    co.resume(());
    unreachable!("unbounded recursion returned");
}

#[test]
fn recursion_in_a_coroutine_reports_overflow_with_label() {
    if in_child() {
        // SAFETY: `label_task` copies a constant: async-signal-safe.
        unsafe { vmtask_stack::set_overflow_label_hook(Some(label_task)) };
        recurse_on_a_pool_stack();
    }
    let out = run_child("recursion_in_a_coroutine_reports_overflow_with_label");
    assert_overflow_report(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "stack overflow: stack {}: task 7 (deep-recursion)\n",
        bounds(&out)
    );
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in stderr:\n{stderr}"
    );
}

/// A worker thread that blocks every signal before it runs pool stacks
/// still gets its overflow reported (review finding: the kernel killed the
/// process silently, as it does for a fault on a thread that blocks the
/// signal).
#[test]
fn an_overflow_on_a_thread_that_blocks_every_signal_is_reported() {
    if in_child() {
        std::thread::spawn(|| {
            // SAFETY: an all-zero sigset_t is valid to fill; blocks every
            // signal on this thread only.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
            }
            recurse_on_a_pool_stack();
        })
        .join()
        .unwrap();
    }
    assert_overflow_report(&run_child(
        "an_overflow_on_a_thread_that_blocks_every_signal_is_reported",
    ));
}

/// A fault whose address is not in the guard (a null read here, or the
/// kernel's address-0 SIGSEGV when it cannot push a signal frame) while the
/// stack pointer is in it is an overflow too: the handler reads the
/// interrupted stack pointer.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn a_fault_with_the_stack_pointer_in_the_guard_is_reported() {
    if in_child() {
        let pool = StackPool::new(Config::default()).unwrap();
        let stack = pool.alloc().unwrap();
        print_bounds(&stack);
        let sp_in_guard = stack.limit() as usize - 64;
        // SAFETY: deliberately not: the stack pointer moves into the guard
        // and a null read faults; nothing returns from here.
        unsafe {
            std::arch::asm!(
                "mov rsp, {sp}",
                "mov rax, qword ptr [0]",
                "ud2",
                sp = in(reg) sp_in_guard,
                options(noreturn)
            )
        }
    }
    assert_overflow_report(&run_child(
        "a_fault_with_the_stack_pointer_in_the_guard_is_reported",
    ));
}

/// Moves the stack pointer 256 bytes below `guard`, into whatever memory
/// lies there, and stores into the guard, as a frame bigger than the guard
/// does; never returns.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn store_into_guard_from_below(guard: usize) -> ! {
    let sp = guard - 256;
    // SAFETY: deliberately not: the store faults, and nothing returns.
    unsafe {
        std::arch::asm!(
            "mov rsp, {sp}",
            "mov qword ptr [{guard}], 1",
            "ud2",
            sp = in(reg) sp,
            guard = in(reg) guard,
            options(noreturn)
        )
    }
}

/// `run_child`, or `None` if the child printed that it skipped.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn run_child_unless_skipped(test: &str) -> Option<Output> {
    let out = run_child(test);
    (!String::from_utf8_lossy(&out.stdout).contains("SKIP")).then_some(out)
}

/// A stack pointer up to a slot below a guard counts as an overflow only
/// in the slot below, of the same arenas: a thread whose own stack lies
/// just below an arena, writing stray into the lowest slot's guard, gets
/// the ordinary fault (review finding: found under valgrind, which puts
/// thread stacks there).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn a_stray_write_from_memory_just_below_an_arena_is_not_an_overflow() {
    if in_child() {
        let pool = StackPool::new(Config::default()).unwrap();
        // A fresh pool's first stack is its first arena's lowest slot.
        let stack = pool.alloc().unwrap();
        let guard = stack.guard_range().start as usize;
        let len = 64 * 1024;
        // SAFETY: maps fresh memory just below the arena, only where
        // nothing is mapped (MAP_FIXED_NOREPLACE).
        let below = unsafe {
            libc::mmap(
                (guard - len) as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if below as usize != guard - len {
            println!("SKIP: the address space below the arena is taken");
            std::process::exit(0);
        }
        store_into_guard_from_below(guard);
    }
    if let Some(out) =
        run_child_unless_skipped("a_stray_write_from_memory_just_below_an_arena_is_not_an_overflow")
    {
        assert_ordinary_segv(&out);
    }
}

/// A frame bigger than the guard that jumps from an arena's lowest slot
/// into the arena just below, whose top slot is not carved yet, is still
/// an overflow (review finding: a check that asked for a carved slot
/// there missed it).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn a_frame_that_jumps_into_an_adjacent_arena_is_an_overflow() {
    if in_child() {
        // The thread's first stack maps its alternate signal stack: before
        // the arenas, not between them.
        let warm = StackPool::new(Config::default()).unwrap();
        drop(warm.alloc().unwrap());
        let upper = StackPool::new(Config::default()).unwrap();
        let stack = upper.alloc().unwrap();
        let guard = stack.guard_range().start as usize;
        let slot = stack.base() as usize - guard;
        // Another pool's first arena (256 slots), mapped next, usually
        // lands just below; a few tries, the pools kept, find one that does.
        let mut lower = Vec::new();
        let adjacent = (0..8).any(|_| {
            let pool = StackPool::new(Config::default()).unwrap();
            let first = pool.alloc().unwrap();
            let end = first.guard_range().start as usize + 256 * slot;
            lower.push((pool, first));
            end == guard
        });
        if !adjacent {
            println!("SKIP: no arena was mapped just below the first");
            std::process::exit(0);
        }
        print_bounds(&stack);
        store_into_guard_from_below(guard);
    }
    if let Some(out) =
        run_child_unless_skipped("a_frame_that_jumps_into_an_adjacent_arena_is_an_overflow")
    {
        assert_overflow_report(&out);
    }
}

fn faulting_label(_base: *mut u8, _out: &mut [u8]) -> usize {
    // SAFETY: deliberately not: a label hook that faults.
    unsafe { std::ptr::read_volatile(std::ptr::null::<usize>()) }
}

#[test]
fn a_label_hook_that_faults_loses_only_the_label() {
    if in_child() {
        // SAFETY: deliberately not async-signal-safe in the usual sense: the
        // hook faults, which is what this test is about.
        unsafe { vmtask_stack::set_overflow_label_hook(Some(faulting_label)) };
        touch_below_limit(GuardMode::Auto);
    }
    let out = run_child("a_label_hook_that_faults_loses_only_the_label");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // SIGSEGV is blocked inside the handler, so the hook's fault kills the
    // child with it at once.
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "status {:?}, stderr:\n{stderr}",
        out.status
    );
    let expected = format!("stack overflow: stack {}", bounds(&out));
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in stderr:\n{stderr}"
    );
}

/// The child died of SIGSEGV, the default action, with no overflow report.
fn assert_ordinary_segv(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("stack overflow:"), "stderr:\n{stderr}");
}

#[test]
fn other_faults_go_to_the_previous_handler() {
    if in_child() {
        let _pool = StackPool::new(Config::default()).unwrap();
        let _stack = _pool.alloc().unwrap();
        // SAFETY: deliberately not: an unmapped address, to see the fault
        // pass through to the default action.
        unsafe { std::ptr::write_volatile(16 as *mut u8, 1) };
        unreachable!("writing address 16 did not fault");
    }
    assert_ordinary_segv(&run_child("other_faults_go_to_the_previous_handler"));
}

/// A write just past the top of a pool's only stack lands in the guard of
/// the next slot, never carved (guards are installed ahead of the carve):
/// an ordinary fault, not an overflow of a stack nobody has (review
/// finding: it was reported as one).
#[test]
fn a_write_past_the_top_into_an_uncarved_slots_guard_is_an_ordinary_fault() {
    // Guard markers only: they are installed ahead of the carve, where
    // `mprotect` guards are made one per carve (the next slot is then
    // plain read-write memory, and the write does not fault at all).
    let config = Config {
        guard_mode: GuardMode::GuardMarker,
        ..Config::default()
    };
    if let Err(vmtask_stack::StackError::GuardMarkersUnsupported) = StackPool::new(config.clone()) {
        eprintln!("SKIPPED: this kernel has no MADV_GUARD_INSTALL");
        return;
    }
    if in_child() {
        let pool = StackPool::new(config).unwrap();
        let stack = pool.alloc().unwrap();
        let top = stack.base() as usize;
        let mut co = Coroutine::with_stack(stack, move |_: &corosensei::Yielder<(), ()>, ()| {
            // SAFETY: deliberately not: eight bytes past this stack's top.
            unsafe { std::ptr::write_volatile(top as *mut u64, 1) };
        });
        co.resume(());
        unreachable!("the next slot's guard did not fault");
    }
    assert_ordinary_segv(&run_child(
        "a_write_past_the_top_into_an_uncarved_slots_guard_is_an_ordinary_fault",
    ));
}

#[test]
fn thread_stack_overflow_is_still_reported_by_rust() {
    if in_child() {
        let _pool = StackPool::new(Config::default()).unwrap();
        std::thread::Builder::new()
            .name("deep".into())
            .spawn(|| recurse(0))
            .unwrap()
            .join()
            .unwrap();
        unreachable!("unbounded recursion returned");
    }
    let out = run_child("thread_stack_overflow_is_still_reported_by_rust");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "stderr:\n{stderr}"
    );
    let report = stderr
        .lines()
        .find(|l| l.contains("has overflowed its stack"))
        .expect("Rust's report");
    assert!(report.starts_with("thread 'deep'"), "stderr:\n{stderr}");
    assert!(
        !stderr.contains("stack overflow: stack"),
        "stderr:\n{stderr}"
    );
}

#[test]
fn mprotect_mode_reports_the_map_count_limit_as_an_error() {
    if in_child() {
        let pool = StackPool::new(Config {
            guard_mode: GuardMode::Mprotect,
            stack_size: 4096,
            max_stacks: common::max_stacks_past_kernel_limits(4096),
            ..Config::default()
        })
        .unwrap();
        // vm.max_map_count (65530 by default) ends it near 32,765 stacks,
        // two mappings each; a default pool holds 1,048,576 (on 64-bit
        // targets).
        let (stacks, err) = common::alloc_until_error(&pool, 1 << 20);
        let held = stacks.len();
        drop(stacks);
        drop(pool);
        common::assert_enomem(&err);
        println!("LIMIT {held} stacks: {err}");
        return;
    }
    let out = run_child("mprotect_mode_reports_the_map_count_limit_as_an_error");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("LIMIT "))
        .expect("child reported the limit");
    assert!(line.contains("vm.max_map_count"), "{line}");
}

/// Installs `handler` (with `flags`, blocking `masked` while it runs) as
/// the action of `sig`, as a program does before any pool exists.
fn set_action(sig: libc::c_int, handler: libc::sighandler_t, flags: libc::c_int, masked: &[i32]) {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = flags;
    // SAFETY: `action.sa_mask` is a valid sigset to fill in.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    for &m in masked {
        // SAFETY: as above; `m` is a valid signal number.
        unsafe { libc::sigaddset(&mut action.sa_mask, m) };
    }
    // SAFETY: the handlers the tests pass are async-signal-safe (atomic
    // stores and sigprocmask queries only).
    let rc = unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

/// Whether `sig` is blocked on the calling thread.
fn blocked(sig: libc::c_int) -> bool {
    // SAFETY: querying the mask writes a whole sigset into `set`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
        libc::sigismember(&set, sig) == 1
    }
}

mod seen {
    use std::sync::atomic::{AtomicUsize, Ordering};
    pub static CALLS: AtomicUsize = AtomicUsize::new(0);
    pub static SIGNO: AtomicUsize = AtomicUsize::new(0);
    pub static USR_BLOCKED: AtomicUsize = AtomicUsize::new(0);
    pub static OWN_BLOCKED: AtomicUsize = AtomicUsize::new(0);

    pub fn record(sig: libc::c_int, usr: libc::c_int, signo: libc::c_int) {
        CALLS.fetch_add(1, Ordering::SeqCst);
        SIGNO.store(signo as usize, Ordering::SeqCst);
        USR_BLOCKED.store(super::blocked(usr) as usize, Ordering::SeqCst);
        OWN_BLOCKED.store(super::blocked(sig) as usize, Ordering::SeqCst);
    }

    pub fn take() -> String {
        format!(
            "calls={} signo={} usr_blocked={} own_blocked={}",
            CALLS.swap(0, Ordering::SeqCst),
            SIGNO.swap(0, Ordering::SeqCst),
            USR_BLOCKED.swap(0, Ordering::SeqCst),
            OWN_BLOCKED.swap(0, Ordering::SeqCst)
        )
    }
}

extern "C" fn plain_segv(sig: libc::c_int) {
    seen::record(sig, libc::SIGUSR1, 0);
}

extern "C" fn siginfo_bus(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler gets a valid siginfo.
    let signo = unsafe { (*info).si_signo };
    seen::record(sig, libc::SIGUSR2, signo);
}

#[test]
fn previous_handler_runs_with_its_own_mask_and_flags() {
    if in_child() {
        set_action(
            libc::SIGSEGV,
            plain_segv as extern "C" fn(libc::c_int) as libc::sighandler_t,
            libc::SA_NODEFER,
            &[libc::SIGUSR1],
        );
        set_action(
            libc::SIGBUS,
            siginfo_bus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as libc::sighandler_t,
            libc::SA_SIGINFO,
            &[libc::SIGUSR2],
        );
        let _pool = StackPool::new(Config::default()).unwrap();
        // SAFETY: raising a signal whose handler returns.
        unsafe { libc::raise(libc::SIGSEGV) };
        println!("SEGV {}", seen::take());
        // SAFETY: as above.
        unsafe { libc::raise(libc::SIGBUS) };
        println!("BUS {}", seen::take());
        println!("AFTER usr1_blocked={}", blocked(libc::SIGUSR1) as u8);
        return;
    }
    let out = run_child("previous_handler_runs_with_its_own_mask_and_flags");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    // SA_NODEFER: SIGSEGV itself is not blocked; sa_mask blocks SIGUSR1.
    assert!(
        stdout.contains("SEGV calls=1 signo=0 usr_blocked=1 own_blocked=0"),
        "{stdout}"
    );
    // SA_SIGINFO gets the siginfo; without SA_NODEFER SIGBUS is blocked.
    let bus = format!(
        "BUS calls=1 signo={} usr_blocked=1 own_blocked=1",
        libc::SIGBUS
    );
    assert!(stdout.contains(&bus), "{stdout}");
    // The mask is the interrupted code's again once the handler returns.
    assert!(stdout.contains("AFTER usr1_blocked=0"), "{stdout}");
}

extern "C" fn one_shot(sig: libc::c_int) {
    seen::record(sig, libc::SIGUSR1, 0);
}

#[test]
fn one_shot_previous_handler_runs_once_then_the_default_kills() {
    if in_child() {
        set_action(
            libc::SIGSEGV,
            one_shot as extern "C" fn(libc::c_int) as libc::sighandler_t,
            libc::SA_RESETHAND,
            &[],
        );
        let _pool = StackPool::new(Config::default()).unwrap();
        // SAFETY: raising a signal whose handler returns, the first time.
        unsafe { libc::raise(libc::SIGSEGV) };
        println!("FIRST {}", seen::take());
        // SAFETY: deliberately fatal: SA_RESETHAND made the action SIG_DFL.
        unsafe { libc::raise(libc::SIGSEGV) };
        println!("SECOND {}", seen::take());
        unreachable!("a second SIGSEGV after SA_RESETHAND did not kill");
    }
    let out = run_child("one_shot_previous_handler_runs_once_then_the_default_kills");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "stdout:\n{stdout}"
    );
    assert!(stdout.contains("FIRST calls=1"), "{stdout}");
    assert!(!stdout.contains("SECOND"), "{stdout}");
}

#[test]
fn overflow_is_still_reported_after_a_one_shot_previous_handler_ran() {
    if in_child() {
        set_action(
            libc::SIGSEGV,
            one_shot as extern "C" fn(libc::c_int) as libc::sighandler_t,
            libc::SA_RESETHAND,
            &[],
        );
        let _pool = StackPool::new(Config::default()).unwrap();
        // SAFETY: raising a signal whose handler returns, the first time.
        unsafe { libc::raise(libc::SIGSEGV) };
        touch_below_limit(GuardMode::Auto);
    }
    assert_overflow_report(&run_child(
        "overflow_is_still_reported_after_a_one_shot_previous_handler_ran",
    ));
}

#[test]
fn ignored_sigsegv_sent_by_kill_stays_ignored() {
    if in_child() {
        set_action(libc::SIGSEGV, libc::SIG_IGN, 0, &[]);
        set_action(libc::SIGBUS, libc::SIG_IGN, 0, &[]);
        let _pool = StackPool::new(Config::default()).unwrap();
        // SAFETY: sending ignored signals to ourselves: SI_TKILL, SI_USER
        // and SI_QUEUE; a signal sent to the own process goes to the
        // sending thread, which has none blocked, before kill returns.
        unsafe {
            libc::raise(libc::SIGSEGV);
            libc::raise(libc::SIGBUS);
            libc::kill(libc::getpid(), libc::SIGSEGV);
            libc::sigqueue(libc::getpid(), libc::SIGBUS, std::mem::zeroed());
        }
        println!("SURVIVED");
        return;
    }
    let out = run_child("ignored_sigsegv_sent_by_kill_stays_ignored");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}, stdout:\n{stdout}",
        out.status
    );
    assert!(stdout.contains("SURVIVED"), "{stdout}");
}

#[test]
fn ignored_sigsegv_from_a_real_fault_still_kills() {
    if in_child() {
        set_action(libc::SIGSEGV, libc::SIG_IGN, 0, &[]);
        let _pool = StackPool::new(Config::default()).unwrap();
        // SAFETY: deliberately not: the kernel kills for an ignored fault.
        unsafe { std::ptr::write_volatile(16 as *mut u8, 1) };
        unreachable!("writing address 16 did not fault");
    }
    assert_ordinary_segv(&run_child("ignored_sigsegv_from_a_real_fault_still_kills"));
}

/// A thread-local whose destructor runs a coroutine that recurses without
/// bound on the pool stack it holds.
struct RecurseOnDrop(std::cell::RefCell<Option<vmtask_stack::Stack>>);

impl Drop for RecurseOnDrop {
    fn drop(&mut self) {
        if let Some(stack) = self.0.take() {
            let mut co =
                Coroutine::with_stack(stack, |_: &corosensei::Yielder<(), ()>, ()| recurse(0));
            co.resume(());
        }
    }
}

thread_local! {
    static LATE: RecurseOnDrop = const { RecurseOnDrop(std::cell::RefCell::new(None)) };
}

/// Thread body: `LATE` is first used before the thread's first pool
/// allocation, so its destructor runs after this crate's own thread-exit
/// work.
fn overflow_in_late_destructor() {
    LATE.with(|_| ());
    let pool: &'static StackPool = Box::leak(Box::new(
        StackPool::new(Config {
            stack_size: 64 * 1024,
            ..Config::default()
        })
        .unwrap(),
    ));
    let stack = pool.alloc().unwrap();
    print_bounds(&stack);
    LATE.with(|late| *late.0.borrow_mut() = Some(stack));
}

#[test]
fn overflow_in_a_late_thread_local_destructor_is_reported() {
    if in_child() {
        std::thread::spawn(overflow_in_late_destructor)
            .join()
            .unwrap();
        unreachable!("unbounded recursion returned");
    }
    assert_overflow_report(&run_child(
        "overflow_in_a_late_thread_local_destructor_is_reported",
    ));
}

extern "C" fn foreign_thread(run: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: the creator passes a `fn()` as the thread's argument.
    let run: fn() = unsafe { std::mem::transmute::<*mut libc::c_void, fn()>(run) };
    run();
    std::ptr::null_mut()
}

/// Runs `run` on a raw pthread, which has no alternate signal stack of
/// Rust's, and waits for it to exit.
fn on_foreign_thread(run: fn()) {
    let mut thread: libc::pthread_t = 0;
    // SAFETY: `foreign_thread` has the start signature and takes a `fn()`.
    let rc = unsafe {
        libc::pthread_create(
            &mut thread,
            std::ptr::null(),
            foreign_thread,
            run as *mut libc::c_void,
        )
    };
    assert_eq!(rc, 0);
    // SAFETY: joining the thread created above, once.
    let rc = unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

#[test]
fn overflow_in_a_late_thread_local_destructor_of_a_foreign_thread_is_reported() {
    if in_child() {
        on_foreign_thread(overflow_in_late_destructor);
        unreachable!("unbounded recursion returned");
    }
    assert_overflow_report(&run_child(
        "overflow_in_a_late_thread_local_destructor_of_a_foreign_thread_is_reported",
    ));
}

fn print_alt_stack() {
    let pool: &'static StackPool = Box::leak(Box::new(StackPool::new(Config::default()).unwrap()));
    drop(pool.alloc().unwrap());
    // SAFETY: an all-zero stack_t is a valid value to query into.
    let mut current: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: querying the alternate stack writes into `current`.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut current) };
    println!("ALTSTACK {:p} flags {}", current.ss_sp, current.ss_flags);
}

#[test]
fn alt_stacks_are_recycled_after_thread_exit() {
    if in_child() {
        for _ in 0..3 {
            on_foreign_thread(print_alt_stack);
        }
        return;
    }
    let out = run_child("alt_stacks_are_recycled_after_thread_exit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}");
    let stacks: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("ALTSTACK ").map(|(_, s)| s))
        .collect();
    assert_eq!(stacks.len(), 3, "{stdout}");
    assert!(stacks[0].ends_with("flags 0"), "{stdout}");
    assert!(stacks.iter().all(|s| *s == stacks[0]), "{stdout}");
}

#[cfg(target_arch = "x86_64")]
extern "C" fn ignore_usr1(_: libc::c_int) {}

/// Sends SIGUSR1 to this thread with the stack pointer moved to `sp`, so
/// that the kernel must push the signal frame there.
///
/// # Safety
/// `sp` is a writable stack area of this thread with nothing live below
/// it; the stack pointer is restored before returning.
#[cfg(target_arch = "x86_64")]
unsafe fn signal_self_with_sp(sp: usize) {
    // SAFETY: getpid and gettid cannot fail.
    let (pid, tid) = unsafe { (libc::getpid() as usize, libc::gettid() as usize) };
    // SAFETY: the caller's contract; a raw tgkill between two moves of the
    // stack pointer, which r12 saves across the system call.
    unsafe {
        std::arch::asm!(
            "mov r12, rsp",
            "mov rsp, {sp}",
            "syscall",
            "mov rsp, r12",
            sp = in(reg) sp,
            inlateout("rax") libc::SYS_tgkill as usize => _,
            in("rdi") pid,
            in("rsi") tid,
            in("rdx") libc::SIGUSR1 as usize,
            out("rcx") _,
            out("r11") _,
            out("r12") _,
        )
    };
}

/// On a pool stack with 512 bytes left, a handler without `SA_ONSTACK`
/// gets a signal: its frame does not fit, and the kernel raises SIGSEGV
/// itself (`SI_KERNEL`, address 0). Then, with `touch_guard`, the code
/// writes the guard.
#[cfg(target_arch = "x86_64")]
fn signal_frame_does_not_fit(touch_guard: bool) {
    set_action(
        libc::SIGUSR1,
        ignore_usr1 as *const () as libc::sighandler_t,
        0,
        &[],
    );
    let pool = StackPool::new(Config::default()).unwrap();
    let stack = pool.alloc().unwrap();
    let limit = stack.limit() as usize;
    print_bounds(&stack);
    let mut co = Coroutine::with_stack(stack, move |_: &corosensei::Yielder<(), ()>, ()| {
        // SAFETY: 512 bytes above the limit of the stack we run on, far
        // below anything live on it.
        unsafe { signal_self_with_sp(limit + 512) };
        println!("SURVIVED the kernel's SIGSEGV");
        if touch_guard {
            // SAFETY: deliberately not: this writes the guard page.
            unsafe { std::ptr::write_volatile((limit - 8) as *mut u8, 1) };
        }
    });
    co.resume(());
    std::mem::forget(pool);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_signal_frame_that_does_not_fit_is_reported_as_an_overflow() {
    if in_child() {
        signal_frame_does_not_fit(true);
        unreachable!("the overflow was not reported");
    }
    let out = run_child("a_signal_frame_that_does_not_fit_is_reported_as_an_overflow");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("SURVIVED"), "stdout:\n{stdout}");
    assert_overflow_report(&out);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_kernels_own_sigsegv_elsewhere_still_kills_under_the_default_action() {
    if in_child() {
        set_action(libc::SIGSEGV, libc::SIG_DFL, 0, &[]);
        set_action(
            libc::SIGUSR1,
            ignore_usr1 as *const () as libc::sighandler_t,
            0,
            &[],
        );
        // Installs the pool's handler over SIG_DFL.
        let pool = StackPool::new(Config::default()).unwrap();
        drop(pool.alloc().unwrap());
        // A forced SIGSEGV off any pool stack: a thread's own stack
        // pointer moved into an unmapped page (a frame cannot be pushed).
        let unmapped = {
            let page = 4096;
            // SAFETY: a fresh mapping, unmapped at once: its range is
            // then not writable.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    page,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                p as usize + page
            }
        };
        // SAFETY: the kernel cannot write the frame there and forces
        // SIGSEGV; nothing of ours is below that stack pointer.
        unsafe { signal_self_with_sp(unmapped) };
        println!("SURVIVED the kernel's SIGSEGV");
        return;
    }
    let out = run_child("the_kernels_own_sigsegv_elsewhere_still_kills_under_the_default_action");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("SURVIVED"), "stdout:\n{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("stack overflow"),
        "not an overflow of a pool stack"
    );
}

/// The previous handler of these tests: says what it got and exits 42.
#[cfg(target_arch = "x86_64")]
extern "C" fn report_and_exit(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo; write and _exit are
    // async-signal-safe.
    unsafe {
        let msg: &[u8] = if (*info).si_code == libc::SI_KERNEL {
            b"CHAINED SI_KERNEL\n"
        } else {
            b"CHAINED other\n"
        };
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(42);
    }
}

/// A general-protection fault (a load through a non-canonical pointer:
/// SIGSEGV, `SI_KERNEL`, address 0, like a signal frame that did not fit)
/// with the stack pointer `room` bytes above a pool stack's guard.
#[cfg(target_arch = "x86_64")]
fn general_protection_fault_on_a_pool_stack(room: usize) {
    set_action(
        libc::SIGSEGV,
        report_and_exit as *const () as libc::sighandler_t,
        libc::SA_SIGINFO,
        &[],
    );
    let pool = StackPool::new(Config::default()).unwrap();
    let stack = pool.alloc().unwrap();
    let limit = stack.limit() as usize;
    let mut co = Coroutine::with_stack(stack, move |_: &corosensei::Yielder<(), ()>, ()| {
        // SAFETY: deliberately not: faults with the stack pointer moved
        // onto unused space of our own stack; the handler exits.
        unsafe {
            std::arch::asm!(
                "mov rsp, {sp}",
                "mov rax, qword ptr [{bad}]",
                "ud2",
                sp = in(reg) limit + room,
                bad = in(reg) 0x8000_0000_0000_0000usize,
                options(noreturn)
            )
        }
    });
    co.resume(());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_general_protection_fault_near_the_guard_is_not_an_overflow() {
    if in_child() {
        general_protection_fault_on_a_pool_stack(4096);
    }
    let out = run_child("a_general_protection_fault_near_the_guard_is_not_an_overflow");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("stack overflow"),
        "reported as an overflow:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(42), "{stderr}");
    assert!(stderr.contains("CHAINED SI_KERNEL"), "{stderr}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_general_protection_fault_far_from_the_guard_is_chained() {
    if in_child() {
        general_protection_fault_on_a_pool_stack(64 * 1024);
    }
    let out = run_child("a_general_protection_fault_far_from_the_guard_is_chained");
    assert_eq!(out.status.code(), Some(42), "{:?}", out);
}

/// Another library turns the thread's alternate stack off after the pool
/// prepared the thread; `prepare_thread`, which "makes sure the calling
/// thread has an alternate signal stack", must give it one again.
#[test]
fn prepare_thread_rearms_a_thread_whose_alt_stack_was_disabled() {
    if in_child() {
        let (_pool, stack) = printed_pool_stack();
        let off = libc::stack_t {
            ss_sp: std::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: turning this thread's alternate stack off, as another
        // library may.
        assert_eq!(unsafe { libc::sigaltstack(&off, std::ptr::null_mut()) }, 0);
        vmtask_stack::prepare_thread();
        let mut co = Coroutine::with_stack(stack, |_: &corosensei::Yielder<(), ()>, ()| recurse(0));
        co.resume(());
        unreachable!("unbounded recursion returned");
    }
    assert_overflow_report(&run_child(
        "prepare_thread_rearms_a_thread_whose_alt_stack_was_disabled",
    ));
}
