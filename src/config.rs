//! Configuration: raw inputs from three sources merged into one [`RawConfig`], then validated
//! into typed [`Settings`] in exactly one function, [`Settings::from_raw`].
//!
//! Every setting has one name (`interval`) used as the TOML key, one environment variable
//! (`NIXFLEET_INTERVAL`, the v1 bash agent's names), and maybe a command-line flag. Precedence:
//! flags > environment > config file > defaults. Raw values are kept as strings with their
//! source, so an error can say exactly where a bad value came from and what to set instead.
//! This module reads files (the config file, token files) but never the network, and never logs
//! a secret: tokens live in [`Secret`], whose `Debug` is redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// A value that must never reach a log line, an error message, argv or a child environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that needs it (the Authorization header, the cache).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a raw value came from; named in error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag(&'static str),
    Env(&'static str),
    File(PathBuf),
    /// `$CREDENTIALS_DIRECTORY/token` (systemd `LoadCredential=token:...`).
    Credential(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "command-line flag {flag}"),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::File(path) => write!(f, "config file {}", path.display()),
            Source::Credential(path) => write!(f, "systemd credential {}", path.display()),
        }
    }
}

/// One known setting: its TOML key, its environment variable, and its flag if any.
pub struct SettingName {
    pub key: &'static str,
    pub env: &'static str,
    pub flag: Option<&'static str>,
}

macro_rules! settings_table {
    ($( $(#[$attr:meta])* $key:literal => $env:literal $(, $flag:literal)? ;)*) => {
        /// Every setting the agent reads. The packaging checks compare module options to this.
        pub const SETTINGS: &[SettingName] = &[
            $( $(#[$attr])* SettingName { key: $key, env: $env, flag: settings_table!(@flag $($flag)?) }, )*
        ];
    };
    (@flag) => { None };
    (@flag $flag:literal) => { Some($flag) };
}

settings_table! {
    "url" => "NIXFLEET_URL", "--url";
    "protocol" => "NIXFLEET_PROTOCOL";
    "token_file" => "NIXFLEET_TOKEN_FILE", "--token-file";
    "nixcfg" => "NIXFLEET_NIXCFG";
    "repo_url" => "NIXFLEET_REPO_URL";
    "repo_dir" => "NIXFLEET_REPO_DIR";
    "branch" => "NIXFLEET_BRANCH";
    "ssh_key" => "NIXFLEET_SSH_KEY";
    "interval" => "NIXFLEET_INTERVAL", "--interval";
    "token_cache" => "NIXFLEET_TOKEN_CACHE";
    "location" => "NIXFLEET_LOCATION";
    "device_type" => "NIXFLEET_DEVICE_TYPE";
    "theme_color" => "NIXFLEET_THEME_COLOR";
    "agent_version" => "NIXFLEET_AGENT_VERSION";
    "allow_insecure_http" => "NIXFLEET_ALLOW_INSECURE_HTTP";
    "allow_foreign_checkout" => "NIXFLEET_ALLOW_FOREIGN_CHECKOUT";
    "ca_file" => "NIXFLEET_CA_FILE";
    "pinned_pubkey" => "NIXFLEET_PINNED_PUBKEY";
    "hostname" => "NIXFLEET_HOSTNAME", "--hostname";
    "host_type" => "NIXFLEET_HOST_TYPE";
    "backoff_cap" => "NIXFLEET_BACKOFF_CAP";
    "stall_timeout" => "NIXFLEET_STALL_TIMEOUT";
    "git_timeout" => "NIXFLEET_GIT_TIMEOUT";
    "git_local_timeout" => "NIXFLEET_GIT_LOCAL_TIMEOUT";
    "switch_timeout" => "NIXFLEET_SWITCH_TIMEOUT";
    "flake_timeout" => "NIXFLEET_FLAKE_TIMEOUT";
    "test_timeout" => "NIXFLEET_TEST_TIMEOUT";
    "kill_grace" => "NIXFLEET_KILL_GRACE";
    "shutdown_grace" => "NIXFLEET_SHUTDOWN_GRACE";
    "switch_mode" => "NIXFLEET_SWITCH_MODE";
    "switch_isolation" => "NIXFLEET_SWITCH_ISOLATION";
    "switch_lock" => "NIXFLEET_SWITCH_LOCK";
    "agent_path" => "NIXFLEET_AGENT_PATH";
    "restart_on_change" => "NIXFLEET_RESTART_ON_CHANGE";
    "state_dir" => "NIXFLEET_STATE_DIR", "--state-dir";
    "runtime_dir" => "NIXFLEET_RUNTIME_DIR", "--runtime-dir";
    "log" => "NIXFLEET_LOG";
    "queue_limit" => "NIXFLEET_QUEUE_LIMIT";
    "http_timeout" => "NIXFLEET_HTTP_TIMEOUT";
    // Test builds only (cargo feature `test-hooks`): a shipped binary does not know this
    // setting, so its key is an unknown-key error and its variable is never read.
    #[cfg(feature = "test-hooks")]
    "debug_wedge_file" => "NIXFLEET_DEBUG_WEDGE_FILE";
    "metrics_file" => "NIXFLEET_METRICS_FILE";
    "booted_system" => "NIXFLEET_BOOTED_SYSTEM";
    "current_system" => "NIXFLEET_CURRENT_SYSTEM";
}

fn setting(key: &str) -> &'static SettingName {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .expect("every key used in validation is in SETTINGS")
}

/// Settings holding a URL, which may carry a secret: never echoed unredacted.
const URL_KEYS: &[&str] = &["url", "repo_url"];

/// A configuration error: names the setting, where the bad value came from, and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
        }
    }

    /// A URL-valued setting is echoed with its secrets redacted (`text::redact_url`): an
    /// error message lands in logs and in the Nix build log of the modules' check.
    fn invalid(key: &str, raw: &RawValue, why: &str) -> Self {
        let shown = if URL_KEYS.contains(&key) {
            crate::text::redact_url(&raw.value)
        } else {
            raw.value.clone()
        };
        ConfigError::new(format!(
            "invalid {key} {shown:?} (from {}): {why}; fix it or unset it to use the default",
            raw.source
        ))
    }
}

/// One raw value and where it came from.
#[derive(Clone, Debug)]
pub struct RawValue {
    pub value: String,
    pub source: Source,
}

/// Inputs merged by precedence, not yet validated.
#[derive(Clone, Debug, Default)]
pub struct RawConfig {
    values: BTreeMap<&'static str, RawValue>,
    /// The token given directly in `NIXFLEET_TOKEN` (legacy; prefer a file).
    env_token: Option<Secret>,
    /// `$CREDENTIALS_DIRECTORY`, if systemd passed credentials.
    credentials_dir: Option<PathBuf>,
}

