//! Arenas: reserved runs of `[guard][stack]` slots, and the process-wide
//! registry that maps an address back to its slot.
//!
//! A pool reserves address space in arenas that double in size (256 slots,
//! then 512, ...) up to `max_stacks`, so mappings grow with the logarithm of
//! the stack count. Slots are carved from an arena in address order; a slot
//! is `guard_size` bytes of guard followed by `stack_size` usable bytes,
//! and the stack's top (its `base`) is the slot's end.
//!
//! Registry protocol: the overflow handler runs in a signal handler and
//! `ensure` runs on any stack, so neither may lock. Every arena of every
//! pool is published in a lock-free, append-only list of leaked nodes.
//! Nodes are reused, never freed: the list is bounded by the most arenas
//! ever live at once. A node's geometry is guarded by a sequence count (a
//! seqlock):
//! - A pool claims a free node with a CAS on `claimed`; only the claimer
//!   writes the node. To write, it makes `seq` odd, writes the geometry,
//!   and makes `seq` even again with `Release`. It writes when it
//!   registers an arena and again, with `end = 0`, when it unmaps it
//!   (only when none of its stacks is live), then clears `claimed`.
//! - A reader (`lookup`) loads `seq` with `Acquire`, skips the node if it
//!   is odd, loads the geometry, and loads `seq` again after an `Acquire`
//!   fence: a changed count means a writer got in between, and the reader
//!   reads the node again. Skipping an odd node loses nothing: an arena
//!   being registered or unregistered holds no live stack. Never waiting
//!   for an odd count is what makes the lookup safe in a signal handler
//!   that interrupted the writer.
//!
//! Why the count: every lookup walks every node, not just its own arena's,
//! and a node can be unregistered by one pool and claimed by another while
//! a reader is between two loads. Without the count, such a reader could
//! combine the old `end` with the new `start` and slot size, and slice an
//! address on a live stack of a third pool with the wrong geometry (an
//! audit reproduced that through `remaining()`).

use std::ptr;
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use crate::config::Layout;
use crate::error::StackError;
use crate::sys;

/// Slots in a pool's first arena; each later arena doubles the previous.
const FIRST_ARENA_SLOTS: usize = 256;

/// Address space a new arena must leave free for the rest of the program:
/// its heap, its threads' stacks, and the pool's own lists, which a free
/// may grow. An arena that took the last of an `RLIMIT_AS` would turn the
/// frees after it into allocation failures, which abort (review finding:
/// dropping 23,712 stacks after the limit aborted in `malloc`). So the
/// pool meets its limit this much earlier.
const HEADROOM: usize = 64 << 20;

/// Guard markers installed ahead of the carving cursor with one system
/// call. A system call costs about as much as the first touch of the new
/// stack here, so doing one per carve doubled the cost of a fresh stack; 32
/// slots ahead costs at most two page-table pages (4 MiB of 128 KiB slots)
/// before they are used. (`populate_top` adds a system call per
/// [`POPULATE_BATCH`] carves with guard markers, per carve with `mprotect`
/// guards, which replaces the page faults of first touches, which cost
/// more.) `mprotect` guards are still made one
/// per carve: each splits the mapping, and `vm.max_map_count` must not be
/// spent on slots nobody asked for.
const GUARD_BATCH: usize = 32;

struct Node {
    claimed: AtomicBool,
    /// Odd while the claimer writes the geometry below (see the module
    /// docs).
    seq: AtomicUsize,
    start: AtomicUsize,
    end: AtomicUsize,
    slot_size: AtomicUsize,
    guard_size: AtomicUsize,
    /// Slots carved from the arena so far. Not under the sequence count:
    /// it only grows while the node's geometry stays (set to 0 by `write`,
    /// under the count), and a stale value is an older, smaller one.
    carved: AtomicUsize,
    next: AtomicPtr<Node>,
}

static REGISTRY: AtomicPtr<Node> = AtomicPtr::new(ptr::null_mut());

fn nodes() -> impl Iterator<Item = &'static Node> {
    let mut cur = REGISTRY.load(Ordering::Acquire);
    std::iter::from_fn(move || {
        // SAFETY: nodes are leaked boxes, published with Release and never
        // freed, so every pointer in the list stays valid forever.
        let node = unsafe { cur.as_ref()? };
        cur = node.next.load(Ordering::Acquire);
        Some(node)
    })
}

