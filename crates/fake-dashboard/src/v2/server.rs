//! The listener, the `GET /ws` handshake (§2) and each connection's reader and writer (§3).
//!
//! Runs on the fake's own runtime thread. The handshake goes through hyper so the checks run
//! in the dashboard's order (path → token → upgrade headers → Origin → key) and every refusal
//! is a real HTTP answer; an accepted request is upgraded and handed to [`run_ws`], which
//! reads frames with `wire`, hands whole messages to `state` and writes from the connection's
//! two channels (data queue, control orders). Nothing here holds the state lock across an
//! `.await`.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::state::{CLOSE_GRACE, ConnCtl, Ctl, NewFrame, Outgoing, SendError, State};
use super::wire;
use super::{Behaviour, Blocked, Direction, DropHow, EndReason, FrameKind, Handshake, V2Options};

/// State shared between the handle (test thread) and the server (fake thread).
pub(crate) struct Shared {
    state: Mutex<State>,
    /// The misbehaviour switches; the listener and readers wait on changes.
    pub behaviour: watch::Sender<Behaviour>,
    listening: Mutex<bool>,
    listening_changed: Condvar,
}

impl Shared {
    pub(crate) fn new(opts: V2Options) -> Shared {
        Shared {
            state: Mutex::new(State::new(opts)),
            behaviour: watch::Sender::new(Behaviour::default()),
            listening: Mutex::new(true),
            listening_changed: Condvar::new(),
        }
    }

    /// The state lock; a panic elsewhere must not make every later query panic too.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_behaviour(&self, b: Behaviour) {
        self.lock().behaviour = b.clone();
        self.behaviour.send_replace(b);
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

    pub(crate) fn send_command(
        &self,
        host: &str,
        name: &str,
        bytes: Vec<u8>,
        track: bool,
    ) -> Result<(), SendError> {
        let mut st = self.lock();
        let delay = st.behaviour.delay_commands;
        st.send_command(host, name, bytes, track, delay)
    }

    pub(crate) fn dispatch(&self, host: &str, op: &str) -> Result<(), Blocked> {
        let mut st = self.lock();
        let delay = st.behaviour.delay_commands;
        st.dispatch(host, op, delay)
    }

    pub(crate) fn timeout_action(&self, host: &str, action: &str) -> bool {
        let mut st = self.lock();
        let delay = st.behaviour.delay_commands;
        st.timeout_action(host, action, delay)
    }

    pub(crate) fn send_raw(&self, host: &str, bytes: Vec<u8>, binary: bool) {
        let _ = self.lock().enqueue(host, bytes, binary, None);
    }

    pub(crate) fn drop_connection(&self, host: &str, how: DropHow) {
        let mut st = self.lock();
        if let Some(conn) = st.current_conn(host) {
            st.end_conn(conn, how, EndReason::Dropped);
        }
    }

    pub(crate) fn drop_conn_id(&self, conn: u64, how: DropHow, reason: EndReason) {
        self.lock().end_conn(conn, how, reason);
    }
}

