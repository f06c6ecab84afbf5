//! The seeds' experiments, as library functions the `vmtask` binary runs
//! and tests call with tiny parameters.
//!
//! There is no task runtime yet, so a "task" here is a `corosensei`
//! coroutine on a stack: spawning it allocates the stack and creates the
//! coroutine, running it resumes it once, and its exit drops the coroutine
//! and frees the stack. Each experiment returns a plain result struct; the
//! binary turns those into tables ([`report`]) and SVG charts ([`chart`]).
//!
//! | experiment | seed finding |
//! |---|---|
//! | [`experiments::spawn_cost`] | vmalloc'd stacks cost more per fork; a per-CPU cache wins it back |
//! | [`experiments::rcu_free`] | the per-CPU cache is useless while stacks are freed after a grace period |
//! | [`experiments::memory`] | dynamic stacks: map what is used, give back what is not |
//! | [`experiments::balance`] | caches get unbalanced when tasks exit on another CPU |
//!
//! ```
//! use vmtask_cli::experiments::spawn_cost::{self, Params};
//!
//! let result = spawn_cost::run(&Params { count: 50, reps: 3, stack_size: 16 * 1024 }, &|| ())?;
//! assert_eq!(result.rows.len(), 3);
//! assert!(result.rows.iter().all(|row| row.median_ns > 0.0));
//! # Ok::<(), vmtask_cli::Error>(())
//! ```

pub mod chart;
mod error;
pub mod experiments;
pub mod report;

pub use error::Error;
