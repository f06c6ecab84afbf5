//! The grace-period protocol: liburcu's "memb" flavor.
//!
//! Shared state:
//! - `GpWord::ctr`, written only by the updater holding the grace-period
//!   lock: a flip counter whose parity is the phase (`GP_PHASE` is its
//!   low bit) and a constant count of one (`GP_COUNT`), so a reader can
//!   copy it into its slot as "nesting 1".
//! - `ReaderCtr::ctr`, one per registered thread, written only by that
//!   thread: zero when outside a read-side section, otherwise a copy of
//!   the whole `gp.ctr` its outermost lock loaded (flip counter, mode bit,
//!   a nesting field of one; all ones for an offline reader). The depth
//!   of nested guards lives in the owner's private `state` word.
//! - `GpWord::futex`: -1 while an updater sleeps waiting for readers.
//!
//! Reader, outermost `lock`: `slot = gp.ctr` (an acquire load and a
//! release store), then a compiler barrier. Nested lock/unlock only count in a thread-private
//! word. The unlock that ends the section: `slot = 0` (a release store),
//! barrier, and wake the updater if `futex == -1`. No read-modify-write and
//! no hardware fence: on x86-64 a release store is a plain `mov`.
//!
//! A registered thread's `ReaderCtr` lives in its thread-local storage
//! (`registry::LOCAL`), so the fast path addresses it directly: four loads
//! (`slot`, `gp.ctr`, the private word, `futex`), two stores and predicted
//! branches. The fence mode travels as a bit of `gp.ctr` (for `lock`) and
//! of the private word (for `unlock`); everything unusual (nesting, a
//! thread that is not registered, SeqCst mode) makes `slot` look nested or
//! the private word non-zero and takes an out-of-line path.
//!
//! Updaters read other threads' `ctr` only while holding the registry
//! lock, which a thread takes to unregister: a thread-local `ctr` is never
//! read after its thread has gone (see `registry.rs`).
//!
//! Updater, one grace period (`grace_period`). First, on 64-bit targets
//! in membarrier mode, the fast path (`fast_grace_period`): flip, and if
//! every reader's slot is then seen to hold exactly the new `gp.ctr`
//! within a few microseconds, that is the whole grace period, with no
//! heavy barrier (readers that run short sections back to back). A reader
//! whose slot stays unchanged outside a section for a few scans
//! (`FastScans::idle`) ends the attempt. Otherwise liburcu's protocol, in
//! whose waits a slot holding exactly the attempt's value counts as done:
//! 1. heavy barrier (`membarrier(PRIVATE_EXPEDITED)`: every running thread
//!    of the process executes a full fence, so each reader's plain stores
//!    and loads are ordered as if the reader had fenced itself);
//! 2. wait until no reader is *old*: active with a phase different from
//!    `gp.ctr`'s;
//! 3. flip the phase;
//! 4. wait again until no reader is old.
//!
//! The updater reads the slots with acquire loads, so a slot value that
//! shows an old reader gone (zero, or a later section's phase) was stored
//! by a release store after that reader's section: the section's loads and
//! stores happen before the updater's next step, and so before the
//! caller's frees. liburcu issues a second heavy barrier at the end of the
//! grace period for this; the release stores give the same order for
//! nothing on x86-64 (and for an `stlr` on AArch64), and save one
//! `membarrier`, an interrupt of every CPU running a reader, per grace
//! period. `loom_model` checks the order with a cell the updater frees.
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
use std::time::{Duration, Instant};

/// One reader nesting level.
pub(crate) const GP_COUNT: usize = 1;
/// The low bit of the flip counter, above the nesting bits: the counter's
/// parity is the phase. A slot's nesting field only ever holds one (the
/// section's depth lives in the owner's private word) or all ones (an
/// offline reader), so on 64-bit targets it is 8 bits wide and the counter
/// has 54 (`GP_FLIPS`).
pub(crate) const GP_PHASE: usize = if usize::BITS == 64 {
    1 << 8
} else {
    1 << (usize::BITS / 2)
};
/// The nesting depth of a reader slot.
pub(crate) const NEST_MASK: usize = GP_PHASE - 1;
/// Set in `GpWord::ctr` (never cleared) when readers must issue their own
/// SeqCst fence ([`FenceMode::SeqCst`]): the outermost lock learns the
/// mode from the word it loads anyway, instead of from a second global.
pub(crate) const GP_SEQCST: usize = 1 << (usize::BITS - 2);
/// The flip counter's field of `GpWord::ctr`, from `GP_PHASE` up to
/// `GP_SEQCST`; flips wrap within it.
const GP_FLIPS: usize = (GP_SEQCST - 1) & !NEST_MASK;
/// Whether grace periods try `fast_grace_period` first. It needs the flip
/// counter not to wrap while a reader sits between two instructions: 2^54
/// flips on 64-bit targets (57 years at ten million a second), but only
/// 2^14 on 32-bit ones, where it stays off.
const FAST_PATH: bool = usize::BITS == 64;

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

/// `ReaderCtr::state`: guards nested in the open section besides the
/// first (low bits). Guards count; whichever is dropped last ends the
/// section.
const NESTED_MASK: usize = usize::MAX >> 3;
/// `ReaderCtr::state`: the thread's `registry::LOCAL` is not registered
/// (before the first `read_lock`, or after the thread's registration
/// ended): its sections go through `registry::lock_offline`.
pub(crate) const OFFLINE: usize = 1 << (usize::BITS - 1);
/// `ReaderCtr::state`: the slot goes back to the registry when the
/// section ends: a temporary slot, or the section of a thread whose
/// registration ended while it was open (see `registry.rs`).
const DETACHED: usize = 1 << (usize::BITS - 2);
/// `ReaderCtr::state`: this reader issues SeqCst fences
/// ([`FenceMode::SeqCst`]); set when the slot is taken.
const SEQCST: usize = 1 << (usize::BITS - 3);
/// `ReaderCtr::ctr` of an unregistered thread-local reader: looks nested,
/// so that `lock` leaves the fast path. Never published; and if it were
/// (a bug), its top bit, which `gp.ctr` never has, makes updaters read it
/// as quiescent instead of waiting forever.
const OFFLINE_CTR: usize = NEST_MASK | OFFLINE;

