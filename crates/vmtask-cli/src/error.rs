//! The binary's errors: each names what was being done.

use std::fmt;
use std::path::PathBuf;

use vmtask_stack::StackError;

/// Why an experiment or a report failed.
#[derive(Debug)]
pub enum Error {
    /// A stack pool refused a configuration or an allocation.
    Stack(StackError),
    /// `corosensei::DefaultStack::new` (a fresh `mmap` per stack) failed.
    MapStack(std::io::Error),
    /// A worker thread could not be pinned to its CPU.
    Pin {
        /// The CPU asked for.
        cpu: usize,
        /// What `sched_setaffinity` said.
        source: std::io::Error,
    },
    /// Reading `/proc/self/status` failed or lacked a field.
    ProcStatus(String),
    /// Writing a chart failed.
    Chart {
        /// The chart file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An experiment's invariant did not hold.
    Invariant(String),
    /// A command-line value is out of range.
    Usage(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Stack(e) => write!(f, "{e}"),
            Error::MapStack(e) => write!(f, "mapping a fresh stack (mmap + guard) failed: {e}"),
            Error::Pin { cpu, source } => {
                write!(f, "pinning a worker thread to CPU {cpu} failed: {source}")
            }
            Error::ProcStatus(reason) => write!(f, "reading /proc/self/status: {reason}"),
            Error::Chart { path, reason } => {
                write!(f, "writing chart {}: {reason}", path.display())
            }
            Error::Invariant(what) => write!(f, "invariant violated: {what}"),
            Error::Usage(what) => write!(f, "invalid argument: {what}"),
        }
    }
}

/// `Display` already includes each cause, so `source` returns none: an
/// error-chain reporter would print it twice.
impl std::error::Error for Error {}

impl From<StackError> for Error {
    fn from(e: StackError) -> Self {
        Error::Stack(e)
    }
}
