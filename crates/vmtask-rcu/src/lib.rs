//! User-space RCU (read-copy-update), liburcu's "memb" flavor.
//!
//! Readers enter a read-side section with [`read_lock`]; inside it they may
//! follow pointers published with [`RcuCell`] (or any pointer whose target
//! is freed through this crate). Updaters unpublish an object, then wait
//! for a grace period — [`synchronize`] blocks, [`call`], [`defer_drop`]
//! and [`call_intrusive`] queue work for after it — and only then free it.
//!
//! Guarantees:
//! - **Cheap readers.** `read_lock` and dropping the guard are four loads
//!   and two stores, on the thread's own thread-local reader and the
//!   global grace-period word: no read-modify-write, no hardware fence
//!   (plain moves on x86-64; two are acquire and release on AArch64), and
//!   an empty guard. Updaters pay instead, with
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`; where the kernel lacks
//!   it (or [`force_fence_fallback`] / `VMTASK_RCU_FORCE_FENCE=1` asks),
//!   readers issue a SeqCst fence and [`stats()`] says so.
//! - **Grace periods.** [`synchronize`] returns after every read-side
//!   section that began before it has ended. Concurrent callers share grace
//!   periods. A grace period first flips the grace-period counter and
//!   watches the other registered threads for a few microseconds: if each
//!   is seen to begin a section that read the new value (threads that run
//!   short sections back to back, each on its own CPU), it needs no
//!   `membarrier` at all ([`Stats::fast_grace_periods`]). A reader that
//!   looks idle, is not running, or stays in one section longer than that
//!   sends it down the full protocol. (64-bit targets, membarrier mode.)
//! - **Callbacks** are taken by one background thread in batches, one grace
//!   period per batch; [`barrier`] waits for all queued before it.
//!   Callbacks never run inside `call` itself; a thread waiting in
//!   `barrier` may help run them. [`defer_drop`] batches per thread, and a
//!   full batch is usually dropped, once its grace period has passed, by
//!   the thread that deferred it, one object inside each later
//!   `defer_drop`, so memory goes back to that thread's allocator caches
//!   and each allocation can reuse the chunk just freed; see its
//!   documentation for the exceptions and the lock caveat. Below 32 full
//!   batches the callback thread runs their grace period lazily; at 32,
//!   that thread runs it itself if it can finish one without waiting for
//!   a reader, instead of waking the callback thread, whose grace period
//!   would interrupt it (`membarrier`).
//! - **Bounded memory.** Callbacks on the shared queues: past a soft
//!   backlog a grace period starts at once; past a hard limit, queuing
//!   waits for the backlog to drain ([`set_backlog_limits`]). Deferred
//!   drops: each thread keeps at most 64 full batches (8,064 objects)
//!   waiting and then waits for a grace period itself; inside a read-side
//!   section or a callback, where it cannot wait, it hands the batches
//!   past that bound to the callback thread instead (which frees them as
//!   fast as it can, but cannot hold back a thread inside a section).
//! - **Misuse is loud.** `synchronize`, `barrier` and [`RcuCell::swap`]
//!   inside a read-side section would deadlock; they panic instead.
//!
//! Signal handlers: only [`read_lock`] and dropping its guard are
//! async-signal-safe, on a thread that has taken a read lock before (see
//! [`read_lock`]), and a handler must drop every guard it takes before it
//! returns (as liburcu requires). The rest takes locks or allocates, or owns the thread's
//! batches while it runs: `synchronize`, `barrier`, `call`,
//! `call_intrusive`, `defer_drop`, `defer_raw`, the writes of [`RcuCell`]
//! and [`stats`] must not run in a handler that may interrupt the same
//! thread inside one of them. Where a re-entry would corrupt the batches
//! (`defer_drop` and the cell writes interrupted inside their push), it
//! aborts with a message; elsewhere it may deadlock.
//!
//! Threads register as readers on first use and unregister when they exit.
//! After `fork`, the child starts clean: callbacks queued before the fork
//! still run in the child, and so do the deferred drops other threads had
//! in their batches, which go on the child's callback queues. They run on
//! the child's callback thread, which starts at the child's first `call`,
//! `defer_drop` or `barrier` (a child that only reads and synchronizes
//! leaves them queued).
//!
//! Each thread's reader lives in its own thread-local storage, so the read
//! side addresses it directly. A section that outlives the thread's
//! registration (a guard dropped by a later thread-local destructor) is
//! handed to a leaked slot, and a section opened after it (from such a
//! destructor) takes a temporary one: both still hold grace periods, and
//! [`in_read_section`] and the misuse panics see them.
//!
//! A kernel that offers `membarrier` and accepts its registration, but
//! then refuses a barrier (a seccomp filter that lets the query and the
//! registration through), aborts the process with a message: readers skip
//! their fences because of that barrier, and going on without it could
//! free memory under a reader.
//!
//! Known limits: callbacks and drops in flight in another thread at the
//! moment of a `fork` (being queued, run, or added to its batch) are lost
//! in the child (never run; the parent is unaffected), and so are those
//! the forking thread queued behind a push another thread had not
//! finished (a `barrier` that forks from a callback it helps run has
//! queued its markers that way too, and may then not return in the
//! child); a fork from a callback leaves the child's callback thread
//! to the forking thread, which serves again once that callback
//! returns; the read-side
//! sections of the threads a fork leaves behind end in the child, so a
//! reference such a section handed to the forking thread is no longer
//! protected there (as in liburcu); a thread whose *first* use of RCU comes from the last
//! round of its pthread-key destructors (after a key destructor has
//! re-armed its key three times) exits still registered, and a later grace
//! period may then read its freed thread-local memory (the registration
//! backstop, a pthread key, has no round left to run in; liburcu's signal
//! flavor has the same limit). Work still pending when the process exits
//! (queued callbacks, deferred drops in any thread's batches) is not run:
//! call [`barrier`] before returning from `main` where a callback or drop
//! must run (a file flushed, say). Past the hard backlog limit, `call`
//! waits for grace periods as [`synchronize`] does: do not call it while
//! holding a lock that a reader takes inside its read-side section.
//!
//! ```
//! use std::sync::Arc;
//! use vmtask_rcu::{read_lock, RcuCell};
//!
//! let current = Arc::new(RcuCell::new(Some(Box::new(1u64))));
//! let reader = {
//!     let current = current.clone();
//!     std::thread::spawn(move || {
//!         let guard = read_lock();
//!         // Valid until `guard` is dropped, whatever writers do meanwhile.
//!         current.load(&guard).copied()
//!     })
//! };
//! current.store(Some(Box::new(2))); // the old value is freed after a grace period
//! assert!(matches!(reader.join().unwrap(), Some(1) | Some(2)));
//! vmtask_rcu::barrier(); // every deferred drop so far has run
//! ```

