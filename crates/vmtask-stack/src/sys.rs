//! The few system calls the pool makes, each wrapped once so the rest of the
//! crate reads as plain Rust: reserve and unmap address space, install guard
//! pages, release and pre-fault pages, count resident pages.
//!
//! Every wrapper takes addresses as `usize` and returns the raw `errno` on
//! failure; callers turn that into a [`StackError`](crate::StackError) that
//! names what was being done.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

/// `MADV_GUARD_INSTALL` (Linux 6.13+): turn a range into guard markers that
/// fault on access without splitting the mapping.
pub(crate) const MADV_GUARD_INSTALL: libc::c_int = 102;

/// The system page size.
///
/// Cached in an atomic, 0 until known, not a `OnceLock`: a fork while
/// another thread held a `OnceLock`'s initialisation would leave the
/// child waiting for it for ever (see `StackPool::global`).
pub(crate) fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let page = PAGE.load(Ordering::Relaxed);
    if page != 0 {
        return page;
    }
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        page if page > 0 => page as usize,
        _ => 4096,
    };
    PAGE.store(page, Ordering::Relaxed);
    page
}

/// `n` rounded up to a whole number of pages. For addresses and sizes
/// already known to fit (user-supplied sizes go through
/// [`checked_page_ceil`]).
pub(crate) fn page_ceil(n: usize) -> usize {
    checked_page_ceil(n).expect("page_ceil of an address or size that fits")
}

/// `n` rounded up to a whole number of pages, or `None` if that overflows.
pub(crate) fn checked_page_ceil(n: usize) -> Option<usize> {
    let page = page_size();
    n.div_ceil(page).checked_mul(page)
}

/// `n` rounded down to a page boundary.
pub(crate) fn page_floor(n: usize) -> usize {
    n & !(page_size() - 1)
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reserves `len` bytes of read-write, private, anonymous address space
/// that is neither committed nor touched (`MAP_NORESERVE`).
pub(crate) fn reserve(len: usize) -> Result<usize, i32> {
    // SAFETY: an anonymous mapping at an address of the kernel's choosing
    // touches no existing memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(errno());
    }
    // MAP_STACK keeps transparent huge pages out of the arena from Linux
    // 6.7 on; older kernels need the advice, or a deep stack (or, in
    // mprotect mode, neighbouring small ones) could fault in 2 MiB at
    // once. A kernel without THP refuses it (EINVAL): nothing to keep out.
    let _ = madvise(p as usize, len, libc::MADV_NOHUGEPAGE);
    Ok(p as usize)
}

/// Whether `len` more bytes of address space can still be mapped: maps
/// them (`PROT_NONE`, nothing touched) and unmaps them at once.
pub(crate) fn room_for(len: usize) -> bool {
    // SAFETY: a fresh anonymous mapping of the kernel's choosing, unmapped
    // below; nothing reads or writes it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: just mapped above, and unused.
    unsafe { unmap(p as usize, len) };
    true
}

/// Unmaps a range obtained from [`reserve`].
///
/// # Safety
/// Nothing may use memory in `[addr, addr + len)` afterwards.
pub(crate) unsafe fn unmap(addr: usize, len: usize) {
    // SAFETY: the caller guarantees the range is unused; munmap of a range
    // we mapped cannot fail except on invalid arguments.
    let rc = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    debug_assert_eq!(rc, 0, "munmap failed");
}

fn madvise(addr: usize, len: usize, advice: libc::c_int) -> Result<(), i32> {
    // SAFETY: madvise validates the range itself; the advice values this
    // module passes (guard install, dontneed on pages nobody is using,
    // populate) never invalidate memory that Rust code holds references to.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Makes `[addr, addr + len)` fault on any access.
pub(crate) fn install_guard(addr: usize, len: usize, markers: bool) -> Result<(), i32> {
    if markers {
        madvise(addr, len, MADV_GUARD_INSTALL)
    } else {
        // SAFETY: the range lies in one of our arenas and holds no live data.
        let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len, libc::PROT_NONE) };
        if rc == 0 {
            Ok(())
        } else {
            Err(errno())
        }
    }
}

