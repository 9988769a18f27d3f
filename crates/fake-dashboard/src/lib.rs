//! An in-memory fake of the NixFleet v1 dashboard's agent-facing API, bound to `127.0.0.1` by default.
//!
//! It implements protocol-v1 §1–§4, §8 and the §10 "compatible fake dashboard" checklist:
//! pydantic-shaped 422s before the rate limit, 400 bad host id, 401 auth with shared and
//! per-host tokens, token provisioning once per host, the single command slot with
//! clear-on-delivery and `command_log`, status/test-progress semantics including the marked
//! quirks and bugs. On top it can misbehave on purpose (`Mode`) and records every request.
//!
//! The server runs on its own thread with its own tokio runtime, and every method on
//! [`FakeDashboard`] is synchronous (std mutex), so it works from plain `#[test]`s, from
//! `#[tokio::test]` of either flavour, and keeps answering while the caller's runtime is
//! blocked. It must not be used for anything but loopback testing: there is no persistence,
//! no operator UI and no SSE.
//!
//! Code map: `validate` (body models), `state` (rows and rules), `server` (main port, modes),
//! `body` (response bytes), `tls` (certificates), `control` (HTTP control API for the binary).
//! `v2` is the v2 (WebSocket) fake, with its own code map.

#![warn(missing_docs)]

mod body;
pub mod control;
mod server;
mod state;
mod timefmt;
pub mod tls;
pub mod v2;
pub mod validate;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

pub use state::{HostRow, LogRow, QueueError, token_hash};
pub use timefmt::naive_utc;

use server::Shared;

/// Called with each recorded request once its response status is known.
pub type RequestHook = Arc<dyn Fn(&RecordedRequest) + Send + Sync>;

/// How the fake is configured; all but `tls` and `port` can change at runtime
/// ([`FakeDashboard::set_options`]).
#[derive(Clone)]
pub struct Options {
    /// `NIXFLEET_API_TOKEN`; `None` or empty disables the shared token.
    pub shared_token: Option<String>,
    /// `NIXFLEET_ALLOW_SHARED_AGENT_TOKEN`.
    pub allow_shared: bool,
    /// `NIXFLEET_AUTO_PROVISION_AGENT_TOKENS` with a hash secret set.
    pub provision_tokens: bool,
    /// Serve https with a fresh CA-signed certificate for `127.0.0.1`/`localhost`.
    pub tls: bool,
    /// Enforce §8's per-IP, per-endpoint limits, answering 500 like the real server.
    pub rate_limit: bool,
    /// Address of the main port: `127.0.0.1` unless a test network needs more (the NixOS VM
    /// test binds `0.0.0.0`).
    pub bind: std::net::IpAddr,
    /// Main port; 0 picks a free one.
    pub port: u16,
    /// Observer for every answered request (the binary logs with it).
    pub on_request: Option<RequestHook>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            shared_token: Some("shared-secret-token".into()),
            allow_shared: true,
            provision_tokens: true,
            tls: false,
            rate_limit: false,
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 0,
            on_request: None,
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("shared_token", &self.shared_token)
            .field("allow_shared", &self.allow_shared)
            .field("provision_tokens", &self.provision_tokens)
            .field("tls", &self.tls)
            .field("rate_limit", &self.rate_limit)
            .field("bind", &self.bind)
            .field("port", &self.port)
            .field("on_request", &self.on_request.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

/// How the main port behaves. Everything except `Normal` and `Slow` leaves the state untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Answer per the protocol.
    Normal,
    /// The listener and every open connection are closed: connecting is refused.
    Down,
    /// Accept and read requests, never answer (until the mode changes; then answer per the
    /// new mode).
    Hang,
    /// Answer normally after this delay.
    Slow(Duration),
    /// 200 `application/json` with a body that is not JSON.
    Garbage,
    /// 200 `application/json` of exactly N bytes with `Content-Length`, streamed.
    Oversized(usize),
    /// Like `Oversized` but with chunked transfer encoding (no length announced).
    OversizedChunked(usize),
    /// This status with a plausible body (500 is `text/plain` `Internal Server Error`).
    Status(u16),
    /// Like `Status`, but only for requests to this endpoint; the others are answered normally.
    EndpointStatus(Endpoint, u16),
    /// A proxy or web application firewall in front of the dashboard: a request whose body
    /// contains this text is refused with this status; the others are answered normally.
    RefuseBodyContaining(String, u16),
}

/// Which endpoint a request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    /// `POST /api/hosts/{id}/register`.
    Register,
    /// `GET /api/hosts/{id}/poll`.
    Poll,
    /// `POST /api/hosts/{id}/status`.
    Status,
    /// `POST /api/hosts/{id}/test-progress`.
    TestProgress,
    /// `GET /health`.
    Health,
    /// Anything else (answered 404/405).
    Other,
}

