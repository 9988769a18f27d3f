//! The one constructor for every child process the agent starts.
//!
//! Every `git`, `nixos-rebuild`, `home-manager` and test script goes through [`Runner::run`],
//! which gives each child:
//! - its own process group, so SIGTERM/SIGKILL reach the whole tree with one `killpg`;
//! - stdin from /dev/null (nothing may wait for a terminal) and an explicit working directory;
//! - a cleared environment plus an allowlist computed once in [`Runner::new`] (see `env.rs`):
//!   no `NIXFLEET_*` secret or systemd plumbing ever reaches a child;
//! - stdout and stderr on one pipe, in the order the child wrote them, kept within a memory cap
//!   (head + tail, see `capture.rs`) and logged line by line at debug level under the target
//!   `nixfleet_agent::child`;
//! - a deadline: SIGTERM to the group, `kill_grace`, SIGKILL to the group. The cancellation
//!   token (agent shutdown) does the same. Dropping the `run` future SIGKILLs the group.
//!
//! When the direct child exits on its own, whatever is left in its group is killed with SIGKILL
//! too, and the output pipe is read for at most [`PIPE_DRAIN_BOUND`] more, so a grandchild that
//! keeps the pipe open can never hang the agent.
//!
//! A descendant that called `setsid`/`setpgid` (a daemon, `setsid foo &`) has left the group.
//! On a timeout or cancellation, Linux finds those still linked to the child through `/proc`
//! and signals them with the group (`escaped.rs`, pidfd-pinned). Limitation: one whose parent
//! already exited (re-parented to PID 1), or any on macOS, is not found; `run` still returns
//! promptly, and on systemd hosts `KillMode=mixed` collects such processes when the agent
//! stops. A process stuck in uninterruptible sleep cannot be killed by anyone; `run` gives up
//! waiting for it after [`KILL_REAP_BOUND`] and a background thread reaps it later.
//!
//! `clippy.toml` forbids `Command::new` everywhere else, so this module is the only place that
//! decides these things. Mechanics that depend on the platform live in `unix.rs`.

mod capture;
mod env;
mod escaped;
mod tap;
#[cfg(test)]
mod tests;
#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as sys;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use capture::Capture;
pub use tap::{LineTap, MAX_STREAM_LINE, TaggedLine};

/// How much captured output to keep in memory (head + tail) per child.
pub const DEFAULT_OUTPUT_CAP: usize = 256 * 1024;

/// How long to keep reading output after the child exited and its group was killed. Processes
/// still in the group are dead by then; only an escapee (see the module docs) can hold the
/// pipe longer, and its output is not worth waiting for.
pub const PIPE_DRAIN_BOUND: Duration = Duration::from_millis(100);

/// How long to wait for the kernel to deliver a SIGKILL before `run` returns anyway.
pub const KILL_REAP_BOUND: Duration = Duration::from_secs(5);

/// Builds and runs child processes. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    kill_grace: Duration,
    output_cap: usize,
    /// The allowlisted environment, computed once: the agent's own environment does not change
    /// while it runs, and filtering it per child would only repeat the same work.
    env: Arc<[(OsString, OsString)]>,
    /// Where children's lines go live, if anywhere.
    tap: Option<LineTap>,
}

/// One child process to run.
#[derive(Clone)]
pub struct Cmd {
    /// Program name (looked up in PATH) or path. A relative path with a `/` is relative to
    /// [`Cmd::cwd`], as it would be for `cd cwd && ./program`.
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Working directory; always explicit.
    pub cwd: PathBuf,
    /// Deadline for the whole process tree.
    pub timeout: Duration,
    /// Human label used in logs and timeout messages, e.g. "git pull", "Switch", "T03-hang".
    pub label: String,
    /// Extra environment on top of the allowlist (e.g. `GIT_SSH_COMMAND`). Names the allowlist
    /// denies (`NIXFLEET_*`, `NOTIFY_SOCKET`, ...) are dropped here too, with a warning.
    pub env: Vec<(OsString, OsString)>,
}

/// How a child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Normal exit. -1 if the status could not be collected (something else in the agent
    /// reaped the child, which should never happen).
    Code(i32),
    Signal(i32),
    /// Killed by the runner after `Cmd::timeout`.
    TimedOut {
        after: Duration,
    },
    /// Killed by the runner because the cancellation token fired (agent shutdown).
    Cancelled,
}

/// The result of [`Runner::run`].
#[derive(Clone, Debug)]
pub struct Outcome {
    pub exit: Exit,
    /// stdout+stderr interleaved, lossy UTF-8, at most ~`output_cap` bytes (head, a marker line
    /// saying how many bytes were dropped, tail).
    pub output: String,
    pub duration: Duration,
}

