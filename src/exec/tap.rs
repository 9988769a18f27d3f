//! Live output: a child's lines, as they come, for a link that streams them (v2 `output`).
//!
//! Bounded twice so a flood can grow neither the agent nor the dashboard's queues: a line is
//! cut at [`MAX_STREAM_LINE`] bytes, and lines go into a bounded channel with `try_send`; what
//! does not fit is counted ([`LineTap::dropped`]) and said in the command's result. The
//! captured head + tail of the output (for logs and v1 reports) is unaffected.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// Longest streamed line, in bytes; the rest of the line is dropped from the stream.
pub const MAX_STREAM_LINE: usize = 4096;

/// A line with the name of the command that printed it: the name is fixed when the line is
/// made, so lines still waiting when the command ends keep it.
pub type TaggedLine = (Arc<str>, String);

/// Where a command's output lines go. Cheap to clone; clones share the drop counter.
#[derive(Clone, Debug)]
pub struct LineTap {
    lines: mpsc::Sender<TaggedLine>,
    command: Arc<str>,
    dropped: Arc<AtomicU64>,
}

impl LineTap {
    pub fn new(lines: mpsc::Sender<TaggedLine>, command: &str) -> Self {
        LineTap {
            lines,
            command: Arc::from(command),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Offers one line; never blocks.
    pub fn send(&self, line: String) {
        if self
            .lines
            .try_send((Arc::clone(&self.command), line))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines that did not fit the backlog.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Splits a byte stream into lines for a [`LineTap`]: `\n` ends a line, a `\r` before it is
/// dropped, a line over [`MAX_STREAM_LINE`] is cut, invalid UTF-8 becomes U+FFFD.
#[derive(Debug)]
pub(super) struct LineSplitter {
    tap: LineTap,
    line: Vec<u8>,
}

impl LineSplitter {
    pub(super) fn new(tap: LineTap) -> Self {
        LineSplitter {
            tap,
            line: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        for (i, piece) in data.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                self.flush();
            }
            let room = MAX_STREAM_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&piece[..piece.len().min(room)]);
        }
    }

    fn flush(&mut self) {
        let bytes = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        self.tap.send(String::from_utf8_lossy(bytes).into_owned());
        self.line.clear();
    }

    /// Sends an unterminated last line.
    pub(super) fn finish(&mut self) {
        if !self.line.is_empty() {
            self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_cut_and_counted_when_the_backlog_is_full() {
        let (tx, mut rx) = mpsc::channel(3);
        let tap = LineTap::new(tx, "test");
        let mut split = LineSplitter::new(tap.clone());
        split.push(b"one\r\ntw");
        split.push(b"o\n");
        split.push(&vec![b'x'; MAX_STREAM_LINE * 2]);
        split.push(b"\nfour\nfive");
        split.finish();
        assert_eq!(
            rx.try_recv().unwrap(),
            (Arc::from("test"), "one".to_string())
        );
        assert_eq!(rx.try_recv().unwrap().1, "two");
        assert_eq!(rx.try_recv().unwrap().1.len(), MAX_STREAM_LINE);
        assert!(rx.try_recv().is_err());
        assert_eq!(tap.dropped(), 2, "four and five did not fit");
    }
}
