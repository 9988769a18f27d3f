//! The fake's "database": host rows, the command log, per-host tokens and rate-limit counters.
//!
//! Every agent-visible rule of protocol §2–§4 and §8 lives here as a plain method that takes
//! the current time as an argument, so the rules are testable without sockets. This module
//! must not know about HTTP, modes or threads; the server calls it under one lock per request,
//! after body validation.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::Endpoint;
use crate::timefmt::serde_naive;
use crate::validate::{self, Registration, StatusReport, TestProgress};

/// A row of the `hosts` table (protocol §6), as the fake stores it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostRow {
    /// Lowercased host id (primary key).
    pub id: String,
    /// Lowercased hostname from the last register (or the id for poll-created rows).
    pub hostname: String,
    /// `nixos` or `macos`.
    pub host_type: String,
    /// Location text.
    pub location: Option<String>,
    /// `server|desktop|laptop|gaming`.
    pub device_type: Option<String>,
    /// `#rrggbb`.
    pub theme_color: Option<String>,
    /// `low|medium|high`; set on insert only.
    pub criticality: Option<String>,
    /// Set on insert only.
    pub icon: Option<String>,
    /// `None` until the host is "seen" (the first register does not count).
    #[serde(serialize_with = "serde_naive::optional")]
    pub last_seen: Option<SystemTime>,
    /// Set by every `ok` status report.
    #[serde(serialize_with = "serde_naive::optional")]
    pub last_switch: Option<SystemTime>,
    /// Set by a finished test run.
    #[serde(serialize_with = "serde_naive::optional")]
    pub last_audit: Option<SystemTime>,
    /// Whatever the agent last sent (register overwrites it even with null).
    pub current_generation: Option<String>,
    /// `ok|error|unknown`.
    pub status: String,
    /// The single command slot.
    pub pending_command: Option<String>,
    /// When the slot was last written by the operator API.
    #[serde(serialize_with = "serde_naive::optional")]
    pub command_queued_at: Option<SystemTime>,
    /// Operator/derived comment.
    pub comment: Option<String>,
    /// e.g. `3/3 passed`.
    pub test_status: Option<String>,
    /// Repository path the agent reported.
    pub config_repo: Option<String>,
    /// Test run in progress.
    pub test_running: bool,
    /// Current test index.
    pub test_current: i64,
    /// Number of tests.
    pub test_total: i64,
    /// Passed so far.
    pub test_passed_count: i64,
    /// Final test summary.
    pub test_result: Option<String>,
    /// Agent's heartbeat interval in seconds.
    pub poll_interval: i64,
    /// Last non-empty metrics object.
    pub metrics: Option<Value>,
    /// When `metrics` was last replaced.
    #[serde(serialize_with = "serde_naive::optional")]
    pub metrics_updated_at: Option<SystemTime>,
    /// Agent version string (≤ 20 chars).
    pub agent_version: Option<String>,
    /// Nixpkgs revision.
    pub nixpkgs_version: Option<String>,
    /// OS version.
    pub os_version: Option<String>,
    /// OS name.
    pub os_name: Option<String>,
    /// Hash of the per-host token, when one was provisioned or set.
    pub agent_token_hash: Option<String>,
}

impl HostRow {
    /// A row as the dashboard's manual add / DB insert with only an id creates it.
    fn bare(id: &str) -> HostRow {
        HostRow {
            id: id.to_owned(),
            hostname: id.to_owned(),
            host_type: "nixos".into(),
            location: Some("home".into()),
            device_type: Some("server".into()),
            theme_color: Some("#769ff0".into()),
            criticality: Some("low".into()),
            icon: None,
            last_seen: None,
            last_switch: None,
            last_audit: None,
            current_generation: None,
            status: "unknown".into(),
            pending_command: None,
            command_queued_at: None,
            comment: None,
            test_status: None,
            config_repo: None,
            test_running: false,
            test_current: 0,
            test_total: 0,
            test_passed_count: 0,
            test_result: None,
            poll_interval: 30,
            metrics: None,
            metrics_updated_at: None,
            agent_version: None,
            nixpkgs_version: None,
            os_version: None,
            os_name: None,
            agent_token_hash: None,
        }
    }

