//! NixFleet v2: one WebSocket per host at `wss://…/ws` (contract: `docs/protocol-v2.md`).
//!
//! A socket task owns the connection: it dials (TLS through the same rustls configuration as
//! v1: system roots or the CA file, key pinning), sends `register` built from the host's
//! latest heartbeat, waits for `registered`, then turns the wire into [`LinkEvent`]s (connected,
//! command, disconnected) and writes what the loop sends, one message at a time. It pings with
//! a heartbeat once the dashboard has been quiet for two pong timeouts (and after 45 s of
//! silence on our side) and declares the peer dead when no frame answers within the pong
//! timeout; it redials with full-jitter back-off capped like v1. It never logs the token and
//! never sends `Origin`.
//!
//! Dashboard rules it keeps (contract §3.5, §7.6, §7.8): a connection closed with an empty
//! close frame right after registering was displaced by another agent using the same hostname
//! (said loudly, backed off); after a successful switch it registers again so the dashboard
//! completes the switch; it never closes within a second of a `status`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest as _};

use super::{
    Correlation, DashboardError, Heartbeat, Link, LinkEvent, LinkTraits, Outcome, Outgoing, Reply,
    Report, StatusReport,
};
use crate::agent::backoff;
use crate::config::{Secret, Settings};

/// Largest message we accept from the dashboard; its own messages are a few hundred bytes.
const MAX_INBOUND: usize = 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_BUFFER: usize = 8 * 1024;
/// Longest `output` line we send (the dashboard closes the socket above 512 KiB).
pub const MAX_LINE_BYTES: usize = 4096;
/// Longest `status.message`: the output was streamed already; this is the summary.
const MAX_MESSAGE_BYTES: usize = 4096;
/// Ping after this much silence on our side (the dashboard's read deadline is 60 s).
const KEEPALIVE: Duration = Duration::from_secs(45);
/// Upper bound of the handshake (TCP, TLS, HTTP upgrade), as upstream.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Never close or exit sooner than this after a `status` (contract §7.8: the dashboard may
/// otherwise process the disconnect first and lose the result).
const LINGER_AFTER_STATUS: Duration = Duration::from_secs(1);
/// A connection closed for a newer one sooner than this after `registered` counts as
/// displaced by another agent using the same hostname.
const DISPLACED_WITHIN: Duration = Duration::from_secs(30);
/// Displacements in a row before the agent says so and backs off.
const DISPLACED_TIMES: u32 = 2;
/// Longest wait between redials while another agent keeps taking this hostname.
const DISPLACED_CAP: Duration = Duration::from_secs(600);

/// The v2 link. Cloning shares the socket task.
#[derive(Clone)]
pub struct V2Link {
    requests: mpsc::Sender<Request>,
    identity: Arc<watch::Sender<Option<Heartbeat>>>,
}

enum Request {
    Send {
        text: String,
        kind: Sent,
        done: oneshot::Sender<Result<(), DashboardError>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// What a written message was, for the rules that follow it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sent {
    Heartbeat,
    Status { switch_ok: bool },
    Other,
}

/// Everything the socket task needs, fixed at start.
struct Dialer {
    url: url::Url,
    token: Secret,
    tls: Option<Arc<rustls::ClientConfig>>,
    pong_timeout: Duration,
    interval: Duration,
    backoff_cap: Duration,
}

impl V2Link {
    /// Builds the link and its socket task; the caller spawns the task on the runtime. The
    /// token is the dashboard's shared agent token (v2 has no per-host tokens).
    pub fn new(
        settings: &Settings,
        token: Secret,
    ) -> anyhow::Result<(
        V2Link,
        mpsc::Receiver<LinkEvent>,
        impl std::future::Future<Output = ()> + Send + 'static,
    )> {
        let tls = if settings.url.scheme() == "wss" {
            let mut config = super::tls::client_config(settings)?;
            // A WebSocket upgrade is HTTP/1.1.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(config))
        } else {
            None
        };
        let dialer = Dialer {
            url: settings.url.clone(),
            token,
            tls,
            pong_timeout: settings.http_timeout.min(Duration::from_secs(15)),
            interval: settings.interval,
            backoff_cap: settings.backoff_cap,
        };
        let (requests, requests_rx) = mpsc::channel(16);
        let (events_tx, events) = mpsc::channel(64);
        let (identity, identity_rx) = watch::channel(None);
        let task = SocketTask {
            dialer,
            requests: requests_rx,
            events: events_tx,
            identity: identity_rx,
            last_status: None,
        }
        .run();
        Ok((
            V2Link {
                requests,
                identity: Arc::new(identity),
            },
            events,
            task,
        ))
    }

