//! Slab benchmarks, each side by side with its peer in one run:
//!
//! - `alloc_free_64B`: `alloc` + drop of a 64-byte object against
//!   `Box::new` + drop with the system allocator, and against its floor,
//!   a `CpuCache` pop + push.
//! - `rcu_churn`: allocate and free after a grace period on both CPUs,
//!   through `free_rcu` (RCU magazines) against one `vmtask_rcu::call` per
//!   object into the same kind of cache; time per object, and the hit rates
//!   printed after the group.
//! - `typesafe_lookup`: read_lock, find, try_get, re-check the key, put; on
//!   one CPU, with and without a writer replacing objects on the other CPU.
//!
//! `CARGO_TARGET_DIR=... cargo bench -p vmtask-slab --bench slab`
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use vmtask_slab::{AtomicSlabArc, Config, SlabBox, SlabCache, SlabStats};

/// The 64-byte object.
#[derive(Clone, Copy)]
struct Obj64([u64; 8]);

fn pin(cpu: usize) {
    // Best effort: on a one-CPU machine the second pin fails and threads
    // share the CPU.
    let _ = vmtask_percpu::pin_current_thread(cpu % vmtask_percpu::possible_cpus());
}

fn alloc_free(c: &mut Criterion) {
    pin(0);
    let cache = SlabCache::new(Config::new("bench64"), || Obj64([0; 8])).unwrap();
    let mut g = c.benchmark_group("alloc_free_64B");
    g.bench_function("slab alloc+drop", |b| {
        b.iter(|| {
            let object = cache.alloc().unwrap();
            black_box(&*object);
        })
    });
    g.bench_function("Box::new+drop (peer)", |b| {
        b.iter(|| {
            let object = Box::new(Obj64([0; 8]));
            black_box(&*object);
        })
    });
    // The floor: what the slab's fast path is built on, one pop and one
    // push of the same pointer on the current CPU's magazine, as in
    // alloc+drop.
    let magazine = vmtask_percpu::CpuCache::new(32);
    let floor = Box::leak(Box::new(Obj64([0; 8])));
    magazine.push(NonNull::from(floor).cast()).unwrap();
    g.bench_function("CpuCache pop+push (floor)", |b| {
        b.iter(|| {
            let object = magazine.pop().unwrap();
            black_box(object);
            magazine.push(object).unwrap();
        })
    });
    g.finish();
    eprintln!("{}", cache.stats());
}

type Churn = fn(&'static SlabCache<Obj64>, u64);

fn churn_magazines(cache: &'static SlabCache<Obj64>, objects: u64) {
    for n in 0..objects {
        let mut object = cache.alloc().unwrap();
        object.0[0] = n;
        cache.free_rcu(object);
    }
}

fn churn_per_object(cache: &'static SlabCache<Obj64>, objects: u64) {
    for n in 0..objects {
        let mut object = cache.alloc().unwrap();
        object.0[0] = n;
        vmtask_rcu::call(move || drop(object));
    }
}

/// `objects` allocations and deferred frees on each of two CPUs, until every
/// deferred free has landed.
fn run_churn(cache: &'static SlabCache<Obj64>, churn: Churn, objects: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for cpu in 0..2 {
            s.spawn(move || {
                pin(cpu);
                churn(cache, objects);
            });
        }
    });
    vmtask_rcu::barrier();
    start.elapsed()
}

fn delta(after: &SlabStats, before: &SlabStats) -> (u64, f64, f64) {
    let allocs = after.allocs - before.allocs;
    let hits = after.magazine_hits - before.magazine_hits;
    let from_slabs = after.slab_objects_out - before.slab_objects_out;
    let ratio = |n: u64| n as f64 / allocs.max(1) as f64;
    (allocs, ratio(hits), 1.0 - ratio(from_slabs.min(allocs)))
}

