//! The Unix mechanics behind [`super::Runner`]: process groups, signals, reaping, and the
//! non-blocking output pipe. Linux and macOS only use POSIX calls here (`killpg`, `waitid`,
//! `fcntl`), so there is one file for both.
//!
//! The invariant this file keeps: **the runner never signals a process group whose leader it
//! has already reaped.** A group id is the leader's pid; once the leader is reaped and the group
//! is empty, the kernel may hand that number to an unrelated process. So the reaper thread waits
//! for the exit with `WNOWAIT` (the zombie keeps the pid, hence the group id, reserved), kills
//! what is left of the group, and only then reaps, under the same lock that every other signal
//! takes.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::Exit;
use super::capture::Capture;

/// Puts the child in a new process group of its own (so one `killpg` reaches its whole tree and
/// a terminal's Ctrl-C to the agent does not reach it) and keeps `argv[0]` as the caller wrote
/// it, although the runner executes the resolved path.
pub(super) fn configure(command: &mut Command, argv0: &OsStr) {
    command.process_group(0).arg0(argv0);
}

/// Makes the child the leader of a new session (and process group), so neither the agent's
/// death nor its supervisor's group kill reaches it.
pub(super) fn detach(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
}

/// Whether `exec` could run this file: a regular file with an execute bit set.
pub(super) fn is_executable(meta: &Metadata) -> bool {
    meta.is_file() && meta.permissions().mode() & 0o111 != 0
}

pub(super) fn exit_from_status(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        // `wait` reports only exits and deaths, never stops; keep a value rather than panic.
        (None, None) => Exit::Code(-1),
    }
}

/// The child's process group, and whether its leader has been reaped.
#[derive(Debug)]
pub(super) struct Group {
    pgid: Pid,
    /// Set by the reaper thread; after that the group id is no longer ours to signal.
    reaped: Mutex<bool>,
}

impl Group {
    pub(super) fn new(leader: u32) -> Self {
        // A pid always fits in pid_t; the fallback only avoids a panic path.
        let pgid = Pid::from_raw(i32::try_from(leader).unwrap_or(i32::MAX));
        Group {
            pgid,
            reaped: Mutex::new(false),
        }
    }

    pub(super) fn pgid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Runs `f` with the group id while the leader is not reaped, so the id (a pid) cannot be
    /// reused meanwhile; `None` once it is reaped.
    pub(super) fn while_unreaped<T>(&self, f: impl FnOnce(i32) -> T) -> Option<T> {
        let reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        (!*reaped).then(|| f(self.pgid.as_raw()))
    }

    /// Sends `signal` to every process of the group unless the leader is already reaped.
    pub(super) fn signal(&self, signal: Signal) {
        let reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        if !*reaped {
            self.kill_unlocked(signal);
        }
    }

    fn kill_unlocked(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            // The group already emptied out: nothing left to stop.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(err) => tracing::debug!(pgid = self.pgid.as_raw(), %signal, %err, "killpg failed"),
        }
    }

    /// Blocks until the leader exits, SIGKILLs the rest of its group, then reaps the leader.
    fn reap(&self, mut child: Child) -> io::Result<ExitStatus> {
        let exited = wait_exited_without_reaping(self.pgid);
        let mut reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        if exited.is_ok() {
            // Leftover grandchildren would keep the output pipe open and outlive the command.
            self.kill_unlocked(Signal::SIGKILL);
        }
        let status = child.wait();
        *reaped = true;
        if exited.is_err() {
            // `waitid` failed (it should not), so the leader is reaped already; still try to
            // clear the group, accepting the tiny pid-reuse window this file otherwise avoids.
            self.kill_unlocked(Signal::SIGKILL);
        }
        status
    }
}

/// `waitid(P_PID, pid, WEXITED | WNOWAIT)`: returns once the process has exited, leaving it a
/// zombie. Not in `nix` for macOS, hence `libc`.
fn wait_exited_without_reaping(pid: Pid) -> io::Result<()> {
    let id = libc::id_t::try_from(pid.as_raw()).map_err(io::Error::other)?;
    loop {
        // SAFETY: `siginfo_t` is a plain C struct for which all-zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable `siginfo_t` that outlives the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                id,
                &raw mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// What the reaper thread reports: the leader's status, once it is reaped.
pub(super) type Reaped = oneshot::Receiver<io::Result<ExitStatus>>;

/// Starts the thread that waits for `child` (a blocking `waitid` has no async form that works on
/// both Linux and macOS; one parked thread per running child is cheap).
pub(super) fn spawn_reaper(child: Child, group: &Arc<Group>) -> io::Result<Reaped> {
    let (tx, rx) = oneshot::channel();
    let pid = group.pgid;
    let spawned = std::thread::Builder::new()
        .name(format!("exec-reap-{pid}"))
        .spawn({
            let group = Arc::clone(group);
            move || {
                // The receiver is gone when `run` was dropped; the reaping still had to happen.
                let _ = tx.send(group.reap(child));
            }
        });
    if let Err(err) = spawned {
        // The closure, and with it the `Child`, is gone; reap by pid so no zombie is left.
        group.signal(Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        *group.reaped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        return Err(err);
    }
    Ok(rx)
}

/// The read end of the child's combined stdout+stderr pipe, non-blocking and registered with
/// tokio, so reading can stop at any moment (a process outside the group may hold the write end
/// forever).
pub(super) struct OutputPipe {
    fd: AsyncFd<std::io::PipeReader>,
    buf: Vec<u8>,
    eof: bool,
}

impl OutputPipe {
    /// Needs a tokio runtime with I/O enabled (the agent's has it for its HTTP client).
    pub(super) fn new(reader: std::io::PipeReader) -> io::Result<Self> {
        // O_NONBLOCK is per open file description: the child's write end stays blocking.
        let flags = fcntl(&reader, FcntlArg::F_GETFL)?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&reader, FcntlArg::F_SETFL(flags))?;
        // SAFETY: `PipeReader` owns its descriptor and nothing else can close or replace it
        // while the `AsyncFd` owns the reader.
        let fd = unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }?;
        Ok(OutputPipe {
            fd,
            buf: vec![0; 64 * 1024],
            eof: false,
        })
    }

    /// Every write end is closed (or reading failed): nothing more will come.
    pub(super) fn eof(&self) -> bool {
        self.eof
    }

    /// Waits for data and moves one chunk into `capture`. Cancel-safe: the only await is the
    /// readiness wait, and a chunk is read and stored without yielding.
    pub(super) async fn read_into(&mut self, capture: &mut Capture) {
        let mut ready = match self.fd.readable().await {
            Ok(ready) => ready,
            Err(err) => {
                tracing::debug!(%err, "polling the child output pipe failed");
                self.eof = true;
                return;
            }
        };
        let buf = &mut self.buf;
        match ready.try_io(|fd| fd.get_ref().read(buf)) {
            Ok(Ok(0)) => self.eof = true,
            Ok(Ok(n)) => capture.push(&self.buf[..n]),
            Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(err)) => {
                tracing::debug!(%err, "reading the child output pipe failed");
                self.eof = true;
            }
            // Spurious readiness; `try_io` cleared it, the next call waits again.
            Err(_would_block) => {}
        }
    }
}