    async fn write(&self, text: String, kind: Sent) -> Result<(), DashboardError> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(Request::Send { text, kind, done })
            .await
            .map_err(|_| DashboardError::Unreachable("the link is closed".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(DashboardError::Unreachable("the link is closed".into())))
    }
}

impl Link for V2Link {
    fn traits(&self) -> LinkTraits {
        LinkTraits {
            correlation: Correlation::ByName,
            streams_output: true,
        }
    }

    fn describe_host(&self, beat: &Heartbeat) {
        self.identity.send_replace(Some(beat.clone()));
    }

    async fn send(&self, _token: &str, message: &Outgoing) -> Result<Reply, DashboardError> {
        let (text, kind) = match message {
            Outgoing::Heartbeat(beat) => {
                self.describe_host(beat);
                (heartbeat_message(beat), Sent::Heartbeat)
            }
            Outgoing::Report(Report::Status(status)) => match &status.command {
                Some(command) => (
                    status_message(command, status),
                    Sent::Status {
                        switch_ok: status.status == Outcome::Ok
                            && matches!(command.as_str(), "switch" | "pull-switch"),
                    },
                ),
                // The agent's own notices are not results of a command: show them as output.
                None => (output_message("", &notice_line(status)), Sent::Other),
            },
            Outgoing::Report(Report::TestProgress(p)) => (
                envelope(
                    "test_progress",
                    json!({
                        "current": p.current, "total": p.total, "passed": p.passed,
                        "running": p.running, "result": p.result.clone().unwrap_or_default(),
                    }),
                ),
                Sent::Other,
            ),
            Outgoing::Output(line) => (output_message(&line.command, &line.line), Sent::Other),
            Outgoing::Rejected { current, .. } => (
                envelope(
                    "command_rejected",
                    json!({"reason": "command already running", "current_command": current}),
                ),
                Sent::Other,
            ),
        };
        self.write(text, kind).await?;
        Ok(Reply::default())
    }

    async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.requests.send(Request::Close { done }).await.is_ok() {
            let _ = timeout(Duration::from_secs(5), closed).await;
        }
    }
}

fn envelope(kind: &str, payload: Value) -> String {
    json!({"type": kind, "payload": payload}).to_string()
}

/// The first 7 characters of the commit, as the v2 dashboard compares it (contract §6.1).
fn short_generation(generation: Option<&str>) -> String {
    generation
        .map(|g| g.chars().take(7).collect())
        .unwrap_or_default()
}

fn metrics_value(beat: &Heartbeat) -> Value {
    match &beat.metrics {
        Some(m) => {
            let load = m.load.trim().parse::<f64>().unwrap_or(0.0);
            if m.cpu == 0.0 && m.ram == 0.0 && m.swap == 0.0 && load == 0.0 {
                Value::Null
            } else {
                json!({"cpu": m.cpu, "ram": m.ram, "swap": m.swap, "load": load})
            }
        }
        None => Value::Null,
    }
}

fn register_message(beat: &Heartbeat) -> String {
    envelope(
        "register",
        json!({
            "hostname": beat.hostname,
            "host_type": if beat.host_type == "macos" { "macos" } else { "nixos" },
            "agent_version": beat.agent_version,
            "os_version": beat.os_version.clone().unwrap_or_default(),
            "nixpkgs_version": beat.nixpkgs_version.clone().unwrap_or_default(),
            "generation": short_generation(beat.current_generation.as_deref()),
            "theme_color": beat.theme_color.clone().unwrap_or_default(),
            "heartbeat_interval": beat.poll_interval,
            "location": beat.location,
            "device_type": beat.device_type,
            "repo_url": beat.repo_url.clone().unwrap_or_default(),
            "repo_dir": beat.config_repo.clone().unwrap_or_default(),
        }),
    )
}

