//! Slabs: page-aligned runs of constructed objects, and the layer that
//! hands free objects out of them and takes them back.
//!
//! Slab memory comes from `mmap(2)`, not the global allocator: a slab is a
//! whole number of pages that `shrink` must give back to the system so that
//! `VmRSS` really drops, and `munmap` guarantees that where `free(3)` may
//! keep the memory in the allocator's arenas. Every object of a slab is
//! constructed when the slab is created and dropped when the slab is
//! released, never in between: free objects stay valid `T`s, which is what
//! makes the memory type-stable.
//!
//! Protocol: the free lists sit behind one mutex, taken only on the slow
//! path, in batches of a magazine. A slab is created (mapped and
//! constructed) outside the lock, after reserving its place under the limit.

use std::cell::UnsafeCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ptr::{self, NonNull};

use crate::error::SlabError;
use crate::refcount::RefCount;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One object and its header. Pointers to free objects, in magazines and
/// the depot, point at the slot.
#[repr(C)]
pub(crate) struct Slot<T> {
    pub(crate) refs: RefCount,
    pub(crate) value: UnsafeCell<T>,
}

/// The byte written over a slab before it goes back to the system in test
/// builds, so a reader that looks at released memory sees garbage it can
/// detect rather than a valid object.
#[cfg(test)]
pub(crate) const POISON: u8 = 0x6b;

/// The memory of one slab: `objects` constructed slots from `base`.
pub(crate) struct SlabMem<T> {
    base: NonNull<u8>,
    bytes: usize,
    objects: usize,
    _owns: std::marker::PhantomData<T>,
}

// SAFETY: a SlabMem owns its mapping and the `T`s in it; sending it sends
// the `T`s, which are `Send`.
unsafe impl<T: Send> Send for SlabMem<T> {}

impl<T> SlabMem<T> {
    /// Maps `bytes` and constructs `objects` slots with `ctor`. If `ctor`
    /// panics, the slots built so far are dropped and the memory unmapped.
    fn create(bytes: usize, objects: usize, ctor: &dyn Fn() -> T) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing has no preconditions; failure is checked below.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).expect("mmap returned null");
        // Dropped on unwind: releases what was built if `ctor` panics.
        let mut partial = SlabMem {
            base,
            bytes,
            objects: 0,
            _owns: std::marker::PhantomData,
        };
        for index in 0..objects {
            let slot = Slot {
                refs: RefCount::new(),
                value: UnsafeCell::new(ctor()),
            };
            // SAFETY: `index < objects`, and `objects` slots fit in `bytes`
            // (checked by Config::validate); the mapping is page-aligned,
            // and the slot alignment is at most a page.
            unsafe { partial.slot(index).as_ptr().write(slot) };
            partial.objects = index + 1;
        }
        Ok(partial)
    }

    fn slot(&self, index: usize) -> NonNull<Slot<T>> {
        let stride = std::mem::size_of::<Slot<T>>();
        // SAFETY: callers pass `index` below the slab's capacity, so the
        // offset stays inside the mapping.
        unsafe { self.base.add(index * stride).cast() }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl<T> Drop for SlabMem<T> {
    /// Drops every object and returns the memory to the system, also when
    /// a `T::drop` panics: the rest of the objects are dropped and the
    /// memory released as the panic unwinds (a second panic aborts, as in
    /// `Vec`).
    fn drop(&mut self) {
        /// Drops the objects from `next` on, then releases the mapping. If
        /// one `T::drop` panics, the unwinding drops this guard, which goes
        /// on from the next object.
        struct Release<'a, T> {
            mem: &'a SlabMem<T>,
            next: usize,
        }
        impl<T> Release<'_, T> {
            fn drop_objects(&mut self) {
                while self.next < self.mem.objects {
                    let index = self.next;
                    self.next += 1;
                    // SAFETY: slots below `objects` were constructed and are
                    // dropped exactly once, here (`next` moved past `index`
                    // first); the slab's owner guarantees nobody uses them.
                    unsafe { ptr::drop_in_place(self.mem.slot(index).as_ptr()) };
                }
            }
        }
        impl<T> Drop for Release<'_, T> {
            fn drop(&mut self) {
                self.drop_objects();
                self.mem.unmap();
            }
        }
        Release { mem: self, next: 0 }.drop_objects();
    }
}

