//! The command slot, delivery, command_log and the status / test-progress rules (§3, §4).

use std::time::{Duration, SystemTime};

use fake_dashboard::QueueError;
use serde_json::json;

use crate::util::{Agent, fake_with, seen_host};

#[test]
fn first_register_does_not_make_the_host_seen() {
    let dash = fake_with(|_| {});
    let agent = Agent::new(&dash);
    agent.register("h");
    let row = dash.host("h").unwrap();
    assert_eq!((row.last_seen, row.status.as_str()), (None, "ok"));
    assert_eq!(dash.queue_command("h", "pull"), Err(QueueError::NeverSeen));
    agent.register("h");
    assert!(dash.host("h").unwrap().last_seen.is_some());
    dash.queue_command("h", "pull").unwrap();
}

#[test]
fn single_slot_is_overwritten_and_cleared_on_delivery() {
    let dash = fake_with(|_| {});
    let agent = seen_host(&dash, "h");
    dash.queue_command("h", "pull").unwrap();
    dash.queue_command("H", "switch").unwrap();
    assert_eq!(
        dash.host("h").unwrap().pending_command.as_deref(),
        Some("switch")
    );

    let r = agent.register("h").json();
    assert_eq!(r["command"], "switch");
    assert_eq!(dash.host("h").unwrap().pending_command, None);
    assert_eq!(
        agent.register("h").json()["command"],
        json!(null),
        "at-most-once"
    );

    let log = dash.command_log("h");
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].command.as_str(), log[0].status.as_str()),
        ("switch", "running")
    );
    assert_eq!(log[0].completed_at, None);

    dash.queue_command("h", "restart").unwrap();
    assert_eq!(agent.poll("h").json(), json!({"command": "restart"}));
    assert_eq!(dash.command_log("h").len(), 2);
}

#[test]
fn operator_queue_errors_and_stop_and_test() {
    let dash = fake_with(|_| {});
    assert_eq!(
        dash.queue_command("ghost", "pull"),
        Err(QueueError::NotFound)
    );
    assert_eq!(
        dash.queue_command("bad_id", "pull")
            .unwrap_err()
            .http_status(),
        400
    );
    let agent = seen_host(&dash, "h");
    let e = dash.queue_command("h", "update").unwrap_err();
    assert_eq!(e.http_status(), 422);

    dash.set_last_seen("h", Some(SystemTime::now() - Duration::from_secs(11 * 60)));
    let e = dash.queue_command("h", "pull").unwrap_err();
    assert_eq!(e, QueueError::Offline { minutes: 11 });
    assert_eq!(e.to_string(), "Host is offline (last seen 11 minutes ago)");
    assert_eq!(e.http_status(), 409);
    agent.poll("h");

    dash.queue_command("h", "test").unwrap();
    let row = dash.host("h").unwrap();
    assert!(row.test_running);
    assert_eq!(
        (row.test_current, row.test_total, row.test_result),
        (0, 0, None)
    );
    dash.queue_command("h", "stop").unwrap();
    let row = dash.host("h").unwrap();
    assert_eq!((row.pending_command, row.test_running), (None, false));
    assert_eq!(
        agent.register("h").json()["command"],
        json!(null),
        "stop never reaches the agent"
    );
}

#[test]
fn force_command_reaches_never_seen_hosts_with_any_name() {
    let dash = fake_with(|_| {});
    dash.force_command("Fresh", "update");
    let row = dash.host("fresh").unwrap();
    assert_eq!(
        (row.last_seen, row.pending_command.as_deref()),
        (None, Some("update"))
    );
    let r = Agent::new(&dash).register("fresh").json();
    assert_eq!(r["command"], "update");
    assert!(r["agent_token"].is_string());
}

