//! `SlabCache<T>`: the cache itself, tying the per-CPU magazines, the depot
//! and the slabs together.

use std::fmt;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use vmtask_percpu::CpuCache;

use crate::boxed::SlabBox;
use crate::config::Config;
use crate::error::SlabError;
use crate::magazine::{Backing, Magazines};
use crate::rcu_free::RcuMagazines;
use crate::slab::{SlabLayer, Slot};
use crate::stats::{Event, SlabStats};

/// A cache of constructed `T`s, handed out from slabs through per-CPU
/// magazines.
///
/// Each `T` is built once, by the constructor given to [`new`](Self::new),
/// when its slab is created, and dropped when its slab is returned to the
/// system (by [`shrink`](Self::shrink) or when the cache is dropped). In
/// between, [`alloc`](Self::alloc) hands out a previously used `T` as it was
/// left: re-initialise what your use needs, and keep in it what should
/// survive reuse (a lock, a counter, a buffer).
///
/// Handles borrow the cache, so it cannot be dropped while a [`SlabBox`] or
/// [`SlabArc`](crate::SlabArc) is alive:
///
/// ```compile_fail,E0505
/// use vmtask_slab::{Config, SlabCache};
/// let cache = SlabCache::new(Config::new("c"), || 0u64).unwrap();
/// let object = cache.alloc().unwrap();
/// drop(cache); // error: `cache` is still borrowed by `object`
/// drop(object);
/// ```
///
/// Objects leaked with [`SlabBox::into_raw`] are dropped with their slab
/// when the cache is dropped; turning such a pointer back into a box needs
/// the cache, so the pointer is dead by then.
///
/// # Dropping
///
/// Dropping a cache that used [`free_rcu`](Self::free_rcu) waits for its RCU
/// magazines (`vmtask_rcu::barrier`), and dropping a type-stable cache waits
/// for a grace period before its memory goes back to the system. Where it
/// cannot wait, inside a read-side critical section or in an RCU callback
/// (which `barrier` would wait for), the cache is **leaked** with a message
/// on standard error: its slabs stay mapped and its objects are never
/// dropped. Better to leak than to free memory that a magazine in flight or
/// a reader may still reach. Drop such caches outside read-side sections,
/// on an ordinary thread.
pub struct SlabCache<T> {
    /// Boxed so that its address outlives moves of the cache: RCU magazines
    /// in flight point at it. Freed only by `Drop`, and only once no RCU
    /// magazine or reader can reach it (a panic in the waits leaks it).
    pub(crate) shared: ManuallyDrop<Box<Shared<T>>>,
}

pub(crate) struct Shared<T> {
    pub(crate) name: String,
    pub(crate) typesafe: bool,
    pub(crate) magazines: Magazines<CpuCache>,
    pub(crate) slabs: SlabLayer<T>,
    pub(crate) rcu: RcuMagazines,
    /// A type-stable `shrink` has queued slabs for release after a grace
    /// period: the cache's drop waits for them (`barrier`), so every `T`
    /// is dropped by the time the cache is.
    pub(crate) releasing: AtomicBool,
}

impl<T> Backing for SlabLayer<T> {
    fn take(&self, max: usize, out: &mut Vec<NonNull<u8>>) -> Result<usize, SlabError> {
        SlabLayer::take(self, max, out)
    }

    fn give_back(&self, objects: &[NonNull<u8>]) {
        SlabLayer::give_back(self, objects)
    }
}

/// Empty magazines each CPU keeps at hand (see `Magazines`).
const SPARE_MAGAZINES: usize = 2;

