//! Stack allocation cost, the pool side by side with its peers in one run.
//!
//! `cargo bench -p vmtask-stack --bench stack`
//!
//! Groups:
//! - `cached alloc+free`: a stack that goes back to the CPU cache and comes
//!   out again, vs a plain free-list `Vec` pop/push and corosensei's reuse
//!   of one stack (`Coroutine::with_stack` + `resume` + `into_stack`);
//! - `fresh stack, top page touched`: a newly carved slot (by default, and
//!   with `populate_top`, the pool populating its top page) vs a fresh
//!   `mmap` + `mprotect` guard + touch + `munmap`, and corosensei's
//!   `DefaultStack::new` + touch + drop; and the floor under all of them,
//!   the page fault of a first touch alone;
//! - `coroutine create+run+drop`: a corosensei coroutine on a pool stack vs
//!   on one stack reused by hand (an owned coroutine and `into_stack`, or a
//!   `ScopedCoroutine` borrowing the stack) vs on `DefaultStack::new`;
//! - `zero_on_reuse`: what clearing a reused stack costs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, ScopedCoroutine};
use criterion::{criterion_group, criterion_main, Criterion};
use vmtask_stack::{Config, StackPool};

const STACK: usize = 128 * 1024;

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Writes the top page of a stack, as the first frame on it would.
fn touch_top(base: *mut u8) {
    // SAFETY: callers pass the top of a stack whose top page is writable.
    unsafe { std::ptr::write_volatile(base.sub(64), 1) };
}

fn pin() {
    vmtask_percpu::pin_current_thread(vmtask_percpu::cpu()).expect("pin the bench thread");
}

fn cached(c: &mut Criterion) {
    pin();
    let mut g = c.benchmark_group("cached alloc+free");
    let pool = StackPool::new(Config::default()).unwrap();
    drop(pool.alloc().unwrap());
    g.bench_function("vmtask pool", |b| {
        b.iter(|| drop(black_box(pool.alloc().unwrap())))
    });

    let mut free_list: Vec<Box<[u8; 64]>> = (0..16).map(|_| Box::new([0; 64])).collect();
    g.bench_function("free-list Vec pop/push (peer)", |b| {
        b.iter(|| {
            let s = black_box(free_list.pop().unwrap());
            free_list.push(s);
        })
    });

    let mut spare = Some(DefaultStack::new(STACK).unwrap());
    g.bench_function("corosensei with_stack+resume+into_stack (peer)", |b| {
        b.iter(|| {
            let mut co: Coroutine<(), (), (), _> =
                Coroutine::with_stack(spare.take().unwrap(), |_, ()| ());
            black_box(co.resume(()));
            spare = Some(co.into_stack());
        })
    });
    g.finish();
}

/// Carves `iters` fresh stacks, touching each one's top page (a page
/// fault), in pools of at most 4096 stacks so resident memory stays small;
/// only the carving is timed.
fn carve_fresh(iters: u64) -> Duration {
    carve(iters, true, false)
}

/// `carve_fresh` with `populate_top`: the pool populates the top page
/// before the touch.
fn carve_fresh_populated(iters: u64) -> Duration {
    carve(iters, true, true)
}

/// `carve_fresh` without the touch: the guard and the pool's bookkeeping.
fn carve_untouched(iters: u64) -> Duration {
    carve(iters, false, false)
}

fn carve(iters: u64, touch: bool, populate_top: bool) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters as usize;
    while left > 0 {
        let n = left.min(4096);
        left -= n;
        let pool = StackPool::new(Config {
            max_stacks: n,
            populate_top,
            ..Config::default()
        })
        .unwrap();
        let mut held = Vec::with_capacity(n);
        let start = Instant::now();
        for _ in 0..n {
            let stack = pool.alloc().unwrap();
            if touch {
                touch_top(stack.base());
            }
            held.push(stack);
        }
        total += start.elapsed();
    }
    total
}

/// The floor under any fresh stack: the first touch of a never-used page
/// (one page fault), `iters` pages 132 KiB apart in a reserved mapping, as
/// pool slots are; only the touching is timed.
fn first_touch_only(iters: u64) -> Duration {
    let slot = STACK + page();
    let mut total = Duration::ZERO;
    let mut left = iters as usize;
    while left > 0 {
        let n = left.min(4096);
        left -= n;
        // SAFETY: a fresh anonymous mapping; we own it until munmap below.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                n * slot,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let p = p as *mut u8;
            let start = Instant::now();
            for i in 1..=n {
                touch_top(p.add(i * slot));
            }
            total += start.elapsed();
            libc::munmap(p.cast(), n * slot);
        }
    }
    total
}

