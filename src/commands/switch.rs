//! `switch` and `update`: apply the configuration with the tool this host uses
//! (`nixos-rebuild`, `darwin-rebuild`, `home-manager`), always as argv, never through a shell.
//!
//! After a successful switch the agent checks whether its own executable changed; if so it asks
//! the main loop to exit with [`crate::exit::RESTART_NEW_BINARY`] once the report is out, so the
//! supervisor starts the new binary.

use std::path::{Path, PathBuf};

use super::{Context, git, require_repo};
use crate::config::{RepoMode, SwitchMode};
use crate::detach::{self, Detached, Isolation};
use crate::exec::Cmd;

pub(super) struct SwitchResult {
    pub ok: bool,
    pub exit: Option<u8>,
    /// The agent stopped waiting; the detached switch goes on (agent shutting down).
    pub left_running: bool,
}

impl SwitchResult {
    fn failed() -> Self {
        SwitchResult {
            ok: false,
            exit: None,
            left_running: false,
        }
    }
}

/// The switch tool for this host.
pub(super) fn resolve_switch_mode(mode: SwitchMode) -> SwitchMode {
    resolve_mode(mode)
}

/// `program` as root: directly when the agent is root, else through `sudo -n` (a password
/// prompt in a daemon could only hang until the timeout).
pub(super) fn sudo_unless_root(
    program: &str,
    dir: &Path,
    timeout: std::time::Duration,
    label: &str,
) -> Cmd {
    if nix::unistd::geteuid().is_root() {
        Cmd::new(program, dir, timeout, label)
    } else {
        Cmd::new("sudo", dir, timeout, label).args(["-n", program])
    }
}

fn resolve_mode(mode: SwitchMode) -> SwitchMode {
    match mode {
        SwitchMode::Auto if cfg!(target_os = "macos") => {
            if find_in_path("darwin-rebuild").is_some() {
                SwitchMode::Darwin
            } else {
                SwitchMode::HomeManager
            }
        }
        SwitchMode::Auto if Path::new("/etc/NIXOS").exists() => SwitchMode::Nixos,
        SwitchMode::Auto => {
            if find_in_path("nixos-rebuild").is_some() {
                SwitchMode::Nixos
            } else {
                SwitchMode::HomeManager
            }
        }
        explicit => explicit,
    }
}

/// Whether `program` is on the agent's PATH (used only to pick the switch tool).
fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn user_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "root".into())
}

/// The argv of the switch for `host` in `dir`.
pub(super) fn switch_command(ctx: &Context, dir: &Path) -> Cmd {
    let host = ctx.host();
    let timeout = ctx.settings.timeouts.switch;
    let is_root = nix::unistd::geteuid().is_root();
    match resolve_mode(ctx.settings.switch_mode) {
        SwitchMode::Darwin => {
            let cmd = if is_root {
                Cmd::new("darwin-rebuild", dir, timeout, "Switch")
            } else {
                Cmd::new("sudo", dir, timeout, "Switch").args(["-n", "darwin-rebuild"])
            };
            cmd.args(["switch", "--flake", &format!(".#{host}")])
        }
        SwitchMode::HomeManager => Cmd::new("home-manager", dir, timeout, "Switch").args([
            "switch",
            "--flake",
            &format!(".#{}@{host}", user_name()),
        ]),
        SwitchMode::Nixos | SwitchMode::Auto => {
            // `sudo -n`: a password prompt in a daemon could only hang until the timeout.
            let cmd = if is_root {
                Cmd::new("nixos-rebuild", dir, timeout, "Switch")
            } else {
                Cmd::new("sudo", dir, timeout, "Switch").args(["-n", "nixos-rebuild"])
            };
            cmd.args(["switch", "--flake", &format!(".#{host}")])
        }
    }
}

/// Runs the switch and reports `Switch: ...` / `Switch failed: ...`. The switch itself runs
/// outside the agent where possible (see `crate::detach`).
pub(super) async fn switch(ctx: &Context) -> SwitchResult {
    let Some(dir) = require_repo(ctx, "Switch") else {
        return SwitchResult::failed();
    };
    if let Err(message) = wait_for_other_switch(ctx).await {
        ctx.error(&format!("Switch failed: {message}"));
        return SwitchResult::failed();
    }
    let cmd = switch_command(ctx, &dir);
    match detach::resolve(&ctx.settings, &ctx.runner) {
        Isolation::InProcess => {
            tracing::info!("switch runs inside the agent (no systemd-run or session isolation)");
            let result = ctx.run(cmd).await;
            if result.ok {
                report_success(ctx, &result.text)
            } else {
                ctx.error(&format!("Switch failed: {}", result.text));
                SwitchResult::failed()
            }
        }
        isolation => {
            ctx.step("Switch", Some(cmd.timeout));
            let launched = async {
                let mut planned = detach::plan(&ctx.settings, &ctx.state_dir, isolation, &cmd)?;
                // The journal must know about the switch before it exists.
                ctx.record_detached(planned.clone()).await;
                detach::launch(&ctx.runner, &ctx.settings, &mut planned, &cmd, &ctx.cancel).await?;
                ctx.record_detached(planned.clone()).await;
                Ok::<_, String>(planned)
            };
            match launched.await {
                Ok(detached) => await_detached(ctx, &detached).await,
                Err(message) => {
                    ctx.error(&format!("Switch failed: {message}"));
                    SwitchResult::failed()
                }
            }
        }
    }
}