impl<T> SlabMem<T> {
    /// Returns the memory to the system; its objects are already dropped.
    fn unmap(&self) {
        #[cfg(test)]
        {
            // SAFETY: the mapping is ours and no longer holds live objects.
            unsafe { ptr::write_bytes(self.base.as_ptr(), POISON, self.bytes) };
            // Replace the pages with an inaccessible reservation instead of
            // unmapping them, so the address is never reused by a later slab
            // and a late reader faults instead of finding a new object.
            // SAFETY: MAP_FIXED over our own mapping, same length.
            let rc = unsafe {
                libc::mmap(
                    self.base.as_ptr().cast(),
                    self.bytes,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(rc, libc::MAP_FAILED, "replacing a released slab failed");
        }
        #[cfg(not(test))]
        {
            // SAFETY: the mapping is ours and no longer holds live objects.
            let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
            debug_assert_eq!(rc, 0, "munmap of a slab failed");
        }
    }
}

struct SlabMeta<T> {
    mem: SlabMem<T>,
    /// Indices of the free slots.
    free: Vec<u32>,
}

struct SlabSet<T> {
    /// Slabs by base address.
    slabs: BTreeMap<usize, SlabMeta<T>>,
    /// Bases of the slabs with free slots; the lowest goes first, so that
    /// objects pack into few slabs and the rest can be shrunk.
    partial: BTreeSet<usize>,
    /// Free slots over all slabs.
    free: usize,
    /// Slabs being created outside the lock (counted against the limit).
    reserved: usize,
}

/// The slabs of one cache and their free lists.
pub(crate) struct SlabLayer<T> {
    name: String,
    slab_bytes: usize,
    objects_per_slab: usize,
    max_slabs: usize,
    ctor: Box<dyn Fn() -> T + Send + Sync>,
    set: Mutex<SlabSet<T>>,
    /// Slabs taken out by a type-stable shrink and not yet released (they
    /// wait for a grace period): still mapped, so counted against the limit.
    pub(crate) releasing: Arc<AtomicUsize>,
}

/// Occupancy of the slab layer (a snapshot).
pub(crate) struct SlabCounts {
    pub(crate) slabs: usize,
    pub(crate) free: usize,
}

/// Empty slabs on their way back to the system after a grace period,
/// counted in their layer's `releasing` until they are unmapped.
pub(crate) struct QueuedRelease<T> {
    slabs: Vec<SlabMem<T>>,
    counter: Arc<AtomicUsize>,
}

impl<T> QueuedRelease<T> {
    pub(crate) fn is_empty(&self) -> bool {
        self.slabs.is_empty()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.slabs.iter().map(|slab| slab.bytes()).sum()
    }
}

impl<T> Drop for QueuedRelease<T> {
    fn drop(&mut self) {
        /// Uncounts the slabs after they are gone, also when a `T::drop`
        /// panics on the way (the limit must not stay reduced).
        struct Uncount<'a>(&'a AtomicUsize, usize);
        impl Drop for Uncount<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(self.1, Ordering::Relaxed);
            }
        }
        let _uncount = Uncount(&self.counter, self.slabs.len());
        drop(std::mem::take(&mut self.slabs));
    }
}

impl<T> SlabLayer<T> {
    pub(crate) fn new(
        name: String,
        slab_bytes: usize,
        max_bytes: usize,
        ctor: Box<dyn Fn() -> T + Send + Sync>,
    ) -> Self {
        SlabLayer {
            name,
            slab_bytes,
            objects_per_slab: slab_bytes / std::mem::size_of::<Slot<T>>(),
            max_slabs: max_bytes / slab_bytes,
            ctor,
            set: Mutex::new(SlabSet {
                slabs: BTreeMap::new(),
                partial: BTreeSet::new(),
                free: 0,
                reserved: 0,
            }),
            releasing: Default::default(),
        }
    }

    /// The free lists; a panic never leaves them half-updated, so a
    /// poisoned lock is taken over.
    fn lock(&self) -> MutexGuard<'_, SlabSet<T>> {
        self.set
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn objects_per_slab(&self) -> usize {
        self.objects_per_slab
    }

