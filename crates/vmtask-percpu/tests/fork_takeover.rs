//! A fork while other threads push, pop and drain a `CpuCache`: the
//! child, which has only the forking thread, can use every CPU's area.
//! Before the fork-generation marks, an area a try-lock push or pop (or a
//! drain, in either mode) held at the fork stayed held in the child, whose
//! drains of that CPU then spun forever.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmtask_percpu::{CacheMode, CpuCache};

fn ptr(n: usize) -> NonNull<u8> {
    NonNull::new((n * 16) as *mut u8).unwrap()
}

/// In the child: drains every CPU, then pushes, pops and drains on this
/// one; exits 0, or is killed by the alarm if an area stays held.
fn child_uses(cache: &CpuCache) -> ! {
    // SAFETY: alarm only arms a timer; a hang kills the child.
    unsafe { libc::alarm(10) };
    // One CPU from here on, so the counts below are of one area.
    let here = vmtask_percpu::cpu();
    let pinned = vmtask_percpu::pin_current_thread(here).is_ok();
    let mut out = Vec::new();
    for cpu in 0..cache.cpus() {
        cache.drain(cpu, usize::MAX, &mut out);
    }
    let mut ok = true;
    for i in 1..=cache.capacity() {
        ok &= cache.push(ptr(i)).is_ok();
    }
    ok &= cache.pop().is_some();
    ok &= !pinned || cache.drain(here, usize::MAX, &mut out) == cache.capacity() - 1;
    // SAFETY: leaves the child without running the parent's destructors
    // or the test harness.
    unsafe { libc::_exit(if ok { 0 } else { 3 }) }
}

fn forks_while_busy(mode: CacheMode) {
    let cache = CpuCache::with_mode(8, mode);
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(2);
    let (forks, failed) = std::thread::scope(|s| {
        for t in 0..2 {
            let (cache, stop) = (&cache, &stop);
            s.spawn(move || {
                let mut n = 1 + t * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    if cache.push(ptr(n)).is_err() {
                        let _ = cache.pop();
                    }
                    let _ = cache.pop();
                }
            });
        }
        s.spawn(|| {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for cpu in 0..cache.cpus() {
                    cache.drain(cpu, usize::MAX, &mut out);
                }
                out.clear();
            }
        });
        let mut forks = 0;
        let mut failed = None;
        while forks < 300 && Instant::now() < deadline {
            // SAFETY: the child runs `child_uses`, which ends in `_exit`.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                child_uses(&cache);
            }
            forks += 1;
            let mut status = 0;
            // SAFETY: reaping our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                failed = Some(status);
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        (forks, failed)
    });
    assert_eq!(
        failed,
        None,
        "{mode:?}, fork {forks}: the child hung or failed (wait status {failed:?}; 14 = SIGALRM, a hang)"
    );
    assert!(forks >= 20, "only {forks} forks in 2 s");
}

#[test]
fn a_try_lock_cache_survives_forks_while_busy() {
    forks_while_busy(CacheMode::TryLock);
}

#[test]
fn an_rseq_cache_survives_forks_while_draining() {
    // `with_mode` falls back to try-lock where rseq is unsupported.
    forks_while_busy(CacheMode::Rseq);
}
