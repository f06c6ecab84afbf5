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
//! The fast path is five loads (the thread's slot pointer, `slot`,
//! `gp.ctr`, the private word, `futex`), two stores and predicted
//! branches: the fence mode travels as a bit of `gp.ctr` (for `lock`) and
//! of the private word (for `unlock`), and everything unusual (nesting,
//! orphaned or detached sections, SeqCst mode) makes the private word
//! non-zero and takes an out-of-line path.
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

use crate::sync::{fence, spin, AtomicI32, AtomicUsize, Ordering};

/// One reader nesting level.
pub(crate) const GP_COUNT: usize = 1;
/// The phase bit, above the nesting bits.
pub(crate) const GP_PHASE: usize = 1 << (usize::BITS / 2);
/// The nesting depth of a reader slot.
pub(crate) const NEST_MASK: usize = GP_PHASE - 1;
/// Set in `GpWord::ctr` (never cleared) when readers must issue their own
/// SeqCst fence ([`FenceMode::SeqCst`]): the outermost lock learns the
/// mode from the word it loads anyway, instead of from a second global.
pub(crate) const GP_SEQCST: usize = 1 << (usize::BITS - 2);

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

    /// Records the process's fence mode for readers (once, when it is
    /// chosen: before any reader can lock, see `fence.rs`). An RMW, so a
    /// concurrent phase flip (also an RMW) cannot lose it.
    pub(crate) fn set_mode(&self, mode: FenceMode) {
        if mode == FenceMode::SeqCst {
            self.ctr.fetch_or(GP_SEQCST, Ordering::SeqCst);
        }
    }
}

/// `ReaderCtr::state`: guards nested in the open section (low bits).
const NESTED_MASK: usize = usize::MAX >> 3;
/// `ReaderCtr::state`: the guard that began the section was dropped while
/// nested guards lived; the last of them ends the section.
const ORPHANED: usize = 1 << (usize::BITS - 1);
/// `ReaderCtr::state`: the slot goes back to the registry when the
/// section ends: its thread's registration ended inside the section, or it
/// is a temporary slot (see `registry.rs`).
const DETACHED: usize = 1 << (usize::BITS - 2);
/// `ReaderCtr::state`: this reader issues SeqCst fences
/// ([`FenceMode::SeqCst`]); set when the slot is taken.
const SEQCST: usize = 1 << (usize::BITS - 3);

/// A reader's state. `ctr` is published (the updater reads it); `state`
/// is the owning thread's alone.
pub(crate) struct ReaderCtr {
    pub(crate) ctr: AtomicUsize,
    /// Nested guards and the `ORPHANED`, `DETACHED` and `SEQCST` flags, in
    /// one word that is zero in the common case, so the unlock of an
    /// outermost guard checks all of them with one load and one branch.
    state: AtomicUsize,
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

/// The reader's own fence in SeqCst mode, out of the fast path's way.
#[cold]
#[inline(never)]
fn seqcst_reader_fence() {
    fence(Ordering::SeqCst);
}

/// An unlock that ended the section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ended {
    /// An updater sleeps waiting for readers: the caller must wake it.
    pub(crate) wake: bool,
    /// The slot is detached (see `DETACHED`): the caller must release it.
    pub(crate) release: bool,
}

impl ReaderCtr {
    pub(crate) fn new() -> Self {
        ReaderCtr {
            ctr: AtomicUsize::new(0),
            state: AtomicUsize::new(0),
        }
    }

    /// Readies a slot for a thread: its fence mode, and whether it is a
    /// temporary slot that goes back when its one section ends.
    pub(crate) fn prepare(&self, mode: FenceMode, temporary: bool) {
        let mut state = 0;
        if mode == FenceMode::SeqCst {
            state |= SEQCST;
        }
        if temporary {
            state |= DETACHED;
        }
        self.state.store(state, Ordering::Relaxed);
    }

    /// Whether the owning thread is inside a read-side section.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    #[inline]
    pub(crate) fn active(&self) -> bool {
        self.ctr.load(Ordering::Relaxed) & NEST_MASK != 0
    }

