//! A thread's parked stack, and how a pool takes it from a live thread.
//!
//! Each thread keeps the last stack it freed to a pool in its own record
//! ([`crate::tally`]) for its next allocation: plain loads and stores, no
//! CPU number, no rseq, no atomic read-modify-write. An exhausted pool and
//! `trim` still need those stacks, so another thread may take one. That
//! is an asymmetric Dekker, as in liburcu: the owner's side stays plain,
//! the taker's side pays a `membarrier`.
//! - owner, to unpark: `busy = 1`; compiler barrier; if `steal` is set,
//!   take nothing; else load `top` and store null; `busy = 0` (release).
//!   Parking needs no protocol: it stores a stack only where it saw null,
//!   and a taker only ever stores null.
//! - taker (one at a time: the pool's tally lock): `steal = 1`;
//!   `membarrier(PRIVATE_EXPEDITED)`, a full barrier on every CPU running
//!   one of our threads; wait while `busy` (acquire); swap `top` with
//!   null; `steal = 0` (release).
//!
//! The barrier falls on the owner either before its `busy = 1`, and then
//! its `steal` load, after it, sees 1; or after, and then the taker's
//! `busy` load sees 1 and it waits until the owner is done. Either way no
//! stack is taken twice. Where membarrier is unavailable, nothing is taken
//! from a live thread. The loom model below runs this code with the
//! membarrier modelled as the full fence it forces.
//!
//! `fork`: a thread the fork did not copy may have been inside `unpark`,
//! and its `busy` stays set in the child forever. So `busy` holds the
//! fork generation it was set in (odd, never 0), which every fork child
//! bumps (a `pthread_atfork` handler), and a taker waits only for a mark
//! of the current generation. The forking thread itself was in `fork`,
//! not in `unpark`, so no mark of its survives.

#[cfg(all(loom, test))]
use loom::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, Ordering};
#[cfg(not(all(loom, test)))]
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicPtr, AtomicU32, Ordering};

use std::ptr;

/// Forks this process descends through (bumped in each child).
static FORK_GENERATION: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn after_fork_child() {
    FORK_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The child's one thread, which forked: its mark follows.
    refresh_busy_mark();
}

/// Installs this crate's fork handlers (once per process): when the
/// program starts (`INSTALL_AT_START`), and again, as a fallback, when a
/// pool is made.
pub(crate) fn install_fork_handlers() {
    static STATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // Keeps the start-up constructor in the program.
    std::hint::black_box(&INSTALL_AT_START);
    crate::sys::register_fork_child_handler(&STATE, after_fork_child);
    crate::sys::install_pidfd_fork_handler();
    crate::fork::install_handlers();
}

/// Installs the fork handlers before `main`, while the process has one
/// thread: since glibc 2.36 a fork that has begun runs no handler
/// registered after it began, so one registered on first use could miss a
/// fork racing that use (vmtask-rcu's `fork.rs` explains it at length).
// SAFETY: (of the attribute) `.init_array` holds pointers to functions
// that take the C start-up arguments; one that ignores them, as this one
// does, is called correctly under the C ABI.
#[used]
#[unsafe(link_section = ".init_array")]
static INSTALL_AT_START: extern "C" fn() = install_at_start;

extern "C" fn install_at_start() {
    install_fork_handlers();
}

/// Forks this process descends through: state tagged with it that a
/// child finds from an earlier generation was left by a thread the fork
/// did not copy.
#[inline(always)]
pub(crate) fn fork_generation() -> u32 {
    FORK_GENERATION.load(std::sync::atomic::Ordering::Relaxed)
}

/// The `busy` mark of this fork generation: odd, so never 0.
#[inline(always)]
fn busy_mark() -> u32 {
    fork_generation().wrapping_mul(2) | 1
}

