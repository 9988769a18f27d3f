//! A fake of the NixFleet v2 dashboard's agent WebSocket (`GET /ws`), for tests, the demo and
//! the benchmark; the contract is `docs/protocol-v2.md` and this implements its §12 checklist.
//!
//! Like the v1 fake it runs on its own thread with its own tokio runtime, every method on
//! [`FakeV2`] is synchronous (one std mutex, never held across an `.await`), and it records
//! everything: each handshake, each frame in both directions (data, Ping, Pong, close with
//! code and reason), each connection's life, the `hosts` row of §5.2 and the command lifecycle
//! of §7.2. Timers (Ping period, read deadline, reconnect window, operation timeouts) are
//! options so tests run in milliseconds. It must only be used on loopback: no persistence, no
//! browser side, no login.
//!
//! Code map: `wire` (frame codec), `decode` (Go-like payload decoding), `state` (hosts,
//! connections, the lifecycle; no I/O), `server` (listener, handshake, per-connection reader
//! and writer), `impostor` (a scripted second client), `control` (HTTP control API for the
//! binary).

pub mod control;
mod decode;
mod impostor;
mod server;
mod state;
mod wire;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::watch;

pub use impostor::Impostor;
pub use state::{Blocked, CommandStatus, HostState, SendError, TrackedCommand};

use server::Shared;

/// Called with each recorded frame (the binary prints them). It runs with the fake's lock
/// held, so it must not call back into [`FakeV2`].
pub type FrameHook = Arc<dyn Fn(&Frame) + Send + Sync>;

/// How the fake is configured. Only `tls`, `bind` and `port` are fixed at start; the rest can
/// change with [`FakeV2::set_options`] and apply to connections opened afterwards (timers) or
/// at once (token, origins, lifecycle).
#[derive(Clone)]
pub struct V2Options {
    /// `NIXFLEET_AGENT_TOKEN`: the one shared agent token.
    pub token: String,
    /// Serve `wss://` with a fresh CA-signed certificate for `127.0.0.1`/`localhost`.
    pub tls: bool,
    /// Listening address (`127.0.0.1` unless a VM test needs `0.0.0.0`).
    pub bind: IpAddr,
    /// Listening port; 0 picks a free one.
    pub port: u16,
    /// Period of the dashboard's Pings (54 s upstream).
    pub ping_interval: Duration,
    /// Read deadline, reset by every frame (60 s upstream).
    pub read_deadline: Duration,
    /// Largest inbound message, counted across fragments (524 288 upstream); above it the
    /// connection gets close 1009 and is dropped.
    pub max_message: usize,
    /// Outbound queue per connection (256 upstream).
    pub queue_cap: usize,
    /// §7.2 lifecycle mode: `send_command` tracks the command like the op engine.
    pub lifecycle: bool,
    /// How long a successful switch waits for the agent's next `register` (90 s upstream).
    pub reconnect_window: Duration,
    /// `NIXFLEET_ALLOWED_ORIGINS`.
    pub allowed_origins: Vec<String>,
    /// Write deadline per frame (10 s upstream); when it passes the TCP connection is closed.
    pub write_deadline: Duration,
    /// Overrides the per-op warning and hard timeouts of §7.2 (for every op) when set.
    pub op_timeouts: Option<OpTimeouts>,
    /// The dashboard's own version, for `force-rebuild`'s post-check (`dev` upstream default).
    pub dashboard_version: String,
    /// Observer for every recorded frame.
    pub on_frame: Option<FrameHook>,
    /// Keep `output` messages in the frame log (the hook sees them either way). The benchmark
    /// turns it off so a 50 MiB flood does not grow the fake.
    pub record_output: bool,
}

/// The two lifecycle timers of a tracked command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpTimeouts {
    /// `EXECUTING` → `RUNNING_WARNING`.
    pub warning: Duration,
    /// → `TIMEOUT_PENDING`.
    pub hard: Duration,
}

impl Default for V2Options {
    fn default() -> Self {
        V2Options {
            token: "shared-agent-token".into(),
            tls: false,
            bind: Ipv4Addr::LOCALHOST.into(),
            port: 0,
            ping_interval: Duration::from_secs(54),
            read_deadline: Duration::from_secs(60),
            max_message: 524_288,
            queue_cap: 256,
            lifecycle: false,
            reconnect_window: Duration::from_secs(90),
            allowed_origins: Vec::new(),
            write_deadline: Duration::from_secs(10),
            op_timeouts: None,
            dashboard_version: "dev".into(),
            on_frame: None,
            record_output: true,
        }
    }
}

