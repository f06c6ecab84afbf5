//! `synchronize()`: grace periods, shared between concurrent callers.
//!
//! `GP_SEQ` counts grace-period boundaries the kernel's way (`rcu_seq`):
//! odd while one runs, +2 per grace period. A caller takes a snapshot,
//! the value `GP_SEQ` must reach for a grace period that *began after the
//! call* to have completed: `(seq + 3) & !1`. It then takes `GP_LOCK` and
//! runs a grace period only if nobody has reached the snapshot meanwhile.
//! Callers queued on the lock while one grace period runs are all served
//! by the next one: N concurrent callers cost at most two grace periods.

use crate::sync::Mutex;
use crossbeam_utils::CachePadded;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::gp::{self, GpWord, Updater};
use crate::registry;
use crate::sync::AtomicI32;

// Statics written while other threads run are cache-padded, so that no
// thread's hot data (ours or the program's own statics) shares a line
// with them: false sharing with a counter the callback thread bumps once a
// grace period cost one caller 10 ns per `defer_drop`.
pub(crate) static GP: CachePadded<GpWord> = CachePadded::new(GpWord::new());
static GP_LOCK: CachePadded<Mutex<()>> = CachePadded::new(Mutex::new(()));
static GP_SEQ: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));

pub(crate) static GP_COUNT: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static GP_NANOS_TOTAL: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static GP_NANOS_MAX: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));

/// Scans of the pending readers before the updater sleeps on the futex.
const SPINS: usize = 1000;
/// A sleeping updater re-checks at least this often (a reader that
/// leaked its slot by other means than thread exit cannot stall us
/// silently; one that is genuinely long just costs a wake-up).
const SLEEP_TIMEOUT: Duration = Duration::from_millis(10);

/// Sleeps while `futex` holds -1, for at most `timeout`. Returns false if
/// the timeout ended the sleep, true if a wake-up or a changed value did.
///
/// A signal delivered to the sleeping thread (`EINTR`) is neither: the
/// sleep goes on for the rest of the timeout. Taking it for a wake-up made
/// `wait_for_readers` conclude that some other reader had woken it, and
/// poll from then on, so a signal storm cost every later wake-up.
fn futex_sleep(futex: &AtomicI32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let left = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on a live, aligned i32 with a valid timespec;
        // the kernel only reads both. Returns at once if the value is no
        // longer -1 (a reader already woke us).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_futex,
                futex.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                -1,
                &left as *const libc::timespec,
            )
        };
        if rc == 0 {
            return true;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ETIMEDOUT) => return false,
            Some(libc::EINTR) => continue,
            // EAGAIN: the value is no longer -1.
            _ => return true,
        }
    }
}

struct Real;

impl Updater for Real {
    type Reader = &'static registry::Slot;

    fn heavy_barrier(&self) {
        crate::fence::heavy_barrier();
    }

    fn scan_readers<R>(&self, scan: impl FnOnce(&dyn Fn(Self::Reader) -> Option<usize>) -> R) -> R {
        registry::scan_readers(scan)
    }

    fn sleep(&self, futex: &AtomicI32) -> bool {
        futex_sleep(futex, SLEEP_TIMEOUT)
    }

    fn nap(&self, time: Duration) {
        std::thread::sleep(time);
    }

    fn spins(&self) -> usize {
        SPINS
    }

    fn fast_scans(&self) -> gp::FastScans {
        gp::FAST_SCANS
    }

    fn report_stall(&self) {
        static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !REPORTED.swap(true, Ordering::Relaxed) {
            crate::sync::warn(format_args!(
                "vmtask_rcu: a grace period has waited more than {} s for a reader; a thread may \
                 have leaked a ReadGuard (or ended inside a read-side section), which stalls \
                 every later grace period",
                STALL_AFTER.as_secs()
            ));
        }
    }

    fn stall_after(&self) -> Duration {
        STALL_AFTER
    }
}

/// How long one wait for readers lasts before a grace period reports a
/// stall (once per process).
const STALL_AFTER: Duration = Duration::from_secs(1);

/// Wakes an updater sleeping in `wait_for_readers` (`wake_up_gp`).
#[cold]
pub(crate) fn wake_updater() {
    if GP.futex.load(Ordering::Relaxed) == -1 {
        GP.futex.store(0, Ordering::Relaxed);
        // SAFETY: FUTEX_WAKE on a live, aligned i32; no memory is written.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                GP.futex.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                1,
            );
        }
    }
}

