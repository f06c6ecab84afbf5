//! Pool configuration.
//!
//! # Choosing `stack_size`
//!
//! Every touched 2 MiB of address space costs the kernel one 4 KiB
//! page-table page, and guard markers count as touched. A slot is
//! `guard_size + stack_size`, so the slot size sets the page-table cost of
//! every live stack, on top of the pages the stack really uses:
//!
//! | `stack_size` | slot (with 4 KiB guard) | page tables per live stack | 1,000,000 stacks reserve |
//! |---:|---:|---:|---:|
//! | 16 KiB | 20 KiB | 40 B | 19 GiB |
//! | 64 KiB | 68 KiB | 136 B | 65 GiB |
//! | 128 KiB (default) | 132 KiB | 264 B | 126 GiB |
//! | 1 MiB | 1028 KiB | 2 KiB | 980 GiB |
//! | 8 MiB | 8196 KiB | 16 KiB | 7.6 TiB |
//!
//! Reserved address space is free (`MAP_NORESERVE`, demand paged), but the
//! 47-bit user address space holds 128 TiB, which bounds
//! `max_stacks × slot`. On 32-bit targets the bound is 3 GiB (the
//! smallest user split), and the default `max_stacks` is 8,192 (1 GiB of
//! default slots) instead of 1,048,576. Small slots are cheap but overflow sooner; use
//! [`ensure()`](crate::ensure()) before deep recursion.

use crate::error::StackError;
use crate::sys::{self, page_ceil, page_size};

/// How guard pages are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardMode {
    /// Guard markers where the kernel has them, else `mprotect`; chosen once
    /// when the pool is created.
    Auto,
    /// `madvise(MADV_GUARD_INSTALL)` (Linux 6.13+): guards live in the page
    /// tables, so an arena stays one mapping however many stacks it holds.
    /// The kernel refuses markers on locked memory: once the process has
    /// called `mlockall`, slots carved from then on get `mprotect` guards,
    /// with that mode's bound (see `Mprotect`).
    GuardMarker,
    /// `mprotect(PROT_NONE)`: every guard splits the arena's mapping, so
    /// live stacks are bounded by `vm.max_map_count` (about 32,000 stacks at
    /// the default 65,530 mappings). The pool stops carving 1,024 mappings
    /// short of the limit (an eighth of a smaller one), which it leaves to
    /// the rest of the program.
    Mprotect,
}

impl std::fmt::Display for GuardMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GuardMode::Auto => "auto",
            GuardMode::GuardMarker => "guard markers (MADV_GUARD_INSTALL)",
            GuardMode::Mprotect => "mprotect(PROT_NONE)",
        })
    }
}

/// Configuration of a [`StackPool`](crate::StackPool).
///
/// Sizes are rounded up to whole pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Usable bytes per stack, without the guard. Default 128 KiB.
    pub stack_size: usize,
    /// Guard bytes below each stack. Default one page; at least one page.
    /// Raise it for foreign code whose frames can exceed it without
    /// probing each page (C without `-fstack-clash-protection`).
    pub guard_size: usize,
    /// Most stacks the pool will ever hold at once. Default 1,048,576
    /// (8,192 on 32-bit targets: 1 GiB of default slots, a third of the
    /// 3 GiB user address space, leaving the rest to the program).
    pub max_stacks: usize,
    /// Free stacks each CPU's magazine holds. Default 16; the kernel uses 2.
    /// At most 65,536.
    pub cache_size: usize,
    /// Free stacks the shared depot holds before it gives stacks' memory
    /// back entirely. Default: 64 stacks per possible CPU, whatever
    /// `cache_size` is (four magazines of the default 16).
    pub depot_size: usize,
    /// Bytes kept resident at the top of a free stack when its deeper pages
    /// are released. Default 16 KiB.
    pub keep_resident: usize,
    /// Release every page of a stack when it is freed, so the next user
    /// reads zeros. Default false: tasks share one address space, and
    /// neither Go nor glibc clears reused stacks. Costs a system call per
    /// free and a page fault per reuse.
    pub zero_on_reuse: bool,
    /// Fault in the top page of a freshly carved stack, and of one reused
    /// from the slots whose memory a full depot gave back, with
    /// `MADV_POPULATE_WRITE` before `alloc` returns it (on the slow path
    /// only: stacks from the caches are taken as they are). With guard
    /// markers, fresh slots are done eight at a time, with one
    /// `process_madvise` call (Linux 6.13+; one `madvise` per page before
    /// that), so up to seven top pages per pool are populated before their
    /// stacks are asked for.
    /// Default false: a fresh stack then costs nothing until touched.
    ///
    /// Turn it on where every stack runs soon after it is allocated, as in
    /// a task runtime: the first write of a stack lands on its top page
    /// (corosensei puts the coroutine's initial frame there), so such
    /// stacks end up with the same resident memory either way, and the
    /// system call costs less than the page fault it replaces (a fresh
    /// stack, top page touched: 1.22–1.27 µs against 1.50–1.90 µs on the
    /// project's machine, in one session's runs; BENCHMARKS.md). Stacks
    /// allocated long before
    /// they run would each hold a page early. Best effort: where the
    /// kernel lacks the advice (before Linux 5.14) it is skipped, and a
    /// failure (such as a memory cgroup at its limit) leaves the page to
    /// the first write, as without it.
    pub populate_top: bool,
    /// How guard pages are made. Default [`GuardMode::Auto`].
    pub guard_mode: GuardMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stack_size: 128 * 1024,
            guard_size: page_size(),
            max_stacks: DEFAULT_MAX_STACKS,
            cache_size: 16,
            depot_size: 4 * 16 * vmtask_percpu::possible_cpus(),
            keep_resident: 16 * 1024,
            zero_on_reuse: false,
            populate_top: false,
            guard_mode: GuardMode::Auto,
        }
    }
}

