//! A scripted second agent: connects with the right token, registers a hostname and records
//! what the fake sends it, so a test can displace the real agent (§3.5) or check what a
//! displaced peer sees. It speaks the client side of the framing itself (masked frames, Pong
//! answers, close echo) and runs on the fake's runtime; it never touches the fake's state
//! except to find its own connection id.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::sync::mpsc;

use super::server::Shared;
use super::wire;

#[derive(Debug, Default)]
struct Seen {
    /// Text messages received.
    received: Vec<String>,
    /// The close frame received: `Some(None)` is an empty one (1005).
    close: Option<Option<u16>>,
    /// The session is over.
    ended: bool,
    /// Why it could not connect.
    error: Option<String>,
}

enum Order {
    Text(String),
    Close(Option<u16>),
}

/// Handle to the scripted client; dropping it sends close 1000 and ends it.
pub struct Impostor {
    seen: Arc<Mutex<Seen>>,
    orders: mpsc::UnboundedSender<Order>,
    conn: Option<u64>,
    hostname: String,
}

impl std::fmt::Debug for Impostor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Impostor")
            .field("hostname", &self.hostname)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

impl Impostor {
    pub(crate) fn start(
        rt: &tokio::runtime::Handle,
        shared: Arc<Shared>,
        addr: SocketAddr,
        ca_der: Option<Vec<u8>>,
        token: &str,
        hostname: &str,
    ) -> Impostor {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (orders, rx) = mpsc::unbounded_channel();
        let nonce = format!("{:016x}", fastrand::u64(..));
        let register = serde_json::json!({"type": "register", "payload": {
            "hostname": hostname, "host_type": "nixos", "agent_version": "impostor",
            "os_version": "", "nixpkgs_version": "", "generation": "", "theme_color": "",
            "heartbeat_interval": 5, "location": "", "device_type": "", "repo_url": "",
            "repo_dir": ""}})
        .to_string();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\nX-Fake-Impostor: {nonce}\r\n\r\n"
        );
        let task_seen = seen.clone();
        rt.spawn(async move {
            if let Err(e) = connect(addr, ca_der, request, register, rx, &task_seen).await {
                task_seen
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .error = Some(e);
            }
            task_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .ended = true;
        });
        // Block until the fake has processed our register (or we failed).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut conn = None;
        while Instant::now() < deadline {
            if seen.lock().unwrap_or_else(PoisonError::into_inner).ended {
                break;
            }
            let st = shared.lock();
            conn = conn.or_else(|| {
                st.handshakes
                    .iter()
                    .find(|h| h.header("x-fake-impostor") == Some(&nonce))
                    .and_then(|h| h.conn)
            });
            if conn.is_some() && conn == st.current_conn(hostname) {
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
        }
        Impostor {
            seen,
            orders,
            conn,
            hostname: hostname.to_owned(),
        }
    }

    /// The fake's id for this connection, once known.
    pub fn conn_id(&self) -> Option<u64> {
        self.conn
    }

    /// Text messages the fake sent to the impostor.
    pub fn received(&self) -> Vec<String> {
        self.seen().received.clone()
    }

    /// The close frame received: `Some(None)` for an empty one (a displaced peer sees 1005).
    pub fn close_received(&self) -> Option<Option<u16>> {
        self.seen().close
    }

    /// Whether the session is over.
    pub fn is_closed(&self) -> bool {
        self.seen().ended
    }

    /// Why it failed to connect, if it did.
    pub fn error(&self) -> Option<String> {
        self.seen().error.clone()
    }

    /// Waits until the session is over; false on timeout.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.is_closed() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.is_closed()
    }

    /// Sends a text message (e.g. another `register` or a heartbeat).
    pub fn send_text(&self, text: &str) {
        let _ = self.orders.send(Order::Text(text.to_owned()));
    }

    /// Sends a close frame (`None`: empty) and ends after the echo.
    pub fn close(&self, code: Option<u16>) {
        let _ = self.orders.send(Order::Close(code));
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Impostor {
    fn drop(&mut self) {
        let _ = self.orders.send(Order::Close(Some(1000)));
    }
}

async fn connect(
    addr: SocketAddr,
    ca_der: Option<Vec<u8>>,
    request: String,
    register: String,
    rx: mpsc::UnboundedReceiver<Order>,
    seen: &Mutex<Seen>,
) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    match ca_der {
        None => session(tcp, request, register, rx, seen).await,
        Some(der) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls::pki_types::CertificateDer::from(der))
                .map_err(|e| format!("ca: {e}"))?;
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            session(tls, request, register, rx, seen).await
        }
    }
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    request: String,
    register: String,
    mut rx: mpsc::UnboundedReceiver<Order>,
    seen: &Mutex<Seen>,
) -> Result<(), String> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    wr.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut status = String::new();
    rd.read_line(&mut status)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("handshake refused: {}", status.trim()));
    }
    loop {
        let mut line = String::new();
        let n = rd
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 || line == "\r\n" {
            break;
        }
    }
    let key = || fastrand::u32(..).to_be_bytes();
    let send = |opcode: u8, payload: &[u8]| wire::encode_masked(opcode, true, payload, key());
    wr.write_all(&send(wire::OP_TEXT, register.as_bytes()))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut closing = false;
    loop {
        // Wait for bytes without consuming them: reading a frame is not cancel-safe.
        let readable = tokio::select! {
            r = rd.fill_buf() => r.map(|b| !b.is_empty()).unwrap_or(false),
            order = rx.recv(), if !closing => {
                let code = match order {
                    Some(Order::Text(t)) => {
                        let _ = wr.write_all(&send(wire::OP_TEXT, t.as_bytes())).await;
                        continue;
                    }
                    Some(Order::Close(c)) => c,
                    None => Some(1000),
                };
                closing = true;
                let _ = wr.write_all(&send(wire::OP_CLOSE, &wire::close_payload(code, ""))).await;
                continue;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if closing => return Ok(()),
        };
        if !readable {
            return Ok(());
        }
        let Ok(Some(h)) = wire::read_header(&mut rd).await else {
            return Ok(());
        };
        let Ok(payload) = wire::read_payload(&mut rd, &h).await else {
            return Ok(());
        };
        match h.opcode {
            wire::OP_PING => {
                let _ = wr.write_all(&send(wire::OP_PONG, &payload)).await;
            }
            wire::OP_CLOSE => {
                let (code, _) = wire::parse_close(&payload);
                seen.lock().unwrap_or_else(PoisonError::into_inner).close = Some(code);
                if !closing {
                    let _ = wr
                        .write_all(&send(wire::OP_CLOSE, &wire::close_payload(code, "")))
                        .await;
                }
                let _ = wr.shutdown().await;
                return Ok(());
            }
            wire::OP_TEXT | wire::OP_BINARY => {
                seen.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .received
                    .push(String::from_utf8_lossy(&payload).into_owned());
            }
            _ => {}
        }
    }
}
