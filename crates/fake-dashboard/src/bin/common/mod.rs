//! Shared by `nixfleet-demo` and `nixfleet-bench`: finding the agent binary, throwaway git
//! repositories, stand-in tools, and starting the agent against the fake dashboard.
//!
//! Not a binary of its own (Cargo only discovers `src/bin/*.rs` and `src/bin/*/main.rs`).

#![allow(dead_code, reason = "each binary uses a different part of this module")]

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The host id every run uses.
pub const HOST: &str = "demo-host";

/// The shared (fleet-wide) token the fake dashboard accepts.
pub const SHARED_TOKEN: &str = "demo-shared-token-0123456789";

/// The agent binary: `--agent PATH` if given, else `nixfleet-agent` next to this executable.
pub fn locate_agent(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("--agent {}: no such file", path.display()))
        };
    }
    let me = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let dir = me
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", me.display()))?;
    let agent = dir.join("nixfleet-agent");
    if agent.is_file() {
        Ok(agent)
    } else {
        Err(format!(
            "no agent binary at {}; build it first: cargo build --workspace \
             (or pass --agent PATH)",
            agent.display()
        ))
    }
}

/// "release", "debug" or the custom profile name, guessed from `target/<profile>/`.
pub fn build_profile(agent: &Path) -> String {
    let dir = agent
        .parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match dir.as_str() {
        "release" | "debug" => dir,
        "" => "unknown".into(),
        other => format!("unknown (in {other}/)"),
    }
}

/// A path shown relative to the current directory when it is below it.
pub fn pretty_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// Runs git with a fixed identity and no user or system config; the trimmed stdout.
pub fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Demo Operator")
        .env("GIT_AUTHOR_EMAIL", "ops@example.org")
        .env("GIT_COMMITTER_NAME", "Demo Operator")
        .env("GIT_COMMITTER_EMAIL", "ops@example.org")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run git (is it installed?): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git {} in {} failed: {}{}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Writes `body` to `path` with mode 0755, creating parent directories.
pub fn write_executable(path: &Path, body: &str) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(fail)?;
    }
    fs::write(path, body).map_err(fail)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(fail)
}

/// A bare origin, a developer clone that pushes to it, and the host's checkout.
pub struct Repos {
    pub origin: PathBuf,
    pub dev: PathBuf,
    pub checkout: PathBuf,
}

impl Repos {
    /// Creates the three repositories under `root`; the first commit holds `files`
    /// (`*.sh` become executable).
    pub fn create(root: &Path, files: &[(&str, &str)]) -> Result<Repos, String> {
        let origin = root.join("origin.git");
        let dev = root.join("dev");
        let checkout = root.join("checkout");
        for dir in [&origin, &dev] {
            fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        }
        git(&origin, &["init", "-q", "--bare", "-b", "main"])?;
        git(&dev, &["init", "-q", "-b", "main"])?;
        let repos = Repos {
            origin,
            dev,
            checkout,
        };
        repos.write_files(files)?;
        git(&repos.dev, &["add", "."])?;
        git(
            &repos.dev,
            &["commit", "-q", "-m", "Initial fleet configuration"],
        )?;
        let origin_str = repos.origin.display().to_string();
        git(&repos.dev, &["remote", "add", "origin", &origin_str])?;
        git(&repos.dev, &["push", "-q", "origin", "main"])?;
        git(root, &["clone", "-q", &origin_str, "checkout"])?;
        Ok(repos)
    }