/// The sequence value at which a grace period that starts after now has
/// completed.
pub(crate) fn snapshot() -> u64 {
    // Order the caller's earlier stores (the unlink) before reading the
    // sequence: if we see "no grace period running", the next one starts
    // after our stores.
    fence(Ordering::SeqCst);
    (GP_SEQ.load(Ordering::SeqCst) + 3) & !1
}

/// Whether the grace period of `snap` has completed.
pub(crate) fn done(snap: u64) -> bool {
    GP_SEQ.load(Ordering::Acquire) >= snap
}

/// Waits for the grace period of `snap`, running it if nobody else does.
pub(crate) fn wait(snap: u64) {
    while !done(snap) {
        let _lock = GP_LOCK.lock();
        if done(snap) {
            break;
        }
        run_one();
    }
}

/// Rolls a grace period that unwinds or is given up (`try_expedite`) back
/// to "not started" (as the fork child does), so the sequence count stays
/// even when none runs: counting it complete would end it under its
/// readers, and leaving the count odd would invert every later snapshot's
/// parity. A snapshot taken while it ran then needs two more grace
/// periods instead of one: late, never early.
struct Unfinished;

impl Drop for Unfinished {
    fn drop(&mut self) {
        GP_SEQ.fetch_sub(1, Ordering::SeqCst);
    }
}

/// In tests: a grace period that starts now and is given up when the
/// guard drops (the sequence count odd meanwhile, then rolled back, as
/// `try_expedite` does), holding the grace-period lock throughout.
#[cfg(all(test, not(loom)))]
pub(crate) struct GivenUp {
    // Fields drop in order: the count rolls back before the lock goes.
    _unfinished: Unfinished,
    _lock: lock_api::MutexGuard<'static, crate::sync::RawFutexMutex, ()>,
}

#[cfg(all(test, not(loom)))]
pub(crate) fn given_up_grace_period() -> GivenUp {
    let lock = GP_LOCK.lock();
    GP_SEQ.fetch_add(1, Ordering::SeqCst);
    GivenUp {
        _unfinished: Unfinished,
        _lock: lock,
    }
}

/// What [`try_expedite`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expedite {
    /// The grace period has completed (now or before).
    Done,
    /// Another thread is running a grace period.
    Busy,
    /// A reader was in a section that did not end within the scans: given
    /// up. The phase may be left flipped (harmless, see
    /// `gp::try_grace_period`), and snapshots taken meanwhile need one more
    /// grace period than they would have.
    Readers,
}

/// Scans of the readers an expedited grace period makes per wait before
/// giving up (a few µs at most: each scan ends with a spin hint).
const EXPEDITE_SCANS: usize = 32;

/// Grace periods that completed by `gp::fast_grace_period`.
pub(crate) static FAST_GRACE_PERIODS: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));

/// Grace periods run by [`try_expedite`], and those it gave up.
pub(crate) static OWNER_GRACE_PERIODS: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static OWNER_GIVEN_UP: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));

/// Completes the grace period of `snap` on the calling thread if that
/// needs no waiting: nobody else is running one, and every reader that is
/// in a section leaves it within a few scans. Never blocks and never
/// sleeps; what it cannot finish it gives up.
///
/// Why: a deferring thread whose batches are due would otherwise wake the
/// callback thread, and that thread's grace period interrupts the
/// deferring thread (`membarrier`). Run by the deferring thread,
/// the grace period skips that thread's own slot, and with no other
/// reader registered it costs no barrier at all; nor with readers that
/// all run sections back to back (`gp::fast_grace_period`, tried first).
/// Measured on the
/// project's machine: 3.7–7 µs of the deferring thread's time per grace
/// period the callback thread ran (BENCHMARKS.md).
///
/// Never call it inside a read-side section: the caller's own slot would
/// count as a reader, and the attempt would always be given up.
pub(crate) fn try_expedite(snap: u64) -> Expedite {
    if done(snap) {
        return Expedite::Done;
    }
    let Some(_lock) = GP_LOCK.try_lock() else {
        return Expedite::Busy;
    };
    // Under the lock no grace period runs, so `GP_SEQ` is even and a
    // snapshot taken so far is at most two ahead of it, or four if it was
    // taken while a grace period ran that was then given up: two grace
    // periods at most.
    while !done(snap) {
        let finished =
            run_with(|readers| gp::try_grace_period(&GP, readers, &Real, EXPEDITE_SCANS));
        if !finished {
            OWNER_GIVEN_UP.fetch_add(1, Ordering::Relaxed);
            return Expedite::Readers;
        }
        // Release, after `run_with` counted it in `GP_COUNT`: `stats()`
        // reads this first, with acquire, and so never shows more owner
        // grace periods than all (review finding).
        OWNER_GRACE_PERIODS.fetch_add(1, Ordering::Release);
    }
    Expedite::Done
}

