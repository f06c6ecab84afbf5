//! Callbacks: `call`, `defer_drop`, `call_intrusive`, `barrier`.
//!
//! Queues. Each possible CPU has a wait-free multi-producer queue of
//! intrusive `RcuHead`s (liburcu's wfcqueue): enqueue is one exchange of
//! the tail and one store linking the previous node; the callback thread
//! splices a whole queue out at once. Callbacks from one queue run in the
//! order they were queued.
//!
//! Bags. `defer_drop` would need an allocation per object to get an
//! `RcuHead`; instead each thread fills a bag of (pointer, drop function)
//! pairs with plain stores, and a full bag is queued as one node (see
//! `bag.rs` for how partial bags are taken from their threads).
//!
//! The callback thread (started on first use, and again in a child after
//! `fork`): wait up to `LAZY_DELAY` for a batch to gather (unless
//! `barrier` or the backlog made it urgent); take every thread's partial
//! bag; splice every queue; run one grace period for the whole batch;
//! invoke it; repeat. It sleeps when there is nothing to do, announcing it
//! in `SLEEPING` before a last check; producers read `SLEEPING` after
//! queuing (both sides SeqCst), so one of them always sees the other.
//!
//! Backlog. Producers count what they queue per CPU, the thread counts
//! what it invoked. Past `soft` queued-but-not-invoked callbacks the
//! thread is woken at once; past `hard`, `call` and friends wait for the
//! backlog to drain to half of `hard` (or `soft`, if higher), or, if other
//! threads keep it up (a thread retiring inside read-side sections, which
//! cannot be made to wait), until as many callbacks as it was over that
//! mark when they came have been invoked — unless the caller is the
//! callback thread or inside a read-side section, where waiting would
//! deadlock. They never run other threads' callbacks: they may hold locks
//! those callbacks take.

use crate::sync::Mutex;
use crossbeam_utils::CachePadded;
use std::cell::{Cell, UnsafeCell};
use std::collections::VecDeque;
use std::ptr;
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::Thread;
use std::time::{Duration, Instant};
use vmtask_percpu::cpu;

use crate::bag::{run_bag, Bag, Pushed, BAG_CAPACITY};

use crate::grace::{self, Expedite};

/// An RCU callback head, embedded in the object it frees, as the kernel's
/// `struct rcu_head`. Two words; queue it with [`call_intrusive`].
///
/// ```
/// use vmtask_rcu::{call_intrusive, RcuHead};
///
/// #[repr(C)]
/// struct Node {
///     head: RcuHead, // first field: a `*mut RcuHead` is a `*mut Node`
///     value: u64,
/// }
///
/// /// # Safety
/// /// `head` is the head of a `Box<Node>` leaked below, freed once.
/// unsafe fn free_node(head: *mut RcuHead) {
///     // SAFETY: `head` is the first field of a `Box<Node>` leaked below.
///     drop(unsafe { Box::from_raw(head.cast::<Node>()) });
/// }
///
/// let node = Box::into_raw(Box::new(Node { head: RcuHead::new(), value: 7 }));
/// // SAFETY: the node is ours, unpublished, and freed only by `free_node`.
/// unsafe { call_intrusive(node.cast::<RcuHead>(), free_node) };
/// vmtask_rcu::barrier();
/// ```
#[repr(C)]
pub struct RcuHead {
    next: AtomicPtr<RcuHead>,
    func: UnsafeCell<Option<unsafe fn(*mut RcuHead)>>,
}

// SAFETY: `func` is written only by the thread that queues the head (which
// owns it until then) and read only by the callback thread after the
// queue's release/acquire hand-off.
unsafe impl Send for RcuHead {}
// SAFETY: as above; shared references never touch `func`.
unsafe impl Sync for RcuHead {}

impl RcuHead {
    /// An unqueued head.
    pub const fn new() -> Self {
        RcuHead {
            next: AtomicPtr::new(ptr::null_mut()),
            func: UnsafeCell::new(None),
        }
    }
}

impl Default for RcuHead {
    fn default() -> Self {
        RcuHead::new()
    }
}

impl std::fmt::Debug for RcuHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RcuHead")
    }
}

/// One CPU's queue. `head` is the stub node: `head.next` is the first
/// callback; `tail` is the last node, or `&head` when empty.
struct Queue {
    head: CachePadded<RcuHead>,
    tail: CachePadded<AtomicPtr<RcuHead>>,
    /// Callbacks ever queued here (a bag counts its entries).
    queued: AtomicU64,
}

impl Queue {
    fn stub(&self) -> *mut RcuHead {
        &*self.head as *const RcuHead as *mut RcuHead
    }

    /// Wait-free enqueue.
    ///
    /// # Safety
    /// `node` is valid, owned by the caller and not queued; it stays valid
    /// until its callback runs.
    unsafe fn push(&self, node: *mut RcuHead, count: u64) {
        // SAFETY: the caller owns `node`.
        unsafe { (*node).next.store(ptr::null_mut(), Ordering::Relaxed) };
        // Counted before the node is published, so it cannot be invoked
        // (and counted in `INVOKED`) before it counts as queued: `stats()`
        // never shows more invoked than queued. A fork between the two
        // loses the node with its thread; the child's recount counts it
        // as invoked.
        self.queued.fetch_add(count, Ordering::Relaxed);
        // SeqCst: pairs with the callback thread's `SLEEPING` store and
        // queue re-check (see the module header).
        let prev = self.tail.swap(node, Ordering::SeqCst);
        // SAFETY: `prev` is the stub or a queued node, which stays valid
        // until the consumer has walked past it, and the consumer waits
        // for this link before doing so.
        unsafe { (*prev).next.store(node, Ordering::Release) };
    }

    /// In the fork child: a producer that was between its tail swap and
    /// its link store at the fork never links its node, and a consumer
    /// would wait for that link forever. Cuts the queue after the last
    /// node reachable from the stub; the unlinked rest is lost in the
    /// child, like other work in flight at the fork.
    fn cut_after_fork(&self) {
        let mut node = self.stub();
        loop {
            // SAFETY: the stub, or a queued node reached through links,
            // valid until invoked (nothing runs in the child yet).
            let next = unsafe { (*node).next.load(Ordering::Relaxed) };
            if next.is_null() {
                break;
            }
            node = next;
        }
        self.tail.store(node, Ordering::Relaxed);
    }

    fn is_empty(&self) -> bool {
        self.head.next.load(Ordering::SeqCst).is_null()
            && self.tail.load(Ordering::SeqCst) == self.stub()
    }

    /// Takes the whole queue: `(first, last)`. The callback thread is the
    /// only consumer, under `CONSUMER`.
    fn splice(&self) -> Option<(*mut RcuHead, *mut RcuHead)> {
        if self.is_empty() {
            return None;
        }
        // Not empty: a producer has swapped the tail and will link the
        // first node in a moment.
        let first = wait_next(&self.head);
        self.head.next.store(ptr::null_mut(), Ordering::Relaxed);
        // Release: the reset above happens before any producer that finds
        // the stub as its `prev` links from it.
        let last = self.tail.swap(self.stub(), Ordering::AcqRel);
        Some((first, last))
    }
}

/// Spins until `node.next` is linked.
fn wait_next(node: &RcuHead) -> *mut RcuHead {
    let backoff = crossbeam_utils::Backoff::new();
    loop {
        let next = node.next.load(Ordering::Acquire);
        if !next.is_null() {
            return next;
        }
        backoff.snooze();
    }
}