impl<T: Send + 'static> SlabCache<T> {
    /// A cache of `T`s built by `ctor`, laid out by `config`.
    ///
    /// `ctor` runs once per object, when the object's slab is created,
    /// possibly on any thread that allocates.
    ///
    /// # Errors
    /// [`SlabError::InvalidConfig`] if a field of `config` is out of range
    /// or a `T` (with its 8-byte header) does not fit in a slab.
    pub fn new(
        config: Config,
        ctor: impl Fn() -> T + Send + Sync + 'static,
    ) -> Result<Self, SlabError> {
        config.validate(
            std::mem::size_of::<Slot<T>>(),
            std::mem::align_of::<Slot<T>>(),
        )?;
        let per_cpu = |capacity| {
            CpuCache::try_new(capacity).map_err(|source| SlabError::Magazines {
                cache: config.name.clone(),
                source,
            })
        };
        let (cpu, spares, pending) = (
            per_cpu(config.magazine_size)?,
            per_cpu(SPARE_MAGAZINES)?,
            per_cpu(config.magazine_size)?,
        );
        Ok(SlabCache {
            shared: ManuallyDrop::new(Box::new(Shared {
                typesafe: config.typesafe_by_rcu,
                magazines: Magazines::new(
                    cpu,
                    spares,
                    config.magazine_size,
                    config.depot_magazines,
                ),
                slabs: SlabLayer::new(
                    config.name.clone(),
                    config.slab_bytes,
                    config.max_bytes,
                    Box::new(ctor),
                ),
                rcu: RcuMagazines::new(pending),
                releasing: AtomicBool::new(false),
                name: config.name,
            })),
        })
    }

    /// Returns to the system every slab whose objects are all free, after
    /// moving the free objects out of every CPU's magazine and the depot.
    /// Returns the bytes released: at once for a plain cache, after a grace
    /// period (on the RCU callback thread) for a type-stable one, since
    /// readers may still `try_get` its objects (touching their headers).
    /// Dropping the cache waits for that release, so every `T` has been
    /// dropped once the cache has.
    ///
    /// Partly filled RCU magazines are sent on their grace period, so their
    /// objects come back for a later `shrink` (after `vmtask_rcu::barrier`).
    pub fn shrink(&self) -> usize {
        let shared = &*self.shared;
        self.flush_rcu();
        shared.magazines.drain_all(&shared.slabs);
        if shared.typesafe {
            // Readers that found an object of these slabs before they left
            // the cache are inside read-side sections that this grace
            // period waits for; later readers cannot find them.
            let empty = shared.slabs.take_empty_slabs_deferred();
            let bytes = empty.bytes();
            if !empty.is_empty() {
                shared.releasing.store(true, Ordering::Relaxed);
                vmtask_rcu::call(move || drop(empty));
            }
            bytes
        } else {
            let empty = shared.slabs.take_empty_slabs();
            empty.iter().map(|slab| slab.bytes()).sum()
        }
    }
}

impl<T> SlabCache<T> {
    /// A constructed object, from the current CPU's magazine when it has
    /// one, else from the depot or a slab.
    ///
    /// # Errors
    /// [`SlabError::Limit`] at the configured `max_bytes`;
    /// [`SlabError::Map`] if the system refuses a new slab.
    #[inline(always)]
    pub fn alloc(&self) -> Result<SlabBox<'_, T>, SlabError> {
        let shared = &*self.shared;
        let slot = shared.magazines.alloc(&shared.slabs)?;
        // SAFETY: the magazines hand out each free slot of this cache to one
        // caller, and every slot holds a constructed, unshared `T`.
        Ok(unsafe { SlabBox::from_slot(self, slot.cast()) })
    }

    /// Returns a slot to the current CPU's magazine.
    ///
    /// # Safety
    /// `slot` must be an allocated slot of this cache that nobody uses any
    /// more.
    #[inline(always)]
    pub(crate) unsafe fn free_slot(&self, slot: NonNull<Slot<T>>) {
        let shared = &*self.shared;
        shared.magazines.free(slot.cast(), &shared.slabs);
    }

    /// The name from the configuration.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Whether the cache is `typesafe_by_rcu`.
    pub fn is_typesafe(&self) -> bool {
        self.shared.typesafe
    }

    /// A snapshot of the counters and occupancy.
    pub fn stats(&self) -> SlabStats {
        let shared = &*self.shared;
        let counters = &shared.magazines.counters;
        let slabs = shared.slabs.counts();
        let magazines = shared.magazines.counts();
        let per_slab = shared.slabs.objects_per_slab();
        let objects_free = slabs.free + magazines.cpu_objects + magazines.depot_objects;
        let magazine_hits = counters.sum(Event::AllocHit);
        let magazine_misses = counters.sum(Event::AllocMiss);
        let rcu_frees = counters.sum(Event::RcuFree);
        let objects_in_use = (slabs.slabs * per_slab).saturating_sub(objects_free);
        let rcu_waiting = shared.rcu.waiting_objects();
        // Emptied by a type-stable shrink, still mapped until a grace period.
        let releasing = shared.slabs.releasing.load(Ordering::Relaxed);
        SlabStats {
            name: shared.name.clone(),
            object_bytes: std::mem::size_of::<Slot<T>>(),
            objects_per_slab: per_slab,
            rseq_fast_path: shared.magazines.is_rseq(),
            allocs: magazine_hits + magazine_misses,
            frees: (magazine_hits + magazine_misses)
                .saturating_sub(rcu_frees + (objects_in_use as u64).saturating_sub(rcu_waiting)),
            free_misses: counters.sum(Event::FreeMiss),
            magazine_hits,
            magazine_misses,
            depot_gets: counters.sum(Event::DepotGet),
            depot_puts: counters.sum(Event::DepotPut),
            depot_magazines: magazines.depot_magazines,
            slab_objects_out: counters.sum(Event::SlabOut),
            slab_objects_in: counters.sum(Event::SlabIn),
            rcu_frees,
            rcu_magazines: counters.sum(Event::RcuSubmit),
            rcu_magazines_in_flight: shared.rcu.in_flight(),
            rcu_objects_waiting: rcu_waiting,
            slabs: slabs.slabs + releasing,
            objects_in_use,
            objects_free,
            resident_bytes: (slabs.slabs + releasing) * shared.slabs.slab_bytes(),
        }
    }
}

