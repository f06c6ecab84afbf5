//! `ensure` and `remaining`: explicit stack reservations for code running on
//! a pool stack, instead of growth by page faults that cannot fail
//! gracefully.

use crate::arena::{self, Place};
use crate::error::StackError;
use crate::sys;

/// An address in the caller's frame, as close to the stack pointer as
/// portable Rust gets (within a few hundred bytes of it).
#[inline(never)]
fn stack_pointer() -> usize {
    let marker = 0u8;
    std::hint::black_box(&marker) as *const u8 as usize
}

/// Bytes of stack left below the current stack pointer, if the caller runs
/// on a pool stack; `None` on any other stack (a thread's own stack, say),
/// which this crate does not manage.
///
/// ```
/// use corosensei::{Coroutine, Yielder};
/// use vmtask_stack::{remaining, StackPool};
///
/// assert_eq!(remaining(), None, "a thread's own stack is not the pool's");
/// let stack = StackPool::global().alloc().unwrap();
/// let size = stack.size();
/// let mut co = Coroutine::with_stack(stack, |_: &Yielder<(), ()>, ()| remaining());
/// let left = co.resume(()).as_return().flatten().unwrap();
/// assert!(left > 0 && left < size);
/// ```
#[inline(always)]
pub fn remaining() -> Option<usize> {
    // Measured from the caller's frame, as `ensure` measures it, so that
    // `ensure(remaining()?)` in one function asks for exactly the room
    // there is (review finding: `ensure`'s deeper frame saw 48-96 bytes
    // less).
    room_at(stack_pointer())
}

fn room_at(sp: usize) -> Option<usize> {
    match arena::lookup(sp)? {
        Place::Stack(slot) => Some(sp - slot.limit),
        Place::Guard(_) => None,
    }
}

/// Makes `bytes` of stack below the current stack pointer resident now, so
/// that using them cannot fail later.
///
/// On a pool stack: [`StackError::TooLarge`] if the slot has less than
/// `bytes` left below the stack pointer; otherwise the pages are faulted in
/// with `MADV_POPULATE_WRITE`, and a kernel that cannot find the memory
/// gives [`StackError::OutOfMemory`] here instead of a SIGSEGV or an OOM kill
/// at some later call. That needs a kernel that fails the charge rather
/// than kill: past a memory cgroup's limit with its OOM killer off (cgroup
/// v1 `memory.oom_control`), or with no process left to kill. Where the
/// OOM killer may run (a cgroup v2 `memory.max`, the whole machine out of
/// memory), it runs during this call, as it would have at the later page
/// fault: the failure comes sooner, not as an `Err` (review finding).
/// Where the kernel lacks `MADV_POPULATE_WRITE`
/// (before Linux 5.14, or a seccomp filter refuses it), the pages are
/// touched instead, one write fault each, and running out of memory there
/// is the kernel's to handle as for any page fault. On any other stack it
/// does nothing and returns `Ok(())`: thread stacks are the kernel's to
/// grow.
///
/// A failed reservation gives back what it got: before returning
/// [`StackError::OutOfMemory`], the pages of the request that it had
/// already faulted in are released again (`MADV_DONTNEED`), so the process
/// (or its memory cgroup) is not left at its limit, where the next ordinary
/// page fault would fail or, with the cgroup's OOM killer disabled, wait.
/// Only whole pages below the page holding the stack pointer are released,
/// and not the 8 KiB just below that page either (room for the frames of
/// the release call itself): nothing lives in them, as they are stack
/// below the stack pointer, and they read zeros when next used.
///
/// **`Ok` off a pool stack is no guarantee:** check
/// [`remaining`]`().is_some()` first where the answer matters.
///
/// ```
/// use corosensei::{Coroutine, Yielder};
/// use vmtask_stack::{ensure, StackError, StackPool};
///
/// let mut co = Coroutine::with_stack(
///     StackPool::global().alloc().unwrap(),
///     |_: &Yielder<(), ()>, ()| {
///         // 64 KiB of the 128 KiB stack, resident before a deep call.
///         ensure(64 * 1024).expect("room and memory for 64 KiB");
///         // More than the slot holds: an error now, not an overflow later.
///         matches!(ensure(1 << 20), Err(StackError::TooLarge { .. }))
///     },
/// );
/// assert_eq!(co.resume(()).as_return(), Some(true));
/// ```
#[inline(always)]
pub fn ensure(bytes: usize) -> Result<(), StackError> {
    // From the caller's frame, as in `remaining`.
    ensure_at(stack_pointer(), bytes)
}

