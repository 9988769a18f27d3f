//! `fake-dashboard --protocol v2`: startup line, frame log lines, control API, SIGTERM.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::SinkExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use super::util::{close_frame, next_json, register_msg};
use crate::util::send;

fn control(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string());
    let r = send(
        base,
        method,
        path,
        None,
        bytes.as_deref().map(str::as_bytes),
    )
    .unwrap();
    (r.status, r.json())
}

/// Kills the binary if the test fails before its SIGTERM step.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The next log line that is a frame of this envelope type.
fn log_line(rx: &mpsc::Receiver<String>, msg_type: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("a log line");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] == msg_type {
            return v;
        }
    }
}

#[tokio::test]
#[expect(
    clippy::disallowed_methods,
    reason = "the fake's own binary under test, not an agent child process"
)]
async fn binary_v2_serves_logs_frames_is_controlled_and_exits_on_sigterm() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_fake-dashboard"))
            .args(["--protocol", "v2", "--shared-token", "tok", "--lifecycle"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut words = first.split(' ');
    assert_eq!(words.next(), Some("listening"));
    let url = words
        .next()
        .unwrap()
        .strip_prefix("url=")
        .unwrap()
        .to_owned();
    let ctl = words
        .next()
        .unwrap()
        .strip_prefix("control=")
        .unwrap()
        .to_owned();
    assert!(
        url.starts_with("ws://127.0.0.1:") && url.ends_with("/ws"),
        "{url}"
    );

    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer tok".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(Message::text(register_msg("box"))).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "registered");
    let reg = log_line(&rx, "register");
    assert_eq!(
        (reg["dir"].as_str(), reg["host"].as_str()),
        (Some("in"), Some("box"))
    );
    assert_eq!(reg["payload"]["hostname"], "box");
    assert_eq!(log_line(&rx, "registered")["dir"], "out");

    let (status, body) = control(
        &ctl,
        "POST",
        "/_fake/command/box",
        Some(json!({"command": "pull", "dispatch": true})),
    );
    assert_eq!((status, body["status"].as_str()), (200, Some("sent")));
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "pull"}})
    );
    let (status, body) = control(
        &ctl,
        "POST",
        "/_fake/command/box",
        Some(json!({"command": "test", "dispatch": true})),
    );
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("command_pending"))
    );
    let (_, cmds) = control(&ctl, "GET", "/_fake/commands/box", None);
    assert_eq!(cmds["current"]["op"], "pull");
    assert_eq!(cmds["current"]["status"], "EXECUTING");
    let (_, host) = control(&ctl, "GET", "/_fake/hosts/box", None);
    assert_eq!(
        (host["online"].as_bool(), host["pending_command"].as_str()),
        (Some(true), Some("pull"))
    );
    let (status, _) = control(
        &ctl,
        "POST",
        "/_fake/command/ghost",
        Some(json!({"command": "pull"})),
    );
    assert_eq!(status, 409);
    let (_, msgs) = control(&ctl, "GET", "/_fake/messages/register", None);
    assert_eq!(msgs.as_array().unwrap().len(), 1);

    let (_, b) = control(
        &ctl,
        "POST",
        "/_fake/behaviour",
        Some(json!({"withhold_pongs": true, "delay_commands_ms": 5})),
    );
    assert_eq!(
        (
            b["withhold_pongs"].as_bool(),
            b["delay_commands_ms"].as_u64()
        ),
        (Some(true), Some(5))
    );
    let (status, _) = control(
        &ctl,
        "POST",
        "/_fake/drop/box",
        Some(json!({"how": "close", "code": 1001})),
    );
    assert_eq!(status, 200);
    let close = close_frame(&mut ws).await.unwrap().unwrap();
    assert_eq!(u16::from(close.code), 1001);
    let (_, conns) = control(&ctl, "GET", "/_fake/connections", None);
    assert_eq!(conns[0]["close_sent"], json!(1001));

    let pid = i32::try_from(child.0.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fake-dashboard did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[expect(
    clippy::disallowed_methods,
    reason = "the fake's own binary under test, not an agent child process"
)]
fn binary_v2_refuses_v1_only_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_fake-dashboard"))
        .args(["--protocol", "v2", "--rate-limit"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only apply to --protocol v1"));
    let out = Command::new(env!("CARGO_BIN_EXE_fake-dashboard"))
        .args(["--protocol", "v3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
