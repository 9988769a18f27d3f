//! The main port: listener lifecycle, connections, modes and the agent request pipeline.
//!
//! Runs entirely on the fake's own runtime thread. The listener task owns the socket and
//! follows the mode: `Down` drops the listener and every open connection (so the port really
//! refuses), leaving `Down` rebinds the same port. Each request is recorded on arrival, then
//! answered according to the mode; in `Normal` it goes through the protocol's check order
//! (422 body → rate limit → 400 id → 401 auth) and then the `state::Db` rules.
//! This module must not hold the state lock across an `.await`.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, USER_AGENT};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::body::{self, RespBody};
use crate::state::Db;
use crate::validate::{self, Registration, StatusReport, TestProgress};
use crate::{Endpoint, Mode, Options, RecordedRequest};

/// Largest request body the fake reads (the real agent sends at most ~10 KB).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What `/health` reports as the version.
const VERSION: &str = "fake-dashboard";

/// Everything guarded by the one state lock.
pub(crate) struct State {
    /// The rows.
    pub db: Db,
    /// Current options (runtime-changeable).
    pub opts: Options,
    /// Every request on the main port, in arrival order.
    pub requests: Vec<RecordedRequest>,
    /// Next `RecordedRequest::id`.
    pub next_request_id: u64,
}

/// State shared between the handle (test thread) and the server (fake thread).
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Current mode; the listener, connections and hung requests watch it.
    pub mode: watch::Sender<Mode>,
    /// Whether the main port currently has a listening socket.
    listening: Mutex<bool>,
    listening_changed: Condvar,
}

impl Shared {
    pub(crate) fn new(opts: Options) -> Shared {
        Shared {
            state: Mutex::new(State {
                db: Db::default(),
                opts,
                requests: Vec::new(),
                next_request_id: 1,
            }),
            mode: watch::Sender::new(Mode::Normal),
            listening: Mutex::new(true),
            listening_changed: Condvar::new(),
        }
    }

    /// The state lock; a panic elsewhere must not make every later query panic too.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_listening(&self, on: bool) {
        *self
            .listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = on;
        self.listening_changed.notify_all();
    }

    /// Blocks until the listener state is `on`, or `timeout` passes.
    pub(crate) fn wait_listening(&self, on: bool, timeout: Duration) -> bool {
        let guard = self
            .listening
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .listening_changed
            .wait_timeout_while(guard, timeout, |l| *l != on)
            .unwrap_or_else(PoisonError::into_inner);
        *guard == on
    }

    fn record(&self, mut rec: RecordedRequest) -> u64 {
        let mut st = self.lock();
        rec.id = st.next_request_id;
        st.next_request_id += 1;
        st.requests.push(rec);
        st.next_request_id - 1
    }

    fn finish(&self, id: u64, status: u16) {
        let (rec, hook) = {
            let mut st = self.lock();
            let hook = st.opts.on_request.clone();
            let rec = st.requests.iter_mut().rev().find(|r| r.id == id).map(|r| {
                r.response_status = status;
                r.clone()
            });
            (rec, hook)
        };
        if let (Some(rec), Some(hook)) = (rec, hook) {
            hook(&rec);
        }
    }
}

/// Starts the runtime thread serving `listener` until `shutdown` flips to true.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fake-dashboard-rt")
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("fake-dashboard".into())
        .spawn(move || {
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(shared, listener, tls, shutdown).await,
                    Err(e) => eprintln!("fake-dashboard: cannot register listener: {e}"),
                }
            });
            // Hung and streaming connections are cancelled here.
            rt.shutdown_timeout(Duration::from_millis(500));
        })
}

async fn accept_loop(
    shared: Arc<Shared>,
    first: TcpListener,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let addr = first
        .local_addr()
        .unwrap_or(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)));
    let mut listener = Some(first);
    let mut mode_rx = shared.mode.subscribe();
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let down = matches!(*mode_rx.borrow_and_update(), Mode::Down);
        if down && listener.is_some() {
            listener = None;
            shared.set_listening(false);
        }
        if !down && listener.is_none() {
            match rebind(addr, &mut shutdown).await {
                Some(l) => {
                    listener = Some(l);
                    shared.set_listening(true);
                }
                None => return,
            }
        }
        match &listener {
            Some(l) => tokio::select! {
                accepted = l.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(connection(shared.clone(), stream, peer, tls.clone()));
                    }
                    // e.g. EMFILE: do not spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = mode_rx.changed() => {}
                _ = shutdown.changed() => return,
            },
            None => tokio::select! {
                _ = mode_rx.changed() => {}
                _ = shutdown.changed() => return,
            },
        }
    }
}

