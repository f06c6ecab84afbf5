//! `RcuCell<T>`: an RCU-protected pointer (`rcu_assign_pointer` /
//! `rcu_dereference`).
//!
//! `store` publishes with release ordering; `load` reads with acquire
//! ordering under a read guard, so a reader sees the object fully
//! initialised. A replaced value is never freed while a reader that might
//! have loaded it is still inside its section: it is dropped after a grace
//! period (`store`, `Drop`) or handed back only after one (`swap`).

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::ReadGuard;

/// An RCU-protected, optionally empty, owned pointer.
///
/// ```
/// use vmtask_rcu::{read_lock, RcuCell};
///
/// let config = RcuCell::new(Some(Box::new(String::from("v1"))));
/// {
///     let guard = read_lock();
///     assert_eq!(config.load(&guard).map(String::as_str), Some("v1"));
/// }
/// config.store(Some(Box::new(String::from("v2")))); // "v1" dropped later
/// let old = config.swap(None); // waits for a grace period
/// assert_eq!(old.as_deref().map(String::as_str), Some("v2"));
/// ```
///
/// A `&T` from [`load`](Self::load) lives as long as the guard, not the
/// borrow of the cell, so the cell is `Send` (and `Sync`) only for
/// `T: Send + Sync`: moving it to another thread would otherwise share a
/// `!Sync` value between threads.
///
/// ```compile_fail,E0277
/// fn send<T: Send>(_: T) {}
/// send(vmtask_rcu::RcuCell::new(Some(Box::new(std::cell::Cell::new(0u64)))));
/// ```
///
/// ```compile_fail,E0277
/// fn sync<T: Sync>(_: &T) {}
/// sync(&vmtask_rcu::RcuCell::new(Some(Box::new(std::cell::Cell::new(0u64)))));
/// ```
///
/// A loaded reference does not outlive its guard:
///
/// ```compile_fail,E0597
/// let cell = vmtask_rcu::RcuCell::new(Some(Box::new(1u64)));
/// let value = {
///     let guard = vmtask_rcu::read_lock();
///     cell.load(&guard)
/// };
/// assert_eq!(value, Some(&1));
/// ```
pub struct RcuCell<T: Send + 'static> {
    ptr: AtomicPtr<T>,
    _owns: PhantomData<Option<Box<T>>>,
}

// SAFETY: readers on other threads get `&T` (needs `T: Sync`), writers move
// boxes in and out and old values are dropped on the callback thread
// (needs `T: Send`).
unsafe impl<T: Send + Sync + 'static> Sync for RcuCell<T> {}
// SAFETY: the cell owns a `Box<T>` (needs `T: Send`), and a `&T` from
// `load` is bound to the reader's guard, not to its borrow of the cell: the
// cell can move to another thread, whose loads then share the same `T`
// with the first thread's references (needs `T: Sync`; an audit shared a
// `Cell<u64>` that way in safe code).
unsafe impl<T: Send + Sync + 'static> Send for RcuCell<T> {}

