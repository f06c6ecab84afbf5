//! `read_lock()` and `ReadGuard`: the read side.

use std::marker::PhantomData;
use std::sync::atomic::Ordering;

use crate::grace::GP;
use crate::registry::{self, Slot};

/// Proof that the current thread is in a read-side critical section;
/// ends the section (or one nesting level) when dropped.
///
/// Neither `Send` nor `Sync`: the section belongs to the thread.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct ReadGuard {
    slot: &'static Slot,
    /// This guard's lock began the section.
    began: bool,
    /// The slot is a temporary one (thread-local storage already torn
    /// down) and is released with the guard.
    temporary: bool,
    _not_send: PhantomData<*const ()>,
}

/// Enters a read-side critical section (`rcu_read_lock`). Nestable.
///
/// Costs a handful of plain loads and stores; the first call on a thread
/// registers it as a reader.
#[inline]
pub fn read_lock() -> ReadGuard {
    let (slot, temporary) = match registry::current() {
        Ok(slot) => (slot, false),
        Err(slot) => (slot, true),
    };
    let began = slot.reader.lock(&GP, crate::fence::reader_mode());
    ReadGuard {
        slot,
        began,
        temporary,
        _not_send: PhantomData,
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        let ended = self
            .slot
            .reader
            .unlock(&GP, crate::fence::reader_mode(), self.began);
        if let Some(wake) = ended {
            if wake {
                crate::grace::wake_updater();
            }
            // A temporary slot, or one whose thread's registration ended
            // while this section was open, goes back once the section is
            // over.
            if self.temporary || self.slot.reader.detached.load(Ordering::Relaxed) {
                registry::release_slot(self.slot);
            }
        }
    }
}

impl std::fmt::Debug for ReadGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadGuard")
            .field("began_section", &self.began)
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
