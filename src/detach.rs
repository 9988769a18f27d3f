//! Running the switch outside the agent's process tree, so that no agent death (kill -9, OOM,
//! the watchdog, `systemctl restart`, the activation restarting the agent) can kill a half-done
//! switch, and whichever agent instance is running when it ends reports it, once.
//!
//! The switch runs under the agent binary acting as a small wrapper
//! (`nixfleet-agent switch-wrapper`), which enforces the switch timeout with the same runner as
//! everything else and writes the exit status and output tail to a result file in the state
//! directory. How the wrapper is started:
//! - `systemd-run`: a transient unit with `RuntimeMaxSec` as a backstop, collected after it
//!   ends, in the manager that runs the agent: the system manager for a root agent, or with
//!   `--user` the agent's own user manager (the home-manager user unit). The allowlisted
//!   environment goes to the
//!   wrapper in a 0600 file it reads and deletes (`--env-file`), never on argv, where
//!   `/proc/<pid>/cmdline` and `systemctl show` would expose a token in `NIX_CONFIG` or a proxy
//!   password;
//! - `session`: a new session detached from the agent: on macOS (where launchd would otherwise
//!   kill the job's process group), and on Linux wherever no systemd manager can be used
//!   (containers, other init systems, an agent started from a shell as a normal user);
//! - in-process: only when asked for (`NIXFLEET_SWITCH_ISOLATION=none`); the log says which
//!   one was used.
//!
//! This module owns the result file format (versioned JSON) and the waiting; it knows nothing
//! about the dashboard.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, SwitchIsolation};
use crate::exec::{Cmd, Exit, Runner};

/// Most output a result file keeps (the end of it, where the error is).
const RESULT_OUTPUT_MAX: usize = 64 * 1024;
/// How often the waiting agent looks for the result file.
const POLL: Duration = Duration::from_millis(250);
/// A session-mode switch whose wrapper has not written its pid file after this long (counted
/// from when this agent started waiting) never started: the agent died while launching it.
const NEVER_STARTED_AFTER: Duration = Duration::from_secs(5);
/// How often it also checks that the switch is still alive.
const LIVENESS_EVERY: Duration = Duration::from_secs(5);

/// How a switch is isolated from the agent, resolved for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// A transient unit of the service manager the agent runs under: the system manager, or
    /// (`user`) the user manager of a `systemd --user` agent (home-manager hosts).
    SystemdRun {
        user: bool,
    },
    Session,
    InProcess,
}

/// Whether this process runs as a service of *its own* user manager (`systemd --user`): its
/// cgroup is below `user@<euid>.service` and that manager's socket is reachable. Such an agent
/// starts its switch units there: it can, without any privilege, and the system manager would
/// refuse a non-root agent. `sudo nixfleet-agent` from a desktop terminal (root, in the
/// cgroup of user 1000's manager) is not one.
fn under_user_manager() -> bool {
    let euid = nix::unistd::geteuid().as_raw();
    let own_manager = std::fs::read_to_string("/proc/self/cgroup")
        .is_ok_and(|c| user_manager_uid(&c) == Some(euid));
    own_manager
        && std::env::var_os("XDG_RUNTIME_DIR")
            .is_some_and(|dir| Path::new(&dir).join("systemd/private").exists())
}

/// The uid of the user manager whose service this cgroup belongs to, if any. Reads the unified
/// (`0::`) line, or cgroup v1's `name=systemd` one; a path may itself contain ':'.
fn user_manager_uid(cgroup: &str) -> Option<u32> {
    let lines: Vec<&str> = cgroup.lines().collect();
    let line = lines.iter().find(|l| l.starts_with("0::")).or_else(|| {
        lines
            .iter()
            .find(|l| l.split(':').nth(1) == Some("name=systemd"))
    })?;
    let path = line.splitn(3, ':').nth(2)?;
    path.split('/').find_map(|part| {
        part.strip_prefix("user@")?
            .strip_suffix(".service")?
            .parse()
            .ok()
    })
}

/// A switch running outside the agent, as recorded in the command journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    /// The transient unit (systemd-run), if any.
    pub unit: Option<String>,
    /// The unit belongs to the agent's user manager (`systemd-run --user`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_manager: bool,
    /// The wrapper's pid (session mode), if known.
    pub pid: Option<u32>,
    pub result_file: PathBuf,
    /// After this (unix seconds) a switch with no result is given up as lost, if it is gone or
    /// there is no way to tell (the wall clock can jump: an NTP step, a Mac waking up).
    pub deadline_unix: u64,
    /// The longest the switch can run (its timeout and kill grace, with slack), on the
    /// monotonic clock its wrapper uses too. Past the deadline, a waiting agent that has
    /// itself waited this long stops believing a liveness check that says "still running"
    /// (a reused pid). Absent in journals written by older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime_secs: Option<u64>,
}

