//! Reader registration: one `ReaderCtr` per thread, registered on first use
//! and released when the thread exits.
//!
//! Slots are leaked, never freed, and reused by later threads: an updater
//! may scan a snapshot of the registry without holding its lock, because a
//! slot it scans is always valid memory. A slot released (or reused) during
//! a scan reads as quiescent or as a section newer than the grace period,
//! both of which the updater may treat as done.
//!
//! A slot is released only outside a section. A thread whose registration
//! ends while a section is still open (a guard kept in a thread-local that
//! is destroyed later, or a leaked guard) leaves its slot *detached*: the
//! guard that ends the section releases it, and a leaked guard keeps it
//! forever, stalling grace periods as liburcu does, because references
//! read under a leaked guard are `'static` and may have left the thread.

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use std::cell::Cell;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bag::LocalBag;
use crate::gp::ReaderCtr;

/// A registered reader.
pub(crate) struct Slot {
    pub(crate) reader: CachePadded<ReaderCtr>,
    /// The thread's deferred-drop bag.
    pub(crate) bag: CachePadded<LocalBag>,
    in_use: AtomicBool,
}

/// Every slot ever created, in use or free.
pub(crate) static REGISTRY: CachePadded<Mutex<Vec<&'static Slot>>> =
    CachePadded::new(Mutex::new(Vec::new()));

thread_local! {
    /// This thread's slot, or null before registration / after exit.
    static CURRENT: Cell<*const Slot> = const { Cell::new(ptr::null()) };
    /// Owns the registration; releases the slot when the thread exits.
    static REGISTRATION: Registration = Registration::new();
}

struct Registration {
    slot: &'static Slot,
}

impl Registration {
    fn new() -> Self {
        let slot = acquire_slot(false);
        CURRENT.with(|c| c.set(slot));
        Registration { slot }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Other thread-local destructors may still read; they get temporary
        // slots (see `current`).
        let _ = CURRENT.try_with(|c| c.set(ptr::null()));
        // The thread's pending drops go on without it, queued while the
        // bags are still ours so that a concurrent `barrier` cannot miss
        // them.
        let cpu = vmtask_percpu::cpu();
        let mut queued = false;
        self.slot.bag.hand_over_own(|bag| {
            if bag.len > 0 {
                crate::callback::push_bag(cpu, bag);
                queued = true;
            }
        });
        if queued {
            crate::callback::wake_after_push();
        }
        if self.slot.reader.active() {
            self.slot.reader.detach();
        } else {
            release_slot(self.slot);
        }
    }
}

/// Takes a free slot or creates one. A `temporary` slot serves one
/// section of a thread past its thread-local destructors and is released
/// by the guard that ends it.
pub(crate) fn acquire_slot(temporary: bool) -> &'static Slot {
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
                reader: CachePadded::new(ReaderCtr::new()),
                bag: LocalBag::new(),
                in_use: AtomicBool::new(true),
            }));
            registry.push(slot);
            slot
        }
    };
    slot.reader.prepare(mode, temporary);
    slot
}

/// Gives a slot back. Only outside a section (see the module header).
pub(crate) fn release_slot(slot: &'static Slot) {
    debug_assert!(
        !slot.reader.active(),
        "released a slot inside a read-side section"
    );
    slot.reader.reset();
    slot.in_use.store(false, Ordering::Release);
}

/// This thread's slot, registering on first use; a temporary slot (one
/// section long, see `acquire_slot`) when the thread is past its
/// thread-local destructors.
#[inline(always)]
pub(crate) fn current() -> &'static Slot {
    let slot = CURRENT.with(|c| c.get());
    if !slot.is_null() {
        // SAFETY: CURRENT only ever holds null or a leaked `&'static Slot`.
        return unsafe { &*slot };
    }
    register_slow()
}

#[cold]
#[inline(never)]
fn register_slow() -> &'static Slot {
    REGISTRATION
        .try_with(|r| r.slot)
        .unwrap_or_else(|_| acquire_slot(true))
}

/// This thread's slot for its bag, registering on first use; `None` once
/// the thread is past its thread-local destructors.
#[inline]
pub(crate) fn current_for_bag() -> Option<&'static Slot> {
    let slot = CURRENT.try_with(|c| c.get()).ok()?;
    if !slot.is_null() {
        // SAFETY: CURRENT only ever holds null or a leaked `&'static Slot`.
        return Some(unsafe { &*slot });
    }
    REGISTRATION.try_with(|r| r.slot).ok()
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
    let slot = CURRENT.try_with(|c| c.get()).ok()?;
    // SAFETY: CURRENT only ever holds null or a leaked `&'static Slot`.
    (!slot.is_null()).then(|| unsafe { &*slot })
}

/// Snapshot of the slots in use, for a grace period.
pub(crate) fn snapshot(out: &mut Vec<&'static Slot>) {
    out.clear();
    let registry = REGISTRY.lock();
    out.extend(registry.iter().filter(|s| s.in_use.load(Ordering::Acquire)));
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
/// slot is released (their readers are gone with their threads).
pub(crate) fn after_fork_child() {
    let mine = current_if_registered().map(|s| s as *const Slot);
    // The prepare handler held this lock across fork; the child owns it now.
    // SAFETY: `before_fork` locked REGISTRY and leaked the guard; in the
    // child, this thread (the only one) is the owner.
    unsafe { REGISTRY.force_unlock() };
    let registry = REGISTRY.lock();
    for slot in registry.iter() {
        if Some(*slot as *const Slot) != mine {
            slot.reader.reset();
            // The owner is gone: its bag's entries are dropped by whoever
            // takes the slot next (at its exit) or a flusher.
            slot.bag.reset_after_fork();
            slot.in_use.store(false, Ordering::Relaxed);
        }
    }
}

/// Holds the registry lock across `fork`, so the child sees a consistent
/// list.
pub(crate) fn before_fork() {
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
}
