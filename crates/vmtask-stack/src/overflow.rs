//! Overflow reports: a SIGSEGV/SIGBUS handler that recognises faults in any
//! pool's guard pages.
//!
//! Protocol:
//! - The first pool created installs the handler for SIGSEGV and SIGBUS,
//!   once per process, with `SA_ONSTACK` (an overflowed stack has no room
//!   for a handler frame). The previous actions are read first and saved;
//!   they are never written again, so the handler reads them without
//!   synchronisation beyond the `Once` that installed it.
//! - Every thread that allocates from a pool gets an alternate signal stack
//!   ([`prepare_thread`]) unless it already has one (Rust's runtime gives
//!   one to the main thread and to every `std::thread`).
//! - On a kernel-generated fault whose address lies in a guard page of a
//!   registered arena (see [`crate::arena`]), the handler writes
//!   `stack overflow: stack <base>..<limit> of <size> bytes`, then `: ` and
//!   the label from the hook, if one is set, to stderr with `write(2)` and
//!   aborts. Everything else goes to the previous handler unchanged, so
//!   Rust's own "has overflowed its stack" report still works; a previous
//!   `SIG_DFL` is restored and the fault retried, which kills the process
//!   the default way.
//!
//! The handler is async-signal-safe: atomic loads, arithmetic on a buffer on
//! its own stack, `write`, `sigaction`, `raise` and `abort`.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

use crate::arena::{self, Place};
use crate::sys;

/// Writes a label for the stack whose top is `base` into `out` and returns
/// how many bytes it wrote. Runs inside a signal handler, on the alternate
/// signal stack: see [`set_overflow_label_hook`].
pub type LabelHook = fn(base: *mut u8, out: &mut [u8]) -> usize;

static HOOK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// Sets (or with `None` clears) the hook that labels an overflowing stack in
/// the overflow report; a task runtime puts the task's name and id there.
///
/// # Safety
/// `hook` runs inside a SIGSEGV handler on a small alternate stack, at an
/// arbitrary point of the faulting thread: it must be async-signal-safe (no
/// allocation, no locks, no panics), use little stack, and only read memory
/// that stays valid, such as data the runtime keeps for the stack at `base`.
pub unsafe fn set_overflow_label_hook(hook: Option<LabelHook>) {
    HOOK.store(
        hook.map_or(std::ptr::null_mut(), |h| h as *mut ()),
        Ordering::Release,
    );
}

/// Saved `sigaction` of one signal, written once before our handler is
/// installed and read-only afterwards.
struct Previous(UnsafeCell<MaybeUninit<libc::sigaction>>);

// SAFETY: written once inside `INSTALL.call_once`, before the handler that
// reads it exists; read-only afterwards.
unsafe impl Sync for Previous {}

const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];
static PREVIOUS: [Previous; 2] = [
    Previous(UnsafeCell::new(MaybeUninit::uninit())),
    Previous(UnsafeCell::new(MaybeUninit::uninit())),
];
static INSTALL: Once = Once::new();

/// Installs the overflow handler for the process (idempotent).
pub(crate) fn install_handler() {
    INSTALL.call_once(|| {
        for (sig, prev) in SIGNALS.iter().zip(&PREVIOUS) {
            // SAFETY: querying an action writes a whole sigaction into our
            // static; nothing reads it before the handler is installed below.
            unsafe { libc::sigaction(*sig, std::ptr::null(), (*prev.0.get()).as_mut_ptr()) };
            // SAFETY: an all-zero sigaction is a valid value to fill in.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_fault
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            // SAFETY: `action.sa_mask` is a valid sigset to initialise.
            unsafe { libc::sigemptyset(&mut action.sa_mask) };
            // SAFETY: `on_fault` has the SA_SIGINFO signature and is
            // async-signal-safe.
            unsafe { libc::sigaction(*sig, &action, std::ptr::null_mut()) };
        }
    });
}

extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // A positive si_code means the kernel raised it for a fault at si_addr;
    // a signal sent with kill() carries no address.
    if code > 0 {
        if let Some(Place::Guard(slot)) = arena::lookup(addr) {
            report(slot.base, slot.limit);
            // SAFETY: abort is async-signal-safe and never returns.
            unsafe { libc::abort() };
        }
    }
    chain(sig, code, info, ctx);
}

