//! The HTTP control API the `fake-dashboard --protocol v2` binary serves on its own port, so
//! shell-driven tests (the demo, the NixOS VM test) can push commands and read what the fake
//! saw. Every route goes through the public [`FakeV2`] methods and adds no semantics.
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /_fake/health` | – | `{"status":"ok","url","protocol":"v2"}` |
//! | `POST /_fake/command/{host}` | `{"command":"x","dispatch":bool}` | `{"status":"sent","command"}`; 409 `{"error"}` (not connected, queue full) or, with `dispatch`, 409 `{"status":"blocked","code","message"}` |
//! | `POST /_fake/kill-command/{host}` | `{"signal":"SIGTERM","pid":0}` | `{"status":"sent"}` |
//! | `POST /_fake/raw/{host}` | `{"text":"...","binary":bool}` | `{"status":"sent"}` |
//! | `POST /_fake/drop/{host}` | `{"how":"abrupt"\|"close","code":N\|null}` | `{"status":"dropped"}` |
//! | `POST /_fake/timeout-action/{host}` | `{"action":"wait\|ignore\|kill"}` | `{"status":"ok"}` or 409 |
//! | `GET /_fake/frames` / `DELETE /_fake/frames` | – | the frame log / `{"status":"cleared"}` |
//! | `GET /_fake/messages/{type}` | – | inbound messages of that type |
//! | `GET /_fake/hosts` / `GET /_fake/hosts/{host}` | – | host rows / one row or 404 |
//! | `GET /_fake/commands/{host}` | – | `{"current","history"}` |
//! | `GET /_fake/connections` / `GET /_fake/handshakes` | – | arrays |
//! | `POST /_fake/behaviour` | any `Behaviour` field (`*_ms` for durations, `null` clears) | the switches |
//! | `POST /_fake/options` | `{"lifecycle":bool,"token":"..."}` | `{"status":"ok"}` |
//! | `GET /_fake/tls` | – | `{"url","ca_pem","spki_sha256_base64"}` |

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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

use super::{Behaviour, DropHow, FakeV2};
use crate::body::{self, RespBody};

#[derive(Deserialize)]
struct CommandRequest {
    command: String,
    #[serde(default)]
    dispatch: bool,
}

#[derive(Deserialize)]
struct KillRequest {
    signal: String,
    #[serde(default)]
    pid: i64,
}

#[derive(Deserialize)]
struct RawRequest {
    text: String,
    #[serde(default)]
    binary: bool,
}

#[derive(Deserialize)]
struct DropRequest {
    how: String,
    #[serde(default)]
    code: Option<u16>,
}

#[derive(Deserialize)]
struct ActionRequest {
    action: String,
}

#[derive(Deserialize)]
struct OptionsRequest {
    lifecycle: Option<bool>,
    token: Option<String>,
}

/// Body of `POST /_fake/behaviour`; absent fields are left unchanged, `null` durations clear.
#[derive(Debug, Default, Deserialize)]
pub struct BehaviourRequest {
    /// [`Behaviour::down`].
    pub down: Option<bool>,
    /// [`Behaviour::reject_all_tokens`].
    pub reject_all_tokens: Option<bool>,
    /// [`Behaviour::withhold_registered`].
    pub withhold_registered: Option<bool>,
    /// [`Behaviour::delay_registered`] in ms.
    #[serde(default, deserialize_with = "some")]
    pub delay_registered_ms: Option<Option<u64>>,
    /// [`Behaviour::withhold_pongs`].
    pub withhold_pongs: Option<bool>,
    /// [`Behaviour::stop_reading`].
    pub stop_reading: Option<bool>,
    /// [`Behaviour::delay_commands`] in ms.
    #[serde(default, deserialize_with = "some")]
    pub delay_commands_ms: Option<Option<u64>>,
    /// [`Behaviour::redirect_root`].
    pub redirect_root: Option<bool>,
}

impl BehaviourRequest {
    /// Applies the present fields.
    pub fn apply(&self, b: &mut Behaviour) {
        let set = |dst: &mut bool, v: Option<bool>| {
            if let Some(v) = v {
                *dst = v;
            }
        };
        set(&mut b.down, self.down);
        set(&mut b.reject_all_tokens, self.reject_all_tokens);
        set(&mut b.withhold_registered, self.withhold_registered);
        set(&mut b.withhold_pongs, self.withhold_pongs);
        set(&mut b.stop_reading, self.stop_reading);
        set(&mut b.redirect_root, self.redirect_root);
        if let Some(ms) = self.delay_registered_ms {
            b.delay_registered = ms.map(Duration::from_millis);
        }
        if let Some(ms) = self.delay_commands_ms {
            b.delay_commands = ms.map(Duration::from_millis);
        }
    }
}

/// Distinguishes an explicit `null` from an absent field.
fn some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

fn behaviour_json(b: &Behaviour) -> serde_json::Value {
    json!({
        "down": b.down, "reject_all_tokens": b.reject_all_tokens,
        "withhold_registered": b.withhold_registered,
        "delay_registered_ms": b.delay_registered.map(|d| d.as_millis() as u64),
        "withhold_pongs": b.withhold_pongs, "stop_reading": b.stop_reading,
        "delay_commands_ms": b.delay_commands.map(|d| d.as_millis() as u64),
        "redirect_root": b.redirect_root,
    })
}

/// Serves the control API on `listener` until `shutdown` completes.
pub async fn serve(fake: Arc<FakeV2>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let fake = fake.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(handle(fake, req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            () = &mut shutdown => return,
        }
    }
}

type Early = Box<Response<RespBody>>;

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Early> {
    serde_json::from_slice(bytes)
        .map_err(|e| Box::new(body::detail(400, &format!("bad request body: {e}"))))
}

async fn handle(fake: Arc<FakeV2>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, incoming) = req.into_parts();
    let bytes = match Limited::new(incoming, 16 * 1024 * 1024).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return body::detail(413, "Request Entity Too Large"),
    };
    let Some(rest) = parts.uri.path().strip_prefix("/_fake/") else {
        return body::detail(404, "Not Found");
    };
    let segments: Vec<&str> = rest.split('/').collect();
    // `set_behaviour` may wait for the listener: keep it off the async workers.
    let method = parts.method.clone();
    let owned: Vec<String> = segments.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let segs: Vec<&str> = owned.iter().map(String::as_str).collect();
        route(&fake, &method, &segs, &bytes).unwrap_or_else(|resp| *resp)
    })
    .await
    .unwrap_or_else(|_| body::internal_error())
}

fn route(
    fake: &FakeV2,
    method: &Method,
    segments: &[&str],
    bytes: &[u8],
) -> Result<Response<RespBody>, Early> {
    Ok(match (method.clone(), segments) {
        (Method::GET, ["health"]) => body::json(
            200,
            &json!({"status": "ok", "url": fake.url(), "protocol": "v2"}),
        ),
        (Method::POST, ["command", host]) => {
            let req: CommandRequest = parse(bytes)?;
            if req.dispatch {
                match fake.dispatch(host, &req.command) {
                    Ok(()) => body::json(200, &json!({"status": "sent", "command": req.command})),
                    Err(b) => body::json(
                        409,
                        &json!({"status": "blocked", "code": b.code, "message": b.message}),
                    ),
                }
            } else {
                match fake.send_command(host, &req.command) {
                    Ok(()) => body::json(200, &json!({"status": "sent", "command": req.command})),
                    Err(e) => body::json(409, &json!({"error": e.to_string()})),
                }
            }
        }
        (Method::POST, ["kill-command", host]) => {
            let req: KillRequest = parse(bytes)?;
            fake.send_kill_command(host, &req.signal, req.pid);
            body::json(200, &json!({"status": "sent"}))
        }
        (Method::POST, ["raw", host]) => {
            let req: RawRequest = parse(bytes)?;
            fake.send_raw(host, req.text.as_bytes(), req.binary);
            body::json(200, &json!({"status": "sent"}))
        }
        (Method::POST, ["drop", host]) => {
            let req: DropRequest = parse(bytes)?;
            let how = match req.how.as_str() {
                "abrupt" => DropHow::Abrupt,
                "close" => DropHow::Close(req.code),
                other => {
                    return Err(Box::new(body::detail(
                        400,
                        &format!("unknown how {other:?} (abrupt|close)"),
                    )));
                }
            };
            fake.drop_connection(host, how);
            body::json(200, &json!({"status": "dropped"}))
        }
        (Method::POST, ["timeout-action", host]) => {
            let req: ActionRequest = parse(bytes)?;
            if fake.timeout_action(host, &req.action) {
                body::json(200, &json!({"status": "ok"}))
            } else {
                body::json(
                    409,
                    &json!({"error": "nothing tracked or unknown action (wait|ignore|kill)"}),
                )
            }
        }
        (Method::GET, ["frames"]) => body::json(200, &fake.frames()),
        (Method::DELETE, ["frames"]) => {
            fake.clear_frames();
            body::json(200, &json!({"status": "cleared"}))
        }
        (Method::GET, ["messages", msg_type]) => body::json(200, &fake.messages(msg_type)),
        (Method::GET, ["hosts"]) => body::json(200, &fake.hosts()),
        (Method::GET, ["hosts", host]) => match fake.host(host) {
            Some(row) => body::json(200, &row),
            None => body::detail(404, "Host not found"),
        },
        (Method::GET, ["commands", host]) => {
            let history = fake.command_history(host);
            let current = fake.command_state(host).filter(|c| !c.status.is_final());
            body::json(200, &json!({"current": current, "history": history}))
        }
        (Method::GET, ["connections"]) => body::json(200, &fake.connections()),
        (Method::GET, ["handshakes"]) => body::json(200, &fake.handshakes()),
        (Method::POST, ["behaviour"]) => {
            let req: BehaviourRequest = parse(bytes)?;
            fake.set_behaviour(|b| req.apply(b));
            body::json(200, &behaviour_json(&fake.behaviour()))
        }
        (Method::POST, ["options"]) => {
            let req: OptionsRequest = parse(bytes)?;
            fake.set_options(|o| {
                if let Some(l) = req.lifecycle {
                    o.lifecycle = l;
                }
                if let Some(t) = &req.token {
                    o.token.clone_from(t);
                }
            });
            body::json(200, &json!({"status": "ok"}))
        }
        (Method::GET, ["tls"]) => body::json(
            200,
            &json!({"url": fake.url(), "ca_pem": fake.ca_pem(), "spki_sha256_base64": fake.spki_sha256_base64()}),
        ),
        _ => body::detail(404, "Not Found"),
    })
}