fn register(start: usize, len: usize, layout: &Layout) -> &'static Node {
    let node = nodes()
        .find(|n| {
            n.claimed
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
        .unwrap_or_else(|| {
            let node: &'static Node = Box::leak(Box::new(Node {
                claimed: AtomicBool::new(true),
                seq: AtomicUsize::new(0),
                start: AtomicUsize::new(0),
                end: AtomicUsize::new(0),
                slot_size: AtomicUsize::new(0),
                guard_size: AtomicUsize::new(0),
                carved: AtomicUsize::new(0),
                next: AtomicPtr::new(ptr::null_mut()),
            }));
            let mut head = REGISTRY.load(Ordering::Acquire);
            loop {
                node.next.store(head, Ordering::Relaxed);
                let new = node as *const Node as *mut Node;
                match REGISTRY.compare_exchange_weak(
                    head,
                    new,
                    Ordering::Release,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break node,
                    Err(h) => head = h,
                }
            }
        });
    node.write(start, start + len, layout.slot_size, layout.guard_size);
    node
}

fn unregister(node: &Node) {
    node.write(0, 0, 0, 0);
    node.claimed.store(false, Ordering::Release);
}

impl Node {
    /// The claimer's write of the geometry, under the sequence count.
    fn write(&self, start: usize, end: usize, slot_size: usize, guard_size: usize) {
        let seq = self.seq.load(Ordering::Relaxed);
        debug_assert!(seq % 2 == 0, "one writer per node");
        self.seq.store(seq + 1, Ordering::Relaxed);
        // Orders the odd count before the geometry stores, for a reader
        // that sees any of them (it then sees an odd or a changed count).
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.end.store(end, Ordering::Relaxed);
        self.slot_size.store(slot_size, Ordering::Relaxed);
        self.guard_size.store(guard_size, Ordering::Relaxed);
        self.carved.store(0, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }

    /// A consistent `(start, end, slot_size, guard_size, carved)`, or
    /// `None` while the claimer writes. `carved` may be older than the
    /// latest carve, never from another geometry. Async-signal-safe, never
    /// waits.
    fn read(&self) -> Option<(usize, usize, usize, usize, usize)> {
        loop {
            let seq = self.seq.load(Ordering::Acquire);
            if seq % 2 == 1 {
                return None;
            }
            let geometry = (
                self.start.load(Ordering::Relaxed),
                self.end.load(Ordering::Relaxed),
                self.slot_size.load(Ordering::Relaxed),
                self.guard_size.load(Ordering::Relaxed),
                // Acquire: pairs with the carve's release store, for a
                // reader that got the new stack from its carver.
                self.carved.load(Ordering::Acquire),
            );
            // Orders the loads above before the second load of the count.
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == seq {
                return Some(geometry);
            }
        }
    }
}

/// The geometry of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Lowest guard address.
    pub guard: usize,
    /// Lowest usable address.
    pub limit: usize,
    /// Top of the stack (one past its highest byte).
    pub base: usize,
}

/// Where an address falls in the registered arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// In a slot's guard pages.
    Guard(Slot),
    /// In a slot's usable stack.
    Stack(Slot),
}

/// Finds the slot holding `addr`, in any pool, among the slots carved so
/// far: the rest of an arena (whose guards may be installed ahead of the
/// carve) has never been a stack, and an address there is `None`, as one
/// outside every arena is. Async-signal-safe: atomic loads and arithmetic
/// only.
pub(crate) fn lookup(addr: usize) -> Option<Place> {
    for node in nodes() {
        let Some((start, end, slot_size, guard_size, carved)) = node.read() else {
            continue;
        };
        if addr < start || addr >= end {
            continue;
        }
        let index = (addr - start) / slot_size;
        if index >= carved {
            return None;
        }
        let guard = start + index * slot_size;
        let slot = Slot {
            guard,
            limit: guard + guard_size,
            base: guard + slot_size,
        };
        return Some(if addr < slot.limit {
            Place::Guard(slot)
        } else {
            Place::Stack(slot)
        });
    }
    None
}

/// Whether `addr` lies in a registered arena, carved or not (a thread's
/// own stack, the heap and the rest never do). Async-signal-safe, as
/// [`lookup`].
pub(crate) fn in_arenas(addr: usize) -> bool {
    nodes().any(|node| {
        node.read()
            .is_some_and(|(start, end, ..)| (start..end).contains(&addr))
    })
}