fn chain(sig: libc::c_int, code: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let index = usize::from(sig != SIGNALS[0]);
    // SAFETY: written during installation, before this handler could run;
    // read-only since.
    let prev = unsafe { (*PREVIOUS[index].0.get()).assume_init_ref() };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: an all-zero sigaction with SIG_DFL is the default action.
        let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
        default.sa_sigaction = libc::SIG_DFL;
        // SAFETY: sigaction and raise are async-signal-safe. For a fault,
        // returning retries the access, which now kills the process the
        // default way; a signal from kill() is raised again (it stays
        // pending until this handler returns).
        unsafe {
            libc::sigaction(sig, &default, std::ptr::null_mut());
            if code <= 0 {
                libc::raise(sig);
            }
        }
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: with SA_SIGINFO the previous handler has this signature;
        // we pass it the arguments the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal
        // number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}

/// A fixed buffer for building the report without allocating.
struct Message {
    buf: [u8; 384],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_hex(&mut self, mut v: usize) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[v & 15];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }

    fn push_decimal(&mut self, mut v: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

fn report(base: usize, limit: usize) {
    let mut msg = Message {
        buf: [0; 384],
        len: 0,
    };
    msg.push(b"stack overflow: stack ");
    msg.push_hex(base);
    msg.push(b"..");
    msg.push_hex(limit);
    msg.push(b" of ");
    msg.push_decimal(base - limit);
    msg.push(b" bytes");
    let hook = HOOK.load(Ordering::Acquire);
    if !hook.is_null() {
        // SAFETY: HOOK only ever holds null or a `LabelHook` stored by
        // `set_overflow_label_hook`.
        let hook: LabelHook = unsafe { std::mem::transmute::<*mut (), LabelHook>(hook) };
        let mut label = [0u8; 256];
        let n = hook(base as *mut u8, &mut label).min(label.len());
        msg.push(b": ");
        msg.push(&label[..n]);
    }
    msg.push(b"\n");
    let mut out = &msg.buf[..msg.len];
    while !out.is_empty() {
        // SAFETY: write(2) is async-signal-safe; `out` is a valid buffer.
        let n = unsafe { libc::write(libc::STDERR_FILENO, out.as_ptr().cast(), out.len()) };
        if n <= 0 {
            break;
        }
        out = &out[n as usize..];
    }
}

/// Usable bytes of an alternate signal stack this crate installs.
const ALT_STACK_SIZE: usize = 64 * 1024;

/// An alternate signal stack this crate mapped for the current thread,
/// removed when the thread exits.
struct AltStack {
    map: usize,
    len: usize,
}

impl Drop for AltStack {
    fn drop(&mut self) {
        let disable = libc::stack_t {
            ss_sp: std::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: disabling the thread's alternate stack before unmapping
        // it; the thread is exiting and not inside a signal handler.
        unsafe { libc::sigaltstack(&disable, std::ptr::null_mut()) };
        // SAFETY: the mapping is ours and no longer the signal stack.
        unsafe { sys::unmap(self.map, self.len) };
    }
}

thread_local! {
    static PREPARED: Cell<bool> = const { Cell::new(false) };
    static ALT_STACK: RefCell<Option<AltStack>> = const { RefCell::new(None) };
}

/// Makes sure the calling thread has an alternate signal stack, so an
/// overflow of a pool stack running on it can be reported.
/// [`StackPool::alloc`](crate::StackPool::alloc) calls it; call it yourself
/// on threads that run pool stacks allocated elsewhere. Cheap after the
/// first call on a thread.
#[inline]
pub fn prepare_thread() {
    if !PREPARED.get() {
        prepare_thread_slow();
    }
}

#[cold]
fn prepare_thread_slow() {
    PREPARED.set(true);
    let mut current = libc::stack_t {
        ss_sp: std::ptr::null_mut(),
        ss_flags: 0,
        ss_size: 0,
    };
    // SAFETY: querying the current alternate stack writes into `current`.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut current) };
    if current.ss_flags & libc::SS_DISABLE == 0 {
        return;
    }
    let page = sys::page_size();
    let len = page + ALT_STACK_SIZE;
    // Without memory for a signal stack the thread still works; only an
    // overflow on it would die silently instead of with a report.
    let Ok(map) = sys::reserve(len) else { return };
    let ok = sys::install_guard(map, page, false).is_ok();
    let stack = libc::stack_t {
        ss_sp: (map + page) as *mut libc::c_void,
        ss_flags: 0,
        ss_size: ALT_STACK_SIZE,
    };
    // SAFETY: `stack` describes memory we just mapped for this thread only.
    if !ok || unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) } != 0 {
        // SAFETY: the mapping is ours and not in use.
        unsafe { sys::unmap(map, len) };
        return;
    }
    // If the thread's locals are already being destroyed, the stack stays
    // installed, and mapped, until the thread is gone.
    let _ = ALT_STACK.try_with(|slot| *slot.borrow_mut() = Some(AltStack { map, len }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_formats_hex_and_decimal() {
        let mut m = Message {
            buf: [0; 384],
            len: 0,
        };
        m.push_hex(0x7f00_dead_b000);
        m.push(b" ");
        m.push_decimal(131072);
        m.push(b" ");
        m.push_hex(0);
        assert_eq!(&m.buf[..m.len], b"0x7f00deadb000 131072 0x0");
    }

    #[test]
    fn thread_without_alt_stack_gets_one() {
        // A raw pthread has no alternate signal stack, unlike std threads.
        extern "C" fn body(_: *mut libc::c_void) -> *mut libc::c_void {
            let mut before = libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: 0,
                ss_size: 0,
            };
            // SAFETY: query only.
            unsafe { libc::sigaltstack(std::ptr::null(), &mut before) };
            prepare_thread();
            let mut after = libc::stack_t {
                ss_sp: std::ptr::null_mut(),
                ss_flags: 0,
                ss_size: 0,
            };
            // SAFETY: query only.
            unsafe { libc::sigaltstack(std::ptr::null(), &mut after) };
            let ok =
                before.ss_flags & libc::SS_DISABLE != 0 && after.ss_flags & libc::SS_DISABLE == 0;
            ok as usize as *mut libc::c_void
        }
        let mut thread: libc::pthread_t = 0;
        // SAFETY: `body` has the pthread start signature and takes no data.
        let rc = unsafe {
            libc::pthread_create(&mut thread, std::ptr::null(), body, std::ptr::null_mut())
        };
        assert_eq!(rc, 0);
        let mut result = std::ptr::null_mut();
        // SAFETY: joining the thread created above, once.
        assert_eq!(unsafe { libc::pthread_join(thread, &mut result) }, 0);
        assert_eq!(
            result as usize, 1,
            "prepare_thread must install an alternate signal stack"
        );
    }
}