fn heartbeat_message(beat: &Heartbeat) -> String {
    let mut payload = json!({
        "generation": short_generation(beat.current_generation.as_deref()),
        "nixpkgs_version": beat.nixpkgs_version.clone().unwrap_or_default(),
        "pending_command": beat.running,
        "command_pid": Value::Null,
        "metrics": metrics_value(beat),
        "update_status": {
            // Git is computed by the dashboard from the generation.
            "git": check_value(&super::Check::default()),
            "lock": check_value(&beat.checks.lock),
            "system": check_value(&beat.checks.system),
            "tests": check_value(&beat.checks.tests),
        },
    });
    if let Some(hash) = &beat.lock_hash {
        payload["lock_hash"] = json!(hash);
    }
    envelope("heartbeat", payload)
}

fn check_value(check: &super::Check) -> Value {
    json!({"status": check.status, "message": check.message, "checked_at": check.checked_at})
}

fn status_message(command: &str, report: &StatusReport) -> String {
    let ok = report.status == Outcome::Ok;
    let mut message = report.output.clone().unwrap_or_default();
    if report.dropped_lines > 0 {
        message.push_str(&format!(
            "\n({} output lines were not streamed: the output came faster than the dashboard \
             link takes it)",
            report.dropped_lines
        ));
    }
    let exit_code = match report.exit_code {
        Some(code) if !ok && code != 0 => code,
        _ if ok => 0,
        _ => 1,
    };
    let mut payload = json!({
        "status": if ok { "ok" } else { "error" },
        "command": command,
        "exit_code": exit_code,
    });
    let message = head_and_tail(&message, MAX_MESSAGE_BYTES);
    if !message.is_empty() {
        payload["message"] = json!(message);
    }
    let generation = short_generation(report.current_generation.as_deref());
    if !generation.is_empty() {
        payload["generation"] = json!(generation);
    }
    envelope("status", payload)
}

fn notice_line(report: &StatusReport) -> String {
    format!(
        "[nixfleet-agent] {}",
        report.output.as_deref().unwrap_or_default()
    )
}

fn output_message(command: &str, line: &str) -> String {
    envelope(
        "output",
        json!({
            "line": crate::text::prefix_within(line, MAX_LINE_BYTES),
            "stream": "stdout",
            "command": command,
            "is_error": false,
        }),
    )
}

/// The first line and the end of `text` within `max` bytes (where a failure says why).
fn head_and_tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MARKER: &str = "\n[...]\n";
    let head = crate::text::prefix_within(text.lines().next().unwrap_or_default(), max / 4);
    let keep = max - head.len() - MARKER.len();
    let mut start = text.len() - keep;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("{head}{MARKER}{}", &text[start..])
}

/// Why a session ended.
enum End {
    /// The agent asked to close.
    Closed,
    Failed(DashboardError),
    /// Closed for a newer connection with the same hostname.
    Replaced {
        soon_after_register: bool,
    },
}

type Socket = WebSocketStream<Box<dyn super::dial::Io>>;

struct SocketTask {
    dialer: Dialer,
    requests: mpsc::Receiver<Request>,
    events: mpsc::Sender<LinkEvent>,
    identity: watch::Receiver<Option<Heartbeat>>,
    /// When the last `status` was written (closing waits [`LINGER_AFTER_STATUS`] after it).
    last_status: Option<Instant>,
}

