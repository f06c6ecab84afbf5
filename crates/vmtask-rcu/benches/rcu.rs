//! vmtask-rcu against crossbeam-epoch 0.9 and seize 0.5, side by side.
//!
//! `cargo bench -p vmtask-rcu --bench rcu`
//!
//! The deferred-free figures time the whole life of an object: allocate a
//! boxed u64, retire it, and wait until its drop has run (a counter in
//! `Drop`), as the peers' figures in the issue were taken.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Padded: the count must not share a line with anything another thread
/// writes (that would time false sharing, not reclamation).
static FREED: crossbeam_utils::CachePadded<AtomicU64> =
    crossbeam_utils::CachePadded::new(AtomicU64::new(0));

struct Counted(#[allow(dead_code)] u64);
impl Drop for Counted {
    fn drop(&mut self) {
        FREED.fetch_add(1, Ordering::Relaxed);
    }
}

fn wait_freed(target: u64, mut poke: impl FnMut()) {
    while FREED.load(Ordering::Relaxed) < target {
        poke();
    }
}

/// The floor under any counter-based reader on this machine: liburcu's
/// memb lock and unlock reduced to their loads and stores (a thread-local
/// slot, no registration, no nesting, no fence mode), with a one-word guard
/// like `ReadGuard`.
mod floor {
    use std::sync::atomic::{compiler_fence, AtomicI32, AtomicUsize, Ordering::*};

    pub static GP: AtomicUsize = AtomicUsize::new(1);
    pub static FUTEX: AtomicI32 = AtomicI32::new(0);
    thread_local! {
        static SLOT: AtomicUsize = const { AtomicUsize::new(0) };
    }

    pub struct Guard(&'static AtomicUsize);

    #[inline(always)]
    pub fn lock() -> Guard {
        // SAFETY: the slot lives as long as the thread; the guard does not
        // leave the benchmark loop.
        let slot: &'static AtomicUsize = SLOT.with(|s| unsafe { &*(s as *const AtomicUsize) });
        if slot.load(Relaxed) == 0 {
            slot.store(GP.load(Relaxed), Relaxed);
            compiler_fence(SeqCst);
        }
        Guard(slot)
    }

    impl Drop for Guard {
        #[inline(always)]
        fn drop(&mut self) {
            compiler_fence(SeqCst);
            self.0.store(0, Relaxed);
            compiler_fence(SeqCst);
            if FUTEX.load(Relaxed) == -1 {
                panic!("no updater in this benchmark");
            }
        }
    }
}

fn read_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_side");
    g.bench_function("floor: bare memb lock+unlock", |b| {
        b.iter(|| drop(black_box(floor::lock())))
    });
    g.bench_function("vmtask_rcu read_lock+drop", |b| {
        b.iter(|| drop(black_box(vmtask_rcu::read_lock())))
    });
    g.bench_function("crossbeam_epoch pin+drop", |b| {
        b.iter(|| drop(black_box(crossbeam_epoch::pin())))
    });
    let collector = seize::Collector::new();
    g.bench_function("seize enter+leave", |b| {
        b.iter(|| drop(black_box(collector.enter())))
    });
    g.finish();
}

/// Per object, one thread: allocate, retire, wait for every free.
fn defer_one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("defer_free_1_thread");
    // The floor: the same allocation, drop and count with no deferral.
    g.bench_function("baseline Box::new+drop (no deferral)", |b| {
        b.iter_custom(|iters| {
            let target = FREED.load(Ordering::Relaxed) + iters;
            let start = Instant::now();
            for i in 0..iters {
                drop(black_box(Box::new(Counted(i))));
            }
            wait_freed(target, || {});
            start.elapsed()
        })
    });
    g.bench_function("vmtask_rcu defer_drop", |b| {
        b.iter_custom(|iters| {
            let target = FREED.load(Ordering::Relaxed) + iters;
            let start = Instant::now();
            for i in 0..iters {
                vmtask_rcu::defer_drop(Box::new(Counted(i)));
            }
            vmtask_rcu::barrier();
            wait_freed(target, || {});
            start.elapsed()
        })
    });
    g.bench_function("crossbeam_epoch defer_destroy", |b| {
        b.iter_custom(|iters| {
            let target = FREED.load(Ordering::Relaxed) + iters;
            let start = Instant::now();
            for i in 0..iters {
                let guard = crossbeam_epoch::pin();
                let owned = crossbeam_epoch::Owned::new(Counted(i)).into_shared(&guard);
                // SAFETY: never shared with anyone.
                unsafe { guard.defer_destroy(owned) };
            }
            wait_freed(target, || crossbeam_epoch::pin().flush());
            start.elapsed()
        })
    });
    let collector = seize::Collector::new();
    g.bench_function("seize retire", |b| {
        b.iter_custom(|iters| {
            let target = FREED.load(Ordering::Relaxed) + iters;
            let start = Instant::now();
            for i in 0..iters {
                let _guard = collector.enter();
                // SAFETY: never shared; allocated with Box.
                unsafe {
                    collector.retire(Box::into_raw(Box::new(Counted(i))), seize::reclaim::boxed)
                };
            }
            // SAFETY: no guard is active on any thread.
            unsafe { collector.reclaim_all() };
            wait_freed(target, || {});
            start.elapsed()
        })
    });
    g.finish();
}

