//! What the main loop shows about itself and how it follows the world around it, kept out of
//! the loop proper: the status record for `nixfleet-agent status` and the metrics file (both
//! written only when their content changes), reboot-needed, the restart cause and the exit
//! record, and changes made by others to the agent's binary or service definition.
//!
//! The loop calls [`Agent::observe_tick`] once per iteration, and a few one-line hooks at
//! events (a report queued, a command finished, the loop exiting). Nothing here blocks: the
//! one child process (`systemctl show -P NeedDaemonReload`, only after a watched file changed
//! and only under systemd) runs on its own task.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::dashboard::{Link, Outcome, Report, ShortReason};
use crate::definition::Watch;
use crate::exec::{Cmd, Runner};
use crate::facts::reboot::{self, RebootNeeded};
use crate::metrics_file::{Metrics, MetricsFile};
use crate::restart_cause::{self, Start};
use crate::status::{Publisher, RunningRecord, StatusRecord};

/// Prefix of the exit detail for a change made outside the agent (see
/// [`restart_cause::reason_for`]).
const CHANGED_OUTSIDE: &str = "changed outside: ";

/// State for this module, one field of [`Agent`].
pub struct Observer {
    /// Instants are turned into unix seconds against one fixed pair, so a value computed on
    /// two ticks is the same and an idle tick changes nothing on disk.
    anchor: (Instant, u64),
    start: Start,
    publisher: Publisher,
    metrics_file: Option<MetricsFile>,
    reboot: Option<RebootNeeded>,
    watch: Watch,
    next_watch: Instant,
    /// A change made outside the agent: restart once idle.
    pending_restart: Option<String>,
    reload_check: Option<oneshot::Receiver<Option<bool>>>,
    waiting_for_reload_logged: bool,
    /// Why the loop is exiting (for the lifecycle record): the command that asked for it.
    exit_detail: Option<String>,
    last_outcome: Option<(Outcome, bool)>,
    commands: BTreeMap<(String, String), u64>,
    last_duration: Option<f64>,
    timeouts: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Observer {
    pub fn new(
        settings: &crate::config::Settings,
        state_dir: &std::path::Path,
        start: Start,
    ) -> Self {
        let binary = settings.agent_path.clone().or_else(|| {
            let system = settings.current_system.join("sw/bin/nixfleet-agent");
            system.exists().then_some(system)
        });
        Observer {
            anchor: (Instant::now(), unix_now()),
            start,
            publisher: Publisher::new(state_dir),
            metrics_file: settings.metrics_file.clone().map(MetricsFile::new),
            reboot: reboot::check(&settings.booted_system, &settings.current_system),
            watch: Watch::new(binary.as_deref(), &settings.restart_on_change),
            next_watch: Instant::now() + settings.interval,
            pending_restart: None,
            reload_check: None,
            waiting_for_reload_logged: false,
            exit_detail: None,
            last_outcome: None,
            commands: BTreeMap::new(),
            last_duration: None,
            timeouts: 0,
        }
    }

    fn unix(&self, at: Instant) -> u64 {
        let (i0, u0) = self.anchor;
        if at >= i0 {
            u0 + at.duration_since(i0).as_secs()
        } else {
            u0.saturating_sub(i0.duration_since(at).as_secs())
        }
    }

    /// The restart cause in words, for "Agent started".
    pub fn cause_text(&self) -> String {
        self.start.cause.text()
    }

    /// A report queued by the running command: remembers its outcome for the metrics.
    pub fn saw_report(&mut self, report: &Report) {
        if let Report::Status(status) = report {
            let timed_out = status
                .output
                .as_deref()
                .is_some_and(|o| o.contains("timed out after") || o.contains("TIMEOUT"));
            self.last_outcome = Some((status.status, timed_out));
        }
    }

    /// The running command ended (`exit`: the exit code it asked the agent for).
    pub fn command_finished(&mut self, name: &str, took: Duration, exit: Option<u8>) {
        let (outcome, timed_out) = self.last_outcome.take().unwrap_or((Outcome::Error, false));
        let result = match (outcome, timed_out) {
            (_, true) => "timeout",
            (Outcome::Ok, _) => "ok",
            (Outcome::Error, _) => "error",
        };
        // A closed set of label values: an unknown name is the dashboard's string, and every
        // distinct one would be a new time series.
        let first = name.split(' ').next().unwrap_or(name);
        let base = match crate::commands::Command::parse(first) {
            Some(command) => command.name(),
            None if first == "setup" => "setup",
            None => "unknown",
        }
        .to_string();
        *self.commands.entry((base, result.into())).or_default() += 1;
        if timed_out {
            self.timeouts += 1;
        }
        self.last_duration = Some(took.as_secs_f64());
        if let Some(code) = exit {
            self.exit_detail = Some(if code == crate::exit::RESTART_NEW_BINARY {
                format!("{name}: new binary or new settings")
            } else {
                name.to_string()
            });
        }
    }
}

impl Observer {
    /// Why the agent is about to exit, when it is the dashboard's doing (restart, reboot).
    pub(super) fn note_exit(&mut self, detail: &str) {
        self.exit_detail = Some(detail.to_string());
    }
}

/// Whether this process runs as a systemd service (the manager set `INVOCATION_ID`), and its
/// unit name from the cgroup path.
fn own_systemd_unit() -> Option<(String, bool)> {
    std::env::var_os("INVOCATION_ID")?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let line = cgroup
        .lines()
        .find(|l| l.starts_with("0::"))
        .or_else(|| cgroup.lines().find(|l| l.contains(":name=systemd:")))?;
    let path = line.splitn(3, ':').nth(2)?;
    let unit = path.rsplit('/').find(|p| p.ends_with(".service"))?;
    let user = path
        .split('/')
        .any(|p| p.starts_with("user@") && p.ends_with(".service"))
        && !unit.starts_with("user@");
    Some((unit.to_string(), user))
}

/// Asks systemd whether the unit's definition on disk is newer than the loaded one. `None`
/// when that cannot be told.
async fn need_daemon_reload(runner: Runner, unit: String, user: bool) -> Option<bool> {
    let mut args: Vec<&str> = Vec::new();
    if user {
        args.push("--user");
    }
    args.extend(["show", "-P", "NeedDaemonReload", "--", &unit]);
    let cmd = Cmd::new("systemctl", "/", Duration::from_secs(10), "systemctl show")
        .args(args.iter().copied());
    let outcome = runner.run(cmd, &CancellationToken::new()).await.ok()?;
    if !outcome.success() {
        return None;
    }
    match outcome.output.trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

impl<L: Link> Agent<L> {
    /// Once per loop iteration: follow changes made by others, then publish the status record
    /// and the metrics file (each written only if its content changed).
    pub(super) fn observe_tick(&mut self) {
        self.follow_outside_changes();
        let record = self.status_record();
        self.observer.publisher.publish(&record);
        if self.observer.metrics_file.is_some() {
            let metrics = self.metrics_snapshot();
            if let Some(file) = &mut self.observer.metrics_file {
                file.write(&metrics);
            }
        }
    }

    /// The next instant [`Agent::observe_tick`] has work to do on its own (the next look at
    /// the watched files): a loop that sleeps until its next deadline must wake by then.
    pub(super) fn observe_deadline(&self) -> Instant {
        let now = Instant::now();
        match (&self.observer.pending_restart, &self.observer.reload_check) {
            (None, _) => self.observer.next_watch,
            // `systemctl show` runs on its own task; look for its answer soon.
            (Some(_), Some(_)) => now + Duration::from_millis(100),
            // Waiting to be idle: a command's end wakes the loop anyway.
            (Some(_), None) if !self.idle() => now + self.settings.interval,
            (Some(_), None) => self.observer.next_watch.max(now),
        }
    }

    /// After a switch (new facts): is a reboot needed now?
    pub(super) fn refresh_reboot(&mut self) {
        self.observer.reboot =
            reboot::check(&self.settings.booted_system, &self.settings.current_system);
    }

    /// Extra parts of the `STATUS=` line.
    pub(super) fn observe_status_parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some(r) = &self.observer.reboot {
            parts.push(r.sentence());
        }
        if let Some(change) = &self.observer.pending_restart {
            parts.push(format!("restarting when idle: {change}"));
        }
        parts
    }

    /// The loop is about to return `code`: completes the lifecycle record.
    pub(super) fn record_exit(&mut self, code: u8) {
        let mut detail = self.observer.exit_detail.clone();
        if code == crate::exit::RESTART_NEW_BINARY
            && !detail
                .as_deref()
                .is_some_and(|d| d.starts_with(CHANGED_OUTSIDE))
        {
            detail = Some(match self.definition.changed() {
                Some(file) => format!("new settings: {} changed", file.display()),
                None => "new binary".into(),
            });
        }
        restart_cause::record_exit(
            &self.state_dir,
            code,
            restart_cause::reason_for(code, detail.as_deref()),
        );
    }

    fn idle(&self) -> bool {
        self.running.is_none()
            && self.queue.is_empty()
            && self.stopping.is_none()
            && self.held_reports.is_empty()
            && self.resume.is_none()
    }

    /// Changes made by others: a `stat` per watched file every interval; once one changed and
    /// the agent is idle (never mid-command), exit 10 so the supervisor starts the new
    /// binary with the new definition. Under systemd, only after `daemon-reload` has loaded
    /// it: exiting earlier would restart the old definition.
    fn follow_outside_changes(&mut self) {
        let now = Instant::now();
        if self.observer.pending_restart.is_none() && now >= self.observer.next_watch {
            self.observer.next_watch = now + self.settings.interval;
            if let Some(change) = self.observer.watch.changed() {
                tracing::info!(
                    "{change} (not by a command of this agent); restarting into it once idle"
                );
                self.observer.pending_restart = Some(change);
            }
        }
        let Some(change) = self.observer.pending_restart.clone() else {
            return;
        };
        if !self.idle() {
            return;
        }
        let unit = own_systemd_unit();
        if let Some((unit, user)) = unit {
            if let Some(rx) = &mut self.observer.reload_check {
                match rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => return,
                    Ok(Some(true)) => {
                        self.observer.reload_check = None;
                        if !self.observer.waiting_for_reload_logged {
                            self.observer.waiting_for_reload_logged = true;
                            tracing::info!(
                                "{unit} changed on disk but systemd has not loaded it yet; \
                                 waiting for `systemctl daemon-reload` before restarting"
                            );
                        }
                        self.observer.next_watch = now + self.settings.interval;
                        return;
                    }
                    // Loaded (or cannot tell): go.
                    Ok(_) | Err(oneshot::error::TryRecvError::Closed) => {
                        self.observer.reload_check = None;
                    }
                }
            } else {
                if now < self.observer.next_watch && self.observer.waiting_for_reload_logged {
                    return;
                }
                let (tx, rx) = oneshot::channel();
                let runner = self.runner.clone();
                tokio::spawn(async move {
                    let _ = tx.send(need_daemon_reload(runner, unit, user).await);
                });
                self.observer.reload_check = Some(rx);
                return;
            }
        }
        tracing::info!("{change}; exiting with code 10 so the supervisor starts the new one");
        self.observer.exit_detail = Some(format!("{CHANGED_OUTSIDE}{change}"));
        self.observer.pending_restart = None;
        self.begin_stop(crate::exit::RESTART_NEW_BINARY, Duration::ZERO);
    }

