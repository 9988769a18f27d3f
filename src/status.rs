//! `nixfleet-agent status [--json]`, and the status record it reads.
//!
//! The main loop writes `status.json` in the state directory (atomically, no fsync, 0600) *only
//! when its content changes*: every time in it is an absolute unix time fixed when the event
//! happened (last heartbeat, outage start, next retry, step start), so an idle tick writes
//! nothing and costs one serialisation and a comparison. `status` runs as a separate process
//! and reads that record together with the files that stay true when the agent is wedged or
//! dead: the instance lock's holder record and the progress file's mtime (runtime directory),
//! the command journal, the outbox and the lifecycle record (state directory). It never takes
//! a lock, never signals and never writes anything.
//!
//! Exit code for monitoring: 0 healthy, 1 degraded (dashboard unreachable, reports waiting),
//! 2 stuck (no loop progress) or not running.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Settings, human_duration};

/// The record's file name in the state directory.
pub const STATUS_FILE: &str = "status.json";
const VERSION: u32 = 1;

/// How stale the recorded last heartbeat may get while nothing else changes.
pub const HEARTBEAT_REFRESH: Duration = Duration::from_secs(60);

/// Healthy, degraded or stuck/not running: `status`'s exit code.
pub const HEALTHY: u8 = 0;
pub const DEGRADED: u8 = 1;
pub const DOWN: u8 = 2;

/// What the running agent says about itself (`status.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub version: u32,
    pub pid: u32,
    pub agent_version: String,
    pub started_unix: u64,
    pub restart_cause: String,
    /// `idle`, `running <command>`, `stopping (exit code N)`.
    pub state: String,
    pub last_heartbeat_unix: Option<u64>,
    pub outage_since_unix: Option<u64>,
    pub outage_reason: Option<String>,
    pub next_retry_unix: Option<u64>,
    pub running: Option<RunningRecord>,
    pub queued: Vec<String>,
    pub outbox: usize,
    pub reboot_needed: Option<String>,
    /// A change made outside the agent, waiting for the agent to be idle to restart.
    pub pending_restart: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRecord {
    pub command: String,
    pub step: String,
    pub started_unix: u64,
    pub step_started_unix: u64,
    pub step_timeout_secs: Option<u64>,
    /// Its switch runs outside the agent (a transient unit or its own session).
    pub detached: bool,
}

impl StatusRecord {
    pub fn new() -> StatusRecord {
        StatusRecord {
            version: VERSION,
            ..StatusRecord::default()
        }
    }
}

/// Writes the record when it differs from the last one written.
#[derive(Debug)]
pub struct Publisher {
    path: PathBuf,
    /// The last record handled: an unchanged one is not even serialised.
    last: Option<StatusRecord>,
    /// Writes so far (for the benchmark and the tests).
    pub writes: u64,
}

impl Publisher {
    pub fn new(state_dir: &Path) -> Publisher {
        Publisher {
            path: state_dir.join(STATUS_FILE),
            last: None,
            writes: 0,
        }
    }