/// Mappings an `mprotect`-guarded pool leaves to the rest of the program
/// (at most an eighth of `vm.max_map_count`). Each `mprotect` guard splits
/// off two mappings, and a pool that took the last one left the program
/// none: no thread could start, no large allocation be made, and the free
/// of a stack that had to grow a list of the pool's aborted in `malloc`
/// (review finding: 32,750 stacks allocated, then their drop aborted).
const MAP_HEADROOM: usize = 1024;

/// The process's mappings as last counted, plus those our `mprotect`
/// guards added since (0: not counted yet). An estimate: the rest of the
/// program maps and unmaps without telling us, so it is counted again
/// before a guard is refused.
static MAPPINGS: AtomicUsize = AtomicUsize::new(0);

/// When a guard was last refused for want of mappings, in milliseconds of
/// `CLOCK_MONOTONIC` (0: never). Counting the mappings near the limit
/// reads 60,000 lines of `/proc/self/maps`, 16 ms here, so a refusal
/// stands for [`RECOUNT_AFTER_MS`] before they are counted again.
static REFUSED_AT: AtomicU64 = AtomicU64::new(0);
const RECOUNT_AFTER_MS: u64 = 100;

/// Whether `n` more mappings leave [`MAP_HEADROOM`] of `vm.max_map_count`
/// to the rest of the program; if so, they are counted as made. True where
/// `/proc` cannot tell (the kernel's refusal is then the limit).
pub(crate) fn room_for_mappings(n: usize) -> bool {
    let Some(limit) = max_map_count() else {
        return true;
    };
    let keep = MAP_HEADROOM.min(limit / 8);
    let fits = |mappings: usize| mappings.saturating_add(n).saturating_add(keep) <= limit;
    let known = MAPPINGS.load(Ordering::Relaxed);
    if known != 0 && fits(known) {
        MAPPINGS.fetch_add(n, Ordering::Relaxed);
        return true;
    }
    let now = monotonic_ms();
    let refused = REFUSED_AT.load(Ordering::Relaxed);
    if refused != 0 && now.saturating_sub(refused) < RECOUNT_AFTER_MS {
        return false;
    }
    let Some(counted) = mapping_count() else {
        return true;
    };
    if fits(counted) {
        MAPPINGS.store(counted + n, Ordering::Relaxed);
        true
    } else {
        MAPPINGS.store(counted, Ordering::Relaxed);
        REFUSED_AT.store(now.max(1), Ordering::Relaxed);
        false
    }
}

/// `vm.max_map_count`, read once (0: not yet, `usize::MAX`: unreadable).
/// Not a `OnceLock`, for the reason [`page_size`] gives.
static MAX_MAP_COUNT: AtomicUsize = AtomicUsize::new(0);

fn max_map_count() -> Option<usize> {
    let mut limit = MAX_MAP_COUNT.load(Ordering::Relaxed);
    if limit == 0 {
        let mut buf = [0u8; 32];
        let mut value: Option<usize> = None;
        let read = read_proc(c"/proc/sys/vm/max_map_count", &mut buf, |chunk| {
            for &b in chunk.iter().take_while(|b| b.is_ascii_digit()) {
                let digit = usize::from(b - b'0');
                value = Some(value.unwrap_or(0).saturating_mul(10).saturating_add(digit));
            }
        });
        limit = value
            .filter(|&n| read && n > 0 && n != usize::MAX)
            .unwrap_or(usize::MAX);
        MAX_MAP_COUNT.store(limit, Ordering::Relaxed);
    }
    (limit != usize::MAX).then_some(limit)
}

