//! Everything the fake knows, behind one lock: the frame log, handshakes, connections and which
//! one is current per hostname, the `hosts` rows (§5.2), and the command lifecycle (§7.2,
//! §7.6). Message processing lives here and is synchronous; talking to a connection is a
//! non-blocking push onto its channels, so nothing here awaits or does I/O, and the rules are
//! unit-tested without sockets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::decode::{self, Payload};
use super::{
    Behaviour, ConnInfo, Direction, DropHow, EndReason, Frame, FrameKind, Handshake, V2Options,
};

/// How long a connection waits for the peer's close echo after the fake sent a close frame.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A data message waiting in a connection's outbound queue.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub bytes: Vec<u8>,
    pub binary: bool,
    /// Hold the message this long before writing it (delayed `registered`/`command`).
    pub delay: Option<Duration>,
}

/// Orders for a connection's writer that bypass the data queue, like gorilla's
/// `WriteControl`.
#[derive(Debug)]
pub(crate) enum Ctl {
    /// Answer a Ping.
    Pong(Vec<u8>),
    /// Write a close frame, then end the connection for `end` after the peer's echo or
    /// `grace`.
    Close {
        code: Option<u16>,
        reason: String,
        end: EndReason,
        grace: Duration,
    },
    /// Close TCP now, no close frame.
    Abort(EndReason),
}

/// The writer's two channels.
#[derive(Debug, Clone)]
pub(crate) struct ConnCtl {
    pub data: mpsc::Sender<Outgoing>,
    pub ctl: mpsc::UnboundedSender<Ctl>,
}

struct Conn {
    info: ConnInfo,
    ctl: Option<ConnCtl>,
}

/// Why `send_command` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The host has no open current connection.
    NotConnected,
    /// The connection's outbound queue is full.
    QueueFull,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::NotConnected => "host has no live connection",
            SendError::QueueFull => "the connection's outbound queue is full",
        })
    }
}

impl std::error::Error for SendError {}

/// Why `dispatch` refused an op: the code and message the real op engine answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocked {
    /// `command_pending`, `offline`, `busy`, `no_pending` or `send_failed`.
    pub code: String,
    /// Human text.
    pub message: String,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Blocked {}

fn blocked(code: &str, message: &str) -> Blocked {
    Blocked {
        code: code.into(),
        message: message.into(),
    }
}

/// The §5.2 `hosts` row plus what the fake keeps in memory for tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostState {
    /// `hosts.id` = `hostname` (as received, case-sensitive).
    pub hostname: String,
    /// From `register`.
    pub host_type: String,
    /// From `register`.
    pub agent_version: String,
    /// From `register`.
    pub os_version: String,
    /// From `register` and `heartbeat`.
    pub nixpkgs_version: String,
    /// From `register`, `heartbeat` (even `""`), and a non-empty `status.generation`.
    pub generation: String,
    /// `""` → `#bb9af7` for macos, else `#7aa2f7`.
    pub theme_color: String,
    /// `""` → `home`.
    pub location: String,
    /// `""` → `desktop`.
    pub device_type: String,
    /// From `register`.
    pub repo_url: String,
    /// From `register`.
    pub repo_dir: String,
    /// `status = 'online'`: set by `register`/`heartbeat`, cleared when the current
    /// connection ends.
    pub online: bool,
    /// Last `register` or `heartbeat`.
    #[serde(serialize_with = "crate::timefmt::serde_naive::required")]
    pub last_seen: SystemTime,
    /// Owned by the lifecycle: the op sent, cleared by `register` and by completion.
    pub pending_command: Option<String>,
    /// `metrics_json` of the last heartbeat (`None` = NULL).
    pub metrics: Option<Value>,
    /// `lock_hash` of the last heartbeat (`None` = NULL).
    pub lock_hash: Option<String>,
    /// The last heartbeat's `update_status`, normalised (kept when a heartbeat has none).
    pub update_status: Option<Value>,
    /// System compartment as the dashboard stores it (`{status,message}`), from heartbeats
    /// and switch/rollback results.
    pub system_status: Option<Value>,
    /// Tests compartment, from heartbeats and test results.
    pub tests_status: Option<Value>,
    /// Freshness record (memory only upstream).
    pub source_commit: Option<String>,
    /// Freshness record.
    pub store_path: Option<String>,
    /// Freshness record.
    pub binary_hash: Option<String>,
    /// `heartbeat_interval` of the last register (upstream ignores it).
    pub heartbeat_interval: i64,
    /// How many `register`s were processed.
    pub registers: u64,
    /// How many `heartbeat`s were processed.
    pub heartbeats: u64,
    /// The last heartbeat's payload as sent.
    pub last_heartbeat: Option<Value>,
}

impl HostState {
    fn new(hostname: &str, now: SystemTime) -> HostState {
        HostState {
            hostname: hostname.into(),
            host_type: String::new(),
            agent_version: String::new(),
            os_version: String::new(),
            nixpkgs_version: String::new(),
            generation: String::new(),
            theme_color: String::new(),
            location: String::new(),
            device_type: String::new(),
            repo_url: String::new(),
            repo_dir: String::new(),
            online: false,
            last_seen: now,
            pending_command: None,
            metrics: None,
            lock_hash: None,
            update_status: None,
            system_status: None,
            tests_status: None,
            source_commit: None,
            store_path: None,
            binary_hash: None,
            heartbeat_interval: 0,
            registers: 0,
            heartbeats: 0,
            last_heartbeat: None,
        }
    }

