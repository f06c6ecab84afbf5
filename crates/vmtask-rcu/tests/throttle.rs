//! The hard backlog limit: callers that queue faster than callbacks run
//! are made to wait (or to help run ready callbacks), so the backlog stays
//! near the limit. Alone in its binary: the limits are process-wide.

use std::sync::atomic::{AtomicU64, Ordering};

static RAN: AtomicU64 = AtomicU64::new(0);

#[test]
fn queuing_past_the_hard_limit_is_throttled() {
    const SOFT: usize = 1_000;
    const HARD: usize = 4_000;
    vmtask_rcu::set_backlog_limits(SOFT, HARD);
    assert_eq!(vmtask_rcu::backlog_limits(), (SOFT, HARD));
    let per_thread = 200_000u64;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    vmtask_rcu::call(|| {
                        RAN.fetch_add(1, Ordering::Relaxed);
                    });
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    vmtask_rcu::barrier();
    let stats = vmtask_rcu::stats();
    eprintln!("{stats}");
    assert_eq!(RAN.load(Ordering::Relaxed), 2 * per_thread);
    assert!(stats.expedited > 0, "the soft limit never triggered");
    assert!(stats.throttled > 0, "the hard limit never throttled");
    // Checked once per 256 callbacks per CPU: the bound has that much slack
    // per CPU.
    let slack = 256 * vmtask_percpu::possible_cpus() as u64 * 2;
    assert!(
        stats.backlog_high_water <= HARD as u64 + slack,
        "backlog reached {}, hard limit {HARD}",
        stats.backlog_high_water
    );
}
