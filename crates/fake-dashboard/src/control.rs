//! The HTTP control API the standalone binary serves on its own port (`/_fake/...`).
//!
//! Shell-driven tests cannot call [`FakeDashboard`] methods, so this exposes them as small
//! JSON endpoints on a *separate* port, which keeps working while the main port is `Down` or
//! hanging. It runs on the caller's runtime and only ever goes through the public handle;
//! it adds no semantics of its own.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `POST /_fake/command/{host}` | `{"command":"x","force":bool}` | `{"status":"queued"\|"forced","command"}`; queue errors as `{"detail"}` with 400/404/409/422 |
//! | `POST /_fake/mode` | `{"mode":"normal\|down\|hang\|slow\|garbage\|oversized\|oversized-chunked\|status","ms":N,"bytes":N,"status":N}` | `{"mode":"..."}` |
//! | `GET /_fake/requests` / `DELETE /_fake/requests` | – | array of recorded requests / `{"status":"cleared"}` |
//! | `GET /_fake/hosts/{host}` | – | the host row, or 404 |
//! | `GET /_fake/logs/{host}` | – | command log rows, oldest first |
//! | `GET /_fake/token/{host}` / `POST /_fake/token/{host}` | – / `{"token":"..."}` | `{"host_id","token"}` (token may be null) |
//! | `POST /_fake/options` | any of `{"shared_token","allow_shared","provision_tokens","rate_limit"}` | the options |
//! | `POST /_fake/last-seen/{host}` | `{"seconds_ago":N\|null}` | the host row |
//! | `GET /_fake/tls` | – | `{"url","ca_pem","spki_sha256_base64"}` |
//! | `GET /_fake/health` | – | `{"status":"ok","url"}` |

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::net::TcpListener;

use crate::body::{self, RespBody};
use crate::{FakeDashboard, Mode};

/// Body of `POST /_fake/mode`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModeRequest {
    /// `normal|down|hang|slow|garbage|oversized|oversized-chunked|status`.
    pub mode: String,
    /// Delay for `slow`.
    pub ms: Option<u64>,
    /// Size for `oversized` / `oversized-chunked`.
    pub bytes: Option<usize>,
    /// Status for `status`.
    pub status: Option<u16>,
}

impl ModeRequest {
    /// The mode this request asks for.
    pub fn to_mode(&self) -> Result<Mode, String> {
        let need = |what: &str| format!("mode {:?} needs {what:?}", self.mode);
        Ok(match self.mode.as_str() {
            "normal" => Mode::Normal,
            "down" => Mode::Down,
            "hang" => Mode::Hang,
            "garbage" => Mode::Garbage,
            "slow" => Mode::Slow(Duration::from_millis(self.ms.ok_or_else(|| need("ms"))?)),
            "oversized" => Mode::Oversized(self.bytes.ok_or_else(|| need("bytes"))?),
            "oversized-chunked" => Mode::OversizedChunked(self.bytes.ok_or_else(|| need("bytes"))?),
            "status" => {
                let code = self.status.ok_or_else(|| need("status"))?;
                if !(100..=599).contains(&code) {
                    return Err(format!("status {code} is not an HTTP status"));
                }
                Mode::Status(code)
            }
            other => return Err(format!("unknown mode {other:?}")),
        })
    }
}

/// Body of `POST /_fake/command/{host}`.
#[derive(Debug, Clone, Deserialize)]
pub struct CommandRequest {
    /// Command name.
    pub command: String,
    /// Write the slot directly (any name, any host) instead of the operator API rules.
    #[serde(default)]
    pub force: bool,
}

/// Body of `POST /_fake/options`; absent fields are left unchanged.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OptionsRequest {
    /// New shared token (`null` disables it).
    #[serde(default, deserialize_with = "some")]
    pub shared_token: Option<Option<String>>,
    /// Allow the shared token.
    pub allow_shared: Option<bool>,
    /// Provision per-host tokens.
    pub provision_tokens: Option<bool>,
    /// Enforce rate limits.
    pub rate_limit: Option<bool>,
}

/// Distinguishes an explicit `null` from an absent field.
fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct TokenRequest {
    token: String,
}

#[derive(Deserialize)]
struct LastSeenRequest {
    seconds_ago: Option<u64>,
}

