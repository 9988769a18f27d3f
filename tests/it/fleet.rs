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
