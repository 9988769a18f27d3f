//! Why this start happened: first start, a stop or restart by the operator, the dashboard's
//! `restart`, the agent's own switch, a change to its binary or definition made by someone
//! else, the watchdog or the stall monitor, a kill, a crash, a reboot. The cause goes into the
//! "Agent started" report, `nixfleet-agent status` and the metrics file.
//!
//! Three records in the state directory, each written atomically (0600):
//! - `lifecycle.json`, by the agent: its boot id, pid and start time, written at start with no
//!   exit, and completed with the exit reason when it exits on its own, plus
//!   restart counts by cause;
//! - `last-exit.json`, by `nixfleet-agent record-exit`, which the systemd units run as
//!   `ExecStopPost=`: systemd's own verdict (`SERVICE_RESULT`, `EXIT_CODE`, `EXIT_STATUS`),
//!   the only witness of a watchdog kill or a kill -9;
//! - `stalled`, by the stall monitor just before it exits 70, and `panicked`, by the panic hook
//!   (for hosts without systemd, like macOS).
//!
//! At the next start: a different boot id means the host rebooted; a recorded clean exit
//! names itself; otherwise systemd's verdict or the stall marker, and without either the
//! previous instance died without a trace (kill -9, the OOM killer, a power cut of the
//! process). A missing `lifecycle.json` is a first start.
//!
//! Must not: block the stall monitor beyond one small write, or trust these records for
//! anything but words and counts.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The agent's own record.
pub const LIFECYCLE_FILE: &str = "lifecycle.json";
/// systemd's verdict on the previous instance, from `ExecStopPost=nixfleet-agent record-exit`.
pub const LAST_EXIT_FILE: &str = "last-exit.json";
/// Written by the stall monitor before exit 70.
pub const STALLED_FILE: &str = "stalled";
/// Written by the panic hook: `pid=<pid>` and the message.
pub const PANICKED_FILE: &str = "panicked";

const VERSION: u32 = 1;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why the agent exited on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// SIGTERM or SIGINT: `systemctl stop|restart`, `launchctl kickstart -k`, a shutdown.
    Stopped,
    /// The dashboard's `restart` command.
    DashboardRestart,
    /// Exit 10 after its own switch: a new binary or a new service definition.
    OwnSwitch { detail: String },
    /// Exit 10 after its binary or definition was changed by another route.
    DefinitionChanged { detail: String },
    /// Any other exit code.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanExit {
    pub code: u8,
    pub reason: ExitReason,
    pub unix: u64,
}

/// `lifecycle.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    pub version: u32,
    pub boot_id: Option<String>,
    pub pid: u32,
    pub started_unix: u64,
    /// The cause of the start this record describes.
    #[serde(default)]
    pub cause: Option<Cause>,
    #[serde(default)]
    pub exit: Option<CleanExit>,
    /// Starts by cause key, over the life of the state directory.
    #[serde(default)]
    pub restarts: BTreeMap<String, u64>,
}

/// `last-exit.json`: what systemd told `ExecStopPost=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemdExit {
    pub version: u32,
    pub boot_id: Option<String>,
    pub service_result: String,
    pub exit_code: String,
    pub exit_status: String,
    pub unix: u64,
}

/// Why this start happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Cause {
    FirstStart,
    Reboot,
    Stopped,
    DashboardRestart,
    OwnSwitch { detail: String },
    DefinitionChanged { detail: String },
    Watchdog,
    Stalled,
    Killed { signal: String },
    Crashed { how: String },
    Vanished,
}

