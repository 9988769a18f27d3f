//! Supervisor integration with the real binary, no real systemd: sd-notify over path and
//! abstract sockets (READY only after the lock, STATUS following state, WATCHDOG only while the
//! loop moves, STOPPING on SIGTERM), the stall monitor's exit 70, the instance lock (refusal
//! with exit 75, release after kill -9, verified takeover from a stopped stale agent, an
//! unrelated process never signalled), exit 73 without a usable directory, and plain
//! timestamped log lines outside journald.

use std::fs::{self, File, OpenOptions};
#[cfg(target_os = "linux")]
use std::os::unix::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
#[cfg(target_os = "linux")]
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::support::*;

const T: Duration = Duration::from_secs(15);
const WATCHDOG: &str = "WATCHDOG=1";

/// One datagram as the listener saw it, with the lock file as it was at that moment.
#[derive(Clone, Debug)]
struct Datagram {
    at: Instant,
    text: String,
    /// `(contents, flock held by someone)` of the watched lock file when the datagram arrived;
    /// `None` if the file did not exist.
    lock: Option<(String, bool)>,
}

impl Datagram {
    fn is_watchdog(&self) -> bool {
        self.text.lines().any(|l| l == WATCHDOG)
    }

    fn status(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("STATUS="))
    }
}

/// A systemd stand-in: a datagram socket that records everything sent to it.
struct NotifyListener {
    /// The value for `NOTIFY_SOCKET`.
    env: String,
    seen: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// When set to a pid, the listener thread sends it SIGTERM the moment a datagram arrives.
    term_on_datagram: Arc<AtomicI32>,
}

