//! systemd readiness, status and watchdog notifications (`sd_notify(3)`).
//!
//! The [`Notifier`] is owned by the main loop: it sends `READY=1` once startup is done,
//! `STATUS=` when the text changes, and `WATCHDOG=1` from [`Notifier::watchdog_tick`], which the
//! loop calls every iteration. There is deliberately no background ping task: a ping must prove
//! the loop itself is moving. Every method is a no-op when `NOTIFY_SOCKET` was unset (launchd,
//! a shell), and sending never fails the caller: the first error is logged at debug, later ones
//! are dropped.
//!
//! We write the datagrams ourselves instead of using the `sd-notify` crate: 0.5 re-reads the
//! environment and creates a socket on every call, and passes `NOTIFY_SOCKET` to
//! `UnixDatagram::connect` as a path, so abstract addresses (`@name`, used by user managers and
//! containers) do not work.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use super::platform;

/// Sends systemd notifications; inert when the service manager gave us no socket.
#[derive(Debug)]
pub struct Notifier {
    channel: Option<Channel>,
}

#[derive(Debug)]
struct Channel {
    /// Unbound and non-blocking: a full socket queue must never stall the main loop. Each
    /// datagram is addressed with `send_to`, so a manager that re-created its socket
    /// (`daemon-reexec`) still receives later messages.
    socket: UnixDatagram,
    addr: SocketAddr,
    /// The ping period, half of `WATCHDOG_USEC`, when the watchdog is enabled for this process.
    ping_period: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: Option<String>,
    /// Set after the first failed send so it is logged once.
    send_failed: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment. Children
    /// never see these: the exec module clears their environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::from_values(socket.as_deref(), usec.as_deref(), pid.as_deref())
    }

    /// [`Notifier::from_env`] with explicit values, so tests need not touch the process
    /// environment. The watchdog is enabled only if `watchdog_usec` is a positive number and
    /// `watchdog_pid` is unset or names this process (`sd_watchdog_enabled(3)`).
    pub fn from_values(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Notifier {
        let Some(raw) = notify_socket.filter(|s| !s.is_empty()) else {
            return Notifier::disabled();
        };
        let addr = match parse_address(raw) {
            Ok(addr) => addr,
            Err(err) => {
                tracing::debug!(socket = ?raw, "ignoring NOTIFY_SOCKET: {err}");
                return Notifier::disabled();
            }
        };
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(socket) => socket,
            Err(err) => {
                tracing::debug!("cannot create a socket for systemd notifications: {err}");
                return Notifier::disabled();
            }
        };
        Notifier {
            channel: Some(Channel {
                socket,
                addr,
                ping_period: ping_period(watchdog_usec, watchdog_pid),
                last_ping: None,
                last_status: None,
                send_failed: false,
            }),
        }
    }

    fn disabled() -> Notifier {
        Notifier { channel: None }
    }

    /// Whether a notify socket was given; false means every method does nothing.
    pub fn is_enabled(&self) -> bool {
        self.channel.is_some()
    }

    /// Tells systemd startup is complete (`Type=notify`), with a status line, in one datagram.
    pub fn ready(&mut self, status: &str) {
        if let Some(channel) = &mut self.channel {
            let status = one_line(status);
            channel.send(format!("READY=1\nSTATUS={status}").as_bytes());
            channel.last_status = Some(status);
        }
    }

    /// Updates the `systemctl status` line; sends nothing if the text did not change.
    pub fn status(&mut self, status: &str) {
        if let Some(channel) = &mut self.channel {
            let status = one_line(status);
            if channel.last_status.as_deref() == Some(status.as_str()) {
                return;
            }
            channel.send(format!("STATUS={status}").as_bytes());
            channel.last_status = Some(status);
        }
    }

    /// Call every main-loop iteration: sends `WATCHDOG=1` when at least half of
    /// `WATCHDOG_USEC` passed since the last ping (and on the first call).
    pub fn watchdog_tick(&mut self) {
        self.watchdog_tick_at(Instant::now());
    }

    fn watchdog_tick_at(&mut self, now: Instant) {
        let Some(channel) = &mut self.channel else {
            return;
        };
        let Some(period) = channel.ping_period else {
            return;
        };
        let due = channel
            .last_ping
            .is_none_or(|last| now.saturating_duration_since(last) >= period);
        if due {
            channel.send(b"WATCHDOG=1");
            channel.last_ping = Some(now);
        }
    }

    /// When the next `WATCHDOG=1` is due (half of `WATCHDOG_USEC` after the last one), so the
    /// loop can sleep until then instead of polling; `None` when the watchdog is off for us.
    pub fn next_watchdog_due(&self) -> Option<Instant> {
        let channel = self.channel.as_ref()?;
        let period = channel.ping_period?;
        Some(
            channel
                .last_ping
                .map_or_else(Instant::now, |last| last + period),
        )
    }

    /// How often the main loop must iterate for the pings to keep systemd content: a quarter of
    /// `WATCHDOG_USEC`, or `None` when the watchdog is off for us. Pings go out at half of
    /// `WATCHDOG_USEC`; an iteration that comes just before a ping is due (woken by some event)
    /// sends nothing, so the next one must follow within this much for the gap between pings to
    /// stay at most three quarters of `WATCHDOG_USEC`. (Iterating only every half would let
    /// that gap reach the whole `WATCHDOG_USEC`, and systemd would kill a healthy agent.)
    pub fn watchdog_interval(&self) -> Option<Duration> {
        Some(self.channel.as_ref()?.ping_period? / 2)
    }

    /// Tells systemd the agent is shutting down, with a last status line.
    pub fn stopping(&mut self, status: &str) {
        if let Some(channel) = &mut self.channel {
            let status = one_line(status);
            channel.send(format!("STOPPING=1\nSTATUS={status}").as_bytes());
            channel.last_status = Some(status);
        }
    }
}

