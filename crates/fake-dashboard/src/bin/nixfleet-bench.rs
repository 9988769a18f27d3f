//! `nixfleet-bench`: what the agent costs a host, measured from outside against the fake v1
//! dashboard. A benchmark, not a test: it prints numbers (with the targets from the issues next
//! to them) and fails only when a measurement could not be taken.
//!
//! Measured:
//! 1. start-up: spawn to `READY=1` on a `NOTIFY_SOCKET`, spawn to the first register;
//! 2. idle heartbeats (interval 2 s): CPU per heartbeat (the process CPU clock, ns resolution,
//!    and utime+stime from `/proc/<pid>/stat`), VmRSS/VmHWM afterwards, child processes started
//!    (netlink proc connector when permitted, a 10 ms `/proc` scan, the system pid counter);
//! 3. timeout-kill precision: a stand-in `nixos-rebuild` that ignores SIGTERM, switch timeout
//!    2 s, kill grace 1 s: how long after (timeout + grace) its tree is gone, and when the
//!    timeout report reaches the dashboard;
//! 4. the agent's peak RSS while the switch prints 50 MiB;
//! 5. the idle cost at the default 30 s interval: wake-ups per second (voluntary context
//!    switches of all threads) and CPU per hour.
//!
//! With `--protocol v2` the same five measurements run against the fake v2 (WebSocket)
//! dashboard: a heartbeat is an inbound `heartbeat` message instead of a register request,
//! commands are pushed over the socket, and the flood row counts the `output` messages.
//!
//! Linux only (`/proc`). Usage: `cargo build --release --workspace &&
//! target/release/nixfleet-bench [--protocol v1|v2] [--agent PATH] [--heartbeats N] [--starts N]`.

#![allow(
    clippy::disallowed_methods,
    reason = "the benchmark drives git and the agent binary as child processes; it is not the \
              agent, whose children must go through exec::Runner"
)]

mod common;

fn main() -> std::process::ExitCode {
    #[cfg(target_os = "linux")]
    {
        bench::main()
    }
    #[cfg(not(target_os = "linux"))]
    {
        eprintln!("nixfleet-bench: Linux only (it reads /proc)");
        std::process::ExitCode::from(2)
    }
}

#[cfg(target_os = "linux")]
mod bench {
    use std::collections::BTreeSet;
    use std::io::Write as _;
    use std::os::unix::net::UnixDatagram;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use super::common::{self, Agent, HOST, Output, Repos};
    use super::proc_events;
    use super::procfs;
    use fake_dashboard::v2::{FakeV2, Frame, FrameHook, V2Options};
    use fake_dashboard::{Endpoint, FakeDashboard, Options, RecordedRequest};

    const USAGE: &str =
        "usage: nixfleet-bench [--protocol v1|v2] [--agent PATH] [--heartbeats N] [--starts N] [--idle-window S]

Measures the nixfleet-agent binary against a loopback fake NixFleet dashboard: start-up
time, CPU and memory per idle heartbeat, child processes per idle heartbeat, timeout-kill
precision, and peak memory during a 50 MiB output flood. Linux only.