/// Starts the runtime thread serving `listener` until `shutdown` flips to true.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<(std::thread::JoinHandle<()>, tokio::runtime::Handle)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fake-v2-rt")
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let thread = std::thread::Builder::new()
        .name("fake-v2".into())
        .spawn(move || {
            let ticker_shared = shared.clone();
            let mut ticker_shutdown = shutdown.clone();
            rt.spawn(async move {
                // The lifecycle's timers also advance on every query; this covers idle periods.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {
                            ticker_shared.lock().tick(Instant::now(), SystemTime::now());
                        }
                        _ = ticker_shutdown.changed() => return,
                    }
                }
            });
            let accept_shared = shared.clone();
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(accept_shared, listener, tls, shutdown).await,
                    Err(e) => eprintln!("fake-dashboard v2: cannot register listener: {e}"),
                }
            });
            rt.shutdown_timeout(Duration::from_millis(500));
            // Tasks were dropped with their sockets: record the ends.
            let mut st = shared.lock();
            let open: Vec<u64> = st
                .conn_infos()
                .iter()
                .filter(|c| c.open)
                .map(|c| c.id)
                .collect();
            for id in open {
                st.conn_closed(id, EndReason::Stopped, Instant::now(), SystemTime::now());
            }
        })?;
    Ok((thread, handle))
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
    let mut beh_rx = shared.behaviour.subscribe();
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let down = beh_rx.borrow_and_update().down;
        if down && listener.is_some() {
            listener = None;
            let mut st = shared.lock();
            let open: Vec<u64> = st
                .conn_infos()
                .iter()
                .filter(|c| c.open)
                .map(|c| c.id)
                .collect();
            for id in open {
                st.end_conn(id, DropHow::Abrupt, EndReason::Down);
            }
            drop(st);
            shared.set_listening(false);
        }
        if !down && listener.is_none() {
            match crate::server::rebind(addr, &mut shutdown).await {
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
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = beh_rx.changed() => {}
                _ = shutdown.changed() => return,
            },
            None => tokio::select! {
                _ = beh_rx.changed() => {}
                _ = shutdown.changed() => return,
            },
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
}

async fn serve_http<I>(shared: Arc<Shared>, peer: SocketAddr, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, peer, req)) }
    });
    let _ = http1::Builder::new()
        .serve_connection(io, svc)
        .with_upgrades()
        .await;
}

type Resp = Response<Full<Bytes>>;

