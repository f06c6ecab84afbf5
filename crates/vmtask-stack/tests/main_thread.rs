//! Rust's own report for an overflow of the main thread's stack, with a
//! pool (and so this crate's handler) installed. `harness = false`: the
//! child recurses on the process's real main thread.
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

mod common;
use common::recurse;

fn main() {
    if let Some(mode) = std::env::var_os("VMTASK_MAIN_CHILD") {
        if mode == "pool" {
            let pool = vmtask_stack::StackPool::new(vmtask_stack::Config::default()).unwrap();
            drop(pool.alloc().unwrap());
            std::mem::forget(pool);
        }
        recurse(0);
        unreachable!();
    }
    for mode in ["nopool", "pool"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .env("VMTASK_MAIN_CHILD", mode)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{mode}: status {:?} stderr {stderr:?}", out.status);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{mode}: {stderr}");
        assert!(
            stderr.contains("thread 'main'") && stderr.contains("has overflowed its stack"),
            "{mode}: {stderr}"
        );
    }
}
