//! x86_64 Linux: the restartable-sequence fast paths of
//! [`CpuCache`](crate::CpuCache) and the membarrier that lets another
//! thread stop a CPU's critical sections.
//!
//! Everything architecture- and kernel-specific lives here; the protocol
//! these pieces implement is described in `cache.rs`.
//!
//! ABI (include/uapi/linux/rseq.h, glibc's `sys/rseq.h`):
//! - glibc registers one `struct rseq` per thread at `%fs:__rseq_offset`
//!   with signature `RSEQ_SIG = 0x53053053`; `cpu_id` is the `u32` at byte
//!   4, the `rseq_cs` pointer the `u64` at byte 8.
//! - A critical section is described by a 32-byte-aligned
//!   `struct rseq_cs { u32 version = 0; u32 flags = 0; u64 start_ip;
//!   u64 post_commit_offset; u64 abort_ip; }`. While `rseq_cs` points to it,
//!   if the kernel preempts the thread, migrates it, delivers it a signal,
//!   or a `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)` IPI hits it,
//!   with the instruction pointer in `[start_ip, start_ip +
//!   post_commit_offset)`, it clears `rseq_cs` and resumes the thread at
//!   `abort_ip` instead, after checking that the 4 bytes before `abort_ip`
//!   are the registered signature.
//!
//! Shape of each sequence below (numeric local labels only, because the
//! compiler may duplicate an `asm!` block when it inlines; each copy gets
//! its own descriptor in the `__rseq_cs` section):
//!
//! ```text
//! 2:  rseq_cs = &descriptor 3     ; the last instruction before start_ip
//! 4:  (start_ip) cpu = cpu_id; area = base + cpu * stride
//!     fail (7) if cpu >= cpus, area.stopped != 0, empty or full
//!     read or write the item
//!     store area.len              ; the commit: the last instruction
//! 5:  (post-commit) done
//!     ud1 0x53053053(%rip), %edi  ; the signature, never executed
//! 6:  (abort_ip) jump to 2        ; restart from the top
//! 7:  fail
//! ```
//!
//! Why the `rseq_cs` store is the instruction right before `start_ip`: a
//! signal handler may run its own rseq sections and leave `rseq_cs`
//! pointing elsewhere. If the signal arrives before our store, the store
//! re-arms our descriptor afterwards; if it arrives after, the thread is at
//! `start_ip`, inside the section, and is aborted before the handler runs.
//! There is no instruction boundary in between.
//!
//! A thread whose rseq registration failed sees a negative `cpu_id`, which
//! the unsigned bounds check turns into a failure: such a thread's pushes
//! and pops always fail (the caller takes its slow path). glibc registers
//! every thread or none, so this is a corner case, never the common one.
//!
//! Limitations:
//! - `rseq_cs` is left pointing at the last descriptor used (the kernel
//!   clears it lazily), as tcmalloc does; the descriptors are static, so
//!   this is sound unless the code is in a shared object that is unloaded
//!   (`dlclose`) while threads live on. Do not unload a library that
//!   contains this crate.
//! - Single-stepping through a section in a debugger restarts it forever;
//!   step over the `asm!` block instead.

#[cfg(test)]
use std::cell::Cell;
use std::mem::offset_of;
use std::sync::atomic::{fence, AtomicU8, Ordering};

use crate::cache::{AreaHead, Table};

// struct rseq field offsets.
const RSEQ_CPU_ID: usize = 4;
const RSEQ_CS: usize = 8;

// <linux/membarrier.h>.
const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ: libc::c_int = 1 << 7;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ: libc::c_int = 1 << 8;
const MEMBARRIER_CMD_FLAG_CPU: libc::c_uint = 1 << 0;

