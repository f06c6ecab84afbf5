//! A fork while other threads push, pop and drain a `CpuCache`: the
//! child, which has only the forking thread, can use every CPU's area.
//! Before the fork-generation marks, an area a try-lock push or pop (or a
//! drain, in either mode) held at the fork stayed held in the child, whose
//! drains of that CPU then spun forever.

mod forking;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use vmtask_percpu::{CacheMode, CpuCache};

fn ptr(n: usize) -> NonNull<u8> {
    NonNull::new((n * 16) as *mut u8).unwrap()
}

/// In the child: drains every CPU, then pushes, pops and drains on this
/// one; 0 if all worked (an area that stays held hangs it: the alarm).
fn child_uses(cache: &CpuCache) -> i32 {
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
    if pinned {
        ok &= cache.drain(here, usize::MAX, &mut out) == cache.capacity() - 1;
    } else {
        eprintln!("fork child: could not pin to CPU {here}; the drain count is not checked");
    }
    if ok {
        0
    } else {
        3
    }
}

fn forks_while_busy(mode: CacheMode) {
    let cache = CpuCache::with_mode(8, mode);
    let stop = AtomicBool::new(false);
    let forked = std::thread::scope(|s| {
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
        let forked =
            forking::fork_repeatedly(&format!("{mode:?}"), 300, Duration::from_secs(2), || {
                child_uses(&cache)
            });
        stop.store(true, Ordering::Relaxed);
        forked
    });
    forked.unwrap_or_else(|e| panic!("{e}"));
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
