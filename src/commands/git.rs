//! Git steps: the isolated clone, `pull` in both modes, and `pull-reset`.
//!
//! The repository is trusted for git through the environment (`GIT_CONFIG_COUNT` with
//! `safe.directory`), never by editing `~/.gitconfig`. With an SSH key, ssh runs with
//! `IdentitiesOnly=yes`, `StrictHostKeyChecking=accept-new` and `BatchMode=yes` (a prompt in a
//! daemon can only hang). `GIT_TERMINAL_PROMPT=0` for the same reason over https.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::time::Duration;

use super::{Context, require_repo};
use crate::config::{RepoMode, Settings};
use crate::exec::Cmd;

/// A git command in `dir` with the agent's git environment.
pub(super) fn command(settings: &Settings, dir: &Path, timeout: Duration, label: &str) -> Cmd {
    let mut cmd = Cmd::new("git", dir, timeout, label)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_COUNT", "1")
        .env("GIT_CONFIG_KEY_0", "safe.directory")
        .env(
            "GIT_CONFIG_VALUE_0",
            settings.repo.dir().unwrap_or(dir).as_os_str(),
        );
    if let Some(key) = &settings.ssh_key {
        // GIT_SSH_COMMAND goes through a shell: quote the (operator-configured) key path.
        cmd = cmd.env(
            "GIT_SSH_COMMAND",
            format!(
                "ssh -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o BatchMode=yes",
                shell_quote(&key.to_string_lossy())
            ),
        );
    }
    cmd
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Removes what earlier, interrupted clones left: only directories named with `prefix` (our
/// own staging names) that are real directories owned by this user, never a link.
fn remove_unfinished_clones(parent: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let ours = entry.file_name().to_string_lossy().starts_with(prefix)
            && entry
                .path()
                .symlink_metadata()
                .is_ok_and(|m| m.is_dir() && m.uid() == crate::trust::euid());
        if ours {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Isolated mode at start: reuse `dir` when its origin is the configured URL, otherwise clone
/// (again). Content that is not a git checkout is never deleted.
pub(super) async fn setup(ctx: &Context) {
    let RepoMode::Isolated { url, dir, branch } = &ctx.settings.repo else {
        return;
    };
    if let Err(message) = ensure_clone(ctx, url, dir, branch).await {
        tracing::error!("repository setup failed: {message}");
    }
}

/// Makes `dir` a checkout of `url`. The clone goes to a staging directory next to `dir` and is
/// renamed into place only once complete, so `dir` is never a half-written checkout (a clone
/// killed by its timeout or by an agent restart would otherwise leave a `.git` that the next
/// start reuses), and an old checkout is replaced only by a working new one.
async fn ensure_clone(ctx: &Context, url: &str, dir: &Path, branch: &str) -> Result<(), String> {
    let timeouts = &ctx.settings.timeouts;
    // Only root and this user can change what is in the parent, so nobody can plant the
    // checkout, a link in its place, or the staging directory.
    let parent = dir.parent().unwrap_or(Path::new("/"));
    crate::store::ensure_private_dir(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    crate::trust::check_dir(parent).map_err(|why| {
        format!(
            "will not clone into {}: {why}; point NIXFLEET_REPO_DIR elsewhere",
            parent.display()
        )
    })?;
    let mut replace = false;
    if dir.join(".git").exists() {
        let origin = ctx
            .run(
                ctx.git(dir, timeouts.git_local, "git remote get-url")
                    .args(["remote", "get-url", "origin"]),
            )
            .await;
        if origin.timed_out {
            // Unknown, not different: never a reason to replace the checkout.
            return Err(format!(
                "cannot read the checkout's origin in {}: {}",
                dir.display(),
                origin.text
            ));
        }
        // stdout and stderr arrive together: a git warning may come with the URL line.
        if origin.ok && origin.output.lines().any(|line| line.trim() == url) {
            return Ok(());
        }
        tracing::warn!(
            dir = %dir.display(),
            "the checkout's origin is not the configured repo_url; cloning it again"
        );
        replace = true;
    } else if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(format!(
                "{} exists, is not empty and is not a git checkout; move it away or point \
                 NIXFLEET_REPO_DIR elsewhere",
                dir.display()
            ));
        }
    }
    let name = dir
        .file_name()
        .map_or_else(|| "repo".into(), |n| n.to_string_lossy().into_owned());
    let prefix = format!(".{name}.nixfleet-clone-");
    remove_unfinished_clones(parent, &prefix);
    // A fresh private directory with an unpredictable name, created exclusively: nobody can
    // have prepared it (or a link in its place) for git to write through.
    let (private, staging) = {
        let mut attempt = 0;
        loop {
            let private = parent.join(format!("{prefix}{:016x}", fastrand::u64(..)));
            match std::fs::DirBuilder::new().mode(0o700).create(&private) {
                Ok(()) => break (private.clone(), private.join("repo")),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                    attempt += 1;
                }
                Err(e) => {
                    return Err(format!(
                        "cannot create a private directory for the clone in {}: {e}",
                        parent.display()
                    ));
                }
            }
        }
    };
    let clone = ctx
        .run(
            ctx.git(parent, timeouts.git, "git clone")
                .args(["clone", "--branch", branch, "--single-branch", "--", url])
                .arg(staging.as_os_str()),
        )
        .await;
    if !clone.ok {
        let _ = std::fs::remove_dir_all(&private);
        return Err(format!("git clone failed: {}", clone.text));
    }
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700));
    let cleared = if replace {
        std::fs::remove_dir_all(dir)
    } else if dir.exists() {
        std::fs::remove_dir(dir)
    } else {
        Ok(())
    };
    let moved = cleared.and_then(|()| std::fs::rename(&staging, dir));
    let _ = std::fs::remove_dir_all(&private);
    if let Err(e) = moved {
        return Err(format!(
            "cannot move the new clone into {}: {e}",
            dir.display()
        ));
    }
    tracing::info!(dir = %dir.display(), "cloned the config repository");
    Ok(())
}

