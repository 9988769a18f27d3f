//! The one constructor for every child process the agent starts (STUB: being written).
//!
//! API contract (fixed; the implementation fills it in):
//! - [`Runner::new`] computes the allowlisted child environment once.
//! - [`Runner::run`] spawns a [`Cmd`] in its own process group, stdin /dev/null, explicit cwd,
//!   cleared env + allowlist + `Cmd::env`, stdout+stderr captured together with a memory cap
//!   (head + tail), enforces `Cmd::timeout` (SIGTERM to the group, grace, SIGKILL to the group),
//!   honours the cancellation token the same way, and never blocks on a grandchild that keeps
//!   the pipe open.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How much captured output to keep in memory (head + tail) per child.
pub const DEFAULT_OUTPUT_CAP: usize = 256 * 1024;

/// Builds and runs child processes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Runner {
    kill_grace: Duration,
    output_cap: usize,
}

/// One child process to run.
#[derive(Clone, Debug)]
pub struct Cmd {
    /// Program name (looked up in PATH) or path.
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Working directory; always explicit.
    pub cwd: PathBuf,
    /// Deadline for the whole process tree.
    pub timeout: Duration,
    /// Human label used in logs and timeout messages, e.g. "git pull", "Switch", "T03-hang".
    pub label: String,
    /// Extra environment on top of the allowlist (e.g. GIT_SSH_COMMAND).
    pub env: Vec<(OsString, OsString)>,
}

/// How a child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Killed by the runner after `Cmd::timeout`.
    TimedOut { after: Duration },
    /// Killed by the runner because the cancellation token fired (agent shutdown).
    Cancelled,
}

/// The result of [`Runner::run`].
#[derive(Clone, Debug)]
pub struct Outcome {
    pub exit: Exit,
    /// stdout+stderr interleaved, lossy UTF-8, at most ~output_cap bytes (head, a marker line
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

impl Runner {
    pub fn new(kill_grace: Duration) -> Self {
        Runner {
            kill_grace,
            output_cap: DEFAULT_OUTPUT_CAP,
        }
    }

    pub fn with_output_cap(mut self, cap: usize) -> Self {
        self.output_cap = cap;
        self
    }

    pub fn kill_grace(&self) -> Duration {
        self.kill_grace
    }

    /// Runs `cmd` to completion, timeout or cancellation.
    pub async fn run(&self, cmd: Cmd, cancel: &CancellationToken) -> Result<Outcome, SpawnError> {
        let _ = (cmd, cancel, self.output_cap);
        Err(SpawnError::NotFound {
            program: "stub".into(),
            path: String::new(),
        })
    }
}
