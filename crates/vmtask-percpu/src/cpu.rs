//! Which CPU the calling thread runs on.
//!
//! glibc (2.35+) registers a `struct rseq` for every thread and exports its
//! offset from the thread pointer as `__rseq_offset`. The kernel keeps
//! `cpu_id` in that area current on every return to user space, so reading
//! the current CPU is one load from `%fs:offset+4`. We look the symbol up at
//! run time with `dlsym`, so the crate still works (through
//! `sched_getcpu(3)`) on a libc without rseq.
//!
//! [`cpu()`] is on every per-CPU fast path, so its common case is two
//! relaxed loads of process-wide constants (the rseq offset and the number
//! of possible CPUs, published once by a cold initialiser), the `%fs` load
//! and a bounds check; no `OnceLock` and no call.

use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// `RSEQ.offset` before the first look-up.
const OFFSET_UNKNOWN: isize = isize::MIN;
/// `RSEQ.offset` when glibc registered no rseq area (or it is too small).
const OFFSET_ABSENT: isize = isize::MIN + 1;

/// What [`cpu()`] needs on its fast path, together on one cache line.
/// Both fields are written once by [`init_cpu_read`] with values that never
/// change afterwards, so relaxed loads suffice: a reader that sees the
/// initial values just takes the cold path, which initialises them.
#[repr(C, align(64))]
struct CpuRead {
    /// Offset of `struct rseq` from the thread pointer, or a sentinel.
    offset: AtomicIsize,
    /// [`possible_cpus()`], or 0 before initialisation.
    possible: AtomicUsize,
}

static RSEQ: CpuRead = CpuRead {
    offset: AtomicIsize::new(OFFSET_UNKNOWN),
    possible: AtomicUsize::new(0),
};

/// Offset of `struct rseq` from the thread pointer, if glibc registered one
/// that is large enough to hold `cpu_id` and `rseq_cs`.
pub(crate) fn rseq_offset() -> Option<isize> {
    let mut offset = RSEQ.offset.load(Ordering::Relaxed);
    if offset == OFFSET_UNKNOWN {
        init_cpu_read();
        offset = RSEQ.offset.load(Ordering::Relaxed);
    }
    (offset != OFFSET_ABSENT).then_some(offset)
}

/// Looks up glibc's rseq registration and the possible CPUs, and publishes
/// both for [`cpu()`]. Idempotent; racing callers store the same values.
#[cold]
fn init_cpu_read() {
    RSEQ.possible.store(possible_cpus(), Ordering::Relaxed);
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only
    // looks a symbol up; a null result means "absent".
    let offset = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) };
    // SAFETY: as above.
    let size = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) };
    let offset = if offset.is_null() || size.is_null() {
        OFFSET_ABSENT
    } else {
        // SAFETY: glibc defines `__rseq_offset` as `const ptrdiff_t` and
        // `__rseq_size` as `const unsigned int`; both are initialised
        // before main and never change.
        let (offset, size) = unsafe { (*(offset as *const isize), *(size as *const u32)) };
        // A size of 0 means registration was disabled (glibc.pthread.rseq=0)
        // or refused by the kernel. 20 bytes cover `cpu_id` and `rseq_cs`.
        if size >= 20 && offset != OFFSET_UNKNOWN && offset != OFFSET_ABSENT {
            offset
        } else {
            OFFSET_ABSENT
        }
    };
    RSEQ.offset.store(offset, Ordering::Relaxed);
}

/// Whether `cpu()` reads glibc's rseq area (true) or calls `sched_getcpu`.
pub fn rseq_available() -> bool {
    rseq_offset().and_then(read_rseq_cpu).is_some()
}

/// The calling thread's `cpu_id` from the rseq area at `offset`, or `None`
/// if the kernel has not initialised it for this thread.
#[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
#[inline(always)]
fn read_rseq_cpu(offset: isize) -> Option<usize> {
    let cpu: i32;
    // Why this holds: on x86_64 Linux `%fs:0` holds the thread pointer; glibc's rseq
    // area lives at `tp + __rseq_offset` for every thread it created
    // (including the main thread) and `cpu_id` is the `u32` at byte 4 of
    // `struct rseq`. The read has no side effects.
    // SAFETY: a side-effect-free read of glibc's rseq `cpu_id` (above).
    unsafe {
        std::arch::asm!(
            "mov {cpu:e}, dword ptr fs:[{off} + 4]",
            off = in(reg) offset,
            cpu = out(reg) cpu,
            options(nostack, readonly, preserves_flags),
        );
    }
    // Negative: RSEQ_CPU_ID_UNINITIALIZED (-1) or registration failed (-2).
    (cpu >= 0).then_some(cpu as usize)
}

#[cfg(not(all(target_arch = "x86_64", target_pointer_width = "64")))]
#[inline(always)]
fn read_rseq_cpu(_offset: isize) -> Option<usize> {
    None
}