/// Command-line values, already parsed by `cli`.
#[derive(Clone, Debug, Default)]
pub struct FlagValues {
    pub config: Option<PathBuf>,
    pub values: Vec<(&'static str, String)>,
}

impl RawConfig {
    /// Merges file < environment < flags. `env` is passed in so tests need not touch the real
    /// process environment.
    pub fn gather(
        flags: &FlagValues,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<RawConfig, ConfigError> {
        let mut raw = RawConfig::default();
        if let Some(path) = &flags.config {
            raw.merge_file(path)?;
        }
        for name in SETTINGS {
            if let Some(value) = env(name.env) {
                raw.values.insert(
                    name.key,
                    RawValue {
                        value,
                        source: Source::Env(name.env),
                    },
                );
            }
        }
        for (key, value) in &flags.values {
            let name = setting(key);
            raw.values.insert(
                name.key,
                RawValue {
                    value: value.clone(),
                    source: Source::Flag(name.flag.unwrap_or("")),
                },
            );
        }
        raw.env_token = env("NIXFLEET_TOKEN")
            .filter(|t| !t.trim().is_empty())
            .map(|t| Secret::new(t.trim().to_string()));
        raw.credentials_dir = env("CREDENTIALS_DIRECTORY")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from);
        Ok(raw)
    }

    fn merge_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        // At most 64 KiB: a token file pointing at /dev/zero must not grow the agent.
        let text = read_capped(path, 64 * 1024).map_err(|e| {
            ConfigError::new(format!(
                "cannot read config file {} (--config): {e}",
                path.display()
            ))
        })?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::new(format!(
                "config file {} is not valid TOML: {}",
                path.display(),
                e.message()
            ))
        })?;
        for (key, value) in table {
            let Some(name) = SETTINGS.iter().find(|s| s.key == key) else {
                if key == "token" {
                    return Err(ConfigError::new(format!(
                        "config file {}: `token` is not accepted in a config file (it may end up \
                         in the Nix store); put the token in a file and set token_file",
                        path.display()
                    )));
                }
                return Err(ConfigError::new(format!(
                    "config file {}: unknown setting `{key}`; known settings: {}",
                    path.display(),
                    SETTINGS
                        .iter()
                        .map(|s| s.key)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(ConfigError::new(format!(
                        "config file {}: `{key}` must be a string, number or boolean, not {}",
                        path.display(),
                        other.type_str()
                    )));
                }
            };
            self.values.insert(
                name.key,
                RawValue {
                    value,
                    source: Source::File(path.to_path_buf()),
                },
            );
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&RawValue> {
        self.values
            .get(key)
            .filter(|raw| !raw.value.trim().is_empty())
    }
}

/// Where the configured token came from; named when the dashboard rejects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenOrigin {
    File(PathBuf),
    Env,
    Credential(PathBuf),
}

impl fmt::Display for TokenOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenOrigin::File(p) => write!(f, "token file {}", p.display()),
            TokenOrigin::Env => f.write_str("NIXFLEET_TOKEN"),
            TokenOrigin::Credential(p) => write!(f, "systemd credential {}", p.display()),
        }
    }
}

/// How the config repository is managed (contract §9.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RepoMode {
    /// `NIXFLEET_NIXCFG`: an existing checkout, used in place (`git pull`).
    Legacy { dir: PathBuf },
    /// `NIXFLEET_REPO_URL` + `NIXFLEET_REPO_DIR`: the agent owns the clone (fetch + hard reset).
    Isolated {
        url: String,
        dir: PathBuf,
        branch: String,
    },
    /// Neither: the agent heartbeats, commands that need the repo report an error.
    None,
}

impl RepoMode {
    pub fn dir(&self) -> Option<&Path> {
        match self {
            RepoMode::Legacy { dir } | RepoMode::Isolated { dir, .. } => Some(dir),
            RepoMode::None => None,
        }
    }

    /// The isolated clone's remote URL without credentials, for the dashboard (v2 `repo_url`).
    pub fn url_for_display(&self) -> Option<String> {
        let RepoMode::Isolated { url, .. } = self else {
            return None;
        };
        match url::Url::parse(url) {
            Ok(mut parsed) if parsed.has_host() => {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
                parsed.set_query(None);
                parsed.set_fragment(None);
                Some(parsed.to_string())
            }
            // scp-like `git@host:path`: the user part is no secret.
            _ if !url.contains("://") => Some(url.clone()),
            _ => None,
        }
    }
}

/// Which tool applies a configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchMode {
    Auto,
    Nixos,
    Darwin,
    HomeManager,
}

/// How a switch is kept alive across agent restarts (see `detach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchIsolation {
    /// systemd-run where systemd runs and the agent is root or a service of its own user
    /// manager (`--user`), a new session on macOS, otherwise in-process.
    Auto,
    SystemdRun,
    Session,
    /// In the agent's own process tree (the old way).
    None,
}

/// Per-class child-process timeouts (`../shared/agent-resilience.md` §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub git: Duration,
    pub git_local: Duration,
    pub switch: Duration,
    pub flake: Duration,
    pub test: Duration,
    pub kill_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            git: Duration::from_secs(120),
            git_local: Duration::from_secs(30),
            switch: Duration::from_secs(600),
            flake: Duration::from_secs(300),
            test: Duration::from_secs(300),
            kill_grace: Duration::from_secs(10),
        }
    }
}

/// The `host_type` the dashboard accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostType {
    Nixos,
    Macos,
}

impl HostType {
    pub fn as_str(self) -> &'static str {
        match self {
            HostType::Nixos => "nixos",
            HostType::Macos => "macos",
        }
    }
}

/// What the dashboard is told about this host, validated against its field limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIdentity {
    pub hostname: String,
    pub host_type: HostType,
    pub location: String,
    pub device_type: String,
    pub theme_color: Option<String>,
    pub criticality: &'static str,
}

