//! The harness: a fake v1 dashboard on 127.0.0.1, the real agent binary as a child process,
//! real git repositories in a temp dir, and stand-in rebuild tools that record their argv and
//! environment.
//!
//! Everything a test starts is killed when its [`Harness`] / [`AgentProcess`] drops, so a
//! failing assertion never leaves an agent running.

#![allow(
    dead_code,
    reason = "each test module uses a different part of the harness"
)]

pub mod hostile;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use fake_dashboard::{Endpoint, FakeDashboard, Mode, Options, RecordedRequest};

pub const HOST: &str = "testhost";
pub const SHARED_TOKEN: &str = "shared-secret-token";

/// Polls `cond` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs git with a fixed identity; panics with its output on failure (test setup only).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@example.org")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@example.org")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn write_executable(path: &Path, body: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bare origin, a developer clone that pushes to it, and the host's checkout.
pub struct Repos {
    pub origin: PathBuf,
    pub dev: PathBuf,
    pub checkout: PathBuf,
}

impl Repos {
    pub fn create(root: &Path) -> Repos {
        let origin = root.join("origin.git");
        let dev = root.join("dev");
        let checkout = root.join("checkout");
        fs::create_dir_all(&origin).unwrap();
        git(&origin, &["init", "-q", "--bare", "-b", "main"]);
        fs::create_dir_all(&dev).unwrap();
        git(&dev, &["init", "-q", "-b", "main"]);
        fs::write(dev.join("flake.nix"), "{ outputs = _: { }; }\n").unwrap();
        fs::write(dev.join("flake.lock"), "{\"version\": 7}\n").unwrap();
        git(&dev, &["add", "."]);
        git(&dev, &["commit", "-q", "-m", "initial"]);
        git(&dev, &["remote", "add", "origin", origin.to_str().unwrap()]);
        git(&dev, &["push", "-q", "origin", "main"]);
        git(root, &["clone", "-q", origin.to_str().unwrap(), "checkout"]);
        Repos {
            origin,
            dev,
            checkout,
        }
    }

    /// Commits `files` in the developer clone and pushes; returns the new HEAD.
    pub fn push_commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        for (name, content) in files {
            let path = self.dev.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, content).unwrap();
            if name.ends_with(".sh") {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        git(&self.dev, &["add", "."]);
        git(&self.dev, &["commit", "-q", "-m", message]);
        git(&self.dev, &["push", "-q", "origin", "main"]);
        git(&self.dev, &["rev-parse", "HEAD"])
    }

    pub fn head(dir: &Path) -> String {
        git(dir, &["rev-parse", "HEAD"])
    }
}

