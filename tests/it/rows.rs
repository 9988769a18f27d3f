//! Regression tests from review: the v1 dashboard closes the newest open log row with the next
//! `/status`, so every result must land on its own command's row, whatever happens around it
//! (outages, slow replies, restarts, proxies answering 404).

use std::time::Duration;

use crate::support::*;

/// A gated detached switch (session mode) with a pull queued behind it, then kill -9 of the
/// agent once the pull's "Queued:" acknowledgement is out of its outbox. Returns the world and
/// the switch's gate (closed: the switch still runs).
fn pull_queued_behind_a_detached_switch_then_kill_9() -> (Harness, std::path::PathBuf) {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "session");
    let gate = gated_switch(&h, "switched", 0);
    let mut agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash.force_command(HOST, "switch");
    assert!(
        agent.wait_log(T, "detached from the agent"),
        "{}",
        agent.log()
    );
    h.dash.force_command(HOST, "pull");
    assert!(h.wait_delivered(T, "Queued: pull"), "{:?}", h.statuses());
    agent.kill9();
    (h, gate)
}

/// The dashboard's switch row was closed with this status and output.
fn assert_switch_row_closed_by(h: &Harness, status: &str, output: &str) {
    let r = rows(h);
    let switch = r.iter().find(|r| r.0 == "switch").unwrap();
    assert_eq!(
        (switch.1.as_str(), switch.2.as_str()),
        (status, output),
        "{r:#?}"
    );
}

/// A stand-in switch that runs until the test opens its gate (at most 60 s), then prints
/// `output` and exits with `code`: the order of restarts and the switch's end is fixed by the
/// test, not by timing.
fn gated_switch(h: &Harness, output: &str, code: i32) -> std::path::PathBuf {
    let gate = h.tmp.path().join("switch-gate");
    h.stand_in(
        "nixos-rebuild",
        &format!(
            "i=0; while [ ! -e '{gate}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done\n\
             echo '{output}'; exit {code}",
            gate = gate.display()
        ),
    );
    gate
}

const T: Duration = Duration::from_secs(20);

fn rows(h: &Harness) -> Vec<(String, String, String)> {
    h.dash
        .command_log(HOST)
        .into_iter()
        .map(|r| (r.command, r.status, r.output.unwrap_or_default()))
        .collect()
}

/// A detached switch interrupted by an agent restart fails: the failure, not "Agent started",
/// closes its row.
#[test]
fn resumed_switch_failure_lands_on_the_switch_row() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "session");
    h.stand_in("nixos-rebuild", "sleep 3; echo broken build; exit 1");
    let mut agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    h.dash.force_command(HOST, "switch");
    assert!(
        agent.wait_log(T, "detached from the agent"),
        "{}",
        agent.log()
    );
    agent.kill9();
    let _agent = h.spawn();
    assert!(h.wait_status(T, "Switch failed"), "{:?}", h.statuses());
    std::thread::sleep(Duration::from_secs(1));
    let row = rows(&h).into_iter().find(|r| r.0 == "switch").unwrap();
    assert_eq!(row.1, "error", "switch row: {row:?}");
}

/// One failed heartbeat, then a heartbeat that delivers a command: the outage note must not
/// close the command's row.
#[test]
fn outage_note_never_closes_a_just_delivered_command_row() {
    let mut h = Harness::new();
    h.legacy_repo();
    let _agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash.set_mode(Mode::Status(500));
    std::thread::sleep(Duration::from_millis(1500));
    h.dash.force_command(HOST, "pull");
    h.dash.set_mode(Mode::Normal);
    assert!(h.wait_status(T, "Pull"), "{:?}", h.statuses());
    std::thread::sleep(Duration::from_secs(1));
    let row = rows(&h).into_iter().find(|r| r.0 == "pull").unwrap();
    assert!(row.2.starts_with("Pull"), "pull row: {row:?}");
}

