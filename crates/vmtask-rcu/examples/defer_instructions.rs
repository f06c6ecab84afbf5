//! Instructions per object of the `defer_free_1_thread` benchmark's two
//! loops (`Box::new` + `defer_drop` of a counted u64, and the same with a
//! plain drop), and per `read_lock` + drop (mode `read`), for valgrind's
//! callgrind, whose counts do not depend on
//! the machine's speed: run it with `n` and `2n` objects and divide the
//! difference of the totals by `n`.
//!
//! ```sh
//! cargo build --release -p vmtask-rcu --example defer_instructions
//! for mode in baseline defer read; do for n in 1000000 2000000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/defer_instructions $mode $n 2>&1 | grep Collected
//! done; done
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

static FREED: AtomicU64 = AtomicU64::new(0);

struct Counted(#[allow(dead_code)] u64);
impl Drop for Counted {
    fn drop(&mut self) {
        FREED.fetch_add(1, Ordering::Relaxed);
    }
}

#[inline(never)]
fn baseline(n: u64) {
    for i in 0..n {
        drop(std::hint::black_box(Box::new(Counted(i))));
    }
}

#[inline(never)]
fn defer(n: u64) {
    for i in 0..n {
        vmtask_rcu::defer_drop(Box::new(Counted(i)));
    }
    vmtask_rcu::barrier();
}

#[inline(never)]
fn read(n: u64) {
    for _ in 0..n {
        drop(std::hint::black_box(vmtask_rcu::read_lock()));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: defer_instructions baseline|defer|read OBJECTS";
    let mode = args.next().expect(usage);
    let n: u64 = args.next().and_then(|s| s.parse().ok()).expect(usage);
    // Warm up both paths the same way in either mode: registration, the
    // callback thread, the first bags.
    defer(100_000);
    baseline(100_000);
    read(100_000);
    match mode.as_str() {
        "baseline" => baseline(n),
        "defer" => defer(n),
        "read" => read(n),
        _ => panic!("{usage}"),
    }
    let deferred = if mode == "read" { 0 } else { n };
    assert_eq!(FREED.load(Ordering::Relaxed), 200_000 + deferred);
}
