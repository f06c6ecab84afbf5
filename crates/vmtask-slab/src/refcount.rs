//! The reference count that lives in every object's header.
//!
//! Protocol. Zero means "not shared": the object is free, or owned by one
//! [`SlabBox`](crate::SlabBox). The owner initialises the object and then
//! [`publish`](RefCount::publish)es it with a release store of 1. Readers
//! that found the object under `read_lock` take a reference with
//! [`try_get`](RefCount::try_get), an increment-if-not-zero whose successful
//! compare-exchange is an acquire: it reads a value in the release sequence
//! headed by the owner's store (or by a later release decrement), so the
//! reader sees the object as its owner published it. The last
//! [`put`](RefCount::put) (release decrement, then an acquire fence, as in
//! `Arc`) sees every holder's accesses before the object is freed.
//!
//! A count that reached zero is never incremented by `try_get`, so a reader
//! cannot revive a freed object. It can, however, find the object after it
//! was freed and re-published for another use: that is the type-stable ABA,
//! and why a reader must re-check its key after `try_get`.

use crate::sync::{fence, AtomicUsize, Ordering};

/// Counts past this abort, as `Arc` does, instead of wrapping to zero.
const MAX_REFS: usize = isize::MAX as usize;

pub(crate) struct RefCount(AtomicUsize);

impl RefCount {
    /// Zero: not shared.
    pub(crate) fn new() -> Self {
        RefCount(AtomicUsize::new(0))
    }

    /// Makes an unshared object shared, with one reference, publishing the
    /// owner's writes to readers that `try_get` it.
    ///
    /// The count must be zero; nobody else can change it then (`try_get`
    /// refuses zero).
    pub(crate) fn publish(&self) {
        debug_assert_eq!(self.0.load(Ordering::Relaxed), 0);
        self.0.store(1, Ordering::Release);
    }

    /// Increment-if-not-zero.
    #[inline]
    pub(crate) fn try_get(&self) -> bool {
        // First guess one reference (the structure's own), rather than
        // loading the count: when the count's line was last written on
        // another CPU, a load fetches it shared and the compare-exchange
        // must then fetch it again, exclusive; a compare-exchange with a
        // guess fetches it once. A wrong guess fails with the count, as a
        // load would have returned it, and the loop goes on from there.
        let mut refs = 1;
        loop {
            if refs == 0 {
                return false;
            }
            if refs >= MAX_REFS {
                std::process::abort();
            }
            match self
                .0
                .compare_exchange_weak(refs, refs + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => refs = now,
            }
        }
    }

    /// Another reference, from a holder of one.
    #[inline]
    pub(crate) fn get(&self) {
        // Relaxed: the caller already holds a reference, as in `Arc::clone`.
        if self.0.fetch_add(1, Ordering::Relaxed) >= MAX_REFS {
            std::process::abort();
        }
    }

    /// Drops a reference; true when it was the last, and the caller now owns
    /// the object alone (the count is zero again).
    #[inline]
    pub(crate) fn put(&self) -> bool {
        if self.0.fetch_sub(1, Ordering::Release) != 1 {
            return false;
        }
        fence(Ordering::Acquire);
        true
    }

    /// One to zero, if the caller's reference is the only one: the object
    /// becomes unshared again without being freed.
    pub(crate) fn try_take_unique(&self) -> bool {
        self.0
            .compare_exchange(1, 0, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// The current count (a snapshot), for the models' final checks.
    #[cfg(all(test, loom))]
    pub(crate) fn load(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::RefCount;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;

    /// An object slot: a key that only an unshared owner writes.
    struct Slot {
        refs: RefCount,
        key: UnsafeCell<u32>,
    }

    /// A reader looks key 1 up while its owner drops the last reference and
    /// reuses the slot for key 2. The reader must either fail, or hold an
    /// object whose key does not change under it (loom reports any
    /// unsynchronised access to `key` as a data race).
    #[test]
    fn loom_try_get_races_last_put_and_reuse() {
        loom::model(|| {
            let slot = Arc::new(Slot {
                refs: RefCount::new(),
                key: UnsafeCell::new(0),
            });
            // SAFETY: no other thread exists yet.
            slot.key.with_mut(|k| unsafe { *k = 1 });
            slot.refs.publish();

            let reader = {
                let slot = slot.clone();
                thread::spawn(move || {
                    if !slot.refs.try_get() {
                        return None;
                    }
                    // SAFETY: we hold a reference, so no owner writes `key`.
                    let first = slot.key.with(|k| unsafe { *k });
                    thread::yield_now();
                    // SAFETY: as above.
                    let again = slot.key.with(|k| unsafe { *k });
                    assert_eq!(first, again, "key changed while a reference was held");
                    let last = slot.refs.put();
                    if last {
                        // SAFETY: the last put makes us the sole owner.
                        slot.key.with_mut(|k| unsafe { *k = 0 });
                    }
                    Some(first)
                })
            };

            if slot.refs.put() {
                // Freed, then reused at once for key 2 (type-stable reuse).
                // SAFETY: the last put makes us the sole owner.
                slot.key.with_mut(|k| unsafe { *k = 2 });
                slot.refs.publish();
                if slot.refs.put() {
                    // SAFETY: as above.
                    slot.key.with_mut(|k| unsafe { *k = 0 });
                }
            }
            let seen = reader.join().unwrap();
            // The reader's re-check: only key 1 is an answer for key 1;
            // key 2 means "retry".
            assert!(
                matches!(seen, None | Some(1) | Some(2)),
                "reader saw {seen:?}"
            );
            assert_eq!(slot.refs.load(), 0);
        });
    }

    /// Two holders drop concurrently: exactly one sees the last put.
    #[test]
    fn loom_exactly_one_last_put() {
        loom::model(|| {
            let slot = Arc::new(Slot {
                refs: RefCount::new(),
                key: UnsafeCell::new(0),
            });
            slot.refs.publish();
            slot.refs.get();
            let other = {
                let slot = slot.clone();
                thread::spawn(move || slot.refs.put())
            };
            let mine = slot.refs.put();
            let theirs = other.join().unwrap();
            assert!(
                mine ^ theirs,
                "last put seen {} times",
                mine as u8 + theirs as u8
            );
        });
    }
}
