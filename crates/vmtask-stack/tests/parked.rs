//! The stack each thread parks for its next allocation: reachable whichever
//! pool the thread used last, taken back with its deep pages released when
//! the thread exits, and safe against the pool being dropped meanwhile.

use vmtask_stack::{Config, StackPool};

mod common;
use common::{home, membarrier_available, on_cpu, page, resident_pages};

/// Pool P's only stack is parked on this thread while the thread's cached
/// pool is Q: `P.alloc()` must still find it (not report `Exhausted`).
#[test]
fn a_stack_parked_for_a_pool_other_than_the_last_used_is_found() {
    on_cpu(home(), || {
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
    on_cpu(home(), || {
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
    // The threads park on one CPU; the alloc below runs on another if this
    // process may use two (every magazine is empty by then either way).
    let cpus = vmtask_percpu::allowed_cpus();
    let (home, other) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    vmtask_percpu::pin_current_thread(home).unwrap();
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
    let held = on_cpu(other, || {
        // Empty magazine here -> alloc_slow -> depot empty -> reclaim orphans.
        let s = pool.alloc().unwrap();
        let st = pool.stats();
        eprintln!("{st}");
        (s.limit() as usize, st.in_depot)
    });
    assert_eq!(
        held.1,
        (n - 1) as u64,
        "the exited threads' other parked stacks went to the depot"
    );
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

/// A stack freed on a worker thread that stays alive is parked there: the
/// pool's only stack is free (live 0), and another thread's `alloc` must
/// get it rather than report the pool exhausted; `trim` must release its
/// deep pages (review finding).
#[test]
fn a_stack_parked_on_a_live_thread_is_allocatable_and_trimmed() {
    if !membarrier_available() {
        eprintln!("skipped: a stack parked on a live thread is taken only with membarrier");
        return;
    }
    let pool = StackPool::new(Config {
        max_stacks: 1,
        stack_size: 64 * 1024,
        keep_resident: 4096,
        ..Config::default()
    })
    .unwrap();
    std::thread::scope(|s| {
        // Made inside the scope: a failing check drops the sender, and
        // the worker does not wait for it forever.
        let (freed_tx, freed_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let pool = &pool;
        let worker = s.spawn(move || {
            let stack = pool.alloc().unwrap();
            // SAFETY: the stack's usable memory, ours.
            unsafe { std::ptr::write_bytes(stack.limit(), 1, stack.size()) };
            let range = (stack.limit() as usize, stack.size());
            drop(stack);
            freed_tx.send(range).unwrap();
            // A worker that stays alive, with the stack parked on it.
            let _ = done_rx.recv();
            // Its stack was taken: its next allocation finds none.
            pool.alloc().is_err()
        });
        let (limit, size) = freed_rx.recv().unwrap();
        assert_eq!(pool.stats().live, 0);
        assert_eq!(pool.stats().cached, 1, "parked on the worker");
        assert!(pool.trim() >= size - 4096, "trim released the parked stack");
        let resident = resident_pages(limit, size);
        assert!(resident <= 4096 / page(), "{resident} pages left resident");
        let stack = pool
            .alloc()
            .expect("the free stack parked on a live thread");
        assert_eq!(stack.limit() as usize, limit);
        done_tx.send(()).unwrap();
        assert!(
            worker.join().unwrap(),
            "the taken stack was handed out twice"
        );
        drop(stack);
    });
}
/// Threads take and park stacks without pause while another thread trims
/// (taking their parked stacks) and a small pool runs out (taking them
/// too): no stack is ever handed out twice, and at the end, with the
/// threads still alive, every slot can be allocated at once.
#[test]
fn stealing_parked_stacks_never_hands_one_out_twice() {
    if !membarrier_available() {
        eprintln!("skipped: a stack parked on a live thread is taken only with membarrier");
        return;
    }
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Mutex};
    const THREADS: usize = 3;
    let pool = StackPool::new(Config {
        max_stacks: THREADS,
        stack_size: 16 * 1024,
        cache_size: 2,
        ..Config::default()
    })
    .unwrap();
    let live = Mutex::new(HashSet::new());
    let (stop, trimming) = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|s| {
        // Channels made inside the scope, not barriers: a failing thread
        // drops its ends, and nobody waits for it forever.
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let mut release = Vec::new();
        let trimmer = s.spawn(|| {
            let mut trims = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pool.trim();
                trims += 1;
                trimming.store(true, Ordering::Relaxed);
            }
            trims
        });
        // The trims overlap the allocations (on a loaded machine the
        // workers could otherwise finish before the trimmer ever ran).
        while !trimming.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        for _ in 0..THREADS {
            let done_tx = done_tx.clone();
            let (release_tx, release_rx) = mpsc::channel::<()>();
            release.push(release_tx);
            let (pool, live) = (&pool, &live);
            s.spawn(move || {
                for _ in 0..20_000 {
                    let Ok(stack) = pool.alloc() else { continue };
                    let base = stack.base() as usize;
                    assert!(
                        live.lock().unwrap().insert(base),
                        "{base:#x} handed out twice"
                    );
                    // SAFETY: the top word of the stack we own.
                    unsafe { (stack.base() as *mut usize).sub(1).write(base) };
                    assert!(live.lock().unwrap().remove(&base));
                    drop(stack);
                }
                // Alive, each with a stack parked (or none), while the
                // main thread takes every slot.
                done_tx.send(()).unwrap();
                drop(done_tx);
                let _ = release_rx.recv();
            });
        }
        drop(done_tx);
        let finished = done_rx.iter().take(THREADS).count();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(finished, THREADS, "a thread failed");
        assert!(trimmer.join().unwrap() > 0);
        let stats = pool.stats();
        assert_eq!(stats.live, 0, "{stats}");
        let all: Vec<_> = (0..THREADS)
            .map(|i| pool.alloc().unwrap_or_else(|e| panic!("stack {i}: {e}")))
            .collect();
        let distinct: HashSet<_> = all.iter().map(|s| s.base() as usize).collect();
        assert_eq!(distinct.len(), THREADS);
        drop(all);
        drop(release);
    });
}

/// A pool's only user allocates and frees while another thread trims
/// (taking its parked stack): no allocation may fail, since the one stack
/// is always free when the user asks (review finding: 10–40% failed).
#[test]
fn a_concurrent_trim_never_makes_a_free_stack_look_exhausted() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pool = StackPool::new(Config {
        max_stacks: 1,
        stack_size: 16 * 1024,
        ..Config::default()
    })
    .unwrap();
    let (started, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let (failures, trims) = std::thread::scope(|s| {
        let trimmer = s.spawn(|| {
            let mut trims = 0u64;
            while !stop.load(Ordering::Relaxed) {
                pool.trim();
                trims += 1;
                started.store(true, Ordering::Relaxed);
            }
            trims
        });
        let user = s.spawn(|| {
            while !started.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            let mut failures = 0u64;
            for _ in 0..200_000 {
                match pool.alloc() {
                    Ok(stack) => drop(stack),
                    Err(_) => failures += 1,
                }
            }
            stop.store(true, Ordering::Relaxed);
            failures
        });
        (user.join().unwrap(), trimmer.join().unwrap())
    });
    assert_eq!(
        failures, 0,
        "{failures} allocations of a free stack failed ({trims} trims)"
    );
}

/// A fork copies a thread that was inside its unpark, `busy` set, but not
/// the thread: the child's `trim` (which takes parked stacks) must not wait
/// for it forever (review finding).
#[test]
fn trim_in_a_fork_child_does_not_wait_for_a_thread_the_fork_left_behind() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pool = StackPool::new(Config {
        stack_size: 16 * 1024,
        ..Config::default()
    })
    .unwrap();
    let (stop, started) = (AtomicBool::new(false), AtomicBool::new(false));
    let hung = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                drop(pool.alloc().unwrap());
                started.store(true, Ordering::Relaxed);
            }
        });
        // The allocating thread is going (not a 20 ms sleep for it).
        while !started.load(Ordering::Relaxed) {
            std::thread::yield_now();
        }
        let mut hung = 0;
        for _ in 0..300 {
            // SAFETY: the child only trims and _exits.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                // SAFETY: a timer that kills a hung child; then _exit.
                unsafe { libc::alarm(60) };
                pool.trim();
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(0) };
            }
            let mut status = 0;
            // SAFETY: waiting for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
                hung += 1;
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        hung
    });
    assert_eq!(
        hung, 0,
        "a fork child's trim hung (killed by its alarm) or failed"
    );
}

