//! The grace-period protocol: liburcu's "memb" flavor.
//!
//! Shared state:
//! - `GpWord::ctr`, written only by the updater holding the grace-period
//!   lock: a phase bit (`GP_PHASE`) and a constant count of one
//!   (`GP_COUNT`), so a reader can copy it into its slot as "nesting 1".
//! - `ReaderCtr::ctr`, one per registered thread, written only by that
//!   thread: zero when outside a read-side section, otherwise the copied
//!   phase plus the nesting depth in the low bits.
//! - `GpWord::futex`: -1 while an updater sleeps waiting for readers.
//!
//! Reader, outermost `lock`: `slot = gp.ctr` (relaxed), then a compiler
//! barrier. Nested lock/unlock only count in a thread-private word. The
//! unlock that ends the section: barrier, `slot = 0`, barrier, and wake the
//! updater if `futex == -1`. No read-modify-write and no hardware fence.
//!
//! Updater, one grace period (`grace_period`):
//! 1. heavy barrier (`membarrier(PRIVATE_EXPEDITED)`: every running thread
//!    of the process executes a full fence, so each reader's plain stores
//!    and loads are ordered as if the reader had fenced itself);
//! 2. wait until no reader is *old*: active with a phase different from
//!    `gp.ctr`'s;
//! 3. flip the phase;
//! 4. wait again until no reader is old;
//! 5. heavy barrier, so the caller's frees come after every old reader's
//!    last access.
//!
//! Why two waits: a reader may load `gp.ctr`, be preempted, and store the
//! value much later. With one flip, such a reader could carry a stale phase
//! that looks current to a later grace period, which would then skip it.
//! Waiting for both phases means a reader that was active when the grace
//! period began is waited for whichever phase it copied.
//!
//! Why the heavy barrier suffices: the reader's slot store and its data
//! loads are separated by a compiler barrier only, so the CPU could reorder
//! them, but `membarrier` forces a full fence on that CPU between the
//! updater's "unlink" store and its scan of the slots. Either the reader's
//! slot store is visible to the scan (and the updater waits), or the
//! reader's later data loads happen after the fence and see the unlink.
//! Without membarrier (`FenceMode::SeqCst`) readers issue the fence
//! themselves.

use crate::sync::{fence, spin, AtomicBool, AtomicI32, AtomicUsize, Ordering};

/// One reader nesting level.
pub(crate) const GP_COUNT: usize = 1;
/// The phase bit, above the nesting bits.
pub(crate) const GP_PHASE: usize = 1 << (usize::BITS / 2);
/// The nesting depth of a reader slot.
pub(crate) const NEST_MASK: usize = GP_PHASE - 1;

/// The global grace-period state.
pub(crate) struct GpWord {
    pub(crate) ctr: AtomicUsize,
    pub(crate) futex: AtomicI32,
}

impl GpWord {
    #[cfg(not(all(loom, test)))]
    pub(crate) const fn new() -> Self {
        GpWord {
            ctr: AtomicUsize::new(GP_COUNT),
            futex: AtomicI32::new(0),
        }
    }

    #[cfg(all(loom, test))]
    pub(crate) fn new() -> Self {
        GpWord {
            ctr: AtomicUsize::new(GP_COUNT),
            futex: AtomicI32::new(0),
        }
    }
}

/// A reader's state. `ctr` is published (the updater reads it); `nested`
/// and `orphaned` are the owning thread's alone.
pub(crate) struct ReaderCtr {
    pub(crate) ctr: AtomicUsize,
    /// Live guards beyond the one that began the section.
    nested: AtomicUsize,
    /// The guard that began the section was dropped while nested guards
    /// lived: the last of them ends the section.
    orphaned: AtomicBool,
    /// The owning thread's registration ended inside a section; the guard
    /// that ends it releases the slot (see `registry.rs`). Kept here, on
    /// the line the unlock already touches.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) detached: AtomicBool,
}

/// Which barrier readers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FenceMode {
    /// Readers use a compiler barrier; updaters use `membarrier`.
    Membarrier,
    /// Readers and updaters use SeqCst fences.
    SeqCst,
}