/// The process's mappings now: the lines of `/proc/self/maps`. Reads with
/// a buffer on the stack: near the limit, a large allocation would need a
/// mapping itself.
fn mapping_count() -> Option<usize> {
    let mut buf = [0u8; 16 << 10];
    let mut lines = 0;
    read_proc(c"/proc/self/maps", &mut buf, |chunk| {
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
    })
    .then_some(lines)
}

/// Reads the whole file at `path` through `buf`, handing each chunk to
/// `each`; false if it cannot be read.
fn read_proc(path: &std::ffi::CStr, buf: &mut [u8], mut each: impl FnMut(&[u8])) -> bool {
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    let ok = loop {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => break true,
            n if n > 0 => each(&buf[..n as usize]),
            _ if errno() == libc::EINTR => {}
            _ => break false,
        }
    };
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    ok
}

fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is writable; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Gives the pages of `[addr, addr + len)` back to the kernel; the next
/// touch reads zeros. Returns false where the kernel refuses: a range the
/// user locked (`mlock`, or `mlockall(MCL_FUTURE)` before the arena was
/// mapped) keeps its pages and their bytes.
pub(crate) fn release(addr: usize, len: usize) -> bool {
    len == 0 || madvise(addr, len, libc::MADV_DONTNEED).is_ok()
}

/// Releases many ranges (`(addr, len)`) at once: one `process_madvise(2)`
/// call per 1024 ranges, so the kernel takes its locks and flushes TLBs
/// once per batch rather than once per stack (MADV_DONTNEED through
/// process_madvise on the calling process needs Linux 6.13); one `madvise`
/// per range where that is refused.
/// Returns whether each range was released (see [`release`]).
pub(crate) fn release_many(ranges: &[(usize, usize)]) -> Vec<bool> {
    static REFUSED: AtomicBool = AtomicBool::new(false);
    let mut released = Vec::with_capacity(ranges.len());
    for chunk in ranges.chunks(1024) {
        if madvise_many(chunk, libc::MADV_DONTNEED, &REFUSED) {
            released.extend(chunk.iter().map(|_| true));
        } else {
            released.extend(chunk.iter().map(|&(addr, len)| release(addr, len)));
        }
    }
    released
}

/// Installs guard markers (`MADV_GUARD_INSTALL`) on many ranges with one
/// `process_madvise(2)` call, or one `madvise` per range where the kernel
/// refuses that. At most 1024 ranges.
pub(crate) fn install_guard_markers(ranges: &[(usize, usize)]) -> Result<(), i32> {
    static REFUSED: AtomicBool = AtomicBool::new(false);
    debug_assert!(ranges.len() <= 1024, "one iovec batch (UIO_MAXIOV)");
    if madvise_many(ranges, MADV_GUARD_INSTALL, &REFUSED) {
        return Ok(());
    }
    // Installing a marker twice is harmless, so a partial batch may simply
    // be redone range by range.
    ranges
        .iter()
        .try_for_each(|&(addr, len)| madvise(addr, len, MADV_GUARD_INSTALL))
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: a full memory barrier
/// on every CPU running a thread of this process, registered on first use.
/// Returns false, having done nothing, where the kernel refuses.
pub(crate) fn heavy_barrier() -> bool {
    const PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    heavy_barrier_available() && membarrier(PRIVATE_EXPEDITED)
}

/// [`heavy_barrier_available`]'s answer, once known. Not a `OnceLock`: a
/// fork during its first call would leave the child one that never
/// completes. Registering twice is harmless.
static REGISTERED: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Whether an earlier [`heavy_barrier_available`] found no membarrier (no
/// system call: for messages).
pub(crate) fn heavy_barrier_found_unavailable() -> bool {
    REGISTERED.load(Ordering::Acquire) == NO
}

/// Whether [`heavy_barrier`] can work: the process is registered for it
/// (registering on first use).
pub(crate) fn heavy_barrier_available() -> bool {
    const REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;
    match REGISTERED.load(Ordering::Acquire) {
        UNKNOWN => {
            let yes = membarrier(REGISTER_PRIVATE_EXPEDITED);
            REGISTERED.store(if yes { YES } else { NO }, Ordering::Release);
            yes
        }
        state => state == YES,
    }
}

fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier takes no pointers; an unknown command fails.
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) == 0 }
}