    /// The agent's Lock check (without a `version.json` the dashboard uses it as is).
    fn lock_ok(&self) -> bool {
        self.update_status
            .as_ref()
            .and_then(|u| u["lock"]["status"].as_str())
            == Some("ok")
    }

    fn system_ok(&self) -> bool {
        self.system_status
            .as_ref()
            .and_then(|s| s["status"].as_str())
            == Some("ok")
    }
}

/// Lifecycle states of a tracked command (§7.2), named as upstream names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandStatus {
    /// Sent; waiting for `status`.
    Executing,
    /// Past the warning timeout (the disconnect rule of §7.6.5 no longer applies).
    RunningWarning,
    /// Past the hard timeout; not final, blocks the host until a timeout action.
    TimeoutPending,
    /// The kill endpoint sent `kill`; not final.
    Killing,
    /// A successful switch waits for the next `register`.
    AwaitingReconnect,
    /// Final.
    Success,
    /// Final: a post-check failed.
    Partial,
    /// Final: non-zero exit, `command_rejected`, or a send failure.
    Error,
    /// Final: no `register` within the reconnect window.
    Timeout,
    /// Final: `timeout-action ignore`.
    Skipped,
}

impl CommandStatus {
    /// Whether the lifecycle is done with it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandStatus::Success
                | CommandStatus::Partial
                | CommandStatus::Error
                | CommandStatus::Timeout
                | CommandStatus::Skipped
        )
    }
}

/// One command as the lifecycle tracks it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrackedCommand {
    /// Sequence number across the fake, from 1.
    pub id: u64,
    /// Host.
    pub host: String,
    /// The op name sent.
    pub op: String,
    /// Where it is.
    pub status: CommandStatus,
    /// Exit code from the matching `status`.
    pub exit_code: Option<i64>,
    /// Failure or post-check text.
    pub message: Option<String>,
    /// Machine code of a failure (`send_failed`, `rejected`, `reconnect_timeout`, a
    /// post-check code).
    pub code: Option<String>,
    /// A successful non-switch result waiting for the next heartbeat's post-check.
    pub awaiting_heartbeat: bool,
    /// When it was sent.
    #[serde(serialize_with = "crate::timefmt::serde_naive::required")]
    pub started_at: SystemTime,
    /// When it reached a final state.
    #[serde(serialize_with = "crate::timefmt::serde_naive::optional")]
    pub finished_at: Option<SystemTime>,
    #[serde(skip)]
    warn_at: Instant,
    #[serde(skip)]
    hard_at: Instant,
    #[serde(skip)]
    reconnect_by: Option<Instant>,
}

/// `{"type":…,"payload":…}` with `type` first, as Go's encoder writes the struct.
pub(crate) fn envelope(msg_type: &str, payload: &Value) -> String {
    format!(
        r#"{{"type":{},"payload":{payload}}}"#,
        Value::from(msg_type)
    )
}

/// §7.2's timer table.
fn op_timeouts(op: &str) -> (Duration, Duration) {
    let m = |x: u64| Duration::from_secs(60 * x);
    match op {
        "pull" => (m(2), m(5)),
        "switch" => (m(10), m(30)),
        "pull-switch" => (m(12), m(35)),
        "test" => (m(5), m(10)),
        _ => (m(5), m(15)),
    }
}

fn is_switch(op: &str) -> bool {
    op == "switch" || op == "pull-switch"
}

/// All recorded and derived state.
pub(crate) struct State {
    pub opts: V2Options,
    /// A copy of the switches (the server's watch channel wakes the tasks that wait on them).
    pub behaviour: Behaviour,
    pub frames: Vec<Frame>,
    pub handshakes: Vec<Handshake>,
    conns: BTreeMap<u64, Conn>,
    /// hostname → its current connection.
    current: HashMap<String, u64>,
    pub hosts: BTreeMap<String, HostState>,
    /// host → its unfinished tracked command.
    pub tracked: HashMap<String, TrackedCommand>,
    /// host → finished commands, oldest first.
    pub history: HashMap<String, Vec<TrackedCommand>>,
    next_conn: u64,
    next_command: u64,
    next_seq: u64,
}

/// A frame about to be logged (the log assigns `seq` and `host`).
pub(crate) struct NewFrame {
    pub conn: u64,
    pub dir: Direction,
    pub kind: FrameKind,
    pub bytes: Vec<u8>,
    pub raw_len: usize,
    pub fragments: usize,
    pub close_code: Option<u16>,
}

impl State {
    pub(crate) fn new(opts: V2Options) -> State {
        State {
            opts,
            behaviour: Behaviour::default(),
            frames: Vec::new(),
            handshakes: Vec::new(),
            conns: BTreeMap::new(),
            current: HashMap::new(),
            hosts: BTreeMap::new(),
            tracked: HashMap::new(),
            history: HashMap::new(),
            next_conn: 1,
            next_command: 1,
            next_seq: 1,
        }
    }

    // ---- connections -------------------------------------------------------------------

