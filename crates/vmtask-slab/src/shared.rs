//! Shared objects and the type-stable lookup pattern.
//!
//! In a `typesafe_by_rcu` cache an object freed by its last [`SlabArc`] may
//! be handed out again at once, but its memory stays a slot of this cache,
//! with a valid reference count in its header, until a grace period after
//! its slab left the cache. That is enough for lock-free lookups, provided
//! readers follow the pattern:
//!
//! 1. enter `vmtask_rcu::read_lock()`;
//! 2. find the object's address ([`AtomicSlabArc::load`]);
//! 3. take a reference with [`SlabCache::try_get`], an
//!    increment-if-not-zero: it fails if the object was freed meanwhile;
//! 4. **re-check the key**: between steps 2 and 3 the object may have been
//!    freed *and reused* for another key, and `try_get` then succeeds on
//!    the new incarnation; on a mismatch drop the reference and retry.
//!
//! Holding the reference keeps the object from being freed, so the key
//! checked in step 4 stays put for as long as the reference is held.
//!
//! The contract between readers and owners: until its `try_get` succeeds, a
//! reader touches only the object's header (the reference count), never the
//! value. The object may already have been reused, and its new owner may
//! hold it as a [`SlabBox`] and write to it through `&mut T` (plain writes,
//! even to atomics: `get_mut`), so even an atomic load of the value would
//! race. After `try_get` succeeds the count is non-zero, the object cannot
//! be boxed, and every holder sees only `&T`.
//!
//! The safe API enforces steps 1–3: an [`AtomicSlabArc`] only stores
//! objects of its own type-stable cache and holds a counted reference to
//! them, [`SlabPtr`] cannot outlive the read guard it was loaded under, and
//! the object behind a `SlabPtr` is only reachable through `try_get`. Step 4
//! is the caller's, because only the caller knows what the key is.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, Ordering};

use vmtask_rcu::ReadGuard;

use crate::boxed::{slot_of, value_of, SlabBox};
use crate::cache::SlabCache;
use crate::error::SlabError;
use crate::slab::Slot;

/// A counted reference to an object of a [`SlabCache`]; the count lives in
/// the object's header. The last reference returns the object to the cache.
pub struct SlabArc<'c, T> {
    slot: NonNull<Slot<T>>,
    cache: &'c SlabCache<T>,
}

// SAFETY: like `Arc<T>`: references on several threads share the `T`
// (`Sync`), and the last one, on any thread, frees it (`Send`).
unsafe impl<T: Send + Sync> Send for SlabArc<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send + Sync> Sync for SlabArc<'_, T> {}

impl<'c, T> SlabArc<'c, T> {
    /// # Safety
    /// `slot` must be an allocated slot of `cache` whose count includes one
    /// reference that the caller hands over.
    pub(crate) unsafe fn from_slot(cache: &'c SlabCache<T>, slot: NonNull<Slot<T>>) -> Self {
        SlabArc { slot, cache }
    }

    /// The object's address, for comparisons and for
    /// [`SlabCache::try_get_raw`].
    pub fn as_ptr(this: &Self) -> NonNull<T> {
        value_of(this.slot)
    }

    /// Whether both point to the same object.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.slot == b.slot
    }

    /// The object back as a [`SlabBox`] if this is its only reference.
    ///
    /// In a type-stable cache a reader may `try_get` the object at any
    /// moment, so this can fail even when no other handle exists.
    pub fn try_unwrap(this: Self) -> Result<SlabBox<'c, T>, Self> {
        // SAFETY: the slot is allocated while we hold a reference.
        let refs = &unsafe { this.slot.as_ref() }.refs;
        if !refs.try_take_unique() {
            return Err(this);
        }
        let (cache, slot) = (this.cache, this.slot);
        std::mem::forget(this);
        // SAFETY: the count went from one (ours) to zero: we own the slot
        // alone, and no reader can take a reference any more.
        Ok(unsafe { SlabBox::from_slot(cache, slot) })
    }

    fn into_slot(this: Self) -> NonNull<Slot<T>> {
        let slot = this.slot;
        std::mem::forget(this);
        slot
    }
}

impl<T> Clone for SlabArc<'_, T> {
    fn clone(&self) -> Self {
        // SAFETY: the slot is allocated while we hold a reference.
        unsafe { self.slot.as_ref() }.refs.get();
        SlabArc {
            slot: self.slot,
            cache: self.cache,
        }
    }
}

impl<T> Deref for SlabArc<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: a held reference keeps the object allocated, and shared
        // handles only give out `&T`.
        unsafe { value_of(self.slot).as_ref() }
    }
}

