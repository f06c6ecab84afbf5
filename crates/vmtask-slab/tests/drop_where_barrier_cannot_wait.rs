//! A cache dropped where `vmtask_rcu::barrier` cannot wait (an RCU callback,
//! a drop run by `defer_drop`) is documented to be leaked with a message.
//! It must get there without panicking (review finding: it called
//! `barrier`, let it panic and caught the panic, which aborts the process
//! under `panic = "abort"` or a panic hook that aborts, as many services
//! install). The hook below counts panics instead of aborting.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use vmtask_slab::{Config, SlabCache};

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn cache_with_magazine_in_flight(name: &str) -> SlabCache<u64> {
    let cache = SlabCache::new(Config::new(name), || 0u64).unwrap();
    // No grace period may end before the count is read.
    let guard = vmtask_rcu::read_lock();
    cache.free_rcu(cache.alloc().unwrap());
    cache.flush_rcu();
    assert_eq!(cache.stats().rcu_magazines_in_flight, 1);
    drop(guard);
    cache
}

#[test]
fn dropping_a_cache_where_barrier_cannot_wait_does_not_panic() {
    std::panic::set_hook(Box::new(|_| {
        PANICS.fetch_add(1, Relaxed);
    }));
    // From an RCU callback.
    let cache = cache_with_magazine_in_flight("dropped-in-callback");
    vmtask_rcu::call(move || drop(cache));
    vmtask_rcu::barrier();
    // From a deferred drop (run by the callback thread after the barrier
    // hands this thread's bag over, or by a later defer_drop).
    let cache = cache_with_magazine_in_flight("dropped-deferred");
    vmtask_rcu::defer_drop(Box::new(cache));
    vmtask_rcu::barrier();
    // A type-stable cache with no magazine in flight only needs a grace
    // period (`synchronize`), which a callback may wait for: freed there.
    let typesafe = SlabCache::new(
        Config {
            typesafe_by_rcu: true,
            ..Config::new("typesafe-in-callback")
        },
        || 0u64,
    )
    .unwrap();
    drop(typesafe.alloc().unwrap());
    vmtask_rcu::call(move || drop(typesafe));
    vmtask_rcu::barrier();
    let _ = std::panic::take_hook();
    assert_eq!(
        PANICS.load(Relaxed),
        0,
        "SlabCache::drop panicked (caught) on its way to leaking the cache; \
         under panic = \"abort\" that is a process abort"
    );
}
