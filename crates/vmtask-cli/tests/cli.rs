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
    let out = vmtask(&["balance", "--secs", "0.1", "--cache-size", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("vmtask: error:") && stderr.contains("cache_size"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
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
