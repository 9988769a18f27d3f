//! The seam between the agent and a dashboard: what the main loop sends ([`Outgoing`]), what
//! the wire turns into ([`LinkEvent`], [`Reply`]), and the [`Link`] trait a protocol implements.
//! Only this module and its children know about JSON, HTTP and WebSockets; the executor, the
//! journal, the outbox and the loop speak in these types.
//!
//! Two protocols: NixFleet v1 ([`v1`], HTTP polling, `docs/protocol-v1.md`) and v2 ([`v2`], one
//! WebSocket, `docs/protocol-v2.md`). The loop learns the few things that differ for it from
//! [`LinkTraits`] (how a result is tied to its command, whether output streams live), never
//! from the protocol's name.

mod dial;
mod http1;
pub mod tls;
pub mod v1;
pub mod v2;

use std::fmt;
use std::future::Future;

use serde::{Deserialize, Serialize};

/// Host metrics sent with a heartbeat (`cpu`/`ram`/`swap` in percent, `load` as v1's string).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub cpu: f64,
    pub ram: f64,
    pub swap: f64,
    pub load: String,
}

/// Everything a heartbeat carries (v1: `POST /register`; v2: `register` and `heartbeat`).
/// Serialized as is for v1; the v2 link builds its own messages from it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Heartbeat {
    pub hostname: String,
    pub host_type: &'static str,
    pub location: String,
    pub device_type: String,
    pub theme_color: Option<String>,
    pub criticality: &'static str,
    pub current_generation: Option<String>,
    pub config_repo: Option<String>,
    pub poll_interval: u64,
    pub agent_version: String,
    pub nixpkgs_version: Option<String>,
    pub os_version: Option<String>,
    pub os_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The command running now (v2 `pending_command`; v1 has no such field).
    #[serde(skip)]
    pub running: Option<String>,
    /// The config repository's remote URL, credentials removed (v2 `repo_url`).
    #[serde(skip)]
    pub repo_url: Option<String>,
    /// SHA-256 of the repository's `flake.lock` (v2 `lock_hash`), computed when it can change.
    #[serde(skip)]
    pub lock_hash: Option<String>,
    /// The Lock, System and Tests compartments (v2 `update_status`).
    #[serde(skip)]
    pub checks: HostChecks,
}

/// One status compartment as the v2 dashboard shows it (`update_status`, contract §6.2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// `ok`, `outdated`, `working`, `error`, `unknown`, or empty when never checked.
    pub status: String,
    pub message: String,
    /// RFC 3339 UTC, empty when never checked.
    pub checked_at: String,
}

/// What the agent knows of the host's Lock, System and Tests compartments (v2 heartbeats;
/// the v1 dashboard has no such field).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostChecks {
    pub lock: Check,
    pub system: Check,
    pub tests: Check,
}

/// What the dashboard answered to something the agent sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// A command to run (v1 delivers it in the heartbeat reply, at most once).
    pub command: Option<String>,
    /// A freshly provisioned per-host token (v1 only): switch to it and persist it at once.
    pub agent_token: Option<String>,
}

/// `ok` or `error`: the two results the dashboard accepts from an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Error,
}

/// A result report (v1: `POST /status`, where the first one after a delivery closes that
/// command's log row; v2: `status`, matched to its command by name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub status: Outcome,
    pub current_generation: Option<String>,
    pub output: Option<String>,
    pub test_status: Option<String>,
    /// The dashboard command this is the final result of; `None` for the agent's own notices
    /// ("Agent started", the outage note), which v2 shows as output lines, not results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Output lines that could not be streamed (v2: the flood was over the bound).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_lines: u64,
    /// The failing step's exit code (124 timed out, 130 stopped), for a failure (v2
    /// `exit_code`; v1 has only ok/error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StatusReport {
    /// An agent notice (not the result of a dashboard command).
    pub fn notice(status: Outcome, generation: Option<String>, text: String) -> StatusReport {
        StatusReport {
            status,
            current_generation: generation,
            output: Some(text),
            test_status: None,
            command: None,
            dropped_lines: 0,
            exit_code: None,
        }
    }
}

/// Test progress (v1: `POST /test-progress`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestProgress {
    pub current: u32,
    pub total: u32,
    pub passed: u32,
    pub running: bool,
    pub result: Option<String>,
    pub comment: Option<String>,
}

/// One report on its way to the dashboard, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    Status(StatusReport),
    TestProgress(TestProgress),
}

impl Report {
    /// Intermediate test progress may be coalesced or dropped; everything else is final.
    pub fn is_intermediate(&self) -> bool {
        matches!(self, Report::TestProgress(p) if p.running)
    }
}