/// Binds `addr` (the first listener's) again, retrying while something else briefly holds it.
/// `None` means shutdown was requested meanwhile.
pub(crate) async fn rebind(
    addr: SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<TcpListener> {
    let mut attempt = 0u32;
    loop {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        let bound = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(1024)
        });
        match bound {
            Ok(l) => return Some(l),
            Err(e) => {
                attempt += 1;
                if attempt.is_multiple_of(50) {
                    eprintln!("fake-dashboard: still cannot rebind {addr}: {e}");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
) {
    let _ = stream.set_nodelay(true);
    let mut mode_rx = shared.mode.subscribe();
    let killed = async move {
        if mode_rx.wait_for(|m| matches!(m, Mode::Down)).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let serve = async move {
        match tls {
            Some(acceptor) => {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                {
                    serve_http(shared, peer, TokioIo::new(stream)).await;
                }
            }
            None => serve_http(shared, peer, TokioIo::new(stream)).await,
        }
    };
    // Dropping the connection closes the socket: `Down` means no half-alive keep-alives.
    tokio::select! {
        _ = serve => {}
        _ = killed => {}
    }
}

async fn serve_http<I>(shared: Arc<Shared>, peer: SocketAddr, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, peer, req).await) }
    });
    let _ = http1::Builder::new().serve_connection(io, svc).await;
}

/// Where a request is going.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Health,
    Agent { endpoint: Endpoint, raw_id: String },
    MethodNotAllowed,
    NotFound,
}

impl Route {
    fn parse(method: &Method, path: &str) -> (Route, Endpoint, Option<String>) {
        if path == "/health" {
            let route = if method == Method::GET {
                Route::Health
            } else {
                Route::MethodNotAllowed
            };
            return (route, Endpoint::Health, None);
        }
        let segments: Vec<&str> = path.split('/').collect();
        if let ["", "api", "hosts", raw_id, action] = segments.as_slice()
            && !raw_id.is_empty()
        {
            let (endpoint, want) = match *action {
                "register" => (Endpoint::Register, Method::POST),
                "poll" => (Endpoint::Poll, Method::GET),
                "status" => (Endpoint::Status, Method::POST),
                "test-progress" => (Endpoint::TestProgress, Method::POST),
                _ => {
                    return (
                        Route::NotFound,
                        Endpoint::Other,
                        Some(raw_id.to_lowercase()),
                    );
                }
            };
            let route = if *method == want {
                Route::Agent {
                    endpoint,
                    raw_id: (*raw_id).to_owned(),
                }
            } else {
                Route::MethodNotAllowed
            };
            return (route, endpoint, Some(raw_id.to_lowercase()));
        }
        (Route::NotFound, Endpoint::Other, None)
    }
}

fn header(headers: &HeaderMap, name: hyper::header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `HTTPBearer(auto_error=False)`: scheme `bearer` in any case, then the credentials.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = header(headers, AUTHORIZATION)?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let (route, endpoint, host_id) = Route::parse(&parts.method, &path);
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return body::detail(413, "Request Entity Too Large"),
    };
    let content_type = header(&parts.headers, CONTENT_TYPE);
    let bearer = bearer_token(&parts.headers);
    let id = shared.record(RecordedRequest {
        id: 0,
        at: SystemTime::now(),
        method: parts.method.as_str().to_owned(),
        path,
        endpoint,
        host_id,
        bearer: bearer.clone(),
        body: serde_json::from_slice(&bytes).ok(),
        body_len: bytes.len(),
        response_status: 0,
        user_agent: header(&parts.headers, USER_AGENT),
    });
    let resp = respond(
        &shared,
        peer,
        &route,
        &bytes,
        content_type.as_deref(),
        bearer.as_deref(),
    )
    .await;
    shared.finish(id, resp.status().as_u16());
    resp
}

async fn respond(
    shared: &Shared,
    peer: SocketAddr,
    route: &Route,
    bytes: &[u8],
    content_type: Option<&str>,
    bearer: Option<&str>,
) -> Response<RespBody> {
    loop {
        let mode = shared.mode.borrow().clone();
        match mode {
            Mode::Normal => return process(shared, peer, route, bytes, content_type, bearer),
            Mode::Slow(delay) => {
                tokio::time::sleep(delay).await;
                return process(shared, peer, route, bytes, content_type, bearer);
            }
            // Down: the connection task is about to drop us; Hang: until the mode changes.
            Mode::Hang | Mode::Down => {
                let mut rx = shared.mode.subscribe();
                if rx.wait_for(|m| *m != mode).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            Mode::Garbage => return body::garbage(),
            Mode::Oversized(n) => return body::oversized(n, false),
            Mode::OversizedChunked(n) => return body::oversized(n, true),
            Mode::Status(code) => return body::canned_status(code),
            Mode::EndpointStatus(endpoint, code) => {
                if matches!(route, Route::Agent { endpoint: e, .. } if *e == endpoint) {
                    return body::canned_status(code);
                }
                return process(shared, peer, route, bytes, content_type, bearer);
            }
            Mode::RefuseBodyContaining(needle, code) => {
                if bytes
                    .windows(needle.len().max(1))
                    .any(|w| w == needle.as_bytes())
                {
                    return body::canned_status(code);
                }
                return process(shared, peer, route, bytes, content_type, bearer);
            }
        }
    }
}

/// A validated agent body.
enum Parsed {
    Register(Box<Registration>),
    Poll,
    Status(StatusReport),
    Progress(TestProgress),
}

#[derive(Serialize)]
struct RegisterResponse<'a> {
    status: &'static str,
    host_id: &'a str,
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_token: Option<String>,
}