/// The user address space the arenas must fit in (x86-64 and arm64
/// with 4-level page tables; `mmap` stays below it unless asked), and its
/// size as the error messages write it.
#[cfg(target_pointer_width = "64")]
const USER_ADDRESS_SPACE: usize = 1 << 47;
#[cfg(target_pointer_width = "64")]
const USER_SPACE: &str = "128 TiB";
/// On 32-bit targets: the smallest user/kernel split (3 GiB; a 32-bit
/// process on a 64-bit kernel has 4).
#[cfg(not(target_pointer_width = "64"))]
const USER_ADDRESS_SPACE: usize = 3 << 30;
#[cfg(not(target_pointer_width = "64"))]
const USER_SPACE: &str = "3 GiB";

/// `Config::default().max_stacks`: 2^20 slots of 132 KiB reserve 132 GiB
/// of a 64-bit address space as they are used; a 32-bit one holds 3 GiB
/// in all, so there the default is 8,192 slots (1 GiB).
const DEFAULT_MAX_STACKS: usize = if usize::BITS == 64 { 1 << 20 } else { 1 << 13 };

/// The largest `cache_size`: far past any useful magazine. The per-CPU
/// array takes that many pointers per possible CPU; where the allocator
/// cannot give it, `StackPool::new` fails with `MapFailed`.
const MAX_CACHE_SIZE: usize = 1 << 16;

/// A validated configuration with page-rounded sizes.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub stack_size: usize,
    pub guard_size: usize,
    pub slot_size: usize,
    pub max_stacks: usize,
    pub cache_size: usize,
    pub depot_size: usize,
    pub keep_resident: usize,
    pub zero_on_reuse: bool,
    pub populate_top: bool,
}

