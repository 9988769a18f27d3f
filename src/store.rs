//! Files in the state directory: atomic writes (temp file, fsync, rename; 0600 in a 0700
//! directory) and the token cache in v1's format (`NIXFLEET_TOKEN=<token>\n`, contract §9.4).
//!
//! This module never logs file contents: the token cache holds a secret.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use crate::config::{Secret, parse_token_text};

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Largest state file read back (the outbox holds capped reports; this is far above it).
pub const STATE_FILE_MAX: usize = 64 * 1024 * 1024;

/// Reads a state file without following a symbolic link (`O_NOFOLLOW`) and only if it is a
/// regular file of at most [`STATE_FILE_MAX`] bytes, owned by this user and not writable by
/// group or others; anything else is an error, which callers treat like a corrupt file. The directory is private (`lock::choose_dir`), so this is
/// defence in depth.
pub fn read_state_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    // Someone else's file, or one others could have written, is not the agent's record.
    if meta.uid() != crate::trust::euid() {
        return Err(io::Error::other(format!(
            "owned by uid {}, not by this user",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    let mut bytes = Vec::new();
    file.take(STATE_FILE_MAX as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > STATE_FILE_MAX {
        return Err(io::Error::other(format!(
            "larger than {STATE_FILE_MAX} bytes"
        )));
    }
    Ok(bytes)
}

/// How many random temp names [`write_atomic`] tries before giving up.
const TEMP_ATTEMPTS: usize = 8;

/// Replaces `path` with `bytes` atomically: a reader sees the old or the new file, never a
/// mix, even across a crash or power loss.
///
/// The temp file has a random name and is created exclusively without following a symlink, so
/// in a directory others can write to (a token cache under /tmp) nobody can plant a file or a
/// link there for us to write through.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, true, true, 0o600)
}

/// [`write_atomic`] without the directory fsync: the new content is on disk before the rename
/// (so a power cut can never leave an empty file behind), but the rename itself may be undone
/// by a power cut until the next fsync of the directory (the next [`write_atomic`] there). For
/// writes whose loss only repeats work, like taking a delivered report out of the outbox: one
/// flush instead of two narrows the window in which a kill -9 makes the agent send a
/// delivered report again.
pub fn write_atomic_relaxed(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, false, true, 0o600)
}

/// Replaces `path` atomically (a reader sees the old or the new file) without any fsync, with
/// `mode`: for files that only describe the present and are rewritten often (`status.json`,
/// the metrics file), where a power cut may at worst bring back the previous version.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace_file(path, bytes, false, false, mode)
}

fn replace_file(
    path: &Path,
    bytes: &[u8],
    sync_dir: bool,
    sync_file: bool,
    mode: u32,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if mode == 0o600 {
        ensure_private_dir(dir)?;
    }
    let name = path
        .file_name()
        .map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let (tmp, mut file) = {
        let mut attempt = 0;
        loop {
            let tmp = dir.join(format!(".{name}.tmp.{:016x}", fastrand::u64(..)));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&tmp);
            match opened {
                Ok(file) => break (tmp, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < TEMP_ATTEMPTS => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    };
    // From here on the temp file is ours, and removed again on failure (until renamed).
    let written = (|| {
        // The umask may have taken bits away; the mode is exactly 0600 either way.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        if sync_file {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    if !sync_dir {
        return Ok(());
    }
    // The rename is durable only once the directory entry is.
    fs::File::open(dir)?.sync_all()
}

/// Moves a corrupt state file aside (`<name>.corrupt-<unix time>`) with a clear log line, so
/// the agent carries on with a fresh one and the bad file is kept for a human to look at.
pub fn quarantine(path: &Path, why: &str) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".corrupt-{stamp}"));
    let target = PathBuf::from(target);
    match fs::rename(path, &target) {
        Ok(()) => tracing::error!(
            file = %path.display(),
            moved_to = %target.display(),
            "state file is corrupt ({why}); moved it aside and starting fresh"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            "state file is corrupt ({why}) and could not be moved aside: {e}"
        ),
    }
}

/// Like [`quarantine`], but keeps the file in place too (it is rewritten soon by its owner):
/// the corrupt content goes to `<name>.corrupt-<unix time>` for a human to look at.
fn quarantine_copy(path: &Path, why: &str) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".corrupt-{stamp}"));
    let target = PathBuf::from(target);
    let copied = read_state_file(path).and_then(|bytes| write_atomic(&target, &bytes));
    match copied {
        Ok(()) => tracing::error!(
            file = %path.display(),
            copied_to = %target.display(),
            "state file is corrupt ({why}); kept a copy and ignoring that part"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            "state file is corrupt ({why}) and no copy could be kept: {e}"
        ),
    }
}

