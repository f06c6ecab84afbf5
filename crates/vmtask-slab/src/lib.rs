//! Slab caches: objects of one type, constructed once, handed out through
//! per-CPU magazines, optionally type-stable under RCU.
//!
//! This is the kernel's slab allocator in user space:
//!
//! - **Magazines and a depot.** Each CPU keeps a magazine of free objects;
//!   allocating pops from it and freeing pushes onto it, with no system
//!   call and no shared cache line written. Empty and full magazines move
//!   to and from a shared, bounded depot in whole units (SLUB's "sheaves"
//!   and "barn"); the depot draws on slabs when it runs dry.
//! - **Constructed once.** A [`SlabCache`]'s constructor runs when a slab
//!   is created, not on every allocation. A freed object stays a valid `T`
//!   and the next [`alloc`](SlabCache::alloc) hands it out as it was left:
//!   locks, counters and buffers in it survive reuse.
//! - **Type-stable memory** ([`Config::typesafe_by_rcu`], the kernel's
//!   `SLAB_TYPESAFE_BY_RCU`): a freed object may be reused at once, but its
//!   slab goes back to the system only after a grace period, so a reader
//!   inside `vmtask_rcu::read_lock` that still holds its address can safely
//!   try to take a reference to it ([`SlabCache::try_get`]): its header, the
//!   reference count, stays valid. The reader reaches the value only through
//!   that counted reference, never before: the object may already belong to
//!   a new owner that is writing to it — possibly as a different object of
//!   the same type. See [`AtomicSlabArc`] and the pattern below.
//! - **RCU frees that feed the cache.** [`SlabCache::free_rcu`] collects
//!   deferred frees in a per-CPU RCU magazine that passes one grace period
//!   whole and comes back as a full magazine, instead of arriving as a
//!   flood of single frees that overflows the cache.
//!
//! Slabs are whole pages from `mmap(2)`, not from the global allocator:
//! [`SlabCache::shrink`] (and dropping the cache) must give memory back to
//! the system so that `VmRSS` really drops, which `munmap` guarantees and
//! `free(3)` does not (it may keep the pages in its arenas).
//!
//! # After `fork`
//!
//! This crate installs no fork handlers. In the child of a `fork(2)`, a
//! cache that another parent thread was using at the moment of the fork
//! may be left with a lock held by a thread that no longer exists: the
//! depot's or the slab layer's mutex (then `alloc`, `free` and `shrink`
//! that reach it block forever), the statistics' registry of per-thread
//! counters (then `stats`, and a thread's first allocation from the cache,
//! block forever), or a CPU's magazine (see
//! `vmtask_percpu`'s notes on `fork`: allocations on that CPU take the slow
//! path, and `shrink` and `flush_rcu` spin forever). Objects that other
//! threads held, and RCU magazines that the callback thread had taken but
//! not yet returned (`vmtask_rcu` restarts it in the child), are leaked.
//! Safe in the child: caches created after the fork, caches no other thread
//! was using at the fork, and `exec` (always).
//!
//! # Example: a type-stable lookup table
//!
//! A reader finds an object under `read_lock`, takes a reference with
//! [`SlabCache::try_get`] (increment-if-not-zero), then **re-checks the
//! key**: between finding the object and taking the reference it may have
//! been freed and reused for another key. On a mismatch it retries.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//! use vmtask_slab::{AtomicSlabArc, Config, SlabArc, SlabCache};
//!
//! struct Conn {
//!     key: AtomicU64,
//!     requests: AtomicU64, // constructed once: survives reuse
//! }
//!
//! let config = Config { typesafe_by_rcu: true, ..Config::new("conns") };
//! let cache = SlabCache::new(config, || Conn { key: AtomicU64::new(0), requests: AtomicU64::new(0) })?;
//! let table: Vec<AtomicSlabArc<'_, Conn>> =
//!     (0..64).map(|_| AtomicSlabArc::new(&cache)).collect::<Result<_, _>>()?;
//!
//! // Writer: initialise the object while it is unshared, then publish it.
//! let conn = cache.alloc()?;
//! conn.key.store(42, Relaxed);
//! table[42 % 64].store(Some(vmtask_slab::SlabBox::into_shared(conn)));
//!
//! // Reader: find, try_get, re-check the key, retry.
//! fn find<'c>(cache: &'c SlabCache<Conn>, table: &[AtomicSlabArc<'c, Conn>], key: u64) -> Option<SlabArc<'c, Conn>> {
//!     loop {
//!         let guard = vmtask_rcu::read_lock();
//!         let found = table[key as usize % table.len()].load(&guard)?;
//!         let Some(conn) = cache.try_get(found, &guard) else {
//!             continue; // freed since we found it: look again
//!         };
//!         if conn.key.load(Relaxed) == key {
//!             return Some(conn); // our reference keeps the key in place
//!         }
//!         // Reused for another key: drop it, and look again.
//!     }
//! }
//!
//! let conn = find(&cache, &table, 42).expect("published above");
//! conn.requests.fetch_add(1, Relaxed);
//! drop(conn);
//! table[42 % 64].store(None); // freed at once, reusable at once
//! assert!(find(&cache, &table, 42).is_none());
//! # drop(table);
//! # Ok::<(), vmtask_slab::SlabError>(())
//! ```

mod boxed;
mod cache;
mod config;
mod error;
mod magazine;
mod rcu_free;
mod refcount;
mod shared;
mod slab;
mod stats;
mod sync;

#[cfg(all(test, not(loom)))]
mod tests;

pub use boxed::SlabBox;
pub use cache::SlabCache;
pub use config::{Config, MAX_MAGAZINE_SIZE};
pub use error::SlabError;
pub use shared::{AtomicSlabArc, SlabArc, SlabPtr};
pub use stats::SlabStats;
