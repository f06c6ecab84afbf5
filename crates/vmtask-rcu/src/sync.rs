//! Atomics for the grace-period protocol: `std`'s, or `loom`'s when the
//! protocol is model-checked (`RUSTFLAGS="--cfg loom" cargo test`).

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicUsize, Ordering};

#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicUsize, Ordering};

/// A compiler-only barrier. Under loom there is no compiler to restrain,
/// and the model instead asks for a real fence where membarrier would
/// supply one (see `gp::reader_barrier`).
#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::compiler_fence;

/// One turn of a busy wait.
#[inline]
pub(crate) fn spin() {
    #[cfg(all(loom, test))]
    loom::thread::yield_now();
    #[cfg(not(all(loom, test)))]
    std::hint::spin_loop();
}

/// Sleeps while `word` holds `expected`, for at most `timeout`; returns at
/// once if it holds something else, and may return spuriously.
#[cfg(not(all(loom, test)))]
pub(crate) fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    expected: u32,
    timeout: Option<std::time::Duration>,
) {
    let timeout = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let timeout_ptr = timeout
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT on a live, aligned u32, with a valid timespec or
    // none; the kernel only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            timeout_ptr,
        );
    }
}

/// Wakes up to `n` threads sleeping in `futex_wait` on `word`.
#[cfg(not(all(loom, test)))]
pub(crate) fn futex_wake(word: &std::sync::atomic::AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE on a live, aligned u32; no memory is written.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        );
    }
}

/// The crate's mutex: [`lock_api::Mutex`] over [`RawFutexMutex`].
#[cfg(not(all(loom, test)))]
pub(crate) type Mutex<T> = lock_api::Mutex<RawFutexMutex, T>;

/// A mutex on one futex word (Drepper's "mutex 2" from "Futexes Are
/// Tricky": 0 free, 1 locked, 2 locked with possible waiters).
///
/// Every lock of this crate is one of these, because the `fork` handlers
/// hold some across `fork` and release the others in the child: the
/// waiters of a futex live in the kernel, so a thread that was waiting in
/// the parent leaves nothing behind in the child, and unlocking there only
/// resets the word. parking_lot keeps its waiters in a process-wide table
/// instead; in a child, the table still lists the parent's waiting
/// threads, and an unlock may hand the lock to one of them, which does not
/// exist: the child then deadlocks on its next `lock` (seen in
/// `the_child_of_a_fork_can_use_rcu` once grace periods took the registry
/// lock on every scan).
#[cfg(not(all(loom, test)))]
pub(crate) struct RawFutexMutex {
    state: std::sync::atomic::AtomicU32,
}

#[cfg(not(all(loom, test)))]
const UNLOCKED: u32 = 0;
#[cfg(not(all(loom, test)))]
const LOCKED: u32 = 1;
#[cfg(not(all(loom, test)))]
const CONTENDED: u32 = 2;

#[cfg(not(all(loom, test)))]
impl RawFutexMutex {
    #[cold]
    #[inline(never)]
    fn lock_contended(&self) {
        // A short spin first: the crate's critical sections are short.
        for _ in 0..100 {
            if self.state.load(Ordering::Relaxed) == UNLOCKED && self.try_lock_once() {
                return;
            }
            std::hint::spin_loop();
        }
        // Mark the lock contended; whoever unlocks it then wakes a waiter.
        // EINTR and spurious wake-ups loop.
        while self.state.swap(CONTENDED, Ordering::Acquire) != UNLOCKED {
            futex_wait(&self.state, CONTENDED, None);
        }
    }

    #[inline]
    fn try_lock_once(&self) -> bool {
        self.state
            .compare_exchange(UNLOCKED, LOCKED, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }
}

// SAFETY: `lock` and `try_lock` succeed only by moving `state` from
// UNLOCKED with Acquire ordering, and `unlock` stores UNLOCKED with Release
// ordering, so at most one holder exists and each sees the previous
// holder's writes. Guards are `!Send` (`GuardNoSend`): unlock happens on
// the locking thread, as futexes do not require but the guard contract
// states.
#[cfg(not(all(loom, test)))]
unsafe impl lock_api::RawMutex for RawFutexMutex {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawFutexMutex {
        state: std::sync::atomic::AtomicU32::new(UNLOCKED),
    };

    type GuardMarker = lock_api::GuardNoSend;

    #[inline]
    fn lock(&self) {
        if !self.try_lock_once() {
            self.lock_contended();
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.try_lock_once()
    }

    #[inline]
    unsafe fn unlock(&self) {
        if self.state.swap(UNLOCKED, Ordering::Release) == CONTENDED {
            // In a fork child, the parent's waiters are not there: this
            // wakes nobody.
            futex_wake(&self.state, 1);
        }
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) != UNLOCKED
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Mutex;
    use std::sync::Arc;

    #[test]
    fn the_futex_mutex_excludes_and_wakes_waiters() {
        let counter = Arc::new(Mutex::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        let mut c = counter.lock();
                        // A non-atomic read-modify-write, with a pause in
                        // the middle now and then to force sleepers.
                        let v = *c;
                        if i % 1000 == 0 {
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        }
                        *c = v + 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*counter.lock(), 80_000);
        assert!(!counter.is_locked());
        let g = counter.lock();
        assert!(counter.is_locked());
        assert!(counter.try_lock().is_none());
        drop(g);
        assert!(counter.try_lock().is_some());
    }
}

/// Writes a diagnostic to stderr, ignoring failure. `eprintln!` panics
/// when stderr is gone (a closed pipe), and a panic in the grace-period or
/// callback machinery would take it down with it; and std's stderr lock,
/// which a fork may copy held, would hang a fork child's report (see
/// `vmtask_percpu::warn`).
#[cfg_attr(loom, allow(dead_code))]
pub(crate) fn warn(message: std::fmt::Arguments<'_>) {
    vmtask_percpu::warn(message);
}
