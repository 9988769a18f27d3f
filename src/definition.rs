//! What the supervisor starts next time: the files that define the agent's service (its
//! systemd unit, its config file), set by `NIXFLEET_RESTART_ON_CHANGE`.
//!
//! On NixOS the module sets `restartIfChanged = false`: the agent runs the switch that
//! changes its own unit, and being restarted by `switch-to-configuration` would cut that
//! switch's report short. So after a successful switch the agent itself compares these files
//! with the snapshot it took at startup, and when one changed it reports, then exits 10 so the
//! supervisor starts the new definition (new settings, new binary). A snapshot is a resolved
//! path (a NixOS unit is a symlink into the store) plus a hash of the content (an edited
//! file in place), taken once at startup and once per successful switch: an idle agent never
//! reads these files.

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

#[cfg(test)]
mod tests {
    use super::*;

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
