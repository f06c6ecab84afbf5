//! The current CPU, and per-CPU slots.
//!
//! Per-CPU data is how the kernel makes allocation fast: each CPU works on
//! its own cache line and nobody else's. User space cannot disable
//! preemption, so a thread may migrate between reading its CPU number and
//! using that CPU's slot. This crate gives the simple correct baseline:
//!
//! - [`cpu()`] reads the current CPU from the thread's rseq area (glibc
//!   registers rseq for every thread and exports `__rseq_offset`), which costs
//!   a load; without rseq it falls back to `sched_getcpu(3)`.
//!   [`allowed_cpus`], [`pin_current_thread`] and [`run_on_cpu`] place
//!   threads on CPUs the process may use, for tests and benchmarks that
//!   need per-CPU caches to behave deterministically.
//! - [`PerCpu<T>`] holds one cache-padded slot per possible CPU. A slot is
//!   guarded by an uncontended try-lock: [`PerCpu::try_current`] takes the
//!   current CPU's slot or reports [`Contended`] (another thread on, or just
//!   migrated from, that CPU holds it) so the caller can take its shared
//!   slow path instead of waiting.
//!
//! - [`CpuCache`] holds one bounded stack of pointers per CPU, the fast path
//!   of the slab and stack magazines. On x86_64 Linux its push and pop are
//!   restartable sequences (rseq): no atomic instruction, the kernel restarts
//!   a sequence that was preempted or migrated, and drains of another CPU
//!   stop that CPU with a `membarrier`. Elsewhere, or with
//!   `VMTASK_PERCPU_NO_RSEQ=1`, it uses the try-lock; [`CpuCache::mode`]
//!   says which.
//!
//! Migration makes the slot choice a hint, never a correctness problem: the
//! lock (or the rseq abort), not the CPU number, gives exclusive access.
//!
//! # After `fork`
//!
//! The child of a `fork(2)` has only the forking thread. A [`CpuCache`]
//! area that another thread held at the moment of the fork (a try-lock
//! mode push or pop, a [`CpuCache::drain`] in either mode) is taken over
//! in the child by its next push, pop or drain of that CPU: holders mark
//! the area with the fork generation, which a `pthread_atfork` child
//! handler bumps, and a holder's writes leave the area consistent at
//! every step (see `cache.rs`, "Fork"). The pointers such a holder had
//! taken are gone with it; in rseq mode, that CPU's pushes and pops fail
//! in the child until its first drain there. An rseq push or pop in flight
//! is harmless (it never commits). A drain waiting for an area when a
//! signal handler on its thread forks takes it over in the child. Not
//! covered: a fork from a signal handler that interrupted a push, pop or
//! drain holding an area on its own thread, and
//! forks that run no `pthread_atfork` handlers (`_Fork`, `vfork`, a raw
//! `clone`), after which the child finds such areas held as before.
//!
//! A [`PerCpu`] slot has no such recovery (its `T` may be half-updated):
//! one held at the fork stays held forever in the child, where
//! `try_current` and `try_lock` on that CPU always fail (callers take
//! their slow path) and [`PerCpu::lock`] spins forever. Safe in the child:
//! slots created after the fork, slots no other thread was using at the
//! fork (a single-threaded parent, or one that fences its threads around
//! `fork`), and `exec` (always).
//!
//! ```
//! use vmtask_percpu::PerCpu;
//!
//! let hits = PerCpu::new(|_cpu| 0u64);
//! for _ in 0..10 {
//!     match hits.try_current() {
//!         Ok(mut slot) => *slot += 1,
//!         Err(_contended) => { /* take a shared path */ }
//!     }
//! }
//! let total: u64 = (0..hits.len()).map(|cpu| *hits.lock(cpu)).sum();
//! assert!(total <= 10);
//!
//! use std::ptr::NonNull;
//! use vmtask_percpu::CpuCache;
//!
//! let cache = CpuCache::new(16);
//! let item = NonNull::<u64>::dangling().cast::<u8>();
//! if cache.push(item).is_ok() {
//!     // Usually the same CPU, so usually Some(item); a migration in
//!     // between may send the pop to another CPU's (empty) stack.
//!     let _maybe = cache.pop();
//! }
//! println!("CpuCache mode: {}", cache.mode());
//! ```

mod cache;
mod cpu;
mod diag;
mod env;
mod fork;
#[cfg(all(
    target_arch = "x86_64",
    target_pointer_width = "64",
    target_os = "linux"
))]
mod rseq;
mod slots;

pub use cache::{
    cache_mode, rseq_cache_supported, CacheAllocError, CacheMode, CpuCache, NO_RSEQ_ENV,
};
pub use cpu::{allowed_cpus, cpu, pin_current_thread, possible_cpus, rseq_available, run_on_cpu};
pub use diag::{warn, WARN_MAX};
pub use env::env_switch;
pub use fork::{register_fork_handlers, ForkHandler};
pub use slots::{Contended, PerCpu, SlotGuard};
