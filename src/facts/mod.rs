//! Facts about this host that go into every heartbeat: OS name and version, nixpkgs revision,
//! the config repo's HEAD (`current_generation`) and metrics.
//!
//! The rule: an idle heartbeat starts no child process. Facts that need one (`nixos-version`,
//! `sw_vers`) are gathered once at start and again after a switch ([`OsFacts::detect`]);
//! the repo HEAD is read from `.git` directly ([`read_git_head`]); metrics come from the kernel
//! ([`MetricsSampler`]). Platform code lives in `linux.rs` / `macos.rs`, chosen here.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as platform;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
use macos as platform;
pub mod reboot;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::dashboard::Metrics;
use crate::exec::{Cmd, Runner};

/// Facts that need a child process to learn; refreshed only at start and after a switch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OsFacts {
    pub os_name: Option<String>,
    pub os_version: Option<String>,
    pub nixpkgs_version: Option<String>,
}

impl OsFacts {
    /// Runs the platform's version tools (each with a short timeout) and reads its files.
    pub async fn detect(runner: &Runner, cancel: &CancellationToken) -> OsFacts {
        platform::os_facts(runner, cancel).await
    }
}

/// An id of the current boot (Linux: the kernel's boot id; macOS: the boot time); `None` if
/// unknown. A different id than the one recorded at the previous start means the host rebooted.
pub fn boot_id() -> Option<String> {
    platform::boot_id()
}

/// Runs a short query command and returns its trimmed stdout+stderr if it succeeded.
pub(crate) async fn query(
    runner: &Runner,
    cancel: &CancellationToken,
    program: &str,
    args: &[&str],
) -> Option<String> {
    let cmd = Cmd::new(program, "/", Duration::from_secs(10), program).args(args.iter().copied());
    match runner.run(cmd, cancel).await {
        Ok(outcome) if outcome.success() => Some(outcome.output.trim().to_string()),
        Ok(outcome) => {
            tracing::debug!(program, exit = outcome.exit_code(), "version query failed");
            None
        }
        Err(e) => {
            tracing::debug!(program, error = %e, "version query not available");
            None
        }
    }
}

/// Field limits of the register endpoint (contract §3.1): an over-long value is dropped rather
/// than sent, because the dashboard would refuse the whole heartbeat with 422.
pub fn limit(value: Option<String>, max_chars: usize) -> Option<String> {
    value.filter(|v| !v.is_empty() && v.chars().count() <= max_chars)
}

