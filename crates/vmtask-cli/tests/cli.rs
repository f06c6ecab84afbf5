//! The `vmtask` binary, run as a user would.

use std::process::Command;

fn vmtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmtask"))
        .args(args)
        .output()
        .expect("the vmtask binary runs")
}

#[test]
fn quick_memory_subcommand_prints_its_table_and_writes_a_chart() {
    let out_dir = std::env::temp_dir().join(format!("vmtask-cli-test-{}", std::process::id()));
    let out = vmtask(&[
        "memory",
        "--quick",
        "--tasks",
        "50",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("# vmtask memory (--quick)"), "{stdout}");
    assert!(!stdout.contains("vmtask tour"), "{stdout}");
    assert!(stdout.contains("Resident memory per task"), "{stdout}");
    assert!(stdout.contains("demand-paged (live)"), "{stdout}");
    assert!(stdout.contains("RCU stats"), "{stdout}");
    let svg = std::fs::read_to_string(out_dir.join("3-memory.svg")).expect("chart written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    std::fs::remove_dir_all(out_dir).unwrap();
}

#[test]
fn quick_balance_subcommand_reports_both_exits() {
    let out_dir = std::env::temp_dir().join(format!("vmtask-cli-balance-{}", std::process::id()));
    let out = vmtask(&[
        "balance",
        "--quick",
        "--secs",
        "0.1",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("exit on the spawning CPU") && stdout.contains("exit on the other CPU"),
        "{stdout}"
    );
    assert!(stdout.contains("nothing piled up"), "{stdout}");
    std::fs::remove_dir_all(out_dir).unwrap();
}

#[test]
fn invalid_configuration_is_an_error_not_a_panic() {
    // Checked before anything runs, named by the flag, exit code 2 as for
    // what clap rejects itself. The largest `usize` parses, and is then
    // refused by range.
    let huge = usize::MAX.to_string();
    let huge_message = format!("--stack-kib {huge} is out of range");
    for (args, message) in [
        (
            &["balance", "--secs", "0.1", "--cache-size", "0"][..],
            "--cache-size 0 is out of range: must be 1 to 65536",
        ),
        (
            &["rcu-free", "--cache-size", "2", "--cache-size", "70000"][..],
            "--cache-size 70000 is out of range",
        ),
        (
            &["spawn-cost", "--stack-kib", "0"][..],
            "--stack-kib 0 is out of range: must be 16 to 65536",
        ),
        (&["spawn-cost", "--stack-kib", &huge][..], &huge_message[..]),
    ] {
        let out = vmtask(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("vmtask: error:") && stderr.contains(message),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?} ran before failing: {stdout}");
    }
}

#[test]
fn unwritable_chart_directory_fails_before_running() {
    let out = vmtask(&["memory", "--quick", "--out", "/proc/vmtask-no-such-dir"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot make the chart directory (--out)"),
        "{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn chart_directory_that_is_a_file_is_named_as_such() {
    let file = std::env::temp_dir().join(format!("vmtask-cli-out-file-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let out = vmtask(&["memory", "--quick", "--out", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--out names a file; it must name a directory"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "ran before failing");
}

#[test]
fn help_gives_the_ranges_that_are_checked() {
    let out = vmtask(&["memory", "--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 to 65536"), "{stdout}");
}

#[test]
fn bad_duration_is_an_error() {
    let out = vmtask(&["rcu-free", "--secs=-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secs"));
}

#[test]
fn quick_tour_runs_every_experiment() {
    let out_dir = std::env::temp_dir().join(format!("vmtask-cli-tour-{}", std::process::id()));
    let out = vmtask(&["--quick", "--out", out_dir.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("# vmtask tour (--quick)"), "{stdout}");
    for section in ["## 1.", "## 2.", "## 3.", "## 4.", "## RCU stats"] {
        assert!(stdout.contains(section), "{section} missing:\n{stdout}");
    }
    for chart in ["1-spawn-cost", "2-rcu-free", "3-memory", "4-balance"] {
        assert!(
            out_dir.join(format!("{chart}.svg")).is_file(),
            "{chart}.svg"
        );
    }
    std::fs::remove_dir_all(out_dir).unwrap();
}

/// Runs `args`, expects a usage error naming `option` and `range`, not a
/// panic and not a run.
fn assert_rejected(args: &[&str], option: &str, range: &str) {
    let out = vmtask(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(
        stderr.contains("vmtask: error:") && stderr.contains(option) && stderr.contains(range),
        "{args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "{args:?} ran anyway");
}

#[test]
fn zero_secs_is_rejected_with_its_range() {
    assert_rejected(&["rcu-free", "--secs", "0"], "--secs 0", "from 0.01");
    assert_rejected(&["balance", "--secs", "0"], "--secs 0", "from 0.01");
}

#[test]
fn zero_tasks_is_rejected_with_its_range() {
    assert_rejected(&["memory", "--tasks", "0"], "--tasks 0", "at least 1");
}

#[test]
fn zero_count_is_rejected_with_its_range() {
    assert_rejected(&["spawn-cost", "--count", "0"], "--count 0", "at least 1");
}

#[test]
fn zero_reps_is_rejected_with_its_range() {
    assert_rejected(&["spawn-cost", "--reps", "0"], "--reps 0", "at least 1");
}

#[test]
fn zero_max_deferred_is_rejected_with_its_range() {
    assert_rejected(
        &["rcu-free", "--max-deferred", "0"],
        "--max-deferred 0",
        "at least 1",
    );
}

#[test]
fn help_shows_each_default_once() {
    for command in ["spawn-cost", "rcu-free", "memory", "balance"] {
        let out = vmtask(&[command, "--help"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        for line in stdout.lines() {
            assert!(line.matches("[default:").count() <= 1, "{command}: {line}");
        }
    }
}
