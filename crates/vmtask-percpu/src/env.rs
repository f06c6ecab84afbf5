//! On/off switches read from the environment (`VMTASK_PERCPU_NO_RSEQ`,
//! vmtask-rcu's `VMTASK_RCU_FORCE_FENCE`).

/// Whether the switch `name` is on: `1`, `true`, `yes` or `on` (in any
/// case) turn it on; unset, empty, `0`, `false`, `no` or `off` leave it
/// off. Any other value turns it on, as the switches always did for
/// values other than empty and `0`, with a warning on stderr that names
/// the variable and the values it takes.
///
/// ```
/// std::env::set_var("VMTASK_EXAMPLE_SWITCH", "off");
/// assert!(!vmtask_percpu::env_switch("VMTASK_EXAMPLE_SWITCH"));
/// std::env::set_var("VMTASK_EXAMPLE_SWITCH", "1");
/// assert!(vmtask_percpu::env_switch("VMTASK_EXAMPLE_SWITCH"));
/// ```
pub fn env_switch(name: &str) -> bool {
    let Some(value) = var(name) else {
        return false;
    };
    let text = value.to_string_lossy();
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "0" | "false" | "no" | "off" => false,
        "1" | "true" | "yes" | "on" => true,
        _ => {
            // `warn`, not `eprintln!`: this runs inside `StackPool::new`
            // and `read_lock`, where neither a panic (closed stderr) nor
            // std's stderr lock (see `warn`) may get in.
            crate::warn(format_args!(
                "{name}={text:?} is not a switch value; taken as on (on: 1, true, yes, on; off: 0, false, no, off or empty)"
            ));
            true
        }
    }
}

/// The variable `name`, read through `std` as a rule, but through libc's
/// `getenv` in a fork child: `std` takes a lock of its own on the
/// environment, which a fork while another thread was in
/// `std::env::set_var` leaves held for good in the child (review finding:
/// a child's first `CpuCache::new` hung there). glibc's `getenv` takes
/// none.
fn var(name: &str) -> Option<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    if !crate::cache::in_fork_child() {
        return std::env::var_os(name);
    }
    let name = std::ffi::CString::new(name).ok()?;
    // The environment changes only through `setenv`, whose callers in a
    // threaded program must keep other readers away (`std::env::set_var`'s
    // contract), as with any C library's `getenv`; the value is copied out
    // at once.
    // SAFETY: `name` is NUL-terminated; see above for the environment.
    let value = unsafe { libc::getenv(name.as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: a non-null `getenv` result is a NUL-terminated string.
    let value = unsafe { std::ffi::CStr::from_ptr(value) };
    Some(std::ffi::OsStr::from_bytes(value.to_bytes()).to_owned())
}
