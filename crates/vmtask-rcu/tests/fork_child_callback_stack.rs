//! A fork child's callback thread, which the child starts with
//! `pthread_create` rather than through std, gets the stack std would
//! give it: `RUST_MIN_STACK` is honoured (review finding: a fixed 2 MiB
//! overflowed where the parent's thread had the 16 MiB asked for).

use std::process::Command;

/// Set in the re-run that plays the scenario.
const SCENARIO: &str = "VMTASK_TEST_DEEP_CALLBACK";
const TEST: &str = "a_fork_childs_callback_thread_gets_rust_min_stack";
/// About 6 MiB of stack: more than 2 MiB, less than the 16 asked for.
const DEPTH: usize = 6000;

/// A kibibyte of stack per level.
#[inline(never)]
fn recurse(n: usize) -> usize {
    let buf = std::hint::black_box([n as u8; 1024]);
    let below = if n == 0 { 0 } else { recurse(n - 1) };
    below + usize::from(buf[7])
}

fn deep_callback() {
    vmtask_rcu::call(|| {
        std::hint::black_box(recurse(DEPTH));
    });
    vmtask_rcu::barrier();
}

/// The scenario, in a process started with `RUST_MIN_STACK` = 16 MiB.
fn scenario() {
    deep_callback();
    // SAFETY: the child only queues a callback, waits and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        deep_callback();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child's deep callback failed (status {status:#x}; 0xb is SIGSEGV)"
    );
    println!("DEEP CALLBACKS RAN");
}

#[test]
fn a_fork_childs_callback_thread_gets_rust_min_stack() {
    if std::env::var_os(SCENARIO).is_some() {
        return scenario();
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(SCENARIO, "1")
        .env("RUST_MIN_STACK", (16 << 20).to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("DEEP CALLBACKS RAN"),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