/// The pthread key kept in `slot` (the key + 1, or 0 before it is made),
/// made on first use with `destructor`; `None` if the process has no key
/// left (the next call tries again). Not a `OnceLock`: a fork while
/// another thread creates the key would leave the child one that never
/// completes. Threads that race here each create a key; the first
/// published wins and the others delete theirs.
pub(crate) fn lazy_key(
    slot: &AtomicUsize,
    destructor: extern "C" fn(*mut libc::c_void),
) -> Option<libc::pthread_key_t> {
    let published = slot.load(Ordering::Acquire);
    if published != 0 {
        return Some((published - 1) as libc::pthread_key_t);
    }
    let mut key = 0;
    // SAFETY: `key` is a valid out-pointer; `destructor` has the
    // destructor signature and lives for the whole program.
    if unsafe { libc::pthread_key_create(&mut key, Some(destructor)) } != 0 {
        return None;
    }
    match slot.compare_exchange(0, key as usize + 1, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(key),
        Err(winner) => {
            // SAFETY: our own key, which no thread has a value for.
            unsafe { libc::pthread_key_delete(key) };
            Some((winner - 1) as libc::pthread_key_t)
        }
    }
}

/// Registers `child` as a `pthread_atfork` child handler, once per
/// process (see `vmtask_percpu::register_fork_handlers`): `child` must
/// tolerate running twice.
pub(crate) fn register_fork_child_handler(state: &AtomicU64, child: extern "C" fn()) {
    vmtask_percpu::register_fork_handlers(state, None, None, Some(child));
}

/// Registers the pidfd's fork child handler (once per process). The
/// handler only swaps an atomic and closes what it swapped out, so
/// running twice is harmless.
pub(crate) fn install_pidfd_fork_handler() {
    static HANDLER: AtomicU64 = AtomicU64::new(0);
    register_fork_child_handler(&HANDLER, pidfd_after_fork_child);
}

/// This process's pidfd: the pid in the high half, the descriptor + 1 in
/// the low (0: none could be opened); all zero before first use.
static PIDFD: AtomicU64 = AtomicU64::new(0);

fn decode_pidfd(word: u64) -> Option<libc::c_int> {
    (word as u32).checked_sub(1).map(|fd| fd as libc::c_int)
}

/// The fork child's handler (`pthread_atfork`): the inherited pidfd names
/// the parent; close it now, while its number is certainly still that
/// descriptor, and let the child open its own on first use.
extern "C" fn pidfd_after_fork_child() {
    if let Some(fd) = decode_pidfd(PIDFD.swap(0, Ordering::AcqRel)) {
        // SAFETY: the descriptor inherited from the parent, which nothing
        // in the child can have closed or reused yet (the child has run no
        // code of its own); close is async-signal-safe.
        unsafe { libc::close(fd) };
    }
}

