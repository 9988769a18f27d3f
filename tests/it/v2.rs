//! The real agent against the fake v2 (WebSocket) dashboard: one test per promise of the v2
//! link (issue 9): choosing the protocol, connection life (auth, keepalive, dead peers,
//! reconnect), duplicates across hosts, every command the v2 dashboard sends, live output with
//! bounds, and nothing lost across outages, kills and switches.

use std::fs;
use std::time::{Duration, Instant};

use fake_dashboard::v2::{DropHow, FakeV2, Frame, V2Options};

use crate::support::{HOST, Harness, Repos, wait_until, write_executable};

const T: Duration = Duration::from_secs(20);
const TOKEN: &str = "shared-agent-token";

/// A harness whose agent speaks v2 to a fresh fake.
fn v2_harness(options: V2Options) -> (Harness, FakeV2) {
    let mut h = Harness::new();
    let dash = FakeV2::start(options);
    fs::write(&h.token_file, format!("{TOKEN}\n")).unwrap();
    h.set("NIXFLEET_URL", dash.url());
    h.set("NIXFLEET_HTTP_TIMEOUT", "2s");
    (h, dash)
}

fn statuses(dash: &FakeV2) -> Vec<Frame> {
    dash.messages("status")
}

/// Waits for a `status` for `command` and returns it.
fn wait_result(dash: &FakeV2, command: &str) -> Frame {
    let found = dash.wait_for(T, |frames| {
        frames
            .iter()
            .any(|f| f.is_in("status") && f.str_field("command") == Some(command))
    });
    assert!(found, "no status for {command}: {:#?}", statuses(dash));
    statuses(dash)
        .into_iter()
        .find(|f| f.str_field("command") == Some(command))
        .unwrap()
}

fn exit_code(frame: &Frame) -> i64 {
    frame.payload.as_ref().unwrap()["exit_code"]
        .as_i64()
        .unwrap()
}

fn message(frame: &Frame) -> String {
    frame
        .str_field("message")
        .map(str::to_string)
        .unwrap_or_default()
}

fn registered(dash: &FakeV2) -> bool {
    !dash.wait_messages("heartbeat", 1, T).is_empty()
}

#[test]
fn v2_url_registers_with_the_bearer_token_and_heartbeats() {
    let (mut h, dash) = v2_harness(V2Options::default());
    let repos = h.legacy_repo();
    let agent = h.spawn();
    assert!(registered(&dash), "{}", agent.log());
    let register = &dash.messages("register")[0];
    let payload = register.payload.as_ref().unwrap();
    assert_eq!(payload["hostname"], HOST);
    assert_eq!(payload["host_type"], "nixos");
    let head = Repos::head(&repos.checkout);
    assert_eq!(payload["generation"], head[..7]);
    let handshake = &dash.handshakes()[0];
    assert_eq!(handshake.path, "/ws");
    assert_eq!(
        handshake.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(handshake.header("origin"), None);
    // Heartbeats keep coming at the interval (1 s here), and the dashboard sees the host online.
    assert!(dash.wait_messages("heartbeat", 3, T).len() >= 3);
    assert!(dash.host(HOST).is_some_and(|h| h.online));
    assert!(!agent.log().contains(TOKEN), "token in the log");
    // The v1 token cache is not used in v2.
    assert!(!h.state_dir.join("token").exists());
}

#[test]
fn v2_refused_token_backs_off_and_names_the_setting() {
    let (h, dash) = v2_harness(V2Options::default());
    dash.set_behaviour(|b| b.reject_all_tokens = true);
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "refused the token"),
        "no refusal logged: {}",
        agent.log()
    );
    assert!(
        agent.log().contains("NIXFLEET_TOKEN_FILE"),
        "{}",
        agent.log()
    );
    // Backed off: a 401 waits between half the cap and the cap (2 s here), not a tight loop.
    std::thread::sleep(Duration::from_secs(3));
    let attempts = dash.handshakes().len();
    assert!(attempts <= 4, "{attempts} handshakes in ~3 s");
    dash.set_behaviour(|b| b.reject_all_tokens = false);
    assert!(registered(&dash), "{}", agent.log());
    assert!(!agent.log().contains(TOKEN));
}

