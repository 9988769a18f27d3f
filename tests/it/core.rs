//! The agent's basic job: register with the host's facts, report start, run delivered commands
//! and report them on the right dashboard log row, stop cleanly.

use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(10);

#[test]
fn registers_with_host_facts_and_reports_start() {
    let mut h = Harness::new();
    let repos = h.legacy_repo();
    h.set("NIXFLEET_LOCATION", "cloud");
    h.set("NIXFLEET_DEVICE_TYPE", "laptop");
    h.set("NIXFLEET_THEME_COLOR", "#112233");
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started (0.1.0)"), "{}", agent.log());
    assert!(wait_until(T, || h.requests(Endpoint::Register).len() >= 2));
    let register = h.requests(Endpoint::Register).pop().unwrap();
    let body = register.body.unwrap();
    let head = Repos::head(&repos.checkout);
    assert_eq!(register.host_id.as_deref(), Some(HOST));
    assert_eq!(body["hostname"], HOST);
    assert_eq!(body["host_type"], "nixos");
    assert_eq!(body["location"], "cloud");
    assert_eq!(body["device_type"], "laptop");
    assert_eq!(body["theme_color"], "#112233");
    assert_eq!(body["current_generation"], head.as_str());
    assert_eq!(body["config_repo"], repos.checkout.to_str().unwrap());
    assert_eq!(body["poll_interval"], 1);
    assert_eq!(body["agent_version"], "0.1.0");
    assert_eq!(body["os_name"], "Linux");
    let metrics = &body["metrics"];
    assert!(metrics["ram"].as_f64().unwrap() > 0.0, "{metrics}");
    assert!(metrics["load"].is_string(), "{metrics}");
    assert_eq!(register.response_status, 200);
    let row = h.dash.host(HOST).expect("host row");
    assert_eq!(row.current_generation.as_deref(), Some(head.as_str()));
    // The start report came before any heartbeat could deliver a command.
    let first_status = h.requests(Endpoint::Status)[0].id;
    assert!(first_status < h.requests(Endpoint::Register)[0].id);
}

#[test]
fn legacy_pull_reports_and_refreshes_generation() {
    let mut h = Harness::new();
    let repos = h.legacy_repo();
    let _agent = h.spawn();
    assert!(wait_until(T, || h.requests(Endpoint::Register).len() >= 2));
    let new_head = repos.push_commit("second", &[("README", "hello\n")]);
    h.dash.force_command(HOST, "pull");
    assert!(h.wait_status(T, "Pull: "), "{:?}", h.statuses());
    assert_eq!(Repos::head(&repos.checkout), new_head);
    let log = h.dash.command_log(HOST);
    let pull = log.iter().find(|r| r.command == "pull").expect("pull row");
    assert_eq!(pull.status, "ok");
    assert!(pull.output.as_deref().unwrap().contains("Pull: "));
    // The next heartbeat carries the new generation.
    assert!(wait_until(T, || {
        h.requests(Endpoint::Register)
            .last()
            .unwrap()
            .body
            .as_ref()
            .unwrap()["current_generation"]
            == new_head.as_str()
    }));
    let status = h
        .status_bodies()
        .into_iter()
        .find(|b| b["output"].as_str().unwrap_or("").starts_with("Pull: "));
    assert_eq!(status.unwrap()["current_generation"], new_head.as_str());
}

#[test]
fn isolated_mode_clones_then_pull_resets_to_origin() {
    let mut h = Harness::new();
    let (repos, dir) = h.isolated_repo();
    let agent = h.spawn();
    assert!(
        wait_until(T, || dir.join(".git").exists()),
        "{}",
        agent.log()
    );
    // A local change that would make `git pull` conflict: isolated mode resets it away.
    std::fs::write(dir.join("flake.nix"), "local edit\n").unwrap();
    let head = repos.push_commit("upstream", &[("flake.nix", "{ upstream = 1; }\n")]);
    h.dash.force_command(HOST, "pull");
    assert!(
        h.wait_status(T, "Pull: Reset to origin/main"),
        "{:?}",
        h.statuses()
    );
    assert_eq!(Repos::head(&dir), head);
    assert_eq!(
        std::fs::read_to_string(dir.join("flake.nix")).unwrap(),
        "{ upstream = 1; }\n"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn unknown_command_is_an_error_report() {
    let h = Harness::new();
    let _agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    h.dash.force_command(HOST, "frobnicate");
    assert!(h.wait_status(T, "Unknown command: frobnicate"));
    let row = h.dash.command_log(HOST).pop().unwrap();
    assert_eq!(row.status, "error");
}

#[test]
fn restart_reports_then_exits_zero() {
    let h = Harness::new();
    let mut agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    h.dash.force_command(HOST, "restart");
    let status = agent.wait_exit(T).expect("agent exits");
    assert_eq!(status.code(), Some(0));
    assert!(h.statuses().iter().any(|s| s == "Agent restarting..."));
}

#[test]
fn config_errors_exit_78_and_name_the_setting() {
    let mut h = Harness::new();
    h.set("NIXFLEET_INTERVAL", "0");
    let (code, log) = h.run_to_exit(&[], T);
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("NIXFLEET_INTERVAL"), "{log}");

    let mut h = Harness::new();
    h.set("NIXFLEET_URL", "http://127.0.0.1:1");
    h.unset("NIXFLEET_ALLOW_INSECURE_HTTP");
    let (code, log) = h.run_to_exit(&[], T);
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("NIXFLEET_ALLOW_INSECURE_HTTP"), "{log}");

    let mut h = Harness::new();
    h.set("NIXFLEET_TOKEN_FILE", "/nonexistent/token");
    let (code, log) = h.run_to_exit(&[], T);
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains("/nonexistent/token"), "{log}");
    assert!(
        h.dash.requests().is_empty(),
        "nothing is sent with a broken config"
    );
}

#[test]
fn check_config_prints_settings_without_the_token() {
    let h = Harness::new();
    let (code, out) = h.run_to_exit(&["check-config"], T);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("hostname = testhost"), "{out}");
    assert!(!out.contains(SHARED_TOKEN), "{out}");
}

#[test]
fn version_flag_prints_the_version() {
    let h = Harness::new();
    let (code, out) = h.run_to_exit(&["--version"], T);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "nixfleet-agent 0.1.0");
}

#[test]
fn sigterm_during_a_command_reports_and_exits_zero() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.set("NIXFLEET_SHUTDOWN_GRACE", "1");
    h.set("NIXFLEET_KILL_GRACE", "1");
    h.stand_in("nixos-rebuild", "sleep 60");
    let mut agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    h.dash.force_command(HOST, "switch");
    assert!(agent.wait_log(T, "switch: Switch"), "{}", agent.log());
    let started = std::time::Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(T).expect("agent exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert!(
        h.statuses()
            .iter()
            .any(|s| s.contains("Switch failed: Switch interrupted: the agent is shutting down")),
        "{:?}",
        h.statuses()
    );
    let row = h.dash.command_log(HOST).pop().unwrap();
    assert_eq!(row.command, "switch");
    assert_eq!(row.status, "error");
}
