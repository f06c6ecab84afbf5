//! Deferred-free churn on one thread: time per object of `Box::new` +
//! `defer_drop` until every drop ran, next to a plain `Box::new` + drop.
//!
//! `cargo run --release -p vmtask-rcu --example defer_churn [objects]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
static FREED: AtomicU64 = AtomicU64::new(0);
struct Obj(#[allow(dead_code)] u64);
impl Drop for Obj {
    fn drop(&mut self) {
        FREED.fetch_add(1, Ordering::Relaxed);
    }
}
fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(10_000_000);
    for round in 0..3 {
        let t = Instant::now();
        for i in 0..n {
            drop(std::hint::black_box(Box::new(Obj(i))));
        }
        let base = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for i in 0..n {
            vmtask_rcu::defer_drop(Box::new(Obj(i)));
        }
        let queued = t.elapsed().as_nanos() as f64 / n as f64;
        vmtask_rcu::barrier();
        let total = t.elapsed().as_nanos() as f64 / n as f64;
        eprintln!("round {round}: box+drop {base:.1} ns; defer_drop loop {queued:.1} ns; incl. all frees {total:.1} ns");
    }
    eprintln!("{}", vmtask_rcu::stats());
}
