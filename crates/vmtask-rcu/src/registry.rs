//! Reader registration: each thread's `ReaderCtr` lives in its own
//! thread-local storage (`LOCAL`), so `read_lock` reaches it with no
//! pointer chase, and is published in a `Slot` on the thread's first use.
//!
//! Slots are leaked, never freed, and reused by later threads; they hold
//! the thread's deferred-drop bag and the pointer to the reader updaters
//! scan (`Slot::reader`). That pointer is written, and read by updaters,
//! only under the registry lock, and a thread takes the lock to
//! unregister: no updater reads a thread-local reader once its thread has
//! gone. The thread unregisters in `Registration`'s destructor, or, if that
//! never runs, in a pthread-key destructor armed before the reader is
//! published (`backstop`). A slot released (or reused) during a grace period reads as
//! quiescent or as a section newer than the grace period, both of which
//! the updater may treat as done.
//!
//! Sections with no registered `LOCAL` use a slot's own `ReaderCtr`,
//! which outlives any thread:
//! - a thread whose registration ends while a section is still open (a
//!   guard kept in a thread-local that is destroyed later, or a leaked
//!   guard) hands the section to its slot (`ReaderCtr::adopt`), and the
//!   guard that ends it releases the slot; a leaked guard keeps it forever,
//!   stalling grace periods as liburcu does, because references read under
//!   a leaked guard are `'static` and may have left the thread;
//! - a section opened after the registration ended (from a later
//!   thread-local destructor) takes a temporary slot for that section.
//!
//! `OFFLINE_SLOT` names that slot while its section is open.

use crate::sync::Mutex;
use crossbeam_utils::CachePadded;
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::bag::LocalBag;
use crate::gp::ReaderCtr;
use crate::grace::GP;

/// A registered reader and its bag.
pub(crate) struct Slot {
    /// The reader updaters scan: its thread's `LOCAL`, or `own`; null
    /// when the slot is free. Only accessed under the registry lock.
    reader: AtomicPtr<ReaderCtr>,
    /// The reader of a section with no registered `LOCAL` (see the module
    /// header).
    own: CachePadded<ReaderCtr>,
    /// The thread's deferred-drop bag.
    pub(crate) bag: CachePadded<LocalBag>,
    in_use: AtomicBool,
}

impl Slot {
    /// The published value of the slot's reader (`ReaderCtr::slot`), or
    /// `None` if no reader is published: its thread has gone, and its
    /// sections with it.
    ///
    /// # Safety
    /// The caller holds the registry lock (see the module header).
    unsafe fn reader_slot(&self) -> Option<usize> {
        let reader = self.reader.load(Ordering::Relaxed);
        // SAFETY: a published reader is a thread's `LOCAL`, valid until
        // that thread unpublishes it under the registry lock, which the
        // caller holds; or a slot's `own`, which is leaked.
        (!reader.is_null()).then(|| unsafe { &*reader }.slot())
    }
}

/// Every slot ever created, in use or free.
pub(crate) static REGISTRY: CachePadded<Mutex<Vec<&'static Slot>>> =
    CachePadded::new(Mutex::new(Vec::new()));

thread_local! {
    /// This thread's reader. Constant-initialised with no destructor, so
    /// it is addressed directly and usable at any point of the thread's
    /// life, thread-local destructors included.
    pub(crate) static LOCAL: ReaderCtr = const { ReaderCtr::offline() };
    /// This thread's slot, or null before registration / after exit.
    static CURRENT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    /// The slot holding this thread's open section while `LOCAL` is
    /// offline; null otherwise.
    static OFFLINE_SLOT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    /// Set once this thread's registration has ended: it never registers
    /// again (`REGISTRATION` may still be alive, see `backstop`).
    static UNREGISTERED: Cell<bool> = const { Cell::new(false) };
    /// Owns the registration; releases the slot when the thread exits.
    static REGISTRATION: Registration = Registration::new();
    /// The thread's signal mask from before the outermost `SignalsBlocked`
    /// that is alive, if one is (`mask_outside_blocks`).
    static MASK_OUTSIDE: Cell<Option<libc::sigset_t>> = const { Cell::new(None) };
}

struct Registration {
    /// `None` if the backstop could not be armed: the thread then reads
    /// through temporary slots.
    slot: Option<&'static Slot>,
}

