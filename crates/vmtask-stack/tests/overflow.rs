//! Overflow reports, checked in child processes: each test re-runs this
//! test binary on itself with `VMTASK_STACK_CHILD` set, the child does the
//! fatal thing, and the parent checks how it died and what it printed.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use corosensei::Coroutine;
use vmtask_stack::{Config, GuardMode, StackError, StackPool};

const CHILD: &str = "VMTASK_STACK_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

fn run_child(test: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .unwrap()
}

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

fn touch_below_limit(mode: GuardMode) {
    let pool = StackPool::new(Config {
        guard_mode: mode,
        ..Config::default()
    })
    .unwrap();
    let stack = pool.alloc().unwrap();
    println!(
        "BOUNDS {:p}..{:p} of {} bytes",
        stack.base(),
        stack.limit(),
        stack.size()
    );
    // SAFETY: deliberately not: this writes the guard page to prove it faults.
    unsafe { std::ptr::write_volatile(stack.limit().sub(1), 1) };
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

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    if std::hint::black_box(true) {
        recurse(depth + 1) + frame[3]
    } else {
        frame[0]
    }
}

fn label_task(_base: *mut u8, out: &mut [u8]) -> usize {
    let label = b"task 7 (deep-recursion)";
    out[..label.len()].copy_from_slice(label);
    label.len()
}

#[test]
fn recursion_in_a_coroutine_reports_overflow_with_label() {
    if in_child() {
        // SAFETY: `label_task` copies a constant: async-signal-safe.
        unsafe { vmtask_stack::set_overflow_label_hook(Some(label_task)) };
        let pool = StackPool::new(Config {
            stack_size: 64 * 1024,
            ..Config::default()
        })
        .unwrap();
        let stack = pool.alloc().unwrap();
        println!(
            "BOUNDS {:p}..{:p} of {} bytes",
            stack.base(),
            stack.limit(),
            stack.size()
        );
        let mut co = Coroutine::with_stack(stack, |_: &corosensei::Yielder<(), ()>, ()| recurse(0));
        co.resume(());
        unreachable!("unbounded recursion returned");
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
    let out = run_child("other_faults_go_to_the_previous_handler");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("stack overflow:"), "stderr:\n{stderr}");
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
            ..Config::default()
        })
        .unwrap();
        let mut stacks = Vec::with_capacity(70_000);
        let err = loop {
            match pool.alloc() {
                Ok(stack) => stacks.push(stack),
                Err(err) => break err,
            }
        };
        let held = stacks.len();
        drop(stacks);
        drop(pool);
        assert!(
            matches!(
                err,
                StackError::MapFailed {
                    errno: libc::ENOMEM,
                    ..
                }
            ),
            "{err}"
        );
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
