//! Issue 10, the root daemon under attack: hostile files, peers and inputs. Each test names the
//! item of the issue it proves (see the threat model in ARCHITECTURE.md).

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(10);

/// The soft and hard values of one line of `/proc/<pid>/limits`.
fn limit(pid: i32, name: &str) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let mut fields = line[name.len()..].split_whitespace();
    Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
}

/// Item 7: no core dumps, and the process is not dumpable. The kernel shows a non-dumpable
/// process's `/proc/<pid>/*` files as owned by root:root instead of its own effective uid and gid, so
/// the agent is started with a group other than root's (and, when the tests do not run as
/// root, it has another uid anyway).
#[test]
fn agent_is_not_dumpable_and_never_writes_core_files() {
    let h = Harness::new();
    let agent = h.spawn_with(&[], |cmd| {
        if nix_is_root() {
            cmd.gid(65534);
        }
    });
    assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
    let limits = limit(agent.pid(), "Max core file size");
    assert_eq!(
        limits,
        Some(("0".to_owned(), "0".to_owned())),
        "{}",
        agent.log()
    );
    let owner = std::fs::metadata(format!("/proc/{}/status", agent.pid())).unwrap();
    assert_eq!(
        (owner.uid(), owner.gid()),
        (0, 0),
        "/proc/<pid>/status shows the agent's own ids: it is dumpable"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
