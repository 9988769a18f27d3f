//! What the supervisor starts next time: the files that define the agent's service (its
//! systemd unit, its config file), set by `NIXFLEET_RESTART_ON_CHANGE`.
//!
//! On NixOS the module sets `restartIfChanged = false`: the agent runs the switch that
//! changes its own unit, and being restarted by `switch-to-configuration` would cut that
//! switch's report short. So after a successful switch the agent itself compares these files
//! with the snapshot it took at startup, and when one changed it reports, then exits 10 so the
//! supervisor starts the new definition (new settings, new binary). A snapshot is a resolved
//! path (a NixOS unit is a symlink into the store) plus a hash of the content (an edited
//! file in place), taken once at startup and once per successful switch.
//!
//! Changes made by others (`nixos-rebuild` by hand, `system.autoUpgrade`, colmena, an edited
//! unit): [`Watch`] keeps the `stat` of the agent binary (`NIXFLEET_AGENT_PATH`) and of these
//! files, resolved through their symlinks, and compares it on each heartbeat: a `readlink` and
//! a `stat` per file, no read of the content and no child process while nothing changed. Only
//! a changed `stat` reads the file, to ignore a rewrite with the same content.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Bytes of a watched file that are hashed; definition files are small, and a huge one (a
/// misconfigured path to a binary) is still compared by its resolved path and first MiB.
const MAX_HASHED: u64 = 1 << 20;

/// One watched file as it was (kept as an `Option`: `None` when it did not exist or could not
/// be read).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    resolved: PathBuf,
    len: u64,
    content_hash: u64,
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let resolved = path.canonicalize().ok()?;
    let meta = std::fs::metadata(&resolved).ok()?;
    if !meta.is_file() {
        // A FIFO would block the open, a directory cannot be read: compare the path only.
        return Some(Fingerprint {
            resolved,
            len: 0,
            content_hash: 0,
        });
    }
    let file = std::fs::File::open(&resolved).ok()?;
    let mut hasher = DefaultHasher::new();
    let mut buf = Vec::new();
    file.take(MAX_HASHED).read_to_end(&mut buf).ok()?;
    hasher.write(&buf);
    Some(Fingerprint {
        resolved,
        len: meta.len(),
        content_hash: hasher.finish(),
    })
}

/// The snapshot taken at startup.
#[derive(Debug, Default)]
pub struct Definition {
    watched: Vec<(PathBuf, Option<Fingerprint>)>,
}

impl Definition {
    /// Snapshots `paths` now.
    pub fn snapshot(paths: &[PathBuf]) -> Self {
        let watched: Vec<_> = paths.iter().map(|p| (p.clone(), fingerprint(p))).collect();
        for (path, before) in &watched {
            if before.is_none() {
                tracing::warn!(
                    path = %path.display(),
                    "NIXFLEET_RESTART_ON_CHANGE: cannot read {}; a switch that creates it will \
                     restart the agent, other changes to it go unnoticed",
                    path.display()
                );
            }
        }
        Definition { watched }
    }

    /// The first watched file that differs from the snapshot (changed, appeared or vanished).
    pub fn changed(&self) -> Option<&Path> {
        self.watched
            .iter()
            .find(|(path, before)| fingerprint(path) != *before)
            .map(|(path, _)| path.as_path())
    }
}