impl<T> Drop for SlabArc<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the slot is allocated while we hold a reference.
        if unsafe { self.slot.as_ref() }.refs.put() {
            // SAFETY: the last put leaves the count at zero and makes us the
            // object's only user.
            unsafe { self.cache.free_slot(self.slot) };
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for SlabArc<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// The address of an object found under a read guard; it cannot outlive
/// the guard, and the object is reached only through
/// [`SlabCache::try_get`].
pub struct SlabPtr<'g, T> {
    slot: NonNull<Slot<T>>,
    cache: &'g SlabCache<T>,
    /// Tied to the read guard's thread, like the guard.
    _guard: PhantomData<&'g ReadGuard>,
}

impl<T> Clone for SlabPtr<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SlabPtr<'_, T> {}

impl<T> SlabPtr<'_, T> {
    /// The object's address, for comparisons.
    pub fn as_ptr(&self) -> NonNull<T> {
        value_of(self.slot)
    }
}

impl<T> fmt::Debug for SlabPtr<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlabPtr({:p})", self.slot)
    }
}

/// An atomic, optional [`SlabArc`] of a type-stable cache: the building
/// block of lock-free lookup tables. It holds a counted reference to what it
/// stores; readers [`load`](Self::load) it under a read guard and take their
/// own reference with [`SlabCache::try_get`].
///
/// Lookups need `T: Send + Sync`. A type-stable cache may hand a freed
/// object to a new owner at once, and a reader's `try_get` on the address it
/// found then shares that object with the owner's thread: `T` must be safe
/// to share, as with `Arc<T>`. A `Cell` is refused:
///
/// ```compile_fail,E0277
/// use std::cell::Cell;
/// use vmtask_slab::{AtomicSlabArc, Config, SlabCache};
///
/// let config = Config { typesafe_by_rcu: true, ..Config::new("cells") };
/// let cache = SlabCache::new(config, || Cell::new(0u64)).unwrap();
/// // error: `Cell<u64>` cannot be shared between threads safely
/// let cell = AtomicSlabArc::new(&cache).unwrap();
/// cell.store(Some(cache.alloc_shared().unwrap()));
/// let guard = vmtask_rcu::read_lock();
/// let found = cell.get(&guard);
/// ```
pub struct AtomicSlabArc<'c, T> {
    cache: &'c SlabCache<T>,
    ptr: AtomicPtr<Slot<T>>,
}

// SAFETY: it stores a `SlabArc` (Send + Sync when `T: Send + Sync`).
unsafe impl<T: Send + Sync> Send for AtomicSlabArc<'_, T> {}
// SAFETY: as above; the pointer is atomic.
unsafe impl<T: Send + Sync> Sync for AtomicSlabArc<'_, T> {}

impl<'c, T> AtomicSlabArc<'c, T> {
    /// An empty cell for objects of `cache`.
    ///
    /// # Errors
    /// [`SlabError::NotTypesafe`] unless `cache` is `typesafe_by_rcu`:
    /// without type stability a reader could find an object whose memory
    /// was already returned to the system.
    pub fn new(cache: &'c SlabCache<T>) -> Result<Self, SlabError>
    where
        T: Send + Sync,
    {
        if !cache.is_typesafe() {
            return Err(SlabError::NotTypesafe {
                cache: cache.name().to_owned(),
            });
        }
        Ok(AtomicSlabArc {
            cache,
            ptr: AtomicPtr::new(ptr::null_mut()),
        })
    }

    /// Stores `new` (publishing it with a release) and returns what was
    /// stored before. Dropping the returned reference may free the object
    /// at once; readers that found it re-check their key.
    ///
    /// # Panics
    /// If `new` belongs to another cache.
    pub fn swap(&self, new: Option<SlabArc<'c, T>>) -> Option<SlabArc<'c, T>> {
        let raw = match new {
            Some(arc) => {
                assert!(
                    ptr::eq(arc.cache, self.cache),
                    "object of slab cache `{}` stored in a cell of cache `{}`",
                    arc.cache.name(),
                    self.cache.name()
                );
                SlabArc::into_slot(arc).as_ptr()
            }
            None => ptr::null_mut(),
        };
        let old = self.ptr.swap(raw, Ordering::AcqRel);
        // SAFETY: a non-null value in the cell carries the reference it was
        // stored with, which the swap hands to us.
        NonNull::new(old).map(|slot| unsafe { SlabArc::from_slot(self.cache, slot) })
    }

    /// Stores `new`, dropping the previous reference.
    ///
    /// # Panics
    /// If `new` belongs to another cache.
    pub fn store(&self, new: Option<SlabArc<'c, T>>) {
        drop(self.swap(new));
    }

    /// The stored object's address, if any (an acquire load).
    pub fn load<'g>(&'g self, _guard: &'g ReadGuard) -> Option<SlabPtr<'g, T>> {
        let slot = NonNull::new(self.ptr.load(Ordering::Acquire))?;
        Some(SlabPtr {
            slot,
            cache: self.cache,
            _guard: PhantomData,
        })
    }

    /// `load` followed by `try_get`: a reference to the stored object,
    /// unless the cell was empty or the object was freed meanwhile. The
    /// object may have been reused: re-check its key.
    pub fn get(&self, guard: &ReadGuard) -> Option<SlabArc<'c, T>>
    where
        T: Send + Sync,
    {
        let ptr = self.load(guard)?;
        self.cache.try_get(ptr, guard)
    }
}

impl<T> Drop for AtomicSlabArc<'_, T> {
    fn drop(&mut self) {
        drop(self.swap(None));
    }
}

impl<T> fmt::Debug for AtomicSlabArc<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AtomicSlabArc({:p})", self.ptr.load(Ordering::Relaxed))
    }
}

