//! `stats()`: counters a user can print.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::gp::FenceMode;
use crate::{callback, grace};

/// How updaters order themselves against readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarrierMode {
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`; readers use only a
    /// compiler barrier.
    Membarrier,
    /// SeqCst fences on both sides (no membarrier, or forced).
    Fence,
}

impl fmt::Display for BarrierMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BarrierMode::Membarrier => "membarrier (readers fence-free)",
            BarrierMode::Fence => "SeqCst fence fallback",
        })
    }
}

/// A snapshot of RCU's counters since process start. Fields may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Grace periods completed.
    pub grace_periods: u64,
    /// Of those, the grace periods a deferring thread ran itself when its
    /// batches were due and it could finish one without waiting for a
    /// reader (see [`defer_drop`](crate::defer_drop)).
    pub owner_grace_periods: u64,
    /// Times a deferring thread started such a grace period and gave it up
    /// because a reader stayed in its section; a later grace period (the
    /// callback thread's, or any other thread's) served instead.
    pub owner_grace_periods_given_up: u64,
    /// Of all `grace_periods` (deferring threads' included), those that
    /// the fast path completed: every other registered reader was seen
    /// to begin a section after the grace period started, so it issued no
    /// heavy barrier (see [`synchronize`](crate::synchronize)). Grace
    /// periods with no other registered reader issue none either, and are
    /// not counted here.
    pub fast_grace_periods: u64,
    /// Mean grace-period latency.
    pub gp_latency_mean: Duration,
    /// Longest grace period.
    pub gp_latency_max: Duration,
    /// Callbacks queued: `call` and `call_intrusive` callbacks as they are
    /// queued, `defer_drop` entries a batch at a time, when a thread's
    /// batch fills (126) or is handed over (a thread exiting, `barrier`),
    /// so the few entries of a batch still filling are not counted yet.
    pub callbacks_queued: u64,
    /// Callbacks invoked.
    pub callbacks_invoked: u64,
    /// Batches the callback thread processed (one grace period each).
    pub batches: u64,
    /// Most callbacks invoked after one grace period.
    pub largest_batch: u64,
    /// Most callbacks queued and not yet invoked, as seen at backlog checks.
    pub backlog_high_water: u64,
    /// Times the soft backlog limit started a grace period early.
    pub expedited: u64,
    /// Times a caller waited at the hard backlog limit.
    pub throttled: u64,
    /// Heavy barriers issued: `membarrier` calls, each an interrupt on
    /// every CPU running one of the process's threads (or SeqCst fences in
    /// the fallback mode). Grace periods' full protocol issues one, plus
    /// one per sleep of its wait for readers; taking threads' deferred-drop
    /// bags (the callback thread's flush of idle threads, `barrier`)
    /// issues one per flush.
    pub heavy_barriers: u64,
    /// Reader slots in use now: threads registered as readers, plus the
    /// slots holding a section that outlived its thread's registration or
    /// that a thread-local destructor opened after it (see `read_lock`).
    pub readers: usize,
    /// The barrier in use.
    pub mode: BarrierMode,
}

/// The counters now.
pub fn stats() -> Stats {
    // Fast and owner-run first, with acquire: each was counted after its
    // grace period (see `grace::run_with` and `grace::try_expedite`), so
    // the total read next is never below either.
    let fast_grace_periods = grace::FAST_GRACE_PERIODS.load(Ordering::Acquire);
    let owner_grace_periods = grace::OWNER_GRACE_PERIODS.load(Ordering::Acquire);
    let grace_periods = grace::GP_COUNT.load(Ordering::Relaxed);
    let total = grace::GP_NANOS_TOTAL.load(Ordering::Relaxed);
    // Invoked first, with acquire: whatever was invoked by then counted as
    // queued before it could be invoked (see `Queue::push`), so the
    // queued total read next is never below it.
    let callbacks_invoked = callback::INVOKED.load(Ordering::Acquire);
    let callbacks_queued = callback::queued_total();
    Stats {
        grace_periods,
        owner_grace_periods,
        owner_grace_periods_given_up: grace::OWNER_GIVEN_UP.load(Ordering::Relaxed),
        fast_grace_periods,
        gp_latency_mean: Duration::from_nanos(total.checked_div(grace_periods).unwrap_or(0)),
        gp_latency_max: Duration::from_nanos(grace::GP_NANOS_MAX.load(Ordering::Relaxed)),
        callbacks_queued,
        callbacks_invoked,
        batches: callback::BATCHES.load(Ordering::Relaxed),
        largest_batch: callback::LARGEST_BATCH.load(Ordering::Relaxed),
        backlog_high_water: callback::BACKLOG_HIGH.load(Ordering::Relaxed),
        expedited: callback::EXPEDITED.load(Ordering::Relaxed),
        throttled: callback::THROTTLED.load(Ordering::Relaxed),
        heavy_barriers: crate::fence::HEAVY_BARRIERS.load(Ordering::Relaxed),
        readers: crate::registry::registered(),
        mode: match crate::fence::mode() {
            FenceMode::Membarrier => BarrierMode::Membarrier,
            FenceMode::SeqCst => BarrierMode::Fence,
        },
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "barrier mode:        {}", self.mode)?;
        writeln!(
            f,
            "grace periods:       {} ({} run by deferring threads, {} given up; {} by the fast \
             path)",
            self.grace_periods,
            self.owner_grace_periods,
            self.owner_grace_periods_given_up,
            self.fast_grace_periods
        )?;
        writeln!(
            f,
            "grace-period latency: mean {:.1?}, max {:.1?}",
            self.gp_latency_mean, self.gp_latency_max
        )?;
        writeln!(
            f,
            "callbacks:           {} queued, {} invoked, {} waiting (deferred drops count once \
             their thread's batch of {} fills or is handed over)",
            self.callbacks_queued,
            self.callbacks_invoked,
            self.callbacks_queued.saturating_sub(self.callbacks_invoked),
            crate::bag::BAG_CAPACITY
        )?;
        writeln!(
            f,
            "batches:             {} (largest {})",
            self.batches, self.largest_batch
        )?;
        writeln!(
            f,
            "backlog:             high-water {}, expedited {}x, throttled {}x",
            self.backlog_high_water, self.expedited, self.throttled
        )?;
        writeln!(f, "heavy barriers:      {}", self.heavy_barriers)?;
        write!(f, "registered readers:  {}", self.readers)
    }
}
