//! `ensure` under a real memory limit: the test re-runs this test binary
//! with `VMTASK_STACK_CHILD` set; the child moves itself into a fresh
//! cgroup v1 memory cgroup below its own (`vmtask-ensure-<pid>`, 32 MiB,
//! OOM killer disabled), asks a 256 MiB pool stack for 200 MiB, and must
//! get `StackError::OutOfMemory` and then be able to go on. The parent
//! checks what the child printed, how it exited, and removes the cgroup.
//!
//! Skipped, with a line on stderr saying why, where no such cgroup can be
//! made (no cgroup v1 memory controller, not permitted, read-only, too
//! little room under the enclosing limits). In its own test binary so no
//! other test runs in the child.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use corosensei::{Coroutine, CoroutineResult, Yielder};
use vmtask_stack::{Config, StackError, StackPool};

const CHILD: &str = "VMTASK_STACK_CHILD";
const TEST: &str = "ensure_reports_out_of_memory_at_the_cgroup_limit_and_gives_it_back";

const MIB: usize = 1024 * 1024;
/// The child's cgroup limit. Only what the child allocates after moving in
/// is charged there (memory.move_charge_at_immigrate is 0 in a new
/// cgroup): a few pages of heap and stack, far below this.
const LIMIT: usize = 32 * MIB;
const STACK_SIZE: usize = 256 * MIB;
const ASK: usize = 200 * MIB;
/// Room the enclosing cgroups must have besides `LIMIT`, so the child's
/// own limit, not theirs (whose OOM killer may be on), is the one it hits.
const SLACK: usize = 64 * MIB;
const TIME_LIMIT: Duration = Duration::from_secs(30);

/// Prints past libtest's output capture, so a skip is visible in a plain
/// `cargo test`.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{TEST}: {line}");
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn read_number(path: &Path) -> Result<usize, String> {
    let text = read(path)?;
    text.trim()
        .parse()
        .map_err(|e| format!("{}: {text:?}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

/// The directory of this process's cgroup v1 memory cgroup and the mount
/// point of the memory hierarchy.
fn own_memory_cgroup() -> Result<(PathBuf, PathBuf), String> {
    let cgroups = read(Path::new("/proc/self/cgroup"))?;
    let path = cgroups
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })
        .ok_or("no cgroup v1 memory controller in /proc/self/cgroup (cgroup v2 only?)")?;
    let mounts = read(Path::new("/proc/self/mountinfo"))?;
    let (root, mount_point) = mounts
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fs = fs.split(' ');
            let (fstype, options) = (fs.next()?, fs.nth(1)?);
            if fstype != "cgroup" || !options.split(',').any(|o| o == "memory") {
                return None;
            }
            let mut fields = mount.split(' ');
            Some((fields.nth(3)?, fields.next()?))
        })
        .ok_or("the cgroup v1 memory controller is not mounted")?;
    let relative = path
        .strip_prefix(root)
        .ok_or_else(|| format!("memory cgroup {path} lies outside the mount's root {root}"))?;
    let mount_point = PathBuf::from(mount_point);
    let dir = mount_point.join(relative.trim_start_matches('/'));
    if !dir.join("memory.oom_control").exists() {
        return Err(format!(
            "{} has no memory.oom_control (not a cgroup v1 memory cgroup?)",
            dir.display()
        ));
    }
    Ok((dir, mount_point))
}

fn sub_cgroup(own: &Path, pid: u32) -> PathBuf {
    own.join(format!("vmtask-ensure-{pid}"))
}

/// Checks that every enclosing memory cgroup and the machine have room for
/// the child's limit and then some.
fn check_room(own: &Path, mount_point: &Path) -> Result<(), String> {
    let mut dir = own;
    loop {
        for (limit, usage) in [
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
            ("memory.memsw.limit_in_bytes", "memory.memsw.usage_in_bytes"),
        ] {
            if !dir.join(limit).exists() {
                continue;
            }
            let room =
                read_number(&dir.join(limit))?.saturating_sub(read_number(&dir.join(usage))?);
            if room < LIMIT + SLACK {
                return Err(format!(
                    "{} has only {} MiB left under {limit}",
                    dir.display(),
                    room / MIB
                ));
            }
        }
        if dir == mount_point {
            break;
        }
        match dir.parent() {
            Some(parent) if parent.starts_with(mount_point) => dir = parent,
            _ => break,
        }
    }
    let meminfo = read(Path::new("/proc/meminfo"))?;
    let available_kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no MemAvailable in /proc/meminfo")?;
    if available_kib * 1024 < LIMIT + SLACK {
        return Err(format!(
            "only {} MiB of memory available",
            available_kib / 1024
        ));
    }
    Ok(())
}