#[test]
fn v2_dashboard_that_stops_answering_pings_is_left_and_redialed() {
    let (h, dash) = v2_harness(V2Options::default());
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.set_behaviour(|b| b.withhold_pongs = true);
    // A ping goes with a heartbeat once the dashboard was quiet for two pong timeouts (4 s);
    // with no answer in the pong timeout (2 s) the agent redials.
    assert!(
        wait_until(T, || dash.messages("register").len() >= 2),
        "never redialed: {}",
        agent.log()
    );
    assert!(
        agent.log().contains("did not answer a ping"),
        "{}",
        agent.log()
    );
}

#[test]
fn v2_reconnects_after_the_dashboard_drops_and_goes_down() {
    let (h, dash) = v2_harness(V2Options::default());
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.drop_connection(HOST, DropHow::Abrupt);
    assert!(wait_until(T, || dash.messages("register").len() >= 2));
    dash.set_behaviour(|b| b.down = true);
    std::thread::sleep(Duration::from_secs(2));
    dash.set_behaviour(|b| b.down = false);
    assert!(
        wait_until(T, || dash.messages("register").len() >= 3),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains("dashboard link down"),
        "{}",
        agent.log()
    );
}

#[test]
fn v2_two_agents_with_one_hostname_say_so_and_stop_flapping() {
    let (h, dash) = v2_harness(V2Options::default());
    let mut h2 = Harness::new();
    fs::write(&h2.token_file, format!("{TOKEN}\n")).unwrap();
    h2.set("NIXFLEET_URL", dash.url());
    h2.set("NIXFLEET_HTTP_TIMEOUT", "2s");
    let first = h.spawn();
    let second = h2.spawn();
    let said = wait_until(Duration::from_secs(30), || {
        first
            .log()
            .contains("another agent is connected as hostname")
            || second
                .log()
                .contains("another agent is connected as hostname")
    });
    assert!(said, "{}\n----\n{}", first.log(), second.log());
    // Backing off: over 6 s, far fewer registrations than upstream's one per second each.
    let before = dash.messages("register").len();
    std::thread::sleep(Duration::from_secs(6));
    let during = dash.messages("register").len() - before;
    assert!(during <= 8, "{during} registrations in 6 s");
}

fn v2_with_repo() -> (Harness, FakeV2, Repos) {
    let (mut h, dash) = v2_harness(V2Options {
        lifecycle: true,
        ..V2Options::default()
    });
    let repos = h.legacy_repo();
    (h, dash, repos)
}

#[test]
fn v2_commands_pull_test_rollback_refresh_and_unknown_answer_by_name() {
    let (h, dash, repos) = v2_with_repo();
    let calls = h.tmp.path().join("calls");
    h.stand_in("nixos-rebuild", "echo rebuilt \"$@\"");
    write_executable(
        &repos.dev.join("hosts/testhost/tests/T01-ok.sh"),
        "#!/bin/sh\necho fine\n",
    );
    repos.push_commit("tests", &[]);
    let agent = h.spawn();
    assert!(registered(&dash));

    dash.dispatch(HOST, "pull").unwrap();
    let pull = wait_result(&dash, "pull");
    assert_eq!(exit_code(&pull), 0, "{pull:?}\n{}", agent.log());
    assert!(wait_until(T, || dash
        .command_state(HOST)
        .is_some_and(|c| c.finished_at.is_some())));

    dash.dispatch(HOST, "test").unwrap();
    let test = wait_result(&dash, "test");
    assert_eq!(exit_code(&test), 0, "{test:?}");
    assert!(
        dash.messages("output")
            .iter()
            .any(|f| f.str_field("line") == Some("fine") && f.str_field("command") == Some("test")),
        "test output not streamed"
    );
    assert!(!dash.messages("test_progress").is_empty());

    dash.send_command(HOST, "rollback").unwrap();
    let rollback = wait_result(&dash, "rollback");
    assert_eq!(exit_code(&rollback), 0, "{rollback:?}");
    assert_eq!(h.calls("nixos-rebuild"), ["switch --rollback"]);

    dash.send_command(HOST, "refresh-lock").unwrap();
    let lock = wait_result(&dash, "refresh-lock");
    assert!(message(&lock).contains("lock ok"), "{lock:?}");

    dash.send_command(HOST, "check-version").unwrap();
    let version = wait_result(&dash, "check-version");
    assert!(
        message(&version).contains("running=0.1.0 installed=0.1.0"),
        "{version:?}"
    );

    dash.send_command(HOST, "bump-flake").unwrap();
    let unknown = wait_result(&dash, "bump-flake");
    assert_eq!(exit_code(&unknown), 1);
    assert!(message(&unknown).contains("Unknown command"), "{unknown:?}");

    // Exactly one final status per command.
    for name in ["pull", "test", "rollback", "refresh-lock", "check-version"] {
        let n = statuses(&dash)
            .iter()
            .filter(|f| f.str_field("command") == Some(name))
            .count();
        assert_eq!(n, 1, "{name}: {:#?}", statuses(&dash));
    }
    drop(calls);
}