impl<T> SlabCache<T> {
    /// A new shared object (`alloc` then [`SlabBox::into_shared`]); prefer
    /// initialising a [`SlabBox`] first when readers may find the object.
    ///
    /// # Errors
    /// As [`alloc`](Self::alloc).
    pub fn alloc_shared(&self) -> Result<SlabArc<'_, T>, SlabError> {
        Ok(SlabBox::into_shared(self.alloc()?))
    }

    /// Increment-if-not-zero on an object found under `guard`: a reference,
    /// or `None` if the object was freed since it was found. The object may
    /// have been reused for another key in between: re-check the key.
    ///
    /// The object may meanwhile belong to a reference on another thread,
    /// which the new one shares it with: hence `T: Send + Sync`.
    ///
    /// # Panics
    /// If `ptr` was loaded from a cell of another cache.
    #[inline]
    pub fn try_get<'c>(&'c self, ptr: SlabPtr<'_, T>, _guard: &ReadGuard) -> Option<SlabArc<'c, T>>
    where
        T: Send + Sync,
    {
        assert!(
            ptr::eq(ptr.cache, self),
            "SlabPtr of slab cache `{}` used with cache `{}`",
            ptr.cache.name(),
            self.name()
        );
        // Why this holds: the pointer was loaded from an AtomicSlabArc of this
        // type-stable cache under a read guard that is still held; the
        // object was allocated when the cell held it, so its slab cannot
        // have left the system before the guard's grace period ends.
        // SAFETY: the guard keeps the object's slab in place (above).
        unsafe { self.try_get_slot(ptr.slot) }
    }

    /// `try_get` on an address obtained some other way, for intrusive
    /// lookup structures.
    ///
    /// # Safety
    /// The cache must be `typesafe_by_rcu`, `ptr` must be the address of an
    /// object of this cache ([`SlabArc::as_ptr`]), and `guard` must have
    /// been held continuously since some moment at which that object was
    /// allocated (typically: `ptr` was read, under `guard`, from a structure
    /// that the object is removed from before it is freed).
    ///
    /// # Panics
    /// If the cache is not `typesafe_by_rcu`.
    pub unsafe fn try_get_raw(&self, ptr: NonNull<T>, _guard: &ReadGuard) -> Option<SlabArc<'_, T>>
    where
        T: Send + Sync,
    {
        assert!(
            self.is_typesafe(),
            "try_get_raw on slab cache `{}`, which is not typesafe_by_rcu",
            self.name()
        );
        // SAFETY: the caller's contract is the one `try_get_slot` needs.
        unsafe { self.try_get_slot(slot_of(ptr)) }
    }

    /// # Safety
    /// `slot` is a slot of this type-stable cache whose slab stays mapped
    /// (a read guard held since the object was allocated ensures that).
    #[inline]
    unsafe fn try_get_slot(&self, slot: NonNull<Slot<T>>) -> Option<SlabArc<'_, T>> {
        // SAFETY: the slot's memory is a valid Slot<T> (caller's contract);
        // only the atomic header is touched until a reference is held (the
        // value may belong to a SlabBox writing it on another thread).
        if unsafe { slot.as_ref() }.refs.try_get() {
            // SAFETY: try_get took the reference handed over here.
            Some(unsafe { SlabArc::from_slot(self, slot) })
        } else {
            None
        }
    }
}
