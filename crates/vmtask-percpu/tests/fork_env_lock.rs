//! A fork child reads the switches (`VMTASK_PERCPU_NO_RSEQ`, and
//! vmtask-rcu's `VMTASK_RCU_FORCE_FENCE`) without `std`'s environment lock,
//! which a fork while another thread is in `std::env::set_var` leaves held
//! in the child for good (review finding: the child's first
//! `CpuCache::new` hung there).
//!
//! Deterministic: this binary defines `setenv`, which `std::env::set_var`
//! calls with its lock held, and holds it there while the test forks.

use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicBool, Ordering};

const HOLD_VAR: &CStr = c"VMTASK_TEST_HOLD_ENV_LOCK";
static HOLD: AtomicBool = AtomicBool::new(true);
static HELD: AtomicBool = AtomicBool::new(false);

/// `setenv`, as `std::env::set_var` calls it (under its lock): waits while
/// `HOLD` is set for [`HOLD_VAR`], and hands every other variable to
/// libc's own.
///
/// # Safety
/// As libc's `setenv`: `name` and `value` are NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn setenv(
    name: *const c_char,
    value: *const c_char,
    overwrite: c_int,
) -> c_int {
    // SAFETY: the caller passes a NUL-terminated name.
    if unsafe { CStr::from_ptr(name) } == HOLD_VAR {
        HELD.store(true, Ordering::SeqCst);
        while HOLD.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        return 0;
    }
    type Setenv = unsafe extern "C" fn(*const c_char, *const c_char, c_int) -> c_int;
    // SAFETY: looks up libc's `setenv`, past this definition; its type is
    // `Setenv`.
    let real: Setenv = unsafe {
        let f = libc::dlsym(libc::RTLD_NEXT, c"setenv".as_ptr());
        assert!(!f.is_null(), "no setenv after this binary's");
        std::mem::transmute::<*mut libc::c_void, Setenv>(f)
    };
    // SAFETY: the caller's arguments, passed on.
    unsafe { real(name, value, overwrite) }
}

#[test]
fn a_fork_child_reads_a_switch_while_another_thread_holds_the_environment_lock() {
    let holder = std::thread::spawn(|| {
        std::env::set_var(HOLD_VAR.to_str().unwrap(), "1");
    });
    while !HELD.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    // `std`'s environment lock is held, for writing, by `holder`.
    // SAFETY: the child reads a switch and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: a hang ends the child with SIGALRM.
        unsafe { libc::alarm(5) };
        let on = vmtask_percpu::env_switch(vmtask_percpu::NO_RSEQ_ENV);
        // SAFETY: ends the child.
        unsafe { libc::_exit(10 + i32::from(on)) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    HOLD.store(false, Ordering::SeqCst);
    holder.join().unwrap();
    assert!(
        libc::WIFEXITED(status),
        "the fork child hung reading a switch (wait status {status:#x})"
    );
    let on = vmtask_percpu::env_switch(vmtask_percpu::NO_RSEQ_ENV);
    assert_eq!(
        libc::WEXITSTATUS(status),
        10 + i32::from(on),
        "the child read another value"
    );
}
