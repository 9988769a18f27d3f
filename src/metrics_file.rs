//! The optional Prometheus metrics file (`NIXFLEET_METRICS_FILE`) for node-exporter's textfile
//! collector: monitoring that works without the dashboard.
//!
//! Text exposition format, written atomically (temp file + rename in the same directory, so
//! the collector never reads half a file) with mode 0644 (node-exporter runs as its own user),
//! and only when the content changes. The directory is the collector's: it is never created or
//! chmod-ed here. Times are unix seconds fixed when the event happened; the outage length is
//! derivable (`time() - nixfleet_agent_outage_start_timestamp_seconds`) and is also written
//! as a gauge that is refreshed whenever the file is rewritten for another reason and on each
//! retry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// The values written. Counters count since this agent started, except the restart counts,
/// which the lifecycle record keeps for the life of the state directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub version: String,
    pub hostname: String,
    pub start_time_unix: u64,
    pub last_heartbeat_unix: Option<u64>,
    pub outage_start_unix: Option<u64>,
    pub outage_seconds: u64,
    /// (command, result) -> count.
    pub commands: BTreeMap<(String, String), u64>,
    pub last_command_duration_secs: Option<f64>,
    pub timeouts: u64,
    pub restarts: BTreeMap<String, u64>,
    pub reboot_needed: bool,
    pub outbox: usize,
}

/// Escapes a label value (`\`, `"` and newlines).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The text exposition of `m`.
pub fn render(m: &Metrics) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, lines: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    gauge(
        "nixfleet_agent_up",
        "The agent is running (the file is rewritten while it runs).",
        "gauge",
        vec![(
            format!(
                "{{version=\"{}\",hostname=\"{}\"}}",
                label(&m.version),
                label(&m.hostname)
            ),
            "1".into(),
        )],
    );
    gauge(
        "nixfleet_agent_start_time_seconds",
        "When this agent instance started (unix time).",
        "gauge",
        vec![(String::new(), m.start_time_unix.to_string())],
    );
    gauge(
        "nixfleet_agent_last_heartbeat_success_timestamp_seconds",
        "When the dashboard last answered (unix time, 0 if never).",
        "gauge",
        vec![(
            String::new(),
            m.last_heartbeat_unix.unwrap_or(0).to_string(),
        )],
    );
    gauge(
        "nixfleet_agent_outage_start_timestamp_seconds",
        "When the current dashboard outage began (unix time, 0 if the dashboard is reachable).",
        "gauge",
        vec![(String::new(), m.outage_start_unix.unwrap_or(0).to_string())],
    );
    gauge(
        "nixfleet_agent_outage_seconds",
        "Length of the current dashboard outage when the file was written (0 if none).",
        "gauge",
        vec![(String::new(), m.outage_seconds.to_string())],
    );
    gauge(
        "nixfleet_agent_commands_total",
        "Commands finished since the agent started, by command and result.",
        "counter",
        m.commands
            .iter()
            .map(|((command, result), n)| {
                (
                    format!(
                        "{{command=\"{}\",result=\"{}\"}}",
                        label(command),
                        label(result)
                    ),
                    n.to_string(),
                )
            })
            .collect(),
    );
    gauge(
        "nixfleet_agent_last_command_duration_seconds",
        "How long the last finished command took.",
        "gauge",
        vec![(
            String::new(),
            format!("{:.3}", m.last_command_duration_secs.unwrap_or(0.0)),
        )],
    );
    gauge(
        "nixfleet_agent_command_timeouts_total",
        "Commands that ended in a timeout since the agent started.",
        "counter",
        vec![(String::new(), m.timeouts.to_string())],
    );
    gauge(
        "nixfleet_agent_restarts_total",
        "Agent starts by cause, over the life of the state directory.",
        "counter",
        m.restarts
            .iter()
            .map(|(cause, n)| (format!("{{cause=\"{}\"}}", label(cause)), n.to_string()))
            .collect(),
    );
    gauge(
        "nixfleet_agent_reboot_required",
        "1 when the running kernel, initrd or modules differ from the current system's.",
        "gauge",
        vec![(String::new(), u8::from(m.reboot_needed).to_string())],
    );
    gauge(
        "nixfleet_agent_outbox_reports",
        "Reports waiting to be delivered to the dashboard.",
        "gauge",
        vec![(String::new(), m.outbox.to_string())],
    );
    out
}

/// Writes the file when its text changes.
#[derive(Debug)]
pub struct MetricsFile {
    path: PathBuf,
    /// The last values handled: unchanged ones are not even rendered.
    last: Option<Metrics>,
    failed: bool,
}

impl MetricsFile {
    pub fn new(path: PathBuf) -> MetricsFile {
        MetricsFile {
            path,
            last: None,
            failed: false,
        }
    }

    pub fn write(&mut self, metrics: &Metrics) {
        if self.last.as_ref() == Some(metrics) {
            return;
        }
        self.last = Some(metrics.clone());
        let text = render(metrics);
        match crate::store::write_atomic_unsynced(&self.path, text.as_bytes(), 0o644) {
            Ok(()) => self.failed = false,
            Err(e) if !self.failed => {
                self.failed = true;
                tracing::warn!(
                    "cannot write the metrics file {} ({e}); check NIXFLEET_METRICS_FILE and \
                     that its directory exists",
                    self.path.display()
                );
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_exposition_text_and_writes_0644_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nixfleet.prom");
        let mut m = Metrics {
            version: "0.1.0".into(),
            hostname: "h\"1".into(),
            start_time_unix: 100,
            ..Metrics::default()
        };
        m.commands.insert(("switch".into(), "ok".into()), 2);
        m.restarts.insert("watchdog".into(), 1);
        let mut file = MetricsFile::new(path.clone());
        file.write(&m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("nixfleet_agent_up{version=\"0.1.0\",hostname=\"h\\\"1\"} 1\n"));
        assert!(
            text.contains("nixfleet_agent_commands_total{command=\"switch\",result=\"ok\"} 2\n")
        );
        assert!(text.contains("nixfleet_agent_restarts_total{cause=\"watchdog\"} 1\n"));
        assert!(text.contains("nixfleet_agent_reboot_required 0\n"));
        // Every sample line is `name[{labels}] value`; every metric has HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        // No temp files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
