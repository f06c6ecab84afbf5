//! The cached alloc+free fast path in a tight loop, next to a bare
//! `CpuCache` pop+push (its floor), for `perf record` and quick A/B checks
//! on a noisy machine: each line is the median and minimum of 7 runs.
//!
//! `CARGO_TARGET_DIR=/work/target-stack cargo run --release -p vmtask-stack --example stack_fastpath [iterations]`

use std::hint::black_box;
use std::ptr::NonNull;
use std::time::Instant;

use vmtask_percpu::CpuCache;
use vmtask_stack::{Config, StackPool};

fn time(name: &str, iters: u64, mut f: impl FnMut()) {
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    println!(
        "{name:24} median {:6.2} ns  min {:6.2} ns",
        runs[3], runs[0]
    );
}

fn main() {
    vmtask_percpu::pin_current_thread(vmtask_percpu::cpu()).expect("pin the thread");
    let iters = std::env::args()
        .nth(1)
        .map_or(5_000_000, |s| s.parse().expect("iterations"));
    let pool = StackPool::new(Config::default()).expect("pool");
    drop(pool.alloc().expect("first stack"));
    let cache = CpuCache::new(16);
    let item = NonNull::from(&iters).cast::<u8>();
    cache.push(item).expect("an empty cache has room");
    for _ in 0..3 {
        time("CpuCache pop+push", iters, || {
            let p = black_box(cache.pop().expect("one item cached"));
            cache.push(p).expect("room for it again");
        });
        time("pool alloc+free", iters, || {
            drop(black_box(pool.alloc().expect("a cached stack")))
        });
    }
    println!("{}", pool.stats());
}
