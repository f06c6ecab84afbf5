//! Unit tests. They run against the test build of the slab layer, which
//! poisons slabs and replaces them with inaccessible pages instead of
//! unmapping them, so a reader that touches released memory is caught.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{AtomicSlabArc, Config, SlabArc, SlabBox, SlabCache, SlabError};

#[path = "../../../test-support/knobs.rs"]
mod knobs;

const MAGIC: u64 = 0x5eed_cafe_f00d_d00d;

/// A type-stable object: `magic` is set by the constructor only, so any
/// other value means the memory stopped being this object.
#[derive(Debug)]
struct Obj {
    key: AtomicU64,
    magic: AtomicU64,
}

fn obj() -> Obj {
    Obj {
        key: AtomicU64::new(u64::MAX),
        magic: AtomicU64::new(MAGIC),
    }
}

/// Counts constructions and drops of its objects.
struct Tracked {
    drops: Arc<AtomicUsize>,
    value: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Relaxed);
    }
}

fn tracked_cache(config: Config) -> (SlabCache<Tracked>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let built = Arc::new(AtomicUsize::new(0));
    let drops = Arc::new(AtomicUsize::new(0));
    let (b, d) = (built.clone(), drops.clone());
    let cache = SlabCache::new(config, move || {
        b.fetch_add(1, Relaxed);
        Tracked {
            drops: d.clone(),
            value: 0,
        }
    })
    .unwrap();
    (cache, built, drops)
}

/// Runs `f` on a thread pinned to `cpu`.
fn on_cpu<R: Send>(cpu: usize, f: impl FnOnce() -> R + Send) -> R {
    vmtask_percpu::run_on_cpu(cpu, f).unwrap_or_else(|e| panic!("pin to CPU {cpu}: {e}"))
}

/// A CPU this process may run on (a cpuset may exclude CPU 0).
fn home() -> usize {
    vmtask_percpu::allowed_cpus()[0]
}