fn run_one() {
    let finished = run_with(|readers| Some(gp::grace_period(&GP, readers, &Real)));
    debug_assert!(finished, "a full grace period always finishes");
}

/// Runs one grace period with `grace_period` (over the registered
/// readers other than the caller), holding `GP_LOCK`. If `grace_period`
/// gives up (returns `None`), the sequence count rolls back to "not
/// started": the next grace period is a whole new one. Whether it
/// completed.
fn run_with(
    grace_period: impl FnOnce(&[&'static registry::Slot]) -> Option<gp::Completed>,
) -> bool {
    let start = Instant::now();
    GP_SEQ.fetch_add(1, Ordering::SeqCst);
    // A SeqCst fence after the count, before the snapshot (review
    // finding): a reader that registers after the snapshot takes the
    // registry lock after us, so this fence happens before its loads. In
    // the C++ model, a caller whose `snapshot` (fence, then a load of
    // `GP_SEQ`) read the count before our increment then has its fence,
    // and its updates before it, ordered before this one, and so before
    // that reader's loads. The increment alone, a read-modify-write and
    // not a fence, does not give that (x86-64 and AArch64 do anyway).
    fence(Ordering::SeqCst);
    let unfinished = Unfinished;
    let mut readers = Vec::new();
    registry::snapshot(&mut readers);
    // Our own slot, if quiescent, needs no waiting: our own accesses are
    // ordered by program order. If it is inside a section (the callback
    // thread after a callback leaked a guard; user callers are refused
    // earlier), the grace period waits for it like any other: forever,
    // which `report_stall` makes loud, rather than end under a reader.
    if let Some(me) = registry::current_if_registered() {
        if !crate::in_read_section() {
            readers.retain(|slot| !std::ptr::eq(*slot, me));
        }
    }
    // With no other registered thread there is no reader to wait for: a
    // thread that registers after the snapshot took the registry lock
    // after us, so its sections begin after the caller's updates and
    // after those of every caller this grace period serves (the lock's
    // release/acquire, and the fence above). Otherwise the fast path or the full
    // protocol, even for readers that look quiescent now.
    let completed = if readers.is_empty() {
        None
    } else {
        match grace_period(&readers) {
            // `unfinished` rolls the count back.
            None => return false,
            completed => completed,
        }
    };
    std::mem::forget(unfinished);
    GP_SEQ.fetch_add(1, Ordering::SeqCst);
    let nanos = start.elapsed().as_nanos() as u64;
    GP_COUNT.fetch_add(1, Ordering::Relaxed);
    if completed == Some(gp::Completed::Fast) {
        // Release, after the count: `stats()` reads this first, with
        // acquire, and so never shows more fast grace periods than all.
        FAST_GRACE_PERIODS.fetch_add(1, Ordering::Release);
    }
    GP_NANOS_TOTAL.fetch_add(nanos, Ordering::Relaxed);
    GP_NANOS_MAX.fetch_max(nanos, Ordering::Relaxed);
    true
}

/// Panics if the calling thread is inside a read-side section: waiting
/// there for a grace period would wait for ourselves, forever.
#[track_caller]
pub(crate) fn assert_not_reading(what: &str) {
    if crate::in_read_section() {
        panic!(
            "vmtask_rcu::{what} called inside an RCU read-side critical section: it would wait \
             for this thread's own read_lock guard and deadlock; drop the guard first"
        );
    }
}

/// Waits until every read-side section that began before this call has
/// ended (`synchronize_rcu`).
///
/// Concurrent callers share grace periods. With no other registered
/// thread it returns in about 0.2 µs. Otherwise a grace period first
/// flips the phase and watches the readers' slots for up to a few
/// microseconds: when every reader is seen to begin a section after the
/// flip (threads that run short sections back to back, each on its own
/// CPU), it is over, with no system call
/// ([`Stats::fast_grace_periods`](crate::Stats::fast_grace_periods); on
/// 64-bit targets, in membarrier mode). When some reader looks idle or
/// is not running, that proves nothing without a barrier on its CPU, and
/// the grace period costs one `membarrier` call (an
/// interrupt of every CPU running one of our threads: 0.2 µs alone,
/// 1–20 µs with a reader running on the other CPU of the project's
/// machine) plus the wait for readers, and one more `membarrier` each
/// time that wait goes to sleep on a reader in a long section.
///
/// ```
/// use std::sync::atomic::{AtomicPtr, Ordering};
///
/// static CONFIG: AtomicPtr<u32> = AtomicPtr::new(std::ptr::null_mut());
/// CONFIG.store(Box::into_raw(Box::new(1)), Ordering::Release);
///
/// let reader = std::thread::spawn(|| {
///     let _guard = vmtask_rcu::read_lock();
///     let p = CONFIG.load(Ordering::Acquire);
///     // SAFETY: published by a Box and freed only after a grace period,
///     // which cannot end while `_guard` lives.
///     assert!(unsafe { *p } >= 1);
/// });
/// // Unpublish, wait for every reader that might still see the old
/// // value, then free it at once.
/// let old = CONFIG.swap(Box::into_raw(Box::new(2)), Ordering::AcqRel);
/// vmtask_rcu::synchronize();
/// // SAFETY: unpublished, and no reader that saw it is left.
/// drop(unsafe { Box::from_raw(old) });
/// reader.join().unwrap();
/// ```
///
/// # Panics
/// If called inside a read-side section (it would deadlock).
pub fn synchronize() {
    assert_not_reading("synchronize");
    wait(snapshot());
}

/// In the fork child: no thread can be holding the lock or running a grace
/// period any more.
pub(crate) fn after_fork_child() {
    if GP_LOCK.is_locked() {
        // SAFETY: the thread that held the lock does not exist in the child;
        // nothing else can release it.
        unsafe { GP_LOCK.force_unlock() };
    }
    // A grace period in progress at the fork did not finish: roll it back
    // to "not started", so whoever needs it runs a new one in the child.
    // (Counting it complete would be wrong if the forking thread is inside
    // a read-side section the grace period was waiting for.)
    let seq = GP_SEQ.load(Ordering::Relaxed);
    if seq & 1 == 1 {
        GP_SEQ.store(seq - 1, Ordering::Relaxed);
    }
    GP.futex.store(0, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Arc;

    static DELIVERED: AtomicUsize = AtomicUsize::new(0);

    extern "C" fn count_signal(_: libc::c_int) {
        DELIVERED.fetch_add(1, Ordering::Relaxed);
    }

    /// A signal storm on the sleeping updater is not a wake-up: the sleep
    /// lasts its whole timeout (it returned `true` at the first `EINTR`).
    #[test]
    fn signals_do_not_end_the_sleep() {
        let signal = libc::SIGRTMIN() + 5;
        // SAFETY: an all-zero sigaction is valid to fill in; the handler
        // only bumps an atomic, and no SA_RESTART, so a futex wait that a
        // signal interrupts returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
        }
        let futex = AtomicI32::new(-1);
        // SAFETY: pthread_self has no preconditions.
        let sleeper = unsafe { libc::pthread_self() } as usize;
        let done = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let storm = std::thread::spawn({
            let (done, started) = (done.clone(), started.clone());
            move || loop {
                // SAFETY: the sleeper joins this thread before it returns,
                // so its pthread_t stays valid meanwhile.
                unsafe { libc::pthread_kill(sleeper as libc::pthread_t, signal) };
                started.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
        });
        // The storm has begun (a storm thread given no CPU during the
        // sleep would send nothing: test audit).
        while !started.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        let timeout = Duration::from_millis(40);
        let start = Instant::now();
        let woken = futex_sleep(&futex, timeout);
        let slept = start.elapsed();
        done.store(true, Ordering::Relaxed);
        storm.join().unwrap();
        assert!(
            DELIVERED.load(Ordering::Relaxed) > 0,
            "no signal reached the sleeping thread"
        );
        assert!(!woken, "a signal was taken for a wake-up after {slept:?}");
        assert!(slept >= timeout, "slept {slept:?} of {timeout:?}");
    }

    #[test]
    fn a_changed_value_or_a_wake_ends_the_sleep() {
        let futex = AtomicI32::new(0);
        assert!(futex_sleep(&futex, Duration::from_secs(10)));
        let futex = Arc::new(AtomicI32::new(-1));
        let waker = std::thread::spawn({
            let futex = futex.clone();
            move || {
                std::thread::sleep(Duration::from_millis(20));
                futex.store(0, Ordering::Relaxed);
                // SAFETY: FUTEX_WAKE on a live, aligned i32.
                unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        futex.as_ptr(),
                        libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                        1,
                    )
                };
            }
        });
        assert!(futex_sleep(&futex, Duration::from_secs(10)));
        waker.join().unwrap();
    }
}
