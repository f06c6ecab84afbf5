//! Helpers shared by the pool test binaries.

#![allow(dead_code)]

pub fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The user address space the pool's checks assume (`config.rs`).
#[cfg(target_pointer_width = "64")]
pub const USER_SPACE: usize = 1 << 47;
#[cfg(not(target_pointer_width = "64"))]
pub const USER_SPACE: usize = 3 << 30;

/// `max_stacks` for a pool of `stack_size` stacks (one-page guards) whose
/// test wants the kernel's limits (address space, map count) reached
/// before the pool's own: the default on 64-bit targets; on 32-bit ones,
/// whose default is 8,192, as many slots as fit below 3 GiB.
pub fn max_stacks_past_kernel_limits(stack_size: usize) -> usize {
    if usize::BITS == 64 {
        vmtask_stack::Config::default().max_stacks
    } else {
        (USER_SPACE - 1) / (stack_size + page())
    }
}

/// Runs `f` on a thread pinned to `cpu`, so per-CPU caches behave
/// deterministically.
pub fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    vmtask_percpu::run_on_cpu(cpu, f).unwrap_or_else(|e| panic!("pin to CPU {cpu}: {e}"))
}

/// A CPU this process may run on (a cpuset may exclude CPU 0).
pub fn home() -> usize {
    vmtask_percpu::allowed_cpus()[0]
}

/// Two CPUs this process may run on, if it has two.
pub fn two_cpus() -> Option<(usize, usize)> {
    match vmtask_percpu::allowed_cpus()[..] {
        [a, b, ..] => Some((a, b)),
        _ => None,
    }
}

/// Busy-waits `ns` nanoseconds (for races timed below a sleep's grain).
pub fn spin_ns(ns: u64) {
    let start = std::time::Instant::now();
    while (start.elapsed().as_nanos() as u64) < ns {
        std::hint::spin_loop();
    }
}

/// Lines of `/proc/self/maps`: the process's mappings.
pub fn maps_lines() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

pub fn resident_pages(addr: usize, len: usize) -> usize {
    let mut vec = vec![0u8; len / page()];
    // SAFETY: one byte per page of a page-aligned range.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0);
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Whether this kernel lets the process use `MADV_POPULATE_WRITE`
/// (Linux 5.14+), probed on a scratch page.
pub fn populate_supported() -> bool {
    // SAFETY: a fresh anonymous page, ours until the munmap below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let ok = libc::madvise(p, page(), libc::MADV_POPULATE_WRITE) == 0;
        libc::munmap(p, page());
        ok
    }
}

/// The variable that tells a test binary re-run by [`run_child`] that it
/// is the child; its value names the test.
pub const CHILD: &str = "VMTASK_STACK_CHILD";

/// Whether this process is a child [`run_child`] started.
pub fn in_child() -> bool {
    std::env::var_os(CHILD).is_some()
}

/// Runs the test `test` of this test binary alone in a child process with
/// `env` set to `value`, and returns how it ended and what it printed.
pub fn run_test_in_child(test: &str, env: &str, value: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, value)
        .output()
        .unwrap()
}

/// Runs the test `test` in a child process with [`CHILD`] set.
pub fn run_child(test: &str) -> std::process::Output {
    run_test_in_child(test, CHILD, test)
}

/// Re-runs the test `name` of this test binary in a child process with
/// `env` set (the child's branch of the test does the work and prints
/// `CHILD DONE` last), and asserts it succeeded.
pub fn rerun_in_child(name: &str, env: &str) {
    let out = run_test_in_child(name, env, "1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("CHILD DONE"), "{stdout}\n{stderr}");
}

/// Recurses without end, 512 bytes of frame per call: overflows whatever
/// stack it runs on.
#[inline(never)]
pub fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    if std::hint::black_box(true) {
        recurse(depth + 1) + frame[3]
    } else {
        frame[0]
    }
}

/// Runs `f` with the soft limit of `resource` at 0, then restores it.
/// `f` must not need what the limit takes away beyond what it tests.
pub fn with_zero_soft_limit<T>(resource: libc::__rlimit_resource_t, f: impl FnOnce() -> T) -> T {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on this process's own limits; lowering
    // the soft limit and raising it back up to the hard one needs no
    // privilege.
    unsafe {
        assert_eq!(libc::getrlimit(resource, &mut old), 0);
        let tight = libc::rlimit {
            rlim_cur: 0,
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(resource, &tight), 0);
    }
    let result = f();
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(resource, &old), 0) };
    result
}

/// Allocates from `pool` until the first error, at most `max` stacks
/// (past that, the limit under test was not enforced: a panic). Returns
/// the stacks held and the error.
pub fn alloc_until_error(
    pool: &vmtask_stack::StackPool,
    max: usize,
) -> (Vec<vmtask_stack::Stack>, vmtask_stack::StackError) {
    let mut stacks = Vec::with_capacity(max);
    loop {
        match pool.alloc() {
            Ok(stack) => stacks.push(stack),
            Err(err) => return (stacks, err),
        }
        assert!(stacks.len() < max, "no error after {max} stacks");
    }
}

/// Lowers this process's soft `RLIMIT_AS` to its current size (`VmSize`)
/// plus `headroom` bytes (at most the hard limit, which stays: raising it
/// needs a privilege a test may not have). For child processes only: the
/// limit stays.
pub fn limit_address_space(headroom: u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_size_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmSize:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("VmSize in /proc/self/status");
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads this process's own limit into `limit`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) }, 0);
    // `rlim_t` is 32 bits wide on 32-bit targets: saturate there.
    let wanted =
        libc::rlim_t::try_from(vm_size_kib * 1024 + headroom).unwrap_or(libc::RLIM_INFINITY);
    limit.rlim_cur = wanted.min(limit.rlim_max);
    // SAFETY: lowers this process's own soft limit; no pointer but `limit`.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) }, 0);
}

/// Panics unless `err` is the kernel refusing memory or mappings
/// (`MapFailed` with `ENOMEM`).
#[track_caller]
pub fn assert_enomem(err: &vmtask_stack::StackError) {
    assert!(
        matches!(
            err,
            vmtask_stack::StackError::MapFailed {
                errno: libc::ENOMEM,
                ..
            }
        ),
        "expected MapFailed with ENOMEM, got: {err}"
    );
}

/// Whether the kernel offers `MEMBARRIER_CMD_PRIVATE_EXPEDITED`, without
/// which a pool cannot take a stack parked on another live thread (a
/// documented limit: tests of that skip).
pub fn membarrier_available() -> bool {
    // SAFETY: MEMBARRIER_CMD_QUERY only reads the supported commands.
    let cmds = unsafe { libc::syscall(libc::SYS_membarrier, 0, 0, 0) };
    cmds > 0 && cmds & (1 << 3) != 0
}