/// What the wrapper writes when the switch ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchResultFile {
    pub version: u32,
    pub exit_code: i32,
    pub timed_out_after_secs: Option<u64>,
    /// Set when the wrapper itself was stopped (the unit was stopped or hit RuntimeMaxSec).
    pub interrupted: bool,
    pub output: String,
    pub finished_unix: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Picks the isolation for this host from the setting. `auto` never picks in-process: a switch
/// inside the agent dies with it (kill -9, OOM, a stall exit), while a session-mode switch
/// outlives it and the next instance reports its real result.
pub fn resolve(settings: &Settings, runner: &Runner) -> Isolation {
    let user = under_user_manager();
    match settings.switch_isolation {
        SwitchIsolation::SystemdRun => Isolation::SystemdRun { user },
        SwitchIsolation::Session => Isolation::Session,
        SwitchIsolation::None => Isolation::InProcess,
        SwitchIsolation::Auto => {
            if cfg!(target_os = "macos") {
                Isolation::Session
            } else if Path::new("/run/systemd/system").is_dir()
                && (user || nix::unistd::geteuid().is_root())
                && runner.find_program("systemd-run").is_some()
            {
                Isolation::SystemdRun { user }
            } else {
                Isolation::Session
            }
        }
    }
}

/// The wrapper's own argv (after the agent binary): run `switch` under the switch timeout
/// and write `result`; take the child's environment from `env_file` when given.
fn wrapper_args(
    result: &Path,
    timeout: Duration,
    grace: Duration,
    env_file: Option<&Path>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "switch-wrapper".into(),
        "--result".into(),
        result.into(),
        "--timeout-ms".into(),
        timeout.as_millis().to_string().into(),
        "--kill-grace-ms".into(),
        grace.as_millis().to_string().into(),
    ];
    if let Some(env_file) = env_file {
        args.extend(["--env-file".into(), env_file.into()]);
    }
    args.push("--".into());
    args
}

/// Where the environment for a systemd-run wrapper goes: next to its result file.
fn env_file_for(result_file: &Path) -> PathBuf {
    result_file.with_extension("env")
}

/// Writes `env` as NUL-separated `KEY=VALUE` entries to a 0600 file (atomically).
fn write_env_file<'a>(
    path: &Path,
    env: impl IntoIterator<Item = (&'a std::ffi::OsStr, &'a std::ffi::OsStr)>,
) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    for (key, value) in env {
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(b'=');
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    crate::store::write_atomic(path, &bytes)
}

/// Reads and deletes an environment file written by [`write_env_file`]. It is deleted even when
/// unreadable: it may hold credentials and is meant for one reader.
fn take_env_file(path: &Path) -> std::io::Result<Vec<(OsString, OsString)>> {
    let read = std::fs::read(path);
    let _ = std::fs::remove_file(path);
    Ok(read?
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let eq = entry.iter().position(|b| *b == b'=')?;
            (eq > 0).then(|| {
                (
                    OsString::from_vec(entry[..eq].to_vec()),
                    OsString::from_vec(entry[eq + 1..].to_vec()),
                )
            })
        })
        .collect())
}

/// The `systemd-run` invocation that starts the wrapper (`exe` + `inner`) in `unit`. Nothing
/// from the environment goes on this argv: see [`write_env_file`].
fn systemd_run_cmd(
    unit: &str,
    user_manager: bool,
    exe: &Path,
    inner: Vec<OsString>,
    switch: &Cmd,
    timeouts: &crate::config::Timeouts,
) -> Cmd {
    let backstop = switch.timeout + timeouts.kill_grace + Duration::from_secs(30);
    // Stopping the unit (RuntimeMaxSec, `systemctl stop`) SIGTERMs the wrapper, which stops the
    // switch within the kill grace and then writes its result: never SIGKILL it before that.
    let stop_timeout = timeouts.kill_grace + Duration::from_secs(30);
    Cmd::new(
        "systemd-run",
        &switch.cwd,
        timeouts.git_local,
        "systemd-run",
    )
    .args(user_manager.then_some("--user"))
    .arg(format!("--unit={unit}"))
    .args(["--collect", "--quiet", "--service-type=exec"])
    .arg(format!("--property=RuntimeMaxSec={}", backstop.as_secs()))
    .arg(format!(
        "--property=TimeoutStopSec={}",
        stop_timeout.as_secs()
    ))
    .arg(format!("--working-directory={}", switch.cwd.display()))
    .arg("--")
    .arg(exe.as_os_str())
    .args(inner)
}