/// Validated settings: everything the rest of the agent needs, typed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub url: url::Url,
    /// Which wire protocol `url` speaks: from its scheme, or forced by `NIXFLEET_PROTOCOL`.
    pub protocol: Protocol,
    pub allow_insecure_http: bool,
    /// Use a legacy checkout owned by a user other than root or the agent's (whose owner can
    /// then run code as the agent through git hooks and config).
    pub allow_foreign_checkout: bool,
    pub ca_file: Option<PathBuf>,
    /// SHA-256 digests of acceptable server public keys (curl `--pinnedpubkey sha256//...`).
    pub pinned_pubkeys: Vec<[u8; 32]>,
    pub token: Option<(Secret, TokenOrigin)>,
    /// Explicit token cache path; `None` means `<state dir>/token`.
    pub token_cache: Option<PathBuf>,
    pub repo: RepoMode,
    pub ssh_key: Option<PathBuf>,
    pub interval: Duration,
    pub backoff_cap: Duration,
    pub stall_timeout: Duration,
    pub shutdown_grace: Duration,
    pub host: HostIdentity,
    pub agent_version: String,
    pub timeouts: Timeouts,
    pub switch_mode: SwitchMode,
    pub switch_isolation: SwitchIsolation,
    /// The lock a manual `nixos-rebuild switch` holds; the agent never switches concurrently.
    pub switch_lock: PathBuf,
    /// The binary the supervisor starts next time; after a switch, a different file here
    /// means "exit 10 and let the supervisor start the new one".
    pub agent_path: Option<PathBuf>,
    /// Files that define the service (its unit, its config): a switch that changes one makes
    /// the agent report, then exit 10 so the supervisor starts the new definition.
    pub restart_on_change: Vec<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub log_filter: Option<String>,
    pub queue_limit: usize,
    /// Total time for one dashboard request (connect is capped at 5 s within it).
    pub http_timeout: Duration,
    /// Test-only hook: while this file exists the main loop blocks its thread, to prove that
    /// the watchdog pings stop and the stall monitor fires. Compiled only with the
    /// `test-hooks` feature (the test build), never into a shipped binary.
    #[cfg(feature = "test-hooks")]
    pub debug_wedge_file: Option<PathBuf>,
    /// Prometheus text-format metrics for node-exporter's textfile collector, written
    /// atomically; `None` writes none.
    pub metrics_file: Option<PathBuf>,
    /// The system the host booted and the one active now (NixOS: `/run/booted-system`,
    /// `/run/current-system`); when their kernel, initrd or modules differ, a reboot is needed.
    pub booted_system: PathBuf,
    pub current_system: PathBuf,
}

/// The dashboard protocol: v1 (HTTP polling, `https://`) or v2 (one WebSocket, `wss://…/ws`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V1,
    V2,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::V1 => "v1",
            Protocol::V2 => "v2",
        })
    }
}

/// Facts from the machine that validation needs; passed in so tests control them.
#[derive(Clone, Debug)]
pub struct MachineFacts {
    pub hostname: String,
    pub is_nixos: bool,
    pub is_macos: bool,
}

impl MachineFacts {
    pub fn detect() -> Self {
        MachineFacts {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            is_nixos: Path::new("/etc/NIXOS").exists(),
            is_macos: cfg!(target_os = "macos"),
        }
    }
}

fn is_host_id(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && s.len() <= 63
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn parse_bool(key: &str, raw: &RawValue) -> Result<bool, ConfigError> {
    match raw.value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::invalid(
            key,
            raw,
            "expected 1, true, yes (or 0, false, no)",
        )),
    }
}

/// Parses `30`, `30s`, `1.5`, `500ms`, `5m`, `1h` into a duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.trim().parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    // `from_secs_f64` panics beyond u64::MAX seconds (`1e300`): that is a bad value, not a crash.
    Duration::try_from_secs_f64(value * scale).ok()
}

fn duration_setting(
    raw: &RawConfig,
    key: &str,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let Some(value) = raw.get(key) else {
        return Ok(default);
    };
    match parse_duration(&value.value) {
        Some(d) if d >= min && d <= max => Ok(d),
        _ => Err(ConfigError::invalid(
            key,
            value,
            &format!(
                "expected a duration in seconds (e.g. 30, 30s, 500ms, 5m) between {} and {}",
                human_duration(min),
                human_duration(max)
            ),
        )),
    }
}

/// `90s` -> "90s", `600s` -> "600s", sub-second -> "250ms": the words the reports use.
pub fn human_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 && d.as_secs() < 10 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// Decodes `sha256//<b64>[;sha256//<b64>...]` or reads a PEM/DER public key file, like curl.
fn parse_pins(raw: &RawValue) -> Result<Vec<[u8; 32]>, ConfigError> {
    use base64::Engine as _;
    let text = raw.value.trim();
    if text.starts_with("sha256//") {
        let mut pins = Vec::new();
        for part in text.split(';') {
            let b64 = part.trim().strip_prefix("sha256//").ok_or_else(|| {
                ConfigError::invalid("pinned_pubkey", raw, "each pin must start with sha256//")
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| {
                    ConfigError::invalid("pinned_pubkey", raw, "the pin is not valid base64")
                })?;
            let pin: [u8; 32] = bytes.try_into().map_err(|_| {
                ConfigError::invalid(
                    "pinned_pubkey",
                    raw,
                    "a sha256 pin is 32 bytes (44 base64 characters)",
                )
            })?;
            pins.push(pin);
        }
        return Ok(pins);
    }
    let bytes = std::fs::read(text).map_err(|e| {
        ConfigError::invalid(
            "pinned_pubkey",
            raw,
            &format!("expected sha256//<base64> or a public key file, and reading it failed: {e}"),
        )
    })?;
    let der = match std::str::from_utf8(&bytes) {
        Ok(pem) if pem.contains("-----BEGIN PUBLIC KEY-----") => {
            use rustls::pki_types::SubjectPublicKeyInfoDer;
            use rustls::pki_types::pem::PemObject as _;
            SubjectPublicKeyInfoDer::from_pem_slice(&bytes)
                .map_err(|e| {
                    ConfigError::invalid(
                        "pinned_pubkey",
                        raw,
                        &format!("not a PEM public key: {e}"),
                    )
                })?
                .to_vec()
        }
        _ => bytes,
    };
    Ok(vec![Sha256::digest(&der).into()])
}

fn read_token_file(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    // At most 64 KiB: a token file pointing at /dev/zero must not grow the agent.
    let text = read_capped(path, 64 * 1024).map_err(|e| {
        ConfigError::new(format!(
            "cannot read the token from {} ({what}): {e}; check the path and that the agent's \
             user may read it",
            path.display()
        ))
    })?;
    let token = parse_token_text(&text);
    if token.is_empty() {
        return Err(ConfigError::new(format!(
            "the token file {} ({what}) holds no token (it is empty, or has only other \
             KEY=value lines); write the dashboard token into it, alone or as \
             NIXFLEET_TOKEN=<token>",
            path.display()
        )));
    }
    Ok(Secret::new(token))
}

fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(cap + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::other(format!(
            "it is larger than {cap} bytes"
        )));
    }
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("it is not UTF-8 text"))
}

