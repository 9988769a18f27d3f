//! The executor: what each dashboard command does, step by step, and what it reports.
//!
//! A command runs as one tokio task, owned by nobody but itself: it never touches agent state.
//! It talks to the main loop only through [`ExecEvent`]s (the step it is in, the reports to
//! deliver, and that it finished). Every child process goes through [`crate::exec::Runner`]
//! with the timeout of its class. Strings from the dashboard (the command name) are matched
//! against a fixed list and never reach a shell or argv.
//!
//! Contract for behaviour and report wording: `docs/protocol-v1.md` §9.3 and §9.6.

mod extra;
mod git;
mod switch;
mod test;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{RepoMode, Settings, human_duration};
use crate::dashboard::{Outcome as ReportOutcome, Report, StatusReport, TestProgress};
use crate::exec::{Cmd, Exit, Outcome, Runner};
use crate::facts::read_git_head;

/// The dashboard's limit on `output`, in characters (contract §3.3).
pub const MAX_OUTPUT_CHARS: usize = 10_000;

/// What a running command tells the main loop.
#[derive(Debug)]
pub enum ExecEvent {
    /// A new step started (shown in STATUS and the journal).
    Step {
        label: String,
        timeout: Option<Duration>,
    },
    /// A report to deliver, in order.
    Report(Report),
    /// The switch runs (or is about to run) outside the agent (see `detach`): record it in
    /// the journal, then answer on the channel so the command knows it is on disk.
    Detached(crate::detach::Detached, tokio::sync::oneshot::Sender<()>),
    /// OS facts changed (after a switch): new values for the heartbeat.
    Facts(crate::facts::OsFacts),
    /// The command is over. `exit` asks the agent to exit with that code once its reports are
    /// delivered (`restart`, a switch that replaced the agent binary). `left_running` means the
    /// agent stopped waiting for a detached switch that goes on: keep its journal entry so the
    /// next instance reports it.
    Finished {
        exit: Option<u8>,
        left_running: bool,
    },
}

/// The commands this agent knows. Anything else is reported as unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Pull,
    PullReset,
    Switch,
    PullSwitch,
    Test,
    Update,
    Restart,
    Rollback,
    /// Cancels the running command (handled by the main loop).
    Stop,
    /// Reboots the host once the result is delivered (handled by the main loop).
    Reboot,
    CheckVersion,
    RefreshGit,
    RefreshLock,
    RefreshSystem,
    RefreshAll,
    /// Internal: clone the isolated repository at start. Never comes from the dashboard.
    Setup,
}

impl Command {
    pub fn parse(name: &str) -> Option<Command> {
        Some(match name.trim() {
            "pull" => Command::Pull,
            "pull-reset" => Command::PullReset,
            "switch" => Command::Switch,
            "pull-switch" => Command::PullSwitch,
            "test" => Command::Test,
            "update" => Command::Update,
            "restart" => Command::Restart,
            "rollback" => Command::Rollback,
            "stop" => Command::Stop,
            "reboot" => Command::Reboot,
            "check-version" => Command::CheckVersion,
            "refresh-git" => Command::RefreshGit,
            "refresh-lock" => Command::RefreshLock,
            "refresh-system" => Command::RefreshSystem,
            "refresh-all" => Command::RefreshAll,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Pull => "pull",
            Command::PullReset => "pull-reset",
            Command::Switch => "switch",
            Command::PullSwitch => "pull-switch",
            Command::Test => "test",
            Command::Update => "update",
            Command::Restart => "restart",
            Command::Rollback => "rollback",
            Command::Stop => "stop",
            Command::Reboot => "reboot",
            Command::CheckVersion => "check-version",
            Command::RefreshGit => "refresh-git",
            Command::RefreshLock => "refresh-lock",
            Command::RefreshSystem => "refresh-system",
            Command::RefreshAll => "refresh-all",
            Command::Setup => "setup",
        }
    }
}

/// A dashboard string made safe for logs and reports: printable ASCII, at most 64 chars.
pub fn sanitize_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect()
}

/// What the executor is asked to do.
#[derive(Clone, Debug)]
pub enum Job {
    /// A command from the dashboard (or `Err(name)` for an unknown one).
    Run(Result<Command, String>),
    /// Report the detached switch a previous agent instance left running.
    Resume(crate::detach::Detached),
}

