//! A process that locks its memory (`mlockall`, common in latency-bound
//! programs): the kernel refuses guard markers on locked mappings with the
//! `EINVAL` of a kernel without them. Each test runs in a child process,
//! which may lock its memory without touching the test harness.

mod common;

use common::{in_child, run_child};
use vmtask_stack::{Config, GuardMode, StackPool};

const LOCK_FLAGS: libc::c_int = libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT;

/// Locks the process's memory; false (and a note) where that is refused.
fn lock_all() -> bool {
    // SAFETY: mlockall only changes how this process's pages are kept.
    let ok = unsafe { libc::mlockall(LOCK_FLAGS) } == 0;
    if !ok {
        println!(
            "mlockall refused ({}): nothing to check",
            std::io::Error::last_os_error()
        );
    }
    ok
}

fn small() -> Config {
    Config {
        stack_size: 16 * 1024,
        max_stacks: 100,
        ..Config::default()
    }
}

/// Allocates every stack of `pool`, writing the top and bottom byte of
/// each, then frees them: the arena's guards were made one way or another.
fn use_every_stack(pool: &StackPool) {
    let stacks: Vec<_> = (0..100)
        .map(|i| pool.alloc().unwrap_or_else(|e| panic!("stack {i}: {e}")))
        .collect();
    for stack in &stacks {
        // SAFETY: both bytes lie inside the usable stack.
        unsafe {
            stack.base().sub(1).write_volatile(1);
            stack.limit().write_volatile(1);
        }
    }
}

fn finish(out: std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CHILD DONE"), "{stdout}\n{stderr}");
    print!("{stdout}");
}

/// A pool made (and its markers probed) before the process locked its
/// memory carves the rest of its stacks with `mprotect` guards.
#[test]
fn a_marker_pool_keeps_carving_after_mlockall() {
    const NAME: &str = "a_marker_pool_keeps_carving_after_mlockall";
    if !in_child() {
        return finish(run_child(NAME));
    }
    let pool = StackPool::new(small()).unwrap();
    if pool.guard_mode() == GuardMode::GuardMarker {
        // A first batch of markers, before the lock.
        drop(pool.alloc().unwrap());
        let before = pool.stats().mappings;
        if lock_all() {
            let stacks: Vec<_> = (0..99).map(|_| pool.alloc().unwrap()).collect();
            drop(stacks);
            assert!(
                pool.stats().mappings > before,
                "mprotect guards split the locked arena: {} mappings",
                pool.stats().mappings
            );
            use_every_stack(&pool);
        }
    } else {
        println!("no guard markers on this kernel: nothing to check");
    }
    println!("CHILD DONE");
}

/// A process locked before its first pool: the probe answers for the
/// kernel, not for the lock, so `GuardMarker` is still accepted where the
/// kernel has markers, and its locked arena takes `mprotect` guards.
#[test]
fn the_marker_probe_sees_through_mlockall() {
    const NAME: &str = "the_marker_probe_sees_through_mlockall";
    if !in_child() {
        return finish(run_child(NAME));
    }
    if lock_all() {
        let kernel_has_markers = {
            // SAFETY: a scratch mapping of our own, unlocked before the
            // probe, unmapped after it.
            unsafe {
                let page = common::page();
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    2 * page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                libc::munlock(p, 2 * page);
                const MADV_GUARD_INSTALL: libc::c_int = 102;
                let ok = libc::madvise(p, page, MADV_GUARD_INSTALL) == 0;
                libc::munmap(p, 2 * page);
                ok
            }
        };
        let pool = StackPool::new(Config {
            guard_mode: GuardMode::GuardMarker,
            ..small()
        });
        if kernel_has_markers {
            let pool = pool.expect("the kernel has guard markers");
            assert_eq!(pool.guard_mode(), GuardMode::GuardMarker);
            use_every_stack(&pool);
        } else {
            assert!(pool.is_err(), "no markers on this kernel");
        }
        let auto = StackPool::new(small()).unwrap();
        use_every_stack(&auto);
    }
    println!("CHILD DONE");
}
