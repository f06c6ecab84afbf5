//! Cache configuration.

use crate::error::SlabError;

/// How a [`SlabCache`](crate::SlabCache) is laid out and bounded.
///
/// Build one with [`Config::new`] and override fields with struct update
/// syntax:
///
/// ```
/// use vmtask_slab::Config;
/// let config = Config { typesafe_by_rcu: true, ..Config::new("sockets") };
/// assert_eq!(config.magazine_size, 32);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Shown in statistics and errors.
    pub name: String,
    /// `SLAB_TYPESAFE_BY_RCU`: a freed object may be reused at once, but its
    /// slab's memory goes back to the system only after a grace period, so
    /// readers under `read_lock` that found it may still try to take a
    /// reference to it ([`try_get`](crate::SlabCache::try_get), which touches
    /// only the object's reference count). Required for
    /// [`AtomicSlabArc`](crate::AtomicSlabArc) lookups. Default `false`.
    pub typesafe_by_rcu: bool,
    /// Objects in one magazine: the per-CPU cache's capacity and the unit in
    /// which objects move to and from the depot. Default 32; at most
    /// [`MAX_MAGAZINE_SIZE`].
    pub magazine_size: usize,
    /// Bytes in one slab: a multiple of the page size. Default 64 KiB.
    pub slab_bytes: usize,
    /// Magazines holding objects that the depot keeps before it returns
    /// further objects to their slabs; bounds the free objects a cache hoards
    /// after a burst of frees. RCU magazines coming back from their grace
    /// period are exempt (see [`free_rcu`](crate::SlabCache::free_rcu)).
    /// Default 16 per possible CPU.
    pub depot_magazines: usize,
    /// Upper bound on slab memory, in bytes; allocation fails with
    /// [`SlabError::Limit`] past it. Default unlimited.
    pub max_bytes: usize,
}

/// The largest [`Config::magazine_size`]: 65,536 objects, 512 KiB of
/// pointers per CPU and per magazine. Far past any useful size (the
/// kernel's largest per-CPU arrays hold a few hundred). The per-CPU arrays
/// take that per *possible* CPU, twice: where the allocator cannot give it
/// (a machine that reports thousands of possible CPUs), creating the cache
/// fails with [`SlabError::Magazines`].
pub const MAX_MAGAZINE_SIZE: usize = 1 << 16;

impl Config {
    /// The defaults, with `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Config {
            name: name.into(),
            typesafe_by_rcu: false,
            magazine_size: 32,
            slab_bytes: 64 * 1024,
            depot_magazines: 16 * vmtask_percpu::possible_cpus(),
            max_bytes: usize::MAX,
        }
    }

    /// Checks the fields against each other and against `slot_bytes`, the
    /// size of one object with its header, and `slot_align`.
    pub(crate) fn validate(&self, slot_bytes: usize, slot_align: usize) -> Result<(), SlabError> {
        let invalid =
            |field: &'static str, value: usize, requirement: String| SlabError::InvalidConfig {
                cache: self.name.clone(),
                field,
                value,
                requirement,
            };
        let page = page_size();
        if self.magazine_size == 0 || self.magazine_size > MAX_MAGAZINE_SIZE {
            return Err(invalid(
                "magazine_size",
                self.magazine_size,
                format!("from 1 to {MAX_MAGAZINE_SIZE}"),
            ));
        }
        if self.slab_bytes == 0 || self.slab_bytes % page != 0 {
            return Err(invalid(
                "slab_bytes",
                self.slab_bytes,
                format!("a non-zero multiple of the {page}-byte page"),
            ));
        }
        if slot_align > page {
            return Err(invalid(
                "object alignment",
                slot_align,
                format!("at most the {page}-byte page"),
            ));
        }
        if slot_bytes > self.slab_bytes {
            return Err(invalid(
                "slab_bytes",
                self.slab_bytes,
                format!("room for one {slot_bytes}-byte object"),
            ));
        }
        if self.slab_bytes / slot_bytes > u32::MAX as usize {
            return Err(invalid(
                "slab_bytes",
                self.slab_bytes,
                format!(
                    "at most {} bytes: room for at most {} objects of {slot_bytes} bytes per slab",
                    u32::MAX as usize * slot_bytes,
                    u32::MAX
                ),
            ));
        }
        if self.max_bytes < self.slab_bytes {
            return Err(invalid(
                "max_bytes",
                self.max_bytes,
                format!("at least one {}-byte slab", self.slab_bytes),
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    /// The defaults, named `"slab"`.
    fn default() -> Self {
        Config::new("slab")
    }
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        4096
    }
}