#[cfg(test)]
thread_local! {
    /// Test hook: this thread's next [`fence_cpu`] sees the kernel refuse
    /// the membarrier, to exercise the panic path.
    pub(crate) static REFUSE_NEXT_FENCE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the rseq fast path can be used in this process: glibc registered
/// rseq (and the calling thread's `cpu_id` is valid), and the kernel offers
/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ` with `MEMBARRIER_CMD_FLAG_CPU`
/// (Linux 5.10+), which [`fence_cpu`] needs. Registers this process for
/// that membarrier on the first call.
pub(crate) fn supported() -> bool {
    // Not a `OnceLock`: a fork while another thread initialises one leaves
    // the child waiting for that thread forever. The first answer
    // published is every caller's; a "yes" means its caller registered the
    // process (registering twice is harmless).
    static SUPPORTED: AtomicU8 = AtomicU8::new(UNKNOWN);
    match SUPPORTED.load(Ordering::Relaxed) {
        YES => return true,
        NO => return false,
        _ => {}
    }
    let answer = if probe_supported() { YES } else { NO };
    match SUPPORTED.compare_exchange(UNKNOWN, answer, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => answer == YES,
        Err(first) => first == YES,
    }
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

fn probe_supported() -> bool {
    if !crate::cpu::rseq_available() {
        return false;
    }
    let both = libc::c_long::from(
        MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ,
    );
    let query = membarrier(MEMBARRIER_CMD_QUERY, 0, 0);
    if query < 0 || query & both != both {
        return false;
    }
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0) != 0 {
        return false;
    }
    // Older kernels know the command but reject the CPU flag (EINVAL).
    membarrier(
        MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ,
        MEMBARRIER_CMD_FLAG_CPU,
        crate::cpu() as libc::c_int,
    ) == 0
}

/// Whether the kernel lists the rseq membarrier commands (Linux 5.10+,
/// which added them together with `MEMBARRIER_CMD_FLAG_CPU`): then the rseq
/// cache must be [`supported`] wherever glibc registered rseq.
#[cfg(test)]
pub(crate) fn kernel_offers_rseq_membarrier() -> bool {
    let both = libc::c_long::from(
        MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ | MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ,
    );
    let query = membarrier(MEMBARRIER_CMD_QUERY, 0, 0);
    query >= 0 && query & both == both
}

fn membarrier(cmd: libc::c_int, flags: libc::c_uint, cpu: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes three integers and touches no user memory.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, flags, cpu) };
    if rc < 0 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL) as libc::c_long)
    } else {
        rc
    }
}

/// Restarts every rseq critical section of this process that is running on
/// `cpu` now, and orders the caller's earlier stores before, and its later
/// loads after, every access made on `cpu` by this process (see the
/// protocol in `cache.rs`). Costs a system call and at most one IPI.
///
/// Returns the error if the kernel refuses a membarrier it accepted in
/// [`supported`] (a seccomp filter installed since, or a failed
/// re-registration): then nothing is ordered, and the caller must not
/// touch the area.
pub(crate) fn fence_cpu(cpu: usize) -> Result<(), std::io::Error> {
    let cpu = cpu as libc::c_int;
    let mut rc = membarrier(
        MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ,
        MEMBARRIER_CMD_FLAG_CPU,
        cpu,
    );
    if rc == -(libc::EPERM as libc::c_long) {
        // Registration is per address space; a child after fork() may not
        // carry it. Registering again is idempotent.
        membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ, 0, 0);
        rc = membarrier(
            MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ,
            MEMBARRIER_CMD_FLAG_CPU,
            cpu,
        );
    }
    #[cfg(test)]
    let rc = match REFUSE_NEXT_FENCE.with(Cell::take) {
        true => -libc::c_long::from(libc::EINVAL),
        false => rc,
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(-rc as i32));
    }
    // The kernel ordered the accesses; this keeps the compiler (and the
    // Rust memory model) from hoisting the caller's later loads above it.
    fence(Ordering::SeqCst);
    Ok(())
}

/// Pushes `item` on the current CPU's area of `table`. Returns false if the
/// area is full or stopped, or this thread has no valid rseq `cpu_id`.
///
/// # Safety
/// `table` must describe live areas laid out as in `cache.rs` (every CPU
/// below `table.cpus` owns `table.stride` bytes at `table.base + cpu *
/// table.stride`, an [`AreaHead`] followed by `table.capacity` item
/// slots), and `rseq_offset` must be glibc's `__rseq_offset`.
#[inline]
pub(crate) unsafe fn push(table: &Table, rseq_offset: isize, item: *mut u8) -> bool {
    let len: usize;
    // Why this holds: per the function contract, `cpu < table.cpus` (checked
    // in the sequence) indexes a live area, and `len < capacity` (checked)
    // a live item slot. The sequence follows the rseq ABI described in the
    // module header: descriptor in `__rseq_cs`, 32-byte aligned, version
    // and flags 0; `rseq_cs` stored right before start_ip; the commit (the
    // store of `len`) is the last instruction before post-commit; the
    // signature precedes abort_ip, which lies outside the section. The item
    // store before the commit writes a slot at or past `len`, which no one
    // reads until a commit covers it, so an aborted push leaves no trace.
    // SAFETY: the contract and the rseq ABI hold as listed above.
    unsafe {
        std::arch::asm!(
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4f, 5f - 4f, 6f",
            ".popsection",
            "2:",
            "lea {area}, [rip + 3b]",
            "mov qword ptr fs:[{off} + {rseq_cs}], {area}",
            "4:",
            "mov {area:e}, dword ptr fs:[{off} + {cpu_id}]",
            "cmp {area}, qword ptr [{table} + {cpus}]",
            "jae 7f",
            "imul {area}, qword ptr [{table} + {stride}]",
            "add {area}, qword ptr [{table} + {base}]",
            "cmp qword ptr [{area} + {stopped}], 0",
            "jne 7f",
            "mov {len}, qword ptr [{area} + {len_at}]",
            "cmp {len}, qword ptr [{table} + {capacity}]",
            "jae 7f",
            "mov qword ptr [{area} + {len} * 8 + {items}], {item}",
            "add {len}, 1",
            "mov qword ptr [{area} + {len_at}], {len}",
            "5:",
            "jmp 8f",
            // ud1 0x53053053(%rip), %edi: the signature as a trapping
            // instruction, so disassemblers stay in sync.
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            "6:",
            "jmp 2b",
            "7:",
            "xor {len:e}, {len:e}",
            "8:",
            table = in(reg) table,
            off = in(reg) rseq_offset,
            item = in(reg) item,
            area = out(reg) _,
            len = out(reg) len,
            rseq_cs = const RSEQ_CS,
            cpu_id = const RSEQ_CPU_ID,
            cpus = const offset_of!(Table, cpus),
            stride = const offset_of!(Table, stride),
            base = const offset_of!(Table, base),
            capacity = const offset_of!(Table, capacity),
            stopped = const offset_of!(AreaHead, stopped),
            len_at = const offset_of!(AreaHead, len),
            items = const std::mem::size_of::<AreaHead>(),
            options(nostack),
        );
    }
    // A successful push leaves at least one item; a failure reports 0.
    len != 0
}

/// Pops the most recent item from the current CPU's area of `table`, or
/// returns null if the area is empty or stopped, or this thread has no
/// valid rseq `cpu_id`.
///
/// # Safety
/// As for [`push`].
#[inline]
pub(crate) unsafe fn pop(table: &Table, rseq_offset: isize) -> *mut u8 {
    let item: *mut u8;
    // Why this holds: as in `push`, with `0 < len <= capacity` (checked, and
    // `len <= capacity` is the invariant every commit keeps), so item slot
    // `len - 1`, at `items + (len - 1) * 8`, is live. An aborted pop has
    // only read.
    // SAFETY: as in `push`, with the live slot `len - 1` (above).
    unsafe {
        std::arch::asm!(
            ".pushsection __rseq_cs, \"aw\"",
            ".balign 32",
            "3:",
            ".long 0, 0",
            ".quad 4f, 5f - 4f, 6f",
            ".popsection",
            "2:",
            "lea {area}, [rip + 3b]",
            "mov qword ptr fs:[{off} + {rseq_cs}], {area}",
            "4:",
            "mov {area:e}, dword ptr fs:[{off} + {cpu_id}]",
            "cmp {area}, qword ptr [{table} + {cpus}]",
            "jae 7f",
            "imul {area}, qword ptr [{table} + {stride}]",
            "add {area}, qword ptr [{table} + {base}]",
            "cmp qword ptr [{area} + {stopped}], 0",
            "jne 7f",
            "mov {len}, qword ptr [{area} + {len_at}]",
            "test {len}, {len}",
            "jz 7f",
            "mov {item}, qword ptr [{area} + {len} * 8 + {items} - 8]",
            "sub {len}, 1",
            "mov qword ptr [{area} + {len_at}], {len}",
            "5:",
            "jmp 8f",
            ".byte 0x0f, 0xb9, 0x3d",
            ".long 0x53053053",
            "6:",
            "jmp 2b",
            "7:",
            "xor {item:e}, {item:e}",
            "8:",
            table = in(reg) table,
            off = in(reg) rseq_offset,
            item = out(reg) item,
            area = out(reg) _,
            len = out(reg) _,
            rseq_cs = const RSEQ_CS,
            cpu_id = const RSEQ_CPU_ID,
            cpus = const offset_of!(Table, cpus),
            stride = const offset_of!(Table, stride),
            base = const offset_of!(Table, base),
            stopped = const offset_of!(AreaHead, stopped),
            len_at = const offset_of!(AreaHead, len),
            items = const std::mem::size_of::<AreaHead>(),
            options(nostack),
        );
    }
    item
}
