//! A real, independent WebSocket client (tokio-tungstenite) and helpers for the v2 tests.

use std::time::Duration;

use fake_dashboard::v2::{FakeV2, V2Options};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub const TOKEN: &str = "shared-agent-token";

/// A fake with fast timers unless the test overrides them.
pub fn fake(f: impl FnOnce(&mut V2Options)) -> FakeV2 {
    let mut opts = V2Options::default();
    f(&mut opts);
    FakeV2::start(opts)
}

/// Dials with `Authorization: Bearer token`.
pub async fn dial(fake: &FakeV2, token: &str) -> Ws {
    let mut req = fake.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

pub fn register_msg(hostname: &str) -> String {
    json!({"type": "register", "payload": {
        "hostname": hostname, "host_type": "nixos", "agent_version": "0.1.0",
        "os_version": "25.05", "nixpkgs_version": "25.05.1", "generation": "4f2e9a1",
        "theme_color": "", "heartbeat_interval": 5, "location": "", "device_type": "",
        "repo_url": "", "repo_dir": "/var/lib/nixfleet-agent/repo"}})
    .to_string()
}

pub fn heartbeat_msg(lock: &str) -> String {
    json!({"type": "heartbeat", "payload": {
        "generation": "4f2e9a1", "nixpkgs_version": "25.05.1", "pending_command": null,
        "command_pid": null, "metrics": {"cpu": 12, "ram": 41.5, "swap": 0, "load": 0.37},
        "update_status": {"git": {"status": "", "message": "", "checked_at": ""},
                          "lock": {"status": lock, "message": "", "checked_at": ""},
                          "system": {"status": "", "message": "", "checked_at": ""},
                          "tests": {"status": "", "message": "", "checked_at": ""}}}})
    .to_string()
}

pub fn status_msg(command: &str, exit_code: i64) -> String {
    json!({"type": "status", "payload": {"status": if exit_code == 0 { "ok" } else { "error" },
        "command": command, "exit_code": exit_code}})
    .to_string()
}

pub async fn send(ws: &mut Ws, text: String) {
    ws.send(Message::text(text)).await.unwrap();
}

/// Dials and registers `hostname`, returning after `registered` arrived.
pub async fn agent(fake: &FakeV2, hostname: &str) -> Ws {
    let mut ws = dial(fake, TOKEN).await;
    send(&mut ws, register_msg(hostname)).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(
        reply,
        json!({"type": "registered", "payload": {"host_id": hostname}})
    );
    ws
}

/// The next message of any kind within 5 s (`None` when the stream ended).
pub async fn next(ws: &mut Ws) -> Option<Message> {
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Err(_) => panic!("nothing received within 5 s"),
        Ok(None) | Ok(Some(Err(_))) => None,
        Ok(Some(Ok(m))) => Some(m),
    }
}

/// The next text message, parsed, skipping Pings.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match next(ws).await {
            Some(Message::Text(t)) => return serde_json::from_str(&t).unwrap(),
            Some(Message::Ping(_)) | Some(Message::Pong(_)) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Reads until a close frame (returned) or the end of the stream (`None`), skipping data.
pub async fn close_frame(ws: &mut Ws) -> Option<Option<CloseFrame>> {
    loop {
        match next(ws).await {
            Some(Message::Close(c)) => return Some(c),
            None => return None,
            Some(_) => continue,
        }
    }
}

pub fn ping(payload: &'static [u8]) -> Message {
    Message::Ping(Bytes::from_static(payload))
}

/// A raw HTTP request on a fresh TCP connection; returns the whole answer head and body.
pub async fn raw_http(fake: &FakeV2, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", fake.port()))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// A well-formed upgrade request with these extra header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\
         Connection: close\r\n\r\n"
    )
}
