//! Running a test scenario in a forked child, so that a hang or a crash is
//! reported as an exit code instead of taking the test harness down, or in
//! a fresh process (this test binary re-run on one test).

#![allow(dead_code)]

/// Runs `child` in a forked child process and returns its exit code.
pub fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only `child` and then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(99);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// Runs the test `test` of this test binary alone in a new process, with
/// the environment variable `key` set to `value` (the test's cue to play
/// the child), and returns what it printed. A child that hangs is killed
/// after 300 s (its status then says so): one test fails, instead of the
/// whole binary waiting forever.
pub fn rerun_test(test: &str, key: &str, value: &str) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    const LIMIT: Duration = Duration::from_secs(300);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(key, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > LIMIT {
            eprintln!("{test}: the re-run child hung for {LIMIT:?}; killed");
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// [`rerun_test`], checking that the child succeeded and printed `marker`;
/// returns its stdout and stderr. `what` names the run in a failure.
pub fn rerun_test_ok(
    test: &str,
    key: &str,
    value: &str,
    marker: &str,
    what: &str,
) -> (String, String) {
    let out = rerun_test(test, key, value);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && stdout.contains(marker),
        "{what}: {}\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// In a child, once `barrier` has run everything: whether the
/// statistics balance (queued == invoked); prints them, tagged `who`,
/// where they do not.
pub fn stats_balance(who: &str) -> bool {
    let stats = vmtask_rcu::stats();
    let balanced = stats.callbacks_queued == stats.callbacks_invoked;
    if !balanced {
        println!(
            "{who}: queued {} invoked {}",
            stats.callbacks_queued, stats.callbacks_invoked
        );
    }
    balanced
}

/// Waits for the child `pid`, which must exit (not die), and returns its
/// exit code.
pub fn wait_exit_code(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// A value whose drop forks, once: on the thread marked as the owner
/// ([`Forker::own_this_thread`]) and after [`Forker::arm`]. For tests that
/// fork from inside a deferred drop; the child learns it is one from
/// [`Forker::in_child`], the parent finds the child in [`Forker::take_child`].
pub struct Forker;

std::thread_local! {
    static IS_OWNER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static IN_CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static CHILD_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

impl Forker {
    /// Forkers dropped on the calling thread may fork.
    pub fn own_this_thread() {
        IS_OWNER.with(|c| c.set(true));
    }

    /// The next Forker dropped on the owner thread forks.
    pub fn arm() {
        ARMED.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether this process is the child of a Forker's fork.
    pub fn in_child() -> bool {
        IN_CHILD.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// In the parent: the child's pid, once.
    ///
    /// # Panics
    /// If no Forker has forked since the last call.
    pub fn take_child() -> libc::pid_t {
        let pid = CHILD_PID.swap(0, std::sync::atomic::Ordering::SeqCst);
        assert!(pid > 0, "setup: the Forker did not run on this thread");
        pid
    }
}

impl Drop for Forker {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::SeqCst;
        if !IS_OWNER.with(std::cell::Cell::get) || !ARMED.swap(false, SeqCst) {
            return;
        }
        // SAFETY: the tests' children go on only to their checks and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            IN_CHILD.store(true, SeqCst);
        } else {
            CHILD_PID.store(pid, SeqCst);
        }
    }
}
