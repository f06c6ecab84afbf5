//! Overflow reports: a SIGSEGV/SIGBUS handler that recognises faults in any
//! pool's guard pages.
//!
//! Protocol:
//! - The first pool created installs the handler for SIGSEGV and SIGBUS,
//!   once per process, with `SA_ONSTACK` (an overflowed stack has no room
//!   for a handler frame). The previous actions are read first and saved;
//!   they are never written again once ours is installed, so the handler
//!   reads them without synchronisation (a fork child whose parent was
//!   installing installs again, skipping a signal that has ours already).
//!   A handler another thread installs between the query and ours is put
//!   back, as if it came after ours (which it then bypasses). The handler
//!   writes one flag per signal, set when a one-shot (`SA_RESETHAND`)
//!   previous handler has had its one call, the flag that lets one report
//!   at a time through, and, to let a fault kill the process as it would
//!   have, the signal's action back to `SIG_DFL`.
//! - The thread's mask: a fault on a thread that blocks SIGSEGV or SIGBUS
//!   kills the process at once, with no handler run (the kernel's rule for
//!   synchronous faults). Blocking them avoids nothing else, so preparing
//!   a thread for pool stacks ([`prepare_thread`]) unblocks both: worker
//!   threads often block every signal when they start.
//! - Every thread that allocates from a pool gets an alternate signal stack
//!   ([`prepare_thread`]) unless it already has one (Rust's runtime gives
//!   one to the main thread and to every `std::thread`), and keeps one until
//!   every thread-local destructor has run: see "Alternate stacks" below.
//! - On a kernel-generated fault whose address, or else the interrupted
//!   stack pointer (x86_64 and aarch64), lies in a guard page of a
//!   registered arena (see [`crate::arena`]), the handler writes
//!   `stack overflow: stack <base>..<limit> of <size> bytes`, then `: ` and
//!   the label from the hook, if one is set, to stderr with `write(2)` and
//!   aborts. A fault address in a guard counts only if the interrupted
//!   stack pointer is in that same slot (its guard or its stack) or less
//!   than a slot below its guard (a frame bigger than the guard jumped
//!   it), and the slot has been carved: a stray or dangling pointer into
//!   the guard of a slot never carved (guard markers are installed ahead
//!   of the carve; `mprotect` guards are made one per carve, and an
//!   uncarved slot's memory is then plain read-write), or into a guard
//!   from code on a stack more than a slot below, is an ordinary fault. One case cannot be told apart by addresses:
//!   code on a stack that writes just past its own top hits the guard of
//!   the slot above, as a frame of that slot's stack that jumped its guard
//!   would, and is reported as that stack's overflow if it was carved.
//!   Reports do not interleave: a second thread that overflows while the
//!   first reports waits (about 2 s at most) for the abort. Everything else
//!   is delivered to the previous action as the kernel would have
//!   delivered it (see [`on_fault`]), so Rust's own "has overflowed its
//!   stack" report still works. One difference remains: a previous handler
//!   installed without `SA_ONSTACK` runs on the thread's alternate stack
//!   (ours is 64 KiB; the one Rust gives its threads is about
//!   `AT_MINSIGSTKSZ`, 12 KiB on a machine with AMX), not on the
//!   interrupted stack. Running it there by switching stacks was tried and
//!   dropped: unwinders (crash reporters' backtraces) could not walk
//!   through the switch, and a handler leaving with `siglongjmp` left the
//!   alternate stack cut short. A crash handler that needs more room
//!   should bring its own alternate stack and use `SA_ONSTACK`.
//! - A SIGSEGV or SIGBUS action installed after the first pool replaces
//!   ours: overflows are then reported only if that handler calls the
//!   action it replaced (ours) with its `(sig, info, context)`, and it has
//!   `SA_ONSTACK` (without it the kernel cannot push its frame on an
//!   overflowed stack and kills the process silently). Crash reporters
//!   that chain to the previous handler do both; install others first.
//!
//! The handler is async-signal-safe: atomic loads and swaps, arithmetic on
//! a buffer on its own stack, `write`, `sigaction`, `pthread_sigmask`,
//! `raise` and `abort`.
//!
//! Alternate stacks. A pool stack can run in a thread-local destructor (a
//! runtime's worker state dropping its coroutines, say), so the thread's
//! alternate stack must outlive them all; Rust's own is gone by then, as
//! `std` removes it when the thread's main function returns. So:
//! - [`prepare_thread`] installs one of ours if the thread has none, and
//!   registers a thread-local ([`RearmAtExit`]) whose destructor installs
//!   one of ours if the thread has none by then. Destructors of
//!   thread-locals first used before the thread's first pool allocation
//!   run after it, covered either way; those of later ones run before it,
//!   covered only on threads whose alternate stack is ours from the start.
//! - Ours is taken back in a pthread-key destructor ([`put_alt_stack`]),
//!   which glibc runs after every thread-local destructor: disabled with
//!   `SS_DISABLE` if it is still the thread's, then kept as a spare for the
//!   next thread rather than unmapped, so memory stays bounded by the most
//!   threads that held one at once. One that another owner has replaced,
//!   or that the thread is running on, is leaked instead (better to leak a
//!   64 KiB stack than to hand out one that a signal may still land on).