/// A pidfd of this process: opened on first use, and again in a fork
/// child, where the inherited one names the parent (for which
/// `process_madvise` refuses our advice values, so a child would batch
/// nothing). `None` where none can be opened (EMFILE, a kernel before
/// 5.3): remembered for the life of the process.
///
/// A fork child closes the inherited descriptor in a `pthread_atfork`
/// handler, installed before the first pidfd is opened. A child forked
/// while that installation raced with the fork may miss the handler: it
/// then finds a word with its parent's pid, and leaves that descriptor
/// open (one leaked descriptor), since by then the program may have
/// closed the number and reused it for a file of its own.
fn own_pidfd() -> Option<libc::c_int> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    let word = PIDFD.load(Ordering::Acquire);
    if word != 0 && (word >> 32) as u32 == pid {
        return decode_pidfd(word);
    }
    // Where the handler is missing (pthread_atfork out of memory),
    // children rely on the pid check above.
    install_pidfd_fork_handler();
    // SAFETY: pidfd_open on our own pid only creates a descriptor (close
    // on exec); it stays open for the life of the process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let fd = libc::c_int::try_from(fd).ok().filter(|&fd| fd >= 0);
    let new = (u64::from(pid) << 32) | fd.map_or(0, |fd| fd as u64 + 1);
    match PIDFD.compare_exchange(word, new, Ordering::AcqRel, Ordering::Acquire) {
        // A word left by a parent whose fork missed the handler: its
        // descriptor stays open (see above).
        Ok(_) => fd,
        Err(current) => {
            // Another thread of this process published one first.
            if let Some(fd) = fd {
                // SAFETY: ours, opened above and never shared.
                unsafe { libc::close(fd) };
            }
            decode_pidfd(current).filter(|_| (current >> 32) as u32 == pid)
        }
    }
}

/// Applies `advice` to up to 1024 ranges of our own address space with one
/// `process_madvise(2)` on a pidfd of this process. True if the kernel did
/// the whole batch; false if the caller must fall back to `madvise` (no
/// pidfd, a kernel that refuses this advice through process_madvise, which
/// is then remembered in `refused`, or a partial result).
fn madvise_many(ranges: &[(usize, usize)], advice: libc::c_int, refused: &AtomicBool) -> bool {
    if refused.load(Ordering::Relaxed) {
        return false;
    }
    let Some(fd) = own_pidfd() else { return false };
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(addr, len)| libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    let total: usize = ranges.iter().map(|r| r.1).sum();
    // Why this holds: `iov` holds `ranges.len()` valid iovecs describing ranges of
    // our own arenas, which stay mapped while the caller borrows its pool.
    // The advice values callers pass never invalidate memory Rust code
    // holds references to: dontneed on free stacks, guard install on
    // uncarved slots, and populate on the top pages of fresh slots, which
    // other threads may already have carved, written or released by the
    // time it runs: populate never changes what a page holds (it does
    // nothing to a present page, and faults in a zero page where there is
    // none).
    // SAFETY: valid iovecs over unused ranges of our arenas (above).
    let done = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            fd,
            iov.as_ptr(),
            iov.len(),
            advice,
            0,
        )
    };
    if done >= 0 && done as usize == total {
        return true;
    }
    // A kernel without the call (ENOSYS), one that refuses this advice
    // (EINVAL) or a seccomp filter (EPERM) will refuse the next batch too.
    // Rarer causes of the same errors (a range a user locked or
    // re-protected) turn batching off as well: slower from then on, never
    // wrong, since the fallback does the same work range by range.
    if done < 0 && matches!(errno(), libc::EINVAL | libc::ENOSYS | libc::EPERM) {
        refused.store(true, Ordering::Relaxed);
    }
    false
}

/// Faults in `[addr, addr + len)` for writing (`MADV_POPULATE_WRITE`).
pub(crate) fn populate_write(addr: usize, len: usize) -> Result<(), i32> {
    madvise(addr, len, libc::MADV_POPULATE_WRITE)
}

/// Faults in `[addr, addr + len)` for writing if the kernel can, as an
/// optimisation only: on a kernel without `MADV_POPULATE_WRITE` (before
/// Linux 5.14, or refused by a seccomp filter) it does nothing, and a
/// failure (ENOMEM at a memory cgroup's limit, a pending fatal signal)
/// leaves the pages to be faulted in by their first write, as they would
/// be without this call.
pub(crate) fn populate_hint(addr: usize, len: usize) {
    if populate_supported() == Ok(true) {
        let _ = populate_write(addr, len);
    }
}

