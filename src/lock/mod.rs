//! The single-instance lock: at most one agent per state directory, and a verified takeover
//! from a predecessor that is stuck.
//!
//! The lock is `flock(2)` on `agent.lock` (std's `File::try_lock`), held for as long as the
//! [`InstanceLock`] lives and released by the kernel when the process dies, however it dies, so
//! a dead holder never leaves a stale lock and the file is never deleted (unlinking a flock file
//! races with a newcomer locking the old inode). The file also carries a `key=value` record of
//! the holder (pid, start time, executable, version) for messages and for verification.
//!
//! When the lock is busy, the holder's freshness decides: a holder whose progress file (or, if
//! that is missing or older, the lock file itself) changed within the stall threshold is
//! running ([`LockError::AlreadyRunning`]). A stale holder is signalled only after verifying that
//! its pid still belongs to the same process (start time), runs this very binary (the same
//! file by device and inode, never a path from the record) and, on Linux, has `agent.lock`
//! open; signals then go through a pidfd (Linux) pinned and re-checked after verification.
//! Otherwise [`LockError::HeldByUnverified`] and nothing is signalled. Process inspection is
//! platform code in `linux.rs` / `macos.rs`, chosen below; this module does not read config or
//! decide the threshold.

use std::ffi::CString;
use std::fmt;
use std::fs::{DirBuilder, File, Permissions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::supervisor::progress::{TOUCH_INTERVAL, age_of, progress_age};

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as platform;
#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
use macos as platform;
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
compile_error!("nixfleet-agent supports Linux and macOS only");

/// The lock file's name inside the chosen directory.
pub const LOCK_FILE: &str = "agent.lock";
/// The progress file's name inside the chosen directory (see `supervisor::progress`).
pub const PROGRESS_FILE: &str = "agent.progress";
/// The state directory's own lock (see [`lock_state_dir`]).
pub const STATE_LOCK_FILE: &str = "state.lock";

/// How long a stale holder gets to handle SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long to retry the lock after the holder was killed.
const RELOCK_WAIT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(50);

/// What the OS reports about a live pid: enough to tell it from a later process reusing the pid.
struct ProcInfo {
    /// Opaque, only compared for equality: ticks since boot on Linux, µs since the epoch on macOS.
    start_time: u64,
    /// Exited but not reaped: it no longer holds any lock.
    zombie: bool,
}

/// The process recorded in the lock file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    /// Process start time as the OS reports it (Linux: /proc/PID/stat field 22, clock ticks
    /// since boot; macOS: proc start from `proc_pidinfo`). Defeats pid reuse.
    pub start_time: u64,
    /// Wall-clock seconds since the epoch when it took the lock (its startup, give or take).
    pub started_at_unix: u64,
    pub exe: PathBuf,
    pub version: String,
}

impl Holder {
    fn current(version: &str) -> io::Result<Holder> {
        let pid = std::process::id() as i32;
        let start_time = platform::proc_info(pid)?
            .ok_or_else(|| io::Error::other("cannot find this process in the process table"))?
            .start_time;
        Ok(Holder {
            pid,
            start_time,
            started_at_unix: unix_now(),
            // Empty if unknown: verification then falls back to comparing file names.
            exe: platform::exe(pid).unwrap_or_default(),
            version: version.to_owned(),
        })
    }

    fn to_record(&self) -> String {
        format!(
            "pid={}\nstart_time={}\nstarted_at_unix={}\nexe={}\nversion={}\n",
            self.pid,
            self.start_time,
            self.started_at_unix,
            self.exe.display(),
            self.version.replace('\n', " "),
        )
    }

    /// `None` for an empty, truncated or foreign record: such a holder can never be verified.
    fn parse(record: &str) -> Option<Holder> {
        let (mut pid, mut start_time, mut started_at_unix) = (None, None, 0);
        let (mut exe, mut version) = (PathBuf::new(), String::new());
        for line in record.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "pid" => pid = value.parse::<i32>().ok(),
                "start_time" => start_time = value.parse::<u64>().ok(),
                "started_at_unix" => started_at_unix = value.parse().unwrap_or(0),
                "exe" => exe = PathBuf::from(value),
                "version" => version = value.to_owned(),
                _ => {}
            }
        }
        Some(Holder {
            pid: pid?,
            start_time: start_time?,
            started_at_unix,
            exe,
            version,
        })
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (start time {}", self.pid, self.start_time)?;
        match unix_now().checked_sub(self.started_at_unix) {
            Some(ago) if self.started_at_unix > 0 => write!(f, ", started {ago}s ago")?,
            _ => write!(f, ", started at unix time {}", self.started_at_unix)?,
        }
        if !self.version.is_empty() {
            write!(f, ", version {}", self.version)?;
        }
        if !self.exe.as_os_str().is_empty() {
            write!(f, ", {}", self.exe.display())?;
        }
        write!(f, ")")
    }
}

