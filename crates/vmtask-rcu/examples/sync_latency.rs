//! What a grace period with a reader costs against the one `membarrier` in
//! it: `synchronize()` while a thread on the other CPU takes read locks in
//! a loop, and, in the same process and with the same reader, a bare
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, in alternating rounds.
//!
//! ```sh
//! cargo run --release -p vmtask-rcu --example sync_latency [ROUNDS] [SPINS]
//! ```
//!
//! `SPINS` (default 0) spin-loop hints in each of the reader's sections
//! make them longer. Prints each round's mean per call, the medians, and
//! how many grace
//! periods took the fast path (no heavy barrier); in fence mode
//! (`VMTASK_RCU_FORCE_FENCE=1`) the bare `membarrier` is skipped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Calls per round.
const CALLS: u32 = 5_000;

fn membarrier_expedited() {
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    // SAFETY: membarrier takes integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
    assert_eq!(rc, 0, "membarrier: {}", std::io::Error::last_os_error());
}

/// Mean microseconds per call of `f` over `CALLS` calls.
fn round(f: impl Fn()) -> f64 {
    let start = Instant::now();
    for _ in 0..CALLS {
        f();
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let usage = "usage: sync_latency [ROUNDS] [SPINS]";
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map_or(5, |s| s.parse().expect(usage));
    let spins: usize = args.next().map_or(0, |s| s.parse().expect(usage));
    let cpus = vmtask_percpu::allowed_cpus();
    let [updater_cpu, reader_cpu, ..] = cpus[..] else {
        eprintln!("sync_latency needs two CPUs; this process may use {cpus:?}");
        return;
    };
    vmtask_percpu::pin_current_thread(updater_cpu).expect("pin the updater");
    let stop = Arc::new(AtomicBool::new(false));
    let registered = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, registered) = (stop.clone(), registered.clone());
        std::thread::spawn(move || {
            vmtask_percpu::pin_current_thread(reader_cpu).expect("pin the reader");
            drop(vmtask_rcu::read_lock());
            registered.store(true, Ordering::Release);
            while !stop.load(Ordering::Relaxed) {
                let guard = vmtask_rcu::read_lock();
                std::hint::black_box(&guard);
                for _ in 0..spins {
                    std::hint::spin_loop();
                }
                drop(guard);
            }
        })
    };
    // The first read lock chose the barrier mode (and registered the
    // process for membarrier).
    while !registered.load(Ordering::Acquire) {
        std::hint::spin_loop();
    }
    let membarrier = vmtask_rcu::stats().mode == vmtask_rcu::BarrierMode::Membarrier;
    let (mut sync, mut bare) = (Vec::new(), Vec::new());
    let (mut gps, mut fast) = (0, 0);
    for r in 1..=rounds {
        let before = vmtask_rcu::stats();
        sync.push(round(vmtask_rcu::synchronize));
        let after = vmtask_rcu::stats();
        gps += after.grace_periods - before.grace_periods;
        fast += after.fast_grace_periods - before.fast_grace_periods;
        if membarrier {
            bare.push(round(membarrier_expedited));
        }
        let bare_text = bare.last().map_or("-".into(), |b| format!("{b:.2} µs"));
        println!(
            "round {r}: synchronize {:.2} µs, membarrier {bare_text}",
            sync[r - 1]
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    println!(
        "grace periods: {gps}, of which {fast} ({:.1}%) by the fast path",
        100.0 * fast as f64 / gps.max(1) as f64
    );
    let (s, b) = (median(sync), (!bare.is_empty()).then(|| median(bare)));
    match b {
        Some(b) => println!(
            "median: synchronize {s:.2} µs, membarrier {b:.2} µs, ratio {:.2}",
            s / b
        ),
        None => println!("median: synchronize {s:.2} µs (fence mode, no membarrier)"),
    }
}
