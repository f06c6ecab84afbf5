//! Pools are not async-signal-safe: a signal handler that allocates on a
//! thread it interrupted inside `alloc`'s take of the parked stack must
//! abort with a message, not hand the same stack to both calls (review
//! finding: a stack with two owners, whose tag was clobbered 1.4 million
//! times in ten seconds).
//!
//! Deterministic: the x86-64 trap flag single-steps one `alloc`, and the
//! SIGTRAP handler, run after each of its instructions, allocates too, so
//! one of those nested calls lands inside the take.
#![cfg(target_arch = "x86_64")]

use std::os::unix::process::ExitStatusExt;
use std::sync::OnceLock;
use vmtask_stack::{Config, StackPool};

mod common;

const TEST: &str = "an_alloc_re_entered_inside_its_unpark_aborts_with_a_message";
const ROLE: &str = "VMTASK_STACK_REENTRY_CHILD";

static POOL: OnceLock<StackPool> = OnceLock::new();

extern "C" fn on_trap(_: libc::c_int) {
    // Kept for good: the child ends here or aborts.
    std::mem::forget(POOL.get().unwrap().alloc());
}

/// Runs `f` one instruction at a time (the handler runs with the flag
/// clear, and the kernel restores it when the handler returns).
fn single_stepped<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: sets the trap flag of this thread's RFLAGS.
    unsafe { std::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq") };
    let result = f();
    // SAFETY: clears it again.
    unsafe { std::arch::asm!("pushfq", "and qword ptr [rsp], -257", "popfq") };
    result
}

fn child() {
    // A hang (the re-entry went wrong some other way) ends the child too.
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(20) };
    let pool = POOL.get_or_init(|| {
        StackPool::new(Config {
            cache_size: 64,
            ..Config::default()
        })
        .unwrap()
    });
    // SAFETY: installs a handler for SIGTRAP, which nothing else uses here.
    let installed = unsafe {
        libc::signal(
            libc::SIGTRAP,
            on_trap as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    assert_ne!(installed, libc::SIG_ERR);
    // One stack parked on this thread, the rest in the magazine: the
    // nested allocations take the fast paths, which allocate nothing.
    let warm: Vec<_> = (0..48).map(|_| pool.alloc().unwrap()).collect();
    drop(warm);
    let outer = single_stepped(|| pool.alloc());
    std::mem::forget(outer);
    println!("the re-entry went unnoticed");
}

#[test]
fn an_alloc_re_entered_inside_its_unpark_aborts_with_a_message() {
    if std::env::var_os(ROLE).is_some() {
        return child();
    }
    let out = common::run_test_in_child(TEST, ROLE, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "status {:?}\nstdout: {}\nstderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("StackPool::alloc re-entered on one thread"),
        "{stderr}"
    );
}