/// Invokes a spliced list in order; returns how many callbacks it held.
/// Counts them into `INVOKED` as it goes (every `PROGRESS_STEP`), so that
/// callers throttled by the backlog resume while a large batch runs, and
/// before each barrier node (`run_barrier_node` reports `UNREPORTED`), so
/// that the statistics read after `barrier` include what it waited for.
///
/// # Safety
/// `(first, last)` came from `Queue::splice` after a grace period.
unsafe fn invoke(first: *mut RcuHead, last: *mut RcuHead) -> u64 {
    const PROGRESS_STEP: u64 = 4096;
    let mut count = 0;
    let mut node = first;
    loop {
        // Read the link before the callback frees the node. The last node
        // is never linked further: later producers link from the stub.
        let next = if node == last {
            ptr::null_mut()
        } else if UNCOUNTED.get() {
            // A fork child that forked from a callback of this batch: a
            // producer the fork stopped between its tail swap and its link
            // left a link that nobody will write (the queues and batch
            // lists were cut at such links in `after_fork_child`, but not
            // this batch, which only this thread's stack holds). The batch
            // ends at it; the rest is lost in the child, and was counted
            // as invoked by `recount_after_fork`.
            // SAFETY: `node` is queued and not yet invoked, so still valid.
            unsafe { (*node).next.load(Ordering::Acquire) }
        } else {
            // SAFETY: `node` is queued and not yet invoked, so still valid.
            wait_next(unsafe { &*node })
        };
        // Read, not take: the node's line stays shared with no write.
        // SAFETY: as above; `func` was set before the node was queued.
        let func = unsafe { *(*node).func.get() };
        // SAFETY: every queued node carries its function, and the grace
        // period it waited for is the contract of `call_intrusive`.
        let ran = unsafe { invoke_one(node, func) };
        let n = NODE_WEIGHT.with(Cell::take).unwrap_or(ran);
        count += n;
        // Not in a fork child that already counted the rest of this batch.
        if !UNCOUNTED.get() {
            let unreported = UNREPORTED.get() + n;
            if unreported >= PROGRESS_STEP || node == last {
                UNREPORTED.set(0);
                report_progress(unreported);
            } else {
                UNREPORTED.set(unreported);
            }
        }
        if node == last || next.is_null() {
            return count;
        }
        node = next;
    }
}

thread_local! {
    /// Set by a node's function when the node stands for other than one
    /// user callback: a barrier marker (none), a bag (its entries).
    static NODE_WEIGHT: Cell<Option<u64>> = const { Cell::new(None) };
    /// Callbacks `invoke` has run on this thread and not yet counted into
    /// `INVOKED`.
    static UNREPORTED: Cell<u64> = const { Cell::new(0) };
    /// In a fork child, on the thread that forked from a callback: the rest
    /// of the batch it is running was counted as invoked by
    /// `recount_after_fork`, so `invoke` does not count it again, nor
    /// waits for a link that a producer stopped by the fork never writes.
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

/// Called by a node's function: `invoke` counts this node as `callbacks`
/// user callbacks.
pub(crate) fn set_node_weight(callbacks: u64) {
    NODE_WEIGHT.with(|c| c.set(Some(callbacks)));
}

/// Counts invoked callbacks and wakes callers throttled by the backlog.
fn report_progress(invoked: u64) {
    // Release: `stats()` reads `INVOKED` (acquire) before the queued
    // counts, and must see those of everything counted here.
    INVOKED.fetch_add(invoked, Ordering::Release);
    // Store-buffering with `check_backlog` ("waiters += 1; read INVOKED"
    // against "INVOKED += n; read waiters"): with a fence on both sides,
    // one of them sees the other.
    fence(Ordering::SeqCst);
    if DRAIN_WAITERS.load(Ordering::SeqCst) > 0 {
        DRAINED.fetch_add(1, Ordering::SeqCst);
        crate::sync::futex_wake(&DRAINED, i32::MAX);
    }
}

/// # Safety
/// As for `invoke`.
unsafe fn invoke_one(node: *mut RcuHead, func: Option<unsafe fn(*mut RcuHead)>) -> u64 {
    let Some(func) = func else {
        // A node without function is a bug in this module; leaking is
        // better than guessing.
        debug_assert!(false, "queued RcuHead without a callback");
        return 0;
    };
    // A panicking callback must not kill the callback thread (every later
    // callback would then be lost); report it and go on.
    // SAFETY: the callback's own contract; it owns `node` from here on.
    contain_panic(|| unsafe { func(node) });
    1
}

/// Runs `f`, reporting instead of propagating a panic.
#[inline(always)]
pub(crate) fn contain_panic(f: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        panicked(payload);
    }
}

/// `contain_panic`'s report of a panic, out of the callers' way.
#[cold]
#[inline(never)]
fn panicked(payload: Box<dyn std::any::Any + Send>) {
    crate::sync::warn(format_args!(
        "vmtask_rcu: an RCU callback panicked; its object may have leaked"
    ));
    // The payload's own drop may panic too: contained here (that second
    // payload leaked), or it would unwind out of the callback thread, or
    // out of a `defer_drop` with its bag's run still marked in progress,
    // and every later `barrier` would wait forever.
    let drop_payload = std::panic::AssertUnwindSafe(move || drop(payload));
    if let Err(again) = std::panic::catch_unwind(drop_payload) {
        std::mem::forget(again);
    }
}

/// A single deferred drop, when the thread's bag is not available.
#[repr(C)]
struct DropNode {
    head: RcuHead,
    data: *mut (),
    drop_fn: unsafe fn(*mut ()),
}

/// # Safety
/// `head` is the head of a leaked `Box<DropNode>` whose grace period passed.
unsafe fn run_drop_node(head: *mut RcuHead) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(head.cast::<DropNode>()) };
    // SAFETY: as in `run_bag`.
    unsafe { (node.drop_fn)(node.data) };
}

#[repr(C)]
struct CallNode<F> {
    head: RcuHead,
    f: F,
}

/// # Safety
/// `head` is the head of a leaked `Box<CallNode<F>>` whose grace period
/// passed.
unsafe fn run_call_node<F: FnOnce()>(head: *mut RcuHead) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(head.cast::<CallNode<F>>()) };
    (node.f)();
}

struct Callbacks {
    queues: Box<[Queue]>,
}

/// The batches the callback thread has spliced and whose grace period it
/// is waiting for, oldest first; the lock also serialises the splicing.
/// They live here, not on the thread's stack, so that a fork child finds
/// them (the prepare handler holds the lock across `fork`, so the child
/// sees a whole list) and runs them after a grace period of its own. A
/// static of its own, so that the fork handlers never build the callback
/// machinery of a program that does not use RCU.
static CONSUMER: Mutex<Vec<ReadyBatch>> = Mutex::new(Vec::new());

/// The callback machinery once built; built under `CALLBACKS_INIT`, which
/// `fork` holds too, so that a child never inherits it half-built.
static CALLBACKS: AtomicPtr<Callbacks> = AtomicPtr::new(ptr::null_mut());
static CALLBACKS_INIT: Mutex<()> = Mutex::new(());

/// The callback machinery, if built.
fn callbacks_if_built() -> Option<&'static Callbacks> {
    // SAFETY: a non-null pointer was leaked from a Box below and is never
    // freed.
    unsafe { CALLBACKS.load(Ordering::Acquire).as_ref() }
}

#[inline]
fn callbacks() -> &'static Callbacks {
    match callbacks_if_built() {
        Some(cb) => cb,
        None => build_callbacks(),
    }
}

#[cold]
fn build_callbacks() -> &'static Callbacks {
    crate::fork::register_handlers();
    let _building = CALLBACKS_INIT.lock();
    if let Some(cb) = callbacks_if_built() {
        return cb;
    }
    let cb: &'static Callbacks = Box::leak(Box::new({
        let queues: Box<[Queue]> = (0..vmtask_percpu::possible_cpus())
            .map(|_| Queue {
                head: CachePadded::new(RcuHead::new()),
                tail: CachePadded::new(AtomicPtr::new(ptr::null_mut())),
                queued: AtomicU64::new(0),
            })
            .collect();
        // The boxed slice does not move again: tails may point into it.
        for q in queues.iter() {
            q.tail.store(q.stub(), Ordering::Relaxed);
        }
        Callbacks { queues }
    }));
    CALLBACKS.store(ptr::from_ref(cb).cast_mut(), Ordering::Release);
    cb
}

// Thread state. STARTED: NOT_STARTED, STARTING or RUNNING. Flags that
// producers read on every `call` and the callback thread writes each cycle
// sit on cache lines of their own, so that neither side's writes evict
// the other's reads.
static STARTED: CachePadded<AtomicU8> = CachePadded::new(AtomicU8::new(0));
static SLEEPING: CachePadded<AtomicBool> = CachePadded::new(AtomicBool::new(false));
/// Work that must not wait for the lazy batching delay (barrier, backlog).
static URGENT: CachePadded<AtomicBool> = CachePadded::new(AtomicBool::new(false));
/// Threads have bags waiting for a grace period.
static NEED_GP: CachePadded<AtomicBool> = CachePadded::new(AtomicBool::new(false));
static THREAD: CachePadded<Mutex<Option<Thread>>> = CachePadded::new(Mutex::new(None));

