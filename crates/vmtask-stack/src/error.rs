//! Typed errors; each message names the resource and the limit.

use std::fmt;

/// Why a stack operation failed. More kinds may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StackError {
    /// Every slot the pool may hold (`max_stacks`) is carved and none is
    /// free: not in any CPU's magazine, the depot, or parked on any thread
    /// (each thread keeps the last stack it freed to a pool, for its next
    /// `alloc`; an exhausted pool takes those back, which needs
    /// `membarrier`, present on every Linux since 4.14).
    Exhausted {
        /// The pool's `max_stacks`.
        max_stacks: usize,
        /// Usable bytes per stack.
        stack_size: usize,
    },
    /// The kernel refused to map or protect memory.
    MapFailed {
        /// What the pool was doing.
        what: &'static str,
        /// How many bytes it asked for.
        bytes: usize,
        /// The OS error number.
        errno: i32,
    },
    /// Pre-faulting stack pages (`ensure`) ran out of memory.
    OutOfMemory {
        /// Bytes that were to be made resident.
        bytes: usize,
    },
    /// `ensure` asked for more stack than the slot has left below the
    /// current stack pointer.
    TooLarge {
        /// Bytes asked for.
        requested: usize,
        /// Bytes left between the stack pointer and the guard.
        available: usize,
        /// Usable bytes of the whole stack.
        stack_size: usize,
    },
    /// [`GuardMode::GuardMarker`](crate::GuardMode::GuardMarker) was
    /// requested but the kernel lacks `MADV_GUARD_INSTALL`.
    GuardMarkersUnsupported,
    /// A [`Config`](crate::Config) field is out of range.
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Its value and what is wrong with it.
        reason: String,
    },
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StackError::Exhausted { max_stacks, stack_size } => {
                write!(
                    f,
                    "stack arena exhausted: all {max_stacks} slots of {} KiB are in use (max_stacks)",
                    stack_size / 1024
                )?;
                if crate::sys::heavy_barrier_found_unavailable() {
                    // Review finding: the message said "in use" of stacks
                    // that were free, parked where the pool cannot reach.
                    f.write_str(
                        " or parked on other live threads, which this kernel offers no \
                         membarrier to take them back from",
                    )?;
                }
                Ok(())
            }
            StackError::MapFailed { what, bytes, errno } => {
                write!(
                    f,
                    "stack mapping failed: could not {what} ({bytes} bytes): {}",
                    std::io::Error::from_raw_os_error(*errno)
                )?;
                if *errno == libc::ENOMEM {
                    f.write_str(" (limits: vm.max_map_count mappings, RLIMIT_AS address space)")?;
                }
                Ok(())
            }
            StackError::OutOfMemory { bytes } => {
                write!(
                    f,
                    "out of memory while pre-faulting {bytes} bytes of stack (limits: the memory cgroup's limit with its OOM killer off, physical memory and swap)"
                )
            }
            StackError::TooLarge { requested, available, stack_size } => write!(
                f,
                "stack request too large: {requested} bytes asked, {available} bytes left below the stack pointer in a {stack_size}-byte stack"
            ),
            StackError::GuardMarkersUnsupported => f.write_str(
                "stack guard markers unsupported: MADV_GUARD_INSTALL needs Linux 6.13 or later (use GuardMode::Auto or Mprotect)",
            ),
            StackError::InvalidConfig { field, reason } => {
                write!(f, "invalid stack pool config: {field} {reason}")
            }
        }
    }
}

impl std::error::Error for StackError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_resource_and_limit() {
        let e = StackError::Exhausted {
            max_stacks: 8,
            stack_size: 128 * 1024,
        };
        assert_eq!(
            e.to_string(),
            "stack arena exhausted: all 8 slots of 128 KiB are in use (max_stacks)"
        );
        let e = StackError::MapFailed {
            what: "protect a guard page",
            bytes: 4096,
            errno: libc::ENOMEM,
        };
        assert!(e.to_string().contains("vm.max_map_count"), "{e}");
        let e = StackError::TooLarge {
            requested: 10,
            available: 5,
            stack_size: 4096,
        };
        assert!(
            e.to_string().contains("10 bytes asked, 5 bytes left"),
            "{e}"
        );
    }

    #[test]
    fn out_of_memory_names_the_bytes_and_the_limit() {
        let e = StackError::OutOfMemory { bytes: 32768 };
        let message = e.to_string();
        assert!(message.contains("32768 bytes"), "{message}");
        assert!(message.contains("OOM killer off"), "{message}");
    }
}