    pub fn publish(&mut self, record: &StatusRecord) {
        if self.last.as_ref() == Some(record) {
            return;
        }
        // A heartbeat alone refreshes the file at most once a minute: its time is all that
        // changed, and a write per heartbeat would be most of an idle heartbeat's cost.
        if let Some(last) = &self.last {
            let mut same_but_beat = record.clone();
            same_but_beat.last_heartbeat_unix = last.last_heartbeat_unix;
            let beat_moved = record
                .last_heartbeat_unix
                .unwrap_or(0)
                .saturating_sub(last.last_heartbeat_unix.unwrap_or(0));
            if same_but_beat == *last
                && last.last_heartbeat_unix.is_some()
                && beat_moved < HEARTBEAT_REFRESH.as_secs()
            {
                return;
            }
        }
        // Once per distinct content, written or not: the next change tries again.
        self.last = Some(record.clone());
        let Ok(bytes) = serde_json::to_vec_pretty(record) else {
            return;
        };
        match crate::store::write_atomic_unsynced(&self.path, &bytes, 0o600) {
            Ok(()) => self.writes += 1,
            Err(e) => tracing::warn!("cannot write {}: {e}", self.path.display()),
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ago(unix: u64, now: u64) -> String {
    short(Duration::from_secs(now.saturating_sub(unix)))
}

fn short(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Everything `status` found, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub health: &'static str,
    pub exit_code: u8,
    pub summary: String,
    pub state_dir: PathBuf,
    pub runtime_dir: Option<PathBuf>,
    pub lock_holder: Option<LockHolder>,
    pub last_progress_secs_ago: Option<u64>,
    pub agent: Option<StatusRecord>,
    pub journal: Option<serde_json::Value>,
    pub outbox_reports: usize,
    pub lifecycle: Option<crate::restart_cause::Lifecycle>,
    pub config: String,
}

#[derive(Debug, Serialize)]
pub struct LockHolder {
    pub pid: i32,
    pub version: String,
    pub started_unix: u64,
    pub exe: PathBuf,
    pub alive: bool,
}

/// The first existing directory of `candidates`.
fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|d| d.is_dir()).cloned()
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Gathers the report. `state_dirs`/`runtime_dirs` are the agent's candidates, in its order.
pub fn gather(settings: &Settings, state_dirs: &[PathBuf], runtime_dirs: &[PathBuf]) -> Report {
    let state_dir = first_existing(state_dirs)
        .or_else(|| state_dirs.first().cloned())
        .unwrap_or_default();
    // The agent locks in the first usable candidate (the state directory is the last one).
    let runtime_dir = runtime_dirs
        .iter()
        .find(|d| d.join(crate::lock::LOCK_FILE).exists())
        .cloned();
    let lock_holder = runtime_dir.as_deref().and_then(|d| {
        let (holder, alive) = crate::lock::inspect(d)?;
        Some(LockHolder {
            pid: holder.pid,
            version: holder.version,
            started_unix: holder.started_at_unix,
            exe: holder.exe,
            alive,
        })
    });
    let progress = runtime_dir.as_deref().and_then(|d| {
        crate::supervisor::progress::progress_age(&d.join(crate::lock::PROGRESS_FILE))
    });
    let agent: Option<StatusRecord> = std::fs::read(state_dir.join(STATUS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let journal = read_json(&state_dir.join("journal.json"));
    let outbox_reports = read_json(&state_dir.join("outbox.json"))
        .and_then(|o| Some(o.get("entries")?.as_array()?.len()))
        .unwrap_or(0);
    let lifecycle = crate::restart_cause::read_lifecycle(&state_dir);
    let alive = lock_holder.as_ref().is_some_and(|h| h.alive);
    // The record is about the live holder only if it is that process's.
    let current = agent.as_ref().filter(|a| {
        lock_holder
            .as_ref()
            .is_some_and(|h| h.alive && h.pid as u32 == a.pid)
    });
    let (health, exit_code, summary) = if !alive {
        (
            "not running",
            DOWN,
            "not running: no agent holds the lock".to_string(),
        )
    } else if progress
        .is_none_or(|age| age > crate::supervisor::progress::stuck_after(settings.stall_timeout))
    {
        (
            "stuck",
            DOWN,
            format!(
                "stuck: the main loop made no progress for {} (the stall monitor exits it after \
                 {})",
                progress.map_or("an unknown time".into(), short),
                human_duration(settings.stall_timeout)
            ),
        )
    } else if let Some(since) = current.and_then(|a| a.outage_since_unix) {
        (
            "degraded",
            DEGRADED,
            format!(
                "degraded: dashboard unreachable for {}",
                ago(since, now_unix())
            ),
        )
    } else if outbox_reports > 0 {
        (
            "degraded",
            DEGRADED,
            format!("degraded: {outbox_reports} report(s) waiting to be delivered"),
        )
    } else {
        ("healthy", HEALTHY, "healthy".to_string())
    };
    Report {
        health,
        exit_code,
        summary,
        state_dir,
        runtime_dir,
        lock_holder,
        last_progress_secs_ago: progress.map(|p| p.as_secs()),
        agent,
        journal,
        outbox_reports,
        lifecycle,
        config: settings.describe(),
    }
}

/// The one-screen text.
pub fn render(r: &Report) -> String {
    let now = now_unix();
    let mut out = String::new();
    let _ = writeln!(out, "nixfleet-agent: {}", r.summary);
    match &r.lock_holder {
        Some(h) => {
            let _ = writeln!(
                out,
                "  agent:      pid {} ({}), version {}, started {} ago{}",
                h.pid,
                if h.alive { "holds the lock" } else { "gone" },
                if h.version.is_empty() {
                    "?"
                } else {
                    &h.version
                },
                ago(h.started_unix, now),
                if h.exe.as_os_str().is_empty() {
                    String::new()
                } else {
                    format!(", {}", h.exe.display())
                }
            );
        }
        None => {
            let _ = writeln!(out, "  agent:      no lock record");
        }
    }
    let alive = r.lock_holder.as_ref().is_some_and(|h| h.alive);
    if let Some(age) = r.last_progress_secs_ago.filter(|_| alive) {
        let _ = writeln!(
            out,
            "  main loop:  last progress {} ago",
            short(Duration::from_secs(age))
        );
    }
    let record = r.agent.as_ref().filter(|a| {
        r.lock_holder
            .as_ref()
            .is_some_and(|h| h.pid as u32 == a.pid)
    });
    // A dead agent's record is what it last said, not the present.
    let label = |name: &str| {
        if alive {
            format!("{name}:")
        } else {
            format!("{name} (last known):")
        }
    };
    if let Some(a) = record {
        let link = match (a.outage_since_unix, a.last_heartbeat_unix) {
            (Some(since), last) => format!(
                "unreachable for {} ({}), next retry in {}{}",
                ago(since, now),
                a.outage_reason.as_deref().unwrap_or("?"),
                short(Duration::from_secs(
                    a.next_retry_unix.unwrap_or(now).saturating_sub(now)
                )),
                last.map(|l| format!("; last heartbeat {} ago", ago(l, now)))
                    .unwrap_or_default()
            ),
            (None, Some(last)) => format!("last heartbeat {} ago", ago(last, now)),
            (None, None) => "no heartbeat yet".into(),
        };
        let _ = writeln!(out, "  {:<11} {link}", label("dashboard"));
        match &a.running {
            Some(run) => {
                let timeout = run
                    .step_timeout_secs
                    .map(|t| format!(" of {}", short(Duration::from_secs(t))))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<11} {} for {}, step {} for {}{timeout}{}",
                    label("command"),
                    run.command,
                    ago(run.started_unix, now),
                    run.step,
                    ago(run.step_started_unix, now),
                    if run.detached {
                        "; its switch runs outside the agent"
                    } else {
                        ""
                    }
                );
            }
            None => {
                let _ = writeln!(out, "  {:<11} none ({})", label("command"), a.state);
            }
        }
        if !a.queued.is_empty() {
            let _ = writeln!(out, "  queued:     {}", a.queued.join(", "));
        }
        if let Some(reason) = &a.pending_restart {
            let _ = writeln!(out, "  restart:    pending when idle: {reason}");
        }
    } else if let Some(j) = &r.journal {
        // No live record: what the journal says the agent was doing.
        if let Some(run) = j.get("running").filter(|v| !v.is_null()) {
            let _ = writeln!(
                out,
                "  command:    {} (step {}) per the journal, started {} ago{}",
                run.get("command").and_then(|v| v.as_str()).unwrap_or("?"),
                run.get("step").and_then(|v| v.as_str()).unwrap_or("?"),
                ago(
                    run.get("started_unix")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(now),
                    now
                ),
                if run.get("detached").is_some_and(|d| !d.is_null()) {
                    "; a detached switch is in flight"
                } else {
                    ""
                }
            );
        }
        if let Some(q) = j
            .get("queued")
            .and_then(|q| q.as_array())
            .filter(|q| !q.is_empty())
        {
            let names: Vec<_> = q.iter().filter_map(|v| v.as_str()).collect();
            let _ = writeln!(out, "  queued:     {}", names.join(", "));
        }
    }
    let _ = writeln!(out, "  outbox:     {} report(s) waiting", r.outbox_reports);
    if let Some(reboot) = record.and_then(|a| a.reboot_needed.as_deref()) {
        let _ = writeln!(out, "  reboot:     {reboot}");
    }
    if let Some(l) = &r.lifecycle {
        let cause = l
            .cause
            .as_ref()
            .map_or_else(|| "unknown".into(), crate::restart_cause::Cause::text);
        let _ = writeln!(
            out,
            "  last start: {cause} ({} ago)",
            ago(l.started_unix, now)
        );
        if let Some(exit) = &l.exit {
            let _ = writeln!(
                out,
                "  last exit:  code {} ({:?}), {} ago",
                exit.code,
                exit.reason,
                ago(exit.unix, now)
            );
        }
    }
    let _ = writeln!(out, "  state dir:  {}", r.state_dir.display());
    // The settings that matter when reading the above, a few to a line (token redacted).
    let wanted = [
        "url",
        "token",
        "hostname",
        "interval",
        "repo",
        "switch_mode",
        "switch_isolation",
        "stall_timeout",
    ];
    let items: Vec<&str> = r
        .config
        .lines()
        .filter(|l| wanted.iter().any(|k| l.starts_with(&format!("{k} = "))))
        .collect();
    let mut line = String::from("  config:    ");
    for item in items {
        if line.len() > 14 && line.len() + item.len() > 98 {
            let _ = writeln!(out, "{}", line.trim_end_matches([',', ' ']));
            line = String::from("             ");
        }
        line.push_str(item);
        line.push_str(", ");
    }
    let _ = writeln!(out, "{}", line.trim_end_matches([',', ' ']));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publisher_writes_only_when_the_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Publisher::new(dir.path());
        let mut record = StatusRecord::new();
        record.state = "idle".into();
        for _ in 0..100 {
            p.publish(&record);
        }
        assert_eq!(p.writes, 1);
        record.last_heartbeat_unix = Some(1);
        p.publish(&record);
        p.publish(&record);
        assert_eq!(p.writes, 2);
        let back: StatusRecord =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATUS_FILE)).unwrap()).unwrap();
        assert_eq!(back, record);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(STATUS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short(Duration::from_secs(59)), "59s");
        assert_eq!(short(Duration::from_secs(252)), "4m12s");
        assert_eq!(short(Duration::from_secs(90000)), "1d1h");
    }
}