/// Serves the control API on `listener` until `shutdown` completes.
pub async fn serve(dash: FakeDashboard, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let dash = dash.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let dash = dash.clone();
                        async move { Ok::<_, Infallible>(handle(dash, req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            () = &mut shutdown => return,
        }
    }
}

/// An early answer (boxed: a response is large and this is the cold path).
type Early = Box<Response<RespBody>>;

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Early> {
    serde_json::from_slice(bytes)
        .map_err(|e| Box::new(body::detail(400, &format!("bad request body: {e}"))))
}

async fn handle(dash: FakeDashboard, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, incoming) = req.into_parts();
    let bytes = match Limited::new(incoming, 1024 * 1024).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return body::detail(413, "Request Entity Too Large"),
    };
    let Some(rest) = parts.uri.path().strip_prefix("/_fake/") else {
        return body::detail(404, "Not Found");
    };
    let segments: Vec<&str> = rest.split('/').collect();
    route(dash, &parts.method, &segments, &bytes)
        .await
        .unwrap_or_else(|resp| *resp)
}

async fn route(
    dash: FakeDashboard,
    method: &Method,
    segments: &[&str],
    bytes: &[u8],
) -> Result<Response<RespBody>, Early> {
    Ok(match (method.clone(), segments) {
        (Method::GET, ["health"]) => body::json(200, &json!({"status": "ok", "url": dash.url()})),
        (Method::POST, ["command", host]) => {
            let req: CommandRequest = parse(bytes)?;
            if req.force {
                dash.force_command(host, &req.command);
                body::json(200, &json!({"status": "forced", "command": req.command}))
            } else {
                match dash.queue_command(host, &req.command) {
                    Ok(()) => body::json(200, &json!({"status": "queued", "command": req.command})),
                    Err(e) => body::detail(e.http_status(), &e.to_string()),
                }
            }
        }
        (Method::POST, ["mode"]) => {
            let req: ModeRequest = parse(bytes)?;
            let mode = req.to_mode().map_err(|e| Box::new(body::detail(400, &e)))?;
            let shown = format!("{mode:?}");
            // Waits for the listener to close/rebind: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || dash.set_mode(mode)).await;
            body::json(200, &json!({ "mode": shown }))
        }
        (Method::GET, ["requests"]) => body::json(200, &dash.requests()),
        (Method::DELETE, ["requests"]) => {
            dash.clear_requests();
            body::json(200, &json!({"status": "cleared"}))
        }
        (Method::GET, ["hosts", host]) => match dash.host(host) {
            Some(row) => body::json(200, &row),
            None => body::detail(404, "Host not found"),
        },
        (Method::GET, ["logs", host]) => body::json(200, &dash.command_log(host)),
        (Method::GET, ["token", host]) => body::json(
            200,
            &json!({"host_id": host.to_lowercase(), "token": dash.issued_token(host)}),
        ),
        (Method::POST, ["token", host]) => {
            let req: TokenRequest = parse(bytes)?;
            dash.set_host_token(host, &req.token);
            body::json(
                200,
                &json!({"host_id": host.to_lowercase(), "token": req.token}),
            )
        }
        (Method::POST, ["options"]) => {
            let req: OptionsRequest = parse(bytes)?;
            dash.set_options(|o| {
                if let Some(t) = req.shared_token {
                    o.shared_token = t;
                }
                if let Some(v) = req.allow_shared {
                    o.allow_shared = v;
                }
                if let Some(v) = req.provision_tokens {
                    o.provision_tokens = v;
                }
                if let Some(v) = req.rate_limit {
                    o.rate_limit = v;
                }
            });
            let o = dash.options();
            body::json(
                200,
                &json!({
                    "shared_token": o.shared_token, "allow_shared": o.allow_shared,
                    "provision_tokens": o.provision_tokens, "rate_limit": o.rate_limit,
                }),
            )
        }
        (Method::POST, ["last-seen", host]) => {
            let req: LastSeenRequest = parse(bytes)?;
            let at = req
                .seconds_ago
                .map(|s| SystemTime::now() - Duration::from_secs(s));
            dash.set_last_seen(host, at);
            match dash.host(host) {
                Some(row) => body::json(200, &row),
                None => body::detail(404, "Host not found"),
            }
        }
        (Method::GET, ["tls"]) => body::json(
            200,
            &json!({
                "url": dash.url(), "ca_pem": dash.ca_pem(),
                "spki_sha256_base64": dash.spki_sha256_base64(),
            }),
        ),
        _ => body::detail(404, "Not Found"),
    })
}