struct Arena {
    start: usize,
    slots: usize,
    /// Slots handed out, in address order.
    carved: usize,
    /// Slots whose guard is installed: `carved <= guarded <= slots`.
    guarded: usize,
    /// With `populate_top`: slots whose top page has been asked for
    /// (`carved <= populated <= guarded`, or 0 without it).
    populated: usize,
    /// With guard markers: guards made with `mprotect` instead, since the
    /// kernel refused a marker (a locked mapping); the last `mprotected`
    /// of the `guarded` slots.
    mprotected: usize,
    node: &'static Node,
}

/// Top pages of freshly carved slots for the pool to populate
/// (`populate_top`), outside the carve lock: `count` pages, the first
/// ending at `first_top`, each `stride` bytes above the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TopPages {
    pub(crate) first_top: usize,
    pub(crate) count: usize,
    pub(crate) stride: usize,
}

impl TopPages {
    /// The pages as `(address, length)` ranges.
    pub(crate) fn ranges(&self, page: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.count).map(move |i| (self.first_top + i * self.stride - page, page))
    }
}

/// With `populate_top`, the top pages of this many slots (within those
/// guarded) are populated together, with one system call, when the
/// first of them is carved: a fresh stack, top page touched, took
/// 1.22–1.27 µs against 1.23–1.45 µs with one `MADV_POPULATE_WRITE` per
/// carve, and 1.50–1.90 µs without `populate_top` (BENCHMARKS.md).
/// Populating ahead holds at most `POPULATE_BATCH - 1` pages (28 KiB with
/// 4 KiB pages) per pool before their stacks are handed out. With
/// `mprotect` guards, made one per carve, the batch is that one slot.
const POPULATE_BATCH: usize = 8;

/// One pool's arenas and its carving cursor. Lives behind the pool's carve
/// lock.
pub(crate) struct Arenas {
    list: Vec<Arena>,
    reserved_slots: usize,
}

impl Arenas {
    pub(crate) fn new() -> Arenas {
        Arenas {
            list: Vec::new(),
            reserved_slots: 0,
        }
    }

    /// Carves a fresh slot whose guard is installed; returns the stack's
    /// top, and, with `populate_top`, the top pages the pool should now
    /// populate (this slot's and those of the next few guarded slots, see
    /// [`POPULATE_BATCH`]; `None` when they were asked for already).
    /// Touches nothing itself but guards: with guard markers, those of the
    /// next [`GUARD_BATCH`] slots at once.
    pub(crate) fn carve(
        &mut self,
        layout: &Layout,
        markers: bool,
    ) -> Result<(usize, Option<TopPages>), StackError> {
        if self.list.last().is_none_or(|a| a.carved == a.slots) {
            self.grow(layout)?;
        }
        let arena = self.list.last_mut().expect("grow added an arena");
        if arena.carved == arena.guarded {
            // With guard markers, a batch of slots at a time. The kernel
            // refuses markers (`EINVAL`) on a locked mapping
            // (`mlockall(MCL_FUTURE)`, or `MCL_CURRENT` after the arena was
            // mapped): such an arena takes `mprotect` guards slot by slot
            // from then on, each splitting off two more mappings
            // (`mappings`).
            let try_markers = markers && arena.mprotected == 0;
            let batch = if try_markers { GUARD_BATCH } else { 1 };
            let guards: Vec<_> = (arena.guarded..(arena.guarded + batch).min(arena.slots))
                .map(|slot| (arena.start + slot * layout.slot_size, layout.guard_size))
                .collect();
            let marked = try_markers
                && match sys::install_guard_markers(&guards) {
                    Ok(()) => true,
                    Err(libc::EINVAL) => false,
                    Err(errno) => {
                        return Err(StackError::MapFailed {
                            what: "install a guard page (MADV_GUARD_INSTALL)",
                            bytes: layout.guard_size,
                            errno,
                        })
                    }
                };
            if marked {
                arena.guarded += guards.len();
            } else {
                // Two more mappings; the program keeps `MAP_HEADROOM`.
                if !sys::room_for_mappings(2) {
                    return Err(StackError::MapFailed {
                        what: "protect a guard page and leave 1,024 mappings (or an eighth of vm.max_map_count) to the rest of the program (mprotect PROT_NONE)",
                        bytes: layout.guard_size,
                        errno: libc::ENOMEM,
                    });
                }
                sys::install_guard(guards[0].0, layout.guard_size, false).map_err(|errno| {
                    StackError::MapFailed {
                        what: if markers {
                            "protect a guard page of a locked arena (mprotect PROT_NONE, bounded by vm.max_map_count)"
                        } else {
                            "protect a guard page (mprotect PROT_NONE, bounded by vm.max_map_count)"
                        },
                        bytes: layout.guard_size,
                        errno,
                    }
                })?;
                arena.mprotected += usize::from(markers);
                arena.guarded += 1;
            }
        }
        let slot = arena.carved;
        let top = arena.start + (slot + 1) * layout.slot_size;
        arena.carved += 1;
        // Release: the stack is handed out after this (see `Node::read`).
        arena.node.carved.store(arena.carved, Ordering::Release);
        let populate = (layout.populate_top && slot >= arena.populated).then(|| {
            let end = (slot + POPULATE_BATCH).min(arena.guarded);
            arena.populated = end;
            TopPages {
                first_top: top,
                count: end - slot,
                stride: layout.slot_size,
            }
        });
        Ok((top, populate))
    }

