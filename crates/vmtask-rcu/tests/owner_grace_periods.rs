//! A thread whose deferred drops are due runs their grace period itself
//! when it can finish one without waiting (`stats().owner_grace_periods`),
//! and gives it up, without blocking and without freeing anything early,
//! when a reader stays in its section. Alone in its binary: the tests
//! compare process-wide counters, one test at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Bag size of `defer_drop` batches (`bag::BAG_CAPACITY`), and how many
/// bags wait before their grace period is due (`MAX_WAITING_URGENT`).
const PER_BAG: usize = 126;
const DUE_AT_BAGS: usize = 32;

static DROPPED: AtomicUsize = AtomicUsize::new(0);

struct Tracked;
impl Drop for Tracked {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_deferring_thread_runs_its_due_grace_periods_itself() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    vmtask_rcu::barrier();
    let before = vmtask_rcu::stats();
    let dropped = DROPPED.load(Ordering::Relaxed);
    let n = 100 * DUE_AT_BAGS * PER_BAG;
    for _ in 0..n {
        vmtask_rcu::defer_drop(Box::new(Tracked));
    }
    let during = vmtask_rcu::stats();
    vmtask_rcu::barrier();
    assert_eq!(DROPPED.load(Ordering::Relaxed) - dropped, n);
    assert!(
        during.owner_grace_periods > before.owner_grace_periods,
        "no reader was in the way, yet the deferring thread ran no grace period: {during}"
    );
    assert_eq!(
        during.owner_grace_periods_given_up, before.owner_grace_periods_given_up,
        "no reader was in a section, yet a grace period was given up: {during}"
    );
}

#[test]
fn a_reader_in_its_section_makes_the_deferring_thread_give_up_not_wait() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    vmtask_rcu::barrier();
    let before = vmtask_rcu::stats();
    let dropped = DROPPED.load(Ordering::Relaxed);
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let guard = vmtask_rcu::read_lock();
        entered_tx.send(()).unwrap();
        // Bounded, so that a deferring thread that wrongly blocks on this
        // section fails the test instead of hanging it.
        let released = release_rx.recv_timeout(Duration::from_secs(20)).is_ok();
        drop(guard);
        released
    });
    entered.recv().unwrap();
    // Past the point where the grace period is due, short of the bound
    // where the deferring thread waits for it (64 bags).
    let n = (DUE_AT_BAGS + 8) * PER_BAG;
    for _ in 0..n {
        vmtask_rcu::defer_drop(Box::new(Tracked));
    }
    let during = vmtask_rcu::stats();
    assert_eq!(
        DROPPED.load(Ordering::Relaxed) - dropped,
        0,
        "an object deferred during the reader's section was dropped inside it"
    );
    // One attempt given up, and no retry while the reader stays; or none
    // at all, if the thread was held up long enough (1 ms) for the callback
    // thread to start its own grace period, which then waits for the
    // reader while holding the grace-period lock.
    let given_up = during.owner_grace_periods_given_up - before.owner_grace_periods_given_up;
    assert!(given_up <= 1, "{given_up} attempts given up: {during}");
    release.send(()).unwrap();
    assert!(
        reader.join().unwrap(),
        "defer_drop blocked on the reader's section"
    );
    vmtask_rcu::barrier();
    assert_eq!(DROPPED.load(Ordering::Relaxed) - dropped, n);
}
