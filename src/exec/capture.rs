//! Bounded capture of a child's combined stdout+stderr, and line-by-line debug logging of it.
//!
//! A `nixos-rebuild` can print hundreds of megabytes, and a runaway test script can print
//! forever; the agent must not grow with them. [`Capture`] keeps the first half of the budget
//! (where the command line and early errors are) and a ring of the last half (where the final
//! error is), and counts what fell in between. It owns no I/O: the pipe reader in `unix.rs`
//! feeds it bytes, which keeps this testable without processes.

use std::collections::VecDeque;

/// Longest child line written to the log; the rest of the line is dropped from the log (it is
/// still captured). Keeps one binary blob without newlines from becoming one huge log record.
const MAX_LOG_LINE: usize = 1000;

/// Where child lines go, so `RUST_LOG=nixfleet_agent::child=debug` shows them on their own.
macro_rules! log_child_line {
    ($label:expr, $line:expr) => {
        tracing::debug!(target: "nixfleet_agent::child", label = %$label, "{}", $line)
    };
}

/// Head + tail of a child's output, at most `cap` bytes of it in memory.
pub(super) struct Capture {
    label: String,
    head_cap: usize,
    tail_cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    /// Bytes that fell between head and tail.
    omitted: u64,
    /// The current, not yet terminated line, for the log (at most `MAX_LOG_LINE` bytes).
    line: Vec<u8>,
    /// The current line was longer than `MAX_LOG_LINE`.
    line_truncated: bool,
    /// Live lines for a link that streams output.
    stream: Option<super::tap::LineSplitter>,
}

impl Capture {
    pub(super) fn new(cap: usize, label: &str) -> Self {
        let head_cap = cap / 2;
        Capture {
            label: label.to_owned(),
            head_cap,
            tail_cap: cap - head_cap,
            head: Vec::new(),
            tail: VecDeque::new(),
            omitted: 0,
            line: Vec::new(),
            line_truncated: false,
            stream: None,
        }
    }

    pub(super) fn with_tap(mut self, tap: Option<super::tap::LineTap>) -> Self {
        self.stream = tap.map(super::tap::LineSplitter::new);
        self
    }

    pub(super) fn push(&mut self, data: &[u8]) {
        // Checked per chunk, not per line: splitting a flood into lines nobody reads is waste.
        if tracing::enabled!(target: "nixfleet_agent::child", tracing::Level::DEBUG) {
            self.log_lines(data);
        }
        if let Some(stream) = &mut self.stream {
            stream.push(data);
        }
        self.keep(data);
    }

    fn keep(&mut self, mut data: &[u8]) {
        let room = self.head_cap - self.head.len();
        if room > 0 {
            let take = room.min(data.len());
            self.head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        if data.len() >= self.tail_cap {
            // The chunk alone fills the ring: everything older is omitted.
            let skip = data.len() - self.tail_cap;
            self.omitted += (self.tail.len() + skip) as u64;
            self.tail.clear();
            self.tail.extend(&data[skip..]);
        } else {
            let overflow = (self.tail.len() + data.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..overflow);
            self.omitted += overflow as u64;
            self.tail.extend(data);
        }
    }

    fn log_lines(&mut self, data: &[u8]) {
        for (i, piece) in data.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                self.flush_line();
            }
            let room = MAX_LOG_LINE - self.line.len();
            if piece.len() > room {
                self.line_truncated = true;
            }
            self.line.extend_from_slice(&piece[..piece.len().min(room)]);
        }
    }

    fn flush_line(&mut self) {
        let bytes = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        let text = String::from_utf8_lossy(bytes);
        if self.line_truncated {
            log_child_line!(self.label, format_args!("{text} [... line truncated]"));
        } else {
            log_child_line!(self.label, text);
        }
        self.line.clear();
        self.line_truncated = false;
    }

    /// Logs an unterminated last line and returns the captured output as lossy UTF-8.
    pub(super) fn finish(mut self) -> String {
        if !self.line.is_empty() || self.line_truncated {
            self.flush_line();
        }
        if let Some(stream) = &mut self.stream {
            stream.finish();
        }
        let tail = self.tail.make_contiguous();
        if self.omitted == 0 {
            // One conversion, so a multi-byte character split between head and tail survives.
            let mut all = self.head;
            all.extend_from_slice(tail);
            return String::from_utf8_lossy(&all).into_owned();
        }
        let mut out = String::from_utf8_lossy(&self.head).into_owned();
        out.push_str(&omitted_marker(self.omitted));
        out.push_str(&String::from_utf8_lossy(tail));
        out
    }
}

/// The line that replaces the dropped middle of a long output.
pub(super) fn omitted_marker(bytes: u64) -> String {
    format!("\n[... {bytes} bytes of output omitted ...]\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(cap: usize, chunks: &[&[u8]]) -> String {
        let mut c = Capture::new(cap, "test");
        for chunk in chunks {
            c.push(chunk);
        }
        c.finish()
    }

    #[test]
    fn small_output_is_kept_whole() {
        assert_eq!(capture(10, &[b"abc", b"defg"]), "abcdefg");
        assert_eq!(capture(10, &[b"0123456789"]), "0123456789");
    }

    #[test]
    fn long_output_keeps_head_and_tail_and_counts_the_middle() {
        let expected = format!("01234{}vwxyz", omitted_marker(26));
        assert_eq!(
            capture(10, &[b"0123456789abcdefghijklmnopqrstuvwxyz"]),
            expected
        );
        // The same bytes in awkward chunk sizes give the same result.
        let chunks: Vec<&[u8]> = b"0123456789abcdefghijklmnopqrstuvwxyz".chunks(3).collect();
        assert_eq!(capture(10, &chunks), expected);
        let chunks: Vec<&[u8]> = b"0123456789abcdefghijklmnopqrstuvwxyz".chunks(1).collect();
        assert_eq!(capture(10, &chunks), expected);
    }

    #[test]
    fn a_character_split_between_head_and_tail_survives_when_nothing_is_omitted() {
        let text = "ab\u{e9}cd"; // the é straddles the 3-byte head
        assert_eq!(capture(6, &[text.as_bytes()]), text);
    }

    #[test]
    fn zero_cap_keeps_only_the_marker() {
        assert_eq!(capture(0, &[b"abc"]), omitted_marker(3));
    }

    #[test]
    fn invalid_utf8_becomes_replacement_characters() {
        let out = capture(100, &[b"ok \xff\xfe\n\x80"]);
        assert_eq!(out, "ok \u{fffd}\u{fffd}\n\u{fffd}");
    }
}