/// The CPU the calling thread is running on now.
///
/// It may be stale by the time the caller uses it (the thread can migrate);
/// treat it as a hint for choosing a per-CPU slot, never as ownership.
/// Always less than [`possible_cpus()`].
#[inline]
pub fn cpu() -> usize {
    #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
    {
        let offset = RSEQ.offset.load(Ordering::Relaxed);
        let possible = RSEQ.possible.load(Ordering::Relaxed);
        // Before initialisation `possible` is 0 and the check fails; a
        // negative `cpu_id` fails it too (`read_rseq_cpu` returns None).
        if offset != OFFSET_UNKNOWN && offset != OFFSET_ABSENT {
            if let Some(cpu) = read_rseq_cpu(offset) {
                if cpu < possible {
                    return cpu;
                }
            }
        }
    }
    cpu_slow()
}

/// [`cpu()`] without rseq (or before the first look-up): initialise, then
/// ask rseq again or `sched_getcpu(3)`.
#[cold]
#[inline(never)]
fn cpu_slow() -> usize {
    let possible = possible_cpus();
    if RSEQ.possible.load(Ordering::Relaxed) == 0 {
        init_cpu_read();
    }
    let cpu = rseq_offset()
        .and_then(read_rseq_cpu)
        .unwrap_or_else(sched_getcpu);
    // A CPU hot-added past the possible mask cannot happen on Linux, but a
    // wrong answer here must not become an out-of-bounds index.
    if cpu < possible {
        cpu
    } else {
        cpu % possible
    }
}

fn sched_getcpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        0
    } else {
        cpu as usize
    }
}

/// The number of CPUs that can ever be online (`/sys/devices/system/cpu/possible`),
/// which bounds every CPU number [`cpu()`] returns.
pub fn possible_cpus() -> usize {
    // Not a `OnceLock`: a fork while another thread initialises one leaves
    // the child waiting for that thread forever. Racing first calls may
    // compute different answers (the fallback below counts the calling
    // thread's affinity), so the first to publish wins and every caller
    // returns its answer: per-CPU arrays are sized by it.
    static POSSIBLE: AtomicUsize = AtomicUsize::new(0);
    match POSSIBLE.load(Ordering::Relaxed) {
        0 => {}
        n => return n,
    }
    let n = {
        let from_sysfs = std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|s| parse_cpu_list_max(s.trim()))
            .map(|max| max + 1);
        // SAFETY: sysconf has no preconditions.
        let configured = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
        let configured = if configured > 0 {
            configured as usize
        } else {
            1
        };
        from_sysfs.unwrap_or(configured).max(configured).max(1)
    };
    publish_first(&POSSIBLE, n)
}

/// Publishes `n` in `cell` (0: nothing yet) unless a value is there, and
/// returns the value that is.
fn publish_first(cell: &AtomicUsize, n: usize) -> usize {
    match cell.compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => n,
        Err(first) => first,
    }
}

/// The highest CPU in a list such as `0-3,8,10-11`.
fn parse_cpu_list_max(list: &str) -> Option<usize> {
    list.split(',')
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.rsplit('-')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
        })
        .try_fold(0usize, |max, n| n.map(|n| max.max(n)))
}

/// Pins the calling thread to `cpu` (`sched_setaffinity`). For tests and
/// benchmarks that need threads on distinct CPUs.
///
/// # Errors
/// If the kernel refuses (a CPU outside the thread's cpuset, offline, or
/// past the largest CPU number): an error of the kernel's kind whose
/// message names the CPU and the CPUs the thread may run on, and whose
/// [`source`](std::error::Error::source) is the system call's own error.
///
/// ```
/// let err = vmtask_percpu::pin_current_thread(1 << 20).unwrap_err();
/// assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
/// assert!(err.to_string().contains("CPU 1048576"), "{err}");
/// ```
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    pin(cpu).map_err(|os| {
        std::io::Error::new(
            os.kind(),
            PinError {
                cpu,
                allowed: allowed_cpus(),
                os,
            },
        )
    })
}

/// Why [`pin_current_thread`] failed: the CPU, the CPUs allowed, and the
/// kernel's error (the source).
#[derive(Debug)]
struct PinError {
    cpu: usize,
    allowed: Vec<usize>,
    os: std::io::Error,
}

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot pin the thread to CPU {}: {} (it may run on CPUs {:?})",
            self.cpu, self.os, self.allowed
        )
    }
}

impl std::error::Error for PinError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.os)
    }
}

fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu` is below the set's capacity, checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), in
/// ascending order; never empty (`[0]` if the call fails). A cpuset or
/// `taskset` may allow fewer CPUs than [`possible_cpus`], and not
/// necessarily CPU 0 or 1: pin to these. A thread that pinned itself sees
/// only its own CPU; ask from an unpinned thread for the process's set.
///
/// ```
/// let cpus = vmtask_percpu::allowed_cpus();
/// assert!(!cpus.is_empty());
/// assert!(cpus.iter().all(|&c| c < vmtask_percpu::possible_cpus()));
/// ```
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return vec![0];
    }
    let cpus: Vec<usize> = (0..8 * std::mem::size_of::<libc::cpu_set_t>())
        // SAFETY: `cpu` is below the set's capacity.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect();
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// Runs `f` on a new thread pinned to `cpu` and returns what it returns;
/// the calling thread's own affinity is left alone. `Err` (and `f` not
/// run) if the thread cannot be pinned there (a CPU outside the cpuset or
/// offline: see [`allowed_cpus`]). A panic in `f` goes on in the caller.
///
/// ```
/// let cpu = vmtask_percpu::allowed_cpus()[0];
/// let seen = vmtask_percpu::run_on_cpu(cpu, vmtask_percpu::cpu).unwrap();
/// assert_eq!(seen, cpu);
/// ```
pub fn run_on_cpu<R: Send>(cpu: usize, f: impl FnOnce() -> R + Send) -> std::io::Result<R> {
    std::thread::scope(|s| {
        let thread = s.spawn(|| pin_current_thread(cpu).map(|()| f()));
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Racing first calls of `possible_cpus` may compute different counts
    /// (its fallback counts the caller's affinity): all of them return the
    /// first one published, which sizes every per-CPU array.
    #[test]
    fn the_first_published_count_is_everyones() {
        let cell = AtomicUsize::new(0);
        assert_eq!(publish_first(&cell, 1), 1);
        assert_eq!(publish_first(&cell, 2), 1, "a later, different answer");
        assert_eq!(cell.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn cpu_list_parses() {
        assert_eq!(parse_cpu_list_max("0"), Some(0));
        assert_eq!(parse_cpu_list_max("0-1"), Some(1));
        assert_eq!(parse_cpu_list_max("0-3,8,10-11"), Some(11));
        assert_eq!(parse_cpu_list_max("x"), None);
    }

    #[test]
    fn run_on_cpu_runs_there_and_names_a_cpu_it_cannot_use() {
        for cpu in allowed_cpus() {
            assert_eq!(run_on_cpu(cpu, self::cpu).unwrap(), cpu);
        }
        let past = 8 * std::mem::size_of::<libc::cpu_set_t>();
        let err = run_on_cpu(past, || unreachable!("ran although the pin failed")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains(&format!("CPU {past}")), "{err}");
        let os = std::error::Error::source(err.get_ref().expect("a wrapped error"))
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error);
        assert_eq!(os, Some(libc::EINVAL));
    }

    #[test]
    fn cpu_is_below_possible() {
        for _ in 0..1000 {
            assert!(cpu() < possible_cpus());
        }
    }

    #[test]
    fn rseq_cpu_agrees_with_sched_getcpu_when_pinned() {
        let n = possible_cpus();
        let checked = std::thread::spawn(move || {
            let mut checked = 0;
            for target in 0..n {
                if pin_current_thread(target).is_err() {
                    continue; // CPU offline or outside our cpuset.
                }
                assert_eq!(cpu(), target);
                assert_eq!(sched_getcpu(), target);
                checked += 1;
            }
            checked
        })
        .join()
        .unwrap();
        assert!(checked > 0, "no CPU of {n} could be pinned to");
    }

    /// glibc's registration, looked up here independently of
    /// `init_cpu_read`: when glibc says it registered an rseq area, `cpu()`
    /// must read it, and it must hold the CPU we are pinned to.
    #[cfg(all(
        target_arch = "x86_64",
        target_pointer_width = "64",
        target_os = "linux"
    ))]
    #[test]
    fn rseq_is_used_on_this_machine_when_glibc_registers_it() {
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only
        // looks a symbol up.
        let size = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) };
        if size.is_null() {
            eprintln!("SKIPPED: this libc exports no __rseq_size (glibc < 2.35)");
            assert!(!rseq_available());
            return;
        }
        // SAFETY: glibc's `const unsigned int __rseq_size`, set before main.
        let size = unsafe { *(size as *const u32) };
        if size == 0 {
            eprintln!("SKIPPED: glibc registered no rseq area (tunable or kernel)");
            assert!(!rseq_available());
            return;
        }
        assert!(
            rseq_available(),
            "glibc registered a {size}-byte rseq area, but cpu() does not read it"
        );
        let offset = rseq_offset().expect("rseq available");
        std::thread::spawn(move || {
            pin_current_thread(sched_getcpu()).expect("pin to the current CPU");
            assert_eq!(read_rseq_cpu(offset), Some(sched_getcpu()));
            assert_eq!(cpu(), sched_getcpu());
        })
        .join()
        .unwrap();
    }
}