/// The held instance lock. Dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct InstanceLock {
    /// Holds the flock; never read, its open file description is the lock.
    #[expect(dead_code, reason = "kept open for its flock, released on drop")]
    file: File,
    path: PathBuf,
    holder: Holder,
}

impl InstanceLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this process recorded in the lock file.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }
}

/// Why the lock could not be taken. `main` maps these to exit codes (`NO_STATE_DIR`,
/// `ALREADY_RUNNING`, `FAILURE`).
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("no usable directory for the instance lock: {}", describe_tried(.tried))]
    NoUsableDir { tried: Vec<(PathBuf, String)> },
    #[error(
        "another nixfleet-agent is already running: {}, {}",
        describe_holder(.holder),
        describe_progress(.progress_age)
    )]
    AlreadyRunning {
        holder: Option<Holder>,
        progress_age: Option<Duration>,
    },
    #[error(
        "the instance lock is held by {}, which made no progress within the stall threshold but \
         could not be verified as a nixfleet-agent, so it was not signalled: {reason}",
        describe_holder(.holder)
    )]
    HeldByUnverified {
        holder: Option<Holder>,
        reason: String,
    },
    #[error(
        "stalled nixfleet-agent {holder} was stopped, but the instance lock was still held {}s \
         later (another process shares its lock file)",
        .waited.as_secs()
    )]
    StillHeld { holder: Holder, waited: Duration },
    #[error(
        "the state directory {} is in use by another nixfleet-agent ({}; its instance lock is in \
         another runtime directory, e.g. a manual `nixfleet-agent run` beside the service); \
         stop one of them",
        .dir.display(),
        .holder.as_ref().map_or_else(|| "pid unknown".to_owned(), |h| format!("pid {}", h.pid))
    )]
    StateDirInUse {
        dir: PathBuf,
        holder: Option<Holder>,
    },
    #[error("cannot use lock file {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn describe_tried(tried: &[(PathBuf, String)]) -> String {
    if tried.is_empty() {
        return "no directories were configured".to_owned();
    }
    let parts: Vec<String> = tried
        .iter()
        .map(|(dir, why)| format!("{}: {why}", dir.display()))
        .collect();
    format!("tried {}", parts.join("; "))
}

fn describe_holder(holder: &Option<Holder>) -> String {
    match holder {
        Some(holder) => holder.to_string(),
        None => "a process whose lock record is empty or unreadable".to_owned(),
    }
}

fn describe_progress(age: &Option<Duration>) -> String {
    match age {
        Some(age) => format!("last progress {}s ago", age.as_secs()),
        None => "no progress file".to_owned(),
    }
}

/// Returns the first candidate that exists or can be created (mode 0700, parents with default
/// permissions), is a directory this user may safely use, and is writable. An existing
/// directory owned by us is restricted to 0700; one owned by another user (other than a
/// root-owned directory not writable by others) is refused, since its owner could tamper with
/// the lock; so is a symbolic link (never followed, its target never chmodded) and a directory
/// below one another user could replace (`trust::check_dir`). The error names every directory
/// tried and why it was refused.
pub fn choose_dir(candidates: &[PathBuf]) -> Result<PathBuf, LockError> {
    let mut tried = Vec::new();
    for dir in candidates {
        match prepare_dir(dir) {
            Ok(()) => return Ok(dir.clone()),
            Err(why) => tried.push((dir.clone(), why)),
        }
    }
    Err(LockError::NoUsableDir { tried })
}

fn prepare_dir(dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err("not an absolute path".to_owned());
    }
    // Not `metadata`: a link is refused below, never followed (nor its target chmodded).
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("cannot create it: {e}"))?;
            }
            match DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {} // a concurrent start
                Err(e) => return Err(format!("cannot create it: {e}")),
            }
        }
        Err(e) => return Err(format!("cannot inspect it: {e}")),
    }
    // Not a link, a directory, owned by us or root, and nobody else can replace it or any
    // directory above it.
    crate::trust::check_dir(dir)?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot inspect it: {e}"))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() == me {
        if meta.mode() & 0o777 != 0o700 {
            std::fs::set_permissions(dir, Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict it to mode 0700: {e}"))?;
        }
    } else if meta.mode() & 0o022 != 0 {
        return Err("owned by root and writable by other users".to_owned());
    }
    writable(dir).map_err(|e| format!("not writable: {e}"))
}