    /// Moves up to `max` (at least one) free objects into `out`, creating a
    /// slab if none is free. Returns how many moved.
    pub(crate) fn take(&self, max: usize, out: &mut Vec<NonNull<u8>>) -> Result<usize, SlabError> {
        loop {
            {
                let mut set = self.lock();
                let mut taken = 0;
                while taken < max {
                    let Some(&base) = set.partial.first() else {
                        break;
                    };
                    let meta = set
                        .slabs
                        .get_mut(&base)
                        .expect("partial slab is registered");
                    while taken < max {
                        let Some(index) = meta.free.pop() else { break };
                        out.push(meta.mem.slot(index as usize).cast());
                        taken += 1;
                    }
                    if meta.free.is_empty() {
                        set.partial.remove(&base);
                    }
                }
                set.free -= taken;
                if taken > 0 {
                    return Ok(taken);
                }
                let releasing = self.releasing.load(Ordering::Relaxed);
                if set.slabs.len() + set.reserved + releasing >= self.max_slabs {
                    return Err(SlabError::Limit {
                        cache: self.name.clone(),
                        max_bytes: self.max_slabs * self.slab_bytes,
                        slabs: set.slabs.len() + releasing,
                        slab_bytes: self.slab_bytes,
                    });
                }
                set.reserved += 1;
            }
            let created = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                SlabMem::create(self.slab_bytes, self.objects_per_slab, &*self.ctor)
            }));
            let mut set = self.lock();
            set.reserved -= 1;
            match created {
                Ok(Ok(mem)) => {
                    let base = mem.base.as_ptr() as usize;
                    let objects = self.objects_per_slab as u32;
                    set.slabs.insert(
                        base,
                        SlabMeta {
                            mem,
                            free: (0..objects).rev().collect(),
                        },
                    );
                    set.partial.insert(base);
                    set.free += objects as usize;
                }
                Ok(Err(source)) => {
                    return Err(SlabError::Map {
                        cache: self.name.clone(),
                        bytes: self.slab_bytes,
                        source,
                    });
                }
                Err(panic) => {
                    drop(set);
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }

    /// Returns objects to their slabs.
    pub(crate) fn give_back(&self, objects: &[NonNull<u8>]) {
        if objects.is_empty() {
            return;
        }
        let stride = std::mem::size_of::<Slot<T>>();
        let mut set = self.lock();
        for object in objects {
            let addr = object.as_ptr() as usize;
            let (&base, meta) = set
                .slabs
                .range_mut(..=addr)
                .next_back()
                .expect("object belongs to a slab of this cache");
            debug_assert!(addr < base + meta.mem.bytes && (addr - base) % stride == 0);
            meta.free.push(((addr - base) / stride) as u32);
            let now_partial = meta.free.len() == 1;
            if now_partial {
                set.partial.insert(base);
            }
        }
        set.free += objects.len();
    }

    /// Takes every slab whose objects are all free out of the layer; the
    /// caller releases them (now, or after a grace period).
    pub(crate) fn take_empty_slabs(&self) -> Vec<SlabMem<T>> {
        self.take_empty_locked(&mut self.lock())
    }

    /// As `take_empty_slabs`, for a release that waits for a grace period:
    /// the slabs stay counted against the limit, from under the same lock
    /// that takes them out (so no allocation can map one more in between)
    /// until the returned value has dropped them.
    pub(crate) fn take_empty_slabs_deferred(&self) -> QueuedRelease<T> {
        let mut set = self.lock();
        let slabs = self.take_empty_locked(&mut set);
        self.releasing.fetch_add(slabs.len(), Ordering::Relaxed);
        QueuedRelease {
            slabs,
            counter: Arc::clone(&self.releasing),
        }
    }

    fn take_empty_locked(&self, set: &mut SlabSet<T>) -> Vec<SlabMem<T>> {
        let empty: Vec<usize> = set
            .slabs
            .iter()
            .filter(|(_, meta)| meta.free.len() == self.objects_per_slab)
            .map(|(&base, _)| base)
            .collect();
        set.free -= empty.len() * self.objects_per_slab;
        empty
            .into_iter()
            .map(|base| {
                set.partial.remove(&base);
                set.slabs.remove(&base).expect("listed above").mem
            })
            .collect()
    }

    pub(crate) fn counts(&self) -> SlabCounts {
        let set = self.lock();
        SlabCounts {
            slabs: set.slabs.len(),
            free: set.free,
        }
    }

    pub(crate) fn slab_bytes(&self) -> usize {
        self.slab_bytes
    }
}