    fn write_files(&self, files: &[(&str, &str)]) -> Result<(), String> {
        for (name, content) in files {
            let path = self.dev.join(name);
            if name.ends_with(".sh") {
                write_executable(&path, content)?;
            } else {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent)
                        .map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
                }
                fs::write(&path, content).map_err(|e| format!("write {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Commits `files` in the developer clone and pushes to origin; returns the new HEAD.
    pub fn push_commit(&self, message: &str, files: &[(&str, &str)]) -> Result<String, String> {
        self.write_files(files)?;
        git(&self.dev, &["add", "."])?;
        git(&self.dev, &["commit", "-q", "-m", message])?;
        git(&self.dev, &["push", "-q", "origin", "main"])?;
        git(&self.dev, &["rev-parse", "HEAD"])
    }

    /// HEAD of the host's checkout.
    pub fn checkout_head(&self) -> Result<String, String> {
        git(&self.checkout, &["rev-parse", "HEAD"])
    }
}

/// The environment of an agent run against `url` in `root` (state, runtime and home below it),
/// with `bin_dir` first on PATH. Everything else is cleared.
pub fn agent_env(url: &str, root: &Path, bin_dir: &Path) -> Result<Vec<(String, String)>, String> {
    let token_file = root.join("token");
    fs::write(&token_file, format!("{SHARED_TOKEN}\n"))
        .map_err(|e| format!("write {}: {e}", token_file.display()))?;
    let home = root.join("home");
    fs::create_dir_all(&home).map_err(|e| format!("mkdir {}: {e}", home.display()))?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
    );
    Ok(vec![
        ("NIXFLEET_URL".into(), url.into()),
        ("NIXFLEET_ALLOW_INSECURE_HTTP".into(), "1".into()),
        (
            "NIXFLEET_TOKEN_FILE".into(),
            token_file.display().to_string(),
        ),
        ("NIXFLEET_HOSTNAME".into(), HOST.into()),
        ("NIXFLEET_INTERVAL".into(), "1".into()),
        (
            "NIXFLEET_STATE_DIR".into(),
            root.join("state").display().to_string(),
        ),
        (
            "NIXFLEET_RUNTIME_DIR".into(),
            root.join("run").display().to_string(),
        ),
        ("NIXFLEET_SWITCH_MODE".into(), "nixos".into()),
        ("NIXFLEET_LOG".into(), "info".into()),
        ("PATH".into(), path),
        ("HOME".into(), home.display().to_string()),
        ("USER".into(), "root".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ])
}

/// Sets (or replaces) one variable in an environment list.
pub fn set_var(vars: &mut Vec<(String, String)>, key: &str, value: impl Into<String>) {
    vars.retain(|(k, _)| k != key);
    vars.push((key.into(), value.into()));
}

/// Where the agent's stdout/stderr go.
pub enum Output {
    /// Both piped (read them with `take_output`).
    Piped,
    /// Both appended to this file.
    File(PathBuf),
}

/// The agent as a child process; SIGKILLed on drop unless it already exited.
pub struct Agent {
    pub child: Child,
    pub spawned_at: Instant,
    pub spawned_wall: std::time::SystemTime,
    exited: Option<ExitStatus>,
}

impl Agent {
    pub fn spawn(
        binary: &Path,
        vars: &[(String, String)],
        output: Output,
    ) -> Result<Agent, String> {
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .env_clear()
            .envs(
                vars.iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            )
            .stdin(Stdio::null());
        match output {
            Output::Piped => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            Output::File(path) => {
                let file = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("open {}: {e}", path.display()))?;
                let clone = file
                    .try_clone()
                    .map_err(|e| format!("dup {}: {e}", path.display()))?;
                cmd.stdout(clone).stderr(file);
            }
        }
        let spawned_wall = std::time::SystemTime::now();
        let spawned_at = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Agent {
            child,
            spawned_at,
            spawned_wall,
            exited: None,
        })
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own, not yet reaped child: the pid cannot have been reused.
        if self.exited.is_none() {
            unsafe {
                libc::kill(self.pid(), signal);
            }
        }
    }

    /// Waits up to `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    return self.exited;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => return None,
            }
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.signal(libc::SIGTERM);
        if self.wait_exit(grace).is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.wait_exit(Duration::from_secs(5));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// `shar…(28 chars)`: enough to tell tokens apart, never the secret.
pub fn mask_token(token: &str) -> String {
    let head: String = token.chars().take(4).collect();
    format!("{head}…({} chars)", token.chars().count())
}

/// The first 10 characters of a commit id.
pub fn short_sha(sha: &str) -> &str {
    sha.get(..10).unwrap_or(sha)
}

/// Polls `cond` every 10 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