/// Per object per thread, two threads retiring at once.
fn defer_two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("defer_free_2_threads");
    g.sample_size(20);
    fn run2(iters: u64, work: impl Fn(u64) + Send + Sync + 'static, drain: impl Fn()) -> Duration {
        let target = FREED.load(Ordering::Relaxed) + 2 * iters;
        let work = Arc::new(work);
        let start_line = Arc::new(Barrier::new(3));
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let work = work.clone();
                let start_line = start_line.clone();
                std::thread::spawn(move || {
                    let _ = vmtask_percpu::pin_current_thread(t);
                    start_line.wait();
                    for i in 0..iters {
                        work(i);
                    }
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for t in threads {
            t.join().unwrap();
        }
        drain();
        wait_freed(target, &drain);
        start.elapsed()
    }
    g.bench_function("vmtask_rcu defer_drop", |b| {
        b.iter_custom(|iters| {
            run2(
                iters,
                |i| vmtask_rcu::defer_drop(Box::new(Counted(i))),
                vmtask_rcu::barrier,
            )
        })
    });
    g.bench_function("crossbeam_epoch defer_destroy", |b| {
        b.iter_custom(|iters| {
            run2(
                iters,
                |i| {
                    let guard = crossbeam_epoch::pin();
                    let owned = crossbeam_epoch::Owned::new(Counted(i)).into_shared(&guard);
                    // SAFETY: never shared with anyone.
                    unsafe { guard.defer_destroy(owned) };
                },
                || crossbeam_epoch::pin().flush(),
            )
        })
    });
    let collector: &'static seize::Collector = Box::leak(Box::new(seize::Collector::new()));
    g.bench_function("seize retire", |b| {
        b.iter_custom(|iters| {
            run2(
                iters,
                |i| {
                    let _guard = collector.enter();
                    // SAFETY: never shared; allocated with Box.
                    unsafe {
                        collector.retire(Box::into_raw(Box::new(Counted(i))), seize::reclaim::boxed)
                    };
                },
                // SAFETY: the worker threads have exited; no guard is active.
                || unsafe { collector.reclaim_all() },
            )
        })
    });
    g.finish();
}

fn synchronize(c: &mut Criterion) {
    let mut g = c.benchmark_group("synchronize");
    let _ = vmtask_percpu::pin_current_thread(0);
    g.bench_function("no readers", |b| b.iter(vmtask_rcu::synchronize));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = vmtask_percpu::pin_current_thread(1);
            while !stop.load(Ordering::Relaxed) {
                let guard = vmtask_rcu::read_lock();
                for _ in 0..20 {
                    std::hint::spin_loop();
                }
                drop(guard);
            }
        })
    };
    g.bench_function("one reader on the other CPU", |b| {
        b.iter(vmtask_rcu::synchronize)
    });
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    // A registered thread that sleeps outside any section: the grace
    // period cannot see it begin a section, so it takes the full protocol
    // (a `membarrier` that interrupts no other CPU, since the thread is
    // not running), after the scans of a fast attempt that gives up.
    let (registered, wait_registered) = std::sync::mpsc::channel();
    let (stop_idle, wait_stop) = std::sync::mpsc::channel::<()>();
    let idle = std::thread::spawn(move || {
        drop(vmtask_rcu::read_lock());
        registered.send(()).unwrap();
        let _ = wait_stop.recv();
    });
    wait_registered.recv().unwrap();
    g.bench_function("one idle registered thread, blocked", |b| {
        b.iter(vmtask_rcu::synchronize)
    });
    stop_idle.send(()).unwrap();
    idle.join().unwrap();
    g.finish();
}

#[repr(C)]
struct Node {
    head: vmtask_rcu::RcuHead,
}

static INVOKED: AtomicU64 = AtomicU64::new(0);

/// Counts a callback; the heads live in a vector the benchmark frees.
///
/// # Safety
/// None needed: the head is not touched. `unsafe` only to have the type
/// `call_intrusive` takes.
unsafe fn count_node(_head: *mut vmtask_rcu::RcuHead) {
    INVOKED.fetch_add(1, Ordering::Relaxed);
}

fn call_intrusive(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_intrusive");
    g.bench_function("queue+invoke per callback", |b| {
        b.iter_custom(|iters| {
            let mut nodes: Vec<Node> = (0..iters)
                .map(|_| Node {
                    head: vmtask_rcu::RcuHead::new(),
                })
                .collect();
            let start = Instant::now();
            for node in nodes.iter_mut() {
                // SAFETY: the node outlives the barrier below and is not
                // touched until its callback ran.
                unsafe { vmtask_rcu::call_intrusive(&mut node.head, count_node) };
            }
            vmtask_rcu::barrier();
            let elapsed = start.elapsed();
            drop(nodes);
            elapsed
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    read_side,
    defer_one_thread,
    defer_two_threads,
    synchronize,
    call_intrusive
);
criterion_main!(benches);