fn writable(dir: &Path) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path. AT_EACCESS checks with the effective ids,
    // which are the ones that will create the lock file.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes the instance lock in `dir` (see the module docs). `stall_threshold` is the same
/// threshold the stall monitor uses: a holder without progress for longer is stuck.
pub fn acquire(
    dir: &Path,
    stall_threshold: Duration,
    version: &str,
) -> Result<InstanceLock, LockError> {
    let own_exe = platform::exe_identity(std::process::id() as i32);
    let lock_path = dir.join(LOCK_FILE);
    acquire_with(
        dir,
        stall_threshold,
        version,
        &Takeover::default(),
        |holder| {
            let own_exe = own_exe
                .as_ref()
                .map_err(|e| format!("cannot identify this agent's own executable: {e}"))?;
            let lock = std::fs::symlink_metadata(&lock_path)
                .map_err(|e| format!("cannot inspect {}: {e}", lock_path.display()))?;
            verify_holder(holder, *own_exe, (lock.dev(), lock.ino()))
        },
    )
}

/// Timings of the takeover, shortened in tests.
struct Takeover {
    term_grace: Duration,
    relock_wait: Duration,
}

impl Default for Takeover {
    fn default() -> Takeover {
        Takeover {
            term_grace: TERM_GRACE,
            relock_wait: RELOCK_WAIT,
        }
    }
}

/// [`acquire`] with the holder check injected, so tests can take over from helper processes.
fn acquire_with(
    dir: &Path,
    stall_threshold: Duration,
    version: &str,
    takeover: &Takeover,
    verify: impl Fn(&Holder) -> Result<(), String>,
) -> Result<InstanceLock, LockError> {
    let path = dir.join(LOCK_FILE);
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    // Relative to the checked directory's handle, never through a link; mode 0600 is only ever
    // narrowed by the umask; close-on-exec, so children never inherit (and never keep alive)
    // the lock.
    let mut file = crate::trust::open_in_dir(dir, LOCK_FILE).map_err(io_err)?;
    if try_lock(&file, &path)? {
        return locked(file, path, version);
    }

    let holder = read_holder(&mut file);
    let progress_age = progress_age(&dir.join(PROGRESS_FILE));
    // The lock file is rewritten when taken, so its age bounds how long the holder has been up:
    // a holder that just started, before its first progress touch, is not stale.
    let lock_age = file
        .metadata()
        .ok()
        .and_then(|m| m.modified().ok())
        .map(age_of);
    let freshest = progress_age.into_iter().chain(lock_age).min();
    if freshest.is_none_or(|age| age <= stall_threshold + TOUCH_INTERVAL) {
        return Err(LockError::AlreadyRunning {
            holder,
            progress_age,
        });
    }

    let unverified =
        |holder: Option<Holder>, reason: String| LockError::HeldByUnverified { holder, reason };
    let Some(holder) = holder else {
        return Err(unverified(
            None,
            "its lock record is empty or unreadable".into(),
        ));
    };
    if holder.pid <= 1 {
        let reason = format!(
            "the record names pid {}, which is never signalled",
            holder.pid
        );
        return Err(unverified(Some(holder), reason));
    }
    if holder.pid == std::process::id() as i32 {
        let reason = "the record names this very process".to_owned();
        return Err(unverified(Some(holder), reason));
    }
    if let Err(reason) = verify(&holder) {
        return Err(unverified(Some(holder), reason));
    }
    take_over(file, path, version, holder, progress_age, takeover)
}

