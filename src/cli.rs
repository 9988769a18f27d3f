//! Command line and start-up: parse flags, validate config, take the instance lock, load
//! state, start the supervisor hooks, then hand over to the main loop. Every failure here ends
//! in one log line and a documented exit code (`crate::exit`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::agent::LinkParts;
use crate::agent::outbox::Outbox;
use crate::agent::{Agent, Credentials, Startup};
use crate::config::Protocol;
use crate::config::{FlagValues, MachineFacts, RawConfig, Settings};
use crate::dashboard::LinkEvent;
use crate::dashboard::v1::V1Client;
use crate::dashboard::v2::V2Link;
use crate::exec::Runner;
use crate::exit;
use crate::facts::OsFacts;
use crate::lock::{self, LockError};
use crate::store::{Journal, TokenCache};
use crate::supervisor::notify::Notifier;
use crate::supervisor::progress::Progress;
use crate::supervisor::stall::spawn_stall_monitor;

/// nixfleet-agent: keeps this host under the control of a NixFleet dashboard.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<CliCommand>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(Subcommand, Debug)]
enum CliCommand {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration, print the effective settings (token redacted), and exit
    /// 0, or 78 with the problem.
    CheckConfig,
    /// Tell an operator, from the files the agent keeps, what it is doing: lock holder, loop
    /// progress, dashboard link, running and queued commands, outbox, restart cause, reboot
    /// needed, config (token redacted). Works when the agent is wedged or dead. Exit 0
    /// healthy, 1 degraded (dashboard unreachable, reports waiting), 2 stuck or not running.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Record why the agent's service ended, for the next start's restart cause (the systemd
    /// units run this as `ExecStopPost=`; it reads SERVICE_RESULT, EXIT_CODE, EXIT_STATUS).
    RecordExit,
    /// Internal: run a switch outside the agent and write its result file (the agent starts
    /// this itself, through systemd-run or a new session).
    #[command(hide = true)]
    SwitchWrapper {
        #[arg(long)]
        result: PathBuf,
        #[arg(long)]
        timeout_ms: u64,
        #[arg(long)]
        kill_grace_ms: u64,
        /// The switch's environment (NUL-separated KEY=VALUE), read and deleted.
        #[arg(long)]
        env_file: Option<PathBuf>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

/// Flags override the environment, which overrides the config file.
#[derive(clap::Args, Debug, Default)]
struct Flags {
    /// TOML config file (keys: url, interval, token_file, ... as in NIXFLEET_* lowercased).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Dashboard base URL (NIXFLEET_URL).
    #[arg(long, global = true)]
    url: Option<String>,
    /// File holding the dashboard token (NIXFLEET_TOKEN_FILE).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<String>,
    /// Heartbeat interval in seconds, 1..3600 (NIXFLEET_INTERVAL).
    #[arg(long, global = true, value_name = "SECONDS")]
    interval: Option<String>,
    /// Host id sent to the dashboard (NIXFLEET_HOSTNAME; default: short host name).
    #[arg(long, global = true)]
    hostname: Option<String>,
    /// Directory for the token cache, outbox and journal (NIXFLEET_STATE_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<String>,
    /// Directory for the instance lock (NIXFLEET_RUNTIME_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    runtime_dir: Option<String>,
}

impl Flags {
    fn values(&self) -> FlagValues {
        let mut values = Vec::new();
        for (key, value) in [
            ("url", &self.url),
            ("token_file", &self.token_file),
            ("interval", &self.interval),
            ("hostname", &self.hostname),
            ("state_dir", &self.state_dir),
            ("runtime_dir", &self.runtime_dir),
        ] {
            if let Some(v) = value {
                values.push((key, v.clone()));
            }
        }
        FlagValues {
            config: self.config.clone(),
            values,
        }
    }
}

/// The process entry point; returns the exit code.
pub fn main() -> std::process::ExitCode {
    // Before anything reads a secret: no core dumps, not dumpable (see `harden`).
    let hardened = crate::harden::apply();
    let cli = Cli::parse();
    if let Err(e) = &hardened {
        eprintln!("nixfleet-agent: warning: {e}");
    }
    let code = match cli.command {
        Some(CliCommand::CheckConfig) => check_config(&cli.flags),
        Some(CliCommand::Status { json }) => status(&cli.flags, json),
        Some(CliCommand::RecordExit) => record_exit(&cli.flags),
        Some(CliCommand::SwitchWrapper {
            result,
            timeout_ms,
            kill_grace_ms,
            env_file,
            argv,
        }) => crate::detach::run_wrapper(
            &result,
            std::time::Duration::from_millis(timeout_ms),
            std::time::Duration::from_millis(kill_grace_ms),
            env_file.as_deref(),
            &argv,
        ),
        Some(CliCommand::Run) | None => run(&cli.flags),
    };
    std::process::ExitCode::from(code)
}

fn load_settings(flags: &Flags) -> Result<Settings, crate::config::ConfigError> {
    let raw = RawConfig::gather(&flags.values(), &|key| std::env::var(key).ok())?;
    Settings::from_raw(&raw, &MachineFacts::detect())
}

fn check_config(flags: &Flags) -> u8 {
    match load_settings(flags) {
        Ok(settings) => {
            print!("{}", settings.describe());
            exit::OK
        }
        Err(e) => {
            eprintln!("nixfleet-agent: configuration error: {e}");
            exit::CONFIG
        }
    }
}

fn status(flags: &Flags, json: bool) -> u8 {
    let settings = match load_settings(flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "nixfleet-agent status: configuration error: {e} (status reads the same \
                 settings as the agent to find its files)"
            );
            return crate::status::DOWN;
        }
    };
    let state_dirs = state_dir_candidates(&settings);
    let state_dir = state_dirs
        .iter()
        .find(|d| d.is_dir())
        .cloned()
        .unwrap_or_default();
    let report = crate::status::gather(
        &settings,
        &state_dirs,
        &runtime_dir_candidates(&settings, &state_dir),
    );
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("nixfleet-agent status: {e}"),
        }
    } else {
        print!("{}", crate::status::render(&report));
    }
    report.exit_code
}

