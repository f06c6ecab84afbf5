//! A process out of pthread keys cannot arm the registration backstop:
//! its threads still read, through temporary slots, and never leave a
//! thread-local reader published behind them.

#[test]
fn threads_read_through_temporary_slots_when_no_pthread_key_is_left() {
    // Use up every key (the first RCU use below would create one).
    let mut taken = 0;
    loop {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: a valid out-pointer, no destructor.
        if unsafe { libc::pthread_key_create(&mut key, None) } != 0 {
            break;
        }
        taken += 1;
        assert!(taken < 1 << 20, "pthread keys seem unlimited");
    }
    let cell = std::sync::Arc::new(vmtask_rcu::RcuCell::new(Some(Box::new(1u64))));
    let c = cell.clone();
    std::thread::spawn(move || {
        let outer = vmtask_rcu::read_lock();
        let inner = vmtask_rcu::read_lock();
        assert!(vmtask_rcu::in_read_section());
        assert_eq!(c.load(&inner).copied(), Some(1));
        drop(outer);
        assert!(vmtask_rcu::in_read_section());
        drop(inner);
        assert!(!vmtask_rcu::in_read_section());
        vmtask_rcu::defer_drop(Box::new(2u64));
    })
    .join()
    .unwrap();
    cell.store(Some(Box::new(3)));
    vmtask_rcu::synchronize();
    vmtask_rcu::barrier();
    assert_eq!(
        vmtask_rcu::stats().readers,
        0,
        "a thread registered without a backstop"
    );
}
