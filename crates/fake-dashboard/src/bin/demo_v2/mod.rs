//! `nixfleet-demo --protocol v2`: the same story against the fake v2 (WebSocket) dashboard.
//!
//! The agent dials `ws://127.0.0.1:P/ws` (with `NIXFLEET_ALLOW_INSECURE_HTTP=1`), registers,
//! heartbeats, and gets `pull`, `test`, `switch` and `pull-switch` pushed over the socket;
//! every frame the fake sees or sends is printed as one `dash  |` line. The fake runs in
//! lifecycle mode, so the narration can show how the real dashboard would judge each result
//! (§7.2 of docs/protocol-v2.md). This module only narrates; the fake and the agent decide.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_dashboard::v2::{
    CommandStatus, Direction, FakeV2, Frame, FrameHook, FrameKind, V2Options,
};
use serde_json::Value;

use super::common::{self, Agent, HOST, Output, Repos, SHARED_TOKEN, mask_token, short_sha};
use super::{
    AGENT_GONE, STAND_IN, STEP_TIMEOUT, first_line, forward_agent_output, metrics_summary,
    repo_files, ui,
};

fn str_of<'a>(p: &'a Value, key: &str) -> &'a str {
    p.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The frame in a few words.
fn frame_summary(f: &Frame) -> String {
    let ui = ui();
    let p = f.payload.clone().unwrap_or(Value::Null);
    let arrow = if f.dir == Direction::In { "←" } else { "→" };
    let body = match f.kind {
        FrameKind::Ping | FrameKind::Pong => format!("{:?}", f.kind).to_lowercase(),
        FrameKind::Close => format!(
            "close {} \"{}\"",
            f.close_code.map_or("(empty)".into(), |c| c.to_string()),
            f.text
        ),
        FrameKind::Text | FrameKind::Binary => {
            let t = f
                .msg_type
                .clone()
                .unwrap_or_else(|| "(not an envelope)".into());
            let detail = match t.as_str() {
                "register" => format!(
                    "host={} v{} gen={} os={}",
                    str_of(&p, "hostname"),
                    str_of(&p, "agent_version"),
                    str_of(&p, "generation"),
                    str_of(&p, "os_version")
                ),
                "registered" => format!("host_id={}", str_of(&p, "host_id")),
                "heartbeat" => {
                    let pending = p
                        .get("pending_command")
                        .and_then(Value::as_str)
                        .unwrap_or("-");
                    let metrics = p.get("metrics").map(metrics_summary).unwrap_or_default();
                    format!(
                        "gen={} pending={pending} {metrics}",
                        str_of(&p, "generation")
                    )
                }
                "command" => ui.paint("1;35", &format!("\"{}\"", str_of(&p, "command"))),
                "output" => format!(
                    "{} \"{}\"",
                    str_of(&p, "stream"),
                    first_line(str_of(&p, "line"), 70)
                ),
                "status" => {
                    let exit = p.get("exit_code").and_then(Value::as_i64).unwrap_or(-999);
                    let s = format!("{} exit {exit}", str_of(&p, "status"));
                    let s = if exit == 0 { ui.ok(&s) } else { ui.bad(&s) };
                    format!(
                        "{s} command=\"{}\" \"{}\"",
                        str_of(&p, "command"),
                        first_line(str_of(&p, "message"), 50)
                    )
                }
                "operation_progress" => p
                    .get("progress")
                    .and_then(Value::as_object)
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| {
                                format!(
                                    "{k} {}/{} {}",
                                    v["current"],
                                    v["total"],
                                    str_of(v, "status")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default(),
                _ => format!("{} bytes", f.raw_len),
            };
            format!("{t} {detail}")
        }
    };
    let mut line = format!("conn#{} {arrow} {body}", f.conn);
    if let Some(why) = &f.ignored {
        line.push_str(&ui.bad(&format!("  (ignored: {why})")));
    }
    line
}

fn print_frame(f: &Frame) {
    // Pings and Pongs every few seconds would drown the story.
    if matches!(f.kind, FrameKind::Ping | FrameKind::Pong) {
        return;
    }
    ui().source("dash", "36", &frame_summary(f));
}

/// Waits for a frame after `after` matching `pred`.
fn wait_frame(
    fake: &FakeV2,
    what: &str,
    after: u64,
    pred: impl Fn(&Frame) -> bool,
) -> Result<Frame, String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(f) = fake.frames().into_iter().find(|f| f.seq > after && pred(f)) {
            return Ok(f);
        }
        if AGENT_GONE.load(std::sync::atomic::Ordering::SeqCst) {
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

fn last_seq(fake: &FakeV2) -> u64 {
    fake.frames().last().map_or(0, |f| f.seq)
}

/// Pushes `command` like the operator's dispatch; when the op engine refuses it (e.g. the
/// previous switch still awaits its reconnect, or the real dashboard does not dispatch that
/// name at all), sends it directly and says so.
fn push(fake: &FakeV2, command: &str) -> Result<u64, String> {
    let after = last_seq(fake);
    ui().say(&format!(
        "operator dispatches \"{command}\" (POST /api/dispatch); it is pushed over the socket at once"
    ));
    if let Err(b) = fake.dispatch(HOST, command) {
        ui().say(&format!(
            "the op engine refuses \"{command}\" ({b}); sending it directly instead"
        ));
        fake.send_command(HOST, command)
            .map_err(|e| format!("cannot send \"{command}\": {e}"))?;
    }
    Ok(after)
}

/// Waits for the `status` echoing `command` after `after`, prints it and the lifecycle's view.
fn wait_status(fake: &FakeV2, after: u64, command: &str) -> Result<Frame, String> {
    let f = wait_frame(fake, &format!("a status for \"{command}\""), after, |f| {
        f.is_in("status") && f.str_field("command") == Some(command)
    })?;
    let p = f.payload.clone().unwrap_or(Value::Null);
    let exit = p.get("exit_code").and_then(Value::as_i64);
    let shown = match exit {
        Some(0) => ui().ok("exit 0"),
        other => ui().bad(&format!("exit {other:?}")),
    };
    let outputs = fake
        .frames()
        .iter()
        .filter(|g| g.seq > after && g.seq < f.seq && g.is_in("output"))
        .count();
    ui().say(&format!(
        "result for \"{command}\": {shown}, {outputs} output lines streamed before it"
    ));
    if let Some(m) = p
        .get("message")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    {
        ui().detail(m);
    }
    if exit != Some(0) {
        return Err(format!("\"{command}\" failed: {p}"));
    }
    Ok(f)
}

/// Waits (bounded) until the tracked command is judged, then says how: a non-switch result
/// is held until the next heartbeat (§7.2), a switch waits for a register.
fn lifecycle_note(fake: &FakeV2) {
    common::wait_until(STEP_TIMEOUT, || {
        fake.command_state(HOST)
            .filter(|c| c.status.is_final() || c.status == CommandStatus::AwaitingReconnect)
            .map(|_| ())
    });
    let Some(c) = fake.command_state(HOST) else {
        return;
    };
    let mut note = format!("the dashboard's lifecycle: \"{}\" is {:?}", c.op, c.status);
    if c.status == CommandStatus::Partial {
        let lock = fake
            .host(HOST)
            .and_then(|h| h.update_status)
            .map(|u| u["lock"]["status"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default();
        note.push_str(&format!(
            " ({}; the agent reports Lock \"{lock}\")",
            c.message.unwrap_or_default()
        ));
    } else if c.status != CommandStatus::Success
        && let Some(m) = c.message
    {
        note.push_str(&format!(" ({})", first_line(&m, 60)));
    }
    ui().say(&note);
}

pub(super) fn script(agent_bin: &Path, root: &Path) -> Result<(), String> {
    let ui = ui();
    let repos = Repos::create(root, &repo_files())?;
    let bin_dir = root.join("bin");
    common::write_executable(&bin_dir.join("nixos-rebuild"), STAND_IN)?;

    let hook: FrameHook = Arc::new(print_frame);
    let fake = FakeV2::try_start(V2Options {
        token: SHARED_TOKEN.into(),
        lifecycle: true,
        on_frame: Some(hook),
        ..V2Options::default()
    })
    .map_err(|e| format!("cannot start the fake v2 dashboard: {e}"))?;

    println!(
        "{}",
        ui.paint(
            "1",
            "nixfleet-demo: the real agent against a loopback NixFleet v2 (WebSocket) dashboard"
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
                "{} (in-process fake v2; shared token {})",
                fake.url(),
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
        "  {:<12} dash  | = a WebSocket frame (← from the agent, → to it; pings not shown), \
         agent | = the agent's own log",
        "legend"
    );

    // ---- 1. start and register
    ui.heading("1. Start the agent");
    let mut vars = common::agent_env(&fake.url(), root, &bin_dir)?;
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
        "NIXFLEET_URL={} NIXFLEET_ALLOW_INSECURE_HTTP=1 NIXFLEET_HOSTNAME={HOST} \
         NIXFLEET_INTERVAL=1 NIXFLEET_NIXCFG=<checkout> NIXFLEET_TOKEN_FILE=<file> nixfleet-agent run",
        fake.url()
    ));
    let mut agent = Agent::spawn(agent_bin, &vars, Output::Piped)?;
    if let Some(out) = agent.child.stdout.take() {
        forward_agent_output(out, false);
    }
    if let Some(err) = agent.child.stderr.take() {
        forward_agent_output(err, true);
    }
    ui.say(&format!("agent started, pid {}", agent.pid()));
    let reg = wait_frame(&fake, "the first register", 0, |f| f.is_in("register"))?;
    let hs = fake.handshakes();
    let auth = hs
        .iter()
        .find(|h| Some(reg.conn) == h.conn)
        .and_then(|h| h.header("authorization"))
        .map(|a| a == format!("Bearer {SHARED_TOKEN}"));
    ui.say(&format!(
        "connection #{} upgraded (101) with the shared token in Authorization: {}; registered {} ms after start",
        reg.conn,
        if auth == Some(true) { "yes" } else { "NO" },
        reg.at.duration_since(agent.spawned_at).as_millis()
    ));
    wait_frame(&fake, "the first heartbeat", reg.seq, |f| {
        f.is_in("heartbeat")
    })?;

    ui.heading("2. The host row the dashboard stored");
    let row = fake
        .host(HOST)
        .ok_or_else(|| format!("the dashboard has no row for {HOST}"))?;
    ui.detail(&format!(
        "hostname       {}\nhost_type      {}\nos_version     {}\nnixpkgs        {}\n\
         generation     {}\nagent_version  {}\nrepo_dir       {}\nlocation       {} / {}\n\
         online         {}\nmetrics        {}",
        row.hostname,
        row.host_type,
        row.os_version,
        row.nixpkgs_version,
        row.generation,
        row.agent_version,
        row.repo_dir,
        row.location,
        row.device_type,
        row.online,
        row.metrics
            .as_ref()
            .map(metrics_summary)
            .unwrap_or_else(|| "-".into()),
    ));

    // ---- 3. pull
    ui.heading("3. pull: a new commit on origin");
    let pushed = repos.push_commit(
        "Enable fail2ban on demo-host",
        &[(
            "hosts/demo-host/configuration.nix",
            "{ ... }: {\n  networking.hostName = \"demo-host\";\n  services.nginx.enable = \
             true;\n  services.fail2ban.enable = true;\n}\n",
        )],
    )?;
    ui.say(&format!(
        "pushed {} to origin; the host is still at {}",
        short_sha(&pushed),
        short_sha(&initial)
    ));
    let after = push(&fake, "pull")?;
    wait_status(&fake, after, "pull")?;
    let want = pushed.get(..7).unwrap_or(&pushed).to_owned();
    common::wait_until(STEP_TIMEOUT, || {
        fake.host(HOST).filter(|h| h.generation == want).map(|_| ())
    })
    .ok_or("the host's generation never became the pushed commit")?;
    ui.say(&format!(
        "the dashboard now shows generation {want} (7 characters in v2)"
    ));
    common::wait_until(STEP_TIMEOUT, || {
        fake.command_state(HOST)
            .filter(|c| c.status.is_final())
            .map(|_| ())
    });
    lifecycle_note(&fake);

    // ---- 4. test
    ui.heading("4. test: hosts/demo-host/tests/*.sh");
    let after = push(&fake, "test")?;
    let st = wait_status(&fake, after, "test")?;
    let progress = fake
        .frames()
        .iter()
        .filter(|f| f.seq > after && f.seq < st.seq && f.is_in("operation_progress"))
        .count();
    let tests = fake
        .frames()
        .iter()
        .filter(|f| f.seq > after && f.seq < st.seq && f.is_in("test_progress"))
        .count();
    ui.say(&format!(
        "{progress} operation_progress and {tests} test_progress messages before the result"
    ));
    lifecycle_note(&fake);

    // ---- 5. switch
    ui.heading("5. switch");
    let after = push(&fake, "switch")?;
    wait_status(&fake, after, "switch")?;
    lifecycle_note(&fake);
    ui.detail("(the v2 dashboard completes a switch on the agent's next register; it waits 90 s)");

    // ---- 6. pull-switch
    ui.heading("6. pull-switch: another commit, pulled and applied");
    let pushed2 = repos.push_commit(
        "Open port 443 on demo-host",
        &[(
            "hosts/demo-host/configuration.nix",
            "{ ... }: {\n  networking.hostName = \"demo-host\";\n  services.nginx.enable = \
             true;\n  services.fail2ban.enable = true;\n  networking.firewall.allowedTCPPorts \
             = [ 443 ];\n}\n",
        )],
    )?;
    ui.say(&format!("pushed {}", short_sha(&pushed2)));
    ui.detail("(the real dashboard never sends pull-switch, but the agent knows it)");
    let after = push(&fake, "pull-switch")?;
    wait_status(&fake, after, "pull-switch")?;
    let want2 = pushed2.get(..7).unwrap_or(&pushed2).to_owned();
    common::wait_until(STEP_TIMEOUT, || {
        fake.host(HOST)
            .filter(|h| h.generation == want2)
            .map(|_| ())
    })
    .ok_or("the host's generation never became the second pushed commit")?;
    ui.say(&format!("generation now {want2}"));
    lifecycle_note(&fake);

    // ---- 7. stop
    ui.heading("7. SIGTERM");
    ui.say(&format!("kill -TERM {}", agent.pid()));
    let stopped_at = Instant::now();
    let before = last_seq(&fake);
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(15))
        .ok_or("the agent did not exit within 15 s of SIGTERM")?;
    std::thread::sleep(Duration::from_millis(100));
    let code = status.code();
    let shown = match code {
        Some(0) => ui.ok("0"),
        Some(c) => ui.bad(&c.to_string()),
        None => ui.bad(&format!("{status}")),
    };
    let close = fake
        .frames()
        .into_iter()
        .find(|f| f.seq > before && f.dir == Direction::In && f.kind == FrameKind::Close);
    ui.say(&format!(
        "agent exited with code {shown} after {} ms; its close frame: {}",
        stopped_at.elapsed().as_millis(),
        close.map_or("none (TCP closed)".into(), |f| format!(
            "{} \"{}\"",
            f.close_code.map_or("(empty)".into(), |c| c.to_string()),
            f.text
        ))
    ));

    // ---- summary
    ui.heading("Summary");
    let frames = fake.frames();
    let count = |t: &str| frames.iter().filter(|f| f.is_in(t)).count();
    let ignored = frames.iter().filter(|f| f.ignored.is_some()).count();
    ui.detail(&format!(
        "connections    {}\nfrom the agent {} register, {} heartbeat, {} output, {} status, \
         {} operation_progress, {} command_rejected; {ignored} ignored as malformed",
        fake.connections().len(),
        count("register"),
        count("heartbeat"),
        count("output"),
        count("status"),
        count("operation_progress"),
        count("command_rejected"),
    ));
    let mut per_command: std::collections::BTreeMap<String, usize> = Default::default();
    for f in frames.iter().filter(|f| f.is_in("status")) {
        *per_command
            .entry(f.str_field("command").unwrap_or("").to_owned())
            .or_default() += 1;
    }
    for (command, n) in per_command.iter().filter(|(_, n)| **n > 1) {
        ui.detail(&ui.bad(&format!(
            "note           {n} status messages for \"{command}\"; the contract (§7.8) expects \
             exactly one per command"
        )));
    }
    ui.detail("lifecycle      (how the v2 dashboard judged each tracked command)");
    for c in fake.command_history(HOST) {
        ui.detail(&format!(
            "  #{:<3} {:<12} {:<18} {}",
            c.id,
            c.op,
            format!("{:?}", c.status),
            c.message.unwrap_or_default()
        ));
    }
    if let Some(c) = fake.command_state(HOST).filter(|c| !c.status.is_final()) {
        ui.detail(&format!(
            "  #{:<3} {:<12} {:?} (still tracked)",
            c.id, c.op, c.status
        ));
    }
    ui.detail(&format!(
        "runtime        {:.1} s",
        ui.start.elapsed().as_secs_f64()
    ));
    fake.stop();
    if code != Some(0) {
        return Err(format!(
            "the agent exited with {status} after SIGTERM, expected 0"
        ));
    }
    if ignored > 0 {
        return Err(format!("{ignored} messages from the agent were malformed"));
    }
    if fake
        .command_history(HOST)
        .iter()
        .any(|c| matches!(c.status, CommandStatus::Error | CommandStatus::Timeout))
    {
        return Err("a tracked command ended in ERROR or TIMEOUT".into());
    }
    println!("\n{}", ui.ok("demo finished: every step worked"));
    Ok(())
}