#[test]
fn status_closes_the_newest_open_log_row_and_cleans_output() {
    let dash = fake_with(|_| {});
    let agent = seen_host(&dash, "h");
    dash.force_command("h", "pull");
    agent.register("h");
    std::thread::sleep(Duration::from_millis(5));
    dash.force_command("h", "switch");
    agent.register("h");

    let out = "\u{2705} T01\tok\r\n\u{1b}[31mred\u{1b}[0m caf\u{e9}";
    let r = agent.status(
        "h",
        &json!({"status": "ok", "current_generation": "abc", "output": out}),
    );
    assert_eq!((r.status, r.json()), (200, json!({"status": "updated"})));
    let log = dash.command_log("h");
    assert_eq!(log[0].completed_at, None, "older row stays open");
    assert_eq!(log[1].status, "ok");
    assert_eq!(log[1].output.as_deref(), Some(" T01ok\n[31mred[0m caf"));

    agent.status(
        "h",
        &json!({"status": "error", "output": "Pull failed: boom\nmore"}),
    );
    let log = dash.command_log("h");
    assert_eq!(
        (log[0].status.as_str(), log[0].output.as_deref()),
        ("error", Some("Pull failed: boom\nmore"))
    );
    let row = dash.host("h").unwrap();
    assert_eq!(row.status, "error");
    assert_eq!(row.comment.as_deref(), Some("Pull failed: boom"));
    assert_eq!(
        row.current_generation.as_deref(),
        Some("abc"),
        "null keeps the generation"
    );

    // A third report closes nothing; a heartbeat resets the status to ok.
    agent.status(
        "h",
        &json!({"status": "ok", "output": "Already up to date."}),
    );
    assert_eq!(dash.command_log("h").len(), 2);
    assert_eq!(
        dash.host("h").unwrap().comment.as_deref(),
        Some("Already up to date")
    );
    agent.status("h", &json!({"status": "error", "output": "x"}));
    agent.register("h");
    assert_eq!(dash.host("h").unwrap().status, "ok");
}

#[test]
fn status_and_progress_for_unknown_hosts_are_200_without_rows() {
    let dash = fake_with(|_| {});
    let agent = Agent::new(&dash);
    assert_eq!(agent.status("ghost", &json!({"status": "ok"})).status, 200);
    assert_eq!(
        agent
            .post("ghost", "test-progress", &json!({"current": 0, "total": 0}))
            .status,
        200
    );
    assert!(dash.host("ghost").is_none());
}

#[test]
fn finished_test_progress_clears_the_pending_slot() {
    let dash = fake_with(|_| {});
    let agent = seen_host(&dash, "h");
    dash.queue_command("h", "test").unwrap();
    assert_eq!(agent.register("h").json()["command"], "test");
    agent.post(
        "h",
        "test-progress",
        &json!({"current": 1, "total": 3, "passed": 0}),
    );
    let row = dash.host("h").unwrap();
    assert_eq!(
        (row.test_running, row.test_current, row.test_total),
        (true, 1, 3)
    );

    dash.queue_command("h", "pull").unwrap();
    let done = json!({"current": 3, "total": 3, "passed": 2, "running": false,
                      "result": "2/3 pass, 1 fail", "comment": "T02 failed"});
    assert_eq!(agent.post("h", "test-progress", &done).status, 200);
    let row = dash.host("h").unwrap();
    assert_eq!(
        row.pending_command, None,
        "[bug] the queued pull is dropped"
    );
    assert!(!row.test_running);
    assert_eq!(row.test_status.as_deref(), Some("2/3 passed"));
    assert_eq!(row.test_result.as_deref(), Some("2/3 pass, 1 fail"));
    assert_eq!(row.comment.as_deref(), Some("T02 failed"));
    assert!(row.last_audit.is_some());
}

#[test]
fn poll_auto_registers_a_seen_host() {
    let dash = fake_with(|_| {});
    let agent = Agent::new(&dash);
    agent.poll("PollHost");
    let row = dash.host("pollhost").unwrap();
    assert!(row.last_seen.is_some());
    assert_eq!(
        (
            row.hostname.as_str(),
            row.host_type.as_str(),
            row.poll_interval
        ),
        ("pollhost", "nixos", 30)
    );
    dash.queue_command("pollhost", "pull").unwrap();
}

#[test]
fn register_update_rules() {
    let dash = fake_with(|_| {});
    let agent = seen_host(&dash, "h");
    let full = json!({"hostname": "H", "host_type": "macos", "location": null, "criticality": "high",
                      "metrics": {"cpu": 5}, "agent_version": null});
    agent.post("h", "register", &full);
    let row = dash.host("h").unwrap();
    assert_eq!(row.host_type, "macos");
    assert_eq!(
        row.location.as_deref(),
        Some("home"),
        "null keeps the old value"
    );
    assert_eq!(
        row.criticality.as_deref(),
        Some("low"),
        "criticality is insert-only"
    );
    assert_eq!(
        row.current_generation, None,
        "omitted generation overwrites with NULL"
    );
    assert_eq!(row.agent_version.as_deref(), Some("2.0.0"));
    assert_eq!(row.metrics, Some(json!({"cpu": 5})));
    agent.post(
        "h",
        "register",
        &json!({"hostname": "h", "host_type": "nixos", "metrics": {}}),
    );
    assert_eq!(
        dash.host("h").unwrap().metrics,
        Some(json!({"cpu": 5})),
        "{{}} keeps the old metrics"
    );
}