/// Blocks every signal on the calling thread while it lives. Registration
/// and unregistration take the crate's locks and publish or unpublish
/// `LOCAL` in several steps: a signal handler that reads (or makes the
/// thread's first RCU use) in the middle would re-enter them, and std's
/// lazy thread-local initialisation is re-entrant, so the thread would be
/// registered twice and one slot left publishing its `LOCAL` after it
/// exits. Blocked, the signal is delivered once the thread is registered
/// (or unregistered).
///
/// Nestable: the outermost one records the mask it saved in
/// `MASK_OUTSIDE`, so that a thread started meanwhile (the callback
/// thread, started by an unregistration that hands drops over) gets the
/// program's mask, not this one.
struct SignalsBlocked {
    old: libc::sigset_t,
    outermost: bool,
}

impl SignalsBlocked {
    fn new() -> Self {
        // SAFETY: sigset_t is plain data; both are valid out-pointers and
        // pthread_sigmask only changes the calling thread's mask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // Signals the kernel forces stay deliverable: faults (a
            // stack-overflow handler, say), a seccomp trap (SIGSYS) and a
            // breakpoint (SIGTRAP); blocked, the kernel would reset their
            // handler and kill the process.
            for sig in [
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
                libc::SIGSYS,
                libc::SIGTRAP,
            ] {
                libc::sigdelset(&mut all, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
            // Signals are blocked now: no handler runs between the two.
            let outermost = MASK_OUTSIDE.with(|m| m.get().is_none());
            if outermost {
                MASK_OUTSIDE.with(|m| m.set(Some(old)));
            }
            SignalsBlocked { old, outermost }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        if self.outermost {
            MASK_OUTSIDE.with(|m| m.set(None));
        }
        // SAFETY: restores the mask saved by `new` on this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, ptr::null_mut()) };
    }
}

/// The calling thread's signal mask as the program set it, if the crate
/// has blocked signals on it for now (`SignalsBlocked`); `None` when the
/// thread's mask is the program's own.
pub(crate) fn mask_outside_blocks() -> Option<libc::sigset_t> {
    MASK_OUTSIDE.with(Cell::get)
}

impl Registration {
    fn new() -> Self {
        let _blocked = SignalsBlocked::new();
        // Before any lock of the crate is taken (see `fork.rs`).
        crate::fork::register_handlers();
        // Armed first: a `LOCAL` is never published without a way to
        // unpublish it.
        if !backstop::arm() {
            UNREGISTERED.with(|u| u.set(true));
            return Registration { slot: None };
        }
        let slot = acquire_slot(Reader::Local);
        CURRENT.with(|c| c.set(slot));
        Registration { slot: Some(slot) }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            unregister(slot);
        }
    }
}

/// Ends the calling thread's registration in `slot`: called by
/// `Registration`'s destructor, or by the backstop if that destructor
/// never runs. Once only; later sections take temporary slots.
fn unregister(slot: &'static Slot) {
    if UNREGISTERED.with(|u| u.replace(true)) {
        return;
    }
    let _blocked = SignalsBlocked::new();
    // Other thread-local destructors may still read; they get temporary
    // slots (see `lock_offline`).
    CURRENT.with(|c| c.set(ptr::null()));
    // The thread's pending drops go on without it, queued while the bags
    // are still ours so that a concurrent `barrier` cannot miss them.
    let cpu = vmtask_percpu::cpu();
    let mut queued = false;
    slot.bag.hand_over_own(|bag| {
        if bag.len > 0 {
            crate::callback::push_bag(cpu, bag);
            queued = true;
        }
    });
    if queued {
        crate::callback::wake_after_push();
    }
    LOCAL.with(|local| {
        let _registry = REGISTRY.lock();
        if local.active() {
            // A guard outlives the registration: the slot's own reader
            // carries the section on, published in `LOCAL`'s place.
            slot.own.adopt(local);
            slot.reader
                .store(ptr::from_ref(&*slot.own).cast_mut(), Ordering::Relaxed);
            OFFLINE_SLOT.with(|o| o.set(slot));
        } else {
            slot.reader.store(ptr::null_mut(), Ordering::Relaxed);
            slot.in_use.store(false, Ordering::Release);
        }
        local.go_offline();
    });
}

/// A thread that registers from a pthread-key destructor (C libraries do
/// this) is past its Rust thread-local destructors, which glibc runs
/// first: `Registration`'s destructor would never run, and the thread
/// would exit with its `LOCAL` still published, for updaters to read
/// after its memory is gone. So every registration also sets a pthread
/// key, whose destructor runs after the Rust ones (and, if set from a key
/// destructor, in the next round) and unregisters if nothing else did.
///
/// The one case it cannot cover: a thread whose first use of RCU comes in
/// the last round of pthread-key destructors (`PTHREAD_DESTRUCTOR_ITERATIONS`,
/// 4 on glibc: a key destructor that sets its own key again three times
/// and reads on the fourth) exits still registered. liburcu's
/// signal-based flavor has the same limit.
mod backstop {
    use super::{unregister, CURRENT};
    use std::cell::Cell;

