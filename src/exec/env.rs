//! The environment a child process gets: a cleared environment plus an allowlist copied from the
//! agent's own, computed once per [`super::Runner`].
//!
//! The agent runs under systemd/launchd with secrets and supervisor plumbing in its environment
//! (`NIXFLEET_TOKEN`, `CREDENTIALS_DIRECTORY`, `NOTIFY_SOCKET`, `WATCHDOG_*`, `LISTEN_FDS`). A
//! child that inherited them could leak the token into a build log, or ping the watchdog and
//! hide a stalled agent. So this module only ever *adds* known-harmless variables; the deny list
//! exists on top of that for `Cmd::env`, where a caller could otherwise re-add a secret by
//! mistake. Nothing here logs values.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

/// Used when the agent itself has no PATH (a bare launchd job, a minimal unit): NixOS wrappers
/// (setuid `sudo`) first, then the system profile, then the FHS locations for non-NixOS hosts.
pub(super) const DEFAULT_PATH: &str = "/run/wrappers/bin:/run/current-system/sw/bin:\
/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Variables copied verbatim when present: identity, locale, TLS trust roots (git, curl and nix
/// each read a different one), the ssh agent, temp dirs and proxies in both spellings.
const ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "LOCALE_ARCHIVE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
    "SSH_AUTH_SOCK",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// `LC_ALL`, `LC_CTYPE`, ...; `NIX_PATH`, `NIX_REMOTE`, `NIX_SSL_CERT_FILE`, `NIX_CONFIG`, ...
const ALLOWED_PREFIXES: &[&str] = &["LC_", "NIX_"];

/// Never passed, even when a caller sets them through `Cmd::env`.
const DENIED: &[&str] = &[
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
];

/// The agent's own configuration and secrets (`NIXFLEET_TOKEN`, ...).
const DENIED_PREFIXES: &[&str] = &["NIXFLEET_"];

/// True when `key` must never reach a child.
pub(super) fn is_denied(key: &OsStr) -> bool {
    // A key that is not UTF-8 cannot name anything we allow, and refusing it is the safe side.
    let Some(key) = key.to_str() else {
        return true;
    };
    DENIED.contains(&key) || DENIED_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn is_allowed(key: &OsStr) -> bool {
    if is_denied(key) {
        return false;
    }
    let Some(key) = key.to_str() else {
        return false;
    };
    ALLOWED.contains(&key) || ALLOWED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The allowlisted subset of `parent`, sorted by name, always with a non-empty PATH.
pub(super) fn allowlisted(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    // A map so a repeated name behaves like the real environment (last one wins) and the child
    // sees a deterministic order.
    let mut env: BTreeMap<OsString, OsString> = parent
        .into_iter()
        .filter(|(key, _)| is_allowed(key))
        .collect();
    let path_missing = env.get(OsStr::new("PATH")).is_none_or(|p| p.is_empty());
    if path_missing {
        env.insert("PATH".into(), DEFAULT_PATH.into());
    }
    env.into_iter().collect()
}

/// The PATH the child will see: the last `PATH` a caller set, else the allowlisted one.
pub(super) fn effective_path<'a>(
    base: &'a [(OsString, OsString)],
    extra: &'a [(OsString, OsString)],
) -> &'a OsStr {
    extra
        .iter()
        .rev()
        .chain(base.iter().rev())
        .find(|(key, _)| key == "PATH")
        .map_or(OsStr::new(DEFAULT_PATH), |(_, value)| value.as_os_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    #[test]
    fn allowlist_keeps_locale_nix_and_tls_and_drops_secrets() {
        let env = allowlisted(vars(&[
            ("PATH", "/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("NIX_PATH", "nixpkgs=/x"),
            ("SSL_CERT_FILE", "/etc/ssl/certs/ca.pem"),
            ("https_proxy", "http://proxy:3128"),
            ("NIXFLEET_TOKEN", "secret"),
            ("NIXFLEET_URL", "https://fleet"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/x"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("WATCHDOG_USEC", "30000000"),
            ("LISTEN_FDS", "1"),
            ("TERM", "xterm"),
            ("DISPLAY", ":0"),
        ]));
        let keys: Vec<_> = env.iter().map(|(k, _)| k.to_str().unwrap()).collect();
        assert_eq!(
            keys,
            ["LC_ALL", "NIX_PATH", "PATH", "SSL_CERT_FILE", "https_proxy"]
        );
    }

    #[test]
    fn missing_or_empty_path_gets_the_default() {
        for parent in [vars(&[("HOME", "/root")]), vars(&[("PATH", "")])] {
            let env = allowlisted(parent);
            assert_eq!(effective_path(&env, &[]), DEFAULT_PATH);
        }
    }

    #[test]
    fn caller_path_overrides_the_allowlisted_one() {
        let base = allowlisted(vars(&[("PATH", "/a")]));
        let extra = vars(&[("PATH", "/b"), ("PATH", "/c")]);
        assert_eq!(effective_path(&base, &extra), "/c");
        assert_eq!(effective_path(&base, &[]), "/a");
    }

    #[test]
    fn nixfleet_variables_are_denied_even_when_set_by_a_caller() {
        assert!(is_denied(OsStr::new("NIXFLEET_TOKEN")));
        assert!(is_denied(OsStr::new("NOTIFY_SOCKET")));
        assert!(!is_denied(OsStr::new("GIT_SSH_COMMAND")));
        assert!(!is_denied(OsStr::new("NIX_REMOTE")));
    }
}
