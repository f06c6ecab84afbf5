//! Memory of many live stacks: `VmRSS + VmPTE` per stack and the mappings
//! the pool adds, with the top page of every stack touched; then what comes
//! back after they are freed and trimmed.
//!
//! `CARGO_TARGET_DIR=/work/target-stack cargo run --release -p vmtask-stack --example stack_memory [-- STACKS]`
//! (default 1,000,000 stacks of 128 KiB: about 4.3 GiB resident at peak).

use std::time::Instant;

use vmtask_stack::{Config, StackPool};

/// `(VmRSS, VmPTE)` in KiB.
fn status() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmPTE:"))
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .map_or(1_000_000, |s| s.parse().expect("STACKS"));
    let pool = StackPool::new(Config::default()).unwrap();
    let mut stacks = Vec::with_capacity(count);
    let (rss0, pte0) = status();
    let maps0 = mappings();
    let start = Instant::now();
    for _ in 0..count {
        let stack = pool.alloc().expect("alloc");
        // SAFETY: the top page of a fresh stack is writable and unused.
        unsafe { std::ptr::write_volatile(stack.base().sub(64), 1u8) };
        stacks.push(stack);
    }
    let elapsed = start.elapsed();
    let (rss1, pte1) = status();
    let maps1 = mappings();
    let per_stack = ((rss1 - rss0) + (pte1 - pte0)) as f64 * 1024.0 / count as f64;
    println!(
        "{count} live stacks of {} KiB, top page touched, in {elapsed:.2?}",
        pool.stack_size() / 1024
    );
    println!("  VmRSS  +{} KiB, VmPTE +{} KiB", rss1 - rss0, pte1 - pte0);
    println!(
        "  per stack: {per_stack:.0} B = {:.2} KiB (RSS {:.0} B + PTE {:.0} B; includes the 16 B handle in a Vec)",
        per_stack / 1024.0,
        (rss1 - rss0) as f64 * 1024.0 / count as f64,
        (pte1 - pte0) as f64 * 1024.0 / count as f64
    );
    println!(
        "  /proc/self/maps: {maps0} -> {maps1} lines (+{})",
        maps1 as i64 - maps0 as i64
    );
    println!("{}", pool.stats());

    let start = Instant::now();
    drop(stacks);
    let trimmed = pool.trim();
    let (rss2, pte2) = status();
    println!(
        "freed and trimmed in {:.2?} (trim released {} KiB): VmRSS {} KiB above start, VmPTE {} KiB above start",
        start.elapsed(),
        trimmed / 1024,
        rss2 as i64 - rss0 as i64,
        pte2 as i64 - pte0 as i64
    );
    println!("{}", pool.stats());
}