/// One request received on the main port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordedRequest {
    /// Arrival sequence number, starting at 1 (not reset by `clear_requests`).
    pub id: u64,
    /// Arrival time (body fully read).
    #[serde(serialize_with = "timefmt::serde_naive::required")]
    pub at: SystemTime,
    /// HTTP method.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Endpoint derived from the path (also set when the method is wrong).
    pub endpoint: Endpoint,
    /// Lowercased `{host_id}` path segment, even when it is invalid.
    pub host_id: Option<String>,
    /// The bearer token sent, if any.
    pub bearer: Option<String>,
    /// The body, if it parsed as JSON.
    pub body: Option<serde_json::Value>,
    /// Raw body length in bytes.
    pub body_len: usize,
    /// Status answered; 0 while unanswered (hanging, or the connection was dropped).
    pub response_status: u16,
    /// `User-Agent` header.
    pub user_agent: Option<String>,
}

/// Handle to a running fake. Clones share the server; the last one dropped stops it.
#[derive(Clone)]
pub struct FakeDashboard {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// The address clients use: the bound one, or loopback when bound to all addresses.
    host: std::net::IpAddr,
    port: u16,
    tls: Option<tls::TlsMaterial>,
    shutdown: watch::Sender<bool>,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Inner {
    fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shutdown.send_replace(true);
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl fmt::Debug for FakeDashboard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeDashboard")
            .field("url", &self.url())
            .finish()
    }
}

impl FakeDashboard {
    /// Binds `opts.bind:opts.port` and starts serving. Panics only if binding (or certificate
    /// generation) fails.
    pub fn start(opts: Options) -> FakeDashboard {
        Self::try_start(opts).unwrap_or_else(|e| panic!("fake-dashboard: cannot start: {e}"))
    }

