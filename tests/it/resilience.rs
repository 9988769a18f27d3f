//! Bad dashboards and busy agents: nothing is lost, the agent never wedges or grows, and it
//! keeps heartbeating while commands run.

use std::time::{Duration, Instant};

use crate::support::*;

const T: Duration = Duration::from_secs(10);

fn registered_ok(h: &Harness) -> usize {
    h.requests(Endpoint::Register)
        .iter()
        .filter(|r| r.response_status == 200 && r.host_id.as_deref() == Some(HOST))
        .count()
}

#[test]
fn dashboard_down_at_start_then_up_loses_nothing() {
    let h = Harness::new();
    h.dash.set_mode(Mode::Down);
    let agent = h.spawn();
    assert!(agent.wait_log(T, "connection refused"), "{}", agent.log());
    std::thread::sleep(Duration::from_secs(2));
    h.dash.set_mode(Mode::Normal);
    // Back within about one backoff cap (2 s here).
    assert!(
        h.wait_status(Duration::from_secs(5), "Agent started"),
        "{}",
        agent.log()
    );
    assert!(wait_until(T, || registered_ok(&h) >= 1));
    assert!(
        agent.wait_log(T, "dashboard reachable again after"),
        "{}",
        agent.log()
    );
    // The outage is reported to the dashboard too, as a status it accepts.
    assert!(
        h.wait_status(T, "Agent: dashboard was unreachable for"),
        "{:?}",
        h.statuses()
    );
}

#[test]
fn hanging_dashboard_times_out_and_the_loop_keeps_running() {
    let mut h = Harness::new();
    h.set("NIXFLEET_HTTP_TIMEOUT", "1");
    h.dash.set_mode(Mode::Hang);
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "did not answer within 1s"),
        "{}",
        agent.log()
    );
    h.dash.set_mode(Mode::Normal);
    assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
}

#[test]
fn oversized_and_garbage_replies_are_refused_without_growing() {
    let h = Harness::new();
    h.dash.set_mode(Mode::Oversized(50 * 1024 * 1024));
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "over the 1048576-byte limit"),
        "{}",
        agent.log()
    );
    h.dash.set_mode(Mode::OversizedChunked(50 * 1024 * 1024));
    assert!(wait_until(T, || agent
        .log()
        .matches("1048576-byte limit")
        .count()
        >= 2));
    let rss = agent.rss_kib().unwrap();
    assert!(rss < 40 * 1024, "RSS {rss} KiB after 50 MiB replies");
    h.dash.set_mode(Mode::Garbage);
    assert!(agent.wait_log(T, "invalid JSON"), "{}", agent.log());
    h.dash.set_mode(Mode::Normal);
    assert!(wait_until(T, || registered_ok(&h) >= 1), "{}", agent.log());
}

#[test]
fn server_error_is_treated_as_a_possible_rate_limit() {
    let h = Harness::new();
    h.dash.set_mode(Mode::Status(500));
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "also answers its rate limit with 500"),
        "{}",
        agent.log()
    );
    h.dash.set_mode(Mode::Normal);
    assert!(wait_until(T, || registered_ok(&h) >= 1));
}

#[test]
fn validation_error_detail_is_logged_once() {
    let h = Harness::new();
    h.dash.set_mode(Mode::Status(422));
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "the dashboard rejected the"),
        "{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log();
    // Many refused heartbeats, one log line about them; the refused start report is replaced
    // by a short stand-in (the same payload would be refused again), and when that is refused
    // too it is dropped with a line naming it: nothing retries a 422 forever.
    let attempts = h.requests(Endpoint::Register).len();
    assert!(attempts >= 2, "{attempts}");
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("rejected the heartbeat"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(log.contains("short stand-in instead"), "{log}");
    assert!(log.contains("Agent started ("), "{log}");
    assert!(
        log.contains(
            "refused even the short stand-in for a report (dashboard rejected the request (HTTP 422"
        ),
        "{log}"
    );
    assert!(
        log.contains("dropping it: status Ok: Report withheld"),
        "{log}"
    );
}

