//! `VMTASK_PERCPU_NO_RSEQ=1` forces the try-lock fallback. A test binary of
//! its own, because the default mode is decided once per process.

use std::ptr::NonNull;
use vmtask_percpu::{cache_mode, CacheMode, CpuCache, NO_RSEQ_ENV};

#[test]
fn env_var_forces_try_lock_mode() {
    // The only test in this binary, so no other thread reads the
    // environment while it changes.
    std::env::set_var(NO_RSEQ_ENV, "1");
    assert_eq!(cache_mode(), CacheMode::TryLock);
    let cache = CpuCache::new(4);
    assert_eq!(cache.mode(), CacheMode::TryLock);
    let item = NonNull::<u64>::dangling().cast::<u8>();
    cache.push(item).expect("an empty cache takes a push");
    let mut out = Vec::new();
    let drained: usize = (0..cache.cpus())
        .map(|cpu| cache.drain(cpu, 8, &mut out))
        .sum();
    assert_eq!((drained, out), (1, vec![item]));
}