/// Names the unit and result file of a switch about to be detached. The caller records this
/// in the journal *before* [`launch`], so an agent killed at any moment after the launch
/// leaves enough behind for the next instance to find the switch.
pub fn plan(
    settings: &Settings,
    state_dir: &Path,
    isolation: Isolation,
    switch: &Cmd,
) -> Result<Detached, String> {
    let id = format!("{}-{}", now_unix(), std::process::id());
    let results = state_dir.join("switch");
    crate::store::ensure_private_dir(&results)
        .map_err(|e| format!("cannot create {}: {e}", results.display()))?;
    // Past this, a switch without a result is given up as lost.
    let grace = settings.timeouts.kill_grace.as_secs();
    let deadline_unix = now_unix() + switch.timeout.as_secs() + grace + 60;
    Ok(Detached {
        unit: matches!(isolation, Isolation::SystemdRun { .. })
            .then(|| format!("nixfleet-switch-{id}")),
        user_manager: isolation == (Isolation::SystemdRun { user: true }),
        pid: None,
        result_file: results.join(format!("{id}.json")),
        deadline_unix,
        // RuntimeMaxSec + TimeoutStopSec of the unit, and more.
        max_runtime_secs: Some(switch.timeout.as_secs() + 2 * grace + 120),
    })
}