/// A plain-text refusal with the dashboard's security headers (`http.Error` style).
fn refuse(status: StatusCode, body: &str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if !body.is_empty() {
        h.insert(
            "content-type",
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-xss-protection",
        HeaderValue::from_static("1; mode=block"),
    );
    h.insert(
        "referrer-policy",
        HeaderValue::from_static("strict-origin-when-cross-origin"),
    );
    resp
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether a comma-separated header contains `token` (ASCII case-insensitive), as gorilla's
/// `tokenListContainsValue`.
fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn handle(shared: Arc<Shared>, peer: SocketAddr, mut req: Request<Incoming>) -> Resp {
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let (opts_token, origins, behaviour) = {
        let st = shared.lock();
        (
            st.opts.token.clone(),
            st.opts.allowed_origins.clone(),
            st.behaviour.clone(),
        )
    };
    let decision = decide(&req, &opts_token, &origins, &behaviour);
    let mut conn = None;
    let resp = match decision {
        Err(resp) => *resp,
        Ok(accept) => {
            let (data_tx, data_rx) = mpsc::channel(shared.lock().opts.queue_cap.max(1));
            let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
            let id = shared.lock().open_conn(
                peer,
                ConnCtl {
                    data: data_tx,
                    ctl: ctl_tx.clone(),
                },
            );
            conn = Some(id);
            let upgrade = hyper::upgrade::on(&mut req);
            let shared = shared.clone();
            tokio::spawn(async move {
                let end = match upgrade.await {
                    Ok(upgraded) => {
                        run_ws(&shared, id, TokioIo::new(upgraded), data_rx, ctl_rx, ctl_tx).await
                    }
                    Err(_) => EndReason::ReadFailed,
                };
                shared
                    .lock()
                    .conn_closed(id, end, Instant::now(), SystemTime::now());
            });
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert("upgrade", HeaderValue::from_static("websocket"));
            h.insert("connection", HeaderValue::from_static("Upgrade"));
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert("sec-websocket-accept", v);
            }
            resp
        }
    };
    let mut st = shared.lock();
    let seq = st.handshakes.len() as u64 + 1;
    st.handshakes.push(Handshake {
        seq,
        method: req.method().as_str().to_owned(),
        path: req.uri().path().to_owned(),
        headers,
        status: resp.status().as_u16(),
        conn,
        at: Instant::now(),
    });
    resp
}

/// §2.3's checks in order; `Ok` carries the `Sec-WebSocket-Accept` value.
fn decide(
    req: &Request<Incoming>,
    token: &str,
    origins: &[String],
    b: &Behaviour,
) -> Result<String, Box<Resp>> {
    let path = req.uri().path();
    if path != "/ws" {
        if path == "/" && b.redirect_root {
            let mut resp = refuse(StatusCode::FOUND, "");
            resp.headers_mut()
                .insert("location", HeaderValue::from_static("/login"));
            return Err(Box::new(resp));
        }
        return Err(Box::new(refuse(
            StatusCode::NOT_FOUND,
            "404 page not found\n",
        )));
    }
    if req.method() != Method::GET {
        return Err(Box::new(refuse(StatusCode::METHOD_NOT_ALLOWED, "")));
    }
    let h = req.headers();
    // A header without the exact `Bearer ` prefix is a browser, which needs a session cookie
    // the fake never issues: 401 either way.
    let authorized = header(h, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| !b.reject_all_tokens && constant_time_eq(t.as_bytes(), token.as_bytes()));
    if !authorized {
        return Err(Box::new(refuse(StatusCode::UNAUTHORIZED, "Unauthorized\n")));
    }
    if !has_token(h, "connection", "upgrade") || !has_token(h, "upgrade", "websocket") {
        return Err(Box::new(refuse(StatusCode::BAD_REQUEST, "Bad Request\n")));
    }
    if header(h, "sec-websocket-version") != Some("13") {
        let mut resp = refuse(StatusCode::BAD_REQUEST, "Bad Request\n");
        resp.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return Err(Box::new(resp));
    }
    if !origin_allowed(header(h, "origin"), header(h, "host"), origins) {
        let mut resp = refuse(StatusCode::FORBIDDEN, "Forbidden\n");
        resp.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return Err(Box::new(resp));
    }
    let key = header(h, "sec-websocket-key").map(str::trim).unwrap_or("");
    let key_ok = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
    };
    if !key_ok {
        return Err(Box::new(refuse(StatusCode::BAD_REQUEST, "Bad Request\n")));
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `host[:port]` → host, for `host`, `1.2.3.4:80`, `[::1]:80`, `::1`.
fn host_only(hostport: &str) -> &str {
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    if hostport.parse::<IpAddr>().is_ok() {
        return hostport;
    }
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

/// §2.4's Origin rule.
pub(crate) fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    if scheme.is_empty() || rest.contains(char::is_whitespace) {
        return false;
    }
    if allowed.iter().any(|a| a.trim() == origin) {
        return true;
    }
    let origin_host = host_only(rest.split(['/', '?', '#']).next().unwrap_or(""));
    let host = host.unwrap_or("");
    let local = |h: &str| matches!(h, "localhost" | "127.0.0.1" | "::1");
    if local(host_only(host)) {
        return local(origin_host);
    }
    origin == format!("https://{host}")
}

/// One upgraded connection until it ends; returns why.
async fn run_ws<S>(
    shared: &Arc<Shared>,
    conn: u64,
    io: S,
    data_rx: mpsc::Receiver<Outgoing>,
    ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    ctl_tx: mpsc::UnboundedSender<Ctl>,
) -> EndReason
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opts = {
        let st = shared.lock();
        Timers {
            // `set_options` is not checked: a zero period would panic the interval.
            ping_interval: st.opts.ping_interval.max(Duration::from_millis(1)),
            read_deadline: st.opts.read_deadline,
            write_deadline: st.opts.write_deadline,
            max_message: st.opts.max_message,
        }
    };
    let (rd, wr) = tokio::io::split(io);
    // Set when the fake has sent its close frame: then that close's reason is the end,
    // whatever the peer does next.
    let closing: Mutex<Option<EndReason>> = Mutex::new(None);
    let end = tokio::select! {
        end = reader(shared, conn, BufReader::new(rd), &opts, &ctl_tx, &closing) => end,
        end = writer(shared, conn, wr, &opts, data_rx, ctl_rx, &closing) => end,
    };
    let decided = *closing.lock().unwrap_or_else(PoisonError::into_inner);
    decided.unwrap_or(end)
}

fn is_closing(closing: &Mutex<Option<EndReason>>) -> bool {
    closing
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some()
}

struct Timers {
    ping_interval: Duration,
    read_deadline: Duration,
    write_deadline: Duration,
    max_message: usize,
}

fn log(
    shared: &Shared,
    conn: u64,
    dir: Direction,
    kind: FrameKind,
    bytes: Vec<u8>,
    fragments: usize,
    close_code: Option<u16>,
) -> usize {
    let raw_len = bytes.len();
    shared.lock().log(NewFrame {
        conn,
        dir,
        kind,
        bytes,
        raw_len,
        fragments,
        close_code,
    })
}

/// Reads frames until the connection must end. Pongs and close echoes go to the writer.
async fn reader<R: AsyncRead + Unpin>(
    shared: &Shared,
    conn: u64,
    mut rd: BufReader<R>,
    t: &Timers,
    ctl: &mpsc::UnboundedSender<Ctl>,
    closing: &Mutex<Option<EndReason>>,
) -> EndReason {
    let mut beh_rx = shared.behaviour.subscribe();
    let mut last = tokio::time::Instant::now();
    // The message being reassembled: opcode, bytes, fragment count.
    let mut partial: Option<(u8, Vec<u8>, usize)> = None;
    loop {
        if beh_rx.borrow_and_update().stop_reading {
            let _ = beh_rx.wait_for(|b| !b.stop_reading).await;
            last = tokio::time::Instant::now();
            continue;
        }
        let deadline = last + t.read_deadline;
        // Wait for bytes without consuming them, so a behaviour change can interrupt.
        let ready = tokio::select! {
            r = tokio::time::timeout_at(deadline, rd.fill_buf()) => match r {
                Err(_) => return EndReason::ReadDeadline,
                Ok(Err(_)) => return EndReason::ReadFailed,
                Ok(Ok(buf)) => !buf.is_empty(),
            },
            _ = beh_rx.changed() => continue,
        };
        if !ready {
            return EndReason::ReadFailed;
        }
        let h = match tokio::time::timeout_at(deadline, wire::read_header(&mut rd)).await {
            Err(_) => return EndReason::ReadDeadline,
            Ok(Err(_) | Ok(None)) => return EndReason::ReadFailed,
            Ok(Ok(Some(h))) => h,
        };
        let bad = h.rsv != 0
            || h.mask.is_none()
            || !matches!(
                h.opcode,
                wire::OP_CONT
                    | wire::OP_TEXT
                    | wire::OP_BINARY
                    | wire::OP_CLOSE
                    | wire::OP_PING
                    | wire::OP_PONG
            )
            || (h.is_control() && (!h.fin || h.len > 125))
            || (h.opcode == wire::OP_CONT && partial.is_none())
            || (matches!(h.opcode, wire::OP_TEXT | wire::OP_BINARY) && partial.is_some());
        if bad {
            return refuse_and_drain(ctl, rd, 1002, EndReason::ProtocolError).await;
        }
        if !h.is_control() {
            let so_far = partial.as_ref().map_or(0, |p| p.1.len() as u64);
            // gorilla checks the header: the oversized body is never read.
            if so_far + h.len > t.max_message as u64 {
                return refuse_and_drain(ctl, rd, 1009, EndReason::Oversize).await;
            }
        }
        let payload = match tokio::time::timeout_at(deadline, wire::read_payload(&mut rd, &h)).await
        {
            Err(_) => return EndReason::ReadDeadline,
            Ok(Err(_)) => return EndReason::ReadFailed,
            Ok(Ok(p)) => p,
        };
        last = tokio::time::Instant::now();
        match h.opcode {
            wire::OP_PING => {
                log(
                    shared,
                    conn,
                    Direction::In,
                    FrameKind::Ping,
                    payload.clone(),
                    1,
                    None,
                );
                if !beh_rx.borrow().withhold_pongs {
                    let _ = ctl.send(Ctl::Pong(payload));
                }
            }
            wire::OP_PONG => {
                log(
                    shared,
                    conn,
                    Direction::In,
                    FrameKind::Pong,
                    payload,
                    1,
                    None,
                );
            }
            wire::OP_CLOSE => {
                let (code, reason) = wire::parse_close(&payload);
                log(
                    shared,
                    conn,
                    Direction::In,
                    FrameKind::Close,
                    payload,
                    1,
                    code,
                );
                shared.lock().note_close_received(conn, code, &reason);
                if is_closing(closing) {
                    return EndReason::PeerClosed;
                }
                // gorilla's default close handler echoes the code without the reason.
                let _ = ctl.send(Ctl::Close {
                    code,
                    reason: String::new(),
                    end: EndReason::PeerClosed,
                    grace: Duration::ZERO,
                });
                return drain(rd, CLOSE_GRACE, EndReason::PeerClosed).await;
            }
            _ => {
                let (opcode, mut buf, frags) = partial.take().unwrap_or((h.opcode, Vec::new(), 0));
                buf.extend_from_slice(&payload);
                if !h.fin {
                    partial = Some((opcode, buf, frags + 1));
                    continue;
                }
                let kind = if opcode == wire::OP_BINARY {
                    FrameKind::Binary
                } else {
                    FrameKind::Text
                };
                let (now, wall) = (Instant::now(), SystemTime::now());
                let mut st = shared.lock();
                let raw_len = buf.len();
                let idx = st.log(NewFrame {
                    conn,
                    dir: Direction::In,
                    kind,
                    bytes: buf,
                    raw_len,
                    fragments: frags + 1,
                    close_code: None,
                });
                st.process(conn, idx, now, wall);
            }
        }
    }
}

/// Sends a close frame with `code` and then reads and discards whatever the peer still sends
/// (so our close frame is not lost to a TCP reset) until it closes or the grace passes.
async fn refuse_and_drain<R: AsyncRead + Unpin>(
    ctl: &mpsc::UnboundedSender<Ctl>,
    rd: BufReader<R>,
    code: u16,
    end: EndReason,
) -> EndReason {
    let _ = ctl.send(Ctl::Close {
        code: Some(code),
        reason: String::new(),
        end,
        grace: CLOSE_GRACE,
    });
    drain(rd, CLOSE_GRACE, end).await
}

async fn drain<R: AsyncRead + Unpin>(
    mut rd: BufReader<R>,
    grace: Duration,
    end: EndReason,
) -> EndReason {
    let mut sink = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(grace, async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    end
}

/// Writes control orders, queued data and Pings until the connection must end.
async fn writer<W: AsyncWrite + Unpin>(
    shared: &Shared,
    conn: u64,
    mut wr: W,
    t: &Timers,
    mut data_rx: mpsc::Receiver<Outgoing>,
    mut ctl_rx: mpsc::UnboundedReceiver<Ctl>,
    closing_reason: &Mutex<Option<EndReason>>,
) -> EndReason {
    let start = tokio::time::Instant::now();
    let mut ping = tokio::time::interval_at(start + t.ping_interval, t.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After our close frame: end at this time unless the echo comes first.
    let mut closing: Option<(tokio::time::Instant, EndReason)> = None;
    // A delayed data message and when to write it.
    let mut held: Option<(tokio::time::Instant, Outgoing)> = None;
    let far = start + Duration::from_secs(86_400 * 365);
    loop {
        let close_at = closing.map_or(far, |c| c.0);
        let held_at = held.as_ref().map_or(far, |h| h.0);
        tokio::select! {
            biased;
            order = ctl_rx.recv() => match order {
                None => return EndReason::Stopped,
                Some(Ctl::Abort(end)) => return end,
                Some(Ctl::Pong(p)) => {
                    let bytes = wire::encode(wire::OP_PONG, true, &p);
                    log(shared, conn, Direction::Out, FrameKind::Pong, p, 1, None);
                    if let Err(end) = write(&mut wr, t, &bytes).await {
                        return end;
                    }
                }
                Some(Ctl::Close { code, reason, end, grace }) => {
                    {
                        let mut decided = closing_reason.lock().unwrap_or_else(PoisonError::into_inner);
                        if decided.is_some() {
                            continue;
                        }
                        *decided = Some(end);
                    }
                    let payload = wire::close_payload(code, &reason);
                    let bytes = wire::encode(wire::OP_CLOSE, true, &payload);
                    log(shared, conn, Direction::Out, FrameKind::Close, payload, 1, code);
                    shared.lock().note_close_sent(conn, code);
                    if let Err(e) = write(&mut wr, t, &bytes).await {
                        return e;
                    }
                    if grace.is_zero() {
                        let _ = wr.shutdown().await;
                        return end;
                    }
                    closing = Some((tokio::time::Instant::now() + grace, end));
                }
            },
            _ = tokio::time::sleep_until(close_at), if closing.is_some() => {
                return closing.map_or(EndReason::Stopped, |c| c.1);
            }
            _ = tokio::time::sleep_until(held_at), if held.is_some() => {
                if let Some((_, out)) = held.take()
                    && let Err(end) = write_data(shared, conn, &mut wr, t, out).await
                {
                    return end;
                }
            }
            _ = ping.tick(), if closing.is_none() => {
                log(shared, conn, Direction::Out, FrameKind::Ping, Vec::new(), 1, None);
                if let Err(end) = write(&mut wr, t, &wire::encode(wire::OP_PING, true, &[])).await {
                    return end;
                }
            }
            out = data_rx.recv(), if closing.is_none() && held.is_none() => match out {
                None => return EndReason::Stopped,
                Some(out) => match out.delay {
                    Some(d) => held = Some((tokio::time::Instant::now() + d, Outgoing { delay: None, ..out })),
                    None => {
                        if let Err(end) = write_data(shared, conn, &mut wr, t, out).await {
                            return end;
                        }
                    }
                },
            },
        }
    }
}

async fn write_data<W: AsyncWrite + Unpin>(
    shared: &Shared,
    conn: u64,
    wr: &mut W,
    t: &Timers,
    out: Outgoing,
) -> Result<(), EndReason> {
    let opcode = if out.binary {
        wire::OP_BINARY
    } else {
        wire::OP_TEXT
    };
    let bytes = wire::encode(opcode, true, &out.bytes);
    let kind = if out.binary {
        FrameKind::Binary
    } else {
        FrameKind::Text
    };
    // Logged first: whatever the peer has seen is already in the log.
    log(shared, conn, Direction::Out, kind, out.bytes, 1, None);
    write(wr, t, &bytes).await
}

async fn write<W: AsyncWrite + Unpin>(
    wr: &mut W,
    t: &Timers,
    bytes: &[u8],
) -> Result<(), EndReason> {
    match tokio::time::timeout(t.write_deadline, async {
        wr.write_all(bytes).await?;
        wr.flush().await
    })
    .await
    {
        Err(_) => Err(EndReason::WriteTimeout),
        Ok(Err(_)) => Err(EndReason::WriteFailed),
        Ok(Ok(())) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_rule_follows_section_2_4() {
        let none: &[String] = &[];
        assert!(origin_allowed(None, Some("example.org"), none));
        assert!(!origin_allowed(
            Some("not a url"),
            Some("example.org"),
            none
        ));
        assert!(origin_allowed(
            Some("https://ops.example.org"),
            Some("x"),
            &[" https://ops.example.org ".into()]
        ));
        assert!(origin_allowed(
            Some("http://localhost:3000"),
            Some("127.0.0.1:8000"),
            none
        ));
        assert!(origin_allowed(
            Some("http://[::1]:1"),
            Some("localhost"),
            none
        ));
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("127.0.0.1:8000"),
            none
        ));
        assert!(origin_allowed(
            Some("https://fleet.example.org"),
            Some("fleet.example.org"),
            none
        ));
        assert!(!origin_allowed(
            Some("http://fleet.example.org"),
            Some("fleet.example.org"),
            none
        ));
    }

    #[test]
    fn host_only_strips_ports() {
        assert_eq!(host_only("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only("::1"), "::1");
        assert_eq!(host_only("localhost"), "localhost");
    }
}