/// The reader side's `smp_mb_slave()`: what a thread that relies on the
/// updater's heavy barrier issues (readers, and owners in `handoff.rs`).
#[inline(always)]
pub(crate) fn reader_barrier(mode: FenceMode) {
    match mode {
        FenceMode::SeqCst => fence(Ordering::SeqCst),
        #[cfg(not(all(loom, test)))]
        FenceMode::Membarrier => crate::sync::compiler_fence(Ordering::SeqCst),
        // Loom cannot run membarrier; model it as the fence it forces.
        #[cfg(all(loom, test))]
        FenceMode::Membarrier => fence(Ordering::SeqCst),
    }
}

impl ReaderCtr {
    pub(crate) fn new() -> Self {
        ReaderCtr {
            ctr: AtomicUsize::new(0),
            nested: AtomicUsize::new(0),
            orphaned: AtomicBool::new(false),
            detached: AtomicBool::new(false),
        }
    }

    /// Whether the owning thread is inside a read-side section.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.ctr.load(Ordering::Relaxed) & NEST_MASK != 0
    }

    /// `rcu_read_lock`. Only the owning thread calls this. Returns whether
    /// this lock began the section (the guard must pass it to `unlock`).
    ///
    /// Nesting is counted apart from `ctr`, so that a section's unlock
    /// never reads back the `ctr` its lock just stored: back-to-back
    /// sections then carry one store-to-load dependency, not two.
    #[inline]
    pub(crate) fn lock(&self, gp: &GpWord, mode: FenceMode) -> bool {
        // Only this thread writes `ctr`, so a relaxed read sees our own value.
        if self.ctr.load(Ordering::Relaxed) & NEST_MASK == 0 {
            self.ctr
                .store(gp.ctr.load(Ordering::Relaxed), Ordering::Relaxed);
            // Orders the slot store before the section's data loads (with
            // the updater's membarrier; see the module header).
            reader_barrier(mode);
            true
        } else {
            let nested = self.nested.load(Ordering::Relaxed);
            assert!(
                nested < usize::MAX / 2,
                "vmtask_rcu::read_lock nested too deep"
            );
            self.nested.store(nested + 1, Ordering::Relaxed);
            false
        }
    }

    /// `rcu_read_unlock` of the guard `lock` returned `began` for. Returns
    /// `None` while the section goes on (other guards hold it), or
    /// `Some(wake)` when it ended, `wake` meaning an updater sleeps waiting
    /// for readers and the caller must wake it.
    #[inline]
    pub(crate) fn unlock(&self, gp: &GpWord, mode: FenceMode, began: bool) -> Option<bool> {
        let nested = self.nested.load(Ordering::Relaxed);
        if began {
            if nested != 0 {
                // Dropped before guards nested in it: they keep the section.
                self.orphaned.store(true, Ordering::Relaxed);
                return None;
            }
        } else {
            self.nested.store(nested - 1, Ordering::Relaxed);
            if nested != 1 || !self.orphaned.load(Ordering::Relaxed) {
                return None;
            }
            self.orphaned.store(false, Ordering::Relaxed);
        }
        Some(self.end_section(gp, mode))
    }

    #[inline]
    fn end_section(&self, gp: &GpWord, mode: FenceMode) -> bool {
        // The section's data loads complete before the slot says
        // "quiescent".
        reader_barrier(mode);
        self.ctr.store(0, Ordering::Relaxed);
        // The slot store is ordered before the futex load, pairing with the
        // updater's "futex = -1; heavy barrier; re-check slot".
        reader_barrier(mode);
        gp.futex.load(Ordering::Relaxed) == -1
    }

    /// The owning thread is gone (or forked away): its sections are over.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn reset(&self) {
        self.nested.store(0, Ordering::Relaxed);
        self.orphaned.store(false, Ordering::Relaxed);
        self.detached.store(false, Ordering::Relaxed);
        self.ctr.store(0, Ordering::Release);
    }

    /// Whether this reader is in a section that began before the last flip
    /// (its phase differs from `gp_ctr`'s).
    #[inline]
    fn is_old(&self, gp_ctr: usize) -> bool {
        let v = self.ctr.load(Ordering::Relaxed);
        v & NEST_MASK != 0 && (v ^ gp_ctr) & GP_PHASE != 0
    }
}

/// What the updater needs from its environment: the heavy barrier and a
/// way to sleep until a reader wakes it.
pub(crate) trait Updater {
    /// `smp_mb_master()`: a full fence on every thread that may read.
    fn heavy_barrier(&self);
    /// Sleep while `futex` is -1 (a reader or a timeout wakes us).
    fn sleep(&self, futex: &AtomicI32);
    /// How many scans of a reader before sleeping.
    fn spins(&self) -> usize;
    /// Called once a grace period has slept `stall_after` times on one
    /// reader.
    fn report_stall(&self);
    /// See `report_stall`.
    fn stall_after(&self) -> usize;
}