/// Starts `switch` outside the agent as `planned` says; fills in the wrapper's pid when known.
/// `cancel` only keeps a stopping agent from starting a switch: once `systemd-run` runs, it is
/// never interrupted (the unit may already exist), only bounded by its timeout.
pub async fn launch(
    runner: &Runner,
    settings: &Settings,
    planned: &mut Detached,
    switch: &Cmd,
    cancel: &CancellationToken,
) -> Result<(), String> {
    if cancel.is_cancelled() {
        return Err("not started: the agent is shutting down".into());
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the agent's own executable: {e}"))?;
    let timeouts = &settings.timeouts;
    if let Some(unit) = &planned.unit {
        let env_file = env_file_for(&planned.result_file);
        write_env_file(&env_file, runner.child_env()).map_err(|e| {
            format!(
                "cannot write the switch environment {}: {e}",
                env_file.display()
            )
        })?;
        let mut inner = wrapper_args(
            &planned.result_file,
            switch.timeout,
            timeouts.kill_grace,
            Some(&env_file),
        );
        inner.push(switch.program.clone());
        inner.extend(switch.args.iter().cloned());
        let cmd = systemd_run_cmd(unit, planned.user_manager, &exe, inner, switch, timeouts);
        let outcome = runner.run(cmd, &CancellationToken::new()).await;
        let failure = match outcome {
            Err(e) => Some(format!("cannot start the switch unit: {e}")),
            Ok(outcome) if outcome.success() => None,
            Ok(outcome) => Some(format!(
                "systemd-run failed (exit code {}): {}",
                outcome.exit_code(),
                outcome.output.trim()
            )),
        };
        if let Some(failure) = failure {
            // The switch is reported failed: a wrapper that has not read its environment yet
            // (systemd-run timed out) must not run it unreported; one that has deleted it.
            let _ = std::fs::remove_file(&env_file);
            return Err(failure);
        }
        let manager = if planned.user_manager {
            "systemd-run --user"
        } else {
            "systemd-run"
        };
        tracing::info!(unit = %unit, "switch runs in transient unit {unit} ({manager})");
    } else {
        let mut inner = wrapper_args(
            &planned.result_file,
            switch.timeout,
            timeouts.kill_grace,
            None,
        );
        inner.push(switch.program.clone());
        inner.extend(switch.args.iter().cloned());
        let cmd = Cmd::new(
            exe.as_os_str(),
            &switch.cwd,
            switch.timeout,
            "switch-wrapper",
        )
        .args(inner);
        let pid = runner
            .spawn_detached(&cmd)
            .map_err(|e| format!("cannot start the switch wrapper: {e}"))?;
        planned.pid = Some(pid);
        tracing::info!(
            pid,
            "switch runs in its own session (pid {pid}), detached from the agent"
        );
    }
    Ok(())
}

/// How waiting for a detached switch ended.
pub enum Waited {
    Done(SwitchResultFile),
    /// The agent is stopping; the switch goes on and the next instance reports it.
    Cancelled,
    /// The switch is gone without a result, or the deadline passed.
    Lost(String),
}

/// Where the wrapper records its pid as soon as it runs (next to its result file).
fn pid_file(result: &Path) -> PathBuf {
    let mut name = result.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// Removes what a finished detached switch left in the state directory (its result and pid
/// files), once its report is safely in the outbox.
pub fn clean_up(detached: &Detached) {
    let _ = std::fs::remove_file(&detached.result_file);
    let _ = std::fs::remove_file(pid_file(&detached.result_file));
    // Normally the wrapper deleted it; not if it never ran. It may hold proxy credentials.
    let _ = std::fs::remove_file(env_file_for(&detached.result_file));
}

/// Whether `id` is of the form [`plan`] gives a switch: `<unix seconds>-<pid>`.
fn is_switch_id(id: &str) -> bool {
    let Some((time, pid)) = id.split_once('-') else {
        return false;
    };
    [time, pid]
        .iter()
        .all(|part| (1..=20).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a [`Detached`] read back from the journal against the form [`plan`] writes: its
/// result file is `<state_dir>/switch/<id>.json`, its unit (if any) is
/// `nixfleet-switch-<id>` with the same id (so it can never be read as an option), and its pid
/// (if any) a real process id other than init. Anything else is a corrupt (or planted) journal:
/// its paths must never be read, deleted or passed to a command.
pub fn check_detached(detached: &Detached, state_dir: &Path) -> Result<(), String> {
    let file = &detached.result_file;
    let dir = state_dir.join("switch");
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| file.parent() == Some(dir.as_path()))
        .ok_or_else(|| {
            format!(
                "its switch result file {:?} is not inside {}",
                file,
                dir.display()
            )
        })?;
    let id = name
        .strip_suffix(".json")
        .filter(|id| is_switch_id(id))
        .ok_or_else(|| format!("its switch result file name {name:?} is not the agent's own"))?;
    if let Some(unit) = &detached.unit
        && unit.strip_prefix("nixfleet-switch-") != Some(id)
    {
        return Err(format!(
            "its switch unit {:?} is not nixfleet-switch-{id}",
            crate::text::bounded(unit, 200)
        ));
    }
    if let Some(pid) = detached.pid
        && !(2..=i32::MAX as u32).contains(&pid)
    {
        return Err(format!(
            "its switch pid {pid} is not a process the agent started"
        ));
    }
    Ok(())
}

/// Reads a result file; `None` while it does not exist yet. Not through a link, and at most
/// `store::STATE_FILE_MAX` bytes (`store::read_state_file`).
pub fn read_result(path: &Path) -> Option<Result<SwitchResultFile, String>> {
    match crate::store::read_state_file(path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<SwitchResultFile>(&bytes)
                .map_err(|e| format!("unreadable switch result {}: {e}", path.display())),
        ),
        Err(_) => None,
    }
}

/// Waits for the result of `detached`, checking now and then that the switch still runs.
///
/// The deadline is wall-clock time, which can jump (an NTP step, a Mac waking up) while the
/// wrapper's own timeout runs on the monotonic clock; so past it the switch is given up only
/// when it is gone, when there is no way to check, or when this wait alone has lasted longer
/// than the switch can run.
pub async fn wait(runner: &Runner, detached: &Detached, cancel: &CancellationToken) -> Waited {
    let mut since_liveness = Duration::ZERO;
    let waiting_since = tokio::time::Instant::now();
    let mut deadline_noted = false;
    loop {
        if let Some(result) = read_result(&detached.result_file) {
            return match result {
                Ok(r) => Waited::Done(r),
                Err(e) => Waited::Lost(e),
            };
        }
        if now_unix() > detached.deadline_unix {
            let uncheckable = detached.unit.is_none()
                && detached.pid.is_none()
                && !pid_file(&detached.result_file).exists();
            // A journal from an older agent has no bound: the deadline alone decides then.
            let outlived = detached
                .max_runtime_secs
                .is_none_or(|max| waiting_since.elapsed() > Duration::from_secs(max));
            if uncheckable || outlived {
                return Waited::Lost("no result before the switch deadline".into());
            }
            if !deadline_noted {
                deadline_noted = true;
                // Check at once rather than up to LIVENESS_EVERY later.
                since_liveness = LIVENESS_EVERY;
                tracing::warn!(
                    result = %detached.result_file.display(),
                    "the switch deadline passed (did the clock jump?); waiting on while it runs"
                );
            }
        }
        if since_liveness >= LIVENESS_EVERY {
            since_liveness = Duration::ZERO;
            if let Some(gone) = gone_reason(runner, detached, cancel, waiting_since.elapsed()).await
            {
                // It may have written the file just before ending.
                if let Some(Ok(r)) = read_result(&detached.result_file) {
                    return Waited::Done(r);
                }
                return Waited::Lost(gone);
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return Waited::Cancelled,
            () = tokio::time::sleep(POLL) => since_liveness += POLL,
        }
    }
}

/// Stops a detached switch (the dashboard's `stop`): `systemctl stop` of its transient unit,
/// or SIGTERM to its wrapper once that pid is proven to be our switch wrapper. Either way the
/// wrapper stops the switch's whole process tree and still writes a result, which the waiting
/// command then reports. Returns what it did, for the log.
pub async fn stop(runner: &Runner, detached: &Detached) -> String {
    if let Some(unit) = &detached.unit {
        let cmd = Cmd::new("systemctl", "/", Duration::from_secs(30), "systemctl stop")
            .args(detached.user_manager.then_some("--user"))
            .args(["stop", "--", unit]);
        return match runner.run(cmd, &CancellationToken::new()).await {
            Ok(outcome) if outcome.success() => format!("stopped the switch unit {unit}"),
            Ok(outcome) => format!(
                "systemctl stop {unit} failed (exit code {}): {}",
                outcome.exit_code(),
                outcome.output.trim_end()
            ),
            Err(e) => format!("systemctl stop {unit} failed: {e}"),
        };
    }
    let pid = detached.pid.or_else(|| {
        crate::store::read_state_file(&pid_file(&detached.result_file))
            .ok()
            .and_then(|p| String::from_utf8_lossy(&p).trim().parse::<u32>().ok())
    });
    let Some(pid) = pid.filter(|pid| (2..=i32::MAX as u32).contains(pid)) else {
        return "the switch wrapper's pid is unknown; nothing was signalled".into();
    };
    if !is_switch_wrapper(runner, pid).await {
        return format!("pid {pid} is not our switch wrapper (any more); nothing was signalled");
    }
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    ) {
        Ok(()) => format!("sent SIGTERM to the switch wrapper (pid {pid})"),
        Err(e) => format!("cannot signal the switch wrapper (pid {pid}): {e}"),
    }
}

/// Whether `pid` runs `nixfleet-agent switch-wrapper` (its command line, read from the OS).
async fn is_switch_wrapper(runner: &Runner, pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        return std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline
                .split(|&b| b == 0)
                .any(|arg| arg == b"switch-wrapper")
        });
    }
    let cmd = Cmd::new("ps", "/", Duration::from_secs(5), "ps").args([
        "-o",
        "command=",
        "-p",
        &pid.to_string(),
    ]);
    runner
        .run(cmd, &CancellationToken::new())
        .await
        .is_ok_and(|o| o.success() && o.output.split_whitespace().any(|a| a == "switch-wrapper"))
}