mod gp;
mod handoff;
mod sync;

#[cfg(not(all(loom, test)))]
mod bag;
#[cfg(not(all(loom, test)))]
mod callback;
#[cfg(not(all(loom, test)))]
mod cell;
#[cfg(not(all(loom, test)))]
mod fence;
#[cfg(not(all(loom, test)))]
mod fork;
#[cfg(not(all(loom, test)))]
mod grace;
#[cfg(not(all(loom, test)))]
mod reader;
#[cfg(not(all(loom, test)))]
mod registry;
#[cfg(not(all(loom, test)))]
mod stats;

#[cfg(not(all(loom, test)))]
pub use callback::{
    backlog_limits, barrier, barrier_allowed, call, call_intrusive, defer_drop, defer_raw,
    set_backlog_limits, RcuHead, DEFAULT_HARD_LIMIT, DEFAULT_SOFT_LIMIT,
};
#[cfg(not(all(loom, test)))]
pub use cell::{RcuCell, Retired};
#[cfg(not(all(loom, test)))]
pub use fence::{force_fence_fallback, AlreadyInitialized, FORCE_FENCE_ENV};
#[cfg(not(all(loom, test)))]
pub use grace::synchronize;
#[cfg(not(all(loom, test)))]
pub use reader::{in_read_section, read_lock, ReadGuard};
#[cfg(not(all(loom, test)))]
pub use stats::{stats, BarrierMode, Stats};
