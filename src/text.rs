//! Text from outside the agent (a dashboard's error body, a reply's detail, a file's
//! contents) made safe to log or keep: control characters escaped, so no reply can forge a log
//! line or move the terminal's cursor, and the length capped, so no reply can grow a log line
//! or the agent's memory without bound.
//!
//! Every protocol link (v1 today, v2 next) passes foreign text through [`bounded`] before it
//! lands in an error, a log line or remembered state. This module must not allocate more than
//! the cap plus a short suffix, whatever it is given.

use std::fmt::Write as _;

/// The most bytes of foreign text one log line carries (about 1 KiB, plus the cut note).
pub const LOG_TEXT_MAX: usize = 1024;

/// The longest prefix of `s` within `max` bytes that ends on a character boundary.
pub fn prefix_within(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `text` with control characters escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...; also the Unicode
/// line and paragraph separators and bidi overrides) and cut to at most `max_bytes` bytes of
/// output, on a character boundary, followed by ` …(N more bytes)` when cut.
pub fn bounded(text: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_bytes) + 24);
    let mut used = 0;
    for (at, c) in text.char_indices() {
        let start = out.len();
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
        if out.len() > max_bytes {
            out.truncate(start);
            let _ = write!(out, " …({} more bytes)", text.len() - at);
            return out;
        }
        used = at + c.len_utf8();
    }
    debug_assert_eq!(used, text.len());
    out
}

/// [`bounded`] at the log-line cap.
pub fn for_log(text: &str) -> String {
    bounded(text, LOG_TEXT_MAX)
}

/// A URL (or scp-like git location, `user@host:path`) with anything that can carry a secret
/// replaced by `***`: the user information of a `scheme://` URL, a `user:password@` of an
/// scp-like one, and the query and fragment. For error messages and `check-config`.
pub fn redact_url(text: &str) -> String {
    let (head, rest) = match text.find("://") {
        Some(i) => text.split_at(i + 3),
        None => ("", text),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        // `git@github.com:org/repo`: a plain user name in scp-like syntax is no secret.
        Some(at) if !head.is_empty() || authority[..at].contains(':') => {
            format!("***@{}", &authority[at + 1..])
        }
        _ => authority.to_owned(),
    };
    let path = match path.find(['?', '#']) {
        Some(q) => format!("{}{}***", &path[..q], &path[q..=q]),
        None => path.to_owned(),
    };
    format!("{head}{authority}{path}")
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_so_no_line_can_be_forged() {
        let forged = "oops\n2026-01-01T00:00:00Z  INFO token accepted\r\u{1b}[2J\u{0}\u{2028}x\\n";
        let out = for_log(forged);
        assert!(!out.chars().any(|c| c.is_control()), "{out:?}");
        assert_eq!(
            out,
            "oops\\n2026-01-01T00:00:00Z  INFO token accepted\\r\\u{1b}[2J\\u{0}\\u{2028}x\\\\n"
        );
    }

    #[test]
    fn redact_url_hides_user_information_query_and_fragment() {
        for (url, want) in [
            (
                "https://user:pw@git.example/r.git",
                "https://***@git.example/r.git",
            ),
            (
                "https://ghp_token@git.example/r.git",
                "https://***@git.example/r.git",
            ),
            (
                "https://git.example/r.git?token=x#y",
                "https://git.example/r.git?***",
            ),
            (
                "https://git.example/r.git#frag",
                "https://git.example/r.git#***",
            ),
            ("ssh://git@git.example/r.git", "ssh://***@git.example/r.git"),
            ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
            ("user:pw@host:org/repo.git", "***@host:org/repo.git"),
            ("/srv/git/repo.git", "/srv/git/repo.git"),
            ("https://a@b@c/x", "https://***@c/x"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary_with_a_note() {
        let long = "é".repeat(5000);
        let out = bounded(&long, 101);
        assert!(out.starts_with(&"é".repeat(50)), "{out}");
        assert!(out.ends_with(" …(9900 more bytes)"), "{out}");
        assert!(out.len() <= 101 + 24);
        assert_eq!(bounded("short", 101), "short");
        // An escape is never cut in half.
        assert_eq!(bounded("ab\n", 3), "ab …(1 more bytes)");
    }
}

/// Issue 10, item 10: property tests over untrusted input.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever comes in: no control character goes out, the length is bounded, and a
        /// text short and clean enough comes out unchanged.
        #[test]
        fn bounded_escapes_and_caps_anything(text in any::<String>(), max in 0usize..2048) {
            let out = bounded(&text, max);
            prop_assert!(!out.chars().any(|c| c.is_control()));
            prop_assert!(out.len() <= max + " …( more bytes)".len() + 20, "{} > {max}", out.len());
            let clean = text.chars().all(|c| !needs_escape(c) && c != '\\');
            if clean && text.len() <= max {
                prop_assert_eq!(out, text);
            }
        }

        #[test]
        fn redact_url_never_panics_and_hides_passwords(
            user in "[a-z]{1,8}", pw in "[A-Za-z0-9]{6,12}", rest in any::<String>()
        ) {
            let _ = redact_url(&rest);
            let url = format!("https://{user}:{pw}@host.example/{rest}");
            let leaked = format!(":{pw}@");
            prop_assert!(!redact_url(&url).contains(&leaked));
        }
    }
}
