//! A pool whose guards are made with `mprotect` (each splits off two
//! mappings) stops carving before `vm.max_map_count`, leaving mappings to
//! the rest of the program, and the stacks it handed out can all be freed
//! (review finding: the pool took the process's last mapping, and freeing
//! its 32,750 stacks then aborted in `malloc`, a list of the pool's having
//! to grow with no mapping left for it).
//!
//! Run with `cargo test --test free_after_map_count_limit`.

mod common;

use common::{alloc_until_error, assert_enomem, maps_lines};
use vmtask_stack::{Config, GuardMode, StackPool};

/// `vm.max_map_count`, if `/proc` tells.
fn max_map_count() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Without the test harness (`harness = false`), so that the allocations
/// run on the main thread, in glibc's main arena, as in the program that
/// aborted.
fn main() {
    let Some(limit) = max_map_count() else {
        eprintln!("skipped: /proc/sys/vm/max_map_count cannot be read");
        return;
    };
    if !(1 << 14..=1 << 18).contains(&limit) {
        eprintln!("skipped: vm.max_map_count is {limit}, outside what this test expects (16,384 to 262,144)");
        return;
    }
    // What the pool leaves to the rest of the program (`sys::MAP_HEADROOM`).
    let keep = 1024.min(limit / 8);
    // A fixed threshold: every allocation of 64 KiB or more is a mapping
    // of its own (glibc otherwise raises it after large frees, and serves
    // them from the heap).
    // SAFETY: mallopt only sets an allocator parameter of this process.
    let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 10) };
    assert_eq!(set, 1, "mallopt(M_MMAP_THRESHOLD) refused");
    let pool = StackPool::new(Config {
        stack_size: 16 << 10,
        guard_mode: GuardMode::Mprotect,
        ..Config::default()
    })
    .unwrap();
    let (stacks, err) = alloc_until_error(&pool, limit);
    assert_enomem(&err);
    assert!(
        err.to_string().contains("leave 1,024 mappings"),
        "the error does not say why it stopped: {err}"
    );
    let held = stacks.len();
    assert!(
        held > limit / 4,
        "only {held} stacks before the error, for a limit of {limit} mappings: {err}"
    );
    // The rest of the program keeps its headroom: it can start a thread
    // (its stack and guard are two mappings) and make large allocations
    // (a mapping each).
    let left = limit.saturating_sub(maps_lines());
    assert!(
        left + 16 >= keep,
        "{left} of {limit} mappings left after {held} stacks, {keep} expected"
    );
    let big: Vec<Vec<u8>> = (0..64).map(|_| vec![1u8; 1 << 20]).collect();
    std::thread::spawn(|| ()).join().unwrap();
    // Still refused, for the same reason.
    let again = pool.alloc().map(drop).unwrap_err();
    assert_eq!(again.to_string(), err.to_string());
    drop(big);
    // Even with the headroom taken by the rest of the program, every stack
    // comes back: no free grows the pool's lists (they grew when it
    // carved).
    let mut reused = Vec::with_capacity(held);
    let filler = take_every_mapping_left();
    drop(stacks);
    let stats = pool.stats();
    give_back(filler);
    assert_eq!(stats.live, 0, "{stats}");
    // And each is handed out again without a carve.
    reused.extend((0..held).map(|_| pool.alloc().unwrap()));
    assert_eq!(
        pool.stats().slots_carved,
        held as u64,
        "reuse carved new slots"
    );
    drop(reused);
    println!("{held} stacks with mprotect guards, {left} mappings left; all freed and reused");
}

/// Maps single pages until the kernel refuses (`vm.max_map_count`),
/// alternating protections so that no two merge into one mapping.
fn take_every_mapping_left() -> Vec<usize> {
    let page = common::page();
    let mut pages = Vec::with_capacity(4096);
    while pages.len() < pages.capacity() {
        let prot = if pages.len() % 2 == 0 {
            libc::PROT_READ
        } else {
            libc::PROT_NONE
        };
        // SAFETY: a fresh anonymous mapping of the kernel's choosing,
        // never touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return pages;
        }
        pages.push(p as usize);
    }
    panic!("the kernel still gave mappings after {}", pages.len());
}

fn give_back(pages: Vec<usize>) {
    for p in pages {
        // SAFETY: mapped by `take_every_mapping_left`, and unused.
        unsafe { libc::munmap(p as *mut libc::c_void, common::page()) };
    }
}
