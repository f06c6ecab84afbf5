//! Behaviour of the public API: sections, grace periods, callbacks,
//! misuse, threads coming and going, fork.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmtask_rcu::*;

mod child;
use child::in_child;

#[test]
fn cells_of_shareable_values_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<RcuCell<u64>>();
    send_sync::<RcuCell<Vec<String>>>();
    send_sync::<Stats>();
}

#[test]
fn the_guard_is_empty() {
    // The section's state is in the thread's reader; nothing to carry.
    assert_eq!(std::mem::size_of::<ReadGuard>(), 0);
}

#[test]
fn nested_sections_end_with_the_outermost_guard() {
    assert!(!in_read_section());
    let outer = read_lock();
    let inner = read_lock();
    assert!(in_read_section());
    drop(inner);
    assert!(in_read_section(), "inner unlock must not end the section");
    drop(outer);
    assert!(!in_read_section());
}

#[test]
fn guards_may_be_dropped_out_of_order() {
    let a = read_lock();
    let b = read_lock();
    drop(a);
    assert!(in_read_section());
    drop(b);
    assert!(!in_read_section());
    synchronize();
}

#[test]
fn a_section_outlives_its_first_guard_while_later_guards_live() {
    let first = read_lock();
    let second = read_lock();
    drop(first);
    let third = read_lock();
    assert!(in_read_section());
    drop(second);
    assert!(in_read_section(), "the third guard still holds the section");
    drop(third);
    assert!(!in_read_section());
    // A fresh section after it behaves normally.
    let again = read_lock();
    assert!(in_read_section());
    drop(again);
    assert!(!in_read_section());
    synchronize();
}

#[test]
fn synchronize_waits_for_a_reader_that_started_before_it() {
    let entered = Arc::new(AtomicBool::new(false));
    let released = Arc::new(AtomicBool::new(false));
    let reader = {
        let entered = entered.clone();
        let released = released.clone();
        std::thread::spawn(move || {
            let guard = read_lock();
            entered.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            released.store(true, Ordering::SeqCst);
            drop(guard);
        })
    };
    while !entered.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    synchronize();
    assert!(
        released.load(Ordering::SeqCst),
        "synchronize returned while a pre-existing reader was inside"
    );
    reader.join().unwrap();
}

#[test]
#[should_panic(expected = "synchronize called inside an RCU read-side critical section")]
fn synchronize_inside_a_read_section_panics() {
    let _guard = read_lock();
    synchronize();
}

#[test]
#[should_panic(expected = "barrier called inside an RCU read-side critical section")]
fn barrier_inside_a_read_section_panics() {
    let _guard = read_lock();
    barrier();
}

#[test]
#[should_panic(expected = "RcuCell::swap called inside an RCU read-side critical section")]
fn cell_swap_inside_a_read_section_panics() {
    let cell = RcuCell::new(Some(Box::new(1)));
    let _guard = read_lock();
    let _ = cell.swap(None);
}

#[test]
fn barrier_from_a_callback_panics_and_the_thread_survives() {
    let result = Arc::new(Mutex::new(None));
    let r = result.clone();
    call(move || {
        let outcome = std::panic::catch_unwind(barrier);
        let message = outcome
            .err()
            .and_then(|e| e.downcast_ref::<&str>().map(|s| s.to_string()));
        *r.lock().unwrap() = Some(message);
    });
    barrier();
    let message = result.lock().unwrap().take().expect("callback ran");
    assert!(
        message.is_some_and(|m| m.contains("called from an RCU callback")),
        "barrier in a callback must panic with a clear message"
    );
    // The callback thread still works.
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    call(move || r.store(true, Ordering::SeqCst));
    barrier();
    assert!(ran.load(Ordering::SeqCst));
}

#[test]
fn a_panicking_callback_does_not_stop_later_callbacks() {
    call(|| panic!("deliberate panic in a callback"));
    let ran = Arc::new(AtomicBool::new(false));
    let r = ran.clone();
    call(move || r.store(true, Ordering::SeqCst));
    barrier();
    assert!(ran.load(Ordering::SeqCst));
}

#[test]
fn callbacks_from_one_cpu_run_in_queue_order_before_barrier_returns() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    std::thread::spawn(move || {
        vmtask_percpu::pin_current_thread(vmtask_percpu::allowed_cpus()[0]).unwrap();
        for i in 0..1000 {
            let o = o.clone();
            call(move || o.lock().unwrap().push(i));
        }
    })
    .join()
    .unwrap();
    barrier();
    let order = order.lock().unwrap();
    assert_eq!(*order, (0..1000).collect::<Vec<_>>());
}

