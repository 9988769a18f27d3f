//! NixFleet v1 over HTTPS: `POST /api/hosts/{id}/register`, `/status`, `/test-progress`
//! (contract: `docs/protocol-v1.md`).
//!
//! Owns the HTTP/1.1 connection ([`super::http1`]: rustls, connect timeout 5 s, each exchange
//! bounded by `NIXFLEET_HTTP_TIMEOUT`, bodies capped at 1 MiB) and the mapping of v1 answers to
//! [`DashboardError`]. It never logs a token and never puts one in an error: errors carry the
//! dashboard's own words, which never echo the Authorization header.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::header::{self, HeaderValue};
use hyper::{StatusCode, Uri};
use serde::Deserialize;
use tokio::time::Instant;

use super::http1::Connection;
use super::{
    Correlation, DashboardError, Heartbeat, Link, LinkTraits, Outgoing, Reply, Report, StatusReport,
};
use crate::config::Settings;
use crate::text::bounded;

/// Largest reply body we read; anything longer is refused without growing the agent.
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The v1 client. Cloning shares the connection.
#[derive(Clone, Debug)]
pub struct V1Client {
    connection: Arc<Connection>,
    /// The three endpoints, parsed once: a heartbeat must not re-parse its URL.
    endpoints: Arc<Endpoints>,
    timeout: Duration,
}

/// The paths of `<base>/api/hosts/<host>/{register,status,test-progress}`.
#[derive(Debug)]
struct Endpoints {
    register: Uri,
    status: Uri,
    test_progress: Uri,
}

impl Endpoints {
    fn new(base: &url::Url, hostname: &str) -> anyhow::Result<Self> {
        let base = base.as_str().trim_end_matches('/');
        let path = |endpoint: &str| -> anyhow::Result<Uri> {
            let url = url::Url::parse(&format!("{base}/api/hosts/{hostname}/{endpoint}"))
                .map_err(|e| anyhow::anyhow!("NIXFLEET_URL: no usable URL for {endpoint}: {e}"))?;
            url[url::Position::BeforePath..]
                .parse()
                .map_err(|e| anyhow::anyhow!("NIXFLEET_URL: no usable path for {endpoint}: {e}"))
        };
        Ok(Endpoints {
            register: path("register")?,
            status: path("status")?,
            test_progress: path("test-progress")?,
        })
    }
}

/// Reply of register and poll. Unknown fields are ignored on purpose.
#[derive(Deserialize)]
struct RegisterReplyWire {
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    agent_token: Option<String>,
}

#[derive(Deserialize)]
struct AnyReplyWire {
    #[serde(default)]
    agent_token: Option<String>,
}

/// FastAPI's error body: `{"detail": "text"}` or `{"detail": [{"loc": [...], "msg": ...}]}`.
#[derive(Deserialize)]
struct ErrorBody {
    detail: Option<serde_json::Value>,
}

impl V1Client {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let tls = match settings.url.scheme() {
            "http" if settings.allow_insecure_http => None,
            "http" => anyhow::bail!(
                "NIXFLEET_URL {} is plain http; use https or set NIXFLEET_ALLOW_INSECURE_HTTP=1",
                settings.url
            ),
            _ => {
                let mut config = super::tls::client_config(settings)?;
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(config))
            }
        };
        let timeout_secs = settings.http_timeout.as_secs().max(1);
        Ok(V1Client {
            connection: Arc::new(Connection::new(
                settings.url.clone(),
                tls,
                CONNECT_TIMEOUT.min(settings.http_timeout),
                timeout_secs,
            )?),
            endpoints: Arc::new(Endpoints::new(&settings.url, &settings.host.hostname)?),
            timeout: settings.http_timeout,
        })
    }

    fn timeout_secs(&self) -> u64 {
        self.timeout.as_secs().max(1)
    }

    /// POSTs `body`; returns the reply body of a 2xx answer. With `reply_optional`, a 2xx
    /// whose body cannot be read still counts as delivered (an empty body comes back): the
    /// dashboard has processed the report, and sending it again would be a duplicate. The
    /// request and the reply body share one deadline, `NIXFLEET_HTTP_TIMEOUT` from now.
    async fn post_json<T: serde::Serialize + ?Sized>(
        &self,
        path: &Uri,
        token: &str,
        body: &T,
        reply_optional: bool,
    ) -> Result<Vec<u8>, DashboardError> {
        let deadline = Instant::now() + self.timeout;
        let body = serde_json::to_vec(body)
            .map_err(|e| DashboardError::BadReply(format!("cannot encode the request: {e}")))?;
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                DashboardError::Unreachable("the token cannot be sent in a header".into())
            })?;
        authorization.set_sensitive(true);
        // One timer for the request and its reply body.
        let expiry = tokio::time::sleep_until(deadline);
        tokio::pin!(expiry);
        let response = tokio::select! {
            biased;
            response = self.connection.post(path, &authorization, Bytes::from(body)) => response?,
            () = &mut expiry => return Err(DashboardError::Timeout(self.timeout_secs())),
        };
        let status = response.status();
        let body = read_capped(response, expiry, self.timeout_secs()).await;
        match body {
            Ok(body) if status.is_success() => Ok(body),
            Err(_) if status.is_success() && reply_optional => Ok(Vec::new()),
            Ok(body) => Err(error_for(status, &body)),
            Err(_) if !status.is_success() => Err(error_for(status, &[])),
            Err(e) => Err(e),
        }
    }
}