/// A token file holds the bare token or `NIXFLEET_TOKEN=<token>` (the v1 cache format, which is
/// also a systemd `EnvironmentFile`); surrounding whitespace and CR are ignored.
///
/// In a file of `KEY=value` lines (an EnvironmentFile given by mistake), only the
/// `NIXFLEET_TOKEN=` line counts: sending `NIXFLEET_URL=...` as the token would 401 forever.
/// Without one, the result is empty, which callers report as "holds no token".
pub fn parse_token_text(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("NIXFLEET_TOKEN="))
        .or_else(|| {
            let first = lines.first()?;
            // A bare token never contains '='-separated shell names; `KEY=...` is another
            // variable.
            // (Base64 padding, `QQ==`, is not: its "value" starts with '='.)
            let looks_like_assignment = first.split_once('=').is_some_and(|(key, value)| {
                key.starts_with(|c: char| c.is_ascii_uppercase() || c == '_')
                    && key
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    && !value.is_empty()
                    && !value.starts_with('=')
            });
            (!looks_like_assignment).then_some(*first)
        })
        .unwrap_or("");
    line.trim().trim_matches('"').trim_matches('\'').to_string()
}

/// v1's defaults derived from the host name (contract §9.1).
fn derived_location(host: &str) -> &'static str {
    if host.starts_with("csb") {
        "cloud"
    } else if host.starts_with("mba-") && host.ends_with("-work") {
        "work"
    } else {
        "home"
    }
}

fn derived_device_type(host: &str) -> &'static str {
    if host.starts_with("hsb") || host.starts_with("csb") {
        "server"
    } else if host.starts_with("gpc") {
        "gaming"
    } else if host.contains("mbp") || host.contains("mba") {
        "laptop"
    } else if host.starts_with("imac") {
        "desktop"
    } else {
        "server"
    }
}

fn derived_criticality(host: &str) -> &'static str {
    match host {
        "hsb0" | "csb0" => "high",
        "hsb1" | "hsb8" | "csb1" => "medium",
        _ => "low",
    }
}

