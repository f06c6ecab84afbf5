//! The stack each thread parks for its next allocation: reachable whichever
//! pool the thread used last, taken back with its deep pages released when
//! the thread exits, and safe against the pool being dropped meanwhile.

use vmtask_stack::{Config, StackPool};

mod common;
use common::{on_cpu, page, resident_pages};

/// Pool P's only stack is parked on this thread while the thread's cached
/// pool is Q: `P.alloc()` must still find it (not report `Exhausted`).
#[test]
fn a_stack_parked_for_a_pool_other_than_the_last_used_is_found() {
    on_cpu(0, || {
        let p = StackPool::new(Config {
            max_stacks: 1,
            ..Config::default()
        })
        .unwrap();
        let q = StackPool::new(Config::default()).unwrap();
        // P: carve (slow path, cache not targeted), free to CPU 0's magazine,
        // magazine hit (first_hit targets P), free -> parked on P's record.
        drop(p.alloc().unwrap());
        drop(p.alloc().unwrap());
        // Q: same dance; its first_hit re-targets the cache to Q.
        drop(q.alloc().unwrap());
        drop(q.alloc().unwrap());
        let stats = p.stats();
        assert_eq!(
            (stats.live, stats.cached, stats.slots_carved),
            (0, 1, 1),
            "{stats}"
        );
        p.trim();
        let after_trim = p.stats();
        let got = p.alloc();
        assert!(
            got.is_ok(),
            "P has one free stack (live {} cached {}, after trim cached {}), yet alloc failed: {:?}",
            stats.live,
            stats.cached,
            after_trim.cached,
            got.as_ref().err()
        );
    });
}

/// A thread alternating between two pools needs one slot of each.
#[test]
fn alternating_pools_carve_one_slot_each() {
    on_cpu(0, || {
        let p = StackPool::new(Config::default()).unwrap();
        let q = StackPool::new(Config::default()).unwrap();
        for _ in 0..4 {
            drop(p.alloc().unwrap());
            drop(p.alloc().unwrap());
            drop(q.alloc().unwrap());
            drop(q.alloc().unwrap());
        }
        let (ps, qs) = (p.stats(), q.stats());
        assert_eq!(
            (ps.slots_carved, qs.slots_carved),
            (1, 1),
            "one stack at a time per pool on one thread:\n{ps}\n{qs}"
        );
    });
}

/// Stacks parked on exited threads go to the depot like any other: their
/// pages below `keep_resident` released.
#[test]
fn stacks_of_exited_threads_enter_the_depot_with_deep_pages_released() {
    let keep = 8 * 1024;
    let pool = StackPool::new(Config {
        stack_size: 64 * 1024,
        keep_resident: keep,
        ..Config::default()
    })
    .unwrap();
    let n = 4;
    let lock = std::sync::Mutex::new(());
    let barrier = std::sync::Barrier::new(n);
    let slots = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    vmtask_percpu::pin_current_thread(0).unwrap();
                    let y = {
                        let _g = lock.lock().unwrap();
                        drop(pool.alloc().unwrap());
                        pool.alloc().unwrap() // a magazine hit: cache targets pool
                    };
                    barrier.wait();
                    // SAFETY: the stack's usable memory.
                    unsafe { std::ptr::write_bytes(y.limit(), 1, y.size()) };
                    slots.lock().unwrap().push((y.limit() as usize, y.size()));
                    drop(y); // parked
                })
            })
            .collect();
        // An explicit join also waits for the threads' locals to be
        // destroyed (the scope's implicit wait does not): the threads have
        // exited, their stacks still parked.
        for thread in threads {
            thread.join().unwrap();
        }
    });
    let stats = pool.stats();
    assert_eq!((stats.live, stats.cached), (0, n as u64), "{stats}");
    let held = on_cpu(1.min(vmtask_percpu::possible_cpus() - 1), || {
        // Empty magazine here -> alloc_slow -> depot empty -> reclaim orphans.
        let s = pool.alloc().unwrap();
        let st = pool.stats();
        eprintln!("{st}");
        (s.limit() as usize, st.in_depot)
    });
    let _ = held;
    let resident: usize = slots
        .lock()
        .unwrap()
        .iter()
        .filter(|&&(l, _)| l != held.0)
        .map(|&(l, sz)| resident_pages(l, sz))
        .sum();
    assert!(
        resident <= (n - 1) * keep / page(),
        "depot stacks keep {resident} pages, more than keep_resident ({} each)",
        keep / page()
    );
}

/// Stress (expected to pass): a thread parks its stack while the pool is
/// dropped on another thread; the pool must either leak or unmap with the
/// stack counted, and the parking thread must not touch it afterwards.
#[test]
fn park_racing_pool_drop_stress() {
    for i in 0..2000 {
        let pool = std::sync::Arc::new(
            StackPool::new(Config {
                zero_on_reuse: i % 2 == 0,
                stack_size: 16 * 1024,
                ..Config::default()
            })
            .unwrap(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let b = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                drop(pool.alloc().unwrap());
                let s = pool.alloc().unwrap(); // maybe a hit: cache targets pool
                drop(pool);
                tx.send(()).unwrap();
                drop(s); // races the drop below
            })
        };
        rx.recv().unwrap();
        drop(std::sync::Arc::into_inner(pool).unwrap());
        b.join().unwrap();
    }
}
