//! The updater's heavy barrier: `membarrier(2)`, or SeqCst fences on both
//! sides where the kernel lacks it (or the user asked for the fallback).
//!
//! The mode is chosen once, when the first reader registers or the first
//! updater runs, and never changes: readers that skipped their fence under
//! one mode must not meet an updater of the other.

use crossbeam_utils::CachePadded;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::gp::FenceMode;

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Set by [`force_fence_fallback`] before initialisation.
static FORCED: AtomicU8 = AtomicU8::new(0);
/// The chosen mode, cached for the readers' fast path.
/// 0: not chosen yet, 1: membarrier, 2: fences.
static MODE: CachePadded<AtomicU8> = CachePadded::new(AtomicU8::new(0));
/// Held while the mode is chosen, and across `fork`.
static CHOOSE: crate::sync::Mutex<()> = crate::sync::Mutex::new(());

/// Environment variable that forces the SeqCst-fence fallback when
/// switched on (`1`; see [`vmtask_percpu::env_switch`] for the values it
/// takes; read once, at initialisation), as `VMTASK_PERCPU_NO_RSEQ` does
/// for vmtask-percpu.
pub const FORCE_FENCE_ENV: &str = "VMTASK_RCU_FORCE_FENCE";

/// [`force_fence_fallback`] came too late: the mode was already chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyInitialized;

impl fmt::Display for AlreadyInitialized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "vmtask_rcu: the read-side barrier mode is chosen at first use (membarrier already \
             registered); call force_fence_fallback before any RCU use",
        )
    }
}

impl std::error::Error for AlreadyInitialized {}

/// Makes readers and updaters use SeqCst fences instead of `membarrier`,
/// as on a kernel without it. Must run before any other RCU call in the
/// process; also available as `VMTASK_RCU_FORCE_FENCE=1`.
pub fn force_fence_fallback() -> Result<(), AlreadyInitialized> {
    FORCED.store(1, Ordering::SeqCst);
    match mode() {
        FenceMode::SeqCst => Ok(()),
        FenceMode::Membarrier => Err(AlreadyInitialized),
    }
}

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and touches no
    // user memory.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) }
}

/// `env_forced`: the environment variable asks for the fallback.
fn choose(env_forced: bool) -> FenceMode {
    let forced = FORCED.load(Ordering::SeqCst) != 0 || env_forced;
    if forced {
        return FenceMode::SeqCst;
    }
    let supported = membarrier(MEMBARRIER_CMD_QUERY);
    let wanted = (MEMBARRIER_CMD_PRIVATE_EXPEDITED | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
        as libc::c_long;
    if supported < 0 || supported & wanted != wanted {
        return FenceMode::SeqCst;
    }
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0 {
        return FenceMode::SeqCst;
    }
    FenceMode::Membarrier
}

/// The process-wide mode, choosing it on first call.
pub(crate) fn mode() -> FenceMode {
    fn cached() -> Option<FenceMode> {
        match MODE.load(Ordering::Acquire) {
            1 => Some(FenceMode::Membarrier),
            2 => Some(FenceMode::SeqCst),
            _ => None,
        }
    }
    if let Some(m) = cached() {
        return m;
    }
    // First, so that a fork while the mode is being chosen finds the
    // handlers that hold `CHOOSE` across it: otherwise the child would find
    // it held by a thread it does not have.
    crate::fork::register_handlers();
    // Read before taking `CHOOSE`: std holds its environment lock across
    // the `fork` of some `Command::spawn`s, whose prepare handler (ours)
    // waits for `CHOOSE`.
    let env_forced = vmtask_percpu::env_switch(FORCE_FENCE_ENV);
    // Never taken with another of the crate's locks held: callers under a
    // lock (grace periods, flushes) have registered readers, so the mode
    // was chosen before and they return above.
    let _choosing = CHOOSE.lock();
    if let Some(m) = cached() {
        return m;
    }
    let mode = choose(env_forced);
    crate::grace::GP.set_mode(mode);
    MODE.store(
        match mode {
            FenceMode::Membarrier => 1,
            FenceMode::SeqCst => 2,
        },
        Ordering::Release,
    );
    mode
}

/// Before `fork`: waits out a choice in progress and holds the lock across
/// the fork, so the child never finds it held by a thread it lacks.
pub(crate) fn before_fork() {
    std::mem::forget(CHOOSE.lock());
}

/// After `fork`, in the parent and in the child.
pub(crate) fn after_fork() {
    // SAFETY: `before_fork` locked it on this thread and leaked the guard;
    // in the child this thread is the only one.
    unsafe { CHOOSE.force_unlock() };
}

/// The mode for a reader that has registered (so `mode()` has run).
#[inline(always)]
pub(crate) fn reader_mode() -> FenceMode {
    if MODE.load(Ordering::Relaxed) == 1 {
        FenceMode::Membarrier
    } else {
        FenceMode::SeqCst
    }
}

/// Heavy barriers issued (for `stats()`).
pub(crate) static HEAVY_BARRIERS: AtomicU64 = AtomicU64::new(0);

/// `smp_mb_master()`.
pub(crate) fn heavy_barrier() {
    HEAVY_BARRIERS.fetch_add(1, Ordering::Relaxed);
    match mode() {
        FenceMode::SeqCst => std::sync::atomic::fence(Ordering::SeqCst),
        FenceMode::Membarrier => {
            if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
                // Readers skip their fences because of this call; continuing
                // without it could free memory under a reader.
                let err = std::io::Error::last_os_error();
                crate::sync::warn(format_args!(
                    "vmtask_rcu: membarrier(PRIVATE_EXPEDITED) failed after registration: {err}"
                ));
                std::process::abort();
            }
        }
    }
}