/// A reader's state. `ctr` is published (the updater reads it); `state`
/// is the owning thread's alone.
pub(crate) struct ReaderCtr {
    pub(crate) ctr: AtomicUsize,
    /// Nested guards and the `OFFLINE`, `DETACHED` and `SEQCST` flags, in
    /// one word that is zero in the common case, so an unlock checks all
    /// of them with one load and one branch.
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

/// `reader_barrier` between an unlock's slot store and its futex load.
/// It pairs with the heavy barrier of an updater that goes to sleep, and
/// the loom models never sleep (`Scan::spins`), so there it is modelled
/// as nothing in membarrier mode: a fence would hide from the models
/// whether the next section's slot store must be a release store.
#[inline(always)]
fn futex_barrier(mode: FenceMode) {
    #[cfg(all(loom, test))]
    if mode == FenceMode::Membarrier {
        return;
    }
    reader_barrier(mode);
}

/// The reader's own fence in SeqCst mode, out of the fast path's way.
#[cold]
#[inline(never)]
fn seqcst_reader_fence() {
    fence(Ordering::SeqCst);
}

/// An unlock that ended the section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(all(loom, test), allow(dead_code))]
pub(crate) struct Ended {
    /// An updater sleeps waiting for readers: the caller must wake it.
    pub(crate) wake: bool,
    /// The slot is detached (see `DETACHED`): the caller must release it.
    pub(crate) release: bool,
}

impl ReaderCtr {
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn new() -> Self {
        ReaderCtr {
            ctr: AtomicUsize::new(0),
            state: AtomicUsize::new(0),
        }
    }

    /// A thread-local reader before registration (see `OFFLINE`).
    #[cfg(not(all(loom, test)))]
    pub(crate) const fn offline() -> Self {
        ReaderCtr {
            ctr: AtomicUsize::new(OFFLINE_CTR),
            state: AtomicUsize::new(OFFLINE),
        }
    }

    /// Readies a reader for a thread: its fence mode, and whether it is
    /// `detached` (a temporary slot, released when its one section ends).
    /// Only outside a section, before the reader is published.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn prepare(&self, mode: FenceMode, detached: bool) {
        let mut state = 0;
        if mode == FenceMode::SeqCst {
            state |= SEQCST;
        }
        if detached {
            state |= DETACHED;
        }
        self.state.store(state, Ordering::Relaxed);
        self.ctr.store(0, Ordering::Relaxed);
    }

    /// Whether the owning thread is inside a read-side section (for a
    /// thread-local reader: and registered).
    #[cfg_attr(all(loom, test), allow(dead_code))]
    #[inline(always)]
    pub(crate) fn active(&self) -> bool {
        self.ctr.load(Ordering::Relaxed) & NEST_MASK != 0
    }

    /// Whether this is an unregistered thread-local reader.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    #[inline(always)]
    pub(crate) fn offline_state(state: usize) -> bool {
        state & OFFLINE != 0
    }

    /// `rcu_read_lock` of a registered reader. Only the owning thread
    /// calls this. `read_lock` inlines the same steps (`active`, `begin`,
    /// `lock_nested`).
    pub(crate) fn lock(&self, gp: &GpWord) {
        if self.active() {
            self.lock_nested();
        } else {
            self.begin(gp);
        }
    }

    /// The outermost `rcu_read_lock`, when `active()` is false: one load
    /// of `gp.ctr` and one store. The `active()` load before it only
    /// steers a predicted branch, so back-to-back sections carry no
    /// store-to-load dependency from one to the next.
    #[inline(always)]
    pub(crate) fn begin(&self, gp: &GpWord) {
        let gp_ctr = self.publish_section(gp);
        // Orders the slot store before the section's data loads (with the
        // updater's membarrier; see the module header). The mode comes
        // with the word just loaded.
        if gp_ctr & GP_SEQCST != 0 {
            seqcst_reader_fence();
        }
        reader_barrier(FenceMode::Membarrier);
    }

    /// `begin`'s copy of `gp.ctr` into the slot, without its barrier
    /// (which only the full protocol needs: the fast-path models run
    /// this alone). Returns the value copied.
    #[inline(always)]
    pub(crate) fn publish_section(&self, gp: &GpWord) -> usize {
        // Acquire (a plain `mov` on x86-64, as relaxed): an updater that
        // reads back exactly the value it flipped `gp.ctr` to knows this
        // section read the flip, and so sees every store made before it
        // (`fast_grace_period`).
        let gp_ctr = gp.ctr.load(Ordering::Acquire);
        // Release: an updater that reads this value, waiting for the
        // section before it to end, is ordered after that section too.
        self.ctr.store(gp_ctr, Ordering::Release);
        gp_ctr
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

    /// `rcu_read_unlock` of a registered reader. Returns `None` while the
    /// section goes on (other guards hold it), or what the caller must do
    /// now that it ended. `ReadGuard` inlines the same steps (`state`,
    /// `end`, `unlock_slow`); the models and unit tests use this.
    #[cfg(test)]
    pub(crate) fn unlock(&self, gp: &GpWord) -> Option<Ended> {
        let state = self.state();
        if state != 0 {
            return self.unlock_slow(gp, state);
        }
        Some(Ended {
            wake: self.end(gp),
            release: false,
        })
    }

    /// The owner's private state word; zero means an unlock may `end` the
    /// section directly.
    #[inline(always)]
    pub(crate) fn state(&self) -> usize {
        self.state.load(Ordering::Relaxed)
    }

    /// Ends the section, when `state()` is zero. Returns whether an
    /// updater sleeps and must be woken.
    #[inline(always)]
    pub(crate) fn end(&self, gp: &GpWord) -> bool {
        self.end_section(gp, FenceMode::Membarrier)
    }

    /// Unlock with nested guards, of a detached section, or in SeqCst
    /// mode (not of an offline thread-local reader: see `registry.rs`).
    #[cold]
    #[inline(never)]
    pub(crate) fn unlock_slow(&self, gp: &GpWord, state: usize) -> Option<Ended> {
        debug_assert_eq!(state & OFFLINE, 0, "unlock of an offline reader");
        if state & NESTED_MASK != 0 {
            self.state.store(state - 1, Ordering::Relaxed);
            return None;
        }
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
        // Release: the section's loads and stores happen before whatever
        // an updater does after reading "quiescent" (see the module
        // header).
        self.ctr.store(0, Ordering::Release);
        // The slot store is ordered before the futex load, pairing with the
        // updater's "futex = -1; heavy barrier; re-check slot".
        futex_barrier(mode);
        gp.futex.load(Ordering::Relaxed) == -1
    }

    /// Takes over the open section of the owning thread's `local` reader,
    /// whose registration ends: same phase, same nesting, and released
    /// when the section ends. The caller publishes `self` in place of
    /// `local` under the registry lock, so an updater sees one or the
    /// other, with the same value.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn adopt(&self, local: &ReaderCtr) {
        let state = local.state.load(Ordering::Relaxed);
        debug_assert_eq!(state & (OFFLINE | DETACHED), 0);
        self.state.store(state | DETACHED, Ordering::Relaxed);
        self.ctr
            .store(local.ctr.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The owning thread-local reader is unregistered: its next `lock`
    /// goes through `registry::lock_offline`.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn go_offline(&self) {
        self.state.store(OFFLINE, Ordering::Relaxed);
        self.ctr.store(OFFLINE_CTR, Ordering::Relaxed);
    }

    /// The owning thread is gone (or forked away): its sections are over.
    #[cfg_attr(all(loom, test), allow(dead_code))]
    pub(crate) fn reset(&self) {
        self.state.store(0, Ordering::Relaxed);
        self.ctr.store(0, Ordering::Release);
    }

    /// The published slot value, for an updater.
    #[inline]
    pub(crate) fn slot(&self) -> usize {
        // Acquire, pairing with the release stores of `begin` and
        // `end_section`.
        self.ctr.load(Ordering::Acquire)
    }

    /// Whether this reader is in a section that began before the last flip
    /// (its phase differs from `gp_ctr`'s).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn is_old(&self, gp_ctr: usize) -> bool {
        slot_is_old(self.slot(), gp_ctr)
    }
}