impl Cause {
    /// A stable label for metrics (`restarts_total{cause="..."}`).
    pub fn key(&self) -> &'static str {
        match self {
            Cause::FirstStart => "first_start",
            Cause::Reboot => "reboot",
            Cause::Stopped => "stopped",
            Cause::DashboardRestart => "dashboard_restart",
            Cause::OwnSwitch { .. } => "own_switch",
            Cause::DefinitionChanged { .. } => "definition_changed",
            Cause::Watchdog => "watchdog",
            Cause::Stalled => "stalled",
            Cause::Killed { .. } => "killed",
            Cause::Crashed { .. } => "crashed",
            Cause::Vanished => "unknown",
        }
    }

    /// In words, for the "Agent started" report and `status`.
    pub fn text(&self) -> String {
        match self {
            Cause::FirstStart => "first start".into(),
            Cause::Reboot => "after the host rebooted".into(),
            Cause::Stopped => "after a stop or restart by the operator or the service manager \
                               (SIGTERM)"
                .into(),
            Cause::DashboardRestart => "after the dashboard's restart command".into(),
            Cause::OwnSwitch { detail } => format!("after the agent's own switch ({detail})"),
            Cause::DefinitionChanged { detail } => {
                format!("after a change made outside the agent ({detail})")
            }
            Cause::Watchdog => {
                "after the systemd watchdog killed a wedged agent (no progress)".into()
            }
            Cause::Stalled => "after the stall monitor found the main loop wedged (exit 70)".into(),
            Cause::Killed { signal } => format!("after the agent was killed (signal {signal})"),
            Cause::Crashed { how } => format!("after a crash ({how})"),
            Cause::Vanished => "after the previous agent ended without a trace (kill -9, the \
                                OOM killer or a crash; no service manager record)"
                .into(),
        }
    }
}

/// Everything the previous instance left, and this boot.
struct Previous<'a> {
    lifecycle: Option<&'a Lifecycle>,
    systemd: Option<&'a SystemdExit>,
    stalled_pid: Option<u32>,
    /// A panic of that pid, with its message. A panicking command task does not end the
    /// process, so this counts only after systemd's verdict and only when nothing else did.
    panicked: Option<(u32, String)>,
    boot_id: Option<&'a str>,
}

/// The pure decision.
fn determine(p: &Previous<'_>) -> Cause {
    let Some(prev) = p.lifecycle else {
        return Cause::FirstStart;
    };
    if let (Some(then), Some(now)) = (prev.boot_id.as_deref(), p.boot_id)
        && then != now
    {
        return Cause::Reboot;
    }
    if let Some(exit) = &prev.exit {
        return match &exit.reason {
            ExitReason::Stopped => Cause::Stopped,
            ExitReason::DashboardRestart => Cause::DashboardRestart,
            ExitReason::OwnSwitch { detail } => Cause::OwnSwitch {
                detail: detail.clone(),
            },
            ExitReason::DefinitionChanged { detail } => Cause::DefinitionChanged {
                detail: detail.clone(),
            },
            ExitReason::Other => Cause::Crashed {
                how: format!("exit code {}", exit.code),
            },
        };
    }
    if p.stalled_pid == Some(prev.pid) {
        return Cause::Stalled;
    }
    // systemd's verdict counts only if it is about that instance: same boot, not older.
    if let Some(sd) = p.systemd
        && sd.boot_id == prev.boot_id
        && sd.unix >= prev.started_unix
    {
        if sd.service_result == "watchdog" {
            return Cause::Watchdog;
        }
        return match sd.exit_code.as_str() {
            "killed" => Cause::Killed {
                signal: sd.exit_status.clone(),
            },
            "dumped" => Cause::Crashed {
                how: format!("signal {}, core dumped", sd.exit_status),
            },
            "exited" if sd.exit_status == crate::exit::STALLED.to_string() => Cause::Stalled,
            "exited" if sd.exit_status == "101" => Cause::Crashed {
                how: "panic, exit code 101".into(),
            },
            "exited" => Cause::Crashed {
                how: format!("exit code {}", sd.exit_status),
            },
            other => Cause::Crashed {
                how: format!("{other} {}", sd.exit_status),
            },
        };
    }
    if let Some((pid, message)) = &p.panicked
        && *pid == prev.pid
    {
        return Cause::Crashed {
            how: format!("panic: {message}"),
        };
    }
    Cause::Vanished
}