    /// Registers a freshly upgraded connection and returns its id.
    pub(crate) fn open_conn(&mut self, peer: SocketAddr, ctl: ConnCtl) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                info: ConnInfo {
                    id,
                    peer,
                    hostname: None,
                    open: true,
                    current: false,
                    close_sent: None,
                    close_received: None,
                    end: None,
                    opened_at: Instant::now(),
                    closed_at: None,
                },
                ctl: Some(ctl),
            },
        );
        id
    }

    pub(crate) fn conn_infos(&self) -> Vec<ConnInfo> {
        self.conns
            .values()
            .map(|c| {
                let mut info = c.info.clone();
                info.current = info
                    .hostname
                    .as_ref()
                    .is_some_and(|h| self.current.get(h) == Some(&info.id));
                info
            })
            .collect()
    }

    /// The open current connection of a host.
    pub(crate) fn current_conn(&self, host: &str) -> Option<u64> {
        let id = *self.current.get(host)?;
        self.conns.get(&id).filter(|c| c.info.open).map(|_| id)
    }

    fn ctl(&self, conn: u64) -> Option<&ConnCtl> {
        self.conns.get(&conn).and_then(|c| c.ctl.as_ref())
    }

    pub(crate) fn note_close_sent(&mut self, conn: u64, code: Option<u16>) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.info.close_sent = Some(code);
        }
    }

    pub(crate) fn note_close_received(&mut self, conn: u64, code: Option<u16>, reason: &str) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.info.close_received = Some((code, reason.to_owned()));
        }
    }

    /// Asks a connection to end (no effect if it already ended).
    pub(crate) fn end_conn(&mut self, conn: u64, how: DropHow, reason: EndReason) {
        let Some(ctl) = self.ctl(conn) else { return };
        let order = match how {
            DropHow::Abrupt => Ctl::Abort(reason),
            DropHow::Close(code) => Ctl::Close {
                code,
                reason: String::new(),
                end: reason,
                grace: CLOSE_GRACE,
            },
        };
        let _ = ctl.ctl.send(order);
    }

    /// Teardown of a connection: §5.3 offline and §7.6.5, only for the *current* one.
    pub(crate) fn conn_closed(
        &mut self,
        conn: u64,
        end: EndReason,
        now: Instant,
        wall: SystemTime,
    ) {
        self.tick(now, wall);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.info.open {
            return;
        }
        c.info.open = false;
        c.info.end = Some(end);
        c.info.closed_at = Some(now);
        c.ctl = None;
        let Some(host) = c.info.hostname.clone() else {
            return;
        };
        if self.current.get(&host) != Some(&conn) {
            return;
        }
        self.current.remove(&host);
        if let Some(h) = self.hosts.get_mut(&host) {
            h.online = false;
        }
        let window = self.opts.reconnect_window;
        if let Some(t) = self.tracked.get_mut(&host)
            && is_switch(&t.op)
            && t.status == CommandStatus::Executing
            && !t.awaiting_heartbeat
        {
            t.status = CommandStatus::AwaitingReconnect;
            t.reconnect_by = Some(now + window);
        }
    }

    // ---- the log -----------------------------------------------------------------------

    /// Appends a frame, decoding data messages for the log; returns its index.
    pub(crate) fn log(&mut self, f: NewFrame) -> usize {
        let host = self
            .conns
            .get(&f.conn)
            .and_then(|c| c.info.hostname.clone());
        let (mut msg_type, mut payload, mut ignored) = (None, None, None);
        if matches!(f.kind, FrameKind::Text | FrameKind::Binary) {
            match serde_json::from_slice::<Value>(&f.bytes) {
                Err(e) => ignored = Some(format!("invalid JSON: {e}")),
                Ok(v) => match decode::envelope(&v) {
                    Ok((t, p)) => {
                        msg_type = Some(t);
                        payload = Some(p);
                    }
                    Err(e) => {
                        ignored = Some(e);
                        msg_type = v.get("type").and_then(Value::as_str).map(str::to_owned);
                    }
                },
            }
        }
        let text = match f.kind {
            FrameKind::Close if f.bytes.len() >= 2 => {
                String::from_utf8_lossy(&f.bytes[2..]).into_owned()
            }
            FrameKind::Close => String::new(),
            _ => String::from_utf8_lossy(&f.bytes).into_owned(),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = Frame {
            seq,
            conn: f.conn,
            dir: f.dir,
            kind: f.kind,
            msg_type,
            payload,
            text,
            raw_len: f.raw_len,
            fragments: f.fragments,
            close_code: f.close_code,
            ignored,
            host,
            at: Instant::now(),
        };
        // An inbound message is shown to the hook once processed (with its host and outcome).
        let inbound_data =
            f.dir == Direction::In && matches!(f.kind, FrameKind::Text | FrameKind::Binary);
        if !inbound_data && let Some(hook) = &self.opts.on_frame {
            hook(&frame);
        }
        self.frames.push(frame);
        self.frames.len() - 1
    }

    // ---- inbound messages --------------------------------------------------------------

    /// Processes the inbound data message logged at `idx`; outcomes that make it a no-op are
    /// written back into the log entry's `ignored`.
    pub(crate) fn process(&mut self, conn: u64, idx: usize, now: Instant, wall: SystemTime) {
        self.apply(conn, idx, now, wall);
        // A register names the connection: show it on its own log entry too.
        if self.frames[idx].host.is_none() {
            self.frames[idx].host = self.conns.get(&conn).and_then(|c| c.info.hostname.clone());
        }
        if let Some(hook) = &self.opts.on_frame {
            hook(&self.frames[idx]);
        }
        // Logged and processed under one lock hold, so it is still the last entry.
        if !self.opts.record_output && self.frames[idx].is_in("output") {
            self.frames.truncate(idx);
        }
    }

    fn apply(&mut self, conn: u64, idx: usize, now: Instant, wall: SystemTime) {
        self.tick(now, wall);
        let frame = &self.frames[idx];
        if frame.ignored.is_some() {
            return;
        }
        let (Some(msg_type), Some(payload)) = (frame.msg_type.clone(), frame.payload.clone())
        else {
            return;
        };
        let result = match msg_type.as_str() {
            "register" => self.on_register(conn, &payload, wall),
            "heartbeat" => self.on_heartbeat(conn, &payload, wall),
            "status" => self.on_status(conn, &payload, wall),
            "command_rejected" => self.on_rejected(conn, &payload, wall),
            // Forwarded to browsers only; decoded so a bad one is visible in the log.
            "output" => Payload::new(&payload).and_then(|p| {
                p.string("line")?;
                p.string("stream")?;
                p.string("command")?;
                p.bool("is_error").map(|_| ())
            }),
            "operation_progress" => {
                Payload::new(&payload).and_then(|p| p.object("progress").map(|_| ()))
            }
            "test_progress" => Payload::new(&payload).and_then(|p| {
                for k in ["current", "total", "passed"] {
                    p.int(k)?;
                }
                p.bool("running")?;
                p.string("result").map(|_| ())
            }),
            "command_complete" => Err("command_complete has no handler upstream".into()),
            other => Err(format!("unknown message type {other:?}")),
        };
        if let Err(e) = result {
            self.frames[idx].ignored = Some(e);
        }
    }

    fn conn_host(&self, conn: u64) -> String {
        self.conns
            .get(&conn)
            .and_then(|c| c.info.hostname.clone())
            .unwrap_or_default()
    }

    fn on_register(&mut self, conn: u64, payload: &Value, wall: SystemTime) -> Result<(), String> {
        let p = Payload::new(payload)?;
        let hostname = p.string("hostname")?;
        let host_type = p.string("host_type")?;
        let agent_version = p.string("agent_version")?;
        let os_version = p.string("os_version")?;
        let nixpkgs_version = p.string("nixpkgs_version")?;
        let generation = p.string("generation")?;
        let theme_color = p.string("theme_color")?;
        let heartbeat_interval = p.int("heartbeat_interval")?;
        let location = p.string("location")?;
        let device_type = p.string("device_type")?;
        let repo_url = p.string("repo_url")?;
        let repo_dir = p.string("repo_dir")?;
        let source_commit = p.string("source_commit")?;
        let store_path = p.string("store_path")?;
        let binary_hash = p.string("binary_hash")?;

        // §3.5: the newest connection wins; the old one gets an empty close frame.
        if let Some(old) = self.current.insert(hostname.clone(), conn)
            && old != conn
        {
            self.end_conn(old, DropHow::Close(None), EndReason::Displaced);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.info.hostname = Some(hostname.clone());
        }

        let h = self
            .hosts
            .entry(hostname.clone())
            .or_insert_with(|| HostState::new(&hostname, wall));
        h.host_type = host_type;
        h.agent_version = agent_version;
        h.os_version = os_version;
        h.nixpkgs_version = nixpkgs_version;
        h.generation = generation;
        h.theme_color = if theme_color.is_empty() {
            if h.host_type == "macos" {
                "#bb9af7"
            } else {
                "#7aa2f7"
            }
            .into()
        } else {
            theme_color
        };
        h.location = if location.is_empty() {
            "home".into()
        } else {
            location
        };
        h.device_type = if device_type.is_empty() {
            "desktop".into()
        } else {
            device_type
        };
        h.repo_url = repo_url;
        h.repo_dir = repo_dir;
        h.last_seen = wall;
        h.online = true;
        h.pending_command = None;
        h.heartbeat_interval = heartbeat_interval;
        h.registers += 1;
        if !source_commit.is_empty() || !store_path.is_empty() || !binary_hash.is_empty() {
            h.source_commit = Some(source_commit);
            h.store_path = Some(store_path);
            h.binary_hash = Some(binary_hash);
        }

        let reply = envelope("registered", &json!({"host_id": hostname}));
        let behaviour = &self.behaviour;
        if !behaviour.withhold_registered
            && let Some(ctl) = self.ctl(conn)
        {
            // A full queue drops `registered` silently, as upstream.
            let _ = ctl.data.try_send(Outgoing {
                bytes: reply.into_bytes(),
                binary: false,
                delay: behaviour.delay_registered,
            });
        }

        // §7.6.3: the next register completes a switch waiting for it.
        if let Some(t) = self.tracked.get(&hostname)
            && t.status == CommandStatus::AwaitingReconnect
        {
            self.finish(&hostname, CommandStatus::Success, None, None, wall);
        }
        Ok(())
    }

    fn on_heartbeat(&mut self, conn: u64, payload: &Value, wall: SystemTime) -> Result<(), String> {
        let p = Payload::new(payload)?;
        let generation = p.string("generation")?;
        let nixpkgs_version = p.string("nixpkgs_version")?;
        p.opt_string("pending_command")?;
        p.opt_int("command_pid")?;
        let metrics = match p.object("metrics")? {
            Some(m) => Some(decode::metrics(&m)?),
            None => None,
        };
        let update_status = match p.object("update_status")? {
            Some(u) => Some(decode::update_status(&u)?),
            None => None,
        };
        let source_commit = p.string("source_commit")?;
        let store_path = p.string("store_path")?;
        let binary_hash = p.string("binary_hash")?;
        let lock_hash = p.opt_string("lock_hash")?.filter(|s| !s.is_empty());

        let host = self.conn_host(conn);
        // Messages of a connection that never registered use the empty hostname (§4.1).
        let Some(h) = self.hosts.get_mut(&host) else {
            return Err(format!("no host row for {host:?}"));
        };
        h.generation = generation;
        h.nixpkgs_version = nixpkgs_version;
        h.metrics = metrics;
        h.lock_hash = lock_hash;
        h.last_seen = wall;
        h.online = true;
        h.heartbeats += 1;
        h.last_heartbeat = Some(payload.clone());
        if let Some(u) = &update_status {
            let system = &u["system"];
            if !system["status"].as_str().unwrap_or("").is_empty() {
                h.system_status =
                    Some(json!({"status": system["status"], "message": system["message"]}));
            }
            let tests = &u["tests"];
            if !tests["status"].as_str().unwrap_or("").is_empty() {
                h.tests_status =
                    Some(json!({"status": tests["status"], "message": tests["message"]}));
            }
            h.update_status = update_status;
        }
        if !source_commit.is_empty() || !store_path.is_empty() || !binary_hash.is_empty() {
            h.source_commit = Some(source_commit);
            h.store_path = Some(store_path);
            h.binary_hash = Some(binary_hash);
        }

        // §7.2: a held successful result is judged on this heartbeat's data.
        if let Some(t) = self.tracked.get(&host)
            && t.awaiting_heartbeat
        {
            let op = t.op.clone();
            let h = &self.hosts[&host];
            let failed = match op.as_str() {
                "pull" | "bump-flake" if !h.lock_ok() => {
                    Some(("lock_outdated", "Lock is not ok after the op"))
                }
                "rollback" if !h.system_ok() => {
                    Some(("system_not_ok", "System is not ok after rollback"))
                }
                "restart" | "reboot" if !h.online => Some(("offline", "host is not online")),
                "force-rebuild" if h.agent_version != self.opts.dashboard_version => Some((
                    "agent_outdated",
                    "agent version does not match the dashboard",
                )),
                "stop" if h.pending_command.as_deref().is_some_and(|c| !c.is_empty()) => {
                    Some(("still_running", "host is still running a command"))
                }
                _ => None,
            };
            match failed {
                Some((code, msg)) => self.finish(
                    &host,
                    CommandStatus::Partial,
                    Some(code),
                    Some(msg.into()),
                    wall,
                ),
                None => self.finish(&host, CommandStatus::Success, None, None, wall),
            }
        }
        Ok(())
    }

    fn on_status(&mut self, conn: u64, payload: &Value, wall: SystemTime) -> Result<(), String> {
        let p = Payload::new(payload)?;
        let status = p.string("status")?;
        let command = p.string("command")?;
        let exit_code = p.int("exit_code")?;
        let message = p.string("message")?;
        let generation = p.string("generation")?;
        let _ = status;

        let host = self.conn_host(conn);
        if let Some(h) = self.hosts.get_mut(&host) {
            if !generation.is_empty() {
                h.generation = generation;
            }
            let ok = exit_code == 0;
            if command == "switch" || command == "rollback" {
                h.system_status = Some(if ok {
                    json!({"status": "ok", "message": format!("Last {command} succeeded")})
                } else {
                    let m = if message.is_empty() {
                        format!("Last {command} failed")
                    } else {
                        message.clone()
                    };
                    json!({"status": "error", "message": m})
                });
                if ok {
                    h.tests_status = Some(json!({"status": "outdated", "message": ""}));
                }
            } else if command == "test" {
                h.tests_status =
                    Some(json!({"status": if ok { "ok" } else { "error" }, "message": message}));
            }
        }

        let Some(t) = self.tracked.get_mut(&host) else {
            return Ok(());
        };
        if t.op != command
            || !matches!(
                t.status,
                CommandStatus::Executing
                    | CommandStatus::RunningWarning
                    | CommandStatus::TimeoutPending
                    | CommandStatus::Killing
            )
            || t.awaiting_heartbeat
        {
            return Ok(());
        }
        t.exit_code = Some(exit_code);
        if exit_code != 0 {
            let m = if message.is_empty() {
                None
            } else {
                Some(message)
            };
            self.finish(&host, CommandStatus::Error, Some("failed"), m, wall);
        } else if is_switch(&t.op) {
            t.status = CommandStatus::AwaitingReconnect;
            t.reconnect_by = Some(Instant::now() + self.opts.reconnect_window);
        } else {
            t.awaiting_heartbeat = true;
            if !message.is_empty() {
                t.message = Some(message);
            }
        }
        Ok(())
    }

    fn on_rejected(&mut self, conn: u64, payload: &Value, wall: SystemTime) -> Result<(), String> {
        let p = Payload::new(payload)?;
        let reason = p.string("reason")?;
        p.string("current_command")?;
        p.int("current_pid")?;
        let host = self.conn_host(conn);
        if self.tracked.contains_key(&host) {
            self.finish(
                &host,
                CommandStatus::Error,
                Some("rejected"),
                Some(format!("Agent rejected command: {reason}")),
                wall,
            );
        }
        Ok(())
    }

    // ---- the lifecycle -----------------------------------------------------------------

    /// Ends the host's tracked command in a final state and forgets it.
    fn finish(
        &mut self,
        host: &str,
        status: CommandStatus,
        code: Option<&str>,
        message: Option<String>,
        wall: SystemTime,
    ) {
        let Some(mut t) = self.tracked.remove(host) else {
            return;
        };
        t.status = status;
        t.awaiting_heartbeat = false;
        t.finished_at = Some(wall);
        if code.is_some() {
            t.code = code.map(str::to_owned);
        }
        if message.is_some() {
            t.message = message;
        }
        if let Some(h) = self.hosts.get_mut(host) {
            h.pending_command = None;
        }
        self.history.entry(host.to_owned()).or_default().push(t);
    }

    /// Advances the timers.
    pub(crate) fn tick(&mut self, now: Instant, wall: SystemTime) {
        let mut timed_out = Vec::new();
        for (host, t) in &mut self.tracked {
            match t.status {
                CommandStatus::AwaitingReconnect if t.reconnect_by.is_some_and(|by| now >= by) => {
                    timed_out.push(host.clone());
                }
                CommandStatus::Executing | CommandStatus::RunningWarning
                    if !t.awaiting_heartbeat =>
                {
                    if now >= t.hard_at {
                        t.status = CommandStatus::TimeoutPending;
                    } else if now >= t.warn_at {
                        t.status = CommandStatus::RunningWarning;
                    }
                }
                _ => {}
            }
        }
        for host in timed_out {
            self.finish(
                &host,
                CommandStatus::Timeout,
                Some("reconnect_timeout"),
                Some("Agent did not reconnect in time".into()),
                wall,
            );
        }
    }

    fn new_tracked(
        &mut self,
        host: &str,
        op: &str,
        now: Instant,
        wall: SystemTime,
    ) -> TrackedCommand {
        let (warn, hard) = match self.opts.op_timeouts {
            Some(t) => (t.warning, t.hard),
            None => op_timeouts(op),
        };
        let id = self.next_command;
        self.next_command += 1;
        TrackedCommand {
            id,
            host: host.into(),
            op: op.into(),
            status: CommandStatus::Executing,
            exit_code: None,
            message: None,
            code: None,
            awaiting_heartbeat: false,
            started_at: wall,
            finished_at: None,
            warn_at: now + warn,
            hard_at: now + hard,
            reconnect_by: None,
        }
    }

    /// Queues a data message on the host's current connection.
    pub(crate) fn enqueue(
        &self,
        host: &str,
        bytes: Vec<u8>,
        binary: bool,
        delay: Option<Duration>,
    ) -> Result<(), SendError> {
        let conn = self.current_conn(host).ok_or(SendError::NotConnected)?;
        let ctl = self.ctl(conn).ok_or(SendError::NotConnected)?;
        ctl.data
            .try_send(Outgoing {
                bytes,
                binary,
                delay,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
            })
    }

    /// `send_command`: send, and track when asked and nothing is tracked.
    pub(crate) fn send_command(
        &mut self,
        host: &str,
        name: &str,
        bytes: Vec<u8>,
        track: bool,
        delay: Option<Duration>,
    ) -> Result<(), SendError> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        self.tick(now, wall);
        let track = track && !self.tracked.contains_key(host);
        let sent = self.enqueue(host, bytes, false, delay);
        if track {
            self.start_tracking(host, name, sent.is_ok(), now, wall);
        }
        sent
    }

    fn start_tracking(&mut self, host: &str, op: &str, sent: bool, now: Instant, wall: SystemTime) {
        let t = self.new_tracked(host, op, now, wall);
        self.tracked.insert(host.to_owned(), t);
        if sent {
            if let Some(h) = self.hosts.get_mut(host) {
                h.pending_command = Some(op.to_owned());
            }
        } else {
            self.finish(
                host,
                CommandStatus::Error,
                Some("send_failed"),
                Some("Failed to send command to agent".into()),
                wall,
            );
        }
    }

    /// `ExecuteOp` without `force`.
    pub(crate) fn dispatch(
        &mut self,
        host: &str,
        op: &str,
        delay: Option<Duration>,
    ) -> Result<(), Blocked> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        self.tick(now, wall);
        if self.tracked.contains_key(host) {
            return Err(blocked("command_pending", "Host has a command in progress"));
        }
        let h = self.hosts.get(host);
        let online = h.is_some_and(|h| h.online);
        let pending = h
            .and_then(|h| h.pending_command.clone())
            .filter(|p| !p.is_empty());
        if op != "stop" && !online {
            return Err(blocked("offline", "Host is offline"));
        }
        if matches!(op, "pull" | "switch" | "test" | "rollback") && pending.is_some() {
            return Err(blocked("busy", "Host is busy with another command"));
        }
        if op == "stop" && pending.is_none() {
            return Err(blocked("no_pending", "No command is running"));
        }
        let bytes = envelope("command", &json!({"command": op})).into_bytes();
        let sent = self.enqueue(host, bytes, false, delay);
        self.start_tracking(host, op, sent.is_ok(), now, wall);
        sent.map_err(|_| blocked("send_failed", "Failed to send command to agent"))
    }

    /// `POST /api/hosts/{id}/timeout-action`.
    pub(crate) fn timeout_action(
        &mut self,
        host: &str,
        action: &str,
        delay: Option<Duration>,
    ) -> bool {
        let (now, wall) = (Instant::now(), SystemTime::now());
        self.tick(now, wall);
        let Some(op) = self.tracked.get(host).map(|t| t.op.clone()) else {
            return false;
        };
        match action {
            "wait" => {
                let hard = self.opts.op_timeouts.map_or(op_timeouts(&op).1, |t| t.hard);
                let warn = self
                    .opts
                    .op_timeouts
                    .map_or(op_timeouts(&op).0, |t| t.warning);
                if let Some(t) = self.tracked.get_mut(host) {
                    t.status = CommandStatus::Executing;
                    t.warn_at = now + warn;
                    t.hard_at = now + hard;
                }
                true
            }
            "ignore" => {
                self.finish(host, CommandStatus::Skipped, None, None, wall);
                true
            }
            "kill" => {
                let bytes = envelope("command", &json!({"command": "kill"})).into_bytes();
                let _ = self.enqueue(host, bytes, false, delay);
                if let Some(t) = self.tracked.get_mut(host) {
                    t.status = CommandStatus::Killing;
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Peer {
        id: u64,
        data: mpsc::Receiver<Outgoing>,
        ctl: mpsc::UnboundedReceiver<Ctl>,
    }

    fn state(f: impl FnOnce(&mut V2Options)) -> State {
        let mut opts = V2Options::default();
        f(&mut opts);
        State::new(opts)
    }

    fn connect(st: &mut State, cap: usize) -> Peer {
        let (data_tx, data) = mpsc::channel(cap);
        let (ctl_tx, ctl) = mpsc::unbounded_channel();
        let id = st.open_conn(
            "127.0.0.1:1".parse().unwrap(),
            ConnCtl {
                data: data_tx,
                ctl: ctl_tx,
            },
        );
        Peer { id, data, ctl }
    }

    fn feed(st: &mut State, conn: u64, msg: Value, now: Instant) -> Option<String> {
        let bytes = msg.to_string().into_bytes();
        let idx = st.log(NewFrame {
            conn,
            dir: Direction::In,
            kind: FrameKind::Text,
            raw_len: bytes.len(),
            bytes,
            fragments: 1,
            close_code: None,
        });
        st.process(conn, idx, now, SystemTime::now());
        st.frames.get(idx).and_then(|f| f.ignored.clone())
    }

    fn register(host: &str) -> Value {
        json!({"type": "register", "payload": {"hostname": host, "host_type": "macos"}})
    }

    fn status(command: &str, exit_code: i64) -> Value {
        json!({"type": "status", "payload": {"status": "ok", "command": command, "exit_code": exit_code}})
    }

    #[test]
    fn register_displaces_the_previous_connection_with_an_empty_close() {
        let mut st = state(|_| {});
        let now = Instant::now();
        let mut a = connect(&mut st, 4);
        let mut b = connect(&mut st, 4);
        assert_eq!(feed(&mut st, a.id, register("mac1"), now), None);
        assert!(
            a.data
                .try_recv()
                .unwrap()
                .bytes
                .starts_with(br#"{"type":"registered""#)
        );
        assert_eq!(st.hosts["mac1"].theme_color, "#bb9af7");
        feed(&mut st, b.id, register("mac1"), now);
        match a.ctl.try_recv().unwrap() {
            Ctl::Close { code, end, .. } => assert_eq!((code, end), (None, EndReason::Displaced)),
            other => panic!("{other:?}"),
        }
        assert!(b.ctl.try_recv().is_err());
        assert_eq!(st.current_conn("mac1"), Some(b.id));
        // The displaced connection's end leaves the host online.
        st.conn_closed(a.id, EndReason::Displaced, now, SystemTime::now());
        assert!(st.hosts["mac1"].online);
        st.conn_closed(b.id, EndReason::ReadFailed, now, SystemTime::now());
        assert!(!st.hosts["mac1"].online);
    }

    #[test]
    fn a_full_queue_drops_registered_silently_and_fails_commands() {
        let mut st = state(|_| {});
        let a = connect(&mut st, 1);
        let now = Instant::now();
        feed(&mut st, a.id, register("h"), now);
        feed(&mut st, a.id, register("h"), now);
        assert_eq!(
            st.hosts["h"].registers, 2,
            "second register processed, its reply dropped"
        );
        let cmd = envelope("command", &json!({"command": "pull"})).into_bytes();
        assert_eq!(
            st.send_command("h", "pull", cmd, false, None),
            Err(SendError::QueueFull)
        );
        drop(a);
    }

    #[test]
    fn output_can_be_left_out_of_the_log_but_still_reaches_the_hook() {
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        let mut st = state(|o| {
            o.record_output = false;
            o.on_frame = Some(std::sync::Arc::new(move |f: &Frame| {
                if f.is_in("output") {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        });
        let a = connect(&mut st, 4);
        let now = Instant::now();
        feed(&mut st, a.id, register("h"), now);
        let line = json!({"type": "output", "payload": {"line": "x", "stream": "stdout", "command": "", "is_error": false}});
        feed(&mut st, a.id, line.clone(), now);
        feed(&mut st, a.id, line, now);
        feed(
            &mut st,
            a.id,
            json!({"type": "heartbeat", "payload": {}}),
            now,
        );
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
        let seqs: Vec<_> = st
            .frames
            .iter()
            .map(|f| (f.seq, f.msg_type.clone().unwrap()))
            .collect();
        assert_eq!(
            seqs,
            vec![(1, "register".to_owned()), (4, "heartbeat".to_owned())]
        );
    }

    #[test]
    fn messages_before_register_match_no_host() {
        let mut st = state(|_| {});
        let a = connect(&mut st, 4);
        let err = feed(
            &mut st,
            a.id,
            json!({"type": "heartbeat", "payload": {}}),
            Instant::now(),
        );
        assert!(err.unwrap().contains("no host row"));
        assert!(st.hosts.is_empty());
    }

    #[test]
    fn switch_lifecycle_timers_are_driven_by_the_given_clock() {
        let mut st = state(|o| o.lifecycle = true);
        let a = connect(&mut st, 8);
        let t0 = Instant::now();
        feed(&mut st, a.id, register("h"), t0);
        let cmd = envelope("command", &json!({"command": "switch"})).into_bytes();
        st.send_command("h", "switch", cmd, true, None).unwrap();
        st.tick(t0 + Duration::from_secs(9 * 60), SystemTime::now());
        assert_eq!(st.tracked["h"].status, CommandStatus::Executing);
        st.tick(t0 + Duration::from_secs(11 * 60), SystemTime::now());
        assert_eq!(st.tracked["h"].status, CommandStatus::RunningWarning);
        // §7.6.5 does not apply once warned: a disconnect leaves it running.
        st.conn_closed(
            a.id,
            EndReason::ReadFailed,
            t0 + Duration::from_secs(11 * 60),
            SystemTime::now(),
        );
        assert_eq!(st.tracked["h"].status, CommandStatus::RunningWarning);
        st.tick(t0 + Duration::from_secs(31 * 60), SystemTime::now());
        assert_eq!(st.tracked["h"].status, CommandStatus::TimeoutPending);
        assert_eq!(
            st.dispatch("h", "pull", None).unwrap_err().code,
            "command_pending"
        );
    }

    #[test]
    fn a_successful_switch_times_out_without_register_after_the_window() {
        let mut st = state(|o| o.reconnect_window = Duration::from_secs(90));
        let a = connect(&mut st, 8);
        let t0 = Instant::now();
        feed(&mut st, a.id, register("h"), t0);
        st.dispatch("h", "switch", None).unwrap();
        feed(&mut st, a.id, status("switch", 0), t0);
        assert_eq!(st.tracked["h"].status, CommandStatus::AwaitingReconnect);
        // A later status for the same switch is ignored by the lifecycle.
        feed(&mut st, a.id, status("switch", 1), t0);
        assert_eq!(st.tracked["h"].status, CommandStatus::AwaitingReconnect);
        st.tick(Instant::now() + Duration::from_secs(89), SystemTime::now());
        assert_eq!(st.tracked["h"].status, CommandStatus::AwaitingReconnect);
        st.tick(Instant::now() + Duration::from_secs(91), SystemTime::now());
        assert!(!st.tracked.contains_key("h"));
        let last = st.history["h"].last().unwrap();
        assert_eq!(
            (last.status, last.code.as_deref()),
            (CommandStatus::Timeout, Some("reconnect_timeout"))
        );
        assert_eq!(st.hosts["h"].pending_command, None);
    }

    #[test]
    fn a_tracked_stop_ends_partial_at_best() {
        let mut st = state(|_| {});
        let a = connect(&mut st, 8);
        let now = Instant::now();
        feed(&mut st, a.id, register("h"), now);
        st.hosts.get_mut("h").unwrap().pending_command = Some("test".into());
        st.dispatch("h", "stop", None).unwrap();
        assert_eq!(st.hosts["h"].pending_command.as_deref(), Some("stop"));
        feed(&mut st, a.id, status("stop", 0), now);
        feed(
            &mut st,
            a.id,
            json!({"type": "heartbeat", "payload": {}}),
            now,
        );
        let last = st.history["h"].last().unwrap();
        assert_eq!(
            (last.status, last.code.as_deref()),
            (CommandStatus::Partial, Some("still_running"))
        );
    }

    #[test]
    fn restart_succeeds_on_the_heartbeat_after_its_status() {
        let mut st = state(|_| {});
        let a = connect(&mut st, 8);
        let now = Instant::now();
        feed(&mut st, a.id, register("h"), now);
        st.dispatch("h", "restart", None).unwrap();
        feed(&mut st, a.id, status("restart", 0), now);
        assert!(st.tracked["h"].awaiting_heartbeat);
        feed(
            &mut st,
            a.id,
            json!({"type": "heartbeat", "payload": {}}),
            now,
        );
        assert_eq!(
            st.history["h"].last().unwrap().status,
            CommandStatus::Success
        );
    }
}