/// Whether a reader whose slot holds `v` is in a section that began
/// before the last flip of `gp_ctr` (active, with the other phase).
#[inline]
pub(crate) fn slot_is_old(v: usize, gp_ctr: usize) -> bool {
    slot_in_section(v) && (v ^ gp_ctr) & GP_PHASE != 0
}

/// Whether a reader whose slot holds `v` is inside a section (not an
/// offline reader, whose slot only looks nested).
#[inline]
fn slot_in_section(v: usize) -> bool {
    v & NEST_MASK != 0 && v & OFFLINE == 0
}

/// Advances `gp.ctr`'s flip counter by one, which flips the phase. The
/// caller holds the grace-period lock: the only concurrent writer is
/// `set_mode`, whose RMW a compare-exchange cannot lose.
fn flip(gp: &GpWord) {
    let mut v = gp.ctr.load(Ordering::Relaxed);
    loop {
        let next = (v & !GP_FLIPS) | (v.wrapping_add(GP_PHASE) & GP_FLIPS);
        match gp
            .ctr
            .compare_exchange(v, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => return,
            Err(now) => v = now,
        }
    }
}

/// What the updater needs from its environment: the heavy barrier, a way
/// to sleep until a reader wakes it, and access to the readers.
pub(crate) trait Updater {
    /// A handle on one reader of the grace period's snapshot.
    type Reader: Copy;
    /// `smp_mb_master()`: a full fence on every thread that may read.
    fn heavy_barrier(&self);
    /// Runs `scan` with the readers readable: `scan` is given a function
    /// that reads one reader's slot value, `None` if the reader has left
    /// (its thread unregistered: done). The real updater holds the
    /// registry lock throughout, so `scan` must be short.
    fn scan_readers<R>(&self, scan: impl FnOnce(&dyn Fn(Self::Reader) -> Option<usize>) -> R) -> R;
    /// Sleep while `futex` is -1 (a reader or a timeout wakes us).
    /// Returns false if the timeout ended it, true if anything else did.
    fn sleep(&self, futex: &AtomicI32) -> bool;
    /// Sleep for `time`, no reader can wake us.
    fn nap(&self, time: Duration);
    /// How many scans before sleeping.
    fn spins(&self) -> usize;
    /// How long `fast_grace_period` scans (`FAST_SCANS`).
    fn fast_scans(&self) -> FastScans;
    /// Called once per wait that has lasted `stall_after` since its first
    /// sleep.
    fn report_stall(&self);
    /// See `report_stall`. Time, not a count of sleeps: readers that end
    /// their sections wake a sleeping updater early, so sleeps say nothing
    /// of how long it has waited.
    fn stall_after(&self) -> Duration;
}

/// The shortest and the longest nap of an updater that readers outside
/// its wait keep waking (see `wait_for_readers`).
const SHORTEST_NAP: Duration = Duration::from_micros(50);
const LONGEST_NAP: Duration = Duration::from_millis(10);