/// One test's world: temp dir, fake dashboard, stand-in tools, agent environment.
pub struct Harness {
    pub tmp: tempfile::TempDir,
    pub dash: FakeDashboard,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub token_file: PathBuf,
    pub vars: Vec<(String, String)>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_options(Options::default())
    }

    pub fn with_options(options: Options) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let dash = FakeDashboard::start(options);
        let state_dir = tmp.path().join("state");
        let runtime_dir = tmp.path().join("run");
        let bin_dir = tmp.path().join("bin");
        fs::create_dir_all(&bin_dir).unwrap();
        let token_file = tmp.path().join("token");
        fs::write(&token_file, format!("{SHARED_TOKEN}\n")).unwrap();
        let home = tmp.path().join("home");
        fs::create_dir_all(&home).unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
        );
        let vars = vec![
            ("NIXFLEET_URL".into(), dash.url()),
            ("NIXFLEET_ALLOW_INSECURE_HTTP".into(), "1".into()),
            (
                "NIXFLEET_TOKEN_FILE".into(),
                token_file.display().to_string(),
            ),
            ("NIXFLEET_HOSTNAME".into(), HOST.into()),
            ("NIXFLEET_INTERVAL".into(), "1".into()),
            ("NIXFLEET_BACKOFF_CAP".into(), "2".into()),
            ("NIXFLEET_STATE_DIR".into(), state_dir.display().to_string()),
            (
                "NIXFLEET_RUNTIME_DIR".into(),
                runtime_dir.display().to_string(),
            ),
            ("NIXFLEET_LOG".into(), "info".into()),
            ("NIXFLEET_SWITCH_MODE".into(), "nixos".into()),
            // Not `auto`: on a developer's desktop (a user manager) or a systemd host, auto
            // would start switches as real transient units. Tests that detach say so.
            ("NIXFLEET_SWITCH_ISOLATION".into(), "none".into()),
            ("PATH".into(), path),
            ("HOME".into(), home.display().to_string()),
            ("USER".into(), "tester".into()),
        ];
        Harness {
            tmp,
            dash,
            state_dir,
            runtime_dir,
            bin_dir,
            token_file,
            vars,
        }
    }

    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        let value = value.into();
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.into(), value));
        self
    }

    pub fn unset(&mut self, key: &str) -> &mut Self {
        self.vars.retain(|(k, _)| k != key);
        self
    }

    /// Creates origin/dev/checkout repos and points the agent at the checkout (legacy mode).
    pub fn legacy_repo(&mut self) -> Repos {
        let repos = Repos::create(self.tmp.path());
        let checkout = repos.checkout.display().to_string();
        self.set("NIXFLEET_NIXCFG", checkout);
        repos
    }

    /// Creates origin/dev repos and lets the agent clone origin into `<tmp>/isolated`.
    pub fn isolated_repo(&mut self) -> (Repos, PathBuf) {
        let repos = Repos::create(self.tmp.path());
        let dir = self.tmp.path().join("isolated/repo");
        let origin = repos.origin.display().to_string();
        self.set("NIXFLEET_REPO_URL", origin);
        self.set("NIXFLEET_REPO_DIR", dir.display().to_string());
        (repos, dir)
    }

    /// A stand-in tool on the agent's PATH: records argv and environment in
    /// `<tmp>/calls/<name>.argv` / `.env`, then runs `body`.
    pub fn stand_in(&self, name: &str, body: &str) -> PathBuf {
        let calls = self.tmp.path().join("calls");
        fs::create_dir_all(&calls).unwrap();
        let record = calls.join(name);
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{argv}.argv'\nenv > '{argv}.env'\n{body}\n",
            argv = record.display()
        );
        let path = self.bin_dir.join(name);
        write_executable(&path, &script);
        path
    }

    pub fn calls(&self, name: &str) -> Vec<String> {
        fs::read_to_string(self.tmp.path().join("calls").join(format!("{name}.argv")))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    pub fn call_env(&self, name: &str) -> String {
        fs::read_to_string(self.tmp.path().join("calls").join(format!("{name}.env")))
            .unwrap_or_default()
    }

    pub fn spawn(&self) -> AgentProcess {
        self.spawn_args(&[])
    }

    pub fn spawn_args(&self, args: &[&str]) -> AgentProcess {
        AgentProcess::spawn(self.tmp.path(), &self.vars, args)
    }

    /// [`Harness::spawn_args`] with a last word on the command (credentials, and the like).
    pub fn spawn_with(&self, args: &[&str], customize: impl FnOnce(&mut Command)) -> AgentProcess {
        AgentProcess::spawn_with(self.tmp.path(), &self.vars, args, customize)
    }

    /// Runs the agent to completion (for config errors and the like).
    pub fn run_to_exit(&self, args: &[&str], timeout: Duration) -> (Option<i32>, String) {
        let mut agent = self.spawn_args(args);
        let status = agent.wait_exit(timeout);
        (status.and_then(|s| s.code()), agent.log())
    }

    pub fn requests(&self, endpoint: Endpoint) -> Vec<RecordedRequest> {
        self.dash
            .requests()
            .into_iter()
            .filter(|r| r.endpoint == endpoint)
            .collect()
    }

    /// The `output` of every /status the dashboard answered 2xx, in order.
    pub fn statuses(&self) -> Vec<String> {
        self.requests(Endpoint::Status)
            .iter()
            .filter(|r| (200..300).contains(&r.response_status))
            .filter_map(|r| r.body.as_ref()?.get("output")?.as_str().map(str::to_string))
            .collect()
    }

    pub fn wait_status(&self, timeout: Duration, needle: &str) -> bool {
        wait_until(timeout, || {
            self.statuses().iter().any(|s| s.contains(needle))
        })
    }

    /// Waits until the dashboard has `needle` *and* the agent has taken it out of its outbox
    /// on disk. A test that kills the agent right after a report arrives must wait for this:
    /// a kill between the dashboard's answer and the outbox write re-sends the report after
    /// the restart (at-least-once delivery, the documented window).
    pub fn wait_delivered(&self, timeout: Duration, needle: &str) -> bool {
        let outbox = self.state_dir.join("outbox.json");
        self.wait_status(timeout, needle)
            && wait_until(timeout, || {
                !fs::read_to_string(&outbox).is_ok_and(|s| s.contains(needle))
            })
    }

    pub fn status_bodies(&self) -> Vec<serde_json::Value> {
        self.requests(Endpoint::Status)
            .into_iter()
            .filter(|r| (200..300).contains(&r.response_status))
            .filter_map(|r| r.body)
            .collect()
    }
}

/// The agent binary running as a child; killed on drop.
pub struct AgentProcess {
    child: Child,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
}

static LOG_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl AgentProcess {
    pub fn spawn(dir: &Path, vars: &[(String, String)], args: &[&str]) -> AgentProcess {
        AgentProcess::spawn_with(dir, vars, args, |_| {})
    }

    pub fn spawn_with(
        dir: &Path,
        vars: &[(String, String)],
        args: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> AgentProcess {
        let n = LOG_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log_path = dir.join(format!("agent-{n}.log"));
        let log = fs::File::create(&log_path).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_nixfleet-agent"));
        command
            .args(args)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        customize(&mut command);
        let child = command.spawn().expect("agent binary starts");
        AgentProcess {
            child,
            log_path,
            exited: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn wait_log(&self, timeout: Duration, needle: &str) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.exited = Some(status);
                return self.exited;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(5));
    }

    /// Resident memory in KiB (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.signal(libc::SIGCONT);
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent log {} ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}