#[test]
fn callbacks_that_queue_callbacks_run_after_a_second_barrier() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    call(move || {
        c.fetch_add(1, Ordering::SeqCst);
        let c2 = c.clone();
        call(move || {
            c2.fetch_add(1, Ordering::SeqCst);
        });
    });
    barrier();
    assert!(count.load(Ordering::SeqCst) >= 1);
    barrier();
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How long a negative check waits for something that must not happen
/// while a reader holds its section.
const HOLD_FOR: Duration = Duration::from_millis(100);

/// A reader thread inside its read-side section until released: no grace
/// period that begins meanwhile can end. Released on drop too, so that a
/// failed assertion does not stall the other tests' grace periods.
struct HeldReader {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeldReader {
    /// Returns once the reader is inside its section.
    fn start() -> Self {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _guard = read_lock();
            entered_tx.send(()).unwrap();
            // Until the sender is dropped.
            let _ = released.recv();
        });
        entered
            .recv()
            .expect("the reader thread entered its section");
        HeldReader {
            release: Some(release),
            thread: Some(thread),
        }
    }

    /// Ends the section and waits for the thread.
    fn release(mut self) {
        self.end();
    }

    fn end(&mut self) {
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for HeldReader {
    fn drop(&mut self) {
        self.end();
    }
}

#[test]
fn defer_drop_waits_for_readers_and_barrier_flushes_partial_bags() {
    let dropped = Arc::new(AtomicBool::new(false));
    let guard_taken = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let reader = {
        let (g, r) = (guard_taken.clone(), release.clone());
        std::thread::spawn(move || {
            let _guard = read_lock();
            g.store(true, Ordering::SeqCst);
            while !r.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    while !guard_taken.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    defer_drop(Box::new(DropFlag(dropped.clone())));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !dropped.load(Ordering::SeqCst),
        "dropped while a reader was inside"
    );
    release.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    barrier();
    assert!(
        dropped.load(Ordering::SeqCst),
        "barrier returned before the drop ran"
    );
}

/// A list node whose drop retires the next node, as tearing down an RCU
/// list one element at a time does.
struct Chain {
    left: usize,
    dropped: Arc<AtomicUsize>,
}
impl Drop for Chain {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if self.left > 0 {
            defer_drop(Box::new(Chain {
                left: self.left - 1,
                dropped: self.dropped.clone(),
            }));
        }
    }
}

#[test]
fn drops_that_retire_more_do_not_nest_and_all_run_by_barrier() {
    // On a small stack: if the owner ran drops inside drops, the chain
    // would recurse thousands of frames deep.
    const CHAINS: usize = 64;
    const LENGTH: usize = 2_000;
    let dropped = Arc::new(AtomicUsize::new(0));
    let d = dropped.clone();
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            for _ in 0..CHAINS {
                defer_drop(Box::new(Chain {
                    left: LENGTH - 1,
                    dropped: d.clone(),
                }));
            }
            // Unrelated garbage keeps this thread's bags filling, so the
            // chains advance through its own draining as well.
            for _ in 0..200_000 {
                defer_drop(Box::new(0u64));
            }
        })
        .unwrap()
        .join()
        .unwrap();
    // Each barrier runs at least one more link of every chain.
    for _ in 0..LENGTH + 1 {
        if dropped.load(Ordering::SeqCst) == CHAINS * LENGTH {
            break;
        }
        barrier();
    }
    assert_eq!(dropped.load(Ordering::SeqCst), CHAINS * LENGTH);
}

#[repr(C)]
struct Intrusive {
    head: RcuHead,
    counter: Arc<AtomicUsize>,
}