/// `Some(reason)` when the detached switch is no longer running.
async fn gone_reason(
    runner: &Runner,
    detached: &Detached,
    cancel: &CancellationToken,
    waited: Duration,
) -> Option<String> {
    if let Some(unit) = &detached.unit {
        // Without --value: systemctl prints properties in its own order (Result before
        // ActiveState), not in the order asked for, so the lines are matched by name.
        let cmd = Cmd::new("systemctl", "/", Duration::from_secs(10), "systemctl show")
            .args(detached.user_manager.then_some("--user"))
            .args(["show", "--property=ActiveState,Result", unit]);
        let outcome = runner.run(cmd, cancel).await.ok()?;
        let field = |key: &str| {
            outcome
                .output
                .lines()
                .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
        };
        // No ActiveState line (systemctl itself failed): unknown, keep waiting; the deadline
        // still bounds the wait.
        let state = field("ActiveState")?;
        return match state {
            "active" | "activating" | "deactivating" | "reloading" => None,
            _ => Some(format!(
                "the switch unit {unit} ended without a result (ActiveState={state}, Result={})",
                field("Result").unwrap_or("?")
            )),
        };
    }
    let pid = detached.pid.or_else(|| {
        crate::store::read_state_file(&pid_file(&detached.result_file))
            .ok()
            .and_then(|p| String::from_utf8_lossy(&p).trim().parse::<u32>().ok())
            // Never init, 0 (our own group) or a value that is negative as a pid_t.
            .filter(|pid| (2..=i32::MAX as u32).contains(pid))
    });
    if pid.is_none() && detached.unit.is_none() && waited >= NEVER_STARTED_AFTER {
        return Some("the switch never started (the agent stopped while launching it)".to_string());
    }
    if let Some(pid) = pid {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        // A zombie (our own unreaped child) counts as gone; the reaper thread handles it.
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if !alive || zombie {
            return Some(format!(
                "the switch wrapper (pid {pid}) ended without a result"
            ));
        }
    }
    None
}