fn torture_secs() -> Duration {
    knobs::seconds("VMTASK_TORTURE_SECS", 2.0)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn objects_are_constructed_once_per_slab_and_keep_state_across_reuse() {
    let (cache, built, drops) = tracked_cache(Config {
        slab_bytes: 4096,
        ..Config::new("once")
    });
    let per_slab = cache.stats().objects_per_slab;
    on_cpu(home(), || {
        let mut first = cache.alloc().unwrap();
        assert_eq!(
            built.load(Relaxed),
            per_slab,
            "a whole slab is built at once"
        );
        first.value = 77;
        let addr = SlabBox::into_raw(first);
        // SAFETY: from into_raw just above, once.
        drop(unsafe { SlabBox::from_raw(&cache, addr) });
        let again = cache.alloc().unwrap();
        assert_eq!(
            SlabBox::into_raw(again),
            addr,
            "the last freed object is reused first on a CPU"
        );
        // SAFETY: as above.
        let again = unsafe { SlabBox::from_raw(&cache, addr) };
        assert_eq!(again.value, 77, "objects are not rebuilt on reuse");
    });
    assert_eq!(built.load(Relaxed), per_slab);
    assert_eq!(
        drops.load(Relaxed),
        0,
        "objects are never dropped while their slab lives"
    );
    drop(cache);
    assert_eq!(
        drops.load(Relaxed),
        per_slab,
        "dropping the cache drops every object"
    );
}

#[test]
fn cross_cpu_frees_conserve_objects_and_move_magazines_through_the_depot() {
    // Two CPUs this process may run on (a cpuset may allow only one, or
    // not CPU 0 or 1).
    let (home, away) = match vmtask_percpu::allowed_cpus()[..] {
        [a, b, ..] => (a, b),
        _ => {
            eprintln!("SKIPPED cross_cpu_frees_conserve_objects_and_move_magazines_through_the_depot: needs 2 CPUs");
            return;
        }
    };
    let cache = SlabCache::new(
        Config {
            magazine_size: 8,
            ..Config::new("cross")
        },
        obj,
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel::<SlabBox<'_, Obj>>(64);
    std::thread::scope(|s| {
        s.spawn(|| {
            vmtask_percpu::pin_current_thread(home).unwrap();
            for round in 0..20_000u64 {
                let object = cache.alloc().unwrap();
                object.key.store(round, Relaxed);
                tx.send(object).unwrap();
            }
            drop(tx);
        });
        s.spawn(|| {
            vmtask_percpu::pin_current_thread(away).unwrap();
            for (expect, object) in (0u64..).zip(rx) {
                assert_eq!(object.key.load(Relaxed), expect);
                assert_eq!(object.magic.load(Relaxed), MAGIC);
            }
        });
    });
    let stats = cache.stats();
    assert_eq!(stats.objects_in_use, 0, "{stats}");
    assert_eq!(
        stats.objects_free,
        stats.slabs * stats.objects_per_slab,
        "{stats}"
    );
    assert!(
        stats.depot_puts > 0 && stats.depot_gets > 0,
        "frees on CPU 1 must reach CPU 0 through the depot: {stats}"
    );
    assert!(
        stats.slabs <= 2,
        "cross-CPU frees are recycled, not leaked into new slabs: {stats}"
    );
}

#[test]
fn many_threads_never_share_an_object() {
    let cache = SlabCache::new(
        Config {
            magazine_size: 4,
            depot_magazines: 2,
            ..Config::new("owners")
        },
        obj,
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let cache = &cache;
            s.spawn(move || {
                let mut held: Vec<SlabBox<'_, Obj>> = Vec::new();
                for round in 0..20_000u64 {
                    if round % 3 == 2 {
                        if let Some(object) = held.pop() {
                            object.key.store(u64::MAX, Relaxed);
                        }
                    } else {
                        let object = cache.alloc().unwrap();
                        assert_eq!(
                            object.key.swap(t, Relaxed),
                            u64::MAX,
                            "object handed out twice"
                        );
                        held.push(object);
                    }
                    if held.len() > 50 {
                        for object in held.drain(..) {
                            object.key.store(u64::MAX, Relaxed);
                        }
                    }
                }
                for object in held {
                    object.key.store(u64::MAX, Relaxed);
                }
            });
        }
    });
    assert_eq!(cache.stats().objects_in_use, 0);
}

/// Fast-path allocations are counted per thread: exactly, on threads that
/// have exited, and on a thread that uses more caches than its memo holds
/// (collisions, and rows of dropped caches let go).
#[test]
fn allocations_are_counted_exactly_across_threads_and_caches() {
    const PER_THREAD: u64 = 10_000;
    let cache = SlabCache::new(Config::new("counted"), || 0u64).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..PER_THREAD {
                    drop(cache.alloc().unwrap());
                }
            });
        }
    });
    let stats = cache.stats();
    assert_eq!(stats.allocs, 4 * PER_THREAD, "{stats}");
    assert_eq!(stats.frees, 4 * PER_THREAD, "{stats}");
    assert_eq!(stats.magazine_hits + stats.magazine_misses, stats.allocs);

    // More caches than memo entries, some dropped and replaced, used in
    // turn by one thread.
    let mut caches: Vec<_> = (0..20)
        .map(|n| SlabCache::new(Config::new(format!("c{n}")), || 0u64).unwrap())
        .collect();
    for round in 0..3u64 {
        for cache in &caches {
            for _ in 0..=round {
                drop(cache.alloc().unwrap());
            }
        }
        caches.truncate(10);
        caches.extend(
            (0..10).map(|n| SlabCache::new(Config::new(format!("d{n}")), || 0u64).unwrap()),
        );
    }
    let allocs: Vec<u64> = caches.iter().map(|cache| cache.stats().allocs).collect();
    assert_eq!(allocs[..10], [6; 10], "{allocs:?}");
    assert_eq!(allocs[10..], [0; 10], "{allocs:?}");
}

