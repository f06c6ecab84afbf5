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
//! reaches another never waits for a fork that waits for it. The prepare
//! handler does not wait for the forking thread's own sections, but a
//! `fork` from a signal handler that interrupted a slow path is not
//! supported (another thread's section may wait for a lock the
//! interrupted one holds; glibc's `malloc` has the same limit).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Sections in progress (every thread's) in the low bits, and in the high
/// bits the forks under way (prepare handler run, parent handler not yet):
/// the gate is closed while any is. A count, not a flag: two threads may
/// fork at once (glibc 2.36+ lets go of its atfork lock around each
/// handler), and the first fork's parent handler must not open the gate
/// while the second is still to copy the process.
static GATE: AtomicUsize = AtomicUsize::new(0);
const FORK_SHIFT: u32 = usize::BITS - 16;
const FORK: usize = 1 << FORK_SHIFT;
const CLOSED: usize = !(FORK - 1);

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

/// How long a prepare handler waits for the sections in progress. The
/// longest a section waits for other threads is the 1 s an exhausted
/// alloc may wait for stacks in transit; a section that takes longer is
/// itself waiting for something the fork holds: another library's prepare
/// handler that ran before ours and took a lock the section needs (an
/// allocator's, say: sections allocate). Better a child that may find a
/// pool lock held, as before the gate, than a parent deadlocked in `fork`.
/// The handlers are registered twice (`install_handlers_again`), so a
/// fork stuck that way waits twice this long.
const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Prepare handler: closes the gate, then waits for every other thread's
/// sections to end (at most `PREPARE_WAIT`).
extern "C" fn prepare() {
    let own = DEPTH.get();
    GATE.fetch_add(FORK, Ordering::Acquire);
    let mut since = None;
    while GATE.load(Ordering::Acquire) & !CLOSED > own {
        let since = *since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() > PREPARE_WAIT {
            gave_up();
            return;
        }
        std::thread::yield_now();
    }
}

/// Says once per process that a fork went ahead with sections in progress.
#[cold]
fn gave_up() {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        let text = b"vmtask_stack: fork waited 2 s for stack-pool slow paths in other threads \
            (blocked on a lock another fork handler holds?) and went ahead: the child may find \
            a pool lock held\n";
        // SAFETY: writes our own buffer to stderr; a failed write is
        // ignored.
        let _ = unsafe { libc::write(2, text.as_ptr().cast(), text.len()) };
    }
}

/// Parent handler: this fork is done; the gate opens once every fork is.
extern "C" fn parent() {
    GATE.fetch_sub(FORK, Ordering::Release);
}

/// Child handler: opens the gate; only the forking thread's own sections
/// (if it forked from inside one) remain.
extern "C" fn child() {
    GATE.store(DEPTH.get(), Ordering::Release);
}

/// Registers the handlers when the program starts (once per process; see
/// `vmtask_percpu::register_fork_handlers`), so that no fork can begin
/// before they are in place while a pool is in use.
pub(crate) fn install_handlers() {
    static STATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    vmtask_percpu::register_fork_handlers(&STATE, Some(prepare), Some(parent), Some(child));
}

/// Registers the handlers a second time, when the first pool is made.
/// Prepare handlers run in the reverse order of registration, so the
/// start-up registration's prepare runs after that of every library that
/// registered later: an allocator that registers at its first allocation,
/// as jemalloc does, takes its locks first, and sections that allocate
/// could then not finish. This registration's prepare runs before such
/// handlers and waits out the sections while they can still allocate; the
/// start-up one then finds nothing in progress. Both pairs balance: each
/// prepare counts a fork, each parent handler uncounts one, and the child
/// handler opens the gate outright. (So the first `StackPool::new` calls
/// `pthread_atfork`: made from inside another fork handler, on a glibc
/// before 2.36, which holds its atfork lock through a fork, it would wait
/// for itself.)
pub(crate) fn install_handlers_again() {
    static STATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    vmtask_percpu::register_fork_handlers(&STATE, Some(prepare), Some(parent), Some(child));
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