use std::cell::{Cell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::arena::{self, Place};
use crate::sys;

/// Writes a label for the stack whose top is `base` into `out` (256 bytes;
/// a longer label must be cut, not sliced past the end) and returns how
/// many bytes it wrote. Runs inside a signal handler, on the alternate
/// signal stack: see [`set_overflow_label_hook`].
pub type LabelHook = fn(base: *mut u8, out: &mut [u8]) -> usize;

static HOOK: AtomicPtr<()> = AtomicPtr::new(std::ptr::null_mut());

/// `SEGV_MTEAERR` (Linux's generic `si_code` for SIGSEGV; `libc` does not
/// name it on every target).
const SEGV_MTEAERR: libc::c_int = 8;

/// Sets (or with `None` clears) the hook that labels an overflowing stack in
/// the overflow report; a task runtime puts the task's name and id there.
///
/// # Safety
/// `hook` runs inside a SIGSEGV handler on a small alternate stack, at an
/// arbitrary point of the faulting thread: it must be async-signal-safe (no
/// allocation, no locks, no panics: a panic runs the process's panic hook
/// and a backtrace inside the signal handler, which allocate and may hang
/// or overflow the alternate stack), use little stack (on a `std` thread
/// the alternate stack is Rust's, `max(SIGSTKSZ, AT_MINSIGSTKSZ)` bytes, of
/// which the kernel's frame and this handler take about 5.5 KiB with
/// AVX-512 state), and only read memory
/// that stays valid, such as data the runtime keeps for the stack at `base`.
/// The report's first part is written before the hook runs, so a hook that
/// faults anyway loses only the label.
pub unsafe fn set_overflow_label_hook(hook: Option<LabelHook>) {
    HOOK.store(
        hook.map_or(std::ptr::null_mut(), |h| h as *mut ()),
        Ordering::Release,
    );
}

/// Saved `sigaction` of one signal, written once before our handler is
/// installed and read-only afterwards.
struct Previous(UnsafeCell<MaybeUninit<libc::sigaction>>);

// SAFETY: written once by `install_actions`, before the handler that
// reads it is installed; read-only afterwards.
unsafe impl Sync for Previous {}

const SIGNALS: [libc::c_int; 2] = [libc::SIGSEGV, libc::SIGBUS];
static PREVIOUS: [Previous; 2] = [
    Previous(UnsafeCell::new(MaybeUninit::uninit())),
    Previous(UnsafeCell::new(MaybeUninit::uninit())),
];
/// Per signal: a one-shot (`SA_RESETHAND`) previous handler has been called.
static FIRED: [AtomicBool; 2] = [const { AtomicBool::new(false) }; 2];
/// 0: not installed; the pid + 1 of a process installing now; `u64::MAX`:
/// installed. Not a `Once`: a fork while another thread installs would
/// leave the child a `Once` that never completes (see
/// `sys::register_fork_child_handler`); such a child installs again.
static INSTALL: AtomicU64 = AtomicU64::new(0);

/// Takes `word`, a lock that survives `fork`: 0 when free, else the
/// pid + 1 of the process whose thread holds it. Waits while a thread of
/// this process holds it; takes it over from another process (a parent
/// that forked us while one of its threads held it, a thread the child
/// does not have). Returns `false`, without taking it, once `word` reads
/// `done`.
fn take_fork_safe(word: &AtomicU64, done: u64) -> bool {
    // SAFETY: getpid has no preconditions.
    let me = u64::from(unsafe { libc::getpid() } as u32) + 1;
    loop {
        let seen = word.load(Ordering::Acquire);
        if seen == done {
            return false;
        }
        if seen == me {
            // Another thread of this process holds it.
            std::thread::yield_now();
            continue;
        }
        if word
            .compare_exchange(seen, me, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return true;
        }
    }
}

/// Installs the overflow handler for the process (idempotent).
pub(crate) fn install_handler() {
    const DONE: u64 = u64::MAX;
    if take_fork_safe(&INSTALL, DONE) {
        install_actions();
        INSTALL.store(DONE, Ordering::Release);
    }
}

fn install_actions() {
    FRAME_ROOM.store(frame_room(), Ordering::Relaxed);
    let ours =
        on_fault as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    for (sig, prev) in SIGNALS.iter().zip(&PREVIOUS) {
        // SAFETY: an all-zero sigaction is a valid value to query into.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: querying an action.
        unsafe { libc::sigaction(*sig, std::ptr::null(), &mut current) };
        if current.sa_sigaction == ours {
            // A fork child whose parent got this far: PREVIOUS was
            // written before ours was installed, and a handler may read it.
            continue;
        }
        // SAFETY: ours is not installed for `sig`, so nothing reads the
        // static; a whole sigaction is written into it.
        unsafe { (*prev.0.get()).write(current) };
        // SAFETY: written just above.
        let prev = unsafe { (*prev.0.get()).assume_init_ref() };
        // SAFETY: an all-zero sigaction is a valid value to fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = ours;
        // A signal sent with kill() interrupts a blocking system call
        // now that a handler runs for it; SA_RESTART restarts the calls
        // that restart, as they would under an ignored action or a
        // previous handler with SA_RESTART.
        let restart = if prev.sa_sigaction == libc::SIG_IGN {
            libc::SA_RESTART
        } else {
            prev.sa_flags & libc::SA_RESTART
        };
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | restart;
        // SAFETY: `action.sa_mask` is a valid sigset to initialise.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: an all-zero sigaction is a valid value to query into.
        let mut replaced: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: `on_fault` has the SA_SIGINFO signature and is
        // async-signal-safe.
        unsafe { libc::sigaction(*sig, &action, &mut replaced) };
        if replaced.sa_sigaction != prev.sa_sigaction {
            // Another thread installed its handler between the query and
            // ours: put it back, as if it had come after ours, rather than
            // lose it without a trace.
            // SAFETY: reinstalling the action the kernel just gave back.
            unsafe { libc::sigaction(*sig, &replaced, std::ptr::null_mut()) };
        }
    }
}

/// The handler for SIGSEGV and SIGBUS.
///
/// A fault in a guard page is reported and aborts. Anything else goes to
/// the action that was in place before ours, as the kernel would have
/// delivered it:
/// - A handler runs with its `sa_mask` added to the blocked signals and,
///   unless it has `SA_NODEFER`, the signal itself blocked; it is called
///   with `(sig, info, context)` if it has `SA_SIGINFO`, with `(sig)`
///   otherwise. With `SA_RESETHAND` it is called once; later deliveries
///   take the default action, as if the kernel had reset it to `SIG_DFL`
///   (ours stays installed, so overflows are still reported). It runs on
///   the alternate stack even without `SA_ONSTACK`: there is no leaving it.
/// - `SIG_DFL`: the action becomes `SIG_DFL` and the signal is delivered
///   again, which kills the process the default way: a fault by returning,
///   which retries the faulting access, a sent signal by raising it.
/// - `SIG_IGN`: a sent signal is ignored. A fault is not: the kernel resets
///   an ignored action to `SIG_DFL` for a synchronous fault and kills, and
///   so does this handler, as for `SIG_DFL`.
///
/// A fault is a signal the kernel raised for the faulting instruction:
/// `si_code > 0`, except SIGBUS with `BUS_MCEERR_AO`, a machine-check
/// report that the kernel sends like kill() does, and SIGSEGV with
/// `SEGV_MTEAERR`, an asynchronous tag-check fault (aarch64 MTE) reported
/// on a return to user space, which no retried instruction repeats (a
/// review finding: retrying it under `SIG_DFL` let the process go on). A sent signal has
/// `si_code <= 0` (`SI_USER` from kill, `SI_QUEUE` from sigqueue,
/// `SI_TKILL` from tgkill and raise).
extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // A caller that chains to us by hand may pass no siginfo: a sent
    // signal, then, for all we can tell.
    let (code, addr) = if info.is_null() {
        (libc::SI_USER, 0)
    } else {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO
        // handler, and so must a caller chaining to us with one.
        unsafe { ((*info).si_code, (*info).si_addr() as usize) }
    };
    let fault = code > 0
        && !(sig == libc::SIGBUS && code == libc::BUS_MCEERR_AO)
        && !(sig == libc::SIGSEGV && code == SEGV_MTEAERR);
    // Only a fault carries the faulting address in si_addr. The
    // interrupted stack pointer catches the rest: a fault whose address
    // says nothing (the kernel's own SIGSEGV, address 0, when it could not
    // push a signal frame below the stack pointer, which is in the guard
    // or less than a frame above it) or that is elsewhere while the stack
    // pointer is in a guard.
    if fault {
        let hit = |at: usize| match arena::lookup(at) {
            Some(Place::Guard(slot)) => Some(slot),
            _ => None,
        };
        let sp = interrupted_sp(ctx);
        // A guard address is an overflow of that stack only if the
        // faulting code runs on it (as far as the stack pointer tells) and
        // the slot was carved (`lookup` knows no other): a stray or
        // dangling pointer into the guard of a slot never carved, or of a
        // stack far from the one the code runs on, is an ordinary fault
        // and goes to the previous action. A frame bigger than the guard
        // (C without stack-clash protection, alloca) moves the stack
        // pointer past the guard into the slot below before its first
        // store hits the guard: that stack pointer counts too, up to a
        // slot below the guard, if that is arena memory, carved or not
        // (below an arena's lowest slot lies other memory, a thread's own
        // stack say, whose stray writes are no overflow: a review finding;
        // another arena may lie there too, its top slot not carved yet).
        let overflow = hit(addr)
            .filter(|slot| {
                let below = slot.guard.saturating_sub(slot.base - slot.guard);
                sp.is_none_or(|sp| {
                    (slot.guard..slot.base).contains(&sp)
                        || ((below..slot.guard).contains(&sp) && arena::in_arenas(sp))
                })
            })
            .or_else(|| sp.and_then(hit))
            .or_else(|| frame_did_not_fit(sig, code, addr, ctx));
        if let Some(slot) = overflow {
            report(slot.base, slot.limit);
            // SAFETY: abort is async-signal-safe and never returns.
            unsafe { libc::abort() };
        }
    }
    chain(sig, fault, code == libc::SI_KERNEL, info, ctx);
}

