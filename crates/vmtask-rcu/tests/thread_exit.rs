//! Readers live in thread-local storage: what happens to sections when a
//! thread's registration ends, and grace periods racing thread exits.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmtask_rcu::*;

mod child;
#[path = "../../../test-support/knobs.rs"]
mod knobs;
use child::in_child;

/// Runs `f` from a thread-local destructor of a fresh thread that is
/// destroyed after the thread's RCU registration (it is created first), and
/// returns what `f` returned.
fn from_late_destructor<R: Send + 'static>(f: fn() -> R) -> R {
    struct Late<R: Send + 'static> {
        f: Option<fn() -> R>,
        out: Arc<std::sync::Mutex<Option<R>>>,
    }
    impl<R: Send + 'static> Drop for Late<R> {
        fn drop(&mut self) {
            if let Some(f) = self.f.take() {
                *self.out.lock().unwrap() = Some(f());
            }
        }
    }
    thread_local! {
        static LATE: std::cell::RefCell<Option<Box<dyn std::any::Any>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = Arc::new(std::sync::Mutex::new(None));
    let o = out.clone();
    std::thread::spawn(move || {
        // Initialised before the registration, so destroyed after it.
        LATE.with(|l| {
            *l.borrow_mut() = Some(Box::new(Late { f: Some(f), out: o }));
        });
        drop(read_lock());
        // And after the thread-locals `barrier` keeps.
        barrier();
    })
    .join()
    .unwrap();
    let r = out.lock().unwrap().take();
    r.expect("the destructor ran")
}

#[test]
fn a_section_opened_after_the_registration_ended_is_a_real_section() {
    let (inside, refused, after) = from_late_destructor(|| {
        let outer = read_lock();
        let inner = read_lock();
        let inside = in_read_section();
        // Waiting for ourselves would deadlock: refused with a panic.
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(synchronize)).is_err();
        drop(outer);
        let still = in_read_section();
        drop(inner);
        (inside && still, refused, in_read_section())
    });
    assert!(inside, "a late section must count as a read-side section");
    assert!(refused, "synchronize inside a late section must panic");
    assert!(!after, "the late section must end with its last guard");
    // Its temporary slot went back: grace periods do not wait for it.
    synchronize();
}

static GONE: AtomicBool = AtomicBool::new(false);
static MAY_END: AtomicBool = AtomicBool::new(false);
static FREED: AtomicBool = AtomicBool::new(false);
static FREED_WHILE_HELD: AtomicBool = AtomicBool::new(false);

struct HeldGuard(Option<ReadGuard>);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        GONE.store(true, Ordering::SeqCst);
        while !MAY_END.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        FREED_WHILE_HELD.store(FREED.load(Ordering::SeqCst), Ordering::SeqCst);
        drop(self.0.take());
    }
}

thread_local! {
    static HELD: std::cell::RefCell<HeldGuard> =
        const { std::cell::RefCell::new(HeldGuard(None)) };
}

#[test]
fn a_section_that_outlives_the_registration_still_holds_grace_periods() {
    let t = std::thread::spawn(|| {
        HELD.with(|_| {});
        let g = read_lock();
        HELD.with(|h| h.borrow_mut().0 = Some(g));
    });
    while !GONE.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The thread's registration has ended; its section is still open.
    call(|| FREED.store(true, Ordering::SeqCst));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !FREED.load(Ordering::SeqCst),
        "a callback ran while a section that began before it was open"
    );
    MAY_END.store(true, Ordering::SeqCst);
    t.join().unwrap();
    barrier();
    assert!(FREED.load(Ordering::SeqCst));
    assert!(!FREED_WHILE_HELD.load(Ordering::SeqCst));
}

const MAGIC: u64 = 0x5ca1_ab1e_d00d_f00d;

struct Checked(AtomicU64);

impl Drop for Checked {
    fn drop(&mut self) {
        // Poison before the memory goes back: a reader that sees this read
        // a freed element.
        self.0.store(0xdead, Ordering::SeqCst);
    }
}

/// Threads that read for a moment and exit, while grace periods run
/// back to back: the updaters scan thread-local readers whose threads are
/// leaving, and no reader may see a freed element.
#[test]
fn grace_periods_racing_thread_exits() {
    let secs = knobs::seconds("VMTASK_RCU_EXIT_SECS", 1.5);
    let cell = Arc::new(RcuCell::new(Some(Box::new(Checked(AtomicU64::new(MAGIC))))));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let updater = {
        let (cell, stop, done) = (cell.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                cell.store(Some(Box::new(Checked(AtomicU64::new(MAGIC)))));
                synchronize();
                done.fetch_add(1, Ordering::Relaxed);
            }
            done.load(Ordering::Relaxed)
        })
    };
    // One reader that stays, so that every grace period scans (the others
    // come and go too fast to be relied on for that).
    let steady = {
        let (cell, stop) = (cell.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let g = read_lock();
                let v = cell.load(&g).expect("always published");
                assert_eq!(v.0.load(Ordering::SeqCst), MAGIC, "read a freed element");
            }
        })
    };
    // `secs`, and on (for at most 30 s more) until the updater, a new
    // thread that may wait long for a CPU on a loaded machine, has run
    // some grace periods.
    let start = Instant::now();
    while start.elapsed() < secs
        || (done.load(Ordering::Relaxed) < 10 && start.elapsed() < secs + Duration::from_secs(30))
    {
        let spawners: Vec<_> = (0..4)
            .map(|_| {
                let (cell, threads) = (cell.clone(), threads.clone());
                std::thread::spawn(move || {
                    threads.fetch_add(1, Ordering::Relaxed);
                    for _ in 0..100 {
                        let g = read_lock();
                        let v = cell.load(&g).expect("always published");
                        assert_eq!(v.0.load(Ordering::SeqCst), MAGIC, "read a freed element");
                    }
                })
            })
            .collect();
        for t in spawners {
            t.join().unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let grace_periods = updater.join().unwrap();
    steady.join().unwrap();
    barrier();
    assert!(grace_periods > 0);
    println!(
        "{} reader threads came and went over {grace_periods} grace periods",
        threads.load(Ordering::Relaxed)
    );
}

#[test]
fn barrier_and_deferral_work_from_a_late_destructor_of_a_thread_that_used_them() {
    static DROPPED: AtomicBool = AtomicBool::new(false);
    static CALLED: AtomicBool = AtomicBool::new(false);
    struct Flag;
    impl Drop for Flag {
        fn drop(&mut self) {
            DROPPED.store(true, Ordering::SeqCst);
        }
    }
    let ran = from_late_destructor(|| {
        // The map `barrier` keeps per thread is gone by now.
        defer_drop(Box::new(Flag));
        call(|| CALLED.store(true, Ordering::SeqCst));
        barrier();
        // `barrier` returned: both ran before it did.
        let ran = (
            DROPPED.load(Ordering::SeqCst),
            CALLED.load(Ordering::SeqCst),
        );
        synchronize();
        ran
    });
    assert_eq!(
        ran,
        (true, true),
        "(drop ran, callback ran) when barrier returned"
    );
}

#[test]
fn a_fork_from_inside_a_late_section_leaves_a_child_that_can_synchronize() {
    let code = from_late_destructor(|| {
        let guard = read_lock();
        in_child(move || {
            // SAFETY: alarm only arms a timer; a hang kills the child.
            unsafe { libc::alarm(20) };
            if !in_read_section() {
                return 1;
            }
            drop(guard);
            if in_read_section() {
                return 2;
            }
            synchronize();
            barrier();
            0
        })
    });
    assert_eq!(code, 0, "the child failed at step {code}");
}
