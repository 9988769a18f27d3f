//! macOS process inspection for the instance lock, from `proc_pidinfo(PROC_PIDTBSDINFO)` and
//! `proc_pidpath`. Not compiled on the Linux build hosts: keep it small and literal.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use super::ProcInfo;

/// `Ok(None)` when no process has this pid. The start time is `pbi_start_tvsec` and
/// `pbi_start_tvusec` combined into microseconds since the epoch.
pub(super) fn proc_info(pid: i32) -> io::Result<Option<ProcInfo>> {
    // SAFETY: proc_bsdinfo is plain old data; all-zero is a valid value.
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: the buffer is a live proc_bsdinfo of exactly `size` bytes.
    let n =
        unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDTBSDINFO, 0, (&raw mut info).cast(), size) };
    if n <= 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    if n != size {
        return Err(io::Error::other("short reply from proc_pidinfo"));
    }
    Ok(Some(ProcInfo {
        start_time: info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec,
        zombie: info.pbi_status == libc::SZOMB,
    }))
}

/// The executable of `pid`.
pub(super) fn exe(pid: i32) -> io::Result<PathBuf> {
    let mut buf = vec![0u8; libc::PROC_PIDPATHINFO_MAXSIZE as usize];
    // SAFETY: the buffer is live and `buf.len()` bytes long.
    let n = unsafe { libc::proc_pidpath(pid, buf.as_mut_ptr().cast(), buf.len() as u32) };
    if n <= 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsString::from_vec(buf)))
}

/// The (device, inode) of the file `pid` executes (from `proc_pidpath`, the kernel's own path).
pub(super) fn exe_identity(pid: i32) -> io::Result<(u64, u64)> {
    let meta = std::fs::metadata(exe(pid)?)?;
    Ok((meta.dev(), meta.ino()))
}

/// macOS has no cheap way to list another process's open files without libproc's fd calls;
/// the executable identity and start time must do.
pub(super) fn holds_open(_pid: i32, _file: (u64, u64)) -> io::Result<bool> {
    Ok(true)
}

/// macOS has no pidfds: signals go by pid, right after a start-time re-check. Uninhabited.
pub(super) enum Pinned {}

pub(super) fn pin(_pid: i32) -> io::Result<Option<Pinned>> {
    Ok(None)
}

pub(super) fn signal_pinned(pinned: &Pinned, _sig: libc::c_int) -> io::Result<()> {
    match *pinned {}
}