/// A pool that is really full answers `Exhausted` even while other
/// threads trim without pause: an exhausted alloc waits for running trims
/// for a bounded time (review finding: with four trimmers it waited as
/// long as they ran).
#[test]
fn an_exhausted_alloc_returns_while_trims_overlap() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let pool = StackPool::new(Config {
        max_stacks: 1,
        stack_size: 16 * 1024,
        ..Config::default()
    })
    .unwrap();
    let held = pool.alloc().unwrap();
    let (stop, trimming) = (AtomicBool::new(false), AtomicUsize::new(0));
    let (failed, took, outlasted) = std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                pool.trim();
                trimming.fetch_add(1, Ordering::SeqCst);
                while !stop.load(Ordering::Relaxed) {
                    pool.trim();
                }
            });
        }
        // Every trimmer is going (not a 20 ms sleep, which on a loaded
        // machine may end before any has run).
        while trimming.load(Ordering::SeqCst) < 4 {
            std::thread::yield_now();
        }
        // A valve: the trimmers stop after 120 s whatever happens; says
        // whether it was what stopped them.
        let valve = s.spawn(|| {
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(5));
            }
            !stop.swap(true, Ordering::Relaxed)
        });
        let mut failed = true;
        let mut took = Duration::ZERO;
        for _ in 0..3 {
            let start = Instant::now();
            failed &= pool.alloc().is_err();
            took = took.max(start.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        (failed, took, valve.join().unwrap())
    });
    drop(held);
    assert!(failed, "the pool's only stack is held");
    // The bug: the alloc waited as long as the trims ran (until the valve).
    // The pool bounds the wait at 1 s of wall time; the rest is room for a
    // machine where these five threads get a few percent of a CPU.
    assert!(
        !outlasted && took < Duration::from_secs(30),
        "an exhausted alloc took {took:?} while trims ran (outlasted them: {outlasted})"
    );
}