impl V2Options {
    /// Rejects values the server cannot run with, naming the field.
    pub fn check(&self) -> Result<(), String> {
        for (name, d) in [
            ("ping_interval", self.ping_interval),
            ("read_deadline", self.read_deadline),
            ("write_deadline", self.write_deadline),
        ] {
            if d.is_zero() {
                return Err(format!("V2Options::{name} must be longer than zero"));
            }
        }
        if self.max_message == 0 || self.queue_cap == 0 {
            return Err(
                "V2Options::max_message and V2Options::queue_cap must be at least 1".into(),
            );
        }
        Ok(())
    }
}

impl fmt::Debug for V2Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("V2Options")
            .field("tls", &self.tls)
            .field("bind", &self.bind)
            .field("port", &self.port)
            .field("ping_interval", &self.ping_interval)
            .field("read_deadline", &self.read_deadline)
            .field("max_message", &self.max_message)
            .field("queue_cap", &self.queue_cap)
            .field("lifecycle", &self.lifecycle)
            .field("reconnect_window", &self.reconnect_window)
            .field("allowed_origins", &self.allowed_origins)
            .field("write_deadline", &self.write_deadline)
            .field("op_timeouts", &self.op_timeouts)
            .field("dashboard_version", &self.dashboard_version)
            .field("record_output", &self.record_output)
            .finish_non_exhaustive()
    }
}

/// Deliberate misbehaviour; every switch can be flipped at runtime with
/// [`FakeV2::set_behaviour`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Behaviour {
    /// The listener is closed and every connection dropped (no close frame): dials are refused
    /// until this is cleared, then the same port serves again.
    pub down: bool,
    /// Answer 401 to every token, even the right one.
    pub reject_all_tokens: bool,
    /// Process `register` but never answer `registered`.
    pub withhold_registered: bool,
    /// Answer `registered` only after this delay.
    pub delay_registered: Option<Duration>,
    /// Record Pings but never answer them.
    pub withhold_pongs: bool,
    /// Stop reading every socket (the peer's writes eventually block); the read deadline is
    /// suspended meanwhile.
    pub stop_reading: bool,
    /// Write each `command` (and `kill_command`) only after this delay.
    pub delay_commands: Option<Duration>,
    /// Answer `GET /` with 302 to `/login` (the real dashboard's answer to an agent whose URL
    /// lacks `/ws`) instead of 404.
    pub redirect_root: bool,
}

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Agent → fake.
    In,
    /// Fake → agent.
    Out,
}

/// What kind of frame (or reassembled message) a log entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    /// A text message (all fragments).
    Text,
    /// A binary message (processed like text, as upstream does).
    Binary,
    /// A Ping control frame.
    Ping,
    /// A Pong control frame.
    Pong,
    /// A close frame.
    Close,
}

/// One entry of the ordered frame log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frame {
    /// Position in the log, from 1 (gaps where `record_output` is off).
    pub seq: u64,
    /// Connection id (see [`FakeV2::connections`]).
    pub conn: u64,
    /// Direction.
    pub dir: Direction,
    /// Kind.
    pub kind: FrameKind,
    /// The envelope's `type` when the message decoded as an envelope.
    pub msg_type: Option<String>,
    /// The envelope's `payload` as sent.
    pub payload: Option<Value>,
    /// The bytes as (lossy) UTF-8: the message, the Ping/Pong payload or the close reason.
    pub text: String,
    /// Payload bytes on the wire (a message's total across fragments).
    pub raw_len: usize,
    /// How many frames carried the message (1 unless fragmented).
    pub fragments: usize,
    /// For close frames: the code, `None` for an empty payload (peer sees 1005).
    pub close_code: Option<u16>,
    /// Why an inbound message had no effect: bad JSON, a missing payload, an undecodable
    /// field, an unknown type. `None` when it was processed.
    pub ignored: Option<String>,
    /// Hostname the connection had registered as when the frame passed.
    pub host: Option<String>,
    /// When it was read, or (outbound) just before it was written, so anything the peer
    /// has received is already in the log.
    #[serde(skip)]
    pub at: Instant,
}

impl Frame {
    /// An inbound data message of this envelope type.
    pub fn is_in(&self, msg_type: &str) -> bool {
        self.dir == Direction::In && self.msg_type.as_deref() == Some(msg_type)
    }

    /// An outbound data message of this envelope type.
    pub fn is_out(&self, msg_type: &str) -> bool {
        self.dir == Direction::Out && self.msg_type.as_deref() == Some(msg_type)
    }

    /// `payload[key]` as a string, when present.
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.payload.as_ref()?.get(key)?.as_str()
    }
}

