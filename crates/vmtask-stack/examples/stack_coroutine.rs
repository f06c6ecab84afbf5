//! A corosensei coroutine created, run and dropped on a pool stack, against
//! the same coroutine on one stack reused by hand, measured in interleaved
//! rounds (A, B, C, A, B, C, ...) so that the machine's drift over seconds
//! hits every variant alike; each line is the median of the rounds, and
//! the ratio is to the by-hand case.
//!
//! `cargo run --release -p vmtask-stack --example stack_coroutine [rounds]`

use std::hint::black_box;
use std::time::Instant;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, ScopedCoroutine, Yielder};
use vmtask_stack::{Config, StackPool};

const ITERS: u64 = 1_000_000;

fn add_one(_: &Yielder<u64, ()>, x: u64) -> u64 {
    x + 1
}

/// One round: nanoseconds per call of `f` over `ITERS` calls (monomorphic,
/// so the variants pay no indirect call).
fn round(f: &mut impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..ITERS {
        f();
    }
    start.elapsed().as_nanos() as f64 / ITERS as f64
}

fn main() {
    vmtask_percpu::pin_current_thread(vmtask_percpu::cpu()).expect("pin the thread");
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(21, |s| s.parse().expect("rounds"));
    let pool = StackPool::new(Config::default()).expect("pool");
    let mut by_hand = DefaultStack::new(128 * 1024).expect("a corosensei stack");
    let mut held = pool.alloc().expect("a pool stack");
    let mut by_hand2 = DefaultStack::new(128 * 1024).expect("a corosensei stack");
    let mut by_hand3 = DefaultStack::new(128 * 1024).expect("a corosensei stack");

    let mut hand = || {
        let co = ScopedCoroutine::with_stack(&mut by_hand, add_one);
        black_box(co.scope(|mut co| co.resume(black_box(1))));
    };
    let mut pool_held = || {
        let co = ScopedCoroutine::with_stack(&mut held, add_one);
        black_box(co.scope(|mut co| co.resume(black_box(1))));
    };
    let mut alloc_beside = || {
        let stack = black_box(pool.alloc().expect("a pool stack"));
        let co = ScopedCoroutine::with_stack(&mut by_hand2, add_one);
        black_box(co.scope(|mut co| co.resume(black_box(1))));
        drop(stack);
    };
    // The least any per-thread stack cache could cost: one thread-local
    // word taken and put back around the coroutine.
    thread_local! {
        static SLOT: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
    }
    let mut tls_beside = || {
        let p = SLOT.with(|c| c.replace(0));
        let co = ScopedCoroutine::with_stack(&mut by_hand3, add_one);
        black_box(co.scope(|mut co| co.resume(black_box(p as u64))));
        SLOT.with(|c| c.set(black_box(p)));
    };
    let mut pool_scoped = || {
        let mut stack = pool.alloc().expect("a pool stack");
        let co = ScopedCoroutine::with_stack(&mut stack, add_one);
        black_box(co.scope(|mut co| co.resume(black_box(1))));
    };
    let mut pool_owned = || {
        let mut co = Coroutine::with_stack(pool.alloc().expect("a pool stack"), add_one);
        black_box(co.resume(black_box(1)));
    };
    let names = [
        "one DefaultStack reused by hand (ScopedCoroutine)",
        "one pool stack held and reused (ScopedCoroutine)",
        "by hand, plus a pool alloc+free beside it",
        "by hand, plus a thread-local swap beside it",
        "pool.alloc() per coroutine (ScopedCoroutine)",
        "pool.alloc() per coroutine (Coroutine)",
    ];
    let mut times = vec![Vec::with_capacity(rounds); names.len()];
    for _ in 0..rounds {
        times[0].push(round(&mut hand));
        times[1].push(round(&mut pool_held));
        times[2].push(round(&mut alloc_beside));
        times[3].push(round(&mut tls_beside));
        times[4].push(round(&mut pool_scoped));
        times[5].push(round(&mut pool_owned));
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect();
    println!("coroutine create + run + drop, median of {rounds} interleaved rounds of {ITERS}:");
    for (name, median) in names.iter().zip(&medians) {
        println!("  {name:52} {median:6.2} ns  {:.2}x", median / medians[0]);
    }
}