#[test]
fn limit_is_an_error_naming_cache_and_limit() {
    let cache = SlabCache::new(
        Config {
            slab_bytes: 4096,
            max_bytes: 8192,
            magazine_size: 4,
            ..Config::new("tiny")
        },
        obj,
    )
    .unwrap();
    let mut held = Vec::new();
    let error = loop {
        match cache.alloc() {
            Ok(object) => held.push(object),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(
            error,
            SlabError::Limit {
                max_bytes: 8192,
                slabs: 2,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(held.len(), 2 * cache.stats().objects_per_slab);
    let message = error.to_string();
    assert!(
        message.contains("`tiny`")
            && message.contains("8 KiB")
            && message.contains("2 slabs of 4 KiB"),
        "{message}"
    );
    held.pop();
    assert!(
        cache.alloc().is_ok(),
        "a freed object can be allocated again at the limit"
    );
}

#[test]
fn invalid_configs_are_refused_with_the_field_named() {
    let cases = [
        (
            Config {
                magazine_size: 0,
                ..Config::new("c")
            },
            "magazine_size",
        ),
        (
            Config {
                magazine_size: 1 << 30,
                ..Config::new("c")
            },
            "magazine_size",
        ),
        (
            Config {
                magazine_size: usize::MAX / 2,
                ..Config::new("c")
            },
            "magazine_size",
        ),
        (
            Config {
                slab_bytes: 5000,
                ..Config::new("c")
            },
            "slab_bytes",
        ),
        (
            Config {
                max_bytes: 4096,
                ..Config::new("c")
            },
            "max_bytes",
        ),
    ];
    for (config, field) in cases {
        let error = SlabCache::new(config, obj).unwrap_err();
        assert!(
            matches!(error, SlabError::InvalidConfig { field: f, .. } if f == field),
            "{error:?}"
        );
        assert!(error.to_string().contains(field));
    }
    let error = SlabCache::new(
        Config {
            slab_bytes: 4096,
            ..Config::new("big")
        },
        || [0u8; 8192],
    )
    .unwrap_err();
    // The object and its word of slot header.
    let slot = 8192 + std::mem::size_of::<usize>();
    assert!(
        error
            .to_string()
            .contains(&format!("room for one {slot}-byte object")),
        "{error}"
    );
}

#[test]
fn plain_cache_refuses_lookup_cells() {
    let cache = SlabCache::new(Config::new("plain"), obj).unwrap();
    let error = AtomicSlabArc::new(&cache).unwrap_err();
    assert!(matches!(error, SlabError::NotTypesafe { .. }));
    assert!(
        error.to_string().contains("`plain` is not typesafe_by_rcu"),
        "{error}"
    );
}

#[test]
#[should_panic(expected = "passed to free_rcu of cache `b`")]
fn free_rcu_to_another_cache_panics() {
    let a = SlabCache::new(Config::new("a"), obj).unwrap();
    let b = SlabCache::new(Config::new("b"), obj).unwrap();
    b.free_rcu(a.alloc().unwrap());
}

#[test]
fn shrink_returns_empty_slabs_and_drops_their_objects() {
    let (cache, built, drops) = tracked_cache(Config {
        slab_bytes: 4096,
        ..Config::new("shrink")
    });
    let held: Vec<_> = (0..1000).map(|_| cache.alloc().unwrap()).collect();
    let slabs = cache.stats().slabs;
    assert!(slabs > 1);
    assert_eq!(
        cache.shrink(),
        0,
        "no slab is empty while every object is held"
    );
    drop(held);
    assert_eq!(cache.shrink(), slabs * 4096);
    let stats = cache.stats();
    assert_eq!(
        (stats.slabs, stats.resident_bytes, stats.objects_free),
        (0, 0, 0),
        "{stats}"
    );
    assert_eq!(drops.load(Relaxed), built.load(Relaxed));
    assert!(cache.alloc().is_ok(), "a shrunk cache grows again");
}

#[test]
fn constructor_panic_leaves_the_cache_usable() {
    let fail = Arc::new(AtomicBool::new(true));
    let f = fail.clone();
    let cache = SlabCache::new(Config::new("ctor"), move || {
        assert!(!f.swap(false, Relaxed), "constructor failed once");
        obj()
    })
    .unwrap();
    let result = catch_unwind(AssertUnwindSafe(|| cache.alloc().map(drop)));
    assert!(
        result.is_err(),
        "the constructor's panic reaches the allocating caller"
    );
    assert_eq!(cache.stats().slabs, 0, "the half-built slab is released");
    assert!(cache.alloc().is_ok());
}

#[test]
fn free_rcu_objects_wait_for_readers_then_return_as_a_magazine() {
    let cache = SlabCache::new(
        Config {
            magazine_size: 8,
            ..Config::new("rcu")
        },
        obj,
    )
    .unwrap();
    on_cpu(home(), || {
        let objects: Vec<_> = (0..9).map(|_| cache.alloc().unwrap()).collect();
        let addrs: Vec<*const Obj> = objects.iter().map(|o| &**o as *const Obj).collect();
        let guard = vmtask_rcu::read_lock();
        for object in objects {
            cache.free_rcu(object);
        }
        let stats = cache.stats();
        assert_eq!(
            stats.rcu_magazines, 1,
            "the free that finds the RCU magazine full submits it: {stats}"
        );
        assert_eq!(stats.rcu_objects_waiting, 9, "{stats}");
        assert_eq!(stats.objects_in_use, 9, "{stats}");
        std::thread::sleep(Duration::from_millis(50));
        let fresh: Vec<_> = (0..64).map(|_| cache.alloc().unwrap()).collect();
        for object in &fresh {
            assert!(
                !addrs.contains(&(&**object as *const Obj)),
                "object reused before the grace period"
            );
        }
        drop(guard);
        drop(fresh);
    });
    vmtask_rcu::barrier();
    let stats = cache.stats();
    assert_eq!(stats.rcu_magazines_in_flight, 0, "{stats}");
    assert_eq!(
        stats.rcu_objects_waiting, 1,
        "the ninth object waits for its magazine to fill: {stats}"
    );
    assert_eq!(stats.objects_in_use, 1, "{stats}");
    assert_eq!((stats.rcu_frees, stats.frees), (9, 64), "{stats}");
    cache.flush_rcu();
    vmtask_rcu::barrier();
    let stats = cache.stats();
    assert_eq!(
        (stats.objects_in_use, stats.rcu_objects_waiting),
        (0, 0),
        "{stats}"
    );
}

#[test]
fn rcu_magazine_returns_to_the_depot_whole() {
    let cache = SlabCache::new(
        Config {
            magazine_size: 8,
            ..Config::new("whole")
        },
        obj,
    )
    .unwrap();
    let stats_before = cache.stats();
    // On one CPU: a thread that migrates between the frees splits them
    // over two CPUs' RCU magazines, which flush_rcu submits as two.
    on_cpu(vmtask_percpu::cpu(), || {
        let objects: Vec<_> = (0..8).map(|_| cache.alloc().unwrap()).collect();
        for object in objects {
            cache.free_rcu(object);
        }
    });
    cache.flush_rcu();
    vmtask_rcu::barrier();
    let stats = cache.stats();
    assert_eq!(stats.depot_puts - stats_before.depot_puts, 1, "{stats}");
    assert_eq!(
        stats.slab_objects_in, 0,
        "no object went back to a slab one by one: {stats}"
    );
}

#[test]
fn depot_bound_sends_overflow_to_slabs_but_keeps_rcu_magazines_whole() {
    let config = Config {
        magazine_size: 4,
        depot_magazines: 1,
        ..Config::new("bound")
    };
    let cache = SlabCache::new(config, obj).unwrap();
    on_cpu(home(), || {
        let objects: Vec<_> = (0..40).map(|_| cache.alloc().unwrap()).collect();
        drop(objects);
        let stats = cache.stats();
        assert_eq!(
            stats.depot_magazines, 1,
            "the depot stops at its bound: {stats}"
        );
        assert!(
            stats.slab_objects_in >= 40 - 4 - 4,
            "overflow went back to the slabs: {stats}"
        );

        let objects: Vec<_> = (0..40).map(|_| cache.alloc().unwrap()).collect();
        for object in objects {
            cache.free_rcu(object);
        }
    });
    cache.flush_rcu();
    vmtask_rcu::barrier();
    let stats = cache.stats();
    assert!(
        stats.depot_magazines >= 10,
        "RCU magazines come back whole past the bound: {stats}"
    );
}

#[test]
fn shared_objects_are_freed_by_the_last_reference() {
    let cache = SlabCache::new(
        Config {
            typesafe_by_rcu: true,
            ..Config::new("arc")
        },
        obj,
    )
    .unwrap();
    let a = cache.alloc_shared().unwrap();
    let b = a.clone();
    assert!(SlabArc::ptr_eq(&a, &b));
    let a = SlabArc::try_unwrap(a).expect_err("two references");
    drop(b);
    assert_eq!(cache.stats().objects_in_use, 1);
    let Ok(unique) = SlabArc::try_unwrap(a) else {
        panic!("the only reference must unwrap")
    };
    assert_eq!(cache.stats().objects_in_use, 1);
    let cell = AtomicSlabArc::new(&cache).unwrap();
    cell.store(Some(SlabBox::into_shared(unique)));
    let guard = vmtask_rcu::read_lock();
    let found = cell.load(&guard).unwrap();
    let held = cache.try_get(found, &guard).expect("stored object is live");
    drop(cell.swap(None));
    assert_eq!(cache.stats().objects_in_use, 1, "our reference keeps it");
    drop(held);
    assert_eq!(cache.stats().objects_in_use, 0);
    assert!(
        cache.try_get(found, &guard).is_none(),
        "no reference to a freed object"
    );
    drop(guard);
}

#[test]
fn typesafe_shrink_keeps_memory_until_readers_leave() {
    let cache = SlabCache::new(
        Config {
            typesafe_by_rcu: true,
            slab_bytes: 4096,
            ..Config::new("stable")
        },
        obj,
    )
    .unwrap();
    let cell = AtomicSlabArc::new(&cache).unwrap();
    cell.store(Some(cache.alloc_shared().unwrap()));
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    let (freed_tx, freed_rx) = std::sync::mpsc::channel::<()>();
    let (cell, cache) = (&cell, &cache);
    std::thread::scope(|s| {
        s.spawn(move || {
            let guard = vmtask_rcu::read_lock();
            let found = cell.load(&guard).unwrap();
            found_tx.send(()).unwrap();
            freed_rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            // The object was freed and its slab shrunk; try_get refuses it.
            assert!(cache.try_get(found, &guard).is_none());
            // A reader may not read the value of an object it holds no
            // reference to: in general a new owner may be writing it. Here
            // nobody can own it: no thread allocates from this cache (the
            // main thread only frees and shrinks it), and `shrink` took the
            // object's slab out of the cache before `freed` was sent.
            // Why this holds: the slab's objects are dropped and its memory
            // released only a grace period after `shrink`, which our guard
            // (held since the object was in the cell) holds off; until then
            // the slot holds the unowned, constructed Obj, which nobody
            // writes.
            // SAFETY: the slab outlives our guard and nobody writes the slot (above).
            let magic = unsafe { found.as_ptr().as_ref() }.magic.load(Relaxed);
            assert_eq!(magic, MAGIC, "slab memory released under a reader");
        });
        found_rx.recv().unwrap();
        cell.store(None);
        assert_eq!(cache.shrink(), 4096);
        freed_tx.send(()).unwrap();
    });
    vmtask_rcu::barrier();
    assert_eq!(cache.stats().slabs, 0);
}

/// The type-stable lookup torture: readers look keys up while writers
/// replace, free and reuse objects for other keys and shrink the cache.
/// Runs 2 s; `VMTASK_TORTURE_SECS=60` runs longer.
#[test]
fn typesafe_lookup_torture_never_returns_a_wrong_key_or_released_memory() {
    const BUCKETS: u64 = 128;
    let config = Config {
        typesafe_by_rcu: true,
        slab_bytes: 4096,
        magazine_size: 8,
        ..Config::new("torture")
    };
    let cache = SlabCache::new(config, obj).unwrap();
    let table: Vec<AtomicSlabArc<'_, Obj>> = (0..BUCKETS)
        .map(|_| AtomicSlabArc::new(&cache).unwrap())
        .collect();
    let stop = AtomicBool::new(false);
    let (found, reused, vanished, shrunk) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicUsize::new(0),
    );

    // Bucket `i` holds keys i, i + BUCKETS, i + 2 BUCKETS, ...
    let lookup = |bucket: u64| -> Option<(SlabArc<'_, Obj>, u64)> {
        loop {
            let guard = vmtask_rcu::read_lock();
            let ptr = table[bucket as usize].load(&guard)?;
            let Some(object) = cache.try_get(ptr, &guard) else {
                vanished.fetch_add(1, Relaxed);
                continue;
            };
            assert_eq!(
                object.magic.load(Relaxed),
                MAGIC,
                "a reader reached memory that left the slab"
            );
            let key = object.key.load(Relaxed);
            if key % BUCKETS != bucket {
                reused.fetch_add(1, Relaxed);
                continue;
            }
            return Some((object, key));
        }
    };

    std::thread::scope(|s| {
        for reader in 0..2u64 {
            let lookup = &lookup;
            let (found, stop) = (&found, &stop);
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ reader);
                while !stop.load(Relaxed) {
                    for _ in 0..256 {
                        let bucket = rng.next() % BUCKETS;
                        if let Some((object, key)) = lookup(bucket) {
                            found.fetch_add(1, Relaxed);
                            std::hint::spin_loop();
                            // Holding a reference pins the key: a writer
                            // can only reuse the object after our put.
                            assert_eq!(
                                object.key.load(Relaxed),
                                key,
                                "key changed under a held reference"
                            );
                            assert_eq!(object.magic.load(Relaxed), MAGIC);
                        }
                    }
                }
            });
        }
        for writer in 0..2u64 {
            let (cache, table, shrunk, stop) = (&cache, &table, &shrunk, &stop);
            s.spawn(move || {
                let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ writer);
                let mut generation = 0u64;
                while !stop.load(Relaxed) {
                    for _ in 0..1024 {
                        let bucket = rng.next() % BUCKETS;
                        if rng.next() % 8 == 0 {
                            table[bucket as usize].store(None);
                            continue;
                        }
                        generation += 1;
                        let object = cache.alloc().unwrap();
                        assert_eq!(object.magic.load(Relaxed), MAGIC);
                        object
                            .key
                            .store(bucket + BUCKETS * (2 * generation + writer), Relaxed);
                        table[bucket as usize].store(Some(SlabBox::into_shared(object)));
                    }
                    if writer == 0 {
                        // Empty the table so whole slabs free up under the
                        // readers, and give them back.
                        for cell in table.iter() {
                            cell.store(None);
                        }
                        shrunk.fetch_add(cache.shrink(), Relaxed);
                    }
                }
            });
        }
        // The run's time, and on (for at most 30 s more) until readers and
        // the shrinking writer have made progress: new threads may wait
        // long for a CPU on a loaded machine.
        let (start, secs) = (Instant::now(), torture_secs());
        while start.elapsed() < secs
            || ((found.load(Relaxed) <= 1000 || shrunk.load(Relaxed) == 0)
                && start.elapsed() < secs + Duration::from_secs(30))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Relaxed);
    });
    drop(table);
    let (found, reused, vanished) = (
        found.into_inner(),
        reused.into_inner(),
        vanished.into_inner(),
    );
    eprintln!(
        "torture: {found} lookups found their key, {reused} found a reused object and retried, \
         {vanished} lost the object before try_get, {} bytes shrunk\n{}",
        shrunk.load(Relaxed),
        cache.stats()
    );
    assert!(found > 1000, "readers made progress");
    assert!(
        shrunk.load(Relaxed) > 0,
        "slabs went back to the system under the readers"
    );
}