/// The kernel's own SIGSEGV (`SI_KERNEL`, address 0) for a signal whose
/// frame did not fit below the stack pointer: if that stack pointer is on
/// a pool stack, less than a signal frame above its guard, the stack has
/// overflowed, though nothing touched the guard yet (a handler without
/// `SA_ONSTACK`, say a profiler's SIGPROF, ran out of room).
fn frame_did_not_fit(
    sig: libc::c_int,
    code: libc::c_int,
    addr: usize,
    ctx: *mut libc::c_void,
) -> Option<arena::Slot> {
    if sig != libc::SIGSEGV || code != libc::SI_KERNEL || addr != 0 || general_protection(ctx) {
        return None;
    }
    let sp = interrupted_sp(ctx)?;
    match arena::lookup(sp)? {
        Place::Stack(slot) if sp - slot.limit < FRAME_ROOM.load(Ordering::Relaxed) => Some(slot),
        _ => None,
    }
}

/// Room a signal frame may need below the stack pointer: twice the
/// kernel's own figure (`AT_MINSIGSTKSZ`, which counts the register state
/// this CPU saves, about 3.5 KiB with AVX-512), at least 8 KiB. Set when
/// the handler is installed.
static FRAME_ROOM: AtomicUsize = AtomicUsize::new(0);

