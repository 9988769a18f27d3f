//! The main loop: the single owner of agent state, and protocol-neutral.
//!
//! One `select!` over a closed set of inputs: the shutdown signal, the one message in flight to
//! the dashboard, events from the link (connected, command, disconnected), events and output
//! lines from the running command, and the next deadline. There is no fixed tick: the loop
//! sleeps until the earliest of the next heartbeat or retry, the next watchdog ping (half of
//! `WATCHDOG_USEC`), the next progress beat the stall monitor needs, and the stop deadlines.
//! Each iteration beats [`Progress`] and may ping the systemd watchdog, so a wedged loop stops
//! both and the supervisor (or the stall monitor) restarts the agent. Messages are never
//! awaited inline: the loop keeps running while a heartbeat waits 30 s for a hanging
//! dashboard, and while a command runs for 10 minutes.
//!
//! Ordering: reports leave in the order commands produced them (the outbox), and always before
//! the next heartbeat, because the v1 dashboard closes the newest open log row with whatever
//! `/status` comes next (contract §3.3). What differs between protocols comes from
//! [`LinkTraits`]: with [`Correlation::ByPosition`] (v1) commands queue and are acknowledged on
//! their row; with [`Correlation::ByName`] (v2) a busy agent refuses them and each command gets
//! exactly one final status naming it.

mod alarm;
pub mod backoff;
mod observe;
pub mod outbox;

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::commands::{self, Command, Context, ExecEvent, Job, sanitize_name};
use crate::config::{Secret, Settings, TokenOrigin, human_duration};
use crate::dashboard::{
    Check, Correlation, DashboardError, Heartbeat, HostChecks, Link, LinkEvent, LinkTraits,
    Outcome, Outgoing, OutputLine, Reply, Report, ShortReason, StatusReport,
};
use crate::exec::{LineTap, Runner, TaggedLine};
use crate::facts::{MetricsSampler, OsFacts, read_git_head};
use crate::store::{Journal, JournalEntry, TokenCache};
use crate::supervisor::notify::Notifier;
use crate::supervisor::progress::Progress;
use outbox::{Outbox, describe};

/// How long reports may take to leave after the agent decided to exit.
const FLUSH_BUDGET: Duration = Duration::from_secs(5);
/// How much longer a request in flight at the end of the flush budget may take.
/// Worst case on SIGTERM: shutdown grace 20 s + kill grace 10 s + flush 5 s + this 5 s = 40 s,
/// inside the units' `TimeoutStopSec=45` and the plists' `ExitTimeOut=45`.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(5);
/// Output lines waiting to be streamed; a flood beyond this is counted, not kept.
const OUTPUT_BACKLOG: usize = 256;

/// Where the token in use came from; named when the dashboard refuses it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum TokenSource {
    Configured(TokenOrigin),
    Cache(PathBuf),
}

impl std::fmt::Display for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Configured(origin) => write!(f, "{origin}"),
            TokenSource::Cache(path) => write!(f, "the token cache {}", path.display()),
        }
    }
}

/// The token in use, the configured one to fall back to, and the cache to persist into.
pub struct Credentials {
    current: Secret,
    source: TokenSource,
    configured: Option<(Secret, TokenOrigin)>,
    cache: TokenCache,
    fell_back: bool,
}

impl Credentials {
    /// The token in use.
    pub fn token(&self) -> &Secret {
        &self.current
    }

    /// The cached per-host token wins over the configured one (v1 semantics); `None` when
    /// there is neither.
    pub fn new(
        configured: Option<(Secret, TokenOrigin)>,
        cache: TokenCache,
        cached: Option<Secret>,
    ) -> Option<Credentials> {
        let (current, source) = match (&cached, &configured) {
            (Some(token), _) => (
                token.clone(),
                TokenSource::Cache(cache.path().to_path_buf()),
            ),
            (None, Some((token, origin))) => {
                (token.clone(), TokenSource::Configured(origin.clone()))
            }
            (None, None) => return None,
        };
        Some(Credentials {
            current,
            source,
            configured,
            cache,
            fell_back: false,
        })
    }
}

/// Everything the agent needs at start, gathered by `cli`.
pub struct Startup {
    pub settings: Arc<Settings>,
    pub state_dir: PathBuf,
    pub runner: Runner,
    pub credentials: Credentials,
    pub outbox: Outbox,
    pub journal: Journal,
    /// What a previous instance left unfinished (from the journal).
    pub left: crate::store::Left,
    pub notifier: Notifier,
    pub progress: Arc<Progress>,
    /// The service definition as it was at startup.
    pub definition: Arc<crate::definition::Definition>,
    /// Why this start happened (`restart_cause::on_start`).
    pub start: crate::restart_cause::Start,
}

struct Running {
    name: String,
    started: Instant,
    step: String,
    step_started: Instant,
    step_timeout: Option<Duration>,
    cancel: CancellationToken,
    /// The dashboard's `stop` for this command.
    stop: CancellationToken,
    /// Its switch runs outside the agent; stopping need not wait for it.
    detached: Option<crate::detach::Detached>,
    /// Reports are tagged with this journal id once they may be the command's last word
    /// (after detaching, or when resuming), so a restart never reports twice.
    journal_id: u64,
    /// The dashboard's name for it, echoed in its result ([`Correlation::ByName`]); `None` for
    /// the agent's own setup.
    command: Option<String>,
    /// [`Correlation::ByName`]: the latest status, sent as the final one when the command
    /// finishes (an earlier one is shown as output).
    final_status: Option<StatusReport>,
    /// Counts the output lines the stream could not take.
    tap: Option<LineTap>,
    /// A `stop` from the dashboard cancelled it.
    stopped: bool,
}

/// What we know about the link to the dashboard.
#[derive(Default)]
struct LinkHealth {
    /// Since the link's last `Connected` (links with a session only).
    connected_since: Option<Instant>,
    failures: u32,
    down_since: Option<Instant>,
    last_error: Option<DashboardError>,
    last_ok: Option<Instant>,
    /// No request before this instant (backoff).
    retry_at: Option<Instant>,
    /// When the last failure was seen (so STATUS can say "retrying in 20s" without a
    /// counter that changes every second).
    failed_at: Option<Instant>,
}

/// The front report keeps being refused for its content (see
/// [`DashboardError::refuses_content`]).
struct Refusal {
    /// The outbox entry refused.
    id: u64,
    /// Refusals that each followed a heartbeat the dashboard answered.
    count: u32,
    /// A heartbeat got through since the last refusal: the dashboard is up and refuses only
    /// this report. A failed heartbeat starts the count again.
    answered_since: bool,
}

/// Refusals of one report, each after a heartbeat got through, before it is replaced by a short
/// stand-in. A 422 needs only one.
const REFUSALS_BEFORE_WITHHOLDING: u32 = 3;

enum Delivery {
    Heartbeat(Result<Reply, DashboardError>),
    Report {
        id: u64,
        result: Result<Reply, DashboardError>,
    },
    /// An output line or a refusal: nothing to keep if it failed.
    Ephemeral(Result<Reply, DashboardError>),
}

type InFlight = Pin<Box<dyn Future<Output = Delivery> + Send>>;