/// Dropping a cache must wait for RCU; inside a read-side section it cannot,
/// and must leak the cache rather than free memory that RCU magazines in
/// flight, or readers of a type-stable cache, still point at.
#[test]
fn cache_dropped_inside_a_read_section_is_leaked_not_freed() {
    for typesafe in [false, true] {
        let (cache, built, drops) = tracked_cache(Config {
            typesafe_by_rcu: typesafe,
            ..Config::new("dropped-reading")
        });
        let object = cache.alloc().unwrap();
        // The section from before the free: other tests' grace periods
        // would otherwise let the magazine land before the count is read.
        let guard = vmtask_rcu::read_lock();
        if typesafe {
            drop(object);
        } else {
            cache.free_rcu(object);
            cache.flush_rcu();
            assert_eq!(cache.stats().rcu_magazines_in_flight, 1);
        }
        let dropped = catch_unwind(AssertUnwindSafe(move || drop(cache)));
        drop(guard);
        assert!(dropped.is_ok(), "typesafe {typesafe}: drop must not panic");
        assert!(built.load(Relaxed) > 0);
        assert_eq!(
            drops.load(Relaxed),
            0,
            "typesafe {typesafe}: objects freed with no grace period"
        );
        // The magazine in flight lands in the leaked cache, not in freed
        // memory.
        vmtask_rcu::barrier();
    }
}