impl Channel {
    fn send(&mut self, datagram: &[u8]) {
        if let Err(err) = self.socket.send_to_addr(datagram, &self.addr)
            && !std::mem::replace(&mut self.send_failed, true)
        {
            tracing::debug!(
                addr = ?self.addr,
                "cannot send a systemd notification (further failures are not logged): {err}"
            );
        }
    }
}

/// `/path` is a filesystem socket, `@name` an abstract one (Linux). systemd's `vsock:` form is
/// not supported: the agent never runs inside a VM whose manager is the host's.
fn parse_address(raw: &OsStr) -> io::Result<SocketAddr> {
    match raw.as_bytes() {
        [b'@', name @ ..] => platform::abstract_socket_addr(name),
        [b'/', ..] => SocketAddr::from_pathname(raw),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an @abstract name",
        )),
    }
}

fn ping_period(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec) / 2)
}

/// A newline would start a new `KEY=value` assignment inside the datagram.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Listener {
        socket: UnixDatagram,
    }

    impl Listener {
        fn recv(&self) -> String {
            self.socket.set_nonblocking(false).unwrap();
            self.socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("expected a datagram");
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }

        fn assert_silent(&self) {
            self.socket.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 4096];
            match self.socket.recv(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("expected no datagram, got {other:?}"),
            }
        }
    }

    fn path_listener(dir: &tempfile::TempDir) -> (Listener, std::ffi::OsString) {
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        (Listener { socket }, path.into_os_string())
    }

    fn our_pid() -> String {
        std::process::id().to_string()
    }

    #[test]
    fn unset_socket_disables_everything() {
        let mut n = Notifier::from_values(None, Some("1000000"), None);
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
        n.status("y");
        n.watchdog_tick();
        n.stopping("z");
        assert!(!Notifier::from_values(Some(OsStr::new("")), None, None).is_enabled());
        assert!(!Notifier::from_values(Some(OsStr::new("relative")), None, None).is_enabled());
    }

    #[test]
    fn sends_exact_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = path_listener(&dir);
        let mut n = Notifier::from_values(Some(&path), None, None);
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);

        n.ready("connected to dashboard");
        assert_eq!(listener.recv(), "READY=1\nSTATUS=connected to dashboard");
        n.status("connected to dashboard");
        listener.assert_silent();
        n.status("running switch:\nnixos-rebuild");
        assert_eq!(listener.recv(), "STATUS=running switch: nixos-rebuild");
        n.status("running switch:\nnixos-rebuild");
        listener.assert_silent();
        n.watchdog_tick();
        listener.assert_silent(); // no WATCHDOG_USEC
        n.stopping("shutting down");
        assert_eq!(listener.recv(), "STOPPING=1\nSTATUS=shutting down");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_receives_notifications() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "nixfleet-agent-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = Listener {
            socket: UnixDatagram::bind_addr(&addr).unwrap(),
        };
        let raw = format!("@{name}");
        let mut n = Notifier::from_values(Some(OsStr::new(&raw)), Some("4000000"), None);
        assert!(n.is_enabled());
        n.ready("up");
        assert_eq!(listener.recv(), "READY=1\nSTATUS=up");
        n.watchdog_tick();
        assert_eq!(listener.recv(), "WATCHDOG=1");
    }

    #[test]
    fn watchdog_pings_at_half_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = path_listener(&dir);
        let mut n = Notifier::from_values(Some(&path), Some("200000"), Some(&our_pid()));
        // The loop iterates at a quarter of WATCHDOG_USEC; pings go out at half.
        assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(50)));

        let t0 = Instant::now();
        n.watchdog_tick_at(t0);
        assert_eq!(listener.recv(), "WATCHDOG=1");
        n.watchdog_tick_at(t0 + Duration::from_millis(50));
        n.watchdog_tick_at(t0 + Duration::from_millis(99));
        listener.assert_silent();
        n.watchdog_tick_at(t0 + Duration::from_millis(100));
        assert_eq!(listener.recv(), "WATCHDOG=1");
        n.watchdog_tick_at(t0 + Duration::from_millis(150));
        listener.assert_silent();
        n.watchdog_tick_at(t0 + Duration::from_millis(260));
        assert_eq!(listener.recv(), "WATCHDOG=1");
    }

    #[test]
    fn a_ping_just_missed_is_sent_within_three_quarters_of_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = path_listener(&dir);
        let usec = Duration::from_millis(200);
        let mut n = Notifier::from_values(Some(&path), Some("200000"), None);
        let loop_period = n.watchdog_interval().unwrap();

        let t0 = Instant::now();
        n.watchdog_tick_at(t0);
        assert_eq!(listener.recv(), "WATCHDOG=1");
        // An iteration woken by some event 1 ms before the ping is due sends nothing; the loop's
        // next timer iteration comes `loop_period` later and must ping, well before systemd's
        // deadline (with a loop period of half the timeout the gap would be the whole timeout).
        let missed = t0 + usec / 2 - Duration::from_millis(1);
        n.watchdog_tick_at(missed);
        listener.assert_silent();
        n.watchdog_tick_at(missed + loop_period);
        assert_eq!(listener.recv(), "WATCHDOG=1");
        assert!(missed + loop_period - t0 < usec * 3 / 4);
    }

    #[test]
    fn watchdog_pid_of_another_process_disables_pings() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = path_listener(&dir);
        let other = (std::process::id() + 1).to_string();
        let mut n = Notifier::from_values(Some(&path), Some("200000"), Some(&other));
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.watchdog_tick();
        listener.assert_silent();
        n.status("still talks"); // READY/STATUS are not tied to WATCHDOG_PID
        assert_eq!(listener.recv(), "STATUS=still talks");

        for bad in ["0", "soon", ""] {
            let n = Notifier::from_values(Some(&path), Some(bad), None);
            assert_eq!(n.watchdog_interval(), None, "WATCHDOG_USEC={bad:?}");
        }
        let n = Notifier::from_values(Some(&path), Some("1000000"), Some("garbage"));
        assert_eq!(n.watchdog_interval(), None);
    }

    #[test]
    fn send_failure_is_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody-listens.sock");
        let mut n = Notifier::from_values(Some(path.as_os_str()), Some("2000"), None);
        assert!(n.is_enabled());
        n.ready("up");
        n.watchdog_tick();
        n.stopping("down");
    }
}
