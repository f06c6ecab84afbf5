//! `fork` and the pools' locks: the slow paths run inside a *section* of
//! one process-wide gate, and a `fork` closes the gate and waits for the
//! sections in progress to end before the kernel copies the process.
//!
//! The slow paths take the pools' locks (the depot's, the arenas', the
//! tally registry's, held across `mmap`, `madvise` and `membarrier`),
//! drain per-CPU magazines (which stops a CPU's magazine until the drain
//! ends) and open in-transit sections. A fork copies only the forking
//! thread: whatever another thread held at that moment would stay held in
//! the child for ever, and the child's next trim, or alloc or free past
//! its magazine, would hang. So, as glibc does for `malloc`, the
//! `pthread_atfork` prepare handler waits until no thread is inside a
//! slow path, and keeps new ones out until the fork is done (the parent
//! and child handlers open the gate again; the child, which has only the
//! forking thread, starts with no section).
//!
//! A section costs two atomic read-modify-writes on one shared word, paid
//! once per slow path (a magazine's worth of allocations or frees, a trim,
//! `stats`); the fast paths (the parked stack, the magazine push and pop)
//! take no section: a push or pop in flight in another thread at the fork
//! is harmless in rseq mode (it never commits), and in the try-lock
//! fallback the child takes that CPU's magazine over (see
//! `vmtask_percpu`'s "After `fork`").
//!
//! Sections nest on a thread (a thread-local depth), so a slow path that
//! reaches another never waits for a fork that waits for it; and the
//! prepare handler does not wait for the sections of the forking thread
//! itself (a `fork` from a signal handler that interrupted one).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Sections in progress (every thread's), and `CLOSED` while a fork waits
/// or runs.
static GATE: AtomicUsize = AtomicUsize::new(0);
const CLOSED: usize = 1 << (usize::BITS - 1);

thread_local! {
    /// Sections this thread holds (constant-initialised, no destructor:
    /// usable in thread-local destructors, where stacks are freed too).
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// A slow path's section: the process cannot fork while one is held.
pub(crate) struct Section(());

/// Enters a section, waiting while a fork is under way (unless this
/// thread already holds one).
#[inline]
pub(crate) fn section() -> Section {
    let depth = DEPTH.get();
    if depth > 0 {
        GATE.fetch_add(1, Ordering::Relaxed);
    } else {
        let mut seen = GATE.load(Ordering::Relaxed);
        loop {
            if seen & CLOSED != 0 {
                std::thread::yield_now();
                seen = GATE.load(Ordering::Relaxed);
                continue;
            }
            match GATE.compare_exchange_weak(seen, seen + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => seen = now,
            }
        }
    }
    DEPTH.set(depth + 1);
    Section(())
}

impl Drop for Section {
    #[inline]
    fn drop(&mut self) {
        DEPTH.set(DEPTH.get() - 1);
        // Release: the section's writes (the locks it released) happen
        // before a prepare handler that sees the count drop.
        GATE.fetch_sub(1, Ordering::Release);
    }
}

/// Prepare handler: closes the gate, then waits for every other thread's
/// sections to end.
extern "C" fn prepare() {
    let own = DEPTH.get();
    GATE.fetch_or(CLOSED, Ordering::Acquire);
    while GATE.load(Ordering::Acquire) & !CLOSED > own {
        std::thread::yield_now();
    }
}

/// Parent handler: opens the gate.
extern "C" fn parent() {
    GATE.fetch_and(!CLOSED, Ordering::Release);
}

/// Child handler: opens the gate; only the forking thread's own sections
/// (if it forked from inside one) remain.
extern "C" fn child() {
    GATE.store(DEPTH.get(), Ordering::Release);
}

/// Registers the handlers (once per process; see
/// [`crate::sys::register_fork_handlers`]). Running them twice is
/// harmless: a second prepare finds the gate closed and nothing in
/// progress, and the others only open it.
pub(crate) fn install_handlers() {
    static STATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    crate::sys::register_fork_handlers(&STATE, Some(prepare), Some(parent), Some(child));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether any section is held, this thread's included.
    fn held() -> usize {
        GATE.load(Ordering::Relaxed) & !CLOSED
    }

    #[test]
    fn sections_nest_and_count() {
        let before = DEPTH.get();
        let a = section();
        let b = section();
        assert_eq!(DEPTH.get(), before + 2);
        assert!(held() >= 2);
        drop(b);
        drop(a);
        assert_eq!(DEPTH.get(), before);
    }
}