fn frame_room() -> usize {
    // SAFETY: getauxval only reads the auxiliary vector; 0 when absent.
    let min = unsafe { libc::getauxval(libc::AT_MINSIGSTKSZ) } as usize;
    (2 * min).max(8 * 1024)
}

/// Whether the fault was a general-protection fault (x86-64 and i386
/// deliver those as SIGSEGV with `SI_KERNEL` and address 0 too: a non-canonical
/// pointer, a misaligned SSE access), not a signal frame that did not fit
/// (the kernel records no trap for that). The trap number is the thread's
/// last one, so a thread whose earlier general-protection fault a handler
/// recovered from has a frame that did not fit chained rather than
/// reported: a miss in a rare case, where the other choice would report
/// every general-protection fault near a guard as an overflow.
#[cfg(all(any(target_arch = "x86_64", target_arch = "x86"), target_os = "linux"))]
fn general_protection(ctx: *mut libc::c_void) -> bool {
    const X86_TRAP_GP: libc::greg_t = 13;
    let ctx = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as in `interrupted_sp`.
    unsafe { ctx.as_ref() }
        .is_some_and(|ctx| ctx.uc_mcontext.gregs[libc::REG_TRAPNO as usize] == X86_TRAP_GP)
}

/// Elsewhere the kernel does not raise SIGSEGV with `SI_KERNEL` for such
/// faults.
#[cfg(not(all(any(target_arch = "x86_64", target_arch = "x86"), target_os = "linux")))]
fn general_protection(_ctx: *mut libc::c_void) -> bool {
    false
}

