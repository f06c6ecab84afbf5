//! Cost of the per-CPU primitives, side by side with the atomic RMW they
//! must beat. `cargo bench -p vmtask-percpu`
//!
//! The `CpuCache` rows time one push plus one pop on the current CPU (the
//! slab's alloc+free, the stack pool's cached alloc+free), in both modes,
//! next to a plain `Vec` push+pop (the floor: no per-CPU protection at all)
//! and one atomic `fetch_add`.
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use vmtask_percpu::{cpu, pin_current_thread, CacheMode, CpuCache, PerCpu};

fn bench(c: &mut Criterion) {
    // One CPU for the whole run, so a push and the following pop meet on
    // the same CPU's stack and the figures do not include migrations.
    pin_current_thread(cpu()).expect("pin the benchmark thread");
    let mut g = c.benchmark_group("percpu");
    g.bench_function("cpu()", |b| b.iter(|| black_box(cpu())));
    g.bench_function("sched_getcpu", |b| {
        // SAFETY: no preconditions.
        b.iter(|| black_box(unsafe { libc::sched_getcpu() }))
    });
    let slots = PerCpu::new(|_| 0u64);
    g.bench_function("try_current+increment", |b| {
        b.iter(|| {
            if let Ok(mut s) = slots.try_current() {
                *s += 1;
            }
        })
    });
    let counter = AtomicU64::new(0);
    g.bench_function("atomic fetch_add (peer)", |b| {
        b.iter(|| black_box(counter.fetch_add(1, Ordering::Relaxed)))
    });

    let item = NonNull::<u64>::dangling().cast::<u8>();
    for mode in [CacheMode::Rseq, CacheMode::TryLock] {
        let cache = CpuCache::with_mode(16, mode);
        if cache.mode() != mode {
            eprintln!("CpuCache {mode} mode unsupported here; skipped");
            continue;
        }
        g.bench_function(format!("CpuCache push+pop ({mode})"), |b| {
            b.iter(|| {
                let pushed = cache.push(black_box(item)).is_ok();
                black_box(pushed);
                black_box(cache.pop())
            })
        });
    }
    let mut vec: Vec<NonNull<u8>> = Vec::with_capacity(16);
    g.bench_function("Vec push+pop (floor)", |b| {
        b.iter(|| {
            vec.push(black_box(item));
            black_box(vec.pop())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
