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

/// A tiny deterministic generator, so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn word(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b'a' + (self.next() % 26) as u8))
            .collect()
    }
}

/// Item 4: a dashboard that answers every request with 422 and thousands of fresh, random
/// validation items, some of them trying to forge log lines, every second. The agent's memory
/// stays flat, it logs a bounded number of short lines, and no reply starts a line of its own.
#[test]
fn flood_of_random_validation_errors_keeps_memory_flat_and_log_lines_short() {
    let rng = std::sync::Mutex::new(Lcg(0x5eed));
    let server = hostile::HostileServer::start(move |_| {
        let mut rng = rng.lock().unwrap();
        let items: Vec<serde_json::Value> = (0..3000)
            .map(|_| {
                let field = rng.word(40);
                let msg = format!(
                    "{}\n2026-01-01T00:00:00.000000Z  INFO forged-line {}",
                    rng.word(60),
                    rng.word(60)
                );
                serde_json::json!({"type": "x", "loc": ["body", field], "msg": msg, "input": rng.word(20)})
            })
            .collect();
        hostile::Reply::json(
            422,
            serde_json::to_vec(&serde_json::json!({ "detail": items })).unwrap(),
        )
    });
    let mut h = Harness::new();
    h.set("NIXFLEET_URL", server.url());
    h.set("NIXFLEET_BACKOFF_CAP", "1");
    let agent = h.spawn();
    assert!(
        wait_until(T, || server.seen().len() >= 3),
        "{}",
        agent.log()
    );
    let early = agent.rss_kib().expect("rss");
    let early_requests = server.seen().len();
    std::thread::sleep(Duration::from_secs(10));
    let late = agent.rss_kib().expect("rss");
    let requests = server.seen().len() - early_requests;
    assert!(requests >= 4, "only {requests} requests in 10 s");
    let log = agent.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        late <= early + 4 * 1024,
        "RSS grew from {early} KiB to {late} KiB over {requests} requests"
    );
    assert!(
        lines.len() < 40 * (requests + early_requests),
        "{} log lines for {} requests",
        lines.len(),
        requests + early_requests
    );
    for line in &lines {
        assert!(line.len() <= 1600, "a log line of {} bytes", line.len());
        assert!(
            !line.starts_with("2026-01-01T00:00:00.000000Z"),
            "forged line: {line}"
        );
    }
    assert!(log.contains("more validation errors not shown"), "{log}");
}

/// Item 5: a repository URL with credentials is refused, and neither `check-config` (which the
/// NixOS and nix-darwin modules run at build time, into the Nix build log) nor the agent's log
/// ever shows the secret.
#[test]
fn repo_url_with_credentials_is_refused_without_showing_them() {
    for url in [
        "https://deploy:s3cret-pw@git.example/fleet.git",
        "https://s3cret-pw@git.example/fleet.git",
        "https://git.example/fleet.git?private_token=s3cret-pw",
    ] {
        let mut h = Harness::new();
        h.set("NIXFLEET_REPO_URL", url);
        h.set(
            "NIXFLEET_REPO_DIR",
            h.tmp.path().join("repo").display().to_string(),
        );
        for args in [&["check-config"][..], &["run"][..]] {
            let (code, out) = h.run_to_exit(args, T);
            assert_eq!(code, Some(78), "{args:?} {url}: {out}");
            assert!(out.contains("NIXFLEET_REPO_URL"), "{args:?} {url}: {out}");
            assert!(
                !out.contains("s3cret-pw"),
                "{args:?} {url} shows the secret: {out}"
            );
        }
    }
}