/// The child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("failed to start {program}: not found in PATH ({path})")]
    NotFound { program: String, path: String },
    #[error("failed to start {program}: {source}")]
    Io {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl Cmd {
    /// A command with no args, the given cwd, timeout and label.
    pub fn new(
        program: impl Into<OsString>,
        cwd: impl Into<PathBuf>,
        timeout: Duration,
        label: impl Into<String>,
    ) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            cwd: cwd.into(),
            timeout,
            label: label.into(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Values of `Cmd::env` are left out: they may hold credentials (an ssh command with a key).
impl fmt::Debug for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmd")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("cwd", &self.cwd)
            .field("timeout", &self.timeout)
            .field("label", &self.label)
            .field(
                "env_keys",
                &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    /// The exit code as a shell would show it: 124 for a timeout (like `timeout(1)`),
    /// 128+N for signal N, 130 for a cancellation.
    pub fn exit_code(&self) -> i32 {
        match self.exit {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
            Exit::TimedOut { .. } => 124,
            Exit::Cancelled => 130,
        }
    }
}

/// The environment is never printed, only how many variables it has.
impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("kill_grace", &self.kill_grace)
            .field("output_cap", &self.output_cap)
            .field("env_vars", &self.env.len())
            .finish()
    }
}

/// Why the wait for the child ended.
enum Stop {
    Exited(Result<io::Result<std::process::ExitStatus>, tokio::sync::oneshot::error::RecvError>),
    Deadline,
    Cancelled,
}

impl Runner {
    /// A runner whose children get the allowlisted part of the agent's own environment.
    pub fn new(kill_grace: Duration) -> Self {
        Self::from_parent_env(kill_grace, std::env::vars_os())
    }

    /// Like [`Runner::new`] with `parent` standing in for the agent's environment, so tests can
    /// check the allowlist without mutating the (process-wide) real one.
    pub fn from_parent_env(
        kill_grace: Duration,
        parent: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Self {
        Runner {
            kill_grace,
            output_cap: DEFAULT_OUTPUT_CAP,
            env: env::allowlisted(parent).into(),
            tap: None,
        }
    }

    /// A runner whose children's output is also offered, line by line, to `tap`.
    pub fn with_line_tap(mut self, tap: LineTap) -> Self {
        self.tap = Some(tap);
        self
    }

    pub fn with_output_cap(mut self, cap: usize) -> Self {
        self.output_cap = cap;
        self
    }

    pub fn kill_grace(&self) -> Duration {
        self.kill_grace
    }

    /// Runs `cmd` to completion, timeout or cancellation.
    ///
    /// Needs a tokio runtime with I/O and time enabled. The returned future is `Send`; dropping
    /// it SIGKILLs the child's process group.
    ///
    /// # Errors
    ///
    /// [`SpawnError`] when the child could not be started: program not found or not
    /// executable, missing working directory, or no pipe/thread available. Everything after a
    /// successful start, timeouts included, is an [`Outcome`].
    pub async fn run(&self, cmd: Cmd, cancel: &CancellationToken) -> Result<Outcome, SpawnError> {
        let started = Instant::now();
        if cancel.is_cancelled() {
            // Shutting down: starting a process only to kill it would just slow the exit.
            return Ok(Outcome {
                exit: Exit::Cancelled,
                output: String::new(),
                duration: started.elapsed(),
            });
        }
        let deadline = tokio::time::Instant::now().checked_add(cmd.timeout);
        let (child, mut pipe) = self.spawn(&cmd)?;
        let pid = child.id();
        let group = Arc::new(sys::Group::new(pid));
        let _kill_on_drop = KillOnDrop(Arc::clone(&group));
        let mut reaped = sys::spawn_reaper(child, &group).map_err(|source| SpawnError::Io {
            program: cmd.program.to_string_lossy().into_owned(),
            source,
        })?;
        tracing::debug!(label = %cmd.label, pid, program = ?cmd.program, "child started");

        let mut capture = Capture::new(self.output_cap, &cmd.label).with_tap(self.tap.clone());
        let expired = sleep_until(deadline);
        let cancelled = cancel.cancelled();
        tokio::pin!(expired, cancelled);
        let stop = loop {
            tokio::select! {
                // An exit that races the deadline counts as an exit.
                biased;
                status = &mut reaped => break Stop::Exited(status),
                () = &mut cancelled => break Stop::Cancelled,
                () = &mut expired => break Stop::Deadline,
                () = pipe.read_into(&mut capture), if !pipe.eof() => {}
            }
        };

        let exit = match stop {
            Stop::Exited(status) => exit_from(status, &cmd.label, pid),
            Stop::Deadline => {
                tracing::info!(
                    label = %cmd.label, pid, timeout = ?cmd.timeout,
                    "child timed out; terminating its process group"
                );
                self.terminate(&group, &mut reaped, &mut pipe, &mut capture, &cmd.label)
                    .await;
                Exit::TimedOut { after: cmd.timeout }
            }
            Stop::Cancelled => {
                tracing::info!(
                    label = %cmd.label, pid,
                    "agent shutting down; terminating the child's process group"
                );
                self.terminate(&group, &mut reaped, &mut pipe, &mut capture, &cmd.label)
                    .await;
                Exit::Cancelled
            }
        };

        let drained = tokio::time::timeout(PIPE_DRAIN_BOUND, async {
            while !pipe.eof() {
                pipe.read_into(&mut capture).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                label = %cmd.label, pid,
                "a process that left the child's process group still holds its output; \
                 stopped reading it"
            );
        }
        let duration = started.elapsed();
        let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        tracing::debug!(label = %cmd.label, pid, exit = ?exit, duration_ms, "child finished");
        Ok(Outcome {
            exit,
            output: capture.finish(),
            duration,
        })
    }

    /// Where `program` would be found on the children's PATH, if anywhere.
    pub fn find_program(&self, program: &str) -> Option<PathBuf> {
        resolve_program(
            OsStr::new(program),
            Path::new("/"),
            env::effective_path(&self.env, &[]),
        )
        .ok()
        .filter(|p| p.is_file())
    }

    /// The allowlisted environment children get (no secrets by construction), for handing
    /// to a process that does not inherit ours (a `systemd-run` transient unit).
    pub fn child_env(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> {
        self.env.iter().map(|(k, v)| (k.as_os_str(), v.as_os_str()))
    }

    /// Starts `cmd` in a new session, detached from the agent: no timeout, no capture (stdio
    /// is /dev/null), and it survives the agent being killed. Used for the switch wrapper on
    /// hosts without systemd, which enforces its own timeout and writes its own result. A
    /// thread reaps it if it ends while the agent lives. Returns its pid.
    pub fn spawn_detached(&self, cmd: &Cmd) -> Result<u32, SpawnError> {
        let mut command = self.command(cmd)?;
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        sys::detach(&mut command);
        let mut child = command
            .spawn()
            .map_err(|source| spawn_io_error(cmd, source))?;
        let pid = child.id();
        let _ = std::thread::Builder::new()
            .name("detached-reaper".into())
            .spawn(move || {
                let _ = child.wait();
            });
        Ok(pid)
    }

    /// The `Command` for `cmd`, as every child gets it: resolved program, explicit cwd (which
    /// must exist), cleared environment plus the allowlist and the caller's non-denied
    /// variables, stdin from /dev/null. Output and process group are the caller's business.
    fn command(&self, cmd: &Cmd) -> Result<std::process::Command, SpawnError> {
        let extra: Vec<(OsString, OsString)> = cmd
            .env
            .iter()
            .filter(|(key, _)| {
                let denied = env::is_denied(key);
                if denied {
                    tracing::warn!(
                        label = %cmd.label, key = ?key,
                        "not passing a denied variable to a child"
                    );
                }
                !denied
            })
            .cloned()
            .collect();
        let program = resolve_program(
            &cmd.program,
            &cmd.cwd,
            env::effective_path(&self.env, &extra),
        )?;
        // Checked here because a missing directory fails the spawn with the same ENOENT as a
        // missing program, which would send whoever reads the error after the wrong thing.
        if !cmd.cwd.is_dir() {
            return Err(spawn_io_error(
                cmd,
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("working directory {} does not exist", cmd.cwd.display()),
                ),
            ));
        }
        #[expect(
            clippy::disallowed_methods,
            reason = "this is exec::Runner, the one place allowed to create a Command"
        )]
        let mut command = std::process::Command::new(&program);
        command
            .args(&cmd.args)
            .current_dir(&cmd.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null());
        Ok(command)
    }

    /// SIGTERM to the group, wait `kill_grace` for the leader, SIGKILL to the group, wait for
    /// the reaper. Output keeps being captured meanwhile (the last lines say why it hung).
    async fn terminate(
        &self,
        group: &sys::Group,
        reaped: &mut sys::Reaped,
        pipe: &mut sys::OutputPipe,
        capture: &mut Capture,
        label: &str,
    ) {
        // Found while the leader lives and the tree is intact (see `escaped`); under the
        // reaper's lock, so the leader's pid cannot be reused during the scan.
        let escaped = group
            .while_unreaped(|pgid| escaped::Escaped::find(pgid, pgid))
            .unwrap_or_default();
        if !escaped.pids().is_empty() {
            tracing::info!(
                label, pgid = group.pgid(), pids = ?escaped.pids(),
                "descendants left the child's process group (setsid); stopping them too"
            );
        }
        group.signal(Signal::SIGTERM);
        escaped.signal(Signal::SIGTERM);
        if wait_reaped(reaped, pipe, capture, self.kill_grace).await {
            // What is left of the group gets SIGKILL from the reaper; these, from here.
            escaped.signal(Signal::SIGKILL);
            return;
        }
        tracing::info!(
            label, pgid = group.pgid(), grace = ?self.kill_grace,
            "child ignored SIGTERM; killing its process group"
        );
        group.signal(Signal::SIGKILL);
        escaped.signal(Signal::SIGKILL);
        if !wait_reaped(reaped, pipe, capture, KILL_REAP_BOUND).await {
            tracing::warn!(
                label,
                pgid = group.pgid(),
                "child still not gone {KILL_REAP_BOUND:?} after SIGKILL (uninterruptible \
                 sleep?); leaving it to a background thread"
            );
        }
    }

    /// Resolves the program, opens the pipe and starts the child. Synchronous on purpose: the
    /// `Command` holds the pipe's write ends and must be gone before the first read, or the
    /// pipe never reports end-of-file.
    fn spawn(&self, cmd: &Cmd) -> Result<(std::process::Child, sys::OutputPipe), SpawnError> {
        let io_err = |source| spawn_io_error(cmd, source);
        let mut command = self.command(cmd)?;
        let (reader, writer) = io::pipe().map_err(io_err)?;
        let second_writer = writer.try_clone().map_err(io_err)?;

        command.stdout(writer).stderr(second_writer);
        sys::configure(&mut command, &cmd.program);
        let spawned = command.spawn();
        // Closes the parent's copies of the write end (see above).
        drop(command);
        let child = spawned.map_err(io_err)?;
        match sys::OutputPipe::new(reader) {
            Ok(pipe) => Ok((child, pipe)),
            Err(source) => {
                // No way to read its output: stop the child rather than leave it running.
                let group = Arc::new(sys::Group::new(child.id()));
                group.signal(Signal::SIGKILL);
                let _ = sys::spawn_reaper(child, &group);
                Err(io_err(source))
            }
        }
    }
}

fn spawn_io_error(cmd: &Cmd, source: io::Error) -> SpawnError {
    SpawnError::Io {
        program: cmd.program.to_string_lossy().into_owned(),
        source,
    }
}

/// Finds what `exec` will run. A name without `/` is searched in `path` here rather than by
/// `exec`, so "not found" can say which PATH was searched and "not executable" which file.
/// Relative PATH entries are skipped: they would depend on the agent's own working directory.
fn resolve_program(program: &OsStr, cwd: &Path, path: &OsStr) -> Result<PathBuf, SpawnError> {
    let name = || program.to_string_lossy().into_owned();
    if program.is_empty() {
        return Err(SpawnError::Io {
            program: name(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty program name"),
        });
    }
    if program.as_encoded_bytes().contains(&b'/') {
        return Ok(cwd.join(program));
    }
    let mut not_executable = None;
    for dir in std::env::split_paths(path).filter(|d| d.is_absolute()) {
        let candidate = dir.join(program);
        match std::fs::metadata(&candidate) {
            Ok(meta) if sys::is_executable(&meta) => return Ok(candidate),
            Ok(meta) if meta.is_file() => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    if let Some(file) = not_executable {
        return Err(SpawnError::Io {
            program: name(),
            source: io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is not executable", file.display()),
            ),
        });
    }
    Err(SpawnError::NotFound {
        program: name(),
        path: path.to_string_lossy().into_owned(),
    })
}

/// Waits up to `bound` for the reaper to report, reading output meanwhile. True once reaped.
async fn wait_reaped(
    reaped: &mut sys::Reaped,
    pipe: &mut sys::OutputPipe,
    capture: &mut Capture,
    bound: Duration,
) -> bool {
    let expired = tokio::time::sleep(bound);
    tokio::pin!(expired);
    loop {
        tokio::select! {
            biased;
            _ = &mut *reaped => return true,
            () = &mut expired => return false,
            () = pipe.read_into(capture), if !pipe.eof() => {}
        }
    }
}

/// A `sleep_until` that never fires when the deadline is beyond what `Instant` can represent.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn exit_from(
    status: Result<io::Result<std::process::ExitStatus>, tokio::sync::oneshot::error::RecvError>,
    label: &str,
    pid: u32,
) -> Exit {
    match status {
        Ok(Ok(status)) => sys::exit_from_status(status),
        Ok(Err(err)) => {
            tracing::warn!(label, pid, %err, "could not collect the child's exit status");
            Exit::Code(-1)
        }
        Err(_) => {
            tracing::warn!(label, pid, "the reaper thread ended without a status");
            Exit::Code(-1)
        }
    }
}

/// SIGKILLs the group if `run` is dropped before the child is reaped (a caller's `select!` or
/// timeout gave up on it). A no-op once the reaper has run.
struct KillOnDrop(Arc<sys::Group>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.signal(Signal::SIGKILL);
    }
}
