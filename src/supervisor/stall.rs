//! The in-process stall monitor: an OS thread that ends the agent when the main loop stops
//! beating, so systemd or launchd restarts it.
//!
//! It is a plain thread, not a tokio task, so it keeps running when the runtime itself is
//! wedged. Its abort path must work no matter what the wedged thread holds: it takes no locks
//! that could block (the activity is read with `try_lock`), does not allocate, and bypasses
//! `tracing` and std's stderr lock by writing one line to fd 2 with `libc::write` before
//! `libc::_exit(exit::STALLED)`. It never tries to recover in-process.

use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::progress::Progress;
use crate::exit;

/// How late after the stall deadline the monitor may look: it sleeps until the deadline the
/// last beat implies, plus this margin, then checks again (a beat meanwhile moves the
/// deadline). Never shorter than this, so a beat exactly at the deadline is no busy loop.
const MARGIN: Duration = Duration::from_millis(50);

/// Until the main loop first beats, start-up (system CA store, state files, OS facts, whose
/// child has a 10 s timeout) may take this long even with a small `NIXFLEET_STALL_TIMEOUT`:
/// every start-up step is bounded, and a low threshold must not make every start exit 70.
const STARTUP_ALLOWANCE: Duration = Duration::from_secs(30);

/// The stall threshold in force: the configured one once the loop runs.
fn limit(threshold: Duration, loop_started: bool) -> Duration {
    if loop_started {
        threshold
    } else {
        threshold.max(STARTUP_ALLOWANCE)
    }
}

/// Starts the monitor thread. It sleeps until the stall deadline the last beat implies (no
/// fixed polling). When `progress.since_last_beat()` exceeds `threshold` it reports
/// on stderr and exits the whole process with `exit::STALLED`. The thread never returns.
pub fn spawn_stall_monitor(
    progress: Arc<Progress>,
    threshold: Duration,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("stall-monitor".into())
        .spawn(move || {
            loop {
                // Sleep until the loop would be stalled if it did not beat again: one wake-up
                // per threshold while the loop is healthy, not one per second.
                let limit = limit(threshold, progress.has_beaten());
                let stalled = progress.since_last_beat();
                if stalled > limit {
                    abort_stalled(&progress, stalled);
                }
                // During start-up the allowance is long, but the loop's first beat switches
                // to the configured threshold: look again at least that often.
                std::thread::sleep((limit - stalled).min(threshold) + MARGIN);
            }
        })
}

fn abort_stalled(progress: &Progress, stalled: Duration) -> ! {
    let mut line = StackLine::new();
    let secs = stalled.as_secs();
    let _ = if secs >= 10 {
        write!(line, "nixfleet-agent: main loop stalled for {secs}s")
    } else {
        write!(
            line,
            "nixfleet-agent: main loop stalled for {:.1}s",
            stalled.as_secs_f64()
        )
    };
    let _ = progress
        .with_activity_nonblocking(|activity| write!(line, " (last activity: {activity}); "));
    let _ = writeln!(
        line,
        "exiting with code {} so the supervisor restarts the agent",
        exit::STALLED
    );
    write_stderr(line.as_bytes());
    // So the next start can say why it happened (no systemd on macOS to tell it).
    crate::restart_cause::record_stall();
    // SAFETY: `_exit` ends the process without running destructors or atexit handlers, which is
    // the point: those could block on whatever the wedged thread holds.
    unsafe { libc::_exit(i32::from(exit::STALLED)) }
}

/// Writes to fd 2 directly, retrying short writes and EINTR; other errors are ignored (there is
/// nowhere left to report them).
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice; fd 2 is only written, not owned.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = &bytes[n as usize..];
        } else if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        } else {
            return;
        }
    }
}

/// A fixed-size line buffer, so the abort path never touches the allocator (the wedged thread
/// may hold its lock). Text past the end is dropped, but the final newline always fits.
struct StackLine {
    buf: [u8; 512],
    len: usize,
}

impl StackLine {
    fn new() -> StackLine {
        StackLine {
            buf: [0; 512],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for StackLine {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Keep one byte for the newline that ends the line.
        let room = (self.buf.len() - 1).saturating_sub(self.len);
        let ends_line = s.ends_with('\n');
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if ends_line && take < s.len() && self.len < self.buf.len() {
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests start real helper processes directly to observe them"
)]
mod tests {
    use std::process::{Command, Stdio};
    use std::time::Instant;

    use super::*;

    const CHILD_ENV: &str = "NIXFLEET_AGENT_TEST_STALL_CHILD";
    const CHILD_THRESHOLD: Duration = Duration::from_millis(300);

    /// Runs only inside the child started by `stalled_main_loop_exits_70_with_one_line`: beats
    /// once, then never again, so the monitor must end this process.
    #[test]
    fn stall_child_entry() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let progress = Progress::new(None);
        progress.set_activity("waiting for heartbeat reply");
        progress.beat();
        let _monitor = spawn_stall_monitor(progress, CHILD_THRESHOLD).unwrap();
        std::thread::sleep(Duration::from_secs(10));
        panic!("the stall monitor did not end the process");
    }

    #[test]
    fn start_up_gets_an_allowance_the_running_loop_does_not() {
        let small = Duration::from_secs(2);
        assert_eq!(limit(small, false), STARTUP_ALLOWANCE);
        assert_eq!(limit(small, true), small);
        let big = Duration::from_secs(300);
        assert_eq!(limit(big, false), big);
        let progress = Progress::new(None);
        assert!(!progress.has_beaten());
        progress.beat();
        assert!(progress.has_beaten());
    }

    #[test]
    fn stalled_main_loop_exits_70_with_one_line() {
        let started = Instant::now();
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "supervisor::stall::tests::stall_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(i32::from(exit::STALLED)),
            "stderr: {stderr}"
        );
        assert!(
            elapsed < CHILD_THRESHOLD + Duration::from_secs(1),
            "took {elapsed:?}"
        );
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("main loop stalled"))
            .collect();
        assert_eq!(lines.len(), 1, "stderr: {stderr}");
        let line = lines[0];
        assert!(
            line.starts_with("nixfleet-agent: main loop stalled for 0."),
            "{line}"
        );
        assert!(
            line.ends_with(
                " (last activity: waiting for heartbeat reply); exiting with code 70 so the \
                 supervisor restarts the agent"
            ),
            "{line}"
        );
    }

    #[test]
    fn stack_line_truncates_but_keeps_the_newline() {
        let mut line = StackLine::new();
        let long = "x".repeat(1000);
        write!(line, "{long}").unwrap();
        writeln!(line, "tail").unwrap();
        assert_eq!(line.as_bytes().len(), 512);
        assert_eq!(line.as_bytes().last(), Some(&b'\n'));
    }
}
