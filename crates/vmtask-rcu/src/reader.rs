//! `read_lock()` and `ReadGuard`: the read side.

use std::ptr::NonNull;

use crate::grace::GP;
use crate::registry::{self, Slot};

/// Proof that the current thread is in a read-side critical section;
/// ends the section (or one nesting level) when dropped.
///
/// Neither `Send` nor `Sync`: the section belongs to the thread. One word:
/// the slot's address, its low bit set for a nested guard.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct ReadGuard {
    /// The thread's `&'static Slot`, tagged with `NESTED`. A raw pointer,
    /// so the guard is `!Send` and `!Sync`.
    tagged: NonNull<Slot>,
}

/// The guard's lock did not begin the section.
const NESTED: usize = 1;
const _: () = assert!(std::mem::align_of::<Slot>() > NESTED);

/// Enters a read-side critical section (`rcu_read_lock`). Nestable.
///
/// Costs two loads and a store besides finding the thread's slot; the
/// first call on a thread registers it as a reader.
#[inline]
pub fn read_lock() -> ReadGuard {
    let slot = registry::current();
    if slot.reader.active() {
        return lock_nested(slot);
    }
    slot.reader.begin(&GP);
    ReadGuard {
        tagged: NonNull::from(slot),
    }
}

#[cold]
#[inline(never)]
fn lock_nested(slot: &'static Slot) -> ReadGuard {
    slot.reader.lock_nested();
    ReadGuard {
        tagged: NonNull::from(slot).map_addr(|a| a | NESTED),
    }
}

impl ReadGuard {
    #[inline(always)]
    fn slot(&self) -> &'static Slot {
        let slot = self.tagged.as_ptr().map_addr(|a| a & !NESTED);
        // SAFETY: `tagged` is a `&'static Slot` (slots are leaked, never
        // freed) with the tag bit set in its alignment padding; clearing
        // it gives the reference back.
        unsafe { &*slot }
    }

    #[inline(always)]
    fn began(&self) -> bool {
        self.tagged.as_ptr().addr() & NESTED == 0
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        if !self.began() {
            let slot = self.slot();
            return unlock_slow(slot, false, slot.reader.state());
        }
        // SAFETY: the guard that began a section holds the untagged
        // `&'static Slot`.
        let slot: &'static Slot = unsafe { self.tagged.as_ref() };
        let state = slot.reader.state();
        if state != 0 {
            return unlock_slow(slot, true, state);
        }
        if slot.reader.end(&GP) {
            crate::grace::wake_updater();
        }
    }
}

/// Nested guards, orphaned or detached sections, and SeqCst mode.
#[cold]
#[inline(never)]
fn unlock_slow(slot: &'static Slot, began: bool, state: usize) {
    if let Some(ended) = slot.reader.unlock_slow(&GP, began, state) {
        if ended.wake {
            crate::grace::wake_updater();
        }
        // A temporary slot, or one whose thread's registration ended while
        // this section was open, goes back once the section is over.
        if ended.release {
            registry::release_slot(slot);
        }
    }
}

impl std::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("began_section", &self.began())
            .finish()
    }
}

/// Whether the calling thread is inside a read-side section. Code that
/// must not block inside one (context switches, `synchronize`) asserts on
/// this.
#[inline]
pub fn in_read_section() -> bool {
    registry::current_if_registered().is_some_and(|slot| slot.reader.active())
}