/// The command journal: which command is running and in which step, written before its first
/// child starts, so that whichever agent instance comes next can report it as interrupted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournalEntry {
    pub id: u64,
    pub command: String,
    pub step: String,
    pub started_unix: u64,
    /// Set once the command's switch runs outside the agent: the next instance waits for its
    /// result instead of calling the command interrupted.
    #[serde(default)]
    pub detached: Option<crate::detach::Detached>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct JournalFile {
    version: u32,
    last_id: u64,
    running: Option<JournalEntry>,
    /// Commands delivered but not started yet (queued behind the running one).
    #[serde(default)]
    queued: Vec<String>,
    /// Commands already known not to have run, whose "not run" notices wait for a resumed
    /// switch to report first (kept on disk so a second restart does not lose them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    held: Vec<String>,
}

/// What a previous agent instance left unfinished.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Left {
    pub running: Option<JournalEntry>,
    pub queued: Vec<String>,
}

/// The journal file (`journal.json`, versioned, atomic).
#[derive(Debug)]
pub struct Journal {
    path: Option<PathBuf>,
    last_id: u64,
    running: Option<JournalEntry>,
    queued: Vec<String>,
    held: Vec<String>,
}

impl Journal {
    pub fn in_memory() -> Self {
        Journal {
            path: None,
            last_id: 0,
            running: None,
            queued: Vec::new(),
            held: Vec::new(),
        }
    }