pub(crate) static INVOKED: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static BATCHES: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static LARGEST_BATCH: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static BACKLOG_HIGH: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static EXPEDITED: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
pub(crate) static THROTTLED: CachePadded<AtomicU64> = CachePadded::new(AtomicU64::new(0));
static SOFT_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_SOFT_LIMIT);
static HARD_LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_HARD_LIMIT);
static DRAIN_WAITERS: CachePadded<AtomicUsize> = CachePadded::new(AtomicUsize::new(0));
/// Bumped when the callback thread makes progress while callers wait in
/// `check_backlog`, who sleep on it as a futex. No lock: a thread waiting
/// here at a `fork` leaves nothing behind in the child.
static DRAINED: CachePadded<std::sync::atomic::AtomicU32> =
    CachePadded::new(std::sync::atomic::AtomicU32::new(0));

/// A soft limit below this is checked at every queuing, not once per 256
/// callbacks queued on a CPU (which could overshoot it many times over).
const EXACT_LIMITS_BELOW: usize = 4096;

/// Default soft backlog limit: past it, a grace period starts at once.
pub const DEFAULT_SOFT_LIMIT: usize = 32 * 1024;
/// Default hard backlog limit: past it, queuing waits for the backlog.
pub const DEFAULT_HARD_LIMIT: usize = 256 * 1024;

thread_local! {
    /// On the callback thread, or on a thread invoking callbacks for it
    /// (`invoke_ready`): code here must not wait for callbacks.
    static IS_CALLBACK_THREAD: Cell<bool> = const { Cell::new(false) };
    /// On the callback thread itself.
    static THE_CALLBACK_THREAD: Cell<bool> = const { Cell::new(false) };
}

pub(crate) fn on_callback_thread() -> bool {
    IS_CALLBACK_THREAD.try_with(|c| c.get()).unwrap_or(false)
}

/// Sets the backlog limits (callbacks queued and not yet invoked). With a
/// soft limit of 4096 or more, the limits are checked once per 256
/// callbacks queued on a CPU, so the backlog may pass them by up to that
/// many per CPU; with a smaller one, at every queuing.
///
/// # Panics
/// If `soft` is 0 or `soft > hard`.
pub fn set_backlog_limits(soft: usize, hard: usize) {
    assert!(
        soft > 0 && soft <= hard,
        "vmtask_rcu::set_backlog_limits: need 0 < soft ({soft}) <= hard ({hard})"
    );
    SOFT_LIMIT.store(soft, Ordering::Relaxed);
    HARD_LIMIT.store(hard, Ordering::Relaxed);
}

/// The backlog limits in force: `(soft, hard)`.
pub fn backlog_limits() -> (usize, usize) {
    (
        SOFT_LIMIT.load(Ordering::Relaxed),
        HARD_LIMIT.load(Ordering::Relaxed),
    )
}

pub(crate) fn queued_total() -> u64 {
    callbacks()
        .queues
        .iter()
        .map(|q| q.queued.load(Ordering::Relaxed))
        .sum()
}

/// Callbacks queued and not yet invoked.
pub(crate) fn backlog() -> u64 {
    queued_total().saturating_sub(INVOKED.load(Ordering::Relaxed))
}

/// `STARTED`: no callback thread.
const NOT_STARTED: u8 = 0;
/// `STARTED`: a caller is spawning it.
const STARTING: u8 = 1;
/// `STARTED`: it runs.
const RUNNING: u8 = 2;

/// Starts the callback thread if it is not running.
///
/// # Panics
/// If the thread cannot be spawned (without it no memory would ever be
/// reclaimed), except on a thread that is exiting or unwinding from a
/// panic (an `RcuCell` dropped on the way out), where a panic would abort
/// the process: there the work stays queued for the next caller, who
/// tries again.
fn ensure_thread() {
    if let Err(err) = try_ensure_thread() {
        if !crate::registry::exiting() && !std::thread::panicking() {
            panic!("vmtask_rcu: cannot start the callback thread: {err}");
        }
    }
}

/// Starts the callback thread if it is not running; `Ok` once it runs.
/// Callers that find another caller starting it wait for the outcome, and
/// try themselves if that caller failed.
fn try_ensure_thread() -> std::io::Result<()> {
    loop {
        match STARTED.load(Ordering::Acquire) {
            RUNNING => return Ok(()),
            NOT_STARTED => {
                if STARTED
                    .compare_exchange(NOT_STARTED, STARTING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return start_thread();
                }
            }
            _ => std::thread::yield_now(),
        }
    }
}

/// Set in a fork child (and inherited by its own children): the callback
/// thread restarts through `pthread_create` directly, not through std.
///
/// Why: std's thread start-up (and exit) takes a process-wide lock of its
/// own (the stack-overflow handler's thread registry). A fork taken while
/// another thread of the parent was starting or exiting copies that lock
/// held, with no thread left to release it and no fork handler that can
/// reach it; a callback thread spawned by std in the child then blocks on
/// it for good, and `barrier` with it. Found as a rare hang of
/// `fork_from_drops` in CI (one run in hundreds): the test thread that
/// had just finished was exiting when the other one forked.
static IN_FORK_CHILD: AtomicBool = AtomicBool::new(false);

/// The callback thread's stack where `RUST_MIN_STACK` does not say: what
/// std gives its threads by default.
const RAW_THREAD_STACK: usize = 2 << 20;

/// The stack std would give a thread it spawns: `RUST_MIN_STACK` if set to
/// a number, else 2 MiB; at least `PTHREAD_STACK_MIN`. Read with `getenv`,
/// not through std, whose environment lock a fork may have copied held
/// (see `IN_FORK_CHILD`); in the child nothing can be changing the
/// environment before this runs but the program's own fork child code.
fn raw_thread_stack() -> usize {
    // SAFETY: getenv with a NUL-terminated name; the value, if any, is a
    // NUL-terminated string that stays valid while nobody sets the
    // variable, and it is copied at once.
    let value = unsafe {
        let ptr = libc::getenv(c"RUST_MIN_STACK".as_ptr());
        (!ptr.is_null()).then(|| std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned())
    };
    value
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(RAW_THREAD_STACK)
        .max(libc::PTHREAD_STACK_MIN)
}

/// First thing in the callback thread: sets the mask of the thread that
/// started it as the program had it, where the crate held signals back on
/// that thread meanwhile (`registry::mask_outside_blocks`: an exiting
/// thread's unregistration hands its drops over, and so may start this
/// thread, with every signal blocked); otherwise the inherited mask stays.
fn set_callback_thread_mask(mask: Option<libc::sigset_t>) {
    if let Some(mask) = mask {
        // SAFETY: sets the calling thread's mask from a valid sigset.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, ptr::null_mut()) };
    }
}

/// The callback thread's entry point when it starts through
/// `pthread_create` (`start_thread_raw`). `mask` is a leaked
/// `Box<Option<sigset_t>>` (`registry::mask_outside_blocks`), taken back here.
extern "C" fn raw_callback_thread(mask: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `start_thread_raw` passes a `Box<Option<sigset_t>>` leaked
    // for this thread alone, and no other code holds it.
    let mask = *unsafe { Box::from_raw(mask.cast::<Option<libc::sigset_t>>()) };
    set_callback_thread_mask(mask);
    // Wakers find the handle once it is here; one that came before found
    // none and needs none: the loop looks for work before it first parks.
    *THREAD.lock() = Some(std::thread::current());
    if std::panic::catch_unwind(callback_thread).is_err() {
        crate::sync::warn(format_args!("vmtask_rcu: the callback thread panicked"));
        std::process::abort();
    }
    ptr::null_mut()
}