/// The stack pointer of the interrupted code, from the handler's context.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn interrupted_sp(ctx: *mut libc::c_void) -> Option<usize> {
    let ctx = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler
    // (null is checked for callers that chain to us by hand).
    let sp = unsafe { ctx.as_ref()?.uc_mcontext.gregs[libc::REG_RSP as usize] };
    Some(sp as usize)
}

/// The stack pointer of the interrupted code, from the handler's context.
#[cfg(all(target_arch = "aarch64", target_os = "linux"))]
fn interrupted_sp(ctx: *mut libc::c_void) -> Option<usize> {
    let ctx = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as on x86_64.
    let sp = unsafe { ctx.as_ref()?.uc_mcontext.sp };
    Some(sp as usize)
}

/// The stack pointer of the interrupted code, from the handler's context.
#[cfg(all(target_arch = "x86", target_os = "linux"))]
fn interrupted_sp(ctx: *mut libc::c_void) -> Option<usize> {
    let ctx = ctx.cast::<libc::ucontext_t>();
    // SAFETY: as on x86_64.
    let sp = unsafe { ctx.as_ref()?.uc_mcontext.gregs[libc::REG_ESP as usize] };
    Some(sp as usize)
}

/// Elsewhere only the fault address is used.
#[cfg(not(any(
    all(target_arch = "x86_64", target_os = "linux"),
    all(target_arch = "x86", target_os = "linux"),
    all(target_arch = "aarch64", target_os = "linux")
)))]
fn interrupted_sp(_ctx: *mut libc::c_void) -> Option<usize> {
    None
}

/// Hands the signal to the previous action: see [`on_fault`]. `forced`:
/// the kernel's own signal (`SI_KERNEL`), which no retried instruction
/// raises again.
fn chain(
    sig: libc::c_int,
    fault: bool,
    forced: bool,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let index = usize::from(sig != SIGNALS[0]);
    // SAFETY: written during installation, before this handler could run;
    // read-only since.
    let prev = unsafe { (*PREVIOUS[index].0.get()).assume_init_ref() };
    let mut handler = prev.sa_sigaction;
    let custom = handler != libc::SIG_DFL && handler != libc::SIG_IGN;
    // Only which delivery comes first matters, not what else it sees: a
    // relaxed swap is enough, and two threads faulting at once call a
    // one-shot handler once between them.
    if custom
        && prev.sa_flags & libc::SA_RESETHAND != 0
        && FIRED[index].swap(true, Ordering::Relaxed)
    {
        handler = libc::SIG_DFL;
    }
    if handler == libc::SIG_IGN && !fault {
        return;
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        take_default_action(sig, fault && !forced);
    } else {
        deliver(sig, prev, handler, info, ctx);
    }
}

/// Makes `sig`'s action `SIG_DFL` and delivers it again: by returning,
/// when `retried` (a fault whose instruction runs again), or by raising
/// it (a sent signal, or the kernel's own, which nothing would repeat).
fn take_default_action(sig: libc::c_int, retried: bool) {
    // SAFETY: an all-zero sigaction with SIG_DFL is the default action.
    let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
    default.sa_sigaction = libc::SIG_DFL;
    // Why this holds: sigaction and raise are async-signal-safe. For a fault,
    // returning retries the access, which now kills the process the
    // default way; another signal is raised again (it stays pending until
    // this handler returns and the signal is unblocked).
    // SAFETY: async-signal-safe calls, as explained above.
    unsafe {
        libc::sigaction(sig, &default, std::ptr::null_mut());
        if !retried {
            libc::raise(sig);
        }
    }
}

