//! Operating a fleet (issue 11): the default switch isolation without systemd, restart causes,
//! changes made by others, `nixfleet-agent status`, reboot needed, the metrics file.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(15);

/// A PATH with only the tools these tests' stand-ins use, and none of systemd's: what a
/// container or another init system offers. `auto` isolation must not find `systemd-run`.
fn path_without_systemd(h: &Harness) -> String {
    let tools = h.tmp.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    for tool in [
        "sh", "sleep", "touch", "env", "printf", "cat", "git", "rm", "ln",
    ] {
        let found = ["/usr/bin", "/bin", "/usr/local/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not found"));
        let link = tools.join(tool);
        if !link.exists() {
            std::os::unix::fs::symlink(found, link).unwrap();
        }
    }
    format!("{}:{}", h.bin_dir.display(), tools.display())
}

#[test]
fn auto_isolation_without_systemd_detaches_the_switch_so_kill_9_still_reports_its_result() {
    let mut h = Harness::new();
    h.legacy_repo();
    let path = path_without_systemd(&h);
    h.set("PATH", path);
    h.set("NIXFLEET_SWITCH_ISOLATION", "auto");
    let done = h.tmp.path().join("switch-done");
    h.stand_in(
        "nixos-rebuild",
        &format!("sleep 3; touch '{}'; echo activated", done.display()),
    );
    let mut agent = h.spawn();
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    h.dash.force_command(HOST, "switch");
    assert!(
        agent.wait_log(T, "switch runs in its own session"),
        "auto did not pick session isolation: {}",
        agent.log()
    );
    agent.kill9();
    assert!(
        wait_until(T, || done.exists()),
        "the switch died with the agent"
    );
    let _agent = h.spawn();
    assert!(h.wait_status(T, "Switch: activated"), "{:?}", h.statuses());
    std::thread::sleep(Duration::from_secs(2));
    let reports: Vec<_> = h
        .statuses()
        .into_iter()
        .filter(|s| s.starts_with("Switch") || s.contains("interrupted"))
        .collect();
    assert_eq!(reports, vec!["Switch: activated".to_string()]);
}