    /// The key, once made. A failure (the process is out of pthread keys)
    /// is not remembered: the next registration tries again. Registrations
    /// are rare, so one lock serves both.
    pub(super) static KEY: crate::sync::Mutex<Option<libc::pthread_key_t>> =
        crate::sync::Mutex::new(None);

    extern "C" fn run(_armed: *mut libc::c_void) {
        let slot = CURRENT.with(Cell::get);
        if !slot.is_null() {
            // SAFETY: CURRENT only ever holds null or a leaked
            // `&'static Slot`.
            unregister(unsafe { &*slot });
        }
    }

    /// Arms the backstop for the calling thread; false if pthreads refuse
    /// (no key left, or no memory for the value).
    pub(super) fn arm() -> bool {
        let key = {
            let mut made = KEY.lock();
            match *made {
                Some(key) => key,
                None => {
                    let mut key: libc::pthread_key_t = 0;
                    // SAFETY: `key` is a valid out-pointer and `run` an
                    // `extern "C"` function that lives for the whole
                    // program.
                    if unsafe { libc::pthread_key_create(&mut key, Some(run)) } != 0 {
                        return false;
                    }
                    *made = Some(key);
                    key
                }
            }
        };
        // Any non-null value: glibc calls `run` only for those.
        // SAFETY: a key created above; the value is never dereferenced.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<u8>().cast()) == 0 }
    }
}

/// Which reader a slot publishes.
enum Reader {
    /// The calling thread's `LOCAL`, for as long as it stays registered.
    Local,
    /// The slot's own, for one section (see `lock_offline`).
    Temporary,
}

/// Takes a free slot or creates one, and publishes its reader.
fn acquire_slot(reader: Reader) -> &'static Slot {
    // A published thread-local reader must be unpublished in a fork child
    // whose copy of its thread is gone: the handlers come first.
    crate::fork::register_handlers();
    // The fence mode must be fixed before any reader can skip its fence.
    let mode = crate::fence::mode();
    let mut registry = REGISTRY.lock();
    let slot = match registry.iter().find(|s| !s.in_use.load(Ordering::Relaxed)) {
        Some(slot) => {
            slot.in_use.store(true, Ordering::Relaxed);
            *slot
        }
        None => {
            let slot: &'static Slot = Box::leak(Box::new(Slot {
                reader: AtomicPtr::new(ptr::null_mut()),
                own: CachePadded::new(ReaderCtr::new()),
                bag: LocalBag::new(),
                in_use: AtomicBool::new(true),
            }));
            registry.push(slot);
            slot
        }
    };
    // Readied before it is published: an updater (under the lock) sees a
    // quiescent reader.
    let published = match reader {
        Reader::Local => LOCAL.with(|local| {
            local.prepare(mode, false);
            ptr::from_ref(local).cast_mut()
        }),
        Reader::Temporary => {
            slot.own.prepare(mode, true);
            ptr::from_ref(&*slot.own).cast_mut()
        }
    };
    slot.reader.store(published, Ordering::Relaxed);
    slot
}

/// Gives back a slot whose own reader's section has ended.
fn release_slot(slot: &'static Slot) {
    debug_assert!(
        !slot.own.active(),
        "released a slot inside a read-side section"
    );
    let _registry = REGISTRY.lock();
    slot.reader.store(ptr::null_mut(), Ordering::Relaxed);
    slot.own.reset();
    slot.in_use.store(false, Ordering::Release);
}