/// Stops a verified, stalled holder and takes its lock.
fn take_over(
    file: File,
    path: PathBuf,
    version: &str,
    holder: Holder,
    progress_age: Option<Duration>,
    takeover: &Takeover,
) -> Result<InstanceLock, LockError> {
    tracing::warn!(
        pid = holder.pid,
        start_time = holder.start_time,
        version = %holder.version,
        progress_age_secs = progress_age.map(|a| a.as_secs()),
        "the instance lock is held by a stalled nixfleet-agent; stopping it",
    );
    // Pinned at once and checked again, so every signal below reaches exactly the verified
    // process (a pidfd where the OS has one) or, without pidfds, a pid re-checked right before.
    let (pinned, gone) = match platform::pin(holder.pid) {
        Ok(pinned) if is_same_live_process(&holder) => (pinned, false),
        Ok(_) => {
            let reason = format!("pid {} changed while it was being verified", holder.pid);
            return Err(LockError::HeldByUnverified {
                holder: Some(holder),
                reason,
            });
        }
        // Gone already: nothing may be signalled by pid now (it could be reused).
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => (None, true),
        Err(err) => {
            let reason = format!("cannot pin pid {}: {err}", holder.pid);
            return Err(LockError::HeldByUnverified {
                holder: Some(holder),
                reason,
            });
        }
    };
    let signal = |pid: i32, sig: libc::c_int| match &pinned {
        Some(pinned) => platform::signal_pinned(pinned, sig),
        None if gone => Err(io::Error::from_raw_os_error(libc::ESRCH)),
        None => signal(pid, sig),
    };
    match signal(holder.pid, libc::SIGTERM) {
        // A SIGSTOPped holder keeps SIGTERM pending; let it run so it can handle it. Checked
        // again first: the pid must still be the verified agent.
        Ok(()) => {
            if is_same_live_process(&holder) {
                let _ = signal(holder.pid, libc::SIGCONT);
            }
        }
        // Gone already: nothing more to signal.
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {}
        Err(err) => {
            let reason = format!("cannot signal pid {}: {err}", holder.pid);
            return Err(LockError::HeldByUnverified {
                holder: Some(holder),
                reason,
            });
        }
    }

    let started = Instant::now();
    let grace_end = started + takeover.term_grace;
    let mut have_lock = try_lock(&file, &path)?;
    while !have_lock && is_same_live_process(&holder) && Instant::now() < grace_end {
        std::thread::sleep(POLL);
        have_lock = try_lock(&file, &path)?;
    }
    if !have_lock {
        // Re-checked right here, so a pid reused during the grace period is never killed.
        if is_same_live_process(&holder) {
            tracing::warn!(
                pid = holder.pid,
                "stalled agent ignored SIGTERM; sending SIGKILL"
            );
            let _ = signal(holder.pid, libc::SIGKILL);
        }
        let relock_end = Instant::now() + takeover.relock_wait;
        while !try_lock(&file, &path)? {
            if Instant::now() >= relock_end {
                return Err(LockError::StillHeld {
                    waited: started.elapsed(),
                    holder,
                });
            }
            std::thread::sleep(POLL);
        }
    }
    replaced(file, path, version, &holder)
}

fn replaced(
    file: File,
    path: PathBuf,
    version: &str,
    holder: &Holder,
) -> Result<InstanceLock, LockError> {
    let lock = locked(file, path, version)?;
    tracing::warn!(
        replaced_pid = holder.pid,
        replaced_version = %holder.version,
        "replaced stalled nixfleet-agent {holder}",
    );
    Ok(lock)
}

/// The lock is ours: record who we are.
fn locked(mut file: File, path: PathBuf, version: &str) -> Result<InstanceLock, LockError> {
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let holder = Holder::current(version).map_err(io_err)?;
    file.set_permissions(Permissions::from_mode(0o600))
        .map_err(io_err)?;
    file.set_len(0).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    file.write_all(holder.to_record().as_bytes())
        .map_err(io_err)?;
    Ok(InstanceLock { file, path, holder })
}

/// `Ok(true)` once the lock is ours, `Ok(false)` while someone else holds it.
/// Locks `dir` (the state directory) for this process's lifetime: the instance lock lives in the
/// runtime directory, which depends on the environment (`RUNTIME_DIRECTORY`, `XDG_RUNTIME_DIR`,
/// root or not), so two agents started differently could each get one and share the outbox,
/// journal and token cache. This second flock, on `state.lock`, makes that impossible. No
/// takeover here: a stuck agent is taken over through its instance lock; one found only here
/// makes this start exit [`LockError::StateDirInUse`] (75), and the supervisor retries.
pub fn lock_state_dir(dir: &Path, version: &str) -> Result<File, LockError> {
    let path = dir.join(STATE_LOCK_FILE);
    let io_err = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = crate::trust::open_in_dir(dir, STATE_LOCK_FILE).map_err(io_err)?;
    // A predecessor just taken over through its instance lock releases this one as it exits,
    // a moment later: allow for that.
    let deadline = Instant::now() + RELOCK_WAIT;
    while !try_lock(&file, &path)? {
        if Instant::now() >= deadline {
            return Err(LockError::StateDirInUse {
                dir: dir.to_path_buf(),
                holder: read_holder(&mut file),
            });
        }
        std::thread::sleep(POLL);
    }
    let record = Holder::current(version).map_err(io_err)?.to_record();
    file.set_len(0).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    file.write_all(record.as_bytes()).map_err(io_err)?;
    Ok(file)
}