/// Waits until no reader in `readers` is in a section older than the
/// current phase. Scans every pending reader per pass, as liburcu does,
/// dropping those found done; spins, then sleeps until a reader that
/// ends its section wakes it.
///
/// Every reader that ends a section while the updater sleeps wakes it,
/// not only the pending ones, and each sleep costs a heavy barrier (with
/// membarrier, an interrupt on every CPU running the process). With one
/// long section pending and other readers busy, that was a heavy barrier
/// every 60 µs. So once a wake-up finds every pending reader still there,
/// the wait polls instead: naps of a quarter of the time it has slept so
/// far (from `SHORTEST_NAP` to `LONGEST_NAP`, the futex timeout), each
/// followed by a scan, with no heavy barrier and no wake-ups. A pending
/// section that ends is then seen within a nap: a quarter later than it
/// could have been at most, and a wait stuck behind a leaked guard wakes
/// no more often than the futex timeout would.
fn wait_for_readers<U: Updater>(gp: &GpWord, readers: &[U::Reader], updater: &U, proven: usize) {
    let mut pending = readers.to_vec();
    let mut attempts = 0;
    let mut first_sleep: Option<Instant> = None;
    let mut reported = false;
    let mut napping = false;
    loop {
        retain_old(updater, &mut pending, gp, proven);
        if pending.is_empty() {
            return;
        }
        attempts += 1;
        if attempts < updater.spins() {
            spin();
            continue;
        }
        let since = *first_sleep.get_or_insert_with(Instant::now);
        if napping {
            // A scan after a nap sees the slots as the spinning scans do
            // (acquire loads of release stores: see the module header).
            updater.nap((since.elapsed() / 4).clamp(SHORTEST_NAP, LONGEST_NAP));
        } else {
            // Announce that we sleep, then re-check: a reader that
            // unlocked before seeing -1 is visible to the re-check thanks
            // to the heavy barrier; one that unlocks after will see -1 and
            // wake us.
            gp.futex.store(-1, Ordering::Relaxed);
            updater.heavy_barrier();
            retain_old(updater, &mut pending, gp, proven);
            if pending.is_empty() {
                gp.futex.store(0, Ordering::Relaxed);
                return;
            }
            let before = pending.len();
            let woken = updater.sleep(&gp.futex);
            gp.futex.store(0, Ordering::Relaxed);
            retain_old(updater, &mut pending, gp, proven);
            // Woken by a reader we do not wait for: poll from now on.
            napping = woken && pending.len() == before;
        }
        attempts = 0;
        if !reported && since.elapsed() >= updater.stall_after() {
            reported = true;
            updater.report_stall();
        }
    }
}

/// Keeps in `pending` the readers in a section older than `gp.ctr`'s
/// phase, except those whose slot holds `proven`: the value of a flip
/// made in this grace period, after the updates it must order (a failed
/// fast attempt's, see `fast_grace_period`; 0 when there was none, which
/// no section holds). Such a section read that flip, and so sees those
/// updates, by the fast path's own argument; and waiting for it would
/// wait a whole section more for a reader with long sections.
fn retain_old<U: Updater>(updater: &U, pending: &mut Vec<U::Reader>, gp: &GpWord, proven: usize) {
    let gp_ctr = gp.ctr.load(Ordering::Relaxed);
    updater.scan_readers(|read| {
        pending.retain(|r| read(*r).is_some_and(|v| slot_is_old(v, gp_ctr) && v != proven));
    });
}

/// How a grace period completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completed {
    /// By `fast_grace_period`: no heavy barrier.
    Fast,
    /// By the full protocol.
    Full,
}

/// One full grace period over `readers` (a snapshot of the registry).
/// The caller holds the grace-period lock, so `gp.ctr` has one writer.
pub(crate) fn grace_period<U: Updater>(
    gp: &GpWord,
    readers: &[U::Reader],
    updater: &U,
) -> Completed {
    match fast_grace_period(gp, readers, updater) {
        Ok(()) => Completed::Fast,
        Err(proven) => {
            full_grace_period(gp, readers, updater, proven);
            Completed::Full
        }
    }
}

/// `grace_period` without the fast path: liburcu's protocol alone.
/// `proven`: see `retain_old`.
fn full_grace_period<U: Updater>(gp: &GpWord, readers: &[U::Reader], updater: &U, proven: usize) {
    two_waits(gp, updater, || {
        wait_for_readers(gp, readers, updater, proven);
        true
    });
}

/// How long `fast_grace_period` scans before it gives up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FastScans {
    /// Scans in a row that find one pending reader outside any section,
    /// its slot unchanged: that reader looks idle, and only the heavy
    /// barrier can end the wait for it. A reader that runs sections back
    /// to back changes its slot every few nanoseconds; a scan takes tens.
    pub(crate) idle: usize,
    /// Scans in all. A reader inside a section that began before the flip
    /// does not count as idle: whatever the protocol, that section must
    /// end first, and a busy reader then begins the next one at once. So
    /// the fast path waits for sections of up to a few microseconds (the
    /// full protocol spins longer, `Updater::spins`).
    pub(crate) max: usize,
}

/// Scans `fast_grace_period` makes per hold of the registry lock.
const FAST_SCANS_PER_HOLD: usize = 16;

/// The real updater's `FastScans`.
#[cfg_attr(all(loom, test), allow(dead_code))]
pub(crate) const FAST_SCANS: FastScans = FastScans { idle: 8, max: 128 };