    /// Loads the journal; a corrupt one is quarantined. Returns the journal and what a
    /// previous instance left: the command it was running and the ones queued behind it.
    pub fn load(path: PathBuf) -> (Journal, Left) {
        let mut journal = Journal {
            path: Some(path.clone()),
            last_id: 0,
            running: None,
            queued: Vec::new(),
            held: Vec::new(),
        };
        let mut left = Left::default();
        match read_state_file(&path) {
            Ok(bytes) => match serde_json::from_slice::<JournalFile>(&bytes) {
                Ok(file) if file.version == 1 => {
                    journal.last_id = file.last_id;
                    left.running = file.running;
                    // A detached switch whose paths are not the agent's own form is never
                    // waited for, read or cleaned up: the file is kept aside for a human and
                    // the command is reported as interrupted instead.
                    let state_dir = path.parent().unwrap_or(Path::new("/"));
                    if let Some(entry) = &mut left.running
                        && let Some(detached) = &entry.detached
                        && let Err(why) = crate::detach::check_detached(detached, state_dir)
                    {
                        quarantine_copy(&path, &format!("journal entry {}: {why}", entry.id));
                        entry.detached = None;
                    }
                    // Kept, so clearing the queue after the restart's notices is persisted.
                    journal.queued.clone_from(&file.queued);
                    journal.held.clone_from(&file.held);
                    // Held notices belong to commands delivered before the queued ones.
                    left.queued = file.held;
                    left.queued.extend(file.queued);
                }
                Ok(file) => quarantine(&path, &format!("unknown journal version {}", file.version)),
                Err(e) => quarantine(&path, &format!("unreadable journal ({e})")),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(path = %path.display(), "cannot read the journal: {e}"),
        }
        (journal, left)
    }

    /// The commands waiting behind the running one changed.
    pub fn set_queued(&mut self, queued: Vec<String>) {
        if queued != self.queued {
            self.queued = queued;
            self.persist();
        }
    }

    /// What a previous instance left queued is now either reported (its notices are in the
    /// outbox: `held` empty) or held back until a resumed switch reports (`held`). One write.
    pub fn settle_queued(&mut self, held: Vec<String>) {
        if !self.queued.is_empty() || held != self.held {
            self.queued.clear();
            self.held = held;
            self.persist();
        }
    }

    /// The held notices are in the outbox now.
    pub fn release_held(&mut self) {
        if !self.held.is_empty() {
            self.held.clear();
            self.persist();
        }
    }

    /// Records that `command` starts; returns its id.
    pub fn start(&mut self, command: &str) -> u64 {
        self.begin(command);
        self.persist();
        self.last_id
    }

    /// Records that `command` starts and that `queued` now wait behind it, in one write (so no
    /// crash can leave `command` both queued and running, or in neither place); returns its id.
    pub fn start_with_queue(&mut self, command: &str, queued: Vec<String>) -> u64 {
        self.queued = queued;
        self.begin(command);
        self.persist();
        self.last_id
    }

    /// The running entry for a new `command`, in memory only.
    fn begin(&mut self, command: &str) {
        self.last_id += 1;
        let started_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.running = Some(JournalEntry {
            id: self.last_id,
            command: command.to_string(),
            step: "starting".into(),
            started_unix,
            detached: None,
        });
    }

    pub fn step(&mut self, step: &str) {
        if let Some(entry) = &mut self.running {
            entry.step = step.to_string();
            self.persist();
        }
    }

    /// The running command's switch now runs outside the agent.
    pub fn detach(&mut self, detached: crate::detach::Detached) {
        if let Some(entry) = &mut self.running {
            entry.detached = Some(detached);
            self.persist();
        }
    }

    /// Takes over a command a previous instance left with a detached switch.
    pub fn resume(&mut self, entry: JournalEntry) {
        self.last_id = self.last_id.max(entry.id);
        self.running = Some(entry);
        self.persist();
    }

    /// The running entry, if any.
    pub fn running(&self) -> Option<&JournalEntry> {
        self.running.as_ref()
    }

    /// The command is over (its reports are in the outbox).
    pub fn finish(&mut self) {
        if self.running.take().is_some() {
            self.persist();
        }
    }

    /// Forgets a command left by a previous instance, once its report is in the outbox.
    pub fn settle_previous(&mut self) {
        self.persist();
    }

    fn persist(&self) {
        let Some(path) = &self.path else { return };
        let file = JournalFile {
            version: 1,
            last_id: self.last_id,
            running: self.running.clone(),
            queued: self.queued.clone(),
            held: self.held.clone(),
        };
        let bytes = serde_json::to_vec(&file).expect("journal serializes");
        if let Err(e) = write_atomic(path, &bytes) {
            tracing::error!(path = %path.display(), "cannot save the command journal: {e}");
        }
    }
}

/// Largest token cache read (a token is a few dozen bytes).
const TOKEN_CACHE_MAX: usize = 64 * 1024;

/// The per-host token cache.
#[derive(Clone, Debug)]
pub struct TokenCache {
    path: PathBuf,
}

impl TokenCache {
    pub fn new(path: PathBuf) -> Self {
        TokenCache { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached token, if the file exists and holds one. A cache that is a symbolic link,
    /// not a regular file, owned by another user, readable or writable by group or others, or
    /// over 64 KiB is refused with the reason (the caller falls back to the configured token):
    /// someone else could have planted or read it.
    pub fn load(&self) -> io::Result<Option<Secret>> {
        match crate::trust::read_private_file(&self.path, TOKEN_CACHE_MAX) {
            Ok(bytes) => {
                let token = parse_token_text(&String::from_utf8_lossy(&bytes));
                Ok((!token.is_empty()).then(|| Secret::new(token)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, token: &Secret) -> io::Result<()> {
        write_atomic(
            &self.path,
            format!("NIXFLEET_TOKEN={}\n", token.expose()).as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_remembers_a_running_command_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let (mut journal, left) = Journal::load(path.clone());
        assert_eq!(left, Left::default());
        let id = journal.start("switch");
        journal.step("Switch");
        journal.set_queued(vec!["pull".into()]);
        drop(journal);
        let (mut journal, left) = Journal::load(path.clone());
        assert_eq!(left.queued, vec!["pull".to_string()]);
        let left = left.running.expect("left running");
        assert_eq!(
            (left.id, left.command.as_str(), left.step.as_str()),
            (id, "switch", "Switch")
        );
        // The restart reported the queued command as not run; clearing the queue sticks.
        journal.set_queued(Vec::new());
        assert_eq!(Journal::load(path.clone()).1.queued, Vec::<String>::new());
        journal.settle_previous();
        let next = journal.start("pull");
        assert!(next > id, "ids keep growing across restarts");
        journal.finish();
        assert_eq!(Journal::load(path.clone()).1, Left::default());
        std::fs::write(&path, b"garbage").unwrap();
        assert_eq!(Journal::load(path.clone()).1, Left::default());
        assert!(!path.exists(), "garbage journal quarantined");
    }

    #[test]
    fn start_with_queue_records_both_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let (mut journal, _) = Journal::load(path.clone());
        journal.set_queued(vec!["switch".into(), "pull".into(), "test".into()]);
        let id = journal.start_with_queue("switch", vec!["pull".into(), "test".into()]);
        let (_, left) = Journal::load(path.clone());
        assert_eq!(
            left.running.map(|r| (r.id, r.command)),
            Some((id, "switch".into()))
        );
        assert_eq!(left.queued, vec!["pull".to_string(), "test".to_string()]);
    }

    #[test]
    fn write_atomic_never_follows_a_planted_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        ensure_private_dir(&state).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        // Where the old code wrote its temp file (predictable), and any name like it.
        let planted = state.join(format!(".token.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let path = state.join("token");
        for round in 0..20 {
            write_atomic(&path, format!("round {round}").as_bytes()).unwrap();
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "round 19");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&planted).unwrap().is_symlink());
        assert!(!fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let mut names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![planted.file_name().unwrap().to_str().unwrap(), "token"]
        );
    }

    #[test]
    fn token_cache_that_others_could_plant_or_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let cache = TokenCache::new(path.clone());
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "NIXFLEET_TOKEN=planted\n").unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let err = cache.load().unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");

        fs::remove_file(&path).unwrap();
        fs::write(&path, "NIXFLEET_TOKEN=readable\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = cache.load().unwrap_err().to_string();
        assert!(err.contains("mode 644"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        if crate::trust::euid() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let err = cache.load().unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        }
        assert_eq!(cache.load().unwrap(), Some(Secret::new("readable")));

        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert!(cache.load().is_err(), "a link to /dev/zero is never read");
    }

    #[test]
    fn state_files_others_could_have_written_or_linked_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.json");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"{}").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(read_state_file(&path).is_err(), "a link is never followed");
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"{}").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let err = read_state_file(&path).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_state_file(&path).unwrap(), b"{}");
        if crate::trust::euid() == 0 {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let err = read_state_file(&path).unwrap_err().to_string();
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn token_cache_round_trip_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let cache = TokenCache::new(dir.path().join("state/token"));
        assert_eq!(cache.load().unwrap(), None);
        cache.save(&Secret::new("per-host")).unwrap();
        assert_eq!(cache.load().unwrap(), Some(Secret::new("per-host")));
        assert_eq!(
            fs::read_to_string(cache.path()).unwrap(),
            "NIXFLEET_TOKEN=per-host\n"
        );
        assert_eq!(fs::metadata(cache.path()).unwrap().mode() & 0o777, 0o600);
        let parent = fs::metadata(dir.path().join("state")).unwrap();
        assert_eq!(parent.mode() & 0o777, 0o700);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}

/// Issue 10, item 10: property tests over state files and token files.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any bytes in journal.json: loading never panics; what cannot be used is moved aside.
        #[test]
        fn any_journal_file_loads_or_is_quarantined(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal.json");
            fs::write(&path, &bytes).unwrap();
            let (_journal, left) = Journal::load(path.clone());
            if let Some(entry) = left.running
                && let Some(detached) = entry.detached
            {
                prop_assert!(crate::detach::check_detached(&detached, dir.path()).is_ok());
            }
        }

        /// Journal-shaped JSON with arbitrary detached paths and units: nothing outside the
        /// agent's own form survives loading.
        #[test]
        fn any_detached_record_outside_the_form_is_dropped(
            file in any::<String>(), unit in proptest::option::of(any::<String>()), pid in any::<Option<u32>>()
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("journal.json");
            let journal = serde_json::json!({
                "version": 1, "last_id": 1, "queued": [],
                "running": {"id": 1, "command": "switch", "step": "Switch", "started_unix": 1,
                    "detached": {"unit": unit, "pid": pid, "result_file": file, "deadline_unix": 1}},
            });
            fs::write(&path, journal.to_string()).unwrap();
            let (_journal, left) = Journal::load(path);
            let entry = left.running.expect("the entry itself is kept");
            if let Some(detached) = entry.detached {
                prop_assert!(crate::detach::check_detached(&detached, dir.path()).is_ok());
            }
        }

        /// Any token cache or token file text: never a panic, never a line break in the token,
        /// and the token is part of the text.
        #[test]
        fn any_token_text_gives_one_clean_line(text in any::<String>()) {
            let token = parse_token_text(&text);
            prop_assert!(!token.contains('\n') && !token.contains('\r'));
            prop_assert!(text.contains(&token));
        }
    }
}
