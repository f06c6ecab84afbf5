//! A pool that meets the address-space limit (`RLIMIT_AS`) leaves room
//! for the rest of the program: its heap can still grow, and the stacks
//! can all be freed and reused (review finding: the pool reserved the
//! address space up to the last slot, and freeing 23,712 stacks then
//! aborted in `malloc`, the released list having no room to grow).

mod common;

use common::{alloc_until_error, assert_enomem, limit_address_space, rerun_in_child};
use vmtask_stack::{Config, StackPool};

/// Whether `len` bytes of address space can still be mapped.
fn room_for(len: usize) -> bool {
    // SAFETY: a fresh anonymous mapping, unmapped at once; never touched.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return false;
        }
        libc::munmap(p, len);
    }
    true
}

#[test]
fn stacks_allocated_up_to_the_address_space_limit_can_all_be_freed() {
    const ENV: &str = "VMTASK_TEST_FREE_AFTER_LIMIT";
    if std::env::var_os(ENV).is_none() {
        return rerun_in_child(
            "stacks_allocated_up_to_the_address_space_limit_can_all_be_freed",
            ENV,
        );
    }
    let pool = StackPool::new(Config {
        max_stacks: common::max_stacks_past_kernel_limits(Config::default().stack_size),
        ..Config::default()
    })
    .unwrap();
    limit_address_space(3 << 30);
    let (stacks, err) = alloc_until_error(&pool, 1 << 20);
    assert_enomem(&err);
    let held = stacks.len();
    // The pool stopped short of the limit: the rest of the program can
    // still map memory (its heap, a thread's stack).
    assert!(
        room_for(32 << 20),
        "no 32 MiB of address space left after {held} stacks"
    );
    drop(stacks);
    let stats = pool.stats();
    assert_eq!(stats.live, 0, "{stats}");
    let again: Vec<_> = (0..held).map(|_| pool.alloc().unwrap()).collect();
    assert_eq!(
        pool.stats().slots_carved,
        held as u64,
        "reuse carved new slots"
    );
    drop(again);
    println!("{held} stacks freed and reused after the limit");
    println!("CHILD DONE");
}