/// # Safety
/// `head` is the first field of a leaked `Box<Intrusive>`, freed once.
unsafe fn free_intrusive(head: *mut RcuHead) {
    // SAFETY: heads queued below are the first field of leaked Intrusive boxes.
    let node = unsafe { Box::from_raw(head.cast::<Intrusive>()) };
    node.counter.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn call_intrusive_invokes_every_head_once() {
    let counter = Arc::new(AtomicUsize::new(0));
    for _ in 0..10_000 {
        let node = Box::into_raw(Box::new(Intrusive {
            head: RcuHead::new(),
            counter: counter.clone(),
        }));
        // SAFETY: fresh node, freed only by free_intrusive.
        unsafe { call_intrusive(node.cast(), free_intrusive) };
    }
    barrier();
    assert_eq!(counter.load(Ordering::SeqCst), 10_000);
}

#[test]
fn a_thread_that_exits_with_a_leaked_guard_stalls_grace_periods_instead_of_ending_them() {
    // References read under a leaked guard are 'static and may outlive the
    // thread: its section must never end. In a child, since the stall is
    // for good.
    let code = in_child(|| {
        let cell: &'static RcuCell<u64> = Box::leak(Box::new(RcuCell::new(Some(Box::new(7)))));
        let escaped: &'static u64 = std::thread::spawn(move || {
            let guard: &'static ReadGuard = Box::leak(Box::new(read_lock()));
            cell.load(guard).expect("published")
        })
        .join()
        .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            cell.store(Some(Box::new(8)));
            synchronize();
            d.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(300));
        if done.load(Ordering::SeqCst) {
            return 1; // the grace period ended under the escaped reference
        }
        if *escaped != 7 {
            return 2;
        }
        0
    });
    assert_eq!(
        code, 0,
        "a grace period ended under a leaked guard (code {code})"
    );
}

static REGISTRATION_GONE: AtomicBool = AtomicBool::new(false);
static OTHER_INSIDE: AtomicBool = AtomicBool::new(false);
static HELD_DROPPED: AtomicBool = AtomicBool::new(false);

/// Holds a guard in a thread-local and, when destroyed, waits for another
/// thread to enter a section before dropping it.
struct Holder(Option<ReadGuard>);

impl Drop for Holder {
    fn drop(&mut self) {
        REGISTRATION_GONE.store(true, Ordering::SeqCst);
        while !OTHER_INSIDE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(self.0.take());
        HELD_DROPPED.store(true, Ordering::SeqCst);
    }
}

thread_local! {
    /// Created before the thread's first `read_lock`, so destroyed after
    /// its RCU registration.
    static HELD: std::cell::RefCell<Holder> = const { std::cell::RefCell::new(Holder(None)) };
}

#[test]
fn a_guard_that_outlives_its_threads_registration_ends_only_its_own_section() {
    let first = std::thread::spawn(|| {
        HELD.with(|_| {});
        let guard = read_lock();
        HELD.with(|h| h.borrow_mut().0 = Some(guard));
        // Exit: the registration ends, then HELD's guard is dropped late.
    });
    while !REGISTRATION_GONE.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The first thread's slot must not have been handed out while its guard
    // lives: a thread that took it would have its section ended by that
    // guard's drop.
    std::thread::spawn(|| {
        let _g = read_lock();
        OTHER_INSIDE.store(true, Ordering::SeqCst);
        while !HELD_DROPPED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            in_read_section(),
            "another thread's late guard ended this section"
        );
    })
    .join()
    .unwrap();
    first.join().unwrap();
    // And once the late guard is gone its slot is free: this returns.
    synchronize();
}

#[test]
fn threads_register_while_alive_and_unregister_when_they_exit() {
    let hold = Arc::new(std::sync::Barrier::new(9));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let hold = hold.clone();
            std::thread::spawn(move || {
                let _g = read_lock();
                hold.wait(); // all 8 registered
                hold.wait(); // counted
            })
        })
        .collect();
    hold.wait();
    assert!(
        stats().readers >= 8,
        "8 live readers, {} registered",
        stats().readers
    );
    hold.wait();
    for t in threads {
        t.join().unwrap();
    }
    // Their slots were released, not left active: this returns.
    synchronize();
}

#[test]
fn rcu_cell_swap_hands_back_the_old_value_after_a_grace_period() {
    let cell = RcuCell::new(Some(Box::new(String::from("a"))));
    {
        let g = read_lock();
        assert_eq!(cell.load(&g).map(String::as_str), Some("a"));
    }
    // A reader that began before the swap may still hold "a": the swap
    // must not hand it back before that reader is done.
    let reader = HeldReader::start();
    let old = std::thread::scope(|s| {
        let swapping = s.spawn(|| cell.swap(Some(Box::new(String::from("b")))));
        std::thread::sleep(HOLD_FOR);
        assert!(
            !swapping.is_finished(),
            "swap handed back the old value while a reader that began before it was inside"
        );
        reader.release();
        swapping.join().unwrap()
    });
    assert_eq!(old.as_deref().map(String::as_str), Some("a"));
    let current = {
        let g = read_lock();
        cell.load(&g).cloned()
    };
    assert_eq!(current.as_deref(), Some("b"));
    let b_ref_addr = {
        let g = read_lock();
        cell.load(&g).map(|s| s as *const String)
    };
    assert!(cell
        .compare_and_store(None, Some(Box::new("c".into())))
        .is_err());
    let g = read_lock();
    // SAFETY-free check by address: compare_and_store with the right value.
    let cur = cell.load(&g);
    assert_eq!(cur.map(|s| s as *const String), b_ref_addr);
    drop(g);
    let g = read_lock();
    let cur = cell.load(&g);
    assert!(cell
        .compare_and_store(cur, Some(Box::new("c".into())))
        .is_ok());
    drop(g);
    let g = read_lock();
    assert_eq!(cell.load(&g).map(String::as_str), Some("c"));
}

