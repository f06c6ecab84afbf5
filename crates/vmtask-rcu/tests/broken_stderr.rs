//! With stderr gone (a pipe whose reader has closed: every write fails
//! with EPIPE), the crate's diagnostics must not panic: an audit found that
//! the stall report unwound out of a grace period (leaving its sequence
//! count odd, so later grace periods ended early) and that the message of
//! a panicking callback killed the callback thread (no callback ran again,
//! and `barrier` hung). Each scenario runs in a child process whose stderr
//! is such a pipe; a hang is killed by `alarm`.

mod child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Points fd 2 at a pipe with no reader.
fn break_stderr() {
    let mut fds = [0; 2];
    // SAFETY: plain system calls on this process's descriptors.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        assert!(libc::dup2(fds[1], 2) >= 0);
        libc::close(fds[1]);
        // SIGPIPE is ignored in Rust programs; make sure, so the write
        // fails instead of killing the child.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    assert!(
        std::io::Write::write_all(&mut std::io::stderr(), b"x").is_err(),
        "stderr still writable"
    );
}

static RAN: AtomicBool = AtomicBool::new(false);

const TEST: &str = "diagnostics_on_a_broken_stderr_do_not_panic";
const SCENARIO: &str = "VMTASK_RCU_BROKEN_STDERR";

/// The child's side: one scenario, on a stderr with no reader. It runs as
/// a fresh process of this test binary with `--nocapture`, so the crate's
/// messages really go to fd 2 (the harness's capture would swallow them).
fn child(scenario: &str) {
    // SAFETY: alarm only arms a timer; a hang kills the child.
    unsafe { libc::alarm(20) };
    vmtask_rcu::barrier();
    break_stderr();
    match scenario {
        // A panicking callback, then more work: the callback thread lives on.
        "callback" => {
            vmtask_rcu::call(|| panic!("a panicking callback"));
            vmtask_rcu::barrier();
            vmtask_rcu::call(|| RAN.store(true, Ordering::Relaxed));
            vmtask_rcu::barrier();
            assert!(RAN.load(Ordering::Relaxed), "the second callback ran");
        }
        // A grace period that waits long enough to report a stall.
        "stall" => {
            let (entered, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
            std::thread::scope(|s| {
                s.spawn(|| {
                    let guard = vmtask_rcu::read_lock();
                    entered.wait();
                    std::thread::sleep(Duration::from_millis(1500));
                    drop(guard);
                    release.wait();
                });
                entered.wait();
                // Waits about 1.5 s for the reader: past the stall report.
                vmtask_rcu::synchronize();
                release.wait();
            });
            // Grace periods still work.
            vmtask_rcu::synchronize();
            vmtask_rcu::defer_drop(Box::new(1u64));
            vmtask_rcu::barrier();
        }
        other => panic!("unknown scenario {other}"),
    }
    println!("SCENARIO-OK");
}

#[test]
fn diagnostics_on_a_broken_stderr_do_not_panic() {
    if let Some(scenario) = std::env::var_os(SCENARIO) {
        return child(scenario.to_str().unwrap());
    }
    for scenario in ["callback", "stall"] {
        let out = child::rerun_test(TEST, SCENARIO, scenario);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("SCENARIO-OK"),
            "scenario {scenario}: {:?} (SIGALRM: it hung)\n{stdout}",
            out.status
        );
    }
}