/// Calls the previous handler `handler` of `sig` with the signal mask the
/// kernel would have given it.
fn deliver(
    sig: libc::c_int,
    prev: &libc::sigaction,
    handler: libc::sighandler_t,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // The kernel runs a handler with the interrupted code's mask, plus its
    // sa_mask, plus the signal unless SA_NODEFER. Ours runs with the
    // interrupted mask plus the signal (empty sa_mask, no SA_NODEFER), and
    // the interrupted mask never holds the signal: a blocked signal is not
    // delivered, and a fault on a blocked signal goes to SIG_DFL, not to
    // us. So add sa_mask, and for SA_NODEFER take the signal out again
    // unless sa_mask names it.
    // SAFETY: an all-zero sigset is a valid value to query into.
    let mut saved: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_sigmask is async-signal-safe; both sets are valid.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &prev.sa_mask, &mut saved) };
    // SAFETY: sigismember only reads a valid sigset.
    let named = unsafe { libc::sigismember(&prev.sa_mask, sig) } == 1;
    if prev.sa_flags & libc::SA_NODEFER != 0 && !named {
        // SAFETY: building a one-signal set on our stack, then unblocking
        // it; all async-signal-safe.
        unsafe {
            let mut only: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut only);
            libc::sigaddset(&mut only, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &only, std::ptr::null_mut());
        }
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
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
    // Back to our own handler's mask; returning restores the interrupted
    // code's. (A handler that leaves with siglongjmp sets its own.)
    // SAFETY: as above; `saved` was filled in by the first call.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
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

/// Set by the first thread that reports an overflow: the process is about
/// to abort, and a second report would interleave with the first one's
/// two writes (and take its label).
static REPORTING: AtomicBool = AtomicBool::new(false);

/// Waits, with async-signal-safe sleeps, for the report under way on
/// another thread to abort the process; gives up after about two seconds
/// (that thread's label hook hangs, or a SIGABRT handler kept the process
/// alive), so that this report is not lost.
fn wait_for_the_other_report() {
    let nap = libc::timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    for _ in 0..200 {
        // SAFETY: nanosleep is async-signal-safe; `nap` is valid.
        unsafe { libc::nanosleep(&nap, std::ptr::null_mut()) };
    }
}

fn report(base: usize, limit: usize) {
    if REPORTING.swap(true, Ordering::Relaxed) {
        wait_for_the_other_report();
    }
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
    if hook.is_null() {
        msg.push(b"\n");
        write_stderr(&msg.buf[..msg.len]);
        return;
    }
    // Written before the hook runs: if the hook itself faults, SIGSEGV is
    // blocked in this handler and the kernel kills the process at once,
    // and the report must already be out.
    write_stderr(&msg.buf[..msg.len]);
    // SAFETY: HOOK only ever holds null or a `LabelHook` stored by
    // `set_overflow_label_hook`.
    let hook: LabelHook = unsafe { std::mem::transmute::<*mut (), LabelHook>(hook) };
    let mut label = [0u8; 256];
    let n = hook(base as *mut u8, &mut label).min(label.len());
    let mut tail = Message {
        buf: [0; 384],
        len: 0,
    };
    tail.push(b": ");
    tail.push(&label[..n]);
    tail.push(b"\n");
    write_stderr(&tail.buf[..tail.len]);
}

/// Writes all of `out` to stderr, as far as `write(2)` lets it.
/// Async-signal-safe.
fn write_stderr(mut out: &[u8]) {
    while !out.is_empty() {
        // SAFETY: write(2) is async-signal-safe; `out` is a valid buffer.
        let n = unsafe { libc::write(libc::STDERR_FILENO, out.as_ptr().cast(), out.len()) };
        if n < 0 && sys::errno() == libc::EINTR {
            // Another handler interrupted the write before any byte went.
            continue;
        }
        if n <= 0 {
            break;
        }
        out = &out[n as usize..];
    }
}

/// Usable bytes of an alternate signal stack this crate installs.
const ALT_STACK_SIZE: usize = 64 * 1024;

thread_local! {
    static PREPARED: Cell<bool> = const { Cell::new(false) };
    /// The mapping of this thread's alternate stack of ours, or 0. Like
    /// `PREPARED`, it needs no destructor, so it stays usable to the end
    /// of the thread, pthread-key destructors included.
    static OURS: Cell<usize> = const { Cell::new(0) };
    static REARM: RearmAtExit = const { RearmAtExit };
}