/// [`populate_hint`] for the top pages of freshly carved slots: all with
/// one `process_madvise(2)` call where the kernel allows it (Linux 6.13+),
/// otherwise one `madvise` each, as before batching (the carve that asked
/// for them does not ask again for the later slots).
pub(crate) fn populate_tops(pages: &crate::arena::TopPages) {
    static REFUSED: AtomicBool = AtomicBool::new(false);
    if populate_supported() != Ok(true) {
        return;
    }
    let page = page_size();
    let ranges: Vec<_> = pages.ranges(page).collect();
    if ranges.len() > 1 && madvise_many(&ranges, libc::MADV_POPULATE_WRITE, &REFUSED) {
        return;
    }
    // No batch (one page, no pidfd, a kernel before 6.13, a seccomp
    // filter), or one stopped part-way (ENOMEM at a memory cgroup's
    // limit): page by page, best effort; a page that fails is left to
    // its first write, as with `populate_hint`.
    for (addr, len) in ranges {
        let _ = populate_write(addr, len);
    }
}

/// Whether this kernel lets us use `MADV_POPULATE_WRITE`, probed on a
/// scratch mapping (an error on a real stack could have other causes);
/// see [`Probe`] for what is remembered.
pub(crate) fn populate_supported() -> Result<bool, i32> {
    static PROBE: Probe = Probe::new();
    PROBE.get(1, |p| populate_write(p, page_size()))
}

/// A kernel feature probed on a scratch mapping, remembered once the
/// kernel has answered for certain: yes (the call worked) or no (`EINVAL`,
/// an advice it does not know; `ENOSYS` or `EPERM`, a seccomp filter). A
/// probe that fails for want of memory or address space (no scratch
/// mapping, or the call's `ENOMEM`, `EAGAIN`, `EINTR`) says nothing about
/// the kernel: it gives that errno for this call and is tried again next
/// time, so a moment of memory pressure at the first use does not turn a
/// feature off for the life of the process.
pub(crate) struct Probe(AtomicU8);

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

impl Probe {
    pub(crate) const fn new() -> Probe {
        Probe(AtomicU8::new(UNKNOWN))
    }

    /// The remembered answer, or runs `test` on a scratch mapping of
    /// `pages` pages (unmapped afterwards); `Err(errno)` when the probe
    /// could not tell.
    pub(crate) fn get(
        &self,
        pages: usize,
        test: impl FnOnce(usize) -> Result<(), i32>,
    ) -> Result<bool, i32> {
        match self.0.load(Ordering::Relaxed) {
            YES => return Ok(true),
            NO => return Ok(false),
            _ => {}
        }
        let len = pages * page_size();
        let scratch = reserve(len)?;
        let result = test(scratch);
        // SAFETY: the scratch mapping is ours and nothing else uses it.
        unsafe { unmap(scratch, len) };
        let answer = match result {
            Ok(()) => true,
            Err(libc::EINVAL | libc::ENOSYS | libc::EPERM) => false,
            Err(errno) => return Err(errno),
        };
        // Racing probes reach the same answer.
        self.0
            .store(if answer { YES } else { NO }, Ordering::Relaxed);
        Ok(answer)
    }
}

