//! Linux facts: `/proc` for metrics, `nixos-version --json` (NixOS) or `/etc/os-release`.

use tokio_util::sync::CancellationToken;

use super::{OsFacts, limit, query};
use crate::dashboard::Metrics;
use crate::exec::Runner;

pub(super) async fn os_facts(runner: &Runner, cancel: &CancellationToken) -> OsFacts {
    if std::path::Path::new("/etc/NIXOS").exists() {
        let json = query(runner, cancel, "nixos-version", &["--json"]).await;
        let parsed: Option<serde_json::Value> = json.and_then(|j| serde_json::from_str(&j).ok());
        let field = |name: &str| {
            parsed
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        return OsFacts {
            os_name: Some("NixOS".into()),
            os_version: limit(field("nixosVersion"), 50),
            nixpkgs_version: limit(field("nixpkgsRevision"), 64),
        };
    }
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let version_id = release.lines().find_map(|l| {
        l.strip_prefix("VERSION_ID=")
            .map(|v| v.trim_matches('"').to_string())
    });
    OsFacts {
        os_name: Some("Linux".into()),
        os_version: limit(version_id, 50),
        nixpkgs_version: None,
    }
}

/// CPU counters from the previous sample, for the busy share in between.
#[derive(Debug, Default)]
pub(super) struct Sampler {
    last: Option<(u64, u64)>,
}

impl Sampler {
    pub(super) fn new() -> Self {
        Sampler {
            last: cpu_counters(),
        }
    }

    pub(super) fn sample(&mut self) -> Option<Metrics> {
        let cpu = match (self.last, cpu_counters()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                self.last = Some((busy1, total1));
                (busy1.saturating_sub(busy0)) as f64 * 100.0 / (total1 - total0) as f64
            }
            (_, now) => {
                self.last = now;
                0.0
            }
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kib = |name: &str| -> Option<f64> {
            meminfo.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
        };
        let total = kib("MemTotal")?;
        let available = kib("MemAvailable")?;
        let swap_total = kib("SwapTotal").unwrap_or(0.0);
        let swap_free = kib("SwapFree").unwrap_or(0.0);
        let load = std::fs::read_to_string("/proc/loadavg").ok()?;
        Some(Metrics {
            cpu: round1(cpu),
            ram: round1(percent(total - available, total)),
            swap: round1(percent(swap_total - swap_free, swap_total)),
            load: load.split_whitespace().next()?.to_string(),
        })
    }
}

fn percent(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        (used * 100.0 / total).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// (busy, total) jiffies from the aggregate `cpu` line of /proc/stat.
fn cpu_counters() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// This boot's id (changes on every boot): `/proc/sys/kernel/random/boot_id`.
pub(super) fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}