    fn status_record(&self) -> StatusRecord {
        let o = &self.observer;
        let mut r = StatusRecord::new();
        r.pid = std::process::id();
        r.agent_version = self.settings.agent_version.clone();
        r.started_unix = o.start.started_unix;
        r.restart_cause = o.start.cause.text();
        r.state = match (&self.stopping, &self.running) {
            (Some(s), _) => format!("stopping (exit code {})", s.code),
            (None, Some(run)) => format!("running {}", run.name),
            (None, None) => "idle".into(),
        };
        r.last_heartbeat_unix = self.link.last_ok.map(|t| o.unix(t));
        r.outage_since_unix = self.link.down_since.map(|t| o.unix(t));
        r.outage_reason = self
            .link
            .last_error
            .as_ref()
            .filter(|_| self.link.down_since.is_some())
            .map(|e| ShortReason(e).to_string());
        r.next_retry_unix = self.link.retry_at.map(|t| o.unix(t));
        r.running = self.running.as_ref().map(|run| RunningRecord {
            command: run.name.clone(),
            step: run.step.clone(),
            started_unix: o.unix(run.started),
            step_started_unix: o.unix(run.step_started),
            step_timeout_secs: run.step_timeout.map(|t| t.as_secs()),
            detached: run.detached.is_some(),
        });
        r.queued = self.queued_names();
        r.outbox = self.outbox.len();
        r.reboot_needed = o.reboot.as_ref().map(RebootNeeded::sentence);
        r.pending_restart = o.pending_restart.clone();
        r
    }

    fn metrics_snapshot(&self) -> Metrics {
        let o = &self.observer;
        let outage_start = self.link.down_since.map(|t| o.unix(t));
        Metrics {
            version: self.settings.agent_version.clone(),
            hostname: self.settings.host.hostname.clone(),
            start_time_unix: o.start.started_unix,
            last_heartbeat_unix: self.link.last_ok.map(|t| o.unix(t)),
            outage_start_unix: outage_start,
            // Fixed per failure (retry_at changes on each): no rewrite on idle ticks.
            outage_seconds: match (self.link.down_since, self.link.retry_at) {
                (Some(since), Some(retry)) => retry.saturating_duration_since(since).as_secs(),
                (Some(since), None) => since.elapsed().as_secs(),
                _ => 0,
            },
            commands: o.commands.clone(),
            last_command_duration_secs: o.last_duration,
            timeouts: o.timeouts,
            restarts: o.start.restarts.clone(),
            reboot_needed: o.reboot.is_some(),
            outbox: self.outbox.len(),
        }
    }
}