/// Runs `nixfleet-agent status [--json]` with the harness's settings: (exit code, stdout).
fn status(h: &Harness, json: bool) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
    cmd.arg("status")
        .env_clear()
        .envs(h.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("status runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The "Agent started (...): <cause>" reports, in order.
fn start_reports(h: &Harness) -> Vec<String> {
    h.statuses()
        .into_iter()
        .filter(|s| s.starts_with("Agent started"))
        .collect()
}

fn wait_starts(h: &Harness, n: usize) -> Vec<String> {
    wait_until(T, || start_reports(h).len() >= n);
    start_reports(h)
}

#[test]
fn the_start_report_names_the_cause_first_stop_restart_kill_reboot() {
    let h = Harness::new();
    let mut agent = h.spawn();
    assert_eq!(
        wait_starts(&h, 1),
        vec!["Agent started (0.1.0): first start"]
    );
    h.dash.clear_requests();

    // SIGTERM (systemctl stop/restart, launchctl kickstart -k).
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(T).and_then(|s| s.code()), Some(0));
    let mut agent = h.spawn();
    let starts = wait_starts(&h, 1);
    assert!(
        starts[0]
            .ends_with("after a stop or restart by the operator or the service manager (SIGTERM)"),
        "{starts:?}"
    );
    assert!(h.wait_delivered(T, "Agent started"));
    h.dash.clear_requests();

    // The dashboard's restart command.
    h.dash.force_command(HOST, "restart");
    assert_eq!(agent.wait_exit(T).and_then(|s| s.code()), Some(0));
    let mut agent = h.spawn();
    let starts = wait_starts(&h, 1);
    assert!(
        starts[0].ends_with("after the dashboard's restart command"),
        "{starts:?}"
    );
    assert!(h.wait_delivered(T, "Agent started"));
    h.dash.clear_requests();

    // kill -9 without a service manager: no trace but the missing clean exit.
    agent.kill9();
    let mut agent = h.spawn();
    let starts = wait_starts(&h, 1);
    assert!(
        starts[0].contains("after the previous agent ended without a trace (kill -9"),
        "{starts:?}"
    );
    assert!(h.wait_delivered(T, "Agent started"));
    h.dash.clear_requests();

    // A reboot: the recorded boot id is not this boot's.
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(T).and_then(|s| s.code()), Some(0));
    let lifecycle = h.state_dir.join("lifecycle.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lifecycle).unwrap()).unwrap();
    record["boot_id"] = "an-earlier-boot".into();
    std::fs::write(&lifecycle, record.to_string()).unwrap();
    let _agent = h.spawn();
    let starts = wait_starts(&h, 1);
    assert!(starts[0].ends_with("after the host rebooted"), "{starts:?}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lifecycle).unwrap()).unwrap();
    for cause in [
        "first_start",
        "stopped",
        "dashboard_restart",
        "unknown",
        "reboot",
    ] {
        assert_eq!(record["restarts"][cause], 1, "{cause}: {record}");
    }
}

#[test]
fn a_stall_exit_70_reads_as_the_stall_monitor_at_the_next_start() {
    let mut h = Harness::new();
    let wedge = h.tmp.path().join("wedge");
    h.set("NIXFLEET_DEBUG_WEDGE_FILE", wedge.display().to_string());
    h.set("NIXFLEET_STALL_TIMEOUT", "2");
    let mut agent = h.spawn();
    assert!(h.wait_delivered(T, "Agent started"));
    std::fs::write(&wedge, "").unwrap();
    assert_eq!(agent.wait_exit(T).and_then(|s| s.code()), Some(70));
    std::fs::remove_file(&wedge).unwrap();
    let _agent = h.spawn();
    let starts = wait_starts(&h, 2);
    assert!(
        starts[1].ends_with("after the stall monitor found the main loop wedged (exit 70)"),
        "{starts:?}"
    );
}

#[test]
fn status_tells_healthy_unreachable_stuck_and_not_running_by_exit_code() {
    let mut h = Harness::new();
    h.legacy_repo();
    let wedge = h.tmp.path().join("wedge");
    h.set("NIXFLEET_DEBUG_WEDGE_FILE", wedge.display().to_string());
    h.set("NIXFLEET_STALL_TIMEOUT", "60");
    let token = std::fs::read_to_string(&h.token_file).unwrap();

    // Not running (never started).
    let (code, text) = status(&h, false);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not running"), "{text}");

    let mut agent = h.spawn();
    assert!(h.wait_delivered(T, "Agent started"));
    assert!(wait_until(T, || status(&h, false).0 == 0));
    let (_, text) = status(&h, false);
    assert!(text.starts_with("nixfleet-agent: healthy\n"), "{text}");
    assert!(
        text.contains(&format!(
            "pid {} (holds the lock), version 0.1.0",
            agent.pid()
        )),
        "{text}"
    );
    assert!(text.contains("last heartbeat"), "{text}");
    assert!(text.contains("last start: first start"), "{text}");
    assert!(text.contains("token = *** (from"), "{text}");
    assert!(!text.contains(token.trim()), "the token leaked: {text}");
    let (code, json) = status(&h, true);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["health"], "healthy");
    assert_eq!(json["agent"]["pid"], agent.pid());

    // A running command, with its step and timeout.
    h.stand_in("nixos-rebuild", "sleep 4; echo activated");
    h.dash.force_command(HOST, "switch");
    // ("step starting" for a moment, until the switch's first step.)
    assert!(wait_until(T, || {
        let text = status(&h, false).1;
        text.contains("command:    switch for") && text.contains("step Switch for")
    }));
    let (_, text) = status(&h, false);
    assert!(text.contains("of 10m0s"), "{text}");
    assert!(h.wait_delivered(T, "Switch: activated"));

    // Dashboard down: degraded, exit 1, with the outage and the next retry.
    h.dash.set_mode(fake_dashboard::Mode::Down);
    assert!(
        wait_until(T, || status(&h, false).0 == 1),
        "{}",
        status(&h, false).1
    );
    let (_, text) = status(&h, false);
    assert!(
        text.contains("degraded: dashboard unreachable for"),
        "{text}"
    );
    assert!(text.contains("next retry in"), "{text}");
    h.dash.set_mode(fake_dashboard::Mode::Normal);
    assert!(wait_until(T, || status(&h, false).0 == 0));

    // Wedged: stuck, exit 2 once the progress file is older than a healthy loop ever lets it
    // get (stall timeout 60 s: beats every 20 s; stuck after 30 s; still alive until 60 s).
    std::fs::write(&wedge, "").unwrap();
    assert!(
        wait_until(Duration::from_secs(45), || status(&h, false).0 == 2),
        "{}",
        status(&h, false).1
    );
    let (_, text) = status(&h, false);
    assert!(
        text.starts_with("nixfleet-agent: stuck: the main loop made no progress for"),
        "{text}"
    );
    std::fs::remove_file(&wedge).unwrap();
    assert!(wait_until(T, || status(&h, false).0 == 0));

    // Dead: not running, exit 2, and the last exit is on record.
    agent.signal(libc::SIGTERM);
    assert_eq!(agent.wait_exit(T).and_then(|s| s.code()), Some(0));
    let (code, text) = status(&h, false);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not running"), "{text}");
    assert!(text.contains("last exit:  code 0 (Stopped)"), "{text}");
}

#[test]
fn a_definition_changed_by_others_restarts_the_agent_when_idle_never_mid_command() {
    let mut h = Harness::new();
    h.legacy_repo();
    let unit = h.tmp.path().join("agent.service");
    std::fs::write(&unit, "[Service]\nEnvironment=NIXFLEET_LOCATION=old\n").unwrap();
    h.set("NIXFLEET_RESTART_ON_CHANGE", unit.display().to_string());
    let release = h.tmp.path().join("release");
    h.stand_in(
        "nixos-rebuild",
        &format!(
            "while [ ! -e '{}' ]; do sleep 0.1; done; echo broken; exit 1",
            release.display()
        ),
    );
    let mut agent = h.spawn();
    assert!(h.wait_delivered(T, "Agent started"));
    // A switch that fails: its own success path (which restarts after a switch that changed
    // the definition) is not what restarts the agent here.
    h.dash.force_command(HOST, "switch");
    assert!(agent.wait_log(T, "step Switch") || agent.wait_log(T, "switch: Switch"));

    // Changed by another route (a hand edit, another deploy tool) while a command runs.
    std::fs::write(&unit, "[Service]\nEnvironment=NIXFLEET_LOCATION=new\n").unwrap();
    assert!(
        agent.wait_log(T, "restarting into it once idle"),
        "the change was not noticed within an interval: {}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.wait_exit(Duration::ZERO).is_none(),
        "exited mid-command"
    );
    let (_, text) = status(&h, false);
    assert!(
        text.contains(&format!(
            "restart:    pending when idle: service definition {} changed",
            unit.display()
        )),
        "{text}"
    );

    std::fs::write(&release, "").unwrap();
    let code = agent.wait_exit(T).and_then(|s| s.code());
    assert_eq!(code, Some(10), "{}", agent.log());
    // The switch's own report went out first, and the next start says why it happened.
    assert!(
        h.statuses().iter().any(|s| s.starts_with("Switch failed:")),
        "{:?}",
        h.statuses()
    );
    let _agent = h.spawn();
    let starts = wait_starts(&h, 2);
    assert_eq!(
        starts[1],
        format!(
            "Agent started (0.1.0): after a change made outside the agent (service definition {} changed)",
            unit.display()
        )
    );
}

#[test]
fn an_agent_binary_replaced_by_others_restarts_an_idle_agent_within_an_interval() {
    let mut h = Harness::new();
    let installed = h.tmp.path().join("installed-agent");
    std::fs::write(&installed, "v1").unwrap();
    h.set("NIXFLEET_AGENT_PATH", installed.display().to_string());
    let mut agent = h.spawn();
    assert!(h.wait_delivered(T, "Agent started"));
    let new = h.tmp.path().join("new-agent");
    std::fs::write(&new, "v2").unwrap();
    std::fs::rename(&new, &installed).unwrap();
    let replaced = std::time::Instant::now();
    let code = agent.wait_exit(T).and_then(|s| s.code());
    assert_eq!(code, Some(10), "{}", agent.log());
    // Interval 1 s: noticed on the next check.
    assert!(
        replaced.elapsed() < Duration::from_secs(4),
        "{:?}",
        replaced.elapsed()
    );
    assert!(
        agent
            .log()
            .contains(&format!("agent binary {} changed", installed.display()))
    );
}

/// A fake `/nix/store` with two systems and the `/run/booted-system`, `/run/current-system`
/// links; `switch_to` re-points current-system like an activation does.
struct Systems {
    booted: std::path::PathBuf,
    current: std::path::PathBuf,
    new_kernel: std::path::PathBuf,
}

fn systems(h: &Harness) -> Systems {
    let store = h.tmp.path().join("store");
    let make = |name: &str, kernel: &str| {
        let sys = store.join(name);
        std::fs::create_dir_all(&sys).unwrap();
        for (link, target) in [
            ("kernel", kernel),
            ("initrd", kernel),
            ("kernel-modules", "mods"),
        ] {
            let target = store.join(format!("{target}-{link}"));
            std::fs::create_dir_all(&target).unwrap();
            std::os::unix::fs::symlink(&target, sys.join(link)).unwrap();
        }
        sys
    };
    let old = make("system-1", "linux-6.1");
    let new_kernel = make("system-2", "linux-6.6");
    let booted = h.tmp.path().join("booted-system");
    let current = h.tmp.path().join("current-system");
    std::os::unix::fs::symlink(&old, &booted).unwrap();
    std::os::unix::fs::symlink(&old, &current).unwrap();
    Systems {
        booted,
        current,
        new_kernel,
    }
}

#[test]
fn a_switch_to_a_new_kernel_says_a_reboot_is_needed_in_the_report_status_and_metrics() {
    let mut h = Harness::new();
    h.legacy_repo();
    let s = systems(&h);
    let metrics = h.tmp.path().join("textfile/nixfleet.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    h.set("NIXFLEET_BOOTED_SYSTEM", s.booted.display().to_string());
    h.set("NIXFLEET_CURRENT_SYSTEM", s.current.display().to_string());
    h.set("NIXFLEET_METRICS_FILE", metrics.display().to_string());
    // A systemd stand-in for STATUS= (sd_notify datagrams).
    let notify = std::os::unix::net::UnixDatagram::bind(h.tmp.path().join("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    h.set(
        "NOTIFY_SOCKET",
        h.tmp.path().join("notify.sock").display().to_string(),
    );
    // The activation re-points current-system to the system with the new kernel.
    h.stand_in(
        "nixos-rebuild",
        &format!(
            "ln -sfn '{}' '{}'; echo activated",
            s.new_kernel.display(),
            s.current.display()
        ),
    );
    let _agent = h.spawn();
    assert!(h.wait_delivered(T, "Agent started"));
    assert!(
        wait_until(T, || std::fs::read_to_string(&metrics)
            .is_ok_and(|m| m.contains("nixfleet_agent_reboot_required 0"))),
        "no metrics file"
    );
    h.dash.force_command(HOST, "switch");
    assert!(
        h.wait_delivered(T, "Switch: activated"),
        "{:?}",
        h.statuses()
    );
    let report = h
        .statuses()
        .into_iter()
        .find(|s| s.starts_with("Switch: activated"))
        .unwrap();
    assert_eq!(
        report,
        "Switch: activated\nReboot needed to finish this switch: the running kernel and initrd \
         differ from the new system's"
    );
    assert!(wait_until(T, || status(&h, false).1.contains(
        "reboot:     reboot needed: the running kernel and initrd differ"
    )));
    let mut buf = vec![0u8; 65536];
    let status_says_reboot = wait_until(T, || {
        notify.recv(&mut buf).is_ok_and(|n| {
            String::from_utf8_lossy(&buf[..n]).lines().any(|l| {
                l.starts_with("STATUS=")
                    && l.ends_with("; reboot needed: the running kernel and initrd differ from the current system's")
            })
        })
    });
    assert!(
        status_says_reboot,
        "no STATUS= line says a reboot is needed"
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains("nixfleet_agent_reboot_required 1\n"),
        "{text}"
    );
    assert!(
        text.contains("nixfleet_agent_commands_total{command=\"switch\",result=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("nixfleet_agent_restarts_total{cause=\"first_start\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("nixfleet_agent_last_heartbeat_success_timestamp_seconds 1"),
        "{text}"
    );

    // "Until the host reboots": a booted-system equal to the current one clears it at start.
    drop(_agent);
    std::fs::remove_file(&s.booted).unwrap();
    std::os::unix::fs::symlink(&s.new_kernel, &s.booted).unwrap();
    let _agent = h.spawn();
    assert!(wait_until(T, || std::fs::read_to_string(&metrics)
        .is_ok_and(|m| m.contains("nixfleet_agent_reboot_required 0"))));
}

#[test]
fn after_its_own_switch_changed_the_unit_the_next_start_says_so() {
    let mut h = Harness::new();
    h.legacy_repo();
    let unit = h.tmp.path().join("nixfleet-agent.service");
    std::fs::write(&unit, "[Service]\nExecStart=/old\n").unwrap();
    h.set("NIXFLEET_RESTART_ON_CHANGE", unit.display().to_string());
    h.stand_in(
        "nixos-rebuild",
        &format!(
            "printf '[Service]\\nExecStart=/new\\n' > '{}'; echo activated",
            unit.display()
        ),
    );
    let mut agent = h.spawn();
    assert!(h.wait_delivered(T, "Agent started"));
    h.dash.force_command(HOST, "switch");
    assert_eq!(agent.wait_exit(T).and_then(|s| s.code()), Some(10));
    let _agent = h.spawn();
    let starts = wait_starts(&h, 2);
    assert_eq!(
        starts[1],
        format!(
            "Agent started (0.1.0): after the agent's own switch (new settings: {} changed)",
            unit.display()
        )
    );
}