/// `ExecStopPost=`: never fails the unit over a missing setting; the state directory comes
/// from the settings when they load, else from systemd's `$STATE_DIRECTORY`.
fn record_exit(flags: &Flags) -> u8 {
    let dirs = match load_settings(flags) {
        Ok(settings) => state_dir_candidates(&settings),
        Err(_) => systemd_dir("STATE_DIRECTORY").into_iter().collect(),
    };
    let Some(dir) = dirs.into_iter().find(|d| d.is_dir()) else {
        eprintln!("nixfleet-agent record-exit: no state directory; set NIXFLEET_STATE_DIR");
        return exit::NO_STATE_DIR;
    };
    crate::restart_cause::record_systemd_exit(&dir, &|key| std::env::var(key).ok())
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// The first entry of a systemd `*_DIRECTORY` variable (it may list several, `:`-separated).
fn systemd_dir(var: &str) -> Option<PathBuf> {
    let value = std::env::var(var).ok()?;
    value
        .split(':')
        .next()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
}

fn state_dir_candidates(settings: &Settings) -> Vec<PathBuf> {
    if let Some(dir) = &settings.state_dir {
        return vec![dir.clone()];
    }
    let mut dirs = Vec::new();
    dirs.extend(systemd_dir("STATE_DIRECTORY"));
    if nix::unistd::geteuid().is_root() {
        dirs.push(PathBuf::from("/var/lib/nixfleet-agent"));
    } else {
        if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
            dirs.push(PathBuf::from(state).join("nixfleet-agent"));
        }
        if let Some(home) = home_dir() {
            dirs.push(home.join(".local/state/nixfleet-agent"));
        }
    }
    dirs
}

fn runtime_dir_candidates(settings: &Settings, state_dir: &std::path::Path) -> Vec<PathBuf> {
    if let Some(dir) = &settings.runtime_dir {
        return vec![dir.clone()];
    }
    let mut dirs = Vec::new();
    dirs.extend(systemd_dir("RUNTIME_DIRECTORY"));
    if nix::unistd::geteuid().is_root() {
        dirs.push(PathBuf::from(if cfg!(target_os = "macos") {
            "/var/run/nixfleet-agent"
        } else {
            "/run/nixfleet-agent"
        }));
    } else if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()) {
        dirs.push(PathBuf::from(runtime).join("nixfleet-agent"));
    }
    // The state directory always works as a lock directory too: the kernel releases a flock
    // whatever the filesystem.
    dirs.push(state_dir.to_path_buf());
    dirs
}