fn try_lock(file: &File, path: &Path) -> Result<bool, LockError> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(source)) => Err(LockError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// For `nixfleet-agent status`: the holder recorded in `dir`'s lock file and whether that
/// process (same pid and start time) is still alive. Only reads: never takes the lock (that
/// would make an agent starting at the same moment exit 75) and never signals.
pub fn inspect(dir: &Path) -> Option<(Holder, bool)> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    let holder = read_holder(&mut file)?;
    let alive = is_same_live_process(&holder);
    Some((holder, alive))
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut record = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64 * 1024).read_to_string(&mut record).ok()?;
    Holder::parse(&record)
}

/// The real check before signalling a holder: its pid is alive, was started at the recorded
/// time (not a reused pid), runs this very agent binary (the same file, compared by device and
/// inode through the OS, never by the path in the record), and, on Linux, has the lock file
/// `lock` open. A record naming any other process is refused, however accurate.
fn verify_holder(holder: &Holder, own_exe: (u64, u64), lock: (u64, u64)) -> Result<(), String> {
    let pid = holder.pid;
    let info = platform::proc_info(pid)
        .map_err(|e| format!("cannot inspect pid {pid}: {e}"))?
        .ok_or_else(|| format!("pid {pid} no longer exists, so another process holds the lock"))?;
    if info.start_time != holder.start_time {
        return Err(format!(
            "pid {pid} has start time {} but the record says {}: the pid was reused",
            info.start_time, holder.start_time
        ));
    }
    if info.zombie {
        return Err(format!(
            "pid {pid} has exited, so another process holds the lock"
        ));
    }
    let exe = platform::exe_identity(pid)
        .map_err(|e| format!("cannot identify the executable of pid {pid}: {e}"))?;
    if exe != own_exe {
        let path = platform::exe(pid).unwrap_or_default();
        return Err(format!(
            "pid {pid} runs {}, which is not this agent's executable (another file)",
            path.display()
        ));
    }
    match platform::holds_open(pid, lock) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "pid {pid} does not have the lock file open, so it is not the holder"
        )),
        Err(e) => Err(format!("cannot list the open files of pid {pid}: {e}")),
    }
}

/// Whether the holder's pid still names the same, unexited process. Unknown counts as no, so a
/// failed check never leads to a SIGKILL.
fn is_same_live_process(holder: &Holder) -> bool {
    matches!(
        platform::proc_info(holder.pid),
        Ok(Some(info)) if info.start_time == holder.start_time && !info.zombie
    )
}

