//! Logging setup: native journald records under systemd, readable timestamped lines elsewhere.
//!
//! Under journald (`JOURNAL_STREAM` names our stderr) records go to the journal socket with
//! `SYSLOG_IDENTIFIER=nixfleet-agent`, the right priority, and our structured fields as they are
//! (`NIXFLEET_COMMAND`, `NIXFLEET_STEP`, `NIXFLEET_EXIT_CODE`, `NIXFLEET_DURATION_MS`), so
//! `journalctl -u nixfleet-agent NIXFLEET_COMMAND=switch` works. Elsewhere (launchd log files,
//! a terminal) plain lines go to stderr. The level comes from `NIXFLEET_LOG`, then `RUST_LOG`,
//! then the config file's `log`, default `info`.

use std::os::unix::fs::MetadataExt as _;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, reload};

/// Lets the config file's `log` setting apply after logging is already up.
pub struct LogHandle {
    reload: reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    from_env: bool,
}

impl LogHandle {
    /// Applies the config file's filter unless the environment already chose one.
    pub fn apply_config(&self, filter: Option<&str>) {
        let Some(filter) = filter.filter(|_| !self.from_env) else {
            return;
        };
        match EnvFilter::try_new(filter) {
            Ok(f) => {
                let _ = self.reload.reload(f);
            }
            Err(e) => tracing::warn!("ignoring invalid log filter {filter:?}: {e}"),
        }
    }
}

/// True when stderr is connected to journald (systemd sets `JOURNAL_STREAM=<dev>:<ino>`).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/dev/stderr") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the global subscriber. Call once, first thing.
pub fn init() -> LogHandle {
    let env_filter = std::env::var("NIXFLEET_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .filter(|f| !f.is_empty());
    let from_env = env_filter.is_some();
    let filter = env_filter
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, reload) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let journald = stderr_is_journal()
        .then(|| {
            tracing_journald::layer().ok().map(|l| {
                l.with_syslog_identifier("nixfleet-agent".into())
                    .with_field_prefix(None)
            })
        })
        .flatten();
    match journald {
        Some(layer) => registry.with(layer.boxed()).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .with_target(false)
                    .boxed(),
            )
            .init(),
    }
    LogHandle { reload, from_env }
}