impl Layout {
    pub(crate) fn new(config: &Config) -> Result<Layout, StackError> {
        let invalid = |field, reason: String| Err(StackError::InvalidConfig { field, reason });
        if config.stack_size == 0 {
            return invalid("stack_size", "is 0; it must be at least one byte".into());
        }
        if config.guard_size == 0 {
            return invalid(
                "guard_size",
                "is 0; it must be at least one page: a stack without a guard overflows silently"
                    .into(),
            );
        }
        if config.max_stacks == 0 {
            return invalid("max_stacks", "is 0; it must be at least 1".into());
        }
        if config.cache_size == 0 {
            return invalid("cache_size", "is 0; it must be at least 1".into());
        }
        if config.cache_size > MAX_CACHE_SIZE {
            return invalid(
                "cache_size",
                format!(
                    "is {}; it must be at most {MAX_CACHE_SIZE} stacks per CPU",
                    config.cache_size
                ),
            );
        }
        // Each size alone, rounded up to pages, must fit in the address
        // space (checked: a rounding that wrapped would give 0, a stack
        // without memory or without a guard).
        let fits = |n: usize| sys::checked_page_ceil(n).filter(|&n| n < USER_ADDRESS_SPACE);
        let too_big = |field, n: usize| {
            invalid(
                field,
                format!("is {n} bytes; it must be less than the {USER_SPACE} user address space"),
            )
        };
        let Some(stack_size) = fits(config.stack_size) else {
            return too_big("stack_size", config.stack_size);
        };
        let Some(guard_size) = fits(config.guard_size) else {
            return too_big("guard_size", config.guard_size);
        };
        // Saturating: on 32-bit targets two sizes under 3 GiB can wrap.
        let slot_size = stack_size.saturating_add(guard_size);
        if slot_size >= USER_ADDRESS_SPACE {
            // Name the larger of the two: the one to make smaller.
            let (field, size, other, other_size) = if guard_size > stack_size {
                ("guard_size", guard_size, "stack", stack_size)
            } else {
                ("stack_size", stack_size, "guard", guard_size)
            };
            return invalid(
                field,
                format!(
                    "is {size} bytes, and with the {other_size}-byte {other} does not fit below the {USER_SPACE} user address space"
                ),
            );
        }
        if slot_size
            .checked_mul(config.max_stacks)
            .is_none_or(|total| total >= USER_ADDRESS_SPACE)
        {
            return invalid(
                "max_stacks",
                format!(
                    "is {}: that many slots of {} KiB (stack_size + guard_size) do not fit below the {USER_SPACE} user address space (at most {})",
                    config.max_stacks,
                    slot_size / 1024,
                    (USER_ADDRESS_SPACE - 1) / slot_size
                ),
            );
        }
        Ok(Layout {
            stack_size,
            guard_size,
            slot_size,
            max_stacks: config.max_stacks,
            cache_size: config.cache_size,
            depot_size: config.depot_size,
            keep_resident: page_ceil(config.keep_resident.min(stack_size)),
            zero_on_reuse: config.zero_on_reuse,
            populate_top: config.populate_top,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_pages() {
        let page = page_size();
        let layout = Layout::new(&Config {
            stack_size: page + 1,
            guard_size: 1,
            keep_resident: 1 << 30,
            ..Config::default()
        })
        .unwrap();
        assert_eq!(layout.stack_size, 2 * page);
        assert_eq!(layout.guard_size, page);
        assert_eq!(layout.slot_size, 3 * page);
        assert_eq!(
            layout.keep_resident,
            2 * page,
            "keep_resident is capped at the stack size"
        );
    }

    #[test]
    fn invalid_config_names_the_field() {
        let err = Layout::new(&Config {
            guard_size: 0,
            ..Config::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("guard_size"), "{err}");
        let err = Layout::new(&Config {
            max_stacks: usize::MAX / 2,
            ..Config::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("max_stacks"), "{err}");
        for cache_size in [0, MAX_CACHE_SIZE + 1, usize::MAX / 2] {
            let err = Layout::new(&Config {
                cache_size,
                ..Config::default()
            })
            .unwrap_err();
            assert!(err.to_string().contains("cache_size"), "{err}");
        }
        assert!(Layout::new(&Config {
            cache_size: MAX_CACHE_SIZE,
            ..Config::default()
        })
        .is_ok());
    }

    /// Sizes near `usize::MAX` must not wrap when rounded to pages: a
    /// wrapped guard would be 0 bytes, a stack that overflows silently.
    #[test]
    fn huge_sizes_are_errors_not_wrapped() {
        for (field, config) in [
            (
                "stack_size",
                Config {
                    stack_size: usize::MAX,
                    ..Config::default()
                },
            ),
            (
                "guard_size",
                Config {
                    guard_size: usize::MAX,
                    ..Config::default()
                },
            ),
            (
                "stack_size",
                Config {
                    stack_size: USER_ADDRESS_SPACE + USER_ADDRESS_SPACE / 8,
                    ..Config::default()
                },
            ),
            (
                "guard_size",
                Config {
                    guard_size: USER_ADDRESS_SPACE + 1,
                    ..Config::default()
                },
            ),
            (
                "stack_size",
                Config {
                    stack_size: USER_ADDRESS_SPACE,
                    guard_size: 1,
                    max_stacks: 1,
                    ..Config::default()
                },
            ),
            // Halves that add up to the whole space: no mapping can hold
            // it (review finding: accepted, then refused by `mmap` at the
            // first `alloc`).
            (
                "stack_size",
                Config {
                    stack_size: USER_ADDRESS_SPACE / 2,
                    guard_size: USER_ADDRESS_SPACE / 2,
                    max_stacks: 1,
                    ..Config::default()
                },
            ),
            (
                "max_stacks",
                Config {
                    stack_size: USER_ADDRESS_SPACE / 2 - 4096,
                    guard_size: 4096,
                    max_stacks: 2,
                    ..Config::default()
                },
            ),
        ] {
            match Layout::new(&config) {
                Err(StackError::InvalidConfig { field: f, reason }) => {
                    assert_eq!(f, field, "{reason}");
                    assert!(reason.contains("user address space"), "{reason}");
                }
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
        // 1 TiB stacks on 64-bit targets, 24 MiB ones on 32-bit: 127 fit.
        let err = Layout::new(&Config {
            stack_size: USER_ADDRESS_SPACE / 128,
            ..Config::default()
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "invalid stack pool config: max_stacks is {DEFAULT_MAX_STACKS}:"
            )),
            "{message}"
        );
        assert!(message.contains("(at most 127)"), "{message}");
        // keep_resident is capped at the stack size, whatever its value.
        let layout = Layout::new(&Config {
            keep_resident: usize::MAX,
            ..Config::default()
        })
        .unwrap();
        assert_eq!(layout.keep_resident, layout.stack_size);
    }

    #[test]
    fn default_holds_a_million_default_stacks() {
        let config = Config::default();
        if usize::BITS == 64 {
            assert!(config.max_stacks >= 1_000_000);
        } else {
            assert_eq!(config.max_stacks, 8192);
        }
        // The default is valid, on every target.
        assert!(Layout::new(&config).is_ok());
        assert_eq!(config.stack_size, 128 * 1024);
        assert_eq!(config.cache_size, 16);
        assert!(!config.zero_on_reuse);
        assert!(
            !config.populate_top,
            "a fresh stack costs nothing until touched"
        );
    }
}