thread_local! {
    /// This thread's copy of `busy_mark()`, for `unpark`: one `%fs` load
    /// where the global is a load through the GOT and two instructions
    /// more. 0 until `refresh_busy_mark`, which runs before the thread
    /// first selects a pool (`Tallies::select`: no `unpark` reaches a
    /// record before) and in the fork child (`after_fork_child`, the
    /// same handler that moves the generation on), so it is
    /// `busy_mark()` whenever `unpark` runs. (A fork from a signal handler
    /// that interrupted `refresh_busy_mark` could leave the child's copy
    /// stale: that is the unsupported fork of `fork.rs`'s header.)
    static BUSY_MARK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Sets this thread's `BUSY_MARK` to the current generation's.
pub(crate) fn refresh_busy_mark() {
    BUSY_MARK.set(busy_mark());
}

/// One thread's parked stack of one pool (the top of a free stack, or
/// null) and the flags of the protocol above.
pub(crate) struct Parked {
    top: AtomicPtr<u8>,
    /// 0, or the owner's `busy_mark` while it unparks.
    busy: AtomicU32,
    steal: AtomicBool,
}

impl Default for Parked {
    fn default() -> Self {
        Parked {
            top: AtomicPtr::new(ptr::null_mut()),
            busy: AtomicU32::new(0),
            steal: AtomicBool::new(false),
        }
    }
}

/// The owner's half of the barrier pair: a compiler barrier, which the
/// taker's membarrier turns into a full one when it matters.
#[inline(always)]
fn owner_barrier() {
    #[cfg(not(all(loom, test)))]
    compiler_fence(Ordering::SeqCst);
    // Loom cannot run membarrier; model it as the fence it forces.
    #[cfg(all(loom, test))]
    fence(Ordering::SeqCst);
}

impl Parked {
    /// Owner: parks `top` if the place is empty; false otherwise. The
    /// store is the owner's last access to the stack (release: a taker or
    /// the pool's drop may reuse or unmap it once they see it).
    #[inline]
    pub(crate) fn park(&self, top: *mut u8) -> bool {
        if !self.top.load(Ordering::Relaxed).is_null() {
            return false;
        }
        self.top.store(top, Ordering::Release);
        true
    }

    /// Owner: takes the parked stack (null if none, or if a taker is at
    /// work, which the caller treats as none).
    ///
    /// `busy` is clear whenever the owner is outside: set, the owner has
    /// re-entered itself from a signal handler that interrupted its
    /// `unpark` (`alloc` is not async-signal-safe), and both calls could
    /// take the same stack (review finding: two owners of one stack). One
    /// load turns that into an abort with a message.
    #[inline]
    pub(crate) fn unpark(&self) -> *mut u8 {
        let mark = BUSY_MARK.get();
        debug_assert_eq!(mark, busy_mark(), "unpark before refresh_busy_mark");
        if self.busy.load(Ordering::Relaxed) != 0 {
            reentered();
        }
        self.busy.store(mark, Ordering::Relaxed);
        owner_barrier();
        // Acquire: reading a taker's final `steal = 0` makes its swap of
        // `top` visible below (relaxed, this load could see `steal = 0`
        // and still the stack the taker took).
        let top = if self.steal.load(Ordering::Acquire) {
            ptr::null_mut()
        } else {
            self.top.load(Ordering::Relaxed)
        };
        if !top.is_null() {
            self.top.store(ptr::null_mut(), Ordering::Relaxed);
        }
        self.busy.store(0, Ordering::Release);
        top
    }

    /// Takes the parked stack with one atomic swap: for the owner itself,
    /// or for anyone once the owner has exited.
    pub(crate) fn take(&self) -> *mut u8 {
        self.top.swap(ptr::null_mut(), Ordering::Acquire)
    }

    /// Whether a stack is parked (a snapshot).
    pub(crate) fn is_parked(&self) -> bool {
        !self.top.load(Ordering::Acquire).is_null()
    }

    /// Taker, before the heavy barrier.
    pub(crate) fn mark(&self) {
        self.steal.store(true, Ordering::Relaxed);
    }

    /// Taker, after the heavy barrier (`barrier`: whether it ran): waits
    /// out an owner inside `unpark`, takes the stack, and lets the owner
    /// unpark again.
    pub(crate) fn take_marked(&self, barrier: bool) -> *mut u8 {
        let mut top = ptr::null_mut();
        if barrier {
            // A mark of an earlier generation is a thread the fork did not
            // copy: it will never clear it.
            let mark = busy_mark();
            while self.busy.load(Ordering::Acquire) == mark {
                // The owner is a few instructions from done, unless it was
                // preempted there.
                spin();
            }
            top = self.take();
        }
        self.steal.store(false, Ordering::Release);
        top
    }
}

/// An owner found its own `busy` set (see `Parked::unpark`).
#[cold]
#[inline(never)]
fn reentered() -> ! {
    vmtask_percpu::warn(format_args!(
        "vmtask_stack: StackPool::alloc re-entered on one thread, from a signal handler that \
         interrupted it: pools are not async-signal-safe; aborting"
    ));
    std::process::abort();
}

fn spin() {
    #[cfg(all(loom, test))]
    loom::thread::yield_now();
    #[cfg(not(all(loom, test)))]
    std::thread::yield_now();
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A taker in a fork child waits only for marks of the child's
    /// generation: the forking thread's cached mark must follow it there,
    /// or its `unpark` would go unseen.
    #[test]
    fn the_forking_threads_busy_mark_follows_it_into_the_child() {
        refresh_busy_mark();
        let parent = BUSY_MARK.get();
        assert_eq!(parent, busy_mark());
        crate::sys::tests::in_fork_child("the child's cached busy mark is stale", || {
            BUSY_MARK.get() == busy_mark() && busy_mark() != parent
        });
    }
}

#[cfg(all(loom, test))]
mod loom_models {
    //! The owner's unpark against a taker. Not modelled: a park racing a
    //! taker's swap, which needs nothing but the swap reading the latest
    //! value; loom 0.7 lets a concurrent store slip between the read and
    //! the write of a swap (tokio-rs/loom#254) and reports a stack lost.
    use super::*;
    use loom::sync::Arc;

    /// The one parked stack ends up with exactly one of the owner and the
    /// taker, or still parked. Fails without the owner's barrier, without
    /// the taker's wait for `busy`, and with a relaxed `steal` load.
    #[test]
    fn loom_a_parked_stack_is_taken_once() {
        loom::model(|| {
            let slot = Arc::new(Parked::default());
            assert!(slot.park(0x1000 as *mut u8));
            let owner = {
                let slot = slot.clone();
                loom::thread::spawn(move || {
                    refresh_busy_mark();
                    !slot.unpark().is_null()
                })
            };
            slot.mark();
            fence(Ordering::SeqCst); // the membarrier
            let taken = !slot.take_marked(true).is_null();
            let owned = owner.join().unwrap();
            let parked = !slot.take().is_null();
            assert_eq!(
                usize::from(owned) + usize::from(taken) + usize::from(parked),
                1,
                "owner {owned}, taker {taken}, parked {parked}"
            );
        });
    }
}
