//! Atomics for the grace-period protocol: `std`'s, or `loom`'s when the
//! protocol is model-checked (`RUSTFLAGS="--cfg loom" cargo test`).

#[cfg(all(loom, test))]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicUsize, Ordering};

#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicI32, AtomicUsize, Ordering};

/// A compiler-only barrier. Under loom there is no compiler to restrain,
/// and the model instead asks for a real fence where membarrier would
/// supply one (see `gp::reader_barrier`).
#[cfg(not(all(loom, test)))]
pub(crate) use std::sync::atomic::compiler_fence;

/// One turn of a busy wait.
#[inline]
pub(crate) fn spin() {
    #[cfg(all(loom, test))]
    loom::thread::yield_now();
    #[cfg(not(all(loom, test)))]
    std::hint::spin_loop();
}
