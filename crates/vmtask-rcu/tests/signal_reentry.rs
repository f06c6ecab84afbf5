//! `defer_drop` is not async-signal-safe: a signal handler that defers on
//! a thread it interrupted inside a deferral's push must abort with a
//! message, not take a second `&mut` to the thread's batches (review
//! finding: a bag's length ran past its capacity, and glibc then found the
//! heap corrupted).
//!
//! Deterministic: the x86-64 trap flag single-steps one `defer_raw`, and
//! the SIGTRAP handler, run after each of its instructions, defers too, so
//! one of those nested calls lands inside the push.
#![cfg(target_arch = "x86_64")]

use std::os::unix::process::ExitStatusExt;

mod child;

const TEST: &str = "a_deferral_re_entered_inside_its_push_aborts_with_a_message";
const ROLE: &str = "VMTASK_RCU_REENTRY_CHILD";

static OBJECT: u8 = 0;

/// # Safety
/// None needed: it does nothing. `unsafe` for the type `defer_raw` takes.
unsafe fn keep(_: *mut ()) {}

/// A deferral that neither allocates nor frees: safe to nest in a handler
/// as far as the allocator goes, so only the batches' protocol is tested.
fn defer_static() {
    // SAFETY: `keep` does nothing, anywhere, at any time.
    unsafe { vmtask_rcu::defer_raw(std::ptr::from_ref(&OBJECT).cast_mut().cast(), keep) };
}

extern "C" fn on_trap(_: libc::c_int) {
    defer_static();
}

/// Runs `f` one instruction at a time (the handler runs with the flag
/// clear, and the kernel restores it when the handler returns).
fn single_stepped(f: impl FnOnce()) {
    // SAFETY: sets the trap flag of this thread's RFLAGS.
    unsafe { std::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq") };
    f();
    // SAFETY: clears it again.
    unsafe { std::arch::asm!("pushfq", "and qword ptr [rsp], -257", "popfq") };
}

fn child() {
    // A hang (the re-entry went wrong some other way) ends the child too.
    // SAFETY: alarm has no preconditions.
    unsafe { libc::alarm(20) };
    // SAFETY: installs a handler for SIGTRAP, which nothing else uses here.
    let installed = unsafe {
        libc::signal(
            libc::SIGTRAP,
            on_trap as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    assert_ne!(installed, libc::SIG_ERR);
    // The thread's batch exists and has room: the push below is the
    // common one, which owns the batch for a few instructions.
    vmtask_rcu::barrier();
    defer_static();
    single_stepped(defer_static);
    println!("the re-entry went unnoticed");
}

#[test]
fn a_deferral_re_entered_inside_its_push_aborts_with_a_message() {
    if std::env::var_os(ROLE).is_some() {
        return child();
    }
    let out = child::rerun_test(TEST, ROLE, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "status {:?}\nstdout: {}\nstderr: {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("re-entered on one thread, from a signal handler"),
        "{stderr}"
    );
}