impl<T: Send + 'static> RcuCell<T> {
    /// A cell holding `value`.
    pub fn new(value: Option<Box<T>>) -> Self {
        RcuCell {
            ptr: AtomicPtr::new(into_ptr(value)),
            _owns: PhantomData,
        }
    }

    /// The current value, valid for as long as the guard lives.
    #[inline]
    pub fn load<'g>(&self, _guard: &'g ReadGuard) -> Option<&'g T> {
        let p = self.ptr.load(Ordering::Acquire);
        // Why this holds: a published pointer came from `Box::into_raw` and is freed
        // only a grace period after it was unpublished; `_guard` keeps this
        // thread in a read-side section for `'g`, so that grace period
        // cannot end before `'g` does.
        // SAFETY: `_guard` holds off the grace period that frees `p` (above).
        unsafe { p.as_ref() }
    }

    /// Publishes `value`; the old value is dropped after a grace period,
    /// through [`defer_drop`](crate::defer_drop), whose caveats apply:
    /// drops deferred earlier by this thread may run inside this call, and
    /// after thousands of stores in a row with no grace period completing
    /// it waits for one (so not while holding a lock that readers take).
    pub fn store(&self, value: Option<Box<T>>) {
        let old = self.ptr.swap(into_ptr(value), Ordering::AcqRel);
        // SAFETY: `old` is unpublished now and owned by us.
        if let Some(old) = unsafe { from_ptr(old) } {
            crate::defer_drop(old);
        }
    }

    /// Takes the value out with no grace period, leaving the cell empty:
    /// for a cell no reader can reach any more.
    ///
    /// A structure linked through cells, once unpublished, is freed one
    /// level per grace period by the cells' own drops: each defers its
    /// value by another grace period, not knowing that readers cannot
    /// reach it ([`barrier`](crate::barrier) waits for one level only).
    /// Freeing the whole structure takes one grace period if the code that
    /// runs after it takes the values out of the cells, in a loop rather
    /// than by recursion, which a long list would overflow the stack with:
    ///
    /// ```
    /// use vmtask_rcu::RcuCell;
    ///
    /// struct Node {
    ///     next: RcuCell<Node>,
    /// }
    ///
    /// let mut list = None;
    /// for _ in 0..100_000 {
    ///     list = Some(Box::new(Node { next: RcuCell::new(list) }));
    /// }
    /// let head = RcuCell::new(list);
    /// if let Some(old) = head.replace(None) {
    ///     // Runs after a grace period: no reader holds a reference into
    ///     // the unpublished list.
    ///     old.defer(|mut node| {
    ///         // SAFETY: a grace period has passed since the list went
    ///         // unreachable, and its nodes were reachable only through it.
    ///         let mut next = unsafe { node.next.take_unchecked() };
    ///         while let Some(mut node) = next {
    ///             // SAFETY: as above.
    ///             next = unsafe { node.next.take_unchecked() };
    ///         }
    ///     });
    /// }
    /// vmtask_rcu::barrier(); // the whole list has been dropped
    /// ```
    ///
    /// Do not do this in the node type's own `Drop`: safe code can build
    /// a node, load its successor under a guard and drop the node, and
    /// the successor must then outlive the guard (review finding: a `Drop`
    /// that freed successors at once let safe code keep a dangling
    /// reference).
    ///
    /// # Safety
    /// No reader may hold a reference into the value: no read-side section
    /// that could have reached this cell is still running (a grace period
    /// has passed since the cell was last reachable by readers, or it
    /// never was).
    pub unsafe fn take_unchecked(&mut self) -> Option<Box<T>> {
        let old = std::mem::replace(self.ptr.get_mut(), ptr::null_mut());
        // SAFETY: owned by the cell, which `&mut self` keeps from any
        // writer; no reader holds it (the caller's contract).
        unsafe { from_ptr(old) }
    }

    /// Publishes `value` and returns the old one once a grace period has
    /// passed, so no reader can still see it.
    ///
    /// # Panics
    /// Inside a read-side section (the wait would deadlock).
    pub fn swap(&self, value: Option<Box<T>>) -> Option<Box<T>> {
        crate::grace::assert_not_reading("RcuCell::swap");
        let old = self.ptr.swap(into_ptr(value), Ordering::AcqRel);
        crate::synchronize();
        // SAFETY: unpublished, and every reader that could have loaded it
        // has left its section.
        unsafe { from_ptr(old) }
    }

    /// Publishes `value` and hands the old value back as a [`Retired`],
    /// which gives it up only once a grace period has passed: wait for one
    /// ([`Retired::wait`]), run a function after one ([`Retired::defer`]),
    /// or drop it (dropped after one).
    pub fn replace(&self, value: Option<Box<T>>) -> Option<Retired<T>> {
        let old = self.ptr.swap(into_ptr(value), Ordering::AcqRel);
        // SAFETY: unpublished now and owned by us; `Retired` withholds it
        // until a grace period has passed.
        unsafe { from_ptr(old) }.map(|old| Retired { old: Some(old) })
    }

    /// Publishes `new` if the cell still holds the value `current` points
    /// to (compared by address; `None` for empty). On failure `new` is
    /// returned. The replaced value is dropped after a grace period, as in
    /// [`store`](Self::store), with the same caveats (earlier deferred
    /// drops of this thread may run inside this call).
    ///
    /// # Panics
    /// If `T` is zero-sized: every box of such a `T` has the same address,
    /// so a value stored since `current` was loaded could not be told from
    /// it, and the exchange would succeed when it should fail.
    pub fn compare_and_store(
        &self,
        current: Option<&T>,
        new: Option<Box<T>>,
    ) -> Result<(), Option<Box<T>>> {
        assert!(
            size_of::<T>() != 0,
            "RcuCell::compare_and_store on a zero-sized type: its values all \
             have one address and cannot be told apart (wrap it in a sized type)"
        );
        let expected = current.map_or(ptr::null_mut(), |r| r as *const T as *mut T);
        let new_ptr = into_ptr(new);
        match self
            .ptr
            .compare_exchange(expected, new_ptr, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(old) => {
                // SAFETY: unpublished by the exchange, owned by us.
                if let Some(old) = unsafe { from_ptr(old) } {
                    crate::defer_drop(old);
                }
                Ok(())
            }
            // SAFETY: `new_ptr` was never published.
            Err(_) => Err(unsafe { from_ptr(new_ptr) }),
        }
    }
}

