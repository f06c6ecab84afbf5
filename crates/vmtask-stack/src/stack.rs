//! `Stack`: one allocated stack, owned; freed synchronously on drop.

use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;

use crate::pool::PoolInner;

/// A stack from a [`StackPool`](crate::StackPool).
///
/// ```text
///   guard_range().start   limit()                          base()
///   |<---- guard ---->|<------------ size() ------------>|
///   low addresses                              high addresses
/// ```
///
/// Stacks grow down from [`base`](Stack::base). Dropping a `Stack` frees it
/// at once (no grace period): parked on the dropping thread for its next
/// allocation, else pushed on the current CPU's magazine. Nothing may run
/// on it any more by then, which the borrow checker enforces for safe
/// users such as `corosensei::Coroutine`, which owns its stack.
pub struct Stack {
    top: NonNull<u8>,
    pool: NonNull<PoolInner>,
}

// SAFETY: a Stack is a unique handle to a slot's memory plus a pointer to a
// `Sync` pool; it may be freed from any thread.
unsafe impl Send for Stack {}
// SAFETY: `&Stack` only reads immutable geometry.
unsafe impl Sync for Stack {}

impl Stack {
    /// # Safety
    /// `top` must be the top of a free stack of `pool`, handed over to the
    /// new `Stack`, and `pool` must stay valid while the `Stack` lives.
    pub(crate) unsafe fn from_raw(top: NonNull<u8>, pool: NonNull<PoolInner>) -> Stack {
        Stack { top, pool }
    }

    /// The stack's top and pool, without freeing it: the caller now owns
    /// the slot (for tests that play a free's steps by hand).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn into_raw(self) -> (NonNull<u8>, NonNull<PoolInner>) {
        let this = std::mem::ManuallyDrop::new(self);
        (this.top, this.pool)
    }

    fn pool(&self) -> &PoolInner {
        // SAFETY: the pool outlives its stacks (`from_raw`'s contract; a
        // pool dropped with stacks out lives on until the last comes back).
        unsafe { self.pool.as_ref() }
    }

    /// The top of the stack: one past its highest usable byte, page-aligned.
    pub fn base(&self) -> *mut u8 {
        self.top.as_ptr()
    }

    /// The lowest usable address; the guard lies just below it.
    pub fn limit(&self) -> *mut u8 {
        self.top.as_ptr().wrapping_sub(self.size())
    }

    /// Usable bytes.
    pub fn size(&self) -> usize {
        self.pool().layout.stack_size
    }

    /// The guard pages below [`limit`](Stack::limit); any access faults.
    pub fn guard_range(&self) -> Range<*mut u8> {
        self.limit().wrapping_sub(self.pool().layout.guard_size)..self.limit()
    }
}

impl Drop for Stack {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: `pool` is this stack's pool, valid while the stack lives
        // (`from_raw`'s contract); the stack is not used after.
        unsafe { PoolInner::free(self.pool, self.top) };
    }
}

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Lowest address first, as a Rust range reads (the overflow report
        // keeps the issue's `base..limit` order, top first).
        f.debug_struct("Stack")
            .field("limit", &self.limit())
            .field("base", &self.base())
            .field("size", &self.size())
            .finish()
    }
}

/// corosensei's `limit` is the lowest address *including* the guard, as its
/// contract asks; the inherent [`Stack::limit`] is the lowest usable one.
///
/// # Safety
/// Every pool stack has a guard of at least one page below its usable
/// memory, at least one page (`MIN_STACK_SIZE`) of usable memory, and
/// page-aligned (hence `STACK_ALIGNMENT`-aligned) bounds.
#[cfg(feature = "corosensei")]
// SAFETY: see the `# Safety` section above.
unsafe impl corosensei::stack::Stack for Stack {
    #[inline]
    fn base(&self) -> corosensei::stack::StackPointer {
        corosensei::stack::StackPointer::new(self.top.as_ptr() as usize)
            .expect("stack top is non-null")
    }

    #[inline]
    fn limit(&self) -> corosensei::stack::StackPointer {
        corosensei::stack::StackPointer::new(self.guard_range().start as usize)
            .expect("guard start is non-null")
    }
}
