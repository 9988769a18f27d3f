//! Linux process inspection for the instance lock, from `/proc`.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use super::ProcInfo;

/// `Ok(None)` when no process has this pid.
pub(super) fn proc_info(pid: i32) -> io::Result<Option<ProcInfo>> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    parse_stat(&stat)
        .map(Some)
        .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat")))
}

/// `pid (comm) state ppid ...`: comm may contain spaces and parentheses, so fields are counted
/// from the last `)`. After it come field 3 (state) .. field 22 (starttime, clock ticks since
/// boot), see proc_pid_stat(5).
fn parse_stat(stat: &str) -> Option<ProcInfo> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcInfo {
        zombie: matches!(*fields.first()?, "Z" | "X"),
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The executable of `pid`, without the " (deleted)" the kernel appends once the file was
/// replaced (an upgrade or a garbage-collected store path).
pub(super) fn exe(pid: i32) -> io::Result<PathBuf> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let bytes = link.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(stripped) => PathBuf::from(OsStr::from_bytes(stripped)),
        None => link,
    })
}

/// The (device, inode) of the file `pid` executes, through `/proc/<pid>/exe` (which reaches
/// the file even after it was replaced or deleted), never through a path someone wrote down.
pub(super) fn exe_identity(pid: i32) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(format!("/proc/{pid}/exe"))?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether `pid` has the file `(dev, ino)` open: one of its `/proc/<pid>/fd` entries is it.
pub(super) fn holds_open(pid: i32, file: (u64, u64)) -> io::Result<bool> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        if let Ok(meta) = std::fs::metadata(entry.path())
            && (meta.dev(), meta.ino()) == file
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A process pinned for signalling: a pidfd, so a signal can never reach a later process that
/// reused the pid.
pub(super) struct Pinned(OwnedFd);

/// Pins `pid`; `Ok(None)` when this kernel has no pidfds (before 5.3): the caller then signals
/// by pid after re-checking the start time.
pub(super) fn pin(pid: i32) -> io::Result<Option<Pinned>> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOSYS) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(Some(Pinned(unsafe { OwnedFd::from_raw_fd(fd) })))
}

pub(super) fn signal_pinned(pinned: &Pinned, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pinned.0.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_awkward_comm_parses() {
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1 2";
        let info = parse_stat(stat).unwrap();
        assert_eq!(info.start_time, 987654);
        assert!(!info.zombie);
        let zombie = "7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert!(parse_stat(zombie).unwrap().zombie);
        assert!(parse_stat("7 (x) S 1").is_none());
        assert!(parse_stat("garbage").is_none());
    }
}
