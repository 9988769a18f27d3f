//! Proof that the main loop is moving: a monotonic heartbeat in memory plus, for other
//! processes, the mtime of a progress file.
//!
//! The main loop is the only writer ([`Progress::beat`], [`Progress::set_activity`]); the stall
//! monitor thread and a second agent instance (through [`progress_age`]) are readers. `beat` is on
//! the hot path and must never allocate or block: an atomic store, and at most every
//! [`TOUCH_INTERVAL`] one `futimens` on a file descriptor opened once. This module does not decide
//! what "stalled" means; the stall monitor and the instance lock do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant, SystemTime};

/// How often [`Progress::beat`] refreshes the progress file's mtime at most. Readers in other
/// processes must allow this much extra age before calling a holder stale.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(5);

/// How often the main loop beats at least, even when idle: a third of the stall threshold,
/// at most 45 s (so `nixfleet-agent status` can tell "stuck" within a minute), at least
/// 100 ms. The loop has no fixed tick; this is one of the deadlines it sleeps until.
pub fn beat_period(stall_timeout: Duration) -> Duration {
    (stall_timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(45))
}

/// A progress file older than this means the loop is not moving: a healthy loop touches it at
/// least every [`beat_period`] (throttled to [`TOUCH_INTERVAL`]), plus a margin.
pub fn stuck_after(stall_timeout: Duration) -> Duration {
    beat_period(stall_timeout) + TOUCH_INTERVAL + Duration::from_secs(5)
}

/// Longest activity text kept; the stall report is written from a fixed-size stack buffer.
const MAX_ACTIVITY_BYTES: usize = 200;

/// Main-loop liveness shared between the loop (writer) and its observers (readers).
#[derive(Debug)]
pub struct Progress {
    /// Origin for the nanosecond counters below: `Instant` is monotonic and, on Linux and macOS,
    /// does not advance while the machine is suspended, so a laptop lid does not look like a stall.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last beat.
    last_beat_ns: AtomicU64,
    /// The main loop has beaten at least once (start-up is over).
    beaten: AtomicBool,
    /// Nanoseconds after `epoch` of the last progress-file touch.
    last_touch_ns: AtomicU64,
    /// Kept open so a touch is one syscall with no path lookup or allocation.
    file: Option<File>,
    path: Option<PathBuf>,
    /// Set once a touch failed, so the failure is logged once rather than every 5 s.
    touch_failed: AtomicBool,
    /// What the main loop is doing, for the stall report and `systemctl status`.
    activity: Mutex<String>,
}

impl Progress {
    /// Starts the heartbeat now and creates (mode 0600) or refreshes `progress_file` if given.
    /// A file that cannot be created is logged and skipped: other instances then judge this
    /// agent by its lock file's age, which only errs towards "already running".
    pub fn new(progress_file: Option<PathBuf>) -> Arc<Progress> {
        match progress_file {
            None => Arc::new(Progress::with_file(None, None)),
            Some(path) => Progress::try_new(&path).unwrap_or_else(|err| {
                tracing::warn!(
                    path = %path.display(),
                    "cannot create the progress file, continuing without it: {err}"
                );
                Arc::new(Progress::with_file(None, None))
            }),
        }
    }