/// What `stat` says about a file, through its symlinks.
#[derive(Clone, Debug, PartialEq, Eq)]
struct StatPrint {
    resolved: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stat_print(path: &Path) -> Option<StatPrint> {
    use std::os::unix::fs::MetadataExt as _;
    let resolved = path.canonicalize().ok()?;
    let meta = std::fs::metadata(&resolved).ok()?;
    Some(StatPrint {
        resolved,
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// One watched file: the stat and content fingerprint it had when the agent started.
#[derive(Debug)]
struct Watched {
    path: PathBuf,
    what: &'static str,
    stat: Option<StatPrint>,
    content: Option<Fingerprint>,
}

/// The agent's binary and definition files as they were at start, compared cheaply on each
/// heartbeat (see the module docs).
#[derive(Debug, Default)]
pub struct Watch {
    watched: Vec<Watched>,
}

impl Watch {
    /// Snapshots `binary` (the file the supervisor starts next time) and `definition` files.
    pub fn new(binary: Option<&Path>, definition: &[PathBuf]) -> Watch {
        let binary = binary.map(|b| (b.to_path_buf(), "agent binary"));
        let files = definition.iter().map(|p| (p.clone(), "service definition"));
        Watch {
            watched: binary
                .into_iter()
                .chain(files)
                .map(|(path, what)| Watched {
                    stat: stat_print(&path),
                    // The binary can be large: compared by stat and target only.
                    content: (what != "agent binary")
                        .then(|| fingerprint(&path))
                        .flatten(),
                    what,
                    path,
                })
                .collect(),
        }
    }

    /// The first watched file that changed since start, in words (`service definition
    /// /etc/systemd/system/nixfleet-agent.service changed`). A file whose `stat` changed but
    /// whose target and content did not (rewritten with the same bytes) is taken as unchanged
    /// from then on.
    pub fn changed(&mut self) -> Option<String> {
        for w in &mut self.watched {
            let now = stat_print(&w.path);
            if now == w.stat {
                continue;
            }
            if w.what != "agent binary" {
                let content = fingerprint(&w.path);
                if content == w.content && content.is_some() {
                    w.stat = now;
                    continue;
                }
            }
            let how = match (&w.stat, &now) {
                (None, Some(_)) => "appeared",
                (Some(_), None) => "vanished",
                _ => "changed",
            };
            return Some(format!("{} {} {how}", w.what, w.path.display()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_sees_a_replaced_binary_and_an_edited_unit_but_not_a_same_content_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("nixfleet-agent");
        let unit = dir.path().join("agent.service");
        std::fs::write(&bin, "old binary").unwrap();
        std::fs::write(&unit, "[Service]\nEnvironment=A=1\n").unwrap();
        let mut watch = Watch::new(Some(&bin), std::slice::from_ref(&unit));
        assert_eq!(watch.changed(), None);

        // Same bytes written again (new mtime): not a change.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&unit, "[Service]\nEnvironment=A=1\n").unwrap();
        assert_eq!(watch.changed(), None);

        std::fs::write(&unit, "[Service]\nEnvironment=A=2\n").unwrap();
        assert_eq!(
            watch.changed(),
            Some(format!("service definition {} changed", unit.display()))
        );

        let mut watch = Watch::new(Some(&bin), std::slice::from_ref(&unit));
        // `install` replaces the file (new inode), as a package manager does.
        let new = dir.path().join("new-binary");
        std::fs::write(&new, "new binary").unwrap();
        std::fs::rename(&new, &bin).unwrap();
        assert_eq!(
            watch.changed(),
            Some(format!("agent binary {} changed", bin.display()))
        );
    }

    #[test]
    fn detects_edits_relinks_appearance_and_removal() {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("agent.service");
        let store_a = dir.path().join("a.service");
        let store_b = dir.path().join("b.service");
        std::fs::write(&store_a, "[Service]\nExecStart=/a\n").unwrap();
        std::fs::write(&store_b, "[Service]\nExecStart=/a\n").unwrap();
        std::os::unix::fs::symlink(&store_a, &unit).unwrap();
        let config = dir.path().join("agent.toml");
        let missing = dir.path().join("later.toml");
        std::fs::write(&config, "interval = 10\n").unwrap();

        let definition = Definition::snapshot(&[unit.clone(), config.clone(), missing.clone()]);
        assert_eq!(definition.changed(), None, "nothing changed yet");

        // Re-linked to another (store) path, even with the same content: NixOS's way.
        std::fs::remove_file(&unit).unwrap();
        std::os::unix::fs::symlink(&store_b, &unit).unwrap();
        assert_eq!(definition.changed(), Some(unit.as_path()));
        std::fs::remove_file(&unit).unwrap();
        std::os::unix::fs::symlink(&store_a, &unit).unwrap();
        assert_eq!(definition.changed(), None);

        // Edited in place, same length.
        std::fs::write(&config, "interval = 30\n").unwrap();
        assert_eq!(definition.changed(), Some(config.as_path()));
        std::fs::write(&config, "interval = 10\n").unwrap();
        assert_eq!(definition.changed(), None);

        std::fs::write(&missing, "x").unwrap();
        assert_eq!(definition.changed(), Some(missing.as_path()));
        std::fs::remove_file(&missing).unwrap();
        std::fs::remove_file(&config).unwrap();
        assert_eq!(definition.changed(), Some(config.as_path()));
    }

    #[test]
    fn a_fifo_is_compared_by_path_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let definition = Definition::snapshot(std::slice::from_ref(&fifo));
        assert_eq!(definition.changed(), None);
        std::fs::remove_file(&fifo).unwrap();
        assert_eq!(definition.changed(), Some(fifo.as_path()));
    }

    #[test]
    fn nothing_watched_never_changes() {
        assert_eq!(Definition::snapshot(&[]).changed(), None);
    }
}