fn ensure_at(sp: usize, bytes: usize) -> Result<(), StackError> {
    let Some(Place::Stack(slot)) = arena::lookup(sp) else {
        return Ok(());
    };
    let available = sp - slot.limit;
    if bytes > available {
        return Err(StackError::TooLarge {
            requested: bytes,
            available,
            stack_size: slot.base - slot.limit,
        });
    }
    let low = sys::page_floor(sp - bytes);
    let high = sys::page_ceil(sp).min(slot.base);
    let result = prefault(low, high - low);
    if let Err(StackError::OutOfMemory { .. }) = result {
        release_below_frames(low);
    }
    result
}

fn prefault(addr: usize, len: usize) -> Result<(), StackError> {
    let available = populate_available();
    if available == Ok(false) {
        touch_pages(addr, len);
        return Ok(());
    }
    match sys::populate_write(addr, len) {
        Ok(()) => Ok(()),
        Err(libc::ENOMEM | libc::EAGAIN) => Err(StackError::OutOfMemory { bytes: len }),
        // The probe could not tell (no memory for its scratch mapping),
        // and the kernel turns out to lack the advice.
        Err(libc::EINVAL | libc::ENOSYS | libc::EPERM) if available.is_err() => {
            touch_pages(addr, len);
            Ok(())
        }
        Err(errno) => Err(StackError::MapFailed {
            what: "pre-fault stack pages (MADV_POPULATE_WRITE)",
            bytes: len,
            errno,
        }),
    }
}

