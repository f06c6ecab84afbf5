//! `populate_top` where the batched `process_madvise` cannot be used: every
//! fresh stack still gets its top page, one `madvise` each. Checked in a
//! child process (this test binary re-run on itself), which has no file
//! descriptor to spare when the pool first asks for the pidfd the batch
//! needs, so the pool goes without it for the life of the process.

use vmtask_stack::{Config, GuardMode, StackPool};

mod common;
use common::{page, populate_supported, rerun_in_child, resident_pages, with_zero_soft_limit};

const CHILD: &str = "VMTASK_STACK_POPULATE_FALLBACK_CHILD";

#[test]
fn every_fresh_stack_gets_its_top_page_without_batches() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    rerun_in_child("every_fresh_stack_gets_its_top_page_without_batches", CHILD);
}

fn child() {
    let pool = StackPool::new(Config {
        populate_top: true,
        ..Config::default()
    })
    .unwrap();
    if pool.guard_mode() != GuardMode::GuardMarker {
        // `mprotect` guards: one slot per carve, no batch to fall back from.
        println!("CHILD DONE");
        return;
    }
    // The first carve asks for the pidfd (and fails: EMFILE); the pool
    // does not ask again.
    let first = with_zero_soft_limit(libc::RLIMIT_NOFILE, || pool.alloc().unwrap());
    let mut stacks = vec![first];
    stacks.extend((0..19).map(|_| pool.alloc().unwrap()));
    let tops: Vec<usize> = stacks
        .iter()
        .map(|s| resident_pages(s.base() as usize - page(), page()))
        .collect();
    let expected = usize::from(populate_supported());
    assert_eq!(
        tops,
        vec![expected; stacks.len()],
        "{:?} guards: the top pages of fresh stacks",
        pool.guard_mode()
    );
    assert!(
        !pidfd_open(),
        "a pidfd was opened: the batches were not the fallback's"
    );
    println!("CHILD DONE");
}

/// Whether this process holds a pidfd.
fn pidfd_open() -> bool {
    std::fs::read_dir("/proc/self/fd").unwrap().any(|entry| {
        std::fs::read_link(entry.unwrap().path())
            .is_ok_and(|target| target.to_string_lossy().contains("pidfd"))
    })
}