#[test]
fn v2_busy_agent_rejects_then_stop_kills_the_whole_tree() {
    let (h, dash, _repos) = v2_with_repo();
    let pids = h.tmp.path().join("pids");
    // A switch that ignores SIGTERM and leaves a grandchild.
    h.stand_in(
        "nixos-rebuild",
        &format!(
            "trap '' TERM\nsleep 1000 &\necho $! > '{}'\necho building\nwait",
            pids.display()
        ),
    );
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.dispatch(HOST, "switch").unwrap();
    assert!(wait_until(T, || pids.exists()), "{}", agent.log());
    // Busy: anything but stop/restart/reboot is refused with command_rejected.
    dash.send_command(HOST, "pull").unwrap();
    let rejected = dash.wait_messages("command_rejected", 1, T);
    assert_eq!(rejected.len(), 1, "{}", agent.log());
    assert_eq!(rejected[0].str_field("current_command"), Some("switch"));
    // Reboot while busy is refused rather than cutting a switch in half.
    dash.send_command(HOST, "reboot").unwrap();
    let reboot = wait_result(&dash, "reboot");
    assert_eq!(exit_code(&reboot), 1, "{reboot:?}");

    let t = Instant::now();
    dash.send_command(HOST, "stop").unwrap();
    let stop = wait_result(&dash, "stop");
    assert_eq!(exit_code(&stop), 0, "{stop:?}");
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 130, "{switch:?}");
    assert!(
        message(&switch).contains("stopped by the dashboard"),
        "{switch:?}"
    );
    let grandchild: i32 = fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
    // Gone, or a zombie waiting for init to reap it: either way no longer running.
    let gone = wait_until(Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{grandchild}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    });
    assert!(gone, "grandchild {grandchild} survived the stop");
    assert!(t.elapsed() < Duration::from_secs(15));
}

#[test]
fn v2_restart_reports_then_exits_and_reboot_runs_after_delivery() {
    let (h, dash, _repos) = v2_with_repo();
    let mut agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "restart").unwrap();
    let restart = wait_result(&dash, "restart");
    assert_eq!(exit_code(&restart), 0);
    let status = agent.wait_exit(T).expect("agent exits after restart");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    // The socket was closed politely: 1000 "shutdown".
    assert!(
        dash.frames()
            .iter()
            .any(|f| f.close_code == Some(1000) && f.text == "shutdown"),
        "no close frame"
    );

    h.stand_in("systemctl", "exit 0");
    let mut agent = h.spawn();
    assert!(wait_until(T, || dash.messages("register").len() >= 2));
    dash.send_command(HOST, "reboot").unwrap();
    let reboot = wait_result(&dash, "reboot");
    assert_eq!(exit_code(&reboot), 0, "{reboot:?}");
    assert!(agent.wait_exit(T).is_some(), "{}", agent.log());
    assert_eq!(h.calls("systemctl"), ["reboot"], "{}", agent.log());
}