struct Stopping {
    code: u8,
    /// Cancel a still-running command at this instant.
    cancel_at: Instant,
    /// Stop flushing reports at this instant (set once no command runs).
    flush_until: Option<Instant>,
}

/// What the dashboard's link gives the loop besides replies.
pub struct LinkParts<L> {
    pub link: L,
    /// Pushed events; `None` for a link that has none (v1): it is always "maybe up" and every
    /// message is a request.
    pub events: Option<mpsc::Receiver<LinkEvent>>,
}

/// The agent: owns all state; [`Agent::run`] is the main loop.
pub struct Agent<L: Link> {
    settings: Arc<Settings>,
    state_dir: PathBuf,
    link_handle: L,
    traits: LinkTraits,
    link_events: Option<mpsc::Receiver<LinkEvent>>,
    /// A link with events is usable only between `Connected` and `Disconnected`.
    session_up: bool,
    output_tx: mpsc::Sender<TaggedLine>,
    output_rx: mpsc::Receiver<TaggedLine>,
    /// Refusals of commands that came while another ran ([`Correlation::ByName`]).
    rejections: VecDeque<(String, String)>,
    /// Reboot the host once the reports are out (the dashboard's `reboot`).
    reboot_after_stop: bool,
    /// When the loop last beat; it wakes at least every [`Agent::beat_period`].
    last_beat: Instant,
    /// What the loop sleeps on between events (one wake-up per deadline).
    alarm: alarm::Alarm,
    runner: Runner,
    creds: Credentials,
    os: OsFacts,
    generation: Option<String>,
    metrics: MetricsSampler,
    outbox: Outbox,
    journal: Journal,
    queue: VecDeque<Job>,
    running: Option<Running>,
    link: LinkHealth,
    /// SHA-256 of the repository's `flake.lock`, refreshed when a command finishes.
    lock_hash: Option<String>,
    /// The Lock, System and Tests compartments, as the results of commands leave them.
    checks: HostChecks,
    next_heartbeat: Instant,
    in_flight: Option<InFlight>,
    events_tx: mpsc::UnboundedSender<ExecEvent>,
    events_rx: mpsc::UnboundedReceiver<ExecEvent>,
    notifier: Notifier,
    progress: Arc<Progress>,
    logged_422: HashSet<String>,
    /// Said once the link is back, at a random moment within a few intervals (so a fleet
    /// reconnecting together does not send all its notes at once), and (v1) only when idle.
    outage_note: Option<(String, Instant)>,
    stopping: Option<Stopping>,
    /// The journal entry a `Job::Resume` continues.
    resume: Option<JournalEntry>,
    /// The last request was a report that failed: the next attempt may be a heartbeat, so a
    /// dashboard that refuses reports (rate limit on /status) still sees the host online.
    report_failed_last: bool,
    /// "Not run" notices and "Agent started", held back while a resumed switch runs: v1 closes
    /// the command's log row with the first status after delivery, which must be the switch's
    /// own final report.
    held_reports: Vec<Report>,
    refusal: Option<Refusal>,
    definition: Arc<crate::definition::Definition>,
    /// Status record, metrics file, reboot-needed, restart cause, changes made by others.
    observer: observe::Observer,
}

