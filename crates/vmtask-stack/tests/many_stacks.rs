//! 200,000 live stacks from one pool add only their arenas to
//! `/proc/self/maps` when guard markers are in use. In its own test binary
//! so no other test maps memory meanwhile.

use vmtask_stack::{Config, GuardMode, StackPool};

mod common;
use common::maps_lines as mappings;

#[test]
fn live_stacks_add_no_mappings_with_guard_markers() {
    if usize::BITS != 64 {
        eprintln!("skipped: 200,000 default stacks need 26 GB of address space");
        return;
    }
    let pool = StackPool::new(Config::default()).unwrap();
    if pool.guard_mode() != GuardMode::GuardMarker {
        eprintln!("skipped: kernel lacks MADV_GUARD_INSTALL, guards use mprotect");
        return;
    }
    let count = 200_000;
    let mut stacks = Vec::with_capacity(count);
    let before = mappings();
    for _ in 0..count {
        stacks.push(pool.alloc().unwrap());
    }
    let after = mappings();
    let stats = pool.stats();
    assert_eq!(stats.live, count as u64);
    assert!(stats.arenas <= 12, "arenas grow geometrically: {stats}");
    assert!(
        after <= before + stats.arenas,
        "{before} mappings grew to {after} for {} arenas",
        stats.arenas
    );
    // Every slot is distinct and guarded right below its limit.
    let last = stacks.last().unwrap();
    assert_eq!(last.guard_range().end, last.limit());
    drop(stacks);
    assert_eq!(pool.stats().live, 0);
}
