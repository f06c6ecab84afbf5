//! Instructions per coroutine of the `coroutine create+run+drop` variants,
//! for valgrind's callgrind, whose counts do not depend on the machine's
//! speed: run a mode with `n` and `2n` coroutines and divide the
//! difference of the totals by `n`.
//!
//! ```sh
//! cargo build --release -p vmtask-stack --example coroutine_instructions
//! for mode in by-hand tls-beside pool-owned pool-scoped alloc-free; do for n in 1000000 2000000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/coroutine_instructions $mode $n 2>&1 | grep Collected
//! done; done
//! ```
//!
//! Modes: `by-hand` (one `DefaultStack` reused through `ScopedCoroutine`),
//! `tls-beside` (the same plus a thread-local word taken and put back, the
//! least a per-thread stack cache could cost), `pool-owned` (an owned
//! `Coroutine` on `pool.alloc()`), `pool-scoped` (`ScopedCoroutine` on
//! `pool.alloc()`), `alloc-free` (`pool.alloc()` and its drop alone).

use std::cell::Cell;
use std::hint::black_box;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, ScopedCoroutine, Yielder};
use vmtask_stack::{Config, StackPool};

fn add_one(_: &Yielder<u64, ()>, x: u64) -> u64 {
    x + 1
}

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(1) };
}

/// Runs `f` `n` times; never inlined, so each mode is one loop.
#[inline(never)]
fn repeat(n: u64, mut f: impl FnMut()) {
    for _ in 0..n {
        f();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: coroutine_instructions by-hand|tls-beside|pool-owned|pool-scoped|alloc-free COROUTINES";
    let mode = args.next().expect(usage);
    let n: u64 = args.next().and_then(|s| s.parse().ok()).expect(usage);
    let pool = StackPool::new(Config::default()).expect("a pool");
    let mut by_hand = DefaultStack::new(128 * 1024).expect("a corosensei stack");
    // Warm up the pool's thread state the same way in every mode.
    drop(pool.alloc().expect("a pool stack"));
    match mode.as_str() {
        "by-hand" => repeat(n, || {
            let co = ScopedCoroutine::with_stack(&mut by_hand, add_one);
            black_box(co.scope(|mut co| co.resume(black_box(1))));
        }),
        "tls-beside" => repeat(n, || {
            let p = SLOT.with(|c| c.replace(0));
            let co = ScopedCoroutine::with_stack(&mut by_hand, add_one);
            black_box(co.scope(|mut co| co.resume(black_box(p as u64))));
            SLOT.with(|c| c.set(black_box(p)));
        }),
        "pool-owned" => repeat(n, || {
            let mut co = Coroutine::with_stack(pool.alloc().expect("a pool stack"), add_one);
            black_box(co.resume(black_box(1)));
        }),
        "pool-scoped" => repeat(n, || {
            let mut stack = pool.alloc().expect("a pool stack");
            let co = ScopedCoroutine::with_stack(&mut stack, add_one);
            black_box(co.scope(|mut co| co.resume(black_box(1))));
        }),
        "alloc-free" => repeat(n, || drop(black_box(pool.alloc().expect("a pool stack")))),
        _ => panic!("{usage}"),
    }
}
