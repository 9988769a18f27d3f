//! Whether a file or directory may be trusted by a root daemon: it is what it claims to be (not
//! a symbolic link), it belongs to the agent's user (or root), and nobody else can change it,
//! nor the directories above it. Used for the state and runtime directories, the token cache and
//! the legacy checkout (issue 10, items 1 and 6).
//!
//! This module only inspects; it never changes a mode or an owner, and never follows a link
//! it was asked about. Callers turn a refusal into an error naming the path and the setting.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Component, Path, PathBuf};

/// The effective uid of this process.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Whether `uid` may own something the agent trusts: the agent's own user or root.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// Opens `path` for reading only if it is a regular file (a symbolic link is not followed:
/// `O_NOFOLLOW`), owned by this user, and not readable or writable by group or others. The
/// error says which of these failed.
pub fn open_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other("it is a symbolic link")
            } else {
                e
            }
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("it is not a regular file"));
    }
    if meta.uid() != euid() {
        return Err(io::Error::other(format!(
            "it is owned by uid {}, not by this user (uid {})",
            meta.uid(),
            euid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "its mode {:o} lets group or others read or write it (want 0600)",
            meta.mode() & 0o7777
        )));
    }
    Ok(file)
}

/// [`open_private_file`] and read at most `cap` bytes; more is an error, not a longer read.
pub fn read_private_file(path: &Path, cap: usize) -> io::Result<Vec<u8>> {
    let file = open_private_file(path)?;
    let mut bytes = Vec::new();
    file.take(cap as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > cap {
        return Err(io::Error::other(format!("it is larger than {cap} bytes")));
    }
    Ok(bytes)
}

/// Checks that `dir` (absolute) is a directory reached without a symbolic link as its last
/// component, owned by this user or root, and that neither it nor any directory above it (as
/// written and after resolving links above it) can be changed by another user: each is owned
/// by root or this user and is not group- or world-writable unless it has the sticky bit
/// (`/tmp`). `dir` itself must exist.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(dir).map_err(|e| format!("cannot inspect it: {e}"))?;
    if meta.file_type().is_symlink() {
        return Err("it is a symbolic link (use the real directory)".to_owned());
    }
    if !meta.is_dir() {
        return Err("exists but is not a directory".to_owned());
    }
    if !trusted_owner(meta.uid()) {
        return Err(format!(
            "owned by uid {}, not by this user (uid {}) or root",
            meta.uid(),
            euid()
        ));
    }
    let mut ancestors: Vec<PathBuf> = dir.ancestors().skip(1).map(Path::to_path_buf).collect();
    if let Some(parent) = dir.parent()
        && let Ok(real) = fs::canonicalize(parent)
    {
        ancestors.extend(real.ancestors().map(Path::to_path_buf));
    }
    for ancestor in ancestors {
        check_ancestor(&ancestor)?;
    }
    Ok(())
}

fn check_ancestor(dir: &Path) -> Result<(), String> {
    // A link above the directory is fine (`/var/run` -> `/run`) as long as the directory
    // holding it is safe (checked as an ancestor too) and where it leads is (the resolved
    // chain); the link itself belongs to whoever owns its directory.
    let meta = fs::metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !trusted_owner(meta.uid()) {
        return Err(format!(
            "{} above it is owned by uid {}, who could replace it",
            dir.display(),
            meta.uid()
        ));
    }
    let sticky = meta.mode() & 0o1000 != 0; // S_ISVTX (a u16 on macOS)
    if meta.mode() & 0o022 != 0 && !sticky {
        return Err(format!(
            "{} above it is writable by other users (mode {:o}, no sticky bit), who could \
             replace it",
            dir.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Whether the legacy checkout `dir` may be used: git runs hooks and reads config from it as
/// the agent's user (root), so a checkout owned by another user is that user's way to run code
/// as root. Owned by root or this user is fine; anything else needs `allow_foreign`.
pub fn check_checkout_owner(dir: &Path, allow_foreign: bool) -> Result<(), String> {
    if allow_foreign {
        return Ok(());
    }
    for path in [dir.to_path_buf(), dir.join(".git")] {
        let meta = fs::symlink_metadata(&path)
            .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
        if !trusted_owner(meta.uid()) {
            return Err(format!(
                "{} is owned by uid {}, not by root or the agent's user (uid {}): its owner \
                 could run code as the agent through git hooks or config; chown it, or set \
                 NIXFLEET_ALLOW_FOREIGN_CHECKOUT=1 if you trust that user",
                path.display(),
                meta.uid(),
                euid()
            ));
        }
    }
    Ok(())
}

/// Opens (creating it 0600 if missing) the file `name` inside `dir` for reading and writing,
/// `openat`-style: `dir` is opened first without following a link (`O_DIRECTORY`,
/// `O_NOFOLLOW`), and `name` relative to that handle, again without following a link. So the
/// file is the one in the directory that was checked, whatever happens to paths meanwhile.
/// Close-on-exec, so no child ever holds it (nor a lock on it).
pub fn open_in_dir(dir: &Path, name: &str) -> io::Result<File> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)?;
    let fd = nix::fcntl::openat(
        &handle,
        name,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(io::Error::from)?;
    Ok(File::from(fd))
}

/// Whether `path` names nothing outside `dir`: relative, only normal components.
pub fn is_plain_relative(path: &Path) -> bool {
    !path.as_os_str().is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}