/// Waits until no reader in `readers` is in a section older than the
/// current phase.
fn wait_for_readers<'a, U: Updater>(
    gp: &GpWord,
    readers: impl Iterator<Item = &'a ReaderCtr>,
    updater: &U,
) {
    for reader in readers {
        let mut attempts = 0;
        let mut sleeps = 0;
        while reader.is_old(gp.ctr.load(Ordering::Relaxed)) {
            attempts += 1;
            if attempts < updater.spins() {
                spin();
                continue;
            }
            // Announce that we sleep, then re-check: a reader that unlocked
            // before seeing -1 is visible to the re-check thanks to the
            // heavy barrier; one that unlocks after will see -1 and wake us.
            gp.futex.store(-1, Ordering::Relaxed);
            updater.heavy_barrier();
            if !reader.is_old(gp.ctr.load(Ordering::Relaxed)) {
                gp.futex.store(0, Ordering::Relaxed);
                break;
            }
            updater.sleep(&gp.futex);
            gp.futex.store(0, Ordering::Relaxed);
            attempts = 0;
            sleeps += 1;
            if sleeps == updater.stall_after() {
                updater.report_stall();
            }
        }
    }
}

/// One full grace period over `readers` (a snapshot of the registry).
/// The caller holds the grace-period lock, so `gp.ctr` has one writer.
pub(crate) fn grace_period<'a, U: Updater, I>(gp: &GpWord, readers: I, updater: &U)
where
    I: Iterator<Item = &'a ReaderCtr> + Clone,
{
    updater.heavy_barrier();
    wait_for_readers(gp, readers.clone(), updater);
    // The first wait's slot loads complete before the flip is published.
    fence(Ordering::SeqCst);
    let ctr = gp.ctr.load(Ordering::Relaxed);
    gp.ctr.store(ctr ^ GP_PHASE, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    wait_for_readers(gp, readers, updater);
    updater.heavy_barrier();
}

#[cfg(all(loom, test))]
mod loom_model {
    //! Model: a reader reads a published pointer inside a section and checks
    //! the object has not been freed; the updater unpublishes it, runs a
    //! grace period and frees it. membarrier is modelled as a SeqCst fence.
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    struct Model;
    impl Updater for Model {
        fn heavy_barrier(&self) {
            fence(Ordering::SeqCst);
        }
        fn sleep(&self, _futex: &AtomicI32) {
            loom::thread::yield_now();
        }
        fn spins(&self) -> usize {
            usize::MAX
        }
        fn report_stall(&self) {}
        fn stall_after(&self) -> usize {
            usize::MAX
        }
    }

    struct Shared {
        gp: GpWord,
        reader: ReaderCtr,
        /// Which object is published: 0 or 1.
        published: AtomicUsize,
        freed: [AtomicBool; 2],
    }

    fn run(mode: FenceMode, reader_sections: usize) {
        loom::model(move || {
            let s = Arc::new(Shared {
                gp: GpWord::new(),
                reader: ReaderCtr::new(),
                published: AtomicUsize::new(0),
                freed: [AtomicBool::new(false), AtomicBool::new(false)],
            });
            let r = s.clone();
            let reader = loom::thread::spawn(move || {
                for _ in 0..reader_sections {
                    let began = r.reader.lock(&r.gp, mode);
                    let obj = r.published.load(Ordering::Acquire);
                    assert!(
                        !r.freed[obj].load(Ordering::Relaxed),
                        "reader saw a freed object"
                    );
                    let _ = r.reader.unlock(&r.gp, mode, began);
                }
            });
            s.published.store(1, Ordering::Release);
            grace_period(&s.gp, std::iter::once(&s.reader), &Model);
            s.freed[0].store(true, Ordering::Relaxed);
            reader.join().unwrap();
        });
    }

    #[test]
    fn loom_reader_never_sees_freed_object_membarrier() {
        run(FenceMode::Membarrier, 1);
    }

    #[test]
    fn loom_reader_never_sees_freed_object_two_sections() {
        run(FenceMode::SeqCst, 2);
    }
}