/// A grace period without the heavy barrier, for readers that are busy:
/// flip the phase, then wait until every reader's slot holds exactly the
/// new `gp.ctr` (`Ok`). Gives up (`Err`) when a reader looks idle (see
/// `FastScans`) or after `FastScans::max` scans: a slot that reads
/// "outside a section" proves nothing without the heavy barrier, since
/// its owner's next slot store may still sit in its CPU's store buffer
/// while the section's loads go ahead.
///
/// Why a slot equal to the new `gp.ctr` proves the reader done with
/// everything unlinked before the flip, in the language's memory model
/// (no store-buffer argument, no fence on the reader side):
/// - The flip is a relaxed RMW after a SeqCst (so release) fence. The
///   flip counter makes the value unique (it cannot come back for 2^54
///   flips), so the reader's `begin` load read this flip: an acquire load
///   that synchronizes with the fence. Every store before the flip (the
///   caller's unlinks) happens before that section's loads, and before
///   those of every later section of that reader, whose `begin` loads
///   read this flip or a later one (coherence; later flips and
///   `set_mode` are RMWs, which continue the release sequence).
/// - The updater read the value with an acquire load, from the release
///   store in `begin`: every earlier section of that reader (ended by an
///   earlier release store) happens before the updater's next steps, and
///   so before the caller's frees.
/// - Other threads' unlinks, served by this grace period without running
///   it (concurrent `synchronize` callers, deferring threads whose bags
///   wait for it): such a thread unlinks, then takes its snapshot of
///   `GP_SEQ` (`grace::snapshot`: a SeqCst fence F, then a SeqCst load
///   that reads a value from before this grace period's SeqCst increment
///   W, which precedes the flip's fence G). If a reader that read the
///   flip then loaded the unlinked pointer, G would happen before that
///   load, which reads before the unlink, which is sequenced before F:
///   so G precedes F in the single total order of SeqCst operations
///   (C++20 [atomics.order] p4.4), while F precedes W (p4.3: F is
///   sequenced before a load that is coherence-ordered before W) and W
///   precedes G (sequenced before): a cycle, so no such execution. Loom
///   treats SeqCst as acquire/release and cannot check this step (a
///   model of it fails there, and passes with the snapshot's load
///   replaced by an RMW); x86-64's locked RMW and `mfence`, AArch64's
///   `dmb`, forbid it too.
///
/// Readers that leave meanwhile are done, as in the full protocol. Giving
/// up (`Err`) leaves the phase flipped once, which is harmless (see
/// `try_grace_period`): the full protocol that follows is self-contained.
/// It returns the value it flipped to (0 if it did not try), which the
/// full protocol's waits may then count as done (`retain_old`): a reader
/// in a long section, seen in it when the fast path gave up, would
/// otherwise be waited for twice, in that section and in the one it
/// began after this flip. Only in membarrier mode: with fence mode
/// readers, the full protocol costs no interrupt anyway.
fn fast_grace_period<U: Updater>(
    gp: &GpWord,
    readers: &[U::Reader],
    updater: &U,
) -> Result<(), usize> {
    if !FAST_PATH || gp.ctr.load(Ordering::Relaxed) & GP_SEQCST != 0 {
        return Err(0);
    }
    fence(Ordering::SeqCst);
    flip(gp);
    // The slot loads below read values stored after the flip's.
    fence(Ordering::SeqCst);
    let now = gp.ctr.load(Ordering::Relaxed);
    let scans = updater.fast_scans();
    // Each pending reader with the slot value last seen and how many scans
    // in a row have seen it there, outside a section.
    let mut pending: Vec<_> = readers.iter().map(|r| (*r, usize::MAX, 0)).collect();
    let mut left = scans.max;
    loop {
        // The registry lock is held for a few scans at a time (about a
        // microsecond), not for the whole attempt: threads that register
        // or exit, and `stats()`, wait for it meanwhile.
        let ended = updater.scan_readers(|read| {
            for _ in 0..left.min(FAST_SCANS_PER_HOLD) {
                left -= 1;
                let mut idle = false;
                pending.retain_mut(|(reader, last, same)| {
                    let Some(v) = read(*reader) else {
                        return false;
                    };
                    if v == now {
                        return false;
                    }
                    if slot_in_section(v) {
                        *same = 0;
                    } else if v == *last {
                        *same += 1;
                        idle |= *same >= scans.idle;
                    } else {
                        *same = 0;
                    }
                    *last = v;
                    true
                });
                if pending.is_empty() {
                    return Some(Ok(()));
                }
                if idle {
                    return Some(Err(now));
                }
                spin();
            }
            None
        });
        match ended {
            Some(ended) => return ended,
            None if left == 0 => return Err(now),
            None => {}
        }
    }
}

/// The steps of a grace period around its two waits for readers; stops
/// (false) where `wait` gives up.
fn two_waits<U: Updater>(gp: &GpWord, updater: &U, mut wait: impl FnMut() -> bool) -> bool {
    updater.heavy_barrier();
    if !wait() {
        return false;
    }
    // The first wait's slot loads complete before the flip is published.
    fence(Ordering::SeqCst);
    flip(gp);
    fence(Ordering::SeqCst);
    // No closing heavy barrier: the waits' acquire loads order the
    // caller's next steps after every old section (module header).
    wait()
}

/// Scans `readers` until none is old, at most `scans` times; never
/// sleeps. Whether they all were.
fn readers_done_within<U: Updater>(
    gp: &GpWord,
    readers: &[U::Reader],
    updater: &U,
    scans: usize,
    proven: usize,
) -> bool {
    let mut pending = readers.to_vec();
    for _ in 0..scans {
        retain_old(updater, &mut pending, gp, proven);
        if pending.is_empty() {
            return true;
        }
        spin();
    }
    false
}

/// `grace_period`, given up (`None`) if a wait for readers takes more
/// than `scans` scans, so a caller that must not block can try one. The
/// fast path comes first here too: with busy readers it is the attempt
/// most likely to finish, and with idle ones its scans cost less than a
/// microsecond per attempt, which a deferring thread makes once per 32
/// batches.
///
/// Giving up may leave the phase flipped (once or twice, with the fast
/// path's flip). That is harmless: a grace period's guarantee rests only
/// on its own two waits, which between them wait for every reader that
/// was in a section when it began, whatever phase that reader copied and
/// whatever the phase was at the start. A given-up grace period
/// guarantees nothing, and its caller must treat it so
/// (`grace::try_expedite` rolls back the sequence count).
pub(crate) fn try_grace_period<U: Updater>(
    gp: &GpWord,
    readers: &[U::Reader],
    updater: &U,
    scans: usize,
) -> Option<Completed> {
    match fast_grace_period(gp, readers, updater) {
        Ok(()) => Some(Completed::Fast),
        Err(proven) => {
            try_full_grace_period(gp, readers, updater, scans, proven).then_some(Completed::Full)
        }
    }
}

