//! Forks again and again while the caller's threads keep a structure busy,
//! and checks each child: shared by the fork tests of vmtask-percpu and
//! vmtask-stack (the latter includes this file by path).

use std::time::{Duration, Instant};

/// Forks up to `max` times within `time`, running `child` in each child
/// (the child then leaves with `_exit` of what it returned: 0 for
/// success), and waits for it. Stops at the first child that fails or
/// hangs (a child should arm an `alarm`). An error says which fork, if
/// one did, or that fewer than 20 forks ran; the caller stops its threads
/// before it reports it (a panic here would leave them running and the
/// test hung).
pub fn fork_repeatedly(
    what: &str,
    max: usize,
    time: Duration,
    child: impl Fn() -> i32,
) -> Result<(), String> {
    let deadline = Instant::now() + time;
    let mut forks = 0;
    while forks < max && Instant::now() < deadline {
        // SAFETY: the child runs `child` and leaves with `_exit`, without
        // running the parent's destructors or the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = child();
            // SAFETY: as above.
            unsafe { libc::_exit(code) };
        }
        forks += 1;
        let mut status = 0;
        // SAFETY: reaping our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return Err(format!(
                "{what}, fork {forks}: the child hung or failed (wait status {status}; 14 = SIGALRM, a hang)"
            ));
        }
    }
    if forks < 20 {
        return Err(format!("{what}: only {forks} forks in {time:?}"));
    }
    Ok(())
}
