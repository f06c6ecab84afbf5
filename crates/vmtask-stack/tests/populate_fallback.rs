//! `populate_top` where the batched `process_madvise` cannot be used: every
//! fresh stack still gets its top page, one `madvise` each. Checked in a
//! child process (this test binary re-run on itself), which has no file
//! descriptor to spare when the pool first asks for the pidfd the batch
//! needs, so the pool goes without it for the life of the process.

use std::process::Command;

use vmtask_stack::{Config, GuardMode, StackPool};

mod common;
use common::{page, populate_supported, resident_pages};

const CHILD: &str = "VMTASK_STACK_POPULATE_FALLBACK_CHILD";

#[test]
fn every_fresh_stack_gets_its_top_page_without_batches() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "every_fresh_stack_gets_its_top_page_without_batches",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CHILD DONE"), "{stdout}\n{stderr}");
}

/// Runs `f` with the open-files soft limit at 0, then restores it.
fn without_file_descriptors<T>(f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process's own limits; lowering
    // the soft limit and raising it back up to the hard one needs no
    // privilege.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let tight = libc::rlimit {
            rlim_cur: 0,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &tight), 0);
    }
    let result = f();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0) };
    result
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
    let first = without_file_descriptors(|| pool.alloc().unwrap());
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
