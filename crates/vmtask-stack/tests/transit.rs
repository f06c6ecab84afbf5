//! A pool must not report `Exhausted` while it has a free stack, even when
//! that stack is "in transit" at that moment: held by another thread
//! between two of the pool's lists (a magazine on its way to the depot, a
//! depot batch on its way to a magazine, stacks taken from the magazines
//! or from parked places by an exhausted alloc, orphans of exited threads).
//!
//! Each worker holds at most `k` stacks, counting an alloc in progress, and
//! `threads * k <= max_stacks`: so while a worker allocates, the others
//! hold at most `max_stacks - k` and the worker itself `k - 1`, and at
//! least one stack is free at every instant. Every `Exhausted` is false.

#[path = "../../../test-support/knobs.rs"]
mod knobs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmtask_stack::{Config, Stack, StackError, StackPool};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Tally {
    allocs: AtomicU64,
    exhausted: AtomicU64,
}

/// One worker: allocates up to `k` stacks, frees them in a random order,
/// and now and then moves to another CPU (so stacks freed on one CPU flow
/// through the depot to another), until `stop`.
fn worker(pool: &StackPool, k: usize, seed: u64, stop: &AtomicBool, tally: &Tally) {
    // The CPUs this thread may run on, whatever their ids (test audit:
    // `available_parallelism` gives a count, not ids).
    let cpus = vmtask_percpu::allowed_cpus();
    let mut rng = Rng(seed | 1);
    let mut held: Vec<Stack> = Vec::with_capacity(k);
    let (mut allocs, mut exhausted) = (0u64, 0u64);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        if round % 64 == 0 && cpus.len() > 1 {
            let cpu = cpus[(rng.next() as usize) % cpus.len()];
            vmtask_percpu::pin_current_thread(cpu).expect("pinning to an allowed CPU");
        }
        let want = 1 + (rng.next() as usize) % k;
        while held.len() < want {
            allocs += 1;
            match pool.alloc() {
                Ok(stack) => held.push(stack),
                Err(StackError::Exhausted { .. }) => {
                    exhausted += 1;
                    break;
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        while !held.is_empty() {
            let i = (rng.next() as usize) % held.len();
            drop(held.swap_remove(i));
            if rng.next() % 4 == 0 {
                break; // keep some for the next round
            }
        }
    }
    drop(held);
    tally.allocs.fetch_add(allocs, Ordering::Relaxed);
    tally.exhausted.fetch_add(exhausted, Ordering::Relaxed);
}

struct Scenario {
    name: &'static str,
    max_stacks: usize,
    threads: usize,
    k: usize,
    depot_size: usize,
    /// A thread calling `trim` in a loop.
    trimmer: bool,
    /// Workers run in short-lived threads, which exit with a stack parked.
    short_lived: bool,
}

fn run(s: &Scenario, time: Duration) -> (u64, u64) {
    assert!(s.threads * s.k <= s.max_stacks);
    let pool = StackPool::new(Config {
        max_stacks: s.max_stacks,
        cache_size: 2,
        depot_size: s.depot_size,
        stack_size: 64 * 1024,
        keep_resident: 4096,
        ..Config::default()
    })
    .unwrap();
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    std::thread::scope(|scope| {
        for t in 0..s.threads {
            let (pool, stop, tally) = (&pool, &stop, &tally);
            scope.spawn(move || {
                if s.short_lived {
                    let mut gen = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        gen += 1;
                        let inner_stop = AtomicBool::new(false);
                        std::thread::scope(|inner| {
                            inner.spawn(|| {
                                worker(pool, s.k, (t as u64 + 1) * 7919 + gen, &inner_stop, tally)
                            });
                            let until = Instant::now() + Duration::from_millis(2);
                            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                                std::thread::yield_now();
                            }
                            inner_stop.store(true, Ordering::Relaxed);
                        });
                    }
                } else {
                    worker(pool, s.k, (t as u64 + 1) * 7919, stop, tally);
                }
            });
        }
        if s.trimmer {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    pool.trim();
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
        std::thread::sleep(time);
        stop.store(true, Ordering::Relaxed);
    });
    let stats = pool.stats();
    assert_eq!(stats.live, 0, "{stats}");
    (
        tally.allocs.load(Ordering::Relaxed),
        tally.exhausted.load(Ordering::Relaxed),
    )
}

#[test]
fn no_false_exhaustion_while_stacks_are_in_transit() {
    let secs = knobs::seconds("VMTASK_TORTURE_SECS", 1.0);
    let scenarios = [
        Scenario {
            name: "churn, 4 threads x 4 of 16",
            max_stacks: 16,
            threads: 4,
            k: 4,
            depot_size: 64,
            trimmer: false,
            short_lived: false,
        },
        Scenario {
            name: "churn, depot_size 2 (overflow released)",
            max_stacks: 16,
            threads: 4,
            k: 4,
            depot_size: 2,
            trimmer: false,
            short_lived: false,
        },
        Scenario {
            name: "churn, 8 threads x 2 of 16",
            max_stacks: 16,
            threads: 8,
            k: 2,
            depot_size: 64,
            trimmer: false,
            short_lived: false,
        },
        Scenario {
            name: "churn + trim",
            max_stacks: 16,
            threads: 4,
            k: 4,
            depot_size: 64,
            trimmer: true,
            short_lived: false,
        },
        Scenario {
            name: "short-lived threads (orphans)",
            max_stacks: 16,
            threads: 4,
            k: 3,
            depot_size: 64,
            trimmer: false,
            short_lived: true,
        },
    ];
    let mut report = String::new();
    let mut total_false = 0;
    for s in &scenarios {
        let (allocs, exhausted) = run(s, secs);
        total_false += exhausted;
        report += &format!(
            "{:45} {:>10} allocs {:>8} false Exhausted ({:.2e} per alloc)\n",
            s.name,
            allocs,
            exhausted,
            exhausted as f64 / allocs.max(1) as f64
        );
    }
    eprintln!("{report}");
    assert_eq!(total_false, 0, "false Exhausted:\n{report}");
}
