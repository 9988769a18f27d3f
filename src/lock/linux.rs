//! Linux process inspection for the instance lock, from `/proc`.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
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