/// `nixfleet-agent switch-wrapper`: runs the switch with its timeout, writes the result file,
/// exits with the switch's exit code. Stopping the wrapper (SIGTERM) stops the switch's whole
/// process tree and still writes a result. With `env_file` the switch's environment comes from
/// that file (which is deleted), not from the wrapper's own.
pub fn run_wrapper(
    result: &Path,
    timeout: Duration,
    grace: Duration,
    env_file: Option<&Path>,
    argv: &[String],
) -> u8 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("switch-wrapper: no command given");
        return crate::exit::CONFIG;
    };
    // First thing: say that the switch exists, for an agent that died while launching us.
    if let Err(e) =
        crate::store::write_atomic(&pid_file(result), std::process::id().to_string().as_bytes())
    {
        eprintln!(
            "switch-wrapper: cannot write {}: {e}",
            pid_file(result).display()
        );
    }
    let runner = match env_file.map(take_env_file) {
        None => Runner::new(grace),
        Some(Ok(env)) => Runner::from_parent_env(grace, env),
        Some(Err(e)) => {
            let message = format!(
                "switch-wrapper: cannot read the switch environment {}: {e}; the switch did not run",
                env_file.map_or_else(String::new, |p| p.display().to_string())
            );
            eprintln!("{message}");
            return write_result(result, &failed_result(1, message));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switch-wrapper: cannot start the runtime: {e}");
            return crate::exit::FAILURE;
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let outcome = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let cancel = CancellationToken::new();
        // Installed before the switch starts: a SIGTERM from then on stops it and still
        // leaves a result. (A task only runs once `run` yields, after the child exists.)
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                let on_term = cancel.clone();
                tokio::spawn(async move {
                    if term.recv().await.is_some() {
                        on_term.cancel();
                    }
                });
            }
            Err(e) => eprintln!("switch-wrapper: cannot handle SIGTERM: {e}"),
        }
        let cmd = Cmd::new(program, &cwd, timeout, "Switch").args(args);
        runner.run(cmd, &cancel).await
    });
    let file = match outcome {
        Ok(outcome) => {
            let output = outcome.output;
            let tail_start = output.len().saturating_sub(RESULT_OUTPUT_MAX);
            let tail_start = (tail_start..=output.len())
                .find(|i| output.is_char_boundary(*i))
                .unwrap_or(output.len());
            SwitchResultFile {
                version: 1,
                exit_code: outcome.exit.clone().pipe_code(),
                timed_out_after_secs: match outcome.exit {
                    Exit::TimedOut { after } => Some(after.as_secs()),
                    _ => None,
                },
                interrupted: outcome.exit == Exit::Cancelled,
                output: output[tail_start..].to_string(),
                finished_unix: now_unix(),
            }
        }
        Err(e) => failed_result(127, e.to_string()),
    };
    write_result(result, &file)
}

/// The result of a switch that did not start.
fn failed_result(exit_code: i32, output: String) -> SwitchResultFile {
    SwitchResultFile {
        version: 1,
        exit_code,
        timed_out_after_secs: None,
        interrupted: false,
        output,
        finished_unix: now_unix(),
    }
}

/// Writes the wrapper's result file; returns the wrapper's exit code.
fn write_result(result: &Path, file: &SwitchResultFile) -> u8 {
    let bytes = serde_json::to_vec(file).expect("result serializes");
    if let Err(e) = crate::store::write_atomic(result, &bytes) {
        eprintln!("switch-wrapper: cannot write {}: {e}", result.display());
        return crate::exit::FAILURE;
    }
    u8::try_from(file.exit_code).unwrap_or(crate::exit::FAILURE)
}

trait PipeCode {
    fn pipe_code(self) -> i32;
}

