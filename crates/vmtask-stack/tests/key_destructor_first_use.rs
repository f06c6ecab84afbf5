//! A thread whose first use of a pool comes from a pthread-key destructor
//! (C libraries run code there) is past its Rust thread-local destructors:
//! its parked stack must still go back to the pool when it exits (review
//! finding: 20,000 such threads carved 20,000 slots and 172 MB).

use std::sync::OnceLock;
use vmtask_stack::{Config, StackPool};

static POOL: OnceLock<StackPool> = OnceLock::new();

/// Allocates a stack, touches it and frees it: parked on this thread.
unsafe extern "C" fn use_a_stack(_: *mut libc::c_void) {
    let stack = POOL
        .get()
        .unwrap()
        .alloc()
        .expect("alloc in a key destructor");
    // SAFETY: the top page of a stack we own.
    unsafe { std::ptr::write_bytes(stack.base().sub(4096), 1, 4096) };
    drop(stack);
}

#[test]
fn a_first_use_in_a_key_destructor_gives_the_parked_stack_back_at_exit() {
    let pool = POOL.get_or_init(|| StackPool::new(Config::default()).unwrap());
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a valid out-pointer and a destructor that lives for the
    // whole program.
    let made = unsafe { libc::pthread_key_create(&mut key, Some(use_a_stack)) };
    assert_eq!(made, 0);
    const THREADS: usize = 2000;
    for _ in 0..THREADS {
        std::thread::spawn(move || {
            // SAFETY: our key; the value is never dereferenced.
            unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) };
        })
        .join()
        .unwrap();
    }
    let stats = pool.stats();
    assert!(
        stats.slots_carved < 64,
        "{} slots carved for {THREADS} threads that each used one stack in turn:\n{stats}",
        stats.slots_carved
    );
    assert_eq!(stats.live, 0, "{stats}");
}