/// `start_thread` in a fork child: a detached pthread, outside std's
/// thread start-up (see `IN_FORK_CHILD`).
#[cold]
fn start_thread_raw() -> std::io::Result<()> {
    let mask =
        Box::into_raw(Box::new(crate::registry::mask_outside_blocks())).cast::<libc::c_void>();
    // The attribute object is local, initialised before use and destroyed
    // after; the entry point is an `extern "C"` function that lives as
    // long as the program and takes `mask` over (freed below if the
    // thread is not created).
    // SAFETY: pthread calls on valid objects, as just said.
    let rc = unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        let mut rc = libc::pthread_attr_init(&mut attr);
        if rc == 0 {
            libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
            libc::pthread_attr_setstacksize(&mut attr, raw_thread_stack());
            let mut thread: libc::pthread_t = 0;
            rc = libc::pthread_create(&mut thread, &attr, raw_callback_thread, mask);
            libc::pthread_attr_destroy(&mut attr);
            if rc == 0 {
                // The name std gives it, cut to the kernel's 15 bytes.
                libc::pthread_setname_np(thread, c"vmtask-rcu-call".as_ptr());
            }
        }
        rc
    };
    if rc != 0 {
        // SAFETY: no thread was created to take `mask` over.
        drop(unsafe { Box::from_raw(mask.cast::<Option<libc::sigset_t>>()) });
        // Not started: the next caller tries again.
        STARTED.store(NOT_STARTED, Ordering::Release);
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    STARTED.store(RUNNING, Ordering::Release);
    Ok(())
}

/// Spawns the callback thread; the caller moved `STARTED` to `STARTING`.
#[cold]
fn start_thread() -> std::io::Result<()> {
    if IN_FORK_CHILD.load(Ordering::Relaxed) {
        return start_thread_raw();
    }
    let mask = crate::registry::mask_outside_blocks();
    let spawned = std::thread::Builder::new()
        .name("vmtask-rcu-callbacks".into())
        .spawn(move || {
            set_callback_thread_mask(mask);
            callback_thread();
        });
    match spawned {
        Ok(handle) => {
            *THREAD.lock() = Some(handle.thread().clone());
            STARTED.store(RUNNING, Ordering::Release);
            Ok(())
        }
        Err(err) => {
            // Not started: the next caller tries again.
            STARTED.store(NOT_STARTED, Ordering::Release);
            Err(err)
        }
    }
}

/// Makes the thread process a batch now.
fn wake_thread_urgent() {
    URGENT.store(true, Ordering::SeqCst);
    if SLEEPING.load(Ordering::SeqCst) {
        SLEEPING.store(false, Ordering::SeqCst);
    }
    if let Some(thread) = THREAD.lock().as_ref() {
        thread.unpark();
    }
}

fn wake_thread() {
    if SLEEPING.load(Ordering::SeqCst) && SLEEPING.swap(false, Ordering::SeqCst) {
        if let Some(thread) = THREAD.lock().as_ref() {
            thread.unpark();
        }
    }
}

/// After queuing: start or wake the thread, and apply the backlog limits.
#[inline]
fn after_queue(queued_before: u64, count: u64) {
    ensure_thread();
    if SLEEPING.load(Ordering::SeqCst) {
        wake_thread();
    }
    // Check the limits once per 256 callbacks queued on this CPU; with
    // limits set below `EXACT_LIMITS_BELOW`, at every queuing, or limits
    // smaller than that step would never be seen at all.
    if (queued_before >> 8) != ((queued_before + count) >> 8)
        || SOFT_LIMIT.load(Ordering::Relaxed) < EXACT_LIMITS_BELOW
    {
        check_backlog();
    }
}

#[cold]
fn check_backlog() {
    let backlog = backlog();
    BACKLOG_HIGH.fetch_max(backlog, Ordering::Relaxed);
    let (soft, hard) = backlog_limits();
    if backlog <= soft as u64 {
        return;
    }
    if !URGENT.load(Ordering::Relaxed) {
        // Counted only when this check asks for the grace period: one
        // already asked for (and not yet taken up) is not started again.
        EXPEDITED.fetch_add(1, Ordering::Relaxed);
        wake_thread_urgent();
    }
    // Waiting inside a read-side section would wait for ourselves, and the
    // callback thread cannot wait for itself.
    // Nor inside one of this thread's own deferred drops (run by
    // `defer_drop`): the bag it belongs to is counted in the backlog
    // until the run ends.
    if backlog <= hard as u64
        || on_callback_thread()
        || crate::in_read_section()
        || crate::registry::current_if_registered().is_some_and(|slot| slot.bag.running())
    {
        return;
    }
    // Wait, but never run other threads' callbacks here: the caller may
    // hold locks those callbacks take.
    THROTTLED.fetch_add(1, Ordering::Relaxed);
    DRAIN_WAITERS.fetch_add(1, Ordering::SeqCst);
    // Resume half-way down, not at the soft limit: queuing then overlaps
    // with the callback thread's invoking instead of taking turns.
    let resume = (soft as u64).max(hard as u64 / 2);
    // Or once the excess this caller found has been invoked: a producer
    // that cannot be throttled (a thread retiring inside read-side
    // sections) may keep the backlog above `resume` for as long as it
    // runs, and this caller would wait for all of it (a review of a flaky
    // test: 1,024 `call`s stuck for 30 s behind such a thread).
    let enough = INVOKED
        .load(Ordering::Relaxed)
        .saturating_add(backlog.saturating_sub(resume));
    loop {
        // Read before the backlog: progress after this read changes the
        // word, and the wait below returns at once.
        let seen = DRAINED.load(Ordering::SeqCst);
        // See `report_progress`.
        fence(Ordering::SeqCst);
        if self::backlog() <= resume || INVOKED.load(Ordering::Relaxed) >= enough {
            break;
        }
        crate::sync::futex_wait(&DRAINED, seen, Some(Duration::from_millis(1)));
    }
    DRAIN_WAITERS.fetch_sub(1, Ordering::SeqCst);
}

/// Queues `node` on the current CPU's queue.
///
/// # Safety
/// As for `Queue::push`, and `node`'s `func` is set.
unsafe fn queue_node(node: *mut RcuHead, count: u64) {
    let q = &callbacks().queues[cpu()];
    let before = q.queued.load(Ordering::Relaxed);
    // SAFETY: the caller's contract.
    unsafe { q.push(node, count) };
    after_queue(before, count);
}

/// Queues `f(head)` to run after a grace period, with no allocation:
/// the head lives inside the object, as the kernel's `call_rcu`.
///
/// Callbacks queued on one CPU run in order, one at a time, on the
/// callback thread or a thread helping it (see [`call`]).
///
/// # Safety
/// - `head` points to a valid `RcuHead` that is not queued, and stays
///   valid and untouched until `f` is called with it;
/// - `f(head)` is sound to call once every read-side section that began
///   before this call has ended, on any thread (the object must be `Send`
///   in spirit): usually the callback thread, but also any thread waiting
///   in [`barrier`], the caller's own included, in the middle of that
///   call. Never inside a read-side section.
pub unsafe fn call_intrusive(head: *mut RcuHead, f: unsafe fn(*mut RcuHead)) {
    // SAFETY: the caller owns the head until the callback.
    unsafe { *(*head).func.get() = Some(f) };
    // SAFETY: the caller's contract.
    unsafe { queue_node(head, 1) };
}

