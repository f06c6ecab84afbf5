//! `SlabBox<T>`: the owning handle of one object.

use std::fmt;
use std::mem::{offset_of, ManuallyDrop};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crate::cache::SlabCache;
use crate::shared::SlabArc;
use crate::slab::Slot;

/// An object allocated from a [`SlabCache`], owned alone; it returns to the
/// cache (the current CPU's magazine) when dropped, without being dropped
/// itself: the next [`alloc`](SlabCache::alloc) may hand it out as it is.
pub struct SlabBox<'c, T> {
    slot: NonNull<Slot<T>>,
    cache: &'c SlabCache<T>,
}

// SAFETY: a SlabBox owns its `T` exclusively, like `Box<T>`; it also holds a
// `&SlabCache<T>`, which is `Sync` when `T: Send`.
unsafe impl<T: Send> Send for SlabBox<'_, T> {}
// SAFETY: `&SlabBox` only gives `&T`.
unsafe impl<T: Sync> Sync for SlabBox<'_, T> {}

/// The slot holding the object `value` points to.
///
/// # Safety
/// `value` must point to the `value` field of a `Slot<T>`.
pub(crate) unsafe fn slot_of<T>(value: NonNull<T>) -> NonNull<Slot<T>> {
    // SAFETY: `value` sits `offset_of!(Slot<T>, value)` bytes into its slot
    // (caller's contract), so stepping back stays inside that slot.
    unsafe { value.cast::<u8>().sub(offset_of!(Slot<T>, value)).cast() }
}

/// The object in `slot`.
pub(crate) fn value_of<T>(slot: NonNull<Slot<T>>) -> NonNull<T> {
    // SAFETY: a slot pointer from this crate is in bounds of a slot; the
    // projection computes the field's address without reading it.
    let cell = unsafe { &raw const (*slot.as_ptr()).value };
    // SAFETY: `UnsafeCell<T>` is `repr(transparent)` over `T`, and a field
    // of a non-null slot pointer is non-null.
    unsafe { NonNull::new_unchecked(cell.cast::<T>().cast_mut()) }
}

impl<'c, T> SlabBox<'c, T> {
    /// # Safety
    /// `slot` must be an allocated slot of `cache`, owned by the caller
    /// alone, with a reference count of zero.
    pub(crate) unsafe fn from_slot(cache: &'c SlabCache<T>, slot: NonNull<Slot<T>>) -> Self {
        SlabBox { slot, cache }
    }

    /// Gives up ownership without returning the object to the cache, for
    /// intrusive structures; [`from_raw`](Self::from_raw) takes it back.
    pub fn into_raw(this: Self) -> NonNull<T> {
        value_of(ManuallyDrop::new(this).slot)
    }

    /// Takes back an object given up by [`into_raw`](Self::into_raw).
    ///
    /// # Safety
    /// `ptr` must come from `SlabBox::into_raw` on a box of `cache`, and be
    /// passed here at most once for that call.
    pub unsafe fn from_raw(cache: &'c SlabCache<T>, ptr: NonNull<T>) -> Self {
        // SAFETY: `ptr` points to the value of one of `cache`'s slots, which
        // the caller owns alone (the contract above).
        unsafe { SlabBox::from_slot(cache, slot_of(ptr)) }
    }

    /// The cache the object belongs to.
    pub fn cache(this: &Self) -> &'c SlabCache<T> {
        this.cache
    }

    /// Makes the object shared, with one reference; in a type-stable cache
    /// it can be found by readers from then on. Initialise it before this
    /// call: the publication is a release.
    pub fn into_shared(this: Self) -> SlabArc<'c, T> {
        let this = ManuallyDrop::new(this);
        // SAFETY: the box owned the slot alone, so its count is zero.
        unsafe { this.slot.as_ref() }.refs.publish();
        // SAFETY: the count is now one, and that reference is handed over.
        unsafe { SlabArc::from_slot(this.cache, this.slot) }
    }

    pub(crate) fn into_slot(this: Self) -> (&'c SlabCache<T>, NonNull<Slot<T>>) {
        let this = ManuallyDrop::new(this);
        (this.cache, this.slot)
    }
}

impl<T> Deref for SlabBox<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // Why this holds: the box owns the constructed object alone; readers of a
        // type-stable cache that still hold its address only touch the
        // header (`refs`, zero while boxed, so their `try_get` fails), never
        // the value: that is their side of the contract (`shared.rs`).
        // SAFETY: the box owns the value alone; readers touch only the header.
        unsafe { value_of(self.slot).as_ref() }
    }
}

impl<T> DerefMut for SlabBox<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only access.
        unsafe { value_of(self.slot).as_mut() }
    }
}

impl<T> Drop for SlabBox<'_, T> {
    // Always: the free is one restartable sequence, cheaper than a call.
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: the slot belongs to `cache` and this box was its only
        // user.
        unsafe { self.cache.free_slot(self.slot) };
    }
}

impl<T: fmt::Debug> fmt::Debug for SlabBox<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