/// Makes sure the calling thread has an alternate signal stack, so an
/// overflow of a pool stack running on it can be reported, until the
/// thread's last thread-local destructor has run (see the module docs for
/// the one gap on `std` threads).
/// [`StackPool::alloc`](crate::StackPool::alloc) prepares a thread once;
/// call this yourself on threads that run pool stacks allocated elsewhere,
/// and after code that may have turned the thread's alternate stack off
/// (`sigaltstack` with `SS_DISABLE`, by you or another library): it checks
/// with one `sigaltstack` query and installs one of ours if there is none.
/// It also unblocks SIGSEGV and SIGBUS on the thread (one
/// `pthread_sigmask`): a fault on a thread that blocks them kills the
/// process with no report (see the module docs), so call it too after code
/// that blocks every signal on a thread that already ran pool stacks.
pub fn prepare_thread() {
    if PREPARED.get() {
        unblock_faults();
        arm();
    } else {
        prepare_thread_slow();
    }
}

/// Unblocks SIGSEGV and SIGBUS on the calling thread: the kernel kills a
/// process whose thread faults with them blocked, no handler run (review
/// finding: a worker thread that blocked every signal died silently).
fn unblock_faults() {
    // SAFETY: an all-zero sigset_t is a valid set to fill in; the calls
    // only read and write `set` and this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSEGV);
        libc::sigaddset(&mut set, libc::SIGBUS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// [`prepare_thread`] for the pool's allocation paths: once per thread,
/// no system call after that.
#[inline]
pub(crate) fn prepare_thread_once() {
    if !PREPARED.get() {
        prepare_thread_slow();
    }
}

#[cold]
fn prepare_thread_slow() {
    PREPARED.set(true);
    unblock_faults();
    // Registers the exit-time check; fails only when the thread's locals
    // are already being destroyed, and then `arm` below is all there is.
    let _ = REARM.try_with(|_| ());
    arm();
}

/// A thread-local whose destructor gives the thread an alternate stack of
/// ours if it has none left by then: `std` removes its own when the
/// thread's main function returns, before any thread-local destructor.
struct RearmAtExit;

impl Drop for RearmAtExit {
    fn drop(&mut self) {
        arm();
    }
}

/// Installs an alternate stack of ours if the thread has none. Without
/// memory or a pthread key for one the thread still works; only an
/// overflow on it would die silently instead of with a report.
fn arm() {
    // SAFETY: an all-zero stack_t is a valid value to query into.
    let mut current: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: querying the current alternate stack writes into `current`.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut current) };
    if current.ss_flags & libc::SS_DISABLE == 0 {
        return;
    }
    let map = match OURS.get() {
        // Ours, disabled by someone since: install it again.
        map if map != 0 => map,
        _ => {
            let Some(key) = exit_key() else { return };
            let Some(map) = get_alt_stack() else { return };
            // SAFETY: setting this thread's value of a key we created.
            if unsafe { libc::pthread_setspecific(key, map as *const libc::c_void) } != 0 {
                // Nothing would take it back at exit.
                put_spare(map);
                return;
            }
            OURS.set(map);
            map
        }
    };
    let stack = libc::stack_t {
        ss_sp: (map + sys::page_size()) as *mut libc::c_void,
        ss_flags: 0,
        ss_size: ALT_STACK_SIZE,
    };
    // SAFETY: `stack` is this thread's alternate stack of ours, which no
    // other thread uses. Should this fail, `put_alt_stack` finds it not
    // installed at exit and takes it back all the same.
    unsafe { libc::sigaltstack(&stack, std::ptr::null_mut()) };
}

/// The pthread key whose destructor, [`put_alt_stack`], takes back a
/// thread's alternate stack of ours; its value is the stack's mapping.
fn exit_key() -> Option<libc::pthread_key_t> {
    static KEY: AtomicUsize = AtomicUsize::new(0);
    sys::lazy_key(&KEY, put_alt_stack)
}

/// Alternate stacks of exited threads, for the next threads to take: a
/// list linked through the first usable word of each, 0-terminated. Under
/// [`SparesLock`].
static SPARES: AtomicUsize = AtomicUsize::new(0);