fn mmap_guard_touch_munmap() {
    let page = page();
    let len = STACK + page;
    // SAFETY: a fresh anonymous mapping; we own it until munmap below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let p = p as *mut u8;
        assert_eq!(
            libc::mprotect(
                p.add(page).cast(),
                STACK,
                libc::PROT_READ | libc::PROT_WRITE
            ),
            0
        );
        touch_top(p.add(len));
        libc::munmap(p.cast(), len);
    }
}

fn fresh(c: &mut Criterion) {
    pin();
    let mut g = c.benchmark_group("fresh stack, top page touched");
    g.bench_function("vmtask pool carve", |b| b.iter_custom(carve_fresh));
    g.bench_function("vmtask pool carve, populate_top on", |b| {
        b.iter_custom(carve_fresh_populated)
    });
    g.bench_function(
        "vmtask pool carve, not touched (guard + bookkeeping)",
        |b| b.iter_custom(carve_untouched),
    );
    g.bench_function("first touch of a reserved page only (floor)", |b| {
        b.iter_custom(first_touch_only)
    });
    g.bench_function("mmap+guard+touch+munmap (peer)", |b| {
        b.iter(mmap_guard_touch_munmap)
    });
    g.bench_function("corosensei DefaultStack::new+touch+drop (peer)", |b| {
        b.iter(|| {
            let stack = DefaultStack::new(STACK).unwrap();
            touch_top(corosensei::stack::Stack::base(&stack).get() as *mut u8);
        })
    });
    g.finish();
}

fn coroutine(c: &mut Criterion) {
    pin();
    let mut g = c.benchmark_group("coroutine create+run+drop");
    let pool = StackPool::new(Config::default()).unwrap();
    g.bench_function("vmtask pool stack", |b| {
        b.iter(|| {
            let mut co = Coroutine::with_stack(
                pool.alloc().unwrap(),
                |_: &corosensei::Yielder<u64, ()>, x: u64| x + 1,
            );
            black_box(co.resume(black_box(1)));
        })
    });
    g.bench_function("vmtask pool stack, scoped", |b| {
        b.iter(|| {
            let mut stack = pool.alloc().unwrap();
            let co = ScopedCoroutine::with_stack(
                &mut stack,
                |_: &corosensei::Yielder<u64, ()>, x: u64| x + 1,
            );
            black_box(co.scope(|mut co| co.resume(black_box(1))));
        })
    });
    // The two ways corosensei reuses one stack by hand: an owned
    // `Coroutine` that gives its stack back with `into_stack` (the same API
    // as the pool case), and a `ScopedCoroutine` borrowing the stack.
    let mut spare = Some(DefaultStack::new(STACK).unwrap());
    g.bench_function("corosensei, one stack reused via into_stack (peer)", |b| {
        b.iter(|| {
            let mut co = Coroutine::with_stack(
                spare.take().unwrap(),
                |_: &corosensei::Yielder<u64, ()>, x: u64| x + 1,
            );
            black_box(co.resume(black_box(1)));
            spare = Some(co.into_stack());
        })
    });
    let mut reused = DefaultStack::new(STACK).unwrap();
    g.bench_function("corosensei, one stack reused by hand (peer)", |b| {
        b.iter(|| {
            let co = ScopedCoroutine::with_stack(
                &mut reused,
                |_: &corosensei::Yielder<u64, ()>, x: u64| x + 1,
            );
            black_box(co.scope(|mut co| co.resume(black_box(1))));
        })
    });
    g.bench_function("corosensei DefaultStack::new (peer)", |b| {
        b.iter(|| {
            let stack = DefaultStack::new(STACK).unwrap();
            let mut co =
                Coroutine::with_stack(stack, |_: &corosensei::Yielder<u64, ()>, x: u64| x + 1);
            black_box(co.resume(black_box(1)));
        })
    });
    g.finish();
}

fn zero_on_reuse(c: &mut Criterion) {
    pin();
    let mut g = c.benchmark_group("zero_on_reuse, alloc+touch 4 KiB+free");
    for zero in [false, true] {
        let pool = StackPool::new(Config {
            zero_on_reuse: zero,
            ..Config::default()
        })
        .unwrap();
        g.bench_function(format!("zero_on_reuse={zero}"), |b| {
            b.iter(|| {
                let stack = pool.alloc().unwrap();
                touch_top(stack.base());
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = cached, fresh, coroutine, zero_on_reuse
}
criterion_main!(benches);
