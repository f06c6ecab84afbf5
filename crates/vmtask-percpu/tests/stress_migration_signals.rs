//! Stress of `CpuCache` under migration and signals: unique tokens pushed
//! and popped by workers (pinned, unpinned, migrating themselves, and
//! migrated from outside with `sched_setaffinity`), by signal handlers
//! (`pthread_kill` at a high rate, each handler pushing or popping on the
//! interrupted thread's CPU) and by drainers; at the end every token must
//! be held in exactly one place.
//!
//! It fails within seconds when the drain's `membarrier` is skipped or a
//! push's commit store is moved out of its critical section (checked by
//! breaking the code on purpose). `VMTASK_PERCPU_STRESS_SECS` (default 2)
//! sets each mode's run; each also runs until the signal handlers and the
//! drainers have moved tokens (at most 60 s more). Alone in its binary: it
//! installs a SIGUSR1 handler.

use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmtask_percpu::{CacheMode, CpuCache};

#[path = "../../../test-support/knobs.rs"]
mod knobs;

const WORKERS: usize = 6;
const PER_WORKER: usize = 40;
const HANDLER_TOKENS: usize = 16;
const HSTACK: usize = 64;

static CACHE: AtomicPtr<CpuCache> = AtomicPtr::new(std::ptr::null_mut());
// Per worker: the handler's own stack of tokens (touched only by signal
// handlers running on that worker's thread; SIGUSR1 does not nest).
static HSTACKS: [[AtomicUsize; HSTACK]; WORKERS] =
    [const { [const { AtomicUsize::new(0) }; HSTACK] }; WORKERS];
static HLEN: [AtomicUsize; WORKERS] = [const { AtomicUsize::new(0) }; WORKERS];
static HRUNS: AtomicUsize = AtomicUsize::new(0);
static HOPS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static WORKER_ID: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn token(n: usize) -> NonNull<u8> {
    NonNull::new((n * 16) as *mut u8).unwrap()
}