/// The lock on [`SPARES`]: 0, or the pid + 1 of the process whose thread
/// holds it. Not a `Mutex`: a fork while another thread holds it (a thread
/// exiting, filing its alternate stack) would leave the child a lock that
/// is never released, and its threads hang on their first pool allocation
/// or at exit. A child finds its parent's pid and takes the lock over: the
/// list is changed with single stores, so it is whole at any fork.
static SPARES_LOCK: AtomicU64 = AtomicU64::new(0);

struct SparesLock;

impl SparesLock {
    fn lock() -> SparesLock {
        // The lock word is never `u64::MAX` (a pid + 1 fits in 33 bits).
        let taken = take_fork_safe(&SPARES_LOCK, u64::MAX);
        debug_assert!(taken);
        SparesLock
    }
}

impl Drop for SparesLock {
    fn drop(&mut self) {
        SPARES_LOCK.store(0, Ordering::Release);
    }
}

/// An alternate stack's mapping, `[guard page][ALT_STACK_SIZE]`: a spare,
/// or a new one.
fn get_alt_stack() -> Option<usize> {
    let page = sys::page_size();
    {
        let _locked = SparesLock::lock();
        let map = SPARES.load(Ordering::Relaxed);
        if map != 0 {
            // SAFETY: a spare is no thread's signal stack, and its first
            // usable word holds the next spare, written by `put_spare`.
            let next = unsafe { ((map + page) as *const usize).read() };
            SPARES.store(next, Ordering::Relaxed);
            return Some(map);
        }
    }
    let len = page + ALT_STACK_SIZE;
    let map = sys::reserve(len).ok()?;
    if sys::install_guard(map, page, false).is_err() {
        // SAFETY: the mapping is ours and not in use.
        unsafe { sys::unmap(map, len) };
        return None;
    }
    Some(map)
}

/// Keeps an alternate stack that is no thread's signal stack as a spare.
/// Its pages go back to the kernel but the one holding the link, so a spare
/// costs a page of memory and 68 KiB of address space.
fn put_spare(map: usize) {
    let page = sys::page_size();
    // Locked pages merely stay resident.
    let _ = sys::release(map + page, ALT_STACK_SIZE);
    let _locked = SparesLock::lock();
    // SAFETY: the stack is no thread's signal stack, so its memory is ours.
    unsafe { ((map + page) as *mut usize).write(SPARES.load(Ordering::Relaxed)) };
    SPARES.store(map, Ordering::Relaxed);
}

/// The exit key's destructor: takes back the exiting thread's alternate
/// stack of ours (`value` is its mapping). glibc runs pthread-key
/// destructors after every thread-local destructor, so no pool stack runs
/// on this thread after this, short of another library's pthread-key
/// destructor running one.
extern "C" fn put_alt_stack(value: *mut libc::c_void) {
    let map = value as usize;
    OURS.set(0);
    // A pool allocation after this prepares the thread again, and setting
    // the key again gets this destructor another round. Forgetting the
    // thread's pool sends that allocation down a path that prepares: the
    // fast path (a stack parked on the thread, a magazine hit) does not
    // (review finding: a later key destructor's stack had no alternate
    // stack).
    PREPARED.set(false);
    crate::tally::forget_current();
    // SAFETY: an all-zero stack_t is a valid value to query into.
    let mut current: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: querying the current alternate stack writes into `current`.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut current) };
    if current.ss_flags & libc::SS_DISABLE == 0 {
        let still_ours = current.ss_sp as usize == map + sys::page_size();
        // Someone else's replaced ours and may put ours back, or the thread
        // is exiting from a handler running on ours: leak it rather than
        // hand out a stack a signal may still land on.
        if !still_ours || current.ss_flags & libc::SS_ONSTACK != 0 {
            return;
        }
        let disable = libc::stack_t {
            ss_sp: std::ptr::null_mut(),
            ss_flags: libc::SS_DISABLE,
            ss_size: 0,
        };
        // SAFETY: disabling our alternate stack, which the thread is not
        // running on; the thread runs no more thread-local destructors.
        if unsafe { libc::sigaltstack(&disable, std::ptr::null_mut()) } != 0 {
            return;
        }
    }
    put_spare(map);
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
        m.push_hex(0xdead_b000);
        m.push(b" ");
        m.push_decimal(131072);
        m.push(b" ");
        m.push_hex(0);
        assert_eq!(&m.buf[..m.len], b"0xdeadb000 131072 0x0");
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