/// `try_grace_period` without the fast path: whether it completed.
fn try_full_grace_period<U: Updater>(
    gp: &GpWord,
    readers: &[U::Reader],
    updater: &U,
    scans: usize,
    proven: usize,
) -> bool {
    two_waits(gp, updater, || {
        readers_done_within(gp, readers, updater, scans, proven)
    })
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
        r.lock(&gp);
        assert!(r.active());
        assert!(!r.is_old(gp.ctr.load(Ordering::Relaxed)));
        assert!(r.is_old(gp.ctr.load(Ordering::Relaxed) ^ GP_PHASE));
        // SeqCst mode takes the out-of-line unlock and ends the section.
        assert_ne!(r.state(), 0);
        assert_eq!(r.unlock(&gp), ENDED);
        assert!(!r.active());
    }

    #[test]
    fn a_flip_advances_the_counter_within_its_field_and_keeps_the_other_bits() {
        let gp = GpWord::new();
        gp.set_mode(FenceMode::SeqCst);
        let before = gp.ctr.load(Ordering::Relaxed);
        flip(&gp);
        let after = gp.ctr.load(Ordering::Relaxed);
        assert_eq!(after, before + GP_PHASE);
        assert_ne!((after ^ before) & GP_PHASE, 0, "a flip flips the phase");
        // At the top of the field the counter wraps to zero, flipping the
        // phase as ever, without touching the mode bit or the count.
        gp.ctr
            .store(GP_FLIPS | GP_SEQCST | GP_COUNT, Ordering::Relaxed);
        flip(&gp);
        assert_eq!(gp.ctr.load(Ordering::Relaxed), GP_SEQCST | GP_COUNT);
        // Values that differ only in the counter are different grace
        // periods to the fast path, the same phase to the full protocol.
        assert_ne!(GP_COUNT, GP_COUNT + 2 * GP_PHASE);
        assert!(!slot_is_old(GP_COUNT + 2 * GP_PHASE, GP_COUNT));
        assert!(slot_is_old(GP_COUNT + GP_PHASE, GP_COUNT));
    }

    #[test]
    fn nested_and_detached_sections_end_exactly_once() {
        for mode in [FenceMode::Membarrier, FenceMode::SeqCst] {
            let gp = GpWord::new();
            gp.set_mode(mode);
            let r = ReaderCtr::new();
            r.prepare(mode, false);
            // Three levels: the last unlock ends the section.
            r.lock(&gp);
            r.lock(&gp);
            r.lock(&gp);
            assert_eq!(r.unlock(&gp), None);
            assert_eq!(r.unlock(&gp), None);
            assert!(r.active());
            assert_eq!(r.unlock(&gp), ENDED);
            assert!(!r.active());

            // A section taken over from a thread-local reader whose
            // registration ends: same phase and nesting, released at the
            // end.
            let local = ReaderCtr::new();
            local.prepare(mode, false);
            local.lock(&gp);
            local.lock(&gp);
            let own = ReaderCtr::new();
            own.adopt(&local);
            local.go_offline();
            assert!(ReaderCtr::offline_state(local.state()));
            assert_eq!(
                own.ctr.load(Ordering::Relaxed),
                gp.ctr.load(Ordering::Relaxed)
            );
            assert_eq!(own.unlock(&gp), None);
            let ended = own.unlock(&gp).expect("the last guard ends it");
            assert!(ended.release);
            assert!(!own.active());

            // A temporary slot is released by the unlock that ends its
            // section.
            r.prepare(mode, true);
            r.lock(&gp);
            assert_eq!(r.unlock(&gp).map(|e| e.release), Some(true));
            r.prepare(mode, false);

            // A sleeping updater is reported for waking.
            r.lock(&gp);
            gp.futex.store(-1, Ordering::Relaxed);
            assert_eq!(r.unlock(&gp).map(|e| e.wake), Some(true));
        }
    }

    #[test]
    fn an_offline_reader_looks_nested_to_lock_and_flagged_to_unlock() {
        let r = ReaderCtr::offline();
        assert!(r.active(), "lock must leave the fast path");
        assert!(ReaderCtr::offline_state(r.state()));
        r.prepare(FenceMode::Membarrier, false);
        assert!(!r.active());
        assert_eq!(r.state(), 0);
        r.go_offline();
        assert!(r.active());
        assert!(ReaderCtr::offline_state(r.state()));
        // Never old to an updater, whatever the phase.
        assert!(!r.is_old(GP_COUNT));
        assert!(!r.is_old(GP_COUNT | GP_PHASE));
    }
}

#[cfg(all(loom, test))]
mod loom_model {
    //! Model: a reader reads a published pointer inside a section and checks
    //! the object has not been freed; the updater unpublishes it, runs a
    //! grace period and frees it. membarrier is modelled as a SeqCst fence.
    //!
    //! What the models check, and what they cannot (audits mutated the
    //! code and re-ran them): removing either wait of the two-phase flip,
    //! or the check of the reader's slot, fails them. Removing the
    //! updater's heavy barrier (at the start of `two_waits`) fails only
    //! the `an_earlier_attempt` models: the reader's side of a modelled
    //! membarrier is a SeqCst fence of its own after the lock's slot store
    //! (`reader_barrier`), so the membarrier models run the same lock as
    //! the fence ones, and loom does not explore the store-buffering
    //! reorder that the updater's barrier exists to stop. Its placement
    //! follows liburcu's memb flavor and is argued in the module header;
    //! the real-thread torture tests run both modes. At unlock the models
    //! differ: in membarrier mode the reader issues no fence there
    //! (`futex_barrier`), as on the real fast path.
    //!
    //! The reader also reads the object's contents, a loom `UnsafeCell`
    //! that the updater overwrites when it frees the object: loom fails the
    //! model unless the section's read happens before the free. That is
    //! the order liburcu's closing heavy barrier gives and the slot's
    //! release stores and acquire loads give here; with those relaxed, the
    //! models fail.
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    /// The models' updater: the closure reads the one reader's slot
    /// (`None`: it has left).
    struct Scan<F>(F);
    impl<F: Fn() -> Option<usize>> Updater for Scan<F> {
        type Reader = ();
        fn heavy_barrier(&self) {
            fence(Ordering::SeqCst);
        }
        fn scan_readers<R>(&self, scan: impl FnOnce(&dyn Fn(()) -> Option<usize>) -> R) -> R {
            scan(&|()| (self.0)())
        }
        fn sleep(&self, _futex: &AtomicI32) -> bool {
            loom::thread::yield_now();
            true
        }
        fn nap(&self, _time: Duration) {
            loom::thread::yield_now();
        }
        fn spins(&self) -> usize {
            usize::MAX
        }
        fn fast_scans(&self) -> FastScans {
            FastScans { idle: 1, max: 3 }
        }
        fn report_stall(&self) {}
        fn stall_after(&self) -> Duration {
            Duration::MAX
        }
    }

    struct Shared {
        gp: GpWord,
        reader: ReaderCtr,
        /// Which object is published: 0 or 1.
        published: AtomicUsize,
        freed: [AtomicBool; 2],
        /// The objects' contents: the updater writes object 0's when it
        /// frees it.
        contents: [UnsafeCell<usize>; 2],
    }