/// Runs `f` after a grace period, on the callback thread (or on a thread
/// waiting in [`barrier`], which helps it).
///
/// Past the hard backlog limit ([`set_backlog_limits`]) the call waits for
/// the backlog to drain (to half the hard limit, or until as many
/// callbacks as it was over that mark have been invoked, should other
/// threads keep queuing), unless the caller is inside a read-side section
/// or is the callback thread. A callback that needs a lock the caller holds
/// while it queues can therefore stall at that limit: queue such callbacks
/// outside the lock. The wait also needs grace periods to complete, so at
/// that limit `call` is like [`synchronize`](crate::synchronize): do not
/// call it while holding a lock that a reader may take inside its
/// read-side section, or both wait for each other forever.
///
/// A callback that panics is caught where it runs: the panic's message and
/// `vmtask_rcu: an RCU callback panicked; its object may have leaked` go to
/// stderr, whatever it had not freed yet stays leaked, and the callbacks
/// after it run as usual. The same holds for the drops of [`defer_drop`].
///
/// ```
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use std::sync::Arc;
///
/// let done = Arc::new(AtomicBool::new(false));
/// let flag = done.clone();
/// vmtask_rcu::call(move || flag.store(true, Ordering::Relaxed));
/// vmtask_rcu::barrier(); // waits for the callback
/// assert!(done.load(Ordering::Relaxed));
/// ```
///
/// # Panics
/// If the callback thread cannot be started (the system refuses a new
/// thread: `RLIMIT_NPROC`, no memory), as nothing could then run the work
/// queued; except on a thread that is exiting or unwinding from a panic,
/// where the work stays queued for the next call, which tries again.
pub fn call<F: FnOnce() + Send + 'static>(f: F) {
    let node = Box::into_raw(Box::new(CallNode {
        head: RcuHead::new(),
        f,
    }));
    // SAFETY: a fresh, leaked node whose first field is the head; freed by
    // `run_call_node::<F>`, which is sound on any thread since `F: Send`.
    unsafe { call_intrusive(node.cast::<RcuHead>(), run_call_node::<F>) };
}

/// Drops `value` after a grace period.
///
/// Drops are batched per thread with plain stores (no allocation and no
/// atomic read-modify-write per object). A full batch waits for its grace
/// period and is then dropped by the same thread, one object on each later
/// `defer_drop` (so a loop that allocates and retires reuses the memory it
/// frees, and memory returns to that thread's allocator caches); batches of
/// threads that stop deferring, exit, or meet `barrier()` run on the
/// callback thread instead. Their order relative to other callbacks is unspecified;
/// `barrier()` waits for them all the same.
///
/// So, as with crossbeam-epoch's deferred functions, the drops of objects
/// deferred earlier may run inside a later `defer_drop` on the same thread
/// (never inside a read-side section). Do not defer objects whose `Drop`
/// takes a lock the deferring thread may hold while it calls `defer_drop`;
/// give those to [`call`], whose callbacks never run inside the call that
/// queued them (they run on the callback thread or a thread waiting in
/// [`barrier`]). That later `defer_drop` may come from one of the thread's
/// own thread-local destructors (a structure that retires its nodes as it
/// is dropped), where thread-locals destroyed before it are gone: a `Drop`
/// of a deferred object that uses a thread-local should reach it with
/// `try_with`, or `with` panics there and the object leaks (the panic is
/// caught and reported).
///
/// Memory stays bounded because a thread keeps at most 64 full batches
/// (8,064 objects) waiting: past that, `defer_drop` waits for a grace
/// period itself (except inside a read-side section or a callback, where
/// it hands the surplus to the callback thread). So, as with
/// [`synchronize`](crate::synchronize), do not defer thousands of objects
/// in a row while holding a lock that a reader may take inside its
/// read-side section: with that reader waiting for the lock, both wait for
/// each other forever (a stall report goes to stderr after 1 s).
///
/// ```
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// static DROPPED: AtomicUsize = AtomicUsize::new(0);
/// struct Node(u64);
/// impl Drop for Node {
///     fn drop(&mut self) {
///         DROPPED.fetch_add(1, Ordering::Relaxed);
///     }
/// }
///
/// for i in 0..1000 {
///     // An object unlinked from a structure that readers may still see.
///     vmtask_rcu::defer_drop(Box::new(Node(i)));
/// }
/// vmtask_rcu::barrier(); // every deferred drop has run
/// assert_eq!(DROPPED.load(Ordering::Relaxed), 1000);
/// ```
///
/// # Panics
/// If the callback thread cannot be started (the system refuses a new
/// thread: `RLIMIT_NPROC`, no memory), as nothing could then run the work
/// queued; except on a thread that is exiting or unwinding from a panic,
/// where the work stays queued for the next call, which tries again.
pub fn defer_drop<T: Send + 'static>(value: Box<T>) {
    /// # Safety
    /// `data` is a `Box<T>` leaked with `Box::into_raw`, dropped once.
    unsafe fn drop_box<T>(data: *mut ()) {
        // SAFETY: `data` came from `Box::into_raw` below.
        drop(unsafe { Box::from_raw(data.cast::<T>()) });
    }
    // SAFETY: the box is ours; dropping a `T: Send` on another thread
    // after a grace period is what the caller asked for.
    unsafe { defer_raw(Box::into_raw(value).cast::<()>(), drop_box::<T>) };
}

/// Calls `drop_fn(data)` after a grace period, batched like
/// [`defer_drop`].
///
/// # Safety
/// `drop_fn(data)` must be sound to call once, once every read-side
/// section that began before this call has ended, on any thread. That is
/// usually *this* thread, in the middle of one of its later calls that
/// defer (`defer_raw`, [`defer_drop`], [`RcuCell`](crate::RcuCell)'s
/// `store`, `compare_and_store` and drop, [`Retired`](crate::Retired)'s
/// drop): a `drop_fn` must not need state that such a call's caller holds
/// borrowed (a `RefCell` borrowed across it, a `&mut` to a thread-local).
/// It may also run on the callback thread or on any thread waiting in
/// [`barrier`]; never inside a read-side section.
pub unsafe fn defer_raw(data: *mut (), drop_fn: unsafe fn(*mut ())) {
    let Some(slot) = crate::registry::current_for_bag() else {
        return defer_one(data, drop_fn);
    };
    // Frees may not run inside a read-side section (a drop could wait for
    // a grace period) nor from a callback.
    let may_run = !crate::registry::registered_in_section() && !on_callback_thread();
    let (pushed, ready) = slot.bag.push((data, drop_fn), may_run, count_filled_bag);
    // The common case: not the bag's first entry, so the thread was woken
    // for the bag already, unless a fork has since left this process
    // without one (the child restarts it on next use, and this is a use).
    // Checked after the drop, which may itself have forked. Everything
    // else is out of line, so that this path saves few registers.
    if let Pushed::Stored { first: false } = pushed {
        if let Some(entry) = ready {
            slot.bag.run_one(entry);
        }
        if STARTED.load(Ordering::Relaxed) != RUNNING {
            wake_for_bag();
        }
        return;
    }
    pushed_slow(slot, pushed, ready, data, drop_fn);
}

/// Wakes the callback thread for a bag that holds entries, starting it
/// first where it is not running (not yet, or in a fork child).
#[cold]
#[inline(never)]
fn wake_for_bag() {
    // Built here, on every thread's first entry (of its first bag, and of
    // a bag after a fork), so that a bag that fills never builds it:
    // `count_filled_bag` runs inside the owner's hand-off, where a panic
    // (building may panic) would leave flushers waiting for good.
    callbacks();
    ensure_thread();
    // Pairs with the thread's SLEEPING store and bag re-check.
    fence(Ordering::SeqCst);
    wake_thread();
}

/// `defer_raw` past its common case: the bag's first entry, a bag that
/// filled, or bags a flusher holds.
#[cold]
#[inline(never)]
fn pushed_slow(
    slot: &'static crate::registry::Slot,
    pushed: Pushed,
    ready: Option<crate::bag::DropEntry>,
    data: *mut (),
    drop_fn: unsafe fn(*mut ()),
) {
    if let Some(entry) = ready {
        slot.bag.run_one(entry);
    }
    match pushed {
        Pushed::Stored { .. } => wake_for_bag(),
        Pushed::Filled => bag_filled(slot),
        Pushed::Busy => defer_one(data, drop_fn),
    }
}

/// Counts a bag that just filled as queued (its entries): in the push
/// that fills it, while the bag is still the owner's (so before a flusher
/// can run it and count it invoked), and before that push's drop, which
/// may fork (a child must find the full bag counted, as its recount
/// assumes).
#[cold]
fn count_filled_bag() {
    callbacks().queues[cpu()]
        .queued
        .fetch_add(BAG_CAPACITY as u64, Ordering::Relaxed);
}