/// A previous agent instance left a detached switch running: wait for it and report it.
pub(super) async fn resume(ctx: &Context, detached: Detached) -> SwitchResult {
    tracing::info!(
        result = %detached.result_file.display(),
        "resuming a switch a previous agent instance left running"
    );
    ctx.step("Switch", None);
    await_detached(ctx, &detached).await
}

async fn await_detached(ctx: &Context, detached: &Detached) -> SwitchResult {
    let waited = tokio::select! {
        waited = detach::wait(&ctx.runner, detached, &ctx.cancel) => waited,
        () = ctx.stop.cancelled() => {
            // The dashboard's stop: end the switch where it runs, then report its result.
            let done = detach::stop(&ctx.runner, detached).await;
            tracing::warn!("stop: {done}");
            detach::wait(&ctx.runner, detached, &ctx.cancel).await
        }
    };
    match waited {
        detach::Waited::Done(result) => {
            // The result file stays until the report is durably in the outbox: the main loop
            // deletes it then, so an agent killed before that reports the switch next time.
            let output = result.output.trim_end();
            if result.exit_code == 0 {
                report_success(ctx, output)
            } else {
                let why = if let Some(secs) = result.timed_out_after_secs {
                    format!("Switch timed out after {secs}s\n{output}")
                } else if result.interrupted {
                    format!("Switch was stopped before it finished\n{output}")
                } else {
                    output.to_string()
                };
                ctx.error(&format!("Switch failed: {}", why.trim_end()));
                SwitchResult::failed()
            }
        }
        detach::Waited::Cancelled => {
            tracing::info!("agent stopping; the switch goes on and the next start reports it");
            SwitchResult {
                ok: false,
                exit: None,
                left_running: true,
            }
        }
        detach::Waited::Lost(reason) => {
            ctx.error(&format!("Switch failed: {reason}"));
            SwitchResult::failed()
        }
    }
}

fn report_success(ctx: &Context, text: &str) -> SwitchResult {
    match crate::facts::reboot::check(&ctx.settings.booted_system, &ctx.settings.current_system) {
        Some(reboot) => {
            tracing::warn!("the switch is done, but {}", reboot.sentence());
            ctx.ok(&format!(
                "Switch: {}\nReboot needed to finish this switch: the running {} differ from \
                 the new system's",
                text.trim_end(),
                reboot.parts_text()
            ));
        }
        None => ctx.ok(&format!("Switch: {text}")),
    }
    let installed = ctx.settings.agent_path.clone().or_else(|| {
        let system = PathBuf::from("/run/current-system/sw/bin/nixfleet-agent");
        system.exists().then_some(system)
    });
    let exit = if binary_replaced(installed.as_deref(), own_executable().as_deref()) {
        tracing::info!("the switch installed a new agent binary; restarting into it");
        Some(crate::exit::RESTART_NEW_BINARY)
    } else if let Some(file) = ctx.definition.changed() {
        tracing::info!(
            file = %file.display(),
            "the switch changed the agent's service definition ({}); restarting so the \
             supervisor starts the new one",
            file.display()
        );
        Some(crate::exit::RESTART_NEW_BINARY)
    } else {
        None
    };
    SwitchResult {
        ok: true,
        exit,
        left_running: false,
    }
}

/// Waits while another switch (a manual `nixos-rebuild switch`) holds its lock, bounded by the
/// switch timeout. The lock is only probed, never held: holding it would block that switch.
async fn wait_for_other_switch(ctx: &Context) -> Result<(), String> {
    let path = &ctx.settings.switch_lock;
    let deadline = std::time::Instant::now() + ctx.settings.timeouts.switch;
    let mut announced = false;
    loop {
        let Ok(file) = std::fs::File::open(path) else {
            return Ok(());
        };
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!(lock = %path.display(), "cannot probe the switch lock: {e}");
                return Ok(());
            }
        }
        drop(file);
        if !announced {
            announced = true;
            tracing::info!(lock = %path.display(), "another switch is running; waiting for it");
            ctx.step(
                "waiting for another switch to finish",
                Some(ctx.settings.timeouts.switch),
            );
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "another switch is running (it holds {}) and did not finish within {}",
                path.display(),
                crate::config::human_duration(ctx.settings.timeouts.switch)
            ));
        }
        tokio::select! {
            () = ctx.cancel.cancelled() => {
                return Err("interrupted while waiting for another switch: the agent is shutting down".into());
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
        }
    }
}