/// Why a request to the dashboard failed. Callers branch on the variant: transport failures
/// and 5xx are retried with backoff, 401 backs off long, 422 is a bug in what we sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DashboardError {
    /// DNS, connection refused, TLS failure: the dashboard could not be reached.
    #[error("dashboard unreachable ({0})")]
    Unreachable(String),
    /// No complete answer within the request timeout.
    #[error("dashboard did not answer within {0}s")]
    Timeout(u64),
    /// 401: the token was refused (a 403 comes from a proxy: `Http`).
    #[error("dashboard refused the token (HTTP {status}: {detail})")]
    Unauthorized { status: u16, detail: String },
    /// 422: the dashboard rejected a field; `details` are `(field, message)` pairs.
    #[error("dashboard rejected the request (HTTP 422: {})", format_details(.details))]
    Validation { details: Vec<(String, String)> },
    /// 500: the v1 dashboard answers its rate limit with a plain 500, so this may be one.
    #[error("dashboard error HTTP 500 (possibly its rate limit)")]
    ServerError,
    /// Any other non-2xx answer.
    #[error("dashboard answered HTTP {status}: {detail}")]
    Http { status: u16, detail: String },
    /// A 2xx answer we could not use (invalid JSON, over the size cap).
    #[error("unusable reply from dashboard: {0}")]
    BadReply(String),
    /// v2: the dashboard keeps only the newest connection per hostname, and another agent
    /// registered this host's name right after we did, `times` times in a row.
    #[error(
        "another agent is connected as hostname {hostname:?}: the dashboard closed this \
         connection for a newer one {times} time(s) right after registering; stop the other \
         agent or give this host its own NIXFLEET_HOSTNAME"
    )]
    Displaced { hostname: String, times: u32 },
}

/// The pairs as one bounded line (they come from the dashboard: see `crate::text`).
fn format_details(details: &[(String, String)]) -> String {
    let joined = details
        .iter()
        .map(|(field, msg)| format!("{field}: {msg}"))
        .collect::<Vec<_>>()
        .join("; ");
    crate::text::for_log(&joined)
}

impl DashboardError {
    /// Whether the dashboard, or a proxy or firewall in front of it, refused this request for
    /// what it carries, so the same body will be refused again: a 422, or a 4xx that is about
    /// the body (400, 403 from a firewall, which the v1 dashboard never sends to agents, 409,
    /// 411-418). Not 404/405/410 (a wrong or blocked path: every body is refused), nor
    /// 401/407/408/429 (token, proxy auth, time, rate). The caller checks that heartbeats get
    /// through before it acts on this.
    pub fn refuses_content(&self) -> bool {
        match self {
            DashboardError::Validation { .. } => true,
            DashboardError::Http { status, .. } => matches!(status, 400 | 403 | 409 | 411..=418),
            _ => false,
        }
    }

    /// Whether this means "cannot reach the dashboard" rather than "it answered badly".
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            DashboardError::Unreachable(_) | DashboardError::Timeout(_)
        )
    }
}

/// A short label for status lines ("connection refused", "HTTP 500").
pub struct ShortReason<'a>(pub &'a DashboardError);

impl fmt::Display for ShortReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            DashboardError::Unreachable(why) => f.write_str(why),
            DashboardError::Timeout(_) => f.write_str("timed out"),
            DashboardError::Unauthorized { status, .. } => {
                write!(f, "token refused, HTTP {status}")
            }
            DashboardError::Validation { .. } => f.write_str("HTTP 422"),
            DashboardError::ServerError => f.write_str("HTTP 500"),
            DashboardError::Http { status, .. } => write!(f, "HTTP {status}"),
            DashboardError::BadReply(_) => f.write_str("bad reply"),
            DashboardError::Displaced { .. } => {
                f.write_str("displaced by another agent with the same hostname")
            }
        }
    }
}

/// How the dashboard ties a result to the command it answers: the one difference between the
/// protocols that shapes what the loop does with commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Correlation {
    /// v1: the next `/status` closes the newest open log row. Commands that arrive while one
    /// runs wait in the agent's queue, acknowledged at once so every result lands on its own
    /// row; the agent's notices are held while a row is open.
    ByPosition,
    /// v2: `status.command` echoes the command's name, one final status per command. A command
    /// that arrives while another runs is refused (`command_rejected`), except stop, restart
    /// and reboot; notices never close anything.
    ByName,
}

/// What the main loop must know about a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTraits {
    pub correlation: Correlation,
    /// Child output is streamed line by line while a command runs (v2 `output`).
    pub streams_output: bool,
}

/// One line of a running command's output, for links that stream it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLine {
    /// The command it belongs to.
    pub command: String,
    pub line: String,
}

/// Something the agent sends to the dashboard. One at a time, in the order the loop chooses.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    Heartbeat(Box<Heartbeat>),
    Report(Report),
    /// Only sent when [`LinkTraits::streams_output`].
    Output(OutputLine),
    /// A command refused because `current` runs ([`Correlation::ByName`] only).
    Rejected {
        command: String,
        current: String,
    },
}

/// What the wire tells the loop without being asked (v2's pushed messages and connection
/// state; v1 has none: everything it says is a [`Reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link is up and the dashboard knows this host (v2: `registered`).
    Connected,
    /// A command pushed by the dashboard.
    Command(String),
    /// The link went down; it redials by itself after `retry_in`.
    Disconnected {
        error: DashboardError,
        retry_in: std::time::Duration,
    },
}

/// A dashboard protocol. Implementations are cheap to clone (they share a connection pool or
/// a socket task) so the main loop can move one into each message in flight.
pub trait Link: Clone + Send + Sync + 'static {
    fn traits(&self) -> LinkTraits;

    /// The host's latest facts, for links that introduce the host on their own (v2
    /// `register` on every connection). Called at start and with every heartbeat.
    fn describe_host(&self, _beat: &Heartbeat) {}

    /// Delivers one message: resolves once the dashboard has it (v1: a 2xx answer; v2: the
    /// frame is written to a registered socket), or with why not.
    fn send(
        &self,
        token: &str,
        message: &Outgoing,
    ) -> impl Future<Output = Result<Reply, DashboardError>> + Send;

    /// Ends the link politely (v2: a close frame, never right after a result). Bounded.
    fn close(&self) -> impl Future<Output = ()> + Send;
}