impl PipeCode for Exit {
    /// The exit code as a shell shows it (124 for a timeout, like `timeout(1)`).
    fn pipe_code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
            Exit::TimedOut { .. } => 124,
            Exit::Cancelled => 143,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_records_are_checked_against_the_agents_own_form() {
        let state = Path::new("/var/lib/nixfleet-agent");
        let good = Detached {
            unit: Some("nixfleet-switch-1700000000-42".into()),
            user_manager: false,
            pid: None,
            result_file: state.join("switch/1700000000-42.json"),
            deadline_unix: 1,
            max_runtime_secs: None,
        };
        assert_eq!(check_detached(&good, state), Ok(()));
        let session = Detached {
            unit: None,
            pid: Some(4242),
            ..good.clone()
        };
        assert_eq!(check_detached(&session, state), Ok(()));
        for (bad, why) in [
            (
                Detached {
                    result_file: "/etc/shadow".into(),
                    ..good.clone()
                },
                "not inside",
            ),
            (
                Detached {
                    result_file: state.join("switch/../../../etc/passwd.json"),
                    ..good.clone()
                },
                "not inside",
            ),
            (
                Detached {
                    result_file: state.join("switch/journal.json"),
                    ..good.clone()
                },
                "not the agent's own",
            ),
            (
                Detached {
                    unit: Some("--help".into()),
                    ..good.clone()
                },
                "is not nixfleet-switch-1700000000-42",
            ),
            (
                Detached {
                    unit: Some("nixfleet-switch-1700000000-43".into()),
                    ..good.clone()
                },
                "is not nixfleet-switch-1700000000-42",
            ),
            (
                Detached {
                    pid: Some(1),
                    ..session.clone()
                },
                "pid 1",
            ),
            (
                Detached {
                    pid: Some(u32::MAX),
                    ..session.clone()
                },
                "is not a process",
            ),
        ] {
            let err = check_detached(&bad, state).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn the_environment_travels_in_a_private_file_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = env_file_for(&dir.path().join("switch/1-2.json"));
        assert_eq!(path, dir.path().join("switch/1-2.env"));
        let runner = Runner::from_parent_env(
            Duration::from_secs(1),
            [
                (
                    "NIX_CONFIG".into(),
                    "access-tokens = github.com=s3cret\nx = a=b".into(),
                ),
                ("https_proxy".into(), "http://user:pass@proxy:3128".into()),
                ("NIXFLEET_TOKEN".into(), "never".into()),
                ("PATH".into(), "/bin".into()),
            ],
        );
        write_env_file(&path, runner.child_env()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let raw = std::fs::read(&path).unwrap();
        assert!(raw.ends_with(b"\0") && !raw.windows(5).any(|w| w == b"never"));
        let mut env = take_env_file(&path).unwrap();
        env.sort();
        assert!(!path.exists(), "read once, then deleted");
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.into_string().unwrap(), v.into_string().unwrap()))
            .collect();
        assert_eq!(
            env,
            vec![
                (
                    "NIX_CONFIG".into(),
                    "access-tokens = github.com=s3cret\nx = a=b".into()
                ),
                ("PATH".into(), "/bin".into()),
                ("https_proxy".into(), "http://user:pass@proxy:3128".into()),
            ]
        );
        assert!(take_env_file(&path).is_err(), "a missing file is an error");
    }