    /// `rcu_read_lock`. Only the owning thread calls this. Returns whether
    /// this lock began the section (the guard passes it to `unlock`).
    /// `ReadGuard` inlines the same steps (`active`, `begin`,
    /// `lock_nested`); the models and unit tests use this.
    #[cfg(test)]
    pub(crate) fn lock(&self, gp: &GpWord) -> bool {
        if self.active() {
            self.lock_nested();
            false
        } else {
            self.begin(gp);
            true
        }
    }

    /// The outermost `rcu_read_lock`, when `active()` is false: one load
    /// of `gp.ctr` and one store. The `active()` load before it only
    /// steers a predicted branch, so back-to-back sections carry no
    /// store-to-load dependency from one to the next.
    #[inline(always)]
    pub(crate) fn begin(&self, gp: &GpWord) {
        let gp_ctr = gp.ctr.load(Ordering::Relaxed);
        self.ctr.store(gp_ctr, Ordering::Relaxed);
        // Orders the slot store before the section's data loads (with the
        // updater's membarrier; see the module header). The mode comes
        // with the word just loaded.
        if gp_ctr & GP_SEQCST != 0 {
            seqcst_reader_fence();
        }
        reader_barrier(FenceMode::Membarrier);
    }

    /// A lock inside an open section: counts the nesting.
    #[cold]
    #[inline(never)]
    pub(crate) fn lock_nested(&self) {
        let state = self.state.load(Ordering::Relaxed);
        assert!(
            state & NESTED_MASK < NESTED_MASK,
            "vmtask_rcu::read_lock nested too deep"
        );
        self.state.store(state + 1, Ordering::Relaxed);
    }

    /// `rcu_read_unlock` of the guard whose `lock` returned `began`.
    /// Returns `None` while the section goes on (other guards hold it), or
    /// what the caller must do now that it ended. `ReadGuard` inlines the
    /// same steps (`state`, `end`, `unlock_slow`).
    #[cfg(test)]
    pub(crate) fn unlock(&self, gp: &GpWord, began: bool) -> Option<Ended> {
        let state = self.state();
        if !began || state != 0 {
            return self.unlock_slow(gp, began, state);
        }
        Some(Ended {
            wake: self.end(gp),
            release: false,
        })
    }

    /// The owner's private state word; zero means the unlock of the guard
    /// that began the section may `end` it directly.
    #[inline(always)]
    pub(crate) fn state(&self) -> usize {
        self.state.load(Ordering::Relaxed)
    }

    /// Ends the section of the guard that began it, when `state()` is
    /// zero. Returns whether an updater sleeps and must be woken.
    #[inline(always)]
    pub(crate) fn end(&self, gp: &GpWord) -> bool {
        self.end_section(gp, FenceMode::Membarrier)
    }

    /// Unlock of a nested guard, of an orphaned or detached section, or in
    /// SeqCst mode.
    #[cold]
    #[inline(never)]
    pub(crate) fn unlock_slow(&self, gp: &GpWord, began: bool, state: usize) -> Option<Ended> {
        let state = if began {
            if state & NESTED_MASK != 0 {
                // Dropped before guards nested in it: they keep the section.
                self.state.store(state | ORPHANED, Ordering::Relaxed);
                return None;
            }
            state
        } else {
            let state = state - 1;
            if state & NESTED_MASK != 0 || state & ORPHANED == 0 {
                self.state.store(state, Ordering::Relaxed);
                return None;
            }
            let state = state & !ORPHANED;
            self.state.store(state, Ordering::Relaxed);
            state
        };
        let mode = if state & SEQCST != 0 {
            FenceMode::SeqCst
        } else {
            FenceMode::Membarrier
        };
        Some(Ended {
            wake: self.end_section(gp, mode),
            release: state & DETACHED != 0,
        })
    }

    #[inline(always)]
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