/// The installed agent path (what the supervisor will start next time), resolved.
fn own_executable() -> Option<PathBuf> {
    std::env::current_exe().ok()
}

/// True when the install path now resolves to another file than the running binary.
fn binary_replaced(installed: Option<&Path>, running: Option<&Path>) -> bool {
    let (Some(installed), Some(running)) = (installed, running) else {
        return false;
    };
    match (installed.canonicalize(), running.canonicalize()) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// `update`: `nix flake update nixfleet`, commit and push `flake.lock`, then switch. In
/// isolated https mode without an SSH key (no push access) it is pull + switch, as in v1.
pub(super) async fn update(ctx: &Context) -> SwitchResult {
    let failed = SwitchResult::failed();
    if let RepoMode::Isolated { url, .. } = &ctx.settings.repo
        && url.starts_with("https://")
        && ctx.settings.ssh_key.is_none()
    {
        if git::pull(ctx, "Update").await {
            return switch(ctx).await;
        }
        return SwitchResult::failed();
    }
    let Some(dir) = require_repo(ctx, "Update") else {
        return failed;
    };
    let timeouts = ctx.settings.timeouts.clone();
    ctx.ok("Update: Updating flake...");
    let flake = ctx
        .run(
            Cmd::new("nix", &dir, timeouts.flake, "nix flake update")
                .args(["flake", "update", "nixfleet"])
                .env("NIX_CONFIG", "experimental-features = nix-command flakes"),
        )
        .await;
    if !flake.ok {
        ctx.error(&format!("Update failed: {}", flake.text));
        return failed;
    }
    let diff = ctx
        .run(
            // Against HEAD, not the index: a lock an earlier attempt staged but never
            // committed (its commit timed out) is still a change to commit.
            ctx.git(&dir, timeouts.git_local, "git diff flake.lock")
                .args(["diff", "--quiet", "HEAD", "--", "flake.lock"]),
        )
        .await;
    if diff.ok {
        ctx.ok("Update: Already up to date");
        return SwitchResult {
            ok: true,
            exit: None,
            left_running: false,
        };
    }
    let add = ctx
        .run(
            ctx.git(&dir, timeouts.git_local, "git add flake.lock")
                .args(["add", "--", "flake.lock"]),
        )
        .await;
    let commit = if add.ok {
        ctx.run(
            ctx.git(&dir, timeouts.git_local, "git commit")
                .args(git::identity_args(ctx.host()))
                .args([
                    "commit",
                    "-m",
                    "chore: Update nixfleet flake input",
                    "--",
                    "flake.lock",
                ]),
        )
        .await
    } else {
        add
    };
    if !commit.ok {
        ctx.error(&format!("Update failed: {}", commit.text));
        return failed;
    }
    ctx.ok("Update: Pushing flake.lock...");
    let push = ctx
        .run(ctx.git(&dir, timeouts.git, "git push").arg("push"))
        .await;
    let mut note = String::new();
    if !push.ok {
        // Undo the local commit and its lock change, then take what the remote has.
        for (label, args) in [
            ("git reset --soft", &["reset", "--soft", "HEAD~1"][..]),
            (
                "git reset flake.lock",
                &["reset", "-q", "HEAD", "--", "flake.lock"][..],
            ),
            (
                "git checkout flake.lock",
                &["checkout", "--", "flake.lock"][..],
            ),
        ] {
            let step = ctx
                .run(
                    ctx.git(&dir, timeouts.git_local, label)
                        .args(args.iter().copied()),
                )
                .await;
            if !step.ok {
                ctx.error(&format!(
                    "Update failed: push failed ({}) and undoing the local commit failed: {}",
                    first_line(&push.text),
                    step.text
                ));
                return failed;
            }
        }
        let pulled = git::pull_quietly(ctx, &dir).await;
        note = match pulled {
            Ok(_) => format!(
                "push failed ({}); undid the local commit and pulled; ",
                first_line(&push.text)
            ),
            Err(why) => format!(
                "push failed ({}); undid the local commit; the pull failed too ({}); ",
                first_line(&push.text),
                first_line(&why)
            ),
        };
    }
    ctx.ok(&format!("Update: {note}Rebuilding..."));
    switch(ctx).await
}

/// The line of a failed git step's output that says why: git starts a refused push with
/// `To <url>` and a failed pull with `From <url>`, which say nothing. Prefers the
/// `! [rejected] ...` / `! [remote rejected] ...` line, then the first `fatal:`/`error:` line,
/// then the first line (a timeout's "git push timed out after 120s").
fn first_line(text: &str) -> &str {
    let lines = || text.lines().map(str::trim);
    lines()
        .find(|l| l.starts_with("! ["))
        .or_else(|| lines().find(|l| l.starts_with("fatal:") || l.starts_with("error:")))
        .or_else(|| lines().next())
        .unwrap_or("")
}