/// Writes every page of a stack.
fn touch_all(stack: &vmtask_stack::Stack) {
    let mut p = stack.limit();
    while p < stack.base() {
        // SAFETY: a page of the stack's usable memory, ours.
        unsafe { p.write_volatile(1) };
        p = p.wrapping_add(page());
    }
}

/// Two trims that overlap: one may hold the pool's only free stack while
/// the other ends. An alloc must still find it (review finding: half the
/// allocations failed).
#[test]
fn the_only_free_stack_is_found_while_trims_overlap() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};
    let pool = StackPool::new(Config {
        max_stacks: 1,
        stack_size: 4 << 20,
        keep_resident: 4096,
        ..Config::default()
    })
    .unwrap();
    let stop = AtomicBool::new(false);
    let (failures, allocs) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    pool.trim();
                }
            });
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            match pool.alloc() {
                Ok(stack) => {
                    touch_all(&stack);
                    allocs.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (failed, allocated) = (failures.into_inner(), allocs.into_inner());
    assert_eq!(
        failed,
        0,
        "{failed} of {} allocations failed",
        failed + allocated
    );
}

/// A trim that takes every free stack of a full pool and spends a while
/// releasing their pages: an alloc meanwhile waits for it rather than
/// report the pool exhausted (review finding: it gave up after 10 ms).
#[test]
fn an_alloc_during_a_long_trim_of_a_full_pool_finds_a_stack() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const N: usize = 16;
    let pool = StackPool::new(Config {
        max_stacks: N,
        stack_size: 4 << 20,
        keep_resident: 4096,
        cache_size: 64,
        ..Config::default()
    })
    .unwrap();
    let stacks: Vec<_> = (0..N).map(|_| pool.alloc().unwrap()).collect();
    stacks.iter().for_each(touch_all);
    drop(stacks); // all in the magazines or parked, none in the depot
    let (trimming, trimmed) = (AtomicBool::new(false), AtomicBool::new(false));
    let ok = std::thread::scope(|s| {
        let trimmer = s.spawn(|| {
            trimming.store(true, Ordering::SeqCst);
            pool.trim();
            trimmed.store(true, Ordering::SeqCst);
        });
        while !trimming.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        // Until the trim holds every free stack (or is already done: then
        // the stacks are back in the depot).
        while !trimmed.load(Ordering::SeqCst) && {
            let stats = pool.stats();
            stats.cached + stats.in_depot + stats.released > 0
        } {
            std::hint::spin_loop();
        }
        let ok = pool.alloc().is_ok();
        trimmer.join().unwrap();
        ok
    });
    assert!(ok, "an alloc failed while {N} stacks were free");
}