/// Everything a command needs; cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    /// Where detached switches leave their results.
    pub state_dir: PathBuf,
    pub runner: Runner,
    pub events: mpsc::UnboundedSender<ExecEvent>,
    /// The agent is shutting down: end what runs in the agent (a detached switch goes on).
    pub cancel: CancellationToken,
    /// The dashboard's `stop`: end the command, a detached switch included.
    pub stop: CancellationToken,
    /// The exit code of the last step (124 timed out, 130 stopped or cancelled, 128+n killed
    /// by signal n, 127 not started), for the result's `exit_code`.
    pub last_exit: Arc<std::sync::atomic::AtomicI32>,
    /// The service definition as it was at startup (compared after a successful switch).
    pub definition: Arc<crate::definition::Definition>,
}

/// Result of one step: the runner's outcome, or a spawn failure turned into text.
pub(crate) struct StepResult {
    pub ok: bool,
    pub timed_out: bool,
    pub cancelled: bool,
    /// For reports: "git pull timed out after 120s" + output, or just the output.
    pub text: String,
    pub output: String,
}

impl Context {
    pub(crate) fn repo_dir(&self) -> Option<&Path> {
        self.settings.repo.dir()
    }

    pub(crate) fn host(&self) -> &str {
        &self.settings.host.hostname
    }

    /// The config repo's HEAD, read without a child process.
    pub(crate) fn generation(&self) -> Option<String> {
        self.repo_dir().and_then(read_git_head)
    }

    /// Has the main loop record a detached switch in the journal, and waits until it did.
    pub(crate) async fn record_detached(&self, detached: crate::detach::Detached) {
        let (done, recorded) = tokio::sync::oneshot::channel();
        if self
            .events
            .send(ExecEvent::Detached(detached, done))
            .is_ok()
        {
            let _ = recorded.await;
        }
    }

    pub(crate) fn step(&self, label: &str, timeout: Option<Duration>) {
        let _ = self.events.send(ExecEvent::Step {
            label: label.to_string(),
            timeout,
        });
    }

    pub(crate) fn status(&self, outcome: ReportOutcome, output: &str, test_status: Option<String>) {
        let _ = self
            .events
            .send(ExecEvent::Report(Report::Status(StatusReport {
                status: outcome,
                current_generation: self.generation(),
                output: Some(limit_output(output)),
                test_status,
                command: None,
                dropped_lines: 0,
                exit_code: Some(self.last_exit.load(std::sync::atomic::Ordering::Relaxed)),
            })));
    }

    pub(crate) fn ok(&self, output: &str) {
        self.status(ReportOutcome::Ok, output, None);
    }

    pub(crate) fn error(&self, output: &str) {
        self.status(ReportOutcome::Error, output, None);
    }

    pub(crate) fn progress(&self, progress: TestProgress) {
        let _ = self
            .events
            .send(ExecEvent::Report(Report::TestProgress(progress)));
    }

    /// Runs one child as a named step and folds every way it can end into a [`StepResult`].
    pub(crate) async fn run(&self, cmd: Cmd) -> StepResult {
        self.step(&cmd.label, Some(cmd.timeout));
        let label = cmd.label.clone();
        let program = cmd.program.to_string_lossy().into_owned();
        // Either shutdown or the dashboard's stop ends the step (with SIGTERM, grace, SIGKILL).
        let either = self.cancel.child_token();
        let stop = self.stop.clone();
        let stopper = either.clone();
        let watcher = tokio::spawn(async move {
            stop.cancelled().await;
            stopper.cancel();
        });
        let ran = self.runner.run(cmd, &either).await;
        watcher.abort();
        let code = match &ran {
            Ok(outcome) => match outcome.exit {
                Exit::Code(code) => code,
                Exit::Signal(signal) => 128 + signal,
                Exit::TimedOut { .. } => 124,
                Exit::Cancelled => 130,
            },
            Err(_) => 127,
        };
        self.last_exit
            .store(code, std::sync::atomic::Ordering::Relaxed);
        match ran {
            Ok(outcome) if self.stop.is_cancelled() && outcome.exit == Exit::Cancelled => {
                StepResult {
                    ok: false,
                    timed_out: false,
                    cancelled: true,
                    text: join_lines(
                        &format!("{label} stopped by the dashboard's stop command"),
                        outcome.output.trim_end(),
                    ),
                    output: outcome.output.trim_end().to_string(),
                }
            }
            Ok(outcome) => step_result(&label, &outcome),
            Err(e) => {
                tracing::warn!(step = %label, program = %program, error = %e, "step failed to start");
                StepResult {
                    ok: false,
                    timed_out: false,
                    cancelled: false,
                    text: e.to_string(),
                    output: String::new(),
                }
            }
        }
    }

