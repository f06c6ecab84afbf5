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
//! - [`PerCpu<T>`] holds one cache-padded slot per possible CPU. A slot is
//!   guarded by an uncontended try-lock: [`PerCpu::try_current`] takes the
//!   current CPU's slot or reports [`Contended`] (another thread on, or just
//!   migrated from, that CPU holds it) so the caller can take its shared
//!   slow path instead of waiting.
//!
//! Migration makes the slot choice a hint, never a correctness problem: the
//! lock, not the CPU number, gives exclusive access.
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
//! ```

mod cache;
mod cpu;
mod slots;

pub use cache::CpuCache;
pub use cpu::{cpu, pin_current_thread, possible_cpus, rseq_available};
pub use slots::{Contended, PerCpu, SlotGuard};