/// One HTTP request on the listener (upgrade or not).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Handshake {
    /// Arrival order, from 1.
    pub seq: u64,
    /// Method.
    pub method: String,
    /// Path (without query).
    pub path: String,
    /// Every header, as received (the `Authorization` header included, so tests can check
    /// what the agent sends).
    pub headers: Vec<(String, String)>,
    /// Status answered: 101 on upgrade.
    pub status: u16,
    /// The connection id when upgraded.
    pub conn: Option<u64>,
    /// Arrival time.
    #[serde(skip)]
    pub at: Instant,
}

impl Handshake {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The peer sent a close frame (answered with an echo).
    PeerClosed,
    /// The peer closed TCP without a close frame, or a read failed.
    ReadFailed,
    /// Nothing arrived within the read deadline.
    ReadDeadline,
    /// A message above `max_message`; close 1009 was sent.
    Oversize,
    /// A framing error (unmasked, reserved bits, bad opcode, bad fragmenting); close 1002.
    ProtocolError,
    /// A newer connection registered the same hostname; empty close frame sent.
    Displaced,
    /// [`FakeV2::drop_connection`].
    Dropped,
    /// A write did not finish within the write deadline.
    WriteTimeout,
    /// A write failed (the peer reset the connection).
    WriteFailed,
    /// [`Behaviour::down`].
    Down,
    /// The fake stopped.
    Stopped,
}

/// One WebSocket connection's life.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnInfo {
    /// Id, from 1 in upgrade order.
    pub id: u64,
    /// Peer address.
    pub peer: SocketAddr,
    /// Hostname of the last `register` on this connection.
    pub hostname: Option<String>,
    /// Still open.
    pub open: bool,
    /// The current connection for its hostname.
    pub current: bool,
    /// Close frame the fake sent: `Some(None)` is the empty close frame (peer sees 1005).
    pub close_sent: Option<Option<u16>>,
    /// Close frame the peer sent: code (`None` = empty payload) and reason.
    pub close_received: Option<(Option<u16>, String)>,
    /// Why it ended, once it has.
    pub end: Option<EndReason>,
    /// Upgrade time.
    #[serde(skip)]
    pub opened_at: Instant,
    /// End time.
    #[serde(skip)]
    pub closed_at: Option<Instant>,
}

/// How [`FakeV2::drop_connection`] ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropHow {
    /// Close TCP without a close frame (peer sees 1006).
    Abrupt,
    /// Send a close frame (`None`: empty payload, peer sees 1005), wait briefly for the echo,
    /// then close TCP.
    Close(Option<u16>),
}

/// Handle to a running fake; dropping it stops the server.
pub struct FakeV2 {
    shared: Arc<Shared>,
    host: IpAddr,
    port: u16,
    tls: Option<crate::tls::TlsMaterial>,
    rt: tokio::runtime::Handle,
    shutdown: watch::Sender<bool>,
    stopped: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for FakeV2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeV2").field("url", &self.url()).finish()
    }
}

impl Drop for FakeV2 {
    fn drop(&mut self) {
        self.stop();
    }
}

impl FakeV2 {
    /// Binds and starts serving. Panics only if binding or certificate generation fails.
    pub fn start(opts: V2Options) -> FakeV2 {
        Self::try_start(opts).unwrap_or_else(|e| panic!("fake-dashboard v2: cannot start: {e}"))
    }

    /// Like [`FakeV2::start`] but reports failure, including options that cannot work.
    pub fn try_start(opts: V2Options) -> std::io::Result<FakeV2> {
        opts.check()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let tls = if opts.tls {
            Some(crate::tls::generate().map_err(std::io::Error::other)?)
        } else {
            None
        };
        let listener = std::net::TcpListener::bind((opts.bind, opts.port))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let host = match opts.bind {
            IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
            other => other,
        };
        let shared = Arc::new(Shared::new(opts));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let acceptor = tls
            .as_ref()
            .map(|m| tokio_rustls::TlsAcceptor::from(m.config.clone()));
        let (thread, rt) = server::spawn(shared.clone(), listener, acceptor, shutdown_rx)?;
        Ok(FakeV2 {
            shared,
            host,
            port,
            tls,
            rt,
            shutdown,
            stopped: AtomicBool::new(false),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// `ws://127.0.0.1:PORT/ws` (`wss://` with `tls`).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}/ws", SocketAddr::new(self.host, self.port))
    }

    /// The listening port (stable across [`Behaviour::down`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PEM of the CA that signed the server certificate, with `tls`.
    pub fn ca_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.ca_pem.clone())
    }