/// A zero-sized `T` cannot be compared by address (every box of it has the
/// same one): a stale `current` would match a value stored since.
#[test]
#[should_panic(expected = "compare_and_store on a zero-sized type")]
fn compare_and_store_refuses_zero_sized_values() {
    let cell = RcuCell::new(Some(Box::new(())));
    let g = read_lock();
    let stale = cell.load(&g);
    cell.store(Some(Box::new(())));
    let _ = cell.compare_and_store(stale, None);
}

/// A list linked through `RcuCell`s, freed by a callback after one grace
/// period that takes the nodes out of their cells: one grace period for
/// the whole list, not one per node (review finding: 10,000 barriers
/// freed 11,061 nodes of 200,000), and no recursion as deep as the list.
#[test]
fn a_list_freed_after_one_grace_period_is_gone_within_one_barrier() {
    static DROPPED: AtomicUsize = AtomicUsize::new(0);
    struct Node {
        next: RcuCell<Node>,
    }
    impl Drop for Node {
        fn drop(&mut self) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
    const NODES: usize = 200_000;
    let mut list = None;
    for _ in 0..NODES {
        list = Some(Box::new(Node {
            next: RcuCell::new(list),
        }));
    }
    let head = RcuCell::new(list);
    let reader = HeldReader::start();
    let old = head.replace(None).expect("the list");
    old.defer(|mut node| {
        // SAFETY: a grace period has passed since the list was
        // unpublished, and its nodes were reachable only through it.
        let mut next = unsafe { node.next.take_unchecked() };
        while let Some(mut node) = next {
            // SAFETY: as above.
            next = unsafe { node.next.take_unchecked() };
        }
    });
    std::thread::sleep(HOLD_FOR);
    assert_eq!(
        DROPPED.load(Ordering::Relaxed),
        0,
        "a node was dropped under a reader that began before the list was unpublished"
    );
    reader.release();
    barrier();
    assert_eq!(DROPPED.load(Ordering::Relaxed), NODES);
}

#[test]
fn take_unchecked_empties_the_cell() {
    let mut cell = RcuCell::new(Some(Box::new(7u32)));
    // SAFETY: the cell was never shared with a reader.
    assert_eq!(unsafe { cell.take_unchecked() }.as_deref(), Some(&7));
    // SAFETY: as above.
    assert!(unsafe { cell.take_unchecked() }.is_none());
    let g = read_lock();
    assert!(cell.load(&g).is_none());
}

#[test]
fn rcu_cell_drop_defers_the_last_value() {
    let dropped = Arc::new(AtomicBool::new(false));
    let cell = RcuCell::new(Some(Box::new(DropFlag(dropped.clone()))));
    let reader = HeldReader::start();
    drop(cell);
    std::thread::sleep(HOLD_FOR);
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the cell's value was dropped while a reader that began before it was inside"
    );
    reader.release();
    barrier();
    assert!(dropped.load(Ordering::SeqCst));
}

#[test]
fn stats_display_names_the_barrier_mode() {
    synchronize();
    let s = stats();
    let text = s.to_string();
    assert!(text.contains("barrier mode"));
    assert!(text.contains("grace periods"));
    // Entries of a batch still filling are not in the counts: it says so.
    assert!(
        text.contains("deferred drops count once their thread's batch of 126 fills"),
        "{text}"
    );
    let shown = match s.mode {
        BarrierMode::Membarrier => "membarrier",
        BarrierMode::Fence => "SeqCst fence fallback",
    };
    assert!(
        text.contains(shown),
        "mode {:?} not shown in:\n{text}",
        s.mode
    );
}

#[test]
fn force_fence_fallback_after_first_use_is_refused() {
    synchronize();
    match stats().mode {
        BarrierMode::Membarrier => {
            let err = force_fence_fallback().unwrap_err();
            assert!(err.to_string().contains("before any RCU use"));
        }
        // Already in the fallback (forced by the environment, or no
        // membarrier): forcing it again is a no-op, not an error.
        BarrierMode::Fence => force_fence_fallback().expect("already in the fallback"),
    }
}