    /// The owning thread's registration ends while this section is open:
    /// the guard that ends the section releases the slot.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn detach(&self) {
        let state = self.state.load(Ordering::Relaxed);
        self.state.store(state | DETACHED, Ordering::Relaxed);
    }

    /// The owning thread is gone (or forked away): its sections are over.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn reset(&self) {
        self.state.store(0, Ordering::Relaxed);
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
    // An RMW, so that a concurrent `set_mode` is not lost.
    gp.ctr.fetch_xor(GP_PHASE, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    wait_for_readers(gp, readers, updater);
    updater.heavy_barrier();
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const ENDED: Option<Ended> = Some(Ended {
        wake: false,
        release: false,
    });

    #[test]
    fn the_fence_mode_bit_survives_phase_flips_and_does_not_disturb_phases() {
        let gp = GpWord::new();
        gp.set_mode(FenceMode::SeqCst);
        gp.ctr.fetch_xor(GP_PHASE, Ordering::Relaxed);
        assert_ne!(gp.ctr.load(Ordering::Relaxed) & GP_SEQCST, 0);
        let r = ReaderCtr::new();
        r.prepare(FenceMode::SeqCst, false);
        assert!(r.lock(&gp));
        assert!(r.active());
        assert!(!r.is_old(gp.ctr.load(Ordering::Relaxed)));
        assert!(r.is_old(gp.ctr.load(Ordering::Relaxed) ^ GP_PHASE));
        // SeqCst mode takes the out-of-line unlock and ends the section.
        assert_eq!(r.unlock(&gp, true), ENDED);
        assert!(!r.active());
    }

    #[test]
    fn nested_orphaned_and_detached_sections_end_exactly_once() {
        for mode in [FenceMode::Membarrier, FenceMode::SeqCst] {
            let gp = GpWord::new();
            gp.set_mode(mode);
            let r = ReaderCtr::new();
            r.prepare(mode, false);
            // Out of order: the first guard goes before the nested one.
            assert!(r.lock(&gp));
            assert!(!r.lock(&gp));
            assert_eq!(r.unlock(&gp, true), None);
            assert!(r.active());
            assert_eq!(r.unlock(&gp, false), ENDED);
            assert!(!r.active());

            // In order, two levels deep.
            assert!(r.lock(&gp));
            assert!(!r.lock(&gp));
            assert!(!r.lock(&gp));
            assert_eq!(r.unlock(&gp, false), None);
            assert_eq!(r.unlock(&gp, false), None);
            assert!(r.active());
            assert_eq!(r.unlock(&gp, true), ENDED);

            // Detached inside a section: the ending unlock says to release.
            assert!(r.lock(&gp));
            r.detach();
            assert!(!r.lock(&gp));
            assert_eq!(r.unlock(&gp, true), None);
            let ended = r.unlock(&gp, false).expect("the last guard ends it");
            assert!(ended.release);
            r.reset();

            // A temporary slot is released by the guard that ends its
            // section.
            r.prepare(mode, true);
            assert!(r.lock(&gp));
            assert_eq!(r.unlock(&gp, true).map(|e| e.release), Some(true));
            r.prepare(mode, false);

            // A sleeping updater is reported for waking.
            assert!(r.lock(&gp));
            gp.futex.store(-1, Ordering::Relaxed);
            assert_eq!(r.unlock(&gp, true).map(|e| e.wake), Some(true));
        }
    }
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
                gp: {
                    let gp = GpWord::new();
                    gp.set_mode(mode);
                    gp
                },
                reader: {
                    let reader = ReaderCtr::new();
                    reader.prepare(mode, false);
                    reader
                },
                published: AtomicUsize::new(0),
                freed: [AtomicBool::new(false), AtomicBool::new(false)],
            });
            let r = s.clone();
            let reader = loom::thread::spawn(move || {
                for _ in 0..reader_sections {
                    let began = r.reader.lock(&r.gp);
                    let obj = r.published.load(Ordering::Acquire);
                    assert!(
                        !r.freed[obj].load(Ordering::Relaxed),
                        "reader saw a freed object"
                    );
                    let _ = r.reader.unlock(&r.gp, began);
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