    impl Shared {
        fn new(mode: FenceMode) -> Arc<Shared> {
            let gp = GpWord::new();
            gp.set_mode(mode);
            let reader = ReaderCtr::new();
            reader.prepare(mode, false);
            Arc::new(Shared {
                gp,
                reader,
                published: AtomicUsize::new(0),
                freed: [AtomicBool::new(false), AtomicBool::new(false)],
                contents: [UnsafeCell::new(0), UnsafeCell::new(1)],
            })
        }

        /// The reader: `sections` sections, each begun with `begin`, that
        /// read the published object and check it was not freed.
        fn spawn_reader(
            s: &Arc<Self>,
            sections: usize,
            begin: fn(&ReaderCtr, &GpWord),
        ) -> loom::thread::JoinHandle<()> {
            let r = s.clone();
            loom::thread::spawn(move || {
                for _ in 0..sections {
                    begin(&r.reader, &r.gp);
                    let obj = r.published.load(Ordering::Acquire);
                    assert!(
                        !r.freed[obj].load(Ordering::Relaxed),
                        "reader saw a freed object"
                    );
                    // SAFETY: loom checks this read against the free.
                    let value = r.contents[obj].with(|v| unsafe { *v });
                    assert_eq!(value, obj, "reader saw a freed object's contents");
                    let _ = r.reader.unlock(&r.gp);
                }
            })
        }

        /// Frees object 0, which the updater unpublished.
        fn free_first(&self) {
            self.freed[0].store(true, Ordering::Relaxed);
            // SAFETY: loom checks this write against the reader's reads.
            self.contents[0].with_mut(|v| unsafe { *v = usize::MAX });
        }
    }

    /// How the model's updater waits for its grace period.
    #[derive(Clone, Copy)]
    enum Wait {
        /// One full grace period.
        Full,
        /// First a bounded one (`try_grace_period` with one scan per
        /// wait), which may give up anywhere, even after its phase flip;
        /// if it does, a full one.
        TryThenFull,
        /// A bounded one before the unlink (whatever became of it: it
        /// leaves the phase as it may), then, after the unlink, a full one.
        TryBeforeFull,
        /// A bounded one before the unlink, then after it a bounded one,
        /// and a full one if that gave up: an earlier attempt must not let
        /// a later one skip a wait.
        TryBeforeTryThenFull,
    }

    fn run(mode: FenceMode, reader_sections: usize) {
        run_waiting(mode, reader_sections, Wait::Full);
    }

    /// Runs the model twice: with the grace periods as the crate runs
    /// them (the fast path first), and with the full protocol alone
    /// (bounded attempts included), so that it is also checked starting
    /// from a phase no fast attempt flipped: with the fast path first, a
    /// model without an earlier attempt still passes with the second wait
    /// removed, and the membarrier one with the heavy barrier removed.
    fn run_waiting(mode: FenceMode, reader_sections: usize, wait: Wait) {
        for fast_first in [true, false] {
            run_model(mode, reader_sections, wait, fast_first);
        }
    }