    /// Whether the dashboard would show the host online at `now` (`last_seen` < 5 min ago).
    pub fn online_at(&self, now: SystemTime) -> bool {
        self.last_seen.is_some_and(|seen| {
            now.duration_since(seen).unwrap_or_default() < Duration::from_secs(300)
        })
    }

    /// Whether a per-host token hash is stored.
    pub fn has_agent_token(&self) -> bool {
        self.agent_token_hash.is_some()
    }
}

/// A row of the `command_log` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogRow {
    /// Autoincrement id, global across hosts.
    pub id: i64,
    /// Lowercased host id.
    pub host_id: String,
    /// The delivered command.
    pub command: String,
    /// `running` until the first status report after delivery, then that report's status.
    pub status: String,
    /// Cleaned output of the closing report.
    pub output: Option<String>,
    /// Delivery time.
    #[serde(serialize_with = "serde_naive::required")]
    pub created_at: SystemTime,
    /// Closing report time.
    #[serde(serialize_with = "serde_naive::optional")]
    pub completed_at: Option<SystemTime>,
}

/// Why the operator API (§4, §5) refused to queue a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// 422: the name is not `pull|switch|pull-switch|test|stop|restart`.
    InvalidCommand(String),
    /// 400: the host id does not match the id pattern.
    InvalidHostId(String),
    /// 404: no such host row.
    NotFound,
    /// 409: `last_seen` is NULL.
    NeverSeen,
    /// 409: `last_seen` is more than 300 s old.
    Offline {
        /// Whole minutes since `last_seen`.
        minutes: u64,
    },
}

impl QueueError {
    /// The HTTP status the real operator endpoint answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            QueueError::InvalidCommand(_) => 422,
            QueueError::InvalidHostId(_) => 400,
            QueueError::NotFound => 404,
            QueueError::NeverSeen | QueueError::Offline { .. } => 409,
        }
    }
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::InvalidCommand(c) => {
                write!(f, "String should match pattern for command {c:?}")
            }
            QueueError::InvalidHostId(_) => f.write_str("Invalid host ID format"),
            QueueError::NotFound => f.write_str("Host not found"),
            QueueError::NeverSeen => f.write_str("Host has never been seen online"),
            QueueError::Offline { minutes } => {
                write!(f, "Host is offline (last seen {minutes} minutes ago)")
            }
        }
    }
}

impl std::error::Error for QueueError {}

/// What a register or poll hands back to the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The command taken out of the slot, if any.
    pub command: Option<String>,
    /// A freshly provisioned raw per-host token, if any.
    pub agent_token: Option<String>,
}

/// A fixed rate-limit window (slowapi "N per 1 minute", starting at the first hit).
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    hits: u32,
}

/// Commands the operator API accepts (§4).
pub const QUEUEABLE: [&str; 6] = ["pull", "switch", "pull-switch", "test", "stop", "restart"];

/// The in-memory database.
#[derive(Debug, Default)]
pub struct Db {
    hosts: BTreeMap<String, HostRow>,
    logs: Vec<LogRow>,
    next_log_id: i64,
    /// Raw tokens the fake handed out or was given, so tests can impersonate a host.
    issued: HashMap<String, String>,
    rate: HashMap<(IpAddr, Endpoint), Window>,
}

/// The per-endpoint limit of §8, per client IP per minute.
pub fn rate_limit_of(endpoint: Endpoint) -> Option<u32> {
    match endpoint {
        Endpoint::Register | Endpoint::Status => Some(30),
        Endpoint::Poll | Endpoint::TestProgress => Some(60),
        Endpoint::Health | Endpoint::Other => None,
    }
}

