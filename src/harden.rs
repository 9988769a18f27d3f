//! Process hardening applied first thing at start-up: no core dumps and, on Linux, a
//! non-dumpable process, so the token (and anything else in memory) never lands in a core file
//! and another process of the same user cannot `ptrace` or read `/proc/<pid>/mem`.
//!
//! The units and modules also set `LimitCORE=0`; this covers a hand-started agent and the
//! launchd daemon. It must not fail start-up: a refusal is returned for one warning line.

/// Turns core dumps off (soft and hard `RLIMIT_CORE` = 0, inherited by children) and, on Linux,
/// marks the process non-dumpable (`PR_SET_DUMPABLE` 0; reset by `execve`, so children are not
/// affected). Returns what could not be done.
pub fn apply() -> Result<(), String> {
    let mut failed = Vec::new();
    if let Err(e) = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0) {
        failed.push(format!("cannot set RLIMIT_CORE to 0: {e}"));
    }
    if let Err(e) = platform_non_dumpable() {
        failed.push(e);
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

#[cfg(target_os = "linux")]
fn platform_non_dumpable() -> Result<(), String> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("cannot set PR_SET_DUMPABLE 0: {e}"))
}

/// macOS has no `PR_SET_DUMPABLE`; core dumps are off through `RLIMIT_CORE`, and `task_for_pid`
/// on a root process already needs root.
#[cfg(not(target_os = "linux"))]
fn platform_non_dumpable() -> Result<(), String> {
    Ok(())
}
