//! §7.2 / §7.6: how the fake's lifecycle mode tracks and completes commands.

use std::time::Duration;

use fake_dashboard::v2::{CommandStatus, DropHow, OpTimeouts};
use serde_json::json;

use super::util::*;

const WAIT: Duration = Duration::from_secs(5);

fn status_of(fake: &fake_dashboard::v2::FakeV2, host: &str) -> Option<CommandStatus> {
    fake.command_state(host).map(|c| c.status)
}

#[tokio::test]
async fn a_successful_pull_completes_on_the_next_heartbeat_after_its_post_check() {
    let fake = fake(|o| o.lifecycle = true);
    let mut ws = agent(&fake, "web1").await;
    fake.dispatch("web1", "pull").unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "command", "payload": {"command": "pull"}})
    );
    assert_eq!(status_of(&fake, "web1"), Some(CommandStatus::Executing));
    assert_eq!(
        fake.host("web1").unwrap().pending_command.as_deref(),
        Some("pull")
    );
    assert_eq!(
        fake.dispatch("web1", "test").unwrap_err().code,
        "command_pending"
    );

    send(&mut ws, status_msg("pull", 0)).await;
    fake.wait_messages("status", 1, WAIT);
    let c = fake.command_state("web1").unwrap();
    assert_eq!(
        (c.status, c.awaiting_heartbeat),
        (CommandStatus::Executing, true),
        "held until a heartbeat"
    );

    send(&mut ws, heartbeat_msg("ok")).await;
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::Success)));
    assert_eq!(fake.host("web1").unwrap().pending_command, None);
    let hist = fake.command_history("web1");
    assert_eq!(
        (hist.len(), hist[0].op.as_str(), hist[0].exit_code),
        (1, "pull", Some(0))
    );
}

#[tokio::test]
async fn a_pull_whose_lock_stays_outdated_ends_partial() {
    let fake = fake(|o| o.lifecycle = true);
    let mut ws = agent(&fake, "web1").await;
    fake.send_command("web1", "pull").unwrap();
    send(&mut ws, status_msg("pull", 0)).await;
    send(&mut ws, heartbeat_msg("outdated")).await;
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::Partial)));
}

#[tokio::test]
async fn status_is_matched_by_name_and_a_failure_is_error() {
    let fake = fake(|o| o.lifecycle = true);
    let mut ws = agent(&fake, "web1").await;
    fake.send_command("web1", "test").unwrap();
    send(&mut ws, status_msg("pull", 1)).await;
    fake.wait_messages("status", 1, WAIT);
    assert_eq!(
        status_of(&fake, "web1"),
        Some(CommandStatus::Executing),
        "other name ignored"
    );
    send(
        &mut ws,
        json!({"type": "status", "payload": {"status": "error", "command": "test", "exit_code": 1,
               "message": "command failed"}})
        .to_string(),
    )
    .await;
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1") == Some(CommandStatus::Error)));
    let c = fake.command_state("web1").unwrap();
    assert_eq!(
        (c.exit_code, c.message.as_deref()),
        (Some(1), Some("command failed"))
    );
    assert_eq!(
        fake.host("web1").unwrap().tests_status.unwrap()["status"],
        "error"
    );
}

#[tokio::test]
async fn a_switch_awaits_the_next_register() {
    let fake = fake(|o| o.lifecycle = true);
    let mut ws = agent(&fake, "web1").await;
    fake.dispatch("web1", "switch").unwrap();
    send(&mut ws, status_msg("switch", 0)).await;
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::AwaitingReconnect)));
    assert_eq!(
        fake.host("web1").unwrap().system_status.unwrap()["status"],
        "ok"
    );
    drop(ws);
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));
    let _ws = agent(&fake, "web1").await;
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::Success)));
}

#[tokio::test]
async fn a_disconnect_during_a_switch_assumes_success_then_times_out_without_register() {
    let fake = fake(|o| {
        o.lifecycle = true;
        o.reconnect_window = Duration::from_millis(300);
    });
    let ws = agent(&fake, "web1").await;
    fake.send_command("web1", "switch").unwrap();
    fake.drop_connection("web1", DropHow::Abrupt);
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::AwaitingReconnect)));
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::Timeout)));
    let c = fake.command_state("web1").unwrap();
    assert_eq!(
        c.message.as_deref(),
        Some("Agent did not reconnect in time")
    );
    drop(ws);
}

