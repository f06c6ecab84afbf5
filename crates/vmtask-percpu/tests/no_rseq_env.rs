//! `VMTASK_PERCPU_NO_RSEQ` forces the try-lock fallback. The test re-runs
//! this test binary with the variable set (so it is in the environment
//! before any thread starts), and checks the child's mode against the
//! parent's: where rseq works, the override must be what made the
//! difference. A test binary of its own, because the default mode is
//! decided once per process.

use std::process::Command;
use std::ptr::NonNull;
use vmtask_percpu::{cache_mode, rseq_cache_supported, CacheMode, CpuCache, NO_RSEQ_ENV};

const TEST: &str = "env_var_forces_try_lock_mode";
const CHILD: &str = "VMTASK_PERCPU_NO_RSEQ_CHILD";

/// Runs in the child: the mode it got, then a push and a drain in it.
fn child() {
    let cache = CpuCache::new(4);
    let item = NonNull::<u64>::dangling().cast::<u8>();
    cache.push(item).expect("an empty cache takes a push");
    let mut out = Vec::new();
    let drained: usize = (0..cache.cpus())
        .map(|cpu| cache.drain(cpu, 8, &mut out))
        .sum();
    assert_eq!((drained, out), (1, vec![item]));
    // The harness has printed "test <name> ... " on this line already.
    println!("MODE default={} cache={}", cache_mode(), cache.mode());
}

fn child_mode(value: &str) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env(NO_RSEQ_ENV, value)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "child with {NO_RSEQ_ENV}={value:?}: {:?}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("MODE ").map(|(_, mode)| mode))
        .unwrap_or_else(|| panic!("no MODE line from the child:\n{stdout}"))
        .to_owned()
}

#[test]
fn env_var_forces_try_lock_mode() {
    if std::env::var_os(CHILD).is_some() {
        return child();
    }
    for on in ["1", "true", "ON", "yes", "anything else"] {
        assert_eq!(
            child_mode(on),
            "default=try-lock cache=try-lock",
            "with {NO_RSEQ_ENV}={on:?}"
        );
    }
    // Off values leave the choice to the kernel.
    let native = if rseq_cache_supported() {
        CacheMode::Rseq
    } else {
        eprintln!("{TEST}: rseq is not available here, so the override changes nothing");
        CacheMode::TryLock
    };
    let expected = format!("default={native} cache={native}");
    for off in ["0", "", "false", "No", "off"] {
        assert_eq!(child_mode(off), expected, "with {NO_RSEQ_ENV}={off:?}");
    }
}
