//! The outbox: reports waiting for the dashboard, in order, kept on disk so a dashboard outage
//! or an agent restart loses none of them.
//!
//! Final statuses are kept until delivered; intermediate test progress is coalesced (only the
//! newest of a run of them is kept). The file is small and rewritten atomically on every
//! change, which happens only when a command reports: an idle agent writes nothing.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dashboard::Report;
use crate::store::{quarantine, write_atomic, write_atomic_relaxed};

/// At most this many reports wait; past it the oldest intermediate progress goes first, then
/// the oldest report, with an error in the log naming what was dropped.
pub const OUTBOX_LIMIT: usize = 500;
const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    /// The journal id of the command this report closes out, if it is an "interrupted"
    /// report: used to add that report exactly once.
    #[serde(default)]
    pub journal_id: Option<u64>,
    pub report: Report,
    /// The original was refused for its content; this is the short stand-in (see
    /// [`Outbox::withhold_front`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withheld: bool,
}

#[derive(Serialize, Deserialize)]
struct OutboxFile {
    version: u32,
    next_id: u64,
    entries: VecDeque<Entry>,
}

#[derive(Debug, Default)]
pub struct Outbox {
    path: Option<PathBuf>,
    next_id: u64,
    entries: VecDeque<Entry>,
}

impl Outbox {
    /// An outbox that lives only in memory (tests, or no state directory).
    pub fn in_memory() -> Self {
        Outbox::default()
    }