fn run(flags: &Flags) -> u8 {
    let log = crate::logging::init();
    let settings = match load_settings(flags) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("configuration error: {e}");
            return exit::CONFIG;
        }
    };
    log.apply_config(settings.log_filter.as_deref());
    if settings.allow_insecure_http && settings.url.scheme() == "http" {
        tracing::warn!(
            "NIXFLEET_ALLOW_INSECURE_HTTP is set: the token travels in clear text to {}",
            settings.url
        );
    }
    if settings.interval.as_secs() < 2 && settings.protocol == Protocol::V1 {
        tracing::warn!(
            "interval 1s exceeds the v1 dashboard's limit of 30 registers per minute per IP; \
             expect HTTP 500 answers"
        );
    }

    let state_dir = match lock::choose_dir(&state_dir_candidates(&settings)) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::error!("{e}; set NIXFLEET_STATE_DIR to a writable directory");
            return exit::NO_STATE_DIR;
        }
    };
    let runtime_dir = match lock::choose_dir(&runtime_dir_candidates(&settings, &state_dir)) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::error!("{e}; set NIXFLEET_RUNTIME_DIR to a writable directory");
            return exit::NO_STATE_DIR;
        }
    };
    let instance_lock = match lock::acquire(
        &runtime_dir,
        settings.stall_timeout,
        &settings.agent_version,
    ) {
        Ok(l) => l,
        Err(e @ LockError::NoUsableDir { .. }) | Err(e @ LockError::Io { .. }) => {
            tracing::error!("{e}");
            return exit::NO_STATE_DIR;
        }
        Err(e) => {
            tracing::error!("{e}");
            return exit::ALREADY_RUNNING;
        }
    };
    let _state_lock = match lock::lock_state_dir(&state_dir, &settings.agent_version) {
        Ok(file) => file,
        Err(e @ LockError::Io { .. }) => {
            tracing::error!("{e}");
            return exit::NO_STATE_DIR;
        }
        Err(e) => {
            tracing::error!("{e}");
            return exit::ALREADY_RUNNING;
        }
    };
    let start = crate::restart_cause::on_start(&state_dir);
    tracing::info!(
        cause = start.cause.key(),
        "start cause: {}",
        start.cause.text()
    );
    let progress = Progress::new(Some(runtime_dir.join(lock::PROGRESS_FILE)));
    if let Err(e) = spawn_stall_monitor(progress.clone(), settings.stall_timeout) {
        tracing::error!("cannot start the stall monitor thread: {e}");
        return exit::FAILURE;
    }

    let cache = TokenCache::new(
        settings
            .token_cache
            .clone()
            .unwrap_or_else(|| state_dir.join("token")),
    );
    // v2 has one shared agent token and no per-host tokens: the v1 cache is neither read nor
    // touched (contract v2 §10).
    let cached = match (settings.protocol, cache.load()) {
        (Protocol::V2, _) => None,
        (Protocol::V1, Ok(token)) => token,
        (Protocol::V1, Err(e)) => {
            tracing::warn!(
                "cannot read the token cache {}: {e}; using the configured token",
                cache.path().display()
            );
            None
        }
    };
    let Some(credentials) = Credentials::new(settings.token.clone(), cache, cached) else {
        tracing::error!(
            "configuration error: no dashboard token: set NIXFLEET_TOKEN_FILE (or --token-file, \
             or LoadCredential=token:... under systemd, or NIXFLEET_TOKEN)"
        );
        return exit::CONFIG;
    };
    let link = match AnyLink::new(&settings, &credentials) {
        Ok(link) => link,
        Err(e) => {
            tracing::error!("configuration error: {e:#}");
            return exit::CONFIG;
        }
    };
    let outbox = Outbox::load(state_dir.join("outbox.json"));
    let (journal, left) = Journal::load(state_dir.join("journal.json"));
    let settings = Arc::new(settings);
    let runner = Runner::new(settings.timeouts.kill_grace);
    let definition = Arc::new(crate::definition::Definition::snapshot(
        &settings.restart_on_change,
    ));

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        host = %settings.host.hostname,
        url = %settings.url,
        protocol = %settings.protocol,
        state_dir = %state_dir.display(),
        lock = %instance_lock.path().display(),
        "nixfleet-agent starting"
    );
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        spawn_signal_watcher(shutdown.clone());
        let mut notifier = Notifier::from_env();
        notifier.status("starting: reading host facts");
        let os = OsFacts::detect(&runner, &CancellationToken::new()).await;
        let startup = Startup {
            settings,
            state_dir,
            runner,
            credentials,
            outbox,
            journal,
            left,
            notifier,
            progress,
            definition,
            start,
        };
        match link {
            AnyLink::V1(link) => {
                let parts = LinkParts { link, events: None };
                Agent::new(startup, parts, os).run(shutdown).await
            }
            AnyLink::V2(link, events, task) => {
                tokio::spawn(task);
                let parts = LinkParts {
                    link,
                    events: Some(events),
                };
                Agent::new(startup, parts, os).run(shutdown).await
            }
        }
    });
    drop(instance_lock);
    tracing::info!("nixfleet-agent stopped (exit code {code})");
    code
}

/// The link for the configured protocol, built before the runtime starts (a bad CA file is a
/// configuration error, exit 78).
enum AnyLink<F> {
    V1(V1Client),
    V2(V2Link, tokio::sync::mpsc::Receiver<LinkEvent>, F),
}

impl AnyLink<()> {
    fn new(
        settings: &Settings,
        credentials: &Credentials,
    ) -> anyhow::Result<AnyLink<impl std::future::Future<Output = ()> + Send + 'static>> {
        Ok(match settings.protocol {
            Protocol::V1 => AnyLink::V1(V1Client::new(settings)?),
            Protocol::V2 => {
                let (link, events, task) = V2Link::new(settings, credentials.token().clone())?;
                AnyLink::V2(link, events, task)
            }
        })
    }
}

/// Installs the SIGTERM/SIGINT handlers at once, then waits for them on a task. Installing them
/// inside the task would leave SIGTERM fatal until the runtime first polls it, which on a host
/// where reading the facts never yields is after READY=1 has gone out.
fn spawn_signal_watcher(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will kill the agent");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
        shutdown.cancel();
    });
}