/// `POST /status` body: exactly the v1 fields (the neutral report carries more).
#[derive(serde::Serialize)]
struct StatusWire<'a> {
    status: super::Outcome,
    current_generation: &'a Option<String>,
    output: &'a Option<String>,
    test_status: &'a Option<String>,
}

impl<'a> From<&'a StatusReport> for StatusWire<'a> {
    fn from(report: &'a StatusReport) -> Self {
        StatusWire {
            status: report.status,
            current_generation: &report.current_generation,
            output: &report.output,
            test_status: &report.test_status,
        }
    }
}

impl V1Client {
    async fn heartbeat(&self, token: &str, beat: &Heartbeat) -> Result<Reply, DashboardError> {
        let body = self
            .post_json(&self.endpoints.register, token, beat, false)
            .await?;
        let wire: RegisterReplyWire = serde_json::from_slice(&body)
            .map_err(|e| DashboardError::BadReply(format!("invalid JSON: {e}")))?;
        Ok(Reply {
            command: wire.command.filter(|c| !c.trim().is_empty()),
            agent_token: wire.agent_token.filter(|t| !t.is_empty()),
        })
    }

    async fn report(&self, token: &str, report: &Report) -> Result<Reply, DashboardError> {
        let body = match report {
            Report::Status(status) => {
                self.post_json(
                    &self.endpoints.status,
                    token,
                    &StatusWire::from(status),
                    true,
                )
                .await?
            }
            Report::TestProgress(progress) => {
                self.post_json(&self.endpoints.test_progress, token, progress, true)
                    .await?
            }
        };
        // A report's success does not depend on its body; a token in it is still honoured.
        let agent_token = serde_json::from_slice::<AnyReplyWire>(&body)
            .ok()
            .and_then(|w| w.agent_token)
            .filter(|t| !t.is_empty());
        Ok(Reply {
            command: None,
            agent_token,
        })
    }
}

impl Link for V1Client {
    fn traits(&self) -> LinkTraits {
        LinkTraits {
            correlation: Correlation::ByPosition,
            streams_output: false,
        }
    }

    async fn send(&self, token: &str, message: &Outgoing) -> Result<Reply, DashboardError> {
        match message {
            Outgoing::Heartbeat(beat) => self.heartbeat(token, beat).await,
            Outgoing::Report(report) => self.report(token, report).await,
            // v1 has no place for these; the loop does not send them to a v1 link.
            Outgoing::Output(_) | Outgoing::Rejected { .. } => Ok(Reply::default()),
        }
    }

    async fn close(&self) {}
}

/// The reply body, refused past [`MAX_REPLY_BYTES`] (by its announced length first), and
/// given up when `expiry` fires.
async fn read_capped(
    response: hyper::Response<hyper::body::Incoming>,
    mut expiry: std::pin::Pin<&mut tokio::time::Sleep>,
    timeout_secs: u64,
) -> Result<Vec<u8>, DashboardError> {
    let announced = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = announced
        && len > MAX_REPLY_BYTES as u64
    {
        return Err(DashboardError::BadReply(format!(
            "reply of {len} bytes is over the {MAX_REPLY_BYTES}-byte limit"
        )));
    }
    let mut incoming = response.into_body();
    let mut body = Vec::with_capacity(announced.unwrap_or(0) as usize);
    loop {
        let next = tokio::select! {
            biased;
            next = incoming.frame() => next,
            () = &mut expiry => return Err(DashboardError::Timeout(timeout_secs)),
        };
        let frame = match next {
            None => return Ok(body),
            Some(Err(e)) => {
                return Err(DashboardError::BadReply(format!(
                    "reading the reply: {}",
                    bounded(&e.to_string(), MAX_MESSAGE)
                )));
            }
            Some(Ok(frame)) => frame,
        };
        if let Ok(chunk) = frame.into_data() {
            if body.len() + chunk.len() > MAX_REPLY_BYTES {
                return Err(DashboardError::BadReply(format!(
                    "reply is over the {MAX_REPLY_BYTES}-byte limit"
                )));
            }
            body.extend_from_slice(&chunk);
        }
    }
}

