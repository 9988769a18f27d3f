//! Descendants that left the child's process group (`setsid`, `setpgid`: a test script that
//! starts a daemon, a tool that daemonizes a helper), which one `killpg` would miss.
//!
//! On Linux they are found when a timeout fires, while the group leader still lives and the
//! tree is intact: a walk of `/proc` from the leader through parent links. Each one found is
//! pinned with a pidfd and checked against its start time, so a later signal reaches exactly
//! that process even if it exits and its pid is reused meanwhile. A descendant whose own parent
//! already died has been re-parented to PID 1 and cannot be found this way; systemd's
//! `KillMode=mixed` catches those when the agent stops.
//!
//! Elsewhere (macOS) this finds nothing and the process-group kill is all there is.

use nix::sys::signal::Signal;

/// The escaped descendants of one child, pinned.
#[derive(Debug, Default)]
pub(super) struct Escaped {
    #[cfg(target_os = "linux")]
    pinned: Vec<(i32, std::os::fd::OwnedFd)>,
}

impl Escaped {
    /// Finds the descendants of `leader` outside process group `pgid`.
    #[cfg(target_os = "linux")]
    pub(super) fn find(leader: i32, pgid: i32) -> Escaped {
        let table = linux::process_table();
        let pinned = linux::descendants(&table, leader)
            .into_iter()
            .filter(|p| p.pgrp != pgid)
            .filter_map(|p| Some((p.pid, linux::pin(&p)?)))
            .collect();
        Escaped { pinned }
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn find(_leader: i32, _pgid: i32) -> Escaped {
        Escaped::default()
    }

    pub(super) fn pids(&self) -> Vec<i32> {
        #[cfg(target_os = "linux")]
        return self.pinned.iter().map(|(pid, _)| *pid).collect();
        #[cfg(not(target_os = "linux"))]
        Vec::new()
    }

    /// Sends `signal` to every pinned process still alive.
    pub(super) fn signal(&self, signal: Signal) {
        #[cfg(target_os = "linux")]
        for (pid, fd) in &self.pinned {
            if let Err(err) = linux::pidfd_send_signal(fd, signal) {
                tracing::debug!(pid, %signal, %err, "could not signal an escaped descendant");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = signal;
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::HashMap;
    use std::io;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use nix::sys::signal::Signal;

    /// The fields of `/proc/<pid>/stat` this module needs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) struct Proc {
        pub pid: i32,
        pub ppid: i32,
        pub pgrp: i32,
        /// Clock ticks after boot: with the pid, identifies a process for good.
        pub start: u64,
    }

    /// Parses `/proc/<pid>/stat`: "pid (comm) state ppid pgrp session ... starttime ...". The
    /// command name may hold spaces and parentheses, so fields are counted after the last ')'.
    pub(super) fn parse_stat(stat: &str) -> Option<Proc> {
        let (head, rest) = stat.rsplit_once(')')?;
        let pid = head.split_whitespace().next()?.parse().ok()?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3 of the man page, so field N is at index N - 3.
        let field = |n: usize| fields.get(n - 3).copied();
        if matches!(field(3), Some("Z" | "X")) {
            return None;
        }
        Some(Proc {
            pid,
            ppid: field(4)?.parse().ok()?,
            pgrp: field(5)?.parse().ok()?,
            start: field(22)?.parse().ok()?,
        })
    }

    fn read(pid: i32) -> Option<Proc> {
        parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Every live process, from `/proc`.
    pub(super) fn process_table() -> Vec<Proc> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(read)
            .collect()
    }

    /// The descendants of `root` (not `root` itself), by parent links.
    pub(super) fn descendants(table: &[Proc], root: i32) -> Vec<Proc> {
        let mut children: HashMap<i32, Vec<Proc>> = HashMap::new();
        for p in table {
            children.entry(p.ppid).or_default().push(*p);
        }
        let mut found = Vec::new();
        let mut next = vec![root];
        while let Some(parent) = next.pop() {
            for child in children.get(&parent).into_iter().flatten() {
                // A pid cycle cannot happen in one snapshot, but a bound costs nothing.
                if found.len() < 4096 {
                    found.push(*child);
                    next.push(child.pid);
                }
            }
        }
        found
    }

    /// A pidfd for `p`, if it is still the same process (same start time) once pinned.
    pub(super) fn pin(p: &Proc) -> Option<OwnedFd> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
        let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        (read(p.pid)?.start == p.start).then_some(fd)
    }

    pub(super) fn pidfd_send_signal(fd: &OwnedFd, signal: Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // ESRCH: it is gone already, which is the point.
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(err)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stat_with_spaces_and_parens_in_the_name() {
            let stat = "4242 (my (odd) name) S 100 4242 4242 0 -1 4194560 97 0 0 0 0 0 0 0 20 0 \
                        1 0 123456 1000 100";
            assert_eq!(
                parse_stat(stat),
                Some(Proc {
                    pid: 4242,
                    ppid: 100,
                    pgrp: 4242,
                    start: 123456
                })
            );
            let zombie = stat.replace(") S ", ") Z ");
            assert_eq!(parse_stat(&zombie), None);
            assert_eq!(parse_stat("garbage"), None);
        }

        #[test]
        fn descendants_follow_parent_links_only() {
            let p = |pid, ppid, pgrp| Proc {
                pid,
                ppid,
                pgrp,
                start: 1,
            };
            let table = [
                p(10, 1, 10),
                p(11, 10, 10),
                p(12, 11, 12),
                p(13, 12, 12),
                p(20, 1, 20),
            ];
            let mut found: Vec<i32> = descendants(&table, 10).iter().map(|p| p.pid).collect();
            found.sort_unstable();
            assert_eq!(found, [11, 12, 13]);
            assert!(descendants(&table, 13).is_empty());
        }

        #[test]
        fn this_process_is_found_and_pinned() {
            let me = read(std::process::id() as i32).expect("own stat");
            assert!(process_table().iter().any(|p| p.pid == me.pid));
            assert!(pin(&me).is_some());
            let stale = Proc {
                start: me.start + 1,
                ..me
            };
            assert!(
                pin(&stale).is_none(),
                "a different start time is not pinned"
            );
        }
    }
}