    /// Like [`Progress::new`] with a file, but returns the error instead of logging it.
    pub fn try_new(progress_file: &Path) -> io::Result<Arc<Progress>> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(progress_file)?;
        // A file left by an older run may have looser permissions; `mode` only applies on create.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.set_modified(SystemTime::now())?;
        Ok(Arc::new(Progress::with_file(
            Some(file),
            Some(progress_file.to_path_buf()),
        )))
    }

    fn with_file(file: Option<File>, path: Option<PathBuf>) -> Progress {
        Progress {
            epoch: Instant::now(),
            last_beat_ns: AtomicU64::new(0),
            beaten: AtomicBool::new(false),
            last_touch_ns: AtomicU64::new(0),
            file,
            path,
            touch_failed: AtomicBool::new(false),
            activity: Mutex::new(String::from("starting")),
        }
    }

    /// Records that the main loop completed an iteration. Call at least once a second.
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    fn beat_at(&self, now: Instant) {
        let now_ns = self.nanos(now);
        self.last_beat_ns.store(now_ns, Ordering::Release);
        self.beaten.store(true, Ordering::Release);
        let Some(file) = &self.file else { return };
        let last = self.last_touch_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(last) < TOUCH_INTERVAL.as_nanos() as u64 {
            return;
        }
        if self
            .last_touch_ns
            .compare_exchange(last, now_ns, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return; // another beat is touching right now
        }
        if let Err(err) = file.set_modified(SystemTime::now())
            && !self.touch_failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                path = ?self.path,
                "cannot update the progress file's mtime: {err}"
            );
        }
    }

    /// Whether the main loop has beaten yet (false during start-up).
    pub fn has_beaten(&self) -> bool {
        self.beaten.load(Ordering::Acquire)
    }

    /// Describes what the main loop is doing ("idle", "running switch: nixos-rebuild").
    pub fn set_activity(&self, activity: &str) {
        let mut text = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        text.clear();
        text.push_str(crate::text::prefix_within(activity, MAX_ACTIVITY_BYTES));
    }

    /// The last text given to [`Progress::set_activity`].
    pub fn activity(&self) -> String {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Calls `f` with the activity without ever blocking or allocating: the stall monitor runs
    /// this while the main thread may be wedged anywhere.
    pub(super) fn with_activity_nonblocking<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        match self.activity.try_lock() {
            Ok(text) => f(&text),
            Err(TryLockError::Poisoned(p)) => f(&p.into_inner()),
            Err(TryLockError::WouldBlock) => f("unknown (activity is being updated)"),
        }
    }

    /// Time since the last [`Progress::beat`] (or since creation).
    pub fn since_last_beat(&self) -> Duration {
        let now_ns = self.nanos(Instant::now());
        Duration::from_nanos(now_ns.saturating_sub(self.last_beat_ns.load(Ordering::Acquire)))
    }

    /// The progress file, if one is kept.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// How long ago another process last touched `progress_file` (now − mtime). `None` if the file
/// does not exist or has no readable mtime; an mtime in the future counts as fresh.
pub fn progress_age(progress_file: &Path) -> Option<Duration> {
    let mtime = std::fs::metadata(progress_file).ok()?.modified().ok()?;
    Some(age_of(mtime))
}

/// Now − `t`, zero when `t` is in the future (a clock stepped back must never look stale).
pub(crate) fn age_of(t: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn mtime(path: &Path) -> SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn beat_resets_since_last_beat() {
        let progress = Progress::new(None);
        std::thread::sleep(Duration::from_millis(30));
        assert!(progress.since_last_beat() >= Duration::from_millis(30));
        progress.beat();
        assert!(progress.since_last_beat() < Duration::from_millis(30));
    }

    #[test]
    fn progress_file_is_private_and_its_touch_is_throttled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.progress");
        let progress = Progress::try_new(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(progress_age(&path).unwrap() < Duration::from_secs(2));

        let old = SystemTime::now() - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        progress.beat();
        assert_eq!(
            mtime(&path),
            old,
            "a beat within 5 s of the last touch must not touch"
        );
        assert!(progress_age(&path).unwrap() >= Duration::from_secs(59));

        progress.beat_at(Instant::now() + TOUCH_INTERVAL + Duration::from_secs(1));
        assert!(progress_age(&path).unwrap() < Duration::from_secs(2));
    }

    #[test]
    fn existing_progress_file_is_refreshed_and_restricted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.progress");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
        let progress = Progress::new(Some(path.clone()));
        assert_eq!(progress.path(), Some(path.as_path()));
        assert!(progress_age(&path).unwrap() < Duration::from_secs(2));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn missing_progress_file_has_no_age() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(progress_age(&dir.path().join("nope")), None);
    }

    #[test]
    fn activity_is_kept_and_bounded() {
        let progress = Progress::new(None);
        assert_eq!(progress.activity(), "starting");
        progress.set_activity("waiting for heartbeat reply");
        assert_eq!(progress.activity(), "waiting for heartbeat reply");
        assert_eq!(
            progress.with_activity_nonblocking(str::to_owned),
            "waiting for heartbeat reply"
        );
        progress.set_activity(&"é".repeat(300));
        assert!(progress.activity().len() <= MAX_ACTIVITY_BYTES);
        assert!(progress.activity().starts_with('é'));
    }
}