/// An RCU callback cannot wait for other callbacks (`barrier` would wait
/// for itself), so a cache dropped there is leaked too.
#[test]
fn cache_dropped_by_an_rcu_callback_is_leaked_not_freed() {
    let (cache, _built, drops) = tracked_cache(Config::new("dropped-in-callback"));
    cache.free_rcu(cache.alloc().unwrap());
    cache.flush_rcu();
    let returned = Arc::new(AtomicBool::new(false));
    let done = returned.clone();
    vmtask_rcu::call(move || {
        drop(cache);
        done.store(true, Relaxed);
    });
    vmtask_rcu::barrier();
    assert!(
        returned.load(Relaxed),
        "dropping the cache panicked on the callback thread"
    );
    assert_eq!(drops.load(Relaxed), 0, "objects freed with no barrier");
}

/// Every object is dropped by the time its cache is, also when a
/// type-stable cache's `shrink` queued slabs for release after a grace
/// period just before the drop (an audit found them dropped later, on the
/// RCU callback thread, or never if the process exited first).
#[test]
fn a_dropped_type_stable_cache_has_dropped_the_objects_it_shrank() {
    let (cache, built, drops) = tracked_cache(Config {
        typesafe_by_rcu: true,
        slab_bytes: 4096,
        ..Config::new("shrunk-then-dropped")
    });
    let objects: Vec<_> = (0..200).map(|_| cache.alloc().unwrap()).collect();
    drop(objects);
    assert!(cache.shrink() > 0, "whole slabs were free");
    drop(cache);
    assert_eq!(drops.load(Relaxed), built.load(Relaxed));
}