#[tokio::test]
async fn command_rejected_ends_the_tracked_command_as_error() {
    let fake = fake(|o| o.lifecycle = true);
    let mut ws = agent(&fake, "web1").await;
    fake.send_command("web1", "switch").unwrap();
    // Untracked while one is tracked (so the agent can be made to reject it).
    fake.send_command("web1", "pull").unwrap();
    send(
        &mut ws,
        json!({"type": "command_rejected", "payload": {"reason": "command already running",
               "current_command": "switch", "current_pid": 4242}})
        .to_string(),
    )
    .await;
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1") == Some(CommandStatus::Error)));
    let c = fake.command_state("web1").unwrap();
    assert_eq!(c.op, "switch");
    assert_eq!(
        c.message.as_deref(),
        Some("Agent rejected command: command already running")
    );
    assert_eq!(fake.host("web1").unwrap().pending_command, None);
}

#[tokio::test]
async fn dispatch_pre_checks_offline_busy_and_no_pending() {
    let fake = fake(|o| o.lifecycle = true);
    assert_eq!(fake.dispatch("ghost", "pull").unwrap_err().code, "offline");
    let mut ws = agent(&fake, "web1").await;
    assert_eq!(
        fake.dispatch("web1", "stop").unwrap_err().code,
        "no_pending"
    );
    fake.dispatch("web1", "refresh-lock").unwrap();
    // A register mid-command clears pending_command (Q9) while the command stays tracked.
    send(&mut ws, register_msg("web1")).await;
    fake.wait_messages("register", 2, WAIT);
    assert_eq!(fake.host("web1").unwrap().pending_command, None);
    assert_eq!(
        fake.dispatch("web1", "pull").unwrap_err().code,
        "command_pending"
    );
    fake.drop_connection("web1", DropHow::Abrupt);
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));
    assert_eq!(
        fake.dispatch("web1", "switch").unwrap_err().code,
        "command_pending"
    );
    assert_eq!(
        status_of(&fake, "web1"),
        Some(CommandStatus::Executing),
        "not a switch: no §7.6.5"
    );
    drop(ws);
}

#[tokio::test]
async fn timers_warn_then_time_out_and_timeout_actions_apply() {
    let fake = fake(|o| {
        o.lifecycle = true;
        o.op_timeouts = Some(OpTimeouts {
            warning: Duration::from_millis(100),
            hard: Duration::from_millis(300),
        });
    });
    let _ws = agent(&fake, "web1").await;
    fake.send_command("web1", "test").unwrap();
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::RunningWarning)));
    assert!(fake.wait_until(WAIT, |f| status_of(f, "web1")
        == Some(CommandStatus::TimeoutPending)));
    assert_eq!(
        fake.dispatch("web1", "pull").unwrap_err().code,
        "command_pending"
    );
    assert!(fake.timeout_action("web1", "wait"));
    assert_eq!(status_of(&fake, "web1"), Some(CommandStatus::Executing));
    assert!(fake.timeout_action("web1", "ignore"));
    assert_eq!(status_of(&fake, "web1"), Some(CommandStatus::Skipped));
    fake.dispatch("web1", "pull").unwrap();
}

#[tokio::test]
async fn a_send_failure_is_tracked_as_error() {
    let fake = fake(|o| o.lifecycle = true);
    let ws = agent(&fake, "web1").await;
    drop(ws);
    assert!(fake.wait_until(WAIT, |f| !f.host("web1").unwrap().online));
    // dispatch refuses an offline host before sending; send_command tracks the failure.
    assert_eq!(fake.dispatch("web1", "pull").unwrap_err().code, "offline");
    assert!(fake.send_command("web1", "pull").is_err());
    let c = fake.command_state("web1").unwrap();
    assert_eq!(
        (c.status, c.code.as_deref()),
        (CommandStatus::Error, Some("send_failed"))
    );
}