impl SocketTask {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut displaced: u32 = 0;
        loop {
            // Registering needs the host's facts: wait for the loop's first description.
            if self.identity.borrow().is_none() {
                tokio::select! {
                    changed = self.identity.changed() => if changed.is_err() { return },
                    request = self.requests.recv() => match request {
                        None => return,
                        Some(request) => if self.refuse(request, "connecting") { return },
                    },
                }
                continue;
            }
            let end = self.session(&mut failures, &mut displaced).await;
            let (error, delay) = match end {
                End::Closed => return,
                End::Replaced {
                    soon_after_register: true,
                } => {
                    displaced += 1;
                    let hostname = self
                        .identity
                        .borrow()
                        .as_ref()
                        .map(|b| b.hostname.clone())
                        .unwrap_or_default();
                    if displaced >= DISPLACED_TIMES {
                        let error = DashboardError::Displaced {
                            hostname,
                            times: displaced,
                        };
                        // Grows with each displacement in a row, up to 10 minutes: two agents
                        // with one name stop evicting each other every second (contract §3.5).
                        let delay = backoff::retry_delay(
                            self.dialer.backoff_cap,
                            self.dialer.backoff_cap.max(DISPLACED_CAP),
                            displaced - 1,
                            fastrand::f64(),
                        );
                        tracing::error!("{error}; retrying in {}s", delay.as_secs());
                        (error, delay)
                    } else {
                        (
                            DashboardError::Unreachable(
                                "the dashboard closed the connection for a newer one".into(),
                            ),
                            Duration::from_secs(1),
                        )
                    }
                }
                End::Replaced { .. } => {
                    displaced = 0;
                    (
                        DashboardError::Unreachable(
                            "the dashboard closed the connection for a newer one".into(),
                        ),
                        Duration::from_secs(1),
                    )
                }
                End::Failed(error) => {
                    failures = failures.saturating_add(1);
                    let delay = match &error {
                        DashboardError::Unauthorized { .. } => {
                            backoff::auth_delay(self.dialer.backoff_cap, fastrand::f64())
                        }
                        _ => backoff::retry_delay(
                            self.dialer.interval.min(Duration::from_secs(2)),
                            self.dialer.backoff_cap,
                            failures,
                            fastrand::f64(),
                        ),
                    };
                    (error, delay)
                }
            };
            let _ = self.events.try_send(LinkEvent::Disconnected {
                error,
                retry_in: delay,
            });
            let redial_at = Instant::now() + delay;
            loop {
                tokio::select! {
                    () = sleep_until(redial_at) => break,
                    request = self.requests.recv() => match request {
                        None => return,
                        Some(request) => if self.refuse(request, "disconnected") { return },
                    },
                }
            }
        }
    }

    /// Answers a request while there is no registered socket. Returns whether to stop.
    fn refuse(&mut self, request: Request, state: &str) -> bool {
        match request {
            Request::Send { done, .. } => {
                let _ = done.send(Err(DashboardError::Unreachable(format!(
                    "not connected ({state})"
                ))));
                false
            }
            Request::Close { done } => {
                let _ = done.send(());
                true
            }
        }
    }

    async fn session(&mut self, failures: &mut u32, displaced: &mut u32) -> End {
        let mut socket = match timeout(HANDSHAKE_TIMEOUT, self.dialer.dial()).await {
            Err(_) => return End::Failed(DashboardError::Timeout(HANDSHAKE_TIMEOUT.as_secs())),
            Ok(Err(error)) => return End::Failed(error),
            Ok(Ok(socket)) => socket,
        };
        let register = match self.identity.borrow().as_ref() {
            Some(beat) => register_message(beat),
            None => return End::Failed(DashboardError::Unreachable("no host facts".into())),
        };
        if let Err(e) = socket.send(Message::text(register.clone())).await {
            return End::Failed(ws_error(e));
        }
        // Until `registered`, the dashboard does not know who we are: send nothing else.
        let registered_by = Instant::now() + self.dialer.pong_timeout.max(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = sleep_until(registered_by) => {
                    return End::Failed(DashboardError::Timeout(self.dialer.pong_timeout.as_secs()));
                }
                request = self.requests.recv() => match request {
                    None => return End::Closed,
                    Some(request) => if self.refuse(request, "registering") {
                        let _ = close(&mut socket).await;
                        return End::Closed;
                    },
                },
                frame = socket.next() => match self.inbound(frame, &mut socket).await {
                    Inbound::Registered => break,
                    Inbound::Nothing | Inbound::Pong(_) => {}
                    Inbound::End(end) => return end,
                }
            }
        }
        let registered_at = Instant::now();
        *failures = 0;
        tracing::info!(url = %self.dialer.url, "connected to the dashboard (v2)");
        if self.events.send(LinkEvent::Connected).await.is_err() {
            return End::Closed;
        }
        let mut last_sent = Instant::now();
        let mut pong_due: Option<Instant> = None;
        let mut register_again: Option<Instant> = None;
        // A result counts as delivered only when the Pong to a Ping sent right after it came
        // back: the dashboard reads a connection's frames in order, so the result was read.
        // A frame written into a connection that then dies is sent again, never lost.
        let mut ack: Option<(u64, oneshot::Sender<Result<(), DashboardError>>)> = None;
        let mut ping_seq: u64 = 0;
        // When the dashboard last proved alive (any frame from it, a pong included).
        let mut heard_at = Instant::now();
        let ping_spacing = self.dialer.pong_timeout * 2;
        loop {
            let keepalive_at = last_sent + KEEPALIVE;
            tokio::select! {
                request = self.requests.recv() => match request {
                    None => { let _ = close(&mut socket).await; return End::Closed; }
                    Some(Request::Close { done }) => {
                        if let Some(at) = self.last_status {
                            sleep_until(at + LINGER_AFTER_STATUS).await;
                        }
                        let _ = close(&mut socket).await;
                        let _ = done.send(());
                        return End::Closed;
                    }
                    Some(Request::Send { text, kind, done }) => {
                        let written = timeout(
                            self.dialer.pong_timeout,
                            socket.send(Message::text(text)),
                        )
                        .await;
                        let result = match written {
                            Err(_) => Err(DashboardError::Timeout(self.dialer.pong_timeout.as_secs())),
                            Ok(Err(e)) => Err(ws_error(e)),
                            Ok(Ok(())) => Ok(()),
                        };
                        if let Err(error) = result {
                            let _ = done.send(Err(error.clone()));
                            return End::Failed(error);
                        }
                        last_sent = Instant::now();
                        if let Sent::Status { .. } = kind {
                            ping_seq += 1;
                            let ping = Message::Ping(ping_seq.to_be_bytes().to_vec().into());
                            if let Err(e) = socket.send(ping).await {
                                return End::Failed(ws_error(e));
                            }
                            pong_due = Some(last_sent + self.dialer.pong_timeout);
                            ack = Some((ping_seq, done));
                        } else {
                            let _ = done.send(Ok(()));
                        }
                        match kind {
                            Sent::Heartbeat
                                if pong_due.is_none()
                                    && last_sent.duration_since(heard_at) >= ping_spacing =>
                            {
                                // Ping with a heartbeat (the same wake-up) once the dashboard
                                // has been quiet for two pong timeouts: a dead peer shows within
                                // an interval plus three pong timeouts, and a short interval
                                // does not cost a pong's wake-up per heartbeat.
                                if let Err(e) = socket.send(Message::Ping(Default::default())).await {
                                    return End::Failed(ws_error(e));
                                }
                                pong_due = Some(last_sent + self.dialer.pong_timeout);
                            }
                            Sent::Status { switch_ok } => {
                                self.last_status = Some(last_sent);
                                if switch_ok {
                                    // The dashboard completes a switch on the next `register`.
                                    register_again = Some(last_sent + LINGER_AFTER_STATUS);
                                }
                            }
                            _ => {}
                        }
                    }
                },
                frame = socket.next() => {
                    heard_at = Instant::now();
                    // Any frame proves the peer alive, unless a result waits for its own Pong.
                    if ack.is_none() {
                        pong_due = None;
                    }
                    match self.inbound(frame, &mut socket).await {
                        Inbound::Registered | Inbound::Nothing => {}
                        Inbound::Pong(payload) => {
                            if ack.as_ref().is_some_and(|(seq, _)| payload == seq.to_be_bytes()) {
                                if let Some((_, done)) = ack.take() {
                                    let _ = done.send(Ok(()));
                                }
                                pong_due = None;
                            }
                        }
                        Inbound::End(End::Replaced { .. }) => {
                            let soon = registered_at.elapsed() < DISPLACED_WITHIN;
                            if !soon { *displaced = 0; }
                            return End::Replaced { soon_after_register: soon };
                        }
                        Inbound::End(end) => return end,
                    }
                }
                () = sleep_until(keepalive_at), if pong_due.is_none() => {
                    if let Err(e) = socket.send(Message::Ping(Default::default())).await {
                        return End::Failed(ws_error(e));
                    }
                    last_sent = Instant::now();
                    pong_due = Some(last_sent + self.dialer.pong_timeout);
                }
                () = sleep_until(pong_due.unwrap_or(keepalive_at)), if pong_due.is_some() => {
                    tracing::warn!(
                        "the dashboard did not answer a ping within {}s; reconnecting",
                        self.dialer.pong_timeout.as_secs()
                    );
                    return End::Failed(DashboardError::Timeout(self.dialer.pong_timeout.as_secs()));
                }
                () = sleep_until(register_again.unwrap_or(keepalive_at)), if register_again.is_some() => {
                    register_again = None;
                    let register = self.identity.borrow().as_ref().map(register_message);
                    if let Some(register) = register
                        && let Err(e) = socket.send(Message::text(register)).await
                    {
                        return End::Failed(ws_error(e));
                    }
                    last_sent = Instant::now();
                }
            }
        }
    }

    async fn inbound(
        &mut self,
        frame: Option<Result<Message, tungstenite::Error>>,
        socket: &mut Socket,
    ) -> Inbound {
        let message = match frame {
            None => {
                return Inbound::End(End::Failed(DashboardError::Unreachable(
                    "the dashboard closed the connection".into(),
                )));
            }
            Some(Err(e)) => return Inbound::End(End::Failed(ws_error(e))),
            Some(Ok(message)) => message,
        };
        let bytes = match message {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Ping(_) => {
                // tungstenite queued the pong; send it now rather than with the next write.
                if let Err(e) = socket.flush().await {
                    return Inbound::End(End::Failed(ws_error(e)));
                }
                return Inbound::Nothing;
            }
            Message::Pong(payload) => return Inbound::Pong(payload.to_vec()),
            Message::Frame(_) => return Inbound::Nothing,
            Message::Close(frame) => {
                return Inbound::End(match frame {
                    // An empty close frame is how the dashboard drops a connection replaced by
                    // a newer one for the same hostname (contract §3.5).
                    None => End::Replaced {
                        soon_after_register: false,
                    },
                    Some(frame) if frame.code == CloseCode::Size => {
                        End::Failed(DashboardError::BadReply(
                            "the dashboard closed the connection: a message was over its size \
                             limit (1009)"
                                .into(),
                        ))
                    }
                    Some(frame) => End::Failed(DashboardError::Unreachable(format!(
                        "the dashboard closed the connection ({})",
                        u16::from(frame.code)
                    ))),
                });
            }
        };
        let Ok(envelope) = serde_json::from_slice::<Value>(&bytes) else {
            tracing::warn!(
                bytes = bytes.len(),
                "ignoring a message from the dashboard that is not JSON"
            );
            return Inbound::Nothing;
        };
        let kind = envelope.get("type").and_then(Value::as_str).unwrap_or("");
        let payload = envelope.get("payload");
        match kind {
            "registered" => Inbound::Registered,
            "command" => {
                match payload
                    .and_then(|p| p.get("command"))
                    .and_then(Value::as_str)
                {
                    Some(name) => {
                        let _ = self.events.send(LinkEvent::Command(name.to_string())).await;
                    }
                    None => tracing::warn!("ignoring a command message without a command name"),
                }
                Inbound::Nothing
            }
            // The dashboard's intended "kill the running command": a stop, never a signal to
            // a pid the dashboard names (contract §4.11).
            "kill_command" => {
                let _ = self.events.send(LinkEvent::Command("stop".into())).await;
                Inbound::Nothing
            }
            other => {
                tracing::debug!(
                    kind = %crate::commands::sanitize_name(other),
                    "ignoring a message type this agent does not use"
                );
                Inbound::Nothing
            }
        }
    }
}

