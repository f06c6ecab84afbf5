//! A pool dropped while stacks are out keeps its address space (a task may
//! still run on one of them) but not its memory: its free stacks give
//! their pages back at the drop, and each stack still out gives back all
//! of its pages when it is dropped.

use std::sync::mpsc;
use std::sync::Arc;

use vmtask_stack::{Config, Stack, StackPool};

mod common;
use common::{page, resident_pages};

/// Writes every byte of the stack, so all its pages are resident.
fn touch(stack: &Stack) {
    // SAFETY: `[limit, limit + size)` is the stack's usable range, mapped
    // read-write, and nothing runs on it.
    unsafe { std::ptr::write_bytes(stack.limit(), 0xa5, stack.size()) };
}

/// The stack's usable range, to look at after the stack is gone.
fn range(stack: &Stack) -> (usize, usize) {
    (stack.limit() as usize, stack.size())
}

#[test]
fn stacks_freed_after_their_pool_give_their_memory_back() {
    for _ in 0..20 {
        let pool = StackPool::new(Config::default()).unwrap();
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        touch(&a);
        touch(&b);
        let (a_at, size) = range(&a);
        let (b_at, _) = range(&b);
        drop(pool);
        // Still in use: untouched by the drop.
        assert_eq!(resident_pages(a_at, size), size / page());
        drop(a);
        assert_eq!(
            resident_pages(a_at, size),
            0,
            "a stack freed after its pool was dropped kept its pages"
        );
        drop(b);
        assert_eq!(resident_pages(b_at, size), 0);
    }
}

#[test]
fn free_stacks_of_a_pool_dropped_with_stacks_out_give_their_memory_back() {
    let pool = Arc::new(StackPool::new(Config::default()).unwrap());
    let out = pool.alloc().unwrap();
    // The stack another live thread keeps parked (its last freed) and one
    // in a magazine, both fully resident.
    let (parked_tx, parked) = mpsc::channel();
    let (done, wait) = mpsc::channel::<()>();
    let holder = {
        let pool = Arc::clone(&pool);
        std::thread::spawn(move || {
            let stack = pool.alloc().unwrap();
            touch(&stack);
            parked_tx.send(range(&stack)).unwrap();
            drop(stack);
            drop(pool);
            // Alive, with the stack parked, until the pool is gone.
            let _ = wait.recv();
        })
    };
    let (parked_at, size) = parked.recv().unwrap();
    let cached = pool.alloc().unwrap();
    let spare = pool.alloc().unwrap();
    touch(&cached);
    touch(&spare);
    let (cached_at, _) = range(&cached);
    let (spare_at, _) = range(&spare);
    drop(spare); // parked on this thread
    drop(cached); // into this CPU's magazine
    while Arc::strong_count(&pool) > 1 {
        std::thread::yield_now();
    }
    let pool = Arc::into_inner(pool).unwrap();
    drop(pool);
    let mut free = vec![
        ("parked on this thread", spare_at),
        ("in a magazine", cached_at),
    ];
    // Taken from another live thread with a membarrier, where there is one.
    if membarrier_available() {
        free.push(("parked on another live thread", parked_at));
    }
    for (what, at) in free {
        assert_eq!(
            resident_pages(at, size),
            0,
            "a free stack {what} kept its pages when its pool was dropped with a stack out"
        );
    }
    drop(done);
    holder.join().unwrap();
    drop(out);
}

/// Whether the kernel offers `MEMBARRIER_CMD_PRIVATE_EXPEDITED`.
fn membarrier_available() -> bool {
    // SAFETY: MEMBARRIER_CMD_QUERY only reads the supported commands.
    let cmds = unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) };
    cmds > 0 && cmds & (1 << 3) != 0
}
