//! A process that only reads and synchronizes (no callback ever queued)
//! still gets the fork handlers: in the child, the other threads' readers,
//! which live in their thread-local storage, must be unpublished, or the
//! child's updaters read the memory of threads that do not exist there.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Waits up to `limit` for `pid`; kills it if it is still running.
fn wait_or_kill(pid: libc::pid_t, limit: Duration) -> Result<i32, String> {
    let start = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if start.elapsed() > limit {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!("child still running after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if libc::WIFSIGNALED(status) {
        return Err(format!("child killed by signal {}", libc::WTERMSIG(status)));
    }
    Ok(libc::WEXITSTATUS(status))
}

#[test]
fn the_child_of_a_reader_only_process_can_synchronize() {
    // A thread registers as a reader and stays alive across the fork.
    let (release, released) = mpsc::channel::<()>();
    let (ready, is_ready) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        drop(vmtask_rcu::read_lock());
        ready.send(()).unwrap();
        let _ = released.recv();
    });
    is_ready.recv().unwrap();
    // This thread registers too. (No `stats()` before the fork: it would
    // start the callback machinery, which installs the handlers anyway.)
    drop(vmtask_rcu::read_lock());
    vmtask_rcu::synchronize();
    // SAFETY: the child only runs the code below and then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // Push the reader's stack (and so its thread-local storage) out of
        // glibc's cache of stacks: exit a thread whose stack is larger than
        // the cache's 40 MiB limit.
        std::thread::Builder::new()
            .stack_size(96 << 20)
            .spawn(|| {})
            .unwrap()
            .join()
            .unwrap();
        vmtask_rcu::synchronize();
        // Only the forking thread's reader is left.
        let readers = vmtask_rcu::stats().readers;
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(if readers == 1 { 0 } else { 2 }) };
    }
    let outcome = wait_or_kill(pid, Duration::from_secs(10));
    drop(release);
    reader.join().unwrap();
    match outcome {
        Ok(0) => {}
        Ok(2) => panic!("the child still counts the parent's other reader"),
        Ok(code) => panic!("child exited with {code}"),
        Err(e) => panic!("{e}"),
    }
}