/// `pull`: isolated mode fetches and hard-resets (never a merge conflict); legacy mode runs
/// `git pull`. Reports once; returns whether it succeeded. `what` prefixes the report.
pub(super) async fn pull(ctx: &Context, what: &str) -> bool {
    if let RepoMode::Isolated { url, dir, branch } = &ctx.settings.repo
        && let Err(message) = ensure_clone(ctx, url, dir, branch).await
    {
        ctx.error(&format!("{what} failed: {message}"));
        return false;
    }
    let Some(dir) = require_repo(ctx, what) else {
        return false;
    };
    match pull_in(ctx, &dir).await {
        Ok(output) => {
            ctx.ok(&format!("{what}: {output}"));
            true
        }
        Err(output) => {
            ctx.error(&format!("{what} failed: {output}"));
            false
        }
    }
}

/// The pull itself, without a report: Ok(output) or Err(output).
async fn pull_in(ctx: &Context, dir: &Path) -> Result<String, String> {
    let timeouts = &ctx.settings.timeouts;
    match &ctx.settings.repo {
        RepoMode::Isolated { branch, .. } => {
            let fetch = ctx
                .run(
                    ctx.git(dir, timeouts.git, "git fetch")
                        .args(["fetch", "origin", branch]),
                )
                .await;
            if !fetch.ok {
                return Err(fetch.text);
            }
            let target = format!("origin/{branch}");
            let reset = ctx
                .run(
                    ctx.git(dir, timeouts.git_local, "git reset")
                        .args(["reset", "--hard", &target]),
                )
                .await;
            if !reset.ok {
                return Err(format!("reset to {target} failed: {}", reset.text));
            }
            let head = ctx.generation().unwrap_or_default();
            Ok(format!(
                "Reset to {target} ({})",
                head.get(..12).unwrap_or(&head)
            ))
        }
        _ => {
            let pull = ctx
                .run(ctx.git(dir, timeouts.git, "git pull").arg("pull"))
                .await;
            if pull.ok {
                Ok(pull.text)
            } else {
                Err(pull.text)
            }
        }
    }
}

/// `pull-reset`: unstage and restore `flake.lock`, then pull.
pub(super) async fn pull_reset(ctx: &Context) {
    if let RepoMode::Isolated { url, dir, branch } = &ctx.settings.repo
        && let Err(message) = ensure_clone(ctx, url, dir, branch).await
    {
        ctx.error(&format!("Pull-reset failed: {message}"));
        return;
    }
    let Some(dir) = require_repo(ctx, "Pull-reset") else {
        return;
    };
    let local = ctx.settings.timeouts.git_local;
    let mut done = String::new();
    let staged = ctx
        .run(ctx.git(&dir, local, "git diff --cached").args([
            "diff",
            "--cached",
            "--name-only",
            "--",
            "flake.lock",
        ]))
        .await;
    if staged.ok && !staged.output.trim().is_empty() {
        let unstage = ctx
            .run(ctx.git(&dir, local, "git reset flake.lock").args([
                "reset",
                "-q",
                "HEAD",
                "--",
                "flake.lock",
            ]))
            .await;
        if !unstage.ok {
            ctx.error(&format!("Pull-reset failed: {}", unstage.text));
            return;
        }
        done.push_str("Unstaged flake.lock; ");
    }
    let modified = ctx
        .run(
            ctx.git(&dir, local, "git diff")
                .args(["diff", "--name-only", "--", "flake.lock"]),
        )
        .await;
    if modified.ok && !modified.output.trim().is_empty() {
        let restore = ctx
            .run(ctx.git(&dir, local, "git checkout flake.lock").args([
                "checkout",
                "--",
                "flake.lock",
            ]))
            .await;
        if !restore.ok {
            ctx.error(&format!("Pull-reset failed: {}", restore.text));
            return;
        }
        done.push_str("Reset flake.lock; ");
    }
    match pull_in(ctx, &dir).await {
        Ok(output) => ctx.ok(&format!("Pull-reset: {done}{output}")),
        Err(output) => ctx.error(&format!("Pull-reset failed: {done}{output}")),
    }
}

/// The identity the agent commits with (`update`'s lock commit, and as the committer of
/// commits a rebase rewrites): a daemon's `HOME` rarely has one, and git refuses to commit
/// without.
pub(super) fn identity_args(host: &str) -> [String; 4] {
    [
        "-c".into(),
        "user.name=nixfleet-agent".into(),
        "-c".into(),
        format!("user.email=nixfleet-agent@{host}"),
    ]
}

/// Pull for `update`'s recovery path after a refused push, reporting nothing. Legacy mode
/// rebases (`git pull --rebase`, as v1 does): the checkout may carry local commits, and a
/// plain pull of a diverged branch is refused by git >= 2.33 without `pull.rebase` set.
pub(super) async fn pull_quietly(ctx: &Context, dir: &Path) -> Result<String, String> {
    if matches!(ctx.settings.repo, RepoMode::Isolated { .. }) {
        return pull_in(ctx, dir).await;
    }
    let pull = ctx
        .run(
            ctx.git(dir, ctx.settings.timeouts.git, "git pull --rebase")
                .args(identity_args(ctx.host()))
                .args(["pull", "--rebase"]),
        )
        .await;
    if pull.ok {
        Ok(pull.text)
    } else {
        Err(pull.text)
    }
}