/// A thread's bag filled (and was counted): ask for a grace period, and
/// run what is ready.
#[cold]
fn bag_filled(slot: &'static crate::registry::Slot) {
    ensure_thread();
    BACKLOG_HIGH.fetch_max(backlog(), Ordering::Relaxed);
    // Frees may not run inside a read-side section (a drop could wait for a
    // grace period) nor from a callback, nor inside one of this thread's
    // own drops (`collect` would do nothing there, and the bags would pile
    // up past the bound for as long as the drop defers).
    let may_run = !crate::in_read_section() && !on_callback_thread() && !slot.bag.running();
    if !may_run {
        // Past the bound, the oldest bags go to the callback thread, which
        // waits for their grace period and runs them (`push_bag` neither
        // blocks nor runs drops; they were counted as queued when they
        // filled).
        let cpu = cpu();
        let handed = slot.bag.hand_over_surplus(|bag| {
            push_bag(cpu, bag);
        });
        request_grace_period(handed > 0);
        return;
    }
    let (waiting, newest) = slot.bag.collect(true);
    if waiting == 0 {
        return;
    }
    let expedite = newest
        .filter(|_| waiting >= MAX_WAITING_URGENT && EXPEDITE_AFTER.get().is_none_or(grace::done));
    if let Some(newest) = expedite {
        match grace::try_expedite(newest) {
            Expedite::Done => {
                // Every waiting bag is ready: drain the oldest next.
                slot.bag.start_draining();
                return;
            }
            Expedite::Readers => {
                // A reader is in a long section: leave the wait to the
                // callback thread, and do not try again before it is over.
                EXPEDITE_AFTER.set(Some(grace::snapshot()));
                request_grace_period(true);
                return;
            }
            Expedite::Busy => {}
        }
    }
    request_grace_period(waiting >= MAX_WAITING_URGENT);
}

/// Bags waiting for their grace period past which it is due: the
/// deferring thread runs it itself if it can (`grace::try_expedite`),
/// otherwise asks the callback thread for it at once. 32 bags, about 4,000
/// objects, so a grace period (0.2 µs with no other reader registered, a
/// few µs with some) costs a fraction of a nanosecond per object.
const MAX_WAITING_URGENT: usize = 32;