    /// A git command in the repo with the agent's git environment.
    pub(crate) fn git(&self, dir: &Path, timeout: Duration, label: &str) -> Cmd {
        git::command(&self.settings, dir, timeout, label)
    }
}

fn step_result(label: &str, outcome: &Outcome) -> StepResult {
    let output = outcome.output.trim_end().to_string();
    let (text, timed_out, cancelled) = match &outcome.exit {
        Exit::TimedOut { after } => (
            join_lines(
                &format!("{label} timed out after {}", human_duration(*after)),
                &output,
            ),
            true,
            false,
        ),
        Exit::Cancelled => (
            join_lines(
                &format!("{label} interrupted: the agent is shutting down"),
                &output,
            ),
            false,
            true,
        ),
        Exit::Signal(sig) => (
            join_lines(&format!("{label} was killed by signal {sig}"), &output),
            false,
            false,
        ),
        // A failure that printed nothing still says something ("Switch failed: " would not).
        Exit::Code(code) if *code != 0 && output.is_empty() => (
            format!("{label} exited with code {code} (no output)"),
            false,
            false,
        ),
        Exit::Code(_) => (output.clone(), false, false),
    };
    tracing::info!(
        NIXFLEET_STEP = label,
        NIXFLEET_EXIT_CODE = outcome.exit_code(),
        NIXFLEET_DURATION_MS = outcome.duration.as_millis() as u64,
        "step {label} finished with exit code {}",
        outcome.exit_code()
    );
    StepResult {
        ok: outcome.success(),
        timed_out,
        cancelled,
        text,
        output,
    }
}

fn join_lines(first: &str, rest: &str) -> String {
    if rest.is_empty() {
        first.to_string()
    } else {
        format!("{first}\n{rest}")
    }
}

/// Makes `output` fit the dashboard: only `\n` and printable ASCII (what it keeps anyway; tabs
/// become spaces), and at most [`MAX_OUTPUT_CHARS`]. A longer output keeps its **first line**
/// (what the report is about, e.g. `Switch failed: ...`; the dashboard also derives an error's
/// comment from it) and its **end**, where nixos-rebuild prints its error.
pub fn limit_output(output: &str) -> String {
    let cleaned: String = output
        .chars()
        .filter_map(|c| match c {
            '\n' | ' '..='~' => Some(c),
            '\t' => Some(' '),
            _ => None,
        })
        .collect();
    if cleaned.len() <= MAX_OUTPUT_CHARS {
        return cleaned;
    }
    const MARKER: &str = "\n[... output truncated ...]\n";
    /// The first line is kept up to this many characters.
    const MAX_HEAD: usize = 200;
    // All ASCII now, so byte offsets are character boundaries.
    let head_len = cleaned.find('\n').unwrap_or(cleaned.len()).min(MAX_HEAD);
    let keep = MAX_OUTPUT_CHARS - head_len - MARKER.len();
    format!(
        "{}{MARKER}{}",
        &cleaned[..head_len],
        &cleaned[cleaned.len() - keep..]
    )
}