/// How many 422 `(field, message)` pairs are kept; the rest are counted in one more pair.
pub const MAX_VALIDATION_DETAILS: usize = 16;
/// Longest field name kept (bytes, after escaping), and longest message or detail text.
const MAX_FIELD: usize = 120;
const MAX_MESSAGE: usize = 300;
/// Most `loc` parts joined into a field name.
const MAX_LOC_PARTS: usize = 8;

/// Maps a non-2xx answer to an error. All text taken from the body is bounded and escaped
/// (`crate::text`), whatever the body holds: it ends up in log lines and remembered state.
fn error_for(status: StatusCode, body: &[u8]) -> DashboardError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let detail_value = parsed.and_then(|b| b.detail);
    let detail_text = match &detail_value {
        Some(serde_json::Value::String(s)) => bounded(s, MAX_MESSAGE),
        Some(other) => bounded(&capped_json(other), MAX_MESSAGE),
        None => bounded(
            &String::from_utf8_lossy(&body[..body.len().min(MAX_MESSAGE)]),
            MAX_MESSAGE,
        ),
    };
    match status.as_u16() {
        // The v1 dashboard answers a bad token with 401 only (contract §2); a 403 comes from
        // a proxy or firewall and says nothing about the token.
        401 => DashboardError::Unauthorized {
            status: status.as_u16(),
            detail: detail_text,
        },
        422 => DashboardError::Validation {
            details: validation_details(detail_value.as_ref()),
        },
        500 => DashboardError::ServerError,
        code => DashboardError::Http {
            status: code,
            detail: detail_text,
        },
    }
}