    fn run_model(mode: FenceMode, reader_sections: usize, wait: Wait, fast_first: bool) {
        loom::model(move || {
            let s = Shared::new(mode);
            let reader = Shared::spawn_reader(&s, reader_sections, |r, gp| r.lock(gp));
            let scan = Scan(|| Some(s.reader.slot()));
            // A bounded attempt, one scan per wait.
            let attempt = || {
                if fast_first {
                    try_grace_period(&s.gp, &[()], &scan, 1).is_some()
                } else {
                    try_full_grace_period(&s.gp, &[()], &scan, 1, 0)
                }
            };
            if let Wait::TryBeforeFull | Wait::TryBeforeTryThenFull = wait {
                // Some earlier grace period, finished or given up.
                let _ = attempt();
            }
            s.published.store(1, Ordering::Release);
            let finished = match wait {
                Wait::Full | Wait::TryBeforeFull => false,
                Wait::TryThenFull | Wait::TryBeforeTryThenFull => attempt(),
            };
            if !finished {
                if fast_first {
                    grace_period(&s.gp, &[()], &scan);
                } else {
                    full_grace_period(&s.gp, &[()], &scan, 0);
                }
            }
            s.free_first();
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

    /// The updater may see the reader's first section end through the
    /// second section's slot store: that store must be a release store.
    #[test]
    fn loom_reader_never_sees_freed_object_two_sections_membarrier() {
        run(FenceMode::Membarrier, 2);
    }

    /// A grace period given up part-way (`grace::try_expedite`), then a
    /// full one: the object is still freed only after the reader is done.
    #[test]
    fn loom_a_given_up_grace_period_leaves_the_next_one_sound_membarrier() {
        run_waiting(FenceMode::Membarrier, 1, Wait::TryThenFull);
    }

    #[test]
    fn loom_a_given_up_grace_period_leaves_the_next_one_sound_two_sections() {
        run_waiting(FenceMode::SeqCst, 2, Wait::TryThenFull);
    }

    /// An attempt before the unlink, given up or not, leaves the phase
    /// wherever it may: the grace periods after the unlink still wait.
    #[test]
    fn loom_an_earlier_attempt_leaves_later_grace_periods_sound_membarrier() {
        run_waiting(FenceMode::Membarrier, 1, Wait::TryBeforeFull);
        run_waiting(FenceMode::Membarrier, 1, Wait::TryBeforeTryThenFull);
    }

    #[test]
    fn loom_an_earlier_attempt_leaves_later_grace_periods_sound_fence() {
        run_waiting(FenceMode::SeqCst, 1, Wait::TryBeforeFull);
        run_waiting(FenceMode::SeqCst, 1, Wait::TryBeforeTryThenFull);
    }

    /// The fast path alone, against a reader with no barrier at all: the
    /// reader copies `gp.ctr` into its slot (`publish_section`, without
    /// `begin`'s barrier, which stands for the membarrier the fast path
    /// does without), reads the object, and ends the section. The updater
    /// unlinks, tries `fast_grace_period`, and frees only if it completed.
    /// Relaxing the reader's acquire load of `gp.ctr`, or counting a slot
    /// outside a section as done, fails these models.
    fn run_fast(reader_sections: usize, attempt_before_unlink: bool) {
        // Whether some execution completed the fast path (and freed): the
        // models would prove nothing if it always gave up.
        let completed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let completed_in_model = completed.clone();
        loom::model(move || {
            let s = Shared::new(FenceMode::Membarrier);
            let reader = Shared::spawn_reader(&s, reader_sections, |r, gp| {
                r.publish_section(gp);
            });
            let scan = Scan(|| Some(s.reader.slot()));
            if attempt_before_unlink {
                // Some earlier grace period, finished or given up.
                let _ = fast_grace_period(&s.gp, &[()], &scan);
            }
            s.published.store(1, Ordering::Release);
            if fast_grace_period(&s.gp, &[()], &scan).is_ok() {
                completed_in_model.store(true, std::sync::atomic::Ordering::Relaxed);
                s.free_first();
            }
            reader.join().unwrap();
        });
        assert!(
            completed.load(std::sync::atomic::Ordering::Relaxed),
            "no execution completed the fast path"
        );
    }

    #[test]
    fn loom_the_fast_path_frees_only_after_the_reader_read_the_flip() {
        run_fast(1, false);
    }

    #[test]
    fn loom_the_fast_path_frees_only_after_the_reader_read_the_flip_two_sections() {
        run_fast(2, false);
    }

    /// An attempt before the unlink flips the phase once more: a reader
    /// that copied `gp.ctr` before both flips and publishes it after them
    /// holds the current phase, and must not pass for having read the
    /// flip. Only the exact flip count tells them apart (a check of the
    /// phase bit alone fails this model).
    #[test]
    fn loom_the_fast_path_is_not_fooled_by_a_value_from_two_flips_ago() {
        run_fast(2, true);
    }

    /// The full protocol after a failed fast attempt counts a slot holding
    /// exactly the attempt's flip as done (`retain_old`'s `proven`), and
    /// nothing else: a section that copied `gp.ctr` before an earlier
    /// flip carries the same phase as the attempt's flip, and must still
    /// be waited for. (Counting every slot with that phase as done fails
    /// this model.) Why a section holding exactly that value may count as
    /// done is the fast path's argument, which the `run_fast` models
    /// check: this reader locks with `lock`, whose modelled membarrier
    /// (a SeqCst fence on the reader's side) would hide a missing acquire
    /// load, and the full protocol needs that fence for its own reasons.
    #[test]
    fn loom_after_a_failed_fast_attempt_an_older_section_with_the_same_phase_is_waited_for() {
        loom::model(|| {
            let s = Shared::new(FenceMode::Membarrier);
            let r = s.clone();
            let reader = loom::thread::spawn(move || {
                r.reader.lock(&r.gp);
                let obj = r.published.load(Ordering::Acquire);
                // A long section: the updater's scans yield, which lets
                // this thread run on, so it yields back.
                for _ in 0..4 {
                    loom::thread::yield_now();
                }
                // SAFETY: loom checks this read against the free.
                let value = r.contents[obj].with(|v| unsafe { *v });
                assert_eq!(value, obj, "reader saw a freed object's contents");
                let _ = r.reader.unlock(&r.gp);
            });
            // An earlier flip (a given-up attempt's), which the reader may
            // or may not have read.
            flip(&s.gp);
            s.published.store(1, Ordering::Release);
            let scan = Scan(|| Some(s.reader.slot()));
            if let Err(proven) = fast_grace_period(&s.gp, &[()], &scan) {
                full_grace_period(&s.gp, &[()], &scan, proven);
            }
            s.free_first();
            reader.join().unwrap();
        });
    }

    /// Which reader the slot publishes (`registry::Slot::reader`).
    const LOCAL: usize = 0;
    const OWN: usize = 1;
    const NONE: usize = 2;

    /// A registry: the published reader, read and written under the lock.
    struct Registry {
        lock: loom::sync::Mutex<()>,
        published: AtomicUsize,
        local: ReaderCtr,
        own: ReaderCtr,
    }

    /// The real updater's scan: under the registry lock, through the
    /// published reader.
    fn locked_slot(reg: &Registry) -> Option<usize> {
        let _registry = reg.lock.lock().unwrap();
        match reg.published.load(Ordering::Relaxed) {
            LOCAL => Some(reg.local.slot()),
            OWN => Some(reg.own.slot()),
            _ => None,
        }
    }

    /// A thread's registration ends inside a section: the section moves
    /// from its thread-local reader to the slot's own (`adopt`, under the
    /// registry lock), and reads after the move are still protected from a
    /// grace period that runs across it.
    #[test]
    fn loom_a_section_handed_to_the_slot_still_holds_the_grace_period() {
        for fast_first in [true, false] {
            handed_section_model(fast_first);
        }
    }

    fn handed_section_model(fast_first: bool) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(move || {
            let gp = Arc::new(GpWord::new());
            let reg = Arc::new(Registry {
                lock: loom::sync::Mutex::new(()),
                published: AtomicUsize::new(LOCAL),
                local: ReaderCtr::new(),
                own: ReaderCtr::new(),
            });
            reg.local.prepare(FenceMode::Membarrier, false);
            let obj = Arc::new((
                AtomicUsize::new(0),
                [AtomicBool::new(false), AtomicBool::new(false)],
            ));
            let (g, r, o) = (gp.clone(), reg.clone(), obj.clone());
            let reader = loom::thread::spawn(move || {
                r.local.lock(&g);
                let first = o.0.load(Ordering::Acquire);
                assert!(!o.1[first].load(Ordering::Relaxed), "freed before the move");
                {
                    let _registry = r.lock.lock().unwrap();
                    r.own.adopt(&r.local);
                    r.published.store(OWN, Ordering::Relaxed);
                    r.local.go_offline();
                }
                let second = o.0.load(Ordering::Acquire);
                assert!(!o.1[second].load(Ordering::Relaxed), "freed after the move");
                let ended = r.own.unlock(&g).expect("one guard");
                assert!(ended.release);
                let _registry = r.lock.lock().unwrap();
                r.published.store(NONE, Ordering::Relaxed);
            });
            obj.0.store(1, Ordering::Release);
            let scan = Scan(|| locked_slot(&reg));
            if fast_first {
                grace_period(&gp, &[()], &scan);
            } else {
                full_grace_period(&gp, &[()], &scan, 0);
            }
            obj.1[0].store(true, Ordering::Relaxed);
            reader.join().unwrap();
        });
    }
}
