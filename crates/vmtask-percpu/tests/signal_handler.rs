//! A signal handler that pushes and pops on the CPU whose sequence it
//! interrupted: the interrupted sequence must abort (rseq) or the handler
//! must find the area busy (try-lock), so that every pointer pushed comes
//! back exactly once, by a pop or the final drain. With a sequence whose
//! abort range misses its commit, this test loses pointers (checked in
//! review, by shrinking the push's post-commit offset).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use vmtask_percpu::{CacheMode, CpuCache};

/// Room for the handler's own records (it may not allocate).
const RECORDS: usize = 1 << 18;
/// Handler runs a run needs to mean anything. Where the worker gets little
/// CPU (a loaded machine, one CPU shared with the signalling thread), the
/// run goes on past its second until it has them, for at most 60 s.
const MIN_RUNS: usize = 100;
static CACHE: AtomicPtr<CpuCache> = AtomicPtr::new(std::ptr::null_mut());
static HANDLER_PUSHED: [AtomicUsize; RECORDS] = [const { AtomicUsize::new(0) }; RECORDS];
static HANDLER_POPPED: [AtomicUsize; RECORDS] = [const { AtomicUsize::new(0) }; RECORDS];
static PUSHES: AtomicUsize = AtomicUsize::new(0);
static POPS: AtomicUsize = AtomicUsize::new(0);
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Pushes a pointer of its own on even runs, pops on odd ones, and records
/// what it did in the static arrays (atomics only: async-signal-safe).
extern "C" fn handler(_: libc::c_int) {
    // SAFETY: CACHE points at a leaked cache, set before the handler was
    // installed for this run and never freed.
    let cache = unsafe { &*CACHE.load(Ordering::Relaxed) };
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    if run % 2 == 0 {
        // Distinct from the worker's pointers, which count up from 16.
        let value = (1usize << (usize::BITS - 2)) + run * 16;
        let pointer = NonNull::new(value as *mut u8).expect("non-zero");
        if cache.push(pointer).is_ok() {
            let i = PUSHES.fetch_add(1, Ordering::Relaxed);
            HANDLER_PUSHED[i].store(value, Ordering::Relaxed);
        }
    } else if let Some(pointer) = cache.pop() {
        let i = POPS.fetch_add(1, Ordering::Relaxed);
        HANDLER_POPPED[i].store(pointer.as_ptr() as usize, Ordering::Relaxed);
    }
}

fn run(mode: CacheMode) {
    let cache: &'static CpuCache = Box::leak(Box::new(CpuCache::with_mode(32, mode)));
    CACHE.store(cache as *const CpuCache as *mut CpuCache, Ordering::SeqCst);
    PUSHES.store(0, Ordering::SeqCst);
    POPS.store(0, Ordering::SeqCst);
    RUNS.store(0, Ordering::SeqCst);
    // SAFETY: installs a handler that only touches atomics and the cache
    // (whose push and pop are async-signal-safe in both modes).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_RESTART;
        assert_eq!(
            libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
            0
        );
    }
    let done = AtomicBool::new(false);
    let worker_id = AtomicUsize::new(0);
    let (mut pushed, mut popped) = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            // One CPU: the handler and the thread it interrupts share an
            // area. Best effort: the test holds on any CPU.
            let _ = vmtask_percpu::pin_current_thread(vmtask_percpu::cpu());
            let (mut pushed, mut popped) = (Vec::new(), Vec::new());
            // SAFETY: pthread_self has no preconditions.
            worker_id.store(unsafe { libc::pthread_self() } as usize, Ordering::SeqCst);
            let start = Instant::now();
            let mut next = 1usize;
            while start.elapsed() < Duration::from_millis(1000)
                || (RUNS.load(Ordering::Relaxed) <= MIN_RUNS
                    && start.elapsed() < Duration::from_secs(60))
            {
                for _ in 0..3 {
                    let pointer = NonNull::new((next * 16) as *mut u8).expect("non-zero");
                    next += 1;
                    if cache.push(pointer).is_ok() {
                        pushed.push(pointer.as_ptr() as usize);
                    }
                }
                for _ in 0..3 {
                    if let Some(pointer) = cache.pop() {
                        popped.push(pointer.as_ptr() as usize);
                    }
                }
            }
            done.store(true, Ordering::SeqCst);
            (pushed, popped)
        });
        while worker_id.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        let thread = worker_id.load(Ordering::SeqCst) as libc::pthread_t;
        // The handler's pushes and pops each stay below RECORDS.
        while !done.load(Ordering::SeqCst) && RUNS.load(Ordering::Relaxed) < RECORDS {
            // The worker is a joinable thread joined only below, so its id
            // stays valid even once it has finished; a signal that arrives
            // after `done` still runs the handler, whose records are read
            // after the join.
            // SAFETY: a valid thread id (above), a handler installed.
            unsafe { libc::pthread_kill(thread, libc::SIGUSR2) };
            for _ in 0..100 {
                std::hint::spin_loop();
            }
        }
        worker.join().unwrap()
    });
    let (pushes, pops) = (PUSHES.load(Ordering::SeqCst), POPS.load(Ordering::SeqCst));
    pushed.extend(
        HANDLER_PUSHED[..pushes]
            .iter()
            .map(|a| a.load(Ordering::Relaxed)),
    );
    popped.extend(
        HANDLER_POPPED[..pops]
            .iter()
            .map(|a| a.load(Ordering::Relaxed)),
    );
    let mut rest = Vec::new();
    for cpu in 0..cache.cpus() {
        cache.drain(cpu, usize::MAX, &mut rest);
    }
    popped.extend(rest.iter().map(|p| p.as_ptr() as usize));
    pushed.sort_unstable();
    popped.sort_unstable();
    assert!(
        RUNS.load(Ordering::Relaxed) > MIN_RUNS,
        "{mode:?}: the handler ran {} times in 60 s",
        RUNS.load(Ordering::Relaxed)
    );
    if pushed != popped {
        // Both sorted: the pointers in one and not the other (counted
        // with multiplicity), which equal lengths alone would hide.
        let (mut lost, mut extra): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < pushed.len() || j < popped.len() {
            match (pushed.get(i), popped.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => {
                    lost.push(*a);
                    i += 1;
                }
                (_, b) => {
                    extra.extend(b);
                    j += 1;
                }
            }
        }
        panic!(
            "{:?}: {} pointers pushed, {} popped or drained; {} lost (first {:x?}), {} duplicated or unknown (first {:x?})",
            cache.mode(),
            pushed.len(),
            popped.len(),
            lost.len(),
            &lost[..lost.len().min(8)],
            extra.len(),
            &extra[..extra.len().min(8)]
        );
    }
}

#[test]
fn a_signal_handler_using_the_cache_mid_sequence_loses_nothing() {
    run(CacheMode::Rseq);
    run(CacheMode::TryLock);
}