enum Inbound {
    Registered,
    Nothing,
    Pong(Vec<u8>),
    End(End),
}

async fn close(socket: &mut Socket) -> Result<(), tungstenite::Error> {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "shutdown".into(),
    };
    timeout(Duration::from_secs(2), socket.close(Some(frame)))
        .await
        .unwrap_or(Ok(()))
}

impl Dialer {
    async fn dial(&self) -> Result<Socket, DashboardError> {
        let stream = super::dial::open(&self.url, self.tls.as_ref()).await?;
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| DashboardError::Unreachable(format!("bad URL: {e}")))?;
        let bearer = format!("Bearer {}", self.token.expose());
        let mut value = tungstenite::http::HeaderValue::from_str(&bearer).map_err(|_| {
            DashboardError::Unreachable("the token cannot be sent in a header".into())
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert("Authorization", value);
        // tungstenite zero-fills its read buffer before each read (128 KiB by default): most
        // of an idle v2 loop turn's memset. Dashboard messages are small; a bigger one is
        // still read whole, in more reads.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(MAX_INBOUND))
            .max_frame_size(Some(MAX_INBOUND));
        let (socket, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(ws_error)?;
        Ok(socket)
    }
}

/// Maps a WebSocket error to the agent's terms. Never includes request headers.
fn ws_error(error: tungstenite::Error) -> DashboardError {
    match error {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let detail = response
                .body()
                .as_deref()
                .map(|b| crate::commands::sanitize_name(&String::from_utf8_lossy(b)))
                .unwrap_or_default();
            match status {
                401 => DashboardError::Unauthorized {
                    status,
                    detail: format!(
                        "{detail}; check NIXFLEET_TOKEN_FILE (the dashboard's NIXFLEET_AGENT_TOKEN)"
                    ),
                },
                301 | 302 | 303 | 307 | 308 | 404 => DashboardError::Http {
                    status,
                    detail: format!(
                        "{detail}; is NIXFLEET_URL the dashboard's WebSocket endpoint \
                         (wss://host/ws)?"
                    ),
                },
                _ => DashboardError::Http { status, detail },
            }
        }
        tungstenite::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            DashboardError::Unreachable("connection refused".into())
        }
        tungstenite::Error::Io(e) => DashboardError::Unreachable(e.to_string()),
        tungstenite::Error::Tls(e) => DashboardError::Unreachable(format!("TLS: {e}")),
        tungstenite::Error::Capacity(e) => {
            DashboardError::BadReply(format!("message over the size limit: {e}"))
        }
        other => DashboardError::Unreachable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat() -> Heartbeat {
        Heartbeat {
            hostname: "web1".into(),
            host_type: "nixos",
            location: "home".into(),
            device_type: "server".into(),
            theme_color: None,
            criticality: "low",
            current_generation: Some("0123456789abcdef".into()),
            config_repo: Some("/var/lib/repo".into()),
            poll_interval: 30,
            agent_version: "0.1.0".into(),
            nixpkgs_version: None,
            os_version: Some("25.05".into()),
            os_name: None,
            metrics: None,
            running: Some("switch".into()),
            repo_url: None,
            lock_hash: Some("ab".into()),
            checks: super::super::HostChecks::default(),
        }
    }

    #[test]
    fn register_has_every_always_present_key() {
        let v: Value = serde_json::from_str(&register_message(&beat())).unwrap();
        assert_eq!(v["type"], "register");
        for key in [
            "hostname",
            "host_type",
            "agent_version",
            "os_version",
            "nixpkgs_version",
            "generation",
            "theme_color",
            "heartbeat_interval",
            "location",
        ] {
            assert!(v["payload"].get(key).is_some(), "{key} missing");
        }
        assert_eq!(v["payload"]["generation"], "0123456");
        assert_eq!(v["payload"]["nixpkgs_version"], "");
    }

    #[test]
    fn heartbeat_carries_the_running_command_and_null_metrics() {
        let v: Value = serde_json::from_str(&heartbeat_message(&beat())).unwrap();
        assert_eq!(v["payload"]["pending_command"], "switch");
        assert!(v["payload"]["metrics"].is_null());
        assert_eq!(v["payload"]["lock_hash"], "ab");
    }

    #[test]
    fn status_echoes_the_name_and_maps_the_outcome_to_an_exit_code() {
        let mut report =
            StatusReport::notice(Outcome::Error, None, format!("x\n{}", "y".repeat(10_000)));
        report.dropped_lines = 3;
        let v: Value = serde_json::from_str(&status_message("switch", &report)).unwrap();
        assert_eq!(v["payload"]["command"], "switch");
        assert_eq!(v["payload"]["exit_code"], 1);
        assert_eq!(v["payload"]["status"], "error");
        let message = v["payload"]["message"].as_str().unwrap();
        assert!(message.len() <= MAX_MESSAGE_BYTES, "{}", message.len());
        assert!(message.starts_with("x\n[...]"));
        assert!(message.contains("3 output lines were not streamed"));
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let line = "é".repeat(MAX_LINE_BYTES);
        let v: Value = serde_json::from_str(&output_message("test", &line)).unwrap();
        assert!(v["payload"]["line"].as_str().unwrap().len() <= MAX_LINE_BYTES);
    }
}