    /// Like [`FakeDashboard::start`] but reports failure.
    pub fn try_start(opts: Options) -> std::io::Result<FakeDashboard> {
        let tls = if opts.tls {
            Some(tls::generate().map_err(std::io::Error::other)?)
        } else {
            None
        };
        let listener = std::net::TcpListener::bind((opts.bind, opts.port))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let host = match opts.bind {
            std::net::IpAddr::V4(a) if a.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            other => other,
        };
        let shared = Arc::new(Shared::new(opts));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let acceptor = tls
            .as_ref()
            .map(|m| tokio_rustls::TlsAcceptor::from(m.config.clone()));
        let thread = server::spawn(shared.clone(), listener, acceptor, shutdown_rx)?;
        Ok(FakeDashboard {
            inner: Arc::new(Inner {
                shared,
                host,
                port,
                tls,
                shutdown,
                stopped: AtomicBool::new(false),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT` (the bound address, if not
    /// loopback or all addresses).
    pub fn url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let addr = std::net::SocketAddr::new(self.inner.host, self.inner.port);
        format!("{scheme}://{addr}")
    }

    /// The main port (stable across `Down`).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// PEM of the CA that signed the server certificate, when `tls`.
    pub fn ca_pem(&self) -> Option<String> {
        self.inner.tls.as_ref().map(|t| t.ca_pem.clone())
    }

    /// base64(sha256(DER SubjectPublicKeyInfo)) of the server certificate, i.e. what
    /// `curl --pinnedpubkey sha256//<this>` expects, when `tls`.
    pub fn spki_sha256_base64(&self) -> Option<String> {
        self.inner
            .tls
            .as_ref()
            .map(|t| t.spki_sha256_base64.clone())
    }

    /// Switches the mode. Returns once the port state matches (refusing for `Down`, accepting
    /// otherwise; at most ~5 s while a rebind is retried).
    pub fn set_mode(&self, mode: Mode) {
        let listening = !matches!(mode, Mode::Down);
        self.inner.shared.mode.send_replace(mode);
        if !self.inner.stopped.load(Ordering::SeqCst) {
            self.inner
                .shared
                .wait_listening(listening, Duration::from_secs(5));
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.inner.shared.mode.borrow().clone()
    }

    /// The operator API (`POST /api/hosts/{id}/command`, §4/§5): 422 unknown name, 400 bad id,
    /// 404 unknown host, 409 never seen / offline; `stop` clears the slot and `test_running`,
    /// `test` resets the test fields.
    pub fn queue_command(&self, host_id: &str, command: &str) -> Result<(), QueueError> {
        self.inner
            .shared
            .lock()
            .db
            .queue_command(host_id, command, SystemTime::now())
    }

    /// Writes the slot directly like a DB update (any name, e.g. `update`), creating a
    /// never-seen row if needed.
    pub fn force_command(&self, host_id: &str, command: &str) {
        self.inner
            .shared
            .lock()
            .db
            .force_command(host_id, command, SystemTime::now());
    }

    /// Adds a never-seen host like the operator's manual add; false if it existed.
    pub fn add_host(&self, host_id: &str) -> bool {
        self.inner.shared.lock().db.add_host(host_id)
    }

    /// Overrides a host's `last_seen` (e.g. `now - 10 min` to make it offline).
    pub fn set_last_seen(&self, host_id: &str, at: Option<SystemTime>) {
        self.inner.shared.lock().db.set_last_seen(host_id, at);
    }

    /// Every request received on the main port since the last `clear_requests`, in arrival
    /// order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.inner.shared.lock().requests.clear();
    }

    /// The DB row of a host (id is lowercased).
    pub fn host(&self, host_id: &str) -> Option<HostRow> {
        self.inner
            .shared
            .lock()
            .db
            .host(&host_id.to_lowercase())
            .cloned()
    }

    /// The command log of a host, oldest first.
    pub fn command_log(&self, host_id: &str) -> Vec<LogRow> {
        self.inner.shared.lock().db.logs(&host_id.to_lowercase())
    }

    /// The raw per-host token provisioned for (or set on) the host, if any.
    pub fn issued_token(&self, host_id: &str) -> Option<String> {
        self.inner
            .shared
            .lock()
            .db
            .issued_token(&host_id.to_lowercase())
    }

    /// Replaces the host's token like an operator rotation (creates a never-seen row if needed).
    pub fn set_host_token(&self, host_id: &str, token: &str) {
        self.inner.shared.lock().db.set_host_token(host_id, token);
    }

    /// Changes options at runtime (`tls` and `port` are ignored after start).
    pub fn set_options(&self, f: impl FnOnce(&mut Options)) {
        f(&mut self.inner.shared.lock().opts);
    }

    /// A copy of the current options.
    pub fn options(&self) -> Options {
        self.inner.shared.lock().opts.clone()
    }

    /// Forgets all rate-limit windows.
    pub fn reset_rate_limits(&self) {
        self.inner.shared.lock().db.reset_rate_limits();
    }

    /// Polls `pred` over the recorded requests every 20 ms until it holds (true) or `timeout`
    /// passes (false). Blocks the calling thread.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[RecordedRequest]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.requests()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Async twin of [`FakeDashboard::wait_for`] for tests whose agent runs on the same
    /// runtime; the deadline is wall-clock time even under `tokio::time::pause()`.
    pub async fn wait_for_async(
        &self,
        timeout: Duration,
        pred: impl Fn(&[RecordedRequest]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.requests()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops serving (idempotent); the recorded state stays queryable. Also happens when the
    /// last handle is dropped.
    pub fn stop(&self) {
        self.inner.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_can_move_between_threads_and_tasks() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<FakeDashboard>();
        assert_send_sync::<Options>();
        assert_send_sync::<RecordedRequest>();
    }

    #[test]
    fn defaults_match_the_dashboard_defaults() {
        let o = Options::default();
        assert_eq!(o.shared_token.as_deref(), Some("shared-secret-token"));
        assert!(o.allow_shared && o.provision_tokens && !o.tls && !o.rate_limit);
        assert_eq!(o.port, 0);
    }
}