/// Item 6: a token cache another user could have planted (a symbolic link, a file readable by
/// others) is not used: the agent says why and sends the configured token.
#[test]
fn planted_or_readable_token_cache_is_not_used() {
    use std::os::unix::fs::PermissionsExt as _;
    for planted_as_link in [true, false] {
        let h = Harness::with_options(Options {
            provision_tokens: false,
            ..Options::default()
        });
        std::fs::create_dir_all(&h.state_dir).unwrap();
        std::fs::set_permissions(&h.state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let cache = h.state_dir.join("token");
        if planted_as_link {
            let elsewhere = h.tmp.path().join("planted-token");
            std::fs::write(&elsewhere, "NIXFLEET_TOKEN=planted-token\n").unwrap();
            std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::symlink(&elsewhere, &cache).unwrap();
        } else {
            std::fs::write(&cache, "NIXFLEET_TOKEN=planted-token\n").unwrap();
            std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let agent = h.spawn();
        assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
        let bearers: Vec<_> = h
            .dash
            .requests()
            .into_iter()
            .filter_map(|r| r.bearer)
            .collect();
        assert!(!bearers.is_empty());
        assert!(
            bearers.iter().all(|b| b == SHARED_TOKEN),
            "link {planted_as_link}: the planted token was sent: {bearers:?}"
        );
        let why = if planted_as_link {
            "symbolic link"
        } else {
            "mode 644"
        };
        assert!(
            agent.log().contains("cannot read the token cache") && agent.log().contains(why),
            "{}",
            agent.log()
        );
        assert!(!agent.log().contains("planted-token"), "{}", agent.log());
    }
}

fn is_root() -> bool {
    nix_is_root()
}

/// Item 6: the isolated clone is made in a fresh private directory with an unpredictable name.
/// Directories someone prepared next to the checkout (at the predictable staging name older
/// agents used, or at the new prefix but owned by another user) are neither used nor deleted.
#[test]
fn isolated_clone_never_uses_or_deletes_a_prepared_staging_directory() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut h = Harness::new();
    let (repos, dir) = h.isolated_repo();
    let parent = dir.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).unwrap();
    let old_name = parent.join(".repo.nixfleet-clone");
    std::fs::create_dir_all(&old_name).unwrap();
    std::fs::write(old_name.join("precious"), "keep me\n").unwrap();
    let foreign = parent.join(".repo.nixfleet-clone-0000000000000001");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("precious"), "keep me\n").unwrap();
    if is_root() {
        std::os::unix::fs::chown(&old_name, Some(65534), Some(65534)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    }
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "cloned the config repository"),
        "{}",
        agent.log()
    );
    assert_eq!(Repos::head(&dir), Repos::head(&repos.origin));
    assert!(
        old_name.join("precious").exists(),
        "the old staging name was deleted"
    );
    if is_root() {
        assert!(
            foreign.join("precious").exists(),
            "another user's directory was deleted"
        );
    }
    let left: Vec<String> = std::fs::read_dir(&parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".repo.nixfleet-clone-") && !n.ends_with("0001"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
}

/// HEAD of a checkout another user owns (git's own ownership check waived for the test).
fn foreign_head(dir: &std::path::Path) -> String {
    git(dir, &["-c", "safe.directory=*", "rev-parse", "HEAD"])
}

/// Item 6: a legacy checkout owned by a user other than root or the agent's is refused (its
/// owner could run code as root through git hooks or config), unless explicitly allowed.
#[test]
fn foreign_owned_legacy_checkout_is_refused_unless_allowed() {
    assert!(
        is_root(),
        "this test needs root to give the checkout to another user"
    );
    let mut h = Harness::new();
    let repos = h.legacy_repo();
    let before = Repos::head(&repos.checkout);
    repos.push_commit("second", &[("README", "hello\n")]);
    for path in [repos.checkout.clone(), repos.checkout.join(".git")] {
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
    }
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
    h.dash.force_command(HOST, "pull");
    assert!(
        h.wait_status(T, "NIXFLEET_ALLOW_FOREIGN_CHECKOUT"),
        "{:?}\n{}",
        h.statuses(),
        agent.log()
    );
    assert!(
        h.statuses()
            .iter()
            .any(|s| s.contains("owned by uid 65534")),
        "{:?}",
        h.statuses()
    );
    assert_eq!(
        foreign_head(&repos.checkout),
        before,
        "git ran in the checkout"
    );
    drop(agent);

    h.set("NIXFLEET_ALLOW_FOREIGN_CHECKOUT", "1");
    let agent = h.spawn();
    assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
    h.dash.force_command(HOST, "pull");
    assert!(
        wait_until(T, || foreign_head(&repos.checkout) != before),
        "{:?}\n{}",
        h.statuses(),
        agent.log()
    );
}