/// `read_lock` when `LOCAL` is offline: registers the thread on its first
/// section; past its thread-local destructors, counts a nested lock in the
/// open section's slot or opens a section in a temporary slot.
#[cold]
#[inline(never)]
pub(crate) fn lock_offline() {
    let open = OFFLINE_SLOT.with(Cell::get);
    if !open.is_null() {
        // SAFETY: OFFLINE_SLOT only holds null or a leaked `&'static Slot`.
        unsafe { &*open }.own.lock_nested();
        return;
    }
    if !UNREGISTERED.with(Cell::get) && registration_slot().is_ok() {
        // Registered now, unless the backstop could not be armed.
        let online = LOCAL.with(|local| {
            let online = !ReaderCtr::offline_state(local.state());
            if online {
                local.lock(&GP);
            }
            online
        });
        if online {
            return;
        }
    }
    // Until the section is published in OFFLINE_SLOT: a signal handler's
    // `read_lock` would otherwise wait for the registry lock held here.
    let _blocked = SignalsBlocked::new();
    let slot = acquire_slot(Reader::Temporary);
    slot.own.begin(&GP);
    OFFLINE_SLOT.with(|o| o.set(slot));
}

/// A guard's drop when `LOCAL` is offline: the section is in
/// `OFFLINE_SLOT`'s slot.
#[cold]
#[inline(never)]
pub(crate) fn unlock_offline() {
    let open = OFFLINE_SLOT.with(Cell::get);
    assert!(
        !open.is_null(),
        "vmtask_rcu: a ReadGuard was dropped with no read-side section open on this thread"
    );
    // SAFETY: OFFLINE_SLOT only holds null or a leaked `&'static Slot`.
    let slot: &'static Slot = unsafe { &*open };
    // Until OFFLINE_SLOT is cleared and the slot released: a signal
    // handler's `read_lock` would otherwise nest in a section that has
    // ended (its slot already says quiescent: an unprotected read), or
    // wait for the registry lock held here.
    let _blocked = SignalsBlocked::new();
    let state = slot.own.state();
    if let Some(ended) = slot.own.unlock_slow(&GP, state) {
        if ended.wake {
            crate::grace::wake_updater();
        }
        debug_assert!(ended.release, "an offline section's slot is detached");
        OFFLINE_SLOT.with(|o| o.set(ptr::null()));
        release_slot(slot);
    }
}

/// Whether the calling thread's registration has ended (it is running its
/// thread-local or pthread-key destructors), or could never be made.
pub(crate) fn exiting() -> bool {
    UNREGISTERED.with(Cell::get)
}

/// `in_read_section`, for a thread that `current_for_bag` found
/// registered: its `LOCAL` is then online (`CURRENT` is set after the
/// reader is prepared and cleared before it goes offline, with signals
/// blocked both times), so the section is its slot's nesting alone.
#[inline(always)]
pub(crate) fn registered_in_section() -> bool {
    LOCAL.with(|local| {
        debug_assert!(!ReaderCtr::offline_state(local.state()));
        local.active()
    })
}

/// Whether the calling thread is inside a read-side section.
#[inline]
pub(crate) fn in_read_section() -> bool {
    LOCAL.with(|local| {
        if ReaderCtr::offline_state(local.state()) {
            !OFFLINE_SLOT.with(Cell::get).is_null()
        } else {
            local.active()
        }
    })
}

/// This thread's slot for its bag, registering on first use; `None` once
/// the thread is past its thread-local destructors.
#[inline]
pub(crate) fn current_for_bag() -> Option<&'static Slot> {
    let slot = CURRENT.with(Cell::get);
    if !slot.is_null() {
        // SAFETY: CURRENT only ever holds null or a leaked `&'static Slot`.
        return Some(unsafe { &*slot });
    }
    if UNREGISTERED.with(Cell::get) {
        return None;
    }
    registration_slot().ok().flatten()
}