fn command_label(job: &Job) -> String {
    match job {
        Job::Run(Ok(c)) => c.name().to_string(),
        Job::Run(Err(raw)) => sanitize_name(raw),
        Job::Resume(_) => "switch (resumed)".into(),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn check(status: &str, message: impl Into<String>) -> Check {
    Check {
        status: status.into(),
        message: message.into(),
        checked_at: crate::facts::rfc3339(now_unix()),
    }
}

/// The Lock compartment from `flake.lock` itself: ok up to 7 days since its newest input was
/// locked, then outdated (the v2 agent's thresholds, contract §6.2); read from the file, so
/// no child process.
fn lock_check(repo: Option<&std::path::Path>) -> Check {
    let Some(updated) = repo.and_then(crate::facts::flake_lock_updated) else {
        return check("unknown", "no flake.lock with locked inputs");
    };
    let days = now_unix().saturating_sub(updated) / 86_400;
    let age = match days {
        0 => "Updated today".to_string(),
        1 => "Updated yesterday".to_string(),
        n => format!("Updated {n} days ago"),
    };
    match days {
        0..=7 => check("ok", age),
        8..=30 => check("outdated", format!("{age} - consider updating")),
        _ => check("outdated", format!("{age} - needs update")),
    }
}

/// What a command's final result says about System and Tests (contract v2 §6.2).
fn record_result(checks: &mut HostChecks, status: &StatusReport) {
    let ok = status.status == Outcome::Ok;
    let first_line = status
        .output
        .as_deref()
        .and_then(|o| o.lines().next())
        .unwrap_or_default()
        .to_string();
    match status.command.as_deref() {
        Some(name @ ("switch" | "pull-switch" | "rollback")) => {
            if ok {
                checks.system = check("ok", format!("Last {name} succeeded"));
                checks.tests = check("outdated", "System changed since the last test");
            } else {
                checks.system = check("error", first_line);
            }
        }
        Some("pull" | "pull-reset") if ok => {
            checks.system = check("outdated", "Pulled; switch to apply");
        }
        Some("test") => {
            checks.tests = check(if ok { "ok" } else { "error" }, first_line);
        }
        _ => {}
    }
}

/// The name as the dashboard sent it, for a job from the dashboard.
fn raw_name(job: &Job) -> Option<&str> {
    match job {
        Job::Run(Err(raw)) => Some(raw.trim()),
        _ => None,
    }
}

/// A short report in place of one refused for its content: same outcome and counts, the text
/// replaced by a note. Returns it with the original text (for the log).
fn stand_in_for(report: &Report, error: &DashboardError, count: u32) -> (Report, String) {
    let note = format!(
        "Report withheld: the dashboard refused it ({}, {count} time(s)); the full text is in \
         the agent's log",
        ShortReason(error)
    );
    match report {
        Report::Status(status) => (
            Report::Status(StatusReport {
                status: status.status,
                current_generation: status.current_generation.clone(),
                output: Some(note),
                test_status: None,
                command: status.command.clone(),
                dropped_lines: 0,
                exit_code: status.exit_code,
            }),
            status.output.clone().unwrap_or_default(),
        ),
        Report::TestProgress(progress) => {
            let original = [progress.result.as_deref(), progress.comment.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n");
            let mut short = progress.clone();
            short.result = None;
            short.comment = Some(note);
            (Report::TestProgress(short), original)
        }
    }
}

/// Wall-clock `HH:MM:SS` (UTC) of a monotonic instant, for status lines.
fn clock_time(at: Instant) -> String {
    let now = std::time::SystemTime::now();
    let then = if at <= Instant::now() {
        now - Instant::now().saturating_duration_since(at)
    } else {
        now + at.saturating_duration_since(Instant::now())
    };
    let secs = then
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// A duration rounded to what a human needs in a status line: seconds under a minute are
/// shown as "<1m", then whole minutes, then hours and minutes.
fn coarse_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        "<1m".into()
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    }
}

fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `current_generation` on register must match `^[a-zA-Z0-9-]{1,64}$` (contract §3.1).
fn valid_generation(g: &str) -> bool {
    !g.is_empty() && g.len() <= 64 && g.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The dashboard field a 422 names, mapped to the setting that controls it.
fn setting_for_field(field: &str) -> Option<&'static str> {
    Some(match field {
        "hostname" => "NIXFLEET_HOSTNAME",
        "location" => "NIXFLEET_LOCATION",
        "device_type" => "NIXFLEET_DEVICE_TYPE",
        "theme_color" => "NIXFLEET_THEME_COLOR",
        "agent_version" => "NIXFLEET_AGENT_VERSION",
        "poll_interval" => "NIXFLEET_INTERVAL",
        "config_repo" => "NIXFLEET_REPO_DIR or NIXFLEET_NIXCFG",
        "host_type" => "NIXFLEET_HOST_TYPE",
        _ => return None,
    })
}

impl<L: Link> Agent<L> {
    pub fn new(startup: Startup, link: LinkParts<L>, os: OsFacts) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (output_tx, output_rx) = mpsc::channel(OUTPUT_BACKLOG);
        let settings = startup.settings;
        let generation = settings.repo.dir().and_then(read_git_head);
        let traits = link.link.traits();
        let observer = observe::Observer::new(&settings, &startup.state_dir, startup.start);
        let mut agent = Agent {
            state_dir: startup.state_dir,
            traits,
            session_up: link.events.is_none(),
            link_events: link.events,
            link_handle: link.link,
            output_tx,
            output_rx,
            rejections: VecDeque::new(),
            reboot_after_stop: false,
            last_beat: Instant::now(),
            alarm: alarm::Alarm::new(),
            runner: startup.runner,
            creds: startup.credentials,
            os,
            generation,
            metrics: MetricsSampler::new(),
            outbox: startup.outbox,
            journal: startup.journal,
            queue: VecDeque::new(),
            running: None,
            link: LinkHealth::default(),
            lock_hash: settings.repo.dir().and_then(crate::facts::flake_lock_hash),
            checks: HostChecks {
                lock: lock_check(settings.repo.dir()),
                ..HostChecks::default()
            },
            next_heartbeat: Instant::now(),
            in_flight: None,
            events_tx,
            events_rx,
            notifier: startup.notifier,
            progress: startup.progress,
            logged_422: HashSet::new(),
            outage_note: None,
            stopping: None,
            resume: None,
            held_reports: Vec::new(),
            refusal: None,
            definition: startup.definition,
            observer,
            report_failed_last: false,
            settings,
        };
        if let Some(running) = startup.left.running {
            agent.report_interrupted(running);
        }
        let mut held = Vec::new();
        for name in startup.left.queued {
            tracing::warn!(
                NIXFLEET_COMMAND = %name,
                "command {name} was queued when the agent restarted; reporting it as not run"
            );
            let mut notice = StatusReport::notice(
                Outcome::Error,
                agent.generation.clone(),
                format!(
                    "Command {name} was not run: the agent restarted before it could start it; \
                     queue it again if needed"
                ),
            );
            notice.command = Some(name.clone());
            let notice = Report::Status(notice);
            // While a resumed switch's row is open, any status would close it: hold it.
            if agent.resume.is_some() && agent.by_position() {
                agent.held_reports.push(notice);
                held.push(name);
            } else {
                agent.outbox.push(notice, None);
            }
        }
        agent.journal.settle_queued(held);
        let started = Report::Status(StatusReport::notice(
            Outcome::Ok,
            agent.generation.clone(),
            format!(
                "Agent started ({}): {}",
                agent.settings.agent_version,
                agent.observer.cause_text()
            ),
        ));
        if agent.resume.is_some() && agent.by_position() {
            agent.held_reports.push(started);
        } else {
            agent.outbox.push(started, None);
        }
        if matches!(
            agent.settings.repo,
            crate::config::RepoMode::Isolated { .. }
        ) {
            agent.queue.push_back(Job::Run(Ok(Command::Setup)));
        }
        agent
    }

    /// A command that was running when a previous instance died: report it once, never re-run.
    fn report_interrupted(&mut self, left: JournalEntry) {
        if self.outbox.contains_journal(left.id) {
            // Already reported before the restart; only the journal was not cleared yet.
            self.journal.settle_previous();
            return;
        }
        if let Some(detached) = left.detached.clone() {
            tracing::info!(
                NIXFLEET_COMMAND = %left.command,
                "command {} left a switch running outside the agent; waiting for its result",
                left.command
            );
            // Kept on disk as it is until the resumed switch reports.
            self.journal.resume(left.clone());
            self.resume = Some(left);
            self.queue.push_front(Job::Resume(detached));
            return;
        }
        {
            let ago = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(left.started_unix);
            tracing::warn!(
                NIXFLEET_COMMAND = %left.command,
                NIXFLEET_STEP = %left.step,
                "command {} was interrupted by an agent restart during step {}; reporting it, \
                 not re-running it",
                left.command,
                left.step
            );
            let mut report = StatusReport::notice(
                Outcome::Error,
                self.generation.clone(),
                format!(
                    "Command {} was interrupted: the agent restarted during step '{}' \
                     (started {} ago). It was not re-run; queue it again if needed.",
                    left.command,
                    left.step,
                    short_duration(Duration::from_secs(ago))
                ),
            );
            report.command = Some(left.command.clone());
            self.outbox.push(Report::Status(report), Some(left.id));
        }
        self.journal.settle_previous();
    }

    /// The main loop. Returns the process exit code.
    pub async fn run(mut self, shutdown: CancellationToken) -> u8 {
        let beat = self.heartbeat_payload();
        self.link_handle.describe_host(&beat);
        self.notifier.ready(&self.status_line());
        loop {
            self.last_beat = Instant::now();
            self.progress.beat();
            self.notifier.watchdog_tick();
            #[cfg(feature = "test-hooks")]
            self.debug_wedge();
            self.start_next_command();
            self.say_outage_note();
            self.start_request();
            // Built only for a supervisor that listens (it is a fifth of an idle loop turn).
            if self.notifier.is_enabled() {
                self.notifier.status(&self.status_line());
            }
            self.observe_tick();
            if let Some(code) = self.stop_done() {
                if self.reboot_after_stop {
                    self.reboot().await;
                }
                self.record_exit(code);
                self.notifier
                    .stopping(&format!("stopped (exit code {code})"));
                self.link_handle.close().await;
                return code;
            }
            let wake = self.next_wakeup();
            self.progress.set_activity(self.activity());
            let streaming = self.in_flight.is_none() && self.session_up;
            tokio::select! {
                () = shutdown.cancelled(), if self.stopping.is_none() => {
                    tracing::info!("stop requested; finishing up");
                    self.begin_stop(crate::exit::OK, self.settings.shutdown_grace);
                }
                delivery = async { self.in_flight.as_mut().expect("guarded").await },
                    if self.in_flight.is_some() => {
                    self.in_flight = None;
                    self.on_delivery(delivery);
                }
                Some(event) = async { self.link_events.as_mut().expect("guarded").recv().await },
                    if self.link_events.is_some() => self.on_link_event(event),
                Some(event) = self.events_rx.recv() => self.on_exec_event(event),
                Some(line) = self.output_rx.recv(), if streaming => self.send_output_line(line),
                () = self.alarm.sleep_until(wake) => {}
            }
        }
    }

    fn by_position(&self) -> bool {
        self.traits.correlation == Correlation::ByPosition
    }

    /// The loop beats at least this often, so the stall monitor (and another instance
    /// reading the progress file) never takes a quiet loop for a wedged one.
    fn beat_period(&self) -> Duration {
        crate::supervisor::progress::beat_period(self.settings.stall_timeout)
    }

    /// Sends one output line of the running command, if the link streams output.
    fn send_output_line(&mut self, (command, line): TaggedLine) {
        let message = Outgoing::Output(OutputLine {
            command: command.to_string(),
            line,
        });
        self.dispatch(message, Delivery::Ephemeral);
    }

    /// Puts `message` in flight.
    fn dispatch(
        &mut self,
        message: Outgoing,
        wrap: impl FnOnce(Result<Reply, DashboardError>) -> Delivery + Send + 'static,
    ) {
        let token = self.creds.current.expose().to_string();
        let link = self.link_handle.clone();
        self.in_flight = Some(Box::pin(
            async move { wrap(link.send(&token, &message).await) },
        ));
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                self.session_up = true;
                self.link.connected_since = Some(Instant::now());
                self.link_up();
                // Heartbeat at once on registering (contract v2 §4.2).
                self.next_heartbeat = Instant::now();
            }
            LinkEvent::Command(raw) => self.on_command(raw),
            LinkEvent::Disconnected { error, retry_in } => {
                self.session_up = false;
                self.link.connected_since = None;
                let now = Instant::now();
                self.link.failures = self.link.failures.saturating_add(1);
                self.link.down_since.get_or_insert(now);
                self.link.retry_at = Some(now + retry_in);
                self.link.failed_at = Some(now);
                let down_for = self.link.down_since.map_or(Duration::ZERO, |d| d.elapsed());
                match &error {
                    DashboardError::Unauthorized { .. } => {
                        tracing::error!("{error}; retrying in {}", short_duration(retry_in))
                    }
                    DashboardError::Displaced { .. } => {}
                    _ => tracing::warn!(
                        failures = self.link.failures,
                        "dashboard link down: {error}; unreachable for {}, retrying in {}",
                        short_duration(down_for),
                        short_duration(retry_in)
                    ),
                }
                self.link.last_error = Some(error);
            }
        }
    }

    /// Reboots the host (the dashboard's `reboot`), after the reports went out.
    async fn reboot(&mut self) {
        let (program, args): (&str, &[&str]) = if cfg!(target_os = "macos") {
            ("shutdown", &["-r", "now"])
        } else {
            ("systemctl", &["reboot"])
        };
        tracing::warn!(
            "rebooting the host as the dashboard asked: {program} {}",
            args.join(" ")
        );
        let cmd = crate::exec::Cmd::new(program, "/", Duration::from_secs(60), "reboot")
            .args(args.iter().copied());
        match self.runner.run(cmd, &CancellationToken::new()).await {
            Ok(outcome) if outcome.success() => {}
            Ok(outcome) => tracing::error!(
                "reboot failed (exit code {}): {}",
                outcome.exit_code(),
                outcome.output.trim_end()
            ),
            Err(e) => tracing::error!("reboot failed: {e}"),
        }
    }

    fn activity(&self) -> &'static str {
        match (&self.in_flight, &self.running) {
            (Some(_), _) => "waiting for the dashboard",
            (None, Some(_)) => "running a command",
            (None, None) => "idle",
        }
    }

    /// Test-only hook (`NIXFLEET_DEBUG_WEDGE_FILE`): block this thread while the file exists.
    #[cfg(feature = "test-hooks")]
    fn debug_wedge(&self) {
        if let Some(file) = &self.settings.debug_wedge_file {
            while file.exists() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The earliest deadline: the loop sleeps until then unless an event comes first.
    fn next_wakeup(&self) -> Instant {
        let now = Instant::now();
        let mut wake = self.last_beat + self.beat_period();
        if let Some(due) = self.notifier.next_watchdog_due() {
            wake = wake.min(due);
        }
        // The note waits for its moment; once that passed, only for the loop to be idle (v1),
        // which an event brings: never a deadline in the past.
        if let Some((_, due)) = &self.outage_note
            && *due > now
        {
            wake = wake.min(*due);
        }
        // Looking for changes made by others waits for the next heartbeat's wake-up (still
        // within one interval) rather than costing a wake-up of its own.
        wake = wake.min(self.observe_deadline().max(self.next_heartbeat));
        if let Some(stopping) = &self.stopping {
            // Until the running command is told to stop; then its end is an event.
            if self
                .running
                .as_ref()
                .is_some_and(|r| !r.cancel.is_cancelled())
            {
                wake = wake.min(stopping.cancel_at);
            }
            if let Some(until) = stopping.flush_until {
                wake = wake.min(if now < until {
                    until
                } else {
                    until + IN_FLIGHT_GRACE
                });
            }
        }
        if self.in_flight.is_none() && self.stopping.is_none() && self.session_up {
            let due = self
                .link
                .retry_at
                .unwrap_or(now)
                .max(if self.outbox.is_empty() {
                    self.next_heartbeat
                } else {
                    now
                });
            wake = wake.min(due.max(now));
        }
        wake.max(now)
    }

    fn begin_stop(&mut self, code: u8, grace: Duration) {
        self.stopping = Some(Stopping {
            code,
            cancel_at: Instant::now() + grace,
            flush_until: None,
        });
        // Tell systemd at once, not only when the last report is out.
        let line = self.status_line();
        self.notifier.stopping(&line);
        if let Some(running) = &self.running {
            tracing::info!(
                "waiting up to {} for {} to finish",
                human_duration(grace),
                running.name
            );
        }
    }

    /// While stopping: cancel a command past its grace; once nothing runs, flush reports for a
    /// bounded time. Returns the exit code when the agent may exit.
    fn stop_done(&mut self) -> Option<u8> {
        let now = Instant::now();
        let stopping = self.stopping.as_mut()?;
        if let Some(running) = &self.running {
            let may_cancel = now >= stopping.cancel_at || running.detached.is_some();
            if may_cancel && !running.cancel.is_cancelled() {
                tracing::warn!("{} did not finish in time; stopping it", running.name);
                running.cancel.cancel();
            }
            return None;
        }
        let flush_until = *stopping.flush_until.get_or_insert(now + FLUSH_BUDGET);
        if self.outbox.is_empty() && self.in_flight.is_none() {
            return Some(stopping.code);
        }
        // A request already under way may finish (the v1 /status can take seconds): cutting
        // it off would send it again from the next start.
        if now >= flush_until && self.in_flight.is_some() && now < flush_until + IN_FLIGHT_GRACE {
            return None;
        }
        if now >= flush_until {
            tracing::warn!(
                pending = self.outbox.len(),
                "could not deliver every report before exiting; they are kept and sent by the \
                 next start"
            );
            return Some(stopping.code);
        }
        None
    }

    fn start_next_command(&mut self) {
        if self.running.is_some() || self.stopping.is_some() {
            return;
        }
        let Some(job) = self.queue.pop_front() else {
            return;
        };
        let name = command_label(&job);
        tracing::info!(NIXFLEET_COMMAND = %name, "running command {name}");
        let (journal_id, detached) = match &job {
            Job::Resume(detached) => {
                let id = match self.resume.take() {
                    Some(entry) => {
                        let id = entry.id;
                        self.journal.resume(entry);
                        id
                    }
                    None => self.journal.start(&name),
                };
                (id, Some(detached.clone()))
            }
            // The internal clone at start is not the dashboard's business: never journaled,
            // never reported as interrupted.
            Job::Run(Ok(Command::Setup)) => (0, None),
            // Started and taken off the queue in one journal write: no crash in between can
            // lose it or report it twice.
            Job::Run(_) => (
                self.journal.start_with_queue(&name, self.queued_names()),
                None,
            ),
        };
        if journal_id == 0 || matches!(job, Job::Resume(_)) {
            self.journal_queue();
        }
        let command = match &job {
            Job::Run(Ok(Command::Setup)) => None,
            Job::Run(Ok(c)) => Some(c.name().to_string()),
            Job::Run(Err(raw)) => Some(sanitize_name(raw)),
            Job::Resume(_) => Some(
                self.journal
                    .running()
                    .map_or_else(|| "switch".into(), |entry| entry.command.clone()),
            ),
        };
        if matches!(
            command.as_deref(),
            Some("switch" | "pull-switch" | "rollback")
        ) {
            self.checks.system = check("working", "Switch in progress...");
        }
        let cancel = CancellationToken::new();
        let stop = CancellationToken::new();
        // Output streams only to a link that takes it; a fresh tap counts this command's drops.
        let tap = self.traits.streams_output.then(|| {
            LineTap::new(
                self.output_tx.clone(),
                command.as_deref().unwrap_or_default(),
            )
        });
        let runner = match &tap {
            Some(tap) => self.runner.clone().with_line_tap(tap.clone()),
            None => self.runner.clone(),
        };
        let ctx = Context {
            state_dir: self.state_dir.clone(),
            settings: self.settings.clone(),
            runner,
            events: self.events_tx.clone(),
            cancel: cancel.clone(),
            stop: stop.clone(),
            last_exit: Default::default(),
            definition: self.definition.clone(),
        };
        tokio::spawn(commands::execute(ctx, job));
        let now = Instant::now();
        self.running = Some(Running {
            name,
            started: now,
            step: "starting".into(),
            step_started: now,
            step_timeout: None,
            cancel,
            stop,
            detached,
            journal_id,
            command,
            final_status: None,
            tap,
            stopped: false,
        });
    }

    fn on_exec_event(&mut self, event: ExecEvent) {
        match event {
            ExecEvent::Step { label, timeout } => {
                if let Some(running) = &mut self.running {
                    // On disk first: whoever sees the log line may rely on the journal.
                    self.journal.step(&label);
                    tracing::info!(
                        NIXFLEET_COMMAND = %running.name,
                        NIXFLEET_STEP = %label,
                        "{}: {label}",
                        running.name
                    );
                    running.step = label;
                    running.step_started = Instant::now();
                    running.step_timeout = timeout;
                }
            }
            ExecEvent::Report(mut report) => {
                tracing::debug!("queued report: {}", describe(&report));
                self.observer.saw_report(&report);
                if let (Report::Status(status), Some(running)) = (&mut report, &mut self.running)
                    && !self.traits.correlation.eq(&Correlation::ByPosition)
                {
                    status.command = running.command.clone();
                    if running.detached.is_none() {
                        // Only the last status is the command's result; an earlier one is
                        // progress, shown as output.
                        if let Some(mut earlier) = running.final_status.replace(status.clone()) {
                            earlier.command = None;
                            self.outbox.push(Report::Status(earlier), None);
                        }
                        return;
                    }
                    // A detached switch's report is the command's result; what came before it
                    // (pull-switch's pull) is progress.
                    if let Some(mut earlier) = running.final_status.take() {
                        earlier.command = None;
                        self.outbox.push(Report::Status(earlier), None);
                    }
                    status.dropped_lines = running.tap.as_ref().map_or(0, LineTap::dropped);
                    record_result(&mut self.checks, status);
                }
                let detached = self
                    .running
                    .as_mut()
                    .and_then(|r| r.detached.take().map(|d| (r.journal_id, d)));
                match detached {
                    // The final report of a switch that ran outside the agent: once it is in
                    // the outbox, the journal entry and the result file have done their job.
                    // Both in this one step, so no restart can report the switch twice.
                    Some((journal_id, detached)) => {
                        self.outbox.push(report, Some(journal_id));
                        self.journal.finish();
                        crate::detach::clean_up(&detached);
                    }
                    None => self.outbox.push(report, None),
                }
            }
            ExecEvent::Detached(detached, recorded) => {
                self.journal.detach(detached.clone());
                if let Some(running) = &mut self.running {
                    running.detached = Some(detached);
                }
                let _ = recorded.send(());
            }
            ExecEvent::Facts(os) => {
                self.os = os;
                self.refresh_reboot();
            }
            ExecEvent::Finished { exit, left_running } => {
                if let Some(running) = &mut self.running
                    && let Some(mut status) = running.final_status.take()
                {
                    status.dropped_lines = running.tap.as_ref().map_or(0, LineTap::dropped);
                    record_result(&mut self.checks, &status);
                    self.outbox.push(Report::Status(status), None);
                }
                if let Some(running) = self.running.take() {
                    self.observer
                        .command_finished(&running.name, running.started.elapsed(), exit);
                    tracing::info!(
                        NIXFLEET_COMMAND = %running.name,
                        NIXFLEET_DURATION_MS = running.started.elapsed().as_millis() as u64,
                        "command {} finished after {}",
                        running.name,
                        short_duration(running.started.elapsed())
                    );
                }
                if left_running {
                    tracing::info!("the detached switch goes on; the next agent start reports it");
                } else {
                    self.journal.finish();
                }
                self.generation = self.settings.repo.dir().and_then(read_git_head);
                self.lock_hash = self
                    .settings
                    .repo
                    .dir()
                    .and_then(crate::facts::flake_lock_hash);
                self.checks.lock = lock_check(self.settings.repo.dir());
                // Not while the switch's row is still open (the next instance reports it).
                if !left_running {
                    for report in std::mem::take(&mut self.held_reports) {
                        self.outbox.push(report, None);
                    }
                    self.journal.release_held();
                }
                if let Some(code) = exit
                    && self.stopping.is_none()
                {
                    self.begin_stop(code, Duration::ZERO);
                }
            }
        }
    }

    /// Starts the next request if none is in flight: reports first, then a due heartbeat.
    fn start_request(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let now = Instant::now();
        if self.link.retry_at.is_some_and(|at| now < at) {
            return;
        }
        if let Some(stopping) = &self.stopping
            && stopping.flush_until.is_some_and(|until| now >= until)
        {
            return;
        }
        if !self.session_up {
            return;
        }
        let heartbeat_due = self.stopping.is_none() && now >= self.next_heartbeat;
        if let Some((command, current)) = self.rejections.pop_front() {
            self.dispatch(Outgoing::Rejected { command, current }, Delivery::Ephemeral);
            return;
        }
        // Lines a command printed go before its result.
        if let Ok(line) = self.output_rx.try_recv() {
            self.send_output_line(line);
            return;
        }
        if let Some(entry) = self
            .outbox
            .front()
            .filter(|_| !(self.report_failed_last && heartbeat_due))
        {
            let id = entry.id;
            let message = Outgoing::Report(entry.report.clone());
            self.dispatch(message, move |result| Delivery::Report { id, result });
            return;
        }
        if self.stopping.is_some() || now < self.next_heartbeat {
            return;
        }
        let beat = self.heartbeat_payload();
        self.dispatch(Outgoing::Heartbeat(Box::new(beat)), Delivery::Heartbeat);
    }

    fn heartbeat_payload(&mut self) -> Heartbeat {
        let host = &self.settings.host;
        let config_repo = self
            .settings
            .repo
            .dir()
            .map(|d| d.to_string_lossy().into_owned())
            .filter(|d| d.chars().count() <= 200);
        Heartbeat {
            hostname: host.hostname.clone(),
            host_type: host.host_type.as_str(),
            location: host.location.clone(),
            device_type: host.device_type.clone(),
            theme_color: host.theme_color.clone(),
            criticality: host.criticality,
            current_generation: self.generation.clone().filter(|g| valid_generation(g)),
            config_repo,
            poll_interval: self.settings.interval.as_secs(),
            agent_version: self.settings.agent_version.clone(),
            nixpkgs_version: self.os.nixpkgs_version.clone(),
            os_version: self.os.os_version.clone(),
            os_name: self.os.os_name.clone(),
            metrics: self.metrics.sample(),
            running: self.running.as_ref().and_then(|r| r.command.clone()),
            repo_url: self.settings.repo.url_for_display(),
            lock_hash: self.lock_hash.clone(),
            checks: self.checks.clone(),
        }
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        match delivery {
            // A line or a refusal that did not go out is not worth a retry; a link that is
            // down says so with its own event.
            Delivery::Ephemeral(Ok(_)) => {}
            Delivery::Ephemeral(Err(error)) => {
                tracing::debug!("an output line or refusal was not delivered: {error}");
            }
            Delivery::Heartbeat(Ok(reply)) => {
                self.report_failed_last = false;
                if let Some(refusal) = &mut self.refusal {
                    refusal.answered_since = true;
                }
                if let Some(token) = reply.agent_token {
                    self.adopt_token(token);
                }
                // The command first: its row is the newest open one, so nothing else (like the
                // outage note link_up may add) may be reported before its acknowledgement.
                if let Some(command) = reply.command {
                    self.on_command(command);
                }
                let after_outage = self.link_up();
                // After an outage the next beat lands anywhere within two intervals, so a
                // fleet that reconnected in one wave does not come back in lockstep.
                self.next_heartbeat = Instant::now()
                    + if after_outage {
                        backoff::after_outage_interval(self.settings.interval, fastrand::f64())
                    } else {
                        backoff::next_interval(self.settings.interval, fastrand::f64())
                    };
            }
            Delivery::Heartbeat(Err(error)) => {
                // Strict alternation: a failed heartbeat lets the pending report go next.
                self.report_failed_last = false;
                if let Some(refusal) = &mut self.refusal {
                    // The dashboard itself is in trouble: refusals so far prove nothing.
                    refusal.count = 0;
                    refusal.answered_since = false;
                }
                self.on_failure("heartbeat", error);
            }
            Delivery::Report {
                id,
                result: Ok(reply),
            } => {
                // v2: the dashboard judges a result on the next heartbeat (contract §7.2), so
                // one follows every final status at once.
                let was_result = !self.by_position()
                    && self.outbox.front().is_some_and(|e| {
                        e.id == id && matches!(&e.report, Report::Status(s) if s.command.is_some())
                    });
                if was_result {
                    self.next_heartbeat = Instant::now();
                }
                self.outbox.pop(id);
                self.refusal = None;
                self.report_failed_last = false;
                self.link_up();
                if let Some(token) = reply.agent_token {
                    self.adopt_token(token);
                }
            }
            Delivery::Report {
                id,
                result: Err(error),
            } => {
                self.report_failed_last = true;
                if !error.refuses_content() {
                    self.on_failure("report", error);
                } else if self.on_report_refused(id, &error) {
                    // Replaced or dropped: what is now in front goes out at once.
                    self.report_failed_last = false;
                } else {
                    self.retry_refused_report(&error);
                }
            }
        }
    }

    /// The front report `id` was refused for its content. After a 422 (the dashboard validated
    /// it and will refuse it again), or a few refusals each after a heartbeat got through (a
    /// proxy or firewall refusing what the output says), it is replaced by a short stand-in
    /// that keeps its place, so the command's log row still closes with the right outcome; the
    /// original text goes to the agent's log. A stand-in is dropped only on a 422; refusing a
    /// one-line stand-in otherwise means the path is blocked, and it is retried like an
    /// outage. Returns whether the front changed.
    fn on_report_refused(&mut self, id: u64, error: &DashboardError) -> bool {
        let refusal = match &mut self.refusal {
            Some(refusal) if refusal.id == id => refusal,
            other => other.insert(Refusal {
                id,
                count: 0,
                answered_since: true,
            }),
        };
        if refusal.answered_since {
            refusal.count += 1;
            refusal.answered_since = false;
        }
        let validation = matches!(error, DashboardError::Validation { .. });
        if !validation && refusal.count < REFUSALS_BEFORE_WITHHOLDING {
            return false;
        }
        let count = refusal.count;
        let Some(entry) = self.outbox.front().filter(|e| e.id == id) else {
            return false;
        };
        if entry.withheld {
            if !validation {
                return false;
            }
            tracing::error!(
                "the dashboard refused even the short stand-in for a report ({error}); dropping \
                 it: {}",
                describe(&entry.report)
            );
            self.refusal = None;
            self.outbox.pop(id);
            return true;
        }
        let (stand_in, original) = stand_in_for(&entry.report, error, count);
        tracing::error!(
            "the dashboard refused a report {count} time(s) ({error}) while it answers \
             heartbeats; sending a short stand-in instead so the command's log row still \
             closes. The refused report ({}) said:\n{original}",
            describe(&entry.report)
        );
        self.refusal = None;
        self.outbox.withhold_front(id, stand_in);
        true
    }

    /// Backs off before sending a refused report again. The dashboard answered, so this is
    /// not an outage: the link is not marked down and STATUS does not say "unreachable".
    fn retry_refused_report(&mut self, error: &DashboardError) {
        let count = self.refusal.as_ref().map_or(1, |r| r.count.max(1));
        let delay = backoff::retry_delay(
            self.settings.interval,
            self.settings.backoff_cap,
            count,
            fastrand::f64(),
        );
        self.link.retry_at = Some(Instant::now() + delay);
        tracing::warn!(
            "the dashboard refused a report ({error}); retrying in {}: {}",
            short_duration(delay),
            self.outbox
                .front()
                .map(|e| describe(&e.report))
                .unwrap_or_default()
        );
    }

    /// The link works. Returns whether it had been down (an outage just ended).
    fn link_up(&mut self) -> bool {
        let was_down = self.link.down_since.is_some();
        if let Some(since) = self.link.down_since.take() {
            let reason = self
                .link
                .last_error
                .as_ref()
                .map(|e| ShortReason(e).to_string())
                .unwrap_or_default();
            let outage = short_duration(since.elapsed());
            tracing::info!(
                failures = self.link.failures,
                "dashboard reachable again after {outage} ({reason})"
            );
            let due = Instant::now()
                + backoff::outage_note_delay(self.settings.interval, fastrand::f64());
            self.outage_note = Some((
                format!("Agent: dashboard was unreachable for {outage} ({reason}); reconnected"),
                due,
            ));
        }
        self.link.failures = 0;
        self.link.retry_at = None;
        self.link.last_error = None;
        self.link.last_ok = Some(Instant::now());
        was_down
    }

    /// Queues the outage note once it is due and may be said: v1 only when idle, since a
    /// status while a command runs would close its log row; a notice closes nothing by name
    /// (v2).
    fn say_outage_note(&mut self) {
        let Some((_, due)) = &self.outage_note else {
            return;
        };
        let may_say = !self.by_position()
            || (self.running.is_none() && self.queue.is_empty() && self.outbox.is_empty());
        if Instant::now() >= *due
            && may_say
            && self.link.down_since.is_none()
            && let Some((note, _)) = self.outage_note.take()
        {
            self.outbox.push(
                Report::Status(StatusReport::notice(
                    Outcome::Ok,
                    self.generation.clone(),
                    note,
                )),
                None,
            );
        }
    }

    fn on_failure(&mut self, what: &str, error: DashboardError) {
        let now = Instant::now();
        self.link.failures = self.link.failures.saturating_add(1);
        self.link.down_since.get_or_insert(now);
        let settings = self.settings.clone();
        let delay = match &error {
            DashboardError::Unauthorized { .. } => {
                if self.try_token_fallback() {
                    self.link.retry_at = Some(now);
                    self.link.last_error = Some(error);
                    return;
                }
                let delay = backoff::auth_delay(settings.backoff_cap, fastrand::f64());
                tracing::error!(
                    "the dashboard refused the token from {} ({error}); fix that token; \
                     retrying in {}",
                    self.creds.source,
                    short_duration(delay)
                );
                delay
            }
            DashboardError::Validation { details } => {
                let delay = backoff::retry_delay(
                    settings.interval,
                    settings.backoff_cap,
                    self.link.failures,
                    fastrand::f64(),
                );
                for (field, message) in details {
                    let key = format!("{what}:{field}:{message}");
                    // Bounded: a dashboard sending new details every time cannot grow it.
                    if self.logged_422.len() >= 64 {
                        self.logged_422.clear();
                    }
                    if self.logged_422.insert(key) {
                        let hint = setting_for_field(field)
                            .map(|s| format!("; check {s}"))
                            .unwrap_or_default();
                        tracing::error!(
                            field = %field,
                            "the dashboard rejected the {what}: {field}: {message}{hint}"
                        );
                    }
                }
                delay
            }
            other => {
                let delay = backoff::retry_delay(
                    settings.interval,
                    settings.backoff_cap,
                    self.link.failures,
                    fastrand::f64(),
                );
                let extra = if matches!(other, DashboardError::ServerError) {
                    " (the v1 dashboard also answers its rate limit with 500)"
                } else {
                    ""
                };
                let down_for = self.link.down_since.map_or(Duration::ZERO, |d| d.elapsed());
                tracing::warn!(
                    failures = self.link.failures,
                    "{what} failed: {other}{extra}; dashboard unreachable for {}, retrying in {}",
                    short_duration(down_for),
                    short_duration(delay)
                );
                delay
            }
        };
        self.link.retry_at = Some(now + delay);
        self.link.failed_at = Some(now);
        self.link.last_error = Some(error);
    }

    /// A refused cached token falls back to the configured one, once.
    fn try_token_fallback(&mut self) -> bool {
        if self.creds.fell_back || !matches!(self.creds.source, TokenSource::Cache(_)) {
            return false;
        }
        let Some((token, origin)) = self.creds.configured.clone() else {
            return false;
        };
        if token == self.creds.current {
            return false;
        }
        tracing::warn!(
            "the dashboard refused the cached per-host token in {}; falling back once to the \
             configured token from {origin}",
            self.creds.cache.path().display()
        );
        self.creds.current = token;
        self.creds.source = TokenSource::Configured(origin);
        self.creds.fell_back = true;
        true
    }

    fn adopt_token(&mut self, token: String) {
        // v1 issues token_urlsafe(32): 43 characters of [A-Za-z0-9_-]. Anything else (a CR/LF
        // would break every later request) is refused rather than cached.
        let plausible = (1..=256).contains(&token.len())
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plausible {
            tracing::error!(
                "ignoring a per-host token from the dashboard that is not URL-safe base64 ({} \
                 bytes); keeping the current token",
                token.len()
            );
            return;
        }
        let token = Secret::new(token);
        if token == self.creds.current {
            return;
        }
        self.creds.current = token;
        self.creds.source = TokenSource::Cache(self.creds.cache.path().to_path_buf());
        match self.creds.cache.save(&self.creds.current) {
            Ok(()) => tracing::info!(
                "the dashboard issued a per-host token; using it now and saved it to {}",
                self.creds.cache.path().display()
            ),
            Err(e) => tracing::error!(
                "the dashboard issued a per-host token; using it now, but saving it to {} \
                 failed: {e}; it will be lost on restart",
                self.creds.cache.path().display()
            ),
        }
    }

    /// A command from a heartbeat reply. Its dashboard log row is now the newest open one, and
    /// v1 closes it with the next `/status`: so unless that will be the command's own first
    /// report, it is acknowledged at once, at the front of the outbox.
    fn on_command(&mut self, raw: String) {
        let command = Job::Run(Command::parse(&raw).ok_or_else(|| raw.clone()));
        let name = command_label(&command);
        tracing::info!(NIXFLEET_COMMAND = %name, "received command {name}");
        if !self.by_position() {
            self.on_named_command(command, name);
            return;
        }
        if self.stopping.is_some() {
            self.acknowledge(
                Outcome::Error,
                format!("Not run: {name} arrived while the agent was stopping; queue it again"),
            );
            return;
        }
        let busy_with = self
            .running
            .as_ref()
            .map(|r| r.name.clone())
            .or_else(|| self.queue.back().map(command_label));
        let Some(busy_with) = busy_with else {
            if !self.outbox.is_empty() {
                // Earlier reports are still waiting; they would close this row.
                self.acknowledge(
                    Outcome::Ok,
                    format!(
                        "Accepted: {name} is starting; its result follows in a separate report"
                    ),
                );
            }
            self.queue.push_back(command);
            return;
        };
        if self.queue.len() >= self.settings.queue_limit {
            tracing::error!(
                NIXFLEET_COMMAND = %name,
                "dropped command {name}: {} commands already wait behind {busy_with}",
                self.queue.len()
            );
            self.acknowledge(
                Outcome::Error,
                format!(
                    "Dropped command {name}: {} commands already wait behind {busy_with} \
                     (queue limit {})",
                    self.queue.len(),
                    self.settings.queue_limit
                ),
            );
            return;
        }
        self.queue.push_back(command);
        self.journal_queue();
        let position = self.queue.len();
        self.acknowledge(
            Outcome::Ok,
            format!("Queued: {name} will run after {busy_with} finishes (position {position})"),
        );
    }

    /// A command from a link that matches results by name ([`Correlation::ByName`]): run it if
    /// idle, refuse it if busy; `stop`, `restart` and `reboot` act at once.
    fn on_named_command(&mut self, job: Job, name: String) {
        let busy_with = self
            .running
            .as_ref()
            .map(|r| r.name.clone())
            .or_else(|| self.queue.front().map(command_label));
        let command = match &job {
            Job::Run(Ok(c)) => Some(*c),
            _ => None,
        };
        // The dashboard's Kill button sends `kill`: a stop, answered under its own name.
        let (command, name) = match (command, raw_name(&job)) {
            (None, Some("kill")) => (Some(Command::Stop), "kill".to_string()),
            _ => (command, name),
        };
        if self.stopping.is_some() && command != Some(Command::Stop) {
            self.answer(
                &name,
                Outcome::Error,
                format!("Not run: {name} arrived while the agent was stopping; send it again"),
            );
            return;
        }
        match (command, &busy_with) {
            (Some(Command::Stop), None) => {
                self.answer(&name, Outcome::Error, "No command running".into());
            }
            (Some(Command::Stop), Some(current)) => {
                let current = current.clone();
                if let Some(running) = &mut self.running {
                    running.stopped = true;
                    running.stop.cancel();
                }
                self.queue.clear();
                self.journal_queue();
                tracing::warn!(NIXFLEET_COMMAND = %current, "stopping {current} as the dashboard asked");
                self.answer(&name, Outcome::Ok, format!("Stopped {current}"));
            }
            (Some(Command::Restart), _) => {
                self.answer("restart", Outcome::Ok, "Agent restarting...".into());
                self.observer.note_exit("restart");
                self.begin_stop(crate::exit::OK, self.settings.shutdown_grace);
            }
            (Some(Command::Reboot), Some(current)) => {
                self.answer(
                    "reboot",
                    Outcome::Error,
                    format!(
                        "Reboot refused: {current} is running; stop it first or reboot when \
                         it has finished"
                    ),
                );
            }
            (Some(Command::Reboot), None) => {
                self.answer(
                    "reboot",
                    Outcome::Ok,
                    "Rebooting once this report is delivered".into(),
                );
                self.reboot_after_stop = true;
                self.observer.note_exit("reboot");
                self.begin_stop(crate::exit::OK, Duration::ZERO);
            }
            (_, Some(current)) => {
                tracing::warn!(
                    NIXFLEET_COMMAND = %name,
                    "refused command {name}: {current} is running"
                );
                self.rejections.push_back((name, current.clone()));
            }
            (_, None) => self.queue.push_back(job),
        }
    }

    /// A final status for command `name` that is not the result of a job (stop, restart...).
    fn answer(&mut self, name: &str, outcome: Outcome, text: String) {
        let mut report = StatusReport::notice(outcome, self.generation.clone(), text);
        report.command = Some(name.to_string());
        self.outbox.push(Report::Status(report), None);
    }

    /// A status that must be the next one the dashboard sees (nothing is in flight while a
    /// heartbeat reply is handled, so the front of the outbox is next).
    fn acknowledge(&mut self, status: Outcome, output: String) {
        self.outbox.push_front(Report::Status(StatusReport::notice(
            status,
            self.generation.clone(),
            output,
        )));
    }

    /// Keeps the journal's list of waiting dashboard commands current.
    fn journal_queue(&mut self) {
        let names = self.queued_names();
        self.journal.set_queued(names);
    }

    /// The dashboard commands waiting in the queue, by name.
    fn queued_names(&self) -> Vec<String> {
        self.queue
            .iter()
            .filter(|job| {
                matches!(job, Job::Run(Ok(c)) if *c != Command::Setup)
                    || matches!(job, Job::Run(Err(_)))
            })
            .map(command_label)
            .collect()
    }

    /// The one-line summary for `systemctl status`.
    fn status_line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(stopping) = &self.stopping {
            parts.push(format!("stopping (exit code {})", stopping.code));
        }
        match &self.running {
            Some(r) => {
                let timeout = r
                    .step_timeout
                    .map(|t| format!(" of {}", short_duration(t)))
                    .unwrap_or_default();
                parts.push(format!(
                    "running {} (step {} since {}{timeout}); {} queued",
                    r.name,
                    r.step,
                    clock_time(r.step_started),
                    self.queue.len()
                ));
            }
            None => parts.push("idle".into()),
        }
        match (&self.link.down_since, &self.link.last_error) {
            (Some(since), Some(error)) => {
                let (retry_in, retry_at) = match (self.link.retry_at, self.link.failed_at) {
                    (Some(at), Some(failed)) => (at.saturating_duration_since(failed), at),
                    (Some(at), None) => (Duration::ZERO, at),
                    _ => (Duration::ZERO, Instant::now()),
                };
                let what = if error.is_unreachable() || matches!(error, DashboardError::ServerError)
                {
                    "dashboard unreachable"
                } else {
                    "dashboard refusing requests"
                };
                let what = match error {
                    DashboardError::Unauthorized { status, .. } => {
                        format!("refused: {status}, check the token")
                    }
                    DashboardError::Displaced { .. } => {
                        "another agent uses this hostname".to_string()
                    }
                    _ => what.to_string(),
                };
                // Coarse ages: the line changes when something happens, not every second.
                parts.push(format!(
                    "{what} for {} ({}), retrying in {} (at {})",
                    coarse_duration(since.elapsed()),
                    ShortReason(error),
                    short_duration(retry_in),
                    clock_time(retry_at)
                ));
            }
            _ => match (self.link.last_ok, self.link.connected_since) {
                (_, Some(since)) => parts.push(format!("connected since {}", clock_time(since))),
                (Some(at), None) => parts.push(format!("last heartbeat at {}", clock_time(at))),
                (None, None) => parts.push("connecting to the dashboard".into()),
            },
        }
        if !self.outbox.is_empty() {
            parts.push(format!("{} reports pending", self.outbox.len()));
        }
        if let Some(g) = &self.generation {
            parts.push(format!("generation {}", g.get(..12).unwrap_or(g)));
        }
        parts.extend(self.observe_status_parts());
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_pattern_matches_the_dashboard() {
        assert!(valid_generation("0123456789abcdef0123456789abcdef01234567"));
        assert!(valid_generation("unknown"));
        assert!(!valid_generation(""));
        assert!(!valid_generation("a.b"));
        assert!(!valid_generation(&"a".repeat(65)));
    }

    #[test]
    fn durations_read_like_a_human_wrote_them() {
        assert_eq!(short_duration(Duration::from_secs(42)), "42s");
        assert_eq!(short_duration(Duration::from_secs(252)), "4m12s");
        assert_eq!(short_duration(Duration::from_secs(7300)), "2h1m");
    }
}
