//! Cost of the per-CPU primitives, side by side with the atomic RMW they
//! must beat. `cargo bench -p vmtask-percpu`
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use vmtask_percpu::{cpu, PerCpu};

fn bench(c: &mut Criterion) {
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
