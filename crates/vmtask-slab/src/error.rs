//! Errors, naming the cache, the resource and the limit.

use std::fmt;
use std::io;

/// Why a cache could not be created or could not hand out an object.
#[derive(Debug)]
#[non_exhaustive]
pub enum SlabError {
    /// The system refused memory for a new slab.
    Map {
        /// The cache's name.
        cache: String,
        /// Bytes asked for.
        bytes: usize,
        /// What `mmap(2)` reported.
        source: io::Error,
    },
    /// The per-CPU magazine arrays could not be allocated when the cache
    /// was created (`magazine_size` pointers per possible CPU, twice).
    Magazines {
        /// The cache's name.
        cache: String,
        /// What the allocation was and why it failed.
        source: vmtask_percpu::CacheAllocError,
    },
    /// The cache reached its configured `max_bytes`.
    Limit {
        /// The cache's name.
        cache: String,
        /// The configured limit in bytes.
        max_bytes: usize,
        /// Slabs mapped: holding objects or free ones, or (type-stable
        /// caches) emptied by `shrink` and waiting for a grace period
        /// before their memory goes back.
        slabs: usize,
        /// Bytes per slab.
        slab_bytes: usize,
    },
    /// A [`Config`](crate::Config) field is out of range.
    InvalidConfig {
        /// The cache's name.
        cache: String,
        /// The field (or property of the object type) at fault.
        field: &'static str,
        /// Its value.
        value: usize,
        /// What it must be.
        requirement: String,
    },
    /// A lookup structure needs a `typesafe_by_rcu` cache.
    NotTypesafe {
        /// The cache's name.
        cache: String,
    },
}

impl fmt::Display for SlabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SlabError::Map { cache, bytes, source } => {
                write!(f, "slab cache `{cache}`: mapping a new {} slab failed: {source}", Bytes(*bytes))
            }
            SlabError::Magazines { cache, source } => {
                write!(f, "slab cache `{cache}`: allocating its per-CPU magazines failed: {source}")
            }
            SlabError::Limit { cache, max_bytes, slabs, slab_bytes } => write!(
                f,
                "slab cache `{cache}`: limit of {} reached ({slabs} slabs of {} mapped)",
                Bytes(*max_bytes),
                Bytes(*slab_bytes)
            ),
            SlabError::InvalidConfig { cache, field, value, requirement } => {
                write!(f, "slab cache `{cache}`: {field} is {value}, must be {requirement}")
            }
            SlabError::NotTypesafe { cache } => write!(
                f,
                "slab cache `{cache}` is not typesafe_by_rcu: lookups under RCU need memory that stays \
                 the same type until a grace period has passed"
            ),
        }
    }
}

impl std::error::Error for SlabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SlabError::Map { source, .. } => Some(source),
            SlabError::Magazines { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A byte count printed in the largest binary unit that divides it evenly.
pub(crate) struct Bytes(pub(crate) usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        write!(f, "{} B", self.0)
    }
}