  --protocol P      v1 (HTTP polling, the default) or v2 (the WebSocket dashboard)
  --agent PATH      the agent binary (default: nixfleet-agent next to this executable)
  --heartbeats N    idle heartbeats to measure, 2 s apart (default 30; the issue's figure is 100)
  --starts N        start-up runs to take the median of (default 5)
  --idle-window S   seconds of idle at the default 30 s interval for wake-ups and CPU per hour
                    (default 120)

Numbers depend a lot on the build profile; for representative ones:
  cargo build --release --workspace && target/release/nixfleet-bench";

    const MIB: f64 = 1024.0 * 1024.0;
    const FLOOD_BYTES: u64 = 50 * 1024 * 1024;
    const SWITCH_TIMEOUT_S: u64 = 2;
    const KILL_GRACE_S: u64 = 1;

    struct Args {
        agent: Option<PathBuf>,
        heartbeats: u32,
        starts: u32,
        /// Seconds of the idle measurement at the default interval.
        idle_window: u64,
        /// `--protocol v2`.
        v2: bool,
    }

    fn parse_args() -> Result<Option<Args>, String> {
        let mut args = Args {
            agent: None,
            heartbeats: 30,
            starts: 5,
            idle_window: 120,
            v2: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
            let number = |name: &str, v: String| -> Result<u32, String> {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| format!("{name}: {v:?} is not a positive integer"))
            };
            match flag.as_str() {
                "--agent" => args.agent = Some(PathBuf::from(value("--agent")?)),
                "--heartbeats" => args.heartbeats = number("--heartbeats", value("--heartbeats")?)?,
                "--starts" => args.starts = number("--starts", value("--starts")?)?,
                "--idle-window" => {
                    args.idle_window = u64::from(number("--idle-window", value("--idle-window")?)?)
                }
                "--protocol" => {
                    args.v2 = match value("--protocol")?.as_str() {
                        "v1" => false,
                        "v2" => true,
                        other => return Err(format!("--protocol must be v1 or v2, not {other:?}")),
                    }
                }
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(Some(args))
    }

    pub fn main() -> ExitCode {
        let args = match parse_args() {
            Ok(Some(args)) => args,
            Ok(None) => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("nixfleet-bench: {e}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nixfleet-bench: FAILED: {e}");
                ExitCode::FAILURE
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Formatting

    fn ms(d: Duration) -> String {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }

    fn mib(kib: u64) -> String {
        format!("{:.1} MiB", kib as f64 / 1024.0)
    }

    fn row(label: &str, value: &str, note: &str) {
        println!("  {label:<42} {value:<14} {note}");
    }

    fn section(n: usize, title: &str) {
        println!();
        println!("[{n}/5] {title}");
        let _ = std::io::stdout().flush();
    }

    fn verdict(ok: bool) -> &'static str {
        if ok { "ok" } else { "MISSED" }
    }

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------------
    // The world

    /// The fake dashboard of either protocol.
    enum Fake {
        V1(FakeDashboard),
        V2(FakeV2),
    }

    /// A fake dashboard whose hook samples the agent's CPU the moment each request is answered
    /// (v1) or each heartbeat or status message is processed (v2, recorded as `Register` and
    /// `Status` samples, so the measurements below read the same for both).
    struct Dash {
        fake: Fake,
        /// The pid whose CPU the hook samples (0: none).
        pid: Arc<AtomicI32>,
        samples: Arc<Mutex<Vec<Sample>>>,
        /// v2: what the hook saw, so a 50 MiB flood is counted without being kept.
        v2_seen: Arc<Mutex<V2Seen>>,
    }

    /// A v2 `status` message as the hook saw it.
    struct SeenStatus {
        seq: u64,
        at: SystemTime,
        command: String,
        message: String,
        /// `output` messages and bytes between the last `send_switch` and this status.
        outputs: (usize, usize),
    }

    /// v2 `output` and `status` messages as the hook saw them.
    #[derive(Default)]
    struct V2Seen {
        /// `output` messages and bytes since the last `send_switch`.
        outputs: (usize, usize),
        statuses: Vec<SeenStatus>,
    }

    /// A final report as the dashboard received it.
    struct Report {
        at: SystemTime,
        /// v1: the status `output`; v2: the status `message`.
        text: String,
        /// v2: `output` messages and their bytes between the command and its status.
        output_messages: Option<(usize, usize)>,
    }

    #[derive(Clone, Copy, Debug)]
    struct Sample {
        endpoint: Endpoint,
        ok: bool,
        at: Instant,
        cpu_ns: Option<u64>,
        ticks: Option<u64>,
    }

    fn sample(pid: &AtomicI32, samples: &Mutex<Vec<Sample>>, endpoint: Endpoint, ok: bool) {
        let at = Instant::now();
        let p = pid.load(Ordering::SeqCst);
        let (cpu_ns, ticks) = if p > 0 {
            (
                procfs::cpu_clock_ns(p),
                procfs::stat(p).map(|s| s.utime + s.stime),
            )
        } else {
            (None, None)
        };
        samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Sample {
                endpoint,
                ok,
                at,
                cpu_ns,
                ticks,
            });
    }

    impl Dash {
        fn start(v2: bool) -> Result<Dash, String> {
            let pid = Arc::new(AtomicI32::new(0));
            let samples = Arc::new(Mutex::new(Vec::new()));
            let v2_seen = Arc::new(Mutex::new(V2Seen::default()));
            let fake = if v2 {
                let hook: FrameHook = {
                    let pid = pid.clone();
                    let samples = samples.clone();
                    let seen = v2_seen.clone();
                    Arc::new(move |f: &Frame| {
                        let ok = f.ignored.is_none();
                        if f.is_in("heartbeat") {
                            sample(&pid, &samples, Endpoint::Register, ok);
                        } else if f.is_in("output") {
                            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                            seen.outputs.0 += 1;
                            seen.outputs.1 += f.raw_len;
                        } else if f.is_in("status") {
                            sample(&pid, &samples, Endpoint::Status, ok);
                            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                            let outputs = seen.outputs;
                            seen.statuses.push(SeenStatus {
                                seq: f.seq,
                                at: SystemTime::now(),
                                command: f.str_field("command").unwrap_or("").to_owned(),
                                message: f.str_field("message").unwrap_or("").to_owned(),
                                outputs,
                            });
                        }
                    })
                };
                Fake::V2(
                    FakeV2::try_start(V2Options {
                        token: common::SHARED_TOKEN.into(),
                        on_frame: Some(hook),
                        record_output: false,
                        ..V2Options::default()
                    })
                    .map_err(|e| format!("cannot start the fake v2 dashboard: {e}"))?,
                )
            } else {
                let hook: fake_dashboard::RequestHook = {
                    let pid = pid.clone();
                    let samples = samples.clone();
                    Arc::new(move |r: &RecordedRequest| {
                        let ok = (200..300).contains(&r.response_status);
                        sample(&pid, &samples, r.endpoint, ok);
                    })
                };
                Fake::V1(
                    FakeDashboard::try_start(Options {
                        shared_token: Some(common::SHARED_TOKEN.into()),
                        on_request: Some(hook),
                        ..Options::default()
                    })
                    .map_err(|e| format!("cannot start the fake dashboard: {e}"))?,
                )
            };
            Ok(Dash {
                fake,
                pid,
                samples,
                v2_seen,
            })
        }

        fn url(&self) -> String {
            match &self.fake {
                Fake::V1(d) => d.url(),
                Fake::V2(d) => d.url(),
            }
        }

        fn protocol(&self) -> &'static str {
            match &self.fake {
                Fake::V1(_) => "v1",
                Fake::V2(_) => "v2",
            }
        }

        /// v1: writes the command slot (delivered with the next register reply, so it may be
        /// called before the agent starts). v2: pushes `switch` once the host is connected
        /// (within `timeout`).
        fn send_switch(&self, timeout: Duration) -> Result<(), String> {
            match &self.fake {
                Fake::V1(d) => {
                    d.force_command(HOST, "switch");
                    Ok(())
                }
                Fake::V2(d) => {
                    self.v2_seen
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .outputs = (0, 0);
                    common::wait_until(timeout, || {
                        d.host(HOST)
                            .filter(|h| h.heartbeats > 0)
                            .and_then(|_| d.send_command(HOST, "switch").ok())
                    })
                    .ok_or_else(|| "the agent never connected to receive the switch".into())
                }
            }
        }

        /// When the first register (v1 request, v2 message) after `after` arrived.
        fn first_register_after(&self, after: u64) -> Option<SystemTime> {
            match &self.fake {
                Fake::V1(d) => d
                    .requests()
                    .into_iter()
                    .find(|r| {
                        r.id > after
                            && r.endpoint == Endpoint::Register
                            && (200..300).contains(&r.response_status)
                    })
                    .map(|r| r.at),
                Fake::V2(d) => d
                    .frames()
                    .into_iter()
                    .find(|f| f.seq > after && f.is_in("register"))
                    .map(|f| SystemTime::now() - f.at.elapsed()),
            }
        }

        fn samples(&self) -> Vec<Sample> {
            self.samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        fn ok_registers(&self) -> Vec<Sample> {
            self.samples()
                .into_iter()
                .filter(|s| s.endpoint == Endpoint::Register && s.ok)
                .collect()
        }

        /// Waits for the final report of a switch after `after`: v1, a 2xx /status whose
        /// output contains `needle`; v2, the `status` message echoing `switch` (its message is
        /// the agent's to choose).
        fn wait_status(&self, after: u64, needle: &str, timeout: Duration) -> Option<Report> {
            match &self.fake {
                Fake::V1(d) => common::wait_until(timeout, || {
                    d.requests().into_iter().find_map(|r| {
                        let output = r.body.as_ref()?.get("output")?.as_str()?.to_owned();
                        (r.id > after
                            && r.endpoint == Endpoint::Status
                            && (200..300).contains(&r.response_status)
                            && output.contains(needle))
                        .then_some(Report {
                            at: r.at,
                            text: output,
                            output_messages: None,
                        })
                    })
                }),
                Fake::V2(_) => common::wait_until(timeout, || {
                    let seen = self.v2_seen.lock().unwrap_or_else(PoisonError::into_inner);
                    let status = seen
                        .statuses
                        .iter()
                        .find(|s| s.seq > after && s.command == "switch")?;
                    Some(Report {
                        at: status.at,
                        text: status.message.clone(),
                        output_messages: Some(status.outputs),
                    })
                }),
            }
        }

        fn last_id(&self) -> u64 {
            match &self.fake {
                Fake::V1(d) => d.requests().last().map_or(0, |r| r.id),
                Fake::V2(d) => d.frames().last().map_or(0, |f| f.seq),
            }
        }
    }

    /// One agent run's directory: state, runtime, home, stand-in bin dir, log file.
    struct Scene {
        dir: PathBuf,
        bin: PathBuf,
        log: PathBuf,
        vars: Vec<(String, String)>,
    }

    impl Scene {
        fn new(root: &Path, name: &str, url: &str) -> Result<Scene, String> {
            let dir = root.join(name);
            let bin = dir.join("bin");
            std::fs::create_dir_all(&bin).map_err(|e| format!("mkdir {}: {e}", bin.display()))?;
            let vars = common::agent_env(url, &dir, &bin)?;
            Ok(Scene {
                log: dir.join("agent.log"),
                dir,
                bin,
                vars,
            })
        }

        fn set(&mut self, key: &str, value: impl Into<String>) {
            common::set_var(&mut self.vars, key, value);
        }

        fn spawn(&self, agent: &Path) -> Result<Agent, String> {
            Agent::spawn(agent, &self.vars, Output::File(self.log.clone()))
        }

        /// The last lines of the agent's log, for error messages.
        fn log_tail(&self) -> String {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
            format!(
                "\n  last agent log lines ({}):\n    {tail}",
                self.log.display()
            )
        }
    }

    fn unix_now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }

    // -----------------------------------------------------------------------------------------
    // The run

    struct Summary {
        ready: Option<Duration>,
        first_register: Option<Duration>,
        cpu_per_beat: Option<f64>,
        rss_kib: Option<u64>,
        hwm_kib: Option<u64>,
        children_per_beat: Option<f64>,
        children_method: &'static str,
        kill_overshoot: Option<f64>,
        kill_report_after_start: Option<f64>,
        flood_peak_kib: Option<u64>,
        flood_growth_kib: Option<i64>,
        wakeups_per_s: Option<f64>,
        cpu_s_per_hour: Option<f64>,
    }

    fn run(args: &Args) -> Result<(), String> {
        let agent = common::locate_agent(args.agent.clone())?;
        let profile = common::build_profile(&agent);
        let tmp = tempfile::Builder::new()
            .prefix("nixfleet-bench-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let root = tmp.path();

        println!(
            "nixfleet-bench: the nixfleet-agent binary against a loopback fake {} dashboard",
            if args.v2 { "v2 (WebSocket)" } else { "v1" }
        );
        println!(
            "  agent      {} (profile: {profile})",
            common::pretty_path(&agent)
        );
        if profile != "release" {
            println!(
                "             not a release build: CPU and memory figures are much higher than \
                 what ships; for representative numbers run\n             cargo build \
                 --release --workspace && target/release/nixfleet-bench"
            );
        }
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "  machine    {cpus} CPUs, load {} (other work on the machine adds noise)",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "  clock      CPU: the process CPU clock (clock_getcpuclockid, ns) and utime+stime \
             ({} ticks/s)",
            procfs::ticks_per_second()
        );

        let dash = Dash::start(args.v2)?;
        let mut summary = Summary {
            ready: None,
            first_register: None,
            cpu_per_beat: None,
            rss_kib: None,
            hwm_kib: None,
            children_per_beat: None,
            children_method: "",
            kill_overshoot: None,
            kill_report_after_start: None,
            flood_peak_kib: None,
            flood_growth_kib: None,
            wakeups_per_s: None,
            cpu_s_per_hour: None,
        };
        startup(&agent, &dash, root, args.starts, &mut summary)?;
        idle(&agent, &dash, root, args.heartbeats, &mut summary)?;
        timeout_kill(&agent, &dash, root, &mut summary)?;
        flood(&agent, &dash, root, &mut summary)?;
        idle_default(&agent, &dash, root, args.idle_window, &mut summary)?;
        print_summary(&profile, dash.protocol(), args.heartbeats, &summary);
        Ok(())
    }

    /// [1] spawn → READY=1 and spawn → first register, median of `starts` runs.
    fn startup(
        agent: &Path,
        dash: &Dash,
        root: &Path,
        starts: u32,
        summary: &mut Summary,
    ) -> Result<(), String> {
        section(1, &format!("start-up ({starts} starts, fresh state each)"));
        let mut ready = Vec::new();
        let mut register = Vec::new();
        for n in 0..starts {
            let mut scene = Scene::new(root, &format!("start-{n}"), &dash.url())?;
            let socket_path = scene.dir.join("notify.sock");
            let socket = UnixDatagram::bind(&socket_path)
                .map_err(|e| format!("bind {}: {e}", socket_path.display()))?;
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| format!("socket timeout: {e}"))?;
            scene.set("NOTIFY_SOCKET", socket_path.display().to_string());
            let after = dash.last_id();
            let mut child = scene.spawn(agent)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 4096];
            let ready_at = loop {
                if Instant::now() > deadline {
                    return Err(format!("no READY=1 within 10 s{}", scene.log_tail()));
                }
                if let Ok(len) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..len]);
                    if text.lines().any(|l| l == "READY=1") {
                        break child.spawned_at.elapsed();
                    }
                }
            };
            let first =
                common::wait_until(Duration::from_secs(10), || dash.first_register_after(after))
                    .ok_or_else(|| format!("no register within 10 s{}", scene.log_tail()))?;
            let reg_at = first.duration_since(child.spawned_wall).unwrap_or_default();
            child.stop(Duration::from_secs(5));
            ready.push(ready_at);
            register.push(reg_at);
        }
        let spread = |v: &[Duration]| {
            let min = v.iter().min().copied().unwrap_or_default();
            let max = v.iter().max().copied().unwrap_or_default();
            format!("(min {}, max {})", ms(min), ms(max))
        };
        let r = median(ready.clone());
        let g = median(register.clone());
        row("spawn -> READY=1 (sd_notify)", &ms(r), &spread(&ready));
        row(
            "spawn -> first register arrives",
            &ms(g),
            &spread(&register),
        );
        summary.ready = Some(r);
        summary.first_register = Some(g);
        Ok(())
    }

    /// [2] CPU, memory and children over `beats` idle heartbeats.
    fn idle(
        agent: &Path,
        dash: &Dash,
        root: &Path,
        beats: u32,
        summary: &mut Summary,
    ) -> Result<(), String> {
        section(
            2,
            &format!("idle heartbeats (NIXFLEET_INTERVAL=2, {beats} heartbeats after 2 warm-up)"),
        );
        let mut scene = Scene::new(root, "idle", &dash.url())?;
        scene.set("NIXFLEET_INTERVAL", "2");
        let repos = Repos::create(&scene.dir, &[("flake.nix", "{ outputs = _: { }; }\n")])?;
        scene.set("NIXFLEET_NIXCFG", repos.checkout.display().to_string());

        // Fork events, if the kernel lets us listen (root, initial pid namespace).
        let events = proc_events::Listener::open();
        let before_registers = dash.ok_registers().len();
        let mut child = scene.spawn(agent)?;
        let pid = child.pid();
        dash.pid.store(pid, Ordering::SeqCst);
        let recorder = match &events {
            Ok(listener) => Some(listener.record_children_of(pid)),
            Err(_) => None,
        };

        // Warm-up: the first register gets the per-host token, the second uses it.
        let warm = before_registers + 2;
        let budget = Duration::from_secs(u64::from(beats) * 3 + 20);
        common::wait_until(Duration::from_secs(15), || {
            (dash.ok_registers().len() >= warm).then_some(())
        })
        .ok_or_else(|| format!("the agent did not heartbeat twice{}", scene.log_tail()))?;
        let start = dash.ok_registers()[warm - 1];
        if let Some(rec) = &recorder {
            rec.start();
        }
        let pid_counter_before = procfs::last_pid();
        let scan_stop = Arc::new(AtomicBool::new(false));
        let status_file = scene.dir.join("state/status.json");
        let scanner = {
            let stop = scan_stop.clone();
            std::thread::spawn(move || {
                use std::os::unix::fs::MetadataExt as _;
                let mut seen = BTreeSet::new();
                let mut scans = 0u64;
                // Every write of status.json is a rename: a new inode each time.
                let mut status_inodes = BTreeSet::new();
                while !stop.load(Ordering::SeqCst) {
                    seen.extend(procfs::children_of(pid));
                    if let Ok(meta) = std::fs::metadata(&status_file) {
                        status_inodes.insert(meta.ino());
                    }
                    scans += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                (seen, scans, status_inodes.len())
            })
        };

        let target = warm + beats as usize;
        let progress_every = (beats / 10).max(1) as usize;
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let mut shown = 0;
        let done = common::wait_until(budget, || {
            let n = dash.ok_registers().len();
            let beats_done = n.saturating_sub(warm);
            if tty && beats_done >= shown + progress_every && beats_done < beats as usize {
                shown = beats_done;
                print!("\r\x1b[2K  ... {beats_done}/{beats} heartbeats");
                let _ = std::io::stdout().flush();
            }
            (n >= target).then_some(())
        });
        scan_stop.store(true, Ordering::SeqCst);
        let pid_counter_after = procfs::last_pid();
        let (scanned, scans, status_versions) = scanner.join().unwrap_or_default();
        let forks = recorder.map(|r| r.finish());
        if tty {
            print!("\r\x1b[2K");
        }
        done.ok_or_else(|| {
            format!(
                "fewer than {beats} heartbeats within {budget:?}{}",
                scene.log_tail()
            )
        })?;
        let end = dash.ok_registers()[target - 1];
        let status = procfs::status(pid);
        dash.pid.store(0, Ordering::SeqCst);
        child.stop(Duration::from_secs(5));

        let window = end.at.duration_since(start.at);
        let n = f64::from(beats);
        if let (Some(a), Some(b)) = (start.cpu_ns, end.cpu_ns) {
            let per = (b.saturating_sub(a)) as f64 / 1e6 / n;
            row(
                "CPU per idle heartbeat",
                &format!("{per:.3} ms"),
                &format!(
                    "process CPU clock: {:.1} ms over {beats} heartbeats in {:.1} s",
                    (b.saturating_sub(a)) as f64 / 1e6,
                    window.as_secs_f64()
                ),
            );
            summary.cpu_per_beat = Some(per);
            // Per-heartbeat spread from consecutive samples.
            let regs: Vec<Sample> = dash.ok_registers()[warm - 1..target].to_vec();
            let mut per_beat: Vec<f64> = regs
                .windows(2)
                .filter_map(|w| Some((w[1].cpu_ns?.saturating_sub(w[0].cpu_ns?)) as f64 / 1e6))
                .collect();
            per_beat.sort_by(f64::total_cmp);
            if let (Some(min), Some(max)) = (per_beat.first(), per_beat.last()) {
                let med = per_beat[per_beat.len() / 2];
                row(
                    "",
                    "",
                    &format!("per heartbeat: min {min:.3}, median {med:.3}, max {max:.3} ms"),
                );
            }
        }
        if let (Some(a), Some(b)) = (start.ticks, end.ticks) {
            let tick_ms = 1000.0 / procfs::ticks_per_second() as f64;
            let per = b.saturating_sub(a) as f64 * tick_ms / n;
            row(
                "  same, from utime+stime",
                &format!("{per:.3} ms"),
                &format!(
                    "{} ticks of {tick_ms:.0} ms; resolution {:.2} ms per heartbeat",
                    b.saturating_sub(a),
                    tick_ms / n
                ),
            );
            if summary.cpu_per_beat.is_none() {
                summary.cpu_per_beat = Some(per);
            }
        }
        // The status record is written only when its content changes: each heartbeat changes the
        // "last heartbeat" time, nothing else does while idle.
        row(
            "status.json writes per idle heartbeat",
            &format!("{:.2}", status_versions.saturating_sub(1) as f64 / n),
            &format!(
                "{} versions seen over {beats} heartbeats (1 s interval, ~100 ticks/s polled)",
                status_versions
            ),
        );
        if let Some(st) = status {
            row(
                &format!("memory after {} heartbeats", beats + 2),
                &format!("VmRSS {}", mib(st.rss_kib)),
                &format!("VmHWM {} (peak since start)", mib(st.hwm_kib)),
            );
            summary.rss_kib = Some(st.rss_kib);
            summary.hwm_kib = Some(st.hwm_kib);
        }

        // Children.
        match forks {
            Some(f) => {
                row(
                    "child processes per idle heartbeat",
                    &format!("{:.2}", f.processes.len() as f64 / n),
                    &format!(
                        "{} over {beats} heartbeats (netlink proc connector: every fork, exact)",
                        f.processes.len()
                    ),
                );
                row(
                    "  threads started per idle heartbeat",
                    &format!("{:.2}", f.threads as f64 / n),
                    &format!("{} over {beats} heartbeats (same source)", f.threads),
                );
                if f.overruns > 0 {
                    row(
                        "  (proc connector overruns)",
                        &f.overruns.to_string(),
                        "the kernel dropped events: counts may be low",
                    );
                }
                summary.children_per_beat = Some(f.processes.len() as f64 / n);
                summary.children_method = "proc connector";
            }
            None => {
                let reason = events.as_ref().err().cloned().unwrap_or_default();
                row(
                    "  (netlink proc connector)",
                    "n/a",
                    &format!("unavailable: {reason}; using the /proc scan"),
                );
                summary.children_per_beat = Some(scanned.len() as f64 / n);
                summary.children_method = "/proc scan";
            }
        }
        row(
            "  children seen by /proc scan",
            &scanned.len().to_string(),
            &format!(
                "{scans} scans of /proc/*/stat for ppid={pid}, every 10 ms (misses children \
                 living < 10 ms)"
            ),
        );
        if let (Some(a), Some(b)) = (pid_counter_before, pid_counter_after) {
            row(
                "  system pid counter advanced by",
                &procfs::pids_between(a, b).to_string(),
                "last pid in /proc/loadavg: every process and thread on the machine, not only \
                 the agent's",
            );
        }
        Ok(())
    }

    /// [3] Timeout-kill precision with a stand-in that ignores SIGTERM.
    fn timeout_kill(
        agent: &Path,
        dash: &Dash,
        root: &Path,
        summary: &mut Summary,
    ) -> Result<(), String> {
        section(
            3,
            &format!(
                "timeout kill (switch timeout {SWITCH_TIMEOUT_S} s, kill grace {KILL_GRACE_S} s, \
                 stand-in ignores SIGTERM)"
            ),
        );
        let mut scene = Scene::new(root, "timeout", &dash.url())?;
        let repos = Repos::create(&scene.dir, &[("flake.nix", "{ outputs = _: { }; }\n")])?;
        scene.set("NIXFLEET_NIXCFG", repos.checkout.display().to_string());
        scene.set("NIXFLEET_SWITCH_TIMEOUT", SWITCH_TIMEOUT_S.to_string());
        scene.set("NIXFLEET_KILL_GRACE", KILL_GRACE_S.to_string());
        scene.set("NIXFLEET_SWITCH_ISOLATION", "none");
        let marks = scene.dir.join("marks");
        std::fs::create_dir_all(&marks).map_err(|e| format!("mkdir: {e}"))?;
        let m = marks.display();
        common::write_executable(
            &scene.bin.join("nixos-rebuild"),
            &format!(
                "#!/bin/sh\n# nixfleet-bench stand-in: ignores SIGTERM and hangs.\n\
                 date +%s.%N > '{m}/started.tmp' && mv '{m}/started.tmp' '{m}/started'\n\
                 trap '' TERM\n\
                 sleep 1000 &\n\
                 echo \"$$ $!\" > '{m}/pids.tmp' && mv '{m}/pids.tmp' '{m}/pids'\n\
                 echo 'stand-in: ignoring SIGTERM'\n\
                 wait\n"
            ),
        )?;
        // v1: queued before the start, the first register's reply delivers it; v2: pushed
        // once the agent is connected.
        let v1 = matches!(dash.fake, Fake::V1(_));
        if v1 {
            dash.send_switch(Duration::ZERO)?;
        }
        let after = dash.last_id();
        let events = proc_events::Listener::open().ok();
        let mut child = scene.spawn(agent)?;
        let recorder = events.as_ref().map(|l| l.record_children_of(child.pid()));
        if let Some(r) = &recorder {
            r.start();
        }
        if !v1 {
            dash.send_switch(Duration::from_secs(10))
                .map_err(|e| format!("{e}{}", scene.log_tail()))?;
        }

        let pids = common::wait_until(Duration::from_secs(10), || {
            let text = std::fs::read_to_string(marks.join("pids")).ok()?;
            let mut it = text
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok());
            Some((it.next()?, it.next()?))
        })
        .ok_or_else(|| format!("the stand-in switch never started{}", scene.log_tail()))?;
        let started: f64 = std::fs::read_to_string(marks.join("started"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or("cannot read the stand-in's start time (date +%s.%N)")?;
        let (shell, sleeper) = pids;
        let group = procfs::stat(shell).map(|s| s.pgrp);
        let give_up = Instant::now() + Duration::from_secs(SWITCH_TIMEOUT_S + KILL_GRACE_S + 10);
        let gone_wall = loop {
            if !procfs::alive(shell) && !procfs::alive(sleeper) {
                break unix_now();
            }
            if Instant::now() > give_up {
                return Err(format!("the stand-in's tree survived{}", scene.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let report = dash
            .wait_status(after, "timed out after", Duration::from_secs(10))
            .ok_or_else(|| format!("no timeout report at the dashboard{}", scene.log_tail()))?;
        let report_wall = report
            .at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let survivors = group.map(procfs::group_members).unwrap_or_default();
        child.stop(Duration::from_secs(5));
        let forks = recorder.map(|r| r.finish());

        let expected = (SWITCH_TIMEOUT_S + KILL_GRACE_S) as f64;
        let gone_after = gone_wall - started;
        let overshoot_ms = (gone_after - expected) * 1e3;
        row(
            "stand-in tree gone after",
            &format!("{gone_after:.3} s"),
            &format!(
                "shell and its sleep both dead (zombie) or reaped, polled every 5 ms; \
                 timeout + grace = {expected:.0} s"
            ),
        );
        row(
            "kill overshoot past timeout + grace",
            &format!("{overshoot_ms:+.0} ms"),
            "measured from the stand-in's first line (a few ms after the agent's spawn)",
        );
        row(
            "timeout report at the dashboard after",
            &format!("{:.3} s", report_wall - started),
            &format!(
                "{:+.0} ms after the tree was gone",
                (report_wall - gone_wall) * 1e3
            ),
        );
        let output = report.text.as_str();
        row(
            "  report says",
            "",
            &format!(
                "\"{}\"",
                output.lines().take(2).collect::<Vec<_>>().join(" | ")
            ),
        );
        row(
            "  processes left in the stand-in's group",
            &survivors.len().to_string(),
            &format!("process group {}", group.unwrap_or(0)),
        );
        if let Some(f) = forks {
            row(
                "  children the agent started in this run",
                &f.processes.len().to_string(),
                "proc connector again: the positive control for the idle count of 0 \
                 (expected 1, the switch)",
            );
        }
        summary.kill_overshoot = Some(overshoot_ms);
        summary.kill_report_after_start = Some(report_wall - started);
        Ok(())
    }

    /// [4] Peak RSS while a switch prints 50 MiB.
    fn flood(agent: &Path, dash: &Dash, root: &Path, summary: &mut Summary) -> Result<(), String> {
        section(
            4,
            "50 MiB output flood (the switch prints 50 MiB, in-process runner)",
        );
        let mut scene = Scene::new(root, "flood", &dash.url())?;
        let repos = Repos::create(&scene.dir, &[("flake.nix", "{ outputs = _: { }; }\n")])?;
        scene.set("NIXFLEET_NIXCFG", repos.checkout.display().to_string());
        scene.set("NIXFLEET_SWITCH_TIMEOUT", "120");
        scene.set("NIXFLEET_SWITCH_ISOLATION", "none");
        let marks = scene.dir.join("marks");
        std::fs::create_dir_all(&marks).map_err(|e| format!("mkdir: {e}"))?;
        let m = marks.display();
        common::write_executable(
            &scene.bin.join("nixos-rebuild"),
            &format!(
                "#!/bin/sh\n# nixfleet-bench stand-in: prints {FLOOD_BYTES} bytes.\n\
                 date +%s.%N > '{m}/started'\n\
                 yes 'flood: the quick brown fox jumps over the lazy dog 0123456789' \
                 | head -c {FLOOD_BYTES}\n\
                 date +%s.%N > '{m}/finished'\n"
            ),
        )?;
        let before_registers = dash.ok_registers().len();
        let mut child = scene.spawn(agent)?;
        let pid = child.pid();
        common::wait_until(Duration::from_secs(15), || {
            (dash.ok_registers().len() >= before_registers + 2).then_some(())
        })
        .ok_or_else(|| format!("the agent did not heartbeat twice{}", scene.log_tail()))?;
        let baseline = procfs::status(pid).ok_or("cannot read the agent's /proc status")?;

        let after = dash.last_id();
        dash.send_switch(Duration::from_secs(10))?;
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0u64;
                let mut samples = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if let Some(s) = procfs::status(pid) {
                        peak = peak.max(s.rss_kib);
                        samples += 1;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (peak, samples)
            })
        };
        let report = dash.wait_status(after, "Switch", Duration::from_secs(120));
        stop.store(true, Ordering::SeqCst);
        let (peak_sampled, samples) = sampler.join().unwrap_or_default();
        let end = procfs::status(pid);
        child.stop(Duration::from_secs(5));
        let report =
            report.ok_or_else(|| format!("no switch report within 120 s{}", scene.log_tail()))?;
        let end = end.ok_or("cannot read the agent's /proc status after the flood")?;

        let read = |name: &str| -> Option<f64> {
            std::fs::read_to_string(marks.join(name))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        if let (Some(s), Some(f)) = (read("started"), read("finished")) {
            let secs = f - s;
            row(
                "flood written and read in",
                &format!("{secs:.2} s"),
                &format!(
                    "{:.0} MiB/s through the agent's pipe",
                    FLOOD_BYTES as f64 / MIB / secs
                ),
            );
        }
        row(
            "agent VmRSS before the flood",
            &mib(baseline.rss_kib),
            &format!("VmHWM {}", mib(baseline.hwm_kib)),
        );
        row(
            "agent VmRSS peak during the flood",
            &mib(peak_sampled),
            &format!("{samples} samples, every 10 ms"),
        );
        row(
            "agent VmHWM after the flood",
            &mib(end.hwm_kib),
            &format!(
                "growth over the pre-flood peak: {:+.1} MiB; VmRSS now {}",
                (end.hwm_kib as f64 - baseline.hwm_kib as f64) / 1024.0,
                mib(end.rss_kib)
            ),
        );
        match report.output_messages {
            None => row(
                "  report output sent",
                &format!("{} chars", report.text.chars().count()),
                "(the dashboard's limit is 10000; the tail is kept)",
            ),
            Some((messages, bytes)) => row(
                "  output messages sent",
                &messages.to_string(),
                &format!(
                    "{} in them ({:.0} MiB printed), then the status",
                    if bytes as f64 >= MIB {
                        format!("{:.1} MiB", bytes as f64 / MIB)
                    } else {
                        format!("{:.1} KiB", bytes as f64 / 1024.0)
                    },
                    FLOOD_BYTES as f64 / MIB
                ),
            ),
        }
        summary.flood_peak_kib = Some(end.hwm_kib.max(peak_sampled));
        summary.flood_growth_kib = Some(end.hwm_kib as i64 - baseline.hwm_kib as i64);
        Ok(())
    }

    /// [5] The idle cost at the default interval (30 s): wake-ups (voluntary context switches
    /// of all the agent's threads: each is a sleep that ended) and CPU per hour, over `window`
    /// seconds after a 5 s warm-up.
    fn idle_default(
        agent: &Path,
        dash: &Dash,
        root: &Path,
        window: u64,
        summary: &mut Summary,
    ) -> Result<(), String> {
        section(
            5,
            &format!("idle at the default interval (NIXFLEET_INTERVAL=30, {window} s)"),
        );
        let mut scene = Scene::new(root, "idle-default", &dash.url())?;
        scene.set("NIXFLEET_INTERVAL", "30");
        let mut child = scene.spawn(agent)?;
        let pid = child.pid();
        std::thread::sleep(Duration::from_secs(5));
        let beats_before = dash.ok_registers().len();
        let (w0, c0) = (
            procfs::voluntary_switches(pid).ok_or("cannot read the agent's threads")?,
            procfs::cpu_clock_ns(pid).ok_or("cannot read the agent's CPU clock")?,
        );
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(window));
        let (w1, c1) = (
            procfs::voluntary_switches(pid).ok_or("the agent is gone")?,
            procfs::cpu_clock_ns(pid).ok_or("the agent is gone")?,
        );
        let secs = t0.elapsed().as_secs_f64();
        let beats = dash.ok_registers().len().saturating_sub(beats_before);
        child.stop(Duration::from_secs(5));
        let wakeups = (w1.saturating_sub(w0)) as f64 / secs;
        let cpu_hour = (c1.saturating_sub(c0)) as f64 / 1e9 / secs * 3600.0;
        row(
            "wake-ups per second (all threads)",
            &format!("{wakeups:.3}"),
            &format!(
                "{} voluntary context switches in {secs:.0} s, {beats} heartbeats; one per {:.1} s",
                w1.saturating_sub(w0),
                1.0 / wakeups.max(1e-9)
            ),
        );
        row(
            "CPU per hour",
            &format!("{cpu_hour:.3} s"),
            &format!(
                "process CPU clock: {:.2} ms in {secs:.0} s",
                (c1.saturating_sub(c0)) as f64 / 1e6
            ),
        );
        summary.wakeups_per_s = Some(wakeups);
        summary.cpu_s_per_hour = Some(cpu_hour);
        Ok(())
    }

    fn print_summary(profile: &str, protocol: &str, beats: u32, s: &Summary) {
        println!();
        println!(
            "Summary ({profile} build, protocol {protocol}; targets from issues #2, #3 and #13)"
        );
        let na = || "n/a".to_string();
        let line = |label: &str, value: String, target: &str, ok: Option<bool>| {
            let v = ok.map_or("", verdict);
            println!("  {label:<46} {value:>12}   {target:<28} {v}");
        };
        line("spawn -> READY=1", s.ready.map_or_else(na, ms), "", None);
        line(
            "spawn -> first heartbeat",
            s.first_register.map_or_else(na, ms),
            "",
            None,
        );
        line(
            "CPU per idle heartbeat",
            s.cpu_per_beat.map_or_else(na, |v| format!("{v:.3} ms")),
            "<= 0.4 ms (interval 2 s)",
            s.cpu_per_beat.map(|v| v <= 0.4),
        );
        line(
            "idle wake-ups per second (interval 30 s)",
            s.wakeups_per_s.map_or_else(na, |v| format!("{v:.3}")),
            "<= 0.2 (one per 5 s)",
            s.wakeups_per_s.map(|v| v <= 0.2),
        );
        line(
            "idle CPU per hour (interval 30 s)",
            s.cpu_s_per_hour.map_or_else(na, |v| format!("{v:.3} s")),
            "<= 0.15 s",
            s.cpu_s_per_hour.map(|v| v <= 0.15),
        );
        line(
            &format!("RSS after {} heartbeats (VmRSS)", beats + 2),
            s.rss_kib.map_or_else(na, mib),
            "< 10 MiB",
            s.rss_kib.map(|v| v < 10 * 1024),
        );
        line(
            "  peak so far (VmHWM)",
            s.hwm_kib.map_or_else(na, mib),
            "",
            None,
        );
        line(
            &format!("children per idle heartbeat ({})", s.children_method),
            s.children_per_beat.map_or_else(na, |v| format!("{v:.2}")),
            "0",
            s.children_per_beat.map(|v| v == 0.0),
        );
        line(
            "timeout kill overshoot",
            s.kill_overshoot.map_or_else(na, |v| format!("{v:+.0} ms")),
            "< +1000 ms (grace + 1 s)",
            s.kill_overshoot.map(|v| v < 1000.0),
        );
        line(
            "timeout report at dashboard",
            s.kill_report_after_start
                .map_or_else(na, |v| format!("{v:.2} s")),
            "after the stand-in started",
            None,
        );
        line(
            "peak RSS during 50 MiB flood",
            s.flood_peak_kib.map_or_else(na, mib),
            "",
            None,
        );
        line(
            "  growth over pre-flood peak",
            s.flood_growth_kib
                .map_or_else(na, |v| format!("{:+.1} MiB", v as f64 / 1024.0)),
            "bounded: < 5 MiB (10% of it)",
            s.flood_growth_kib.map(|v| v < 5 * 1024),
        );
        if profile != "release" {
            println!(
                "\n  ({profile} build: run `cargo build --release --workspace && \
                 target/release/nixfleet-bench` for the numbers that ship)"
            );
        }
    }
}

/// Reading `/proc` for another process.
#[cfg(target_os = "linux")]
mod procfs {
    use std::collections::BTreeSet;

    pub struct Stat {
        pub state: char,
        pub ppid: i32,
        pub pgrp: i32,
        pub utime: u64,
        pub stime: u64,
    }

    /// `/proc/<pid>/stat` (fields after the `(comm)`, which may contain spaces).
    pub fn stat(pid: i32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(Stat {
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            pgrp: f.get(2)?.parse().ok()?,
            utime: f.get(11)?.parse().ok()?,
            stime: f.get(12)?.parse().ok()?,
        })
    }

    /// Alive = exists and is not a zombie (a zombie is dead, just not reaped yet).
    pub fn alive(pid: i32) -> bool {
        stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
    }

    pub struct Status {
        pub rss_kib: u64,
        pub hwm_kib: u64,
    }

    pub fn status(pid: i32) -> Option<Status> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        Some(Status {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }

    fn all_pids() -> impl Iterator<Item = i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
    }

    /// Processes whose parent is `pid`.
    pub fn children_of(pid: i32) -> BTreeSet<i32> {
        all_pids()
            .filter(|p| stat(*p).is_some_and(|s| s.ppid == pid))
            .collect()
    }

    /// Live processes in process group `pgrp`.
    pub fn group_members(pgrp: i32) -> Vec<i32> {
        all_pids()
            .filter(|p| stat(*p).is_some_and(|s| s.pgrp == pgrp && s.state != 'Z'))
            .collect()
    }

    /// The last pid the kernel allocated (last field of `/proc/loadavg`).
    pub fn last_pid() -> Option<u64> {
        std::fs::read_to_string("/proc/loadavg")
            .ok()?
            .split_whitespace()
            .last()?
            .parse()
            .ok()
    }

    /// Pids allocated from `before` to `after` (the last pid values), across one wrap at
    /// `kernel.pid_max`.
    pub fn pids_between(before: u64, after: u64) -> u64 {
        if after >= before {
            return after - before;
        }
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(32768);
        // Pids restart at 300 after a wrap (RESERVED_PIDS).
        (pid_max - before) + after.saturating_sub(300)
    }

    pub fn ticks_per_second() -> u64 {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
    }

    /// The CPU time of the whole process `pid` (all threads, live and exited) in ns.
    /// Voluntary context switches of every thread of `pid`: each one is a sleep that ended,
    /// i.e. a wake-up.
    pub fn voluntary_switches(pid: i32) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut total = 0;
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse::<u64>()
                .ok()?;
        }
        Some(total)
    }

    pub fn cpu_clock_ns(pid: i32) -> Option<u64> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: out-pointer to a local.
        if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
            return None;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: out-pointer to a local.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        Some(u64::try_from(ts.tv_sec).ok()? * 1_000_000_000 + u64::try_from(ts.tv_nsec).ok()?)
    }
}

