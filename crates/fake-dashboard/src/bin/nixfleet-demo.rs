//! `nixfleet-demo`: the real `nixfleet-agent` doing its job on this machine, with nothing else
//! installed.
//!
//! It starts the in-process fake v1 dashboard on 127.0.0.1, a throwaway config repository (a
//! bare origin and the host's checkout) and a stand-in `nixos-rebuild` that only prints, then
//! runs the agent binary against them and narrates: registration and the host row the
//! dashboard stored, the per-host token migration, `pull` of a new commit, `test` with its
//! progress stream, `switch`, `pull-switch`, and a clean SIGTERM. Every request the dashboard
//! receives is printed as one line (`dash  |`, tokens masked), and so is every line the agent
//! logs (`agent |`).
//!
//! With `--protocol v2` the same story runs against the fake v2 (WebSocket) dashboard
//! (`demo_v2`): frames instead of requests, the v2 lifecycle instead of the command log.
//!
//! Usage: `cargo build --workspace && target/debug/nixfleet-demo [--protocol v1|v2] [--agent PATH] [--keep]`.
//! Exit code 0 when every step worked, 1 with a message when one did not (every wait is
//! bounded), 2 for a usage error.

#![allow(
    clippy::disallowed_methods,
    reason = "the demo drives git and the agent binary as child processes; it is not the agent, \
              whose children must go through exec::Runner"
)]

mod common;
mod demo_v2;

use std::io::{BufRead as _, BufReader, IsTerminal as _, Read};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{Agent, HOST, Output, Repos, SHARED_TOKEN, mask_token, short_sha};
use fake_dashboard::{Endpoint, FakeDashboard, Options, RecordedRequest};

const USAGE: &str = "usage: nixfleet-demo [--protocol v1|v2] [--agent PATH] [--keep]

Runs the nixfleet-agent binary against a loopback fake NixFleet dashboard and a throwaway
config repository, queues pull, test, switch and pull-switch, and prints what happens.

  --protocol P   v1 (HTTP polling, the default) or v2 (the WebSocket dashboard)
  --agent PATH   the agent binary (default: nixfleet-agent next to this executable)
  --keep         keep the temporary directory (repos, state, logs) and print its path";

/// How long any single step may take before the demo gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Output

/// Terminal styling; plain text when stdout is not a terminal or `NO_COLOR` is set.
struct Ui {
    color: bool,
    start: Instant,
    /// Highest request id whose line has been printed.
    printed: AtomicU64,
}

static UI: OnceLock<Ui> = OnceLock::new();
static DASH: OnceLock<FakeDashboard> = OnceLock::new();
/// Command-log rows already announced as delivered.
static ANNOUNCED: AtomicU64 = AtomicU64::new(0);

fn ui() -> &'static Ui {
    UI.get_or_init(|| Ui {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        start: Instant::now(),
        printed: AtomicU64::new(0),
    })
}

impl Ui {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn stamp(&self) -> String {
        self.paint(
            "2",
            &format!("{:>6.2}s", self.start.elapsed().as_secs_f64()),
        )
    }

    /// One line from a source (`dash`, `agent`) with the elapsed time.
    fn source(&self, tag: &str, color: &str, text: &str) {
        println!(
            "{} {} {text}",
            self.stamp(),
            self.paint(color, &format!("{tag:<5} |"))
        );
    }

    /// The narrator.
    fn say(&self, text: &str) {
        println!("{} {}", self.stamp(), self.paint("1", &format!("▸ {text}")));
    }

    /// An indented detail block under the narrator (no timestamp).
    fn detail(&self, text: &str) {
        for line in text.lines() {
            println!("          {line}");
        }
    }

    fn heading(&self, text: &str) {
        let rule = "─".repeat(72usize.saturating_sub(text.chars().count() + 4));
        println!();
        println!("{}", self.paint("1;34", &format!("── {text} {rule}")));
    }

    fn ok(&self, text: &str) -> String {
        self.paint("32", text)
    }

    fn bad(&self, text: &str) -> String {
        self.paint("31", text)
    }
}

// ---------------------------------------------------------------------------------------------
// What the dashboard receives

/// Which token a request carried, masked.
fn token_label(bearer: Option<&str>) -> String {
    match bearer {
        None => "no token".into(),
        Some(SHARED_TOKEN) => format!("shared token {}", mask_token(SHARED_TOKEN)),
        Some(t) => format!("per-host token {}", mask_token(t)),
    }
}