#[cfg(target_os = "linux")]
static ABSTRACT_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl NotifyListener {
    fn path(dir: &Path, lock_file: &Path) -> NotifyListener {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifyListener::start(socket, path.display().to_string(), lock_file)
    }

    #[cfg(target_os = "linux")]
    fn abstract_name(lock_file: &Path) -> NotifyListener {
        use std::os::linux::net::SocketAddrExt as _;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "nixfleet-test-{}-{nanos}-{}",
            std::process::id(),
            ABSTRACT_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        NotifyListener::start(socket, format!("@{name}"), lock_file)
    }

    fn start(socket: UnixDatagram, env: String, lock_file: &Path) -> NotifyListener {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let term_on_datagram = Arc::new(AtomicI32::new(0));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            let term_on_datagram = term_on_datagram.clone();
            let lock_file = lock_file.to_path_buf();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::SeqCst) {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            let at = Instant::now();
                            let pid = term_on_datagram.load(Ordering::SeqCst);
                            if pid > 0 {
                                // SAFETY: kill(2) on the test's own agent child.
                                unsafe { libc::kill(pid, libc::SIGTERM) };
                            }
                            let lock = lock_snapshot(&lock_file);
                            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                            seen.lock().unwrap().push(Datagram { at, text, lock });
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => panic!("notify socket recv failed: {e}"),
                    }
                }
            })
        };
        NotifyListener {
            env,
            seen,
            stop,
            thread: Some(thread),
            term_on_datagram,
        }
    }

    fn all(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }

    fn since(&self, t: Instant) -> Vec<Datagram> {
        self.all().into_iter().filter(|d| d.at >= t).collect()
    }

    /// The first datagram received at or after `t` that satisfies `pred`, waiting up to `timeout`.
    fn wait_after(
        &self,
        t: Instant,
        timeout: Duration,
        pred: impl Fn(&Datagram) -> bool,
    ) -> Option<Datagram> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.since(t).into_iter().find(|d| pred(d));
            found.is_some()
        });
        found
    }

    fn wait_status(&self, t: Instant, timeout: Duration, needles: &[&str]) -> Option<Datagram> {
        self.wait_after(t, timeout, |d| {
            d.status()
                .is_some_and(|s| needles.iter().all(|n| s.contains(n)))
        })
    }

    fn watchdogs_between(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|d| d.is_watchdog() && d.at >= from && d.at < to)
            .map(|d| d.at)
            .collect()
    }

    fn describe(&self) -> String {
        let all = self.all();
        let Some(first) = all.first().map(|d| d.at) else {
            return "no datagrams".into();
        };
        all.iter()
            .map(|d| {
                format!(
                    "+{:>6}ms {:?}",
                    d.at.duration_since(first).as_millis(),
                    d.text
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The lock file's contents and whether its flock is held, without keeping the lock.
fn lock_snapshot(path: &Path) -> Option<(String, bool)> {
    let contents = fs::read_to_string(path).ok()?;
    let file = File::open(path).ok()?;
    let held = match file.try_lock() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    };
    Some((contents, held))
}

fn lock_file(h: &Harness) -> PathBuf {
    h.runtime_dir.join("agent.lock")
}

fn progress_file(h: &Harness) -> PathBuf {
    h.runtime_dir.join("agent.progress")
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot), as the lock records it.
fn start_time(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Alive and not a zombie.
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            !matches!(rest.split_whitespace().next(), Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

/// Moves a file's mtime `ago` into the past (creating the file if needed).
fn age_file(path: &Path, ago: Duration) {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

/// A helper process (sleep, flock) in its own process group, killed with that whole group
/// and reaped on drop: `flock ... sleep 1000` forks the sleep, which must not outlive the test.
#[cfg(target_os = "linux")]
struct Helper(Child);

#[cfg(target_os = "linux")]
impl Helper {
    fn spawn(program: &str, args: &[&str]) -> Helper {
        use std::os::unix::process::CommandExt as _;
        Helper(
            Command::new(program)
                .args(args)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

#[cfg(target_os = "linux")]
impl Drop for Helper {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the helper's own process group (it leads it: process_group(0)).
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an agent under `listener` with a 1 s watchdog and waits for READY; returns the agent
/// and the READY datagram.
fn spawn_notified(h: &mut Harness, listener: &NotifyListener) -> (AgentProcess, Datagram) {
    h.set("NOTIFY_SOCKET", listener.env.clone());
    h.set("WATCHDOG_USEC", "1000000");
    let started = Instant::now();
    let agent = h.spawn();
    let ready = listener
        .wait_after(started, T, |d| d.text.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1\n{}\n{}", listener.describe(), agent.log()));
    (agent, ready)
}

/// READY came in one datagram with a STATUS line, after the lock was held and recorded by this
/// very agent; anything sent before it was a STATUS update, and everything was sent after the
/// lock was taken.
fn assert_ready_after_lock(listener: &NotifyListener, agent: &AgentProcess, ready: &Datagram) {
    let all = listener.all();
    let record_prefix = format!("pid={}\nstart_time=", agent.pid());
    for d in &all {
        let (contents, held) = d
            .lock
            .as_ref()
            .unwrap_or_else(|| panic!("{:?} arrived before the lock file existed", d.text));
        assert!(*held, "{:?} arrived while the lock was not held", d.text);
        assert!(
            contents.starts_with(&record_prefix),
            "{:?} arrived before the holder record was written: {contents:?}",
            d.text
        );
    }
    let lines: Vec<&str> = ready.text.lines().collect();
    assert_eq!(lines.len(), 2, "{:?}", ready.text);
    assert_eq!(lines[0], "READY=1");
    assert!(lines[1].starts_with("STATUS="), "{:?}", ready.text);
    assert!(ready.status().unwrap().contains("idle"), "{:?}", ready.text);
    for d in all.iter().take_while(|d| d.at < ready.at) {
        assert!(
            d.text.starts_with("STATUS=") && d.text.lines().count() == 1,
            "before READY only STATUS updates may be sent, got {:?}",
            d.text
        );
    }
}

/// At least `min` pings in `window` starting now, and no gap between pings of a full
/// `WATCHDOG_USEC` (1 s), which is what would make systemd kill the agent.
fn assert_pings(listener: &NotifyListener, window: Duration, min: usize) -> Vec<Instant> {
    let from = Instant::now();
    std::thread::sleep(window);
    let pings = listener.watchdogs_between(from, Instant::now());
    assert!(
        pings.len() >= min,
        "{} pings in {window:?}, expected at least {min}\n{}",
        pings.len(),
        listener.describe()
    );
    let max_gap = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        max_gap < Duration::from_millis(900),
        "pings {max_gap:?} apart with WATCHDOG_USEC=1s\n{}",
        listener.describe()
    );
    pings
}

fn sigterm_sends_stopping(listener: &NotifyListener, agent: &mut AgentProcess) {
    let t = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(T).expect("agent exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    let stopping = listener
        .wait_after(t, Duration::from_secs(2), |d| {
            d.text.lines().any(|l| l == "STOPPING=1")
        })
        .unwrap_or_else(|| panic!("no STOPPING=1\n{}", listener.describe()));
    assert!(
        stopping.status().is_some_and(|s| s.contains("exit code 0")),
        "{:?}",
        stopping.text
    );
}

#[test]
fn notify_path_socket_ready_after_lock_status_follows_state_watchdog_and_stopping() {
    let mut h = Harness::new();
    h.legacy_repo();
    h.stand_in("nixos-rebuild", "sleep 4");
    let listener = NotifyListener::path(h.tmp.path(), &lock_file(&h));
    let (mut agent, ready) = spawn_notified(&mut h, &listener);
    assert_ready_after_lock(&listener, &agent, &ready);

    // Pings at half of WATCHDOG_USEC while idle.
    assert_pings(&listener, Duration::from_secs(2), 3);
    listener
        .wait_status(ready.at, T, &["idle", "last heartbeat at"])
        .unwrap_or_else(|| panic!("no idle status\n{}", listener.describe()));

    // Dashboard down: said in STATUS, and the loop (and the pings) keep going.
    let down = Instant::now();
    h.dash.set_mode(Mode::Down);
    // (A heartbeat in flight when the listener closed fails as "connection closed"; the
    // retries after it are refused.)
    let unreachable = listener
        .wait_status(
            down,
            T,
            &[
                "dashboard unreachable for",
                "retrying in",
                "connection refused",
            ],
        )
        .unwrap_or_else(|| panic!("no unreachable status\n{}", listener.describe()));
    assert!(unreachable.status().is_some(), "{:?}", unreachable.text);
    assert_pings(&listener, Duration::from_secs(2), 3);

    // Back up, then a long switch: STATUS names it, and pings continue while it runs.
    h.dash.set_mode(Mode::Normal);
    let up = Instant::now();
    listener
        .wait_status(up, T, &["last heartbeat"])
        .unwrap_or_else(|| panic!("no recovery status\n{}", listener.describe()));
    h.dash.force_command(HOST, "switch");
    let running = listener
        .wait_status(up, T, &["running switch"])
        .unwrap_or_else(|| {
            panic!(
                "no running status\n{}\n{}",
                listener.describe(),
                agent.log()
            )
        });
    assert_pings(&listener, Duration::from_secs(2), 3);
    listener
        .wait_status(running.at, T, &["idle"])
        .unwrap_or_else(|| panic!("switch never finished\n{}", listener.describe()));
    assert!(h.wait_status(T, "Switch"), "{:?}", h.statuses());

    sigterm_sends_stopping(&listener, &mut agent);
}

/// Abstract sockets exist on Linux only (where systemd runs).
#[cfg(target_os = "linux")]
#[test]
fn notify_abstract_socket_ready_after_lock_watchdog_and_stopping() {
    let mut h = Harness::new();
    let listener = NotifyListener::abstract_name(&lock_file(&h));
    assert!(listener.env.starts_with('@'));
    let (mut agent, ready) = spawn_notified(&mut h, &listener);
    assert_ready_after_lock(&listener, &agent, &ready);
    assert_pings(&listener, Duration::from_secs(2), 3);
    listener
        .wait_status(ready.at, T, &["idle", "last heartbeat"])
        .unwrap_or_else(|| panic!("no idle status\n{}", listener.describe()));
    sigterm_sends_stopping(&listener, &mut agent);
}

#[test]
fn watchdog_pings_stop_while_sigstopped_and_resume_after_sigcont() {
    let mut h = Harness::new();
    let listener = NotifyListener::path(h.tmp.path(), &lock_file(&h));
    let (agent, _ready) = spawn_notified(&mut h, &listener);
    assert_pings(&listener, Duration::from_secs(2), 3);

    agent.signal(libc::SIGSTOP);
    // Whatever was already in the socket queue arrives within a moment; then silence.
    std::thread::sleep(Duration::from_millis(200));
    let quiet_from = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let during = listener.since(quiet_from);
    assert!(
        during.is_empty(),
        "datagrams from a stopped process: {during:?}"
    );

    let cont = Instant::now();
    agent.signal(libc::SIGCONT);
    listener
        .wait_after(cont, Duration::from_secs(2), Datagram::is_watchdog)
        .unwrap_or_else(|| panic!("no ping after SIGCONT\n{}", listener.describe()));
    assert_pings(&listener, Duration::from_secs(2), 3);
    assert!(alive(agent.pid()), "{}", agent.log());
}

#[test]
fn wedged_loop_stops_pings_and_the_stall_monitor_exits_70() {
    let mut h = Harness::new();
    let wedge = h.tmp.path().join("wedge");
    h.set("NIXFLEET_DEBUG_WEDGE_FILE", wedge.display().to_string());
    h.set("NIXFLEET_STALL_TIMEOUT", "2");
    let listener = NotifyListener::path(h.tmp.path(), &lock_file(&h));
    let (mut agent, _ready) = spawn_notified(&mut h, &listener);
    assert_pings(&listener, Duration::from_secs(2), 3);

    fs::write(&wedge, "").unwrap();
    let wedged = Instant::now();
    let status = agent
        .wait_exit(Duration::from_secs(4))
        .unwrap_or_else(|| panic!("still running 4 s after the wedge\n{}", agent.log()));
    let exited = wedged.elapsed();
    assert_eq!(status.code(), Some(70), "{}", agent.log());
    assert!(
        exited >= Duration::from_millis(1500),
        "exited {exited:?} after the wedge, before the 2 s threshold could pass"
    );
    // At most the iteration already past the hook pings (one tick, 0.5 s); then nothing.
    let late = listener.watchdogs_between(wedged + Duration::from_millis(700), Instant::now());
    assert!(
        late.is_empty(),
        "pings from a wedged loop\n{}",
        listener.describe()
    );
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("stalled"))
        .unwrap_or_else(|| panic!("no stall line: {log}"));
    assert!(line.contains("exiting with code 70"), "{line}");
}

#[test]
fn watchdog_pid_of_another_process_disables_pings_but_not_ready() {
    let mut h = Harness::new();
    h.set("WATCHDOG_PID", "1");
    let listener = NotifyListener::path(h.tmp.path(), &lock_file(&h));
    let (mut agent, ready) = spawn_notified(&mut h, &listener);
    assert_ready_after_lock(&listener, &agent, &ready);
    listener
        .wait_status(ready.at, T, &["last heartbeat"])
        .unwrap_or_else(|| panic!("no status\n{}", listener.describe()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        listener.all().iter().all(|d| !d.is_watchdog()),
        "pings despite WATCHDOG_PID=1\n{}",
        listener.describe()
    );
    sigterm_sends_stopping(&listener, &mut agent);
}

#[test]
fn without_a_usable_notify_socket_the_agent_runs_normally() {
    // No NOTIFY_SOCKET at all (the harness clears the environment), and one naming nothing.
    for socket in [None, Some("/nonexistent/notify.sock")] {
        let mut h = Harness::new();
        if let Some(socket) = socket {
            h.set("NOTIFY_SOCKET", socket);
            h.set("WATCHDOG_USEC", "1000000");
        }
        let mut agent = h.spawn();
        assert!(h.wait_status(T, "Agent started"), "{}", agent.log());
        assert!(
            wait_until(T, || h.requests(Endpoint::Register).len() >= 3),
            "{}",
            agent.log()
        );
        agent.signal(libc::SIGTERM);
        let status = agent.wait_exit(T).expect("exits after SIGTERM");
        assert_eq!(status.code(), Some(0), "{}", agent.log());
    }
}

#[test]
fn second_instance_is_refused_with_75_naming_the_first() {
    let h = Harness::new();
    let first = h.spawn();
    assert!(
        wait_until(T, || fs::read_to_string(lock_file(&h))
            .is_ok_and(|r| r.contains("version="))),
        "{}",
        first.log()
    );
    let (code, log) = h.run_to_exit(&[], T);
    assert_eq!(code, Some(75), "{log}");
    let start = start_time(first.pid());
    let expected = format!(
        "another nixfleet-agent is already running: pid {} (start time {start}, started ",
        first.pid()
    );
    assert!(log.contains(&expected), "{log}");
    assert!(log.contains("last progress"), "{log}");
    assert!(alive(first.pid()), "{}", first.log());
    // The first keeps working and still holds the lock.
    let before = h.requests(Endpoint::Register).len();
    assert!(wait_until(T, || h.requests(Endpoint::Register).len() > before + 1));
    let record = fs::read_to_string(lock_file(&h)).unwrap();
    assert!(
        record.starts_with(&format!("pid={}\n", first.pid())),
        "{record}"
    );
}

/// Two agents started differently (another runtime directory, so another instance lock) but
/// on the same state directory: the second is refused with 75 before it touches the outbox,
/// journal or token cache, and the message names the first.
#[test]
fn second_instance_on_the_same_state_dir_is_refused_whatever_its_runtime_dir() {
    let mut h = Harness::new();
    let first = h.spawn();
    assert!(
        wait_until(T, || fs::read_to_string(h.state_dir.join("state.lock"))
            .is_ok_and(|r| r.contains("version="))),
        "{}",
        first.log()
    );
    let other_runtime = h.tmp.path().join("other-run");
    h.set("NIXFLEET_RUNTIME_DIR", other_runtime.display().to_string());
    let (code, log) = h.run_to_exit(&[], T);
    assert_eq!(code, Some(75), "{log}");
    assert!(
        log.contains(&format!(
            "the state directory {} is in use by another nixfleet-agent (pid {}",
            h.state_dir.display(),
            first.pid()
        )),
        "{log}"
    );
    assert!(!log.contains("nixfleet-agent starting"), "{log}");
    assert!(alive(first.pid()), "{}", first.log());
}

#[test]
fn lock_is_released_by_the_kernel_after_kill_9() {
    let h = Harness::new();
    let mut first = h.spawn();
    assert!(
        wait_until(T, || fs::read_to_string(lock_file(&h))
            .is_ok_and(|r| r.contains("version="))),
        "{}",
        first.log()
    );
    let first_pid = first.pid();
    first.kill9();
    assert!(!alive(first_pid));
    // The record still names the dead agent; the lock itself is gone.
    assert!(
        fs::read_to_string(lock_file(&h))
            .unwrap()
            .starts_with(&format!("pid={first_pid}\n"))
    );
    let second = h.spawn();
    assert!(
        wait_until(T, || fs::read_to_string(lock_file(&h))
            .is_ok_and(|r| r.starts_with(&format!("pid={}\n", second.pid())))),
        "{}",
        second.log()
    );
    let before = h.requests(Endpoint::Register).len();
    assert!(
        wait_until(T, || h.requests(Endpoint::Register).len() > before),
        "{}",
        second.log()
    );
    assert!(alive(second.pid()));
    assert!(
        !second.log().contains("already running"),
        "{}",
        second.log()
    );
}

#[test]
fn stopped_stale_agent_is_verified_terminated_and_replaced() {
    let mut h = Harness::new();
    let mut first = h.spawn();
    assert!(
        wait_until(T, || fs::read_to_string(lock_file(&h))
            .is_ok_and(|r| r.contains("version="))),
        "{}",
        first.log()
    );
    assert!(wait_until(T, || !h.requests(Endpoint::Register).is_empty()));
    let first_pid = first.pid();
    let first_start = start_time(first_pid);
    first.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(200));
    // Its last progress long ago: older than the second's threshold + the 5 s touch slack.
    age_file(&progress_file(&h), Duration::from_secs(3600));
    age_file(&lock_file(&h), Duration::from_secs(3600));

    h.set("NIXFLEET_STALL_TIMEOUT", "2");
    let second = h.spawn();
    let expected =
        format!("replaced stalled nixfleet-agent pid {first_pid} (start time {first_start}");
    assert!(
        second.wait_log(T, &expected),
        "second:\n{}\nfirst:\n{}",
        second.log(),
        first.log()
    );
    assert!(second.log().contains("stopping it"), "{}", second.log());
    let status = first.wait_exit(T).expect("the stale agent is gone");
    assert!(!alive(first_pid));
    let record = fs::read_to_string(lock_file(&h)).unwrap();
    assert!(
        record.starts_with(&format!("pid={}\n", second.pid())),
        "{record}"
    );
    let before = h.requests(Endpoint::Register).len();
    assert!(
        wait_until(T, || h.requests(Endpoint::Register).len() > before),
        "{}",
        second.log()
    );
    assert!(alive(second.pid()), "{}", second.log());
    eprintln!("the replaced agent ended with {status:?}");
}

/// Linux only: util-linux `flock` holds the lock (macOS has no flock(1)).
#[cfg(target_os = "linux")]
#[test]
fn unrelated_lock_holder_and_recorded_pid_are_never_signalled() {
    let mut h = Harness::new();
    h.set("NIXFLEET_STALL_TIMEOUT", "2");
    fs::create_dir_all(&h.runtime_dir).unwrap();
    let lock = lock_file(&h);
    // The lock is held by util-linux flock, which is not an agent.
    let holder = Helper::spawn("flock", &["-n", lock.to_str().unwrap(), "sleep", "1000"]);
    assert!(
        wait_until(T, || lock_snapshot(&lock).is_some_and(|(_, held)| held)),
        "flock never took the lock"
    );
    let sleep = Helper::spawn("sleep", &["1000"]);
    let sleep_start = start_time(sleep.pid());
    let agent_exe = env!("CARGO_BIN_EXE_nixfleet-agent");

    // 1: the recorded pid is alive with the recorded start time but runs another program.
    // 2: the recorded pid was reused (start time differs).
    for (start, reason) in [
        (sleep_start, "which is not this agent's executable"),
        (sleep_start + 1, "the pid was reused"),
    ] {
        fs::write(
            &lock,
            format!(
                "pid={}\nstart_time={start}\nstarted_at_unix=1\nexe={agent_exe}\nversion=0.0.9\n",
                sleep.pid()
            ),
        )
        .unwrap();
        age_file(&lock, Duration::from_secs(3600));
        age_file(&progress_file(&h), Duration::from_secs(3600));
        let (code, log) = h.run_to_exit(&[], T);
        assert_eq!(code, Some(75), "{log}");
        assert!(
            log.contains(&format!(
                "the instance lock is held by pid {} (start time {start}",
                sleep.pid()
            )),
            "{log}"
        );
        assert!(
            log.contains("could not be verified as a nixfleet-agent, so it was not signalled"),
            "{log}"
        );
        assert!(log.contains(reason), "{log}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(alive(sleep.pid()), "the unrelated sleep was signalled");
        assert!(alive(holder.pid()), "the flock holder was signalled");
    }
}

#[test]
fn no_usable_directory_exits_73_naming_it() {
    for (key, under_a_file) in [
        ("NIXFLEET_RUNTIME_DIR", false),
        ("NIXFLEET_RUNTIME_DIR", true),
        ("NIXFLEET_STATE_DIR", true),
    ] {
        let mut h2 = Harness::new();
        let dir = if under_a_file {
            let file = h2.tmp.path().join("a-file");
            fs::write(&file, "").unwrap();
            file.join("dir")
        } else {
            PathBuf::from("/proc/nonexistent-dir")
        };
        h2.set(key, dir.display().to_string());
        let (code, log) = h2.run_to_exit(&[], T);
        assert_eq!(code, Some(73), "{key}={}: {log}", dir.display());
        assert!(
            log.contains(&format!("tried {}: ", dir.display())),
            "{key}={}: {log}",
            dir.display()
        );
        assert!(log.contains(key), "{log}");
        assert!(h2.dash.requests().is_empty(), "{log}");
    }
}

/// `2025-06-01T12:34:56.123456Z  INFO message`: the tracing fmt layout.
fn timestamped_line(line: &str) -> bool {
    let b = line.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| r.clone().all(|i| b.get(i).is_some_and(u8::is_ascii_digit));
    let levels = [" ERROR ", "  WARN ", "  INFO ", " DEBUG ", " TRACE "];
    b.len() > 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && levels.iter().any(|l| line.contains(l))
}

#[test]
fn without_journald_log_lines_have_timestamps_and_levels() {
    // JOURNAL_STREAM unset, then naming something that is not our stderr.
    for journal in [None, Some("1:1")] {
        let mut h = Harness::new();
        if let Some(j) = journal {
            h.set("JOURNAL_STREAM", j);
        }
        h.dash.set_mode(Mode::Down); // a WARN line too
        let mut agent = h.spawn();
        assert!(agent.wait_log(T, "connection refused"), "{}", agent.log());
        h.dash.set_mode(Mode::Normal);
        assert!(
            agent.wait_log(T, "dashboard reachable again"),
            "{}",
            agent.log()
        );
        agent.signal(libc::SIGTERM);
        agent.wait_exit(T).expect("exits after SIGTERM");
        let log = agent.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 3, "{log}");
        for line in &lines {
            assert!(timestamped_line(line), "not a timestamped line: {line:?}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("  INFO ") && l.contains("nixfleet-agent starting")),
            "{log}"
        );
        assert!(lines.iter().any(|l| l.contains("  WARN ")), "{log}");
    }
}

/// systemd may stop the agent the moment it hears from it. The SIGTERM handler must already be
/// installed then: it used to be installed by a task first polled after READY=1, so this SIGTERM
/// killed the agent outright (no STOPPING=1, status "killed by signal 15").
#[test]
fn sigterm_as_soon_as_the_agent_talks_to_systemd_is_a_clean_stop() {
    for _ in 0..10 {
        let mut h = Harness::new();
        let listener = NotifyListener::path(h.tmp.path(), &lock_file(&h));
        h.set("NOTIFY_SOCKET", listener.env.clone());
        let started = Instant::now();
        let mut agent = h.spawn();
        listener
            .term_on_datagram
            .store(agent.pid(), Ordering::SeqCst);
        let status = agent.wait_exit(T).expect("agent exits after SIGTERM");
        assert_eq!(
            status.code(),
            Some(0),
            "{status:?}\n{}\n{}",
            listener.describe(),
            agent.log()
        );
        assert!(
            listener
                .wait_after(started, Duration::from_secs(2), |d| d
                    .text
                    .starts_with("STOPPING=1"))
                .is_some(),
            "{}",
            listener.describe()
        );
    }
}