/// Fork events from the kernel's process connector (netlink `NETLINK_CONNECTOR`,
/// `CN_IDX_PROC`): every fork on the machine with parent and child ids, so even a child that
/// lives for a microsecond is counted. Needs CAP_NET_ADMIN and the initial pid namespace.
#[cfg(target_os = "linux")]
mod proc_events {
    use std::collections::BTreeSet;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::Duration;

    const CN_IDX_PROC: u32 = 1;
    const CN_VAL_PROC: u32 = 1;
    const PROC_CN_MCAST_LISTEN: u32 = 1;
    const PROC_EVENT_FORK: u32 = 1;
    const NLMSG_HDRLEN: usize = 16;
    const CN_MSG_LEN: usize = 20;

    pub struct Listener {
        fd: Arc<OwnedFd>,
    }

    pub struct Forks {
        /// New processes whose parent process is the target.
        pub processes: BTreeSet<u32>,
        /// New threads inside the target.
        pub threads: u64,
        /// Receive-buffer overruns while recording (events may have been lost).
        pub overruns: u64,
    }

    pub struct Recorder {
        recording: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<Forks>,
    }

    fn errno(what: &str) -> String {
        format!("{what}: {}", std::io::Error::last_os_error())
    }

    impl Listener {
        pub fn open() -> Result<Listener, String> {
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    libc::NETLINK_CONNECTOR,
                )
            };
            if raw < 0 {
                return Err(errno("socket(NETLINK_CONNECTOR)"));
            }
            // SAFETY: `raw` is a fresh fd nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: zeroed sockaddr_nl is valid; fields set below.
            let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            addr.nl_groups = CN_IDX_PROC;
            addr.nl_pid = 0;
            // SAFETY: addr is a valid sockaddr_nl of the given size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(errno("bind(CN_IDX_PROC)"));
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: tv is a valid timeval of the given size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                );
            }
            // nlmsghdr + cn_msg + PROC_CN_MCAST_LISTEN.
            let total = NLMSG_HDRLEN + CN_MSG_LEN + 4;
            let mut msg = Vec::with_capacity(total);
            msg.extend_from_slice(&(total as u32).to_ne_bytes()); // nlmsg_len
            msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes()); // nlmsg_type
            msg.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
            msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
            msg.extend_from_slice(&std::process::id().to_ne_bytes()); // nlmsg_pid
            msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes()); // cb_id.idx
            msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes()); // cb_id.val
            msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
            msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
            msg.extend_from_slice(&4u16.to_ne_bytes()); // len
            msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
            msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
            // SAFETY: msg is a valid buffer of msg.len() bytes.
            let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
            if sent < 0 {
                return Err(errno("send(PROC_CN_MCAST_LISTEN)"));
            }
            let listener = Listener { fd: Arc::new(fd) };
            listener.self_test()?;
            Ok(listener)
        }

        /// Forks a short-lived `true` and checks that its fork event arrives, so a socket the
        /// kernel silently never feeds (a container) is reported as unavailable.
        fn self_test(&self) -> Result<(), String> {
            let child = std::process::Command::new("true")
                .spawn()
                .map_err(|e| format!("self-test spawn: {e}"))?;
            let pid = child.id();
            let mut child = child;
            let _ = child.wait();
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            let me = std::process::id();
            while std::time::Instant::now() < deadline {
                for (parent_tgid, child_pid, _) in recv_forks(&self.fd).0 {
                    if parent_tgid == me && child_pid == pid {
                        return Ok(());
                    }
                }
            }
            Err("no fork events arrive (not permitted in this namespace?)".into())
        }

        /// Starts collecting forks whose parent process is `pid` (call `start` to begin
        /// counting; earlier ones are ignored).
        pub fn record_children_of(&self, pid: i32) -> Recorder {
            let fd = self.fd.clone();
            let recording = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let target = u32::try_from(pid).unwrap_or(0);
            let forks = Arc::new(Mutex::new(Forks {
                processes: BTreeSet::new(),
                threads: 0,
                overruns: 0,
            }));
            let thread = {
                let recording = recording.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let (events, overrun) = recv_forks(&fd);
                        if overrun && recording.load(Ordering::SeqCst) {
                            forks
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .overruns += 1;
                        }
                        for (parent_tgid, child_pid, child_tgid) in events {
                            if parent_tgid != target || !recording.load(Ordering::SeqCst) {
                                continue;
                            }
                            let mut f = forks.lock().unwrap_or_else(PoisonError::into_inner);
                            if child_tgid == target {
                                f.threads += 1;
                            } else {
                                f.processes.insert(child_pid);
                            }
                        }
                    }
                    let mut f = forks.lock().unwrap_or_else(PoisonError::into_inner);
                    Forks {
                        processes: std::mem::take(&mut f.processes),
                        threads: f.threads,
                        overruns: f.overruns,
                    }
                })
            };
            Recorder {
                recording,
                stop,
                thread,
            }
        }
    }

    /// The fork events of one datagram, or none after the 100 ms receive timeout:
    /// (parent tgid, child pid, child tgid), and whether the socket reported an overrun.
    fn recv_forks(fd: &OwnedFd) -> (Vec<(u32, u32, u32)>, bool) {
        let mut buf = [0u8; 8192];
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else {
            let overrun = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS);
            return (Vec::new(), overrun);
        };
        let u32_at = |b: &[u8], off: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
        };
        let mut out = Vec::new();
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let Some(len) = u32_at(&buf[..n], off).map(|l| l as usize) else {
                break;
            };
            if len < NLMSG_HDRLEN || off + len > n {
                break;
            }
            let msg = &buf[off..off + len];
            // proc_event: what u32, cpu u32, timestamp u64, then the fork union:
            // parent_pid, parent_tgid, child_pid, child_tgid.
            let ev = NLMSG_HDRLEN + CN_MSG_LEN;
            if u32_at(msg, ev) == Some(PROC_EVENT_FORK)
                && let (Some(ptgid), Some(cpid), Some(ctgid)) = (
                    u32_at(msg, ev + 20),
                    u32_at(msg, ev + 24),
                    u32_at(msg, ev + 28),
                )
            {
                out.push((ptgid, cpid, ctgid));
            }
            off += (len + 3) & !3;
        }
        (out, false)
    }

    impl Recorder {
        pub fn start(&self) {
            self.recording.store(true, Ordering::SeqCst);
        }

        pub fn finish(self) -> Forks {
            self.stop.store(true, Ordering::SeqCst);
            self.thread.join().unwrap_or(Forks {
                processes: BTreeSet::new(),
                threads: 0,
                overruns: u64::MAX,
            })
        }
    }
}