#[test]
fn the_child_of_a_fork_can_use_rcu() {
    // In a fresh process: forked from this one, the child would inherit the
    // other tests' pending callbacks (some panic by design) and locks their
    // panics hold (std's backtrace lock, an output-capture buffer).
    const ENV: &str = "VMTASK_RCU_FORK_CHILD_TEST";
    if std::env::var_os(ENV).is_none() {
        child::rerun_test_ok(
            "the_child_of_a_fork_can_use_rcu",
            ENV,
            "1",
            "FORK CHILD OK",
            "the child of a fork",
        );
        return;
    }
    // Make sure the parent has a callback thread and registered readers.
    call(|| {});
    barrier();
    // A reader inside its section at the fork (not a 20 ms sleep for it to
    // start and a 300 ms one to stay, which a loaded machine can outlast).
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let _g = read_lock();
        locked_tx.send(()).unwrap();
        let _ = released.recv();
    });
    locked.recv().unwrap();
    // SAFETY: the child only runs RCU code and then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // Child: the reader thread does not exist here; synchronize must
        // not wait for it, and callbacks need a new thread.
        let ok = std::panic::catch_unwind(|| {
            synchronize();
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            call(move || r.store(true, Ordering::SeqCst));
            barrier();
            ran.load(Ordering::SeqCst)
        });
        // SAFETY: _exit is async-signal-safe and ends the child at once.
        unsafe { libc::_exit(if matches!(ok, Ok(true)) { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(release);
    reader.join().unwrap();
    assert_eq!(rc, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status:#x}"
    );
    println!("FORK CHILD OK");
}

#[test]
#[should_panic(expected = "need 0 < soft (10) <= hard (5)")]
fn backlog_limits_must_be_ordered() {
    set_backlog_limits(10, 5);
}

#[test]
fn retired_values_come_back_only_after_a_grace_period() {
    let cell = RcuCell::new(Some(Box::new(1u32)));
    // Each way of taking a retired value back, while a reader that began
    // before the replace is inside: nothing may come back until it is done.
    let reader = HeldReader::start();
    let retired = cell.replace(Some(Box::new(2))).expect("had a value");
    let old = std::thread::scope(|s| {
        let waiting = s.spawn(move || *retired.wait());
        std::thread::sleep(HOLD_FOR);
        assert!(
            !waiting.is_finished(),
            "Retired::wait returned while a reader that began before the replace was inside"
        );
        reader.release();
        waiting.join().unwrap()
    });
    assert_eq!(old, 1);

    let reader = HeldReader::start();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    cell.replace(Some(Box::new(3)))
        .expect("had a value")
        .defer(move |old| s.store(*old as usize, Ordering::SeqCst));
    let dropped = Arc::new(AtomicBool::new(false));
    let flagged = RcuCell::new(Some(Box::new(DropFlag(dropped.clone()))));
    drop(flagged.replace(None));
    std::thread::sleep(HOLD_FOR);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "Retired::defer ran while a reader that began before the replace was inside"
    );
    assert!(
        !dropped.load(Ordering::SeqCst),
        "a dropped Retired dropped its value while a reader that began before the replace was inside"
    );
    reader.release();
    barrier();
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert!(
        dropped.load(Ordering::SeqCst),
        "a dropped Retired drops its value after a grace period"
    );
    assert!(cell.replace(None).is_some());
    assert!(cell.replace(None).is_none());
}

#[test]
#[should_panic(expected = "Retired::wait called inside an RCU read-side critical section")]
fn retired_wait_inside_a_read_section_panics() {
    let cell = RcuCell::new(Some(Box::new(1u32)));
    let retired = cell.replace(None).expect("had a value");
    let _guard = read_lock();
    let _ = retired.wait();
}

/// `barrier_allowed` answers false exactly where `barrier` would panic:
/// inside a read-side section and inside a callback.
#[test]
fn barrier_allowed_matches_where_barrier_may_wait() {
    assert!(vmtask_rcu::barrier_allowed());
    {
        let _guard = vmtask_rcu::read_lock();
        assert!(!vmtask_rcu::barrier_allowed(), "inside a read-side section");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    vmtask_rcu::call(move || tx.send(vmtask_rcu::barrier_allowed()).unwrap());
    vmtask_rcu::barrier();
    assert_eq!(rx.recv().ok(), Some(false), "inside a callback");
}