/// The JSON text of `value`, stopping soon after `MAX_MESSAGE` bytes (a 1 MiB array is never
/// turned into a 1 MiB string first).
fn capped_json(value: &serde_json::Value) -> String {
    struct Capped(Vec<u8>);
    impl std::io::Write for Capped {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0.len() > MAX_MESSAGE {
                return Err(std::io::Error::other("long enough"));
            }
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Capped(Vec::new());
    let _ = serde_json::to_writer(&mut out, value);
    String::from_utf8_lossy(&out.0).into_owned()
}

/// Pulls `(field, message)` out of pydantic's detail list; the echoed `input` is left out (it
/// can be 10 000 characters of output). At most [`MAX_VALIDATION_DETAILS`] pairs, each part
/// bounded and escaped; more items are counted in a last pair.
fn validation_details(detail: Option<&serde_json::Value>) -> Vec<(String, String)> {
    let Some(serde_json::Value::Array(items)) = detail else {
        let text = detail.map(capped_json).unwrap_or_default();
        return vec![("request".into(), bounded(&text, MAX_MESSAGE))];
    };
    let mut details: Vec<(String, String)> = items
        .iter()
        .take(MAX_VALIDATION_DETAILS)
        .map(|item| {
            let field = item
                .get("loc")
                .and_then(|l| l.as_array())
                .map(|parts| {
                    let mut field = String::new();
                    for part in parts
                        .iter()
                        .filter(|p| p.as_str() != Some("body"))
                        .take(MAX_LOC_PARTS)
                    {
                        if !field.is_empty() {
                            field.push('.');
                        }
                        match part {
                            serde_json::Value::String(s) => {
                                field.extend(s.chars().take(MAX_FIELD));
                            }
                            other => field.extend(capped_json(other).chars().take(MAX_FIELD)),
                        }
                        if field.len() > MAX_FIELD {
                            break;
                        }
                    }
                    bounded(&field, MAX_FIELD)
                })
                .unwrap_or_else(|| "request".into());
            let msg = item
                .get("msg")
                .and_then(|m| m.as_str())
                .map_or_else(|| "invalid".to_owned(), |m| bounded(m, MAX_MESSAGE));
            (field, msg)
        })
        .collect();
    if items.len() > MAX_VALIDATION_DETAILS {
        details.push((
            "request".into(),
            format!(
                "{} more validation errors not shown",
                items.len() - MAX_VALIDATION_DETAILS
            ),
        ));
    }
    details
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_detail_names_field_and_message() {
        let body = br#"{"detail":[{"type":"string_too_long","loc":["body","agent_version"],"msg":"String should have at most 20 characters","input":"xxxxxxxxxxxxxxxxxxxxxxxxx"}]}"#;
        let err = error_for(StatusCode::UNPROCESSABLE_ENTITY, body);
        assert_eq!(
            err,
            DashboardError::Validation {
                details: vec![(
                    "agent_version".into(),
                    "String should have at most 20 characters".into()
                )]
            }
        );
        assert!(!err.to_string().contains("xxxxxxxx"));
    }

    #[test]
    fn hostile_422_body_is_bounded_and_escaped() {
        let items: Vec<serde_json::Value> = (0..2000)
            .map(|i| {
                serde_json::json!({
                    "loc": ["body", format!("f{i}\n{}", "x".repeat(200)), 1, 2, 3, 4, 5, 6, 7, 8, 9],
                    "msg": format!("bad\n2026-01-01 INFO forged {}", "y".repeat(400)),
                })
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "detail": items })).unwrap();
        let DashboardError::Validation { details } =
            error_for(StatusCode::UNPROCESSABLE_ENTITY, &body)
        else {
            panic!("not a validation error");
        };
        assert_eq!(details.len(), MAX_VALIDATION_DETAILS + 1);
        assert_eq!(
            details.last().unwrap().1,
            "1984 more validation errors not shown"
        );
        for (field, msg) in &details {
            assert!(field.len() <= MAX_FIELD + 32, "{}", field.len());
            assert!(msg.len() <= MAX_MESSAGE + 32, "{}", msg.len());
            assert!(
                !field.contains('\n') && !msg.contains('\n'),
                "{field} {msg}"
            );
        }
        assert!(details[0].0.starts_with("f0\\nxxx"), "{}", details[0].0);
        let line = DashboardError::Validation { details }.to_string();
        assert!(
            line.len() <= 2 * crate::text::LOG_TEXT_MAX,
            "{}",
            line.len()
        );

        let err = error_for(
            StatusCode::BAD_REQUEST,
            format!("{{\"detail\": [\"{}\"]}}", "z\\n".repeat(100_000)).as_bytes(),
        );
        let DashboardError::Http { detail, .. } = err else {
            panic!("not an http error");
        };
        assert!(
            detail.len() <= MAX_MESSAGE + 32 && !detail.contains('\n'),
            "{detail}"
        );
    }

    #[test]
    fn rate_limit_500_is_retryable_and_401_is_auth() {
        let err = error_for(StatusCode::INTERNAL_SERVER_ERROR, b"Internal Server Error");
        assert_eq!(err, DashboardError::ServerError);
        assert!(!err.refuses_content());
        for (code, refuses) in [
            (400, true),
            (403, true),
            (404, false),
            (405, false),
            (415, true),
            (413, true),
            (408, false),
            (429, false),
            (401, false),
            (502, false),
        ] {
            let err = error_for(StatusCode::from_u16(code).unwrap(), b"{}");
            assert_eq!(err.refuses_content(), refuses, "HTTP {code}: {err:?}");
        }
        let err = error_for(
            StatusCode::UNAUTHORIZED,
            br#"{"detail":"Invalid API token"}"#,
        );
        assert!(
            matches!(err, DashboardError::Unauthorized { status: 401, ref detail } if detail == "Invalid API token")
        );
    }
}

/// Issue 10, item 10: property tests over dashboard replies and error bodies.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, a few levels deep.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{0,6}|loc|msg|detail", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn check_bounded(err: &DashboardError) -> Result<(), TestCaseError> {
        let text = err.to_string();
        prop_assert!(
            text.len() <= 2 * crate::text::LOG_TEXT_MAX,
            "{}",
            text.len()
        );
        prop_assert!(!text.contains('\n') && !text.contains('\r'), "{text}");
        if let DashboardError::Validation { details } = err {
            prop_assert!(details.len() <= MAX_VALIDATION_DETAILS + 1);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_error_body_gives_a_bounded_error(
            status in 400u16..600, body in prop::collection::vec(any::<u8>(), 0..4096)
        ) {
            let err = error_for(StatusCode::from_u16(status).unwrap(), &body);
            check_bounded(&err)?;
        }

        #[test]
        fn any_json_detail_gives_a_bounded_error(status in 400u16..600, detail in json()) {
            let body = serde_json::to_vec(&serde_json::json!({ "detail": detail })).unwrap();
            let err = error_for(StatusCode::from_u16(status).unwrap(), &body);
            check_bounded(&err)?;
        }

        #[test]
        fn any_reply_body_parses_or_errs(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = serde_json::from_slice::<RegisterReplyWire>(&body);
            let _ = serde_json::from_slice::<AnyReplyWire>(&body);
        }
    }
}