#[test]
fn v2_output_flood_is_streamed_with_bounds_and_the_result_says_what_was_dropped() {
    let (h, dash, repos) = v2_with_repo();
    write_executable(
        &repos.dev.join("hosts/testhost/tests/T01-flood.sh"),
        "#!/bin/sh\nyes \"$(printf 'line %0200d' 0)\" | head -n 20000\nhead -c 2000000 /dev/zero | tr '\\0' x\necho\n",
    );
    repos.push_commit("flood", &[]);
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "pull").unwrap();
    wait_result(&dash, "pull");
    dash.send_command(HOST, "test").unwrap();
    let test = wait_result(&dash, "test");
    let outputs = dash.messages("output");
    assert!(outputs.len() > 100, "{} lines streamed", outputs.len());
    let biggest = outputs.iter().map(|f| f.raw_len).max().unwrap();
    assert!(biggest < 8 * 1024, "an output message of {biggest} bytes");
    // One connection throughout: nothing went over the dashboard's 512 KiB limit.
    assert_eq!(dash.messages("register").len(), 1, "{}", agent.log());
    if outputs.len() < 20_001 {
        assert!(message(&test).contains("not streamed"), "{test:?}");
    }
    let rss = agent.rss_kib().unwrap();
    assert!(rss < 64 * 1024, "RSS {rss} KiB after the flood");
}

#[test]
fn v2_result_made_while_the_dashboard_is_down_is_sent_after_reconnecting() {
    let (h, dash, _repos) = v2_with_repo();
    let gate = h.tmp.path().join("gate");
    h.stand_in(
        "nixos-rebuild",
        &format!(
            "while [ ! -e '{}' ]; do sleep 0.1; done\necho done",
            gate.display()
        ),
    );
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "switch").unwrap();
    assert!(wait_until(T, || !h.calls("nixos-rebuild").is_empty()));
    dash.set_behaviour(|b| b.down = true);
    fs::write(&gate, "").unwrap();
    assert!(
        wait_until(T, || fs::read_to_string(h.state_dir.join("outbox.json"))
            .is_ok_and(|s| s.contains("\"switch\""))),
        "result not kept on disk: {}",
        agent.log()
    );
    dash.set_behaviour(|b| b.down = false);
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 0, "{switch:?}");
}

#[test]
fn v2_successful_switch_registers_again_so_the_dashboard_completes_it() {
    let (h, dash, _repos) = v2_with_repo();
    h.stand_in("nixos-rebuild", "echo switched");
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.dispatch(HOST, "switch").unwrap();
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 0, "{switch:?}");
    assert!(
        wait_until(T, || dash.messages("register").len() >= 2),
        "no second register: {}",
        agent.log()
    );
    // Same connection: a register, not a reconnect, finished it.
    assert_eq!(dash.handshakes().len(), 1);
    let history = dash.command_history(HOST);
    assert!(
        history
            .iter()
            .any(|c| c.op == "switch" && format!("{:?}", c.status) == "Success"),
        "{history:?}"
    );
}

#[test]
fn v2_command_interrupted_by_kill_9_is_reported_by_name_after_restart() {
    let (h, dash, _repos) = v2_with_repo();
    let group = h.tmp.path().join("group");
    h.stand_in(
        "nixos-rebuild",
        &format!("echo $$ > '{}'\nexec sleep 1000", group.display()),
    );
    let mut agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "switch").unwrap();
    assert!(wait_until(T, || group.exists()));
    agent.kill9();
    // kill -9 leaves the in-process switch's group orphaned: the test ends it itself.
    let _cleanup = KillGroupOnDrop(fs::read_to_string(&group).unwrap().trim().parse().unwrap());
    let _agent = h.spawn();
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 1);
    assert!(message(&switch).contains("interrupted"), "{switch:?}");
}

/// SIGKILL to a process group when the test ends, whatever happened.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the stand-in's process group (the runner made it a group leader).
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

#[test]
fn v2_over_tls_with_the_ca_file() {
    let (mut h, dash) = v2_harness(V2Options {
        tls: true,
        ..V2Options::default()
    });
    let ca = h.tmp.path().join("ca.pem");
    fs::write(&ca, dash.ca_pem().unwrap()).unwrap();
    h.set("NIXFLEET_CA_FILE", ca.display().to_string());
    h.unset("NIXFLEET_ALLOW_INSECURE_HTTP");
    assert!(dash.url().starts_with("wss://"));
    let agent = h.spawn();
    assert!(registered(&dash), "{}", agent.log());
}