/// Reads a `pid=<pid>\n<rest>` marker.
fn read_marker(path: &Path) -> Option<(u32, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let pid = first.trim().strip_prefix("pid=")?.parse().ok()?;
    Some((pid, rest.trim().to_string()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            crate::store::quarantine(path, &e.to_string());
            None
        }
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) {
    let result = serde_json::to_vec_pretty(value)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::store::write_atomic(path, &bytes));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), "cannot write {}: {e}", path.display());
    }
}

/// The state directory of this process, for the panic hook and the stall marker.
static STATE_DIR: OnceLock<PathBuf> = OnceLock::new();
/// The stall marker's path and content, prepared at start so the stall monitor only writes.
static STALL_MARKER: OnceLock<(CString, Vec<u8>)> = OnceLock::new();

/// What [`on_start`] found and recorded.
#[derive(Clone, Debug)]
pub struct Start {
    pub cause: Cause,
    pub started_unix: u64,
    pub restarts: BTreeMap<String, u64>,
}

/// Called once at start, after the state-dir lock: decides the cause, records this start,
/// consumes the previous instance's records, and prepares the panic and stall records.
pub fn on_start(state_dir: &Path) -> Start {
    let boot_id = crate::facts::boot_id();
    let lifecycle_path = state_dir.join(LIFECYCLE_FILE);
    let prev: Option<Lifecycle> = read_json(&lifecycle_path);
    let systemd: Option<SystemdExit> = read_json(&state_dir.join(LAST_EXIT_FILE));
    let stalled_pid = read_marker(&state_dir.join(STALLED_FILE)).map(|(pid, _)| pid);
    let panicked = read_marker(&state_dir.join(PANICKED_FILE));
    let cause = determine(&Previous {
        lifecycle: prev.as_ref(),
        systemd: systemd.as_ref(),
        stalled_pid,
        panicked,
        boot_id: boot_id.as_deref(),
    });
    let mut restarts = prev.map(|p| p.restarts).unwrap_or_default();
    *restarts.entry(cause.key().to_string()).or_default() += 1;
    let started_unix = now_unix();
    let pid = std::process::id();
    write_json(
        &lifecycle_path,
        &Lifecycle {
            version: VERSION,
            boot_id,
            pid,
            started_unix,
            cause: Some(cause.clone()),
            exit: None,
            restarts: restarts.clone(),
        },
    );
    for consumed in [LAST_EXIT_FILE, STALLED_FILE, PANICKED_FILE] {
        let _ = std::fs::remove_file(state_dir.join(consumed));
    }
    let _ = STATE_DIR.set(state_dir.to_path_buf());
    if let Ok(path) = CString::new(state_dir.join(STALLED_FILE).as_os_str().as_bytes()) {
        let _ = STALL_MARKER.set((path, format!("pid={pid}\n").into_bytes()));
    }
    install_panic_hook();
    Start {
        cause,
        started_unix,
        restarts,
    }
}

/// Completes this instance's record with why it exits.
pub fn record_exit(state_dir: &Path, code: u8, reason: ExitReason) {
    let path = state_dir.join(LIFECYCLE_FILE);
    let mut record: Lifecycle = read_json(&path).unwrap_or_else(|| Lifecycle {
        version: VERSION,
        boot_id: crate::facts::boot_id(),
        pid: std::process::id(),
        ..Lifecycle::default()
    });
    if record.pid != std::process::id() {
        // Another instance owns the state directory now; never overwrite its record.
        return;
    }
    record.exit = Some(CleanExit {
        code,
        reason,
        unix: now_unix(),
    });
    write_json(&path, &record);
}