impl Settings {
    /// The one validation step: raw strings in, typed settings or the first error out.
    pub fn from_raw(raw: &RawConfig, machine: &MachineFacts) -> Result<Settings, ConfigError> {
        let allow_insecure_http = match raw.get("allow_insecure_http") {
            Some(v) => parse_bool("allow_insecure_http", v)?,
            None => false,
        };

        let url_raw = raw.get("url").ok_or_else(|| {
            ConfigError::new(
                "no dashboard URL: set NIXFLEET_URL (or `url` in the config file, or --url), \
                 e.g. https://fleet.example.com",
            )
        })?;
        let mut url: url::Url =
            url_raw.value.trim().parse().map_err(|e| {
                ConfigError::invalid("url", url_raw, &format!("not a valid URL ({e})"))
            })?;
        let forced = match raw.get("protocol") {
            None => None,
            Some(v) => match v.value.trim().to_ascii_lowercase().as_str() {
                "" | "auto" => None,
                "v1" => Some(Protocol::V1),
                "v2" => Some(Protocol::V2),
                _ => {
                    return Err(ConfigError::invalid(
                        "protocol",
                        v,
                        "expected auto, v1 (HTTP polling) or v2 (WebSocket)",
                    ));
                }
            },
        };
        let (scheme_protocol, plain) = match url.scheme() {
            "https" => (Protocol::V1, false),
            "http" => (Protocol::V1, true),
            "wss" => (Protocol::V2, false),
            "ws" => (Protocol::V2, true),
            _ => {
                return Err(ConfigError::invalid(
                    "url",
                    url_raw,
                    "must be https:// (v1 dashboard) or wss://…/ws (v2 dashboard)",
                ));
            }
        };
        if plain && !allow_insecure_http {
            return Err(ConfigError::invalid(
                "url",
                url_raw,
                "a plain http:// or ws:// URL sends the token in clear text; use https:// or \
                 wss://, or set NIXFLEET_ALLOW_INSECURE_HTTP=1 if you really mean it",
            ));
        }
        let protocol = forced.unwrap_or(scheme_protocol);
        // A forced protocol with the other family's scheme: map it (https <-> wss).
        if protocol != scheme_protocol {
            let scheme = match (protocol, plain) {
                (Protocol::V1, false) => "https",
                (Protocol::V1, true) => "http",
                (Protocol::V2, false) => "wss",
                (Protocol::V2, true) => "ws",
            };
            url.set_scheme(scheme).map_err(|()| {
                ConfigError::invalid("url", url_raw, "cannot change this URL's scheme")
            })?;
        }
        if url.host_str().is_none() {
            return Err(ConfigError::invalid("url", url_raw, "has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            // Not echoed: the value holds a password.
            return Err(ConfigError::new(format!(
                "invalid url (from {}): it must not carry a user name or password (they would \
                 be sent, and logged, with every request); the token goes in \
                 NIXFLEET_TOKEN_FILE; fix NIXFLEET_URL",
                url_raw.source
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(ConfigError::invalid(
                "url",
                url_raw,
                "must be the dashboard's base URL, without ?query or #fragment \
                 (e.g. https://fleet.example.com or https://example.com/nixfleet)",
            ));
        }
        if protocol == Protocol::V1 {
            let trimmed = url.path().trim_end_matches('/').to_string();
            url.set_path(&trimmed);
        } else if url.path() != "/ws" {
            // The v2 dashboard serves exactly `/ws`; anything else gets a 404 or a redirect to
            // the login page, forever (contract v2 Q29).
            return Err(ConfigError::invalid(
                "url",
                url_raw,
                "a v2 dashboard URL must end in /ws, e.g. wss://fleet.example.com/ws",
            ));
        }

        let ca_file = raw.get("ca_file").map(|v| PathBuf::from(v.value.trim()));
        if let (Some(path), Some(v)) = (&ca_file, raw.get("ca_file"))
            && !path.is_file()
        {
            return Err(ConfigError::invalid(
                "ca_file",
                v,
                "no such file; point it at a PEM file of CA certificates",
            ));
        }
        let pinned_pubkeys = match raw.get("pinned_pubkey") {
            Some(v) => parse_pins(v)?,
            None => Vec::new(),
        };

        let token = if let Some(v) = raw.get("token_file").filter(|v| {
            matches!(v.source, Source::Flag(_) | Source::Env(_)) || raw.env_token.is_none()
        }) {
            let path = PathBuf::from(v.value.trim());
            let secret = read_token_file(&path, &format!("token_file from {}", v.source))?;
            Some((secret, TokenOrigin::File(path)))
        } else if let Some(secret) = &raw.env_token {
            Some((secret.clone(), TokenOrigin::Env))
        } else if let Some(dir) = &raw.credentials_dir {
            let path = dir.join("token");
            if path.exists() {
                let secret = read_token_file(&path, "systemd LoadCredential=token:...")?;
                Some((secret, TokenOrigin::Credential(path)))
            } else {
                None
            }
        } else {
            None
        };

        let repo = match (raw.get("repo_url"), raw.get("nixcfg")) {
            (Some(url), _) => {
                let dir = raw.get("repo_dir").ok_or_else(|| {
                    ConfigError::new(format!(
                        "repo_url is set (from {}) but repo_dir is not: set NIXFLEET_REPO_DIR \
                         to the directory the agent should clone into",
                        url.source
                    ))
                })?;
                let dir = PathBuf::from(dir.value.trim());
                if !dir.is_absolute() {
                    return Err(ConfigError::invalid(
                        "repo_dir",
                        raw.get("repo_dir").expect("checked above"),
                        "must be an absolute path",
                    ));
                }
                check_repo_url(url)?;
                RepoMode::Isolated {
                    url: url.value.trim().to_string(),
                    dir,
                    branch: raw
                        .get("branch")
                        .map(|b| b.value.trim().to_string())
                        .unwrap_or_else(|| "main".into()),
                }
            }
            (None, Some(dir)) => RepoMode::Legacy {
                dir: PathBuf::from(dir.value.trim()),
            },
            (None, None) => RepoMode::None,
        };
        if let Some(branch) = raw.get("branch")
            && (branch.value.starts_with('-') || branch.value.contains(char::is_whitespace))
        {
            return Err(ConfigError::invalid(
                "branch",
                branch,
                "not a valid git branch name",
            ));
        }

        let interval_raw = raw.get("interval");
        let interval = match interval_raw {
            None => Duration::from_secs(30),
            Some(v) => match v.value.trim().parse::<u64>() {
                Ok(n @ 1..=3600) => Duration::from_secs(n),
                _ => {
                    return Err(ConfigError::invalid(
                        "interval",
                        v,
                        "expected whole seconds from 1 to 3600 (the dashboard's limit)",
                    ));
                }
            },
        };
        let default_cap = interval.max(Duration::from_secs(60));
        let backoff_cap = duration_setting(
            raw,
            "backoff_cap",
            default_cap,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        let stall_timeout = duration_setting(
            raw,
            "stall_timeout",
            Duration::from_secs(300),
            // The idle loop beats once a second; less than 2 s would kill a healthy agent.
            Duration::from_secs(2),
            Duration::from_secs(86_400),
        )?;
        let shutdown_grace = duration_setting(
            raw,
            "shutdown_grace",
            Duration::from_secs(20),
            Duration::ZERO,
            Duration::from_secs(3600),
        )?;
        let day = Duration::from_secs(86_400);
        let ms = Duration::from_millis(100);
        let defaults = Timeouts::default();
        let timeouts = Timeouts {
            git: duration_setting(raw, "git_timeout", defaults.git, ms, day)?,
            git_local: duration_setting(raw, "git_local_timeout", defaults.git_local, ms, day)?,
            switch: duration_setting(raw, "switch_timeout", defaults.switch, ms, day)?,
            flake: duration_setting(raw, "flake_timeout", defaults.flake, ms, day)?,
            test: duration_setting(raw, "test_timeout", defaults.test, ms, day)?,
            kill_grace: duration_setting(
                raw,
                "kill_grace",
                defaults.kill_grace,
                Duration::ZERO,
                Duration::from_secs(600),
            )?,
        };

        let hostname = match raw.get("hostname") {
            Some(v) => {
                let h = v.value.trim().to_string();
                if !is_host_id(&h) {
                    return Err(ConfigError::invalid(
                        "hostname",
                        v,
                        "the dashboard accepts 1-63 letters, digits and '-', starting with a letter",
                    ));
                }
                h
            }
            None => {
                let short = machine.hostname.split('.').next().unwrap_or("").to_string();
                if !is_host_id(&short) {
                    return Err(ConfigError::new(format!(
                        "this machine's host name {:?} is not a valid dashboard host id (1-63 \
                         letters, digits and '-', starting with a letter); set NIXFLEET_HOSTNAME",
                        machine.hostname
                    )));
                }
                short
            }
        };
        let host_type = match raw.get("host_type") {
            Some(v) => match v.value.trim() {
                "nixos" => HostType::Nixos,
                "macos" => HostType::Macos,
                _ => {
                    return Err(ConfigError::invalid(
                        "host_type",
                        v,
                        "the dashboard accepts only nixos or macos",
                    ));
                }
            },
            // The dashboard knows only nixos|macos; v1 sent `linux` from a non-NixOS Linux and
            // was rejected with 422 forever. A Linux host with Nix is closest to `nixos`.
            None if machine.is_macos => HostType::Macos,
            None => HostType::Nixos,
        };
        let location = match raw.get("location") {
            Some(v) if v.value.chars().count() > 50 => {
                return Err(ConfigError::invalid("location", v, "at most 50 characters"));
            }
            Some(v) => v.value.trim().to_string(),
            None => derived_location(&hostname).to_string(),
        };
        let device_type = match raw.get("device_type") {
            Some(v) => {
                let d = v.value.trim();
                if !matches!(d, "server" | "desktop" | "laptop" | "gaming") {
                    return Err(ConfigError::invalid(
                        "device_type",
                        v,
                        "the dashboard accepts server, desktop, laptop or gaming",
                    ));
                }
                d.to_string()
            }
            None => derived_device_type(&hostname).to_string(),
        };
        let theme_color = match raw.get("theme_color") {
            Some(v) => {
                let c = v.value.trim();
                let ok = c.len() == 7
                    && c.starts_with('#')
                    && c[1..].chars().all(|ch| ch.is_ascii_hexdigit());
                if !ok {
                    return Err(ConfigError::invalid(
                        "theme_color",
                        v,
                        "expected #rrggbb, e.g. #769ff0",
                    ));
                }
                Some(c.to_string())
            }
            None => None,
        };
        let criticality = derived_criticality(&hostname);

        let agent_version = match raw.get("agent_version") {
            Some(v) if v.value.trim().chars().count() > 20 => {
                return Err(ConfigError::invalid(
                    "agent_version",
                    v,
                    "the dashboard rejects versions longer than 20 characters",
                ));
            }
            Some(v) => v.value.trim().to_string(),
            None => default_agent_version(),
        };

        let switch_mode = match raw.get("switch_mode") {
            None => SwitchMode::Auto,
            Some(v) => match v.value.trim() {
                "auto" => SwitchMode::Auto,
                "nixos" => SwitchMode::Nixos,
                "darwin" => SwitchMode::Darwin,
                "home-manager" => SwitchMode::HomeManager,
                _ => {
                    return Err(ConfigError::invalid(
                        "switch_mode",
                        v,
                        "expected auto, nixos, darwin or home-manager",
                    ));
                }
            },
        };
        let switch_isolation = match raw.get("switch_isolation") {
            None => SwitchIsolation::Auto,
            Some(v) => match v.value.trim() {
                "auto" => SwitchIsolation::Auto,
                "systemd-run" => SwitchIsolation::SystemdRun,
                "session" => SwitchIsolation::Session,
                "none" => SwitchIsolation::None,
                _ => {
                    return Err(ConfigError::invalid(
                        "switch_isolation",
                        v,
                        "expected auto, systemd-run, session or none",
                    ));
                }
            },
        };
        let queue_limit = match raw.get("queue_limit") {
            None => 8,
            Some(v) => match v.value.trim().parse::<usize>() {
                Ok(n @ 1..=100) => n,
                _ => {
                    return Err(ConfigError::invalid(
                        "queue_limit",
                        v,
                        "expected a number of commands from 1 to 100",
                    ));
                }
            },
        };
        let path_setting = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
            match raw.get(key) {
                None => Ok(None),
                Some(v) => {
                    let p = PathBuf::from(v.value.trim());
                    if p.is_absolute() {
                        Ok(Some(p))
                    } else {
                        Err(ConfigError::invalid(key, v, "must be an absolute path"))
                    }
                }
            }
        };

        let restart_on_change = match raw.get("restart_on_change") {
            None => Vec::new(),
            Some(v) => v
                .value
                .split(':')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let path = PathBuf::from(p);
                    if path.is_absolute() {
                        Ok(path)
                    } else {
                        Err(ConfigError::invalid(
                            "restart_on_change",
                            v,
                            "must be absolute paths separated by ':'",
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
        };

        Ok(Settings {
            url,
            protocol,
            allow_insecure_http,
            allow_foreign_checkout: match raw.get("allow_foreign_checkout") {
                Some(v) => parse_bool("allow_foreign_checkout", v)?,
                None => false,
            },
            ca_file,
            pinned_pubkeys,
            token,
            token_cache: path_setting("token_cache")?,
            repo,
            ssh_key: path_setting("ssh_key")?,
            interval,
            backoff_cap,
            stall_timeout,
            shutdown_grace,
            host: HostIdentity {
                hostname,
                host_type,
                location,
                device_type,
                theme_color,
                criticality,
            },
            agent_version,
            timeouts,
            switch_mode,
            switch_isolation,
            switch_lock: path_setting("switch_lock")?
                .unwrap_or_else(|| PathBuf::from("/run/nixos/switch-to-configuration.lock")),
            agent_path: path_setting("agent_path")?,
            restart_on_change,
            state_dir: path_setting("state_dir")?,
            runtime_dir: path_setting("runtime_dir")?,
            log_filter: raw.get("log").map(|v| v.value.trim().to_string()),
            queue_limit,
            http_timeout: duration_setting(
                raw,
                "http_timeout",
                Duration::from_secs(30),
                Duration::from_millis(100),
                Duration::from_secs(300),
            )?,
            #[cfg(feature = "test-hooks")]
            debug_wedge_file: path_setting("debug_wedge_file")?,
            metrics_file: path_setting("metrics_file")?,
            booted_system: path_setting("booted_system")?
                .unwrap_or_else(|| PathBuf::from("/run/booted-system")),
            current_system: path_setting("current_system")?
                .unwrap_or_else(|| PathBuf::from("/run/current-system")),
        })
    }

    /// A human summary for `check-config`, with the token redacted.
    pub fn describe(&self) -> String {
        let token = match &self.token {
            Some((_, origin)) => format!("*** (from {origin})"),
            None => "none configured (the cached per-host token must exist)".into(),
        };
        format!(
            "url = {}\nprotocol = {}\ntoken = {token}\nhostname = {}\nhost_type = {}\nlocation = {}\n\
             device_type = {}\ninterval = {}\nbackoff_cap = {}\nrepo = {}\n\
             agent_version = {}\ntimeouts = {:?}\nswitch_mode = {:?}\n\
             switch_isolation = {:?}\nstall_timeout = {}\n",
            self.url,
            self.protocol,
            self.host.hostname,
            self.host.host_type.as_str(),
            self.host.location,
            self.host.device_type,
            human_duration(self.interval),
            human_duration(self.backoff_cap),
            RepoDescription(&self.repo),
            self.agent_version,
            self.timeouts,
            self.switch_mode,
            self.switch_isolation,
            human_duration(self.stall_timeout),
        )
    }
}

/// Refuses a `repo_url` that carries a secret: a password or (in an http(s) URL, where a user
/// name is usually an access token) any user information, or a query or fragment. git would
/// echo such a URL in its errors, which reach the log and the dashboard. An `ssh://git@…` or
/// scp-like `git@host:path` user name is no secret and is accepted.
fn check_repo_url(raw: &RawValue) -> Result<(), ConfigError> {
    let value = raw.value.trim();
    let fix = "it must not carry a password, token or query (git would echo it in errors that \
               reach the log and the dashboard); use NIXFLEET_SSH_KEY, or a git credential \
               helper or .netrc for root; fix NIXFLEET_REPO_URL";
    if value.contains("://") {
        let Ok(url) = url::Url::parse(value) else {
            return Err(ConfigError::invalid("repo_url", raw, "not a valid URL"));
        };
        let web = matches!(url.scheme(), "http" | "https");
        if url.password().is_some()
            || (web && !url.username().is_empty())
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(ConfigError::invalid("repo_url", raw, fix));
        }
    } else if let Some((user, _)) = value.split_once('@')
        && user.contains(':')
    {
        return Err(ConfigError::invalid("repo_url", raw, fix));
    }
    Ok(())
}

/// `check-config`'s view of the repository, its URL redacted all the same.
struct RepoDescription<'a>(&'a RepoMode);

impl fmt::Display for RepoDescription<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            RepoMode::Legacy { dir } => write!(f, "legacy checkout {}", dir.display()),
            RepoMode::Isolated { url, dir, branch } => write!(
                f,
                "isolated clone of {} (branch {branch}) in {}",
                crate::text::redact_url(url),
                dir.display()
            ),
            RepoMode::None => f.write_str("none"),
        }
    }
}

/// The version sent to the dashboard: the crate version, at most 20 characters.
pub fn default_agent_version() -> String {
    let v = env!("CARGO_PKG_VERSION");
    v.chars().take(20).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineFacts {
        MachineFacts {
            hostname: "hsb1.example.org".into(),
            is_nixos: true,
            is_macos: false,
        }
    }

    fn settings(env: &[(&str, &str)], flags: &[(&'static str, &str)]) -> Result<Settings, String> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let flags = FlagValues {
            config: None,
            values: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        };
        let raw = RawConfig::gather(&flags, &|k| env.get(k).cloned()).map_err(|e| e.message)?;
        Settings::from_raw(&raw, &machine()).map_err(|e| e.message)
    }

    const BASE: &[(&str, &str)] = &[
        ("NIXFLEET_URL", "https://fleet.example.org/"),
        ("NIXFLEET_TOKEN", "tok"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = BASE.to_vec();
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn defaults_follow_v1() {
        let s = settings(BASE, &[]).unwrap();
        assert_eq!(s.url.as_str(), "https://fleet.example.org/");
        assert_eq!(s.host.hostname, "hsb1");
        assert_eq!(s.host.criticality, "medium");
        assert_eq!(s.host.device_type, "server");
        assert_eq!(s.interval, Duration::from_secs(30));
        assert_eq!(s.backoff_cap, Duration::from_secs(60));
        assert_eq!(s.timeouts, Timeouts::default());
        assert_eq!(s.token.as_ref().unwrap().1, TokenOrigin::Env);
        assert_eq!(s.repo, RepoMode::None);
    }

    #[test]
    fn http_needs_explicit_permission() {
        let err = settings(&with(&[("NIXFLEET_URL", "http://x:1")]), &[]).unwrap_err();
        assert!(err.contains("NIXFLEET_ALLOW_INSECURE_HTTP"), "{err}");
        let ok = settings(
            &with(&[
                ("NIXFLEET_URL", "http://x:1"),
                ("NIXFLEET_ALLOW_INSECURE_HTTP", "yes"),
            ]),
            &[],
        )
        .unwrap();
        assert!(ok.allow_insecure_http);
    }

    #[test]
    fn the_url_scheme_chooses_the_protocol_and_a_setting_may_force_it() {
        let v1 = settings(BASE, &[]).unwrap();
        assert_eq!(v1.protocol, Protocol::V1);
        let v2 = settings(
            &with(&[("NIXFLEET_URL", "wss://fleet.example.org/ws")]),
            &[],
        )
        .unwrap();
        assert_eq!(v2.protocol, Protocol::V2);
        assert_eq!(v2.url.as_str(), "wss://fleet.example.org/ws");
        let err = settings(&with(&[("NIXFLEET_URL", "ws://x:1/ws")]), &[]).unwrap_err();
        assert!(err.contains("NIXFLEET_ALLOW_INSECURE_HTTP"), "{err}");
        let err = settings(&with(&[("NIXFLEET_URL", "wss://x")]), &[]).unwrap_err();
        assert!(err.contains("must end in /ws"), "{err}");
        let forced = settings(
            &with(&[
                ("NIXFLEET_URL", "https://fleet.example.org/ws"),
                ("NIXFLEET_PROTOCOL", "v2"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(forced.protocol, Protocol::V2);
        assert_eq!(forced.url.as_str(), "wss://fleet.example.org/ws");
        let err = settings(&with(&[("NIXFLEET_PROTOCOL", "v3")]), &[]).unwrap_err();
        assert!(err.contains("NIXFLEET_PROTOCOL"), "{err}");
    }

    #[test]
    fn errors_name_the_setting_and_source() {
        let err = settings(&with(&[("NIXFLEET_INTERVAL", "0")]), &[]).unwrap_err();
        assert!(
            err.contains("interval") && err.contains("NIXFLEET_INTERVAL"),
            "{err}"
        );
        let err = settings(&with(&[("NIXFLEET_GIT_TIMEOUT", "soon")]), &[]).unwrap_err();
        assert!(err.contains("git_timeout") && err.contains("NIXFLEET_GIT_TIMEOUT"));
        let err = settings(
            &with(&[("NIXFLEET_AGENT_VERSION", "0.1.0-very-long-version")]),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("20 characters"), "{err}");
        let err = settings(&with(&[("NIXFLEET_DEVICE_TYPE", "vm")]), &[]).unwrap_err();
        assert!(err.contains("device_type"), "{err}");
        let err = settings(&[("NIXFLEET_TOKEN", "t")], &[]).unwrap_err();
        assert!(err.contains("NIXFLEET_URL"), "{err}");
    }

    #[test]
    fn flags_beat_environment_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "interval = 10\nlocation = \"cloud\"\nbranch = \"dev\"\n",
        )
        .unwrap();
        let env: BTreeMap<String, String> = with(&[("NIXFLEET_INTERVAL", "20")])
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let flags = FlagValues {
            config: Some(file.clone()),
            values: vec![],
        };
        let raw = RawConfig::gather(&flags, &|k| env.get(k).cloned()).unwrap();
        let s = Settings::from_raw(&raw, &machine()).unwrap();
        assert_eq!(s.interval, Duration::from_secs(20));
        assert_eq!(s.host.location, "cloud");
        let flags = FlagValues {
            config: Some(file),
            values: vec![("interval", "5".into())],
        };
        let raw = RawConfig::gather(&flags, &|k| env.get(k).cloned()).unwrap();
        assert_eq!(
            Settings::from_raw(&raw, &machine()).unwrap().interval,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn config_file_rejects_unknown_keys_and_inline_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "token = \"x\"\n").unwrap();
        let flags = FlagValues {
            config: Some(file.clone()),
            values: vec![],
        };
        let err = RawConfig::gather(&flags, &|_| None).unwrap_err().message;
        assert!(err.contains("token_file"), "{err}");
        std::fs::write(&file, "intervall = 3\n").unwrap();
        let err = RawConfig::gather(&flags, &|_| None).unwrap_err().message;
        assert!(err.contains("unknown setting `intervall`"), "{err}");
    }

    #[test]
    fn token_file_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "NIXFLEET_TOKEN=abc\r\n").unwrap();
        let path = file.to_str().unwrap();
        let s = settings(
            &[
                ("NIXFLEET_URL", "https://x"),
                ("NIXFLEET_TOKEN_FILE", path),
                ("NIXFLEET_TOKEN", "env"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.token.as_ref().unwrap().0.expose(), "abc");
        let cred_dir = dir.path().to_str().unwrap();
        let s = settings(
            &[
                ("NIXFLEET_URL", "https://x"),
                ("CREDENTIALS_DIRECTORY", cred_dir),
            ],
            &[],
        )
        .unwrap();
        assert!(matches!(s.token.unwrap().1, TokenOrigin::Credential(_)));
        let err = settings(
            &[
                ("NIXFLEET_URL", "https://x"),
                ("NIXFLEET_TOKEN_FILE", "/nonexistent/token"),
            ],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("/nonexistent/token"), "{err}");
        assert!(!format!("{:?}", Secret::new("abc")).contains("abc"));
    }

    #[test]
    fn pins_parse_like_curl() {
        let pin = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let s = settings(&with(&[("NIXFLEET_PINNED_PUBKEY", pin)]), &[]).unwrap();
        assert_eq!(s.pinned_pubkeys, vec![[0u8; 32]]);
        let err = settings(&with(&[("NIXFLEET_PINNED_PUBKEY", "sha256//abc")]), &[]).unwrap_err();
        assert!(err.contains("pinned_pubkey"), "{err}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("1e300"), None);
        assert_eq!(parse_duration("1e300h"), None);
        assert_eq!(parse_duration("inf"), None);
        // A configuration error (exit 78), not a panic.
        let err = settings(&with(&[("NIXFLEET_SWITCH_TIMEOUT", "1e300")]), &[]).unwrap_err();
        assert!(err.contains("NIXFLEET_SWITCH_TIMEOUT"), "{err}");
    }

    #[test]
    fn isolated_mode_needs_repo_dir() {
        let err = settings(&with(&[("NIXFLEET_REPO_URL", "https://g/x.git")]), &[]).unwrap_err();
        assert!(err.contains("NIXFLEET_REPO_DIR"), "{err}");
        let s = settings(
            &with(&[
                ("NIXFLEET_REPO_URL", "https://g/x.git"),
                ("NIXFLEET_REPO_DIR", "/var/lib/x"),
            ]),
            &[],
        )
        .unwrap();
        assert!(matches!(s.repo, RepoMode::Isolated { ref branch, .. } if branch == "main"));
    }

    #[test]
    fn restart_on_change_takes_absolute_paths() {
        let s = settings(
            &with(&[(
                "NIXFLEET_RESTART_ON_CHANGE",
                "/etc/systemd/system/nixfleet-agent.service: /etc/nixfleet-agent/agent.toml:",
            )]),
            &[],
        )
        .unwrap();
        assert_eq!(
            s.restart_on_change,
            [
                PathBuf::from("/etc/systemd/system/nixfleet-agent.service"),
                PathBuf::from("/etc/nixfleet-agent/agent.toml")
            ]
        );
        let err = settings(
            &with(&[("NIXFLEET_RESTART_ON_CHANGE", "agent.service")]),
            &[],
        )
        .unwrap_err();
        assert!(err.contains("NIXFLEET_RESTART_ON_CHANGE"), "{err}");
        assert!(err.contains("absolute"), "{err}");
        assert!(
            settings(&with(&[]), &[])
                .unwrap()
                .restart_on_change
                .is_empty()
        );
    }

    #[test]
    fn token_text_takes_the_token_line_not_another_variable() {
        assert_eq!(parse_token_text("abc-123\n"), "abc-123");
        assert_eq!(parse_token_text("\n  NIXFLEET_TOKEN=\"xyz\"\r\n"), "xyz");
        assert_eq!(
            parse_token_text("NIXFLEET_URL=https://x\nNIXFLEET_TOKEN=tok\n"),
            "tok"
        );
        assert_eq!(
            parse_token_text("NIXFLEET_URL=https://fleet.example.com\n"),
            ""
        );
        assert_eq!(parse_token_text("# comment\nQQ==\n"), "QQ==");
        assert_eq!(parse_token_text("aGVsbG8=\n"), "aGVsbG8=");
    }

    #[test]
    fn repo_url_with_a_secret_is_refused_and_never_echoed() {
        for url in [
            "https://user:s3cret@git.example/r.git",
            "https://s3cret@git.example/r.git",
            "https://git.example/r.git?private_token=s3cret",
            "ssh://git:s3cret@git.example/r.git",
            "git:s3cret@git.example:org/r.git",
        ] {
            let env = with(&[
                ("NIXFLEET_REPO_URL", url),
                ("NIXFLEET_REPO_DIR", "/var/lib/x/repo"),
            ]);
            let err = settings(&env, &[]).unwrap_err();
            assert!(err.contains("fix NIXFLEET_REPO_URL"), "{url}: {err}");
            assert!(
                !err.contains("s3cret"),
                "{url}: the secret is echoed: {err}"
            );
        }
        for url in [
            "git@github.com:org/r.git",
            "ssh://git@git.example/r.git",
            "https://git.example/r.git",
            "/srv/git/r.git",
        ] {
            let env = with(&[
                ("NIXFLEET_REPO_URL", url),
                ("NIXFLEET_REPO_DIR", "/var/lib/x/repo"),
            ]);
            let s = settings(&env, &[]).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(
                s.describe().contains(&format!(
                    "isolated clone of {} (branch main)",
                    crate::text::redact_url(url)
                )),
                "{}",
                s.describe()
            );
        }
        // The dashboard URL is never echoed with a secret either, whatever else is wrong.
        for url in [
            "http://user:s3cret@fleet.example",
            "https://fleet.example/?token=s3cret",
        ] {
            let err = settings(&with(&[("NIXFLEET_URL", url)]), &[]).unwrap_err();
            assert!(!err.contains("s3cret"), "{url}: {err}");
        }
    }

    #[test]
    fn url_with_credentials_query_or_fragment_is_refused() {
        for url in [
            "https://user:pw@fleet.example.com",
            "https://fleet.example.com/?x=1",
            "https://fleet.example.com/#top",
        ] {
            let err = settings(&with(&[("NIXFLEET_URL", url)]), &[]).unwrap_err();
            assert!(err.contains("NIXFLEET_URL"), "{url}: {err}");
            assert!(!err.contains("pw@"), "the password is not echoed: {err}");
        }
    }
}

/// Issue 10, item 10: property tests over config values.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any value for any setting: validation never panics, and an error names a setting.
        #[test]
        fn any_value_for_any_setting_validates_or_names_a_setting(
            which in 0..SETTINGS.len(), value in any::<String>()
        ) {
            let name = &SETTINGS[which];
            let mut env: BTreeMap<&str, String> = BTreeMap::new();
            env.insert("NIXFLEET_URL", "https://fleet.example.org/".into());
            env.insert("NIXFLEET_TOKEN", "tok".into());
            env.insert(name.env, value.clone());
            let machine = MachineFacts {
                hostname: "hsb1.example.org".into(),
                is_nixos: true,
                is_macos: false,
            };
            let result = RawConfig::gather(&FlagValues::default(), &|k| env.get(k).cloned())
                .and_then(|raw| Settings::from_raw(&raw, &machine));
            if let Err(e) = result {
                let names_one = SETTINGS
                    .iter()
                    .any(|s| e.message.contains(s.key) || e.message.contains(s.env));
                prop_assert!(names_one, "{}: {}", name.env, e.message);
            }
        }
    }
}