/// Sends one raw register request from this process (same IP as the agent: 127.0.0.1).
fn raw_register(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let body = r#"{"hostname":"other","host_type":"nixos"}"#;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /api/hosts/other/register HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {SHARED_TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

#[test]
fn real_rate_limit_500_backs_off_and_recovers() {
    let h = Harness::with_options(Options {
        rate_limit: true,
        ..Options::default()
    });
    let agent = h.spawn();
    assert!(wait_until(T, || registered_ok(&h) >= 1), "{}", agent.log());
    // Other hosts behind the same IP use up the register budget (30/min, contract §8).
    let mut limited = false;
    for _ in 0..40 {
        if raw_register(h.dash.port()).starts_with("HTTP/1.1 500") {
            limited = true;
            break;
        }
    }
    assert!(limited, "the fake's limiter never answered 500");
    assert!(
        agent.wait_log(T, "also answers its rate limit with 500"),
        "{}",
        agent.log()
    );
    // Backing off, not hammering: far fewer attempts than seconds at interval 1 s.
    let refused_before = h
        .requests(Endpoint::Register)
        .iter()
        .filter(|r| r.response_status == 500)
        .count();
    std::thread::sleep(Duration::from_secs(3));
    let refused_after = h
        .requests(Endpoint::Register)
        .iter()
        .filter(|r| r.response_status == 500)
        .count();
    assert!(
        refused_after - refused_before <= 3,
        "{refused_before} -> {refused_after}"
    );
    // The window passes (simulated): the agent is back within one backoff cap.
    h.dash.reset_rate_limits();
    let ok_before = registered_ok(&h);
    assert!(
        wait_until(T, || registered_ok(&h) > ok_before),
        "{}",
        agent.log()
    );
}

#[test]
fn heartbeats_continue_while_a_command_runs() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.stand_in("nixos-rebuild", "sleep 4; echo built");
    let agent = h.spawn();
    assert!(wait_until(T, || registered_ok(&h) >= 1));
    h.dash.force_command(HOST, "switch");
    let started = Instant::now();
    assert!(agent.wait_log(T, "switch: Switch"), "{}", agent.log());
    let before = registered_ok(&h);
    assert!(h.wait_status(T, "Switch: built"), "{}", agent.log());
    let during = registered_ok(&h) - before;
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert!(during >= 2, "only {during} heartbeats during a 4 s switch");
}

#[test]
fn command_delivered_while_busy_is_queued_and_acknowledged() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.stand_in("nixos-rebuild", "sleep 3; echo built");
    let agent = h.spawn();
    assert!(wait_until(T, || registered_ok(&h) >= 1));
    h.dash.force_command(HOST, "switch");
    assert!(agent.wait_log(T, "switch: Switch"), "{}", agent.log());
    h.dash.force_command(HOST, "pull");
    assert!(h.wait_status(T, "Queued: pull will run after switch finishes"));
    assert!(h.wait_status(T, "Switch: built"));
    assert!(h.wait_status(T, "Pull: "), "{:?}", h.statuses());
    // Each command's own result landed on its own dashboard log row.
    let rows = h.dash.command_log(HOST);
    let switch = rows.iter().find(|r| r.command == "switch").unwrap();
    let pull = rows.iter().find(|r| r.command == "pull").unwrap();
    assert!(
        switch
            .output
            .as_deref()
            .unwrap()
            .starts_with("Switch: built"),
        "{rows:?}"
    );
    assert!(
        pull.output.as_deref().unwrap().starts_with("Queued: pull"),
        "{rows:?}"
    );
}

#[test]
fn queue_overflow_reports_the_dropped_command() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_QUEUE_LIMIT", "1");
    h.stand_in("nixos-rebuild", "sleep 4; echo built");
    let agent = h.spawn();
    assert!(wait_until(T, || registered_ok(&h) >= 1));
    h.dash.force_command(HOST, "switch");
    assert!(agent.wait_log(T, "switch: Switch"));
    h.dash.force_command(HOST, "pull");
    assert!(h.wait_status(T, "Queued: pull"));
    h.dash.force_command(HOST, "test");
    assert!(
        h.wait_status(T, "Dropped command test"),
        "{:?}",
        h.statuses()
    );
}

#[test]
fn https_with_ca_file_and_pinned_key() {
    let mut h = Harness::with_options(Options {
        tls: true,
        ..Options::default()
    });
    let ca = h.tmp.path().join("ca.pem");
    std::fs::write(&ca, h.dash.ca_pem().unwrap()).unwrap();
    h.unset("NIXFLEET_ALLOW_INSECURE_HTTP");
    h.set("NIXFLEET_URL", h.dash.url());
    h.set("NIXFLEET_CA_FILE", ca.display().to_string());
    h.set(
        "NIXFLEET_PINNED_PUBKEY",
        format!("sha256//{}", h.dash.spki_sha256_base64().unwrap()),
    );
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
    drop(agent);

    // A wrong pin is refused like an unreachable dashboard.
    h.set(
        "NIXFLEET_PINNED_PUBKEY",
        "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    h.dash.clear_requests();
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "does not match NIXFLEET_PINNED_PUBKEY"),
        "{}",
        agent.log()
    );
    assert!(h.dash.requests().is_empty());
    drop(agent);

    // Without the CA file the self-signed certificate is not trusted.
    h.unset("NIXFLEET_CA_FILE");
    h.unset("NIXFLEET_PINNED_PUBKEY");
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "dashboard unreachable"),
        "{}",
        agent.log()
    );
    assert!(h.dash.requests().is_empty());
}