#[cfg(test)]
thread_local! {
    /// Test hook: this thread's `ensure` behaves as on a kernel without
    /// `MADV_POPULATE_WRITE`.
    static NO_POPULATE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the kernel has `MADV_POPULATE_WRITE`; `Err` when the probe
/// could not tell (see `sys::Probe`).
fn populate_available() -> Result<bool, i32> {
    #[cfg(test)]
    if NO_POPULATE.with(std::cell::Cell::get) {
        return Ok(false);
    }
    sys::populate_supported()
}

/// The fallback where the kernel lacks `MADV_POPULATE_WRITE` (before
/// Linux 5.14, or a seccomp filter refuses it): write-faults each page of
/// `[addr, addr + len)` by reading one byte and writing the same value
/// back. Out of memory then is the kernel's to handle (a SIGSEGV or the OOM
/// killer), as for any page fault: only the advice can report it.
fn touch_pages(addr: usize, len: usize) {
    let page = sys::page_size();
    for at in (addr..addr + len).step_by(page) {
        let byte = at as *mut u8;
        // Why this holds: the range is this thread's own pool stack
        // (checked against the slot by `ensure`), mapped read-write; bytes
        // above the stack pointer belong to this thread's frames, which
        // nothing else writes while it runs here, and the write puts back
        // the value just read; bytes below it are dead.
        // SAFETY: `byte` is mapped, writable, and rewritten unchanged.
        unsafe { byte.write_volatile(byte.read_volatile()) };
    }
}

/// Stack kept resident below the page holding the measured stack pointer
/// when a failed `ensure` gives its pages back: room for the frames of the
/// release call (`sys::release`, `madvise` and libc's wrapper, with its
/// red zone), which lie below the measured address. In debug builds they
/// reach past the page holding it (the unit test below crashes without
/// this margin); optimized, they stay within it.
const KEEP_BELOW_SP: usize = 8 * 1024;

/// Releases the pages of `[low, ..)` that lie wholly below this call's
/// frames: after a failed `MADV_POPULATE_WRITE` they are resident but
/// unused, and keeping them would leave the memory cgroup at its limit.
///
/// The top of the range is measured here, not in `ensure`: `ensure`'s
/// measurement is an address in a frame that has since returned, and the
/// frames below it (`prefault` and the `madvise` call) went deeper. The
/// measured address is in `stack_pointer`'s frame, below this function's;
/// the page holding it and the `KEEP_BELOW_SP` below that stay, so the
/// release call's own frames, which start above the measured address and
/// use far less than `KEEP_BELOW_SP`, lie on pages it does not drop.
#[inline(never)]
fn release_below_frames(low: usize) {
    let sp = stack_pointer();
    let high = sys::page_floor(sp).saturating_sub(sys::page_ceil(KEEP_BELOW_SP));
    if high > low {
        // Locked pages merely stay resident.
        let _ = sys::release(low, high - low);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, StackPool};
    use corosensei::{Coroutine, CoroutineResult, Yielder};

    /// Runs `f` `depth` small frames further down the stack.
    #[inline(never)]
    fn at_depth(depth: usize, f: &mut dyn FnMut()) {
        let pad = std::hint::black_box([depth as u8; 48]);
        if depth == 0 {
            f();
        } else {
            at_depth(depth - 1, f);
        }
        assert!(std::hint::black_box(pad).iter().all(|&b| b == depth as u8));
    }

    /// Runs `f` on a fresh 256 KiB pool stack and returns its result.
    fn on_pool_stack<R: 'static>(f: impl FnOnce() -> R + 'static) -> R {
        let pool = StackPool::new(Config {
            stack_size: 256 * 1024,
            ..Config::default()
        })
        .unwrap();
        let mut co =
            Coroutine::with_stack(pool.alloc().unwrap(), move |_: &Yielder<(), ()>, ()| f());
        let CoroutineResult::Return(result) = co.resume(()) else {
            panic!("coroutine yielded")
        };
        result
    }

    /// The release after a failed `ensure` drops the request's pages below
    /// the caller's frames and leaves the pages holding them alone, however
    /// the stack pointer lies within its page: from a range of depths that
    /// spans several pages, the release call must return (its own return
    /// addresses intact) and the callers' frames keep their contents.
    #[test]
    fn release_keeps_the_live_frames() {
        let page = sys::page_size();
        let bad = on_pool_stack(move || {
            let mut bad = Vec::new();
            for depth in 0..160 {
                at_depth(depth, &mut || {
                    let live = std::hint::black_box([0x5au8; 256]);
                    let sp = stack_pointer();
                    let low = sys::page_floor(sp - 128 * 1024);
                    let top = sys::page_ceil(sp);
                    sys::populate_write(low, top - low).unwrap();
                    release_below_frames(low);
                    // The measurement inside is less than a page deeper
                    // than ours.
                    let released = sys::page_floor(sp) - page - sys::page_ceil(KEEP_BELOW_SP);
                    let frame_page = sys::page_floor(sp);
                    let below = sys::resident_pages(low, released - low);
                    let kept = sys::resident_pages(frame_page, top - frame_page);
                    let intact = std::hint::black_box(live).iter().all(|&b| b == 0x5a);
                    if below != 0 || kept != (top - frame_page) / page || !intact {
                        bad.push((depth, sp % page, below, kept, intact));
                    }
                });
            }
            bad
        });
        assert!(
            bad.is_empty(),
            "(depth, sp offset, resident below, resident frame pages, intact): {bad:?}"
        );
    }

    /// Without `MADV_POPULATE_WRITE`, `ensure` faults the pages in by
    /// touching them: the request's pages become resident, and the frames
    /// above the stack pointer keep their contents.
    #[test]
    fn ensure_touches_the_pages_where_the_kernel_cannot_populate() {
        let page = sys::page_size();
        let (before, result, after, pages, intact) = on_pool_stack(move || {
            NO_POPULATE.with(|no| no.set(true));
            let live = std::hint::black_box([0x5au8; 512]);
            let sp = stack_pointer();
            let want = 128 * 1024;
            let low = sys::page_floor(sp - want);
            let before = sys::resident_pages(low, sys::page_floor(sp) - low);
            let result = ensure(want);
            let after = sys::resident_pages(low, sys::page_floor(sp) - low);
            let intact = std::hint::black_box(live).iter().all(|&b| b == 0x5a);
            NO_POPULATE.with(|no| no.set(false));
            (
                before,
                result,
                after,
                (sys::page_floor(sp) - low) / page,
                intact,
            )
        });
        assert_eq!(result, Ok(()));
        assert!(
            before < pages,
            "the pages were resident before: {before} of {pages}"
        );
        assert_eq!(after, pages, "resident after ensure: {after} of {pages}");
        assert!(intact, "the caller's frame was changed");
    }
}