#[derive(Serialize)]
struct PollResponse {
    command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_token: Option<String>,
}

#[derive(Serialize)]
struct Updated {
    status: &'static str,
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

fn process(
    shared: &Shared,
    peer: SocketAddr,
    route: &Route,
    bytes: &[u8],
    content_type: Option<&str>,
    bearer: Option<&str>,
) -> Response<RespBody> {
    let (endpoint, raw_id) = match route {
        Route::Health => {
            return body::json(
                200,
                &Health {
                    status: "healthy",
                    version: VERSION,
                },
            );
        }
        Route::NotFound => return body::detail(404, "Not Found"),
        Route::MethodNotAllowed => return body::detail(405, "Method Not Allowed"),
        Route::Agent { endpoint, raw_id } => (*endpoint, raw_id.as_str()),
    };

    // (1) body schema, before anything else.
    let parsed = match endpoint {
        Endpoint::Register => {
            validate::registration(bytes, content_type).map(|r| Parsed::Register(Box::new(r)))
        }
        Endpoint::Status => validate::status_report(bytes, content_type).map(Parsed::Status),
        Endpoint::TestProgress => {
            validate::test_progress(bytes, content_type).map(Parsed::Progress)
        }
        _ => Ok(Parsed::Poll),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(errors) => return body::json(422, &validate::detail_body(&errors)),
    };

    let mut guard = shared.lock();
    let st = &mut *guard;
    // (2) rate limit: slowapi's decorator runs after FastAPI's body validation.
    if st.opts.rate_limit && st.db.rate_limited(peer.ip(), endpoint, Instant::now()) {
        return body::internal_error();
    }
    // (3) host id format.
    if !validate::is_host_id(raw_id) {
        return body::detail(400, "Invalid host ID format");
    }
    let id = raw_id.to_lowercase();
    // (4) auth.
    if !st.db.authorize(
        &id,
        bearer,
        st.opts.shared_token.as_deref(),
        st.opts.allow_shared,
    ) {
        return body::detail(401, "Invalid API token");
    }

    let now = SystemTime::now();
    let provision = st.opts.provision_tokens;
    match parsed {
        Parsed::Register(r) => {
            let d = st.db.register(&id, *r, now, provision);
            body::json(
                200,
                &RegisterResponse {
                    status: "registered",
                    host_id: &id,
                    command: d.command,
                    agent_token: d.agent_token,
                },
            )
        }
        Parsed::Poll => {
            let d = st.db.poll(&id, now, provision);
            body::json(
                200,
                &PollResponse {
                    command: d.command,
                    agent_token: d.agent_token,
                },
            )
        }
        Parsed::Status(s) => {
            st.db.status(&id, s, now);
            body::json(200, &Updated { status: "updated" })
        }
        Parsed::Progress(p) => {
            st.db.test_progress(&id, p, now);
            body::json(200, &Updated { status: "updated" })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let (r, e, id) = Route::parse(&Method::POST, "/api/hosts/WebHost/register");
        assert_eq!(
            r,
            Route::Agent {
                endpoint: Endpoint::Register,
                raw_id: "WebHost".into()
            }
        );
        assert_eq!((e, id.as_deref()), (Endpoint::Register, Some("webhost")));
        assert_eq!(
            Route::parse(&Method::GET, "/api/hosts/a/register").0,
            Route::MethodNotAllowed
        );
        assert_eq!(
            Route::parse(&Method::GET, "/api/hosts//poll").0,
            Route::NotFound
        );
        assert_eq!(
            Route::parse(&Method::GET, "/api/hosts/a/b/poll").0,
            Route::NotFound
        );
        assert_eq!(Route::parse(&Method::GET, "/health").0, Route::Health);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "bEaReR tok".parse().unwrap());
        assert_eq!(bearer_token(&h).as_deref(), Some("tok"));
        h.insert(AUTHORIZATION, "Basic tok".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }
}
