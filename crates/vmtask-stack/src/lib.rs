//! Virtually mapped stacks: guard-paged, demand-paged, recycled through
//! per-CPU caches and freed synchronously.
//!
//! A [`StackPool`] reserves address space in a few large arenas of
//! `[guard][stack]` slots (`mmap` with `MAP_NORESERVE`), so a stack costs no
//! memory until it is touched and the arenas add mappings with the logarithm
//! of the stack count, not per stack. Guards are guard markers
//! (`MADV_GUARD_INSTALL`, Linux 6.13+) that live in the page tables and
//! keep an arena one mapping; older kernels get `mprotect(PROT_NONE)`.
//!
//! Guarantees:
//! - Every stack has a guard below it; running into it aborts the process
//!   with `stack overflow: stack <base>..<limit> of <size> bytes`, never a
//!   silent segfault or corruption of a neighbouring stack. This needs the
//!   overflowing code to touch the guard, not jump past it: Rust probes
//!   every page of a large frame, but C frames bigger than the guard
//!   (large arrays or `alloca` without `-fstack-clash-protection`) can
//!   land in the stack below; give such code a larger `guard_size`. It
//!   also needs the SIGSEGV handler the first pool installs: a SIGSEGV
//!   handler installed later must chain to it, with `SA_ONSTACK`.
//! - Reuse is fast: a freed [`Stack`] is parked on the freeing thread for
//!   its next allocation (one per thread) or goes straight into the current
//!   CPU's magazine (as the kernel frees a dead task's stack in
//!   `finish_task_switch`, with no RCU grace period), and the next
//!   allocation takes it back without a system call, and (parked, or in
//!   rseq mode: see `vmtask_percpu::CacheMode`) without an atomic
//!   read-modify-write.
//! - Memory comes back: stacks leaving the per-CPU magazines for the shared
//!   depot keep only their top `keep_resident` bytes, a full depot gives
//!   stacks' memory back entirely, and [`StackPool::trim`] does it on demand.
//! - Allocation fails with a [`StackError`], never a crash, when the pool
//!   or the kernel runs out. Under an address-space limit (`RLIMIT_AS`)
//!   the pool leaves the last 64 MiB to the rest of the program, so that
//!   its heap can still grow; with `mprotect` guards it leaves the last
//!   1,024 of `vm.max_map_count`'s mappings (an eighth of a smaller
//!   limit), so that the program can still start threads and map memory.
//!   The pool's lists of free stacks grow when it carves, never in a free
//!   (a free allocates only a magazine's worth of scratch space).
//! - [`ensure()`] turns "growth that cannot fail" into an explicit, fallible
//!   reservation, where the kernel fails a charge instead of calling the OOM
//!   killer (see [`ensure()`]); where it calls the OOM killer, that happens
//!   during `ensure`, not at a later call.
//! - Pools are not async-signal-safe, as `malloc` is not: `alloc`, the free
//!   of a [`Stack`], `trim` and `stats` must not run in a signal handler
//!   that may interrupt the same thread inside one of them (they share the
//!   thread's parked stack and the CPU's magazine with plain loads and
//!   stores, and their slow paths take locks). An `alloc` re-entered
//!   inside the interrupted one's take of the parked stack aborts with a
//!   message, rather than hand one stack to two owners; other re-entries
//!   can deadlock or lose a stack. Only the overflow report runs in a
//!   handler, and it is async-signal-safe.
//! - A `fork` child may go on using a pool that other threads were using at
//!   the fork: the fork waits for their slow paths (which take the pool's
//!   locks) to finish, and a magazine that a fast-path push or pop held
//!   at the fork is taken over in the child. The stacks those threads
//!   held stay taken in the child.
//!
//! With the default `corosensei` feature a [`Stack`] is a
//! `corosensei::stack::Stack`:
//!
//! ```
//! use corosensei::{Coroutine, CoroutineResult};
//! use vmtask_stack::{Config, StackPool};
//!
//! let pool = StackPool::new(Config { cache_size: 2, ..Config::default() })?;
//! let stack = pool.alloc()?;
//! assert_eq!(stack.size(), 128 * 1024);
//!
//! let mut coroutine = Coroutine::with_stack(stack, |yielder, n: u32| {
//!     let room = vmtask_stack::remaining().expect("running on a pool stack");
//!     assert!(room < 128 * 1024);
//!     vmtask_stack::ensure(32 * 1024)?;
//!     yielder.suspend(n + 1);
//!     Ok::<_, vmtask_stack::StackError>(())
//! });
//! assert!(matches!(coroutine.resume(1), CoroutineResult::Yield(2)));
//! assert!(matches!(coroutine.resume(0), CoroutineResult::Return(Ok(()))));
//! drop(coroutine); // the stack is parked for this thread's next allocation
//!
//! let stats = pool.stats();
//! assert_eq!((stats.live, stats.slots_carved), (0, 1));
//! println!("{stats}");
//! # Ok::<(), vmtask_stack::StackError>(())
//! ```

mod arena;
mod config;
mod ensure;
mod error;
mod fork;
mod overflow;
mod park;
mod pool;
mod stack;
mod sys;
mod tally;
mod transit;

pub use config::{Config, GuardMode};
pub use ensure::{ensure, remaining};
pub use error::StackError;
pub use overflow::{prepare_thread, set_overflow_label_hook, LabelHook};
pub use pool::{PoolStats, StackPool};
pub use stack::Stack;
