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
pub fn remaining() -> Option<usize> {
    let sp = stack_pointer();
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
/// at some later call. On any other stack it does nothing and returns
/// `Ok(())`: thread stacks are the kernel's to grow.
pub fn ensure(bytes: usize) -> Result<(), StackError> {
    let sp = stack_pointer();
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
    prefault(low, high - low)
}

fn prefault(addr: usize, len: usize) -> Result<(), StackError> {
    sys::populate_write(addr, len).map_err(|errno| match errno {
        libc::ENOMEM | libc::EAGAIN => StackError::OutOfMemory { bytes: len },
        errno => StackError::MapFailed {
            what: "pre-fault stack pages (MADV_POPULATE_WRITE)",
            bytes: len,
            errno,
        },
    })
}