/// The exit reason for an exit code decided by the main loop; `restart_by_dashboard` and the
/// detail of an exit 10 come from the agent.
pub fn reason_for(code: u8, detail: Option<&str>) -> ExitReason {
    match (code, detail) {
        (crate::exit::OK, Some("restart")) => ExitReason::DashboardRestart,
        (crate::exit::OK, _) => ExitReason::Stopped,
        (crate::exit::RESTART_NEW_BINARY, Some(d)) if d.starts_with("changed outside: ") => {
            ExitReason::DefinitionChanged {
                detail: d.trim_start_matches("changed outside: ").to_string(),
            }
        }
        (crate::exit::RESTART_NEW_BINARY, d) => ExitReason::OwnSwitch {
            detail: d.unwrap_or("new binary or new settings").to_string(),
        },
        _ => ExitReason::Other,
    }
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(dir) = STATE_DIR.get() {
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let location = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message: String = format!("{message}{location}")
                .chars()
                .take(300)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let marker = format!("pid={}\n{message}\n", std::process::id());
            let _ = crate::store::write_atomic(&dir.join(PANICKED_FILE), marker.as_bytes());
        }
        previous(info);
    }));
}

/// For the stall monitor, just before `_exit(70)`: one open/write/close of a prepared record,
/// no allocation (the wedged thread may hold the allocator's lock).
pub fn record_stall() {
    let Some((path, bytes)) = STALL_MARKER.get() else {
        return;
    };
    // SAFETY: plain syscalls on a valid NUL-terminated path and a live buffer.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            let _ = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
            let _ = libc::close(fd);
        }
    }
}

/// `nixfleet-agent record-exit` (the units' `ExecStopPost=`): keeps systemd's verdict on the
/// instance that just ended, for the next start. Reads only its own environment.
pub fn record_systemd_exit(state_dir: &Path, env: &dyn Fn(&str) -> Option<String>) -> u8 {
    let clean = |key: &str| -> String {
        env(key)
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect()
    };
    let record = SystemdExit {
        version: VERSION,
        boot_id: crate::facts::boot_id(),
        service_result: clean("SERVICE_RESULT"),
        exit_code: clean("EXIT_CODE"),
        exit_status: clean("EXIT_STATUS"),
        unix: now_unix(),
    };
    let written = serde_json::to_vec_pretty(&record)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::store::write_atomic(&state_dir.join(LAST_EXIT_FILE), &bytes));
    match written {
        Ok(()) => crate::exit::OK,
        Err(e) => {
            eprintln!(
                "nixfleet-agent record-exit: cannot write {}: {e}",
                state_dir.join(LAST_EXIT_FILE).display()
            );
            crate::exit::NO_STATE_DIR
        }
    }
}