    /// base64(sha256(SPKI)) of the server certificate, with `tls`.
    pub fn spki_sha256_base64(&self) -> Option<String> {
        self.tls.as_ref().map(|t| t.spki_sha256_base64.clone())
    }

    /// Pushes `{"type":"command","payload":{"command":name}}` to the host's current
    /// connection; any name. In lifecycle mode the command is also tracked (`EXECUTING`,
    /// `pending_command := name`) unless another one is still tracked, in which case it is
    /// sent untracked (like upstream's legacy merge-and-deploy path), so tests can provoke
    /// `command_rejected`. No pre-checks: see [`FakeV2::dispatch`].
    pub fn send_command(&self, host: &str, name: &str) -> Result<(), SendError> {
        let bytes = state::envelope("command", &serde_json::json!({"command": name}));
        let track = self.shared.lock().opts.lifecycle;
        self.shared
            .send_command(host, name, bytes.into_bytes(), track)
    }

    /// The op engine's `ExecuteOp` (`POST /api/dispatch` without `force`): §7.2 pre-checks
    /// (`command_pending`, `offline`, `busy`, `no_pending` for `stop`), then send and track
    /// whether or not lifecycle mode is on. A send failure is tracked as `ERROR` and answered
    /// as `send_failed`. Not checked: `already_current`/`lock_outdated` (they need a remote
    /// `version.json`) and `reboot`'s TOTP.
    pub fn dispatch(&self, host: &str, op: &str) -> Result<(), Blocked> {
        self.shared.dispatch(host, op)
    }

    /// Pushes `kill_command` `{signal, pid}` (never sent by the real dashboard, which the
    /// agent handles anyway). Silently does nothing without a connection.
    pub fn send_kill_command(&self, host: &str, signal: &str, pid: i64) {
        let bytes = state::envelope(
            "kill_command",
            &serde_json::json!({"signal": signal, "pid": pid}),
        );
        let _ = self
            .shared
            .send_command(host, "", bytes.into_bytes(), false);
    }

    /// Writes `bytes` as one text (or binary) message to the host's current connection, for
    /// malformed JSON, a missing payload or unknown types. No effect without a connection.
    pub fn send_raw(&self, host: &str, bytes: &[u8], binary: bool) {
        self.shared.send_raw(host, bytes.to_vec(), binary);
    }

    /// The ordered log of every frame, both directions, all connections.
    pub fn frames(&self) -> Vec<Frame> {
        self.shared.lock().frames.clone()
    }

    /// Inbound messages whose envelope type is `msg_type`, in order.
    pub fn messages(&self, msg_type: &str) -> Vec<Frame> {
        let st = self.shared.lock();
        st.frames
            .iter()
            .filter(|f| f.is_in(msg_type))
            .cloned()
            .collect()
    }

    /// Polls `pred` over the frame log every 10 ms until it holds (true) or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Frame]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.shared.lock().frames) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until at least `n` inbound messages of `msg_type` were recorded, or `timeout`
    /// passes; returns those recorded by then (check the length).
    pub fn wait_messages(&self, msg_type: &str, n: usize, timeout: Duration) -> Vec<Frame> {
        self.wait_for(timeout, |fs| {
            fs.iter().filter(|f| f.is_in(msg_type)).count() >= n
        });
        self.messages(msg_type)
    }

    /// True when no inbound message of `msg_type` arrives during `window` (counting from now).
    pub fn none_within(&self, msg_type: &str, window: Duration) -> bool {
        let before = self.messages(msg_type).len();
        !self.wait_for(window, |fs| {
            fs.iter().filter(|f| f.is_in(msg_type)).count() > before
        })
    }

    /// Polls `pred` over the fake's view (hosts, commands, connections) like `wait_for`.
    pub fn wait_until(&self, timeout: Duration, pred: impl Fn(&FakeV2) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The §5.2 row of a host (hostnames are case-sensitive, as upstream).
    pub fn host(&self, hostname: &str) -> Option<HostState> {
        let mut st = self.shared.lock();
        st.tick(Instant::now(), SystemTime::now());
        st.hosts.get(hostname).cloned()
    }

    /// Every host row.
    pub fn hosts(&self) -> Vec<HostState> {
        let mut st = self.shared.lock();
        st.tick(Instant::now(), SystemTime::now());
        st.hosts.values().cloned().collect()
    }

    /// The host's tracked command, or, when none is tracked, the last finished one.
    pub fn command_state(&self, host: &str) -> Option<TrackedCommand> {
        let mut st = self.shared.lock();
        st.tick(Instant::now(), SystemTime::now());
        st.tracked
            .get(host)
            .cloned()
            .or_else(|| st.history.get(host).and_then(|h| h.last().cloned()))
    }

    /// Finished commands of a host, oldest first.
    pub fn command_history(&self, host: &str) -> Vec<TrackedCommand> {
        let mut st = self.shared.lock();
        st.tick(Instant::now(), SystemTime::now());
        st.history.get(host).cloned().unwrap_or_default()
    }

    /// The operator's `POST /api/hosts/{id}/timeout-action`: `wait` (back to `EXECUTING` with a
    /// fresh hard timeout), `ignore` (`SKIPPED`, forgotten) or `kill` (sends the command
    /// `kill`, `KILLING`). False when nothing is tracked or the action is unknown.
    pub fn timeout_action(&self, host: &str, action: &str) -> bool {
        self.shared.timeout_action(host, action)
    }

    /// Every HTTP request on the listener, in order.
    pub fn handshakes(&self) -> Vec<Handshake> {
        self.shared.lock().handshakes.clone()
    }

    /// Every WebSocket connection, in upgrade order.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.shared.lock().conn_infos()
    }