/// How many pages of `[addr, addr + len)` (page-aligned) are resident.
pub(crate) fn resident_pages(addr: usize, len: usize) -> usize {
    let pages = len / page_size();
    if pages == 0 {
        return 0;
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, as mincore requires.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Whether this kernel supports `MADV_GUARD_INSTALL`, probed on a scratch
/// mapping (see [`Probe`]). The kernel refuses markers on locked memory
/// with the same `EINVAL` as a kernel without them, so the scratch page is
/// unlocked first (`mlockall(MCL_FUTURE)` locks it at `mmap`): the probe
/// answers for the kernel, and carving falls back to `mprotect` slot by
/// slot where the arena itself is locked (`arena::Arenas::carve`).
pub(crate) fn guard_markers_supported() -> Result<bool, i32> {
    static PROBE: Probe = Probe::new();
    PROBE.get(2, |p| {
        // SAFETY: `p` is the probe's own scratch mapping; unlocking it
        // changes nothing else (and nothing when it is not locked).
        unsafe { libc::munlock(p as *const libc::c_void, page_size()) };
        madvise(p, page_size(), MADV_GUARD_INSTALL)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The process a pidfd names, from `/proc/self/fdinfo`.
    fn pidfd_pid(fd: libc::c_int) -> Option<i32> {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("Pid:"))
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// Runs `child` in a fork child and asserts it returned true.
    pub(crate) fn in_fork_child(what: &str, child: impl FnOnce() -> bool) {
        // SAFETY: the child makes system calls, reads files and leaves
        // with `_exit`; glibc's fork handlers keep its allocator usable.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let ok = child();
            // SAFETY: leaving the child without running the parent's
            // destructors or the test harness.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: reaping our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{what} (status {status:#x})"
        );
    }

    /// Whether `own_pidfd` gives a pidfd naming this process.
    fn own_pidfd_names_us() -> bool {
        own_pidfd()
            .and_then(pidfd_pid)
            // SAFETY: getpid has no preconditions.
            .is_some_and(|pid| pid == unsafe { libc::getpid() })
    }

    #[test]
    fn a_fork_child_opens_its_own_pidfd() {
        let Some(fd) = own_pidfd() else {
            return; // no pidfd on this kernel: nothing to check
        };
        if !own_pidfd_names_us() {
            return; // /proc shows another pid namespace
        }
        in_fork_child("the child's pidfd named another process", || {
            // The fork handler closed the inherited descriptor and
            // cleared the word.
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let closed = unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1;
            PIDFD.load(Ordering::Relaxed) == 0 && closed && own_pidfd_names_us()
        });
        assert_eq!(own_pidfd(), Some(fd), "the parent keeps its own");

        // A child whose fork missed the handler finds its parent's word;
        // by then the number may be a file of the program's own, which
        // must stay open.
        in_fork_child("a stale pidfd word closed the program's file", || {
            let file = std::fs::File::open("/dev/null").unwrap();
            let number = std::os::fd::AsRawFd::as_raw_fd(&file);
            // SAFETY: getppid has no preconditions.
            let parent = unsafe { libc::getppid() } as u32;
            PIDFD.store(
                (u64::from(parent) << 32) | (number as u64 + 1),
                Ordering::Relaxed,
            );
            let named_us = own_pidfd_names_us();
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let still_open = unsafe { libc::fcntl(number, libc::F_GETFD) } != -1;
            named_us && still_open
        });
    }

    #[test]
    fn page_rounding_is_exact() {
        let page = page_size();
        assert_eq!(page_ceil(1), page);
        assert_eq!(page_ceil(page), page);
        assert_eq!(page_ceil(page + 1), 2 * page);
        assert_eq!(checked_page_ceil(usize::MAX), None);
        assert_eq!(checked_page_ceil(usize::MAX - page + 2), None);
        let last = usize::MAX - page + 1;
        assert_eq!(
            checked_page_ceil(last),
            Some(last),
            "the last page-aligned size"
        );
        assert_eq!(checked_page_ceil(0), Some(0));
        assert_eq!(page_floor(page + 1), page);
    }

    #[test]
    fn guard_markers_install_in_one_batch() {
        if !guard_markers_supported().unwrap() {
            return;
        }
        let page = page_size();
        let p = reserve(8 * page).unwrap();
        let guards: Vec<_> = (0..4).map(|i| (p + 2 * i * page, page)).collect();
        install_guard_markers(&guards).unwrap();
        // A guard marker refuses to be populated; the page after it works.
        for &(addr, len) in &guards {
            assert_eq!(populate_write(addr, len), Err(libc::EFAULT));
            populate_write(addr + page, page).unwrap();
        }
        // SAFETY: nothing uses the mapping any more.
        unsafe { unmap(p, 8 * page) };
    }

    /// On Linux 6.7+ `MAP_STACK` alone sets the flag; the advice in
    /// `reserve` is for older kernels.
    #[test]
    fn arenas_take_no_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return;
        }
        let len = 8 << 20;
        let p = reserve(len).unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // SAFETY: nothing uses the mapping.
        unsafe { unmap(p, len) };
        // The entry whose range holds the arena (it may have merged with a
        // neighbour reserved by another test), then its VmFlags line.
        let mut lines = smaps.lines();
        let holds_arena = |line: &str| {
            let Some((range, _)) = line.split_once(' ') else {
                return false;
            };
            let Some((start, end)) = range.split_once('-') else {
                return false;
            };
            match (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                (Ok(start), Ok(end)) => start <= p && p < end,
                _ => false,
            }
        };
        lines
            .find(|l| holds_arena(l))
            .expect("the arena in /proc/self/smaps");
        let flags = lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("the arena's VmFlags");
        assert!(
            flags.split_whitespace().any(|f| f == "nh"),
            "arena flags: {flags}"
        );
    }

    /// Only a definite answer is remembered: a probe that cannot get its
    /// scratch mapping, or whose call fails for want of memory, answers
    /// `Err` and runs again next time.
    #[test]
    fn probe_remembers_only_definite_answers() {
        let runs = std::cell::Cell::new(0);
        let probe = Probe::new();
        let test = |errno| {
            let runs = &runs;
            move |_| {
                runs.set(runs.get() + 1);
                if errno == 0 {
                    Ok(())
                } else {
                    Err(errno)
                }
            }
        };
        assert_eq!(probe.get(1, test(libc::ENOMEM)), Err(libc::ENOMEM));
        assert_eq!(probe.get(1, test(libc::EAGAIN)), Err(libc::EAGAIN));
        assert_eq!(probe.get(1, test(0)), Ok(true));
        assert_eq!(probe.get(1, test(libc::EINVAL)), Ok(true), "remembered");
        assert_eq!(runs.get(), 3);
        let probe = Probe::new();
        assert_eq!(probe.get(1, test(libc::EINVAL)), Ok(false));
        assert_eq!(probe.get(1, test(0)), Ok(false), "remembered");
        assert_eq!(runs.get(), 4);
        // No scratch mapping: `reserve`'s errno, nothing remembered.
        let probe = Probe::new();
        assert!(probe.get(usize::MAX / page_size(), test(0)).is_err());
        assert_eq!(runs.get(), 4);
        assert_eq!(probe.get(1, test(0)), Ok(true));
    }

    #[test]
    fn populate_probe_matches_a_real_populate() {
        let page = page_size();
        let p = reserve(page).unwrap();
        assert_eq!(
            populate_write(p, page).is_ok(),
            populate_supported().unwrap()
        );
        // SAFETY: nothing uses the mapping.
        unsafe { unmap(p, page) };
    }

    #[test]
    fn release_drops_resident_pages() {
        let page = page_size();
        let p = reserve(4 * page).unwrap();
        // SAFETY: the mapping is ours, read-write, 4 pages long.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, 4 * page) };
        assert_eq!(resident_pages(p, 4 * page), 4);
        assert!(release(p, page));
        assert_eq!(resident_pages(p, 4 * page), 3);
        assert_eq!(
            release_many(&[(p + page, page), (p + 3 * page, page)]),
            [true, true]
        );
        assert_eq!(resident_pages(p, 4 * page), 1);
        // SAFETY: as above.
        let byte = unsafe { *((p + 3 * page) as *const u8) };
        assert_eq!(byte, 0, "released pages read zeros");
        // SAFETY: nothing uses the mapping any more.
        unsafe { unmap(p, 4 * page) };
    }
}