/// A command finishing while a heartbeat is in flight, and that heartbeat delivering the next
/// command: each report stays on its own row.
#[test]
fn report_made_during_a_heartbeat_stays_on_its_own_row() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "none");
    h.stand_in("nixos-rebuild", "sleep 2.5; echo switched");
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash.force_command(HOST, "switch");
    assert!(agent.wait_log(T, "switch: Switch"));
    h.dash.set_mode(Mode::Slow(Duration::from_secs(3)));
    h.dash.force_command(HOST, "pull");
    assert!(
        h.wait_status(Duration::from_secs(30), "Pull"),
        "{:?}",
        h.statuses()
    );
    std::thread::sleep(Duration::from_secs(1));
    let r = rows(&h);
    let sw = r.iter().find(|r| r.0 == "switch").unwrap();
    assert!(sw.2.starts_with("Switch"), "rows: {r:?}");
}

/// Restart twice during one detached switch: the second instance stops while resuming; its
/// deferred "Agent started" must not close the switch's row.
#[test]
fn stopping_while_resuming_leaves_the_switch_row_open() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "session");
    let gate = gated_switch(&h, "broken build", 1);
    let mut agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    h.dash.force_command(HOST, "switch");
    assert!(
        agent.wait_log(T, "detached from the agent"),
        "{}",
        agent.log()
    );
    agent.kill9();
    let mut agent = h.spawn();
    assert!(agent.wait_log(T, "resuming a switch"), "{}", agent.log());
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(T).is_some());
    let agent = h.spawn();
    assert!(agent.wait_log(T, "resuming a switch"), "{}", agent.log());
    std::fs::write(&gate, "").unwrap();
    assert!(h.wait_status(T, "Switch failed"), "{:?}", h.statuses());
    std::thread::sleep(Duration::from_secs(1));
    let row = rows(&h).into_iter().find(|r| r.0 == "switch").unwrap();
    assert_eq!(row.1, "error", "switch row: {row:?}");
}

/// A proxy answering 404 for a moment (backend redeploying): final statuses wait and arrive.
#[test]
fn proxy_404_blip_does_not_drop_final_reports() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "none");
    h.stand_in("nixos-rebuild", "sleep 2; echo switched");
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash.force_command(HOST, "switch");
    assert!(agent.wait_log(T, "switch: Switch"));
    h.dash.set_mode(Mode::Status(404));
    std::thread::sleep(Duration::from_secs(4));
    h.dash.set_mode(Mode::Normal);
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        h.statuses().iter().any(|s| s.contains("Switch: switched")),
        "{:?}",
        h.statuses()
    );
}

/// A detached switch with a command queued behind it, then kill -9: the new instance's "not
/// run" notice for the queued command must wait until the resumed switch has reported, or it
/// would close the switch's row.
#[test]
fn not_run_notice_waits_for_the_resumed_switch_report() {
    let (h, gate) = pull_queued_behind_a_detached_switch_then_kill_9();
    let agent = h.spawn();
    assert!(agent.wait_log(T, "resuming a switch"), "{}", agent.log());
    // Time for a premature notice to go out, before the switch ends.
    std::thread::sleep(std::time::Duration::from_secs(2));
    std::fs::write(&gate, "").unwrap();
    assert!(h.wait_status(T, "Switch: switched"), "{:?}", h.statuses());
    assert!(
        h.wait_status(T, "Command pull was not run"),
        "{:?}",
        h.statuses()
    );
    assert_switch_row_closed_by(&h, "ok", "Switch: switched");
}

/// The held "not run" notice survives a second restart: the instance that was resuming the
/// switch stops before the switch ends, and the third instance still reports the queued
/// command as not run, after the switch's own result.
#[test]
fn held_not_run_notice_survives_a_stop_while_resuming() {
    let (h, gate) = pull_queued_behind_a_detached_switch_then_kill_9();
    let mut agent = h.spawn();
    assert!(agent.wait_log(T, "resuming a switch"), "{}", agent.log());
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(T).is_some());
    let agent = h.spawn();
    assert!(agent.wait_log(T, "resuming a switch"), "{}", agent.log());
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !h.statuses().iter().any(|s| s.contains("was not run")),
        "the notice must wait for the switch: {:?}",
        h.statuses()
    );
    std::fs::write(&gate, "").unwrap();
    assert!(h.wait_status(T, "Switch: switched"), "{:?}", h.statuses());
    assert!(
        h.wait_status(T, "Command pull was not run"),
        "{:?}",
        h.statuses()
    );
    let statuses = h.statuses();
    let switched = statuses.iter().position(|s| s == "Switch: switched");
    let not_run = statuses
        .iter()
        .position(|s| s.contains("Command pull was not run"));
    assert!(switched < not_run, "{statuses:?}");
    assert_eq!(
        statuses
            .iter()
            .filter(|s| s.contains("was not run"))
            .count(),
        1,
        "{statuses:?}"
    );
    assert_switch_row_closed_by(&h, "ok", "Switch: switched");
}

