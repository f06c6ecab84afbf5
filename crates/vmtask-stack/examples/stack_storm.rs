//! Spawn-and-exit storm on two CPUs where half the frees happen on the other
//! CPU: the hit rate of the per-CPU cache plus depot, for cache sizes 2 and
//! 16, with the default depot and with no depot (`depot_size = 0`, closest
//! to the kernel's lone 2-slot per-CPU cache).
//!
//! `CARGO_TARGET_DIR=/work/target-stack cargo run --release -p vmtask-stack --example stack_storm [-- ROUNDS]`

use std::sync::mpsc;
use std::time::Instant;

use vmtask_stack::{Config, PoolStats, StackPool};

/// Stacks each worker has live at once ("tasks" spawned per burst).
const BURST: usize = 8;

fn storm(config: Config, rounds: usize) -> (PoolStats, f64) {
    let pool = StackPool::new(config).unwrap();
    let cpus = vmtask_percpu::possible_cpus().min(2);
    // Bounded, so a descheduled worker cannot let stacks pile up in flight.
    let (to_1, from_0) = mpsc::sync_channel(4 * BURST);
    let (to_0, from_1) = mpsc::sync_channel(4 * BURST);
    let start = Instant::now();
    std::thread::scope(|s| {
        for (cpu, tx, rx) in [(0, to_1, from_1), (cpus - 1, to_0, from_0)] {
            let pool = &pool;
            s.spawn(move || {
                vmtask_percpu::pin_current_thread(cpu).unwrap();
                let mut burst = Vec::with_capacity(BURST);
                for _ in 0..rounds {
                    for _ in 0..BURST {
                        let stack = pool.alloc().unwrap();
                        // SAFETY: the top page of a stack we own.
                        unsafe { std::ptr::write_volatile(stack.base().sub(64), 1u8) };
                        burst.push(stack);
                    }
                    // Half the tasks exit here, half on the other CPU.
                    for (i, stack) in burst.drain(..).enumerate() {
                        if i % 2 == 0 {
                            drop(stack);
                        } else {
                            let mut stack = stack;
                            // Full: free what the other CPU sent us first,
                            // so two full channels cannot deadlock.
                            while let Err(mpsc::TrySendError::Full(back)) = tx.try_send(stack) {
                                stack = back;
                                while let Ok(other) = rx.try_recv() {
                                    drop(other);
                                }
                                std::thread::yield_now();
                            }
                        }
                    }
                    while let Ok(stack) = rx.try_recv() {
                        drop(stack);
                    }
                }
                drop(tx);
                rx.into_iter().for_each(drop);
            });
        }
    });
    let ns = start.elapsed().as_nanos() as f64 / (2 * rounds * BURST) as f64;
    (pool.stats(), ns)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |s| s.parse().expect("ROUNDS"));
    println!("storm: 2 workers pinned to CPUs 0 and 1, {rounds} rounds x {BURST} stacks each, half freed on the other CPU");
    println!("| cache_size | depot | allocs | cache hits | depot hits | carved | reused released | cache+depot hit rate | ns/alloc+free |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for cache_size in [2, 16] {
        for depot in [true, false] {
            let mut config = Config {
                cache_size,
                ..Config::default()
            };
            if !depot {
                config.depot_size = 0;
            }
            let depot_label = if depot {
                format!("{} stacks", config.depot_size)
            } else {
                "none".into()
            };
            let (stats, ns) = storm(config, rounds);
            let reused = stats.allocs - stats.cache_hits - stats.depot_hits - stats.slots_carved;
            println!(
                "| {cache_size} | {depot_label} | {} | {} | {} | {} | {reused} | {:.3}% | {ns:.0} |",
                stats.allocs,
                stats.cache_hits,
                stats.depot_hits,
                stats.slots_carved,
                100.0 * stats.hit_rate()
            );
        }
    }
}
