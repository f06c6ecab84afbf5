//! A thread whose first pool use is in a pthread-key destructor gets an
//! alternate signal stack of ours, which our own key destructor takes back
//! later in the same round. A pool stack allocated by a key destructor
//! that runs after that must still come with an alternate stack, or its
//! overflow dies silently instead of with a report (review finding: the
//! allocation took the fast path, a stack parked on the thread, which
//! does not prepare the thread).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use vmtask_stack::{Config, StackPool};

static POOL: OnceLock<StackPool> = OnceLock::new();

/// In the later destructor: 1 if the thread had an alternate stack with
/// its pool stack, 0 if not, -1 before it ran.
static ARMED: AtomicI32 = AtomicI32::new(-1);

fn has_alt_stack() -> bool {
    // SAFETY: an all-zero stack_t is a valid value to query into.
    let mut current: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: a query only.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut current) };
    current.ss_flags & libc::SS_DISABLE == 0
}

/// The earlier key's destructor: the thread's first pool use; the stack
/// stays parked on the thread.
unsafe extern "C" fn first_use(_: *mut libc::c_void) {
    drop(
        POOL.get()
            .unwrap()
            .alloc()
            .expect("alloc in a key destructor"),
    );
}

/// The later key's destructor, after ours.
unsafe extern "C" fn later_use(_: *mut libc::c_void) {
    let stack = POOL
        .get()
        .unwrap()
        .alloc()
        .expect("alloc in a key destructor");
    ARMED.store(i32::from(has_alt_stack()), Ordering::SeqCst);
    drop(stack);
}

fn key(destructor: unsafe extern "C" fn(*mut libc::c_void)) -> libc::pthread_key_t {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a valid out-pointer and a destructor that lives for the
    // whole program.
    let made = unsafe { libc::pthread_key_create(&mut key, Some(destructor)) };
    assert_eq!(made, 0);
    key
}

/// Runs `body` on a raw pthread (no alternate stack of `std`'s) and joins it.
fn raw_thread(body: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void, arg: usize) {
    let mut thread: libc::pthread_t = 0;
    // SAFETY: `body` has the start routine's signature; `arg` is a plain
    // number it reads back.
    let rc = unsafe { libc::pthread_create(&mut thread, std::ptr::null(), body, arg as *mut _) };
    assert_eq!(rc, 0);
    // SAFETY: joining the thread made above, once.
    let joined = unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
    assert_eq!(joined, 0);
}

extern "C" fn use_a_stack(_: *mut libc::c_void) -> *mut libc::c_void {
    drop(POOL.get().unwrap().alloc().unwrap());
    std::ptr::null_mut()
}

extern "C" fn set_both(keys: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `keys` points at the two keys, alive until the join.
    let [first, later] = unsafe { *(keys as *const [libc::pthread_key_t; 2]) };
    for key in [first, later] {
        // SAFETY: our keys; the value is never dereferenced.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) };
    }
    std::ptr::null_mut()
}

#[test]
fn a_key_destructor_after_ours_still_gets_an_alternate_stack() {
    let pool = POOL.get_or_init(|| StackPool::new(Config::default()).unwrap());
    // Keys run in the order they were made. The pool's own key (made on a
    // thread's first use of a pool; this test thread has `std`'s alternate
    // stack, so it makes no other) comes first, so that its destructor,
    // which forgets the thread's pool, runs before the first use; then
    // that use's key, then ours (made when a raw thread first gets one of
    // our alternate stacks), then the later one's.
    drop(pool.alloc().unwrap());
    let first = key(first_use);
    raw_thread(use_a_stack, 0);
    let later = key(later_use);
    let keys = [first, later];
    raw_thread(set_both, &keys as *const _ as usize);
    match ARMED.load(Ordering::SeqCst) {
        1 => {}
        0 => panic!("a pool stack allocated after our key's destructor had no alternate stack"),
        _ => panic!("the later key's destructor did not run"),
    }
}