/// The cell's last value is dropped after a grace period, through
/// [`defer_drop`](crate::defer_drop), whose caveats apply: drops deferred
/// earlier by this thread may run inside the cell's drop. Cells inside an
/// object that RCU drops add a grace period per level, unless the code
/// run after the first one takes their values
/// ([`RcuCell::take_unchecked`]).
impl<T: Send + 'static> Drop for RcuCell<T> {
    fn drop(&mut self) {
        // Readers may hold `&'g T` from `load` beyond the cell's own
        // lifetime (the reference is bound to their guard), so the last
        // value also waits for a grace period.
        let old = std::mem::replace(self.ptr.get_mut(), ptr::null_mut());
        // SAFETY: owned by the cell, unpublished now.
        if let Some(old) = unsafe { from_ptr(old) } {
            crate::defer_drop(old);
        }
    }
}

impl<T: Send + 'static> Default for RcuCell<T> {
    fn default() -> Self {
        RcuCell::new(None)
    }
}

impl<T: Send + 'static> std::fmt::Debug for RcuCell<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcuCell")
            .field("ptr", &self.ptr.load(Ordering::Relaxed))
            .finish()
    }
}

fn into_ptr<T>(value: Option<Box<T>>) -> *mut T {
    value.map_or(ptr::null_mut(), Box::into_raw)
}

/// # Safety
/// `p` is null or came from `Box::into_raw` and is owned by the caller.
unsafe fn from_ptr<T>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: the caller's contract.
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

/// A value unpublished from an [`RcuCell`] that readers may still see.
/// It hands the value over only after a grace period. Dropping it defers
/// the value's drop with [`defer_drop`](crate::defer_drop), whose caveats
/// apply.
#[must_use = "dropping a Retired drops its value after a grace period; use wait or defer to get it back"]
pub struct Retired<T: Send + 'static> {
    old: Option<Box<T>>,
}

impl<T: Send + 'static> Retired<T> {
    /// Waits for a grace period, then returns the value.
    ///
    /// # Panics
    /// Inside a read-side section (the wait would deadlock).
    pub fn wait(mut self) -> Box<T> {
        crate::grace::assert_not_reading("Retired::wait");
        crate::synchronize();
        self.old
            .take()
            .expect("a Retired holds its value until consumed")
    }

    /// Runs `f` with the value after a grace period, on the callback thread
    /// (or a thread waiting in [`barrier`](crate::barrier)), as [`call`](crate::call).
    pub fn defer(mut self, f: impl FnOnce(Box<T>) + Send + 'static) {
        let old = self
            .old
            .take()
            .expect("a Retired holds its value until consumed");
        crate::call(move || f(old));
    }
}

impl<T: Send + 'static> Drop for Retired<T> {
    fn drop(&mut self) {
        if let Some(old) = self.old.take() {
            crate::defer_drop(old);
        }
    }
}

impl<T: Send + 'static> std::fmt::Debug for Retired<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Retired")
    }
}