fn signal(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions; callers never pass pid <= 1.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests start real helper processes directly to observe them"
)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};

    use super::*;
    use crate::supervisor::progress::Progress;

    const HOLDER_ENV: &str = "NIXFLEET_AGENT_TEST_LOCK_HOLDER";
    const IGNORE_TERM_ENV: &str = "NIXFLEET_AGENT_TEST_IGNORE_TERM";
    const THRESHOLD: Duration = Duration::from_secs(1);

    /// Runs only inside the helper started by [`spawn_holder`]: takes the lock file's flock,
    /// says so on stdout, and sleeps until killed.
    #[test]
    fn lock_holder_child_entry() {
        let Some(path) = std::env::var_os(HOLDER_ENV) else {
            return;
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        file.try_lock().unwrap();
        if std::env::var_os(IGNORE_TERM_ENV).is_some() {
            // SAFETY: installing SIG_IGN has no preconditions.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
        }
        println!("\nholder-locked");
        io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(30));
    }

    /// A real process holding the lock; killed and reaped on drop if the test did not.
    struct HelperProcess(Child);

    impl HelperProcess {
        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for HelperProcess {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn_holder(lock_path: &Path, ignore_term: bool) -> HelperProcess {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "lock::tests::lock_holder_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, lock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        if ignore_term {
            cmd.env(IGNORE_TERM_ENV, "1");
        }
        let mut child = HelperProcess(cmd.spawn().unwrap());
        let mut stdout = io::BufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert_ne!(
                stdout.read_line(&mut line).unwrap(),
                0,
                "helper exited early"
            );
            if line.trim_end().ends_with("holder-locked") {
                return child;
            }
        }
    }

    fn write_record(dir: &Path, holder: &Holder) {
        std::fs::write(dir.join(LOCK_FILE), holder.to_record()).unwrap();
    }

    /// Makes both the lock file and the progress file an hour old.
    fn make_stale(dir: &Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        for name in [LOCK_FILE, PROGRESS_FILE] {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(name))
                .unwrap();
            file.set_modified(old).unwrap();
        }
    }

    fn record_for(pid: i32, version: &str) -> Holder {
        Holder {
            pid,
            start_time: platform::proc_info(pid).unwrap().unwrap().start_time,
            started_at_unix: unix_now() - 7200,
            exe: platform::exe(pid).unwrap(),
            version: version.to_owned(),
        }
    }

    fn quick() -> Takeover {
        Takeover {
            term_grace: Duration::from_millis(300),
            relock_wait: Duration::from_secs(2),
        }
    }

    fn own_exe() -> PathBuf {
        platform::exe(std::process::id() as i32).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn choose_dir_creates_a_private_dir_and_tightens_an_existing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("state/nixfleet-agent");
        assert_eq!(choose_dir(std::slice::from_ref(&fresh)).unwrap(), fresh);
        assert!(fresh.is_dir());
        assert_eq!(mode(&fresh), 0o700);

        let existing = tmp.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        std::fs::set_permissions(&existing, Permissions::from_mode(0o755)).unwrap();
        let chosen = choose_dir(&[existing.clone(), fresh]).unwrap();
        assert_eq!(chosen, existing);
        assert_eq!(mode(&existing), 0o700);
    }

    #[test]
    fn choose_dir_names_every_dir_it_tried() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let under_file = file.join("state");
        let tried = [under_file.clone(), file.clone(), PathBuf::from("relative")];
        let err = choose_dir(&tried).unwrap_err();
        let LockError::NoUsableDir { tried: reasons } = &err else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(reasons.len(), 3);
        let message = err.to_string();
        assert!(message.starts_with("no usable directory for the instance lock: tried "));
        assert!(
            message.contains(&format!(
                "{}: cannot inspect it: Not a directory",
                under_file.display()
            )),
            "{message}"
        );
        assert!(
            message.contains(&format!(
                "{}: exists but is not a directory",
                file.display()
            )),
            "{message}"
        );
        assert!(
            message.contains("relative: not an absolute path"),
            "{message}"
        );
    }

    #[test]
    fn acquire_writes_the_holder_record() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path(), THRESHOLD, "1.2.3").unwrap();
        assert_eq!(lock.path(), dir.path().join(LOCK_FILE));
        assert_eq!(mode(lock.path()), 0o600);
        let holder = lock.holder();
        assert_eq!(holder.pid, std::process::id() as i32);
        assert_eq!(holder.exe, own_exe());
        assert_eq!(holder.version, "1.2.3");
        let record = std::fs::read_to_string(lock.path()).unwrap();
        assert!(
            record.starts_with(&format!("pid={}\nstart_time=", holder.pid)),
            "{record}"
        );
        assert_eq!(Holder::parse(&record).as_ref(), Some(holder));
    }

    #[test]
    fn second_acquire_in_one_process_conflicts_and_never_signals_itself() {
        let dir = tempfile::tempdir().unwrap();
        let first = acquire(dir.path(), THRESHOLD, "1.0").unwrap();
        let _progress = Progress::try_new(&dir.path().join(PROGRESS_FILE)).unwrap();

        // flock is per open file description: a second open() in the same process conflicts.
        let err = acquire(dir.path(), THRESHOLD, "2.0").unwrap_err();
        let LockError::AlreadyRunning {
            holder,
            progress_age,
        } = &err
        else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(holder.as_ref(), Some(first.holder()));
        assert!(progress_age.unwrap() < Duration::from_secs(2));
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "another nixfleet-agent is already running: pid {} (start time {}, started ",
                first.holder().pid,
                first.holder().start_time
            )),
            "{message}"
        );
        assert!(message.ends_with("last progress 0s ago"), "{message}");

        make_stale(dir.path());
        let err = acquire(dir.path(), THRESHOLD, "2.0").unwrap_err();
        assert!(
            matches!(&err, LockError::HeldByUnverified { reason, .. } if reason.contains("this very process")),
            "{err:?}"
        );
        drop(first);
        acquire(dir.path(), THRESHOLD, "2.0").unwrap();
    }

    #[test]
    fn lock_is_released_when_the_holder_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut helper = spawn_holder(&dir.path().join(LOCK_FILE), false);
        // Empty record, no progress file, but a young lock file: treated as running.
        let err = acquire(dir.path(), THRESHOLD, "1.0").unwrap_err();
        assert!(
            matches!(
                err,
                LockError::AlreadyRunning {
                    holder: None,
                    progress_age: None
                }
            ),
            "{err:?}"
        );
        helper.0.kill().unwrap();
        helper.0.wait().unwrap();
        let lock = acquire(dir.path(), THRESHOLD, "1.0").unwrap();
        assert_eq!(lock.holder().pid, std::process::id() as i32);
    }

    #[test]
    fn stale_holder_with_a_reused_pid_or_foreign_exe_is_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let _helper = spawn_holder(&dir.path().join(LOCK_FILE), false);
        let mut sleep = HelperProcess(
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let sleep_pid = sleep.pid();
        let real_start = platform::proc_info(sleep_pid).unwrap().unwrap().start_time;

        // The pid was "reused": the record's start time is not the sleep's.
        let mut record = Holder {
            pid: sleep_pid,
            start_time: real_start + 1,
            started_at_unix: unix_now() - 7200,
            exe: own_exe(),
            version: "0.9".into(),
        };
        write_record(dir.path(), &record);
        make_stale(dir.path());
        let err = acquire(dir.path(), THRESHOLD, "1.0").unwrap_err();
        let LockError::HeldByUnverified { holder, reason } = &err else {
            panic!("unexpected {err:?}");
        };
        assert_eq!(holder.as_ref(), Some(&record));
        assert!(reason.contains("the pid was reused"), "{reason}");
        assert!(
            err.to_string()
                .contains(&format!("pid {sleep_pid} (start time {}", real_start + 1)),
            "{err}"
        );

        // Right start time, but the process is not this program.
        record.start_time = real_start;
        write_record(dir.path(), &record);
        make_stale(dir.path());
        let err = acquire(dir.path(), THRESHOLD, "1.0").unwrap_err();
        assert!(
            matches!(&err, LockError::HeldByUnverified { reason, .. } if reason.contains("not this agent's executable")),
            "{err:?}"
        );

        // Garbage record.
        std::fs::write(dir.path().join(LOCK_FILE), "\0\0garbage").unwrap();
        make_stale(dir.path());
        let err = acquire(dir.path(), THRESHOLD, "1.0").unwrap_err();
        assert!(
            matches!(&err, LockError::HeldByUnverified { holder: None, .. }),
            "{err:?}"
        );

        std::thread::sleep(Duration::from_millis(100));
        assert!(sleep.0.try_wait().unwrap().is_none(), "sleep was signalled");
        assert!(is_same_live_process(&record));
    }

    #[test]
    fn record_naming_init_is_refused_before_verification() {
        let dir = tempfile::tempdir().unwrap();
        let _helper = spawn_holder(&dir.path().join(LOCK_FILE), false);
        let record = Holder {
            pid: 1,
            start_time: 1,
            started_at_unix: 1,
            exe: own_exe(),
            version: String::new(),
        };
        write_record(dir.path(), &record);
        make_stale(dir.path());
        let err = acquire_with(dir.path(), THRESHOLD, "1.0", &quick(), |_| {
            panic!("verification must not be reached")
        })
        .unwrap_err();
        assert!(
            matches!(&err, LockError::HeldByUnverified { reason, .. } if reason.contains("never signalled")),
            "{err:?}"
        );
    }

    #[test]
    fn stopped_stale_agent_is_terminated_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut helper = spawn_holder(&dir.path().join(LOCK_FILE), false);
        // The helper is this test binary, so the real verifier accepts it.
        write_record(dir.path(), &record_for(helper.pid(), "0.9"));
        make_stale(dir.path());
        signal(helper.pid(), libc::SIGSTOP).unwrap();

        let started = Instant::now();
        let lock = acquire(dir.path(), THRESHOLD, "1.0").unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(lock.holder().pid, std::process::id() as i32);
        assert_eq!(lock.holder().version, "1.0");
        let status = helper.0.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}");
    }

    #[test]
    fn stale_agent_ignoring_sigterm_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut helper = spawn_holder(&dir.path().join(LOCK_FILE), true);
        write_record(dir.path(), &record_for(helper.pid(), "0.9"));
        make_stale(dir.path());
        signal(helper.pid(), libc::SIGSTOP).unwrap();

        let verified = std::cell::Cell::new(false);
        let lock = acquire_with(dir.path(), THRESHOLD, "1.0", &quick(), |holder| {
            verified.set(true);
            assert_eq!(holder.version, "0.9");
            Ok(())
        })
        .unwrap();
        assert!(verified.get());
        assert_eq!(lock.holder().pid, std::process::id() as i32);
        let status = helper.0.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    fn own_identity() -> (u64, u64) {
        platform::exe_identity(std::process::id() as i32).unwrap()
    }

    #[test]
    fn verifier_accepts_this_process_and_rejects_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        let lock = acquire(dir.path(), THRESHOLD, "test").unwrap();
        let meta = std::fs::metadata(lock.path()).unwrap();
        let lock_id = (meta.dev(), meta.ino());
        let me = Holder::current("test").unwrap();
        assert_eq!(verify_holder(&me, own_identity(), lock_id), Ok(()));

        let reused = Holder {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        let reason = verify_holder(&reused, own_identity(), lock_id).unwrap_err();
        assert!(reason.contains("the pid was reused"), "{reason}");

        // The path in the record does not matter, the running file does.
        let other_path = Holder {
            exe: PathBuf::from("/nonexistent/other-program"),
            ..me.clone()
        };
        assert_eq!(verify_holder(&other_path, own_identity(), lock_id), Ok(()));
        let (dev, ino) = own_identity();
        let reason = verify_holder(&me, (dev, ino + 1), lock_id).unwrap_err();
        assert!(reason.contains("not this agent's executable"), "{reason}");
        if cfg!(target_os = "linux") {
            let reason =
                verify_holder(&me, own_identity(), (lock_id.0, lock_id.1 + 1)).unwrap_err();
            assert!(
                reason.contains("does not have the lock file open"),
                "{reason}"
            );
        }
    }

    /// Issue 10, item 1: a lock file that is a link is never followed: nothing is written to
    /// its target, and the start fails (exit 73 in `cli`).
    #[test]
    fn planted_lock_file_link_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::symlink(&victim, run.join(LOCK_FILE)).unwrap();
        std::os::unix::fs::symlink(&victim, run.join(STATE_LOCK_FILE)).unwrap();
        let err = acquire(&run, THRESHOLD, "1.0").unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err:?}");
        let err = lock_state_dir(&run, "1.0").unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    /// Issue 10, item 3: a record naming an unrelated process with its exact pid, start time
    /// and executable path is refused, and that process is left alone.
    #[test]
    fn accurate_record_of_another_program_is_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let _helper = spawn_holder(&dir.path().join(LOCK_FILE), false);
        let mut sleep = HelperProcess(
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let record = record_for(sleep.pid(), "0.9");
        assert!(record.exe.ends_with("sleep"), "{record:?}");
        write_record(dir.path(), &record);
        make_stale(dir.path());
        let err = acquire(dir.path(), THRESHOLD, "1.0").unwrap_err();
        assert!(
            matches!(&err, LockError::HeldByUnverified { reason, .. } if reason.contains("not this agent's executable")),
            "{err:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(sleep.0.try_wait().unwrap().is_none(), "sleep was signalled");
    }

    /// Issue 10, item 3 (Linux): another instance of this very binary that does not hold the
    /// lock file open is not the holder, and is never signalled.
    #[cfg(target_os = "linux")]
    #[test]
    fn agent_binary_not_holding_the_lock_is_never_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let _holder = spawn_holder(&dir.path().join(LOCK_FILE), false);
        let other_dir = tempfile::tempdir().unwrap();
        let mut bystander = spawn_holder(&other_dir.path().join(LOCK_FILE), false);
        write_record(dir.path(), &record_for(bystander.pid(), "0.9"));
        make_stale(dir.path());
        let err = acquire(dir.path(), THRESHOLD, "1.0").unwrap_err();
        assert!(
            matches!(&err, LockError::HeldByUnverified { reason, .. } if reason.contains("does not have the lock file open")),
            "{err:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            bystander.0.try_wait().unwrap().is_none(),
            "the bystander was signalled"
        );
    }

    #[test]
    fn holder_record_round_trips_and_rejects_garbage() {
        let holder = Holder {
            pid: 42,
            start_time: 123456,
            started_at_unix: 1_700_000_000,
            exe: PathBuf::from("/nix/store/abc-nixfleet-agent/bin/nixfleet-agent"),
            version: "0.1.0".into(),
        };
        assert_eq!(Holder::parse(&holder.to_record()), Some(holder));
        assert_eq!(Holder::parse(""), None);
        assert_eq!(Holder::parse("pid=12\n"), None);
        assert_eq!(Holder::parse("pid=x\nstart_time=1\n"), None);
        assert_eq!(
            Holder::parse("start_time=9\npid=12\n").map(|h| (h.pid, h.start_time)),
            Some((12, 9))
        );
    }
}

/// Issue 10, item 10: property tests over the lock record.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_lock_record_parses_or_is_none(record in any::<String>()) {
            if let Some(holder) = Holder::parse(&record) {
                let _ = holder.to_string();
            }
        }

        #[test]
        fn holder_records_round_trip(
            pid in any::<i32>(), start_time in any::<u64>(), started_at_unix in any::<u64>(),
            exe in "[^\n\r\u{0}]{0,40}", version in "[^\n\r]{0,20}"
        ) {
            let holder = Holder { pid, start_time, started_at_unix, exe: PathBuf::from(exe), version };
            prop_assert_eq!(Holder::parse(&holder.to_record()), Some(holder));
        }
    }
}
