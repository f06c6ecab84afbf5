//! Environment knobs of the test suites (the torture seconds, the backlog
//! test's object count), read one way in every crate: unset or empty means
//! the default, a value that does not parse fails the test with a message
//! naming the variable. Included by path (`#[path]`) into the tests that
//! read them.

#![allow(dead_code)]

use std::time::Duration;

/// `name` parsed as `T`, or `default` if it is unset or empty.
///
/// # Panics
/// If it is set to something that is not a `T`, saying what was expected.
pub fn knob<T: std::str::FromStr>(name: &str, default: T, expected: &str) -> T {
    match std::env::var(name) {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={s:?}: expected {expected}")),
        Ok(_) => default,
        Err(std::env::VarError::NotPresent) => default,
        Err(std::env::VarError::NotUnicode(s)) => panic!("{name}={s:?}: expected {expected}"),
    }
}

/// Seconds from `name` (a decimal number, at least 0), or `default`.
///
/// # Panics
/// If it is set to anything else.
pub fn seconds(name: &str, default: f64) -> Duration {
    const EXPECTED: &str = "a number of seconds, at least 0 (such as 2 or 0.5)";
    let secs: f64 = knob(name, default, EXPECTED);
    Duration::try_from_secs_f64(secs)
        .unwrap_or_else(|_| panic!("{name}={secs}: expected {EXPECTED}"))
}