/// Stored form of a token. The real server keys an HMAC with a server secret; a salted SHA-256
/// gives the same property the agent can observe (the raw token is not recoverable).
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(format!("fake-dashboard-token-hash-secret:{token}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `secrets.token_urlsafe(32)`: 32 random bytes, base64url without padding, 43 chars.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    fastrand::fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Db {
    /// The row for an already-lowercased id.
    pub fn host(&self, id: &str) -> Option<&HostRow> {
        self.hosts.get(id)
    }

    /// The command log of one host, oldest first.
    pub fn logs(&self, id: &str) -> Vec<LogRow> {
        self.logs
            .iter()
            .filter(|l| l.host_id == id)
            .cloned()
            .collect()
    }

    /// The last raw token provisioned for or set on `id`.
    pub fn issued_token(&self, id: &str) -> Option<String> {
        self.issued.get(id).cloned()
    }

    /// §2.1: per-host token (own host only), then the shared token when allowed.
    pub fn authorize(
        &self,
        id: &str,
        bearer: Option<&str>,
        shared: Option<&str>,
        allow_shared: bool,
    ) -> bool {
        let Some(token) = bearer.filter(|t| !t.is_empty()) else {
            return false;
        };
        if let Some(stored) = self
            .hosts
            .get(id)
            .and_then(|h| h.agent_token_hash.as_deref())
            && constant_time_eq(stored.as_bytes(), token_hash(token).as_bytes())
        {
            return true;
        }
        allow_shared
            && shared
                .is_some_and(|s| !s.is_empty() && constant_time_eq(s.as_bytes(), token.as_bytes()))
    }

    /// Counts one hit and says whether it is over the limit (§8).
    pub fn rate_limited(&mut self, ip: IpAddr, endpoint: Endpoint, now: Instant) -> bool {
        let Some(limit) = rate_limit_of(endpoint) else {
            return false;
        };
        let w = self.rate.entry((ip, endpoint)).or_insert(Window {
            started: now,
            hits: 0,
        });
        if now.duration_since(w.started) >= Duration::from_secs(60) {
            *w = Window {
                started: now,
                hits: 0,
            };
        }
        w.hits += 1;
        w.hits > limit
    }

    /// Forgets every rate-limit window.
    pub fn reset_rate_limits(&mut self) {
        self.rate.clear();
    }

    /// §3.1 `POST /register` after validation, host-id check and auth.
    pub fn register(
        &mut self,
        id: &str,
        r: Registration,
        now: SystemTime,
        provision: bool,
    ) -> Delivery {
        let metrics = r.metrics.filter(|m| !m.is_empty()).map(Value::Object);
        let metrics_updated_at = metrics.as_ref().map(|_| now);
        match self.hosts.get_mut(id) {
            Some(h) => {
                h.hostname = r.hostname;
                h.host_type = r.host_type;
                h.location = r.location.or(h.location.take());
                h.device_type = r.device_type.or(h.device_type.take());
                h.theme_color = r.theme_color.or(h.theme_color.take());
                h.current_generation = r.current_generation;
                h.last_seen = Some(now);
                h.status = "ok".into();
                h.config_repo = r.config_repo.or(h.config_repo.take());
                h.poll_interval = r.poll_interval.unwrap_or(h.poll_interval);
                h.agent_version = r.agent_version.or(h.agent_version.take());
                h.nixpkgs_version = r.nixpkgs_version.or(h.nixpkgs_version.take());
                h.os_version = r.os_version.or(h.os_version.take());
                h.os_name = r.os_name.or(h.os_name.take());
                h.metrics = metrics.or(h.metrics.take());
                h.metrics_updated_at = metrics_updated_at.or(h.metrics_updated_at);
            }
            None => {
                let row = HostRow {
                    hostname: r.hostname,
                    host_type: r.host_type,
                    location: r.location,
                    device_type: Some(r.device_type.unwrap_or_else(|| "server".into())),
                    theme_color: Some(r.theme_color.unwrap_or_else(|| "#769ff0".into())),
                    criticality: Some(r.criticality.unwrap_or_else(|| "low".into())),
                    icon: r.icon,
                    current_generation: r.current_generation,
                    // [quirk] the first register does not make the host "seen".
                    last_seen: None,
                    status: "ok".into(),
                    comment: r.comment,
                    config_repo: r.config_repo,
                    poll_interval: r.poll_interval.unwrap_or(30),
                    agent_version: r.agent_version,
                    nixpkgs_version: r.nixpkgs_version,
                    os_version: r.os_version,
                    os_name: r.os_name,
                    metrics,
                    metrics_updated_at,
                    ..HostRow::bare(id)
                };
                self.hosts.insert(id.to_owned(), row);
            }
        }
        self.provision_and_deliver(id, now, provision)
    }

    /// §3.2 `GET /poll` after host-id check and auth.
    pub fn poll(&mut self, id: &str, now: SystemTime, provision: bool) -> Delivery {
        let row = self.hosts.entry(id.to_owned()).or_insert_with(|| HostRow {
            status: "ok".into(),
            ..HostRow::bare(id)
        });
        row.last_seen = Some(now);
        self.provision_and_deliver(id, now, provision)
    }

    fn provision_and_deliver(&mut self, id: &str, now: SystemTime, provision: bool) -> Delivery {
        let Some(row) = self.hosts.get_mut(id) else {
            return Delivery::default();
        };
        let mut out = Delivery::default();
        if provision && row.agent_token_hash.is_none() {
            let token = new_token();
            row.agent_token_hash = Some(token_hash(&token));
            self.issued.insert(id.to_owned(), token.clone());
            out.agent_token = Some(token);
        }
        if let Some(command) = row.pending_command.take() {
            self.next_log_id += 1;
            self.logs.push(LogRow {
                id: self.next_log_id,
                host_id: id.to_owned(),
                command: command.clone(),
                status: "running".into(),
                output: None,
                created_at: now,
                completed_at: None,
            });
            out.command = Some(command);
        }
        out
    }

    /// §3.3 `POST /status` after validation, host-id check and auth. Unknown hosts: no change.
    pub fn status(&mut self, id: &str, s: StatusReport, now: SystemTime) {
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        let mut comment = s.comment;
        if comment.as_deref().is_none_or(str::is_empty)
            && let Some(output) = s.output.as_deref().filter(|o| !o.is_empty())
        {
            let first_line: String = output
                .split('\n')
                .next()
                .unwrap_or("")
                .chars()
                .take(100)
                .collect();
            if s.status == "error" {
                comment = Some(first_line);
            } else if output.contains("Already up to date") || output.contains("Already up-to-date")
            {
                comment = Some("Already up to date".into());
            } else if output.contains("Updating") {
                comment = Some("Pull successful".into());
            }
        }
        h.status = s.status.clone();
        if s.current_generation.is_some() {
            h.current_generation = s.current_generation;
        }
        h.last_seen = Some(now);
        if s.test_status.is_some() {
            h.test_status = s.test_status;
        }
        if comment.is_some() {
            h.comment = comment;
        }
        if s.status == "ok" {
            h.last_switch = Some(now);
        }
        // The newest open row by created_at (ties: the later insert).
        if let Some(row) = self
            .logs
            .iter_mut()
            .rev()
            .filter(|l| l.host_id == id && l.completed_at.is_none())
            .max_by_key(|l| l.created_at)
        {
            row.status = s.status;
            row.output = s.output;
            row.completed_at = Some(now);
        }
    }

    /// §3.4 `POST /test-progress` after validation, host-id check and auth.
    pub fn test_progress(&mut self, id: &str, p: TestProgress, now: SystemTime) {
        let Some(h) = self.hosts.get_mut(id) else {
            return;
        };
        h.test_current = p.current;
        h.test_total = p.total;
        h.test_passed_count = p.passed;
        h.last_seen = Some(now);
        if p.running {
            h.test_running = true;
        } else {
            h.test_running = false;
            h.test_result = p.result;
            h.test_status = Some(format!("{}/{} passed", p.passed, p.total));
            if p.comment.is_some() {
                h.comment = p.comment;
            }
            h.last_audit = Some(now);
            // [bug] a command queued while the test ran is silently dropped.
            h.pending_command = None;
        }
    }

    /// §4/§5 operator queue. `id` is the raw path id (validated and lowercased here).
    pub fn queue_command(
        &mut self,
        id: &str,
        command: &str,
        now: SystemTime,
    ) -> Result<(), QueueError> {
        if !QUEUEABLE.contains(&command) {
            return Err(QueueError::InvalidCommand(command.to_owned()));
        }
        if !validate::is_host_id(id) {
            return Err(QueueError::InvalidHostId(id.to_owned()));
        }
        let h = self
            .hosts
            .get_mut(&id.to_lowercase())
            .ok_or(QueueError::NotFound)?;
        let Some(seen) = h.last_seen else {
            return Err(QueueError::NeverSeen);
        };
        let age = now.duration_since(seen).unwrap_or_default();
        if age > Duration::from_secs(300) {
            return Err(QueueError::Offline {
                minutes: age.as_secs() / 60,
            });
        }
        match command {
            "stop" => {
                h.pending_command = None;
                h.test_running = false;
                h.status = "ok".into();
            }
            "test" => {
                h.pending_command = Some("test".into());
                h.command_queued_at = Some(now);
                h.test_running = true;
                h.test_current = 0;
                h.test_total = 0;
                h.test_passed_count = 0;
                h.test_result = None;
            }
            other => {
                h.pending_command = Some(other.to_owned());
                h.command_queued_at = Some(now);
            }
        }
        Ok(())
    }

    /// Writes the slot directly, like `UPDATE hosts SET pending_command=...`; creates a bare row
    /// (never seen) when the host does not exist.
    pub fn force_command(&mut self, id: &str, command: &str, now: SystemTime) {
        let h = self.ensure_host(id);
        h.pending_command = Some(command.to_owned());
        h.command_queued_at = Some(now);
    }

    /// Like the operator's manual add: a never-seen row. Returns false if it already existed.
    pub fn add_host(&mut self, id: &str) -> bool {
        let id = id.to_lowercase();
        if self.hosts.contains_key(&id) {
            return false;
        }
        self.ensure_host(&id).comment = Some("Manually added, awaiting agent connection".into());
        true
    }

    /// Like an operator token rotation (creates a bare row if needed).
    pub fn set_host_token(&mut self, id: &str, token: &str) {
        let id = id.to_lowercase();
        self.ensure_host(&id).agent_token_hash = Some(token_hash(token));
        self.issued.insert(id, token.to_owned());
    }

    /// Overrides `last_seen` (e.g. to make a host look offline).
    pub fn set_last_seen(&mut self, id: &str, at: Option<SystemTime>) {
        if let Some(h) = self.hosts.get_mut(&id.to_lowercase()) {
            h.last_seen = at;
        }
    }

    fn ensure_host(&mut self, id: &str) -> &mut HostRow {
        let id = id.to_lowercase();
        self.hosts
            .entry(id.clone())
            .or_insert_with(|| HostRow::bare(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn reg(body: Value) -> Registration {
        validate::registration(body.to_string().as_bytes(), None).unwrap()
    }

    fn status(body: Value) -> StatusReport {
        validate::status_report(body.to_string().as_bytes(), None).unwrap()
    }

    fn basic() -> Value {
        json!({"hostname": "Web", "host_type": "nixos", "current_generation": "abc", "location": "cloud"})
    }

    #[test]
    fn first_register_inserts_unseen_row_then_heartbeat_updates() {
        let mut db = Db::default();
        db.register("web", reg(basic()), t(0), false);
        let h = db.host("web").unwrap();
        assert_eq!(
            (h.last_seen, h.status.as_str(), h.poll_interval),
            (None, "ok", 30)
        );
        assert_eq!(h.location.as_deref(), Some("cloud"));
        assert_eq!(
            db.queue_command("web", "pull", t(1)),
            Err(QueueError::NeverSeen)
        );

        db.register(
            "web",
            reg(json!({"hostname": "web", "host_type": "macos"})),
            t(2),
            false,
        );
        let h = db.host("web").unwrap();
        assert_eq!(h.last_seen, Some(t(2)));
        assert_eq!(
            h.location.as_deref(),
            Some("cloud"),
            "null keeps the old value"
        );
        assert_eq!(
            h.current_generation, None,
            "[quirk] omitted generation overwrites with NULL"
        );
        assert_eq!(h.host_type, "macos");
    }

    #[test]
    fn heartbeat_resets_error_status() {
        let mut db = Db::default();
        db.register("web", reg(basic()), t(0), false);
        db.status(
            "web",
            status(json!({"status": "error", "output": "boom\nmore"})),
            t(1),
        );
        assert_eq!(db.host("web").unwrap().status, "error");
        assert_eq!(db.host("web").unwrap().comment.as_deref(), Some("boom"));
        db.register("web", reg(basic()), t(2), false);
        assert_eq!(db.host("web").unwrap().status, "ok");
    }

    #[test]
    fn token_is_provisioned_once_and_only_valid_for_its_host() {
        let mut db = Db::default();
        let d = db.register("web", reg(basic()), t(0), true);
        let token = d.agent_token.unwrap();
        assert_eq!(token.len(), 43);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(
            db.register("web", reg(basic()), t(1), true).agent_token,
            None
        );
        assert!(db.authorize("web", Some(&token), Some("shared"), false));
        assert!(!db.authorize("db", Some(&token), Some("shared"), false));
        assert!(db.authorize("db", Some("shared"), Some("shared"), true));
        assert!(!db.authorize("db", Some("shared"), Some("shared"), false));
        assert!(!db.authorize("db", Some(""), Some(""), true));
    }

    #[test]
    fn comment_derivation_keeps_previous_when_nothing_matches() {
        let mut db = Db::default();
        db.register("web", reg(basic()), t(0), false);
        db.status(
            "web",
            status(json!({"status": "ok", "output": "Updating 1..2"})),
            t(1),
        );
        assert_eq!(
            db.host("web").unwrap().comment.as_deref(),
            Some("Pull successful")
        );
        db.status(
            "web",
            status(json!({"status": "ok", "output": "Switch: done"})),
            t(2),
        );
        assert_eq!(
            db.host("web").unwrap().comment.as_deref(),
            Some("Pull successful")
        );
        db.status(
            "web",
            status(json!({"status": "ok", "output": "x Already up-to-date."})),
            t(3),
        );
        assert_eq!(
            db.host("web").unwrap().comment.as_deref(),
            Some("Already up to date")
        );
        assert_eq!(db.host("web").unwrap().last_switch, Some(t(3)));
    }

    #[test]
    fn stop_and_test_queue_semantics() {
        let mut db = Db::default();
        db.poll("web", t(0), false);
        db.host("web").unwrap();
        db.queue_command("web", "test", t(1)).unwrap();
        let h = db.host("web").unwrap();
        assert!(h.test_running);
        assert_eq!(h.pending_command.as_deref(), Some("test"));
        db.queue_command("WEB", "stop", t(2)).unwrap();
        let h = db.host("web").unwrap();
        assert!(!h.test_running);
        assert_eq!(h.pending_command, None);
        assert_eq!(
            db.queue_command("web", "update", t(3)),
            Err(QueueError::InvalidCommand("update".into()))
        );
        assert_eq!(
            db.queue_command("nope", "pull", t(3)),
            Err(QueueError::NotFound)
        );
        assert_eq!(
            db.queue_command("web", "pull", t(301)),
            Err(QueueError::Offline { minutes: 5 })
        );
    }

    #[test]
    fn rate_window_is_fixed_from_the_first_hit() {
        let mut db = Db::default();
        let ip: IpAddr = [127, 0, 0, 1].into();
        let start = Instant::now();
        for _ in 0..30 {
            assert!(!db.rate_limited(ip, Endpoint::Register, start));
        }
        assert!(db.rate_limited(ip, Endpoint::Register, start + Duration::from_secs(59)));
        assert!(!db.rate_limited(ip, Endpoint::Poll, start));
        assert!(!db.rate_limited(ip, Endpoint::Register, start + Duration::from_secs(60)));
    }
}