/// A firewall in front of the dashboard refuses a report for what the output says, while
/// heartbeats get through: after a few refusals a short stand-in takes its place, so the
/// switch's row closes with the right outcome and later reports are not stuck behind it. The
/// refused text is in the agent's log.
#[test]
fn report_refused_for_its_content_is_replaced_by_a_stand_in() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "none");
    h.stand_in("nixos-rebuild", "echo 'building; DROP TABLE hosts'; exit 1");
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash
        .set_mode(Mode::RefuseBodyContaining("DROP TABLE".into(), 403));
    h.dash.force_command(HOST, "switch");
    assert!(
        h.wait_status(Duration::from_secs(30), "Report withheld"),
        "{:?}\n{}",
        h.statuses(),
        agent.log()
    );
    let refused = h
        .requests(Endpoint::Status)
        .iter()
        .filter(|r| r.response_status == 403)
        .count();
    assert!(refused >= 3, "{refused}");
    assert!(agent.log().contains("DROP TABLE hosts"), "{}", agent.log());
    let r = rows(&h);
    let switch = r.iter().find(|r| r.0 == "switch").unwrap();
    assert_eq!(switch.1, "error", "{r:#?}");
    assert!(switch.2.contains("HTTP 403, 3 time(s)"), "{r:#?}");
    // Not stuck: the next command reports normally.
    h.dash.force_command(HOST, "pull");
    assert!(h.wait_status(T, "Pull"), "{:?}", h.statuses());
}

/// A proxy that blocks the /status path (404) while /register works refuses every report
/// whatever it says: nothing is withheld or dropped; the reports wait and arrive once the path
/// is open again.
#[test]
fn blocked_status_path_keeps_reports_until_it_opens() {
    let mut h = Harness::new();
    h.legacy_repo();
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash.set_mode(Mode::EndpointStatus(Endpoint::Status, 404));
    h.dash.force_command(HOST, "pull");
    assert!(
        agent.wait_log(T, "command pull finished"),
        "{}",
        agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || h
            .requests(Endpoint::Status)
            .iter()
            .filter(|r| r.response_status == 404)
            .count()
            >= 4),
        "{}",
        agent.log()
    );
    assert!(!agent.log().contains("stand-in"), "{}", agent.log());
    h.dash.set_mode(Mode::Normal);
    assert!(
        h.wait_status(Duration::from_secs(20), "Pull"),
        "{:?}",
        h.statuses()
    );
    assert!(!h.statuses().iter().any(|s| s.contains("withheld")));
}

/// /status refused while /register works, then the other way round: the pending report is
/// retried between failing heartbeats instead of waiting behind them forever.
#[test]
fn pending_report_is_retried_while_heartbeats_fail() {
    let mut h = Harness::new();
    h.legacy_repo();
    let _agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"));
    h.dash.set_mode(Mode::EndpointStatus(Endpoint::Status, 500));
    h.dash.force_command(HOST, "pull");
    assert!(wait_until(T, || h
        .requests(Endpoint::Status)
        .iter()
        .any(|r| r.response_status == 500)));
    h.dash.set_mode(Mode::Status(500));
    std::thread::sleep(Duration::from_secs(3));
    h.dash
        .set_mode(Mode::EndpointStatus(Endpoint::Register, 500));
    assert!(
        h.wait_status(Duration::from_secs(15), "Pull"),
        "{:?}",
        h.statuses()
    );
}