#[test]
fn v2_switch_outside_the_agent_survives_kill_9_and_is_reported_once_by_the_next_instance() {
    let (mut h, dash, _repos) = v2_with_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "session");
    let done = h.tmp.path().join("switch-done");
    h.stand_in(
        "nixos-rebuild",
        &format!("sleep 3; touch '{}'; echo activated", done.display()),
    );
    let mut agent = h.spawn();
    assert!(registered(&dash));
    dash.dispatch(HOST, "switch").unwrap();
    assert!(
        agent.wait_log(T, "detached from the agent"),
        "{}",
        agent.log()
    );
    agent.kill9();
    assert!(
        wait_until(T, || done.exists()),
        "switch died with the agent"
    );
    let next = h.spawn();
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 0, "{switch:?}\n{}", next.log());
    assert!(message(&switch).contains("activated"), "{switch:?}");
    std::thread::sleep(Duration::from_secs(2));
    let n = statuses(&dash)
        .iter()
        .filter(|f| f.str_field("command") == Some("switch"))
        .count();
    assert_eq!(n, 1, "{:#?}", statuses(&dash));
}

#[test]
fn v2_switch_that_installs_a_new_agent_reports_exits_10_and_the_next_instance_registers() {
    let (mut h, dash, _repos) = v2_with_repo();
    let installed = h.tmp.path().join("installed-nixfleet-agent");
    fs::copy(env!("CARGO_BIN_EXE_nixfleet-agent"), &installed).unwrap();
    h.set("NIXFLEET_AGENT_PATH", installed.display().to_string());
    h.stand_in("nixos-rebuild", "echo switched");
    let mut agent = h.spawn();
    assert!(registered(&dash));
    let t = Instant::now();
    dash.dispatch(HOST, "switch").unwrap();
    let status = agent.wait_exit(T).expect("agent exits after the switch");
    assert_eq!(status.code(), Some(10), "{}", agent.log());
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 0);
    // It kept the socket open a moment after the result, then closed it politely.
    let close = dash
        .frames()
        .into_iter()
        .find(|f| f.close_code == Some(1000))
        .expect("a close frame");
    assert!(close.at.duration_since(switch.at) >= Duration::from_millis(900));
    assert!(t.elapsed() < T);
    // The supervisor's restart: the new instance registers and the dashboard completes it.
    let _next = h.spawn();
    assert!(wait_until(T, || dash.command_history(HOST).iter().any(
        |c| c.op == "switch" && format!("{:?}", c.status) == "Success"
    )));
}

#[test]
fn v2_message_over_the_dashboards_size_limit_costs_a_reconnect_not_the_result() {
    let (h, dash, repos) = v2_with_repo();
    // A dashboard with a small limit, so the agent's 4 KiB lines are over it.
    dash.set_options(|o| o.max_message = 2048);
    write_executable(
        &repos.dev.join("hosts/testhost/tests/T01-wide.sh"),
        "#!/bin/sh\nprintf '%03000d\\n' 0\necho done\n",
    );
    repos.push_commit("wide", &[]);
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "pull").unwrap();
    wait_result(&dash, "pull");
    dash.send_command(HOST, "test").unwrap();
    assert!(
        wait_until(T, || dash
            .frames()
            .iter()
            .any(|f| f.close_code == Some(1009))),
        "no 1009: {}",
        agent.log()
    );
    let test = wait_result(&dash, "test");
    assert_eq!(exit_code(&test), 0, "{test:?}");
    assert!(dash.messages("register").len() >= 2, "{}", agent.log());
}

#[test]
fn v2_stop_ends_a_switch_running_outside_the_agent_and_reports_it() {
    let (mut h, dash, _repos) = v2_with_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "session");
    let pids = h.tmp.path().join("pids");
    h.stand_in(
        "nixos-rebuild",
        &format!("echo $$ > '{}'\nsleep 1000", pids.display()),
    );
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "switch").unwrap();
    assert!(
        agent.wait_log(T, "detached from the agent"),
        "{}",
        agent.log()
    );
    assert!(wait_until(T, || pids.exists()));
    dash.send_command(HOST, "stop").unwrap();
    let stop = wait_result(&dash, "stop");
    assert_eq!(exit_code(&stop), 0, "{stop:?}");
    let switch = wait_result(&dash, "switch");
    assert_eq!(exit_code(&switch), 1, "{switch:?}\n{}", agent.log());
    assert!(message(&switch).contains("stopped"), "{switch:?}");
    let rebuild: i32 = fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
    let gone = wait_until(Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{rebuild}/stat")).map_or(true, |stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    });
    assert!(gone, "the detached switch survived the stop");
}