/// Item 1: a state or runtime directory that is a symbolic link, or below a directory other
/// users can write to (no sticky bit), or owned by another user, is refused with exit 73 naming
/// the path and the reason; the link's target is never chmodded nor written into.
#[test]
fn state_and_runtime_dirs_reached_through_links_or_writable_parents_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    for which in ["NIXFLEET_STATE_DIR", "NIXFLEET_RUNTIME_DIR"] {
        // A link to a directory someone else chose.
        let mut h = Harness::new();
        let victim = h.tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = h.tmp.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        h.set(which, link.display().to_string());
        let (code, log) = h.run_to_exit(&[], T);
        assert_eq!(code, Some(73), "{which} link: {log}");
        assert!(
            log.contains(&format!("{}: it is a symbolic link", link.display())),
            "{which}: {log}"
        );
        assert_eq!(
            mode(&victim),
            0o755,
            "{which}: the link's target was chmodded"
        );
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            0,
            "{which}: the agent wrote into the link's target"
        );

        // Below a directory anyone can write to, without the sticky bit.
        let mut h = Harness::new();
        let open = h.tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let dir = open.join("nixfleet");
        h.set(which, dir.display().to_string());
        let (code, log) = h.run_to_exit(&[], T);
        assert_eq!(code, Some(73), "{which} below 0777: {log}");
        assert!(
            log.contains(&format!(
                "{} above it is writable by other users",
                open.display()
            )),
            "{which}: {log}"
        );

        // Owned by another user.
        if is_root() {
            let mut h = Harness::new();
            let theirs = h.tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            h.set(which, theirs.display().to_string());
            let (code, log) = h.run_to_exit(&[], T);
            assert_eq!(code, Some(73), "{which} foreign: {log}");
            assert!(log.contains("owned by uid 65534"), "{which}: {log}");
        }
    }
}

/// Item 9: a correct pin does not make an untrusted chain acceptable: without the CA the pin
/// alone is refused, and the dashboard never sees a request (so never the token).
#[test]
fn correct_pin_with_an_untrusted_chain_still_fails() {
    let mut h = Harness::with_options(Options {
        tls: true,
        ..Options::default()
    });
    h.unset("NIXFLEET_ALLOW_INSECURE_HTTP");
    h.set("NIXFLEET_URL", h.dash.url());
    h.set(
        "NIXFLEET_PINNED_PUBKEY",
        format!("sha256//{}", h.dash.spki_sha256_base64().unwrap()),
    );
    let agent = h.spawn();
    assert!(
        agent.wait_log(T, "dashboard unreachable"),
        "{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(h.dash.requests().is_empty(), "{:?}", h.dash.requests());
    assert!(!agent.log().contains("Agent started"), "{}", agent.log());
}

/// Item 9: a dashboard answering with a redirect, to plain HTTP or to another host, gets
/// nothing sent there: the agent never follows a redirect, so the token stays with the
/// configured dashboard.
#[test]
fn redirect_to_plain_http_or_another_host_sends_nothing_there() {
    let elsewhere_plain =
        hostile::HostileServer::start(|_| hostile::Reply::json(200, b"{}".to_vec()));
    let elsewhere_tls =
        hostile::HostileServer::start_tls(|_| hostile::Reply::json(200, b"{}".to_vec()));
    for target in [
        format!(
            "http://127.0.0.1:{}/api/hosts/{HOST}/register",
            elsewhere_plain.port()
        ),
        format!(
            "https://localhost:{}/api/hosts/{HOST}/register",
            elsewhere_tls.port()
        ),
    ] {
        let location = target.clone();
        let dashboard = hostile::HostileServer::start_tls(move |_| hostile::Reply {
            status: 307,
            headers: vec![("Location".into(), location.clone())],
            body: Vec::new(),
            trickle: None,
        });
        let mut h = Harness::new();
        let ca = h.tmp.path().join("ca.pem");
        std::fs::write(&ca, dashboard.ca_pem().unwrap()).unwrap();
        h.unset("NIXFLEET_ALLOW_INSECURE_HTTP");
        h.set("NIXFLEET_URL", dashboard.url());
        h.set("NIXFLEET_CA_FILE", ca.display().to_string());
        let agent = h.spawn();
        assert!(
            wait_until(T, || dashboard.seen().len() >= 3),
            "{target}: {}",
            agent.log()
        );
        assert!(agent.log().contains("HTTP 307"), "{}", agent.log());
        let sent = dashboard.seen();
        assert!(
            sent.iter()
                .any(|r| r.headers.iter().any(|(k, _)| k == "authorization")),
            "the dashboard itself got the token"
        );
    }
    assert_eq!(
        elsewhere_plain.connections(),
        0,
        "something was sent to the plain target"
    );
    assert_eq!(
        elsewhere_tls.connections(),
        0,
        "something was sent to the other host"
    );
}

/// Datagrams sent to a `NOTIFY_SOCKET`, with their arrival times.
struct Notify {
    path: std::path::PathBuf,
    seen: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notify {
    fn bind(dir: &std::path::Path) -> Notify {
        use std::sync::atomic::Ordering;
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        seen.lock().unwrap().push((std::time::Instant::now(), text));
                    }
                }
            })
        };
        Notify {
            path,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn watchdogs_since(&self, t: std::time::Instant) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, text)| *at >= t && text.lines().any(|l| l == "WATCHDOG=1"))
            .count()
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Item 9: a dashboard that trickles its reply one byte a second is cut at the request
/// timeout, while the main loop keeps ticking and pinging the watchdog the whole time.
#[test]
fn trickling_reply_is_cut_at_the_request_timeout_while_the_watchdog_is_pinged() {
    let body =
        br#"{"command": null, "padding": "0123456789012345678901234567890123456789"}"#.to_vec();
    let server = hostile::HostileServer::start(move |_| hostile::Reply {
        trickle: Some(Duration::from_secs(1)),
        ..hostile::Reply::json(200, body.clone())
    });
    let mut h = Harness::new();
    let notify = Notify::bind(h.tmp.path());
    h.set("NIXFLEET_URL", server.url());
    h.set("NIXFLEET_HTTP_TIMEOUT", "3");
    h.set("NOTIFY_SOCKET", notify.path.display().to_string());
    h.set("WATCHDOG_USEC", "1000000");
    let started = std::time::Instant::now();
    let agent = h.spawn();
    assert!(
        agent.wait_log(Duration::from_secs(15), "did not answer within 3s"),
        "{}",
        agent.log()
    );
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_secs(10),
        "cut only after {cut_after:?} (the body alone takes 70 s)"
    );
    let pinged_from = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let pings = notify.watchdogs_since(pinged_from);
    assert!(
        pings >= 3,
        "{pings} watchdog pings in 4 s during trickling replies"
    );
    assert!(
        notify.watchdogs_since(started) >= 6,
        "pings stopped while the first reply trickled"
    );
    assert!(server.seen().len() >= 2, "the agent went on trying");
}

