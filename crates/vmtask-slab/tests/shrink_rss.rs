//! `shrink` gives memory back to the system: `VmRSS` drops. One test in its
//! own process, so no other test's allocations blur the measurement.

use vmtask_slab::{Config, SlabCache};

const MIB: usize = 1 << 20;

fn vm_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// Fills 32 MiB of objects, frees them, shrinks, and checks `VmRSS`.
fn fill_free_shrink(cache: &SlabCache<[u8; 1024]>, after_shrink: impl FnOnce()) {
    let before = vm_rss();
    let held: Vec<_> = (0..32 * 1024).map(|_| cache.alloc().unwrap()).collect();
    let grown = vm_rss();
    assert!(
        grown >= before + 30 * MIB,
        "constructing 32 MiB of objects grew VmRSS by only {} KiB",
        (grown - before) / 1024
    );
    drop(held);
    let released = cache.shrink();
    assert!(
        released >= 32 * MIB,
        "{released} bytes released\n{}",
        cache.stats()
    );
    after_shrink();
    let after = vm_rss();
    assert!(
        grown.saturating_sub(after) >= released * 9 / 10,
        "shrink released {} KiB but VmRSS fell by only {} KiB",
        released / 1024,
        grown.saturating_sub(after) / 1024
    );
    assert_eq!(cache.stats().resident_bytes, 0);
}

#[test]
fn shrink_returns_memory_to_the_system() {
    let plain = SlabCache::new(Config::new("rss-plain"), || [0u8; 1024]).unwrap();
    fill_free_shrink(&plain, || {});

    // Type-stable: the memory goes back one grace period later.
    let stable = SlabCache::new(
        Config {
            typesafe_by_rcu: true,
            ..Config::new("rss-typesafe")
        },
        || [0u8; 1024],
    )
    .unwrap();
    fill_free_shrink(&stable, vmtask_rcu::barrier);
}
