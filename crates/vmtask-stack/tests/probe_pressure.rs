//! A kernel-feature probe that fails for want of address space is not
//! remembered: a moment of memory pressure at first use must not turn
//! guard markers or `MADV_POPULATE_WRITE` off for the life of the process.
//! Checked in a child process (this test binary re-run on itself), which
//! lowers its own `RLIMIT_AS` soft limit around the first probes and
//! raises it back.

use corosensei::{Coroutine, Yielder};
use vmtask_stack::{ensure, Config, GuardMode, StackError, StackPool};

mod common;
use common::{page, populate_supported, rerun_in_child, resident_pages, with_zero_soft_limit};

const CHILD: &str = "VMTASK_STACK_PROBE_CHILD";

#[test]
fn probes_that_fail_for_want_of_memory_run_again() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    rerun_in_child("probes_that_fail_for_want_of_memory_run_again", CHILD);
}

fn child() {
    // The guard-marker probe of the first pool finds no address space: a
    // typed error, not a guess.
    let err = with_zero_soft_limit(libc::RLIMIT_AS, || StackPool::new(Config::default()).err());
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
        with_zero_soft_limit(libc::RLIMIT_AS, || {
            ensure(4 * page()).map_err(|e| e.to_string())
        })
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