impl<T> Drop for SlabCache<T> {
    fn drop(&mut self) {
        let shared: &Shared<T> = &self.shared;
        // RCU magazines in flight point at `shared` (free_rcu), and readers
        // may still reach objects freed by free_rcu or, in a type-stable
        // cache, any freed object.
        let in_flight = shared.rcu.used() || shared.releasing.load(Ordering::Relaxed);
        let readers = shared.typesafe || in_flight;
        if readers && vmtask_rcu::in_read_section() {
            // Waiting here would wait for our own read-side section.
            self.leak("inside an RCU read-side critical section");
            return;
        }
        // Not by letting `barrier` panic and catching it: under
        // `panic = "abort"` (or an aborting panic hook) that aborts.
        if in_flight && !vmtask_rcu::barrier_allowed() {
            self.leak("where it cannot wait for RCU (in an RCU callback or a deferred drop)");
            return;
        }
        // `barrier` also panics on the RCU callback thread (the callback
        // would wait for itself). A panic must not free `shared` early:
        // it is in a `ManuallyDrop`, so catching it and returning leaks it.
        let waited = catch_unwind(AssertUnwindSafe(|| {
            if in_flight {
                vmtask_rcu::barrier();
            }
            if readers {
                vmtask_rcu::synchronize();
            }
        }));
        if waited.is_err() {
            self.leak("where it cannot wait for RCU (in an RCU callback?)");
            return;
        }
        // Why this holds: dropped once, here, in `drop`; the callbacks of the RCU
        // magazines have all run (`barrier`) and every reader that could
        // have found an object has left (`synchronize`), so nothing else
        // refers to `shared` any more. The slabs drop their objects and
        // unmap.
        // SAFETY: dropped once, after the waits above; nothing refers to it.
        unsafe { ManuallyDrop::drop(&mut self.shared) };
    }
}

impl<T> SlabCache<T> {
    /// Leaves the shared state (slabs, objects, magazines) allocated
    /// forever, for a `Drop` that could not wait for RCU.
    #[cold]
    fn leak(&self, why: &str) {
        let shared: &Shared<T> = &self.shared;
        let slabs = shared.slabs.counts().slabs;
        // Not `eprintln!`, which panics if stderr is closed: a panic in
        // `drop` while unwinding aborts.
        vmtask_percpu::warn(format_args!(
            "vmtask_slab: cache `{}` dropped {why}; leaking its {slabs} slabs ({} bytes) \
             rather than freeing memory that RCU readers or callbacks may still reach",
            shared.name,
            slabs * shared.slabs.slab_bytes(),
        ));
    }
}

impl<T> fmt::Debug for SlabCache<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabCache")
            .field("name", &self.shared.name)
            .field("typesafe_by_rcu", &self.shared.typesafe)
            .field("magazine_size", &self.shared.magazines.size())
            .finish_non_exhaustive()
    }
}
