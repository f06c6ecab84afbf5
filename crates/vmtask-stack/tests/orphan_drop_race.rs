//! A pool dropped with its only stack out, that stack freed on another
//! CPU while the drop runs: the free that brings the last stack back may
//! destroy the pool only once the drop is done with it (review finding: it
//! destroyed it under the running drop, which then spun on a freed lock or
//! corrupted the heap).
//!
//! The dropping thread is paused at a random point of the drop (a signal
//! whose handler sleeps) while the stack is freed, and every freed heap
//! block is poisoned, so a use of the destroyed pool hangs (caught by a
//! watchdog) or crashes instead of passing unseen.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use vmtask_stack::{Config, Stack, StackPool};

mod common;
use common::spin_ns;

/// The system allocator, writing 0xa5 over every block it frees.
struct Poisoning;

// SAFETY: every call goes to the system allocator with the caller's
// arguments; `dealloc` writes only inside the block being freed.
unsafe impl GlobalAlloc for Poisoning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` is a live block of `layout.size()` bytes, the
        // caller's until this call returns.
        unsafe {
            std::ptr::write_bytes(ptr, 0xa5, layout.size());
            System.dealloc(ptr, layout);
        }
    }
}

#[global_allocator]
static ALLOCATOR: Poisoning = Poisoning;

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; clock_gettime is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static PAUSED_AT: AtomicU64 = AtomicU64::new(0);

/// Pauses the interrupted thread for 300 µs.
extern "C" fn pause(_: libc::c_int) {
    PAUSED_AT.store(now_ns(), Ordering::Relaxed);
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 300_000,
    };
    // SAFETY: nanosleep is async-signal-safe; `ts` is valid.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

#[test]
fn the_last_free_does_not_destroy_the_pool_under_its_drop() {
    let cpus = vmtask_percpu::allowed_cpus();
    let [here, there, ..] = cpus[..] else {
        eprintln!("one CPU allowed: the free cannot run beside the drop; nothing to test");
        return;
    };
    vmtask_percpu::pin_current_thread(here).unwrap();
    // SAFETY: a handler that only reads the clock, stores an atomic and
    // sleeps (async-signal-safe), for a signal nothing else here uses.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = pause as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
    // A round that hangs is a drop spinning on a lock of the freed pool.
    static ROUND: AtomicUsize = AtomicUsize::new(0);
    std::thread::spawn(|| {
        let mut last = usize::MAX;
        loop {
            std::thread::sleep(Duration::from_secs(10));
            let now = ROUND.load(Ordering::Relaxed);
            if now == last {
                eprintln!("round {now} hung: the drop is using a destroyed pool");
                std::process::abort();
            }
            last = now;
        }
    });
    // SAFETY: pthread_self has no preconditions.
    let dropper = unsafe { libc::pthread_self() } as usize;
    static GO: AtomicUsize = AtomicUsize::new(0);
    let (send, stacks) = mpsc::channel::<(usize, Stack)>();
    let (freed, wait_freed) = mpsc::channel::<()>();
    let freer = std::thread::spawn(move || {
        vmtask_percpu::pin_current_thread(there).unwrap();
        for (round, stack) in stacks {
            while GO.load(Ordering::Acquire) != round {
                std::hint::spin_loop();
            }
            // SAFETY: the dropping thread is alive (it waits for `freed`),
            // and SIGUSR1 has the pausing handler.
            unsafe { libc::pthread_kill(dropper as libc::pthread_t, libc::SIGUSR1) };
            spin_ns(40_000);
            drop(stack);
            freed.send(()).unwrap();
        }
    });
    const ROUNDS: usize = 3000;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut paused_inside = 0;
    for round in 1..=ROUNDS {
        ROUND.store(round, Ordering::Relaxed);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let pool = StackPool::new(Config {
            cache_size: 2,
            ..Config::default()
        })
        .unwrap();
        send.send((round, pool.alloc().unwrap())).unwrap();
        std::thread::sleep(Duration::from_micros(50));
        GO.store(round, Ordering::Release);
        spin_ns(seed % 25_000);
        let start = now_ns();
        drop(pool);
        let end = now_ns();
        wait_freed.recv().unwrap();
        let paused = PAUSED_AT.load(Ordering::Relaxed);
        paused_inside += usize::from(paused >= start && paused <= end);
    }
    drop(send);
    freer.join().unwrap();
    eprintln!("the drop was paused by the signal in {paused_inside} of {ROUNDS} rounds");
}
