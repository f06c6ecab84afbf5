//! The backlog bound: queuing faster than callbacks can run is throttled,
//! and memory stays bounded.
//!
//! Alone in its binary on purpose: the peak resident size (VmHWM) is a
//! process-wide figure, and a panicking test elsewhere in the binary would
//! load debug info for its backtrace (tens of MiB).

use std::sync::atomic::{AtomicU64, Ordering};

#[path = "../../../test-support/knobs.rs"]
mod knobs;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// 50 million `defer_drop`s of a boxed u64 from 2 threads stay under 64 MiB
/// resident (VmHWM, the peak) — crossbeam-epoch's garbage can grow without
/// bound in the same loop.
#[test]
fn fifty_million_deferred_drops_stay_under_64_mib() {
    let total: u64 = knobs::knob(
        "VMTASK_BACKLOG_OBJECTS",
        50_000_000,
        "a whole number of objects, at least 2",
    );
    assert!(
        total >= 2,
        "VMTASK_BACKLOG_OBJECTS={total}: expected at least 2 (the objects are split between 2 threads)"
    );
    // Count frees without an Arc clone per object: a static counter.
    static FREED: AtomicU64 = AtomicU64::new(0);
    struct Obj(#[allow(dead_code)] u64);
    impl Drop for Obj {
        fn drop(&mut self) {
            FREED.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Ok(limits) = std::env::var("VMTASK_TEST_LIMITS") {
        let parsed = limits
            .split_once(',')
            .and_then(|(soft, hard)| Some((soft.parse().ok()?, hard.parse().ok()?)));
        let Some((soft, hard)) = parsed else {
            panic!("VMTASK_TEST_LIMITS={limits:?}: expected two numbers, soft,hard");
        };
        vmtask_rcu::set_backlog_limits(soft, hard);
    }
    let threads: Vec<_> = (0..2)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..total / 2 {
                    vmtask_rcu::defer_drop(Box::new(Obj(i ^ t)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    vmtask_rcu::barrier();
    let hwm = status_kib("VmHWM:");
    let stats = vmtask_rcu::stats();
    eprintln!("{stats}\nVmHWM {hwm} KiB");
    assert_eq!(FREED.load(Ordering::Relaxed), total / 2 * 2);
    assert!(hwm < 64 * 1024, "peak resident {hwm} KiB exceeds 64 MiB");
    let (_, hard) = vmtask_rcu::backlog_limits();
    // Checks run every 256 queued per CPU, so the bound is hard + a little.
    assert!(
        stats.backlog_high_water <= (hard + 4096 * 2) as u64,
        "backlog reached {} past the hard limit {hard}",
        stats.backlog_high_water
    );
}
