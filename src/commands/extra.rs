//! The commands the v2 dashboard added: rollback, check-version and the refresh family.
//! Same rules as the others: argv only, every child through the runner with a timeout, one
//! final report.

use std::path::Path;
use std::time::Duration;

use super::switch::{resolve_switch_mode, sudo_unless_root};
use super::{Context, require_repo};
use crate::config::SwitchMode;
use crate::exec::Cmd;

/// `nixos-rebuild switch --rollback` (or `darwin-rebuild --rollback`): back to the previous
/// system generation. home-manager has no rollback switch; it is refused with a reason.
pub(super) async fn rollback(ctx: &Context) -> bool {
    let timeout = ctx.settings.timeouts.switch;
    let cmd = match resolve_switch_mode(ctx.settings.switch_mode) {
        SwitchMode::HomeManager => {
            ctx.error(
                "Rollback failed: home-manager has no rollback command; switch to an older \
                 configuration instead",
            );
            return false;
        }
        SwitchMode::Darwin => {
            sudo_unless_root("darwin-rebuild", Path::new("/"), timeout, "Rollback")
                .args(["--rollback"])
        }
        SwitchMode::Nixos | SwitchMode::Auto => {
            sudo_unless_root("nixos-rebuild", Path::new("/"), timeout, "Rollback")
                .args(["switch", "--rollback"])
        }
    };
    let result = ctx.run(cmd).await;
    if result.ok {
        ctx.ok(&format!("Rollback: {}", result.text));
    } else {
        ctx.error(&format!("Rollback failed: {}", result.text));
    }
    result.ok
}

/// Compares the running agent's version with the installed binary's `--version`.
pub(super) async fn check_version(ctx: &Context) {
    let installed = ctx
        .settings
        .agent_path
        .clone()
        .or_else(|| std::env::current_exe().ok())
        // Linux names a replaced executable "<path> (deleted)": the new file is at <path>.
        .map(
            |path| match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
                Some(stripped) => std::path::PathBuf::from(stripped),
                None => path,
            },
        );
    let Some(installed) = installed else {
        ctx.error("Check-version failed: cannot find the installed agent binary");
        return;
    };
    let cmd = Cmd::new(
        installed.as_os_str(),
        "/",
        Duration::from_secs(10),
        "check-version",
    )
    .arg("--version");
    let result = ctx.run(cmd).await;
    if !result.ok {
        ctx.error(&format!("Check-version failed: {}", result.text));
        return;
    }
    let running = env!("CARGO_PKG_VERSION");
    let installed_version = result
        .output
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    if installed_version == running {
        ctx.ok(&format!("running={running} installed={installed_version}"));
    } else {
        ctx.ok(&format!(
            "mismatch: running={running} installed={installed_version}; restart the agent to \
             run the installed version"
        ));
    }
}

/// How old `flake.lock`'s last commit is: ok up to 7 days, then outdated (contract v2 §6.2).
pub(super) async fn refresh_lock(ctx: &Context, what: &str) {
    let Some(dir) = require_repo(ctx, what) else {
        return;
    };
    let cmd = ctx
        .git(&dir, ctx.settings.timeouts.git_local, "git log flake.lock")
        .args(["log", "-1", "--format=%ct", "--", "flake.lock"]);
    let result = ctx.run(cmd).await;
    if !result.ok {
        ctx.error(&format!("{what} failed: {}", result.text));
        return;
    }
    let Ok(committed) = result.output.trim().parse::<u64>() else {
        ctx.ok(&format!(
            "{what}: lock unknown (flake.lock has no history in {})",
            dir.display()
        ));
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = now.saturating_sub(committed) / 86_400;
    let status = if days <= 7 { "ok" } else { "outdated" };
    ctx.ok(&format!(
        "{what}: lock {status} (flake.lock updated {days} day(s) ago)"
    ));
}

/// Whether the running system is what the configuration builds now: a dry-run build of the
/// host's toplevel (60 s), `ok` when it names the running system's store path.
pub(super) async fn refresh_system(ctx: &Context) {
    let Some(dir) = require_repo(ctx, "Refresh-system") else {
        return;
    };
    let host = ctx.host().to_string();
    let attr = match resolve_switch_mode(ctx.settings.switch_mode) {
        SwitchMode::Darwin => format!(".#darwinConfigurations.{host}.system"),
        SwitchMode::HomeManager => format!(".#homeConfigurations.{host}.activationPackage"),
        SwitchMode::Nixos | SwitchMode::Auto => {
            format!(".#nixosConfigurations.{host}.config.system.build.toplevel")
        }
    };
    let current = std::fs::read_link("/run/current-system")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cmd = Cmd::new("nix", &dir, Duration::from_secs(60), "nix build --dry-run").args([
        "build",
        "--dry-run",
        "--json",
        &attr,
    ]);
    let result = ctx.run(cmd).await;
    let status = if !result.ok {
        "unknown"
    } else if !current.is_empty() && result.output.contains(&current) {
        "ok"
    } else {
        "outdated"
    };
    ctx.ok(&format!("Refresh-system: system {status}"));
}