    /// Loads `path`; a corrupt file is moved aside and the outbox starts empty.
    pub fn load(path: PathBuf) -> Self {
        let mut outbox = Outbox {
            path: Some(path.clone()),
            ..Outbox::default()
        };
        match crate::store::read_state_file(&path) {
            Ok(bytes) => match serde_json::from_slice::<OutboxFile>(&bytes) {
                Ok(file) if file.version == VERSION => {
                    outbox.next_id = file.next_id;
                    outbox.entries = file.entries;
                    if !outbox.entries.is_empty() {
                        tracing::info!(
                            count = outbox.entries.len(),
                            "found undelivered reports from a previous run; delivering them first"
                        );
                    }
                }
                Ok(file) => {
                    quarantine(&path, &format!("unknown outbox version {}", file.version));
                }
                Err(e) => quarantine(&path, &format!("unreadable outbox ({e})")),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::error!(path = %path.display(), "cannot read the outbox: {e}"),
        }
        outbox
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn front(&self) -> Option<&Entry> {
        self.entries.front()
    }

    pub fn contains_journal(&self, journal_id: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.journal_id == Some(journal_id))
    }

    /// Adds a report at the end, coalescing intermediate progress.
    pub fn push(&mut self, report: Report, journal_id: Option<u64>) {
        if report.is_intermediate()
            && let Some(last) = self.entries.back_mut()
            && last.report.is_intermediate()
        {
            // A new id: if the old one is in flight right now, its delivery must not remove
            // this newer progress (`pop` matches ids).
            self.next_id += 1;
            last.id = self.next_id;
            last.report = report;
            last.withheld = false;
            self.persist();
            return;
        }
        if self.entries.len() >= OUTBOX_LIMIT {
            let victim = self
                .entries
                .iter()
                .position(|e| e.report.is_intermediate())
                .unwrap_or(0);
            if let Some(dropped) = self.entries.remove(victim) {
                tracing::error!(
                    limit = OUTBOX_LIMIT,
                    "outbox full: dropped the oldest undelivered report ({})",
                    describe(&dropped.report)
                );
            }
        }
        self.next_id += 1;
        self.entries.push_back(Entry {
            id: self.next_id,
            journal_id,
            report,
            withheld: false,
        });
        self.persist();
    }

    /// Puts a report first in line (an acknowledgement that must close the newest dashboard
    /// log row). Never coalesced.
    pub fn push_front(&mut self, report: Report) {
        self.next_id += 1;
        self.entries.push_front(Entry {
            id: self.next_id,
            journal_id: None,
            report,
            withheld: false,
        });
        self.persist();
    }

    /// Replaces the front entry (if it is still `id`) with a short stand-in for a report the
    /// dashboard keeps refusing for its content; it keeps its place, so it still closes the
    /// command's log row.
    pub fn withhold_front(&mut self, id: u64, stand_in: Report) {
        if let Some(front) = self.entries.front_mut()
            && front.id == id
        {
            front.report = stand_in;
            front.withheld = true;
            self.persist();
        }
    }

    /// Removes the delivered front entry.
    pub fn pop(&mut self, id: u64) {
        if self.entries.front().is_some_and(|e| e.id == id) {
            self.entries.pop_front();
            // Losing this rename to a power cut only sends the report again; a slower write
            // would widen the window in which a kill -9 does the same.
            self.persist_with(write_atomic_relaxed);
        }
    }

    fn persist(&self) {
        self.persist_with(write_atomic);
    }

    fn persist_with(&self, write: fn(&Path, &[u8]) -> std::io::Result<()>) {
        let Some(path) = &self.path else { return };
        let file = OutboxFile {
            version: VERSION,
            next_id: self.next_id,
            entries: self.entries.clone(),
        };
        let bytes = serde_json::to_vec(&file).expect("outbox serializes");
        if let Err(e) = write(path, &bytes) {
            tracing::error!(path = %path.display(), "cannot save the outbox: {e}");
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

/// A one-line description of a report for logs (no output body).
pub fn describe(report: &Report) -> String {
    match report {
        Report::Status(s) => {
            let first = s
                .output
                .as_deref()
                .and_then(|o| o.lines().next())
                .unwrap_or("");
            let first: String = first.chars().take(80).collect();
            format!("status {:?}: {first}", s.status)
        }
        Report::TestProgress(p) => format!(
            "test progress {}/{} (running: {})",
            p.current, p.total, p.running
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::{Outcome, StatusReport, TestProgress};

    fn status(text: &str) -> Report {
        Report::Status(StatusReport::notice(Outcome::Ok, None, text.into()))
    }

    fn running(current: u32) -> Report {
        Report::TestProgress(TestProgress {
            current,
            total: 9,
            passed: 0,
            running: true,
            result: None,
            comment: None,
        })
    }

    #[test]
    fn survives_a_restart_in_order_and_coalesces_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.json");
        let mut outbox = Outbox::load(path.clone());
        outbox.push(status("a"), None);
        outbox.push(running(1), None);
        outbox.push(running(2), None);
        outbox.push(status("b"), Some(7));
        assert_eq!(outbox.len(), 3);
        let reloaded = Outbox::load(path);
        let reports: Vec<_> = reloaded.entries.iter().map(|e| e.report.clone()).collect();
        assert_eq!(reports, vec![status("a"), running(2), status("b")]);
        assert!(reloaded.contains_journal(7));
    }

    #[test]
    fn corrupt_file_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.json");
        std::fs::write(&path, b"{\"version\":1,\"next_id\":3,\"entr").unwrap();
        let outbox = Outbox::load(path.clone());
        assert!(outbox.is_empty());
        assert!(!path.exists());
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            moved.iter().any(|n| n.starts_with("outbox.json.corrupt-")),
            "{moved:?}"
        );
    }

    #[test]
    fn bound_drops_intermediate_first() {
        let mut outbox = Outbox::in_memory();
        outbox.push(running(1), None);
        for i in 0..OUTBOX_LIMIT {
            outbox.push(status(&i.to_string()), None);
        }
        assert_eq!(outbox.len(), OUTBOX_LIMIT);
        assert!(outbox.entries.iter().all(|e| !e.report.is_intermediate()));
    }
}

/// Issue 10, item 10: property tests over the outbox file.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_outbox_file_loads_or_is_quarantined(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox.json");
            std::fs::write(&path, &bytes).unwrap();
            let _ = Outbox::load(path);
        }
    }
}