    fn grow(&mut self, layout: &Layout) -> Result<(), StackError> {
        let left = layout.max_stacks - self.reserved_slots;
        if left == 0 {
            return Err(StackError::Exhausted {
                max_stacks: layout.max_stacks,
                stack_size: layout.stack_size,
            });
        }
        let want = self.list.last().map_or(FIRST_ARENA_SLOTS, |a| a.slots * 2);
        let mut slots = want.min(left);
        let start = loop {
            let len = slots * layout.slot_size;
            let (what, errno) = match sys::reserve(len) {
                Ok(start) if sys::room_for(HEADROOM) => break start,
                Ok(start) => {
                    // SAFETY: just reserved, and nothing uses it yet.
                    unsafe { sys::unmap(start, len) };
                    (
                        "reserve a stack arena and leave 64 MiB of address space, in one more mapping, to the rest of the program (mmap MAP_NORESERVE)",
                        libc::ENOMEM,
                    )
                }
                Err(errno) => ("reserve a stack arena (mmap MAP_NORESERVE)", errno),
            };
            // An address-space limit (`RLIMIT_AS`) or strict overcommit
            // can refuse the whole arena and accept a smaller one: halve
            // down to one slot before failing.
            if errno == libc::ENOMEM && slots > 1 {
                slots /= 2;
                continue;
            }
            return Err(StackError::MapFailed {
                what,
                bytes: len,
                errno,
            });
        };
        let len = slots * layout.slot_size;
        let node = register(start, len, layout);
        self.list.push(Arena {
            start,
            slots,
            carved: 0,
            guarded: 0,
            populated: 0,
            mprotected: 0,
            node,
        });
        self.reserved_slots += slots;
        Ok(())
    }

    /// Slots carved over all arenas.
    pub(crate) fn carved(&self) -> usize {
        self.list.iter().map(|a| a.carved).sum()
    }

    /// Arenas reserved.
    pub(crate) fn count(&self) -> usize {
        self.list.len()
    }

    /// Mappings the arenas take as created (the kernel may merge adjacent
    /// ones): one per arena with guard markers; with `mprotect` every guard
    /// splits its arena, giving two mappings per carved slot (the uncarved
    /// tail belongs to the last carved stack's mapping: both are read-write
    /// and were never split apart), or one for an arena with nothing carved.
    /// A marker arena that was locked has its last `mprotected` slots
    /// guarded by `mprotect`: two more each, one fewer if they start at the
    /// arena's first slot (nothing below that guard to split off).
    pub(crate) fn mappings(&self, markers: bool) -> usize {
        if markers {
            return self
                .list
                .iter()
                .map(|a| {
                    1 + 2 * a.mprotected
                        - usize::from(a.mprotected > 0 && a.mprotected == a.guarded)
                })
                .sum();
        }
        self.list
            .iter()
            .map(|a| 2 * a.carved + usize::from(a.carved == 0))
            .sum()
    }

    /// Bytes of address space reserved.
    pub(crate) fn reserved_bytes(&self, layout: &Layout) -> usize {
        self.reserved_slots * layout.slot_size
    }