/// Child: makes `vmtask-ensure-<pid>` with the limit and the OOM killer
/// off, and moves this process into it, as the last step.
fn enter_sub_cgroup() -> Result<PathBuf, String> {
    let (own, _) = own_memory_cgroup()?;
    let sub = sub_cgroup(&own, std::process::id());
    fs::create_dir(&sub).map_err(|e| format!("cannot create {}: {e}", sub.display()))?;
    let setup = || -> Result<(), String> {
        write(&sub.join("memory.limit_in_bytes"), &LIMIT.to_string())?;
        // Without this the cgroup's OOM killer would SIGKILL the child
        // instead of MADV_POPULATE_WRITE failing with ENOMEM.
        write(&sub.join("memory.oom_control"), "1")?;
        if !read(&sub.join("memory.oom_control"))?.contains("oom_kill_disable 1") {
            return Err(format!("{} kept its OOM killer on", sub.display()));
        }
        write(&sub.join("cgroup.procs"), &std::process::id().to_string())
    };
    setup().inspect_err(|_| {
        let _ = fs::remove_dir(&sub);
    })?;
    Ok(sub)
}

fn child() {
    let pool = StackPool::new(Config {
        stack_size: STACK_SIZE,
        max_stacks: 4,
        ..Config::default()
    })
    .unwrap();
    let stack = pool.alloc().unwrap();
    let mut co = Coroutine::with_stack(stack, |_: &Yielder<(), ()>, ()| {
        let big = vmtask_stack::ensure(ASK);
        let small = vmtask_stack::ensure(64 * 1024);
        (big, small)
    });
    let sub = match enter_sub_cgroup() {
        Ok(sub) => sub,
        Err(reason) => {
            println!("SKIP {reason}");
            return;
        }
    };
    let CoroutineResult::Return((big, small)) = co.resume(()) else {
        panic!("coroutine yielded")
    };
    // Reading files allocates: this too would wait, not return, if the
    // failed ensure had left the cgroup at its limit.
    let usage = read_number(&sub.join("memory.usage_in_bytes")).unwrap();
    let failcnt = read_number(&sub.join("memory.failcnt")).unwrap();
    println!("RESULT big={big:?} small={small:?} usage={usage} failcnt={failcnt}");
    assert!(
        matches!(big, Err(StackError::OutOfMemory { bytes }) if bytes >= ASK),
        "ensure({ASK}) at a {LIMIT}-byte limit: {big:?}"
    );
    assert_eq!(small, Ok(()), "ensure(64 KiB) after the failed one");
    println!("ENSURE-OOM-OK");
}

/// Output and status of the child, which is killed if it outlives
/// `TIME_LIMIT`; and whether it was.
fn run_child(own: &Path) -> (String, String, ExitStatus, bool) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, TEST)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + TIME_LIMIT;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // A task waiting on a memcg v1 OOM sleeps killably.
            let _ = child.kill();
            break child.wait().unwrap();
        }
        thread::sleep(Duration::from_millis(20));
    };
    remove_sub_cgroup(&sub_cgroup(own, child.id()));
    (
        stdout.join().unwrap(),
        stderr.join().unwrap(),
        status,
        timed_out,
    )
}

/// Removes the child's cgroup, if it made one, once the child has been
/// reaped; a cgroup whose last task is still exiting is briefly busy.
fn remove_sub_cgroup(sub: &Path) {
    // Checked first: on a read-only mount rmdir says EROFS, not ENOENT.
    if !sub.exists() {
        return;
    }
    for _ in 0..100 {
        match fs::remove_dir(sub) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("cannot remove {}: {e}", sub.display()),
        }
    }
    panic!("{} stayed busy after its only task exited", sub.display());
}

#[test]
fn ensure_reports_out_of_memory_at_the_cgroup_limit_and_gives_it_back() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let found = own_memory_cgroup().and_then(|(own, mount_point)| {
        check_room(&own, &mount_point)?;
        Ok(own)
    });
    let own = match found {
        Ok(own) => own,
        Err(reason) => {
            note(&format!("skipped: {reason}"));
            return;
        }
    };
    let (stdout, stderr, status, timed_out) = run_child(&own);
    let report = format!("status {status:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        !timed_out,
        "the child was killed after {TIME_LIMIT:?}: it hung (a page fault at the cgroup limit?)\n{report}"
    );
    if let Some(reason) = stdout.lines().find_map(|l| l.split_once("SKIP ")) {
        assert!(status.success(), "{report}");
        note(&format!("skipped: {}", reason.1));
        return;
    }
    assert!(status.success(), "{report}");
    assert!(stdout.contains("ENSURE-OOM-OK"), "{report}");
    let result = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT "))
        .expect("the child printed its result")
        .1;
    let field = |name: &str| -> usize {
        result
            .split(' ')
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {result:?}"))
    };
    assert!(field("failcnt=") > 0, "the limit was never hit: {result}");
    assert!(
        field("usage=") < LIMIT / 2,
        "the failed ensure kept its pages: {result}"
    );
}