    #[test]
    fn systemd_run_argv_carries_no_environment() {
        let timeouts = crate::config::Timeouts::default();
        let switch = Cmd::new("nixos-rebuild", "/", Duration::from_secs(600), "Switch")
            .args(["switch", "--flake", ".#host"]);
        let env_file = Path::new("/var/lib/nixfleet/switch/1-2.env");
        let mut inner = wrapper_args(
            Path::new("/var/lib/nixfleet/switch/1-2.json"),
            switch.timeout,
            timeouts.kill_grace,
            Some(env_file),
        );
        inner.push(switch.program.clone());
        inner.extend(switch.args.iter().cloned());
        let cmd = systemd_run_cmd(
            "nixfleet-switch-1-2",
            false,
            Path::new("/bin/nixfleet-agent"),
            inner.clone(),
            &switch,
            &timeouts,
        );
        let args: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.contains(&"--user".to_string()), "{args:?}");
        let user = systemd_run_cmd(
            "nixfleet-switch-1-2",
            true,
            Path::new("/bin/nixfleet-agent"),
            inner,
            &switch,
            &timeouts,
        );
        assert_eq!(user.args[0], "--user", "{:?}", user.args);
        assert_eq!(&user.args[1..], &cmd.args[..]);
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--setenv") || a.starts_with("-E"))
        );
        let grace = timeouts.kill_grace.as_secs();
        assert!(
            args.contains(&format!("--property=TimeoutStopSec={}", grace + 30)),
            "{args:?}"
        );
        let wrapper = args.iter().position(|a| a == "switch-wrapper").unwrap();
        let separator = args.iter().position(|a| a == "--").unwrap();
        assert!(separator < wrapper, "{args:?}");
        let env_flag = args.iter().position(|a| a == "--env-file").unwrap();
        assert_eq!(args[env_flag + 1], env_file.display().to_string());
        assert!(args.ends_with(&[
            "nixos-rebuild".into(),
            "switch".into(),
            "--flake".into(),
            ".#host".into()
        ]));
    }

    fn past_deadline(dir: &Path, pid: Option<u32>, max_runtime_secs: Option<u64>) -> Detached {
        Detached {
            unit: None,
            user_manager: false,
            pid,
            result_file: dir.join("r.json"),
            deadline_unix: now_unix().saturating_sub(10),
            max_runtime_secs,
        }
    }

    async fn wait_bounded(detached: &Detached) -> Waited {
        let runner = Runner::new(Duration::from_secs(1));
        let cancel = CancellationToken::new();
        tokio::time::timeout(Duration::from_secs(10), wait(&runner, detached, &cancel))
            .await
            .expect("wait ends")
    }

    #[tokio::test]
    async fn past_the_deadline_a_switch_still_running_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        // The "wrapper" is this very process: alive.
        let detached = past_deadline(dir.path(), Some(std::process::id()), Some(3600));
        let result = detached.result_file.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let file = failed_result(0, "activated".into());
            crate::store::write_atomic(&result, &serde_json::to_vec(&file).unwrap()).unwrap();
        });
        match wait_bounded(&detached).await {
            Waited::Done(r) => assert_eq!(r.output, "activated"),
            Waited::Lost(why) => panic!("lost: {why}"),
            Waited::Cancelled => panic!("cancelled"),
        }
    }

    #[tokio::test]
    async fn past_the_deadline_a_gone_or_uncheckable_or_overdue_switch_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let gone = u32::try_from(i32::MAX).unwrap();
        for (detached, why) in [
            (past_deadline(dir.path(), None, None), "no result before"),
            (
                past_deadline(dir.path(), Some(gone), Some(3600)),
                "ended without a result",
            ),
            (
                past_deadline(dir.path(), Some(std::process::id()), Some(0)),
                "no result before",
            ),
        ] {
            match wait_bounded(&detached).await {
                Waited::Lost(reason) => assert!(reason.contains(why), "{reason}"),
                Waited::Done(_) | Waited::Cancelled => panic!("{detached:?} not lost"),
            }
        }
    }

    #[test]
    fn user_manager_uid_is_read_from_the_systemd_cgroup() {
        let user = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/agent.service\n";
        let system = "0::/system.slice/nixfleet-agent.service\n";
        let session = "0::/user.slice/user-1000.slice/session-3.scope\n";
        let v1 = "12:pids:/user.slice/user-0.slice/user@0.service/nixfleet-agent.service\n\
                  1:name=systemd:/user.slice/user-0.slice/user@0.service/nixfleet-agent.service\n";
        let colon = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/dev-a:b.scope\n";
        let v1_other = "3:cpu:/user.slice/user-7.slice/user@7.service\n1:name=systemd:/system.slice/x.service\n";
        assert_eq!(user_manager_uid(user), Some(1000));
        assert_eq!(user_manager_uid(v1), Some(0));
        assert_eq!(user_manager_uid(colon), Some(1000));
        assert_eq!(user_manager_uid(system), None);
        assert_eq!(
            user_manager_uid(session),
            None,
            "a login shell is not a user service"
        );
        assert_eq!(
            user_manager_uid(v1_other),
            None,
            "only the systemd hierarchy counts"
        );
        assert_eq!(user_manager_uid(""), None);
    }
}

/// Issue 10, item 10: property tests over the switch result file and detached records.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_result_file_reads_or_errs(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("1-2.json");
            std::fs::write(&path, &bytes).unwrap();
            prop_assert!(read_result(&path).is_some());
        }

        #[test]
        fn only_the_agents_own_form_passes(name in any::<String>(), unit in proptest::option::of(any::<String>())) {
            let state = Path::new("/var/lib/nixfleet-agent");
            let detached = Detached {
                unit,
                user_manager: false,
                pid: None,
                result_file: state.join("switch").join(&name),
                deadline_unix: 0,
                max_runtime_secs: None,
            };
            if check_detached(&detached, state).is_ok() {
                let id = name.strip_suffix(".json").unwrap();
                prop_assert!(is_switch_id(id));
                let want = format!("nixfleet-switch-{id}");
                prop_assert!(detached.unit.is_none_or(|u| u == want));
            }
        }

        #[test]
        fn any_env_file_reads(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.env");
            std::fs::write(&path, &bytes).unwrap();
            let env = take_env_file(&path).unwrap();
            prop_assert!(env.iter().all(|(k, _)| !k.is_empty()));
            prop_assert!(!path.exists());
        }
    }
}