/// Item 2: a journal whose detached switch points outside `<state>/switch/` (or names a unit
/// that reads as an option) is treated as corrupt: a copy is kept and logged, the command is
/// reported as interrupted, and the named files are never read, deleted or passed to a command.
#[test]
fn journal_pointing_outside_the_state_dir_is_quarantined_never_followed() {
    let h = Harness::new();
    std::fs::create_dir_all(h.state_dir.join("switch")).unwrap();
    let victim = h.tmp.path().join("victim.json");
    std::fs::write(&victim, "precious\n").unwrap();
    let victim_pid = h.tmp.path().join("victim.json.pid");
    std::fs::write(&victim_pid, "1\n").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let journal = serde_json::json!({
        "version": 1,
        "last_id": 7,
        "running": {
            "id": 7,
            "command": "switch",
            "step": "Switch",
            "started_unix": now,
            "detached": {
                "unit": "--help",
                "pid": null,
                "result_file": victim,
                "deadline_unix": now + 600,
            },
        },
        "queued": [],
    });
    std::fs::write(h.state_dir.join("journal.json"), journal.to_string()).unwrap();
    let agent = h.spawn();
    assert!(
        h.wait_status(T, "was interrupted"),
        "{:?}\n{}",
        h.statuses(),
        agent.log()
    );
    assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(
        victim_pid.exists(),
        "a sibling of the named file was deleted"
    );
    assert!(
        agent.log().contains("is not inside"),
        "the reason is logged: {}",
        agent.log()
    );
    let copies: Vec<_> = std::fs::read_dir(&h.state_dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with("journal.json.corrupt-").then_some(name)
        })
        .collect();
    assert_eq!(copies.len(), 1, "a copy is kept for a human");
}