fn rcu_churn(c: &mut Criterion) {
    let magazines: &'static SlabCache<Obj64> = Box::leak(Box::new(
        SlabCache::new(Config::new("rcu-magazines"), || Obj64([0; 8])).unwrap(),
    ));
    let per_object: &'static SlabCache<Obj64> = Box::leak(Box::new(
        SlabCache::new(Config::new("per-object-callback"), || Obj64([0; 8])).unwrap(),
    ));
    let paths: [(&str, &'static SlabCache<Obj64>, Churn); 2] = [
        ("free_rcu (RCU magazines)", magazines, churn_magazines),
        ("call per object (peer)", per_object, churn_per_object),
    ];
    let mut g = c.benchmark_group("rcu_churn_2cpus");
    let before: Vec<SlabStats> = paths.iter().map(|(_, cache, _)| cache.stats()).collect();
    for (name, cache, churn) in paths {
        g.bench_function(name, |b| {
            // Each iteration is one object on each CPU: report per object.
            b.iter_custom(|iters| run_churn(cache, churn, iters.div_ceil(2)))
        });
    }
    g.finish();
    for ((name, cache, _), before) in paths.iter().zip(&before) {
        let after = cache.stats();
        let (allocs, hit_rate, recycled) = delta(&after, before);
        eprintln!(
            "rcu_churn {name}: {allocs} allocs, magazine hit rate {:.1}%, recycled (not from a slab) {:.1}%\n{after}",
            100.0 * hit_rate,
            100.0 * recycled
        );
    }
}

const BUCKETS: u64 = 1024;

/// Finds the object for `bucket`, following the type-stable pattern; returns
/// its key.
#[inline]
fn lookup(cache: &SlabCache<Key>, table: &[AtomicSlabArc<'_, Key>], bucket: u64) -> Option<u64> {
    loop {
        let guard = vmtask_rcu::read_lock();
        let found = table[bucket as usize].load(&guard)?;
        let Some(object) = cache.try_get(found, &guard) else {
            continue;
        };
        let key = object.key.load(Relaxed);
        if key % BUCKETS == bucket {
            return Some(key);
        }
    }
}

struct Key {
    key: AtomicU64,
}

fn typesafe_lookup(c: &mut Criterion) {
    pin(0);
    let config = Config {
        typesafe_by_rcu: true,
        ..Config::new("lookup")
    };
    let cache: &'static SlabCache<Key> = Box::leak(Box::new(
        SlabCache::new(config, || Key {
            key: AtomicU64::new(0),
        })
        .unwrap(),
    ));
    let table: &'static [AtomicSlabArc<'static, Key>] = Box::leak(
        (0..BUCKETS)
            .map(|_| AtomicSlabArc::new(cache).unwrap())
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let publish = |bucket: u64, generation: u64| {
        let object = cache.alloc().unwrap();
        object.key.store(bucket + BUCKETS * generation, Relaxed);
        table[bucket as usize].store(Some(SlabBox::into_shared(object)));
    };
    for bucket in 0..BUCKETS {
        publish(bucket, 0);
    }
    let mut g = c.benchmark_group("typesafe_lookup");
    for writer in [false, true] {
        let stop = AtomicBool::new(false);
        let replaced = AtomicU64::new(0);
        std::thread::scope(|s| {
            if writer {
                s.spawn(|| {
                    pin(1);
                    let mut generation = 1;
                    while !stop.load(Relaxed) {
                        for bucket in 0..BUCKETS {
                            publish(bucket, generation);
                        }
                        generation += 1;
                        replaced.fetch_add(BUCKETS, Relaxed);
                    }
                });
            }
            let name = if writer {
                "lookup, writer churning on CPU 1"
            } else {
                "lookup, no writer"
            };
            let mut bucket = 0;
            g.bench_function(name, |b| {
                b.iter(|| {
                    bucket = (bucket + 7) % BUCKETS;
                    // The key as one word: `black_box` stores its argument
                    // and reads it back, and an `Option<u64>` is stored as
                    // two words and read back as one 16-byte load, which
                    // store forwarding cannot serve (a stall of several ns
                    // here that belongs to the benchmark, not the lookup).
                    black_box(lookup(cache, table, bucket).unwrap_or(u64::MAX))
                })
            });
            stop.store(true, Relaxed);
        });
        if writer {
            eprintln!(
                "typesafe_lookup: the writer replaced {} objects meanwhile",
                replaced.load(Relaxed)
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = alloc_free, rcu_churn, typesafe_lookup
}
criterion_main!(benches);
