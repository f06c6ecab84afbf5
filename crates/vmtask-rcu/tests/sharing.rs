//! Concurrent `synchronize` callers share grace periods. Alone in its
//! binary: other tests' grace periods would blur the count.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Whether thread `tid` of this process is asleep (state `S`).
fn asleep(tid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('S')))
        .unwrap_or(false)
}

#[test]
fn concurrent_synchronize_callers_share_grace_periods() {
    // A reader holds a section until every caller has arrived, so they all
    // queue behind the first grace period.
    let (entered_tx, entered) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let guard = vmtask_rcu::read_lock();
        entered_tx.send(()).unwrap();
        let _ = released.recv();
        drop(guard);
    });
    entered.recv().unwrap();
    let before = vmtask_rcu::stats().grace_periods;
    let (tid_tx, tids) = mpsc::channel();
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let tid_tx = tid_tx.clone();
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tid_tx.send(unsafe { libc::gettid() }).unwrap();
                vmtask_rcu::synchronize();
            })
        })
        .collect();
    // Arrived: each caller sleeps in `synchronize` (on the grace-period
    // lock, or running the first grace period and waiting for the reader),
    // not a fixed 200 ms that a caller still waiting for a CPU outlasts.
    let tids: Vec<libc::pid_t> = tids.iter().take(8).collect();
    let start = Instant::now();
    while !tids.iter().all(|&t| asleep(t)) && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(release);
    for t in callers {
        t.join().unwrap();
    }
    reader.join().unwrap();
    let used = vmtask_rcu::stats().grace_periods - before;
    eprintln!("8 concurrent synchronize calls took {used} grace periods");
    // The first caller's grace period, and at most one more for everyone
    // who arrived while it ran.
    assert!(
        (1..=2).contains(&used),
        "8 callers took {used} grace periods"
    );
}