    /// Unregisters and unmaps every arena.
    ///
    /// # Safety
    /// No stack carved from these arenas may be in use, now or later.
    pub(crate) unsafe fn unmap_all(&mut self, layout: &Layout) {
        for arena in self.list.drain(..) {
            unregister(arena.node);
            // SAFETY: the caller guarantees no stack of this arena is in use.
            unsafe { sys::unmap(arena.start, arena.slots * layout.slot_size) };
        }
        self.reserved_slots = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    /// A node re-registered over and over with two geometries that share
    /// their end, as a dropped pool's arena and the next pool's often do:
    /// a reader must always see one of the two, whole. Without the
    /// sequence count this fails within milliseconds (the reader mixes one
    /// geometry's start with the other's slot size).
    #[test]
    fn lookup_never_mixes_two_geometries_of_a_reused_node() {
        let page = sys::page_size();
        let layout = |stack_size| {
            Layout::new(&Config {
                stack_size,
                ..Config::default()
            })
            .unwrap()
        };
        let (a, b) = (layout(16 * page), layout(7 * page));
        // Fake address ranges far from anything mapped: lookup is pure
        // arithmetic. Same end, different starts and slot sizes.
        let end = (usize::MAX >> 2) + 1;
        let (start_a, start_b) = (end - 64 * a.slot_size, end - 64 * b.slot_size);
        let probe = end - 10 * page - 123;
        let expect = |start: usize, layout: &Layout| {
            let guard = start + (probe - start) / layout.slot_size * layout.slot_size;
            let slot = Slot {
                guard,
                limit: guard + layout.guard_size,
                base: guard + layout.slot_size,
            };
            Some(if probe < slot.limit {
                Place::Guard(slot)
            } else {
                Place::Stack(slot)
            })
        };
        let allowed = [expect(start_a, &a), expect(start_b, &b), None];
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut rounds = 0u32;
                // Registered with every slot carved, as a full arena is.
                let register_carved = |start: usize, layout: &Layout| {
                    let node = register(start, end - start, layout);
                    node.carved.store(64, Ordering::Release);
                    node
                };
                while !stop.load(Ordering::Relaxed) {
                    let node = register_carved(start_a, &a);
                    // Now and then, give the CPU away with a geometry
                    // registered: a reader that shares this CPU (one CPU,
                    // or a loaded machine) otherwise only ever runs where
                    // the writer was preempted, almost never inside the
                    // short window between register and unregister.
                    rounds = rounds.wrapping_add(1);
                    if rounds % 64 == 0 {
                        std::thread::yield_now();
                    }
                    unregister(node);
                    unregister(register_carved(start_b, &b));
                }
            });
            // At least 300 ms, and on until the reader has seen a node
            // registered (a starved writer may take a while on a loaded
            // machine), for at most 10 s.
            let start = Instant::now();
            let mut seen = [0u64; 3];
            while start.elapsed() < Duration::from_millis(300)
                || (seen[0] + seen[1] == 0 && start.elapsed() < Duration::from_secs(10))
            {
                for _ in 0..1000 {
                    let place = lookup(probe);
                    let Some(i) = allowed.iter().position(|p| *p == place) else {
                        stop.store(true, Ordering::Relaxed);
                        panic!("lookup saw a mixed geometry: {place:?}, allowed {allowed:?}");
                    };
                    seen[i] += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(
                seen[0] + seen[1] > 0,
                "the reader never saw a registered node: {seen:?}"
            );
        });
    }

    /// Slots not carved yet are no stack: their guards (installed ahead of
    /// the carve) are not a stack's guard, so a stray write there is not
    /// reported as that slot's overflow (review finding: a write just past
    /// the top of a pool's only stack was reported as an overflow of the
    /// next slot, never allocated).
    #[test]
    fn lookup_knows_only_carved_slots() {
        let layout = Layout::new(&Config::default()).unwrap();
        let markers = sys::guard_markers_supported().is_ok();
        let mut arenas = Arenas::new();
        let (top, _) = arenas.carve(&layout, markers).unwrap();
        let first = top - layout.slot_size;
        assert_eq!(
            lookup(first),
            Some(Place::Guard(Slot {
                guard: first,
                limit: first + layout.guard_size,
                base: top,
            }))
        );
        assert!(matches!(lookup(top - 1), Some(Place::Stack(_))));
        // The next slot's guard (installed with the first carve's batch)
        // and stack: not carved.
        assert_eq!(lookup(top), None);
        assert_eq!(lookup(top + layout.guard_size), None);
        let (second, _) = arenas.carve(&layout, markers).unwrap();
        assert_eq!(second, top + layout.slot_size);
        assert!(matches!(lookup(top), Some(Place::Guard(_))));
        // SAFETY: neither stack was handed out.
        unsafe { arenas.unmap_all(&layout) };
    }
}
