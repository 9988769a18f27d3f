//! The standalone `fake-dashboard` binary: startup line, control API, log lines, SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Agent, addr, send};

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

#[test]
#[expect(
    clippy::disallowed_methods,
    reason = "the fake's own binary under test, not an agent child process"
)]
fn binary_serves_logs_is_controlled_and_exits_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-dashboard"))
        .args(["--shared-token", "tok", "--no-provision"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
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
    assert!(url.starts_with("http://127.0.0.1:") && ctl.starts_with("http://127.0.0.1:"));

    let agent = Agent {
        url: url.clone(),
        token: "tok".into(),
    };
    let r = agent.register("Box").json();
    assert_eq!(
        r,
        json!({"status": "registered", "host_id": "box", "command": null})
    );
    let log: Value =
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert_eq!(
        (
            log["method"].as_str(),
            log["path"].as_str(),
            log["host_id"].as_str(),
            log["status"].as_u64()
        ),
        (
            Some("POST"),
            Some("/api/hosts/Box/register"),
            Some("box"),
            Some(200)
        )
    );
    assert_eq!(log["body"]["hostname"], "Box");

    // Queue errors come back with the operator API's status; force bypasses them.
    let (status, body) = control(
        &ctl,
        "POST",
        "/_fake/command/box",
        Some(json!({"command": "pull"})),
    );
    assert_eq!(
        (status, body["detail"].as_str()),
        (409, Some("Host has never been seen online"))
    );
    let (status, _) = control(
        &ctl,
        "POST",
        "/_fake/command/box",
        Some(json!({"command": "update", "force": true})),
    );
    assert_eq!(status, 200);
    assert_eq!(agent.register("box").json()["command"], "update");
    let (_, logs) = control(&ctl, "GET", "/_fake/logs/box", None);
    assert_eq!(logs[0]["command"], "update");
    assert_eq!(logs[0]["status"], "running");
    let (_, host) = control(&ctl, "GET", "/_fake/hosts/box", None);
    assert_eq!(host["pending_command"], json!(null));
    assert!(host["last_seen"].as_str().unwrap().len() >= 19);
    let (_, token) = control(&ctl, "GET", "/_fake/token/box", None);
    assert_eq!(token, json!({"host_id": "box", "token": null}));
    let (_, reqs) = control(&ctl, "GET", "/_fake/requests", None);
    assert_eq!(reqs.as_array().unwrap().len(), 2);
    assert_eq!(reqs[0]["endpoint"], "register");

    // Down via the control port, which keeps working.
    let (status, _) = control(&ctl, "POST", "/_fake/mode", Some(json!({"mode": "down"})));
    assert_eq!(status, 200);
    assert!(TcpStream::connect(addr(&url)).is_err());
    let (status, _) = control(&ctl, "POST", "/_fake/mode", Some(json!({"mode": "slow"})));
    assert_eq!(status, 400, "slow needs ms");
    control(&ctl, "POST", "/_fake/mode", Some(json!({"mode": "normal"})));
    assert_eq!(agent.poll("box").status, 200);

    // SIGTERM: clean exit 0.
    let pid = i32::try_from(child.id()).unwrap();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
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
fn binary_rejects_unknown_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_fake-dashboard"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}