/// Lowercase hex SHA-256 of `<dir>/flake.lock` (v2 `lock_hash`, contract §6.4); `None` when
/// it cannot be read. Bounded: a lock file over 4 MiB is not hashed.
pub fn flake_lock_hash(dir: &Path) -> Option<String> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let file = std::fs::File::open(dir.join("flake.lock")).ok()?;
    let mut bytes = Vec::new();
    file.take(4 * 1024 * 1024 + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() > 4 * 1024 * 1024 {
        return None;
    }
    let digest = sha2::Sha256::digest(&bytes);
    Some(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// When `<dir>/flake.lock` was last updated, as the newest `lastModified` of its locked
/// inputs (unix seconds): read from the file, no git child process.
pub fn flake_lock_updated(dir: &Path) -> Option<u64> {
    use std::io::Read as _;
    let file = std::fs::File::open(dir.join("flake.lock")).ok()?;
    let mut bytes = Vec::new();
    file.take(4 * 1024 * 1024).read_to_end(&mut bytes).ok()?;
    let lock: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    lock.get("nodes")?
        .as_object()?
        .values()
        .filter_map(|node| node.get("locked")?.get("lastModified")?.as_u64())
        .max()
}

/// RFC 3339 UTC with seconds (`2026-01-25T15:04:05Z`) of a unix time.
pub fn rfc3339(unix: u64) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// The commit hash at HEAD of the git repository `dir`, read from `.git` without running git.
/// Handles detached HEADs, loose and packed refs, and `.git` files (worktrees, submodules).
pub fn read_git_head(dir: &Path) -> Option<String> {
    let git_dir = git_dir(dir)?;
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return is_hash(head).then(|| head.to_string());
    };
    let reference = reference.trim();
    // Refs may live in the common dir of a worktree.
    let common = std::fs::read_to_string(git_dir.join("commondir"))
        .ok()
        .map(|c| git_dir.join(c.trim()))
        .unwrap_or_else(|| git_dir.clone());
    for base in [&git_dir, &common] {
        if let Ok(hash) = std::fs::read_to_string(base.join(reference)) {
            let hash = hash.trim();
            if is_hash(hash) {
                return Some(hash.to_string());
            }
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|line| {
        let (hash, name) = line.split_once(' ')?;
        (name.trim() == reference && is_hash(hash)).then(|| hash.to_string())
    })
}

fn git_dir(dir: &Path) -> Option<PathBuf> {
    let dot_git = dir.join(".git");
    if dot_git.is_dir() {
        return Some(dot_git);
    }
    let text = std::fs::read_to_string(&dot_git).ok()?;
    let target = text.trim().strip_prefix("gitdir:")?.trim();
    Some(dir.join(target))
}

fn is_hash(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Samples CPU, memory, swap and load natively; CPU is the busy share since the last sample.
#[derive(Debug, Default)]
pub struct MetricsSampler {
    inner: platform::Sampler,
    /// The last sample and when it was taken: reused while fresh.
    last: Option<(std::time::Instant, Option<Metrics>)>,
}

/// How long a sample is reused. Reading `/proc/stat` makes the kernel format every interrupt
/// counter: at a 2 s interval that was a fifth of a heartbeat's CPU. The v1 dashboard wants
/// metrics under 30 s old; heartbeats at the default 30 s always sample afresh.
const METRICS_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(10);

impl MetricsSampler {
    pub fn new() -> Self {
        MetricsSampler {
            inner: platform::Sampler::new(),
            last: None,
        }
    }

    /// A sample at most [`METRICS_FRESH_FOR`] old; `None` when the kernel interface is
    /// unavailable. CPU usage is averaged since the previous real sample.
    pub fn sample(&mut self) -> Option<Metrics> {
        let now = std::time::Instant::now();
        if let Some((at, metrics)) = &self.last
            && now.duration_since(*at) < METRICS_FRESH_FOR
        {
            return metrics.clone();
        }
        let metrics = self.inner.sample();
        self.last = Some((now, metrics.clone()));
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_769_353_445), "2026-01-25T15:04:05Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn lock_update_time_is_the_newest_locked_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("flake.lock"),
            r#"{"nodes":{"a":{"locked":{"lastModified":100}},"b":{"locked":{"lastModified":300}},"root":{}},"version":7}"#,
        )
        .unwrap();
        assert_eq!(flake_lock_updated(dir.path()), Some(300));
        std::fs::write(dir.path().join("flake.lock"), "not json").unwrap();
        assert_eq!(flake_lock_updated(dir.path()), None);
    }

    #[test]
    fn git_head_from_loose_and_packed_refs_and_detached() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        let hash = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        assert_eq!(read_git_head(dir.path()), None);
        std::fs::write(
            git.join("packed-refs"),
            format!("# pack\n{hash} refs/heads/main\n"),
        )
        .unwrap();
        assert_eq!(read_git_head(dir.path()).as_deref(), Some(hash));
        let newer = "fedcba9876543210fedcba9876543210fedcba98";
        std::fs::write(git.join("refs/heads/main"), format!("{newer}\n")).unwrap();
        assert_eq!(read_git_head(dir.path()).as_deref(), Some(newer));
        std::fs::write(git.join("HEAD"), format!("{hash}\n")).unwrap();
        assert_eq!(read_git_head(dir.path()).as_deref(), Some(hash));
    }

    #[test]
    fn metrics_are_plausible() {
        let mut sampler = MetricsSampler::new();
        let m = sampler.sample().expect("metrics on this platform");
        assert!((0.0..=100.0).contains(&m.cpu), "{m:?}");
        assert!((0.0..=100.0).contains(&m.ram) && m.ram > 0.0, "{m:?}");
        assert!((0.0..=100.0).contains(&m.swap), "{m:?}");
        assert!(m.load.parse::<f64>().is_ok(), "{m:?}");
    }

    #[test]
    fn over_long_values_are_dropped() {
        assert_eq!(limit(Some("x".repeat(51)), 50), None);
        assert_eq!(limit(Some(String::new()), 50), None);
        assert_eq!(limit(Some("ok".into()), 50).as_deref(), Some("ok"));
    }
}