/// Runs one command to the end and tells the main loop it finished. Never panics on bad input;
/// a missing repo or tool becomes an error report.
pub async fn execute(ctx: Context, job: Job) {
    let mut exit = None;
    let mut os_changed = false;
    let mut left_running = false;
    let command = match job {
        Job::Run(command) => command,
        Job::Resume(detached) => {
            let result = switch::resume(&ctx, detached).await;
            finish(&ctx, result.ok, result.exit, result.left_running).await;
            return;
        }
    };
    match command {
        Err(unknown) => {
            ctx.error(&format!("Unknown command: {}", sanitize_name(&unknown)));
        }
        Ok(Command::Restart) => {
            ctx.ok("Agent restarting...");
            exit = Some(crate::exit::OK);
        }
        Ok(Command::Setup) => git::setup(&ctx).await,
        Ok(Command::Pull) => {
            git::pull(&ctx, "Pull").await;
        }
        Ok(Command::PullReset) => git::pull_reset(&ctx).await,
        Ok(Command::Switch) => {
            let result = switch::switch(&ctx).await;
            (os_changed, exit, left_running) = (result.ok, result.exit, result.left_running);
        }
        Ok(Command::PullSwitch) => {
            if git::pull(&ctx, "Pull").await {
                let result = switch::switch(&ctx).await;
                (os_changed, exit, left_running) = (result.ok, result.exit, result.left_running);
            }
        }
        Ok(Command::Test) => test::run_tests(&ctx).await,
        Ok(Command::Update) => {
            let result = switch::update(&ctx).await;
            (os_changed, exit, left_running) = (result.ok, result.exit, result.left_running);
        }
        Ok(Command::Rollback) => os_changed = extra::rollback(&ctx).await,
        // The main loop acts on these itself when its link can receive them at any time; a
        // queued one (v1) has nothing left to act on.
        Ok(Command::Stop) => ctx.error("Stop: no command running"),
        Ok(Command::Reboot) => {
            ctx.error("Reboot refused: this dashboard cannot confirm it received the result")
        }
        Ok(Command::CheckVersion) => extra::check_version(&ctx).await,
        Ok(Command::RefreshGit) => ctx.ok("git status check is dashboard-side"),
        Ok(Command::RefreshLock) => extra::refresh_lock(&ctx, "Refresh-lock").await,
        Ok(Command::RefreshAll) => extra::refresh_lock(&ctx, "Refresh-all").await,
        Ok(Command::RefreshSystem) => extra::refresh_system(&ctx).await,
    }
    finish(&ctx, os_changed, exit, left_running).await;
}

async fn finish(ctx: &Context, os_changed: bool, exit: Option<u8>, left_running: bool) {
    if os_changed {
        let facts = crate::facts::OsFacts::detect(&ctx.runner, &ctx.cancel).await;
        let _ = ctx.events.send(ExecEvent::Facts(facts));
    }
    let _ = ctx.events.send(ExecEvent::Finished { exit, left_running });
}

/// Where the repository must be for a command, or an error report saying how to configure it.
pub(crate) fn require_repo(ctx: &Context, what: &str) -> Option<PathBuf> {
    match &ctx.settings.repo {
        RepoMode::None => {
            ctx.error(&format!(
                "{what} failed: no config repository configured (set NIXFLEET_REPO_URL and \
                 NIXFLEET_REPO_DIR, or NIXFLEET_NIXCFG)"
            ));
            None
        }
        mode => {
            let dir = mode.dir().expect("not None").to_path_buf();
            if dir.join(".git").exists() {
                let allow = ctx.settings.allow_foreign_checkout;
                if let Err(why) = crate::trust::check_checkout_owner(&dir, allow) {
                    ctx.error(&format!("{what} failed: {why}"));
                    return None;
                }
                Some(dir)
            } else {
                ctx.error(&format!(
                    "{what} failed: {} is not a git checkout",
                    dir.display()
                ));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_the_end_and_only_ascii() {
        let long = format!(
            "Switch failed: building\n{}\nerror: the real failure",
            "x".repeat(20_000)
        );
        let limited = limit_output(&long);
        assert_eq!(limited.chars().count(), MAX_OUTPUT_CHARS);
        assert!(limited.ends_with("error: the real failure"));
        assert!(
            limited.starts_with("Switch failed: building\n[... output truncated ...]\nxxx"),
            "{}",
            &limited[..80]
        );
        // A first line that is itself huge is cut too.
        let limited = limit_output(&"y".repeat(30_000));
        assert_eq!(limited.len(), MAX_OUTPUT_CHARS);
        assert!(limited.starts_with(&format!("{}\n[... output", "y".repeat(200))));
        assert_eq!(limit_output("ok \u{2705}\tT01\r\n"), "ok  T01\n");
    }

    #[test]
    fn command_names_are_a_closed_set() {
        assert_eq!(Command::parse("pull-switch"), Some(Command::PullSwitch));
        assert_eq!(Command::parse("setup"), None);
        assert_eq!(Command::parse("rm -rf /"), None);
        assert_eq!(sanitize_name("a\u{1b}[31mb\n"), "a[31mb");
    }
}
