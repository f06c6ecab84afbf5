//! In-transit sections: free stacks that a thread holds outside the pool's
//! lists for a moment (a magazine on its way to the depot, a depot batch
//! on its way to a magazine, stacks taken from magazines, parked places or
//! exited threads, a `trim` releasing pages) must not make an exhausted
//! alloc report a pool with a free stack as full.
//!
//! The protocol. A mover counts its section as running before it takes
//! the first stack, and as ended (then no longer running) once the last
//! is back in a list or handed out. A searcher that finds nothing reads
//! `ended` before its look, and `running` then `ended` after it:
//! - a section that ended before the first read had put its stacks back
//!   before the look began, so the look saw them;
//! - one that ended between the first read and the last changed `ended`:
//!   look again;
//! - one that had not ended by the last read, and began before it, is
//!   counted in `running` (its end would come before the count dropped):
//!   wait and look again;
//! - one that began after `running` was read took its stacks after the
//!   look, which saw them where they were.
//!
//! Sequentially consistent operations and the two fences (the mover's
//! after its count, the searcher's after its look) put all of this in one
//! order, including looks that read a list's length through relaxed hints
//! (a per-CPU magazine's). The loom models at the end check it.

#[cfg(all(loom, test))]
use loom::sync::atomic::{fence, AtomicU64, Ordering};
#[cfg(not(all(loom, test)))]
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// A pool's in-transit sections.
#[derive(Default)]
pub(crate) struct Transits {
    /// Sections running now: the count in the low half, the fork
    /// generation it belongs to in the high half (a section a fork copied
    /// into a child never ends there).
    running: AtomicU64,
    /// Sections ended (those abandoned because they took no stack
    /// excepted; a `trim` counts even when it took nothing).
    ended: AtomicU64,
}

/// A running section; ends when dropped (or is abandoned). Slow paths
/// only: three atomic read-modify-writes and a fence.
pub(crate) struct Transit<'a>(&'a Transits);

impl Transits {
    /// Begins a section: before the first stack is taken.
    pub(crate) fn begin(&self) -> Transit<'_> {
        self.add_running(1);
        // The count before anything the section does, for a searcher that
        // sees that through relaxed loads (a magazine's length hint).
        fence(Ordering::SeqCst);
        Transit(self)
    }

    /// Sections running in this fork generation.
    fn running(&self) -> u64 {
        let word = self.running.load(Ordering::SeqCst);
        if (word >> 32) as u32 == crate::park::fork_generation() {
            word & u64::from(u32::MAX)
        } else {
            0
        }
    }

    /// Adds `delta` (1 or -1) to the sections running in this generation.
    fn add_running(&self, delta: i64) {
        let generation = u64::from(crate::park::fork_generation()) << 32;
        let _ = self
            .running
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |word| {
                let count = if word >> 32 == generation >> 32 {
                    word & u64::from(u32::MAX)
                } else {
                    0
                };
                Some(generation | count.saturating_add_signed(delta).min(u64::from(u32::MAX)))
            });
    }

    /// Runs `look` until it finds something, or until no section has run
    /// or ended during a look that found nothing (then `None`: nothing was
    /// in transit either). Between looks it yields; `give_up` is asked
    /// each time and ends the search with `None` when it says so
    /// (sections that never stop overlapping could keep it going).
    pub(crate) fn search<T>(
        &self,
        mut look: impl FnMut() -> Option<T>,
        mut give_up: impl FnMut() -> bool,
    ) -> Option<T> {
        // Read before looking: a section that ends after this read has put
        // its stacks back, possibly where we had already looked.
        let mut ended = self.ended.load(Ordering::SeqCst);
        loop {
            if let Some(found) = look() {
                return Some(found);
            }
            // After the look, some of it relaxed loads (see `begin`).
            fence(Ordering::SeqCst);
            // Running first: a section that held a stack while we looked
            // is either still counted as running, or it ended (its end
            // comes before its running count drops) and the second read
            // sees it.
            let running = self.running();
            let now_ended = self.ended.load(Ordering::SeqCst);
            let ended_meanwhile = now_ended != ended;
            ended = now_ended;
            if !ended_meanwhile && running == 0 {
                return None;
            }
            if give_up() {
                return None;
            }
            #[cfg(all(loom, test))]
            loom::thread::yield_now();
            #[cfg(not(all(loom, test)))]
            std::thread::yield_now();
        }
    }
}