extern "C" fn handler(_: libc::c_int) {
    let w = WORKER_ID.with(Cell::get);
    if w >= WORKERS {
        return;
    }
    // SAFETY: set before any signal is sent; leaked.
    let cache = unsafe { &*CACHE.load(Ordering::Relaxed) };
    let run = HRUNS.fetch_add(1, Ordering::Relaxed);
    let len = HLEN[w].load(Ordering::Relaxed);
    if run % 2 == 0 {
        if len > 0 {
            let t = HSTACKS[w][len - 1].load(Ordering::Relaxed);
            if cache.push(NonNull::new(t as *mut u8).unwrap()).is_ok() {
                HLEN[w].store(len - 1, Ordering::Relaxed);
                HOPS.fetch_add(1, Ordering::Relaxed);
            }
        }
    } else if len < HSTACK {
        if let Some(p) = cache.pop() {
            HSTACKS[w][len].store(p.as_ptr() as usize, Ordering::Relaxed);
            HLEN[w].store(len + 1, Ordering::Relaxed);
            HOPS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> bool {
    // SAFETY: zeroed cpu_set_t is empty; indices below 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) == 0
    }
}

fn xorshift(r: &mut u64) -> u64 {
    *r ^= *r << 13;
    *r ^= *r >> 7;
    *r ^= *r << 17;
    *r
}

fn run(mode: CacheMode, secs: Duration) {
    let cache: &'static CpuCache = Box::leak(Box::new(CpuCache::with_mode(8, mode)));
    CACHE.store(cache as *const CpuCache as *mut CpuCache, Ordering::SeqCst);
    let mode = cache.mode();
    let allowed = vmtask_percpu::allowed_cpus();
    HRUNS.store(0, Ordering::SeqCst);
    HOPS.store(0, Ordering::SeqCst);
    let mut next_token = 1usize;
    for (stack, len) in HSTACKS.iter().zip(&HLEN) {
        for slot in &stack[..HANDLER_TOKENS] {
            slot.store(token(next_token).as_ptr() as usize, Ordering::SeqCst);
            next_token += 1;
        }
        len.store(HANDLER_TOKENS, Ordering::SeqCst);
    }
    // SAFETY: the handler touches only atomics, a thread-local Cell and
    // the cache.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = libc::SA_RESTART;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
    let stop_workers = Arc::new(AtomicBool::new(false));
    let stop_noise = Arc::new(AtomicBool::new(false));
    let ids: Arc<Mutex<Vec<(libc::pthread_t, libc::pid_t)>>> = Arc::new(Mutex::new(Vec::new()));
    let fast_ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let first = next_token;
        next_token += PER_WORKER;
        let (stop, ids, fast_ok, allowed) = (
            stop_workers.clone(),
            ids.clone(),
            fast_ok.clone(),
            allowed.clone(),
        );
        workers.push(std::thread::spawn(move || {
            WORKER_ID.with(|c| c.set(w));
            // 0,1: pinned; 2,3: unpinned; 4,5: migrate themselves.
            if w < 2 {
                vmtask_percpu::pin_current_thread(allowed[w % allowed.len()]).unwrap();
            }
            // SAFETY: pthread_self has no preconditions.
            ids.lock()
                .unwrap()
                .push((unsafe { libc::pthread_self() }, gettid()));
            let mut held: Vec<NonNull<u8>> = (first..first + PER_WORKER).map(token).collect();
            let mut rng = 0x1234_5678_9abc_def1u64 ^ (w as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut ok = 0usize;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = xorshift(&mut rng);
                if w >= 4 && n % 64 == 0 {
                    let c = allowed[(r >> 8) as usize % allowed.len()];
                    if (r >> 20) % 2 == 0 {
                        set_affinity(0, &[c]);
                    } else {
                        set_affinity(0, &allowed);
                    }
                }
                if r % 2 == 0 {
                    if let Some(p) = held.pop() {
                        match cache.push(p) {
                            Ok(()) => ok += 1,
                            Err(p) => held.push(p),
                        }
                    }
                } else if let Some(p) = cache.pop() {
                    ok += 1;
                    held.push(p);
                }
            }
            fast_ok.fetch_add(ok, Ordering::Relaxed);
            held.into_iter()
                .map(|p| p.as_ptr() as usize)
                .collect::<Vec<_>>()
        }));
    }
    while ids.lock().unwrap().len() < WORKERS {
        std::thread::yield_now();
    }
    let ids_now = ids.lock().unwrap().clone();
    // Migrator: moves workers 1..WORKERS around from outside.
    let migrator = {
        let (stop, ids_now, allowed) = (stop_noise.clone(), ids_now.clone(), allowed.clone());
        std::thread::spawn(move || {
            let mut rng = 77u64;
            let mut moves = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = xorshift(&mut rng);
                let (_, tid) = ids_now[(r % WORKERS as u64) as usize];
                let c = allowed[(r >> 8) as usize % allowed.len()];
                if (r >> 16) % 3 == 0 {
                    set_affinity(tid, &allowed);
                } else {
                    set_affinity(tid, &[c]);
                }
                moves += 1;
                std::thread::sleep(Duration::from_micros(50));
            }
            moves
        })
    };
    // Signaller: pthread_kill at a high rate.
    let signaller = {
        let (stop, ids_now) = (stop_noise.clone(), ids_now.clone());
        std::thread::spawn(move || {
            let mut rng = 99u64;
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = xorshift(&mut rng);
                let (pt, _) = ids_now[(r % WORKERS as u64) as usize];
                // SAFETY: the workers live until stop_noise has been
                // observed and this thread joined.
                unsafe { libc::pthread_kill(pt, libc::SIGUSR1) };
                sent += 1;
                for _ in 0..(r >> 40) % 300 {
                    std::hint::spin_loop();
                }
            }
            sent
        })
    };
    // Drainers: one random CPU at a time; give some back.
    let drained = Arc::new(AtomicUsize::new(0));
    let drainers: Vec<_> = (0..2)
        .map(|d| {
            let (stop, drained) = (stop_workers.clone(), drained.clone());
            std::thread::spawn(move || {
                let mut held: Vec<NonNull<u8>> = Vec::new();
                let mut rng = 555u64 + d;
                while !stop.load(Ordering::Relaxed) {
                    let r = xorshift(&mut rng);
                    let cpu = (r % cache.cpus() as u64) as usize;
                    let n = cache.drain(cpu, 1 + (r >> 8) as usize % 8, &mut held);
                    drained.fetch_add(n, Ordering::Relaxed);
                    while held.len() > 8 {
                        match cache.push(held.pop().unwrap()) {
                            Ok(()) => {}
                            Err(p) => {
                                held.push(p);
                                break;
                            }
                        }
                    }
                    if n == 0 {
                        std::thread::yield_now();
                    }
                }
                held.into_iter()
                    .map(|p| p.as_ptr() as usize)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let start = Instant::now();
    let progress = || HOPS.load(Ordering::Relaxed) > 0 && drained.load(Ordering::Relaxed) > 0;
    while start.elapsed() < secs
        || (!progress() && start.elapsed() < secs + Duration::from_secs(60))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop_noise.store(true, Ordering::SeqCst);
    let moves = migrator.join().unwrap();
    let sent = signaller.join().unwrap();
    stop_workers.store(true, Ordering::SeqCst);
    let mut all: Vec<usize> = workers
        .into_iter()
        .chain(drainers)
        .flat_map(|t| t.join().unwrap())
        .collect();
    for w in 0..WORKERS {
        let len = HLEN[w].load(Ordering::SeqCst);
        all.extend(HSTACKS[w][..len].iter().map(|a| a.load(Ordering::SeqCst)));
    }
    let mut rest = Vec::new();
    for cpu in 0..cache.cpus() {
        cache.drain(cpu, usize::MAX, &mut rest);
    }
    assert_eq!(cache.total_len(), 0);
    all.extend(rest.iter().map(|p| p.as_ptr() as usize));
    let total = WORKERS * (PER_WORKER + HANDLER_TOKENS);
    eprintln!(
        "{mode}: {:?}, fast-path ok {}, handler runs {} ops {}, signals {sent}, moves {moves}, drained {}, tokens {} of {total}",
        secs,
        fast_ok.load(Ordering::Relaxed),
        HRUNS.load(Ordering::Relaxed),
        HOPS.load(Ordering::Relaxed),
        drained.load(Ordering::Relaxed),
        all.len()
    );
    all.sort_unstable();
    let n = all.len();
    all.dedup();
    assert_eq!(all.len(), n, "{mode}: a token was duplicated");
    assert_eq!(n, total, "{mode}: a token was lost");
    assert!(
        all.iter()
            .all(|&t| (16..=total * 16).contains(&t) && t % 16 == 0),
        "{mode}: a foreign value"
    );
    assert!(
        HOPS.load(Ordering::Relaxed) > 0 && drained.load(Ordering::Relaxed) > 0,
        "{mode}: the signal handlers or the drainers never moved a token"
    );
}

fn secs() -> Duration {
    knobs::seconds("VMTASK_PERCPU_STRESS_SECS", 2.0)
}

#[test]
fn stress_tokens_rseq_then_trylock() {
    eprintln!(
        "rseq_cache_supported={} rseq_available={} default mode={}",
        vmtask_percpu::rseq_cache_supported(),
        vmtask_percpu::rseq_available(),
        vmtask_percpu::cache_mode()
    );
    run(CacheMode::Rseq, secs());
    run(CacheMode::TryLock, secs());
}
