//! A thread whose first RCU use comes from a pthread-key destructor, which
//! glibc runs after the Rust thread-local destructors: the registration's
//! own destructor never runs, and the backstop key must unregister the
//! thread before its thread-local reader goes away.

use std::time::Duration;

/// The pthread-key destructor whose thread first uses RCU at exit.
///
/// # Safety
/// Called only by glibc, as this test's key destructor; `_value` is ignored.
unsafe extern "C" fn first_use_at_exit(_value: *mut libc::c_void) {
    drop(vmtask_rcu::read_lock());
    let mut v = Box::new(7u64);
    *v += 1;
    vmtask_rcu::defer_drop(v);
}

#[test]
fn a_thread_that_first_reads_from_a_key_destructor_unregisters() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: a valid out-pointer and an `extern "C"` destructor that lives
    // for the whole program.
    let rc = unsafe { libc::pthread_key_create(&mut key, Some(first_use_at_exit)) };
    assert_eq!(rc, 0);
    std::thread::spawn(move || {
        // SAFETY: a key created above; any non-null value arms it.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling_mut::<u8>().cast()) };
    })
    .join()
    .unwrap();
    // A new thread likely reuses the dead thread's stack, and so the
    // memory of its thread-local reader.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        let _ = released.recv();
    });
    let (done, is_done) = std::sync::mpsc::channel::<usize>();
    std::thread::spawn(move || {
        vmtask_rcu::synchronize();
        let _ = done.send(vmtask_rcu::stats().readers);
    });
    let readers = is_done.recv_timeout(Duration::from_secs(5));
    drop(release);
    other.join().unwrap();
    let readers = readers.expect("synchronize hung on the exited thread's reader");
    // No thread of this test is registered: the exited one has
    // unregistered, and neither `synchronize` nor the callback thread
    // registers its caller.
    assert_eq!(
        readers, 0,
        "the exited thread is still registered ({readers} readers)"
    );
    vmtask_rcu::barrier();
}