/// Reads `lifecycle.json` (for `status`).
pub fn read_lifecycle(state_dir: &Path) -> Option<Lifecycle> {
    let bytes = std::fs::read(state_dir.join(LIFECYCLE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(boot: &str, exit: Option<ExitReason>) -> Lifecycle {
        Lifecycle {
            version: VERSION,
            boot_id: Some(boot.into()),
            pid: 42,
            started_unix: 1000,
            cause: None,
            exit: exit.map(|reason| CleanExit {
                code: 0,
                reason,
                unix: 2000,
            }),
            restarts: BTreeMap::new(),
        }
    }

    fn sd(boot: &str, result: &str, code: &str, status: &str, unix: u64) -> SystemdExit {
        SystemdExit {
            version: VERSION,
            boot_id: Some(boot.into()),
            service_result: result.into(),
            exit_code: code.into(),
            exit_status: status.into(),
            unix,
        }
    }

    fn cause(l: Option<&Lifecycle>, s: Option<&SystemdExit>, stalled: Option<u32>) -> Cause {
        determine(&Previous {
            lifecycle: l,
            systemd: s,
            stalled_pid: stalled,
            panicked: None,
            boot_id: Some("b1"),
        })
    }

    #[test]
    fn no_record_is_a_first_start_and_a_new_boot_id_a_reboot() {
        assert_eq!(cause(None, None, None), Cause::FirstStart);
        let l = life("b0", Some(ExitReason::Stopped));
        assert_eq!(cause(Some(&l), None, None), Cause::Reboot);
    }

    #[test]
    fn a_clean_exit_names_itself() {
        for (reason, expected) in [
            (ExitReason::Stopped, Cause::Stopped),
            (ExitReason::DashboardRestart, Cause::DashboardRestart),
            (
                ExitReason::OwnSwitch {
                    detail: "new binary".into(),
                },
                Cause::OwnSwitch {
                    detail: "new binary".into(),
                },
            ),
        ] {
            let l = life("b1", Some(reason));
            // systemd's record of the same exit says success; the agent's own words win.
            let s = sd("b1", "success", "exited", "0", 2000);
            assert_eq!(cause(Some(&l), Some(&s), None), expected);
        }
    }

    #[test]
    fn without_a_clean_exit_systemd_tells_watchdog_kill_and_crash() {
        let l = life("b1", None);
        let watchdog = sd("b1", "watchdog", "dumped", "ABRT", 1500);
        assert_eq!(cause(Some(&l), Some(&watchdog), None), Cause::Watchdog);
        let killed = sd("b1", "signal", "killed", "KILL", 1500);
        assert_eq!(
            cause(Some(&l), Some(&killed), None),
            Cause::Killed {
                signal: "KILL".into()
            }
        );
        let stalled = sd("b1", "exit-code", "exited", "70", 1500);
        assert_eq!(cause(Some(&l), Some(&stalled), None), Cause::Stalled);
        // A record from before that instance started is about an older one.
        let stale = sd("b1", "watchdog", "dumped", "ABRT", 999);
        assert_eq!(cause(Some(&l), Some(&stale), None), Cause::Vanished);
        assert_eq!(cause(Some(&l), None, None), Cause::Vanished);
        assert_eq!(cause(Some(&l), None, Some(42)), Cause::Stalled);
        assert_eq!(cause(Some(&l), None, Some(7)), Cause::Vanished);
        let panicked = determine(&Previous {
            lifecycle: Some(&l),
            systemd: None,
            stalled_pid: None,
            panicked: Some((42, "oops at src/x.rs:1".into())),
            boot_id: Some("b1"),
        });
        assert_eq!(
            panicked,
            Cause::Crashed {
                how: "panic: oops at src/x.rs:1".into()
            }
        );
    }

    #[test]
    fn on_start_records_counts_and_consumes_the_previous_records() {
        let dir = tempfile::tempdir().unwrap();
        let first = on_start(dir.path());
        assert_eq!(first.cause, Cause::FirstStart);
        record_exit(dir.path(), 0, reason_for(0, None));
        let second = on_start(dir.path());
        assert_eq!(second.cause, Cause::Stopped);
        // No clean exit this time, and systemd said kill -9.
        record_systemd_exit(dir.path(), &|k| {
            Some(
                match k {
                    "SERVICE_RESULT" => "signal",
                    "EXIT_CODE" => "killed",
                    _ => "KILL",
                }
                .into(),
            )
        });
        let third = on_start(dir.path());
        assert_eq!(
            third.cause,
            Cause::Killed {
                signal: "KILL".into()
            }
        );
        assert!(!dir.path().join(LAST_EXIT_FILE).exists(), "consumed");
        assert_eq!(third.restarts.get("first_start"), Some(&1));
        assert_eq!(third.restarts.get("stopped"), Some(&1));
        assert_eq!(third.restarts.get("killed"), Some(&1));
    }

    #[test]
    fn exit_reasons_from_the_loop() {
        assert_eq!(reason_for(0, Some("restart")), ExitReason::DashboardRestart);
        assert_eq!(
            reason_for(10, Some("changed outside: /etc/x")),
            ExitReason::DefinitionChanged {
                detail: "/etc/x".into()
            }
        );
        assert!(matches!(reason_for(10, None), ExitReason::OwnSwitch { .. }));
    }
}