/// `REGISTRATION`'s slot, registering the thread if it is not yet. Signals
/// are blocked before the thread-local is touched: std's lazy
/// initialisation has begun (the value still absent) before
/// `Registration::new` runs, so a handler that read in between would make
/// a whole nested registration, which std then drops when it stores the
/// outer one (see `SignalsBlocked`). Cold: only reached before the thread
/// registers.
fn registration_slot() -> Result<Option<&'static Slot>, std::thread::AccessError> {
    let _blocked = SignalsBlocked::new();
    REGISTRATION.try_with(|r| r.slot)
}

/// Whether any registered thread's bag holds entries (a hint).
pub(crate) fn any_bag_has_entries() -> bool {
    REGISTRY
        .lock()
        .iter()
        .any(|s| s.in_use.load(Ordering::Relaxed) && s.bag.has_entries())
}

/// This thread's slot if it has registered, without registering.
#[inline]
pub(crate) fn current_if_registered() -> Option<&'static Slot> {
    let slot = CURRENT.with(Cell::get);
    // SAFETY: CURRENT only ever holds null or a leaked `&'static Slot`.
    (!slot.is_null()).then(|| unsafe { &*slot })
}

/// Snapshot of the slots in use, for a grace period.
pub(crate) fn snapshot(out: &mut Vec<&'static Slot>) {
    out.clear();
    let registry = REGISTRY.lock();
    out.extend(registry.iter().filter(|s| s.in_use.load(Ordering::Acquire)));
}

/// Runs `scan` holding the registry lock, so that no thread-local reader
/// can go away meanwhile, with a function that reads a slot's published
/// reader (`gp::Updater::scan_readers`).
pub(crate) fn scan_readers<R>(
    scan: impl FnOnce(&dyn Fn(&'static Slot) -> Option<usize>) -> R,
) -> R {
    let _registry = REGISTRY.lock();
    // SAFETY: we hold the registry lock until `scan` returns, and the
    // function cannot outlive `scan` (it is borrowed for the call).
    scan(&|slot| unsafe { slot.reader_slot() })
}

/// Number of registered readers now.
pub(crate) fn registered() -> usize {
    REGISTRY
        .lock()
        .iter()
        .filter(|s| s.in_use.load(Ordering::Relaxed))
        .count()
}

/// In a child after `fork`: only the forking thread exists, so every other
/// slot is released (their readers are gone with their threads, and so is
/// the thread-local memory their `reader` pointed to).
pub(crate) fn after_fork_child() {
    let mine = CURRENT.with(Cell::get);
    let open = OFFLINE_SLOT.with(Cell::get);
    // The prepare handler held this lock across fork; the child owns it now.
    // SAFETY: `before_fork` locked REGISTRY and leaked the guard; in the
    // child, this thread (the only one) is the owner.
    unsafe { REGISTRY.force_unlock() };
    // SAFETY: as above.
    unsafe { backstop::KEY.force_unlock() };
    let registry = REGISTRY.lock();
    let cpu = vmtask_percpu::cpu();
    for slot in registry.iter() {
        let slot_ptr: *const Slot = *slot;
        if slot_ptr != mine && slot_ptr != open {
            slot.reader.store(ptr::null_mut(), Ordering::Relaxed);
            slot.own.reset();
            // The owner is gone: its pending drops go on the callback
            // queues (repaired already, see `fork.rs`), where the child's
            // callback thread or `barrier` runs them.
            slot.bag.salvage_after_fork(|bag| {
                crate::callback::push_bag(cpu, bag);
            });
            slot.in_use.store(false, Ordering::Relaxed);
        }
    }
}

/// Holds the backstop's key lock, the flush lock, the registry lock and
/// the callback consumer lock across `fork`, so the child sees a
/// consistent list and finds none of them held by a thread it lacks.
pub(crate) fn before_fork() {
    std::mem::forget(backstop::KEY.lock());
    crate::bag::before_fork();
    std::mem::forget(REGISTRY.lock());
    crate::callback::before_fork();
}

/// In the parent after `fork`.
pub(crate) fn after_fork_parent() {
    crate::callback::after_fork_parent();
    // SAFETY: `before_fork` locked REGISTRY on this thread and leaked the
    // guard.
    unsafe { REGISTRY.force_unlock() };
    crate::bag::after_fork_parent();
    // SAFETY: locked by `before_fork` on this thread.
    unsafe { backstop::KEY.force_unlock() };
}