fn first_line(text: &str, max: usize) -> String {
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let mut out: String = first.chars().take(max).collect();
    if first.chars().count() > max {
        out.push('…');
    }
    let more = lines.count();
    if more > 0 {
        out.push_str(&format!(" (+{more} lines)"));
    }
    out
}

fn metrics_summary(metrics: &serde_json::Value) -> String {
    let Some(obj) = metrics.as_object() else {
        return String::new();
    };
    obj.iter()
        .map(|(k, v)| match v.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{k}={f:.1}"),
            _ => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The body in a few words.
fn body_summary(r: &RecordedRequest) -> String {
    let Some(body) = &r.body else {
        return if r.body_len == 0 {
            String::new()
        } else {
            format!("{} bytes (not JSON)", r.body_len)
        };
    };
    let s = |key: &str| body.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let n = |key: &str| body.get(key).map(|v| v.to_string()).unwrap_or_default();
    match r.endpoint {
        Endpoint::Register => {
            let mut parts = Vec::new();
            if let Some(g) = s("current_generation") {
                parts.push(format!("gen={}", short_sha(&g)));
            }
            if let Some(v) = s("agent_version") {
                parts.push(format!("v{v}"));
            }
            if let Some(m) = body.get("metrics").filter(|m| !m.is_null()) {
                parts.push(format!("metrics[{}]", metrics_summary(m)));
            }
            parts.join(" ")
        }
        Endpoint::Status => {
            let status = s("status").unwrap_or_default();
            let status = if status == "ok" {
                ui().ok(&status)
            } else {
                ui().bad(&status)
            };
            let mut out = format!(
                "{status} \"{}\"",
                first_line(&s("output").unwrap_or_default(), 60)
            );
            if let Some(t) = s("test_status") {
                out.push_str(&format!(" test_status=\"{t}\""));
            }
            out
        }
        Endpoint::TestProgress => format!(
            "test {}/{} passed={} running={}",
            n("current"),
            n("total"),
            n("passed"),
            n("running")
        ),
        _ => format!("{} bytes", r.body_len),
    }
}

/// The dashboard's request hook: one compact line per answered request.
fn print_request(r: &RecordedRequest) {
    let ui = ui();
    let status = if (200..300).contains(&r.response_status) {
        ui.ok(&r.response_status.to_string())
    } else {
        ui.bad(&r.response_status.to_string())
    };
    let mut line = format!(
        "#{:<3} {} {} {status}  {}  {}",
        r.id,
        r.method,
        r.path,
        token_label(r.bearer.as_deref()),
        body_summary(r)
    );
    // A register reply that carried a command: the dashboard wrote a command-log row while
    // answering it.
    if r.endpoint == Endpoint::Register
        && let Some(dash) = DASH.get()
    {
        for row in dash.command_log(HOST) {
            let id = u64::try_from(row.id).unwrap_or(0);
            if id > ANNOUNCED.load(Ordering::SeqCst) && row.created_at >= r.at {
                ANNOUNCED.store(id, Ordering::SeqCst);
                line.push_str(
                    &ui.paint("1;35", &format!("  ⇒ reply delivers \"{}\"", row.command)),
                );
            }
        }
    }
    ui.source("dash", "36", &line);
    ui.printed.fetch_max(r.id, Ordering::SeqCst);
}

/// Set when the agent's stderr closes: it exited (or closed it, which it never does).
static AGENT_GONE: AtomicBool = AtomicBool::new(false);

/// Prints the agent's log lines, without the timestamp (the demo prints its own). `is_stderr`:
/// end of this stream means the agent is gone.
fn forward_agent_output(stream: impl Read + Send + 'static, is_stderr: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let trimmed = match line.split_once(' ') {
                Some((first, rest)) if first.len() > 10 && first.as_bytes()[4] == b'-' => {
                    rest.trim_start()
                }
                _ => line.as_str(),
            };
            ui().source("agent", "33", trimmed);
        }
        if is_stderr {
            AGENT_GONE.store(true, Ordering::SeqCst);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Waiting

/// The requests whose lines have been printed (so narration never overtakes them).
fn printed_requests(dash: &FakeDashboard) -> Vec<RecordedRequest> {
    let printed = ui().printed.load(Ordering::SeqCst);
    dash.requests()
        .into_iter()
        .filter(|r| r.id <= printed && r.response_status != 0)
        .collect()
}

fn wait_request(
    dash: &FakeDashboard,
    what: &str,
    pred: impl Fn(&RecordedRequest) -> bool,
) -> Result<RecordedRequest, String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(r) = printed_requests(dash).into_iter().find(|r| pred(r)) {
            return Ok(r);
        }
        if AGENT_GONE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!(
                "the agent exited while the demo waited for {what} (its log is above)"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "gave up after {}s waiting for {what}",
                STEP_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_output(r: &RecordedRequest) -> Option<String> {
    r.body.as_ref()?.get("output")?.as_str().map(str::to_string)
}

/// Queues `command` like an operator would (the dashboard's command API), falling back to a
/// direct slot write if the API refuses (it wants a host seen in the last 5 minutes).
fn queue(dash: &FakeDashboard, command: &str) -> u64 {
    let after = dash.requests().last().map_or(0, |r| r.id);
    match dash.queue_command(HOST, command) {
        Ok(()) => ui().say(&format!(
            "operator queues \"{command}\" (POST /api/hosts/{HOST}/command); it goes out with \
             the next heartbeat reply"
        )),
        Err(e) => {
            ui().say(&format!(
                "the command API refused \"{command}\" ({e:?}); writing the slot directly"
            ));
            dash.force_command(HOST, command);
        }
    }
    after
}

/// Waits for a 2xx /status after request `after` whose output starts with one of `prefixes`;
/// prints its output as a block.
fn wait_report(
    dash: &FakeDashboard,
    after: u64,
    prefixes: &[&str],
) -> Result<RecordedRequest, String> {
    let what = format!("a status report starting with {prefixes:?}");
    let r = wait_request(dash, &what, |r| {
        r.id > after
            && r.endpoint == Endpoint::Status
            && (200..300).contains(&r.response_status)
            && status_output(r).is_some_and(|o| prefixes.iter().any(|p| o.starts_with(p)))
    })?;
    let status = r
        .body
        .as_ref()
        .and_then(|b| b.get("status"))
        .and_then(|s| s.as_str())
        .unwrap_or("?")
        .to_string();
    let painted = if status == "ok" {
        ui().ok(&status)
    } else {
        ui().bad(&status)
    };
    ui().say(&format!("report #{} ({painted}):", r.id));
    ui().detail(&status_output(&r).unwrap_or_default());
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// The world

fn repo_files() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "flake.nix",
            "{\n  description = \"demo fleet (nixfleet-demo)\";\n  inputs.nixpkgs.url = \
             \"github:NixOS/nixpkgs/nixos-24.11\";\n  outputs = { nixpkgs, ... }: {\n    \
             nixosConfigurations.demo-host = nixpkgs.lib.nixosSystem {\n      modules = [ \
             ./hosts/demo-host/configuration.nix ];\n    };\n  };\n}\n",
        ),
        (
            "flake.lock",
            "{\n  \"nodes\": { \"root\": { \"inputs\": {} } },\n  \"root\": \"root\",\n  \
             \"version\": 7\n}\n",
        ),
        (
            "hosts/demo-host/configuration.nix",
            "{ ... }: {\n  networking.hostName = \"demo-host\";\n  services.nginx.enable = true;\n}\n",
        ),
        (
            "hosts/demo-host/tests/T01-ok.sh",
            "#!/bin/sh\necho \"T01: configuration.nix is in place\"\ntest -f \
             hosts/demo-host/configuration.nix\n",
        ),
        (
            "hosts/demo-host/tests/T02-slow.sh",
            "#!/bin/sh\necho \"T02: waiting a second for the service to settle...\"\nsleep \
             1\necho \"T02: service answers\"\n",
        ),
    ]
}

const STAND_IN: &str = r#"#!/bin/sh
# Stand-in for nixos-rebuild, written by nixfleet-demo. It prints what a switch would print
# and changes nothing on this machine.
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "[stand-in nixos-rebuild from nixfleet-demo: nothing is built or activated]"
echo "nixos-rebuild $*"
echo "building the system configuration for commit $rev..."
sleep 0.2
echo "these 2 derivations will be built:"
echo "  /nix/store/9x0d5w4c-etc.drv"
echo "  /nix/store/k2jf8a1q-nixos-system-demo-host-24.11.drv"
echo "activating the configuration..."
echo "setting up /etc..."
echo "reloading user units for root..."
echo "restarting the following units: nginx.service"
echo "Done. The new configuration is /nix/store/k2jf8a1q-nixos-system-demo-host-24.11-$rev"
"#;

fn mode_of(path: &Path) -> String {
    std::fs::metadata(path)
        .map(|m| format!("{:04o}", m.permissions().mode() & 0o7777))
        .unwrap_or_else(|e| format!("? ({e})"))
}

// ---------------------------------------------------------------------------------------------
// The script

struct Args {
    agent: Option<PathBuf>,
    keep: bool,
    /// `--protocol v2`.
    v2: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        agent: None,
        keep: false,
        v2: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--agent" => {
                args.agent = Some(PathBuf::from(
                    it.next().ok_or("--agent needs a path".to_string())?,
                ));
            }
            "--keep" => args.keep = true,
            "--protocol" => {
                args.v2 = match it.next().as_deref() {
                    Some("v1") => false,
                    Some("v2") => true,
                    other => return Err(format!("--protocol must be v1 or v2, not {other:?}")),
                };
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nixfleet-demo: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let _ = ui();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!();
            println!("{}", ui().bad(&format!("nixfleet-demo: FAILED: {e}")));
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let agent_bin = common::locate_agent(args.agent.clone())?;
    let tmp = tempfile::Builder::new()
        .prefix("nixfleet-demo-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let root = tmp.path().to_path_buf();
    let result = if args.v2 {
        demo_v2::script(&agent_bin, &root)
    } else {
        script(&agent_bin, &root)
    };
    if args.keep {
        let kept = tmp.keep();
        println!(
            "kept {} (agent state in state/, repos in origin.git, dev, checkout)",
            kept.display()
        );
    }
    result
}

fn script(agent_bin: &Path, root: &Path) -> Result<(), String> {
    let ui = ui();
    let repos = Repos::create(root, &repo_files())?;
    let bin_dir = root.join("bin");
    common::write_executable(&bin_dir.join("nixos-rebuild"), STAND_IN)?;

    let hook: fake_dashboard::RequestHook = Arc::new(print_request);
    let dash = FakeDashboard::try_start(Options {
        shared_token: Some(SHARED_TOKEN.into()),
        on_request: Some(hook),
        ..Options::default()
    })
    .map_err(|e| format!("cannot start the fake dashboard: {e}"))?;
    let _ = DASH.set(dash.clone());

    println!(
        "{}",
        ui.paint(
            "1",
            "nixfleet-demo: the real agent against a loopback NixFleet v1 dashboard"
        )
    );
    let initial = repos.checkout_head()?;
    let rows = [
        (
            "agent",
            format!(
                "{} ({} build)",
                common::pretty_path(agent_bin),
                common::build_profile(agent_bin)
            ),
        ),
        (
            "dashboard",
            format!(
                "{} (in-process fake; shared token {})",
                dash.url(),
                mask_token(SHARED_TOKEN)
            ),
        ),
        (
            "config repo",
            format!(
                "{} at {} (origin {})",
                repos.checkout.display(),
                short_sha(&initial),
                repos.origin.display()
            ),
        ),
        (
            "stand-in",
            format!(
                "{} (prints, changes nothing)",
                bin_dir.join("nixos-rebuild").display()
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<12} {v}");
    }
    println!(
        "  {:<12} dash  | = a request the dashboard answered, agent | = the agent's own log",
        "legend"
    );

    // ---- 1. start and register
    ui.heading("1. Start the agent");
    let mut vars = common::agent_env(&dash.url(), root, &bin_dir)?;
    common::set_var(
        &mut vars,
        "NIXFLEET_NIXCFG",
        repos.checkout.display().to_string(),
    );
    common::set_var(
        &mut vars,
        "USER",
        std::env::var("USER").unwrap_or_else(|_| "root".into()),
    );
    ui.say(&format!(
        "NIXFLEET_URL={} NIXFLEET_HOSTNAME={HOST} NIXFLEET_INTERVAL=1 NIXFLEET_NIXCFG=<checkout> \
         NIXFLEET_TOKEN_FILE=<file> nixfleet-agent run",
        dash.url()
    ));
    ui.detail(
        "(interval 1 s keeps the demo short; the agent rightly warns that this exceeds the real\n \
         dashboard's rate limit, which the fake does not enforce by default)",
    );
    let mut agent = Agent::spawn(agent_bin, &vars, Output::Piped)?;
    if let Some(out) = agent.child.stdout.take() {
        forward_agent_output(out, false);
    }
    if let Some(err) = agent.child.stderr.take() {
        forward_agent_output(err, true);
    }
    ui.say(&format!("agent started, pid {}", agent.pid()));

    let first = wait_request(&dash, "the first register", |r| {
        r.endpoint == Endpoint::Register && (200..300).contains(&r.response_status)
    })?;
    ui.say(&format!(
        "registered {} ms after start",
        first
            .at
            .duration_since(agent.spawned_wall)
            .unwrap_or_default()
            .as_millis()
    ));

    ui.heading("2. The host row the dashboard stored");
    let row = dash
        .host(HOST)
        .ok_or_else(|| format!("the dashboard has no row for {HOST}"))?;
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let generation = opt(&row.current_generation);
    let gen_note = if row.current_generation.as_deref() == Some(initial.as_str()) {
        " (= HEAD of the checkout)"
    } else {
        ""
    };
    let metrics = row
        .metrics
        .as_ref()
        .map(metrics_summary)
        .unwrap_or_else(|| "-".into());
    ui.detail(&format!(
        "hostname       {}\nhost_type      {}\nos             {} {}\nnixpkgs        {}\n\
         generation     {generation}{gen_note}\nagent_version  {}\npoll_interval  {} s\n\
         config_repo    {}\nlocation       {} / {}\nmetrics        {metrics}",
        row.hostname,
        row.host_type,
        opt(&row.os_name),
        opt(&row.os_version),
        opt(&row.nixpkgs_version),
        opt(&row.agent_version),
        row.poll_interval,
        opt(&row.config_repo),
        opt(&row.location),
        opt(&row.device_type),
    ));

    // ---- token migration
    ui.heading("3. Per-host token migration");
    let issued = dash.issued_token(HOST).ok_or_else(|| {
        "the dashboard did not issue a per-host token on the first register".to_string()
    })?;
    ui.say(&format!(
        "request #{} used the {}; the dashboard's reply carried a new per-host token {} \
         (it keeps only its hash)",
        first.id,
        token_label(first.bearer.as_deref()),
        mask_token(&issued)
    ));
    let used = wait_request(&dash, "a request with the per-host token", |r| {
        r.bearer.as_deref() == Some(issued.as_str())
    })?;
    ui.say(&format!(
        "request #{} already uses it: no restart needed (the bash agent only switches after one)",
        used.id
    ));
    let cache = root.join("state").join("token");
    let cached = std::fs::read_to_string(&cache).unwrap_or_default();
    ui.say(&format!(
        "persisted to {} (mode {}, directory {}), holds the per-host token: {}",
        cache.display(),
        mode_of(&cache),
        mode_of(cache.parent().unwrap_or(root)),
        if cached.contains(&issued) {
            "yes"
        } else {
            "NO"
        }
    ));
    if !cached.contains(&issued) {
        return Err(format!(
            "the token cache {} does not hold the issued token",
            cache.display()
        ));
    }

    // ---- pull
    ui.heading("4. pull: a new commit on origin");
    let pushed = repos.push_commit(
        "Enable fail2ban on demo-host",
        &[(
            "hosts/demo-host/configuration.nix",
            "{ ... }: {\n  networking.hostName = \"demo-host\";\n  services.nginx.enable = \
             true;\n  services.fail2ban.enable = true;\n}\n",
        )],
    )?;
    ui.say(&format!(
        "pushed {} \"Enable fail2ban on demo-host\" to origin; the host is still at {}",
        short_sha(&pushed),
        short_sha(&initial)
    ));
    let after = queue(&dash, "pull");
    wait_report(&dash, after, &["Pull"])?;
    let updated = common::wait_until(STEP_TIMEOUT, || {
        dash.host(HOST)
            .and_then(|h| h.current_generation)
            .filter(|g| *g == pushed)
    })
    .ok_or("the host's generation never became the pushed commit")?;
    ui.say(&format!(
        "the dashboard now shows generation {} (= origin's new HEAD)",
        short_sha(&updated)
    ));

    // ---- test
    ui.heading("5. test: hosts/demo-host/tests/T*.sh");
    let after = queue(&dash, "test");
    let report = wait_report(&dash, after, &["Test"])?;
    let progress = dash
        .requests()
        .iter()
        .filter(|r| r.id > after && r.id < report.id && r.endpoint == Endpoint::TestProgress)
        .count();
    let row = dash.host(HOST).ok_or("host row vanished")?;
    ui.say(&format!(
        "{progress} test-progress updates streamed before the report; host row: test_status \
         \"{}\", test_running {}",
        opt(&row.test_status),
        row.test_running
    ));

    // ---- switch
    ui.heading("6. switch");
    let after = queue(&dash, "switch");
    wait_report(&dash, after, &["Switch"])?;

    // ---- pull-switch
    ui.heading("7. pull-switch: another commit, pulled and applied");
    let pushed2 = repos.push_commit(
        "Open port 443 on demo-host",
        &[(
            "hosts/demo-host/configuration.nix",
            "{ ... }: {\n  networking.hostName = \"demo-host\";\n  services.nginx.enable = \
             true;\n  services.fail2ban.enable = true;\n  networking.firewall.allowedTCPPorts \
             = [ 443 ];\n}\n",
        )],
    )?;
    ui.say(&format!(
        "pushed {} \"Open port 443 on demo-host\"",
        short_sha(&pushed2)
    ));
    let after = queue(&dash, "pull-switch");
    let pull = wait_report(&dash, after, &["Pull"])?;
    wait_report(&dash, pull.id, &["Switch"])?;
    common::wait_until(STEP_TIMEOUT, || {
        dash.host(HOST)
            .and_then(|h| h.current_generation)
            .filter(|g| *g == pushed2)
    })
    .ok_or("the host's generation never became the second pushed commit")?;
    ui.say(&format!(
        "generation now {} (= origin's new HEAD)",
        short_sha(&pushed2)
    ));

    // ---- stop
    ui.heading("8. SIGTERM");
    ui.say(&format!("kill -TERM {}", agent.pid()));
    let stopped_at = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .ok_or("the agent did not exit within 15 s of SIGTERM")?;
    // Let the reader threads print the last log lines.
    std::thread::sleep(Duration::from_millis(100));
    let code = status.code();
    let shown = match code {
        Some(0) => ui.ok("0"),
        Some(c) => ui.bad(&c.to_string()),
        None => ui.bad(&format!("{status}")),
    };
    ui.say(&format!(
        "agent exited with code {shown} after {} ms",
        stopped_at.elapsed().as_millis()
    ));

    // ---- summary
    ui.heading("Summary");
    let requests = dash.requests();
    let count = |e: Endpoint| requests.iter().filter(|r| r.endpoint == e).count();
    let shared = requests
        .iter()
        .filter(|r| r.bearer.as_deref() == Some(SHARED_TOKEN))
        .count();
    let per_host = requests
        .iter()
        .filter(|r| r.bearer.as_deref() == Some(issued.as_str()))
        .count();
    let failed = requests
        .iter()
        .filter(|r| r.response_status != 0 && !(200..300).contains(&r.response_status))
        .count();
    ui.detail(&format!(
        "requests       {} ({} register, {} status, {} test-progress), {} not 2xx\n\
         tokens         shared token in {shared}, per-host token in {per_host}",
        requests.len(),
        count(Endpoint::Register),
        count(Endpoint::Status),
        count(Endpoint::TestProgress),
        failed
    ));
    ui.detail("command log    (the dashboard's rows, closed by the first /status after delivery)");
    for row in dash.command_log(HOST) {
        let took = row
            .completed_at
            .and_then(|c| c.duration_since(row.created_at).ok())
            .map_or("-".into(), |d| format!("{:.1}s", d.as_secs_f64()));
        ui.detail(&format!(
            "  #{:<3} {:<12} {:<8} {took:>6}  {}",
            row.id,
            row.command,
            row.status,
            first_line(row.output.as_deref().unwrap_or(""), 50)
        ));
    }
    ui.detail(&format!(
        "runtime        {:.1} s",
        ui.start.elapsed().as_secs_f64()
    ));
    if code != Some(0) {
        return Err(format!(
            "the agent exited with {status} after SIGTERM, expected 0"
        ));
    }
    if failed > 0 {
        return Err(format!("{failed} requests were not answered 2xx"));
    }
    println!("\n{}", ui.ok("demo finished: every step worked"));
    Ok(())
}
