//! A kernel-feature probe that fails for want of address space is not
//! remembered: a moment of memory pressure at first use must not turn
//! guard markers or `MADV_POPULATE_WRITE` off for the life of the process.
//! Checked in a child process (this test binary re-run on itself), which
//! lowers its own `RLIMIT_AS` soft limit around the first probes and
//! raises it back.

use std::process::Command;

use corosensei::{Coroutine, Yielder};
use vmtask_stack::{ensure, Config, GuardMode, StackError, StackPool};

mod common;
use common::{page, populate_supported, resident_pages};

const CHILD: &str = "VMTASK_STACK_PROBE_CHILD";

#[test]
fn probes_that_fail_for_want_of_memory_run_again() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "probes_that_fail_for_want_of_memory_run_again",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CHILD DONE"), "{stdout}\n{stderr}");
}

/// Runs `f` with no room for any new mapping (the address-space soft
/// limit at 0), then restores the limit. `f` must not allocate.
fn without_address_space<T>(f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process's own limits; lowering
    // the soft limit and raising it back up to the hard one needs no
    // privilege.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut old), 0);
        let tight = libc::rlimit {
            rlim_cur: 0,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &tight), 0);
    }
    let result = f();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &old), 0) };
    result
}

fn child() {
    // The guard-marker probe of the first pool finds no address space: a
    // typed error, not a guess.
    let err = without_address_space(|| StackPool::new(Config::default()).err());
    match err {
        Some(StackError::MapFailed { errno, .. }) => assert_eq!(errno, libc::ENOMEM),
        other => panic!("expected MapFailed(ENOMEM) from the probe, got {other:?}"),
    }
    // With the limit lifted the probe runs again and finds the kernel's
    // real answer (Linux 6.13+ has guard markers).
    let pool = StackPool::new(Config::default()).expect("a pool once memory is back");
    let markers = StackPool::new(Config {
        guard_mode: GuardMode::GuardMarker,
        ..Config::default()
    });
    assert_eq!(
        markers.is_ok(),
        pool.guard_mode() == GuardMode::GuardMarker,
        "{markers:?}"
    );

    // The populate probe first runs inside `ensure`, under the limit: the
    // scratch mapping fails, yet `ensure` works (populating an existing
    // mapping needs no address space) ...
    let stack = pool.alloc().unwrap();
    let mut co = Coroutine::with_stack(stack, |_: &Yielder<(), ()>, ()| {
        without_address_space(|| ensure(4 * page()).map_err(|e| e.to_string()))
    });
    let ensured = co.resume(()).as_return();
    assert_eq!(ensured, Some(Ok(())));
    drop(co);
    // ... and the probe was not remembered as "unsupported": a
    // `populate_top` pool's fresh stack gets its top page.
    let populated = StackPool::new(Config {
        populate_top: true,
        ..Config::default()
    })
    .unwrap();
    let stack = populated.alloc().unwrap();
    let top_page = stack.base() as usize - page();
    let expected = usize::from(populate_supported());
    assert_eq!(resident_pages(top_page, page()), expected);
    println!("CHILD DONE");
}