thread_local! {
    /// The deferring thread gave up running a grace period because of a
    /// reader: it does not try again until the grace period of this
    /// snapshot (asked of the callback thread) has completed.
    static EXPEDITE_AFTER: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Asks the callback thread for a grace period; `urgent` skips its lazy
/// batching delay.
fn request_grace_period(urgent: bool) {
    if urgent {
        // Whether or not a wake-up is already on its way: one that was
        // taken before this store must not swallow this request (review
        // finding: it waited for the next bag or the idle steal).
        NEED_GP.store(true, Ordering::SeqCst);
        if !URGENT.load(Ordering::Relaxed) {
            wake_thread_urgent();
        }
        return;
    }
    if !NEED_GP.load(Ordering::Relaxed) {
        NEED_GP.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        wake_thread();
    }
}

/// Queues a bag taken from a thread on `cpu`'s queue, without the wake-up
/// and the backlog check, for callers that may not block or run callbacks
/// (a flusher holding the flush lock, a thread exiting while it holds its
/// bags); they call `after_queue` or `wake_after_push` afterwards. Its
/// entries were counted as queued when it filled, except a partial bag's.
pub(crate) fn push_bag(cpu: usize, mut bag: Box<Bag>) -> (u64, u64) {
    let count = if bag.len == BAG_CAPACITY {
        0
    } else {
        bag.len as u64
    };
    *bag.head.func.get_mut() = Some(run_bag);
    let q = &callbacks().queues[cpu];
    let before = q.queued.load(Ordering::Relaxed);
    // SAFETY: a leaked bag whose first field is the head, freed by
    // `run_bag`; entries obey `defer_raw`'s contract.
    unsafe { q.push(Box::into_raw(bag).cast::<RcuHead>(), count) };
    (before, count)
}

/// Starts or wakes the callback thread after `push_bag`, from an exiting
/// thread: never panics (see `try_ensure_thread`).
pub(crate) fn wake_after_push() {
    if try_ensure_thread().is_ok() {
        wake_thread();
    }
}

#[cold]
fn defer_one(data: *mut (), drop_fn: unsafe fn(*mut ())) {
    let node = Box::into_raw(Box::new(DropNode {
        head: RcuHead::new(),
        data,
        drop_fn,
    }));
    // SAFETY: a fresh, leaked node whose first field is the head; freed by
    // `run_drop_node`; `defer_raw`'s contract covers the drop.
    unsafe { call_intrusive(node.cast::<RcuHead>(), run_drop_node) };
}

/// Moves threads' bags to the shared queues: every thread's (`all`, for
/// `barrier`, which also gets the threads' own runs in progress to wait
/// for), or those of threads that filled no bag for `IDLE_AFTER` (idle
/// ones, whose bags would otherwise wait for them forever).
fn flush_bags(all: bool) -> Vec<crate::bag::RunInProgress> {
    thread_local! {
        /// Per slot: the fill count last seen and since when.
        static LAST_FILLED: std::cell::RefCell<std::collections::HashMap<usize, (u64, Instant)>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    let now = Instant::now();
    let cpu = cpu();
    let mut queued = Vec::new();
    let mut runs = Vec::new();
    let mut flush = |mut last: Option<&mut std::collections::HashMap<usize, (u64, Instant)>>| {
        // Queued inside the steal (see `steal`); the wake-up and the
        // backlog check, which may block, come after it.
        let queue = |bag| queued.push(push_bag(cpu, bag));
        crate::bag::steal(queue, all.then_some(&mut runs), |slot| {
            let Some(last) = last.as_deref_mut() else {
                return true;
            };
            let key = slot as *const crate::registry::Slot as usize;
            let filled = slot.bag.filled();
            let seen = last.entry(key).or_insert((filled, now));
            if seen.0 != filled {
                *seen = (filled, now);
            }
            all || now.duration_since(seen.1) >= IDLE_AFTER
        });
    };
    if !on_callback_thread() {
        // `barrier`, which takes every bag: no idle tracking, and so no
        // map, which a `barrier` from a pthread-key destructor (past the
        // thread's Rust destructors) would create and leak (review
        // finding).
        debug_assert!(all, "only the callback thread looks for idle bags");
        flush(None);
    } else if LAST_FILLED
        .try_with(|last| flush(Some(&mut last.borrow_mut())))
        .is_err()
    {
        // Past the map's destructor: a fresh map sees no thread idle yet.
        flush(Some(&mut std::collections::HashMap::new()));
    }
    for (before, count) in queued {
        after_queue(before, count);
    }
    runs
}

/// Whether anything waits to be processed (a hint: racy by design, made
/// exact by the SLEEPING handshake).
fn work_pending() -> bool {
    ready_pending()
        || !CONSUMER.lock().is_empty()
        || NEED_GP.load(Ordering::SeqCst)
        || callbacks().queues.iter().any(|q| !q.is_empty())
        || crate::registry::any_bag_has_entries()
}

/// Callbacks wait this long to gather a larger batch, unless something is
/// urgent: fewer grace periods, and fewer membarrier interruptions of the
/// threads that queue them.
const LAZY_DELAY: Duration = Duration::from_millis(1);
/// A thread that filled no bag for this long has its bags taken.
const IDLE_AFTER: Duration = Duration::from_millis(5);

/// A spliced list per CPU queue (in `READY`, whose grace period has
/// passed; in `CONSUMER`, waiting for it).
struct ReadyBatch(Vec<(*mut RcuHead, *mut RcuHead)>);

// SAFETY: the nodes were handed to us by `call_intrusive`, whose contract
// makes their callbacks sound to run on any thread.
unsafe impl Send for ReadyBatch {}

/// Batches past their grace period, oldest first.
static READY: CachePadded<Mutex<VecDeque<ReadyBatch>>> =
    CachePadded::new(Mutex::new(VecDeque::new()));
/// Held while invoking: batches run one at a time, in order.
static INVOKING: CachePadded<Mutex<()>> = CachePadded::new(Mutex::new(()));

/// Invokes the oldest ready batch, if there is one and nobody else is
/// invoking. Returns whether it did.
///
/// The callback thread calls this after each grace period; a thread
/// waiting in `barrier` calls it too (it would wait for the same callbacks
/// anyway), so the callbacks run while the callback thread starts the
/// next grace period.
fn invoke_ready() -> bool {
    let Some(_invoking) = INVOKING.try_lock() else {
        return false;
    };
    let Some(batch) = READY.lock().pop_front() else {
        return false;
    };
    let was_callback_thread = IS_CALLBACK_THREAD.with(|c| c.replace(true));
    let mut invoked = 0;
    for &(first, last) in &batch.0 {
        // SAFETY: spliced by the callback thread, which then waited for a
        // grace period before making the batch ready.
        invoked += unsafe { invoke(first, last) };
    }
    IS_CALLBACK_THREAD.with(|c| c.set(was_callback_thread));
    UNCOUNTED.set(false);
    LARGEST_BATCH.fetch_max(invoked, Ordering::Relaxed);
    true
}

fn ready_pending() -> bool {
    !READY.lock().is_empty()
}

fn callback_thread() {
    IS_CALLBACK_THREAD.with(|c| c.set(true));
    THE_CALLBACK_THREAD.with(|c| c.set(true));
    let cb = callbacks();
    loop {
        // Whatever is ready and not being invoked by a helper.
        while invoke_ready() {}
        if !URGENT.swap(false, Ordering::SeqCst) {
            if !work_pending() {
                SLEEPING.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if !work_pending() && !URGENT.load(Ordering::SeqCst) {
                    std::thread::park_timeout(Duration::from_secs(1));
                }
                SLEEPING.store(false, Ordering::SeqCst);
                continue;
            }
            std::thread::park_timeout(LAZY_DELAY);
            URGENT.store(false, Ordering::SeqCst);
        }
        // Callers throttled by the backlog: take every thread's bags, not
        // only idle ones', since bags a busy thread keeps count in the
        // backlog and nothing else would drain them.
        flush_bags(DRAIN_WAITERS.load(Ordering::SeqCst) > 0);
        let need_gp = NEED_GP.swap(false, Ordering::SeqCst);
        let spliced = {
            let mut waiting = CONSUMER.lock();
            let batch: Vec<_> = cb.queues.iter().filter_map(Queue::splice).collect();
            if !batch.is_empty() {
                waiting.push(ReadyBatch(batch));
            }
            // Batches a fork child inherited wait here too.
            !waiting.is_empty()
        };
        if !spliced {
            if need_gp {
                // For the threads' waiting bags.
                grace::wait(grace::snapshot());
            }
            continue;
        }
        // One grace period for everything queued before the splice.
        grace::wait(grace::snapshot());
        let mut waiting = CONSUMER.lock();
        BATCHES.fetch_add(waiting.len() as u64, Ordering::Relaxed);
        READY.lock().extend(waiting.drain(..));
    }
}

struct BarrierState {
    remaining: AtomicUsize,
    waiter: Thread,
}

#[repr(C)]
struct BarrierNode {
    head: RcuHead,
    state: Arc<BarrierState>,
}

/// # Safety
/// `head` is the head of a leaked `Box<BarrierNode>`.
unsafe fn run_barrier_node(head: *mut RcuHead) {
    // SAFETY: the caller's contract.
    let node = unsafe { Box::from_raw(head.cast::<BarrierNode>()) };
    set_node_weight(0);
    // The callbacks before this node are counted before `barrier` returns.
    let unreported = UNREPORTED.replace(0);
    if unreported > 0 {
        report_progress(unreported);
    }
    if node.state.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        node.state.waiter.unpark();
    }
}

/// Whether [`barrier`] may be called here without panicking: false inside
/// a read-side section, in an RCU callback (or on a thread running
/// callbacks for the callback thread), and in a drop that [`defer_drop`]
/// runs, where it would wait for itself. For destructors that must choose
/// another path there (under `panic = "abort"` a caught panic is an abort).
pub fn barrier_allowed() -> bool {
    !crate::in_read_section()
        && !on_callback_thread()
        && !crate::registry::current_if_registered().is_some_and(|slot| slot.bag.running())
}

/// Waits until every callback queued (by any thread) before this call has
/// been invoked (`rcu_barrier`), and every object deferred before it has
/// been dropped. Callbacks queued by those callbacks may still be pending,
/// and so may drops deferred by those drops (the values of `RcuCell`s
/// inside a dropped object, one level per grace period, unless the code
/// run after the first takes them:
/// [`RcuCell::take_unchecked`](crate::RcuCell::take_unchecked)).
///
/// While it waits, the calling thread helps run callbacks whose grace
/// period has passed (any thread's): they see this thread's thread-locals,
/// and must not need a lock the caller holds — which they could not get
/// from the callback thread either while the caller waits here.
///
/// ```
/// let cell = vmtask_rcu::RcuCell::new(Some(Box::new(1u32)));
/// cell.store(None); // the 1 is dropped after a grace period
/// vmtask_rcu::barrier(); // ... which has now passed, and the drop run
/// let stats = vmtask_rcu::stats();
/// assert_eq!(stats.callbacks_queued, stats.callbacks_invoked);
/// ```
///
/// # Panics
/// Inside a read-side section, from an RCU callback, or from a deferred
/// drop that `defer_drop` (or `RcuCell::store`) runs on the calling
/// thread: each would wait for itself forever ([`barrier_allowed`] tells
/// whether a call may). Also if the callback thread cannot be started
/// (the system refuses a new thread), as nothing could then run what it
/// waits for.
pub fn barrier() {
    crate::grace::assert_not_reading("barrier");
    assert!(
        !on_callback_thread(),
        "vmtask_rcu::barrier called from an RCU callback: the callback thread would wait for \
         itself and deadlock"
    );
    assert!(
        !crate::registry::current_if_registered().is_some_and(|slot| slot.bag.running()),
        "vmtask_rcu::barrier called from a deferred drop run inside defer_drop: barrier waits \
         for every drop deferred before it, this one included, and would deadlock"
    );
    let cb = callbacks();
    // Waiting below needs the thread, exiting caller or not.
    if let Err(err) = try_ensure_thread() {
        panic!("vmtask_rcu::barrier: cannot start the callback thread: {err}");
    }
    let runs_in_progress = flush_bags(true);
    let state = Arc::new(BarrierState {
        remaining: AtomicUsize::new(cb.queues.len()),
        waiter: std::thread::current(),
    });
    for q in cb.queues.iter() {
        let node = Box::into_raw(Box::new(BarrierNode {
            head: RcuHead::new(),
            state: state.clone(),
        }));
        // SAFETY: a fresh, leaked node, freed by `run_barrier_node`.
        unsafe {
            *(*node).head.func.get() = Some(run_barrier_node);
            // Not counted as queued: `run_barrier_node` uncounts its
            // invocation, so the statistics show the user's callbacks only.
            q.push(node.cast::<RcuHead>(), 0);
        }
    }
    wake_thread_urgent();
    while state.remaining.load(Ordering::Acquire) != 0 {
        if !invoke_ready() {
            // A callback this thread ran may have forked: in the child,
            // the thread must start again (and a failed start is retried).
            let _ = try_ensure_thread();
            std::thread::park_timeout(Duration::from_millis(1));
        }
    }
    // Bags their threads took out to run just before we took the rest.
    for (slot, done) in runs_in_progress {
        while slot.bag.runs() <= done {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Before `fork`: no queue is being spliced, the lists of batches are
/// whole, and the machinery is not half-built. Takes only locks (nothing
/// is built here).
pub(crate) fn before_fork() {
    std::mem::forget(CONSUMER.lock());
    std::mem::forget(READY.lock());
    std::mem::forget(CALLBACKS_INIT.lock());
}

/// In the parent after `fork`.
pub(crate) fn after_fork_parent() {
    // SAFETY: `before_fork` locked these on this thread and leaked the
    // guards.
    unsafe {
        CALLBACKS_INIT.force_unlock();
        READY.force_unlock();
        CONSUMER.force_unlock();
    }
}

/// The last node of a spliced list `(first, last)` reachable through its
/// links: `last`, unless a producer was stopped by a fork before it linked
/// a node (see `Queue::cut_after_fork`).
fn reachable_end(first: *mut RcuHead, last: *mut RcuHead) -> *mut RcuHead {
    let mut node = first;
    while node != last {
        // SAFETY: a spliced, not yet invoked node, reached through links.
        let next = unsafe { (*node).next.load(Ordering::Relaxed) };
        if next.is_null() {
            return node;
        }
        node = next;
    }
    last
}

/// In the fork child: the callback thread is gone (unless it is the
/// thread that forked, from a callback); start anew on next use. Batches
/// it had spliced, ready or waiting for their grace period, run in the
/// child; what another thread was invoking or queuing at the fork is lost
/// there (see `recount_after_fork`).
pub(crate) fn after_fork_child() {
    // SAFETY: `before_fork` locked these on the forking thread, the only
    // thread of the child, and leaked the guards.
    unsafe {
        CALLBACKS_INIT.force_unlock();
        READY.force_unlock();
    }
    // Before anything can push or invoke: no link may be missing for good.
    for queue in callbacks_if_built().iter().flat_map(|cb| cb.queues.iter()) {
        queue.cut_after_fork();
    }
    {
        // SAFETY: as above, for `CONSUMER`; relocked at once, so the
        // lists below are walked under their locks like anywhere else.
        unsafe { CONSUMER.force_unlock() };
        let mut waiting = CONSUMER.lock();
        let mut ready = READY.lock();
        for batch in ready.iter_mut().chain(waiting.iter_mut()) {
            for (first, last) in batch.0.iter_mut() {
                *last = reachable_end(*first, *last);
            }
        }
    }
    // A fork from inside a callback: what this thread ran and had not yet
    // counted, and the rest of its batch, are in the recount
    // (`recount_after_fork`), which counts them as invoked.
    UNREPORTED.with(|c| c.set(0));
    if on_callback_thread() {
        UNCOUNTED.set(true);
    }
    // Throttled threads of the parent are not in the child.
    DRAIN_WAITERS.store(0, Ordering::SeqCst);
    SLEEPING.store(false, Ordering::SeqCst);
    // A callback that forked runs on in the child, on the thread that now
    // holds `INVOKING`: the callback thread itself, which then goes on
    // with its loop, or a thread helping in `barrier`.
    let in_callback = on_callback_thread();
    let callback_thread = THE_CALLBACK_THREAD.with(Cell::get);
    // SAFETY: the only thread in the child; if a parent thread held these
    // locks across fork, nobody will release them. `INVOKING` held by this
    // thread is released by its own guard.
    unsafe {
        if THREAD.is_locked() {
            THREAD.force_unlock();
        }
        if INVOKING.is_locked() && !in_callback {
            INVOKING.force_unlock();
        }
    }
    if callback_thread {
        *THREAD.lock() = Some(std::thread::current());
        STARTED.store(RUNNING, Ordering::SeqCst);
    } else {
        *THREAD.lock() = None;
        STARTED.store(NOT_STARTED, Ordering::SeqCst);
    }
    IN_FORK_CHILD.store(true, Ordering::Relaxed);
}

/// In the fork child, once the bags of the threads that did not survive
/// the fork are queued: counts as invoked every callback that was queued
/// and will not run here (invoked already, or lost at the fork), so that
/// the backlog holds exactly what is still queued, ready or waiting, and
/// no lost callback throttles the child forever.
pub(crate) fn recount_after_fork() {
    let Some(cb) = callbacks_if_built() else {
        return;
    };
    let weight = |(first, last): (*mut RcuHead, *mut RcuHead)| {
        let mut total = 0;
        let mut node = first;
        loop {
            let (func, next) =
                // SAFETY: a queued, not yet invoked node, reached through
                // links (nothing runs in the child yet); `func` was set
                // before it was queued.
                unsafe { (*(*node).func.get(), (*node).next.load(Ordering::Relaxed)) };
            let is =
                |f: unsafe fn(*mut RcuHead)| func.is_some_and(|func| std::ptr::fn_addr_eq(func, f));
            total += if is(run_bag) {
                // SAFETY: a bag node's head is the first field of its bag.
                unsafe { (*node.cast::<Bag>()).remaining() as u64 }
            } else if is(run_barrier_node) {
                0
            } else {
                1
            };
            if node == last || next.is_null() {
                return total;
            }
            node = next;
        }
    };
    let queued: u64 = cb
        .queues
        .iter()
        .filter_map(|q| {
            // SAFETY: the stub, valid as long as the queue.
            let first = unsafe { (*q.stub()).next.load(Ordering::Relaxed) };
            (!first.is_null()).then(|| (first, q.tail.load(Ordering::Relaxed)))
        })
        .map(weight)
        .sum();
    let spliced: u64 = {
        let waiting = CONSUMER.lock();
        let ready = READY.lock();
        ready
            .iter()
            .chain(waiting.iter())
            .flat_map(|batch| batch.0.iter().copied())
            .map(weight)
            .sum()
    };
    // The forking thread's own bags, counted as queued when they filled.
    let own = crate::registry::current_if_registered().map_or(0, |slot| {
        // SAFETY: the only thread of the child, and not inside a push (it
        // is in its fork handler).
        unsafe { slot.bag.counted_pending_after_fork() }
    });
    let pending = queued + spliced + own;
    INVOKED.store(queued_total().saturating_sub(pending), Ordering::SeqCst);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI32;

    static CHILD: AtomicI32 = AtomicI32::new(0);
    static LATE_NODE_RAN: AtomicBool = AtomicBool::new(false);

    /// A callback node running `f`, not queued yet.
    fn call_node<F: FnOnce() + Send + 'static>(f: F) -> *mut RcuHead {
        let node = Box::into_raw(Box::new(CallNode {
            head: RcuHead::new(),
            f,
        }));
        let head = node.cast::<RcuHead>();
        // SAFETY: a fresh node of ours, not shared yet.
        unsafe { *(*head).func.get() = Some(run_call_node::<F>) };
        head
    }

    /// A callback forks while a later node of its batch still waits for
    /// its producer's link. In the child the producer is gone: the batch
    /// must end there, not spin on the link for good (which stopped every
    /// callback and `barrier` in the child).
    #[test]
    fn a_fork_from_a_callback_before_a_missing_link_of_its_batch() {
        crate::barrier();
        let forks = call_node(|| {
            // SAFETY: the child runs RCU code, then `_exit`s.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: a hang ends the child with SIGALRM.
                unsafe { libc::alarm(10) };
                std::thread::spawn(|| {
                    crate::barrier();
                    // SAFETY: ends the child without running the parent's
                    // test harness.
                    unsafe { libc::_exit(0) };
                });
                return;
            }
            CHILD.store(pid, Ordering::SeqCst);
        });
        // `invoke` reads a node's link before running it, so the missing
        // link is the one after the next node.
        let next = call_node(|| {});
        let late = call_node(|| LATE_NODE_RAN.store(true, Ordering::SeqCst));
        let queue = &callbacks().queues[0];
        let unlinked = {
            // No splice until the producer below is half-way.
            let _no_splice = CONSUMER.lock();
            // SAFETY: fresh nodes, each queued once.
            unsafe {
                queue.push(forks, 1);
                queue.push(next, 1);
            }
            queue.queued.fetch_add(1, Ordering::Relaxed);
            // The first half of `Queue::push`: a producer stopped between
            // its tail swap and its link.
            // SAFETY: `late` is ours and not queued yet.
            unsafe { (*late).next.store(ptr::null_mut(), Ordering::Relaxed) };
            queue.tail.swap(late, Ordering::SeqCst)
        };
        assert_ne!(
            unlinked,
            queue.stub(),
            "the queue was spliced under the lock"
        );
        wake_thread_urgent();
        let start = std::time::Instant::now();
        let child = loop {
            match CHILD.load(Ordering::SeqCst) {
                0 => {
                    assert!(
                        start.elapsed() < Duration::from_secs(60),
                        "the forking callback did not run in 60 s"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                pid => break pid,
            }
        };
        // The producer, in the parent, finishes its push.
        // SAFETY: `unlinked` is queued after `forks` and not yet invoked:
        // the invocation waits for this link.
        unsafe { (*unlinked).next.store(late, Ordering::Release) };
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        crate::barrier();
        assert!(
            LATE_NODE_RAN.load(Ordering::SeqCst),
            "the parent lost a node"
        );
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child's barrier did not return: wait status {status:#x}"
        );
    }
}