#[test]
fn v2_result_is_followed_by_a_heartbeat_with_the_compartments_and_output_keeps_its_command() {
    let (mut h, dash, repos) = v2_with_repo();
    // A long interval: only the heartbeat that follows each result can finish it quickly.
    h.set("NIXFLEET_INTERVAL", "30");
    h.stand_in("nixos-rebuild", "echo building; echo activating");
    write_executable(
        &repos.dev.join("hosts/testhost/tests/T01-fail.sh"),
        "#!/bin/sh\necho checking\nexit 3\n",
    );
    repos.push_commit("failing test", &[]);
    let agent = h.spawn();
    assert!(registered(&dash));
    let finished = |op: &str| {
        dash.command_history(HOST)
            .iter()
            .any(|c| c.op == op && c.finished_at.is_some())
    };
    let t = Instant::now();
    dash.dispatch(HOST, "pull").unwrap();
    assert!(wait_until(T, || finished("pull")), "{}", agent.log());
    dash.dispatch(HOST, "test").unwrap();
    assert!(wait_until(T, || finished("test")), "{}", agent.log());
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "results waited for the 30 s heartbeat"
    );
    let test = wait_result(&dash, "test");
    assert_eq!(exit_code(&test), 3, "the script's own exit code: {test:?}");
    dash.send_command(HOST, "switch").unwrap();
    wait_result(&dash, "switch");
    // The heartbeat after the switch's result carries the compartments.
    assert!(wait_until(T, || {
        dash.messages("heartbeat").last().is_some_and(|beat| {
            let checks = &beat.payload.as_ref().unwrap()["update_status"];
            checks["system"]["status"] == "ok" && checks["tests"]["status"] == "outdated"
        })
    }));
    let beat = dash.messages("heartbeat").pop().unwrap();
    let checks = &beat.payload.as_ref().unwrap()["update_status"];
    assert_eq!(checks["lock"]["status"], "unknown", "{checks}");
    assert!(
        checks["system"]["checked_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    // Every line of a command, its last ones included, names that command.
    for frame in dash.messages("output") {
        let line = frame.str_field("line").unwrap_or_default();
        if !line.starts_with("[nixfleet-agent]") {
            assert_ne!(frame.str_field("command"), Some(""), "{frame:?}");
        }
    }
    assert!(
        dash.messages("output")
            .iter()
            .any(|f| f.str_field("line") == Some("activating")
                && f.str_field("command") == Some("switch"))
    );
    // The dashboard's Kill button sends `kill`: a stop, answered under its own name.
    dash.send_command(HOST, "kill").unwrap();
    let kill = wait_result(&dash, "kill");
    assert_eq!(exit_code(&kill), 1);
    assert!(message(&kill).contains("No command running"), "{kill:?}");
}

#[test]
fn v2_pull_switch_with_a_detached_switch_sends_one_result() {
    let (mut h, dash, _repos) = v2_with_repo();
    h.set("NIXFLEET_SWITCH_ISOLATION", "session");
    h.stand_in("nixos-rebuild", "echo activated");
    let agent = h.spawn();
    assert!(registered(&dash));
    dash.send_command(HOST, "pull-switch").unwrap();
    let result = wait_result(&dash, "pull-switch");
    assert!(
        message(&result).contains("activated"),
        "{result:?}\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    let n = statuses(&dash)
        .iter()
        .filter(|f| f.str_field("command") == Some("pull-switch"))
        .count();
    assert_eq!(n, 1, "{:#?}", statuses(&dash));
    // The pull's own line went out as output instead.
    assert!(
        dash.messages("output")
            .iter()
            .any(|f| f.str_field("line").is_some_and(|l| l.contains("Pull")))
    );
}