    /// The host's current connection, if open.
    pub fn current_connection(&self, host: &str) -> Option<ConnInfo> {
        let st = self.shared.lock();
        let id = st.current_conn(host)?;
        st.conn_infos().into_iter().find(|c| c.id == id)
    }

    /// Ends the host's current connection. No effect without one.
    pub fn drop_connection(&self, host: &str, how: DropHow) {
        self.shared.drop_connection(host, how);
    }

    /// Ends a connection by id (e.g. one that never registered).
    pub fn drop_connection_id(&self, conn: u64, how: DropHow) {
        self.shared.drop_conn_id(conn, how, EndReason::Dropped);
    }

    /// Changes the misbehaviour switches; takes effect at once (`down` returns once the port
    /// refuses or serves again, at most ~5 s).
    pub fn set_behaviour(&self, f: impl FnOnce(&mut Behaviour)) {
        let mut b = self.shared.behaviour.borrow().clone();
        f(&mut b);
        let down = b.down;
        self.shared.set_behaviour(b);
        if !self.stopped.load(Ordering::SeqCst) {
            self.shared.wait_listening(!down, Duration::from_secs(5));
        }
    }

    /// The current switches.
    pub fn behaviour(&self) -> Behaviour {
        self.shared.behaviour.borrow().clone()
    }

    /// Changes options at runtime (`tls`, `bind`, `port` are ignored).
    pub fn set_options(&self, f: impl FnOnce(&mut V2Options)) {
        f(&mut self.shared.lock().opts);
    }

    /// Forgets the frame log and the handshakes (hosts, connections and commands stay).
    pub fn clear_frames(&self) {
        let mut st = self.shared.lock();
        st.frames.clear();
        st.handshakes.clear();
    }

    /// Opens a second client that registers `hostname` with the right token, as a duplicate
    /// agent would; the fake then displaces the host's current connection. Blocks until the
    /// impostor's `register` was processed (at most 5 s). Dropping it closes it.
    pub fn impostor(&self, hostname: &str) -> Impostor {
        let token = self.shared.lock().opts.token.clone();
        Impostor::start(
            &self.rt,
            self.shared.clone(),
            SocketAddr::new(self.host, self.port),
            self.tls.as_ref().map(|t| t.ca_der.clone()),
            &token,
            hostname,
        )
    }

    /// Stops serving (idempotent): the listener closes and every connection is dropped without
    /// a close frame. Recorded state stays queryable.
    pub fn stop(&self) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_and_records_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<FakeV2>();
        assert_send_sync::<Frame>();
        assert_send_sync::<V2Options>();
    }

    #[test]
    fn zero_timers_are_refused_by_name() {
        let opts = V2Options {
            ping_interval: Duration::ZERO,
            ..V2Options::default()
        };
        let err = FakeV2::try_start(opts).unwrap_err();
        assert!(err.to_string().contains("ping_interval"), "{err}");
        let opts = V2Options {
            queue_cap: 0,
            ..V2Options::default()
        };
        assert!(opts.check().unwrap_err().contains("queue_cap"));
    }

    #[test]
    fn defaults_are_upstreams() {
        let o = V2Options::default();
        assert_eq!(o.ping_interval, Duration::from_secs(54));
        assert_eq!(o.read_deadline, Duration::from_secs(60));
        assert_eq!((o.max_message, o.queue_cap), (524_288, 256));
        assert_eq!(o.reconnect_window, Duration::from_secs(90));
        assert_eq!(o.write_deadline, Duration::from_secs(10));
        assert!(!o.lifecycle && !o.tls && o.allowed_origins.is_empty());
    }
}