impl Transit<'_> {
    /// Ends a section that took no stack: nothing to look for again.
    pub(crate) fn abandon(self) {
        let transits = self.0;
        std::mem::forget(self);
        transits.add_running(-1);
    }
}

impl Drop for Transit<'_> {
    /// Counts the section as ended, and no longer running, even if it
    /// unwinds: a count left behind would hold up every exhausted alloc.
    fn drop(&mut self) {
        // Ended before not running (see `Transits::search`).
        self.0.ended.fetch_add(1, Ordering::SeqCst);
        self.0.add_running(-1);
    }
}

#[cfg(all(loom, test))]
mod loom_models {
    //! One free stack, two lists, a mover and a searcher. The lists stand
    //! for a magazine (read first, through a relaxed length hint, as
    //! `take_any_free` does) and the depot. Both are mutexes: loom 0.7 lets
    //! a store slip between the read and the write of a concurrent swap
    //! (tokio-rs/loom#254), which would lose the stack in the model alone.
    //! Checked to fail (the stack missed) with the searcher's reads of
    //! `running` and `ended` swapped, without either fence, and with a
    //! section's end counted after its running count drops.
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Pool {
        transits: Transits,
        /// The magazine: how many stacks it holds (0 or 1), changed under
        /// its lock (as a `CpuCache` drain stops its CPU) ...
        magazine: Mutex<usize>,
        /// ... and its length as a relaxed hint (`CpuCache::len`).
        hint: AtomicUsize,
        /// The depot.
        depot: Mutex<usize>,
    }

    impl Pool {
        fn take_magazine(&self) -> bool {
            if self.hint.load(Ordering::Relaxed) == 0 {
                return false;
            }
            let mut magazine = self.magazine.lock().unwrap();
            let had = *magazine == 1;
            *magazine = 0;
            self.hint.store(0, Ordering::Relaxed);
            had
        }

        fn put_magazine(&self) {
            *self.magazine.lock().unwrap() = 1;
            self.hint.store(1, Ordering::Relaxed);
        }

        fn take_depot(&self) -> bool {
            let mut depot = self.depot.lock().unwrap();
            let had = *depot == 1;
            *depot = 0;
            had
        }

        /// What `take_any_free` does: the magazine, then the depot.
        fn look(&self) -> Option<()> {
            (self.take_magazine() || self.take_depot()).then_some(())
        }
    }

    /// Runs `mover` against a searcher on a pool whose one stack starts in
    /// the magazine (`in_magazine`) or the depot: the searcher must find
    /// it, whatever the mover does with it meanwhile.
    fn check(in_magazine: bool, mover: fn(&Pool)) {
        loom::model(move || {
            let pool = Arc::new(Pool::default());
            if in_magazine {
                pool.put_magazine();
            } else {
                *pool.depot.lock().unwrap() = 1;
            }
            let moving = {
                let pool = pool.clone();
                loom::thread::spawn(move || mover(&pool))
            };
            let found = pool.transits.search(|| pool.look(), || false);
            moving.join().unwrap();
            assert!(found.is_some(), "the pool's free stack was missed");
        });
    }

    /// A magazine on its way to the depot.
    #[test]
    fn loom_a_stack_moving_to_the_depot_is_found() {
        check(true, |pool| {
            let transit = pool.transits.begin();
            if pool.take_magazine() {
                *pool.depot.lock().unwrap() = 1;
            }
            drop(transit);
        });
    }

    /// A depot batch on its way to a magazine: it goes where the searcher
    /// has already looked.
    #[test]
    fn loom_a_stack_moving_from_the_depot_is_found() {
        check(false, |pool| {
            let transit = pool.transits.begin();
            if pool.take_depot() {
                pool.put_magazine();
            }
            drop(transit);
        });
    }

    /// A mover that finds nothing to take abandons its section; one that
    /// takes the stack puts it back where it was.
    #[test]
    fn loom_an_abandoned_or_returning_section_loses_nothing() {
        check(true, |pool| {
            let transit = pool.transits.begin();
            if pool.take_magazine() {
                pool.put_magazine();
                drop(transit);
            } else {
                transit.abandon();
            }
        });
    }
}
