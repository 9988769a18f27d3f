//! The seam between the agent and a dashboard: what the main loop sends and receives, and the
//! [`Transport`] trait a protocol implements. Only this module and its children know about JSON
//! and HTTP; the executor and the loop speak in these types.
//!
//! Today there is one protocol, NixFleet v1 ([`v1`], contract in `docs/protocol-v1.md`). A
//! second protocol is a second `Transport` implementation; nothing else has to change.

pub mod tls;
pub mod v1;

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

/// Everything a heartbeat carries (v1: `POST /register`).
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
}

/// What a heartbeat reply tells the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// A command to run, delivered at most once by the dashboard.
    pub command: Option<String>,
    /// A freshly provisioned per-host token: switch to it and persist it at once.
    pub agent_token: Option<String>,
}

/// `ok` or `error`: the two results the dashboard accepts from an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Error,
}

/// A result report (v1: `POST /status`). The first one after a delivery closes that
/// command's log row in the dashboard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub status: Outcome,
    pub current_generation: Option<String>,
    pub output: Option<String>,
    pub test_status: Option<String>,
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
        }
    }
}

/// A dashboard protocol. Implementations are cheap to clone (they share a connection pool) so
/// the main loop can move one into each in-flight request.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Register/heartbeat; may deliver a command and a per-host token.
    fn heartbeat(
        &self,
        token: &str,
        beat: &Heartbeat,
    ) -> impl Future<Output = Result<HeartbeatReply, DashboardError>> + Send;

    /// Deliver one report.
    fn report(
        &self,
        token: &str,
        report: &Report,
    ) -> impl Future<Output = Result<ReportReply, DashboardError>> + Send;
}

/// What a report's reply may carry (v1 never sends a token here, but the contract says every
/// response is scanned for one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportReply {
    pub agent_token: Option<String>,
}
